"""h2client: a small HTTP/2 test client over raw sockets, for frame-level
tests of pagi-rs (t/*.t drive it through t/lib/PagiRS/H2.pm).

Built on the `h2` library (Debian python3-h2, 4.x) and nothing else outside
the standard library.  One H2Client is one connection; nothing runs in the
background: frames are read only while a method waits (wait, wait_stream,
wait_goaway, read, ...), each wait with a deadline, so a test never hangs on
a server that stays silent.

    c = connect()                           # h2c, prior knowledge, HOST:PORT
    sid = c.request('GET', '/')
    s = c.wait_stream(sid)                  # Stream: status, headers, data ...
    emit({'status': s.status, 'body': s.data})

Run as `python3 h2client.py SCRIPT`, it executes SCRIPT with everything in
__all__ (and HOST, PORT, ARGS from the environment) already imported, and
prints one JSON envelope on stdout: {"ok": true, "result": <what the script
passed to emit()>} or {"ok": false, "error": "<traceback>", "result": ...}.
The script's own prints go to stderr.  Bytes in results are encoded as
strings of code points 0-255 (latin-1), so that Perl reads them back as the
same byte strings.

Notes on h2 4.1 (Debian 12):
- RFC 8441: h2 accepts a `:protocol` pseudo-header on a CONNECT request as
  it is (no configuration needed); it does not itself check the server's
  SETTINGS_ENABLE_CONNECT_PROTOCOL, so websocket() does.
- validate=False in connect() turns off h2's outbound header validation and
  normalisation, to send malformed requests on purpose; frames h2 would
  refuse to send at all can be written with send_frame() (hyperframe) or
  send_raw().
- A received GOAWAY does not end the client (see _Connection).
"""

import json
import os
import select
import signal
import socket
import ssl
import struct
import sys
import time
import traceback

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

__all__ = [
    'HOST', 'PORT', 'ARGS',
    'connect', 'H2Client', 'Stream', 'WebSocket',
    'ErrorCodes', 'SettingCodes',
    'OP_CONT', 'OP_TEXT', 'OP_BINARY', 'OP_CLOSE', 'OP_PING', 'OP_PONG',
    'ws_frame', 'ws_parse',
    'emit', 'jsonable', 'error_name',
    'file_lines', 'wait_file_lines',
]

HOST = os.environ.get('H2_HOST', '127.0.0.1')
PORT = int(os.environ.get('H2_PORT') or 0)
ARGS = json.loads(os.environ.get('H2_ARGS') or '{}')

DEFAULT_TIMEOUT = 5.0
READ_SIZE = 65536


def _latin1(b):
    return b.decode('latin-1') if isinstance(b, (bytes, bytearray)) else b


def file_lines(path):
    """The lines of a file an app writes to (none if it does not exist yet)."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_file_lines(path, n, client=None, timeout=5):
    """Wait until the file has n lines (or timeout); its lines.  Reads
    frames on client meanwhile, so the connection keeps moving."""
    deadline = time.monotonic() + timeout
    while True:
        got = file_lines(path)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        if client is not None:
            client.read(0.01)
        else:
            time.sleep(0.01)


def error_name(code):
    """The RFC 9113 name of an HTTP/2 error code (e.g. 8 -> 'CANCEL')."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return 'UNKNOWN_%d' % code


def _setting_name(code):
    try:
        return SettingCodes(code).name
    except ValueError:
        return str(int(code))


def _setting_code(name):
    if isinstance(name, int):
        return name
    return SettingCodes[name.upper()]


# ---------------------------------------------------------------------------
# The h2 connection, with GOAWAY made survivable
# ---------------------------------------------------------------------------

class _Connection(h2.connection.H2Connection):
    # h2 4.x closes its state machine on a received GOAWAY, after which every
    # frame raises ProtocolError, and drops frames it had queued.  RFC 9113
    # 6.8 lets streams up to the GOAWAY's last stream id finish, and a
    # graceful shutdown (GOAWAY, PING, GOAWAY, then the open streams' frames)
    # is what the tests look at, so keep the previous state and the queue.
    def _receive_goaway_frame(self, frame):
        state = self.state_machine.state
        pending = bytes(self._data_to_send)
        frames, events = super()._receive_goaway_frame(frame)
        if state != ConnectionState.CLOSED:
            self.state_machine.state = state
        self._data_to_send = bytearray(pending) + self._data_to_send
        return frames, events


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------

