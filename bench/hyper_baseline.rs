//! Plain hyper 1.x "Hello, World!" server: the reference point that
//! `bench/bin/hello-bench` compares pagi-rs against. It does the minimum an
//! HTTP/1.1 server has to do, so the ratio shows what the embedded Perl
//! interpreter and the PAGI protocol cost on top of the network core.
//!
//! For `bench/bin/body-bench` it also serves what `bench/apps/body.pl`
//! serves: `GET /stream`, 1 MiB as 16 body frames of 64 KiB (and
//! `GET /stream-produced`, the same frames made by a producer task), and
//! `POST /echo`, the request body streamed back frame by frame as it is
//! read; and with `--file PATH`, `GET /file`: that file with its
//! Content-Length, read by position 64 KiB at a time as hyper asks for
//! frames (what pagi-rs does for a `file` body whose bytes are in the page
//! cache).  Every other request gets the hello world.  h2-baseline serves
//! the same three over HTTP/2 (`bench/common/bodies.rs`).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Method;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const BODY: &[u8] = b"Hello, World!";

#[path = "common/bodies.rs"]
mod bodies;
#[path = "common/listen.rs"]
mod listen;
#[path = "common/runtime.rs"]
mod runtime;

use bodies::Body;

#[derive(Parser, Debug)]
#[command(about = "Plain hyper hello-world server (benchmark baseline)")]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to bind; 0 picks a free ephemeral port.
    #[arg(long, default_value_t = 5001)]
    port: u16,

    /// The file `GET /file` serves.
    #[arg(long)]
    file: Option<PathBuf>,
}

async fn hello(
    req: Request<Incoming>,
    file: Option<Arc<PathBuf>>,
) -> Result<Response<Body>, Infallible> {
    let mut res = match (req.method(), req.uri().path()) {
        (&Method::GET, "/file") if file.is_some() => {
            bodies::file_response(file.as_deref().expect("checked"))
        }
        (&Method::GET, "/stream") => bodies::stream_response(),
        (&Method::GET, "/stream-produced") => bodies::produced_stream_response(),
        (&Method::POST, "/echo") => bodies::echo_response(req.into_body()),
        _ => {
            let mut res = Response::new(bodies::full(Bytes::from_static(BODY)));
            res.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(BODY.len()));
            res
        }
    };
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(res)
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    runtime::run(serve(args))?
}

async fn serve(args: Args) -> std::io::Result<()> {
    let file = args.file.map(Arc::new);
    listen::serve("hyper-baseline", &args.host, args.port, move |stream| {
        let file = file.clone();
        async move {
            // Client resets and aborted requests are normal during a benchmark.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| hello(req, file.clone())),
                )
                .await;
        }
    })
    .await
}
