//! What an accept loop does when accept(2) fails.
//!
//! Some failures belong to one connection: it was reset or aborted while it
//! waited in the listen queue, or the network reported an error for it,
//! which Linux hands on from accept(2) (see its man page).  The connections
//! behind it are unaffected, so the loop goes on at once.
//!
//! The others, above all running out of descriptors (EMFILE, ENFILE) or
//! kernel memory, would fail again straight away: the loop waits
//! [`RETRY_AFTER`] before it tries again, and new connections wait in the
//! listen queue meanwhile (the kernel completes their handshakes), to be
//! taken as descriptors free up.  Such a spell is logged when it begins, at
//! most once every [`REMIND_EVERY`] while it lasts, and when accepting works
//! again, rather than at every retry.

use std::io;
use std::time::{Duration, Instant};

/// How long an accept loop waits after a failure that would repeat.
pub const RETRY_AFTER: Duration = Duration::from_millis(50);

/// How often a spell of failed accepts is logged again while it lasts.
pub const REMIND_EVERY: Duration = Duration::from_secs(60);

/// Whose failure an accept error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// One connection's (or an interrupted call): take the next at once.
    OneConnection,
    /// The process's or the system's (descriptors, memory) or unknown:
    /// retrying at once would spin.
    Resources,
}

/// Sort an accept error.
pub fn cause(error: &io::Error) -> Cause {
    match error.raw_os_error() {
        Some(
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::ECONNREFUSED
            | libc::ETIMEDOUT
            | libc::EPROTO
            | libc::ENOPROTOOPT
            | libc::ENETDOWN
            | libc::ENETUNREACH
            | libc::ENONET
            | libc::EHOSTDOWN
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            // A firewall rule refused this connection.
            | libc::EPERM
            | libc::EINTR,
        ) => Cause::OneConnection,
        _ => Cause::Resources,
    }
}

/// What to log about a spell of failed accepts.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    /// The first failure of a spell.
    Began,
    /// A reminder: `failures` failed attempts over `lasted`.
    Continues { failures: u64, lasted: Duration },
    /// Accepting works again after `failures` failed attempts over `lasted`.
    Ended { failures: u64, lasted: Duration },
}

/// One accept loop's current spell of failures, if any.
#[derive(Debug, Default)]
pub struct Spell {
    current: Option<Ongoing>,
}

#[derive(Debug)]
struct Ongoing {
    began: Instant,
    failures: u64,
    last_report: Instant,
}

impl Spell {
    /// An accept failed with a [`Cause::Resources`] error at `now`: what to
    /// log, if anything.
    pub fn failed(&mut self, now: Instant) -> Option<Report> {
        match &mut self.current {
            None => {
                self.current = Some(Ongoing {
                    began: now,
                    failures: 1,
                    last_report: now,
                });
                Some(Report::Began)
            }
            Some(spell) => {
                spell.failures += 1;
                if now.saturating_duration_since(spell.last_report) < REMIND_EVERY {
                    return None;
                }
                spell.last_report = now;
                Some(Report::Continues {
                    failures: spell.failures,
                    lasted: now.saturating_duration_since(spell.began),
                })
            }
        }
    }

    /// An accept succeeded at `now`: ends a spell, if one was running.
    pub fn accepted(&mut self, now: Instant) -> Option<Report> {
        self.current.take().map(|spell| Report::Ended {
            failures: spell.failures,
            lasted: now.saturating_duration_since(spell.began),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn one_connections_troubles_do_not_stop_the_loop() {
        for code in [
            libc::ECONNABORTED,
            libc::ECONNRESET,
            libc::EPROTO,
            libc::ENETUNREACH,
            libc::EPERM,
            libc::EINTR,
        ] {
            assert_eq!(cause(&os(code)), Cause::OneConnection, "errno {code}");
        }
    }

    #[test]
    fn running_out_of_descriptors_or_memory_waits() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(cause(&os(code)), Cause::Resources, "errno {code}");
        }
        // Unknown errors wait too: retrying them at once could spin.
        assert_eq!(cause(&os(libc::EBADF)), Cause::Resources);
        assert_eq!(cause(&io::Error::other("no errno")), Cause::Resources);
    }

    #[test]
    fn a_spell_is_reported_when_it_begins_now_and_then_and_when_it_ends() {
        let start = Instant::now();
        let mut spell = Spell::default();
        assert_eq!(spell.accepted(start), None, "no spell, nothing to end");

        assert_eq!(spell.failed(start), Some(Report::Began));
        // Retries every RETRY_AFTER stay quiet until a reminder is due.
        let mut at = start;
        let mut quiet = 0;
        while at + RETRY_AFTER < start + REMIND_EVERY {
            at += RETRY_AFTER;
            assert_eq!(spell.failed(at), None);
            quiet += 1;
        }
        let reminder_at = start + REMIND_EVERY;
        assert_eq!(
            spell.failed(reminder_at),
            Some(Report::Continues {
                failures: quiet + 2,
                lasted: REMIND_EVERY,
            })
        );
        // The next reminder counts from the last one.
        assert_eq!(spell.failed(reminder_at + RETRY_AFTER), None);

        let end = reminder_at + Duration::from_secs(5);
        assert_eq!(
            spell.accepted(end),
            Some(Report::Ended {
                failures: quiet + 3,
                lasted: end - start,
            })
        );
        assert_eq!(spell.accepted(end), None, "ended once");
        assert_eq!(spell.failed(end), Some(Report::Began), "a new spell");
    }
}
