# Minimal PAGI "Hello, World!" application.
#
# Used by the benchmarks in bench/ and by `make run`. Loaded with `do`, so the
# file's last expression (the coderef) is the application.
use strict;
use warnings;
use Future::AsyncAwait;

my $body = 'Hello, World!';

my $app = async sub {
    my ($scope, $receive, $send) = @_;

    # No startup/shutdown work to do: returning without handling any
    # lifespan event tells the server the app declines the lifespan protocol.
    return if $scope->{type} eq 'lifespan';

    die "Unsupported scope type: $scope->{type}\n"
        unless $scope->{type} eq 'http';

    await $send->({
        type    => 'http.response.start',
        status  => 200,
        headers => [
            [ 'content-type',   'text/plain' ],
            [ 'content-length', length $body ],
        ],
    });
    await $send->({
        type => 'http.response.body',
        body => $body,
        more => 0,
    });
};

$app;