class Stream:
    """What the client saw of one stream.

    status       int status of the final response, or None
    headers      [(name, value)] of the final response (str, latin-1), in order
    informational  [[(name, value)]] of 1xx responses
    data         bytearray: all DATA received
    data_frames  number of DATA frames with a payload
    trailers     [(name, value)] of a trailing HEADERS
    ended        the server's END_STREAM arrived
    reset        error code of a RST_STREAM (either side), or None
    reset_by     'server' or 'client'
    unacked      flow-controlled bytes received and not yet acknowledged
    """

    def __init__(self, sid):
        self.id = sid
        self.status = None
        self.headers = []
        self.informational = []
        self.data = bytearray()
        self.data_frames = 0
        self.trailers = []
        self.ended = False
        self.reset = None
        self.reset_by = None
        self.unacked = 0

    @property
    def done(self):
        """The stream is over: ended by the server, or reset."""
        return self.ended or self.reset is not None

    def header(self, name):
        """Values of a response header, joined with ', ', or None."""
        vals = [v for n, v in self.headers if n == name.lower()]
        return ', '.join(vals) if vals else None

    def to_json(self):
        return {
            'id': self.id,
            'status': self.status,
            'headers': [[n, v] for n, v in self.headers],
            'informational': [[[n, v] for n, v in h] for h in self.informational],
            'body': _latin1(bytes(self.data)),
            'body_length': len(self.data),
            'data_frames': self.data_frames,
            'trailers': [[n, v] for n, v in self.trailers],
            'ended': self.ended,
            'reset': self.reset,
            'reset_name': error_name(self.reset) if self.reset is not None else None,
            'reset_by': self.reset_by,
            'unacked': self.unacked,
        }


def _decode_headers(headers):
    return [(_latin1(n), _latin1(v)) for n, v in headers]


def _encode_headers(headers):
    out = []
    for n, v in headers:
        n = n.encode('latin-1') if isinstance(n, str) else n
        v = v.encode('latin-1') if isinstance(v, str) else str(v).encode() if isinstance(v, int) else v
        out.append((n, v))
    return out


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------

def connect(host=None, port=None, *, tls=False, alpn=('h2',), cafile=None, verify=None,
            server_hostname=None, cert=None, key=None, settings=None, window=None,
            auto_ack=True, validate=True, timeout=DEFAULT_TIMEOUT, wait_settings=True):
    """Open a connection and send the preface and our SETTINGS.

    host, port     default HOST and PORT (from the environment)
    tls            False: cleartext h2c with prior knowledge; True: TLS
    alpn           protocols offered under TLS (None or () offers none)
    cafile         PEM CA file to verify the server with (turns verify on)
    verify         check the server's certificate (default: only if cafile)
    server_hostname  SNI and name checked (default 'localhost' under TLS)
    cert, key      client certificate and key files (PEM) for mutual TLS
    settings       our SETTINGS, {name or code: value}, e.g.
                   {'INITIAL_WINDOW_SIZE': 16, 'MAX_FRAME_SIZE': 16384}
    window         shorthand for settings INITIAL_WINDOW_SIZE (per stream)
    auto_ack       acknowledge received DATA at once (WINDOW_UPDATE as h2
                   sees fit); False: only through ack() or open_window()
    validate       let h2 validate and normalise outbound headers (False to
                   send malformed requests on purpose); inbound headers are
                   always validated
    timeout        connect timeout and the default deadline of every wait
    wait_settings  wait for the server's SETTINGS before returning (not when
                   ALPN chose something other than h2)

    Under TLS, alpn_protocol() tells what was negotiated; connect() does not
    insist on h2 so that tests can check a server's choice.
    """
    host = host or HOST
    port = port or PORT
    if not port:
        raise ValueError('connect: no port (set H2_PORT or pass port=)')
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if verify is None:
            verify = cafile is not None
        if verify:
            if cafile:
                ctx.load_verify_locations(cafile)
            else:
                ctx.load_default_certs()
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert:
            ctx.load_cert_chain(cert, key)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        sock = ctx.wrap_socket(sock, server_hostname=server_hostname or 'localhost')
    sock.setblocking(False)
    client = H2Client(sock, host=host, port=port, tls=tls, settings=settings, window=window,
                      auto_ack=auto_ack, validate=validate, timeout=timeout)
    # A server that chose http/1.1 by ALPN sends no SETTINGS.
    speaks_h2 = not tls or client.alpn_protocol() in ('h2', None)
    if wait_settings and speaks_h2 and not client.wait(lambda: client.remote_settings_received):
        raise TimeoutError('connect: no SETTINGS from the server within %ss (%s)'
                           % (timeout, client.why_not()))
    return client


