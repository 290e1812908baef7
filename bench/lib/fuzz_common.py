"""What the Python fuzzers (bench/bin/h2-fuzz, bench/bin/ws-fuzz) share:
starting the real binary with a generated app, sockets that never block
the fuzzer for longer than a case's deadline, and the app's call log.

The apps append one line per event to a track file: `S ID ...` when a call
starts, `E ID` when it returns; anything else is the fuzzer's own.
"""

import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time

# A socket that cannot go on yet; under TLS a read may need a write first
# and the other way round.
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def open_connection(port, timeout, tls, alpn=None):
    """A connection to the server on loopback, under TLS (not verified) if
    tls, offering alpn (a list) if given."""
    sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(alpn)
        sock = ctx.wrap_socket(sock, server_hostname='localhost')
    return sock


def readable(sock, timeout):
    """Bytes to read within timeout: TLS may hold decrypted ones already."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    r, _, _ = select.select([sock], [], [], max(timeout, 0))
    return bool(r)


def recv_some(sock):
    """Bytes read; b'' when the server closed (or the connection failed);
    None when nothing could be read after all."""
    try:
        return sock.recv(65536)
    except WOULD_BLOCK:
        return None
    except OSError:
        return b''


def drain_until_closed(sock, deadline, keep=None):
    """Read until the server closes the connection, appending what it sent
    to keep (a bytearray) if given; False if it did not close by the
    deadline."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if readable(sock, left):
            chunk = recv_some(sock)
            if chunk == b'':
                return True
            if chunk and keep is not None:
                keep += chunk


def rss_kib(pid):
    try:
        with open('/proc/%d/status' % pid) as fh:
            m = re.search(r'^VmRSS:\s+(\d+)', fh.read(), re.M)
            return int(m.group(1)) if m else None
    except OSError:
        return None


def track_lines(track):
    try:
        with open(track, errors='replace') as fh:
            return fh.read().splitlines()
    except OSError:
        return []


def calls_open(track):
    """(the S lines of calls that have not returned, the number of calls)."""
    lines = track_lines(track)
    started = {}
    for line in lines:
        parts = line.split(' ', 2)
        if parts[0] == 'S':
            started[parts[1]] = line
        elif parts[0] == 'E':
            started.pop(parts[1], None)
    return list(started.values()), sum(1 for line in lines if line.startswith('S '))


def calls_by_kind(track):
    """{'http /echo': n, 'websocket /ws': m, ...} of the app calls made."""
    kinds = {}
    for line in track_lines(track):
        parts = line.split()
        if parts and parts[0] == 'S':
            key = ' '.join(parts[2:4])
            kinds[key] = kinds.get(key, 0) + 1
    return kinds


def wait_all_returned(track, timeout):
    """Wait up to timeout for every app call to return; the ones still out."""
    wait_until = time.monotonic() + timeout
    while True:
        still, _ = calls_open(track)
        if not still or time.monotonic() > wait_until:
            return still
        time.sleep(0.1)


def make_certificate(directory):
    """A throwaway certificate for localhost: the server options that use
    it, or None (after saying why) if openssl could not make one."""
    cert, key = os.path.join(directory, 'cert.pem'), os.path.join(directory, 'key.pem')
    made = subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
                           'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert,
                           '-days', '2', '-subj', '/CN=localhost',
                           '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'],
                          capture_output=True, text=True)
    if made.returncode != 0:
        sys.stderr.write('openssl could not make a certificate:\n%s' % made.stderr)
        return None
    return ['--ssl-cert', cert, '--ssl-key', key]


def pagi_rs_binary():
    """PAGI_RS_BIN, or the release build of this checkout."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
    return os.environ.get('PAGI_RS_BIN') or os.path.join(root, 'target', 'release', 'pagi-rs')


class Server:
    """pagi-rs on an ephemeral port with the given options and app file,
    its output in log_path.  stop() on SIGINT and SIGTERM too."""

    def __init__(self, binary, options, app, log_path):
        self.log_path = log_path
        self._log = open(log_path, 'w')
        self.process = subprocess.Popen([binary, '-p', '0'] + options + [app],
                                        stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        signal.signal(signal.SIGINT, lambda *_: (self.stop(), sys.exit(130)))
        signal.signal(signal.SIGTERM, lambda *_: (self.stop(), sys.exit(130)))

    def log(self):
        with open(self.log_path, errors='replace') as fh:
            return fh.read()

    def wait_port(self, timeout=30):
        """The port it listens on, or None if it exited or took too long."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(r'listening on https?://[^:]+:(\d+)', self.log())
            if m:
                return int(m.group(1))
            if self.process.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def exited(self):
        """None while it runs, else its exit status."""
        return self.process.poll()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
