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
    my $body = "hog=$hog_state yields=$yields";
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

$s->stop;
done_testing;
