use strict;
use warnings;
use utf8;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::H2;
use File::Temp qw(tempdir);
use JSON::PP;
use Time::HiRes qw(time sleep);

# WebSocket over HTTP/2 (RFC 8441) and the per-stream idle timeouts of SSE
# and WebSocket streams, at the frame level with t/lib/h2client.py against
# the real binary (h2c, --http2).  The contract is README's "### HTTP/2".
# Plain HTTP/2 streams are in t/92-http2.t.
#
# The app records what it saw as JSON lines in files under $dir named
# after the request ("<name>.<what>").

binmode Test::More->builder->$_, ':encoding(UTF-8)' for qw(output failure_output todo_output);

PagiRS::H2->require_client;

my $dir = tempdir( CLEANUP => 1 );
my $J   = JSON::PP->new->canonical->utf8->allow_nonref;

( my $app_code = <<'APP' ) =~ s/__DIR__/$dir/g;
use strict; use warnings;
use Future; use Future::AsyncAwait; use Future::IO;
use JSON::PP; use Time::HiRes qw(time);
my $dir = '__DIR__';
use lib '__LIB__';
use PagiRS::AppKit;
PagiRS::AppKit::record_to($dir);


sub ended {
    my ($c, $ev) = @_;
    return { event => $ev->{type}, code => $ev->{code}, reason => $c->disconnect_reason,
             detail => $c->disconnect_detail, close_code => $c->close_code, at => time };
}

async sub websocket {
    my ($scope, $receive, $send) = @_;
    my $path = $scope->{path};
    my $q = query($scope);
    my $name = $q->{name} // 'ws';
    my $c = $scope->{'pagi.connection'};
    my $connect = await $receive->();

    if ($path eq '/refuse') {
        # Www 0.6: an ordinary response before accept refuses.
        await $send->({ type => 'http.response.start', status => 403, headers => [@$plain, ['x-refused', 'yes']] });
        await $send->({ type => 'http.response.body', body => 'denied', more => 0 });
        return;
    }
    if ($path eq '/accept-with-length') {
        # The accepted stream carries frames, not content: a Content-Length
        # the app sets must not reach the 200 (the frames would overrun it).
        await $send->({ type => 'websocket.accept', headers => [['content-length', '3'], ['x-app', 'kept']] });
        await $send->({ type => 'websocket.send', text => 'more than three bytes' });
        await next_event($receive, 10);
        return;
    }
    if ($path eq '/close-first') {
        # Www 0.3: websocket.close before accept answers 403.
        await $send->({ type => 'websocket.close' });
        return;
    }
    if ($path eq '/echo') {
        rec("$name.scope", { connect => $connect->{type},
            map { $_ => $scope->{$_} } qw(type http_version scheme path raw_path query_string headers subprotocols) });
        await $send->({ type => 'websocket.accept' });
        while (1) {
            my $ev = await next_event($receive, 10);
            if ($ev->{type} ne 'websocket.receive') {
                rec("$name.end", ended($c, $ev));
                return;
            }
            if (defined $ev->{text} && $ev->{text} =~ /^keepalive (\S+)/) {
                await $send->({ type => 'websocket.keepalive', interval => $1 });
                await $send->({ type => 'websocket.send', text => 'keepalive set' });
            }
            elsif (defined $ev->{text}) {
                await $send->({ type => 'websocket.send', text => "echo: $ev->{text}" });
            }
            else {
                await $send->({ type => 'websocket.send', bytes => scalar reverse $ev->{bytes} });
            }
        }
    }
    if ($path eq '/flood') {
        # 64 KiB messages to a client whose window is shut: pagi.transport
        # reports the queue and fires its callbacks as over HTTP/1.1.
        my $t = $scope->{'pagi.transport'};
        await $send->({ type => 'websocket.accept' });
        $t->on_high_water(sub { rec("$name.transport", { event => 'high', buffered => $t->buffered_amount }) });
        $t->on_drain(sub { rec("$name.transport", { event => 'drain', buffered => $t->buffered_amount }) });
        rec("$name.transport", { event => 'marks', high => $t->high_water_mark });
        for my $i (1 .. $q->{n}) {
            await $send->({ type => 'websocket.send', bytes => chr(64 + $i) x 65536 });
            rec("$name.sent", { i => $i });
        }
        await $send->({ type => 'websocket.send', text => 'flood done' });
        my $ev = await next_event($receive, 10);
        rec("$name.end", ended($c, $ev));
        return;
    }
    if ($path eq '/idle') {
        await $send->({ type => 'websocket.accept' });
        rec("$name.started", { at => time });
        my $ev = await next_event($receive, 10);
        rec("$name.end", ended($c, $ev));
        return;
    }
    await $send->({ type => 'websocket.close', code => 4004 });
}

