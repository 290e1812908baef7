use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use JSON::PP;

# Every HTTP scope key, observed by an app that reports its scope as JSON.

my $app = write_app( <<'PERL', 'scope_dump.pl' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP (); use Scalar::Util qw(blessed reftype);
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $body = '';
    while (1) {
        my $ev = await $receive->();
        last unless $ev->{type} eq 'http.request';
        $body .= $ev->{body};
        last unless $ev->{more};
    }
    my %d = (keys => [ sort keys %$scope ]);
    for my $k (keys %$scope) {
        my $v = $scope->{$k};
        if (blessed $v) {
            my %can = map { $_ => ($v->can($_) ? 1 : 0) } qw(is_connected disconnect_reason on_disconnect on_complete
                disconnect_future response_started response_complete buffered_amount high_water_mark low_water_mark
                on_high_water on_drain);
            $d{$k} = { ref => ref($v), can => \%can };
        }
        elsif (ref $v eq 'CODE') { $d{$k} = 'CODE' }
        else { $d{$k} = $v }
    }
    $d{conn_is_connected}     = $scope->{'pagi.connection'}->is_connected ? 1 : 0;
    $d{conn_response_started} = $scope->{'pagi.connection'}->response_started ? 1 : 0;
    $d{transport_high}        = $scope->{'pagi.transport'}->high_water_mark;
    $d{state_reftype}         = ref $scope->{state};
    for my $k (qw(path raw_path query_string method)) {
        my $v = $scope->{$k};
        next unless defined $v;
        $d{"${k}_is_utf8"} = utf8::is_utf8($v) ? 1 : 0;
        $d{"${k}_ords"}    = [ map { ord } split //, $v ];
    }
    $d{header_value_ords} = { map { ($_->[0] => [ map { ord } split //, $_->[1] ]) } @{ $scope->{headers} } };
    $d{header_utf8_flags} = [ map { (utf8::is_utf8($_->[0]) ? 1 : 0) + (utf8::is_utf8($_->[1]) ? 2 : 0) } @{ $scope->{headers} } ];
    $d{body_length} = length $body;
    require Sub::Util;
    $d{sub_names} = [ map { Sub::Util::subname($_) } $receive, $send ];
    my $out = JSON::PP->new->canonical->utf8->encode(\%d);
    await $send->({type => 'http.response.start', status => 200,
        headers => [['content-type', 'application/json'], ['content-length', length $out]]});
    await $send->({type => 'http.response.body', body => $out, more => 0});
};
$app;
PERL

my $s = start_server($app);
my $port = $s->port;

# Send raw bytes; return (decoded dump, local port of our socket).
sub dump_for {
    my ($req) = @_;
    my ( $raw, $sock ) = raw_request( $port, $req, timeout => 5 );
    my $local_port = $sock ? $sock->sockport : undef;
    my $res = parse_response($raw) // {};
    my $d = eval { JSON::PP->new->utf8->decode( $res->{body} // '' ) };
    diag "no dump: status " . ( $res->{status} // '?' ) . ": " . ( $res->{body} // $raw ) unless $d;
    return ( $d // {}, $local_port );
}

sub ords { [ map { ord } split //, $_[0] ] }

subtest 'basic GET: every key' => sub {
    my ( $d, $lport ) = dump_for( "GET /plain/path?a=1&b=%20x&c HTTP/1.1\r\n"
          . "Host: 127.0.0.1:$port\r\n"
          . "X-Mixed-Case: SomeValue\r\n"
          . "Cookie: a=1\r\n"
          . "X-Dup: first\r\n"
          . "Cookie: b=2; c=3\r\n"
          . "X-Dup: second\r\n"
          . "Connection: close\r\n\r\n" );
    my %keys = map { $_ => 1 } @{ $d->{keys} || [] };
    for my $k (qw(type pagi http_version method scheme path raw_path query_string root_path headers client server
        state extensions pagi.connection pagi.transport))
    {
        ok $keys{$k}, "scope has '$k'";
    }
    is $d->{type}, 'http', 'type http';
    is_deeply $d->{pagi}, { version => '0.5', spec_version => '0.6' }, "pagi => {version '0.5', spec_version '0.6'}";
    is $d->{http_version}, '1.1', "http_version '1.1'";
    is $d->{method}, 'GET', 'method GET';
    is $d->{scheme}, 'http', "scheme 'http'";
    is $d->{path}, '/plain/path', 'path';
    is $d->{raw_path}, '/plain/path', 'raw_path';
    is $d->{query_string}, 'a=1&b=%20x&c', 'query_string as sent (still percent-encoded)';
    is $d->{root_path}, '', "root_path '' by default";

    my @h = @{ $d->{headers} || [] };
    ok @h && ( grep { ref $_ eq 'ARRAY' && @$_ == 2 } @h ) == @h, 'headers are [name, value] pairs';
    is_deeply [ grep { $_->[0] ne lc $_->[0] } @h ], [], 'every header name is lower-case';
    is_deeply [ grep { $_->[0] eq 'x-mixed-case' } @h ], [ [ 'x-mixed-case', 'SomeValue' ] ],
      'X-Mixed-Case arrives as x-mixed-case with its value untouched';
    is_deeply [ grep { $_->[0] eq 'cookie' } @h ], [ [ 'cookie', 'a=1; b=2; c=3' ] ],
      'two Cookie headers merged into one with "; "';
    is_deeply [ map { $_->[1] } grep { $_->[0] eq 'x-dup' } @h ], [ 'first', 'second' ],
      'a repeated non-cookie header keeps both values, in order';
    is_deeply [ grep { $_->[0] eq 'host' } @h ], [ [ 'host', "127.0.0.1:$port" ] ], 'host header present';
    is_deeply [ grep { $_ } @{ $d->{header_utf8_flags} || [1] } ], [], 'no header name or value is a character string';

    is ref $d->{client}, 'ARRAY', 'client is an array';
    is $d->{client}[0], '127.0.0.1', 'client ip';
    ok defined $lport && defined $d->{client}[1] && $d->{client}[1] == $lport,
      "client port is our socket's local port ($lport)" or diag "client: @{ $d->{client} || [] }";
    is $d->{server}[0], '127.0.0.1', 'server ip';
    ok defined $d->{server}[1] && $d->{server}[1] == $port, "server port is $port";

    is $d->{state_reftype}, 'HASH', 'state is a hashref';
    is_deeply $d->{state}, {}, 'state is empty when the app declined lifespan';
    is_deeply $d->{extensions}, { fullflush => {} }, 'extensions advertises fullflush => {}';

    my $c = $d->{'pagi.connection'} || {};
    ok $c->{ref}, "pagi.connection is an object ($c->{ref})";
    is_deeply [ grep { !$c->{can}{$_} } qw(is_connected disconnect_reason on_disconnect on_complete disconnect_future
          response_started response_complete) ], [], 'pagi.connection has the connection-state methods';
    is $d->{conn_is_connected},     1, 'is_connected is true during the request';
    is $d->{conn_response_started}, 0, 'response_started is false before the response';
    my $t = $d->{'pagi.transport'} || {};
    ok $t->{ref}, "pagi.transport is an object ($t->{ref})";
    is_deeply [ grep { !$t->{can}{$_} } qw(buffered_amount high_water_mark low_water_mark on_high_water on_drain) ], [],
      'pagi.transport has the flow-control methods';
    is $d->{transport_high}, 65536, 'high_water_mark defaults to 65536';
    is_deeply $d->{sub_names}, [ ('PAGI::RS::HTTP::__ANON__') x 2 ],
      '$receive and $send are anonymous subs, named as such in stack traces';
};

subtest 'percent-decoded UTF-8 path' => sub {
    my ($d) = dump_for("GET /caf%C3%A9 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    is $d->{path_is_utf8}, 1, 'path is a character string (utf8 flag on)';
    is_deeply $d->{path_ords}, [ 47, 99, 97, 102, 0xE9 ], 'path is "/café" as 5 characters';
    is $d->{path}, "/caf\x{e9}", 'path eq "/café"';
    is_deeply $d->{raw_path_ords}, ords('/caf%C3%A9'), 'raw_path is the bytes as sent';

    ($d) = dump_for("GET /a%20b%2Fc/%E2%82%AC HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    is_deeply $d->{path_ords}, [ map( { ord } split //, '/a b/c/' ), 0x20AC ], 'spaces, %2F and a 3-byte character decoded';
    is $d->{raw_path}, '/a%20b%2Fc/%E2%82%AC', 'raw_path unchanged';
};

subtest 'invalid UTF-8 path stays bytes' => sub {
    my ($d) = dump_for("GET /x%FF HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    is $d->{path_is_utf8}, 0, 'path is a byte string (utf8 flag off)';
    is_deeply $d->{path_ords}, [ 47, 120, 0xFF ], 'path is the decoded bytes "/x\xFF"';
    is $d->{raw_path}, '/x%FF', 'raw_path as sent';

    ($d) = dump_for("GET /caf%C3%A9%FF HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    is $d->{path_is_utf8}, 0, 'valid sequence followed by an invalid byte: bytes';
    is_deeply $d->{path_ords}, [ 47, 99, 97, 102, 0xC3, 0xA9, 0xFF ], 'every byte kept as is';
};

subtest 'query_string is the raw bytes' => sub {
    my ($d) = dump_for("GET /q?name=caf%C3%A9&x=%2B+y HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    is $d->{query_string}, 'name=caf%C3%A9&x=%2B+y', 'query_string not decoded';
    ($d) = dump_for("GET /q HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    ok defined $d->{query_string} && $d->{query_string} eq '', "no query: query_string ''";
};

subtest 'HTTP/1.0 request' => sub {
    my ( $d, $lport ) = dump_for("GET /old?v=1 HTTP/1.0\r\n\r\n");
    is $d->{http_version}, '1.0', "http_version '1.0'";
    is $d->{path}, '/old', 'path';
    is $d->{query_string}, 'v=1', 'query_string';
    ok defined $d->{client}[1] && $d->{client}[1] == $lport, 'client port matches on HTTP/1.0 too';
};

subtest 'other methods and header bytes' => sub {
    my $body = 'hello=world';
    my ($d) = dump_for( "PATCH /m HTTP/1.1\r\nHost: h\r\nContent-Length: " . length($body)
          . "\r\nX-Bin: \xE9t\xE9\r\nConnection: close\r\n\r\n$body" );
    is $d->{method}, 'PATCH', 'method PATCH';
    is $d->{body_length}, length $body, 'body delivered';
    is_deeply $d->{header_value_ords}{'x-bin'}, [ 0xE9, 116, 0xE9 ], 'a header value with high bytes is passed as bytes';
    is_deeply $d->{header_value_ords}{'content-length'}, ords( length $body ), 'content-length header value';
};

subtest 'each request gets its own client port' => sub {
    my ( $d1, $p1 ) = dump_for("GET /1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    my ( $d2, $p2 ) = dump_for("GET /2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    isnt $p1, $p2, 'two sockets, two local ports';
    is $d1->{client}[1], $p1, 'first request reports its port';
    is $d2->{client}[1], $p2, 'second request reports its port';
};

is $s->stop('TERM'), 0, 'server exits 0';
done_testing;
