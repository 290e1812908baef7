use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use File::Spec;
use IO::Socket::INET;
use IO::Socket::SSL;
use Net::SSLeay ();
use JSON::PP;
use Time::HiRes qw(time sleep);

# TLS (--ssl-cert, --ssl-key, client certificates), over real sockets with
# IO::Socket::SSL and curl.  Every certificate and key is made here, with
# the openssl command, in a temporary directory.

$ENV{PAGI_RS_BIN} = File::Spec->rel2abs( $ENV{PAGI_RS_BIN} ) if defined $ENV{PAGI_RS_BIN};
my $DIR = tempdir( CLEANUP => 1 );

# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------

sub openssl {
    my @args = @_;
    my $out  = `openssl @args 2>&1`;
    die "openssl @args failed:\n$out" if $?;
    return $out;
}

sub write_file {
    my ( $name, $text ) = @_;
    open my $fh, '>', "$DIR/$name" or die "$name: $!";
    print $fh $text;
    close $fh;
    return "$DIR/$name";
}

# A CA: key and self-signed certificate.
sub make_ca {
    my ($name) = @_;
    openssl( "ecparam -name prime256v1 -genkey -noout -out $DIR/$name.key" );
    openssl( "req -x509 -new -key $DIR/$name.key -out $DIR/$name.pem -days 2 -subj '/CN=$name'"
          . " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign" );
}

# A certificate for the key $key, signed by $ca, with extensions $ext.
sub make_cert {
    my ( $name, $key, $subject, $ca, $ext ) = @_;
    my $extfile = write_file( "$name.ext", $ext );
    openssl("req -new -key $key -out $DIR/$name.csr -subj '$subject'");
    openssl( "x509 -req -in $DIR/$name.csr -CA $DIR/$ca.pem -CAkey $DIR/$ca.key -CAcreateserial"
          . " -out $DIR/$name.pem -days 2 -extfile $extfile" );
    return "$DIR/$name.pem";
}

my $SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
my $CLIENT_EXT = "extendedKeyUsage=clientAuth\n";

make_ca('ca');
make_ca('otherca');

# The RSA server key in PKCS#1 ("BEGIN RSA PRIVATE KEY") and PKCS#8 ("BEGIN
# PRIVATE KEY") form; an EC server key in SEC1 form ("BEGIN EC PRIVATE KEY",
# after an "EC PARAMETERS" block, as `openssl ecparam -genkey` writes it).
openssl("genrsa -traditional -out $DIR/rsa1.key 2048");
openssl("pkcs8 -topk8 -nocrypt -in $DIR/rsa1.key -out $DIR/rsa8.key");
openssl("ecparam -name prime256v1 -genkey -out $DIR/ec.key");
like( scalar `cat $DIR/rsa1.key`, qr/BEGIN RSA PRIVATE KEY/, 'PKCS#1 key' );
like( scalar `cat $DIR/rsa8.key`, qr/BEGIN PRIVATE KEY/,     'PKCS#8 key' );
like( scalar `cat $DIR/ec.key`,   qr/EC PARAMETERS.*BEGIN EC PRIVATE KEY/s, 'SEC1 key after its parameters' );
my $rsa_cert = make_cert( 'rsa', "$DIR/rsa1.key", '/CN=localhost', 'ca', $SERVER_EXT );
my $ec_cert  = make_cert( 'ecs', "$DIR/ec.key",   '/CN=localhost', 'ca', $SERVER_EXT );

openssl("ecparam -name prime256v1 -genkey -noout -out $DIR/alice.key");
my $alice = make_cert( 'alice', "$DIR/alice.key", '/C=US/O=Acme, Inc./CN=alice', 'ca', $CLIENT_EXT );
openssl("ecparam -name prime256v1 -genkey -noout -out $DIR/mallory.key");
my $mallory = make_cert( 'mallory', "$DIR/mallory.key", '/CN=mallory', 'otherca', $CLIENT_EXT );
my $CA = "$DIR/ca.pem";

