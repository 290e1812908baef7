//! One HTTP/1.1 connection: hyper's http1 server reading through the
//! [`gate`](super::gate), one request at a time.  Each request goes to the
//! protocol-neutral service layer; what is particular to HTTP/1.1 happens
//! here: the gate's refusals, the RFC 6455 upgrade, and `Connection: close`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use super::gate::{self, Answers, Gate, WireOrders};
use crate::body::ResponseBody;
use crate::exchange::BodyAborted;
use crate::server::{ConnectionSignals, Server};
use crate::service::{
    self, log_refusal, plain_response, CloseAfter, ConnInfo, RequestContext, ServiceError,
};
use crate::websocket::handshake::{self, Carrier, Handshake};

/// hyper's HTTP/1.1 server as configured by the options.
pub fn builder(server: &Server) -> http1::Builder {
    let mut b = http1::Builder::new();
    // The gate enforces the head limits (414/431) before hyper parses;
    // hyper's own limits sit above them as a backstop.
    let head_allowance = server.max_header_size + gate::MAX_REQUEST_LINE + 1024;
    b.timer(TokioTimer::new())
        .header_read_timeout(server.keepalive_timeout)
        .max_headers(server.max_header_count + 2)
        .max_header_size(head_allowance)
        .max_buf_size(head_allowance.max(64 * 1024))
        .keep_alive(true);
    b
}

/// Serve HTTP/1.1 on `io` until the client leaves, the server drains, or
/// an application aborts.
pub async fn serve<IO>(
    io: IO,
    conn: Arc<ConnInfo>,
    server: Arc<Server>,
    builder: &http1::Builder,
    mut signals: ConnectionSignals,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client = conn.client;
    // `pagi.connection->abort` on any request closes the whole connection.
    let close = Arc::new(Notify::new());
    let orders = Arc::new(WireOrders::default());
    let answers = Arc::new(Answers::default());
    let svc_orders = orders.clone();
    let svc_answers = answers.clone();
    let svc_close = close.clone();
    let svc_server = server.clone();
    // Counted as the gate counts heads, to match its records to requests.
    // hyper calls the service through `&self`, one request at a time.
    let requests_served = std::cell::Cell::new(0u64);
    let service = service_fn(move |mut req: Request<Incoming>| {
        let seq = requests_served.get() + 1;
        requests_served.set(seq);
        if let Some(order) = svc_orders.claim(seq, req.uri()) {
            req.extensions_mut().insert(order);
        }
        let ctx = RequestContext::new(conn.clone(), svc_close.clone());
        let answering = route(req, ctx, svc_server.clone());
        let answers = svc_answers.clone();
        let retiring = svc_server.clone();
        async move {
            let mut resp = for_the_wire(answering.await?);
            if retiring.retiring.load(std::sync::atomic::Ordering::Acquire)
                && resp.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                // Another process serves this client's next request.
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            answers.response_started(resp.status());
            Ok::<_, ServiceError>(resp.map(|body| AnsweredBody::new(body, answers)))
        }
    });
    let io = TokioIo::new(Gate::new(io, server.gate_limits, orders, answers));
    // with_upgrades: a WebSocket handshake hands the socket over after the 101.
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    // An application's abort drops the connection where it stands: queued
    // writes are abandoned and nothing else is served on it.
    let result = tokio::select! {
        result = conn.as_mut() => Some(result),
        _ = signals.drain.wait_for(|d| *d) => None,
        _ = signals.force.wait_for(|f| *f) => return,
        _ = close.notified() => return,
    };
    let result = match result {
        Some(r) => r,
        None => {
            if server.retiring.load(std::sync::atomic::Ordering::Acquire) {
                // Let the client send its next request here (it is answered
                // with `Connection: close`) rather than close the connection
                // under it while that request may be on its way.
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!("connection from {client} ended: {e}");
                        }
                        return;
                    }
                    _ = tokio::time::sleep(crate::server::RETIRE_IDLE_GRACE) => {}
                    _ = signals.force.wait_for(|f| *f) => return,
                    _ = close.notified() => return,
                }
            }
            // Finish the request in flight, then close.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = signals.force.wait_for(|f| *f) => return,
                _ = close.notified() => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection from {client} ended: {e}");
    }
}

/// Send one request where it belongs: the gate's refusal, a WebSocket
/// handshake, or the service layer.
async fn route(
    mut req: Request<Incoming>,
    ctx: RequestContext,
    server: Arc<Server>,
) -> Result<Response<ResponseBody>, ServiceError> {
    if let Some(verdict) = refusal(&req) {
        let (status, text) = verdict.answer();
        // The gate's stand-in for a CONNECT is a GET (see gate.rs).
        let method = (verdict == gate::Verdict::Connect).then_some("CONNECT");
        let (parts, _) = req.into_parts();
        log_refusal(&server, &parts, &ctx.conn, method, status, ctx.started);
        return Ok(plain_response(status, text));
    }
    match handshake::classify(req.method(), req.version(), req.headers()) {
        Handshake::NotAttempted => {}
        Handshake::Valid => {
            let upgrade = hyper::upgrade::on(&mut req);
            let (parts, _body) = req.into_parts();
            let accept_key = parts
                .headers
                .get(http::header::SEC_WEBSOCKET_KEY)
                .map(|k| handshake::derive_accept_key(k.as_bytes()))
                .unwrap_or_default();
            let carrier = Carrier::Http1 {
                accept_key,
                upgrade,
            };
            return handshake::handle(parts, ctx, server, carrier).await;
        }
        Handshake::Invalid(refusal) => {
            let (parts, _) = req.into_parts();
            return Ok(handshake::refuse(
                &server,
                &parts,
                &ctx,
                &refusal,
                Version::HTTP_11,
            ));
        }
    }
    let (parts, body) = req.into_parts();
    service::serve_request(parts, body, ctx, server).await
}

/// The gate's verdict on this request, if it refused it (see gate.rs).
fn refusal(req: &Request<Incoming>) -> Option<gate::Verdict> {
    let verdict = req.headers().get(gate::REFUSAL_HEADER)?;
    Some(gate::Verdict::from_header(verdict.as_bytes()))
}

/// What HTTP/1.1 says about the connection in the head.
fn for_the_wire(mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let says_close = resp.headers().get(CONNECTION).is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    if resp.extensions().get::<CloseAfter>().is_some() && !says_close {
        // hyper answers an HTTP/1.0 keep-alive request with `connection:
        // keep-alive` whatever the body; a head that says `close` stops it.
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    } else if resp
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"))
    {
        // An event stream says it holds the connection open, as the
        // reference server's does.
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    resp
}

/// A response body that tells the connection's gate when hyper is done with
/// it (see `gate::Answers`: a half-closed client is served until then).
pub struct AnsweredBody {
    body: ResponseBody,
    answers: Arc<Answers>,
}

impl AnsweredBody {
    pub fn new(body: ResponseBody, answers: Arc<Answers>) -> AnsweredBody {
        AnsweredBody { body, answers }
    }
}

impl Body for AnsweredBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for AnsweredBody {
    fn drop(&mut self) {
        self.answers.response_finished();
    }
}
