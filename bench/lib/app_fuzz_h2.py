#!/usr/bin/python3
"""The HTTP/2 client of `bench/bin/app-fuzz --http2`.

app-fuzz starts it once, with the server's port and the file where the
fuzz app marks its calls, and writes one case per line on its stdin (JSON:
the program's kind, method, request body, WebSocket offer, the header names
the app may put on the wire, and the timing bounds).  For each case this
opens a fresh h2c connection (with `tls` after the two, h2 over TLS by
ALPN), sends the case's request as stream 1 and a
probe request as stream 3, reads until the case is over, closes the
connection without a GOAWAY (the client has gone) and prints one line of
JSON: {"violations": [...], "what": "..."}.  app-fuzz then waits, as for
HTTP/1.1, for the app's call and its Futures to settle.

What a strict HTTP/2 client checks here, beyond what h2 itself refuses
(frames out of order, pseudo-header misuse, upper-case or
connection-specific header fields, DATA beyond a declared content-length):
  - header names are the app's or the server's, values carry no control
    bytes, and no header the app's text injected;
  - no body on HEAD, 204 or 304; SSE lines carry no injected field;
  - the WebSocket accepted by a 200 (RFC 8441) carries well-formed frames;
  - one stream's app never takes the connection down: no GOAWAY with an
    error, no protocol error, no close, and the probe on the same
    connection is answered (200, "probe\\n") whatever the app does;
  - once the app has returned, its stream is over (END_STREAM or
    RST_STREAM, the latter HTTP/2's way to show a truncated response);
  - while the client reads and opens its windows, a send the app awaits
    does not stay pending with no byte coming (a deadlock).

`app_fuzz_h2.py --self-check` checks these checks' verdicts on known
input.  Needs Debian's python3-h2; uses t/lib/h2client.py's connection.
"""

import json
import os
import re
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 't', 'lib'))
import h2.exceptions  # noqa: E402
from h2client import connect, error_name, ws_frame, OP_CLOSE, OP_TEXT  # noqa: E402

TOKEN = re.compile(r'\A[!#$%&\'*+.^_`|~0-9a-z-]+\Z')
CONTROL = re.compile(r'[\x00-\x08\x0a-\x1f\x7f]')
# Header names the server adds of its own accord over HTTP/2.
SERVER_NAMES = {'date', 'content-length', 'content-type', 'trailer', 'cache-control',
                'x-accel-buffering', 'retry-after', 'sec-websocket-protocol'}
SSE_FIELD = re.compile(r'\A(?::|data: ?|event: |id: |retry: \d+\Z)')
SSE_INJECTED = re.compile(r'\A(?:event|id): injected\Z|\Aretry: 7777\Z')
CLOSE_CODE_OK = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))
APP_STREAM, PROBE_STREAM = 1, 3


def shown(s):
    s = s if len(s) <= 80 else s[:80] + '...'
    return "'" + ''.join(c if ' ' <= c <= '~' else '\\x%02x' % ord(c) for c in s) + "'"


class Marks:
    """The fuzz app's marks, read as they are written: S when a case's call
    began, E when it and its Futures are done, P and R when it starts and
    stops waiting on a send it awaits."""

    def __init__(self, path):
        self.path = path
        self.seen = 0
        self.started, self.ended, self.send_waits = {}, {}, {}

    def read(self):
        try:
            with open(self.path, 'rb') as f:
                f.seek(self.seen)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b'\n') + 1
        self.seen += end
        now = time.monotonic()
        for line in data[:end].decode('latin-1').splitlines():
            what, _, case = line.partition(' ')
            if what == 'S':
                self.started.setdefault(case, now)
            elif what == 'E':
                self.ended.setdefault(case, now)
            elif what in ('P', 'R'):
                self.send_waits[case] = what == 'P'


def header_violation(headers, names, injected):
    for name, value in headers:
        if name.startswith(':'):
            continue
        if not TOKEN.match(name):
            return 'header name ' + shown(name)
        if CONTROL.search(value):
            return 'control character in the value of %s: %s' % (name, shown(value))
        if name == injected:
            return "a header the app's value or name injected: " + name
        if name not in SERVER_NAMES and name not in names:
            return "header %s is neither the app's nor the server's" % name
    return None


