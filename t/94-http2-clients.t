use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use File::Temp qw(tempdir);
use PagiRS::Test;
use PagiRS::H2;

# HTTP/2 as real clients speak it: curl (--http2 over TLS, and
# --http2-prior-knowledge in cleartext) and nghttp, plus ALPN's choice when
# a client offers both protocols, and the header-list limit.

for my $tool (qw(curl nghttp openssl)) {
    next if grep { -x "$_/$tool" } split /:/, $ENV{PATH};
    fail "$tool is installed";
    diag 'Install it with:  apt-get install -y curl nghttp2-client openssl';
    done_testing;
    exit;
}
PagiRS::H2->require_client;

my $DIR = tempdir( CLEANUP => 1 );
my $made = system(
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $DIR/key.pem"
      . " -out $DIR/cert.pem -days 2 -subj /CN=localhost"
      . " -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE"
      . " >/dev/null 2>&1"
) == 0;
ok $made, 'a throw-away certificate' or BAIL_OUT('openssl failed');

# Echoes what the scope says, so each client's view can be checked.
my $app = write_app(<<'APP');
use strict; use warnings; use Future::AsyncAwait;
return async sub {
    my ( $scope, $receive, $send ) = @_;
    return if $scope->{type} eq 'lifespan';
    my $body = '';
    while (1) {
        my $e = await $receive->();
        $body .= $e->{body} // '';
        last unless $e->{more};
    }
    my ($host) = map { $_->[1] } grep { $_->[0] eq 'host' } @{ $scope->{headers} };
    my $text = join ' ', "version=$scope->{http_version}", "scheme=$scope->{scheme}",
      "path=$scope->{path}", "host=" . ( $host // '-' ), 'body=' . length($body),
      'tls=' . ( $scope->{extensions}{tls} ? 1 : 0 );
    await $send->( { type => 'http.response.start', status => 200,
        headers => [ [ 'content-type', 'text/plain' ] ] } );
    await $send->( { type => 'http.response.body', body => "$text\n" } );
};
APP

sub run_cmd {
    my (@cmd) = @_;
    my $out = `@cmd 2>&1`;
    return ( $?, $out );
}

subtest 'curl --http2 over TLS, and HTTP/1.1 for a client that wants it' => sub {
    my $server = start_server( '--ssl-cert', "$DIR/cert.pem", '--ssl-key', "$DIR/key.pem", $app );
    my $port = $server->port;
    my ( $rc, $out ) = run_cmd( 'curl', '-s', '--cacert', "$DIR/cert.pem", '--http2',
        '-d', 'x' x 100_000, '-w', '" proto=%{http_version}"', "https://localhost:$port/up?q=1" );
    is $rc, 0, 'curl succeeded';
    like $out, qr/^version=2 scheme=https path=\/up host=localhost:$port body=100000 tls=1\n proto=2$/,
      'curl negotiated h2 by ALPN; the app saw HTTP/2 over TLS, the whole upload, :authority as host';
    ( $rc, $out ) = run_cmd( 'curl', '-s', '--cacert', "$DIR/cert.pem", '--http1.1', '-w',
        '" proto=%{http_version}"', "https://localhost:$port/one" );
    like $out, qr/^version=1\.1 scheme=https .* proto=1\.1$/s, 'curl --http1.1 gets HTTP/1.1 over the same port';
    is $server->stop('TERM'), 0, 'server exits 0';
};

subtest 'curl --http2-prior-knowledge in cleartext' => sub {
    my $server = start_server( '--http2', $app );
    my $port = $server->port;
    my ( $rc, $out ) = run_cmd( 'curl', '-s', '--http2-prior-knowledge', '-w', '" proto=%{http_version}"',
        "http://127.0.0.1:$port/h2c" );
    like $out, qr/^version=2 scheme=http path=\/h2c host=127\.0\.0\.1:$port body=0 tls=0\n proto=2$/,
      'h2c with prior knowledge';
    ( $rc, $out ) = run_cmd( 'curl', '-s', '-w', '" proto=%{http_version}"', "http://127.0.0.1:$port/h1" );
    like $out, qr/^version=1\.1 .* proto=1\.1$/s, 'HTTP/1.1 on the same port';
    is $server->stop('TERM'), 0, 'server exits 0';
};

subtest 'nghttp, over TLS and over h2c' => sub {
    my $tls = start_server( '--ssl-cert', "$DIR/cert.pem", '--ssl-key', "$DIR/key.pem", $app );
    my ( $rc, $out ) = run_cmd( 'nghttp', '-nv', 'https://127.0.0.1:' . $tls->port . '/ng' );
    like $out, qr/The negotiated protocol: h2/, 'nghttp negotiated h2';
    like $out, qr/recv \(stream_id=\d+\) :status: 200/, '... and got 200';
    open my $fh, '>', "$DIR/upload.txt" or die $!;
    print $fh "hello\n";
    close $fh;
    ( $rc, $out ) = run_cmd( 'nghttp', '-d', "$DIR/upload.txt", 'https://127.0.0.1:' . $tls->port . '/body' );
    like $out, qr/^version=2 scheme=https path=\/body .*body=6 tls=1$/m, 'nghttp upload seen by the app';
    is $tls->stop('TERM'), 0, 'TLS server exits 0';

    my $h2c = start_server( '--http2', $app );
    ( $rc, $out ) = run_cmd( 'nghttp', 'http://127.0.0.1:' . $h2c->port . '/plain' );
    like $out, qr/^version=2 scheme=http path=\/plain /m, 'nghttp with prior knowledge over h2c';
    is $h2c->stop('TERM'), 0, 'h2c server exits 0';
};

subtest 'ALPN: h2 is preferred; the header-list limit' => sub {
    my $server = start_server( '--ssl-cert', "$DIR/cert.pem", '--ssl-key', "$DIR/key.pem",
        '--h2-max-header-list-size', '4096', $app );
    my $r = h2_run( <<'PY', port => $server->port, args => { cafile => "$DIR/cert.pem" } );
both = connect(tls=True, alpn=('http/1.1', 'h2'), cafile=ARGS['cafile'])
s = both.wait_stream(both.request('GET', '/alpn'))
only1 = connect(tls=True, alpn=('http/1.1',), cafile=ARGS['cafile'], wait_settings=False)
big = both.wait_stream(both.request('GET', '/big', headers=[('x-big', 'a' * 8000)]))
after = both.wait_stream(both.request('GET', '/after'))
emit({'alpn': both.alpn_protocol(), 'only1': only1.alpn_protocol(), 'body': s.data,
      'big': big, 'after': after.status})
PY
    is $r->{alpn},  'h2',       'a client offering http/1.1 and h2 gets h2';
    is $r->{only1}, 'http/1.1', 'a client offering only http/1.1 gets it';
    like $r->{body}, qr/^version=2 scheme=https path=\/alpn /, 'served over h2';
    ok( ( $r->{big}{status} // 0 ) == 431 || defined $r->{big}{reset},
        'a header list over --h2-max-header-list-size is refused (431 or a reset), not served' )
      or diag explain $r->{big};
    unlike $r->{big}{body} // '', qr/path=\/big/, 'the app never saw it';
    is $r->{after}, 200, 'the connection still serves';
    is $server->stop('TERM'), 0, 'server exits 0';
};

done_testing;
