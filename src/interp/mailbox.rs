//! The channel from the network core into one interpreter thread: a queue plus
//! an eventfd that the interpreter's IO::Async loop watches.
//!
//! The eventfd is written only when the interpreter is not already notified,
//! so under load one wake-up carries a whole batch of messages.  The consumer
//! clears the flag with an atomic swap *before* draining; clearing it after
//! could lose a wake-up for a message pushed in between.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::messages::ToPerl;

pub struct Mailbox {
    queue: Mutex<VecDeque<ToPerl>>,
    notified: AtomicBool,
    wake_fd: OwnedFd,
    /// Requests dispatched to this interpreter and not yet finished; the pool
    /// uses it to pick the least busy interpreter.
    pub in_flight: AtomicUsize,
    /// New requests posted and not yet handed to Perl: what a busy
    /// interpreter has let pile up (`--max-queued-requests` bounds it).
    waiting: AtomicUsize,
}

impl Mailbox {
    pub fn new() -> io::Result<Mailbox> {
        // SAFETY: eventfd has no memory-safety preconditions; we check the result.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Mailbox {
            queue: Mutex::new(VecDeque::with_capacity(256)),
            notified: AtomicBool::new(false),
            // SAFETY: fd was just returned by eventfd and is owned by nobody else.
            wake_fd: unsafe { OwnedFd::from_raw_fd(fd) },
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        })
    }

    pub fn push(&self, msg: ToPerl) {
        if matches!(msg, ToPerl::Request { .. }) {
            self.waiting.fetch_add(1, Ordering::AcqRel);
        }
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(msg);
        if !self.notified.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live u64 to our own eventfd.  A
            // failure (counter overflow) still leaves the fd readable.
            unsafe {
                libc::write(self.wake_fd.as_raw_fd(), (&one as *const u64).cast(), 8);
            }
        }
    }

    /// Called by the interpreter: re-arms notification, resets the eventfd
    /// if it was written, and moves every queued message into `into` (one
    /// lock for the whole batch).  Returns how many messages were moved.
    pub fn take_all(&self, into: &mut VecDeque<ToPerl>) -> usize {
        if self.notified.swap(false, Ordering::AcqRel) {
            let mut counter: u64 = 0;
            // SAFETY: reading 8 bytes into a live u64 from our own
            // non-blocking eventfd; EAGAIN is harmless.
            unsafe {
                libc::read(
                    self.wake_fd.as_raw_fd(),
                    (&mut counter as *mut u64).cast(),
                    8,
                );
            }
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = q.len();
        if into.is_empty() {
            std::mem::swap(into, &mut q);
        } else {
            into.extend(q.drain(..));
        }
        n
    }

    /// New requests not yet handed to Perl.
    pub fn waiting_requests(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Perl took a new request (see `waiting_requests`).
    pub fn request_taken(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }

    /// A duplicate of the eventfd for Perl, which closes what it opens.
    pub fn dup_wake_fd(&self) -> io::Result<RawFd> {
        // SAFETY: dup of an fd we own; the result is checked.
        let fd = unsafe { libc::fcntl(self.wake_fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(fd)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wakeup_per_batch_and_rearm_after_take() {
        let mb = Mailbox::new().unwrap();
        mb.push(ToPerl::Stop);
        mb.push(ToPerl::Stop);
        let mut counter: u64 = 0;
        let n = unsafe { libc::read(mb.wake_fd.as_raw_fd(), (&mut counter as *mut u64).cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(counter, 1, "two pushes, one wake-up");
        let mut got = VecDeque::new();
        mb.take_all(&mut got);
        assert_eq!(got.len(), 2);
        mb.push(ToPerl::Stop);
        let n = unsafe { libc::read(mb.wake_fd.as_raw_fd(), (&mut counter as *mut u64).cast(), 8) };
        assert_eq!(n, 8, "a push after take_all wakes again");
    }
}
