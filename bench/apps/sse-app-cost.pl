# What bench/apps/sse-stream.pl's own loop costs the interpreter, without
# the server: for bench/bin/sse-bench's ceiling row.
#
# Answers an SSE request by timing n passes (`?n=`, default 1000000) of the
# same statement sse-stream.pl runs per event,
#     await $send->({ type => 'sse.send', data => "$i" });
# with $send replaced by a sub that returns at once the Future the server's
# real $send returned for one real event.  So the app builds its event hash,
# calls, awaits an already-done Future and loops exactly as it does when
# streaming, and the server does nothing.  The result is one event,
# `data: ns_per_event=<float>`.  One interpreter cannot stream faster than
# 1e9 / ns_per_event events a second, however cheap the server's part.
use strict;
use warnings;
use Future::AsyncAwait;
use Time::HiRes qw(time);

my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    die "sse-app-cost: needs an SSE request (Accept: text/event-stream)\n"
        unless $scope->{type} eq 'sse';
    my ($n) = ($scope->{query_string} // '') =~ /(?:^|&)n=(\d+)(?:&|$)/;
    $n ||= 1_000_000;

    await $send->({ type => 'sse.start', status => 200,
        headers => [ [ 'content-type', 'text/event-stream' ] ] });
    my $done = $send->({ type => 'sse.send', data => 'warm' });
    await $done;
    my $free_send = sub { $done };

    my $t0 = time;
    for my $i (1 .. $n) {
        await $free_send->({ type => 'sse.send', data => "$i" });
    }
    my $elapsed = time - $t0;

    await $send->({ type => 'sse.send',
        data => sprintf('ns_per_event=%.1f', $elapsed * 1e9 / $n) });
    await $send->({ type => 'sse.close' });
};

$app;