def sse_violation(text):
    lines = re.split(r'\r\n|\n|\r', text)
    lines.pop()  # the last one may be unfinished
    for line in lines:
        if SSE_INJECTED.match(line):
            return "an SSE field the app's text injected: " + shown(line)
        if line != '' and not SSE_FIELD.match(line):
            return 'an SSE line that is no field: ' + shown(line)
    return None


def strict_utf8(b):
    try:
        b.decode('utf-8', 'strict')
        return True
    except UnicodeDecodeError:
        return False


def frames_violation(buf):
    """WebSocket frames from the server (the DATA of an accepted stream):
    (violation or None, a close frame was read)."""
    pos, closed, fragment, frag_op = 0, False, None, 0
    while len(buf) - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        fin, rsv, op, masked, n = b0 & 0x80, b0 & 0x70, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        hlen = 2
        if n == 126:
            if len(buf) - pos < 4:
                break
            n, hlen = struct.unpack('!H', buf[pos + 2:pos + 4])[0], 4
            if n < 126:
                return 'length %d in the 16-bit form' % n, closed
        elif n == 127:
            if len(buf) - pos < 10:
                break
            n, hlen = struct.unpack('!Q', buf[pos + 2:pos + 10])[0], 10
            if n < 65536 or n >= 2 ** 32:
                return 'length %d in the 64-bit form' % n, closed
        if closed:
            return 'a frame after the close frame', closed
        if rsv:
            return 'RSV bits 0x%x' % rsv, closed
        if masked:
            return 'a masked frame from the server', closed
        if not (op <= 2 or 8 <= op <= 10):
            return 'opcode %d' % op, closed
        if op >= 8 and (not fin or n > 125):
            return 'a control frame (opcode %d) fragmented or over 125 bytes' % op, closed
        if len(buf) - pos < hlen + n:
            break
        payload = bytes(buf[pos + hlen:pos + hlen + n])
        pos += hlen + n
        if op == 8:
            if n == 1:
                return 'a close frame with a one-byte payload', closed
            if n >= 2:
                code = struct.unpack('!H', payload[:2])[0]
                if code not in CLOSE_CODE_OK:
                    return 'close code %d' % code, closed
                if not strict_utf8(payload[2:]):
                    return 'a close reason that is not UTF-8', closed
            closed = True
            continue
        if op >= 9:
            continue
        if op == 0:
            if fragment is None:
                return 'a continuation with no message begun', closed
            fragment += payload
        else:
            if fragment is not None:
                return 'a new message inside a fragmented one', closed
            fragment, frag_op = payload, op
        if fin:
            if frag_op == 1 and not strict_utf8(fragment):
                return 'a text message that is not UTF-8', closed
            fragment = None
    return None, closed


def request_headers(case):
    kind, path = case['kind'], case['path']
    if kind == 'websocket':
        headers = [(':method', 'CONNECT'), (':protocol', 'websocket'), (':scheme', 'http'),
                   (':path', path), (':authority', 'fuzz'), ('sec-websocket-version', '13')]
        if case.get('offer'):
            headers.append(('sec-websocket-protocol', case['offer']))
        return headers
    headers = [(':method', case['method']), (':scheme', 'http'), (':path', path), (':authority', 'fuzz')]
    if kind == 'sse':
        headers.append(('accept', 'text/event-stream'))
    if case.get('body') is not None:
        headers.append(('content-length', str(len(case['body']))))
    return headers


