use strict;
use warnings;

# A client that floods a WebSocket while the interpreter is busy must not
# grow the server's memory: once --max-receive-queue messages are in
# transit to the interpreter, the server stops reading that socket and TCP
# pushes back on the client.  When the app catches up, nothing is lost.

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use PagiRS::Test;
use PagiRS::WS;

my $app = write_app(<<'APP');
use strict;
use warnings;
use Future::AsyncAwait;

async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    await $receive->();    # websocket.connect
    await $send->( { type => 'websocket.accept' } );
    my $first = await $receive->();
    # Hold the interpreter thread itself, as a CPU-bound or blocking app would.
    select( undef, undef, undef, 1.5 );
    my $count = 0;
    while (1) {
        my $event = await $receive->();
        last if $event->{type} eq 'websocket.disconnect';
        if ( defined $event->{text} && $event->{text} eq 'done' ) {
            await $send->( { type => 'websocket.send', text => "received $count" } );
            next;
        }
        $count++;
    }
};
APP

my $server = start_server( '--no-access-log', '--max-receive-queue', 50, $app );
my $ws     = PagiRS::WS->connect( $server->port, path => '/' );
ok $ws->upgraded, 'connected';
$ws->send_text('first');
sleep 0.2;    # the app is now holding the interpreter

my $rss_before = vmrss_kb( $server->pid );
my $frame      = PagiRS::WS->build_frame( opcode => 'binary', payload => 'x' x 4096 );
my $total      = 20_000;
my ( $sent, $pending ) = ( 0, '' );
my $sock = $ws->sock;
$sock->blocking(0);
my $deadline = time + 1;
while ( time < $deadline && $sent < $total ) {
    $pending = $frame if $pending eq '';
    my $n = syswrite( $sock, $pending );
    if ( !defined $n ) {
        sleep 0.01;    # the kernel's buffers are full: the server is not reading
        next;
    }
    substr( $pending, 0, $n, '' );
    $sent++ if $pending eq '';
}
my $rss_during = vmrss_kb( $server->pid );
my $mib        = $sent * length($frame) / 2**20;
ok $sent < $total, sprintf( 'the client was held back: %d of %d messages (%.1f MiB) went out in 1 s', $sent, $total, $mib );
ok $rss_during - $rss_before < 30 * 1024,
  sprintf( 'server RSS grew by %d KiB while flooded', $rss_during - $rss_before );

# The app catches up: every message arrives, in full.
$sock->blocking(1);
syswrite( $sock, $pending ) if $pending ne '';
$sent++ if $pending ne '';
$ws->send_binary( 'x' x 4096 ) for 1 .. 10;
$sent += 10;
$ws->send_text('done');
my $reply = $ws->recv_message(20);
is $reply && $reply->{data}, "received $sent", 'the app received every message once it caught up';
$ws->close(1000);
$ws->wait_close(5);

done_testing;
