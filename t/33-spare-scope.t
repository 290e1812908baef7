use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use Time::HiRes qw(sleep);

# A finished http request's scope hash is kept for the next request when
# nothing but the server holds it (src/interp/c/spare_scope.c).  The
# application must not be able to tell: every scope has its own values
# and only the spec's keys, a scope the app holds (strongly or weakly) is
# never reused, a value it holds never changes, and the values of a kept
# scope are let go when its request ends, not when the next one comes.  The
# same for the strings and arrays a kept scope keeps to fill in place (path,
# raw_path, query_string, headers, client, server): only those nobody else
# holds and whose kind and shape the app did not change, and the next
# request's values replace every bit of them (UTF-8 flags included).

my $dir    = tempdir( CLEANUP => 1 );
my $marker = "$dir/guard-gone";

my $app = write_app( <<"PERL", 'spare_scope.pl' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP ();
use Scalar::Util qw(weaken blessed reftype looks_like_number);
my \$marker = '$marker';
package Guard { sub DESTROY { open my \$fh, '>', \$marker or die \$!; close \$fh } }
my (\@held, \@held_headers, \@held_pagi, \$weak, \@copies, \@refs, \@weak_values);
sub facts {
    my (\$scope) = \@_;
    my (\$kept, \$reused, \$values_kept) = PAGI::RS::_spare_scope_stats();
    # First, before keys() resets it: where each() starts.
    my \$each = 0;
    \$each++ while each %\$scope;
    return {
        each    => \$each,
        blessed => blessed(\$scope) // '',
        kind    => reftype(\$scope),
        keys    => [ sort keys %\$scope ],
        path    => \$scope->{path},
        query   => \$scope->{query_string},
        headers => [ map { [\@\$_] } \@{ \$scope->{headers} } ],
        state   => [ sort keys %{ \$scope->{state} } ],
        pagi    => { %{ \$scope->{pagi} } },
        extensions => [ sort keys %{ \$scope->{extensions} } ],
        fullflush  => ref \$scope->{extensions}{fullflush},
        has_client => exists \$scope->{client} ? 1 : 0,
        client  => \$scope->{client} && [ \@{ \$scope->{client} } ],
        server  => [ \@{ \$scope->{server} } ],
        raw_path => \$scope->{raw_path},
        basics   => [ \@\$scope{qw(type method scheme http_version root_path)} ],
        path_utf8   => utf8::is_utf8(\$scope->{path}) ? 1 : 0,
        string_utf8 => [ map { utf8::is_utf8(\$_) ? 1 : 0 }
            \@\$scope{qw(raw_path query_string type method scheme http_version root_path)},
            \@{ \$scope->{pagi} }{qw(version spec_version)},
            (map { \@\$_ } \@{ \$scope->{headers} }), \$scope->{client}[0] // '', \$scope->{server}[0] ],
        # looks_like_number, as it reads an integer without making it a
        # string too (which would keep it from being kept).
        ports_are_numbers => [ map { !ref \$_->[1] && looks_like_number(\$_->[1]) ? 1 : 0 }
            grep { defined } \@\$scope{qw(client server)} ],
        kept    => \$kept,
        reused  => \$reused,
        values_kept => \$values_kept,
    };
}
my \$app = async sub {
    my (\$scope, \$receive, \$send) = \@_;
    return if \$scope->{type} eq 'lifespan';
    my \$d = facts(\$scope);
    my \$path = \$scope->{path};
    if    (\$path eq '/hold')         { push \@held, \$scope }
    elsif (\$path eq '/held')         { \$d->{held} = [ map { facts(\$_) } \@held ] }
    elsif (\$path eq '/weak')         { \$weak = \$scope; weaken \$weak }
    elsif (\$path eq '/weak-check')   { \$d->{weak_defined} = defined \$weak ? 1 : 0 }
    elsif (\$path eq '/add')          { \$scope->{'x.added'} = 1 }
    elsif (\$path eq '/delete')       { delete \@\$scope{qw(path headers)} }
    elsif (\$path eq '/swap')         { delete \$scope->{path}; \$scope->{'x.other'} = 1 }
    elsif (\$path eq '/bless')        { bless \$scope, 'Some::Class' }
    elsif (\$path eq '/change')       { \$scope->{state}{changed} = 1; \$_ .= '!' for \@{ \$scope->{headers}[0] } }
    elsif (\$path eq '/hold-headers') { push \@held_headers, \$scope->{headers} }
    elsif (\$path eq '/held-headers') { \$d->{held_headers} = [ map { [ map { [\@\$_] } \@\$_ ] } \@held_headers ] }
    elsif (\$path eq '/pagi')         { \$scope->{pagi}{version} .= 'x'; \$scope->{pagi}{spec_version} = 'y' }
    elsif (\$path eq '/pagi-add')     { \$scope->{pagi}{'x.more'} = 1 }
    elsif (\$path eq '/pagi-delete')  { delete \$scope->{pagi}{version} }
    elsif (\$path eq '/pagi-hold')    { push \@held_pagi, \$scope->{pagi} }
    elsif (\$path eq '/pagi-held')    { \$d->{held_pagi} = [ map { {%\$_} } \@held_pagi ] }
    elsif (\$path eq '/ext-add')      { \$scope->{extensions}{'x.ext'} = {} }
    elsif (\$path eq '/ext-delete')   { delete \$scope->{extensions}{fullflush} }
    elsif (\$path eq '/ext-change')   { \$scope->{extensions}{fullflush}{x} = 1 }
    elsif (\$path eq '/guard-pagi')   { \$scope->{pagi}{version} = bless {}, 'Guard' }
    elsif (\$path eq '/guard')        { \$scope->{state}{guard} = bless {}, 'Guard' }
    elsif (\$path eq '/each-partial') { my (\$k) = each %\$scope }
    elsif (\$path eq '/each-delete')  { my (\$k) = each %\$scope; delete \$scope->{\$k} }
    elsif (\$path eq '/hold-copies')  {
        push \@copies, [ \@\$scope{qw(path raw_path query_string)}, \$scope->{headers}[1][1],
            \@{ \$scope->{client} }, \@{ \$scope->{server} } ];
    }
    elsif (\$path eq '/held-copies')  { \$d->{held_copies} = \\\@copies }
    elsif (\$path eq '/hold-refs')    {
        push \@refs, [ \\\$scope->{path}, \\\$scope->{query_string}, \$scope->{headers}[1],
            \$scope->{client}, \$scope->{server} ];
    }
    elsif (\$path eq '/hold-element') { push \@refs, [ \\\$scope->{headers}[0][1] ] }
    elsif (\$path eq '/hold-hashes')  { push \@refs, [ \$scope->{state}, \$scope->{extensions}{fullflush}, \\\$scope->{method} ] }
    elsif (\$path eq '/fill-held')    { \$_->[0]{x} = 1, \$_->[1]{y} = 2, \${ \$_->[2] } = 'CHANGED' for grep { \@\$_ == 3 } \@refs }
    elsif (\$path eq '/held-refs')    {
        \$d->{held_refs} = [ map { \@\$_ == 1 ? [ \${ \$_->[0] } ]
            : [ \${ \$_->[0] }, \${ \$_->[1] }, [ \@{ \$_->[2] } ], [ \@{ \$_->[3] } ], [ \@{ \$_->[4] } ] ] } \@refs ];
    }
    elsif (\$path eq '/weak-values')  {
        \@weak_values = ( \\\$scope->{path}, \$scope->{headers}, \$scope->{headers}[0],
            \\\$scope->{headers}[1][0], \$scope->{client}, \$scope->{server} );
        weaken \$_ for \@weak_values;
    }
    elsif (\$path eq '/weak-values-check') { \$d->{weak_values_defined} = [ map { defined \$_ ? 1 : 0 } \@weak_values ] }
    elsif (\$path eq '/mangle-strings') {
        no warnings;
        my \$n = \$scope->{path} + 0;
        \$n = \$scope->{client}[1] . '';
        utf8::upgrade(\$_) for \$scope->{query_string}, \$scope->{headers}[0][1], \$scope->{server}[0];
        \$scope->{raw_path} =~ /./g;
        substr(\$scope->{headers}[1][1], 0, 1, '');
        utf8::upgrade(\$scope->{method});
        \$scope->{scheme} .= 's';
        \$n = \$scope->{http_version} + 0;
        \$scope->{type} =~ /./g;
        \$scope->{root_path} = '/mounted';
        utf8::upgrade(\$scope->{pagi}{spec_version});
    }
    elsif (\$path eq '/mangle-arrays') {
        push \@{ \$scope->{headers} }, [ 'x-pushed', 1 ];
        shift \@{ \$scope->{client} };
        bless \$scope->{server}, 'Some::Class';
        \$scope->{headers}[0][1] = [ 'a reference' ];
        \$scope->{query_string} = \\'a reference';
    }
    elsif (\$path eq '/mangle-pairs') {
        splice \@{ \$scope->{headers} }, 0, 1;
        \$#{ \$scope->{headers}[0] } = 5;
        \$scope->{server}[1] = 'not a port';
        \$scope->{client}[1] = 1.5;
    }
    my \$out = JSON::PP->new->canonical->encode(\$d);
    await \$send->({type => 'http.response.start', status => 200,
        headers => [['content-type', 'application/json'], ['content-length', length \$out]]});
    await \$send->({type => 'http.response.body', body => \$out});
};
\$app;
PERL

my @SPEC_KEYS = sort qw(type pagi http_version method scheme path raw_path query_string root_path
  headers client server state extensions pagi.connection pagi.transport);

my $sock_path = "$dir/s.sock";
my $s = start_server( '--listen', '127.0.0.1:0', '--listen', "unix:$sock_path", $app );
my ($tcp) = grep { !/^unix:/ } $s->listeners;
my ($port) = $tcp =~ /:(\d+)\/?\z/ or die "no TCP listener in: @{[ $s->listeners ]}";


# A fresh-looking scope: a plain hash with the spec's keys and this
# request's own values.
our ( $client_port, $extra );

# The path as the scope gives it: percent-decoded, then UTF-8-decoded when
# it is valid UTF-8.
sub decoded {
    ( my $path = shift ) =~ s/%([0-9A-F]{2})/chr hex $1/ge;
    utf8::decode($path);
    return $path;
}

sub fresh_ok {
    my ( $d, $path, $query, $name ) = @_;
    subtest $name => sub {
        is $d->{blessed}, '',     'not blessed';
        is $d->{kind},    'HASH', 'a hash';
        is_deeply $d->{keys}, \@SPEC_KEYS, 'the spec keys and no others' or diag explain $d->{keys};
        is $d->{each}, scalar @SPEC_KEYS, 'each() starts from the first key';
        is $d->{path},  decoded($path),  'its own path';
        is $d->{query}, $query, 'its own query string';
        is_deeply $d->{state}, [], 'an empty state';
        is_deeply $d->{pagi}, { version => '0.5', spec_version => '0.6' }, 'pagi holds the versions only';
        is_deeply $d->{extensions}, ['fullflush'], 'extensions: fullflush only';
        is $d->{fullflush}, 'HASH', 'fullflush is a hash';
        is_deeply $d->{headers}, [ [ 'host', '127.0.0.1' ], [ 'x-req', "$path?$query" ], @{ $extra // [] } ],
          'its own headers';
        is $d->{raw_path}, $path, 'its own raw path';
        is_deeply $d->{client}, [ '127.0.0.1', $client_port ], 'its own client';
        is_deeply $d->{server}, [ '127.0.0.1', $port ], 'its own server';
        is $d->{path_utf8}, ( $path =~ /%FF/ ? 0 : 1 ), 'the path marked UTF-8 only when it is';
        is_deeply $d->{basics}, [ 'http', 'GET', 'http', '1.1', '' ], 'its own type, method, scheme, version, root path';
        # The root path is text (from the command line), marked UTF-8.
        is_deeply $d->{string_utf8}, [ (0) x 6, 1, (0) x ( 4 + 2 * ( 2 + @{ $extra // [] } ) ) ],
          'the other strings are bytes';
        is_deeply $d->{ports_are_numbers}, [ 1, 1 ], 'ports are numbers';
    };
}

my $sock = connect_port($port);
$client_port = $sock->sockport;
sub next_fresh {
    my ( $path, $query, $name, @more ) = @_;
    local $extra = [ map { [ map { lc } /\A([^:]+): (.*)\z/ ] } @more ];
    $extra = [ map { [ lc $_->[0], $_->[1] ] } map { [ /\A([^:]+): (.*)\z/ ] } @more ];
    my $d = ask_json( $sock, "$path?$query", "X-Req: $path?$query", @more );
    fresh_ok( $d, $path, $query, $name );
    return $d;
}

subtest 'scope hashes are kept and reused across requests' => sub {
    my $first = next_fresh( '/plain', 0, 'first request' );
    ok defined $first->{kept}, 'the stats are there' or diag explain $first;
    my $last;
    $last = next_fresh( '/plain', $_, "request $_" ) for 1 .. 20;
    cmp_ok $last->{reused} - $first->{reused}, '>=', 19, 'nearly every later request reused a kept scope';
    cmp_ok $last->{kept} - $first->{kept}, '>=', 19, 'and its own was kept in turn';
};

subtest 'its strings and arrays are kept and filled in place' => sub {
    my $first = next_fresh( '/plain', 'v0', 'first request' );
    my $last;
    $last = next_fresh( '/plain', "v$_", "request $_" ) for 1 .. 10;
    # path, raw_path, query_string, headers, client, server.
    cmp_ok $last->{values_kept} - $first->{values_kept}, '>=', 6 * 9, 'six values kept by nearly every request';
    next_fresh( '/plain', 'more', 'five headers after two', map { "X-H$_: v$_" } 1 .. 3 );
    next_fresh( '/plain', 'fewer', 'two after five' );
    next_fresh( '/plain', 'more-again', 'seven after two', map { "X-H$_: w$_" } 1 .. 5 );
    next_fresh( '/plain', 'same', 'two again' );
    next_fresh( '/x%FFy', 'b', 'a path that is not UTF-8' );
    next_fresh( '/caf%C3%A9', 'u', 'a UTF-8 one after it' );
    next_fresh( '/x%FFz', 'b', 'and one that is not again' );
    next_fresh( '/plain', 'after', 'a plain one after it' );
    next_fresh( '/plain', 'x' x 300, 'a long query string' );
    next_fresh( '/plain', 'short', 'a short one after it' );
};

subtest 'copies of its values keep their contents' => sub {
    ask_json( $sock, '/hold-copies?1', 'X-Req: /hold-copies?1' );
    next_fresh( '/plain', $_, "request $_ after" ) for 1 .. 3;
    my $d = ask_json( $sock, '/held-copies?2', 'X-Req: /held-copies?2' );
    is_deeply $d->{held_copies},
      [ [ '/hold-copies', '/hold-copies', '1', '/hold-copies?1', '127.0.0.1', $client_port, '127.0.0.1', $port ] ],
      "the strings copied are that request's";
};

subtest 'values the app holds by reference are never reused' => sub {
    ask_json( $sock, '/hold-refs?1',    'X-Req: /hold-refs?1' );
    ask_json( $sock, '/hold-element?2', 'X-Req: /hold-element?2' );
    # The requests after come from another client port, so that a client
    # pair wrongly reused would show it.
    my $other = connect_port($port);
    ask_json( $other, "/plain?$_", "X-Req: /plain?$_" ) for 1 .. 3;
    my $d = ask_json( $sock, '/held-refs?3', 'X-Req: /held-refs?3' );
    is_deeply $d->{held_refs},
      [ [ '/hold-refs', '1', [ 'x-req', '/hold-refs?1' ], [ '127.0.0.1', $client_port ], [ '127.0.0.1', $port ] ],
        ['127.0.0.1'] ],
      "each still holds that request's value";
};

subtest 'a state or fullflush hash the app holds is its own' => sub {
    ask_json( $sock, '/hold-hashes?1', 'X-Req: /hold-hashes?1' );
    next_fresh( '/plain', 2, 'a request after' );
    ask_json( $sock, '/fill-held?3', 'X-Req: /fill-held?3' );
    next_fresh( '/plain', $_, "request $_ after the held ones were filled" ) for 4 .. 5;
};

subtest 'weak references to its values go undef when its request ends' => sub {
    ask_json( $sock, '/weak-values?1', 'X-Req: /weak-values?1' );
    next_fresh( '/plain', 2, 'a request after' );
    my $d = ask_json( $sock, '/weak-values-check?3', 'X-Req: /weak-values-check?3' );
    is_deeply $d->{weak_values_defined}, [ (0) x 6 ], "every one is undef, none a later scope's value";
};

subtest 'values the app changed in kind or shape are not in later scopes' => sub {
    for my $change (qw(mangle-strings mangle-arrays mangle-pairs)) {
        ask_json( $sock, "/$change?1", "X-Req: /$change?1" );
        next_fresh( '/plain', $_, "after /$change, request $_" ) for 1 .. 2;
    }
};

subtest 'a scope the app holds is not reused' => sub {
    ask_json( $sock, '/hold?a', 'X-Req: /hold?a' );
    ask_json( $sock, '/hold?b', 'X-Req: /hold?b' );
    next_fresh( '/plain', $_, "request $_ after" ) for 1 .. 5;
    my $d = ask_json( $sock, '/held?x', 'X-Req: /held?x' );
    is scalar @{ $d->{held} || [] }, 2, 'two scopes held';
    fresh_ok( $d->{held}[0], '/hold', 'a', 'the first still holds its own request' );
    fresh_ok( $d->{held}[1], '/hold', 'b', 'the second too' );
};

subtest 'a weak reference to a scope goes undef when its request ends' => sub {
    ask_json( $sock, '/weak?1', 'X-Req: /weak?1' );
    next_fresh( '/plain', 2, 'a request after' );
    my $d = ask_json( $sock, '/weak-check?3', 'X-Req: /weak-check?3' );
    is $d->{weak_defined}, 0, 'the weak reference is undef, not a later scope';
};

subtest 'keys the app added, deleted or swapped are not in later scopes' => sub {
    for my $change (qw(add delete swap bless change each-partial each-delete)) {
        ask_json( $sock, "/$change?1", "X-Req: /$change?1" );
        next_fresh( '/plain', $_, "after /$change, request $_" ) for 1 .. 2;
    }
};

subtest 'changes to pagi and extensions are not in later scopes' => sub {
    for my $change (qw(pagi pagi-add pagi-delete ext-add ext-delete ext-change)) {
        ask_json( $sock, "/$change?1", "X-Req: /$change?1" );
        next_fresh( '/plain', $_, "after /$change, request $_" ) for 1 .. 2;
    }
    ask_json( $sock, '/pagi-hold?1', 'X-Req: /pagi-hold?1' );
    ask_json( $sock, '/pagi?2',      'X-Req: /pagi?2' );
    my $d = ask_json( $sock, '/pagi-held?3', 'X-Req: /pagi-held?3' );
    is_deeply $d->{held_pagi}, [ { version => '0.5', spec_version => '0.6' } ],
      'a pagi hash the app holds is its own, unchanged by later requests';
};

subtest 'a value the app holds keeps its contents' => sub {
    ask_json( $sock, '/hold-headers?1', 'X-Req: /hold-headers?1' );
    next_fresh( '/plain', $_, "request $_ after" ) for 1 .. 3;
    my $d = ask_json( $sock, '/held-headers?2', 'X-Req: /held-headers?2' );
    is_deeply $d->{held_headers}, [ [ [ 'host', '127.0.0.1' ], [ 'x-req', '/hold-headers?1' ] ] ],
      'the headers array held is that request\'s';
};

subtest 'a kept scope lets its values go when its request ends' => sub {
    ok !-e $marker, 'no guard yet';
    ask_json( $sock, '/guard?1', 'X-Req: /guard?1' );
    my $gone = 0;
    for ( 1 .. 100 ) { last if $gone = -e $marker; sleep 0.05 }
    ok $gone, 'the guard in its state was destroyed without another request';
    next_fresh( '/plain', 2, 'the next scope has an empty state' );
    unlink $marker;
    ask_json( $sock, '/guard-pagi?3', 'X-Req: /guard-pagi?3' );
    $gone = 0;
    for ( 1 .. 100 ) { last if $gone = -e $marker; sleep 0.05 }
    ok $gone, 'a guard in pagi was too';
    next_fresh( '/plain', 4, 'and the next scope has the versions' );
};

subtest 'a scope kept from a TCP request has no client on a Unix socket' => sub {
    next_fresh( '/plain', 1, 'a TCP request' );
    my $u = connect_port("unix:$sock_path");
    my $d = ask_json( $u, '/plain?u', 'X-Req: /plain?u' );
    is $d->{has_client}, 0, 'no client key over the Unix socket';
    is_deeply $d->{keys}, [ grep { $_ ne 'client' } @SPEC_KEYS ], 'the other keys';
    $d = ask_json( $u, '/plain?v', 'X-Req: /plain?v' );
    is $d->{has_client}, 0, 'nor on the next';
    next_fresh( '/plain', 3, 'and the client is back over TCP' );
};

$s->stop;
done_testing;
