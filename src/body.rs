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

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::exchange::{BodyAborted, Exchange};

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

/// Read the request body on behalf of the application.  Each permit on
/// `exchange.body_credit` lets one chunk through to the interpreter.
pub async fn pump_request_body(exchange: Arc<Exchange>, mut body: Incoming) {
    let max = exchange.config().max_body;
    let mut total: u64 = 0;
    loop {
        // A closed semaphore means the exchange ended; stop reading.
        let Ok(permit) = exchange.body_credit.acquire().await else {
            return;
        };
        permit.forget();
        let (data, more) = loop {
            match body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() && !body.is_end_stream() {
                            continue;
                        }
                        break (data, !body.is_end_stream());
                    }
                    // Request trailers are not surfaced to the application.
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    tracing::debug!("request body read failed: {e}");
                    let reason = if e.is_incomplete_message() {
                        "client_closed"
                    } else {
                        "read_error"
                    };
                    exchange.server_abort(reason, Some(error_chain(&e)), None);
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
