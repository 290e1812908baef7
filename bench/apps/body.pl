# The body workloads of bench/bin/body-bench, as hyper-baseline serves them:
#   GET /stream  1 MiB as 16 http.response.body events of 64 KiB;
#   POST /echo   the request body sent back event by event as it is read;
#   GET /file    the file named by $ENV{PAGI_BENCH_FILE}, as one `file` body;
# anything else: Hello, World!
use strict;
use warnings;
use Future::AsyncAwait;

my $chunk = 'x' x ( 64 * 1024 );

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    my $route = "$scope->{method} $scope->{path}";
    if ( $route eq 'GET /stream' ) {
        await $send->( { type => 'http.response.start', status => 200,
            headers => [ [ 'content-type', 'text/plain' ] ] } );
        for my $i ( 1 .. 16 ) {
            await $send->( { type => 'http.response.body', body => $chunk, more => $i < 16 ? 1 : 0 } );
        }
        return;
    }
    if ( $route eq 'GET /file' && defined $ENV{PAGI_BENCH_FILE} ) {
        my $path = $ENV{PAGI_BENCH_FILE};
        await $send->( { type => 'http.response.start', status => 200,
            headers => [ [ 'content-type', 'text/plain' ], [ 'content-length', -s $path ] ] } );
        await $send->( { type => 'http.response.body', file => $path } );
        return;
    }
    if ( $route eq 'POST /echo' ) {
        await $send->( { type => 'http.response.start', status => 200,
            headers => [ [ 'content-type', 'text/plain' ] ] } );
        while (1) {
            my $event = await $receive->();
            last if $event->{type} ne 'http.request';
            await $send->( { type => 'http.response.body', body => $event->{body},
                more => $event->{more} ? 1 : 0 } );
            return unless $event->{more};
        }
        return;
    }
    my $body = 'Hello, World!';
    await $send->( { type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ], [ 'content-length', length $body ] ] } );
    await $send->( { type => 'http.response.body', body => $body, more => 0 } );
};
$app;
