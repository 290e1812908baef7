use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use JSON::PP;

# The request head as the app sees it, as PAGI::Server 0.003000 shows it:
# headers in wire order even when names interleave (hyper groups them by
# name), and the request-target forms of RFC 9112 §3.2 each only where it
# belongs, the others refused before the app is called.

$SIG{PIPE} = 'IGNORE';
my $dir   = tempdir( CLEANUP => 1 );
my $calls = "$dir/calls.txt";

my $app = write_app( <<"HEAD" . <<'APP' );
use strict;
use warnings;
use Future::AsyncAwait;
use JSON::PP ();
my \$CALLS = '$calls';
HEAD

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    open my $fh, '>>', $CALLS or die "$CALLS: $!";
    print $fh "$scope->{type} $scope->{method} $scope->{raw_path}\n";
    close $fh;
    if ( $scope->{type} eq 'websocket' ) {
        await $send->( { type => 'websocket.close', code => 1000 } );
        return;
    }
    while (1) {
        my $ev = await $receive->();
        last unless $ev->{type} eq 'http.request' && $ev->{more};
    }
    my %d = map { $_ => $scope->{$_} } qw(method path raw_path query_string headers);
    my $out = JSON::PP->new->canonical->encode( \%d );
    await $send->( { type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'application/json' ], [ 'content-length', length $out ] ] } );
    await $send->( { type => 'http.response.body', body => $out, more => 0 } );
};
$app;
APP

my $s    = start_server( '--no-access-log', $app );
my $port = $s->port;
my $H    = "Host: 127.0.0.1:$port\r\n";

# The scope the app reported for each response in $raw (several when pipelined).
sub dumps {
    my ($raw) = @_;
    my @d;
    while ( length $raw ) {
        my $res = parse_response($raw) or last;
        push @d, eval { JSON::PP->new->decode( $res->{body} ) } // { status => $res->{status}, body => $res->{body} };
        $raw = $res->{rest} // '';
    }
    return @d;
}

sub dump_for {
    my ($req) = @_;
    my ($d) = dumps( raw_request( $port, $req, timeout => 5 ) );
    return $d // {};
}

# The header pairs other than Host and Connection (which every request here carries).
sub own_headers {
    my ($d) = @_;
    return [ grep { $_->[0] ne 'host' && $_->[0] ne 'connection' } @{ $d->{headers} || [] } ];
}

# ---------------------------------------------------------------------------
# Header order

subtest 'interleaved names keep their wire order' => sub {
    my $d = dump_for("GET /order HTTP/1.1\r\n${H}X-A: 1\r\nX-B: 2\r\nX-A: 3\r\nConnection: close\r\n\r\n");
    is_deeply own_headers($d), [ [ 'x-a', '1' ], [ 'x-b', '2' ], [ 'x-a', '3' ] ], 'X-A, X-B, X-A as sent'
      or diag explain $d;
    is_deeply $d->{headers}[0], [ 'host', "127.0.0.1:$port" ], 'Host stays first, where it was sent';
    is_deeply $d->{headers}[-1], [ 'connection', 'close' ], 'Connection stays last';

    $d = dump_for("GET /order HTTP/1.1\r\nX-Late: a\r\n${H}x-late: b\r\nX-LATE: c\r\nConnection: close\r\n\r\n");
    is_deeply [ map { $_->[0] } @{ $d->{headers} || [] } ], [qw(x-late host x-late x-late connection)],
      'names compared whatever their case; Host in its place between them';
};

subtest 'cookies still merge into one header at the first one\'s place' => sub {
    my $d = dump_for( "GET /cookies HTTP/1.1\r\n${H}X-A: 1\r\nCookie: a=1\r\nX-B: 2\r\nCookie: b=2; c=3\r\nX-A: 3\r\n"
          . "Cookie: d=4\r\nX-B: 4\r\nConnection: close\r\n\r\n" );
    is_deeply own_headers($d),
      [ [ 'x-a', '1' ], [ 'cookie', 'a=1; b=2; c=3; d=4' ], [ 'x-b', '2' ], [ 'x-a', '3' ], [ 'x-b', '4' ] ],
      'one cookie header, where the first Cookie was, the rest in wire order'
      or diag explain $d;
};