class Case:
    def __init__(self, case, port, marks, tls):
        self.c = case
        self.id = str(case['case'])
        self.marks = marks
        self.names = set(case['names'])
        self.client = connect('127.0.0.1', port, timeout=5, tls=tls)
        self.body = case['body'].encode('latin-1') if case.get('body') is not None else None
        self.ws_sent = False
        self.close_answered = None

    def send_some_body(self):
        """As much of the request body as the windows allow (the app may
        never read it: the server need not open its window)."""
        conn = self.client.conn
        while self.body:
            if self.app_stream().done:
                # The server answered and closed or reset the stream before
                # reading the whole body, as it may.
                self.body = None
                return
            try:
                n = min(conn.local_flow_control_window(APP_STREAM), conn.max_outbound_frame_size, len(self.body))
                if n <= 0:
                    return
                chunk, self.body = self.body[:n], self.body[n:]
                conn.send_data(APP_STREAM, chunk, end_stream=not self.body)
            except h2.exceptions.StreamClosedError:
                self.body = None
                return
            self.client._flush()

    def ws_send(self, frame, end_stream=False):
        """A WebSocket frame as DATA; nothing if the server has meanwhile
        closed or reset the stream."""
        try:
            self.client.send_data(APP_STREAM, frame, end_stream=end_stream, timeout=1)
        except (h2.exceptions.StreamClosedError, TimeoutError):
            pass

    def app_stream(self):
        return self.client.stream(APP_STREAM)

    def run(self):
        c, client, marks = self.c, self.client, self.marks
        quiet, grace, limit, stuck_after = c['quiet'], c['grace'], c['case_limit'], c['send_stuck']
        ws = c['kind'] == 'websocket'
        if ws:
            client.wait(lambda: client.remote_settings_received, 5)
            if client.remote_settings.get('ENABLE_CONNECT_PROTOCOL') != 1:
                return ['the server did not send SETTINGS_ENABLE_CONNECT_PROTOCOL=1'], 'no websocket'
        has_body = self.body is not None
        client.send_headers(request_headers(c), end_stream=not has_body and not ws)
        self.send_some_body()
        client.send_headers([(':method', 'GET'), (':scheme', 'http'), (':path', '/probe'),
                             (':authority', 'fuzz')], end_stream=True)
        app, probe = self.app_stream(), client.stream(PROBE_STREAM)
        start = last_byte = time.monotonic()
        received = 0
        stuck = None
        violation = None
        while True:
            now = time.monotonic()
            if now - start > limit:
                break
            try:
                alive = client._read_once(0.05)
                self.send_some_body()
            except (OSError, TimeoutError, h2.exceptions.H2Error) as e:
                violation = 'the connection failed: %s' % e
                break
            got = len(app.data) + len(probe.data) + len(client.events)
            if got != received:
                received, last_byte = got, time.monotonic()
            if not alive:
                break
            if ws and app.status == 200 and not app.done:
                if not self.ws_sent:
                    self.ws_send(ws_frame(OP_TEXT, 'hello from app-fuzz'))
                    self.ws_sent = True
                why, closed = frames_violation(bytes(app.data))
                if why:
                    violation = 'WebSocket frames: ' + why
                    break
                if closed and not self.close_answered:
                    self.ws_send(ws_frame(OP_CLOSE, struct.pack('!H', 1000)), end_stream=True)
                    self.close_answered = time.monotonic()
            marks.read()
            app_done = marks.ended.get(self.id)
            if app.done and probe.done and (app_done or not marks.started.get(self.id)):
                break
            if self.close_answered and time.monotonic() - self.close_answered <= grace + 0.2:
                continue
            if not app_done and marks.started.get(self.id) and time.monotonic() - last_byte > quiet and probe.done:
                # The app waits.  On a receive or a sleep the case is over;
                # on a send, with this client reading everything and opening
                # its windows, only the app's own next step could release it.
                if not marks.send_waits.get(self.id):
                    break
                if time.monotonic() - last_byte > stuck_after:
                    stuck = ('a send the app awaited was still pending %s s after the last byte, '
                             'the client reading' % stuck_after)
                    break
            if app_done and time.monotonic() - app_done > grace and time.monotonic() - last_byte > grace / 2:
                break
        marks.read()
        return self.verdict(violation, stuck, ws)

    def verdict(self, violation, stuck, ws):
        client, c = self.client, self.c
        app, probe = self.app_stream(), client.stream(PROBE_STREAM)
        v = [x for x in (stuck, violation) if x]
        if client.protocol_error:
            v.append('h2 refused the server\'s frames: %s (%s)' % (client.protocol_error, ', '.join(client.events[-6:])))
        for g in client.goaways:
            if g['error_code'] != 0:
                v.append('a GOAWAY %s: %s' % (g['error_name'], shown(g['additional_data'])))
        if client.closed and not client.protocol_error:
            v.append('the server closed the connection: %s' % (client.close_error or 'EOF'))
        if not probe.done:
            v.append('the probe on the same connection was not answered (%s)' % client.why_not())
        elif probe.status != 200 or bytes(probe.data) != b'probe\n':
            v.append('the probe on the same connection got %s %s%s' % (
                probe.status, shown(bytes(probe.data).decode('latin-1')),
                ' reset ' + str(probe.reset) if probe.reset is not None else ''))
        what = str(app.status) if app.status is not None else 'no response'
        if app.status is not None:
            why = header_violation(app.headers, self.names, c['injected'])
            if why:
                v.append(why)
            lengths = [val for n, val in app.headers if n == 'content-length']
            if len(lengths) > 1 or (lengths and not re.match(r'\A[0-9]{1,15}\Z', lengths[0])):
                v.append('content-length ' + ', '.join(lengths))
            body = bytes(app.data).decode('latin-1')
            if (c['method'] == 'HEAD' or app.status in (204, 304)) and body:
                v.append('a body of %d bytes on a %s %d' % (len(body), c['method'], app.status))
            if app.trailers:
                why = header_violation(app.trailers, self.names, c['injected'])
                if why:
                    v.append('trailers: ' + why)
            ctype = dict(app.headers).get('content-type', '')
            if ws and app.status == 200:
                what = 'accepted'
            elif ctype.startswith('text/event-stream'):
                why = sse_violation(body)
                if why:
                    v.append(why)
        ended = self.marks.ended.get(self.id)
        if not app.done and ended and time.monotonic() - ended > c['grace']:
            v.append('the app returned, but its stream is still open (no END_STREAM, no RST_STREAM)')
        if app.reset is not None and app.status is None:
            what = 'reset-' + (error_name(app.reset) or str(app.reset))
        elif app.reset is not None:
            what += ' (reset %s)' % (error_name(app.reset) or app.reset)
        elif not app.ended:
            what += ' (unfinished)'
        what += ', probe answered' if probe.done and probe.status == 200 else ''
        return ['case %s: %s' % (self.id, x) for x in v], what

    def close(self):
        self.client.close()


