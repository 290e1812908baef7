//! Wake-ups of network tasks made by the interpreter thread, held for the
//! rest of the batch of messages it is dispatching.
//!
//! Without this, every response the application sends wakes its network
//! task at once; when the tokio worker is idle that is a system call on the
//! interpreter thread and a context switch on the worker, per response, and
//! each HTTP/2 connection writes each stream's response on its own.  Held to
//! the end of the batch, the responses leave together: one wake-up of the
//! worker, and one write per connection for all of its streams.
//!
//! Holding is bounded: whatever is held goes out when the interpreter has no
//! more messages (before it sleeps), and, between messages, once the oldest
//! held wake-up has waited its [`Hold`]'s limit, so a slow application does
//! not delay the responses it sent earlier in the batch.  The reference
//! server behaves alike: its writes go out when the application yields to
//! the event loop.  Outside a batch (an application's timer, I/O callback)
//! nothing is held.
//!
//! Only HTTP/2 requests' wake-ups are held for the whole batch (up to
//! [`BATCH_HOLD`]): the streams of a connection share its writes.  An
//! HTTP/1.1 connection or a WebSocket's writer (over either protocol) works
//! for one exchange, and holding its wake-up gains only the amortised
//! system call, while the network thread idles: with every response held to
//! the end of the batch, the two threads took turns (the interpreter ran
//! the batch of all 50 connections of `hello-bench` while the network
//! waited, then the network wrote while the interpreter waited) and a
//! quarter of the machine's CPU time went unused.  Released after
//! [`BRIEF_HOLD`], the network writes the first responses while the
//! interpreter runs the rest: about a seventh more requests/s with a lower
//! p99 (bench/README.md).  HTTP/2 gains requests/s too when released early,
//! but its p99 grows by a third, so it keeps the batch.
//!
//! Nor are brief wake-ups held once fewer than [`FEW_REMAINING`] messages
//! are left in the batch: with 10 connections each response waited for
//! most of a batch of 10 while the network thread idled, and released then
//! hello world served a third more requests/s (50 and 256 connections
//! unchanged).  An HTTP/1.1 body piece of [`UNHELD_BODY_BYTES`] or more is
//! not held at all (exchange/send.rs): its write is worth a wake-up of its
//! own.

use std::cell::RefCell;
use std::task::Waker;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Head;

/// How long an HTTP/1.1 or WebSocket wake-up waits for more of its batch:
/// a few requests' worth, enough to wake an idle network thread once for
/// several responses.
const BRIEF_HOLD: Duration = Duration::from_micros(50);

/// Below this many messages left in the batch, brief wake-ups are not
/// held (see `release_overdue`).
const FEW_REMAINING: usize = 16;

/// The longest an HTTP/2 wake-up waits for the rest of its batch.
const BATCH_HOLD: Duration = Duration::from_micros(500);

/// A body piece of at least this many bytes wakes an HTTP/1.1 network task
/// at once.  Its write (15-25 µs for 64 KiB on loopback) dwarfs the
/// wake-up it would share with others, and held for the rest of the batch
/// it left the socket idle: a 1 MiB response streamed in 64 KiB sends
/// waits for a drain every other send, and each drain's answer waited for
/// the rest of the batch before the network heard of it.
pub(crate) const UNHELD_BODY_BYTES: usize = 16 * 1024;

/// How long a wake-up may be held, by what its network task writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hold {
    /// The task writes one exchange's bytes alone (HTTP/1.1, a WebSocket).
    Brief,
    /// An HTTP/2 stream, whose connection writes for all its streams.
    Batch,
}

enum Held {
    Wake(Waker),
    Head(oneshot::Sender<Head>, Head),
}

impl Held {
    fn release(self) {
        match self {
            Held::Wake(w) => w.wake(),
            // The receiver gone means the network task ended: nothing to tell.
            Held::Head(tx, head) => {
                let _ = tx.send(head);
            }
        }
    }
}

/// The wake-ups held under one limit, oldest first.
#[derive(Default)]
struct Queue {
    since: Option<Instant>,
    held: Vec<Held>,
}

impl Queue {
    fn push(&mut self, h: Held) {
        if self.held.is_empty() {
            self.since = Some(Instant::now());
        }
        self.held.push(h);
    }

    fn take(&mut self) -> Vec<Held> {
        self.since = None;
        std::mem::take(&mut self.held)
    }

    fn take_if_waited(&mut self, limit: Duration) -> Vec<Held> {
        match self.since {
            Some(since) if since.elapsed() >= limit => self.take(),
            _ => Vec::new(),
        }
    }
}

#[derive(Default)]
struct Batch {
    holding: bool,
    brief: Queue,
    batch: Queue,
}

impl Batch {
    fn take(&mut self) -> Vec<Held> {
        let mut all = self.brief.take();
        all.append(&mut self.batch.take());
        all
    }
}

impl Drop for Batch {
    /// A thread that ends with wake-ups held still delivers them.
    fn drop(&mut self) {
        for h in self.take() {
            h.release();
        }
    }
}

thread_local! {
    static BATCH: RefCell<Batch> = RefCell::new(Batch::default());
}

