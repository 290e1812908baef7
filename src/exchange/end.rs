//! How an exchange ends, the single source of truth for `pagi.connection`:
//! delivered, or cut off by the client, the network, the server or the
//! application, and who hears of it.

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use http::StatusCode;

use super::{EndState, Exchange, Head, Phase, State, WANTS_DRAIN, WANTS_TERMINAL};
use crate::interp::messages::ToPerl;

impl State {
    /// Delivered whole, or cut off: nothing more happens to the response.
    pub(super) fn has_ended(&self) -> bool {
        self.delivered || self.disconnected.is_some()
    }

    /// The declared Content-Length, when a body of `total` bytes that ends
    /// here would leave the response short of it.  Over HTTP/1.1 hyper then
    /// closes the connection; over HTTP/2 the stream would end cleanly with
    /// fewer bytes than its head announced, a response RFC 9113 8.1.1 calls
    /// malformed.  A HEAD, 204 or 304 carries no body, whatever the length.
    pub(super) fn short_of_declared(&self, is_head: bool, total: u64) -> Option<u64> {
        let no_body_on_wire = is_head || matches!(self.status, Some(204) | Some(304));
        self.declared_length
            .filter(|&declared| !no_body_on_wire && total < declared)
    }

    /// Give the response up where it stands: no head if none went, nothing
    /// queued written, and the body's end without the flush turn an abort
    /// otherwise gets (network.rs), which a peer that does not read would
    /// hold up.
    fn abandon_output(&mut self) {
        self.phase = Phase::Aborted;
        // No flush turn: abort must not wait for writes the peer may block.
        self.abort_flushed = true;
        self.queue.clear();
        self.buffered = 0;
        self.pending_head = None;
        if let Some(tx) = self.head_tx.take() {
            let _ = tx.send(Head::Abort);
        }
    }
}

impl Exchange {
    pub(super) fn end_after_panic(&self, st: &mut State) {
        tracing::error!(
            "internal error: a panic left request {} in an unknown state; ending it",
            self.id
        );
        if st.disconnected.is_some() || st.delivered {
            return;
        }
        let detail = "internal error while handling the request".to_string();
        st.disconnected = Some("server_error");
        st.detail = Some(detail.clone());
        st.abandon_output();
        if let Some(w) = st.waker.take() {
            w.wake();
        }
        if let Some(close) = &self.close_connection {
            close.notify_one();
        }
        self.progress.notify_waiters();
        self.ended.notify_waiters();
        self.body_credit.close();
        // The mailbox lock is only ever taken after this one.
        self.mailbox.push(ToPerl::Disconnect {
            id: self.id,
            reason: "server_error",
            detail: Some(detail),
        });
    }

    /// Perl has on_drain callbacks: tell it of every drain, not only of
    /// those a send waits for.
    pub fn want_drain_news(&self) {
        self.interest.fetch_or(WANTS_DRAIN, Ordering::AcqRel);
    }

    pub fn wants_drain_news(&self) -> bool {
        self.interest.load(Ordering::Acquire) & WANTS_DRAIN != 0
    }

    /// Perl wants to hear how the request ends.  If it already ended
    /// cleanly, say so now (a late on_complete still fires).
    pub fn register_interest(&self, bits: u8) {
        self.interest.fetch_or(bits, Ordering::AcqRel);
        let delivered = {
            let st = self.lock();
            st.delivered && st.disconnected.is_none()
        };
        if delivered {
            self.mailbox.push(ToPerl::Complete { id: self.id });
        }
    }

    fn wants_terminal(&self, st: &State) -> bool {
        st.app_running || self.interest.load(Ordering::Acquire) & WANTS_TERMINAL != 0
    }

