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
//! held wake-up has waited [`MAX_HOLD`], so a slow application does not delay
//! the responses it sent earlier in the batch.  The reference server behaves
//! alike: its writes go out when the application yields to the event loop.
//! Outside a batch (an application's timer, I/O callback) nothing is held.

use std::cell::RefCell;
use std::task::Waker;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Head;

/// The longest a wake-up waits for the rest of its batch.
const MAX_HOLD: Duration = Duration::from_micros(500);

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

#[derive(Default)]
struct Batch {
    holding: bool,
    since: Option<Instant>,
    held: Vec<Held>,
}

impl Batch {
    fn take(&mut self) -> Vec<Held> {
        self.since = None;
        std::mem::take(&mut self.held)
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

/// Between two messages of a batch: deliver what has waited long enough.
pub fn release_overdue() {
    let held = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        match b.since {
            Some(since) if since.elapsed() >= MAX_HOLD => b.take(),
            _ => Vec::new(),
        }
    });
    for h in held {
        h.release();
    }
}

fn hold_or_release(h: Held) {
    let h = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        if !b.holding {
            return Some(h);
        }
        if b.held.is_empty() {
            b.since = Some(Instant::now());
        }
        b.held.push(h);
        None
    });
    if let Some(h) = h {
        h.release();
    }
}

/// Wake the network task, now or at the end of the batch.
pub(crate) fn wake(w: Waker) {
    hold_or_release(Held::Wake(w));
}

/// Hand the network task its response head, now or at the end of the batch.
pub(super) fn send_head(tx: oneshot::Sender<Head>, head: Head) {
    hold_or_release(Held::Head(tx, head));
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
    fn outside_a_batch_wakes_at_once() {
        let (c, w) = counter();
        wake(w);
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_batch_holds_until_released() {
        let (c, w) = counter();
        let (tx, mut rx) = oneshot::channel();
        hold();
        wake(w);
        send_head(tx, Head::Abort);
        assert_eq!(c.0.load(Ordering::SeqCst), 0, "held while the batch runs");
        assert!(rx.try_recv().is_err(), "the head is held too");
        release_overdue();
        assert_eq!(c.0.load(Ordering::SeqCst), 0, "not yet overdue");
        release();
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        assert!(matches!(rx.try_recv(), Ok(Head::Abort)));
        // Released: the next wake-up is immediate again.
        let (c2, w2) = counter();
        wake(w2);
        assert_eq!(c2.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn overdue_wakeups_leave_mid_batch() {
        let (c, w) = counter();
        hold();
        wake(w);
        std::thread::sleep(MAX_HOLD + Duration::from_millis(1));
        release_overdue();
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        release();
    }

    #[test]
    fn a_thread_that_ends_holding_still_wakes() {
        let (c, w) = counter();
        std::thread::spawn(move || {
            hold();
            wake(w);
        })
        .join()
        .unwrap();
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
    }
}
