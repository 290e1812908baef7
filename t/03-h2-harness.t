use strict;
use warnings;
use utf8;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::H2;
use File::Temp qw(tempdir);
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

# Self-test of the frame-level HTTP/2 test client (t/lib/h2client.py through
# PagiRS::H2), without pagi-rs: it drives bench's plain hyper HTTP/2 server
# (target/release/h2-baseline, bench/h2_baseline.rs), whose behaviour is
# hyper's own, and checks that the client sees what that server does: a GET
# over h2c, flow control both ways, a client RST_STREAM, RFC 8441 WebSocket,
# the Rapid Reset GOAWAY, TLS with ALPN, GOAWAY on SIGTERM.  Also the Perl
# side's failure reports: a script that raises, hangs or emits nothing.

binmode Test::More->builder->$_, ':encoding(UTF-8)' for qw(output failure_output todo_output);

my $ROOT     = "$FindBin::Bin/..";
my $BASELINE = $ENV{H2_BASELINE_BIN} // "$ROOT/target/release/h2-baseline";
my $TMP      = tempdir( CLEANUP => 1 );

PagiRS::H2->require_client;
if ( !-x $BASELINE ) {
    fail "h2-baseline is built: $BASELINE";
    diag 'Build it with:  cargo build --release';
    done_testing;
    exit;
}

# ---------------------------------------------------------------------------
# The baseline server
# ---------------------------------------------------------------------------

my @servers;
my $n_server = 0;