# The base64 body of a PEM certificate, to compare certificates.
sub pem_body {
    my ($pem) = @_;
    my ($b64) = ( $pem // '' ) =~ /-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----/s;
    return undef unless defined $b64;
    $b64 =~ s/\s+//g;
    return $b64;
}
sub file_pem_body { pem_body( slurp( $_[0] ) ) }

# ---------------------------------------------------------------------------
# The app: the scope's scheme and tls extension, as JSON
# ---------------------------------------------------------------------------

my $app = write_app( <<'PERL', 'tls_app.pl' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP ();
my $json = JSON::PP->new->canonical->allow_nonref;
async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $ext = $scope->{extensions};
    my $facts = $json->encode({
        scheme  => $scope->{scheme},
        has_tls => (exists $ext->{tls} ? 1 : 0),
        keys    => [ sort keys %{ $ext->{tls} // {} } ],
        tls     => $ext->{tls},
        utf8_name => (defined $ext->{tls} && defined $ext->{tls}{client_cert_name}
                      && utf8::is_utf8($ext->{tls}{client_cert_name}) ? 1 : 0),
    });
    if ($scope->{type} eq 'websocket') {
        await $receive->();    # websocket.connect
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => $facts });
        await $send->({ type => 'websocket.close', code => 1000 });
        return;
    }
    await $send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'application/json'], ['content-length', length $facts]] });
    await $send->({ type => 'http.response.body', body => $facts });
};
PERL

# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

# A TLS connection to the server, verifying it against our CA; %o adds
# IO::Socket::SSL options (SSL_cert_file ...).  Returns the socket, or undef
# and the reason.
sub tls_connect {
    my ( $port, %o ) = @_;
    my $s = IO::Socket::SSL->new(
        PeerAddr        => '127.0.0.1',
        PeerPort        => $port,
        Timeout         => 5,
        SSL_ca_file     => $CA,
        SSL_verifycn_name => 'localhost',
        SSL_hostname    => 'localhost',
        %o,
    );
    return $s ? ($s) : ( undef, "$SSL_ERROR" );
}

# GET $path over a new TLS connection.  Returns (parsed response or undef,
# socket or undef, error).  A handshake the server refuses may fail in
# connect, or (TLS 1.3: the server checks the client's certificate after the
# client has finished) on the first read.
sub https_get {
    my ( $port, $path, %o ) = @_;
    my ( $s, $err ) = tls_connect( $port, %o );
    return ( undef, undef, $err ) unless $s;
    print {$s} "GET $path HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    my $raw = '';
    my $deadline = time + 5;
    while ( time < $deadline ) {
        my $n = sysread( $s, $raw, 65536, length $raw );
        last unless $n;
    }
    my $read_err = length $raw ? '' : ( "$SSL_ERROR" || "$!" || 'closed' );
    return ( parse_response($raw), $s, $read_err );
}

# The app's JSON for a 200 response; {} for anything else.
sub facts_of {
    my ($res) = @_;
    return {} unless $res && $res->{status} == 200;
    return eval { JSON::PP->new->decode( $res->{body} ) } // {};
}

# The IANA numbers of the suites the tests ask for, by OpenSSL name.
my %SUITE = (
    TLS_CHACHA20_POLY1305_SHA256  => 0x1303,
    TLS_AES_256_GCM_SHA384        => 0x1302,
    'ECDHE-RSA-AES128-GCM-SHA256' => 0xc02f,
    'ECDHE-RSA-CHACHA20-POLY1305' => 0xcca8,
);

my %TLS_VERSION = ( TLSv1_2 => 0x0303, TLSv1_3 => 0x0304 );

# ---------------------------------------------------------------------------
# Startup errors: exit 1 with a message naming the problem, before the port
# is bound.  The port is held by another listener: had pagi-rs tried to bind
# first, it would say so instead.
# ---------------------------------------------------------------------------

