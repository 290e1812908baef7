//! Whole TCP segments while a response body streams in bulk.
//!
//! A write that is not a multiple of the connection's segment size ends in a
//! short segment.  Where segments are large that is costly: on loopback (a
//! segment of 65,483 bytes) a 64 KiB body frame plus its chunk framing is 62
//! bytes over one segment, so every write of a streamed response (two or four
//! such frames) left as full segments and one short one.  The short ones were
//! a quarter of the segments, and cost the server's network thread half
//! again as much CPU per MiB, the client more wake-ups, and the stream a
//! quarter of its rate (bench/README.md, "Where issue 11 stands (session
//! 21)").
//!
//! So while an application streams faster than the socket drains (a send of
//! it waited for the high-water mark's drain: [`BulkHint`]), this writer sends
//! only whole segments and keeps the remainder, under one segment, in hyper's
//! buffer: the application's next frame is on its way, and the remainder
//! leaves with it.  The remainder waits at most [`HOLD_BOUND`]; a body's end
//! never waits, because the exchange clears the hint before hyper takes its
//! last frame.  Without the hint every write passes straight through.

use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::exchange::BulkHint;

/// Longest a remainder under one segment waits for the next frame.  The
/// timer wheel's resolution is a millisecond, so it fires after one to two.
pub const HOLD_BOUND: Duration = Duration::from_millis(1);

/// Shaped writes between two questions to the socket about its segment
/// size.
const SEGMENT_REFRESH: u32 = 32;

/// Most buffers considered in one write (hyper passes at most 64).
const MAX_SLICES: usize = 64;

/// The socket under a connection's HTTP/1.1, writing whole segments while
/// [`BulkHint`] says more body follows at once.
pub struct SegmentWriter<S> {
    inner: S,
    shaping: Option<Shaping>,
}

struct Shaping {
    /// The TCP socket `inner` owns, asked for its current segment size.
    fd: RawFd,
    hint: Arc<BulkHint>,
    /// Ends a hold after [`HOLD_BOUND`]; made at the first hold.
    timer: Option<Pin<Box<Sleep>>>,
    /// A remainder is held and `timer` runs for it.
    holding: bool,
    /// The socket's segment size, asked at the start of each stretch of
    /// bulk writes and every [`SEGMENT_REFRESH`] writes in it (a system
    /// call per write was 1.3 % of the network thread).  It moves: early in
    /// a connection the kernel bounds it by half the peer's window.
    segment: Option<usize>,
    writes_since_asked: u32,
    /// Holds so far, and how many of them lasted the whole bound (logged
    /// at debug level when the connection ends).
    holds: u64,
    holds_to_bound: u64,
}

/// What to do with one write.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Write it all.
    All,
    /// Write this many bytes from the front: whole segments.
    Prefix(usize),
    /// Less than one segment: keep it for the next frame.
    Hold,
}

/// The plan for `total` bytes on a socket whose segments hold `segment`.
fn plan(total: usize, segment: usize) -> Plan {
    if segment == 0 {
        return Plan::All;
    }
    let whole = total - total % segment;
    if whole == total {
        Plan::All
    } else if whole == 0 {
        Plan::Hold
    } else {
        Plan::Prefix(whole)
    }
}

impl<S> SegmentWriter<S> {
    /// `fd`: the TCP socket that `inner` owns, or None (TLS, Unix sockets)
    /// for a writer that never holds anything.
    pub fn new(inner: S, fd: Option<RawFd>, hint: Option<Arc<BulkHint>>) -> SegmentWriter<S> {
        let shaping = fd.zip(hint).map(|(fd, hint)| Shaping {
            fd,
            hint,
            timer: None,
            holding: false,
            segment: None,
            writes_since_asked: 0,
            holds: 0,
            holds_to_bound: 0,
        });
        SegmentWriter { inner, shaping }
    }

    /// How much of `total` bytes to write now; Pending while a remainder is
    /// held (woken by the timer, or by the next frame through hyper).
    fn plan_write(&mut self, cx: &mut Context<'_>, total: usize) -> Poll<Plan> {
        let Some(sh) = self.shaping.as_mut() else {
            return Poll::Ready(Plan::All);
        };
        if !sh.hint.is_set() {
            sh.stop_holding();
            sh.segment = None;
            return Poll::Ready(Plan::All);
        }
        sh.writes_since_asked += 1;
        if sh.writes_since_asked >= SEGMENT_REFRESH {
            sh.segment = None;
        }
        let segment = match sh.segment {
            Some(segment) => segment,
            None => {
                sh.writes_since_asked = 0;
                *sh.segment.insert(segment_size(sh.fd))
            }
        };
        let plan = plan(total, segment);
        if plan != Plan::Hold {
            sh.stop_holding();
            return Poll::Ready(plan);
        }
        let timer = sh
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(HOLD_BOUND)));
        if !sh.holding {
            timer.as_mut().reset(Instant::now() + HOLD_BOUND);
            sh.holding = true;
            sh.holds += 1;
            // hyper flushes before it polls the body again when its buffer
            // was full, and then the body has no waker to call when the
            // next frame comes: one more turn lets hyper poll it now.
            cx.waker().wake_by_ref();
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Nothing followed in time: the app is not streaming in bulk after all.
        sh.holding = false;
        sh.holds_to_bound += 1;
        sh.hint.clear();
        Poll::Ready(Plan::All)
    }
}

