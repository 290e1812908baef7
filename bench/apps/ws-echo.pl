# PAGI WebSocket echo application for bench/bin/ws-bench.
#
# Accepts every WebSocket connection and sends each message back unchanged,
# text as text and bytes as bytes, until the client disconnects: the same job
# as bench/ws_baseline.rs.  Loaded with `do`, so the file's last expression
# (the coderef) is the application.
use strict;
use warnings;
use Future::AsyncAwait;

my $app = async sub {
    my ($scope, $receive, $send) = @_;

    # No startup/shutdown work: decline the lifespan protocol.
    return if $scope->{type} eq 'lifespan';

    if ($scope->{type} eq 'http') {
        my $body = "This endpoint speaks WebSocket only.\n";
        await $send->({
            type    => 'http.response.start',
            status  => 426,
            headers => [
                [ 'content-type',   'text/plain' ],
                [ 'content-length', length $body ],
                [ 'upgrade',        'websocket' ],
            ],
        });
        await $send->({ type => 'http.response.body', body => $body, more => 0 });
        return;
    }

    die "Unsupported scope type: $scope->{type}\n"
        unless $scope->{type} eq 'websocket';

    my $event = await $receive->();
    return unless $event->{type} eq 'websocket.connect';
    await $send->({ type => 'websocket.accept' });

    while (1) {
        my $msg = await $receive->();
        last if $msg->{type} eq 'websocket.disconnect';
        next unless $msg->{type} eq 'websocket.receive';
        if (defined $msg->{text}) {
            await $send->({ type => 'websocket.send', text => $msg->{text} });
        }
        else {
            await $send->({ type => 'websocket.send', bytes => $msg->{bytes} // '' });
        }
    }
};

$app;