subtest 'many headers, in order' => sub {
    my @sent = map { [ 'x-h' . ( $_ * 7 % 5 ), "v$_" ] } 1 .. 60;
    my $d = dump_for( "GET /many HTTP/1.1\r\n$H" . join( '', map {"$_->[0]: $_->[1]\r\n"} @sent ) . "Connection: close\r\n\r\n" );
    is_deeply own_headers($d), \@sent, '60 headers over 5 interleaved names come back as sent' or diag explain $d;

    # Thirty distinct names, then one of the early ones again.
    @sent = ( ( map { [ "x-distinct-$_", "v$_" ] } 1 .. 30 ), [ 'x-distinct-2', 'again' ] );
    $d = dump_for( "GET /many HTTP/1.1\r\n$H" . join( '', map {"$_->[0]: $_->[1]\r\n"} @sent ) . "Connection: close\r\n\r\n" );
    is_deeply own_headers($d), \@sent, 'a name coming back after thirty others is seen' or diag explain $d;
};

subtest 'pipelined: each request gets its own order' => sub {
    my $req = "GET /p1 HTTP/1.1\r\n${H}X-A: 1\r\nX-A: 2\r\nX-B: 3\r\n\r\n"
      . "GET /p2 HTTP/1.1\r\n${H}X-A: 1\r\nX-B: 2\r\nX-A: 3\r\n\r\n"
      . "GET /p3 HTTP/1.1\r\n${H}X-B: 1\r\nX-A: 2\r\nX-A: 3\r\n\r\n"
      . "GET /p2 HTTP/1.1\r\n${H}X-C: 1\r\nX-C: 2\r\nConnection: close\r\n\r\n";
    my @d = dumps( raw_request( $port, $req, timeout => 5 ) );
    is scalar(@d), 4, 'four responses' or diag explain \@d;
    is_deeply [ map { $_->{path} } @d ], [qw(/p1 /p2 /p3 /p2)], 'in request order';
    is_deeply own_headers( $d[0] ), [ [ 'x-a', '1' ], [ 'x-a', '2' ], [ 'x-b', '3' ] ], 'first: no interleaving';
    is_deeply own_headers( $d[1] ), [ [ 'x-a', '1' ], [ 'x-b', '2' ], [ 'x-a', '3' ] ], 'second: interleaved, as sent';
    is_deeply own_headers( $d[2] ), [ [ 'x-b', '1' ], [ 'x-a', '2' ], [ 'x-a', '3' ] ], 'third: its own headers';
    is_deeply own_headers( $d[3] ), [ [ 'x-c', '1' ], [ 'x-c', '2' ] ], 'fourth (same target as the second): its own';
};

# ---------------------------------------------------------------------------
# Request-target forms

subtest 'absolute-form is reduced to its path and query' => sub {
    my $d = dump_for("GET http://127.0.0.1:$port/abs/p%20q?x=1&y=2 HTTP/1.1\r\n${H}Connection: close\r\n\r\n");
    is $d->{path},         '/abs/p q',   'path';
    is $d->{raw_path},     '/abs/p%20q', 'raw_path';
    is $d->{query_string}, 'x=1&y=2',    'query_string';

    $d = dump_for("GET HTTP://Example.COM HTTP/1.1\r\nHost: example.com:80\r\nConnection: close\r\n\r\n");
    is $d->{path}, '/', 'no path: "/"; the host compared case-insensitively, 80 being http\'s port'
      or diag explain $d;
    is $d->{query_string}, '', 'no query';
};

subtest 'OPTIONS * reaches the app' => sub {
    my $d = dump_for("OPTIONS * HTTP/1.1\r\n${H}Connection: close\r\n\r\n");
    is $d->{method}, 'OPTIONS', 'method';
    is $d->{path},     '*', 'path "*"';
    is $d->{raw_path}, '*', 'raw_path "*"';
    is $d->{query_string}, '', 'no query';
};

