//! The body routes that hyper-baseline (HTTP/1.1) and h2-baseline (HTTP/2)
//! both serve for `bench/bin/body-bench`, as `bench/apps/body.pl` serves
//! them on pagi-rs.  One copy, so that the two protocols' baselines do the
//! same work and only the protocol differs.  Included with `#[path]`.

use std::os::fd::AsRawFd;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH};
use hyper::{Response, StatusCode};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// `GET /stream`: this many frames of `STREAM_CHUNK` bytes (1 MiB).
const STREAM_CHUNKS: usize = 16;
const STREAM_CHUNK: usize = 64 * 1024;

/// `GET /file`: the file in frames of this many bytes.
const FILE_CHUNK: usize = 64 * 1024;

/// A complete body, for the small answers.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// 1 MiB as 16 frames of 64 KiB, every frame ready as soon as asked for:
/// what the app's 16 body events of 64 KiB are on pagi-rs.
pub fn stream_response() -> Response<Body> {
    let chunk = Bytes::from(vec![b'x'; STREAM_CHUNK]);
    let frames = (0..STREAM_CHUNKS).map(move |_| Ok(Frame::data(chunk.clone())));
    Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
}

/// The request body sent back frame by frame as it is read.
pub fn echo_response(body: Incoming) -> Response<Body> {
    Response::new(body.boxed())
}

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

/// The file at `path` with its Content-Length, read by position 64 KiB at
/// a time as hyper asks for frames (what pagi-rs does for a `file` body
/// whose bytes are in the page cache).
pub fn file_response(path: &Path) -> Response<Body> {
    let Ok(file) = std::fs::File::open(path) else {
        let mut res = Response::new(full(Bytes::new()));
        *res.status_mut() = StatusCode::NOT_FOUND;
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
    let mut res = Response::new(StreamBody::new(frames).boxed());
    res.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    res
}

/// `GET /stream-produced`: the same 16 frames of 64 KiB, made by a producer
/// task and handed over a channel with room for one frame: plain hyper
/// streaming what another task makes, with backpressure, as a pagi-rs app
/// (which runs on its interpreter's thread) streams under the 64 KiB
/// high-water mark.  hyper then writes about one frame per `writev`, as
/// pagi-rs does, where `/stream`'s frames, all ready at once, go out
/// several hundred KiB per `writev`.
pub fn produced_stream_response() -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'x'; STREAM_CHUNK]);
        for _ in 0..STREAM_CHUNKS {
            if tx.send(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let bytes = rx.recv().await?;
        Some((Ok(Frame::data(bytes)), rx))
    });
    Response::new(StreamBody::new(frames).boxed())
}
