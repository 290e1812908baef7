//! How the kernel schedules an interpreter thread (`--interpreter-scheduling`).
//!
//! The network thread wakes the interpreter for every batch of messages.
//! Under the default policy (`SCHED_OTHER`) the woken interpreter may
//! preempt the network thread at once, in the middle of its work, and then
//! finds one message; under `SCHED_BATCH` it is not woken into the CPU
//! ahead of the running thread, so it takes an idle CPU or waits for the
//! slice, and finds several.  Under load that serves more requests with a
//! lower p99; for one request at a time the wait is pure latency.  So
//! `adaptive` (the default) switches: to batch once the interpreter keeps
//! finding more than one message per wake-up, back to the default once it
//! keeps finding one.  A switch is one system call, and rare.

use std::cell::Cell;

/// The policy asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheduling {
    /// Batch while busy, the default policy while requests come one at a
    /// time.
    #[default]
    Adaptive,
    /// Always `SCHED_BATCH`.
    Batch,
    /// Always `SCHED_OTHER`, the kernel's default for every thread.
    Normal,
}

/// Wake-ups in a row that took more than one message before the thread
/// turns batch.
const BUSY_WAKES_TO_BATCH: u32 = 4;
/// Wake-ups in a row that took one message before it turns back.
const LONE_WAKES_TO_NORMAL: u32 = 16;

impl Scheduling {
    /// Set the calling interpreter thread up for this policy.
    pub(super) fn apply_to_this_thread(self) {
        match self {
            Scheduling::Batch => set_batch(true),
            Scheduling::Normal => {}
            Scheduling::Adaptive => ADAPTIVE.with(|a| a.set(Some(Adaptive::default()))),
        }
    }
}

/// The adaptive policy's state for one thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Adaptive {
    batch: bool,
    /// Consecutive wake-ups that argue for the other policy.
    streak: u32,
    /// Messages taken since this wake-up began.
    taken: usize,
}

impl Adaptive {
    /// `n` messages were taken (0: the wake-up is over).  Returns the
    /// policy to switch to, if it changes.
    fn on_take(&mut self, n: usize) -> Option<bool> {
        if n > 0 {
            self.taken += n;
            return None;
        }
        let taken = std::mem::take(&mut self.taken);
        if taken == 0 {
            // A spurious wake-up says nothing about the load.
            return None;
        }
        let argues_for_other = if self.batch { taken == 1 } else { taken > 1 };
        if !argues_for_other {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.batch {
            LONE_WAKES_TO_NORMAL
        } else {
            BUSY_WAKES_TO_BATCH
        };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.batch = !self.batch;
        Some(self.batch)
    }
}

thread_local! {
    /// Set on interpreter threads that run the adaptive policy.
    static ADAPTIVE: Cell<Option<Adaptive>> = const { Cell::new(None) };
}

/// The interpreter took `n` messages from its mailbox; 0 ends a wake-up.
/// Called on the interpreter's thread; a no-op unless it is adaptive.
pub fn took_messages(n: usize) {
    ADAPTIVE.with(|cell| {
        let Some(mut state) = cell.get() else { return };
        let switch = state.on_take(n);
        cell.set(Some(state));
        if let Some(batch) = switch {
            set_batch(batch);
        }
    });
}

fn set_batch(batch: bool) {
    let policy = if batch {
        libc::SCHED_BATCH
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; param is a live struct the
    // call only reads.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        // The thread keeps its policy, which is only slower.
        tracing::debug!(
            "interpreter thread scheduling unchanged: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed whole wake-ups (messages per take, then the closing 0).
    fn wake(a: &mut Adaptive, takes: &[usize]) -> Option<bool> {
        let mut switch = None;
        for &n in takes.iter().chain([0].iter()) {
            if let Some(s) = a.on_take(n) {
                switch = Some(s);
            }
        }
        switch
    }

    #[test]
    fn turns_batch_after_busy_wakes_and_back_after_lone_ones() {
        let mut a = Adaptive::default();
        for _ in 1..BUSY_WAKES_TO_BATCH {
            assert_eq!(wake(&mut a, &[1, 2]), None);
        }
        assert_eq!(wake(&mut a, &[3]), Some(true), "busy wake-ups: batch");
        for _ in 1..LONE_WAKES_TO_NORMAL {
            assert_eq!(wake(&mut a, &[1]), None);
        }
        assert_eq!(wake(&mut a, &[1]), Some(false), "lone ones: back");
    }

    #[test]
    fn a_streak_must_be_unbroken_and_spurious_wakes_do_not_count() {
        let mut a = Adaptive::default();
        for _ in 0..10 {
            for _ in 1..BUSY_WAKES_TO_BATCH {
                assert_eq!(wake(&mut a, &[2]), None);
            }
            assert_eq!(wake(&mut a, &[1]), None, "one lone wake-up resets");
        }
        assert_eq!(wake(&mut a, &[]), None);
        assert!(!a.batch);
        for _ in 1..BUSY_WAKES_TO_BATCH {
            assert_eq!(wake(&mut a, &[2]), None);
            assert_eq!(
                wake(&mut a, &[]),
                None,
                "a spurious one neither counts nor resets"
            );
        }
        assert_eq!(wake(&mut a, &[2]), Some(true));
    }
}
