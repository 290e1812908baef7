//! Bodies in both directions.
//!
//! Outbound, [`ResponseBody`] is what hyper polls: either a fixed body the
//! server generated, or the exchange's queue fed by the application.
//! Inbound, [`pump_request_body`] reads the request body only as fast as the
//! application asks for it (one permit per chunk), so a large upload is held
//! back by TCP flow control rather than buffered in memory.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::exchange::{BodyAborted, Exchange};
use crate::http1::gate::BodyRefusal;
use crate::interp::malloc::PerlBuffer;

pub enum ResponseBody {
    Full(Option<Bytes>),
    Stream(Arc<Exchange>),
}

impl ResponseBody {
    pub fn text(text: &'static str) -> ResponseBody {
        ResponseBody::Full(Some(Bytes::from_static(text.as_bytes())))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        match self.get_mut() {
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Stream(ex) => ex.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(data) => data.is_none(),
            ResponseBody::Stream(ex) => ex.is_body_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Stream(ex) => match ex.declared_length() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper drops the body when the connection fails or closes before the
        // body was fully written; tell the application.
        if let ResponseBody::Stream(ex) = self {
            if crate::server::is_force_closing() {
                ex.body_dropped("server_shutdown", "the shutdown timeout expired");
            } else {
                ex.body_dropped(
                    "client_closed",
                    "the connection ended before the response was complete",
                );
            }
        }
    }
}

/// `--body-min-rate` bytes per second, enforced once the server has waited
/// `grace` for the body.  A rate of 0 turns it off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MinRate {
    pub bytes_per_sec: u64,
    pub grace: Duration,
}

impl MinRate {
    pub const OFF: MinRate = MinRate {
        bytes_per_sec: 0,
        grace: Duration::ZERO,
    };

    /// How much longer the server may wait for the next bytes, having
    /// received `received` bytes in `waited` of waiting, before the average
    /// falls below the rate.  None: no limit.
    pub fn allowance(&self, received: u64, waited: Duration) -> Option<Duration> {
        if self.bytes_per_sec == 0 {
            return None;
        }
        // received / t >= rate  <=>  t <= received / rate; never before the grace.
        let earned = Duration::try_from_secs_f64(received as f64 / self.bytes_per_sec as f64)
            .unwrap_or(Duration::MAX);
        Some(earned.max(self.grace).saturating_sub(waited))
    }
}

