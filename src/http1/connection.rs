//! One HTTP/1.1 connection: hyper's http1 server reading through the
//! [`gate`](super::gate), one request at a time.  Each request goes to the
//! protocol-neutral service layer; what is particular to HTTP/1.1 happens
//! here: the gate's refusals, the RFC 6455 upgrade, and `Connection: close`.

use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use super::gate::{self, Answers, Gate, WireOrders};
use super::segments::SegmentWriter;
use crate::body::ResponseBody;
use crate::dormant::Dormant;
use crate::exchange::{BodyAborted, BulkHint};
use crate::server::{ConnectionSignals, Server};
use crate::service::{
    self, log_refusal, plain_response, CloseAfter, ConnInfo, RequestContext, ServiceError,
};
use crate::websocket::handshake::{self, Carrier, Handshake};
use crate::write_stall::Watched;

/// hyper's HTTP/1.1 server as configured by the options.
pub fn builder(server: &Server) -> http1::Builder {
    configure(&Http1Limits {
        max_header_size: server.max_header_size,
        max_header_count: server.max_header_count,
        write_buffer_size: server.exchange_config.write_buffer_size,
    })
}

/// What [`configure`] needs of the options.
pub(crate) struct Http1Limits {
    pub max_header_size: usize,
    pub max_header_count: usize,
    /// `--write-buffer-size`: the largest body frame the exchange queues.
    pub write_buffer_size: usize,
}

/// hyper's own limit on request header lines when none is set.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

fn configure(limits: &Http1Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    // The gate enforces the head limits (414/431) before hyper parses;
    // hyper's own limits sit above them as a backstop.
    let head_allowance = limits.max_header_size + gate::MAX_REQUEST_LINE + 1024;
    // One figure caps both of hyper's buffers: the write buffer above, and
    // the read buffer a request body is read into.  The gate hands hyper
    // body bytes 64 KiB at a time (gate::MAX_BODY_READ), so the read
    // buffer grows no further than those reads need; the clamp bounds the
    // rest.
    let frames = crate::exchange::bytes_per_write(limits.write_buffer_size);
    let buffer_cap = head_allowance.max(frames);
    // The deadline for a request head is kept by `head_deadline`, with one
    // timer per connection; hyper's own arms a timer per request.
    b.header_read_timeout(None)
        .max_header_size(head_allowance)
        .max_buf_size(buffer_cap)
        .keep_alive(true);
    // hyper's default header count (100) parses into a buffer on the
    // stack; a count set explicitly, even the same, is a buffer it fills
    // per request (and allocates above 100): 1 % of the network thread at
    // hello world.  The gate has already refused anything above our limit.
    if limits.max_header_count > HYPER_DEFAULT_MAX_HEADERS {
        b.max_headers(limits.max_header_count);
    }
    b
}

/// The TCP socket under a connection (none over a Unix socket).
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpSocket {
    /// Its descriptor, through which a timed-out connection is reset.
    pub fd: Option<RawFd>,
    /// The connection's writes reach the socket as they are (cleartext), so
    /// they can be shaped into whole segments (segments.rs); TLS records
    /// cannot.
    pub cleartext: bool,
}

