//! The water marks of one outbound buffer (an HTTP response's, or a
//! WebSocket's): whether a send waits for the drain, when on_high_water
//! fires, and when the interpreter hears that the buffer drained.

use std::sync::atomic::{AtomicBool, Ordering};

use super::SendOutcome;

/// Said by an exchange to its connection's writer (http1/segments.rs):
/// the application streams faster than the socket drains, and more of the
/// body follows at once, so a write may leave its last short segment for
/// the next frame.  Set when a drain releases a send that waited for it;
/// cleared before the body's last frame is taken, so an end never waits.
#[derive(Debug, Default)]
pub struct BulkHint(AtomicBool);

impl BulkHint {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn clear(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The water-mark state of one buffer.  Its owner holds it under the lock
/// that guards the buffer.
#[derive(Debug, Default)]
pub(crate) struct WaterMarks {
    /// The buffer reached the high mark and has not yet fallen below the
    /// low one: on_high_water fires once per such crossing.
    high: bool,
    /// A send waits for this crossing's drain.
    waiter: bool,
}

/// What the interpreter is told when the buffer falls below the low mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DrainNews {
    /// A send waited for this drain: resolve it.  Without one, the news is
    /// for on_drain callbacks only, and must not resolve a send that began
    /// waiting after the drain (its message may still be on its way).
    pub settles_wait: bool,
}

impl WaterMarks {
    /// The verdict on a send that found `before` bytes queued and left
    /// `after`.
    ///
    /// As in the reference server, a send that finds the buffer at or above
    /// the mark (the threshold "at or above which the server applies
    /// backpressure") waits for the drain, and one that finds room is taken
    /// and resolves at once, even if its own bytes fill the buffer.  The
    /// network writes concurrently, so for a client that keeps up the buffer
    /// is usually empty again by the next send, and the app goes on without
    /// a wait.  One thing differs: a send that would leave twice the mark
    /// queued waits too, so an app that awaits its sends never has more
    /// than that queued when it sends (the send backlog limits, 16 marks,
    /// are for apps that do not await).
    pub fn on_send(&mut self, before: usize, after: usize, high_water: usize) -> SendOutcome {
        if after < high_water {
            return SendOutcome::Ready;
        }
        let first_crossing = !std::mem::replace(&mut self.high, true);
        let waits = before >= high_water || after >= high_water.saturating_mul(2);
        self.waiter |= waits;
        match (waits, first_crossing) {
            (false, true) => SendOutcome::ReachedHigh,
            (false, false) => SendOutcome::Ready,
            (true, true) => SendOutcome::HighWater,
            (true, false) => SendOutcome::StillHigh,
        }
    }

    /// Bytes left the buffer, leaving `buffered`.  Below the low mark after
    /// a crossing, the interpreter hears of it if a send waits or it has
    /// on_drain callbacks (`listening`); otherwise the drain is nobody's
    /// news, and a streaming app that never waits costs no message.
    pub fn on_written(
        &mut self,
        buffered: usize,
        low_water: usize,
        listening: bool,
    ) -> Option<DrainNews> {
        if !self.high || buffered >= low_water {
            return None;
        }
        self.high = false;
        let settles_wait = std::mem::take(&mut self.waiter);
        (settles_wait || listening).then_some(DrainNews { settles_wait })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SendOutcome::*;

    fn verdict(before: usize, after: usize, high: bool) -> (SendOutcome, bool) {
        let mut marks = WaterMarks {
            high,
            waiter: false,
        };
        let outcome = marks.on_send(before, after, 10);
        (outcome, marks.high)
    }

    #[test]
    fn a_send_waits_only_when_it_finds_the_buffer_full_or_would_leave_twice_the_mark() {
        // Below the mark after the send: nothing to say.
        assert_eq!(verdict(0, 9, false), (Ready, false));
        assert_eq!(verdict(5, 9, true), (Ready, true));
        // Found room and filled the buffer: taken at once; the first time
        // in a crossing, on_high_water fires.
        assert_eq!(verdict(0, 10, false), (ReachedHigh, true));
        assert_eq!(verdict(9, 19, false), (ReachedHigh, true));
        assert_eq!(verdict(9, 19, true), (Ready, true));
        // Found the buffer at the mark: waits.
        assert_eq!(verdict(10, 11, false), (HighWater, true));
        assert_eq!(verdict(10, 11, true), (StillHigh, true));
        // Would leave twice the mark: waits, even into an empty buffer.
        assert_eq!(verdict(0, 20, false), (HighWater, true));
        assert_eq!(verdict(5, 25, true), (StillHigh, true));
    }

    #[test]
    fn a_drain_is_news_only_to_a_waiting_send_or_to_on_drain_callbacks() {
        let mut marks = WaterMarks::default();
        assert_eq!(marks.on_send(0, 10, 10), ReachedHigh);
        assert_eq!(marks.on_written(5, 4, false), None, "not below low yet");
        assert_eq!(
            marks.on_written(3, 4, false),
            None,
            "nobody waits or listens"
        );
        assert_eq!(marks.on_send(0, 10, 10), ReachedHigh, "a new crossing");
        assert_eq!(
            marks.on_written(0, 4, true),
            Some(DrainNews {
                settles_wait: false
            }),
            "for on_drain only"
        );
        assert_eq!(marks.on_send(0, 10, 10), ReachedHigh);
        assert_eq!(marks.on_send(10, 15, 10), StillHigh);
        assert_eq!(
            marks.on_written(0, 4, false),
            Some(DrainNews { settles_wait: true })
        );
        assert_eq!(marks.on_written(0, 4, true), None, "once per crossing");
        // The next crossing's news settles nothing unless a send waits again.
        assert_eq!(marks.on_send(0, 10, 10), ReachedHigh);
        assert_eq!(
            marks.on_written(0, 4, true),
            Some(DrainNews {
                settles_wait: false
            })
        );
    }
}
