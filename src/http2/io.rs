//! An h2 stream in the shapes the layers above expect: a request body
//! (`http_body::Body`, for the body pump) and a byte stream (`AsyncRead +
//! AsyncWrite`, under an RFC 8441 WebSocket).
//!
//! Flow control is the point of both.  Received bytes are released back to
//! the client's window only as they are taken, so an application that does
//! not read its body or its WebSocket stops the client on that stream
//! alone.  Writes wait for send window, so a client that does not open its
//! window holds back that stream's `$send` and nothing else.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The h2 error code behind a failed read or write, when the peer reset
/// the stream (or the whole connection went away with a code).
pub fn stream_reset(e: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.is_remote() || h2.is_go_away() {
                return h2.reason();
            }
        }
        if let Some(inner) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<h2::Error>())
        {
            return inner.reason();
        }
        next = e.source();
    }
    None
}

/// Why an HTTP/2 request body stopped, when the client is the cause: a
/// reset of the stream (naming the code) or a lost connection.  None for
/// other errors, and for errors that are not HTTP/2's.
pub fn client_departure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(code) = stream_reset(e) {
        return Some(reset_detail(code));
    }
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.is_io() {
                return Some(format!("the HTTP/2 connection was lost: {h2}"));
            }
        }
        next = e.source();
    }
    None
}

/// The `disconnect_detail` for a stream the client reset.
pub fn reset_detail(code: Reason) -> String {
    format!(
        "the client reset the stream (RST_STREAM {code:?}, error code {:#x})",
        u32::from(code)
    )
}

/// A request body read from an h2 stream.
pub struct RequestBody {
    recv: RecvStream,
    data_done: bool,
}

impl RequestBody {
    pub fn new(recv: RecvStream) -> RequestBody {
        RequestBody {
            recv,
            data_done: false,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = self.get_mut();
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Taken by the pump, which reads only as the application
                    // asks: give the client its window back for these bytes.
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => me.data_done = true,
            }
        }
        match ready!(me.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Most bytes offered to h2 per write: one frame's worth of window is
/// asked for at a time, so a large write does not reserve window that a
/// neighbouring stream could use.
const WRITE_CHUNK: usize = 16 * 1024;

/// An accepted RFC 8441 WebSocket's stream as a byte stream.
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    unread: Bytes,
    /// END_STREAM sent: our side is closed.
    ended: bool,
    /// END_STREAM received: the peer's side is closed.
    peer_ended: bool,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> StreamIo {
        StreamIo {
            send,
            recv,
            unread: Bytes::new(),
            ended: false,
            peer_ended: false,
        }
    }
}

/// A reset or lost connection, as the WebSocket layer sees it: the peer is
/// gone, and the text names the h2 code.
fn io_error(e: h2::Error) -> io::Error {
    match e.reason() {
        Some(code) if e.is_remote() => {
            io::Error::new(io::ErrorKind::ConnectionReset, reset_detail(code))
        }
        _ if e.is_io() => e
            .into_io()
            .unwrap_or_else(|| io::Error::from(io::ErrorKind::ConnectionReset)),
        _ => io::Error::new(io::ErrorKind::ConnectionReset, e),
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        while me.unread.is_empty() {
            if me.peer_ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    me.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => me.peer_ended = true,
            }
        }
        let n = me.unread.len().min(buf.remaining());
        buf.put_slice(&me.unread[..n]);
        me.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if me.ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let wanted = buf.len().min(WRITE_CHUNK);
        me.send.reserve_capacity(wanted);
        loop {
            if let Poll::Ready(reset) = me.send.poll_reset(cx) {
                let e = match reset {
                    Ok(code) => io::Error::new(io::ErrorKind::ConnectionReset, reset_detail(code)),
                    Err(e) => io_error(e),
                };
                return Poll::Ready(Err(e));
            }
            match ready!(me.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => {
                    let n = granted.min(wanted);
                    return match me.send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                        Ok(()) => Poll::Ready(Ok(n)),
                        Err(e) => Poll::Ready(Err(io_error(e))),
                    };
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes queued frames as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.ended {
            me.ended = true;
            me.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        // Dropped before both sides ended (an abort, a failed or timed-out
        // close): free the stream on both ends now.
        if !(self.ended && self.peer_ended) {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}
