//! Plain hyper 1.x "Hello, World!" server: the reference point that
//! `bench/bin/hello-bench` compares pagi-rs against. It does the minimum an
//! HTTP/1.1 server has to do, so the ratio shows what the embedded Perl
//! interpreter and the PAGI protocol cost on top of the network core.
//!
//! For `bench/bin/body-bench` it also serves what `bench/apps/body.pl`
//! serves: `GET /stream`, 1 MiB as 16 body frames of 64 KiB, and
//! `POST /echo`, the request body streamed back frame by frame as it is
//! read; and with `--file PATH`, `GET /file`: that file with its
//! Content-Length, read by position 64 KiB at a time as hyper asks for
//! frames (what pagi-rs does for a `file` body whose bytes are in the page
//! cache).  Every other request gets the hello world.

use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
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

    /// The file `GET /file` serves.
    #[arg(long)]
    file: Option<PathBuf>,
}

type Body = BoxBody<Bytes, hyper::Error>;

/// `GET /stream`: this many frames of `STREAM_CHUNK` bytes.
const STREAM_CHUNKS: usize = 16;
const STREAM_CHUNK: usize = 64 * 1024;

/// `GET /file`: the file in frames of this many bytes.
const FILE_CHUNK: usize = 64 * 1024;

/// The next frame of `file` at `at`: up to FILE_CHUNK bytes read straight
/// into a fresh buffer (no zeroing), None at the end or on an error.
fn read_frame(file: &std::fs::File, at: u64) -> Option<Bytes> {
    let mut buf = BytesMut::with_capacity(FILE_CHUNK);
    let spare = buf.spare_capacity_mut();
    // SAFETY: pread writes at most spare.len() bytes into the buffer's
    // spare capacity, which lives until set_len below.
    let n = unsafe {
        libc::pread(
            file.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            at as libc::off_t,
        )
    };
    if n <= 0 {
        return None;
    }
    // SAFETY: the kernel initialised the first n bytes.
    unsafe { buf.set_len(n as usize) };
    Some(buf.freeze())
}

fn file_response(path: &std::path::Path) -> Response<Body> {
    let Ok(file) = std::fs::File::open(path) else {
        let mut res = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
        *res.status_mut() = hyper::StatusCode::NOT_FOUND;
        return res;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let frames = futures_util::stream::unfold((file, 0u64), move |(file, at)| async move {
        if at >= len {
            return None;
        }
        let bytes = read_frame(&file, at)?;
        let next = at + bytes.len() as u64;
        Some((Ok(Frame::data(bytes)), (file, next)))
    });
    let mut res = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    res.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    res
}

async fn hello(
    req: Request<Incoming>,
    file: Option<Arc<PathBuf>>,
) -> Result<Response<Body>, Infallible> {
    let mut res = match (req.method(), req.uri().path()) {
        (&Method::GET, "/file") if file.is_some() => {
            file_response(file.as_deref().expect("checked"))
        }
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
    // glibc's malloc trims the heap top back to the kernel once 128 KiB of
    // it is free, until a freed block it had mapped itself (a 1 MiB body,
    // say) raises both of its thresholds: so the file route ran at 2.9k
    // requests/s, or at 6.1k after one 1 MiB echo, depending on what came
    // first.  Fixed at what pagi-rs sets for its Perl heaps, the baseline
    // is at its best from the start.
    // SAFETY: mallopt only adjusts malloc's parameters; no thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
    let args = Args::parse();
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