class H2Client:
    """One HTTP/2 connection.  See connect() for the options.

    State, updated while a method waits for frames:
      streams          {stream id: Stream}
      remote_settings  {name: value} from the server's SETTINGS frames
      remote_settings_received  the server's first SETTINGS arrived
      settings_acked   the server acknowledged our SETTINGS
      goaway           the last GOAWAY received, as {last_stream_id,
                       error_code, error_name, additional_data}, or None
      goaways          every GOAWAY received, in order
      pings_acked      payloads of PING ACKs received
      closed           the server closed the connection (EOF, or a reset:
                       close_error says which)
      protocol_error   what h2 objected to in the server's frames, if any
                       (the client then sent GOAWAY and reads no more)
      events           one line per event, for diagnostics
    """

    def __init__(self, sock, *, host, port, tls, settings, window, auto_ack, validate, timeout):
        self.sock = sock
        self.tls = tls
        self.timeout = timeout
        self.auto_ack = auto_ack
        self.authority = '%s:%d' % (host, port)
        self.scheme = 'https' if tls else 'http'
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None,
            validate_outbound_headers=validate, normalize_outbound_headers=validate)
        self.conn = _Connection(config=config)
        local = {}
        for name, value in (settings or {}).items():
            local[_setting_code(name)] = value
        if window is not None:
            local[SettingCodes.INITIAL_WINDOW_SIZE] = window
        if local:
            # Sent in the preface's SETTINGS, in force from the start.
            values = dict(self.conn.local_settings.items())
            values.update(local)
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=values)
        self.streams = {}
        self.remote_settings = {}
        self.remote_settings_received = False
        self.settings_acked = False
        self.goaway = None
        self.goaways = []
        self.pings_acked = []
        self.closed = False
        self.close_error = None
        self.protocol_error = None
        self.events = []
        self.conn_unacked = 0
        self.conn.initiate_connection()
        self._flush()

    # ---- low level -------------------------------------------------------

    def alpn_protocol(self):
        """The protocol ALPN chose (None for cleartext or no ALPN)."""
        return self.sock.selected_alpn_protocol() if self.tls else None

    def tls_version(self):
        return self.sock.version() if self.tls else None

    def _flush(self):
        data = self.conn.data_to_send()
        if data:
            self.send_raw(data)

    def send_raw(self, data, timeout=None):
        """Write bytes to the socket as they are (e.g. hand-made frames)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError('send: the socket stayed full for %ss' % self.timeout)
                select.select([], [self.sock], [], left)
            except OSError as e:
                self.closed = True
                self.close_error = self.close_error or 'send: %s' % e
                raise

    def send_frame(self, frame):
        """Send a hyperframe frame as it is, bypassing h2's state checks."""
        self._flush()
        self.send_raw(frame.serialize())

    def _log(self, text):
        self.events.append(text)

    def why_not(self):
        """A short account of the connection's state, for error messages."""
        parts = []
        if self.closed:
            parts.append('closed' + (': %s' % self.close_error if self.close_error else ''))
        if self.goaway:
            parts.append('GOAWAY %s last %d' % (self.goaway['error_name'],
                                                 self.goaway['last_stream_id']))
        if self.protocol_error:
            parts.append('protocol error: %s' % self.protocol_error)
        parts.append('events: ' + (', '.join(self.events[-8:]) or 'none'))
        return '; '.join(parts)

    def _read_once(self, timeout):
        """Wait up to timeout for bytes and process them.  False if nothing
        more can come (closed, or h2 gave up on the connection)."""
        if self.closed or self.protocol_error:
            return False
        pending = self.tls and self.sock.pending()
        if not pending:
            r, _, _ = select.select([self.sock], [], [], max(timeout, 0))
            if not r:
                return True
        try:
            data = self.sock.recv(READ_SIZE)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return True
        except ssl.SSLZeroReturnError:
            data = b''
        except OSError as e:
            self.closed = True
            self.close_error = str(e)
            self._log('closed: %s' % e)
            return False
        if not data:
            self.closed = True
            self._log('closed (EOF)')
            return False
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.protocol_error = '%s: %s' % (type(e).__name__, e)
            self._log('protocol error: %s' % self.protocol_error)
            try:
                self._flush()
            except OSError:
                pass
            return False
        for ev in events:
            self._handle(ev)
        self._flush()
        return True

    def stream(self, sid):
        """The Stream for sid (created empty if the client has not seen it)."""
        s = self.streams.get(sid)
        if s is None:
            s = self.streams[sid] = Stream(sid)
        return s

    def _handle(self, ev):
        E = h2.events
        sid = getattr(ev, 'stream_id', None)
        if isinstance(ev, E.ResponseReceived):
            s = self.stream(sid)
            s.headers = _decode_headers(ev.headers)
            s.status = int(dict(s.headers).get(':status', 0))
            self._log('%d: HEADERS %d' % (sid, s.status))
        elif isinstance(ev, E.InformationalResponseReceived):
            self.stream(sid).informational.append(_decode_headers(ev.headers))
            self._log('%d: 1xx' % sid)
        elif isinstance(ev, E.TrailersReceived):
            self.stream(sid).trailers = _decode_headers(ev.headers)
            self._log('%d: trailers' % sid)
        elif isinstance(ev, E.DataReceived):
            s = self.stream(sid)
            s.data += ev.data
            if ev.data:
                s.data_frames += 1
            n = ev.flow_controlled_length
            self._log('%d: DATA %d' % (sid, len(ev.data)))
            if n:
                if self.auto_ack:
                    self.conn.acknowledge_received_data(n, sid)
                else:
                    s.unacked += n
                    self.conn_unacked += n
        elif isinstance(ev, E.StreamEnded):
            self.stream(sid).ended = True
            self._log('%d: END_STREAM' % sid)
        elif isinstance(ev, E.StreamReset):
            s = self.stream(sid)
            s.reset = int(ev.error_code)
            s.reset_by = 'server' if ev.remote_reset else 'client'
            self._log('%d: RST_STREAM %s by %s' % (sid, error_name(s.reset), s.reset_by))
        elif isinstance(ev, E.RemoteSettingsChanged):
            for code, change in ev.changed_settings.items():
                self.remote_settings[_setting_name(code)] = change.new_value
            self.remote_settings_received = True
            self._log('SETTINGS')
        elif isinstance(ev, E.SettingsAcknowledged):
            self.settings_acked = True
            self._log('SETTINGS ACK')
        elif isinstance(ev, E.ConnectionTerminated):
            g = {
                'last_stream_id': ev.last_stream_id,
                'error_code': int(ev.error_code),
                'error_name': error_name(int(ev.error_code)),
                'additional_data': _latin1(ev.additional_data or b''),
            }
            self.goaway = g
            self.goaways.append(g)
            self._log('GOAWAY %s last %d' % (g['error_name'], g['last_stream_id']))
        elif isinstance(ev, E.PingAckReceived):
            self.pings_acked.append(bytes(ev.ping_data))
            self._log('PING ACK')
        elif isinstance(ev, E.PingReceived):
            self._log('PING')
        elif isinstance(ev, E.WindowUpdated):
            self._log('%s: WINDOW_UPDATE %d' % (sid or 0, ev.delta))
        else:
            self._log(type(ev).__name__)

    # ---- waiting ---------------------------------------------------------

    def wait(self, pred, timeout=None):
        """Read frames until pred() is true or timeout (default: the
        client's) passes; returns pred()'s last value."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            v = pred()
            if v:
                return v
            left = deadline - time.monotonic()
            if left <= 0:
                return v
            if not self._read_once(left):
                return pred()

    def read(self, duration):
        """Read and process frames for duration seconds (or until closed)."""
        deadline = time.monotonic() + duration
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read_once(left):
                return

    def wait_headers(self, sid, timeout=None):
        """Wait for the final response headers (or the stream's end); the Stream."""
        s = self.stream(sid)
        self.wait(lambda: s.status is not None or s.done, timeout)
        return s

    def wait_stream(self, sid, timeout=None):
        """Wait until the stream is done (END_STREAM or RST_STREAM); the
        Stream, done or not (check .done)."""
        s = self.stream(sid)
        self.wait(lambda: s.done, timeout)
        return s

    def wait_goaway(self, timeout=None, count=1):
        """Wait for the count-th GOAWAY; the last one received, or None."""
        self.wait(lambda: len(self.goaways) >= count, timeout)
        return self.goaway if len(self.goaways) >= count else None

    def wait_closed(self, timeout=None):
        """Wait for the server to close the connection; True if it did."""
        return self.wait(lambda: self.closed, timeout)

    # ---- requests --------------------------------------------------------

    def send_headers(self, headers, end_stream=False, stream_id=None):
        """Send a HEADERS frame with exactly these headers (pseudo-headers
        included, in order); opens a stream unless stream_id names one
        (trailers).  Returns the stream id."""
        sid = stream_id if stream_id is not None else self.conn.get_next_available_stream_id()
        self.stream(sid)
        self.conn.send_headers(sid, _encode_headers(headers), end_stream=end_stream)
        self._flush()
        return sid

    def request(self, method='GET', path='/', headers=(), body=None, end_stream=True,
                authority=None, scheme=None):
        """Open a stream with :method, :scheme, :authority, :path and then
        headers; send body (bytes or str) if given.  end_stream=False leaves
        the request open (send_data / end_stream later).  Returns the id."""
        pseudo = [(':method', method), (':scheme', scheme or self.scheme),
                  (':authority', authority or self.authority), (':path', path)]
        all_headers = pseudo + list(headers)
        if body is None:
            return self.send_headers(all_headers, end_stream=end_stream)
        sid = self.send_headers(all_headers, end_stream=False)
        self.send_data(sid, body, end_stream=end_stream)
        return sid

    def send_data(self, sid, data, end_stream=False, timeout=None):
        """Send DATA on a stream within the flow-control windows, reading
        frames while the server keeps a window shut; TimeoutError if it
        stays shut past timeout (default: the client's)."""
        if isinstance(data, str):
            data = data.encode('utf-8')
        data = memoryview(bytes(data))
        if not data and end_stream:
            self.end_stream(sid)
            return sid
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while data:
            window = self.conn.local_flow_control_window(sid)
            if window <= 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError('send_data: stream %d window shut for %ss (%s)'
                                       % (sid, self.timeout, self.why_not()))
                if not self._read_once(left):
                    raise ConnectionError('send_data: stream %d: %s' % (sid, self.why_not()))
                continue
            n = min(window, self.conn.max_outbound_frame_size, len(data))
            last = n == len(data)
            self.conn.send_data(sid, data[:n].tobytes(), end_stream=end_stream and last)
            self._flush()
            data = data[n:]
        return sid

    def end_stream(self, sid):
        """An empty DATA frame with END_STREAM."""
        self.conn.end_stream(sid)
        self._flush()

    def send_trailers(self, sid, headers):
        """Trailing HEADERS with END_STREAM."""
        return self.send_headers(headers, end_stream=True, stream_id=sid)

    def reset(self, sid, code=ErrorCodes.CANCEL):
        """RST_STREAM with an error code (default CANCEL)."""
        self.conn.reset_stream(sid, error_code=code)
        self.stream(sid).reset = int(code)
        self.stream(sid).reset_by = 'client'
        self._flush()

    def rapid_reset(self, count, path='/', code=ErrorCodes.CANCEL, method='GET'):
        """CVE-2023-44487: open count streams and reset each at once, all in
        one write.  Returns the stream ids."""
        sids = []
        for _ in range(count):
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, _encode_headers(
                [(':method', method), (':scheme', self.scheme),
                 (':authority', self.authority), (':path', path)]), end_stream=True)
            self.conn.reset_stream(sid, error_code=code)
            s = self.stream(sid)
            s.reset, s.reset_by = int(code), 'client'
            sids.append(sid)
        self._flush()
        return sids

    def ping(self, payload=b'pagi-rs!', timeout=None):
        """PING; waits for its ACK.  True if it came."""
        payload = bytes(payload)
        self.conn.ping(payload)
        self._flush()
        return self.wait(lambda: payload in self.pings_acked, timeout)

    def ack(self, sid=None, n=None):
        """Acknowledge received DATA: n bytes (default all unacked) of a
        stream, or of every stream if sid is None.  h2 then sends
        WINDOW_UPDATE once enough is acknowledged (about half a window);
        open_window() sends one unconditionally."""
        sids = [sid] if sid is not None else list(self.streams)
        for i in sids:
            s = self.stream(i)
            k = s.unacked if n is None else min(n, s.unacked)
            if k:
                s.unacked -= k
                self.conn_unacked -= k
                try:
                    self.conn.acknowledge_received_data(k, i)
                except h2.exceptions.StreamClosedError:
                    pass
        self._flush()

    def open_window(self, increment, sid=None):
        """WINDOW_UPDATE of exactly increment, on a stream or (sid None) on
        the connection."""
        self.conn.increment_flow_control_window(increment, stream_id=sid)
        self._flush()

    def update_settings(self, settings):
        """A SETTINGS frame, {name or code: value}."""
        self.conn.update_settings({_setting_code(k): v for k, v in settings.items()})
        self._flush()

    def send_goaway(self, code=ErrorCodes.NO_ERROR, last_stream_id=None):
        """GOAWAY from the client."""
        self.conn.close_connection(error_code=code, last_stream_id=last_stream_id)
        self._flush()

    def close(self):
        """Close the socket (no GOAWAY)."""
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    # ---- WebSocket over HTTP/2 ---------------------------------------------

    def websocket(self, path='/', headers=(), protocols=None, timeout=None,
                  authority=None, scheme=None):
        """RFC 8441 extended CONNECT for a WebSocket; waits for the answer.
        Returns a WebSocket (check .accepted, .status, .refused).  Raises
        if the server never sent SETTINGS_ENABLE_CONNECT_PROTOCOL = 1."""
        if self.remote_settings.get('ENABLE_CONNECT_PROTOCOL') != 1:
            raise RuntimeError('websocket: the server did not send '
                               'SETTINGS_ENABLE_CONNECT_PROTOCOL=1 (got %r)'
                               % self.remote_settings)
        hdrs = [(':method', 'CONNECT'), (':protocol', 'websocket'),
                (':scheme', scheme or self.scheme), (':path', path),
                (':authority', authority or self.authority),
                ('sec-websocket-version', '13')]
        if protocols:
            hdrs.append(('sec-websocket-protocol', ', '.join(protocols)))
        sid = self.send_headers(hdrs + list(headers), end_stream=False)
        ws = WebSocket(self, sid)
        self.wait_headers(sid, timeout)
        return ws

    # ---- results -----------------------------------------------------------

    def to_json(self):
        return {
            'alpn': self.alpn_protocol(),
            'tls_version': self.tls_version(),
            'remote_settings': self.remote_settings,
            'settings_acked': self.settings_acked,
            'goaway': self.goaway,
            'goaways': self.goaways,
            'closed': self.closed,
            'close_error': self.close_error,
            'protocol_error': self.protocol_error,
            'streams': {str(k): v.to_json() for k, v in self.streams.items()},
            'events': self.events,
        }


