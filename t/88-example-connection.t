use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use PagiRS::SSE;
use Time::HiRes qw(time sleep);

# examples/connection/app.pl: endpoints written the way PAGI-Tools 0.002003's
# helpers work (a Www 0.6 capability check on pagi.connection first, the
# outcome from on_end and close_code, abort for a client that breaks a
# rule), run unchanged against the real binary.

my $app  = "$FindBin::Bin/../examples/connection/app.pl";
my $s    = start_server($app);
my $port = $s->port;

# The example's /log: one line per ended scope, newest last.
sub log_lines {
    my ( $n, $timeout ) = @_;
    my $deadline = time + ( $timeout // 5 );
    my @lines;
    while (1) {
        @lines = split /\n/, http_request( $port, 'GET', '/log' )->{body} // '';
        return @lines if @lines >= $n || time > $deadline;
        sleep 0.05;
    }
}

subtest 'WebSocket echo passes the capability check and ends cleanly on its own Close' => sub {
    my $ws = PagiRS::WS->connect( $port, path => '/ws' );
    ok $ws->upgraded, 'accepted: the check found every member it needs';
    $ws->send_text('hi');
    my $m = $ws->recv_message(3);
    is $m && $m->{data}, 'echo: hi', 'echo';
    $ws->send_text('bye');
    $m = $ws->recv_message(3);
    is $m && $m->{data}, 'echo: bye', 'echo before closing';
    my ( $code, $reason ) = $ws->wait_close(3);
    is $code,   1000,      "the app's Close code";
    is $reason, 'see you', "and reason";
    ok $ws->eof_within(3), 'the server closes the connection after the handshake';
    $ws->disconnect( graceful => 1 );
    my @log = log_lines(1);
    # The test client answers a Close with its code and no reason.
    is $log[-1], 'ws: clean close=1000',
      'on_end saw a clean end; close_code is the peer\'s answer, close_reason undef for an empty one';
};

subtest 'abort drops a client that sends one message too many, with no Close frame' => sub {
    my $before = () = log_lines(0);
    my $ws = PagiRS::WS->connect( $port, path => '/ws' );
    for my $i ( 1 .. 5 ) {
        $ws->send_text("m$i");
        my $m = $ws->recv_message(3);
        is $m && $m->{data}, "echo: m$i", "message $i echoed";
    }
    $ws->send_text('m6');
    ok $ws->eof_within(3), 'the connection is dropped';
    ok !$ws->close_received, 'no Close frame came before it';
    my @log = log_lines( $before + 1 );
    is $log[-1], 'ws: app_abort (more than 5 messages) close=1006',
      'on_end: app_abort with the app\'s detail; close_code 1006';
};

subtest 'SSE clock: five ticks, then sse.close' => sub {
    my $c = PagiRS::SSE->open( $port, '/clock' );
    is $c->status, 200, 'stream started';
    my @ticks = map { $c->next_event(3) } 1 .. 5;
    is_deeply [ map { $_ && $_->{data} } @ticks ], [ map {"tick $_"} 1 .. 5 ], 'five ticks';
    ok $c->wait_eof(3) && $c->complete, 'the stream ends with its terminator (sse.close)';
    my @log = log_lines(1);
    is $log[-1], 'clock: clean', 'on_end saw a clean end (no close_code on sse)';
};

subtest 'a client that leaves the clock early ends it client_closed' => sub {
    my $c = PagiRS::SSE->open( $port, '/clock' );
    is( ( $c->next_event(3) // {} )->{data}, 'tick 1', 'first tick' );
    $c->close;
    my $deadline = time + 5;
    my @log;
    until ( ( $log[-1] // '' ) =~ /^clock: client_closed/ || time > $deadline ) {
        @log = log_lines(1);
        sleep 0.05;
    }
    like $log[-1], qr/^clock: client_closed \(.+\)$/, 'on_end: client_closed, with a detail';
};

subtest 'refusals are ordinary 404 responses' => sub {
    my $ws = PagiRS::WS->connect( $port, path => '/elsewhere' );
    ok !$ws->upgraded, 'not upgraded';
    is $ws->status, 404, 'the app\'s 404';
    is lc( $ws->header('connection') // '' ), 'close', 'Connection: close';
    my $c = PagiRS::SSE->open( $port, '/elsewhere' );
    is $c->status, 404, 'an sse request elsewhere: 404';
    is lc( $c->header('connection') // '' ), 'close', 'Connection: close';
};

subtest 'under --spec-version 0.3 the capability check refuses to run' => sub {
    my $old = start_server( '--spec-version', '0.3', $app );
    my $ws  = PagiRS::WS->connect( $old->port, path => '/ws' );
    is $ws->status, 500, 'no accept: the check died before deciding (the 500 backstop)';
    ok $old->wait_output( qr/echo needs PAGI Www 0\.6 or later; the server reports 0\.3/, 3 ),
      'the check named the version the server reports';
    $old->stop;
};

unlike $s->output, qr/\b(?:ERROR|WARN)\b/, 'the server logged no errors or warnings';
is $s->stop('TERM'), 0, 'server exits 0';

done_testing;
