//! A future polled only when it has been woken.
//!
//! `tokio::select!` polls every branch each time the task wakes.  A
//! connection task wakes several times per request (the socket, the
//! response from the interpreter), and its branches for shutdown and
//! `pagi.connection->abort` cost more to poll than they ever do: each is a
//! `watch` or `Notify` future that locks and re-registers a waiter on every
//! poll (about a thousand instructions per hello-world request together,
//! callgrind).  Wrapped in a [`Dormant`], they are polled once to register,
//! then again only after something woke them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Polls `future` only when its own waker was called since the last poll
/// (and on the first poll).  The task's waker is kept, so a wake-up of the
/// inner future wakes the task.
pub struct Dormant<F> {
    future: Pin<Box<F>>,
    alarm: Arc<Alarm>,
    inner_waker: Waker,
}

/// The inner future's waker: marks the future due and wakes the task.
struct Alarm {
    due: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waker) = task.as_ref() {
            waker.wake_by_ref();
        }
    }
}

impl<F: Future> Dormant<F> {
    pub fn new(future: F) -> Dormant<F> {
        let alarm = Arc::new(Alarm {
            due: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Dormant {
            future: Box::pin(future),
            inner_waker: Waker::from(alarm.clone()),
            alarm,
        }
    }
}

impl<F: Future> Future for Dormant<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        {
            let mut task = self.alarm.task.lock().unwrap_or_else(|e| e.into_inner());
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        // Cleared before the poll: a wake-up during it counts for the next.
        if !self.alarm.due.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        let mut inner_cx = Context::from_waker(&this.inner_waker);
        this.future.as_mut().poll(&mut inner_cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::Notify;

    /// Counts its polls; ready once `notify` fired.
    async fn counted(notify: Arc<Notify>, polls: Arc<AtomicUsize>) -> &'static str {
        let mut notified = std::pin::pin!(notify.notified());
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            notified.as_mut().poll(cx)
        })
        .await;
        "woken"
    }

    #[tokio::test]
    async fn polled_once_to_register_then_only_when_woken() {
        let notify = Arc::new(Notify::new());
        let polls = Arc::new(AtomicUsize::new(0));
        let mut dormant = std::pin::pin!(Dormant::new(counted(notify.clone(), polls.clone())));
        let other = Arc::new(Notify::new());
        // The task wakes often for other reasons: the dormant future is not
        // polled for them.
        for _ in 0..100 {
            let mut other_wait = std::pin::pin!(other.notified());
            tokio::select! {
                biased;
                _ = &mut dormant => panic!("ready before it was woken"),
                _ = other_wait.as_mut() => {}
                _ = tokio::task::yield_now() => {}
            }
            other.notify_one();
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled only to register");
        // Its own wake-up, from another task, reaches it.
        let waker = tokio::spawn({
            let notify = notify.clone();
            async move { notify.notify_one() }
        });
        assert_eq!(dormant.await, "woken");
        waker.await.unwrap();
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_wake_up_during_the_poll_is_not_lost() {
        // The inner future wakes itself while being polled, then is ready
        // on the next poll: the wake-up must bring that poll.
        let mut first = true;
        let future = std::future::poll_fn(move |cx| {
            if first {
                first = false;
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(7)
            }
        });
        let got =
            tokio::time::timeout(std::time::Duration::from_secs(5), Dormant::new(future)).await;
        assert_eq!(got.ok(), Some(7));
    }
}
