use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::WS;
use PagiRS::SSE;
use PagiRS::H2;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use JSON::PP;

# --proxy-headers and --forwarded-allow-ips (README "Behind a proxy"): from
# a trusted peer, Forwarded / X-Forwarded-For / -Proto / -Host set the
# scope's client, scheme and host header, on http, sse and websocket
# scopes, over HTTP/1.1 and HTTP/2; from anyone else, and without the
# option, nothing changes.  The "other peer" is a socket bound to
# 127.0.0.2, so trust is tested against two real peer addresses.
# The app answers with what it saw, as JSON.

my $dir = tempdir( CLEANUP => 1 );
my $J   = JSON::PP->new->canonical->utf8;

my $app = write_app( <<'PERL', 'proxy_scope.pl' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP ();
my $J = JSON::PP->new->canonical->utf8;
sub seen {
    my ($scope) = @_;
    my %h;
    push @{ $h{ $_->[0] } }, $_->[1] for @{ $scope->{headers} };
    return $J->encode({ type => $scope->{type}, scheme => $scope->{scheme},
        client => $scope->{client}, server => $scope->{server}, headers => \%h });
}
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    my $type = $scope->{type};
    return if $type eq 'lifespan';
    if ($type eq 'websocket') {
        await $receive->();
        await $send->({ type => 'websocket.accept' });
        await $send->({ type => 'websocket.send', text => seen($scope) });
        await $send->({ type => 'websocket.close', code => 1000 });
        return;
    }
    if ($type eq 'sse') {
        await $send->({ type => 'sse.start' });
        await $send->({ type => 'sse.send', data => seen($scope) });
        await $send->({ type => 'sse.close' });
        return;
    }
    my $out = seen($scope);
    await $send->({ type => 'http.response.start', status => 200,
        headers => [['content-type', 'application/json'], ['content-length', length $out]] });
    await $send->({ type => 'http.response.body', body => $out, more => 0 });
};
$app;
PERL

