//! Plain hyper 1.x "Hello, World!" server: the reference point that
//! `bench/bin/hello-bench` compares pagi-rs against. It does the minimum an
//! HTTP/1.1 server has to do, so the ratio shows what the embedded Perl
//! interpreter and the PAGI protocol cost on top of the network core.

use std::convert::Infallible;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
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

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(Bytes::from_static(BODY)));
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(BODY.len()));
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