    /// Resolves when the exchange ends (create it, then check `has_ended`).
    pub fn end_signal(&self) -> tokio::sync::futures::Notified<'_> {
        self.ended.notified()
    }

    /// The client or the network ended the exchange before the response was
    /// delivered.  Idempotent; the first reason wins.
    pub fn network_gone(&self, reason: &'static str, detail: Option<String>) {
        let mut st = self.lock();
        if st.disconnected.is_some() || st.delivered {
            return;
        }
        if st.phase != Phase::Finished {
            st.phase = Phase::Aborted;
        }
        st.head_tx = None;
        st.pending_head = None;
        self.end_abnormally(st, reason, detail);
    }

    /// `pagi.connection->abort`: end the exchange now, with no response if
    /// none has started, without writing what is queued, and close its
    /// connection.  False when the exchange had already ended (the first
    /// outcome stands).  Perl, which asked, tells the application itself.
    pub fn app_abort(&self, detail: Option<String>) -> bool {
        let mut st = self.lock();
        if st.disconnected.is_some() || st.clean_end {
            return false;
        }
        st.abandon_output();
        st.disconnected = Some("app_abort");
        st.detail = detail;
        let waker = st.waker.take();
        drop(st);
        if let Some(close) = &self.close_connection {
            close.notify_one();
        }
        if let Some(w) = waker {
            w.wake();
        }
        self.progress.notify_waiters();
        self.ended.notify_waiters();
        self.body_credit.close();
        self.write_access_log();
        true
    }

    /// How far the exchange has got (`pagi.connection` reads this, so its
    /// facts are current even before the message saying so is dispatched).
    pub fn end_state(&self) -> EndState {
        let st = self.lock();
        match st.disconnected {
            _ if st.clean_end => EndState::Clean,
            Some(reason) => EndState::Abnormal {
                reason: reason.to_string(),
                detail: st.detail.clone(),
            },
            None => EndState::Active,
        }
    }

    /// Stop the exchange from the server side.  With no response started yet
    /// the server answers `status` (e.g. 413); otherwise the response is cut
    /// off.  Either way the connection closes and the app hears `reason`.
    pub fn server_abort(
        &self,
        reason: &'static str,
        detail: Option<String>,
        response: Option<(StatusCode, &'static str)>,
    ) {
        let mut st = self.lock();
        if st.disconnected.is_some() || st.delivered {
            return;
        }
        st.pending_head = None;
        match (st.head_tx.take(), response) {
            (Some(tx), Some((status, text))) => {
                st.status = Some(status.as_u16());
                st.phase = Phase::Finished;
                let _ = tx.send(Head::Generated(status, text));
            }
            (Some(tx), None) => {
                st.phase = Phase::Aborted;
                let _ = tx.send(Head::Abort);
            }
            (None, _) => st.phase = Phase::Aborted,
        }
        self.end_abnormally(st, reason, detail);
    }

    /// A timeout: the client took nothing, or the app sent nothing, for
    /// too long.  End the exchange as [`Exchange::server_abort`] does, but
    /// without writing what is queued, and close its transport at once
    /// (the connection on HTTP/1.1, the stream on HTTP/2): a client that
    /// does not read would otherwise hold the connection, waiting to be
    /// written to, for as long as it pleases.
    pub fn cut_off(&self, reason: &'static str, detail: String) {
        let mut st = self.lock();
        if st.disconnected.is_some() || st.delivered {
            return;
        }
        st.abandon_output();
        if let Some(close) = &self.close_connection {
            close.notify_one();
        }
        self.end_abnormally(st, reason, Some(detail));
    }

    /// Record an abnormal end and tell everyone waiting: the network task,
    /// Rust-side producers, the body pump, and the application.
    pub(super) fn end_abnormally(
        &self,
        mut st: MutexGuard<'_, State>,
        reason: &'static str,
        detail: Option<String>,
    ) {
        st.disconnected = Some(reason);
        st.detail = detail.clone();
        let notify_perl = self.wants_terminal(&st);
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        self.progress.notify_waiters();
        self.ended.notify_waiters();
        self.body_credit.close();
        if notify_perl {
            self.mailbox.push(ToPerl::Disconnect {
                id: self.id,
                reason,
                detail,
            });
        }
        self.write_access_log();
    }

    /// With the network done, reaching the terminal event completes the response.
    pub(super) fn deliver_if_done(&self, mut st: MutexGuard<'_, State>) {
        if !st.network_done
            || st.phase != Phase::Finished
            || st.delivered
            || st.disconnected.is_some()
        {
            return;
        }
        st.delivered = true;
        let notify_perl = self.interest.load(Ordering::Acquire) & WANTS_TERMINAL != 0;
        drop(st);
        self.progress.notify_waiters();
        self.ended.notify_waiters();
        if notify_perl {
            self.mailbox.push(ToPerl::Complete { id: self.id });
        }
        self.write_access_log();
    }

    pub fn has_ended(&self) -> bool {
        self.lock().has_ended()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http::StatusCode;

    use crate::exchange::tests::{exchange, poll};
    use crate::exchange::{EndState, Head, SendOutcome};
    use crate::interp::messages::ToPerl;

    #[test]
    fn a_poisoned_exchange_ends_as_a_server_error() {
        let (ex, mut rx) = exchange(false);
        let ex2 = ex.clone();
        let _ = std::thread::spawn(move || {
            let _st = ex2.state.lock().unwrap();
            panic!("a bug while the state is locked");
        })
        .join();
        assert!(ex.state.is_poisoned());
        assert_eq!(
            ex.start(200, &[], false).unwrap(),
            SendOutcome::Closed,
            "sends are no-ops on the ended exchange"
        );
        assert!(
            !ex.state.is_poisoned(),
            "the poison is cleared once handled"
        );
        assert!(
            matches!(ex.end_state(), EndState::Abnormal { reason, .. } if reason == "server_error")
        );
        assert!(matches!(rx.try_recv(), Ok(Head::Abort)));
        let mut q = VecDeque::new();
        ex.mailbox.take_all(&mut q);
        assert!(q.iter().any(|m| matches!(
            m,
            ToPerl::Disconnect {
                reason: "server_error",
                ..
            }
        )));
    }

    #[tokio::test]
    async fn a_cut_off_drops_what_is_queued_and_closes_the_transport_at_once() {
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        let (ex, _rx) = crate::exchange::tests::exchange_closing(
            false,
            crate::spec::SpecVersion::Www06,
            Some(close.clone()),
        );
        ex.start(200, &[], false).unwrap();
        ex.body(b"queued for a client that does not read", true)
            .unwrap();
        assert!(ex.buffered_amount() > 0);

        ex.cut_off(
            "client_timeout",
            "no progress for 1s (--request-timeout)".into(),
        );
        let closed =
            tokio::time::timeout(std::time::Duration::from_millis(100), close.notified()).await;
        assert!(closed.is_ok(), "the transport is told to close");
        assert_eq!(ex.buffered_amount(), 0, "what was queued is dropped");
        assert!(
            matches!(poll(&ex), std::task::Poll::Ready(Some(Err(_)))),
            "the body ends in an error at once, with nothing more written"
        );
        assert!(matches!(
            ex.end_state(),
            EndState::Abnormal { reason, detail: Some(detail) }
                if reason == "client_timeout" && detail.contains("--request-timeout")
        ));
        let mut q = VecDeque::new();
        ex.mailbox.take_all(&mut q);
        assert!(q.iter().any(|m| matches!(
            m,
            ToPerl::Disconnect {
                reason: "client_timeout",
                ..
            }
        )));

        // The first outcome stands: a second cut-off changes nothing.
        ex.cut_off("idle_timeout", "later".into());
        assert!(
            matches!(ex.end_state(), EndState::Abnormal { reason, .. } if reason == "client_timeout")
        );
    }

    #[test]
    fn server_abort_before_start_sends_generated_status() {
        let (ex, mut rx) = exchange(false);
        ex.server_abort(
            "body_too_large",
            None,
            Some((StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large")),
        );
        assert!(
            matches!(rx.try_recv(), Ok(Head::Generated(s, _)) if s == StatusCode::PAYLOAD_TOO_LARGE)
        );
        let mut q = VecDeque::new();
        ex.mailbox.take_all(&mut q);
        assert!(q.iter().any(|m| matches!(
            m,
            ToPerl::Disconnect {
                reason: "body_too_large",
                ..
            }
        )));
        assert_eq!(ex.start(200, &[], false).unwrap(), SendOutcome::Closed);
    }
}