# One request on a connection from $from (default 127.0.0.1); the app's view.
sub seen_from {
    my ( $port, $from, @headers ) = @_;
    my $sock = IO::Socket::INET->new(
        PeerAddr  => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 5,
        LocalAddr => $from // '127.0.0.1',
    ) or die "connect from $from: $!";
    my $req = "GET /who HTTP/1.1\r\nHost: backend:$port\r\n"
      . join( '', map { "$_->[0]: $_->[1]\r\n" } @headers )
      . "Connection: close\r\n\r\n";
    $sock->syswrite($req);
    my ($raw) = read_sock( $sock, undef, 5 );
    my $res = parse_response($raw) // {};
    my $seen = eval { $J->decode( $res->{body} // '' ) };
    diag "no answer: " . ( $raw // '' ) unless $seen;
    return { %{ $seen // {} }, local_port => $sock->sockport };
}
sub seen_by { my ( $port, @h ) = @_; seen_from( $port, '127.0.0.1', @h ) }

my @FORGED = (
    [ 'X-Forwarded-For',   '203.0.113.7' ],
    [ 'X-Forwarded-Proto', 'https' ],
    [ 'X-Forwarded-Host',  'shop.example' ],
);

# The scope a request gets when nothing is taken from the proxy headers.
sub untouched {
    my ( $seen, $port, $from, $name ) = @_;
    is_deeply $seen->{client}, [ $from, $seen->{local_port} ], "$name: client is the peer";
    is $seen->{scheme}, 'http', "$name: scheme";
    is_deeply $seen->{headers}{host}, ["backend:$port"], "$name: host as sent";
    is_deeply $seen->{headers}{'x-forwarded-for'}, ['203.0.113.7'], "$name: the headers reach the app unchanged";
}

subtest 'without --proxy-headers nothing changes' => sub {
    my $s = start_server($app);
    untouched( seen_by( $s->port, @FORGED ), $s->port, '127.0.0.1', 'default' );
    $s->stop;
};

my $log = "$dir/access.log";
my $s   = start_server( '--proxy-headers', '--http2', '--access-log', $log,
    '--access-log-format', '%h "%{Host}i" %U', $app );
my $port = $s->port;

subtest 'X-Forwarded-* from 127.0.0.1 (trusted by default)' => sub {
    my $seen = seen_by( $port, @FORGED );
    is_deeply $seen->{client}, [ '203.0.113.7', 0 ], 'client from X-Forwarded-For, port 0 when none given';
    is $seen->{scheme}, 'https', 'scheme from X-Forwarded-Proto';
    is_deeply $seen->{headers}{host}, ['shop.example'], 'host header from X-Forwarded-Host';
    is_deeply $seen->{headers}{'x-forwarded-for'}, ['203.0.113.7'], 'the X- headers stay visible';
    is_deeply $seen->{server}, [ '127.0.0.1', $port ], 'server stays the listening socket';
    like wait_file_line( $log, qr{^203\.0\.113\.7 "shop\.example" /who$} ), qr/^203/,
      'the access log shows the client and host the app saw';
};

subtest 'a request the server answers itself is logged with the forwarded client' => sub {
    my $raw = raw_request( $port, "GET /bad-upgrade HTTP/1.1\r\nHost: backend\r\nUpgrade: websocket\r\n"
          . "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nX-Forwarded-For: 203.0.113.8\r\n\r\n" );
    is( ( parse_response($raw) // {} )->{status}, 400, 'a handshake without a key gets 400' );
    like wait_file_line( $log, qr{/bad-upgrade$} ), qr{^203\.0\.113\.8 }, 'logged with the forwarded client';
};

subtest 'X-Forwarded-For is read from the right, skipping trusted hops' => sub {
    my $seen = seen_by( $port, [ 'X-Forwarded-For', '198.51.100.1, 203.0.113.1:4711, 127.0.0.1' ] );
    is_deeply $seen->{client}, [ '203.0.113.1', 4711 ], 'first untrusted hop, with its port';
    $seen = seen_by( $port, [ 'X-Forwarded-For', '2001:db8::9' ], [ 'X-Forwarded-For', '127.0.0.1' ] );
    is_deeply $seen->{client}, [ '2001:db8::9', 0 ], 'several lines are one list; IPv6';
};

subtest 'Forwarded (RFC 7239)' => sub {
    my $seen = seen_by( $port,
        [ 'Forwarded', 'for=198.51.100.1, For="[2001:db8:cafe::17]:4711";proto=HTTPS;host="fw.example:8443"' ] );
    is_deeply $seen->{client}, [ '2001:db8:cafe::17', 4711 ], 'client: quoted, bracketed IPv6 with port';
    is $seen->{scheme}, 'https', 'scheme';
    is_deeply $seen->{headers}{host}, ['fw.example:8443'], 'host';
    $seen = seen_by( $port, [ 'Forwarded', 'for=unknown;proto=https' ] );
    is_deeply $seen->{client}, [ '127.0.0.1', $seen->{local_port} ], 'for=unknown leaves the client';
    is $seen->{scheme}, 'https', '...and the rest of the element still counts';
    $seen = seen_by( $port, [ 'Forwarded', 'for="_hidden";host=obf.example' ] );
    is_deeply $seen->{client}, [ '127.0.0.1', $seen->{local_port} ], 'an obfuscated for= leaves the client';
    is_deeply $seen->{headers}{host}, ['obf.example'], '...and its host counts';
};

subtest 'X-Forwarded-* win over Forwarded, and are not mixed with it' => sub {
    my $seen = seen_by( $port,
        [ 'Forwarded', 'for=192.0.2.1;proto=https;host=forged.example' ],
        [ 'X-Forwarded-For', '198.51.100.7' ] );
    is_deeply $seen->{client}, [ '198.51.100.7', 0 ], 'client from X-Forwarded-For';
    is $seen->{scheme}, 'http', 'no proto from Forwarded';
    is_deeply $seen->{headers}{host}, ["backend:$port"], 'no host from Forwarded';
};

subtest 'malformed values are ignored' => sub {
    for my $case (
        [ [ 'X-Forwarded-For', 'not-an-address' ], [ 'X-Forwarded-Proto', 'gopher' ], [ 'X-Forwarded-Host', 'bad host!' ] ],
        [ [ 'X-Forwarded-For', '203.0.113.7:99999' ], [ 'X-Forwarded-Proto', 'https, ' ], [ 'X-Forwarded-Host', 'a.example:' ] ],
        [ [ 'X-Forwarded-For', '' ], [ 'X-Forwarded-Host', '[::1' ] ],
        [ [ 'Forwarded', 'for=[2001:db8::1];proto=https;host=a.example' ] ],
        [ [ 'Forwarded', 'for=192.0.2.1;for=192.0.2.2;proto=https' ] ],
        [ [ 'Forwarded', 'for="192.0.2.1;proto=https' ] ],
      )
    {
        my $name = join ' ', map { "$_->[0]: $_->[1]" } @$case;
        my $seen = seen_by( $port, @$case );
        is_deeply $seen->{client}, [ '127.0.0.1', $seen->{local_port} ], "$name: client";
        is $seen->{scheme}, 'http', "$name: scheme";
        is_deeply $seen->{headers}{host}, ["backend:$port"], "$name: host";
    }
};

subtest 'from a peer not in the list (127.0.0.2) nothing changes' => sub {
    untouched( seen_from( $port, '127.0.0.2', @FORGED ), $port, '127.0.0.2', '127.0.0.2' );
    like wait_file_line( $log, qr{^127\.0\.0\.2 } ), qr/^127\.0\.0\.2 "backend:$port"/,
      'the access log shows the peer';
};

subtest 'SSE scope' => sub {
    my $sse = PagiRS::SSE->open( $port, '/events', headers => \@FORGED );
    my $ev  = $sse->next_event;
    my $seen = $ev ? $J->decode( $ev->{data} ) : {};
    is $seen->{type}, 'sse', 'an sse scope';
    is_deeply $seen->{client}, [ '203.0.113.7', 0 ], 'client';
    is $seen->{scheme}, 'https', 'scheme';
    is_deeply $seen->{headers}{host}, ['shop.example'], 'host';
};

subtest 'WebSocket scope: X-Forwarded-Proto https makes wss' => sub {
    for my $proto ( [ https => 'wss' ], [ http => 'ws' ], [ wss => 'wss' ] ) {
        my $ws = PagiRS::WS->connect( $port, path => '/ws',
            headers => [ [ 'X-Forwarded-For', '[2001:db8::3]:9' ], [ 'X-Forwarded-Proto', $proto->[0] ] ] );
        ok $ws->upgraded, 'upgraded';
        my $msg  = $ws->recv_message;
        my $seen = $msg && $msg->{type} eq 'text' ? $J->decode( $msg->{data} ) : {};
        is $seen->{type}, 'websocket', 'a websocket scope';
        is $seen->{scheme}, $proto->[1], "X-Forwarded-Proto $proto->[0]: $proto->[1]";
        is_deeply $seen->{client}, [ '2001:db8::3', 9 ], 'client';
        $ws->wait_close;
    }
};

subtest 'HTTP/2 (h2c)' => sub {
    if ( my $why = PagiRS::H2->missing ) {
        fail 'python3 with the h2 library is needed for the HTTP/2 case';
        return diag $why;
    }
    my $r = h2_run( <<'PY', port => $port );
c = connect()
s = c.wait_stream(c.request('GET', '/h2', authority='backend:1', headers=[
    ('x-forwarded-for', '198.51.100.2, 127.0.0.1'), ('x-forwarded-proto', 'https'),
    ('x-forwarded-host', 'h2.example')]))
emit({'status': s.status, 'body': bytes(s.data).decode()})
PY
    my $seen = $r && $r->{status} == 200 ? $J->decode( $r->{body} ) : {};
    is_deeply $seen->{client}, [ '198.51.100.2', 0 ], 'client';
    is $seen->{scheme}, 'https', 'scheme';
    is_deeply $seen->{headers}{host}, ['h2.example'], 'host replaces :authority';
};
$s->stop;

subtest '--forwarded-allow-ips 10.0.0.1: 127.0.0.1 is no longer trusted' => sub {
    # The option wins over the environment variable.
    local $ENV{FORWARDED_ALLOW_IPS} = '*';
    my $s = start_server( '--proxy-headers', '--forwarded-allow-ips', '10.0.0.1', $app );
    untouched( seen_by( $s->port, @FORGED ), $s->port, '127.0.0.1', '10.0.0.1 only' );
    $s->stop;
};

subtest '--forwarded-allow-ips "*": everyone, and the leftmost hop' => sub {
    my $s = start_server( '--proxy-headers', '--forwarded-allow-ips', '*', $app );
    my $seen = seen_from( $s->port, '127.0.0.2', [ 'X-Forwarded-For', '198.51.100.1, 203.0.113.1' ] );
    is_deeply $seen->{client}, [ '198.51.100.1', 0 ], 'client from 127.0.0.2: the leftmost entry';
    $s->stop;
};

subtest 'FORWARDED_ALLOW_IPS when the option is not given; networks' => sub {
    local $ENV{FORWARDED_ALLOW_IPS} = '127.0.0.2/32';
    my $s = start_server( '--proxy-headers', $app );
    my $seen = seen_from( $s->port, '127.0.0.2', @FORGED );
    is_deeply $seen->{client}, [ '203.0.113.7', 0 ], '127.0.0.2 is trusted';
    untouched( seen_by( $s->port, @FORGED ), $s->port, '127.0.0.1', '127.0.0.1 is not' );
    $s->stop;
};

subtest 'a bad list is refused before anything starts' => sub {
    my ( $code, $err ) = run_pagi( '--proxy-headers', '--forwarded-allow-ips', '127.0.0.1, 10.0.0.0/33', $app );
    is $code, 2, 'exit 2';
    like $err, qr/--forwarded-allow-ips: '10\.0\.0\.0\/33' is not an IP network/, 'names the option and the entry';
    local $ENV{FORWARDED_ALLOW_IPS} = '10.0.0.1/8';
    ( $code, $err ) = run_pagi( '--proxy-headers', $app );
    is $code, 2, 'exit 2 for the environment variable';
    like $err, qr/FORWARDED_ALLOW_IPS: '10\.0\.0\.1\/8' .*did you mean 10\.0\.0\.0\/8\?/, 'names it, and the fix';
};

subtest '--forwarded-allow-ips alone warns that it does nothing' => sub {
    my $s = start_server( '--forwarded-allow-ips', '127.0.0.1', $app );
    untouched( seen_by( $s->port, @FORGED ), $s->port, '127.0.0.1', 'no --proxy-headers' );
    like $s->output, qr/--forwarded-allow-ips has no effect without --proxy-headers/, 'warned';
    $s->stop;
};

done_testing;
