//! Plain hyper 1.x "Hello, World!" server: the reference point that
//! `bench/bin/hello-bench` compares pagi-rs against. It does the minimum an
//! HTTP/1.1 server has to do, so the ratio shows what the embedded Perl
//! interpreter and the PAGI protocol cost on top of the network core.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] = b"Hello, World!";

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
    let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
    // The benchmark scripts parse this line to learn the ephemeral port.
    eprintln!(
        "hyper-baseline: listening on http://{}/",
        listener.local_addr()?
    );

    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Typically EMFILE under heavy load: back off instead of spinning.
                eprintln!("hyper-baseline: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Same as pagi-rs: small responses should not wait for Nagle.
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(hello));
            // Client resets and aborted requests are normal during a benchmark.
            let _ = conn.await;
        });
    }
}
