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

/// Read the request body on behalf of the application.  Each permit on
/// `exchange.body_credit` lets one chunk through to the interpreter.
pub async fn pump_request_body<B>(exchange: Arc<Exchange>, mut body: B)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = exchange.config().max_body;
    let rate = exchange.config().body_rate;
    let mut total: u64 = 0;
    let mut clock = BodyClock {
        waited: Duration::ZERO,
        received: 0,
    };
    loop {
        // A closed semaphore means the exchange ended; stop reading.
        let Ok(permit) = exchange.body_credit.acquire().await else {
            return;
        };
        permit.forget();
        let (data, more) = loop {
            let waiting_since = Instant::now();
            let next = match rate.allowance(clock.received, clock.waited) {
                None => body.frame().await,
                Some(allowance) => match tokio::time::timeout(allowance, body.frame()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let waited = clock.waited + waiting_since.elapsed();
                        too_slow(&exchange, &rate, clock.received, waited);
                        return;
                    }
                },
            };
            clock.waited += waiting_since.elapsed();
            match next {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        clock.received += data.len() as u64;
                        if data.is_empty() && !body.is_end_stream() {
                            continue;
                        }
                        break (data, !body.is_end_stream());
                    }
                    // Request trailers are not surfaced to the application.
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    let e: Box<dyn std::error::Error + Send + Sync> = e.into();
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
                None => break (Bytes::new(), false),
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