async sub sse {
    my ($scope, $receive, $send) = @_;
    my $path = $scope->{path};
    my $q = query($scope);
    my $name = $q->{name} // 'sse';
    my $c = $scope->{'pagi.connection'};
    await $send->({ type => 'sse.start' });
    if ($path eq '/sse/idle') {
        my $ev = await next_event($receive, 10);
        $ev = await next_event($receive, 10) if $ev->{type} eq 'sse.request';
        rec("$name.end", ended($c, $ev));
        return;
    }
    if ($path eq '/sse/busy') {
        for my $i (1 .. $q->{n}) {
            await Future::IO->sleep(0.2);
            await $send->({ type => 'sse.send', data => "tick $i" });
        }
        await $send->({ type => 'sse.close' });
        return;
    }
    if ($path eq '/sse/keepalive') {
        await $send->({ type => 'sse.keepalive', interval => 0.2, comment => "ka-$name" });
        await Future::IO->sleep($q->{secs});
        await $send->({ type => 'sse.send', data => "end $name" });
        await $send->({ type => 'sse.close' });
        return;
    }
}

my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return await websocket($scope, $receive, $send) if $scope->{type} eq 'websocket';
    return await sse($scope, $receive, $send) if $scope->{type} eq 'sse';
    return if $scope->{type} ne 'http';
    my $q = query($scope);
    await Future::IO->sleep($q->{ms} / 1000) if $q->{ms};
    my $body = "ok:$scope->{path}";
    await $send->({ type => 'http.response.start', status => 200,
        headers => [@$plain, ['content-length', length $body]] });
    await $send->({ type => 'http.response.body', body => $body, more => 0 });
};
$app;
APP
$app_code =~ s{__LIB__}{$FindBin::Bin/lib}g;
my $app = write_app( $app_code, 'h2ws.pl' );

my $access_log = "$dir/access.log";
my $s = start_server( '--http2', '--access-log', $access_log, '--access-log-format', 'combined', $app );


sub h2 {
    my ( $script, %o ) = @_;
    return h2_run( "import os, time\n" . $script, port => $s->port, args => { dir => $dir }, %o );
}

