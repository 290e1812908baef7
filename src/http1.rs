//! HTTP/1.1 through hyper: one call of [`handle`] per request.  It refuses
//! what the server must refuse itself (400/413/414/431/501), builds the
//! scope, hands the request to an interpreter, and turns the application's
//! response head into a hyper response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, TRANSFER_ENCODING};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};

use crate::access_log::Record;
use crate::body::{pump_request_body, ResponseBody};
use crate::exchange::{Exchange, Head, RequestFacts};
use crate::interp::messages::ToPerl;
use crate::scope::{http_version_str, normalise_headers, BodyState, RequestScope};
use crate::server::Server;

/// Longest request target accepted; longer gets 414 (the reference's limit).
pub const MAX_URI_LEN: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Close the connection without a response.
    #[error("exchange aborted")]
    Aborted,
}

/// Per-connection facts.
pub struct ConnInfo {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    server: Arc<Server>,
) -> Result<Response<ResponseBody>, ServiceError> {
    let started = Instant::now();
    if let Some((status, text)) = refusal(&req, &server) {
        log_refusal(&server, &req, &conn, status, started);
        return Ok(plain_response(status, text));
    }

    let (parts, body) = req.into_parts();
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
    let scope = RequestScope::from_parts(&parts, conn.client, conn.server, &server.root_path, body_state);

    let interp = server.pool.pick();
    interp.mailbox.in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let facts = RequestFacts {
        method: scope.method.clone(),
        raw_path: scope.raw_path.clone(),
        query: scope.query_string.clone(),
        http_version: scope.http_version,
        client: conn.client,
        headers: if server.access_log_needs_headers { scope.headers.clone() } else { Vec::new() },
        is_head: parts.method == Method::HEAD,
        started,
    };
    let (exchange, head_rx) =
        Exchange::new(server.pool.next_request_id(), interp.mailbox.clone(), server.exchange_config.clone(), facts);

    if body_state != BodyState::Empty {
        if body_state == BodyState::Streaming {
            // Read one chunk ahead so a small body is waiting when the app asks.
            exchange.body_credit.add_permits(1);
        }
        tokio::spawn(pump_request_body(exchange.clone(), body));
    }
    if let Some(limit) = server.request_timeout {
        tokio::spawn(watch_stalls(Arc::downgrade(&exchange), limit));
    }

    interp.mailbox.push(ToPerl::Request { exchange: exchange.clone(), scope: Box::new(scope) });

    // If hyper drops this future (the client went away, or the server is
    // force-closing), the application must hear about it.
    let mut guard = PendingHead(Some(exchange.clone()));
    let head = head_rx.await;
    guard.0 = None;
    match head {
        Ok(Head::App(status, headers)) => {
            let mut resp = Response::new(ResponseBody::Stream(exchange));
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            Ok(resp)
        }
        Ok(Head::Generated(status, text)) => Ok(plain_response(status, text)),
        Ok(Head::Abort) | Err(_) => Err(ServiceError::Aborted),
    }
}

struct PendingHead(Option<Arc<Exchange>>);

impl Drop for PendingHead {
    fn drop(&mut self) {
        if let Some(ex) = self.0.take() {
            ex.network_gone(if crate::server::is_force_closing() { "server_shutdown" } else { "client_closed" });
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
            tracing::warn!("Request stall timeout ({}s) - closing connection", limit.as_secs());
            ex.server_abort("client_timeout", None);
            return;
        }
        wait = limit - idle;
    }
}

/// What the server answers itself, before the application sees the request.
fn refusal(req: &Request<Incoming>, server: &Server) -> Option<(StatusCode, &'static str)> {
    let headers = req.headers();
    let target_len = req.uri().path_and_query().map(|p| p.as_str().len()).unwrap_or(0);
    if target_len > MAX_URI_LEN {
        return Some((StatusCode::URI_TOO_LONG, "URI Too Long"));
    }
    // The request line counts toward the head limit, as in the reference.
    let head_size = req.method().as_str().len()
        + target_len
        + 12
        + headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>()
        + 2;
    if head_size > server.max_header_size || headers.len() > server.max_header_count {
        return Some((StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "Request Header Fields Too Large"));
    }
    let hosts = headers.get_all(HOST).iter().count();
    if (req.version() == Version::HTTP_11 && hosts == 0) || hosts > 1 {
        return Some((StatusCode::BAD_REQUEST, "Bad Request"));
    }
    if headers.get_all(CONTENT_LENGTH).iter().count() > 1 {
        return Some((StatusCode::BAD_REQUEST, "Bad Request"));
    }
    // hyper has already refused a Transfer-Encoding whose final coding is not
    // chunked (400, as RFC 9112 requires); any other coding before chunked is
    // one we do not implement.
    for value in headers.get_all(TRANSFER_ENCODING) {
        let unsupported = value
            .as_bytes()
            .split(|b| *b == b',')
            .map(|c| c.trim_ascii())
            .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked"));
        if unsupported {
            return Some((StatusCode::NOT_IMPLEMENTED, "Unsupported Transfer-Encoding"));
        }
    }
    if server.exchange_config.max_body > 0 {
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > server.exchange_config.max_body) {
            return Some((StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large"));
        }
    }
    None
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

fn log_refusal(server: &Server, req: &Request<Incoming>, conn: &ConnInfo, status: StatusCode, started: Instant) {
    let Some(log) = &server.exchange_config.access_log else { return };
    let headers = if server.access_log_needs_headers { normalise_headers(req.headers()) } else { Vec::new() };
    log.write(&Record {
        client: Some(conn.client),
        method: req.method().as_str(),
        raw_path: req.uri().path().as_bytes(),
        query: req.uri().query().unwrap_or("").as_bytes(),
        http_version: http_version_str(req.version()),
        status: Some(status.as_u16()),
        body_bytes: 0,
        duration: started.elapsed(),
        headers: &headers,
    });
}
