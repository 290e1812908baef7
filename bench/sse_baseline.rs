//! Plain hyper 1.x Server-Sent Events server: the reference point that
//! `bench/bin/sse-bench` compares pagi-rs (running `bench/apps/sse-stream.pl`)
//! against. `GET /events?n=N` answers `200 text/event-stream`, chunked, and
//! streams the events `data: 1`, `data: 2`, ... `data: N` (each followed by a
//! blank line, the same bytes the PAGI app's `sse.send` produces), one chunk
//! per event, as fast as the client reads them; then it ends the stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use clap::Parser;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// Events sent when the query string names no `n`.
const DEFAULT_EVENTS: u64 = 1000;

#[path = "common/listen.rs"]
mod listen;
#[path = "common/runtime.rs"]
mod runtime;

#[derive(Parser, Debug)]
#[command(about = "Plain hyper Server-Sent Events server (benchmark baseline)")]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to bind; 0 picks a free ephemeral port.
    #[arg(short, long, default_value_t = 5003)]
    port: u16,
}

/// The event stream: one `data: <i>\n\n` frame per poll, for i in 1..=last.
/// hyper polls it only when its write buffer has room, so the pace is the
/// client's.
struct Events {
    next: u64,
    last: u64,
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.next > self.last {
            return Poll::Ready(None);
        }
        let event = format!("data: {}\n\n", self.next);
        self.next += 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }

    fn is_end_stream(&self) -> bool {
        // Never true up front, even for n=0: an SSE response is a stream.
        false
    }

    fn size_hint(&self) -> SizeHint {
        // Unknown length: hyper frames the body with chunked encoding.
        SizeHint::default()
    }
}

type ResBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `n` from a query string such as `n=500&x=1`; the default when absent.
fn events_wanted(query: Option<&str>) -> Option<u64> {
    let Some(query) = query else {
        return Some(DEFAULT_EVENTS);
    };
    match query.split('&').find_map(|kv| kv.strip_prefix("n=")) {
        Some(n) => n.parse().ok(),
        None => Some(DEFAULT_EVENTS),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<ResBody> {
    let mut res = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res
}

async fn handle(req: Request<Incoming>) -> Result<Response<ResBody>, Infallible> {
    if req.uri().path() != "/events" {
        return Ok(plain(StatusCode::NOT_FOUND, "not found\n"));
    }
    if req.method() != Method::GET {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    let Some(last) = events_wanted(req.uri().query()) else {
        return Ok(plain(StatusCode::BAD_REQUEST, "bad n\n"));
    };
    let mut res = Response::new(Events { next: 1, last }.boxed());
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(res)
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    runtime::run(serve(args))?
}

async fn serve(args: Args) -> std::io::Result<()> {
    listen::serve("sse-baseline", &args.host, args.port, |stream| async move {
        // Client resets and aborted streams are normal during a benchmark.
        let _ = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service_fn(handle))
            .await;
    })
    .await
}