/// Serve HTTP/1.1 on `io` until the client leaves, the server drains, or
/// an application aborts.
pub async fn serve<IO>(
    io: IO,
    conn: Arc<ConnInfo>,
    server: Arc<Server>,
    builder: &http1::Builder,
    mut signals: ConnectionSignals,
    socket: TcpSocket,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client = conn.client;
    // Over cleartext TCP a streamed body may be written in whole segments
    // (segments.rs); the exchanges say when.
    let tcp_fd = socket.fd.filter(|_| socket.cleartext);
    let bulk_hint = tcp_fd.map(|_| Arc::new(BulkHint::default()));
    let svc_bulk_hint = bulk_hint.clone();
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
        let mut ctx = RequestContext::new(conn.clone(), svc_close.clone());
        ctx.bulk_hint = svc_bulk_hint.clone();
        // Boxed: the route's state (about 2 KB) is then made in place, and
        // hyper moves only a pointer into its in-flight slot.
        let answering = Box::pin(route(req, ctx, svc_server.clone(), svc_answers.refused()));
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
    let io = Watched::new(
        SegmentWriter::new(io, tcp_fd, bulk_hint),
        answers.write_stall(),
    );
    let io = TokioIo::new(Gate::new(io, server.gate_limits, orders, answers.clone()));
    // with_upgrades: a WebSocket handshake hands the socket over after the 101.
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    // An application's abort drops the connection where it stands: queued
    // writes are abandoned and nothing else is served on it.
    let result = {
        // Polled only when one of them woke the task, not for every wake-up
        // that hyper's connection gets (see dormant.rs).
        let interruption = Dormant::new(async {
            tokio::select! {
                _ = signals.drain.wait_for(|d| *d) => Interruption::Drain,
                _ = signals.force.wait_for(|f| *f) => Interruption::Force,
                _ = close.notified() => Interruption::Abort,
                _ = async {
                    match socket.fd {
                        Some(fd) => super::reset_watch::client_reset(fd, &answers).await,
                        None => std::future::pending().await,
                    }
                } => Interruption::Reset,
                overdue = client_overdue(&answers, server.keepalive_timeout) => match overdue {
                    Overdue::Head => Interruption::HeadTimeout,
                    Overdue::Write => Interruption::WriteTimeout,
                },
            }
        });
        tokio::select! {
            biased;
            result = conn.as_mut() => Some(result),
            why = interruption => match why {
                Interruption::Drain => None,
                Interruption::Force | Interruption::Abort => return,
                Interruption::Reset => {
                    tracing::debug!("connection from {client}: reset by the client");
                    return;
                }
                Interruption::HeadTimeout => {
                    tracing::debug!("connection from {client}: no request head within --timeout");
                    return;
                }
                Interruption::WriteTimeout => {
                    // Before the response in flight is dropped with `conn`,
                    // so that its app hears why (AnsweredBody's drop).
                    if let Some(limit) = server.keepalive_timeout {
                        answers.write_timed_out(limit);
                    }
                    tracing::debug!(
                        "connection from {client}: took no byte of its response within --timeout"
                    );
                    if let Some(fd) = socket.fd {
                        crate::write_stall::reset_on_close(fd);
                    }
                    return;
                }
            },
        }
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

/// Why a connection stops before hyper is done with it.
enum Interruption {
    /// Shutdown began: finish the request in flight.
    Drain,
    /// The shutdown timeout expired.
    Force,
    /// An application called `pagi.connection->abort`.
    Abort,
    /// The client reset the connection while hyper was not reading.
    Reset,
    /// No request head within `--timeout`.
    HeadTimeout,
    /// The client took no byte of what is written to it within `--timeout`.
    WriteTimeout,
}

/// What the client is overdue with.
enum Overdue {
    /// The next request head.
    Head,
    /// Taking any byte of what the connection writes.
    Write,
}

/// Resolves when the client has kept the connection waiting for `timeout`
/// (never, with no timeout):
/// - for a request head (see `Answers::head_deadline`): from when the
///   connection opened, or from the end of the last response it owed.
///   Bytes of a head that trickle in do not extend it.
/// - to take any byte of what is written to it (`Answers::write_deadline`),
///   a response or a refusal: from when the socket first refused more.
///
/// One timer serves the whole connection.  It is moved only when it fires:
/// to the nearer deadline, or a whole `timeout` on while a request is being
/// served and its writes go (a long stream wakes it once per timeout).  A
/// write stall that begins between two wake-ups is therefore noticed
/// between `timeout` and twice it after it began.
async fn client_overdue(answers: &Answers, timeout: Option<Duration>) -> Overdue {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let first = answers
        .head_deadline(timeout)
        .unwrap_or_else(|| Instant::now() + timeout);
    let sleep = tokio::time::sleep_until(first.into());
    tokio::pin!(sleep);
    loop {
        sleep.as_mut().await;
        let now = Instant::now();
        let write = answers.write_deadline(timeout);
        if write.is_some_and(|deadline| deadline <= now) {
            return Overdue::Write;
        }
        let next = match answers.head_deadline(timeout) {
            Some(deadline) if deadline <= now => return Overdue::Head,
            Some(deadline) => deadline,
            None => now + timeout,
        };
        let next = write.map_or(next, |w| w.min(next));
        sleep.as_mut().reset(next.into());
    }
}

/// Send one request where it belongs: the gate's refusal, a WebSocket
/// handshake, or the service layer.
async fn route(
    mut req: Request<Incoming>,
    ctx: RequestContext,
    server: Arc<Server>,
    gate_refused: bool,
) -> Result<Response<ResponseBody>, ServiceError> {
    if let Some(verdict) = gate_refused.then(|| refusal(&req)).flatten() {
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
/// Looked for only once the gate has refused a head on this connection: a
/// header lookup by a name hyper does not know is a hash of the name.
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
        if let (Some(limit), ResponseBody::Stream(exchange)) =
            (self.answers.write_timeout_hit(), &self.body)
        {
            // Heard before the body's own drop says "the connection ended":
            // the first reason is the one the exchange keeps.
            exchange.network_gone(
                "client_timeout",
                Some(format!(
                    "the client took no byte of the response for {limit}s (--timeout)"
                )),
            );
        }
        self.answers.response_finished();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::io;

    /// A client that sends one request and keeps every write hyper makes.
    /// Vectored like a TCP socket, so hyper queues body frames rather than
    /// copying them.
    struct RecordingIo {
        request: io::Cursor<Vec<u8>>,
        written: Vec<u8>,
        writes: usize,
    }

    impl AsyncRead for RecordingIo {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let this = &mut *self;
            let _ = std::io::Read::read(&mut this.request, buf.initialize_unfilled())
                .map(|n| buf.advance(n));
            if buf.filled().len() == before {
                // The client waits for its answer; Connection: close ends it.
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for RecordingIo {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                self.written.extend_from_slice(b);
                n += b.len();
            }
            if n > 0 {
                self.writes += 1;
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn limits(write_buffer_size: usize) -> Http1Limits {
        Http1Limits {
            max_header_size: 8192,
            max_header_count: 100,
            write_buffer_size,
        }
    }

    /// Serves one request whose response is `frames` queued frames of
    /// `frame` bytes; returns how many writes carried it and what arrived.
    async fn writes_for(limits: &Http1Limits, frames: usize, frame: usize) -> (usize, Vec<u8>) {
        let io = RecordingIo {
            request: io::Cursor::new(
                b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".to_vec(),
            ),
            written: Vec::new(),
            writes: 0,
        };
        let mut io = TokioIo::new(io);
        let service = service_fn(move |_req: Request<Incoming>| async move {
            // Every frame ready at once, as when an app queued them while
            // the previous write ran.
            let queued = (0..frames)
                .map(move |_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; frame]))));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(queued));
            Ok::<_, Infallible>(Response::new(body))
        });
        configure(limits)
            .serve_connection(&mut io, service)
            .await
            .expect("the connection ends cleanly");
        let io = io.into_inner();
        (io.writes, io.written)
    }

    #[tokio::test]
    async fn frames_already_queued_leave_in_one_write() {
        let frame = 64 * 1024;
        let (writes, wire) = writes_for(&limits(frame), 4, frame).await;
        let end = wire
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        let body = &wire[end..];
        // Chunked: each frame is a chunk of its own; all the payload arrives.
        assert_eq!(body.iter().filter(|&&b| b == b'x').count(), 4 * frame);
        assert!(body.ends_with(b"0\r\n\r\n"), "the body is terminated");
        assert!(
            writes <= 2,
            "4 frames of 64 KiB, queued together, took {writes} writes"
        );
    }

    #[tokio::test]
    async fn the_buffer_cap_follows_the_frame_size_within_bounds() {
        // Small frames: the cap stays at 64 KiB, so 16 frames of 16 KiB
        // still leave together; the write count shows where the cap is.
        let (writes, _) = writes_for(&limits(16 * 1024), 16, 16 * 1024).await;
        assert!(
            writes >= 4,
            "16 frames of 16 KiB under a 64 KiB cap took {writes} writes"
        );
        // Huge frames do not make the read buffer unbounded: 1 MiB at most.
        let (writes, _) = writes_for(&limits(64 << 20), 4, 512 * 1024).await;
        assert!(
            writes >= 2,
            "2 MiB of frames under a 1 MiB cap took {writes} writes"
        );
    }

    /// Whether `client_overdue` resolves within `within`, for want of a head.
    async fn times_out(answers: &Answers, timeout: Duration, within: Duration) -> bool {
        match tokio::time::timeout(within, client_overdue(answers, Some(timeout))).await {
            Ok(Overdue::Head) => true,
            Ok(Overdue::Write) => panic!("overdue with a write, not a head"),
            Err(_) => false,
        }
    }

    /// `client_overdue` resolves `timeout` after `from`, and not sooner.
    async fn assert_times_out_after(answers: &Answers, timeout: Duration, from: Instant) {
        assert!(!times_out(answers, timeout, Duration::from_millis(100)).await);
        assert!(times_out(answers, timeout, Duration::from_secs(5)).await);
        assert!(from.elapsed() >= timeout);
    }

    #[tokio::test]
    async fn the_head_deadline_runs_only_while_a_head_is_awaited() {
        let timeout = Duration::from_millis(150);
        // A connection that sends nothing: closed after the timeout, not before.
        let idle = Answers::default();
        assert_times_out_after(&idle, timeout, Instant::now()).await;

        // A request served for three timeouts is not cut off ...
        let busy = Answers::default();
        busy.head_handed();
        assert!(!times_out(&busy, timeout, 3 * timeout).await);
        // ... and once answered, the next head has a timeout of its own.
        busy.response_started(StatusCode::OK);
        busy.response_finished();
        assert_times_out_after(&busy, timeout, Instant::now()).await;

        // Pipelined: a second head came before the first was answered.
        let pipelined = Answers::default();
        pipelined.head_handed();
        pipelined.head_handed();
        pipelined.response_started(StatusCode::OK);
        pipelined.response_finished();
        assert!(!times_out(&pipelined, timeout, 2 * timeout).await);

        // After a 101 the connection carries no more HTTP/1 heads.
        let upgraded = Answers::default();
        upgraded.head_handed();
        upgraded.response_started(StatusCode::SWITCHING_PROTOCOLS);
        upgraded.response_finished();
        assert!(!times_out(&upgraded, timeout, 3 * timeout).await);

        // No --timeout: never.
        assert!(
            tokio::time::timeout(3 * timeout, client_overdue(&idle, None))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_write_the_client_takes_nothing_of_is_overdue_after_the_timeout() {
        let timeout = Duration::from_millis(150);
        let overdue_within = |answers: &'static Answers, within: Duration| async move {
            tokio::time::timeout(within, client_overdue(answers, Some(timeout)))
                .await
                .ok()
        };
        // A request being served whose writes stall: closed between the
        // timeout and twice it after the stall began, whatever the head
        // deadline says (there is none while a request is served).
        let stalled: &'static Answers = Box::leak(Box::default());
        stalled.head_handed();
        stalled.response_started(StatusCode::OK);
        let began = Instant::now();
        stalled
            .write_stall()
            .note::<usize>(&Poll::Pending, |n| *n > 0);
        assert!(matches!(
            overdue_within(stalled, 3 * timeout).await,
            Some(Overdue::Write)
        ));
        assert!(began.elapsed() >= timeout);

        // A slow reader: each write waits, but bytes go at least every
        // half timeout, so it is never overdue.
        let slow: &'static Answers = Box::leak(Box::default());
        slow.head_handed();
        slow.response_started(StatusCode::OK);
        let watch = tokio::spawn(overdue_within(slow, 5 * timeout));
        for _ in 0..8 {
            slow.write_stall().note::<usize>(&Poll::Pending, |n| *n > 0);
            tokio::time::sleep(timeout / 2).await;
            slow.write_stall()
                .note(&Poll::Ready(Ok(512usize)), |n| *n > 0);
        }
        assert!(
            watch.await.unwrap().is_none(),
            "a reader that takes bytes is not cut off"
        );

        // With no --timeout, a stall is never overdue either.
        assert!(
            tokio::time::timeout(3 * timeout, client_overdue(stalled, None))
                .await
                .is_err()
        );
    }
}
