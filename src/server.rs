//! The listener: accepts connections, serves each with hyper on its own
//! task, and drains them on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

use crate::body::AnsweredBody;
use crate::exchange::ExchangeConfig;
use crate::http1::gate::{Answers, Gate, Limits, WireOrders};
use crate::http1::{handle, ConnInfo};
use crate::interp::Pool;
use crate::tls::{self, AppProtocol, Tls};

/// Everything a connection task needs, shared.
pub struct Server {
    pub pool: Pool,
    pub exchange_config: Arc<ExchangeConfig>,
    pub root_path: String,
    pub max_header_size: usize,
    pub max_header_count: usize,
    pub request_timeout: Option<Duration>,
    pub keepalive_timeout: Option<Duration>,
    pub access_log_needs_headers: bool,
    pub gate_limits: Limits,
    pub websocket: Arc<crate::websocket::Settings>,
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
    /// connection's own task.
    pub tls: Option<Arc<Tls>>,
}

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

/// Set when the shutdown timeout expired and the remaining connections are
/// being dropped: their applications hear `server_shutdown`.
static FORCE_CLOSING: AtomicBool = AtomicBool::new(false);

pub fn is_force_closing() -> bool {
    FORCE_CLOSING.load(Ordering::Acquire)
}

impl Server {
    fn http1_builder(&self) -> http1::Builder {
        let mut b = http1::Builder::new();
        // The gate enforces the head limits (414/431) before hyper parses;
        // hyper's own limits sit above them as a backstop.
        let head_allowance = self.max_header_size + crate::http1::gate::MAX_REQUEST_LINE + 1024;
        b.timer(TokioTimer::new())
            .header_read_timeout(self.keepalive_timeout)
            .max_headers(self.max_header_count + 2)
            .max_header_size(head_allowance)
            .max_buf_size(head_allowance.max(64 * 1024))
            .keep_alive(true);
        b
    }
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
async fn refuse_busy_tls(tls: Arc<Tls>, stream: TcpStream) {
    if let Ok(Ok((stream, _))) = tokio::time::timeout(BUSY_ANSWER_BOUND, tls.accept(stream)).await {
        refuse_busy(stream).await;
    }
}

/// One connection's task: the TLS handshake when there is one, then hyper
/// serving it until it ends, the application aborts it, or shutdown.
struct ConnectionTask {
    server: Arc<Server>,
    builder: http1::Builder,
    force: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
    /// Held for the task's life: shutdown waits until every clone is gone.
    _alive: mpsc::Sender<()>,
    _counted: OpenConnection,
}

impl ConnectionTask {
    async fn run(mut self, stream: TcpStream, client: SocketAddr, server_addr: SocketAddr) {
        let info = ConnInfo::new(client, server_addr);
        let Some(tls) = self.server.tls.clone() else {
            return self.serve(stream, info).await;
        };
        // Here, in the connection's own task, so that a slow handshake holds
        // up nobody else.  Nothing has reached the application yet, so a
        // shutdown just drops it, and a failure is the client's business:
        // a debug line, no access-log line, no app call.
        let accepted = tokio::select! {
            accepted = tls.accept(stream) => accepted,
            _ = self.drain.wait_for(|d| *d) => return,
            _ = self.force.wait_for(|f| *f) => return,
        };
        let (stream, facts) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => return tracing::debug!("connection from {client}: {e}"),
        };
        match tls::negotiated_protocol(&stream) {
            AppProtocol::Http1 => self.serve(stream, info.with_tls(facts)).await,
            // Not offered (tls::OFFERED_PROTOCOLS) until HTTP/2 is served.
            AppProtocol::Http2 => tracing::debug!("connection from {client}: h2 not served"),
        }
    }

    async fn serve<S>(mut self, io: S, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let client = info.client;
        let info = Arc::new(info);
        let close = info.close.clone();
        let svc_server = self.server.clone();
        let orders = Arc::new(WireOrders::default());
        let svc_orders = orders.clone();
        let answers = Arc::new(Answers::default());
        let svc_answers = answers.clone();
        // Counted as the gate counts heads, to match its records to requests.
        // hyper calls the service through `&self`, one request at a time.
        let requests_served = std::cell::Cell::new(0u64);
        let service = service_fn(move |mut req| {
            let seq = requests_served.get() + 1;
            requests_served.set(seq);
            if let Some(order) = svc_orders.claim(seq, req.uri()) {
                req.extensions_mut().insert(order);
            }
            let answering = handle(req, info.clone(), svc_server.clone());
            let answers = svc_answers.clone();
            async move {
                let resp = answering.await?;
                answers.response_started(resp.status());
                Ok::<_, crate::http1::ServiceError>(
                    resp.map(|body| AnsweredBody::new(body, answers)),
                )
            }
        });
        let io = TokioIo::new(Gate::new(io, self.server.gate_limits, orders, answers));
        // with_upgrades: a WebSocket handshake hands the socket over after the 101.
        let conn = self.builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        // An application's abort drops the connection where it stands:
        // queued writes are abandoned and nothing else is served on it.
        let result = tokio::select! {
            result = conn.as_mut() => Some(result),
            _ = self.drain.wait_for(|d| *d) => None,
            _ = self.force.wait_for(|f| *f) => return,
            _ = close.notified() => return,
        };
        let result = match result {
            Some(r) => r,
            None => {
                // Finish the request in flight, then close.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = self.force.wait_for(|f| *f) => return,
                    _ = close.notified() => return,
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!("connection from {client} ended: {e}");
        }
    }
}

/// Accept and serve until `shutdown` resolves, then let in-flight requests
/// finish for up to `grace` before dropping what is left.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let builder = server.http1_builder();
    let (force_tx, force_rx) = watch::channel(false);
    let mut draining = server.shutting_down.subscribe();
    // Each connection task holds a clone; when all are gone, so are the connections.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let local = listener.local_addr().ok();
    let open = Arc::new(AtomicUsize::new(0));
    let mut at_capacity = false;
    tokio::pin!(shutdown);

    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let live = open.load(Ordering::Acquire) + server.detached.count();
        if live >= server.max_connections {
            if !at_capacity {
                tracing::warn!(
                    "{live} connections open (--max-connections {}): answering new ones 503",
                    server.max_connections
                );
                at_capacity = true;
            }
            match &server.tls {
                None => tokio::spawn(refuse_busy(stream)),
                Some(tls) => tokio::spawn(refuse_busy_tls(tls.clone(), stream)),
            };
            continue;
        }
        at_capacity = false;
        let server_addr = stream
            .local_addr()
            .ok()
            .or(local)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let task = ConnectionTask {
            server: server.clone(),
            builder: builder.clone(),
            force: force_rx.clone(),
            drain: draining.clone(),
            _alive: alive_tx.clone(),
            _counted: OpenConnection::new(&open),
        };
        tokio::spawn(task.run(stream, client, server_addr));
    }
    drop(listener);
    server.shutting_down.send_replace(true);
    let _ = draining.borrow_and_update();
    drop(alive_tx);

    let drained = async {
        alive_rx.recv().await;
        server.detached.wait_idle().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("Shutdown timeout: force-closing active connections");
        FORCE_CLOSING.store(true, Ordering::Release);
        let _ = force_tx.send(true);
        // Let the connection tasks run their drops (which notify the apps).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
