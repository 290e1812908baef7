//! The protocol-neutral service layer: one call per request, whichever HTTP
//! version carried it.  `http1/` and `http2/` turn their wire into an
//! `http::Request`, call [`serve_request`] (or the WebSocket handshake), and
//! turn the `http::Response` back into their framing.  Everything above
//! framing lives here or below: the scope, the exchange, the hand-off to an
//! interpreter, the request-body pump and the stall timeout.
//!
//! Nothing here may depend on a connection carrying one request at a time:
//! an HTTP/2 connection runs many of these at once, one per stream.  What
//! a protocol needs to do with the connection after a response (HTTP/1.1's
//! `Connection: close`) travels as the [`CloseAfter`] response extension.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, EXPECT};
use http::request::Parts;
use http::{Method, Response, StatusCode, Version};
use http_body::Body;
use tokio::sync::Notify;

use crate::access_log::Record;
use crate::body::{pump_request_body, ResponseBody};
use crate::exchange::{Exchange, Head, RequestFacts};
use crate::interp::messages::ToPerl;
use crate::scope::{http_version_str, normalise_headers, BodyState, RequestScope, ScopeKind};
use crate::server::Server;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// End the request without a response: HTTP/1.1 closes the
    /// connection, HTTP/2 resets the stream.
    #[error("exchange aborted")]
    Aborted,
}

/// The other end of a connection: a TCP peer's address, or a peer on a
/// Unix socket, which has none.  Logs and the access log show the latter
/// as `unix`, as the reference server does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => addr.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// Per-connection facts, computed once per connection and shared by every
/// request (or stream) on it.
pub struct ConnInfo {
    pub client: Peer,
    /// The scope's `client` host, formatted once (not per request); None
    /// on a Unix socket, whose scopes have no `client` (Www: optional).
    pub client_host: Option<Arc<str>>,
    /// The scope's `server`: `[host, port]`, or `[path, undef]` on a Unix
    /// socket (the path's bytes, which need not be UTF-8).
    pub server_host: Arc<[u8]>,
    pub server_port: Option<u16>,
    /// What the TLS handshake settled, on a TLS connection: the scopes'
    /// `https`/`wss` scheme and `tls` extension.
    pub tls: Option<Arc<crate::tls::TlsFacts>>,
}

impl ConnInfo {
    /// A TCP connection from `client` to `server`.
    pub fn new(client: SocketAddr, server: SocketAddr) -> ConnInfo {
        ConnInfo {
            client: Peer::Tcp(client),
            client_host: Some(client.ip().to_string().into()),
            server_host: server.ip().to_string().into_bytes().into(),
            server_port: Some(server.port()),
            tls: None,
        }
    }

    /// A connection accepted on the Unix socket at `path`.
    pub fn unix(path: Arc<[u8]>) -> ConnInfo {
        ConnInfo {
            client: Peer::Unix,
            client_host: None,
            server_host: path,
            server_port: None,
            tls: None,
        }
    }

    /// The peer, as `--forwarded-allow-ips` judges it.
    pub fn peer(&self) -> crate::proxy::Peer<'_> {
        match self.client {
            Peer::Tcp(addr) => crate::proxy::Peer::Ip(addr.ip()),
            Peer::Unix => crate::proxy::Peer::Unix {
                listener: std::str::from_utf8(&self.server_host).ok(),
            },
        }
    }

    /// The same connection, made over TLS.
    pub fn with_tls(mut self, facts: Arc<crate::tls::TlsFacts>) -> ConnInfo {
        self.tls = Some(facts);
        self
    }
}

/// What one request needs from the protocol that carries it.
#[derive(Clone)]
pub struct RequestContext {
    pub conn: Arc<ConnInfo>,
    /// Ends this request's transport at once (`pagi.connection->abort`, a
    /// stall): the whole connection on HTTP/1.1, one stream on HTTP/2.
    pub close: Arc<Notify>,
    pub started: Instant,
    /// Why the client left, when the protocol knows better than "closed"
    /// (HTTP/2's RST_STREAM code): set before dropping the request's future.
    pub departure: Arc<OnceLock<String>>,
    /// The connection's writer, for the exchange to tell when more body
    /// follows at once (HTTP/1.1 over TCP: http1/segments.rs).
    pub bulk_hint: Option<Arc<crate::exchange::BulkHint>>,
}

impl RequestContext {
    pub fn new(conn: Arc<ConnInfo>, close: Arc<Notify>) -> RequestContext {
        RequestContext {
            conn,
            close,
            started: Instant::now(),
            departure: Arc::default(),
            bulk_hint: None,
        }
    }
}

