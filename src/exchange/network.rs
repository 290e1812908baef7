//! What the protocol side calls: the next frame for the connection to
//! write, and what it learns of the body (its end, its declared length,
//! the connection dropping it).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body::Frame;

use super::{Exchange, Phase, WANTS_TERMINAL};
use crate::interp::messages::ToPerl;

impl Exchange {
    /// Next frame for hyper; see body.rs.
    pub fn poll_frame(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        use std::task::Poll;
        let mut st = self.lock();
        if let Some(frame) = st.queue.pop() {
            if let Some(data) = frame.data_ref() {
                st.buffered -= data.len();
            }
            let buffered = st.buffered;
            let drained =
                st.marks
                    .on_written(buffered, self.config.low_water, self.wants_drain_news());
            let flushed = st.flush_pending && st.buffered == 0;
            if flushed {
                st.flush_pending = false;
            }
            let body_taken = st.queue.is_empty()
                && (st.body_done || st.declared_length.is_some_and(|d| st.body_bytes >= d));
            let bulk = if body_taken {
                Some(false)
            } else if drained.is_some_and(|news| news.settles_wait) && !st.long_lived {
                // The app outran the socket and is released now: its next
                // frame follows at once.  Event streams are left out:
                // their events are wanted now, not in whole segments.
                Some(true)
            } else {
                None
            };
            drop(st);
            self.tell_writer(bulk);
            self.mark_progress();
            self.progress.notify_waiters();
            if let Some(news) = drained {
                self.mailbox.push(ToPerl::Drained {
                    id: self.id,
                    settles_wait: news.settles_wait,
                });
            }
            if flushed {
                self.mailbox.push(ToPerl::SendDone {
                    id: self.id,
                    error: None,
                });
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match st.phase {
            Phase::Aborted if !st.abort_flushed => {
                // One more turn so hyper flushes the bytes it already took;
                // erroring now would discard them and hide the truncation.
                st.abort_flushed = true;
                drop(st);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Phase::Aborted => {
                drop(st);
                self.tell_writer(Some(false));
                Poll::Ready(Some(Err(BodyAborted)))
            }
            Phase::Finished if st.disconnected.is_none() && !st.delivered => {
                st.delivered = true;
                self.tell_writer(Some(false));
                let notify_perl = self.interest.load(Ordering::Acquire) & WANTS_TERMINAL != 0;
                drop(st);
                self.ended.notify_waiters();
                if notify_perl {
                    self.mailbox.push(ToPerl::Complete { id: self.id });
                }
                self.write_access_log();
                Poll::Ready(None)
            }
            Phase::Finished => {
                drop(st);
                self.tell_writer(Some(false));
                Poll::Ready(None)
            }
            _ => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Tell the connection's writer whether more body follows at once
    /// (None: no news).
    fn tell_writer(&self, more_follows: Option<bool>) {
        match (&self.bulk_hint, more_follows) {
            (Some(hint), Some(true)) => hint.set(),
            (Some(hint), Some(false)) => hint.clear(),
            _ => {}
        }
    }

    /// hyper dropped the response body.  That is a disconnect, unless hyper
    /// simply had nothing more to write (see `network_done`).
    pub fn body_dropped(&self, reason: &'static str, detail: &'static str) {
        self.tell_writer(Some(false));
        let mut st = self.lock();
        let no_body_on_wire = self.facts.is_head || matches!(st.status, Some(204) | Some(304));
        let length_satisfied =
            st.queue.is_empty() && st.declared_length.is_some_and(|d| st.body_bytes >= d);
        // hyper stops polling once is_end_stream() is true, so a finished,
        // fully taken body is dropped without a final poll.
        let all_taken = st.queue.is_empty() && st.phase == Phase::Finished;
        if st.disconnected.is_none()
            && !st.delivered
            && st.phase != Phase::Aborted
            && (no_body_on_wire || length_satisfied || all_taken)
        {
            // A response with no body on the wire is whole once its head is
            // out, though the app may not have sent its last body event: it
            // hears the end now (a receive waiting for the disconnect gets
            // it), as it would after that event.  Nothing else would tell
            // it, since the connection goes on without this exchange.
            let whole_before_the_app =
                no_body_on_wire && st.phase == Phase::Streaming && st.app_running;
            st.network_done = true;
            st.queue.clear();
            st.buffered = 0;
            // Emptied without a write: a send waiting for the drain (a 204
            // or 304 whose first body event carried more than the mark)
            // must hear of it, or it waits for ever; nothing else will
            // wake it, since the network has finished with this exchange.
            let drained = st
                .marks
                .on_written(0, self.config.low_water, self.wants_drain_news());
            // Likewise an `http.fullflush` waiting for those bytes: the app
            // that awaits it before sending more would wait for ever.
            let flushed = std::mem::take(&mut st.flush_pending);
            self.deliver_if_done(st);
            // And a file or fh producer waiting for room in the window:
            // it hears that no more is wanted (push_streamed).
            self.progress.notify_waiters();
            if let Some(news) = drained {
                self.mailbox.push(ToPerl::Drained {
                    id: self.id,
                    settles_wait: news.settles_wait,
                });
            }
            if flushed {
                self.mailbox.push(ToPerl::SendDone {
                    id: self.id,
                    error: None,
                });
            }
            if whole_before_the_app {
                self.mailbox.push(ToPerl::Complete { id: self.id });
            }
            return;
        }
        drop(st);
        self.network_gone(reason, Some(detail.to_string()));
    }

    pub fn is_body_end(&self) -> bool {
        let st = self.lock();
        st.queue.is_empty() && st.phase == Phase::Finished
    }

    pub fn declared_length(&self) -> Option<u64> {
        self.lock().declared_length
    }
}

/// The body stream was cut off; hyper closes the connection without the
/// terminating chunk, so the client sees the truncation.
#[derive(Debug, thiserror::Error)]
#[error("response aborted")]
pub struct BodyAborted;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::super::tests::{exchange, poll};
    use super::super::{BulkHint, SendOutcome};
    use crate::interp::messages::ToPerl;

    fn with_hint() -> (Arc<super::Exchange>, Arc<BulkHint>) {
        let (mut ex, _rx) = exchange(false);
        let hint = Arc::new(BulkHint::default());
        Arc::get_mut(&mut ex).expect("fresh exchange").bulk_hint = Some(hint.clone());
        (ex, hint)
    }

    #[test]
    fn a_send_waiting_on_a_bodiless_response_is_released_when_hyper_drops_the_body() {
        for status in [204, 304] {
            let (ex, _rx) = exchange(false);
            ex.start(status, &[], false).unwrap();
            // The first body event (which releases the head) carries twice
            // the mark (10): the send waits for a drain.
            let piece = Bytes::from(vec![b'a'; 5000]);
            assert_eq!(ex.body_bytes(piece, true).unwrap(), SendOutcome::HighWater);
            // hyper writes the head and drops the body it may not send.
            ex.body_dropped("closed", "test");
            let mut q = std::collections::VecDeque::new();
            ex.mailbox.take_all(&mut q);
            assert!(
                q.iter().any(|m| matches!(
                    m,
                    ToPerl::Drained {
                        settles_wait: true,
                        ..
                    }
                )),
                "{status}: the waiting send hears the buffer emptied"
            );
            assert_eq!(ex.buffered_amount(), 0);
        }
    }

    #[test]
    fn a_fullflush_waiting_on_a_bodiless_response_settles_when_hyper_drops_the_body() {
        for status in [204, 304] {
            let (ex, _rx) = exchange(false);
            ex.start(status, &[], false).unwrap();
            // The whole body, queued before the network took the head: the
            // flush waits for bytes hyper will never write.
            ex.body(b"yyy", false).unwrap();
            assert_eq!(ex.fullflush(), SendOutcome::Deferred);
            ex.body_dropped("closed", "test");
            let mut q = std::collections::VecDeque::new();
            ex.mailbox.take_all(&mut q);
            assert!(
                q.iter()
                    .any(|m| matches!(m, ToPerl::SendDone { error: None, .. })),
                "{status}: the waiting flush is told it is done"
            );
            assert_eq!(ex.fullflush(), SendOutcome::Ready, "{status}: nothing left");
        }
    }

    #[test]
    fn the_writer_hears_more_follows_when_a_waiting_send_is_released() {
        let (ex, hint) = with_hint();
        ex.start(200, &[], false).unwrap();
        // Twice the mark (10) at once: the send waits for the drain.
        let piece = Bytes::from(vec![b'a'; 5000]);
        assert_eq!(ex.body_bytes(piece, true).unwrap(), SendOutcome::HighWater);
        assert!(!hint.is_set());
        let _ = poll(&ex); // taken: the drain releases the send
        assert!(hint.is_set(), "the app's next frame follows at once");
        // The last frame: the writer must not hold the end back.
        ex.body(b"end", false).unwrap();
        let _ = poll(&ex);
        assert!(!hint.is_set(), "cleared before hyper writes the end");
    }

    #[test]
    fn no_news_for_sends_that_never_waited_nor_for_event_streams() {
        let (ex, hint) = with_hint();
        ex.start(200, &[], false).unwrap();
        ex.body(b"12345", true).unwrap();
        let _ = poll(&ex);
        assert!(!hint.is_set(), "nothing waited");

        let (ex, hint) = with_hint();
        ex.start_event_stream(200, &[]).unwrap();
        let piece = Bytes::from(vec![b'e'; 5000]);
        assert_eq!(ex.body_bytes(piece, true).unwrap(), SendOutcome::HighWater);
        let _ = poll(&ex);
        assert!(
            !hint.is_set(),
            "events are wanted now, not in whole segments"
        );
    }
}
