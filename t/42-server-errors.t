use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use IO::Select;
use Time::HiRes qw(time sleep);

# Responses the server generates itself (the app never sees the request, or
# loses it): exact status, text/plain, short body, connection closed; and
# after every one of them the server keeps serving.

$SIG{PIPE} = 'IGNORE';
my $dir    = tempdir( CLEANUP => 1 );
my $calls  = "$dir/calls.txt";
my $report = "$dir/report.txt";

my $app = write_app( <<"HEAD" . <<'APP' );
use strict;
use warnings;
use Future::AsyncAwait;
my \$CALLS  = '$calls';
my \$REPORT = '$report';
HEAD

sub append {
    my ( $file, $line ) = @_;
    open my $fh, '>>', $file or die "$file: $!";
    print $fh $line;
    close $fh;
}

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    append( $CALLS, "$scope->{method} $scope->{path}\n" );
    if ( $scope->{path} eq '/read-body' ) {
        my $conn = $scope->{'pagi.connection'};
        my ( $n, @types ) = (0);
        while (1) {
            my $e = await $receive->();
            push @types, $e->{type};
            last if $e->{type} ne 'http.request';
            $n += length $e->{body};
            last unless $e->{more};
        }
        append( $REPORT, 'events=' . join( ',', @types ) . "; bytes=$n; reason="
              . ( $conn->disconnect_reason // 'none' ) . '; connected=' . $conn->is_connected . "\n" );
        # Responding after the disconnect must be a harmless no-op.
        await $send->( { type => 'http.response.start', status => 200, headers => [ [ 'content-length', 4 ] ] } );
        await $send->( { type => 'http.response.body', body => 'read', more => 0 } );
        return;
    }
    my $b = "ok $scope->{method} $scope->{path} $scope->{http_version}";
    await $send->( { type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ], [ 'content-length', length $b ] ] } );
    await $send->( { type => 'http.response.body', body => $b, more => 0 } );
};
$app;
APP

my $server = start_server( '--no-access-log', '--max-body-size', 1000, $app );
my $port = $server->port;