# ---------------------------------------------------------------------------
# WebSocket frames (RFC 6455)
# ---------------------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_OP_NAMES = {OP_CONT: 'continuation', OP_TEXT: 'text', OP_BINARY: 'binary',
             OP_CLOSE: 'close', OP_PING: 'ping', OP_PONG: 'pong'}


def ws_frame(opcode, payload=b'', fin=True, mask=True, mask_key=None, rsv=0):
    """One WebSocket frame.  Client frames are masked (mask=True, a random
    key unless mask_key, 4 bytes, is given); rsv sets the RSV1-3 bits (0-7)."""
    if isinstance(payload, str):
        payload = payload.encode('utf-8')
    payload = bytes(payload)
    head = bytearray([(0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += struct.pack('!H', n)
    else:
        head.append(mbit | 127)
        head += struct.pack('!Q', n)
    if not mask:
        return bytes(head) + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + key + masked


def ws_parse(buf):
    """Parse complete frames from the front of buf.  Returns (frames, rest):
    each frame a dict {fin, rsv, opcode, masked, payload (unmasked bytes)}."""
    frames = []
    buf = bytes(buf)
    while len(buf) >= 2:
        b0, b1 = buf[0], buf[1]
        n = b1 & 0x7F
        pos = 2
        if n == 126:
            if len(buf) < 4:
                break
            n = struct.unpack('!H', buf[2:4])[0]
            pos = 4
        elif n == 127:
            if len(buf) < 10:
                break
            n = struct.unpack('!Q', buf[2:10])[0]
            pos = 10
        masked = bool(b1 & 0x80)
        key = b''
        if masked:
            if len(buf) < pos + 4:
                break
            key = buf[pos:pos + 4]
            pos += 4
        if len(buf) < pos + n:
            break
        payload = buf[pos:pos + n]
        if masked:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        frames.append({'fin': bool(b0 & 0x80), 'rsv': (b0 >> 4) & 7, 'opcode': b0 & 0x0F,
                       'masked': masked, 'payload': payload})
        buf = buf[pos + n:]
    return frames, buf


class WebSocket:
    """A WebSocket over one HTTP/2 stream (RFC 8441), from H2Client.websocket.

      status, headers  the server's answer to the CONNECT
      accepted         status 200 and the stream still open
      refused          the server answered anything else, or reset
      messages         every message received, in order (see recv)
      closed_by_server the server's close frame, as a message, or None
      auto_pong        answer pings at once (default True)
    """

    def __init__(self, client, sid):
        self.client = client
        self.id = sid
        self.stream = client.stream(sid)
        self._offset = 0
        self._buf = b''
        self._queue = []
        self._partial = None
        self.messages = []
        self.closed_by_server = None
        self.auto_pong = True
        self.protocol_errors = []

    @property
    def status(self):
        return self.stream.status

    @property
    def headers(self):
        return self.stream.headers

    @property
    def accepted(self):
        return self.stream.status == 200 and self.stream.reset is None

    @property
    def refused(self):
        s = self.stream
        return (s.status is not None and s.status != 200) or s.reset is not None

    # ---- sending -----------------------------------------------------------

    def send_frame(self, opcode, payload=b'', fin=True, mask=True, rsv=0, end_stream=False):
        """Send one raw frame as DATA on the stream."""
        self.client.send_data(self.id, ws_frame(opcode, payload, fin=fin, mask=mask, rsv=rsv),
                              end_stream=end_stream)

    def send_text(self, text):
        self.send_frame(OP_TEXT, text.encode('utf-8') if isinstance(text, str) else text)

    def send_binary(self, data):
        self.send_frame(OP_BINARY, data)

    def send_ping(self, data=b''):
        self.send_frame(OP_PING, data)

    def send_pong(self, data=b''):
        self.send_frame(OP_PONG, data)

    def send_close(self, code=1000, reason='', end_stream=False):
        """A close frame (code None sends an empty one)."""
        payload = b'' if code is None else struct.pack('!H', code) + reason.encode('utf-8')
        self.send_frame(OP_CLOSE, payload, end_stream=end_stream)

    # ---- receiving ---------------------------------------------------------

    def _decode(self):
        data = self.stream.data
        if len(data) > self._offset:
            self._buf += bytes(data[self._offset:])
            self._offset = len(data)
        frames, self._buf = ws_parse(self._buf)
        for f in frames:
            op = f['opcode']
            if f['masked']:
                self.protocol_errors.append('masked frame from the server')
            if op >= 0x8:
                msg = {'type': _OP_NAMES.get(op, 'op%d' % op), 'data': f['payload']}
                if op == OP_CLOSE:
                    p = f['payload']
                    msg['code'] = struct.unpack('!H', p[:2])[0] if len(p) >= 2 else None
                    msg['reason'] = p[2:].decode('utf-8', 'replace')
                    self.closed_by_server = msg
                elif op == OP_PING and self.auto_pong and not self.stream.done:
                    self.send_pong(f['payload'])
                self._queue.append(msg)
                continue
            if op in (OP_TEXT, OP_BINARY):
                if self._partial is not None:
                    self.protocol_errors.append('new data frame inside a fragmented message')
                self._partial = [op, f['payload']]
            elif op == OP_CONT:
                if self._partial is None:
                    self.protocol_errors.append('continuation without a message')
                    continue
                self._partial[1] += f['payload']
            else:
                self.protocol_errors.append('unknown opcode %d' % op)
                continue
            if f['fin']:
                kind, payload = self._partial
                self._partial = None
                if kind == OP_TEXT:
                    self._queue.append({'type': 'text', 'data': payload.decode('utf-8', 'replace')})
                else:
                    self._queue.append({'type': 'binary', 'data': payload})
        return bool(self._queue)

    def recv(self, timeout=None):
        """The next message: {'type': 'text'|'binary'|'ping'|'pong'|'close',
        'data': str (text) or bytes, plus 'code' and 'reason' for close}, or
        None if none came in time or the stream ended first."""
        self.client.wait(lambda: self._decode() or self.stream.done, timeout)
        self._decode()
        if not self._queue:
            return None
        msg = self._queue.pop(0)
        self.messages.append(msg)
        return msg

    def recv_data(self, timeout=None):
        """The next text or binary message, skipping control frames."""
        deadline = time.monotonic() + (self.client.timeout if timeout is None else timeout)
        while True:
            msg = self.recv(max(deadline - time.monotonic(), 0))
            if msg is None or msg['type'] in ('text', 'binary', 'close'):
                return msg

    def close(self, code=1000, reason='', timeout=None):
        """Send a close frame and wait for the server's; returns it (a
        message dict) or None."""
        self.send_close(code, reason)
        deadline = time.monotonic() + (self.client.timeout if timeout is None else timeout)
        while self.closed_by_server is None:
            if self.recv(max(deadline - time.monotonic(), 0)) is None:
                break
        return self.closed_by_server

    def to_json(self):
        return {
            'id': self.id,
            'status': self.status,
            'headers': [[n, v] for n, v in self.headers],
            'accepted': self.accepted,
            'messages': self.messages,
            'closed_by_server': self.closed_by_server,
            'protocol_errors': self.protocol_errors,
            'stream': self.stream.to_json(),
        }


# ---------------------------------------------------------------------------
# Results and the script runner
# ---------------------------------------------------------------------------

def jsonable(obj):
    """obj with bytes as latin-1 strings and clients, streams and
    WebSockets as their to_json(), ready for json.dumps."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode('latin-1')
    if isinstance(obj, (H2Client, Stream, WebSocket)):
        return jsonable(obj.to_json())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (ErrorCodes, SettingCodes)):
        return int(obj)
    return obj


_result = None


def emit(value):
    """Set the script's result (what PagiRS::H2 returns); a later call
    replaces an earlier one."""
    global _result
    _result = jsonable(value)


class _Deadline(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Deadline('the script ran past its deadline (H2_DEADLINE=%s s)'
                    % os.environ.get('H2_DEADLINE'))


def run_script(path):
    """Run a test script with __all__ in scope; print the JSON envelope."""
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    deadline = float(os.environ.get('H2_DEADLINE') or 0)
    if deadline > 0:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, deadline)
    import h2client
    scope = {name: getattr(h2client, name) for name in h2client.__all__}
    scope['__name__'] = '__h2script__'
    with open(path) as f:
        source = f.read()
    envelope = {'ok': True}
    try:
        exec(compile(source, path, 'exec'), scope)
    except BaseException:
        envelope = {'ok': False, 'error': traceback.format_exc()}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    envelope['result'] = h2client._result
    real_stdout.write(json.dumps(envelope) + '\n')
    real_stdout.flush()
    return 0 if envelope['ok'] else 1


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.stderr.write('usage: python3 h2client.py SCRIPT\n')
        sys.exit(2)
    sys.exit(run_script(sys.argv[1]))