# Start h2-baseline with @args on an ephemeral port; returns { pid, port, log }.
sub start_baseline {
    my (@args) = @_;
    my $log = "$TMP/baseline" . ( ++$n_server ) . '.log';
    my $pid = fork // die "fork: $!";
    if ( !$pid ) {
        open STDIN,  '<',  '/dev/null';
        open STDOUT, '>',  $log;
        open STDERR, '>&', \*STDOUT;
        exec $BASELINE, '--port', 0, @args or POSIX::_exit(127);
    }
    my $s = { pid => $pid, log => $log };
    push @servers, $s;
    my $deadline = time + 10;
    while ( time < $deadline ) {
        if ( slurp($log) =~ m{listening on https?://[^:]+:(\d+)/} ) {
            $s->{port} = $1;
            return $s;
        }
        if ( waitpid( $pid, WNOHANG ) == $pid ) {
            $s->{pid} = 0;
            die "h2-baseline exited during startup:\n" . slurp($log);
        }
        sleep 0.02;
    }
    die "h2-baseline did not start:\n" . slurp($log);
}

# Wait up to $secs for a server to exit; its wait status, or undef.
sub wait_exit {
    my ( $s, $secs ) = @_;
    my $deadline = time + $secs;
    while ( time < $deadline ) {
        if ( waitpid( $s->{pid}, WNOHANG ) == $s->{pid} ) {
            $s->{pid} = 0;
            return $?;
        }
        sleep 0.02;
    }
    return undef;
}

END {
    local $?;    # waitpid would otherwise become the test's exit status
    for my $s ( grep { $_->{pid} } @servers ) {
        kill 'KILL', $s->{pid};
        waitpid( $s->{pid}, 0 );
    }
}

sub slurp { open my $fh, '<', $_[0] or return ''; local $/; <$fh> // '' }

my $h2c  = start_baseline();
my $port = $h2c->{port};

# ---------------------------------------------------------------------------
subtest 'GET over h2c with prior knowledge' => sub {
    my $r = h2_run( <<'PY', port => $port );
c = connect()
s = c.wait_stream(c.request('GET', '/'))
emit({'stream': s, 'settings': c.remote_settings, 'acked': c.settings_acked,
      'alpn': c.alpn_protocol(), 'goaway': c.goaway})
PY
    my $s = $r->{stream};
    is $s->{status}, 200, 'status 200';
    is $s->{body},   'Hello, World!', 'body';
    ok $s->{ended}, 'END_STREAM seen';
    is $s->{reset}, undef, 'no RST_STREAM';
    is_deeply [ grep { $_->[0] eq 'content-type' } @{ $s->{headers} } ], [ [ 'content-type', 'text/plain' ] ],
      'headers as a list of [name, value]';
    is $s->{headers}[0][0], ':status', '... the pseudo-header first';
    is $r->{settings}{MAX_CONCURRENT_STREAMS},  100, "server's SETTINGS: MAX_CONCURRENT_STREAMS 100";
    is $r->{settings}{ENABLE_CONNECT_PROTOCOL}, 1,   '... ENABLE_CONNECT_PROTOCOL 1';
    ok $r->{acked}, 'our SETTINGS acknowledged';
    is $r->{alpn},   undef, 'no ALPN in cleartext';
    is $r->{goaway}, undef, 'no GOAWAY';
};

# ---------------------------------------------------------------------------
subtest 'request body larger than the flow-control window' => sub {
    # 200 000 bytes: more than the default 65 535-byte windows, so send_data
    # must wait for the server's WINDOW_UPDATEs.
    my $r = h2_run( <<'PY', port => $port );
body = bytes(range(256)) * 781 + b'-' * 60 + b'end!'
c = connect()
sid = c.request('POST', '/echo', body=body)
s = c.wait_stream(sid)
emit({'same': bytes(s.data) == body, 'length': len(s.data), 'status': s.status,
      'tail': s.data[-4:]})
PY
    is $r->{status}, 200,     'status 200';
    is $r->{length}, 200_000, 'all 200000 bytes echoed';
    ok $r->{same}, '... unchanged';
    is $r->{tail}, 'end!', 'bytes come back to Perl as the same byte string';
};

# ---------------------------------------------------------------------------
subtest 'RST_STREAM from the client is accepted' => sub {
    my $r = h2_run( <<'PY', port => $port );
c = connect()
slow = c.request('GET', '/delay/3000')
c.wait_headers(slow, 0.2)           # the server is now holding the stream
c.reset(slow, ErrorCodes.CANCEL)
after = c.wait_stream(c.request('GET', '/'))
pinged = c.ping()
emit({'reset': c.stream(slow), 'after': after, 'pinged': pinged,
      'goaway': c.goaway, 'closed': c.closed})
PY
    is $r->{reset}{reset},      8,        'the stream is reset with CANCEL (8)';
    is $r->{reset}{reset_name}, 'CANCEL', '... named';
    is $r->{reset}{reset_by},   'client', '... by the client';
    is $r->{reset}{status},     undef,    '... and got no response';
    is $r->{after}{status},     200,      'a new stream on the same connection is served';
    ok $r->{pinged}, 'the connection answers PING';
    is $r->{goaway}, undef, 'no GOAWAY';
    ok !$r->{closed}, 'the connection stays open';
};

# ---------------------------------------------------------------------------
subtest 'flow control: a client that never opens its window' => sub {
    my $r = h2_run( <<'PY', port => $port );
c = connect(window=16, auto_ack=False)
sid = c.request('GET', '/bytes/100000')
s = c.stream(sid)
c.wait(lambda: len(s.data) >= 16)
c.read(0.5)                         # nothing more may come
shut = len(s.data)
c.open_window(1000, sid)            # the stream's window ...
c.open_window(1000)                 # ... and the connection's
c.wait(lambda: len(s.data) >= 1016)
c.read(0.3)
emit({'shut': shut, 'opened': len(s.data), 'done': s.done, 'unacked': s.unacked})
PY
    is $r->{shut}, 16, 'with a 16-byte initial window, 16 bytes arrive and no more';
    ok !$r->{done}, 'the stream stays open';
    is $r->{opened},  1016, 'WINDOW_UPDATE of 1000 lets exactly 1000 more through';
    is $r->{unacked}, 1016, 'received bytes are left unacknowledged';
};

# ---------------------------------------------------------------------------
subtest 'WebSocket over HTTP/2 (RFC 8441)' => sub {
    my $r = h2_run( <<'PY', port => $port );
c = connect()
ws = c.websocket('/chat')
out = {'status': ws.status, 'accepted': ws.accepted, 'headers': ws.headers}
ws.send_text('héllo ✓')
out['text'] = ws.recv_data()
ws.send_binary(bytes(range(256)))
out['binary'] = ws.recv_data()
for n in (125, 126, 65535, 65536):
    ws.send_text('x' * n)
    out['len%d' % n] = len(ws.recv_data()['data'])
ws.send_ping(b'p1')
out['pong'] = ws.recv()
out['close'] = ws.close(1000, 'bye')
out['errors'] = ws.protocol_errors
emit(out)
PY
    is $r->{status}, 200, 'extended CONNECT answered 200';
    ok $r->{accepted}, '... accepted';
    ok !( grep { $_->[0] =~ /^(?:upgrade|sec-websocket-accept)$/ } @{ $r->{headers} } ),
      '... with no Upgrade or Sec-WebSocket-Accept';
    is_deeply $r->{text}, { type => 'text', data => 'héllo ✓' }, 'text message echoed, as characters';
    is_deeply $r->{binary}, { type => 'binary', data => join '', map { chr } 0 .. 255 },
      'binary message echoed, as bytes';
    is $r->{"len$_"}, $_, "$_-byte message echoed" for 125, 126, 65535, 65536;
    is_deeply $r->{pong}, { type => 'pong', data => 'p1' }, 'ping answered by pong';
    is $r->{close}{code},   1000,  'close answered with 1000';
    is $r->{close}{reason}, 'bye', '... and the reason';
    is_deeply $r->{errors}, [], 'no framing errors from the server';
};

# ---------------------------------------------------------------------------
subtest 'Rapid Reset flood is answered with GOAWAY' => sub {
    my $r = h2_run( <<'PY', port => $port );
c = connect()
c.rapid_reset(500)
g = c.wait_goaway()
emit({'goaway': g, 'closed': c.wait_closed()})
PY
    is $r->{goaway}{error_name}, 'ENHANCE_YOUR_CALM', 'hyper sends GOAWAY ENHANCE_YOUR_CALM';
    ok $r->{closed}, '... and closes';
};

# ---------------------------------------------------------------------------
subtest 'TLS with ALPN' => sub {
    my $dir = tempdir( DIR => $TMP );
    my $out = `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout $dir/key.pem -out $dir/cert.pem 2>&1`;
    is $?, 0, 'openssl made a certificate' or return diag $out;
    my $tls = start_baseline( '--tls', "$dir/cert.pem", "$dir/key.pem" );

    my $r = h2_run( <<'PY', port => $tls->{port}, args => { ca => "$dir/cert.pem" } );
c = connect(tls=True, cafile=ARGS['ca'])
s = c.wait_stream(c.request('GET', '/'))
h1 = connect(tls=True, alpn=['http/1.1'])
emit({'alpn': c.alpn_protocol(), 'version': c.tls_version(), 'status': s.status,
      'body': s.data, 'scheme': c.scheme, 'h1_alpn': h1.alpn_protocol()})
PY
    is $r->{alpn},    'h2',            'ALPN chose h2';
    is $r->{version}, 'TLSv1.3',       'TLS 1.3';
    is $r->{status},  200,             'GET over TLS: 200';
    is $r->{body},    'Hello, World!', '... with the body';
    is $r->{scheme},  'https',         ':scheme https';
    is $r->{h1_alpn}, 'http/1.1',      'offering only http/1.1 gets http/1.1';

    my ( $res, $err ) = h2_run( <<'PY', port => $tls->{port}, quiet => 1 );
c = connect(tls=True, verify=True)      # the system's CAs do not know it
emit({'connected': True})
PY
    is $res, undef, 'verification against the wrong CAs fails';
    like $err, qr/CERTIFICATE_VERIFY_FAILED/, '... and the error says why';
};

# ---------------------------------------------------------------------------
subtest 'GOAWAY on SIGTERM, the open stream finishes' => sub {
    # The signal is sent from the script, once a stream is open, so that
    # GOAWAY finds work in flight.
    my $r = h2_run( <<'PY', port => $port, args => { pid => $h2c->{pid} } );
import os, signal
c = connect()
sid = c.request('GET', '/delay/1000')
c.wait_headers(sid, 0.2)
os.kill(ARGS['pid'], signal.SIGTERM)
first = c.wait_goaway()
s = c.wait_stream(sid)
c.wait_goaway(count=2)
emit({'first': first, 'goaways': c.goaways, 'stream': s, 'closed': c.wait_closed()})
PY
    is $r->{first}{error_name}, 'NO_ERROR', 'GOAWAY with NO_ERROR';
    is $r->{first}{last_stream_id}, 2**31 - 1, '... first announcing a shutdown (last stream 2^31-1)';
    my ($last) = reverse @{ $r->{goaways} // [] };
    is $last && $last->{last_stream_id}, 1, '... then the last stream it will process: 1';
    is $r->{stream}{status}, 200, 'the open stream is still answered after GOAWAY';
    is $r->{stream}{body}, 'Hello, World!', '... completely';
    ok $r->{closed}, 'then the server closes the connection';
    is wait_exit( $h2c, 5 ), 0, 'and exits 0';
};

# ---------------------------------------------------------------------------
subtest 'failures are reported, never hang' => sub {
    my ( $res, $err ) = h2_run( "x = 1 / 0\n", quiet => 1 );
    is $res, undef, 'a script that raises: no result';
    like $err, qr/ZeroDivisionError/, '... the traceback in the error';

    ( $res, $err ) = h2_run( "emit({'partial': 1})\nraise RuntimeError('later')\n", quiet => 1 );
    is_deeply $res, { partial => 1 }, 'in list context, what it emitted before failing';
    like $err, qr/RuntimeError: later/, '... and the error';

    ( $res, $err ) = h2_run( "x = 1\n", quiet => 1 );
    like $err, qr/never called emit/, 'a script that emits nothing: an error';

    my $t0 = time;
    ( $res, $err ) = h2_run( "import time\ntime.sleep(30)\n", timeout => 2, quiet => 1 );
    like $err, qr/deadline/, 'a script past its deadline is interrupted';
    like $err, qr/time\.sleep/, '... with a traceback showing where it was';

    ( $res, $err ) = h2_run( <<'PY', timeout => 1.5, quiet => 1 );
import signal, time
signal.signal(signal.SIGALRM, signal.SIG_IGN)
time.sleep(30)
PY
    like $err, qr/timed out after 1\.5 s and was killed/, 'one that ignores the deadline is killed';
    cmp_ok time - $t0, '<', 8, '... both within their timeouts';

    is h2_run( "emit({'port': PORT, 'host': HOST, 'n': ARGS['n']})\n", port => 4242, args => { n => [ 1, 2 ] } )->{n}[1],
      2, 'ARGS carries structured arguments';
    is_deeply scalar h2_run( "emit([PORT, HOST])\n", port => 4242, host => '127.0.0.2' ), [ 4242, '127.0.0.2' ],
      'PORT and HOST from the options';
};

done_testing;