impl Shaping {
    fn stop_holding(&mut self) {
        if std::mem::take(&mut self.holding) {
            if let Some(timer) = self.timer.as_mut() {
                if timer.is_elapsed() {
                    // What ended it was the timer's wake-up.
                    self.holds_to_bound += 1;
                }
                // Parked far off rather than dropped: no wake-up for a hold
                // that is over, and no allocation for the next one.
                timer
                    .as_mut()
                    .reset(Instant::now() + Duration::from_secs(3600));
            }
        }
    }
}

impl<S> Drop for SegmentWriter<S> {
    fn drop(&mut self) {
        if let Some(sh) = self.shaping.as_ref().filter(|sh| sh.holds > 0) {
            tracing::debug!(
                "whole-segment writes: {} holds, {} lasted the whole bound",
                sh.holds,
                sh.holds_to_bound
            );
        }
    }
}

/// The socket's current segment size (what the kernel cuts writes by), or
/// 0 if it cannot say.
fn segment_size(fd: RawFd) -> usize {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is the socket the writer's stream owns, open while the
    // writer lives; getsockopt writes at most `len` bytes into `value`,
    // which lives for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && value > 0 {
        value as usize
    } else {
        0
    }
}

/// The first `n` bytes of `bufs`, as slices into `out`.
fn front<'b>(bufs: &'b [io::IoSlice<'_>], n: usize, out: &mut [io::IoSlice<'b>]) -> usize {
    let mut left = n;
    let mut count = 0;
    for (slot, buf) in out.iter_mut().zip(bufs) {
        if left == 0 {
            break;
        }
        let bytes: &'b [u8] = buf;
        let take = bytes.len().min(left);
        *slot = io::IoSlice::new(&bytes[..take]);
        left -= take;
        count += 1;
    }
    count
}

impl<S: AsyncRead + Unpin> AsyncRead for SegmentWriter<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SegmentWriter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = match std::task::ready!(self.plan_write(cx, buf.len())) {
            Plan::Prefix(n) => n,
            Plan::All | Plan::Hold => buf.len(),
        };
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.shaping.is_none() {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        let bufs = &bufs[..bufs.len().min(MAX_SLICES)];
        let total = bufs.iter().map(|b| b.len()).sum();
        match std::task::ready!(self.plan_write(cx, total)) {
            Plan::Prefix(n) => {
                let mut out = [io::IoSlice::new(&[]); MAX_SLICES];
                let count = front(bufs, n, &mut out);
                Pin::new(&mut self.inner).poll_write_vectored(cx, &out[..count])
            }
            Plan::All | Plan::Hold => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_cut_to_whole_segments_and_a_short_one_is_held() {
        assert_eq!(plan(2 * 65_545, 65_483), Plan::Prefix(2 * 65_483));
        assert_eq!(plan(65_483, 65_483), Plan::All);
        assert_eq!(plan(3 * 1448, 1448), Plan::All);
        assert_eq!(plan(124, 65_483), Plan::Hold);
        assert_eq!(plan(0, 65_483), Plan::All);
        assert_eq!(plan(10, 0), Plan::All, "no segment size: no shaping");
    }

    #[test]
    fn the_front_of_a_write_keeps_buffer_boundaries() {
        let (a, b, c) = (vec![1u8; 7], vec![2u8; 100], vec![3u8; 2]);
        let bufs = [
            io::IoSlice::new(&a),
            io::IoSlice::new(&b),
            io::IoSlice::new(&c),
        ];
        let mut out = [io::IoSlice::new(&[]); MAX_SLICES];
        let count = front(&bufs, 50, &mut out);
        assert_eq!(count, 2);
        assert_eq!(&*out[0], &a[..]);
        assert_eq!(&*out[1], &b[..43]);
        let count = front(&bufs, 109, &mut out);
        assert_eq!(count, 3);
        assert_eq!(out[..count].iter().map(|s| s.len()).sum::<usize>(), 109);
    }
}
