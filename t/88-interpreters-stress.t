use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use PagiRS::SSE;
use File::Temp qw(tempdir);
use POSIX ();
use Time::HiRes qw(time sleep);

# --interpreters N under a stress run: several interpreter threads in one
# process serve a mix of every kind of request at once (plain, streamed,
# request bodies, timers, app errors and warnings, SSE, WebSocket), start
# together, run lifespan together and stop together under load.  Any state
# the C layer or the Rust core shared between interpreter threads by mistake
# shows up here as a wrong answer, a crash or a corruption message from
# Perl or malloc.  `make asan-test` runs this file against a build whose C
# layer is compiled with AddressSanitizer.

my $INTERPRETERS = 3;
my $DURATION     = $ENV{PAGI_RS_STRESS_SECONDS} // 6;
my $CLIENTS      = 6;

my $dir = tempdir( CLEANUP => 1 );

my $app_src = <<'APP';
use strict; use warnings; use Future::AsyncAwait; use Future::IO;
my $dir = '__DIR__';
# This interpreter, as distinct from the others in the process.
my $me = sprintf '%x', 0 + \%main::;
my $served = 0;

sub reply {
    my ($send, $status, $body) = @_;
    return $send->({ type => 'http.response.start', status => $status,
        headers => [['content-type', 'text/plain'], ['content-length', length $body]] })
      ->then(sub { $send->({ type => 'http.response.body', body => $body }) });
}

async sub read_body {
    my ($receive) = @_;
    my $body = '';
    while (1) {
        my $ev = await $receive->();
        last unless $ev->{type} eq 'http.request';
        $body .= $ev->{body} // '';
        last unless $ev->{more};
    }
    return $body;
}

my %http = (
    '/' => async sub { my ($scope, $receive, $send) = @_; await reply($send, 200, "$me $scope->{state}{started}") },
    '/echo' => async sub {
        my ($scope, $receive, $send) = @_;
        my $body = await read_body($receive);
        await reply($send, 200, join(',', length $body, unpack('%32C*', $body)));
    },
    '/sleep' => async sub {
        my ($scope, $receive, $send) = @_;
        await Future::IO->sleep(0.001 + rand 0.01);
        await reply($send, 200, "slept $me");
    },
    '/stream' => async sub {
        my ($scope, $receive, $send) = @_;
        await $send->({ type => 'http.response.start', status => 200,
            headers => [['content-type', 'text/plain']] });
        for my $n (1 .. 50) {
            await $send->({ type => 'http.response.body', body => "$n\n", more => 1 });
        }
        await $send->({ type => 'http.response.body', body => "end $me\n" });
    },
    '/die' => async sub { die "planned failure\n" },
    '/warn' => async sub {
        my ($scope, $receive, $send) = @_;
        warn "planned warning from $me\n";
        await reply($send, 200, "warned $me");
    },
    '/data' => async sub {
        my ($scope, $receive, $send) = @_;
        # Allocate and free a little structure, as real apps do.
        my %h = map { ("k$_" => [ ($_) x 20 ]) } 1 .. 200;
        my $sum = 0;
        $sum += $_->[0] for values %h;
        await reply($send, 200, "sum $sum");
    },
);

my $app = async sub {
    my ($scope, $receive, $send) = @_;
    if ($scope->{type} eq 'lifespan') {
        while (1) {
            my $ev = await $receive->();
            if ($ev->{type} eq 'lifespan.startup') {
                $scope->{state}{started} = "up-$me";
                await $send->({ type => 'lifespan.startup.complete' });
            }
            elsif ($ev->{type} eq 'lifespan.shutdown') {
                open my $fh, '>', "$dir/shutdown-$me" or die;
                print $fh $served;
                close $fh;
                await $send->({ type => 'lifespan.shutdown.complete' });
                return;
            }
        }
    }
    $served++;
    if ($scope->{type} eq 'sse') {
        await $send->({ type => 'sse.start', status => 200 });
        for my $n (1 .. 5) {
            await Future::IO->sleep(0.002);
            await $send->({ type => 'sse.send', event => 'tick', data => "$n $me" });
        }
        return;
    }
    if ($scope->{type} eq 'websocket') {
        my $ev = await $receive->();
        await $send->({ type => 'websocket.accept' });
        while (1) {
            $ev = await $receive->();
            last if $ev->{type} eq 'websocket.disconnect';
            await $send->({ type => 'websocket.send', text => "echo $ev->{text}" });
        }
        return;
    }
    my $handler = $http{$scope->{path}} or return reply($send, 404, 'no route');
    await $handler->($scope, $receive, $send);
};
$app;
APP
$app_src =~ s/__DIR__/$dir/g;
my $app = write_app($app_src);

