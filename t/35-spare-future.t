use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use Time::HiRes qw(sleep);

# The done Future an http app's async sub returns is kept, when nothing
# else holds it, for the next async sub that finishes without waiting
# (src/interp/c/pending.c, "a done Future kept for the next one").  The
# application must not be able to tell: what the app returned is let go
# when its request ends, a Future anybody holds is never handed out again,
# and every Future handed out holds its own result.

my $dir    = tempdir( CLEANUP => 1 );
my $marker = "$dir/guard-gone";

my $app = write_app( <<"PERL", 'spare_future.pl' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP ();
use Scalar::Util qw(refaddr weaken);
package Guard { sub DESTROY { open my \$fh, '>', '$marker' or die \$!; close \$fh } }
my (\@held, \$weak);
async sub helper { return \@_ }
my \$inner = async sub {
    my (\$scope, \$receive, \$send, \$extra) = \@_;
    my \$path = \$scope->{path};
    my (\$kept, \$reused) = PAGI::RS::_spare_future_stats();
    my \%d = (kept => \$kept, reused => \$reused);
    if (\$path eq '/helpers') {
        # Done Futures an app makes and keeps itself, between requests.
        push \@held, [ \$_, helper(\$_) ] for 1 .. 3;
        \$d{held} = [ map { [ \$_->[0], [ \$_->[1]->get ], \$_->[1]->is_done ? 1 : 0 ] } \@held ];
        \$d{distinct} = scalar keys %{{ map { refaddr(\$_->[1]) => 1 } \@held }};
    }
    \$d{weak_defined} = defined \$weak ? 1 : 0 if \$path eq '/weak-check';
    my \$out = JSON::PP->new->canonical->encode(\\\%d);
    await \$send->({type => 'http.response.start', status => 200,
        headers => [['content-type', 'application/json'], ['content-length', length \$out]]});
    await \$send->({type => 'http.response.body', body => \$out});
    return \$path eq '/guard' ? bless({}, 'Guard') : (\$path, 1);
};
# Not an async sub: it may hold the Future the inner app returns, which is
# also the one the server gets.
my \$app = sub {
    my (\$scope) = \@_;
    return Future->done if \$scope->{type} eq 'lifespan';
    my \$f = \$inner->(\@_);
    push \@held, [ 'app', \$f ] if \$scope->{path} eq '/hold';
    if (\$scope->{path} eq '/weak') { \$weak = \$f; weaken \$weak }
    return \$f;
};
\$app;
PERL

my $s    = start_server($app);
my $sock = connect_port( $s->port );
sub ask { ask_json( $sock, @_ ) }

subtest "an app's done Future is kept and handed to the next" => sub {
    my $first = ask('/plain');
    my $last;
    $last = ask('/plain') for 1 .. 10;
    cmp_ok $last->{kept} - $first->{kept},     '>=', 9, 'kept at the end of nearly every request';
    cmp_ok $last->{reused} - $first->{reused}, '>=', 9, 'and handed out again';
};

subtest 'what the app returned goes when its request ends' => sub {
    ok !-e $marker, 'no guard yet';
    ask('/guard');
    my $gone = 0;
    for ( 1 .. 100 ) { last if $gone = -e $marker; sleep 0.05 }
    ok $gone, 'the guard the app returned was destroyed without another request';
};

subtest 'Futures anybody holds keep their own results' => sub {
    ask('/hold');
    ask('/plain') for 1 .. 3;
    my $d = ask('/helpers');
    is_deeply $d->{held}, [ [ 'app', [ '/hold', 1 ], 1 ], map { [ $_, [$_], 1 ] } 1 .. 3 ],
      'the held app Future and each helper Future hold what they were given';
    is $d->{distinct}, 4, 'four different Futures';
    $d = ask('/helpers');
    is_deeply [ map { $_->[1] } @{ $d->{held} } ], [ [ '/hold', 1 ], ( map { [$_] } 1 .. 3 ), ( map { [$_] } 1 .. 3 ) ],
      'and still do after more were made';
    is $d->{distinct}, 7, 'seven different Futures';
};

subtest 'a Future weakly held goes undef when its request ends' => sub {
    ask('/weak');
    ask('/plain');
    is ask('/weak-check')->{weak_defined}, 0, 'the weak reference is undef: it was not kept';
};

$s->stop;
done_testing;
