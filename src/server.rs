//! The accept loops: one per listener (TCP or Unix socket), serving each
//! connection on its own task, with one `--max-connections` count across
//! them all; and the drain on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Notify};

use crate::exchange::ExchangeConfig;
use crate::http1::connection::TcpSocket;
use crate::http1::gate::Limits;
use crate::http2::Sniffed;
use crate::interp::Pool;
use crate::service::ConnInfo;
use crate::tls::{self, AppProtocol, Reloadable, Tls};

/// When accept(2) fails: go on, or wait, and what to log.
mod accept_failure;

/// Everything a connection task needs, shared.
pub struct Server {
    pub pool: Pool,
    pub exchange_config: Arc<ExchangeConfig>,
    pub root_path: String,
    /// `--proxy-headers`: the `--forwarded-allow-ips` list (None: off).
    pub proxy_headers: Option<Arc<crate::proxy::TrustedProxies>>,
    pub max_header_size: usize,
    pub max_header_count: usize,
    pub request_timeout: Option<Duration>,
    pub keepalive_timeout: Option<Duration>,
    pub access_log_needs_headers: bool,
    pub gate_limits: Limits,
    pub websocket: Arc<crate::websocket::Settings>,
    pub http2: crate::http2::Settings,
    /// Becomes true when shutdown begins: long-lived streams (SSE,
    /// WebSockets) close at once rather than hold up the drain.
    pub shutting_down: watch::Sender<bool>,
    pub detached: Arc<DetachedTasks>,
    /// `--max-connections` (resolved): open connections, WebSockets
    /// included, past which a new one is answered 503 and closed.
    pub max_connections: usize,
    /// `--max-queued-requests`: requests waiting for an interpreter.
    pub max_queued_requests: usize,
    /// `--ssl-cert`: every connection is TLS, its handshake made in the
    /// connection's own task with the configuration in force when it was
    /// accepted.
    pub tls: Option<Arc<Reloadable>>,
    /// Set when this process retires while others take over its work (a
    /// worker replaced on HUP, TTOU, `--max-requests` or a binary upgrade):
    /// each HTTP/1.1 connection answers its next request with `Connection:
    /// close` instead of being closed under a client that may be sending one.
    pub retiring: AtomicBool,
    /// `--max-requests`: how many requests this process takes before it
    /// asks to be replaced.
    pub request_limit: Option<RequestLimit>,
}

/// `--max-requests` in one worker.
pub struct RequestLimit {
    pub limit: u64,
    /// Notified once, when the request numbered `limit` arrives.
    pub reached: Notify,
}

impl Server {
    /// Note the request numbered `id` (1, 2, ...) for `--max-requests`.
    pub fn count_request(&self, id: u64) {
        if let Some(l) = &self.request_limit {
            if id == l.limit {
                l.reached.notify_one();
            }
        }
    }
}

/// How a serving process stops taking new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// The whole server stops: idle connections close at once.
    Stop,
    /// Other processes take over (see `Server::retiring`).
    Retire,
}

/// How long a retiring process keeps an idle HTTP/1.1 connection open for
/// the client's next request, which gets `Connection: close`.  A client
/// sending requests back to back (a proxy, a load test) sends it within
/// this; closing sooner would race it and fail it.
pub const RETIRE_IDLE_GRACE: Duration = Duration::from_secs(1);

/// Counts tasks that outlive their HTTP connection (accepted WebSockets),
/// so that shutdown waits for their closing handshakes too.
#[derive(Default)]
pub struct DetachedTasks {
    live: AtomicUsize,
    idle: Notify,
}

pub struct DetachedGuard(Arc<DetachedTasks>);

