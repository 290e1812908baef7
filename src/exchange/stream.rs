//! Bodies a Rust-side producer streams (file and fh bodies, see file.rs):
//! the checks before the producer starts, its chunks, and its end.

use bytes::Bytes;

use super::{Exchange, Phase, SendOutcome, Streamed};
use crate::error::SendError;

impl Exchange {
    /// Checks before a file/fh body, so that a refused send changes nothing.
    /// For a HEAD request the file is not even opened: the body ends here.
    pub fn begin_stream_body(&self) -> Result<Option<SendOutcome>, SendError> {
        {
            let st = self.lock();
            if st.disconnected.is_some() {
                return Ok(Some(SendOutcome::Closed));
            }
            match st.phase {
                Phase::AwaitingStart => {
                    return Err(SendError::Sequence(
                        "http.response.body before http.response.start",
                    ))
                }
                Phase::Streaming if !st.body_done => {}
                _ => return Err(SendError::Sequence("the response is already complete")),
            }
            if st.inline_body && self.config.spec.is_current() {
                return Err(SendError::Sequence(
                    "a file or fh body cannot follow inline body events; send the whole body inline",
                ));
            }
        }
        if self.facts.is_head {
            self.end_streamed();
            return Ok(Some(SendOutcome::Ready));
        }
        Ok(None)
    }

    /// Queue one chunk from a Rust-side producer (file streaming), waiting
    /// while the buffer holds the file window (`ExchangeConfig::file_window`).
    pub async fn push_streamed(&self, chunk: Bytes) -> Streamed {
        loop {
            let notified = self.progress.notified();
            {
                let mut st = self.lock();
                if st.disconnected.is_some() || st.phase == Phase::Aborted {
                    return Streamed::Ended;
                }
                if let Some(declared) = st.declared_length {
                    if st.body_bytes + chunk.len() as u64 > declared {
                        return Streamed::OverLength(declared);
                    }
                }
                if st.network_done {
                    return Streamed::NotWanted;
                }
                if st.buffered < self.config.file_window() {
                    st.body_bytes += chunk.len() as u64;
                    st.buffered += chunk.len();
                    let max_frame = self.config.write_buffer_size.max(1);
                    st.queue.push_bytes(chunk, max_frame);
                    let head = Self::take_head(&mut st);
                    let waker = st.waker.take();
                    drop(st);
                    self.send_head(head);
                    self.mark_progress();
                    if let Some(w) = waker {
                        super::wakeups::wake(w, self.hold());
                    }
                    return Streamed::Queued;
                }
            }
            notified.await;
        }
    }

    /// Whether a producer waiting for its source may give up: the exchange
    /// ended, or the network writes no body (see [`Streamed::NotWanted`]).
    pub fn wants_no_more_body(&self) -> bool {
        let st = self.lock();
        st.network_done || st.has_ended()
    }

    /// The producer finished a file/fh body: the response is complete, or,
    /// when the source gave fewer bytes than the declared Content-Length (a
    /// file truncated under it, a pipe that ended early), cut off: its bytes
    /// are out, and a clean end would announce a whole response.
    pub fn end_streamed(&self) {
        let mut st = self.lock();
        if st.disconnected.is_some() || st.phase != Phase::Streaming {
            return;
        }
        if let Some(declared) = st.short_of_declared(self.facts.is_head, st.body_bytes) {
            let detail = format!(
                "the file or handle gave {} bytes, short of the declared Content-Length of {declared}",
                st.body_bytes
            );
            tracing::error!("PAGI response cut off: {detail}");
            st.phase = Phase::Aborted;
            // The head goes out so the client sees a started, then cut, response.
            let head = Self::take_head(&mut st);
            self.end_abnormally(st, "server_error", Some(detail));
            self.send_head(head);
            return;
        }
        st.body_done = true;
        if !st.trailers_promised {
            st.phase = Phase::Finished;
            st.clean_end = true;
        }
        let head = Self::take_head(&mut st);
        let waker = st.waker.take();
        self.deliver_if_done(st);
        self.send_head(head);
        if let Some(w) = waker {
            super::wakeups::wake(w, self.hold());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use bytes::Bytes;

    use crate::exchange::tests::{exchange, poll};
    use crate::exchange::{bytes_per_write, FinishOutcome, Head, SendOutcome, Streamed};

    #[test]
    fn a_file_short_of_the_declared_length_cuts_the_response_off() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[(b"content-length", b"10")], false).unwrap();
        assert_eq!(ex.begin_stream_body().unwrap(), None);
        let mut cx = Context::from_waker(Waker::noop());
        let mut push = std::pin::pin!(ex.push_streamed(Bytes::from_static(b"four")));
        assert!(matches!(
            push.as_mut().poll(&mut cx),
            Poll::Ready(Streamed::Queued)
        ));
        ex.end_streamed();
        match ex.end_state() {
            crate::exchange::EndState::Abnormal { reason, detail } => {
                assert_eq!(reason, "server_error");
                assert!(detail.unwrap_or_default().contains("gave 4 bytes"));
            }
            other => panic!("{other:?}"),
        }
        // The bytes it had go out, then the body errs (never a clean end).
        assert!(matches!(poll(&ex), Poll::Ready(Some(Ok(_)))));
        let mut ended = None;
        for _ in 0..3 {
            if let Poll::Ready(r) = poll(&ex) {
                ended = Some(r);
                break;
            }
        }
        assert!(matches!(ended, Some(Some(Err(_)))), "{ended:?}");

        // A file of exactly the declared length ends cleanly.
        let (ex, _rx) = exchange(false);
        ex.start(200, &[(b"content-length", b"4")], false).unwrap();
        let mut push = std::pin::pin!(ex.push_streamed(Bytes::from_static(b"four")));
        assert!(matches!(
            push.as_mut().poll(&mut cx),
            Poll::Ready(Streamed::Queued)
        ));
        ex.end_streamed();
        assert_eq!(ex.end_state(), crate::exchange::EndState::Clean);
    }

