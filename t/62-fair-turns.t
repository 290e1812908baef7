use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use Time::HiRes qw(time sleep);

# Turns (src/interp/c/send.c): an app whose sends all complete at once (an
# SSE or streaming loop under a high-water mark it never reaches) must not
# keep the interpreter while other requests wait.  After its turn (3 ms)
# a send that completed at once resolves on the loop's next turn, so the
# waiting request is served in between; with nothing waiting, it keeps
# going undisturbed.

my $app = write_app( <<'PERL', 'fair_turns_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use Time::HiRes ();
my ($hog_state, $yields, $released) = ('idle', 0, 0);
my @slow_turns;
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    if ($scope->{path} eq '/hog') {
        # Sends until /quick has been served, or ?n sends, or 5 s.
        my ($n) = ($scope->{query_string} // '') =~ /n=(\d+)/;
        my $sse = $scope->{type} eq 'sse';
        ($hog_state, $released) = ('running', 0);
        if ($sse) { await $send->({ type => 'sse.start', status => 200 }) }
        else {
            await $send->({ type => 'http.response.start', status => 200,
                headers => [['content-type', 'text/plain']] });
        }
        my $deadline = Time::HiRes::time() + 5;
        for (my $i = 1; !$released && (!$n || $i <= $n) && ($n || Time::HiRes::time() < $deadline); $i++) {
            my $f = $sse ? $send->({ type => 'sse.send', data => $i })
                         : $send->({ type => 'http.response.body', body => "$i\n", more => 1 });
            # A send that did not complete at once: only a turn can do
            # that here (the mark is never reached).
            $yields++ unless $f->is_ready;
            await $f;
        }
        $hog_state = 'done';
        if ($sse) { await $send->({ type => 'sse.close' }) }
        else      { await $send->({ type => 'http.response.body', body => "end\n", more => 0 }) }
        return;
    }
    if ($scope->{path} eq '/slowhog') {
        # n sends, each after ms of busy work; records how many sends each
        # turn took (a turn ends where a send does not complete at once).
        my ($n)  = ($scope->{query_string} // '') =~ /n=(\d+)/;
        my ($ms) = ($scope->{query_string} // '') =~ /ms=(\d+)/;
        await $send->({ type => 'http.response.start', status => 200,
            headers => [['content-type', 'text/plain']] });
        my ($sends_this_turn, $turn) = (0, 0);
        for my $i (1 .. $n) {
            my $until = Time::HiRes::time() + $ms / 1000;
            1 while Time::HiRes::time() < $until;
            my $f = $send->({ type => 'http.response.body', body => "$i\n", more => 1 });
            $sends_this_turn++;
            if (!$f->is_ready) {
                # A hog's first turn began before the other hog asked.
                push @slow_turns, $sends_this_turn if $turn++;
                $sends_this_turn = 0;
            }
            await $f;
        }
        await $send->({ type => 'http.response.body', body => "end\n", more => 0 });
        return;
    }
    my $body = $scope->{path} eq '/slow-turns' ? join(',', @slow_turns)
             : "hog=$hog_state yields=$yields";
    $released = 1 if $scope->{path} eq '/quick';
    ($hog_state, $yields) = ('idle', 0) if $scope->{path} eq '/reset';
    await $send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'text/plain'], ['content-length', length $body]] });
    await $send->({ type => 'http.response.body', body => $body, more => 0 });
};
$app;
PERL

# A mark the hog never reaches, so only turns can make its sends wait; no
# heartbeat pings, so that nothing but the test's requests waits.
my $s = start_server( '--write-high-watermark', 256 * 1024 * 1024, '--write-low-watermark', 1024,
    '--heartbeat-timeout', 0, $app );
my $port = $s->port;

# Ask for the hog and give its app time to be in its loop; its output
# queues in the server until finish_hog reads it.
sub start_hog {
    my ( $query, @headers ) = @_;
    my $sock = connect_port($port);
    my $req  = "GET /hog$query HTTP/1.1\r\nHost: " . host_header($port) . "\r\n";
    $req .= "$_\r\n" for @headers;
    $sock->syswrite("$req\r\n");
    sleep 0.3;
    return $sock;
}

# Read the hog's stream to its end (so the next test starts quiet).
sub finish_hog {
    my ( $sock, $end ) = @_;
    my $buf      = '';
    my $deadline = time + 60;
    while ( time < $deadline ) {
        my $n = read_some( $sock, \$buf, $deadline );
        last if !$n || $buf =~ $end;
        substr( $buf, 0, length($buf) - 64, '' ) if length $buf > 1 << 20;
    }
    like( $buf, $end, 'the hog finished its stream' );
    close $sock;
}

for my $case ( [ 'http', [], qr/end\n\r\n0\r\n\r\n\z/ ], [ 'sse', ['Accept: text/event-stream'], qr/0\r\n\r\n\z/ ] ) {
    my ( $kind, $headers, $end ) = @$case;
    subtest "$kind: a request that arrives meanwhile is served before the loop ends" => sub {
        my $hog  = start_hog( '', @$headers );
        my $t0   = time;
        my $res  = http_request( $port, 'GET', '/quick', timeout => 30 );
        my $took = time - $t0;
        is( $res->{status}, 200, 'answered' );
        like( $res->{body}, qr/^hog=running/, 'while the hog was still in its loop' )
          or diag "took ${took}s: $res->{body}";
        cmp_ok( $took, '<', 2, 'well before the hog would have stopped by itself (5 s)' );
        finish_hog( $hog, $end );
        my $after = http_request( $port, 'GET', '/reset' );
        like( $after->{body}, qr/^hog=done yields=[1-9]/, 'the hog yielded its turn' ) or diag $after->{body};
    };
}

subtest 'alone, a loop is not interrupted' => sub {
    my $hog = start_hog('?n=200000');
    finish_hog( $hog, qr/end\n\r\n0\r\n\r\n\z/ );
    my $res = http_request( $port, 'GET', '/reset' );
    like( $res->{body}, qr/^hog=done yields=0$/, 'with nothing waiting, every send completed at once' )
      or diag $res->{body};
};

# The clock that ends a turn is read precisely only every 16 sends or once
# the coarse clock ticked (send.c): an app whose sends each take 2 ms must
# still be stopped a few sends past its 3 ms, not 16.
subtest 'two apps that send slowly take turns of a few sends' => sub {
    my @hogs;
    for ( 1 .. 2 ) {
        my $sock = connect_port($port);
        $sock->syswrite( "GET /slowhog?n=60&ms=2 HTTP/1.1\r\nHost: " . host_header($port) . "\r\n\r\n" );
        push @hogs, $sock;
        sleep 0.05;
    }
    finish_hog( $_, qr/end\n\r\n0\r\n\r\n\z/ ) for @hogs;
    my @turns = split /,/, http_request( $port, 'GET', '/slow-turns' )->{body};
    cmp_ok( scalar @turns, '>=', 4, 'the two apps took turns' ) or diag "turns: @turns";
    note "sends per turn: @turns";
    my ($longest) = sort { $b <=> $a } @turns;
    cmp_ok( $longest // 0, '<=', 10, 'no turn went on for 16 sends (32 ms)' ) or diag "turns: @turns";
};

$s->stop;
done_testing;
