//! How long a connection's writes have waited on a client that takes
//! nothing.  A client that stops reading (its TCP window shut) would
//! otherwise hold its connection, the app's pending send and the bytes
//! queued for it for as long as it likes; `--timeout` bounds that.  A slow
//! client that takes a byte now and then is never stalled.
//!
//! An HTTP/1.1 connection and a WebSocket write through [`Watched`], and
//! each checks [`WriteStall::deadline`] on a timer it already has (the
//! connection's in `http1::connection::client_overdue`, the WebSocket
//! reader's).

use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `WriteStall::blocked_since` while the socket takes what is written.
const NOT_BLOCKED: u64 = u64::MAX;

/// When a write last found the socket full with nothing taken since.
pub struct WriteStall {
    opened: Instant,
    /// Nanoseconds after `opened`, or [`NOT_BLOCKED`].
    blocked_since: AtomicU64,
}

impl Default for WriteStall {
    fn default() -> WriteStall {
        WriteStall {
            opened: Instant::now(),
            blocked_since: AtomicU64::new(NOT_BLOCKED),
        }
    }
}

impl WriteStall {
    /// When something must have been written by, if a write is waiting:
    /// `timeout` after the socket first refused more bytes.
    pub fn deadline(&self, timeout: Duration) -> Option<Instant> {
        match self.blocked_since.load(Ordering::Acquire) {
            NOT_BLOCKED => None,
            since => Some(self.opened + Duration::from_nanos(since) + timeout),
        }
    }

    /// What a write to the socket came to: nothing taken starts (or goes
    /// on with) a stall, bytes taken end it.  Called for every write, so
    /// the clock is read only when a stall begins.
    pub fn note<T>(&self, result: &Poll<io::Result<T>>, wrote_bytes: impl FnOnce(&T) -> bool) {
        let blocked = match result {
            Poll::Pending => true,
            Poll::Ready(Ok(done)) if wrote_bytes(done) => false,
            // An error ends the connection anyway; a zero-byte write or a
            // flush says nothing about the client.
            Poll::Ready(_) => return,
        };
        let stalled = self.blocked_since.load(Ordering::Relaxed) != NOT_BLOCKED;
        if blocked && !stalled {
            let since = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(NOT_BLOCKED - 1);
            self.blocked_since.store(since, Ordering::Release);
        } else if !blocked && stalled {
            self.blocked_since.store(NOT_BLOCKED, Ordering::Release);
        }
    }
}

/// A transport whose writes are noted in a [`WriteStall`].
pub struct Watched<IO> {
    inner: IO,
    stall: Arc<WriteStall>,
}

impl<IO> Watched<IO> {
    pub fn new(inner: IO, stall: Arc<WriteStall>) -> Watched<IO> {
        Watched { inner, stall }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.stall.note(&result, |n| *n > 0);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.stall.note(&result, |n| *n > 0);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A flush that waits is a write that waits; one that finishes took
        // nothing new.
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.stall.note(&result, |_| false);
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Make closing `fd` reset the connection (SO_LINGER of 0) rather than
/// queue a FIN behind bytes the client is not reading: the kernel frees the
/// socket and its buffer (megabytes, when the window shut) at once instead
/// of probing the shut window for minutes after the server let go.
pub fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is the connection's socket, open until its `serve`
    // returns and drops it; setsockopt only reads the struct for its length.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if set != 0 {
        tracing::debug!(
            "cannot set SO_LINGER on a stalled connection: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_lasts_from_the_first_refused_write_to_the_next_byte_taken() {
        let stall = WriteStall::default();
        let timeout = Duration::from_secs(60);
        assert_eq!(stall.deadline(timeout), None, "nothing written yet");

        let before = Instant::now();
        stall.note::<usize>(&Poll::Pending, |n| *n > 0);
        let first = stall
            .deadline(timeout)
            .expect("a refused write starts a stall");
        assert!(first >= before + timeout && first <= Instant::now() + timeout);

        // More refusals, a flush that waits or finishes, a zero-byte write
        // and an error neither end the stall nor move its start.
        std::thread::sleep(Duration::from_millis(5));
        stall.note::<usize>(&Poll::Pending, |n| *n > 0);
        stall.note::<()>(&Poll::Pending, |_| false);
        stall.note(&Poll::Ready(Ok(())), |_| false);
        stall.note(&Poll::Ready(Ok(0usize)), |n| *n > 0);
        stall.note::<usize>(&Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())), |n| {
            *n > 0
        });
        assert_eq!(stall.deadline(timeout), Some(first));

        stall.note(&Poll::Ready(Ok(1usize)), |n| *n > 0);
        assert_eq!(stall.deadline(timeout), None, "a byte taken ends it");

        std::thread::sleep(Duration::from_millis(5));
        stall.note::<usize>(&Poll::Pending, |n| *n > 0);
        let second = stall.deadline(timeout).expect("a new stall");
        assert!(second > first, "timed from its own start");
    }

    #[tokio::test]
    async fn a_watched_transport_notes_what_its_writes_come_to() {
        // A pipe of 64 bytes: the first write fills it, the next waits.
        let (ours, mut theirs) = tokio::io::duplex(64);
        let stall = Arc::new(WriteStall::default());
        let mut watched = Watched::new(ours, stall.clone());
        let timeout = Duration::from_secs(60);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        watched.write_all(&[1; 64]).await.unwrap();
        assert_eq!(stall.deadline(timeout), None);
        let waiting = tokio::time::timeout(Duration::from_millis(50), watched.write_all(&[2; 8]));
        assert!(waiting.await.is_err(), "the full pipe takes nothing");
        assert!(stall.deadline(timeout).is_some(), "so the write is stalled");
        let mut taken = [0; 64];
        theirs.read_exact(&mut taken).await.unwrap();
        watched.write_all(&[3; 8]).await.unwrap();
        assert_eq!(stall.deadline(timeout), None, "bytes went: no stall");
    }
}
