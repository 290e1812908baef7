use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;

# pagi-rs's call_method caches the methods it finds, per interpreter
# (src/interp/c/method_cache.c): Future::AsyncAwait calls it by name two or
# three times per `await`.  Whatever a program does to its classes, a call
# must find what Perl's own call_method would find.  t/lib/PagiRS/
# MethodRounds.pm awaits objects around every such change; its answers
# under system perl (whose Future::AsyncAwait calls perl's own call_method)
# are the reference.

my $lib = "$FindBin::Bin/lib";
my $expected = qx{$^X -I$lib -MPagiRS::MethodRounds -e "print PagiRS::MethodRounds::run()"};
is $?, 0, 'system perl ran the rounds';
# The rounds must change what a name finds, or agreeing proves nothing.
like $expected, qr/^glob assignment => glob:3$/m,           'reference: a glob assignment is seen';
like $expected, qr/^parent redefined => newbase:9$/m,        'reference: a parent\'s new method is seen';
like $expected, qr/^\@ISA changed => other:10$/m,            'reference: a new @ISA is seen';
like $expected, qr/^own method deleted => other:12$/m,       'reference: a deleted method is seen';
like $expected, qr/^diamond, c3 => right:16$/m,              'reference: a new MRO is seen';
like $expected, qr/^package 50 deleted => died: Can't locate/m, 'reference: a deleted package is seen';
like $expected, qr/^XSUB Uniq, scalar, try 2 => 1\n.*^XSUB Uniq, list, try 2 => 1:\S+Uniq$/ms,
  'reference: an XSUB method sees the context its await wants';
like $expected, qr/^XSUB Zip, scalar, try 2 => \[3\]$/m, 'reference: an XSUB\'s last value in scalar context';
like $expected, qr/^class RoundsFH, inherited, try 1 => died: .*IO::File/m,
  'reference: a class name that is also a filehandle\'s names the filehandle';
like $expected, qr/^class RoundsFH, after a bless by name, try 1 => base RoundsFH 7$/m,
  'reference: ... until the stash cache knows the class';
like $expected, qr/^class RoundsFH, package deleted => died: .*IO::File/m,
  'reference: ... and again once the package is deleted';
like $expected, qr/^Future::TIMES, try 2 => Future,timed,with btime$/m,
  'reference: Future::TIMES gives the async sub\'s Future its times';
like $expected, qr/^class PagiRS::MethodRounds::Fut, \@ISA changed, try 2 => other /m,
  'reference: a class method by name sees a new \@ISA';

my $app = write_app( <<"PERL", 'method-cache.pl' );
use strict; use warnings; use Future::AsyncAwait; use Future;
use lib '$lib';
use PagiRS::MethodRounds;
{
    package Named;
    sub new { bless {}, shift }
    sub alpha { 'alpha' }
    sub beta  { 'beta' }
    sub a_method_name_longer_than_the_cache_keeps_for_a_name { 'long' }
    package NamedKid;
    our \@ISA = ('Named');
    sub beta { 'kid beta' }
}
{
    package Awaitable;
    sub new { bless {}, shift }
    sub AWAIT_IS_READY { 1 }
    sub AWAIT_IS_CANCELLED { 0 }
    sub AWAIT_GET { 'awaited' }
}
my \$awaiting = async sub { await \$_[0] };
sub stats { join ' ', PAGI::RS::_method_cache_stats() }
my \$respond = async sub {
    my (\$send, \$body) = \@_;
    await \$send->({ type => 'http.response.start', status => 200, headers => [['content-type', 'text/plain']] });
    await \$send->({ type => 'http.response.body', body => \$body });
};
sub {
    my (\$scope, \$receive, \$send) = \@_;
    return Future->done if \$scope->{type} eq 'lifespan';
    my \$path = \$scope->{path};
    return \$respond->(\$send, join '', PagiRS::MethodRounds::run()) if \$path eq '/rounds';
    return \$respond->(\$send, stats()) if \$path eq '/stats';
    if (\$path eq '/pair') {
        # Two methods of one class whose names sit at the same address (the
        # C buffer _call_method copies each name into) share a slot of the
        # cache's table: both must stay.
        my \$kid = NamedKid->new;
        PAGI::RS::_call_method(\$kid, \$_) for qw(alpha beta);
        my (undef, \$before) = PAGI::RS::_method_cache_stats();
        PAGI::RS::_call_method(\$kid, \$_ % 2 ? 'alpha' : 'beta') for 1 .. 200;
        my (undef, \$after) = PAGI::RS::_method_cache_stats();
        return \$respond->(\$send, \$after - \$before);
    }
    if (\$path eq '/names') {
        # Each call passes its name in the same C buffer.
        my \$kid = NamedKid->new;
        my \@got = map { PAGI::RS::_call_method(\$kid, \$_) }
          qw(alpha beta alpha beta Named::beta a_method_name_longer_than_the_cache_keeps_for_a_name);
        push \@got, ref PAGI::RS::_call_method('NamedKid', 'new');
        return \$respond->(\$send, join ',', \@got);
    }
    if (\$path eq '/threads') {
        # An ithread's interpreter is a clone: it must not use (or count
        # in) its parent's cache, which another thread is using.
        require threads;
        my (undef, \$before) = PAGI::RS::_method_cache_stats();
        my \$thread = threads->create(sub {
            my \$kid = NamedKid->new;
            my %seen;
            for my \$i (1 .. 2000) {
                \$seen{ PAGI::RS::_call_method(\$kid, \$i % 2 ? 'alpha' : 'beta') }++;
                \$seen{ \$awaiting->(Awaitable->new)->get }++;
            }
            return join ',', map { "\$_=\$seen{\$_}" } sort keys %seen;
        });
        my \$mine = 0;
        for my \$i (1 .. 2000) { \$mine++ if \$awaiting->(Awaitable->new)->get eq 'awaited' }
        my \$theirs = \$thread->join;
        my (undef, \$after) = PAGI::RS::_method_cache_stats();
        return \$respond->(\$send, "\$theirs; \$mine; " . (\$after - \$before));
    }
    if (\$path eq '/sends') {
        return (async sub {
            my (undef, \$before) = PAGI::RS::_method_cache_stats();
            await \$send->({ type => 'http.response.start', status => 200, headers => [] });
            for my \$i (1 .. 100) { await \$send->({ type => 'http.response.body', body => 'x', more => 1 }) }
            my (undef, \$after) = PAGI::RS::_method_cache_stats();
            await \$send->({ type => 'http.response.body', body => ' ' . (\$after - \$before) });
        })->();
    }
    return \$respond->(\$send, 'other');
};
PERL