/// Response extension: the connection must close after this response.
/// HTTP/1.1 says so with `Connection: close`; HTTP/2 has nothing to close
/// per stream and ignores it.
#[derive(Clone, Copy, Debug)]
pub struct CloseAfter;

/// Serve one ordinary request (http or sse scope): checks that need no
/// application, then the scope goes to an interpreter and the response head
/// comes back from the exchange.
pub async fn serve_request<B>(
    mut parts: Parts,
    body: B,
    ctx: RequestContext,
    server: Arc<Server>,
) -> Result<Response<ResponseBody>, ServiceError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(busy) = refuse_when_queue_full(&server, &parts, &ctx) {
        return Ok(busy);
    }
    let body_state = if body.is_end_stream() {
        BodyState::Empty
    } else if parts
        .headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        BodyState::AwaitingContinue
    } else {
        BodyState::Streaming
    };
    let is_head = parts.method == Method::HEAD;
    let http10 = parts.version == Version::HTTP_10;
    let kind = ScopeKind::of_request(&parts.headers);
    let scope = build_scope(&mut parts, &ctx, &server, body_state, kind);

    let (interp, exchange, head_rx) = open_exchange(&server, &ctx, &scope, is_head);

    if body_state != BodyState::Empty {
        if body_state == BodyState::AwaitingContinue {
            exchange.set_continue_unanswered(true);
        }
        if body_state == BodyState::Streaming {
            // Read one chunk ahead so a small body is waiting when the app asks.
            exchange.body_credit.add_permits(1);
        }
        tokio::spawn(pump_request_body(exchange.clone(), body));
    }
    // An event stream is quiet by nature; --sse-idle-timeout governs it instead.
    if let (Some(limit), ScopeKind::Http) = (server.request_timeout, kind) {
        tokio::spawn(watch_stalls(Arc::downgrade(&exchange), limit));
    }

    interp.mailbox.push(ToPerl::Request {
        exchange: exchange.clone(),
        scope: Box::new(scope),
        session: None,
    });

    // If the protocol drops this future (the client went away, or the server
    // is force-closing), the application must hear about it.
    let mut guard = PendingHead(Some(exchange.clone()), ctx.departure.clone());
    let head = head_rx.await;
    guard.0 = None;
    match head {
        Ok(Head::App {
            status,
            headers,
            close_after,
        }) => {
            // An SSE request answered with an ordinary response is a refusal
            // (Www 0.6): the connection closes after it.
            let refused_stream = kind == ScopeKind::Sse
                && server.exchange_config.spec.is_current()
                && !exchange.is_event_stream();
            // HTTP/1.0 has no chunked framing: a body of unknown length ends
            // with the connection (http1/ says so on the wire).
            let close_delimited = http10
                && !is_head
                && !matches!(status.as_u16(), 100..=199 | 204 | 304)
                && exchange.declared_length().is_none();
            let mut resp = Response::new(ResponseBody::Stream(exchange));
            if close_delimited {
                *resp.version_mut() = Version::HTTP_10;
            }
            if close_after || refused_stream || close_delimited {
                resp.extensions_mut().insert(CloseAfter);
            }
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            Ok(resp)
        }
        Ok(Head::Generated(status, text)) => Ok(plain_response(status, text)),
        Ok(Head::Abort) | Ok(Head::Upgrade(_)) | Err(_) => Err(ServiceError::Aborted),
    }
}

/// The scope of a request, as the app sees it: with `--proxy-headers`,
/// what a trusted proxy says about the client, scheme and host.
pub(crate) fn build_scope(
    parts: &mut Parts,
    ctx: &RequestContext,
    server: &Server,
    body: BodyState,
    kind: ScopeKind,
) -> RequestScope {
    let mut scope = RequestScope::from_parts(parts, &ctx.conn, &server.root_path, body, kind);
    if let Some(trusted) = &server.proxy_headers {
        if let Some(forwarded) = crate::proxy::resolve(trusted, &ctx.conn.peer(), &scope.headers) {
            crate::proxy::apply(&mut scope, forwarded);
        }
    }
    scope
}