/// Time the server spent waiting for request-body bytes from the client:
/// while the application is not asking for the body, the clock stops.
struct BodyClock {
    waited: Duration,
    received: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one poll of the request body gave: a frame, the end, or an error.
type Polled = Option<Result<Frame<Bytes>, BoxError>>;

/// Read the request body on behalf of the application.  Each permit on
/// `exchange.body_credit` lets one chunk through to the interpreter.  A
/// chunk is what has arrived by then, up to `--read-buffer-size`: the
/// frames hyper or h2 already hold are joined (an upload that arrives in
/// 16 KiB frames reaches the app in 64 KiB events, not four times as many),
/// and a larger frame is split, the rest kept for the next chunk.
pub async fn pump_request_body<B>(exchange: Arc<Exchange>, mut body: B)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = exchange.config().max_body;
    let limit = exchange.config().read_buffer_size.max(1);
    let rate = exchange.config().body_rate;
    let mut total: u64 = 0;
    let mut clock = BodyClock {
        waited: Duration::ZERO,
        received: 0,
    };
    // Read while joining but not yet handed over: the next chunk starts here.
    let mut ahead: Option<Polled> = None;
    loop {
        // A closed semaphore means the exchange ended; stop reading.
        let Ok(permit) = exchange.body_credit.acquire().await else {
            return;
        };
        permit.forget();
        let (data, more) = loop {
            let next = match ahead.take() {
                Some(next) => next,
                None => {
                    let waiting_since = Instant::now();
                    let next: Polled = match rate.allowance(clock.received, clock.waited) {
                        None => body.frame().await.map(|r| r.map_err(Into::into)),
                        Some(allowance) => {
                            match tokio::time::timeout(allowance, body.frame()).await {
                                Ok(next) => next.map(|r| r.map_err(Into::into)),
                                Err(_) => {
                                    let waited = clock.waited + waiting_since.elapsed();
                                    too_slow(&exchange, &rate, clock.received, waited);
                                    return;
                                }
                            }
                        }
                    };
                    clock.waited += waiting_since.elapsed();
                    if let Some(Ok(frame)) = &next {
                        if let Some(data) = frame.data_ref() {
                            clock.received += data.len() as u64;
                        }
                    }
                    next
                }
            };
            match next {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() && !body.is_end_stream() {
                            continue;
                        }
                        let (data, left) = split_at_limit(data, limit);
                        if let Some(left) = left {
                            ahead = Some(Some(Ok(Frame::data(left))));
                            break (BodyChunk::from(data), true);
                        }
                        break join_ready(&mut body, data, limit, &mut ahead, &mut clock).await;
                    }
                    // Request trailers are not surfaced to the application.
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    let e: &(dyn std::error::Error + 'static) = &*e;
                    tracing::debug!("request body read failed: {e}");
                    if let Some(refusal) = BodyRefusal::find(e) {
                        refuse_body(&exchange, refusal);
                        return;
                    }
                    let (reason, detail) = match crate::http2::io::client_departure(e) {
                        // HTTP/2: the client reset this stream mid-body, or left.
                        Some(detail) => ("client_closed", detail),
                        None if ends_early(e) => ("client_closed", error_chain(e)),
                        None => ("read_error", error_chain(e)),
                    };
                    exchange.server_abort(reason, Some(detail), None);
                    return;
                }
                None => break (BodyChunk::default(), false),
            }
        };
        total += data.len() as u64;
        if max > 0 && total > max {
            exchange.server_abort(
                "body_too_large",
                Some(format!(
                    "request body exceeds --max-body-size ({max} bytes)"
                )),
                Some((http::StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large")),
            );
            return;
        }
        exchange.mark_progress();
        if !exchange.deliver_body(data, more) || !more {
            return;
        }
    }
}

/// `data` cut to `limit` bytes, and what is left over.
fn split_at_limit(mut data: Bytes, limit: usize) -> (Bytes, Option<Bytes>) {
    if data.len() <= limit {
        return (data, None);
    }
    let left = data.split_off(limit);
    (data, Some(left))
}

/// One `http.request` event's body: the frames joined into the event, kept
/// as they came while the network gathers them, then copied once into a
/// buffer the interpreter's string can own ([`BodyChunk::join_for_perl`]).
/// That one copy is made by the network thread, which has just read the
/// bytes and holds them in its cache; the interpreter adopts the buffer
/// without touching the bytes, and an app that sends them back (an echo, a
/// proxy) lends the same buffer to the network again.
#[derive(Debug, Default)]
pub struct BodyChunk {
    pieces: Vec<Bytes>,
    len: usize,
    joined: Option<PerlBuffer>,
}

impl BodyChunk {
    fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.len += piece.len();
            self.pieces.push(piece);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The body's bytes, in order: the joined buffer, or the pieces.
    pub(crate) fn parts(&self) -> impl Iterator<Item = &[u8]> {
        self.joined
            .as_ref()
            .map(PerlBuffer::as_bytes)
            .into_iter()
            .chain(self.pieces.iter().map(|p| &p[..]))
    }

    /// Copy the pieces into one buffer from Perl's allocator and let them
    /// go (hyper's read buffer is free again sooner).  Left as pieces when
    /// empty or when the allocation fails: the interpreter then copies them.
    pub(crate) fn join_for_perl(&mut self) {
        if self.len == 0 || self.joined.is_some() {
            return;
        }
        if let Some(buf) = PerlBuffer::joined(&self.pieces, self.len) {
            self.joined = Some(buf);
            self.pieces.clear();
        }
    }

    /// Whether the body is one buffer Perl may own.
    pub(crate) fn is_joined(&self) -> bool {
        self.joined.is_some()
    }

    /// The joined buffer, given up to the interpreter.
    pub(crate) fn take_joined(&mut self) -> Option<PerlBuffer> {
        self.joined.take()
    }

    /// The body in one buffer (tests).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        self.parts().flatten().copied().collect()
    }

    /// The pieces not yet joined (tests).
    #[cfg(test)]
    pub(crate) fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }
}

impl From<Bytes> for BodyChunk {
    fn from(piece: Bytes) -> BodyChunk {
        let mut chunk = BodyChunk::default();
        chunk.push(piece);
        chunk
    }
}

