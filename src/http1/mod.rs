//! HTTP/1.1 through hyper: one call of [`handle`] per request.  It answers
//! the requests the [`gate`] refused (400/413/414/431/501), builds the
//! scope, hands the request to an interpreter, and turns the application's
//! response head into a hyper response.

pub mod gate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};

use crate::access_log::Record;
use crate::body::{pump_request_body, ResponseBody};
use crate::exchange::{Exchange, Head, RequestFacts};
use crate::interp::messages::ToPerl;
use crate::scope::{http_version_str, normalise_headers, BodyState, RequestScope, ScopeKind};
use crate::server::Server;
use crate::websocket::handshake::{self, Handshake};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Close the connection without a response.
    #[error("exchange aborted")]
    Aborted,
}

/// Per-connection facts, computed once per connection.
pub struct ConnInfo {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// The addresses as the scope shows them (formatted once, not per request).
    pub client_host: Arc<str>,
    pub server_host: Arc<str>,
    /// Closes the connection at once (`pagi.connection->abort`); the
    /// connection task watches it.
    pub close: Arc<tokio::sync::Notify>,
    /// What the TLS handshake settled, on a TLS connection: the scopes'
    /// `https`/`wss` scheme and `tls` extension.
    pub tls: Option<Arc<crate::tls::TlsFacts>>,
}

impl ConnInfo {
    pub fn new(client: SocketAddr, server: SocketAddr) -> ConnInfo {
        ConnInfo {
            client,
            server,
            client_host: client.ip().to_string().into(),
            server_host: server.ip().to_string().into(),
            close: Arc::new(tokio::sync::Notify::new()),
            tls: None,
        }
    }

    /// The same connection, made over TLS.
    pub fn with_tls(mut self, facts: Arc<crate::tls::TlsFacts>) -> ConnInfo {
        self.tls = Some(facts);
        self
    }
}

pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    server: Arc<Server>,
) -> Result<Response<ResponseBody>, ServiceError> {
    let started = Instant::now();
    if let Some(verdict) = refusal(&req) {
        let (status, text) = verdict.answer();
        // The gate's stand-in for a CONNECT is a GET (see gate.rs).
        let method = (verdict == gate::Verdict::Connect).then_some("CONNECT");
        log_refusal(&server, &req, &conn, method, status, started);
        return Ok(plain_response(status, text));
    }

    // A busy interpreter's mailbox is bounded: past --max-queued-requests
    // new requests are turned away rather than queued without end.
    if server.pool.pick().mailbox.waiting_requests() >= server.max_queued_requests {
        log_refusal(
            &server,
            &req,
            &conn,
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            started,
        );
        let mut resp = plain_response(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable");
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(resp);
    }

    match handshake::classify(req.method(), req.version(), req.headers()) {
        Handshake::NotAttempted => {}
        Handshake::Valid => return handshake::handle(req, conn, server, started).await,
        Handshake::Invalid(refusal) => {
            log_refusal(&server, &req, &conn, None, refusal.status, started);
            return Ok(handshake::refusal_response(&refusal));
        }
    }

    let (mut parts, body) = req.into_parts();
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
    let scope = RequestScope::from_parts(&mut parts, &conn, &server.root_path, body_state, kind);

    let (interp, exchange, head_rx) = open_exchange(&server, &conn, &scope, is_head, started);

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

    // If hyper drops this future (the client went away, or the server is
    // force-closing), the application must hear about it.
    let mut guard = PendingHead(Some(exchange.clone()));
    let head = head_rx.await;
    guard.0 = None;
    match head {
        Ok(Head::App(status, mut headers)) => {
            // An SSE request answered with an ordinary response is a refusal
            // (Www 0.6): the connection closes after it.
            if kind == ScopeKind::Sse
                && server.exchange_config.spec.is_current()
                && !exchange.is_event_stream()
            {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            // HTTP/1.0 has no chunked framing: a body of unknown length ends
            // with the connection, and the head must say so.  hyper would
            // answer a 1.0 keep-alive request with `connection: keep-alive`
            // whatever the body; a 1.0 head that says `close` stops it.
            let close_delimited = http10
                && !is_head
                && !matches!(status.as_u16(), 100..=199 | 204 | 304)
                && exchange.declared_length().is_none();
            let mut resp = Response::new(ResponseBody::Stream(exchange));
            if close_delimited {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
                *resp.version_mut() = Version::HTTP_10;
            }
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            Ok(resp)
        }
        Ok(Head::Generated(status, text)) => Ok(plain_response(status, text)),
        Ok(Head::Abort) | Ok(Head::Upgrade(_)) | Err(_) => Err(ServiceError::Aborted),
    }
}

/// A new exchange for `scope`, on the least busy interpreter.
pub(crate) fn open_exchange<'s>(
    server: &'s Server,
    conn: &ConnInfo,
    scope: &RequestScope,
    is_head: bool,
    started: Instant,
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
    let facts = RequestFacts {
        method: scope.method.clone(),
        raw_path: scope.raw_path.clone(),
        query: scope.query_string.clone(),
        http_version: scope.http_version,
        client: conn.client,
        headers: if server.access_log_needs_headers {
            // What the app is shown, so %{..}i atoms agree with it.
            crate::scope::scope_headers(scope)
                .map(|(n, v)| (Bytes::copy_from_slice(n), Bytes::copy_from_slice(v)))
                .collect()
        } else {
            Vec::new()
        },
        is_head,
        started,
    };
    let (exchange, head_rx) = Exchange::new(
        server.pool.next_request_id(),
        interp.mailbox.clone(),
        server.exchange_config.clone(),
        facts,
        Some(conn.close.clone()),
    );
    (interp, exchange, head_rx)
}

pub(crate) struct PendingHead(pub(crate) Option<Arc<Exchange>>);

impl Drop for PendingHead {
    fn drop(&mut self) {
        if let Some(ex) = self.0.take() {
            if crate::server::is_force_closing() {
                ex.network_gone(
                    "server_shutdown",
                    Some("the shutdown timeout expired".into()),
                );
            } else {
                ex.network_gone(
                    "client_closed",
                    Some("the client closed the connection before the response started".into()),
                );
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
                "Request stall timeout ({}s) - closing connection",
                limit.as_secs()
            );
            ex.server_abort(
                "client_timeout",
                Some(format!(
                    "no progress for {}s (--request-timeout)",
                    limit.as_secs()
                )),
                None,
            );
            return;
        }
        wait = limit - idle;
    }
}

/// The gate's verdict on this request, if it refused it (see gate.rs).
fn refusal(req: &Request<Incoming>) -> Option<gate::Verdict> {
    let verdict = req.headers().get(gate::REFUSAL_HEADER)?;
    Some(gate::Verdict::from_header(verdict.as_bytes()))
}

/// A server-generated response: short text/plain body, connection closed.
pub fn plain_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::text(text));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(text.len()));
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn log_refusal(
    server: &Server,
    req: &Request<Incoming>,
    conn: &ConnInfo,
    method: Option<&str>,
    status: StatusCode,
    started: Instant,
) {
    let Some(log) = &server.exchange_config.access_log else {
        return;
    };
    let headers = if server.access_log_needs_headers {
        normalise_headers(req.headers())
    } else {
        Vec::new()
    };
    log.write(&Record {
        client: Some(conn.client),
        method: method.unwrap_or(req.method().as_str()),
        raw_path: req.uri().path().as_bytes(),
        query: req.uri().query().unwrap_or("").as_bytes(),
        http_version: http_version_str(req.version()),
        status: Some(status.as_u16()),
        body_bytes: 0,
        duration: started.elapsed(),
        headers: &headers,
        end_reason: None,
    });
}
