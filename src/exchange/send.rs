//! The interpreter side: the application's `$send` events drive the response
//! through its phases (start, body, trailers, the end of the app's Future),
//! and a held-back head is released to the network task.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use tokio::sync::oneshot;

use super::headers::{build_headers, final_status, Section};
use super::{Exchange, FinishOutcome, Head, Phase, SendOutcome, State, WANTS_TERMINAL};
use crate::error::SendError;

impl Exchange {
    pub fn start(
        &self,
        status: i64,
        headers: &[(&[u8], &[u8])],
        trailers: bool,
    ) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        if st.disconnected.is_some() {
            return Ok(SendOutcome::Closed);
        }
        if st.phase != Phase::AwaitingStart {
            return Err(SendError::Sequence("http.response.start was already sent"));
        }
        let status = final_status(status)?;
        let (map, declared) = build_headers(headers, Section::Head)?;
        st.declared_length = declared;
        st.trailers_promised = trailers;
        st.phase = Phase::Streaming;
        st.status = Some(status.as_u16());
        st.pending_head = Some((status, map));
        drop(st);
        self.mark_progress();
        Ok(SendOutcome::Ready)
    }

    /// `sse.start`: the head of an event stream.  Unlike an ordinary head it
    /// leaves at once, so the client's EventSource opens before the first
    /// event.  Adds the stream headers the application left out.
    pub fn start_event_stream(
        &self,
        status: i64,
        headers: &[(&[u8], &[u8])],
    ) -> Result<SendOutcome, SendError> {
        let outcome = self.start(status, headers, false)?;
        let mut st = self.lock();
        if let Some((_, map)) = st.pending_head.as_mut() {
            crate::sse::add_stream_headers(map);
            // An event stream has no length; one would end it early.
            map.remove(http::header::CONTENT_LENGTH);
        }
        st.declared_length = None;
        st.long_lived = true;
        let head = Self::take_head(&mut st);
        drop(st);
        self.send_head(head);
        Ok(outcome)
    }

    /// An SSE response that became an event stream (`sse.start`), as
    /// opposed to one refused with an ordinary response.
    pub fn is_event_stream(&self) -> bool {
        self.lock().long_lived
    }

    /// `websocket.accept`: the 101 head goes to the network task, which
    /// hands the socket to the WebSocket connection.  False when it is too
    /// late (the client left, or a response was already decided).
    pub fn upgrade(&self, headers: HeaderMap) -> bool {
        let mut st = self.lock();
        if st.phase != Phase::AwaitingStart || st.disconnected.is_some() {
            return false;
        }
        let Some(tx) = st.head_tx.take() else {
            return false;
        };
        st.phase = Phase::Finished;
        // The access log shows what went on the wire: HTTP/2 accepts with
        // 200 (RFC 8441), HTTP/1.1 with 101.
        st.status = Some(if self.facts.http_version == "2" {
            200
        } else {
            101
        });
        st.long_lived = true;
        drop(st);
        self.mark_progress();
        tx.send(Head::Upgrade(headers)).is_ok()
    }

    /// The server answers for the application with a short text response
    /// (a WebSocket handshake refused with 403).  No-op once a response began.
    pub fn refuse(&self, status: StatusCode, text: &'static str) {
        let mut st = self.lock();
        if st.phase != Phase::AwaitingStart || st.disconnected.is_some() {
            return;
        }
        let Some(tx) = st.head_tx.take() else { return };
        st.phase = Phase::Finished;
        st.clean_end = true;
        st.status = Some(status.as_u16());
        drop(st);
        let _ = tx.send(Head::Generated(status, text));
        self.write_access_log();
    }

    /// How the application itself ended the stream (`sse.close` reason).
    pub fn set_end_reason(&self, reason: &str) {
        let mut st = self.lock();
        if st.end_reason.is_none() {
            st.end_reason = Some(reason.to_string());
        }
    }

    /// Release a held-back head to the network task (call after unlocking),
    /// unless it waits for the trailers' names
    /// ([`State::head_awaits_trailer_names`]).
    pub(super) fn take_head(st: &mut State) -> Option<(oneshot::Sender<Head>, Head)> {
        if st.head_awaits_trailer_names() {
            return None;
        }
        let (status, headers) = st.pending_head.take()?;
        let close_after = st.continue_unanswered;
        st.head_tx.take().map(|tx| {
            (
                tx,
                Head::App {
                    status,
                    headers,
                    close_after,
                },
            )
        })
    }

    /// Hand the network task the response head (at the end of the
    /// interpreter's batch when called from it: see `wakeups`).
    pub(super) fn send_head(&self, head: Option<(oneshot::Sender<Head>, Head)>) {
        if let Some((tx, head)) = head {
            super::wakeups::send_head(tx, head, self.hold());
        }
    }

    /// How long the interpreter may hold this exchange's wake-ups.
    pub(super) fn hold(&self) -> super::wakeups::Hold {
        if self.facts.http_version == "2" {
            super::wakeups::Hold::Batch
        } else {
            super::wakeups::Hold::Brief
        }
    }

    pub fn body(&self, data: &[u8], more: bool) -> Result<SendOutcome, SendError> {
        self.queue_body(BodyPiece::Borrowed(data), more)
    }

    /// [`Exchange::body`] for bytes the caller already holds as `Bytes` (a
    /// body lent by Perl: `interp::lent`), queued without a copy.
    pub fn body_bytes(&self, data: Bytes, more: bool) -> Result<SendOutcome, SendError> {
        self.queue_body(BodyPiece::Owned(data), more)
    }

    fn queue_body(&self, data: BodyPiece<'_>, more: bool) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        if st.disconnected.is_some() {
            return Ok(SendOutcome::Closed);
        }
        match st.phase {
            Phase::AwaitingStart => {
                return Err(SendError::Sequence(
                    "http.response.body before http.response.start",
                ))
            }
            Phase::Finished | Phase::Aborted => {
                return Err(SendError::Sequence("the response is already complete"))
            }
            Phase::Streaming if st.body_done => {
                return Err(SendError::Sequence(
                    "the body is complete; only http.response.trailers may follow",
                ))
            }
            Phase::Streaming => {}
        }
        let len = data.len() as u64;
        if let Some(declared) = st.declared_length {
            if st.body_bytes + len > declared {
                return Err(SendError::Invalid(format!(
                    "body of {} bytes exceeds the declared Content-Length of {declared}",
                    st.body_bytes + len
                )));
            }
        }
        if !more {
            if let Some(declared) = st.short_of_declared(self.facts.is_head, st.body_bytes + len) {
                return Err(SendError::Invalid(format!(
                    "body of {} bytes ends short of the declared Content-Length of {declared}",
                    st.body_bytes + len
                )));
            }
        }
        st.body_bytes += len;
        st.inline_body = true;
        let mut before = st.buffered;
        if len > 0 && !self.facts.is_head {
            // hyper takes a whole frame into its own buffer at once; small
            // frames keep buffered_amount (and the water marks) truthful.
            let max_frame = self.config.write_buffer_size.max(1);
            match data {
                BodyPiece::Borrowed(slice) => st.queue.push_slice(slice, max_frame),
                BodyPiece::Owned(bytes) => st.queue.push_bytes(bytes, max_frame),
            }
            st.buffered += len as usize;
        }
        if !more {
            st.body_done = true;
            if !st.trailers_promised {
                st.phase = Phase::Finished;
                st.clean_end = true;
            }
        }
        if st.network_done {
            st.queue.clear();
            st.buffered = 0;
            before = 0;
        }
        let after = st.buffered;
        // Held for the trailers' names, nothing leaves before the app's
        // trailers event: a send waiting for the drain would wait for the
        // app's own next send.  The body is complete, so nothing follows
        // that backpressure could hold.
        let outcome = if st.head_awaits_trailer_names() {
            SendOutcome::Ready
        } else {
            st.marks.on_send(before, after, self.config.high_water)
        };
        let head = Self::take_head(&mut st);
        let waker = st.waker.take();
        self.deliver_if_done(st);
        self.mark_progress();
        self.send_head(head);
        if let Some(w) = waker {
            let hold = self.hold();
            if hold == super::wakeups::Hold::Brief
                && len as usize >= super::wakeups::UNHELD_BODY_BYTES
            {
                w.wake();
            } else {
                super::wakeups::wake(w, hold);
            }
        }
        Ok(outcome)
    }

    pub fn trailers(&self, headers: &[(&[u8], &[u8])]) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        if st.disconnected.is_some() {
            return Ok(SendOutcome::Closed);
        }
        if st.phase != Phase::Streaming {
            return Err(SendError::Sequence(match st.phase {
                Phase::AwaitingStart => "http.response.trailers before http.response.start",
                _ => "the response is already complete",
            }));
        }
        if !st.trailers_promised {
            return Err(SendError::Sequence(
                "http.response.trailers without trailers => 1 in http.response.start",
            ));
        }
        if st.declared_length.is_some() && !self.facts.is_head {
            return Err(SendError::Invalid(
                "trailers need chunked framing, but the response has a Content-Length".into(),
            ));
        }
        let (map, _) = build_headers(headers, Section::Trailers)?;
        if let Some((_, head)) = st.pending_head.as_mut() {
            if !head.contains_key(http::header::TRAILER) && !map.is_empty() {
                let names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
                if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
                    head.insert(http::header::TRAILER, v);
                }
            }
        }
        if !self.facts.is_head {
            st.queue.push_trailers(map);
        }
        st.body_done = true;
        st.phase = Phase::Finished;
        st.clean_end = true;
        let head = Self::take_head(&mut st);
        let waker = st.waker.take();
        self.deliver_if_done(st);
        self.mark_progress();
        self.send_head(head);
        if let Some(w) = waker {
            super::wakeups::wake(w, self.hold());
        }
        Ok(SendOutcome::Ready)
    }

    /// `http.fullflush`: settles once everything queued has been taken by the network.
    pub fn fullflush(&self) -> SendOutcome {
        let mut st = self.lock();
        if st.disconnected.is_some() {
            return SendOutcome::Closed;
        }
        let head = Self::take_head(&mut st);
        // A head held for the trailers' names goes out with them: until
        // then nothing can be flushed, and waiting would deadlock the app
        // that flushes before it sends its trailers.
        let outcome = if st.buffered == 0 || st.head_awaits_trailer_names() {
            SendOutcome::Ready
        } else {
            st.flush_pending = true;
            SendOutcome::Deferred
        };
        drop(st);
        self.send_head(head);
        outcome
    }

    /// The application's Future settled (with `error` if it failed).
    pub fn finish(&self, error: Option<&str>, interested: bool) -> FinishOutcome {
        if interested {
            self.register_interest(WANTS_TERMINAL);
        }
        // The application can no longer read the request body: let the pump
        // drop it (hyper then drains or closes).
        self.body_credit.close();
        self.mailbox.in_flight.fetch_sub(1, Ordering::AcqRel);
        let mut st = self.lock();
        st.app_running = false;
        if st.disconnected.is_some() {
            return FinishOutcome::AlreadyDisconnected;
        }
        let err = error.map(|e| e.trim_end());
        match st.phase {
            Phase::Finished => {
                let head = Self::take_head(&mut st);
                drop(st);
                self.send_head(head);
                if let Some(e) = err {
                    tracing::error!("PAGI application error (after response complete): {e}");
                }
                FinishOutcome::Clean
            }
            Phase::Aborted => FinishOutcome::AlreadyDisconnected,
            Phase::AwaitingStart => {
                let detail = match err {
                    Some(e) => {
                        tracing::error!("PAGI application error: {e}");
                        e.to_string()
                    }
                    None => {
                        let what = "application returned without starting a response";
                        tracing::error!("PAGI {what}");
                        what.to_string()
                    }
                };
                st.disconnected = Some("server_error");
                st.detail = Some(detail);
                st.status = Some(500);
                st.phase = Phase::Finished;
                let tx = st.head_tx.take();
                drop(st);
                if let Some(tx) = tx {
                    let _ = tx.send(Head::Generated(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Internal Server Error",
                    ));
                }
                self.write_access_log();
                FinishOutcome::Backstop500
            }
            Phase::Streaming
                if st.long_lived && err.is_none() && !self.config.spec.is_current() =>
            {
                // Www 0.3: an SSE app that returns after its last event ends
                // the stream as sse.close would.  From 0.6 on, sse.close is
                // the only clean end and a return is an incomplete response.
                st.body_done = true;
                st.phase = Phase::Finished;
                st.clean_end = true;
                if st.end_reason.is_none() {
                    st.end_reason = Some("app_returned".into());
                }
                let waker = st.waker.take();
                drop(st);
                if let Some(w) = waker {
                    super::wakeups::wake(w, self.hold());
                }
                FinishOutcome::Clean
            }
            Phase::Streaming => {
                let detail = match err {
                    Some(e) => {
                        if st.long_lived {
                            tracing::error!("PAGI application error (SSE): {e}");
                        } else {
                            tracing::error!("PAGI application error (after response started): {e}");
                        }
                        e.to_string()
                    }
                    None => {
                        let what = if st.long_lived {
                            "application returned after sse.start without sse.close"
                        } else if st.body_done {
                            "application returned with an incomplete response (trailers were declared but never sent)"
                        } else {
                            "application returned with an incomplete response"
                        };
                        tracing::error!("PAGI {what}");
                        what.to_string()
                    }
                };
                st.disconnected = Some("server_error");
                st.detail = Some(detail);
                st.phase = Phase::Aborted;
                // The head goes out so the client sees a started, then cut, response.
                let head = Self::take_head(&mut st);
                let waker = st.waker.take();
                drop(st);
                self.send_head(head);
                if let Some(w) = waker {
                    super::wakeups::wake(w, self.hold());
                }
                self.progress.notify_waiters();
                self.ended.notify_waiters();
                self.write_access_log();
                FinishOutcome::Truncated
            }
        }
    }

    /// Live figure for pagi.transport.
    pub fn buffered_amount(&self) -> usize {
        self.lock().buffered
    }
}

