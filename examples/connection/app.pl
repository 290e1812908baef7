# A WebSocket and an SSE endpoint written the way today's helpers
# (PAGI-Tools 0.002003: PAGI::WebSocket, PAGI::SSE) work: before anything
# else each checks that the scope's pagi.connection has the Www 0.6
# members it relies on, and it learns how its scope ended from the
# connection object (on_end, close_code) rather than from its own receive
# loop.  Both use abort to shed a client that breaks a rule.
#
#   /ws       echo; the 6th message in a session is one too many: abort
#   /clock    SSE: five ticks 0.2 s apart, then sse.close; a client that
#             falls behind is aborted
#   /log      what the endpoints saw end (one line per scope, newest last)
#
# Plain PAGI (Future, Future::AsyncAwait, Future::IO), so it runs unchanged
# on pagi-rs and on the reference server 0.003000.
use strict;
use warnings;
use Future;
use Future::AsyncAwait;
use Future::IO;
use Scalar::Util qw(blessed);

my $MAX_MESSAGES = 5;
my $TICKS        = 5;
my $TICK_EVERY   = 0.2;
my @ended;    # how recent scopes ended, for /log

# The check the helpers make on every websocket and sse scope: a spec
# version of 0.6 or later (a dotted MAJOR.MINOR number), and a connection
# object that can do what they will call.  Croaks naming what is missing.
sub require_connection {
    my ( $scope, $who ) = @_;
    my $version = $scope->{pagi}{spec_version} // '0.1';
    my ( $major, $minor ) = $version =~ /\A(\d+)\.(\d+)\z/;
    die "$who needs PAGI Www 0.6 or later; the server reports $version\n"
      unless defined $major && ( $major > 0 || $minor >= 6 );
    my @needed = qw(response_started is_connected on_end disconnect_reason disconnect_detail);
    push @needed, qw(close_code close_reason) if $scope->{type} eq 'websocket';
    push @needed, qw(end_future)              if $scope->{type} eq 'sse';
    my $conn = $scope->{'pagi.connection'};
    my @missing = grep { !( blessed($conn) && $conn->can($_) ) } @needed;
    die "$who needs pagi.connection capabilities @missing\n" if @missing;
    return $conn;
}

# One line per ended scope: the reason token (or "clean"), the detail and,
# for a WebSocket, the peer's Close.
sub remember_end {
    my ( $what, $conn ) = @_;
    $conn->on_end(
        sub {
            my ( $reason, $detail ) = @_;
            my $line = "$what: " . ( $reason // 'clean' );
            $line .= " ($detail)" if defined $detail;
            if ( $conn->can('close_code') && defined $conn->close_code ) {
                $line .= ' close=' . $conn->close_code;
                $line .= ' "' . $conn->close_reason . '"' if defined $conn->close_reason;
            }
            push @ended, $line;
            shift @ended while @ended > 50;
        }
    );
}

async sub http_response {
    my ( $send, $status, $body ) = @_;
    await $send->({
        type    => 'http.response.start',
        status  => $status,
        headers => [ [ 'content-type', 'text/plain' ], [ 'content-length', length $body ] ],
    });
    await $send->({ type => 'http.response.body', body => $body, more => 0 });
}

async sub echo {
    my ( $scope, $receive, $send ) = @_;
    my $conn = require_connection( $scope, 'echo' );
    await $receive->();    # websocket.connect
    # Refusing is an ordinary HTTP response before websocket.accept.
    return await http_response( $send, 404, "No WebSocket here\n" ) if $scope->{path} ne '/ws';
    remember_end( 'ws', $conn );
    await $send->({ type => 'websocket.accept' });
    my $count = 0;
    while (1) {
        my $event = await $receive->();
        # The peer closed (or the connection was lost): receiving this event
        # is this app's terminal act.
        return if $event->{type} eq 'websocket.disconnect';
        if ( ++$count > $MAX_MESSAGES ) {
            # No Close frame, no goodbye: the client broke the rules.
            $conn->abort("more than $MAX_MESSAGES messages");
            return;
        }
        my $text = $event->{text} // '(' . length( $event->{bytes} ) . ' bytes)';
        await $send->({ type => 'websocket.send', text => "echo: $text" });
        if ( $text eq 'bye' ) {
            await $send->({ type => 'websocket.close', code => 1000, reason => 'see you' });
            # The Close went out; the scope ends when the peer answers and
            # the connection closes.  Wait for that before returning.
            await $conn->end_future;
            return;
        }
    }
}

async sub clock {
    my ( $scope, $receive, $send ) = @_;
    my $conn = require_connection( $scope, 'clock' );
    return await http_response( $send, 404, "No stream here\n" ) if $scope->{path} ne '/clock';
    remember_end( 'clock', $conn );
    my $transport = $scope->{'pagi.transport'};
    await $send->({ type => 'sse.start' });
    for my $tick ( 1 .. $TICKS ) {
        # The stream is gone (the client left): stop, and send nothing more.
        return unless $conn->is_connected;
        # A client this far behind will never catch up: drop it.
        if ( $transport && $transport->buffered_amount > 4 * ( $transport->high_water_mark // 65536 ) ) {
            $conn->abort('client fell behind');
            return;
        }
        await $send->({ type => 'sse.send', event => 'tick', id => $tick, data => "tick $tick" });
        # Wake for the next tick, or at once if the stream ends meanwhile.
        await Future->wait_any( Future::IO->sleep($TICK_EVERY), $conn->end_future );
    }
    return unless $conn->is_connected;
    await $send->({ type => 'sse.close', reason => 'done' });
}

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    return await echo( $scope, $receive, $send )  if $scope->{type} eq 'websocket';
    return await clock( $scope, $receive, $send ) if $scope->{type} eq 'sse';
    return await http_response( $send, 200, join( '', map {"$_\n"} @ended ) ) if $scope->{path} eq '/log';
    return await http_response( $send, 404, "Not found\n" );
};

$app;