sub records {
    my ( $name, $n, $timeout ) = @_;
    return map { $J->decode($_) } wait_file_lines( "$dir/$name", $n // 1, $timeout );
}


# ---------------------------------------------------------------------------
subtest 'websocket.accept with a Content-Length: not on the 200' => sub {
    my $r = h2( <<'PY' );
c = connect()
ws = c.websocket('/accept-with-length')
out = {'status': ws.status, 'headers': ws.headers, 'message': ws.recv_data()}
ws.close(1000)
out['error'] = c.protocol_error
out['after'] = c.wait_stream(c.request('GET', '/ok'))
emit(out)
PY
    return fail 'the script ran' unless $r;
    is $r->{status}, 200, 'accepted: 200';
    my %h = map { @$_ } @{ $r->{headers} };
    ok !exists $h{'content-length'}, "... without the app's content-length";
    is $h{'x-app'}, 'kept', "... with its other headers";
    is $r->{message}{data}, 'more than three bytes', 'a message longer than that length arrives';
    is $r->{error}, undef, 'the client found the frames well formed';
    is $r->{after}{status}, 200, 'and the connection serves the next stream';
};

subtest 'RFC 8441: handshake, echo, keepalive, close' => sub {
    my $r = h2( <<'PY' );
d = ARGS['dir']
c = connect()
out = {'settings': c.remote_settings}
ws = c.websocket('/echo?name=echo&x=1', headers=[('sec-websocket-protocol', 'chat, json'), ('x-custom', 'yes')])
out['status'], out['headers'], out['accepted'] = ws.status, ws.headers, ws.accepted
ws.send_text('héllo ✓')
out['text'] = ws.recv_data()
ws.send_binary(bytes(range(256)))
out['binary'] = ws.recv_data()
ws.send_text('keepalive 0.2')
out['keepalive_set'] = ws.recv_data()
t0 = time.monotonic()
ping = ws.recv(2)
out['ping'], out['ping_after'] = ping, time.monotonic() - t0
out['close'] = ws.close(1000, 'bye')
c.wait(lambda: ws.stream.ended)
out['ended'] = ws.stream.ended
c.end_stream(ws.id)                 # our side of the stream ends too
wait_file_lines(d + '/echo.end', 1, c)
out['errors'] = ws.protocol_errors
out['reset'] = ws.stream.reset
out['after'] = c.wait_stream(c.request('GET', '/ok'))
emit(out)
PY
    return fail 'the script ran' unless $r;
    is $r->{settings}{ENABLE_CONNECT_PROTOCOL}, 1, 'SETTINGS_ENABLE_CONNECT_PROTOCOL = 1';
    is $r->{status}, 200, 'extended CONNECT :protocol websocket: 200';
    ok $r->{accepted}, '... accepted, the stream open';
    my @names = map { $_->[0] } @{ $r->{headers} };
    ok !( grep { /^(?:upgrade|connection|sec-websocket-accept)$/ } @names ),
      '... with no Upgrade, Connection or Sec-WebSocket-Accept' or diag "@names";

    my ($sc) = records('echo.scope');
    ok $sc, 'the app recorded its scope' or return;
    is $sc->{type},         'websocket',   'a websocket scope';
    is $sc->{connect},      'websocket.connect', '... which first receives websocket.connect';
    is $sc->{http_version}, '2',           '... http_version "2"';
    is $sc->{scheme},       'ws',          '... scheme ws';
    is $sc->{path},         '/echo',       '... path';
    is $sc->{query_string}, 'name=echo&x=1', '... query_string';
    is_deeply $sc->{subprotocols}, [ 'chat', 'json' ], '... subprotocols';
    is $sc->{headers}[0][0], 'host', '... host (from :authority) first';
    ok( ( grep { $_->[0] eq 'x-custom' && $_->[1] eq 'yes' } @{ $sc->{headers} } ), '... the request headers' );

    is_deeply $r->{text},   { type => 'text',   data => 'echo: héllo ✓' }, 'text echoed';
    is_deeply $r->{binary}, { type => 'binary', data => join( '', map { chr } reverse 0 .. 255 ) }, 'binary echoed';
    is $r->{keepalive_set}{data}, 'keepalive set', 'websocket.keepalive accepted';
    is $r->{ping}{type}, 'ping', '... a ping arrives';
    cmp_ok $r->{ping_after}, '<', 1, "... within the 0.2 s interval (after $r->{ping_after} s)";
    is $r->{close}{code}, 1000, 'client Close 1000: the server answers Close 1000';
    ok $r->{ended}, '... then END_STREAM';
    is $r->{reset}, undef, '... and no RST_STREAM';
    my ($end) = records('echo.end');
    is $end->{event}, 'websocket.disconnect', 'the app hears websocket.disconnect';
    is $end->{code},  1000, '... code 1000';
    is $end->{close_code}, 1000, '... close_code 1000';
    is_deeply $r->{errors}, [], 'no framing errors from the server';
    is $r->{after}{body}, 'ok:/ok', 'the connection serves the next stream';
};

# ---------------------------------------------------------------------------
subtest 'RFC 8441: refusals are ordinary responses on their stream' => sub {
    my $legacy = start_server( '--http2', '--spec-version', '0.3', $app );
    my $r = h2( <<'PY', args => { legacy => 0 + $legacy->port } );
c = connect()
refused = c.websocket('/refuse')
c.wait_stream(refused.id)
version = c.send_headers([(':method', 'CONNECT'), (':protocol', 'websocket'), (':scheme', 'http'),
                          (':path', '/echo?name=v8'), (':authority', c.authority),
                          ('sec-websocket-version', '8')])
v = c.wait_stream(version)
after = c.wait_stream(c.request('GET', '/ok'))
old = connect(port=ARGS['legacy'])
first = old.websocket('/close-first')
old.wait_stream(first.id)
emit({'refused': refused.stream, 'version': v, 'after': after, 'goaway': c.goaway,
      'close_first': first.stream, 'legacy_after': old.wait_stream(old.request('GET', '/ok'))})
PY
    $legacy->stop;
    return fail 'the script ran' unless $r;
    my $x = $r->{refused};
    is $x->{status}, 403, "Www 0.6, http.response.start before accept: the app's 403";
    is h2_header( $x, 'x-refused' ), 'yes', "... with the app's headers";
    is $x->{body}, 'denied', '... and body';
    ok $x->{ended}, '... a complete response (END_STREAM)';
    # RFC 9113 8.1: the client's half (the CONNECT's) is still open, and
    # the server may end it without error after a complete response.
    ok !defined $x->{reset} || $x->{reset_name} eq 'NO_ERROR', '... no error (at most RST_STREAM NO_ERROR)';

    my $v = $r->{version};
    is $v->{status}, 426, 'sec-websocket-version 8: 426';
    is h2_header( $v, 'sec-websocket-version' ), '13', '... with sec-websocket-version: 13';
    ok !defined h2_header( $v, 'upgrade' ) && !defined h2_header( $v, 'connection' ), '... and no Upgrade or Connection';
    ok $v->{ended}, '... a complete response';
    ok !defined $v->{reset} || $v->{reset_name} eq 'NO_ERROR', '... no error';
    ok !-e "$dir/v8.scope", '... the app is not called';

    is $r->{after}{body}, 'ok:/ok', 'the connection is still usable after both';
    is $r->{goaway}, undef, '... no GOAWAY';

    is $r->{close_first}{status}, 403, 'Www 0.3, websocket.close before accept: 403';
    ok $r->{close_first}{ended}, '... a complete response';
    is $r->{legacy_after}{body}, 'ok:/ok', '... and that connection is still usable';
};

# ---------------------------------------------------------------------------
subtest 'RFC 8441: pagi.transport and backpressure on a shut window' => sub {
    my $r = h2( <<'PY' );
d = ARGS['dir']
n = 8
c = connect(window=1000, auto_ack=False)
ws = c.websocket('/flood?name=flood&n=%d' % n)
high = wait_file_lines(d + '/flood.transport', 2, c)
neighbour = c.wait_stream(c.request('GET', '/ok'))
c.read(0.3)                             # the app would go on now, if it could
stalled = {'sent': len(file_lines(d + '/flood.sent')), 'bytes': len(ws.stream.data), 'transport': file_lines(d + '/flood.transport')}
c.open_window(4 * 1024 * 1024, ws.id)
c.open_window(4 * 1024 * 1024)
msgs = [ws.recv_data() for _ in range(n + 1)]
drained = wait_file_lines(d + '/flood.transport', 3, c)
ws.close(1000)
c.end_stream(ws.id)
emit({'stalled': stalled, 'neighbour': neighbour, 'drained': drained,
      'sizes': [len(m['data']) if m else None for m in msgs],
      'intact': all(m and m['data'] == bytes([65 + i]) * 65536 for i, m in enumerate(msgs[:n])),
      'last': msgs[n]})
PY
    return fail 'the script ran' unless $r;
    my $st = $r->{stalled};
    my @t = map { $J->decode($_) } @{ $st->{transport} };
    is $t[0]{high}, 65536, 'pagi.transport high_water_mark over h2';
    is $t[1]{event}, 'high', 'on_high_water fires while the client keeps its window shut';
    cmp_ok $t[1]{buffered}, '>=', 65536, "... buffered_amount is at the mark ($t[1]{buffered})";
    is scalar(@t), 2, '... and it stays there (no drain)';
    cmp_ok $st->{sent}, '<=', 2, "websocket.send waits: $st->{sent} of 8 64 KiB sends completed";
    cmp_ok $st->{bytes}, '<=', 1000, "... $st->{bytes} bytes reached the client";
    is $r->{neighbour}{body}, 'ok:/ok', 'a neighbour stream on the connection is served meanwhile';
    my $d = $J->decode( $r->{drained}[2] // 'null' );
    is $d && $d->{event}, 'drain', 'the window opens: on_drain fires';
    is_deeply $r->{sizes}, [ (65536) x 8, 10 ], 'every message arrives';
    ok $r->{intact}, '... whole and in order';
    is $r->{last}{data}, 'flood done', '... then the last';
    is scalar( file_lines("$dir/flood.sent") ), 8, 'every send completed';
};

# ---------------------------------------------------------------------------
subtest 'RFC 8441: a WebSocket and http streams share a connection; access log' => sub {
    my $r = h2( <<'PY' );
c = connect()
ws = c.websocket('/echo?name=share')
slow = c.request('GET', '/slow?ms=300')
ws.send_text('one')
one = ws.recv_data()
quick = c.wait_stream(c.request('GET', '/quick'))
ws.send_text('two')
two = ws.recv_data()
s = c.wait_stream(slow)
ws.send_text('three')
three = ws.recv_data()
close = ws.close(1000)
c.end_stream(ws.id)
emit({'one': one, 'two': two, 'three': three, 'quick': quick, 'slow': s, 'close': close})
PY
    return fail 'the script ran' unless $r;
    is $r->{one}{data},   'echo: one',   'the WebSocket echoes';
    is $r->{quick}{body}, 'ok:/quick',   'an http stream opened beside it is served';
    is $r->{two}{data},   'echo: two',   '... the WebSocket still echoes';
    is $r->{slow}{body},  'ok:/slow',    'a slower http stream completes';
    is $r->{three}{data}, 'echo: three', '... and the WebSocket carries on';
    is $r->{close}{code}, 1000, '... until its Close';
    ok wait_file_line( $access_log, qr{"GET /quick HTTP/2" 200 } ), 'access log: the http stream as HTTP/2';
    ok wait_file_line( $access_log, qr{"CONNECT /echo\?name=share HTTP/2" 200 } ),
      'access log: the accepted WebSocket over h2, with status 200'
      or diag slurp($access_log);
};

# ---------------------------------------------------------------------------
subtest 'per-stream idle timeouts: only the idle stream is reset' => sub {
    my $t = start_server( '--http2', '--sse-idle-timeout', 1, '--ws-idle-timeout', 1, $app );
    my ( $r, $err ) = h2( <<'PY', port => 0 + $t->port );
d = ARGS['dir']
sse = [('accept', 'text/event-stream')]
c = connect()
idle = c.stream(c.request('GET', '/sse/idle?name=sse-idle', headers=sse))
busy = c.stream(c.request('GET', '/sse/busy?name=sse-busy&n=13', headers=sse))
ka_a = c.stream(c.request('GET', '/sse/keepalive?name=A&secs=1.3', headers=sse))
ka_b = c.stream(c.request('GET', '/sse/keepalive?name=B&secs=1.3', headers=sse))
c.wait_headers(idle.id)
t0 = time.monotonic()
c.wait(lambda: idle.done, 4)
out = {'idle': idle, 'idle_after': time.monotonic() - t0,
       'busy_at_idle_end': {'done': busy.done, 'data': bytes(busy.data)}}
c.wait_stream(busy.id, 5)
out['busy'], out['busy_after'] = busy, time.monotonic() - t0
out['ka'] = [c.wait_stream(ka_a.id), c.wait_stream(ka_b.id)]
emit(out)                               # what there is, should the rest fail
out['sse_after'] = c.wait_stream(c.request('GET', '/ok?after-sse'))
emit(out)

ws = c.websocket('/idle?name=ws-idle')
t0 = time.monotonic()
http = c.request('GET', '/slow?ms=1600')
c.wait(lambda: ws.stream.done, 4)
out['ws'], out['ws_after'] = ws.to_json(), time.monotonic() - t0
out['http_at_ws_end'] = c.stream(http).done
out['http'] = c.wait_stream(http)
out['ws_after_http'] = c.wait_stream(c.request('GET', '/ok?after-ws'))
out['goaway'] = c.goaway
emit(out)
PY
    $t->stop;
    ok !defined $err, 'the script ran to its end';
    return unless $r;

    my $idle = $r->{idle};
    is $idle->{status}, 200, 'an SSE stream that sends nothing after sse.start';
    is $idle->{reset_by}, 'server', '... is reset by the server';
    ok !$idle->{ended}, '... (no END_STREAM)';
    cmp_ok $r->{idle_after}, '>=', 0.9, "... after --sse-idle-timeout 1 ($r->{idle_after} s)";
    cmp_ok $r->{idle_after}, '<', 2.5, '... not much later';
    my ($ie) = records('sse-idle.end');
    is $ie->{event},  'sse.disconnect', '... its app hears sse.disconnect';
    is $ie->{reason}, 'idle_timeout',   '... idle_timeout' or diag explain $ie;
    ok !$r->{busy_at_idle_end}{done}, 'a busy SSE stream on the same connection is still open then';
    my $busy = $r->{busy};
    ok $busy->{ended} && !defined $busy->{reset}, '... and ends cleanly (sse.close) later';
    cmp_ok $r->{busy_after}, '>', 1.8, "... well past the idle stream's end ($r->{busy_after} s)";
    is_deeply [ $busy->{body} =~ /^data: (tick \d+)$/mg ], [ map { "tick $_" } 1 .. 13 ], '... with all 13 events';

    for my $i ( 0, 1 ) {
        my ( $me, $other ) = $i ? qw(B A) : qw(A B);
        my $ka = $r->{ka}[$i];
        my $n = () = $ka->{body} =~ /^:ka-$me$/mg;
        cmp_ok $n, '>=', 3, "SSE stream $me: its own sse.keepalive comments arrive ($n)";
        unlike $ka->{body}, qr/ka-$other/, "... and none of stream $other\'s";
        ok $ka->{ended} && !defined $ka->{reset}, '... keepalives keep it past the idle timeout; it ends cleanly';
        like $ka->{body}, qr/^data: end $me$/m, '... with its last event';
    }
    is $r->{sse_after}{body}, 'ok:/ok', 'the connection serves a new stream after all that';

    my $ws = $r->{ws} or return fail 'the WebSocket part ran';
    is $ws->{status}, 200, 'a WebSocket over h2 that stays silent';
    is $ws->{stream}{reset_by}, 'server', '... is reset by the server' or diag explain $ws;
    cmp_ok $r->{ws_after}, '>=', 0.9, "... after --ws-idle-timeout 1 ($r->{ws_after} s)";
    cmp_ok $r->{ws_after}, '<', 2.5, '... not much later';
    my ($we) = records('ws-idle.end');
    is $we->{event},  'websocket.disconnect', '... its app hears websocket.disconnect';
    is $we->{reason}, 'idle_timeout', '... idle_timeout' or diag explain $we;
    is $we->{code},   1006, '... code 1006';
    ok !$r->{http_at_ws_end}, 'an http stream beside it is still in flight then';
    is $r->{http}{body}, 'ok:/slow', '... and completes';
    is $r->{ws_after_http}{body}, 'ok:/ok', 'the connection serves a new stream';
    is $r->{goaway}, undef, 'no GOAWAY';
};

unlike $s->output, qr/\b(?:ERROR|panicked)\b/, 'the server logged no errors' or diag $s->output;
is $s->stop( 'TERM', 10 ), 0, 'the server exits 0';

done_testing;