{
    my $holder = IO::Socket::INET->new( Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0 )
      or die "listen: $!";
    my $port = $holder->sockport;
    my @tls  = ( '--ssl-cert', $rsa_cert, '--ssl-key', "$DIR/rsa1.key" );
    my @cases = (
        [ 'cert without key',    [ '--ssl-cert', $rsa_cert ],          qr/--ssl-cert needs --ssl-key/ ],
        [ 'key without cert',    [ '--ssl-key', "$DIR/rsa1.key" ],     qr/--ssl-key needs --ssl-cert/ ],
        [ 'missing cert file',   [ '--ssl-cert', "$DIR/nope.pem", '--ssl-key', "$DIR/rsa1.key" ],
          qr/--ssl-cert \Q$DIR\E\/nope\.pem: cannot read the file: No such file/ ],
        [ 'unreadable cert file', [ '--ssl-cert', $DIR, '--ssl-key', "$DIR/rsa1.key" ],
          qr/--ssl-cert \Q$DIR\E: cannot read the file: Is a directory/ ],
        [ 'missing key file',    [ '--ssl-cert', $rsa_cert, '--ssl-key', "$DIR/nope.key" ],
          qr/--ssl-key \Q$DIR\E\/nope\.key: cannot read the file: No such file/ ],
        [ 'no certificate in the cert file', [ '--ssl-cert', "$DIR/rsa1.key", '--ssl-key', "$DIR/rsa1.key" ],
          qr/--ssl-cert \Q$DIR\E\/rsa1\.key: no PEM certificate/ ],
        [ 'no key in the key file', [ '--ssl-cert', $rsa_cert, '--ssl-key', $rsa_cert ],
          qr/--ssl-key \Q$rsa_cert\E: no PEM private key \(PKCS#8, PKCS#1 or SEC1\)/ ],
        [ 'a key of another certificate', [ '--ssl-cert', $rsa_cert, '--ssl-key', "$DIR/ec.key" ],
          qr/--ssl-key \Q$DIR\E\/ec\.key does not match the certificate in --ssl-cert \Q$rsa_cert\E/ ],
        [ 'broken PEM', [ '--ssl-cert', write_file( 'broken.pem', "-----BEGIN CERTIFICATE-----\nMIIB\n" ),
            '--ssl-key', "$DIR/rsa1.key" ], qr/--ssl-cert \S+broken\.pem: not valid PEM/ ],
        [ 'a certificate that is not DER', [ '--ssl-cert', write_file( 'garbage.pem',
              "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSwgbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n" ),
            '--ssl-key', "$DIR/rsa1.key" ], qr/--ssl-cert \S+garbage\.pem: the certificate cannot be used/ ],
        [ 'a key that is not a key', [ '--ssl-cert', $rsa_cert, '--ssl-key', write_file( 'garbage.key',
              "-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZSwgbm90IGEga2V5\n-----END PRIVATE KEY-----\n" ) ],
          qr/--ssl-key \S+garbage\.key: the private key cannot be used/ ],
        [ 'missing CA file', [ @tls, '--ssl-verify-client', 'required', '--ssl-ca-file', "$DIR/nope-ca.pem" ],
          qr/--ssl-ca-file \Q$DIR\E\/nope-ca\.pem: cannot read the file/ ],
        [ 'no certificate in the CA file', [ @tls, '--ssl-verify-client', 'optional', '--ssl-ca-file', "$DIR/ca.key" ],
          qr/--ssl-ca-file \Q$DIR\E\/ca\.key: no PEM certificate/ ],
        [ 'verify-client without TLS', [ '--ssl-verify-client', 'required', '--ssl-ca-file', $CA ],
          qr/need TLS: give --ssl-cert and --ssl-key/ ],
        [ 'CA file without TLS',      [ '--ssl-ca-file', $CA ], qr/need TLS/ ],
        [ 'min version without TLS',  [ '--ssl-min-version', '1.3' ], qr/need TLS/ ],
        [ 'verify-client without a CA', [ @tls, '--ssl-verify-client', 'required' ],
          qr/--ssl-verify-client optional or required needs --ssl-ca-file/ ],
        [ 'a CA with verification off', [ @tls, '--ssl-ca-file', $CA ],
          qr/--ssl-ca-file is used only to verify client certificates/ ],
    );
    for my $c (@cases) {
        my ( $what, $args, $re ) = @$c;
        my ( $code, $err ) = run_pagi( '-p', $port, @$args, $app );
        is( $code, 1, "$what: exit 1" );
        like( $err, qr/^pagi-rs: .*$re/m, "$what: the message says so" );
        unlike( $err, qr/cannot listen|listening on/, "$what: reported before binding" );
    }
    # The same held port with a good configuration: the bind fails, so the
    # checks above would have seen it had TLS been checked after binding.
    my ( $code, $err ) = run_pagi( '-p', $port, @tls, $app );
    like( $err, qr/cannot listen on 127\.0\.0\.1:$port/, 'control: the held port refuses a real bind' );
    close $holder;
}

# ---------------------------------------------------------------------------
# A server with an RSA PKCS#1 key and optional client certificates
# ---------------------------------------------------------------------------

my $access = "$DIR/access-a.log";
my $opt = start_server( '--ssl-cert', $rsa_cert, '--ssl-key', "$DIR/rsa1.key",
    '--ssl-ca-file', $CA, '--ssl-verify-client', 'optional', '--access-log', $access, $app );
my $port = $opt->port;
like( $opt->output, qr{listening on https://127\.0\.0\.1:$port/}, 'the startup line says https' );

{
    my $out = `curl -s --max-time 5 --cacert $CA https://localhost:$port/ 2>&1`;
    my $f = eval { JSON::PP->new->decode($out) } // {};
    is( $f->{scheme}, 'https', 'curl: scheme https' );
    is_deeply( $f->{keys}, [qw(cipher_suite client_cert_chain client_cert_error client_cert_name server_cert tls_version)],
        'curl: the tls extension has every key of PAGI::Spec::Tls' );
    is( $f->{tls}{tls_version}, 0x0304, 'curl: TLS 1.3 (0x0304)' );
    ok( ( grep { $_ == ( $f->{tls}{cipher_suite} // -1 ) } 0x1301, 0x1302, 0x1303 ), 'curl: a TLS 1.3 cipher suite number' );
    is_deeply( $f->{tls}{client_cert_chain}, [], 'curl: no client certificate, an empty chain' );
    ok( exists $f->{tls}{client_cert_name} && !defined $f->{tls}{client_cert_name}, 'curl: client_cert_name undef' );
    ok( exists $f->{tls}{client_cert_error} && !defined $f->{tls}{client_cert_error}, 'curl: client_cert_error undef' );
    is( pem_body( $f->{tls}{server_cert} ), file_pem_body($rsa_cert), 'server_cert is the server certificate, PEM' );
}

# Each version with a suite that is not the default, so that the number
# reported is the one negotiated.
for my $case ( [ TLSv1_3 => SSL_ciphersuites => 'TLS_CHACHA20_POLY1305_SHA256' ],
    [ TLSv1_2 => SSL_cipher_list => 'ECDHE-RSA-CHACHA20-POLY1305' ], [ TLSv1_2 => SSL_cipher_list => 'ECDHE-RSA-AES128-GCM-SHA256' ] )
{
    my ( $version, $option, $suite ) = @$case;
    my ( $res, $s ) = https_get( $port, '/', SSL_version => $version, $option => $suite,
        SSL_cert_file => $alice, SSL_key_file => "$DIR/alice.key" );
    my $f = facts_of($res);
    is( $f->{scheme}, 'https', "$version $suite with a client certificate: served" ) or next;
    is( $s->get_cipher, $suite, "$version: the client negotiated $suite" );
    is( $f->{tls}{tls_version}, $TLS_VERSION{$version}, "$version: tls_version" );
    is( $f->{tls}{cipher_suite}, $SUITE{$suite}, "$version: cipher_suite is ${suite}'s number" );
    is( $f->{tls}{client_cert_name}, 'CN=alice,O=Acme\, Inc.,C=US', "$version: client_cert_name, RFC 4514" );
    is( $f->{utf8_name}, 1, "$version: client_cert_name is a text string" );
    ok( scalar @{ $f->{tls}{client_cert_chain} } >= 1, "$version: a client chain" );
    is( pem_body( $f->{tls}{client_cert_chain}[0] ), file_pem_body($alice), "$version: the chain starts with the client's certificate" );
}

{
    my ( $res, $s, $err ) = https_get( $port, '/', SSL_cert_file => $mallory, SSL_key_file => "$DIR/mallory.key" );
    ok( !$res, 'optional: a certificate from another CA fails the handshake' ) or diag explain $res;
    my ($ok) = https_get( $port, '/' );
    is( facts_of($ok)->{scheme}, 'https', '... and the server goes on serving' );
}

{
    my ( $res, $s ) = https_get( $port, '/', SSL_alpn_protocols => ['http/1.1'] );
    is( facts_of($res)->{scheme}, 'https', 'ALPN http/1.1: served' );
    is( $s && $s->alpn_selected, 'http/1.1', 'ALPN: a client offering http/1.1 gets http/1.1' );
}

# A TLS half-close is the client's close_notify, then its FIN: the request
# sent before it is answered.
{
    my ($s) = tls_connect($port);
    print {$s} "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    Net::SSLeay::shutdown( $s->_get_ssl_object );    # close_notify, one way
    shutdown( $s, 1 );
    my $raw = '';
    my $deadline = time + 5;
    while ( time < $deadline ) {
        my $n = sysread( $s, $raw, 65536, length $raw );
        last unless $n;
    }
    is( facts_of( parse_response($raw) )->{scheme}, 'https', 'TLS half-close: the request is answered' );
}

# WebSocket over TLS: scheme wss, with the tls extension.
{
    my ($s) = tls_connect($port);
    print {$s} "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      . "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    my $buf = '';
    my $deadline = time + 5;
    my $text;
    while ( time < $deadline ) {
        my $n = sysread( $s, $buf, 65536, length $buf ) or last;
        my $i = index( $buf, "\r\n\r\n" );
        next if $i < 0;
        my $frames = substr( $buf, $i + 4 );
        next if length $frames < 2;
        my ( $b0, $len ) = unpack 'CC', $frames;
        my $at = 2;
        ( $len, $at ) = ( unpack( 'n', substr( $frames, 2, 2 ) ), 4 ) if $len == 126;
        next if length($frames) < $at + $len;
        $text = substr( $frames, $at, $len ) if ( $b0 & 0x0f ) == 1;
        last;
    }
    like( $buf, qr{^HTTP/1\.1 101 }, 'WebSocket over TLS: 101' );
    my $f = eval { JSON::PP->new->decode( $text // '' ) } // {};
    is( $f->{scheme}, 'wss', 'WebSocket over TLS: scheme wss' );
    is( $f->{has_tls}, 1, 'WebSocket over TLS: the tls extension' );
    is( $f->{tls}{tls_version}, 0x0304, '... with its facts' );
}

# A client that speaks no TLS at all: its handshake fails, it gets no HTTP
# answer, nothing is logged above debug, the access log has no line for it,
# and the next client is served.
{
    my $sock = connect_port($port);
    print {$sock} "GET /plain-http-probe HTTP/1.1\r\nHost: localhost\r\n\r\n";
    my ( $got, $closed ) = read_sock( $sock, undef, 5 );
    ok( $closed, 'plain HTTP to the TLS port: the connection is closed' );
    unlike( $got, qr/HTTP\/1/, '... without an HTTP answer' );
    my ($res) = https_get( $port, '/after-plain-http' );
    is( facts_of($res)->{scheme}, 'https', '... and the next client is served' );
    # Lines of earlier clients (a WebSocket's is written when it ends) may
    # still be arriving: look for these two requests by path.
    ok( wait_file_line( $access, qr{/after-plain-http} ), '... whose request is in the access log' );
    ok( !grep( { m{/plain-http-probe} } file_lines($access) ), '... and the failed one is not' );
    unlike( $opt->output, qr/\b(WARN|ERROR)\b/, 'no warning or error for a failed handshake' );
}

is( $opt->stop, 0, 'optional-client server stops cleanly' );

# Failed handshakes are logged at debug level.
{
    my $dbg = start_server( '--log-level', 'debug', '--ssl-cert', $rsa_cert, '--ssl-key', "$DIR/rsa1.key", $app );
    my $sock = connect_port( $dbg->port );
    print {$sock} "hello\r\n\r\n";
    read_sock( $sock, undef, 5 );
    ok( $dbg->wait_output(qr/DEBUG .*TLS handshake failed/), 'a failed handshake: one debug line' );
    $dbg->stop;
}

# ---------------------------------------------------------------------------
# Required client certificates, PKCS#8 key, TLS 1.3 only, --timeout 1
# ---------------------------------------------------------------------------

my $req = start_server( '--ssl-cert', $rsa_cert, '--ssl-key', "$DIR/rsa8.key", '--ssl-ca-file', $CA,
    '--ssl-verify-client', 'required', '--ssl-min-version', '1.3', '--timeout', '1', $app );
$port = $req->port;
{
    my ( $res, $s, $err ) = https_get( $port, '/' );
    ok( !$res, 'required: no client certificate, no answer' ) or diag explain $res;
    ( $res, $s, $err ) = https_get( $port, '/', SSL_cert_file => $mallory, SSL_key_file => "$DIR/mallory.key" );
    ok( !$res, 'required: a certificate from another CA, no answer' );
    ( $res, $s ) = https_get( $port, '/', SSL_cert_file => $alice, SSL_key_file => "$DIR/alice.key" );
    my $f = facts_of($res);
    is( $f->{tls}{client_cert_name}, 'CN=alice,O=Acme\, Inc.,C=US', 'required: with a certificate, served (PKCS#8 key)' );
    ( $res, $s, $err ) = https_get( $port, '/', SSL_version => 'TLSv1_2',
        SSL_cert_file => $alice, SSL_key_file => "$DIR/alice.key" );
    ok( !$res, '--ssl-min-version 1.3: a TLS 1.2 client is refused' );
}

# The handshake is bounded by --timeout: a client that connects and says
# nothing, or stops in the middle of its ClientHello, is closed.
for my $case ( [ 'silent client', '' ], [ 'half a ClientHello', "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" ] ) {
    my ( $what, $bytes ) = @$case;
    my $sock = connect_port($port);
    print {$sock} $bytes if length $bytes;
    my $t0 = time;
    my ( $got, $closed ) = read_sock( $sock, undef, 5 );
    my $took = time - $t0;
    ok( $closed, "$what: closed by the server" );
    ok( $took > 0.5 && $took < 3.5, "$what: after the 1 s --timeout" ) or diag "took $took s";
}
is( $req->stop, 0, 'required-client server stops cleanly' );

# ---------------------------------------------------------------------------
# An EC key in SEC1 form; --max-connections over TLS; cleartext has no tls
# ---------------------------------------------------------------------------

my $ec = start_server( '--ssl-cert', $ec_cert, '--ssl-key', "$DIR/ec.key", '--max-connections', '1', $app );
{
    my ($held) = tls_connect( $ec->port );
    ok( $held, 'EC (SEC1) key: handshake' );
    my ( $res, $s ) = https_get( $ec->port, '/' );
    is( $res && $res->{status}, 503, '--max-connections over TLS: a TLS 503' );
    close $held;
    my $deadline = time + 5;
    # The held connection's task ends when it sees the close.
    while (1) {
        ($res) = https_get( $ec->port, '/' );
        last if ( $res && $res->{status} == 200 ) || time > $deadline;
        sleep 0.05;
    }
    my $f = facts_of($res);
    is( pem_body( $f->{tls}{server_cert} ), file_pem_body($ec_cert), 'EC (SEC1) key: served with its certificate' );
    $ec->stop;
}

{
    my $plain = start_server($app);
    my $res = http_request( $plain->port, 'GET', '/' );
    my $f = facts_of($res);
    is( $f->{scheme}, 'http', 'cleartext: scheme http' );
    is( $f->{has_tls}, 0, 'cleartext: no tls extension' );
    $plain->stop;
}

done_testing;