/// A busy interpreter's mailbox is bounded: past --max-queued-requests new
/// requests are turned away (503) rather than queued without end.
pub fn refuse_when_queue_full(
    server: &Server,
    parts: &Parts,
    ctx: &RequestContext,
) -> Option<Response<ResponseBody>> {
    if server.pool.pick().mailbox.waiting_requests() < server.max_queued_requests {
        return None;
    }
    log_refusal(
        server,
        parts,
        &ctx.conn,
        None,
        StatusCode::SERVICE_UNAVAILABLE,
        ctx.started,
    );
    let mut resp = plain_response(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable");
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    Some(resp)
}

/// A new exchange for `scope`, on the least busy interpreter.
pub(crate) fn open_exchange<'s>(
    server: &'s Server,
    ctx: &RequestContext,
    scope: &RequestScope,
    is_head: bool,
) -> (
    &'s crate::interp::Interpreter,
    Arc<Exchange>,
    tokio::sync::oneshot::Receiver<Head>,
) {
    let interp = server.pool.pick();
    interp
        .mailbox
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    // Only the access log reads the target back; without one, the clones
    // were a shared-buffer promotion (an allocation) and reference counts
    // that both threads touch, for every request.
    let logged = server.exchange_config.access_log.is_some();
    let for_log = |target: &Bytes| if logged { target.clone() } else { Bytes::new() };
    let facts = RequestFacts {
        method: scope.method.clone(),
        raw_path: for_log(&scope.raw_path),
        query: for_log(&scope.query_string),
        http_version: scope.http_version,
        // The client the app sees: a trusted proxy's word for it.
        client: scope.client,
        headers: if server.access_log_needs_headers {
            // What the app is shown, so %{..}i atoms agree with it.
            crate::scope::scope_headers(scope)
                .map(|(n, v)| (Bytes::copy_from_slice(n), Bytes::copy_from_slice(v)))
                .collect()
        } else {
            Vec::new()
        },
        is_head,
        started: ctx.started,
    };
    let id = server.pool.next_request_id();
    server.count_request(id);
    let (exchange, head_rx) = Exchange::new(
        id,
        interp.mailbox.clone(),
        server.exchange_config.clone(),
        facts,
        Some(ctx.close.clone()),
        ctx.bulk_hint.clone(),
    );
    (interp, exchange, head_rx)
}

/// Held while the response head is awaited: dropped early, the request's
/// transport went away first.
pub(crate) struct PendingHead(
    pub(crate) Option<Arc<Exchange>>,
    pub(crate) Arc<OnceLock<String>>,
);

impl Drop for PendingHead {
    fn drop(&mut self) {
        if let Some(ex) = self.0.take() {
            if crate::server::is_force_closing() {
                ex.network_gone(
                    "server_shutdown",
                    Some("the shutdown timeout expired".into()),
                );
            } else {
                let detail = self.1.get().cloned().unwrap_or_else(|| {
                    "the client closed the connection before the response started".into()
                });
                ex.network_gone("client_closed", Some(detail));
            }
        }
    }
}

/// `--request-timeout`: close an exchange that makes no progress.
async fn watch_stalls(exchange: std::sync::Weak<Exchange>, limit: Duration) {
    let mut wait = limit;
    loop {
        tokio::time::sleep(wait).await;
        let Some(ex) = exchange.upgrade() else { return };
        if ex.has_ended() {
            return;
        }
        let idle = ex.since_progress();
        if idle >= limit {
            tracing::warn!(
                "Request stall timeout ({}s) - closing the request (its connection on HTTP/1.1, its stream on HTTP/2)",
                limit.as_secs()
            );
            ex.cut_off(
                "client_timeout",
                format!("no progress for {}s (--request-timeout)", limit.as_secs()),
            );
            return;
        }
        wait = limit - idle;
    }
}

/// A server-generated response: short text/plain body, connection closed.
pub fn plain_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::text(text));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(text.len()));
    resp.extensions_mut().insert(CloseAfter);
    resp
}

/// An access-log line for a request the server answered itself.
pub fn log_refusal(
    server: &Server,
    parts: &Parts,
    conn: &ConnInfo,
    method: Option<&str>,
    status: StatusCode,
    started: Instant,
) {
    let Some(log) = &server.exchange_config.access_log else {
        return;
    };
    let headers = if server.access_log_needs_headers {
        normalise_headers(&parts.headers)
    } else {
        Vec::new()
    };
    // As for the requests that reach the app, the client a trusted proxy names.
    let client = server
        .proxy_headers
        .as_ref()
        .and_then(|trusted| crate::proxy::resolve(trusted, &conn.peer(), &parts.headers))
        .and_then(|forwarded| forwarded.client)
        .map_or(conn.client, Peer::Tcp);
    log.write(&Record {
        client: Some(client),
        method: method.unwrap_or(parts.method.as_str()),
        raw_path: parts.uri.path().as_bytes(),
        query: parts.uri.query().unwrap_or("").as_bytes(),
        http_version: http_version_str(parts.version),
        status: Some(status.as_u16()),
        body_bytes: 0,
        duration: started.elapsed(),
        headers: &headers,
        end_reason: None,
    });
}
