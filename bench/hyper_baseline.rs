//! Plain hyper 1.x "Hello, World!" server: the reference point that
//! `bench/bin/hello-bench` compares pagi-rs against. It does the minimum an
//! HTTP/1.1 server has to do, so the ratio shows what the embedded Perl
//! interpreter and the PAGI protocol cost on top of the network core.
//!
//! For `bench/bin/body-bench` it also serves what `bench/apps/body.pl`
//! serves: `GET /stream`, 1 MiB as 16 body frames of 64 KiB, and
//! `POST /echo`, the request body streamed back frame by frame as it is
//! read.  Every other request gets the hello world.

use std::convert::Infallible;

use bytes::Bytes;
use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Method;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const BODY: &[u8] = b"Hello, World!";

#[path = "common/listen.rs"]
mod listen;

#[derive(Parser, Debug)]
#[command(about = "Plain hyper hello-world server (benchmark baseline)")]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to bind; 0 picks a free ephemeral port.
    #[arg(long, default_value_t = 5001)]
    port: u16,
}

type Body = BoxBody<Bytes, hyper::Error>;

/// `GET /stream`: this many frames of `STREAM_CHUNK` bytes.
const STREAM_CHUNKS: usize = 16;
const STREAM_CHUNK: usize = 64 * 1024;

async fn hello(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut res = match (req.method(), req.uri().path()) {
        (&Method::GET, "/stream") => {
            let chunk = Bytes::from(vec![b'x'; STREAM_CHUNK]);
            let frames = (0..STREAM_CHUNKS).map(move |_| Ok(Frame::data(chunk.clone())));
            let body = StreamBody::new(futures_util::stream::iter(frames));
            Response::new(BodyExt::boxed(body))
        }
        (&Method::POST, "/echo") => Response::new(req.into_body().boxed()),
        _ => {
            let mut res = Response::new(
                Full::new(Bytes::from_static(BODY))
                    .map_err(|never| match never {})
                    .boxed(),
            );
            res.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(BODY.len()));
            res
        }
    };
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(res)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    listen::serve(
        "hyper-baseline",
        &args.host,
        args.port,
        |stream| async move {
            // Client resets and aborted requests are normal during a benchmark.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
        },
    )
    .await
}