# Write $bytes, then read until the peer closes or $timeout.  ($raw, $closed)
sub exchange {
    my ( $bytes, %o ) = @_;
    my $sock = connect_port( $o{port} // $port );
    $sock->syswrite($bytes);
    return read_sock( $sock, undef, $o{timeout} // 5 );
}

sub still_serving {
    my ( $name, $p ) = @_;
    my $res = http_request( $p // $port, 'GET', '/alive' );
    ok $res->{status} == 200 && ( $res->{body} // '' ) eq 'ok GET /alive 1.1', "after $name: a normal request still succeeds";
}

# One server-generated refusal: status, text/plain, exact body, closed.
sub refused {
    my ( $name, $bytes, $status, $text, %o ) = @_;
    my $before = -e $calls ? slurp($calls) : '';
    my ( $raw, $closed ) = exchange( $bytes, %o );
    my $res = parse_response($raw) // { status => 0 };
    subtest "$name => $status" => sub {
        is $res->{status}, $status, "$name: status $status"
          or diag 'raw response: ' . ( length $raw ? substr( $raw, 0, 300 ) : '(nothing; closed=' . $closed . ')' );
        is_deeply $res->{headers}{'content-type'}, ['text/plain'], "$name: Content-Type: text/plain";
        is $res->{body}, $text, "$name: body '$text'";
        ok $closed, "$name: connection closed after the refusal";
        my $after = -e $calls ? slurp($calls) : '';
        is $after, $before, "$name: the app was never called" unless $o{app_may_run};
        still_serving( $name, $o{port} );
    };
    return $res;
}

my $H = "Host: 127.0.0.1\r\n";

# ---------------------------------------------------------------------------
refused( 'malformed request line', "GARBAGE\r\n\r\n", 400, 'Bad Request' );
refused( 'request line with three spaces', "GET / / HTTP/1.1\r\n$H\r\n", 400, 'Bad Request' );
refused( 'HTTP/1.1 without Host', "GET /nohost HTTP/1.1\r\n\r\n", 400, 'Bad Request' );

{
    my ( $raw, $closed ) = exchange("GET /ten HTTP/1.0\r\n\r\n");
    my $res = parse_response($raw) // {};
    is $res->{status}, 200, 'HTTP/1.0 without Host is fine: 200';
    is $res->{body}, 'ok GET /ten 1.0', 'HTTP/1.0 without Host: the app answered';
}

refused( 'two Host headers', "GET /twohosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, 'Bad Request' );
refused( 'Content-Length: abc', "POST /cl-abc HTTP/1.1\r\n${H}Content-Length: abc\r\n\r\n", 400, 'Bad Request' );
refused( 'two equal Content-Length headers', "POST /cl-two HTTP/1.1\r\n${H}Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    400, 'Bad Request' );
refused( 'two different Content-Length headers',
    "POST /cl-diff HTTP/1.1\r\n${H}Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400, 'Bad Request' );
# Request smuggling defence (RFC 9112 §6.1): both framings at once is refused.
refused( 'Content-Length and Transfer-Encoding both',
    "POST /cl-te HTTP/1.1\r\n${H}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    400, 'Bad Request' );
refused( 'Transfer-Encoding: gzip, chunked',
    "POST /te-gzip-chunked HTTP/1.1\r\n${H}Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    501, 'Unsupported Transfer-Encoding' );
# A coding we cannot decode and no chunked at all: 501, as the reference does.
refused( 'Transfer-Encoding: gzip (no chunked)',
    "POST /te-gzip HTTP/1.1\r\n${H}Transfer-Encoding: gzip\r\n\r\nhello", 501, 'Unsupported Transfer-Encoding' );
# chunked present but not last: the body length cannot be known.
refused( 'Transfer-Encoding: chunked, gzip (chunked not final)',
    "POST /te-chunked-gzip HTTP/1.1\r\n${H}Transfer-Encoding: chunked, gzip\r\n\r\nhello", 400, 'Bad Request' );

# ---------------------------------------------------------------------------
refused( 'Content-Length over --max-body-size 1000',
    "POST /too-big HTTP/1.1\r\n${H}Content-Length: 1001\r\n\r\n" . ( 'x' x 1001 ), 413, 'Payload Too Large' );
unlike( ( -e $calls ? slurp($calls) : '' ), qr{/too-big}, 'the app never saw the over-size request' );
{
    my ( $raw, $closed ) = exchange( "POST /at-limit HTTP/1.1\r\n${H}Content-Length: 1000\r\nConnection: close\r\n\r\n" . ( 'x' x 1000 ) );
    like $raw, qr{^HTTP/1\.1 200 .*ok POST /at-limit}s, 'a body of exactly --max-body-size is accepted';
}

{
    unlink $report;
    my $before = -e $calls ? slurp($calls) : '';
    my $sock = connect_port($port);
    $sock->syswrite("POST /read-body HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n");
    for ( 1 .. 3 ) {
        $sock->syswrite( sprintf( "%x\r\n%s\r\n", 600, 'c' x 600 ) );
        sleep 0.2;
    }
    $sock->syswrite("0\r\n\r\n");
    my ( $raw, $closed ) = ( '', 0 );
    my $sel      = IO::Select->new($sock);
    my $deadline = time + 5;
    while ( time < $deadline ) {
        my @r = $sel->can_read( $deadline - time ) or last;
        my $n = $sock->sysread( $raw, 65536, length $raw );
        if ( !$n ) { $closed = 1; last }
    }
    my $res = parse_response($raw) // { status => 0 };
    subtest 'chunked body growing over --max-body-size while the app reads => 413' => sub {
        is $res->{status}, 413, 'status 413' or diag "raw: $raw";
        is_deeply $res->{headers}{'content-type'}, ['text/plain'], 'Content-Type: text/plain';
        is $res->{body}, 'Payload Too Large', "body 'Payload Too Large'";
        ok $closed, 'connection closed';
        like( ( -e $calls ? slurp($calls) : '' ), qr{^POST /read-body$}m, 'the app was called (it was reading)' );
        my $t = time + 5;
        sleep 0.05 while !-s $report && time < $t;
        my $got = -e $report ? slurp($report) : '';
        like $got, qr/events=http\.request(,http\.request)*,http\.disconnect;/, 'app got http.request event(s), then http.disconnect';
        like $got, qr/reason=body_too_large;/, 'pagi.connection disconnect_reason is body_too_large';
        like $got, qr/connected=0/, 'is_connected is false';
        unlike $raw, qr/\bread\z/, 'the app\'s late response did not reach the wire';
        note "report: $got";
        still_serving('chunked 413');
    };
}

# ---------------------------------------------------------------------------
refused( 'request target of 9000 bytes', "GET /" . ( 'a' x 8999 ) . " HTTP/1.1\r\n$H\r\n", 414, 'URI Too Long' );
refused( 'a 9000-byte header', "GET /bighdr HTTP/1.1\r\n${H}X-Big: " . ( 'h' x 9000 ) . "\r\n\r\n",
    431, 'Request Header Fields Too Large' );
refused( '101 headers', "GET /many HTTP/1.1\r\n$H" . join( '', map {"X-H$_: v\r\n"} 1 .. 100 ) . "\r\n",
    431, 'Request Header Fields Too Large' );
{
    my ( $raw, $closed ) = exchange( "GET /hundred HTTP/1.1\r\n$H" . join( '', map {"X-H$_: v\r\n"} 1 .. 98 ) . "Connection: close\r\n\r\n" );
    like $raw, qr{^HTTP/1\.1 200 .*ok GET /hundred}s, 'exactly 100 headers (Host + 98 + Connection) is accepted';
}

my $small = start_server( '--no-access-log', '--max-header-count', 5, $app );
refused( '--max-header-count 5 with 6 headers',
    "GET /six HTTP/1.1\r\n$H" . join( '', map {"X-H$_: v\r\n"} 1 .. 5 ) . "\r\n",
    431, 'Request Header Fields Too Large', port => $small->port );
{
    my ( $raw, $closed ) = exchange( "GET /five HTTP/1.1\r\n${H}X-A: 1\r\nX-B: 2\r\nX-C: 3\r\nConnection: close\r\n\r\n", port => $small->port );
    like $raw, qr{^HTTP/1\.1 200 .*ok GET /five}s, '--max-header-count 5 with 5 headers is accepted';
}
is $small->stop('TERM'), 0, 'small-limit server: SIGTERM exits 0';

# Above hyper's own default of 100, the limit is ours too.
my $large = start_server( '--no-access-log', '--max-header-count', 200, $app );
{
    my ( $raw, $closed ) = exchange( "GET /many150 HTTP/1.1\r\n$H" . join( '', map {"X-H$_: v\r\n"} 1 .. 148 ) . "Connection: close\r\n\r\n",
        port => $large->port );
    like $raw, qr{^HTTP/1\.1 200 .*ok GET /many150}s, '--max-header-count 200 with 150 headers is accepted';
}
refused( '--max-header-count 200 with 201 headers',
    "GET /many201 HTTP/1.1\r\n$H" . join( '', map {"X-H$_: v\r\n"} 1 .. 200 ) . "\r\n",
    431, 'Request Header Fields Too Large', port => $large->port );
is $large->stop('TERM'), 0, 'large-limit server: SIGTERM exits 0';

ok $server->is_running, 'server still running after all refusals';
is $server->stop('TERM'), 0, 'SIGTERM exits 0';
done_testing;
