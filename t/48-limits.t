use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use Time::HiRes qw(time sleep);
use File::Temp ();

# Limits set by configuration, not by the client: option values that would
# overflow are refused at startup (never a panic), --max-connections answers
# 503 once full, and --max-queued-requests bounds what piles up for a busy
# interpreter.

my $app = write_app( <<'PERL', 'limits_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use Time::HiRes ();
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    if ($scope->{type} eq 'websocket') {
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        while (1) {
            my $ev = await $receive->();
            return if $ev->{type} eq 'websocket.disconnect';
        }
    }
    # /flood: 2000 body sends of 64 KiB, none awaited, to a client that
    # does not read; report how many failed and with what.
    if ($scope->{path} eq '/flood') {
        await $send->({ type => 'http.response.start', status => 200, headers => [] });
        my $chunk = 'z' x 65536;
        my @f = map { $send->({ type => 'http.response.body', body => $chunk, more => 1 }) } 1 .. 2000;
        my @failed = grep { $_->is_ready && $_->is_failed } @f;
        my $why = @failed ? ($failed[0]->failure)[0] : '';
        open my $fh, '>', $ENV{PAGI_LIMITS_OUT} or die;
        print $fh scalar(@failed), "\n", $why;
        close $fh;
        return;
    }
    # /block: keep the interpreter busy, so that new requests queue up.
    if ($scope->{path} eq '/block') {
        my $until = Time::HiRes::time() + 1.5;
        1 while Time::HiRes::time() < $until;
    }
    my $body = "ok $scope->{path}";
    await $send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'text/plain'], ['content-length', length $body]] });
    await $send->({ type => 'http.response.body', body => $body, more => 0 });
};
$app;
PERL

subtest 'option values that cannot be represented are refused, never a panic' => sub {
    for my $flag (
        qw(--timeout --shutdown-timeout --lifespan-startup-timeout --request-timeout --ws-idle-timeout
        --sse-idle-timeout --ws-close-timeout --max-header-size --max-header-count --interpreters --network-threads
        --write-high-watermark --max-ws-frame-size --max-receive-queue)
      )
    {
        my ( $code, $err ) = run_pagi( $flag, '18446744073709551615', $app );
        is $code, 2, "$flag 18446744073709551615: exit 2";
        like $err, qr/\Q$flag\E.*too large|\Q$flag\E must be/, "$flag: the message names the option";
        unlike $err, qr/panicked/, "$flag: no panic";
    }
};

subtest 'the largest accepted timeout serves requests (no overflow at run time)' => sub {
    my $s = start_server( '--timeout', 31536000, '--shutdown-timeout', 31536000, '--request-timeout', 31536000, $app );
    my $res = http_request( $s->port, 'GET', '/x' );
    is $res->{status}, 200, 'served';
    is $s->stop('TERM'), 0, 'stops cleanly';
    unlike $s->output, qr/panicked/, 'no panic';
};

subtest '--max-connections: past the limit a connection gets 503 with Retry-After' => sub {
    my $s    = start_server( '--max-connections', 2, $app );
    my $port = $s->port;
    # Two connections held open: one keep-alive HTTP, one WebSocket.
    my ( $raw, $keep ) = raw_request( $port, "GET /one HTTP/1.1\r\nHost: x\r\n\r\n", until => qr/ok \/one/ );
    like $raw, qr{\AHTTP/1\.1 200}, 'first connection served (and kept open)';
    my $ws = PagiRS::WS->connect( $port, path => '/ws' );
    ok $ws->upgraded, 'a WebSocket is the second';
    my ($busy) = raw_request( $port, "GET /three HTTP/1.1\r\nHost: x\r\n\r\n" );
    my $r = parse_response($busy) // {};
    is $r->{status}, 503, 'the third gets 503';
    is $r->{headers}{'retry-after'}[0], '1', 'with Retry-After';
    is lc $r->{headers}{connection}[0], 'close', 'and Connection: close';
    ok $s->wait_output( qr/--max-connections 2/, 3 ), 'the limit is logged';
    # Freeing a place lets the next one in.
    $ws->close(1000);
    $ws->wait_close(3);
    $ws->eof_within(3);
    undef $ws;
    my $served;
    for ( 1 .. 40 ) {
        my $res = http_request( $port, 'GET', '/four' );
        if ( $res->{status} == 200 ) { $served = 1; last }
        sleep 0.05;
    }
    ok $served, 'after the WebSocket closed, a new connection is served';
    close $keep;
    $s->stop;
};