/// Join to `first` the data frames the body already holds, up to `limit`
/// bytes, without waiting for more.  Returns the chunk and whether more of
/// the body may follow.  Whatever does not fit (the rest of a frame, an
/// error) is left in `ahead` for the next chunk.
async fn join_ready<B>(
    body: &mut B,
    first: Bytes,
    limit: usize,
    ahead: &mut Option<Polled>,
    clock: &mut BodyClock,
) -> (BodyChunk, bool)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut joined = BodyChunk::from(first);
    let mut ended = body.is_end_stream();
    let mut yielded = false;
    while joined.len() < limit && !ended {
        // One poll, no waiting: Pending means nothing more is at hand (the
        // waker it registers at most wakes this task once for nothing).
        let polled: Option<Polled> = std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(next) => Some(next.map(|r| r.map_err(Into::into))),
                Poll::Pending => None,
            })
        })
        .await;
        let Some(next) = polled else {
            // hyper's HTTP/1.1 body is fed by the connection task, one read
            // (8 KiB) per poll of ours: let it run once to read what the
            // socket holds, then look again.  Stop when that brings nothing.
            if yielded {
                break;
            }
            yielded = true;
            tokio::task::yield_now().await;
            continue;
        };
        yielded = false;
        match next {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    clock.received += data.len() as u64;
                    let (data, left) = split_at_limit(data, limit - joined.len());
                    joined.push(data);
                    if let Some(left) = left {
                        *ahead = Some(Some(Ok(Frame::data(left))));
                        break;
                    }
                    ended = body.is_end_stream();
                }
                // Request trailers are not surfaced to the application.
                Err(_) => ended = body.is_end_stream(),
            },
            None => ended = true,
            Some(Err(e)) => {
                *ahead = Some(Some(Err(e)));
                break;
            }
        }
    }
    let more = !ended || ahead.is_some();
    (joined, more)
}

/// Whether a body read failed because the stream ended before the body
/// did: the client closed its side mid-body.
fn ends_early(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message())
        {
            return true;
        }
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The gate stopped the body (broken chunked framing, a limit): the client
/// gets the status if no response started, the application the rule.
fn refuse_body(exchange: &Exchange, refusal: &BodyRefusal) {
    let status = refusal.status;
    let reason = if status == http::StatusCode::PAYLOAD_TOO_LARGE {
        "body_too_large"
    } else {
        "protocol_error"
    };
    tracing::debug!("request body refused ({status}): {}", refusal.detail);
    let (status, text) = crate::http1::gate::refusal_text(status.as_u16());
    exchange.server_abort(reason, Some(refusal.detail.clone()), Some((status, text)));
}

/// The body came slower than `--body-min-rate`: 408, and the application
/// hears client_timeout.
fn too_slow(exchange: &Exchange, rate: &MinRate, received: u64, waited: Duration) {
    let secs = waited.as_secs_f64();
    let detail = format!(
        "request body arrived at {:.0} bytes/s over {:.1}s, below --body-min-rate {} bytes/s",
        received as f64 / secs.max(0.001),
        secs,
        rate.bytes_per_sec
    );
    tracing::warn!("Request body too slow - closing connection ({detail})");
    exchange.server_abort(
        "client_timeout",
        Some(detail),
        Some((http::StatusCode::REQUEST_TIMEOUT, "Request Timeout")),
    );
}