impl DetachedTasks {
    pub fn enter(self: &Arc<Self>) -> DetachedGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        DetachedGuard(self.clone())
    }

    fn count(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for DetachedGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What a connection task watches besides its socket.
#[derive(Clone)]
pub struct ConnectionSignals {
    /// Shutdown began: finish what is in flight, take nothing new.
    pub drain: watch::Receiver<bool>,
    /// The shutdown timeout expired: drop everything now.
    pub force: watch::Receiver<bool>,
}

/// Set when the shutdown timeout expired and the remaining connections are
/// being dropped: their applications hear `server_shutdown`.
static FORCE_CLOSING: AtomicBool = AtomicBool::new(false);

pub fn is_force_closing() -> bool {
    FORCE_CLOSING.load(Ordering::Acquire)
}

/// Open HTTP connections; each connection task holds one.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(count: &Arc<AtomicUsize>) -> OpenConnection {
        count.fetch_add(1, Ordering::AcqRel);
        OpenConnection(count.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer at `--max-connections`, written before anything is read.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain\r\ncontent-length: 20\r\nretry-after: 1\r\nconnection: close\r\n\r\n\
Service Unavailable\n";

/// Answer a connection over the limit with 503 and close it, without
/// involving an interpreter.  Bounded in time: a client that does not read
/// cannot hold the task.
async fn refuse_busy<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = async {
        stream.write_all(BUSY_RESPONSE).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes, so that closing does
        // not reset the connection before it has read the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(BUSY_ANSWER_BOUND, answer).await;
}

/// How long answering a connection over the limit may take.
const BUSY_ANSWER_BOUND: Duration = Duration::from_secs(2);

/// The same over TLS: the answer needs the handshake first, itself held
/// to the same bound.
async fn refuse_busy_tls<S: AsyncRead + AsyncWrite + Unpin>(tls: Arc<Tls>, stream: S) {
    if let Ok(Ok((stream, _))) = tokio::time::timeout(BUSY_ANSWER_BOUND, tls.accept(stream)).await {
        refuse_busy(stream).await;
    }
}

/// A listening socket registered with the runtime.
pub enum Listener {
    Tcp(TcpListener),
    /// `path`: what the scopes' `server` shows.
    Unix {
        listener: UnixListener,
        path: Arc<[u8]>,
    },
}

impl Listener {
    /// Register bound sockets with the runtime; call inside it.
    pub fn register_all(
        bound: Vec<crate::listen::BoundListener>,
    ) -> Result<Vec<Listener>, crate::listen::ListenError> {
        bound
            .into_iter()
            .map(|b| {
                let shown = b.describe(false);
                Listener::from_bound(b).map_err(|source| crate::listen::ListenError::Bind {
                    addr: shown,
                    source,
                })
            })
            .collect()
    }

    fn from_bound(bound: crate::listen::BoundListener) -> io::Result<Listener> {
        use std::os::unix::ffi::OsStrExt;
        Ok(match bound.socket {
            crate::listen::Listening::Tcp { listener, .. } => {
                Listener::Tcp(TcpListener::from_std(listener)?)
            }
            crate::listen::Listening::Unix { listener, path } => Listener::Unix {
                listener: UnixListener::from_std(listener)?,
                path: path.as_os_str().as_bytes().into(),
            },
        })
    }

    /// The listener as logs name it.
    fn name(&self) -> String {
        match self {
            Listener::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|_| "a TCP listener".to_string(), |a| a.to_string()),
            Listener::Unix { path, .. } => format!("unix:{}", String::from_utf8_lossy(path)),
        }
    }

    /// The next connection and its facts.
    async fn accept(&self) -> io::Result<(Connection, ConnInfo)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, client) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                let server = stream
                    .local_addr()
                    .or_else(|_| listener.local_addr())
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                Ok((Connection::Tcp(stream), ConnInfo::new(client, server)))
            }
            Listener::Unix { listener, path } => {
                let (stream, _) = listener.accept().await?;
                Ok((Connection::Unix(stream), ConnInfo::unix(path.clone())))
            }
        }
    }
}

/// An accepted connection.  TLS (`--ssl-cert`) applies to TCP ones only:
/// a Unix socket is served in cleartext, as in the reference server (a
/// proxy on the same host speaks plain HTTP to it).
enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// What every accept loop shares.
struct AcceptShared {
    server: Arc<Server>,
    http1: hyper::server::conn::http1::Builder,
    /// Open connections on every listener, against --max-connections.
    open: Arc<AtomicUsize>,
    /// Whether the last connection was turned away: the warning is said
    /// once per spell at capacity, not once per listener or connection.
    at_capacity: AtomicBool,
    signals: ConnectionSignals,
    /// Never sent on: dropped with the last holder of this struct (the
    /// accept loops, then each connection task), which ends the drain.
    _alive: mpsc::Sender<()>,
}