/// A body event's bytes: borrowed from Perl for this call (copied if
/// queued), or owned already.
enum BodyPiece<'a> {
    Borrowed(&'a [u8]),
    Owned(Bytes),
}

impl BodyPiece<'_> {
    fn len(&self) -> usize {
        match self {
            BodyPiece::Borrowed(slice) => slice.len(),
            BodyPiece::Owned(bytes) => bytes.len(),
        }
    }
}

impl State {
    /// The head promised trailers without a `Trailer` header, and the body
    /// is complete: it waits for the trailers event, which names them
    /// (hyper writes only the trailer fields a `Trailer` header announced).
    /// A head whose body streams before the trailers cannot wait: the app
    /// must announce them itself (README).
    fn head_awaits_trailer_names(&self) -> bool {
        self.trailers_promised
            && self.body_done
            && self.phase == Phase::Streaming
            && self.declared_length.is_none()
            && self
                .pending_head
                .as_ref()
                .is_some_and(|(_, map)| !map.contains_key(http::header::TRAILER))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;
    use http::StatusCode;

    use crate::error::SendError;
    use crate::exchange::tests::{exchange, poll};
    use crate::exchange::{BodyAborted, FinishOutcome, Head, SendOutcome};
    use crate::interp::messages::ToPerl;

    #[test]
    fn a_last_body_short_of_the_declared_length_fails_and_changes_nothing() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[(b"content-length", b"5")], false).unwrap();
        assert_eq!(ex.body(b"ab", true).unwrap(), SendOutcome::Ready);
        match ex.body(b"c", false) {
            Err(SendError::Invalid(msg)) => {
                assert!(
                    msg.contains("3 bytes ends short of the declared Content-Length of 5"),
                    "{msg}"
                )
            }
            other => panic!("{other:?}"),
        }
        // The refused event left the response open: the rest completes it.
        assert_eq!(ex.body(b"cde", false).unwrap(), SendOutcome::Ready);
        assert_eq!(ex.end_state(), crate::exchange::EndState::Clean);

