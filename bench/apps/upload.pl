# A hello-world app that reads a request body first when there is one:
# the slow-clients bench trickles POST bodies at it while wrk measures
# GET / beside them.
use strict;
use warnings;
use Future::AsyncAwait;

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    my $read = 0;
    while (1) {
        my $event = await $receive->();
        last if $event->{type} ne 'http.request';
        $read += length $event->{body};
        last unless $event->{more};
    }
    my $body = $scope->{method} eq 'POST' ? "read $read bytes" : 'Hello, World!';
    await $send->({
        type    => 'http.response.start',
        status  => 200,
        headers => [ [ 'content-type', 'text/plain' ], [ 'content-length', length $body ] ],
    });
    await $send->({ type => 'http.response.body', body => $body, more => 0 });
};
$app;