/// Accept and serve on every listener until `shutdown` resolves, then let
/// in-flight requests finish for up to `grace` (or until `force` resolves)
/// before dropping what is left.
pub async fn serve(
    listeners: Vec<Listener>,
    server: Arc<Server>,
    shutdown: impl Future<Output = Drain>,
    force: impl Future<Output = ()>,
    grace: Duration,
) {
    let (force_tx, force_rx) = watch::channel(false);
    let mut draining = server.shutting_down.subscribe();
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let shared = Arc::new(AcceptShared {
        http1: crate::http1::connection::builder(&server),
        server: server.clone(),
        open: Arc::new(AtomicUsize::new(0)),
        at_capacity: AtomicBool::new(false),
        signals: ConnectionSignals {
            drain: draining.clone(),
            force: force_rx,
        },
        _alive: alive_tx,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let loops: Vec<_> = listeners
        .into_iter()
        .map(|listener| tokio::spawn(accept_loop(listener, shared.clone(), stop_rx.clone())))
        .collect();
    drop(shared);

    let drain = shutdown.await;
    // Each loop drops its listener as it ends: no new connection is taken
    // once the drain begins.
    let _ = stop_tx.send(true);
    for accept in loops {
        let _ = accept.await;
    }
    if drain == Drain::Retire {
        server.retiring.store(true, Ordering::Release);
    }
    server.shutting_down.send_replace(true);
    let _ = draining.borrow_and_update();

    let drained = async {
        alive_rx.recv().await;
        server.detached.wait_idle().await;
    };
    let forced = tokio::select! {
        done = tokio::time::timeout(grace, drained) => {
            if done.is_err() {
                tracing::warn!("Shutdown timeout: force-closing active connections");
            }
            done.is_err()
        }
        _ = force => {
            tracing::warn!("Forced shutdown: closing active connections now");
            true
        }
    };
    if forced {
        FORCE_CLOSING.store(true, Ordering::Release);
        let _ = force_tx.send(true);
        // Let the connection tasks run their drops (which notify the apps).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One listener's loop: accept until told to stop, each connection served
/// on its own task (or answered 503 past --max-connections).
async fn accept_loop(
    listener: Listener,
    shared: Arc<AcceptShared>,
    mut stop: watch::Receiver<bool>,
) {
    let server = &shared.server;
    let mut failing = accept_failure::Spell::default();
    loop {
        let (connection, info) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    if let Some(report) = failing.accepted(std::time::Instant::now()) {
                        log_accept_failure(&listener, &report, None);
                    }
                    pair
                }
                Err(e) => {
                    if accept_failure::cause(&e) == accept_failure::Cause::OneConnection {
                        tracing::debug!("{}: a connection failed before it was taken: {e}", listener.name());
                        continue;
                    }
                    if let Some(report) = failing.failed(std::time::Instant::now()) {
                        log_accept_failure(&listener, &report, Some(&e));
                    }
                    tokio::time::sleep(accept_failure::RETRY_AFTER).await;
                    continue;
                }
            },
            // The guard wait_for returns is not Send: drop it in here.
            _ = async { let _ = stop.wait_for(|stop| *stop).await; } => break,
        };
        let live = shared.open.load(Ordering::Acquire) + server.detached.count();
        if live >= server.max_connections {
            if !shared.at_capacity.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    "{live} connections open (--max-connections {}): answering new ones 503",
                    server.max_connections
                );
            }
            match (connection, &server.tls) {
                (Connection::Tcp(stream), Some(tls)) => {
                    tokio::spawn(refuse_busy_tls(tls.current(), stream))
                }
                (Connection::Tcp(stream), None) => tokio::spawn(refuse_busy(stream)),
                (Connection::Unix(stream), _) => tokio::spawn(refuse_busy(stream)),
            };
            continue;
        }
        shared.at_capacity.store(false, Ordering::Release);
        let counted = OpenConnection::new(&shared.open);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _counted = counted;
            let signals = shared.signals.clone();
            let server = shared.server.clone();
            match connection {
                Connection::Tcp(stream) => {
                    let tls = server.tls.as_ref().map(|tls| tls.current());
                    serve_connection(stream, info, tls, server, &shared.http1, signals).await
                }
                Connection::Unix(stream) => {
                    serve_connection(stream, info, None, server, &shared.http1, signals).await
                }
            }
        });
    }
}

/// Log a spell of failed accepts on `listener` (see accept_failure.rs).
fn log_accept_failure(
    listener: &Listener,
    report: &accept_failure::Report,
    error: Option<&io::Error>,
) {
    use accept_failure::Report;
    let name = listener.name();
    let error = error.map_or_else(String::new, |e| e.to_string());
    match report {
        Report::Began => tracing::warn!(
            "{name}: cannot accept connections: {error}; retrying every {} ms, new connections wait in the listen queue",
            accept_failure::RETRY_AFTER.as_millis()
        ),
        Report::Continues { failures, lasted } => tracing::warn!(
            "{name}: still cannot accept connections after {failures} attempts over {} s: {error}",
            lasted.as_secs()
        ),
        Report::Ended { failures, lasted } => tracing::info!(
            "{name}: accepting connections again after {failures} failed attempts over {} ms",
            lasted.as_millis()
        ),
    }
}

/// A socket the server can look into before a protocol takes it: the
/// cleartext HTTP/2 preface check peeks, leaving the bytes in place.
trait PeekStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Wait for bytes, then copy what is there without taking it.
    fn peek_into<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;

    /// The descriptor of a TCP socket, whose writes go out in segments.
    fn tcp_fd(&self) -> Option<RawFd>;
}

