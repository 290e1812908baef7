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
            drop(st);
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
            Phase::Aborted => Poll::Ready(Some(Err(BodyAborted))),
            Phase::Finished if st.disconnected.is_none() && !st.delivered => {
                st.delivered = true;
                let notify_perl = self.interest.load(Ordering::Acquire) & WANTS_TERMINAL != 0;
                drop(st);
                self.ended.notify_waiters();
                if notify_perl {
                    self.mailbox.push(ToPerl::Complete { id: self.id });
                }
                self.write_access_log();
                Poll::Ready(None)
            }
            Phase::Finished => Poll::Ready(None),
            _ => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// hyper dropped the response body.  That is a disconnect, unless hyper
    /// simply had nothing more to write (see `network_done`).
    pub fn body_dropped(&self, reason: &'static str, detail: &'static str) {
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
            st.network_done = true;
            st.queue.clear();
            st.buffered = 0;
            self.deliver_if_done(st);
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