def self_check():
    """The checks' verdicts on known input: each must be able to fail."""
    names, fails = {'x-fuzz'}, 0
    cases = [
        ('an app header and a server header', None, header_violation([('x-fuzz', 'a'), ('date', 'd')], names, 'x-injected')),
        ('an injected header', 'injected', header_violation([('x-injected', '1')], names, 'x-injected')),
        ('a header nobody set', 'neither', header_violation([('x-other', '1')], names, 'x-injected')),
        ('a control byte in a value', 'control', header_violation([('x-fuzz', 'a\x0bb')], names, 'x-injected')),
        ('a sound SSE stream', None, sse_violation('event: tick\ndata: a\ndata: b\nid: 1\n\n: c\n')),
        ('an SSE injection', 'injected', sse_violation('data: a\nevent: injected\n\n')),
        ('a text frame and a close', None, frames_violation(b'\x81\x02hi\x88\x02\x03\xe8')[0]),
        ('close code 1005', 'close code 1005', frames_violation(b'\x88\x02\x03\xed')[0]),
        ('a masked frame', 'masked', frames_violation(b'\x81\x82abcdhi')[0]),
        ('text that is not UTF-8', 'not UTF-8', frames_violation(b'\x81\x01\xff')[0]),
        ('a frame after the close', 'after the close', frames_violation(b'\x88\x00\x81\x00')[0]),
    ]
    for name, want, got in cases:
        ok = got is None if want is None else got is not None and want in got
        fails += not ok
        print('%s - %s: %s' % ('ok' if ok else 'NOT OK', name, got or 'none'))
    print('app_fuzz_h2: self-check %s' % ('FAILED' if fails else 'passed'))
    return 1 if fails else 0


def main():
    if sys.argv[1:] == ['--self-check']:
        sys.exit(self_check())
    port, calls, tls = int(sys.argv[1]), sys.argv[2], sys.argv[3:] == ['tls']
    marks = Marks(calls)
    for line in sys.stdin:
        case = json.loads(line)
        try:
            run = Case(case, port, marks, tls)
        except (OSError, TimeoutError) as e:
            out = {'violations': ['case %s: connect: %s' % (case['case'], e)], 'what': 'no connection'}
        else:
            try:
                violations, what = run.run()
            finally:
                run.close()
            out = {'violations': violations, 'what': what}
        sys.stdout.write(json.dumps(out) + '\n')
        sys.stdout.flush()


if __name__ == '__main__':
    main()
