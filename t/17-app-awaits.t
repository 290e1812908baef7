use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;

# An http app that returns a pending Future (it awaited something before
# finishing: a database, a timer, the request body) ends through
# src/interp/c/http_app.c's await_app and xs_app_ended, which stand in for
# HTTP.pm's _app_returned and _app_ready.  Each way such a Future can end
# must end the request as the Perl halves would, and leave nothing behind.

my $app = write_app( <<'PERL', 'awaits.pl' );
use strict; use warnings; use Future::AsyncAwait; use IO::Async::Loop; use Future;
my $loop = IO::Async::Loop->new;
sub soon { my ($how, @args) = @_; my $f = $loop->new_future; $loop->later(sub { $f->$how(@args) }); $f }
sub plain_soon { my ($how, @args) = @_; my $f = Future->new; $loop->later(sub { $f->$how(@args) }); $f }
# Whether new keys of the request registry go to Perl's shared string
# table (the B flag SVphv_SHAREKEYS), and the keys it holds now.
sub registry_keys {
    require B;
    my $shared = B::svref_2object(\%PAGI::RS::Bridge::REQUESTS)->FLAGS & 0x20000000;
    return ( $shared ? 'shared' : 'private' ) . ' ' . join ',', keys %PAGI::RS::Bridge::REQUESTS;
}
my $respond = async sub {
    my ($send, $body) = @_;
    await $send->({ type => 'http.response.start', status => 200, headers => [['content-type', 'text/plain']] });
    await $send->({ type => 'http.response.body', body => $body });
};
my $awaiting = async sub {
    my ($scope, $receive, $send) = @_;
    my $path = $scope->{path};
    my $got = await soon(done => 'waited');
    if ($path eq '/ok')      { await $respond->($send, $got); return }
    if ($path eq '/twice')   { await soon(done => 1); await $respond->($send, "$got twice"); return }
    if ($path eq '/die')     { die "awaits-test-death\n" }
    if ($path eq '/nothing') { return }
    if ($path eq '/count')   { await $respond->($send, scalar keys %PAGI::RS::Bridge::REQUESTS); return }
    if ($path eq '/keys')    { await $respond->($send, registry_keys()); return }
    await $respond->($send, 'other');
};
sub {
    my ($scope, $receive, $send) = @_;
    return Future->done if $scope->{type} eq 'lifespan';
    my $path = $scope->{path};
    # Futures that are not an async sub's: a plain one that fails, one
    # cancelled, and one done after the response went out.
    return plain_soon(fail => "awaits-test-failure\n") if $path eq '/fail';
    return soon('cancel') if $path eq '/cancel';
    if ($path eq '/plain-done') {
        my $f = Future->new;
        $respond->($send, 'plain')->on_done(sub { $loop->later(sub { $f->done }) });
        return $f;
    }
    return $awaiting->($scope, $receive, $send);
};
PERL

my $s = start_server( '--no-access-log', $app );

my $ok = http_request( $s->port, 'GET', '/ok' );
is $ok->{status}, 200, 'an app that awaited, then answered: 200';
is $ok->{body}, 'waited', '... with its body';

my $twice = http_request( $s->port, 'GET', '/twice' );
is $twice->{body}, 'waited twice', 'an app that awaited twice before answering';

my $plain = http_request( $s->port, 'GET', '/plain-done' );
is $plain->{body}, 'plain', 'a plain Future done after the response went out';

for my $case (
    [ '/die',     'died after awaiting' ],
    [ '/nothing', 'returned after awaiting without a response' ],
    [ '/fail',    'returned a Future that failed later' ],
    [ '/cancel',  'returned a Future cancelled later' ],
  )
{
    my ( $path, $what ) = @$case;
    my $res = http_request( $s->port, 'GET', $path );
    is $res->{status}, 500, "an app that $what: 500";
}

# Every request above (and many more on one keep-alive connection each)
# was forgotten: the registry holds only the request asking.
http_request( $s->port, 'GET', $_ ) for ( ('/ok') x 50, ('/die') x 10, ('/fail') x 10, ('/cancel') x 10 );
my $count = http_request( $s->port, 'GET', '/count' );
is $count->{body}, '1', 'no request is left in the registry once its app ended';

# Each request's id is a key no other hash has, added and deleted once per
# request: the registry keeps such keys out of the shared string table
# (src/interp/c/lookups.c), and still finds them as any hash would.
my $keys = http_request( $s->port, 'GET', '/keys' );
like $keys->{body}, qr/^private \d+$/, 'the registry does not share its keys, and holds the asking request';

my $out = slurp( $s->{stderr_file} );
like $out, qr/awaits-test-death/,   'the death after the await is logged';
like $out, qr/awaits-test-failure/, 'the failure of the returned Future is logged';
like $out, qr/cancelled/,           'the cancellation is logged';
ok $s->is_running, 'the server kept serving';
is $s->stop('TERM'), 0, 'server exits 0 on SIGTERM';

done_testing;