/// The interpreter took a batch of messages: hold wake-ups from now on.
pub fn hold() {
    BATCH.with(|b| b.borrow_mut().holding = true);
}

/// The batch is over (or the interpreter is about to sleep): deliver what
/// was held and stop holding.
pub fn release() {
    let held = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        b.holding = false;
        b.take()
    });
    // Outside the borrow: waking runs tokio code, never ours, but there is
    // no reason to find out.
    for h in held {
        h.release();
    }
}

/// Between two messages of a batch, with `remaining` still to run: deliver
/// what has waited long enough.  Brief wake-ups also go once fewer than
/// [`FEW_REMAINING`] messages remain: held, they would each wait for most
/// of a short batch, while the network thread idles.
pub fn release_overdue(remaining: usize) {
    let held = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        let mut due = if remaining < FEW_REMAINING {
            b.brief.take()
        } else {
            b.brief.take_if_waited(BRIEF_HOLD)
        };
        due.append(&mut b.batch.take_if_waited(BATCH_HOLD));
        due
    });
    for h in held {
        h.release();
    }
}

fn hold_or_release(h: Held, hold: Hold) {
    let h = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        if !b.holding {
            return Some(h);
        }
        match hold {
            Hold::Brief => b.brief.push(h),
            Hold::Batch => b.batch.push(h),
        }
        None
    });
    if let Some(h) = h {
        h.release();
    }
}

/// Wake the network task, now or later in the batch.
pub(crate) fn wake(w: Waker, hold: Hold) {
    hold_or_release(Held::Wake(w), hold);
}

/// Hand the network task its response head, now or later in the batch.
pub(super) fn send_head(tx: oneshot::Sender<Head>, head: Head, hold: Hold) {
    hold_or_release(Held::Head(tx, head), hold);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    /// A waker that counts its wake-ups (shared with other modules' tests).
    pub(crate) struct Counter(pub(crate) AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(crate) fn counter() -> (Arc<Counter>, Waker) {
        let c = Arc::new(Counter(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn brief_wakeups_go_once_few_messages_remain() {
        let (brief, w1) = counter();
        let (batch, w2) = counter();
        hold();
        wake(w1, Hold::Brief);
        wake(w2, Hold::Batch);
        release_overdue(FEW_REMAINING);
        assert_eq!(brief.0.load(Ordering::SeqCst), 0, "a long batch holds them");
        release_overdue(FEW_REMAINING - 1);
        assert_eq!(brief.0.load(Ordering::SeqCst), 1, "near its end, not");
        assert_eq!(batch.0.load(Ordering::SeqCst), 0, "HTTP/2 keeps the batch");
        release();
        assert_eq!(batch.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn outside_a_batch_wakes_at_once() {
        let (c, w) = counter();
        wake(w, Hold::Batch);
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_batch_holds_until_released() {
        let (c, w) = counter();
        let (tx, mut rx) = oneshot::channel();
        hold();
        wake(w, Hold::Batch);
        send_head(tx, Head::Abort, Hold::Batch);
        assert_eq!(c.0.load(Ordering::SeqCst), 0, "held while the batch runs");
        assert!(rx.try_recv().is_err(), "the head is held too");
        release_overdue(usize::MAX);
        assert_eq!(c.0.load(Ordering::SeqCst), 0, "not yet overdue");
        release();
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        assert!(matches!(rx.try_recv(), Ok(Head::Abort)));
        // Released: the next wake-up is immediate again.
        let (c2, w2) = counter();
        wake(w2, Hold::Batch);
        assert_eq!(c2.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn overdue_wakeups_leave_mid_batch() {
        let (c, w) = counter();
        hold();
        wake(w, Hold::Batch);
        std::thread::sleep(BATCH_HOLD + Duration::from_millis(1));
        release_overdue(usize::MAX);
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        release();
    }

    #[test]
    fn brief_wakeups_leave_before_the_batch_ends_and_http2_ones_stay() {
        let (brief, w) = counter();
        let (batched, w2) = counter();
        let start = Instant::now();
        hold();
        wake(w2, Hold::Batch);
        wake(w, Hold::Brief);
        std::thread::sleep(BRIEF_HOLD + Duration::from_micros(100));
        release_overdue(usize::MAX);
        assert_eq!(brief.0.load(Ordering::SeqCst), 1, "brief: out mid-batch");
        // Timing-dependent only if this thread was descheduled for longer
        // than the HTTP/2 limit.
        if start.elapsed() < BATCH_HOLD {
            assert_eq!(batched.0.load(Ordering::SeqCst), 0, "HTTP/2: held on");
        }
        // A later brief wake-up starts its own wait, and the batch's end
        // delivers everything.
        let (again, w3) = counter();
        let woken = Instant::now();
        wake(w3, Hold::Brief);
        release_overdue(usize::MAX);
        if woken.elapsed() < BRIEF_HOLD {
            assert_eq!(again.0.load(Ordering::SeqCst), 0);
        }
        release();
        assert_eq!(batched.0.load(Ordering::SeqCst), 1);
        assert_eq!(again.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_thread_that_ends_holding_still_wakes() {
        let (c, w) = counter();
        std::thread::spawn(move || {
            hold();
            wake(w, Hold::Batch);
        })
        .join()
        .unwrap();
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
    }
}
