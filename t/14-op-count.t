use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;

# PAGI_RS_COUNT_OPS=1 (what bench/bin/cost-per-request uses): the
# interpreter counts the Perl ops it runs and prints them by op type, by
# file and by statement when it is freed at exit.  The app below runs a
# known loop per request, so its statement's count must grow with the
# requests; without the variable nothing is printed.

my $app = write_app( <<'PERL', 'op_count_app.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $n = 0;
    $n += $_ for 1 .. 500;    # the counted loop
    await $send->({ type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ] ] });
    await $send->({ type => 'http.response.body', body => "$n" });
};
PERL

sub run_requests {
    my ( $requests, %env ) = @_;
    local @ENV{ keys %env } = values %env;
    my $s = start_server( '--no-access-log', $app );
    for ( 1 .. $requests ) {
        my $r = http_request( $s->port, 'GET', '/' );
        die "request failed: $r->{raw}" unless $r->{status} == 200 && $r->{body} eq '125250';
    }
    is $s->stop, 0, "the server stops cleanly after $requests requests";
    return $s->output;
}

sub loop_ops {
    my ($out) = @_;
    my ($n) = $out =~ /^pagi-rs op count: line \S*op_count_app\.pl:6 (\d+)$/m;
    return $n;
}

my $few  = run_requests( 2,  PAGI_RS_COUNT_OPS => 1 );
my $many = run_requests( 12, PAGI_RS_COUNT_OPS => 1 );

like $many, qr/^pagi-rs op count: total \d+$/m, 'a total is printed';
like $many, qr/^pagi-rs op count: op nextstate \d+$/m, 'counts by op type';
like $many, qr/^pagi-rs op count: file \S*op_count_app\.pl \d+$/m, 'counts by file';
my ( $before, $after ) = ( loop_ops($few), loop_ops($many) );
ok defined $before && defined $after, "the app's loop statement is among the busiest" or diag $many;
# 500 iterations of an add and an iteration per request: each request adds
# at least 1,000 ops to that statement.
cmp_ok $after - $before, '>=', 10 * 1000, "ten more requests add at least 10,000 ops to it ($before -> $after)";

my $plain = run_requests(2);
unlike $plain, qr/op count/, 'without PAGI_RS_COUNT_OPS nothing is counted';

done_testing;