impl PeekStream for TcpStream {
    fn peek_into<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        self.peek(buf)
    }

    fn tcp_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl PeekStream for UnixStream {
    fn tcp_fd(&self) -> Option<RawFd> {
        None
    }

    async fn peek_into(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.readable().await?;
            let peeked = self.try_io(Interest::READABLE, || {
                // SAFETY: recv writes at most buf.len() bytes into buf,
                // which this function borrows mutably; the descriptor is
                // the stream's own, open for the borrow's length.
                let n = unsafe {
                    libc::recv(
                        self.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_PEEK,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match peeked {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// Serve one accepted connection in the protocol it speaks: over TLS
/// after the handshake, as ALPN chose; in cleartext HTTP/1.1, or HTTP/2
/// under `--http2` when the client opens with its preface.
///
/// Each protocol's future is boxed: inline, the task of every connection
/// was as large as the largest of them (the TLS handshake and HTTP/2 over
/// TLS, 16 KB in all), where a cleartext HTTP/1.1 connection needs 1.6 KB
/// (bench/README.md, conn-memory).
async fn serve_connection<S: PeekStream>(
    stream: S,
    info: ConnInfo,
    tls: Option<Arc<Tls>>,
    server: Arc<Server>,
    http1: &hyper::server::conn::http1::Builder,
    signals: ConnectionSignals,
) {
    let Some(tls) = tls else {
        let info = Arc::new(info);
        if server.http2.cleartext && speaks_http2(&stream, &server).await {
            let fd = stream.tcp_fd();
            Box::pin(crate::http2::connection::serve(
                stream, info, server, signals, fd,
            ))
            .await;
        } else {
            let socket = TcpSocket {
                fd: stream.tcp_fd(),
                cleartext: true,
            };
            Box::pin(crate::http1::connection::serve(
                stream, info, server, http1, signals, socket,
            ))
            .await;
        }
        return;
    };
    Box::pin(serve_tls(stream, info, tls, server, http1, signals)).await;
}

/// A TLS connection: the handshake, then the protocol ALPN chose.
async fn serve_tls<S: PeekStream>(
    stream: S,
    info: ConnInfo,
    tls: Arc<Tls>,
    server: Arc<Server>,
    http1: &hyper::server::conn::http1::Builder,
    mut signals: ConnectionSignals,
) {
    // Here, in the connection's own task, so that a slow handshake holds up
    // nobody else.  Nothing has reached the application yet, so a shutdown
    // just drops it, and a failure is the client's business: a debug line,
    // no access-log line, no app call.
    let client = info.client;
    // TLS records, not the application's writes, fill the segments.
    let socket = TcpSocket {
        fd: stream.tcp_fd(),
        cleartext: false,
    };
    let accepted = tokio::select! {
        accepted = tls.accept(stream) => accepted,
        _ = signals.drain.wait_for(|d| *d) => return,
        _ = signals.force.wait_for(|f| *f) => return,
    };
    let (stream, facts) = match accepted {
        Ok(accepted) => accepted,
        Err(e) => return tracing::debug!("connection from {client}: {e}"),
    };
    let info = Arc::new(info.with_tls(facts));
    match tls::negotiated_protocol(&stream) {
        AppProtocol::Http1 => {
            crate::http1::connection::serve(stream, info, server, http1, signals, socket).await
        }
        AppProtocol::Http2 => {
            crate::http2::connection::serve(stream, info, server, signals, socket.fd).await
        }
    }
}

/// `--http2` on a cleartext connection: whether the client opens with the
/// HTTP/2 preface.  Peeked, so an HTTP/1.1 client's bytes stay for hyper.
/// A client that sends nothing is left to HTTP/1.1 and its head timeout.
async fn speaks_http2<S: PeekStream>(stream: &S, server: &Server) -> bool {
    let mut prefix = [0u8; crate::http2::PREFACE.len()];
    let decide = async {
        let mut seen = 0;
        loop {
            let n = match stream.peek_into(&mut prefix).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            match crate::http2::sniff(&prefix[..n]) {
                Sniffed::Http2 => return true,
                Sniffed::Http1 => return false,
                // Part of the preface: wait for more.  peek does not
                // consume, so readiness stays set; pace the retries.
                Sniffed::Undecided => {
                    if n == seen {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    seen = n;
                }
            }
        }
    };
    let limit = server.keepalive_timeout.unwrap_or(Duration::from_secs(10));
    tokio::time::timeout(limit, decide).await.unwrap_or(false)
}