# Status 400, text/plain "Bad Request", connection closed, the app not called,
# and the server still serving.
sub refused {
    my ( $name, $bytes ) = @_;
    my $before = -e $calls ? slurp($calls) : '';
    my ( $raw, $sock ) = raw_request( $port, $bytes, timeout => 5 );
    my ( undef, $closed ) = read_sock( $sock, undef, 2 );
    my $res = parse_response($raw) // { status => 0 };
    subtest "$name => 400" => sub {
        is $res->{status}, 400, 'status 400' or diag 'raw response: ' . substr( $raw, 0, 300 );
        is_deeply $res->{headers}{'content-type'}, ['text/plain'], 'Content-Type: text/plain';
        is $res->{body}, 'Bad Request', "body 'Bad Request'";
        ok $closed, 'connection closed';
        is( ( -e $calls ? slurp($calls) : '' ), $before, 'the app was never called' );
        my $d = dump_for("GET /alive HTTP/1.1\r\n${H}Connection: close\r\n\r\n");
        is $d->{path}, '/alive', 'the server still serves';
    };
}

refused( 'absolute-form naming another host',
    "GET http://other.example/p HTTP/1.1\r\n${H}Connection: close\r\n\r\n" );
refused( 'absolute-form naming another port',
    "GET http://127.0.0.1:1/p HTTP/1.1\r\n${H}Connection: close\r\n\r\n" );
refused( 'absolute-form without a port against a Host with one',
    "GET http://127.0.0.1/p HTTP/1.1\r\n${H}Connection: close\r\n\r\n" );
refused( 'authority-form on GET',  "GET 127.0.0.1:$port HTTP/1.1\r\n${H}Connection: close\r\n\r\n" );
refused( 'authority-form on POST', "POST example.com:80 HTTP/1.1\r\n${H}Content-Length: 0\r\n\r\n" );
refused( '* on GET',               "GET * HTTP/1.1\r\n${H}Connection: close\r\n\r\n" );
refused( '* on POST',              "POST * HTTP/1.1\r\n${H}Content-Length: 0\r\n\r\n" );
refused( 'a target that is no form at all', "GET foo HTTP/1.1\r\n${H}Connection: close\r\n\r\n" );
# RFC 9112 3.2: a Host that is not uri-host [":" port] (apps build URLs from it).
for my $host ( 'user@127.0.0.1', 'evil.example/p', 'a b', '127.0.0.1:80x' ) {
    refused( "Host: $host", "GET / HTTP/1.1\r\nHost: $host\r\nConnection: close\r\n\r\n" );
}
is dump_for("GET /v6 HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n")->{path}, '/v6',
  'an IPv6 literal with a port is a valid Host';
{
    # A refusal keeps its place behind a good pipelined request.
    my $before = -e $calls ? slurp($calls) : '';
    my ( $raw, $sock ) = raw_request( $port, "GET /first HTTP/1.1\r\n${H}\r\nGET * HTTP/1.1\r\n${H}\r\n", timeout => 5 );
    my @d = dumps($raw);
    is $d[0]{path}, '/first', 'pipelined: the good request is answered first';
    is_deeply [ @{ $d[1] }{qw(status body)} ], [ 400, 'Bad Request' ], 'then the refusal' or diag explain \@d;
    my $after = -e $calls ? slurp($calls) : '';
    is substr( $after, length $before ), "http GET /first\n", 'the app saw only the good one';
}

my $ws = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
  . "Sec-WebSocket-Version: 13\r\n\r\n";
refused( 'WebSocket upgrade with an authority-form target', "GET 127.0.0.1:$port HTTP/1.1\r\n$H$ws" );
refused( 'WebSocket upgrade with an absolute-form target naming another host',
    "GET http://other.example/ws HTTP/1.1\r\n$H$ws" );

is $s->stop('TERM'), 0, 'server exits 0';
done_testing;