# A request whose answer always has a body string: the stop-under-load
# rounds see refused connections.
sub request {
    my $r = http_request(@_);
    $r->{body} //= '';
    return $r;
}

# Each client process runs one kind of traffic after another until the
# deadline and writes what it saw: "ok N", and one line per wrong answer.
sub client_loop {
    my ( $port, $id, $until ) = @_;
    my ( $ok, @bad, %who ) = (0);
    my $check = sub {
        my ( $what, $good, $detail ) = @_;
        if   ($good) { $ok++ }
        else         { push @bad, "$what: " . ( $detail // '' ) }
    };
    my $round = 0;
    while ( time < $until ) {
        my $kind = ( $id + $round++ ) % 9;
        if ( $kind == 0 ) {
            my $r = request( $port, 'GET', '/' );
            my ( $who, $up ) = split ' ', $r->{body} // '';
            $who{$who}++ if $who;
            $check->( 'hello', $r->{status} == 200 && $up && $up eq "up-$who", "$r->{status} $r->{body}" );
        }
        elsif ( $kind == 1 ) {
            my $body = join '', map { chr( ( $_ * 7 + $round ) % 256 ) } 1 .. ( 1000 + $round * 37 % 60000 );
            my $r    = request( $port, 'POST', '/echo', body => $body );
            my $want = join ',', length $body, unpack( '%32C*', $body );
            $check->( 'echo', $r->{status} == 200 && $r->{body} eq $want, "$r->{status} $r->{body} (want $want)" );
        }
        elsif ( $kind == 2 ) {
            my $r = request( $port, 'GET', '/sleep' );
            $check->( 'sleep', $r->{status} == 200 && $r->{body} =~ /^slept \w+$/, "$r->{status}" );
        }
        elsif ( $kind == 3 ) {
            my $r = request( $port, 'GET', '/stream' );
            my $want = join( '', map {"$_\n"} 1 .. 50 );
            $check->( 'stream', $r->{status} == 200 && ( $r->{body} // '' ) =~ /^\Q$want\Eend \w+\n\z/, "$r->{status}" );
        }
        elsif ( $kind == 4 ) {
            my $r = request( $port, 'GET', '/die' );
            $check->( 'die', $r->{status} == 500, "$r->{status}" );
        }
        elsif ( $kind == 5 ) {
            my $r = request( $port, 'GET', '/warn' );
            $check->( 'warn', $r->{status} == 200, "$r->{status}" );
        }
        elsif ( $kind == 6 ) {
            my $r = request( $port, 'GET', '/data' );
            $check->( 'data', $r->{status} == 200 && $r->{body} eq 'sum 20100', "$r->{status} $r->{body}" );
        }
        elsif ( $kind == 7 ) {
            my $sse    = PagiRS::SSE->open( $port, '/events' );
            my @events = map { $sse->next_event } 1 .. 5;
            my @data   = map { $_ ? $_->{data} : '' } @events;
            my ($who)  = ( $data[0] // '' ) =~ /^1 (\w+)$/;
            $check->( 'sse', $sse->status == 200 && $who && "@data" eq join( ' ', map {"$_ $who"} 1 .. 5 ), "@data" );
            $sse->close;
        }
        else {
            my $ws = PagiRS::WS->connect( $port, path => '/ws' );
            my $good = $ws->upgraded;
            for my $n ( 1 .. 10 ) {
                last unless $good;
                $ws->send_text("m$n-$id");
                my $m = $ws->recv_message;
                $good = $m && $m->{data} eq "echo m$n-$id";
            }
            $ws->close if $ws->upgraded;
            $check->( 'websocket', $good, 'wrong or missing echo' );
        }
    }
    open my $fh, '>', "$dir/client-$id" or die "$dir/client-$id: $!";
    print $fh "ok $ok\n", map( {"who $_\n"} keys %who ), map( {"bad $_\n"} @bad );
    close $fh;
}

sub run_clients {
    my ( $port, $seconds ) = @_;
    unlink glob "$dir/client-*";
    my $until = time + $seconds;
    my @pids;
    for my $id ( 1 .. $CLIENTS ) {
        my $pid = fork // die "fork: $!";
        if ( !$pid ) {
            my $ok = eval { client_loop( $port, $id, $until ); 1 };
            if ( !$ok ) {
                open my $fh, '>', "$dir/client-$id";
                print $fh "ok 0\nbad client died: $@\n";
            }
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    waitpid $_, 0 for @pids;
    my ( $ok, @bad, %who ) = (0);
    for my $id ( 1 .. $CLIENTS ) {
        my @lines = file_lines("$dir/client-$id");
        push @bad, "client $id wrote no report" unless @lines;
        for (@lines) {
            $ok += $1 if /^ok (\d+)/;
            $who{$1}++ if /^who (\w+)/;
            push @bad, $1 if /^bad (.*)/;
        }
    }
    return ( $ok, \@bad, scalar keys %who );
}

my $CORRUPTION = qr/panicked|Segmentation|Attempt to free|double free|corrupted|AddressSanitizer|free\(\): invalid|Bizarre copy|Modification of a read-only/;

subtest "$INTERPRETERS interpreters serve every kind of request at once" => sub {
    my $s = start_server( '--interpreters', $INTERPRETERS, '--no-access-log', $app );
    my ( $ok, $bad, $interpreters_seen ) = run_clients( $s->port, $DURATION );
    cmp_ok $ok, '>', 200, "$ok answers checked in ${DURATION}s";
    is_deeply [ @$bad[ 0 .. ( $#$bad < 9 ? $#$bad : 9 ) ] ], [], 'every answer was right';
    cmp_ok $interpreters_seen, '>=', 2, "requests reached $interpreters_seen interpreters";
    ok $s->is_running, 'the server is still running';
    is $s->stop('TERM'), 0, 'it exits 0 after TERM';
    my @shutdown = glob "$dir/shutdown-*";
    is scalar @shutdown, $INTERPRETERS, 'lifespan shutdown ran in every interpreter';
    my $log = $s->output;
    unlike $log, $CORRUPTION, 'no crash or corruption reported';
    like $log, qr/planned warning/, "the apps' warnings reached the log";
};

subtest 'start and stop together, under load, five times' => sub {
    for my $round ( 1 .. 5 ) {
        unlink glob "$dir/shutdown-*";
        my $s = start_server( '--interpreters', $INTERPRETERS, '--no-access-log', $app );
        my $port = $s->port;
        # Stop while the clients are busy: requests are in flight in every
        # interpreter when TERM arrives.
        my $loader = fork // die "fork: $!";
        if ( !$loader ) { run_clients( $port, 1.5 ); POSIX::_exit(0) }
        sleep 0.7;
        my $code = $s->stop('TERM');
        waitpid $loader, 0;
        is $code, 0, "round $round: exit 0 when stopped under load";
        is $s->{exit_signal} // 0, 0, "round $round: not killed by a signal";
        is scalar( my @f = glob "$dir/shutdown-*" ), $INTERPRETERS, "round $round: lifespan shutdown in every interpreter";
        unlike $s->output, $CORRUPTION, "round $round: no crash or corruption reported";
    }
};

done_testing;
