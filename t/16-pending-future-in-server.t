use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use Time::HiRes qw(sleep time);

# t/15's checks of PAGI::RS::Pending, run again inside pagi-rs: there its
# busiest methods are C (src/interp/c/pending.c), and every await, settle
# and cancellation must still behave as with plain IO::Async::Futures.
# The app runs t/15 while it serves a request, on the interpreter's own
# thread (which is not the one that loaded it); its TAP lands in the
# server's output.

my $t15 = "$FindBin::Bin/15-pending-future.t";
my $app = write_app( <<"PERL", 'pending_in_server.pl' );
use strict; use warnings; use Future::AsyncAwait;
async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    print "# t/15 inside pagi-rs\\n";
    do '$t15';
    die "t/15 did not run: \$@" if \$@;
    await \$send->({ type => 'http.response.start', status => 200, headers => [] });
    await \$send->({ type => 'http.response.body', body => 'ran' });
};
PERL

my $s = start_server( '--no-access-log', $app );
my $res = http_request( $s->port, 'GET', '/' );
is $res->{status}, 200, 'the request that ran t/15 was answered';
my $out = '';
my $deadline = time + 30;
while ( time < $deadline ) {
    $out = slurp( $s->{stderr_file} );
    last if $out =~ /^1\.\.\d+$/m;
    sleep 0.1;
}
$s->stop;

my ($plan) = $out =~ /^1\.\.(\d+)$/m;
my @ok     = $out =~ /^ok \d+ - (.*)$/mg;
my @not_ok = $out =~ /^not ok \d+ - (.*)$/mg;
ok $plan, 't/15 ran to its end inside the server' or diag $out;
is scalar @not_ok, 0, 'no check failed' or diag join "\n", @not_ok, $out;
is scalar @ok, $plan // -1, 'every check passed';
ok( ( grep { /installed, in C/ } @ok ), 'with the C versions installed' ) or diag $out;
ok( ( grep { /AWAIT_NEW_DONE is C/ } @ok ), 'Future->AWAIT_NEW_DONE among them' ) or diag $out;

done_testing;
