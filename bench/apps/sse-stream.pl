# PAGI Server-Sent Events application for bench/bin/sse-bench.
#
# Answers an SSE request (Accept: text/event-stream) by starting the stream
# and sending n events whose data is the counter 1, 2, ... n -- on the wire
# "data: 1\n\n", "data: 2\n\n", ... -- then closing it: the same job as
# bench/sse_baseline.rs.  n comes from the query string (`?n=500`, default
# 1000).  Loaded with `do`, so the file's last expression (the coderef) is
# the application.
use strict;
use warnings;
use Future::AsyncAwait;

my $default_events = 1000;

my $app = async sub {
    my ($scope, $receive, $send) = @_;

    # No startup/shutdown work: decline the lifespan protocol.
    return if $scope->{type} eq 'lifespan';

    if ($scope->{type} eq 'http') {
        # A plain request (no Accept: text/event-stream) gets told so.
        my $body = "Send Accept: text/event-stream to get the event stream.\n";
        await $send->({
            type    => 'http.response.start',
            status  => 406,
            headers => [
                [ 'content-type',   'text/plain' ],
                [ 'content-length', length $body ],
            ],
        });
        await $send->({ type => 'http.response.body', body => $body, more => 0 });
        return;
    }

    die "Unsupported scope type: $scope->{type}\n"
        unless $scope->{type} eq 'sse';

    my $qs = $scope->{query_string} // '';
    my ($n) = $qs =~ /(?:^|&)n=(\d+)(?:&|$)/;
    $n //= $default_events;

    await $send->({
        type    => 'sse.start',
        status  => 200,
        headers => [ [ 'content-type', 'text/event-stream' ] ],
    });
    for my $i (1 .. $n) {
        await $send->({ type => 'sse.send', data => "$i" });
    }
    await $send->({ type => 'sse.close' });
};

$app;