        // No body on the wire, so no length to meet: HEAD, 204 and 304.
        let (head, _rx) = exchange(true);
        head.start(200, &[(b"content-length", b"5")], false)
            .unwrap();
        assert_eq!(head.body(b"", false).unwrap(), SendOutcome::Ready);
        for status in [204, 304] {
            let (ex, _rx) = exchange(false);
            ex.start(status, &[(b"content-length", b"5")], false)
                .unwrap();
            assert_eq!(ex.body(b"", false).unwrap(), SendOutcome::Ready, "{status}");
        }
    }

    #[test]
    fn a_large_body_piece_wakes_the_network_while_small_ones_wait_for_the_batch() {
        use crate::exchange::wakeups::{self, tests::counter, UNHELD_BODY_BYTES};
        use std::sync::atomic::Ordering;
        let (ex, _rx) = exchange(false);
        ex.start(200, &[], false).unwrap();
        let (count, waker) = counter();
        let mut cx = std::task::Context::from_waker(&waker);
        let take_all = |cx: &mut std::task::Context<'_>| {
            while let std::task::Poll::Ready(Some(_)) = ex.poll_frame(cx) {}
        };
        // The network task waits for a frame: the exchange keeps its waker.
        take_all(&mut cx);
        wakeups::hold();
        ex.body(b"small", true).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "a small piece waits");
        wakeups::release();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "...for the batch's end");
        take_all(&mut cx);
        wakeups::hold();
        ex.body(&vec![b'x'; UNHELD_BODY_BYTES], true).unwrap();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            2,
            "a large piece wakes at once"
        );
        wakeups::release();
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "and only once");
    }

    #[test]
    fn sequence_rules() {
        let (ex, _rx) = exchange(false);
        assert!(matches!(ex.body(b"x", false), Err(SendError::Sequence(_))));
        ex.start(200, &[], false).unwrap();
        assert!(matches!(
            ex.start(200, &[], false),
            Err(SendError::Sequence(_))
        ));
        assert!(
            matches!(ex.trailers(&[]), Err(SendError::Sequence(_))),
            "trailers not promised"
        );
        ex.body(b"abc", false).unwrap();
        assert!(matches!(ex.body(b"x", false), Err(SendError::Sequence(_))));
    }

    #[test]
    fn water_marks_are_edge_triggered() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[], false).unwrap();
        assert_eq!(ex.body(b"123456", true).unwrap(), SendOutcome::Ready);
        // Found room, filled the buffer: taken at once, on_high_water fires.
        assert_eq!(ex.body(b"123456", true).unwrap(), SendOutcome::ReachedHigh);
        // Found the buffer full: waits for the drain.
        assert_eq!(ex.body(b"1", true).unwrap(), SendOutcome::StillHigh);
        assert_eq!(ex.buffered_amount(), 13);
        let _ = poll(&ex); // the three small bodies leave as one frame
        assert_eq!(ex.buffered_amount(), 0);
        let mut q = VecDeque::new();
        ex.mailbox.take_all(&mut q);
        assert!(q.iter().any(|m| matches!(m, ToPerl::Drained { .. })));
        assert_eq!(ex.body(b"1", false).unwrap(), SendOutcome::Ready);
    }

    #[test]
    fn no_drain_news_while_above_low_water() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[], false).unwrap();
        // A piece too large to be joined, then a small one after it.
        let big = Bytes::from(vec![b'b'; 5000]);
        assert_eq!(ex.body_bytes(big, true).unwrap(), SendOutcome::HighWater);
        assert_eq!(ex.body(b"1234567", true).unwrap(), SendOutcome::StillHigh);
        let _ = poll(&ex); // 7 left: still above low water
        assert_eq!(ex.buffered_amount(), 7);
        let mut q = VecDeque::new();
        ex.mailbox.take_all(&mut q);
        assert!(!q.iter().any(|m| matches!(m, ToPerl::Drained { .. })));
        let _ = poll(&ex); // none left: below low water, Drained pushed
        ex.mailbox.take_all(&mut q);
        assert!(q.iter().any(|m| matches!(m, ToPerl::Drained { .. })));
    }

    #[test]
    fn trailers_rules() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[(b"content-length", b"2")], true).unwrap();
        ex.body(b"ab", false).unwrap();
        assert!(
            matches!(ex.trailers(&[(b"x-t", b"1")]), Err(SendError::Invalid(_))),
            "CL forbids trailers"
        );

        let (ex, _rx) = exchange(false);
        ex.start(200, &[], true).unwrap();
        ex.body(b"ab", false).unwrap();
        assert!(!ex.is_body_end(), "trailers still owed");
        ex.trailers(&[(b"x-t", b"1")]).unwrap();
        let _ = poll(&ex);
        assert!(matches!(poll(&ex), std::task::Poll::Ready(Some(Ok(f))) if f.is_trailers()));
        assert!(matches!(poll(&ex), std::task::Poll::Ready(None)));
    }

    #[test]
    fn no_send_waits_while_the_head_waits_for_the_trailers_names() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[], true).unwrap();
        // Far over the mark (10), the whole body: the head now waits for
        // the trailers event, so a send that waited would never settle.
        let body = Bytes::from(vec![b'a'; 5000]);
        assert_eq!(ex.body_bytes(body, false).unwrap(), SendOutcome::Ready);
        assert_eq!(ex.fullflush(), SendOutcome::Ready);
        ex.trailers(&[(b"x-t", b"1")]).unwrap();
        assert!(matches!(poll(&ex), std::task::Poll::Ready(Some(Ok(f))) if f.is_data()));
        assert!(matches!(poll(&ex), std::task::Poll::Ready(Some(Ok(f))) if f.is_trailers()));

        // With the fields announced, the head leaves with the body, and
        // backpressure applies as ever.
        let (ex, _rx) = exchange(false);
        ex.start(200, &[(b"trailer", b"x-t")], true).unwrap();
        let body = Bytes::from(vec![b'a'; 5000]);
        assert_eq!(ex.body_bytes(body, false).unwrap(), SendOutcome::HighWater);
        assert_eq!(ex.fullflush(), SendOutcome::Deferred);
    }

    #[test]
    fn head_requests_discard_body_bytes_but_complete() {
        let (ex, _rx) = exchange(true);
        ex.start(200, &[], false).unwrap();
        assert_eq!(ex.body(&[0u8; 100], false).unwrap(), SendOutcome::Ready);
        assert_eq!(ex.buffered_amount(), 0);
        assert!(matches!(poll(&ex), std::task::Poll::Ready(None)));
    }

    #[test]
    fn finish_without_response_is_a_500_backstop() {
        let (ex, mut rx) = exchange(false);
        assert_eq!(
            ex.finish(Some("boom at app.pl line 3.\n"), false),
            FinishOutcome::Backstop500
        );
        assert!(
            matches!(rx.try_recv(), Ok(Head::Generated(s, _)) if s == StatusCode::INTERNAL_SERVER_ERROR)
        );
    }

    #[test]
    fn finish_after_disconnect_sends_nothing() {
        let (ex, mut rx) = exchange(false);
        ex.network_gone("client_closed", None);
        assert_eq!(
            ex.finish(Some("boom"), false),
            FinishOutcome::AlreadyDisconnected
        );
        assert!(rx.try_recv().is_err());
        // sends after a disconnect are no-ops
        assert_eq!(ex.start(200, &[], false).unwrap(), SendOutcome::Closed);
        assert_eq!(ex.body(b"x", false).unwrap(), SendOutcome::Closed);
    }

    #[test]
    fn incomplete_response_is_truncated() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[], false).unwrap();
        ex.body(b"partial", true).unwrap();
        assert_eq!(ex.finish(None, false), FinishOutcome::Truncated);
        let _ = poll(&ex); // the queued chunk
        assert!(
            poll(&ex).is_pending(),
            "one turn for hyper to flush what it took"
        );
        assert!(matches!(
            poll(&ex),
            std::task::Poll::Ready(Some(Err(BodyAborted)))
        ));
    }
}