subtest 'an http app that does not await its sends cannot queue without bound' => sub {
    my $out = File::Temp->new;
    local $ENV{PAGI_LIMITS_OUT} = $out->filename;
    my $s    = start_server($app);
    my $rss0 = vmrss_kb( $s->pid );
    my $sock = connect_port( $s->port );
    $sock->syswrite("GET /flood HTTP/1.1\r\nHost: x\r\n\r\n");    # and never read
    my $report;
    for ( 1 .. 100 ) {
        $report = slurp( $out->filename );
        last if length $report;
        sleep 0.05;
    }
    my ( $failed, $why ) = split /\n/, $report // '', 2;
    ok $failed > 1900, "most sends failed at once ($failed of 2000)";
    like $why, qr/send queue full: .*await each send/, 'saying why';
    my $grew = ( vmrss_kb( $s->pid ) - $rss0 ) / 1024;
    ok $grew < 48, sprintf( 'server RSS grew by %.1f MiB (the 2000 chunks are 125 MiB)', $grew );
    close $sock;
    $s->stop;
};

subtest '--max-queued-requests: a busy interpreter does not queue without bound' => sub {
    my $s    = start_server( '--max-queued-requests', 3, $app );
    my $port = $s->port;
    my $blocker = connect_port($port);
    $blocker->syswrite("GET /block HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    sleep 0.3;    # the interpreter is inside /block now
    my @waiting = map {
        my $c = connect_port($port);
        $c->syswrite("GET /q$_ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        sleep 0.05;
        $c;
    } 1 .. 3;
    my $t0  = time;
    my $res = http_request( $port, 'GET', '/over' );
    is $res->{status}, 503, 'the fourth waiting request gets 503';
    ok time - $t0 < 1, 'at once, not after the interpreter frees up';
    is $res->{headers}{'retry-after'}[0], '1', 'with Retry-After';
    my ($b) = read_sock( $blocker, qr/ok \/block/, 5 );
    like $b, qr/ok \/block/, 'the busy request finishes';
    for my $i ( 1 .. 3 ) {
        my ($raw) = read_sock( $waiting[ $i - 1 ], qr/ok \/q$i/, 5 );
        like $raw, qr{\AHTTP/1\.1 200.*ok /q$i}s, "queued request $i is served";
    }
    is http_request( $port, 'GET', '/after' )->{status}, 200, 'then new requests are served again';
    $s->stop;
};

subtest 'out of descriptors: accept waits, logs once, and serves again once they free up' => sub {
    my $s    = start_server($app);
    my $port = $s->port;
    my $pid  = $s->pid;
    my ($hard) = slurp("/proc/$pid/limits") =~ /^Max open files\s+\S+\s+(\S+)/m
      or die "no open-file limit in /proc/$pid/limits";
    # Room for three more descriptors than the server holds now, far below
    # its --max-connections (resolved from the limit it started with).
    my $open = () = glob "/proc/$pid/fd/*";
    system( 'prlimit', "--pid=$pid", '--nofile=' . ( $open + 3 ) . ":$hard" ) == 0
      or die "prlimit failed: $?";
    my @clients = map {
        my $c = connect_port($port);    # the kernel completes it in the listen queue
        $c->syswrite("GET /held$_ HTTP/1.1\r\nHost: x\r\n\r\n");
        $c;
    } 1 .. 10;
    ok $s->wait_output( qr/127\.0\.0\.1:$port: cannot accept connections: Too many open files .*listen queue/, 5 ),
      'running out is logged, with the listener and what happens meanwhile';
    my ($first) = read_sock( $clients[0], qr/ok \/held1/, 5 );
    like $first, qr{\AHTTP/1\.1 200}, 'a connection taken before the limit is served';
    sleep 1;    # about twenty retries
    my $said = () = $s->output =~ /cannot accept connections/g;
    is $said, 1, 'logged once, not at every retry';
    ok $s->is_running, 'the server keeps running';

    # The clients leave; their descriptors free up, and the queue drains.
    close $_ for @clients;
    ok $s->wait_output( qr/127\.0\.0\.1:$port: accepting connections again after \d+ failed attempts over \d+ ms/, 10 ),
      'the end of the shortage is logged';
    my $res = http_request( $port, 'GET', '/after' );
    is $res->{status}, 200, 'a new connection is served';
    $s->stop;
};

done_testing;