for my $setting ( [ 'on', undef ], [ 'off', '0' ] ) {
    my ( $name, $env ) = @$setting;
    local $ENV{PAGI_RS_METHOD_CACHE} = $env;
    delete $ENV{PAGI_RS_METHOD_CACHE} unless defined $env;
    my $s = start_server( '--no-access-log', $app );

    my $rounds = http_request( $s->port, 'GET', '/rounds' );
    is $rounds->{status}, 200, "cache $name: the rounds ran";
    is $rounds->{body}, $expected, "cache $name: every call found what system perl's call_method found";

    my $names = http_request( $s->port, 'GET', '/names' );
    is $names->{body}, 'alpha,kid beta,alpha,kid beta,beta,long,NamedKid',
      "cache $name: names passed at one address, qualified, too long to cache, a class as invocant";

    my ( $theirs, $mine, $counted ) = split /; /, http_request( $s->port, 'GET', '/threads' )->{body} // '';
    is "$theirs; $mine", 'alpha=1000,awaited=2000,kid beta=1000; 2000', "cache $name: an ithread and its parent each found their methods";
    if ( $name eq 'on' ) {
        # 2,000 awaits of the parent's own, three methods each (a few
        # misses): AWAIT_IS_READY and AWAIT_GET on the awaited object, and
        # Future->AWAIT_NEW_DONE by class name for the async sub's result.
        cmp_ok $counted, '<=', 6000, "the ithread's 8,000 calls did not go through the parent's cache";
        cmp_ok $counted, '>=', 5990, "the parent's own did, class-name calls included";
    }

    my $pair = http_request( $s->port, 'GET', '/pair' )->{body};
    if ( $name eq 'on' ) {
        is $pair, 200, 'two methods whose names share an address both stay cached';
    }
    else {
        is $pair, 0, '... none cached with the cache off';
    }

    my $sends = http_request( $s->port, 'GET', '/sends' );
    my ($hits) = $sends->{body} =~ / (\d+)\z/;
    my ( $enabled, $all_hits, $misses ) = split ' ', http_request( $s->port, 'GET', '/stats' )->{body};
    if ( $name eq 'on' ) {
        is $enabled, 1, 'the cache is on by default';
        cmp_ok $hits, '>=', 200, 'each await of a send that completed at once found both its methods in the cache';
        cmp_ok $misses, '>', 0, 'the rounds looked methods up again after each change';
    }
    else {
        is "$enabled $all_hits $misses", '0 0 0', 'PAGI_RS_METHOD_CACHE=0 turns it off';
        is $hits, 0, '... and nothing is served from it';
    }
    $s->stop;
    unlike $s->output, qr/panicked|Segmentation|ERROR/, "cache $name: the server logged no error";
}

done_testing;