    #[test]
    fn a_file_keeps_one_write_queued_whatever_the_high_water_mark() {
        // The test exchange's high-water mark is 10 bytes; its write buffer
        // size 64 KiB, so one write is four 64 KiB frames.
        let (ex, _rx) = exchange(false);
        assert_eq!(ex.config().file_window(), bytes_per_write(64 * 1024));
        assert_eq!(ex.config().file_window(), 256 * 1024);
        ex.start(200, &[], false).unwrap();
        assert_eq!(ex.begin_stream_body().unwrap(), None);
        let chunk = Bytes::from(vec![b'f'; 64 * 1024]);
        let mut cx = Context::from_waker(Waker::noop());
        for i in 1..=4 {
            let mut push = std::pin::pin!(ex.push_streamed(chunk.clone()));
            assert!(
                matches!(push.as_mut().poll(&mut cx), Poll::Ready(Streamed::Queued)),
                "chunk {i} is queued at once"
            );
        }
        assert_eq!(ex.buffered_amount(), 256 * 1024);
        let mut fifth = std::pin::pin!(ex.push_streamed(chunk.clone()));
        assert!(
            fifth.as_mut().poll(&mut cx).is_pending(),
            "a full window waits for the network"
        );
        assert!(matches!(poll(&ex), Poll::Ready(Some(Ok(_)))));
        assert!(
            matches!(fifth.as_mut().poll(&mut cx), Poll::Ready(Streamed::Queued)),
            "a frame taken makes room"
        );
        assert_eq!(ex.buffered_amount(), 256 * 1024);
    }

    #[test]
    fn a_file_waiting_for_room_on_a_bodiless_response_stops_when_hyper_drops_the_body() {
        for status in [204, 304] {
            let (ex, _rx) = exchange(false);
            ex.start(status, &[], false).unwrap();
            assert_eq!(ex.begin_stream_body().unwrap(), None);
            let chunk = Bytes::from(vec![b'f'; 64 * 1024]);
            let mut cx = Context::from_waker(Waker::noop());
            for _ in 1..=4 {
                let mut push = std::pin::pin!(ex.push_streamed(chunk.clone()));
                assert!(push.as_mut().poll(&mut cx).is_ready());
            }
            let mut fifth = std::pin::pin!(ex.push_streamed(chunk.clone()));
            assert!(
                fifth.as_mut().poll(&mut cx).is_pending(),
                "the window is full"
            );
            // hyper writes the head and drops the body it may not send.
            ex.body_dropped("closed", "test");
            assert!(
                matches!(
                    fifth.as_mut().poll(&mut cx),
                    Poll::Ready(Streamed::NotWanted)
                ),
                "{status}: the producer hears it may stop reading"
            );
            ex.end_streamed();
            assert_eq!(ex.finish(None, false), FinishOutcome::Clean, "{status}");
        }
    }

    #[test]
    fn head_request_with_a_file_body_completes_without_reading_it() {
        let (ex, mut rx) = exchange(true);
        ex.start(200, &[(b"content-length", b"1234")], false)
            .unwrap();
        assert_eq!(ex.begin_stream_body().unwrap(), Some(SendOutcome::Ready));
        assert!(
            matches!(rx.try_recv(), Ok(Head::App { .. })),
            "the head goes out"
        );
        assert_eq!(ex.finish(None, false), FinishOutcome::Clean);
    }
}
