//! The queue from a WebSocket session to its writer task.
//!
//! A tokio channel wakes the writer on every send.  Most sends come from the
//! interpreter thread, in a batch of messages for many sockets, and a wake-up
//! of an idle tokio worker is a system call (an eventfd write) made by the
//! interpreter: 7 % of its time in a 50-client echo.  This queue wakes its
//! writer through `exchange::wakeups` instead, which holds the wake-up to
//! the end of the interpreter's batch, as it does for HTTP responses; on any
//! other thread the wake-up is immediate.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

struct Shared<T> {
    items: VecDeque<T>,
    /// The writer, waiting for an item.
    waker: Option<Waker>,
    /// The sending side is gone: once empty, the queue has ended.
    sender_gone: bool,
    /// The writer is gone: items are dropped as they come.
    receiver_gone: bool,
}

struct Queue<T>(Mutex<Shared<T>>);

impl<T> Queue<T> {
    /// Nothing here can panic with the lock held but VecDeque's own
    /// operations, which leave it valid: recovering from poison is sound.
    fn lock(&self) -> MutexGuard<'_, Shared<T>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct OutboxSender<T>(Arc<Queue<T>>);
pub struct OutboxReceiver<T>(Arc<Queue<T>>);

pub fn outbox<T>() -> (OutboxSender<T>, OutboxReceiver<T>) {
    let queue = Arc::new(Queue(Mutex::new(Shared {
        items: VecDeque::new(),
        waker: None,
        sender_gone: false,
        receiver_gone: false,
    })));
    (OutboxSender(queue.clone()), OutboxReceiver(queue))
}

impl<T> OutboxSender<T> {
    /// Queue `item` for the writer; dropped if the writer is gone.
    pub fn send(&self, item: T) {
        let waker = {
            let mut q = self.0.lock();
            if q.receiver_gone {
                return;
            }
            q.items.push_back(item);
            q.waker.take()
        };
        if let Some(w) = waker {
            crate::exchange::wakeups::wake(w, crate::exchange::wakeups::Hold::Brief);
        }
    }
}

impl<T> Drop for OutboxSender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut q = self.0.lock();
            q.sender_gone = true;
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> OutboxReceiver<T> {
    /// The next item, waiting for one; None once the sender is gone and
    /// everything it sent has been taken.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            let mut q = self.0.lock();
            if let Some(item) = q.items.pop_front() {
                return Poll::Ready(Some(item));
            }
            if q.sender_gone {
                return Poll::Ready(None);
            }
            if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                q.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        self.0.lock().items.pop_front()
    }
}

impl<T> Drop for OutboxReceiver<T> {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.receiver_gone = true;
        q.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::wakeups::tests::counter;
    use std::future::Future;
    use std::sync::atomic::Ordering;
    use std::task::Context;

    /// Poll `recv` once with `waker`.
    fn poll_once(rx: &mut OutboxReceiver<u32>, waker: &Waker) -> Poll<Option<u32>> {
        let mut cx = Context::from_waker(waker);
        let fut = std::pin::pin!(rx.recv());
        fut.poll(&mut cx)
    }

    #[test]
    fn items_arrive_in_order_and_a_waiting_writer_is_woken_once() {
        let (tx, mut rx) = outbox::<u32>();
        let (wakes, waker) = counter();
        assert_eq!(poll_once(&mut rx, &waker), Poll::Pending);
        tx.send(1);
        tx.send(2);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "one wake-up for both");
        assert_eq!(poll_once(&mut rx, &waker), Poll::Ready(Some(1)));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn in_a_batch_the_wake_up_waits_for_its_end() {
        let (tx, mut rx) = outbox::<u32>();
        let (wakes, waker) = counter();
        assert_eq!(poll_once(&mut rx, &waker), Poll::Pending);
        crate::exchange::wakeups::hold();
        tx.send(7);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "held in the batch");
        crate::exchange::wakeups::release();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll_once(&mut rx, &waker), Poll::Ready(Some(7)));
    }

    #[test]
    fn the_queue_ends_after_the_sender_and_drops_items_without_a_writer() {
        let (tx, mut rx) = outbox::<u32>();
        let (_, waker) = counter();
        tx.send(3);
        drop(tx);
        assert_eq!(poll_once(&mut rx, &waker), Poll::Ready(Some(3)));
        assert_eq!(poll_once(&mut rx, &waker), Poll::Ready(None));

        let (tx, rx) = outbox::<Arc<()>>();
        drop(rx);
        let item = Arc::new(());
        tx.send(item.clone());
        assert_eq!(Arc::strong_count(&item), 1, "dropped, not queued");
    }
}