/// An error and its sources, one line: hyper's own text says little ("error
/// reading a body from connection"); the OS error behind it is the detail.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    type Step = Poll<Option<Result<Frame<Bytes>, std::io::Error>>>;

    /// A request body that yields what the test scripted, one poll each.
    struct Scripted(VecDeque<Step>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            match self.get_mut().0.pop_front() {
                Some(Poll::Pending) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Some(ready) => ready,
                None => Poll::Ready(None),
            }
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn data(n: usize) -> Step {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
    }

    fn clock() -> BodyClock {
        BodyClock {
            waited: Duration::ZERO,
            received: 0,
        }
    }

    /// join_ready with a fresh clock: what each test below asks.
    async fn join(
        body: &mut Scripted,
        first: Bytes,
        limit: usize,
        ahead: &mut Option<Polled>,
    ) -> (BodyChunk, bool) {
        join_ready(body, first, limit, ahead, &mut clock()).await
    }

    #[tokio::test]
    async fn joins_what_is_at_hand_up_to_the_limit() {
        // One Pending is waited out (the connection task's turn); the frame
        // after two in a row is left for the next chunk.
        let mut body = Scripted(VecDeque::from([
            data(100),
            Poll::Pending,
            data(100),
            Poll::Pending,
            Poll::Pending,
            data(100),
        ]));
        let mut ahead = None;
        let (chunk, more) = join(&mut body, Bytes::from(vec![b'x'; 50]), 1000, &mut ahead).await;
        assert_eq!(chunk.len(), 250);
        assert_eq!(chunk.pieces().len(), 3, "one piece per frame");
        assert!(more && ahead.is_none());
        let (chunk, more) = join(&mut body, Bytes::from_static(b"y"), 1000, &mut ahead).await;
        assert_eq!(chunk.len(), 101);
        assert!(!more, "the body ended");
    }

    #[tokio::test]
    async fn a_join_keeps_the_frames_it_joins_in_order_without_copying_them() {
        let frames = [
            Bytes::from_static(b"second "),
            Bytes::from_static(b""),
            Bytes::from_static(b"third"),
        ];
        let mut body = Scripted(
            frames
                .iter()
                .map(|f| Poll::Ready(Some(Ok(Frame::data(f.clone())))))
                .collect(),
        );
        let first = Bytes::from_static(b"first, ");
        let mut ahead = None;
        let (chunk, more) = join(&mut body, first.clone(), 1000, &mut ahead).await;
        assert!(!more);
        assert_eq!(chunk.to_vec(), b"first, second third");
        let at: Vec<*const u8> = chunk.pieces().iter().map(|p| p.as_ptr()).collect();
        assert_eq!(
            at,
            [first.as_ptr(), frames[0].as_ptr(), frames[2].as_ptr()],
            "the frames themselves, the empty one left out"
        );
    }

    #[tokio::test]
    async fn joined_for_perl_the_pieces_become_one_buffer() {
        let frames = [Bytes::from_static(b"two "), Bytes::from_static(b"three")];
        let mut body = Scripted(
            frames
                .iter()
                .map(|f| Poll::Ready(Some(Ok(Frame::data(f.clone())))))
                .collect(),
        );
        let mut ahead = None;
        let (mut chunk, _) = join(&mut body, Bytes::from_static(b"one, "), 1000, &mut ahead).await;
        chunk.join_for_perl();
        assert!(chunk.pieces().is_empty(), "the frames are let go");
        assert_eq!(chunk.parts().count(), 1);
        assert_eq!(chunk.to_vec(), b"one, two three");
        assert_eq!(chunk.len(), 14);
        let buf = chunk.take_joined().expect("a buffer for Perl");
        assert_eq!(buf.as_bytes(), b"one, two three");
        assert_eq!(chunk.parts().count(), 0, "given up");

        let mut empty = BodyChunk::default();
        empty.join_for_perl();
        assert!(empty.take_joined().is_none(), "nothing to join");
    }

    #[tokio::test]
    async fn splits_at_the_limit_and_keeps_the_rest() {
        let mut body = Scripted(VecDeque::from([data(300), data(10)]));
        let mut ahead = None;
        let (chunk, more) = join(&mut body, Bytes::from(vec![b'x'; 100]), 256, &mut ahead).await;
        assert_eq!(chunk.len(), 256);
        assert!(more);
        match ahead {
            Some(Some(Ok(frame))) => assert_eq!(frame.into_data().unwrap().len(), 144),
            _ => panic!("the rest of the frame is kept"),
        }
        let (first, rest) = split_at_limit(Bytes::from(vec![b'x'; 10]), 4);
        assert_eq!((first.len(), rest.map(|r| r.len())), (4, Some(6)));
    }

    #[tokio::test]
    async fn an_error_waits_behind_the_bytes_before_it() {
        let mut body = Scripted(VecDeque::from([
            data(10),
            Poll::Ready(Some(Err(std::io::Error::other("reset")))),
        ]));
        let mut ahead = None;
        let (chunk, more) = join(&mut body, Bytes::from_static(b"abc"), 1000, &mut ahead).await;
        assert_eq!(chunk.len(), 13);
        assert!(
            more,
            "what follows is the error, delivered as the next read"
        );
        assert!(matches!(ahead, Some(Some(Err(_)))));
    }

    #[test]
    fn min_rate_allows_the_grace_then_what_the_bytes_earned() {
        let rate = MinRate {
            bytes_per_sec: 500,
            grace: Duration::from_secs(20),
        };
        assert_eq!(MinRate::OFF.allowance(0, Duration::ZERO), None);
        assert_eq!(
            rate.allowance(0, Duration::ZERO),
            Some(Duration::from_secs(20)),
            "nothing is asked during the grace"
        );
        assert_eq!(
            rate.allowance(0, Duration::from_secs(25)),
            Some(Duration::ZERO),
            "after the grace with nothing received: at once"
        );
        // 15000 bytes at 500/s earn 30 s of waiting in all.
        assert_eq!(
            rate.allowance(15_000, Duration::from_secs(21)),
            Some(Duration::from_secs(9))
        );
        assert_eq!(
            rate.allowance(15_000, Duration::from_secs(40)),
            Some(Duration::ZERO)
        );
        let one = MinRate {
            bytes_per_sec: 1,
            grace: Duration::ZERO,
        };
        assert_eq!(
            one.allowance(u64::MAX, Duration::ZERO),
            Some(Duration::MAX),
            "no overflow, whatever the count"
        );
    }
}
