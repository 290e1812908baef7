//! The channel from the network core into one interpreter thread: a queue plus
//! an eventfd that the interpreter's IO::Async loop watches.
//!
//! The eventfd is written only when the interpreter is not already notified.
//! "Notified" stays set for as long as the interpreter keeps draining: pushes
//! made while it works on a batch cost no system call, and it re-arms only
//! when it finds the queue empty, just before it goes back to its loop.  The
//! re-arm resets the eventfd, *then* clears the flag, *then* looks at the
//! queue once more.  Each order matters on its own: resetting after clearing
//! would swallow the write of a push made in between, leaving the flag set
//! and the eventfd silent so that no later push would write it again; and a
//! push that lands before the clear is seen by the last look.
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// Batches the interpreter has taken: proof that its loop turns
    /// (`--heartbeat-timeout`).
    drains: AtomicU64,
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
            drains: AtomicU64::new(0),
        })
    }

    /// The queue is a plain VecDeque whose operations leave it valid even if
    /// they panic, and a panic while it is locked can only come from one of
    /// them: recovering from a poisoned lock is sound.
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<ToPerl>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reset_wake_fd(&self) {
        let mut counter: u64 = 0;
        // SAFETY: reading 8 bytes into a live u64 from our own non-blocking
        // eventfd; EAGAIN (nothing written) is harmless.
        unsafe {
            libc::read(
                self.wake_fd.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                8,
            );
        }
    }

    pub fn push(&self, msg: ToPerl) {
        if matches!(msg, ToPerl::Request { .. }) {
            self.waiting.fetch_add(1, Ordering::AcqRel);
        }
        self.lock_queue().push_back(msg);
        if !self.notified.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live u64 to our own eventfd.  A
            // failure (counter overflow) still leaves the fd readable.
            unsafe {
                libc::write(self.wake_fd.as_raw_fd(), (&one as *const u64).cast(), 8);
            }
        }
    }

    /// Called by the interpreter: moves every queued message into `into`
    /// (one lock for the whole batch) and returns how many it moved.  When
    /// there are none, it re-arms notification first (see the module
    /// comment), so a 0 means the interpreter may sleep: the next push wakes
    /// it.  Callers drain until 0.
    pub fn take_all(&self, into: &mut VecDeque<ToPerl>) -> usize {
        self.drains.fetch_add(1, Ordering::Release);
        let n = self.move_queued(into);
        if n > 0 {
            return n;
        }
        // Unconditionally: a push's write can land after the flag it set was
        // cleared (one spurious wake-up), and an eventfd left readable would
        // keep the loop spinning.
        self.reset_wake_fd();
        self.notified.swap(false, Ordering::AcqRel);
        let n = self.move_queued(into);
        if n > 0 {
            // Still draining: later pushes need not write.  A push between
            // the clear and here has written the eventfd, which costs one
            // spurious wake-up and nothing else.
            self.notified.store(true, Ordering::Release);
        }
        n
    }

    fn move_queued(&self, into: &mut VecDeque<ToPerl>) -> usize {
        let mut q = self.lock_queue();
        let n = q.len();
        if n == 0 {
            return 0;
        }
        if into.is_empty() {
            std::mem::swap(into, &mut q);
        } else {
            into.extend(q.drain(..));
        }
        n
    }

    /// Is anything queued for the interpreter right now?
    pub fn has_messages(&self) -> bool {
        !self.lock_queue().is_empty()
    }

    /// How many batches the interpreter has taken so far.
    pub fn drains(&self) -> u64 {
        self.drains.load(Ordering::Acquire)
    }

    /// New requests not yet handed to Perl.
    pub fn waiting_requests(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Perl took a new request (see `waiting_requests`).
    pub fn request_taken(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }

    /// After a fork: replace the eventfd, under its own number and under
    /// `perl_fd` (the duplicate the loop watches), by a new one that only
    /// this process holds.  An eventfd is one kernel object shared by every
    /// process that inherited it: a sibling's write would wake this loop and
    /// its read would swallow this process's wake-ups.
    pub fn renew_wake_fd(&self, perl_fd: RawFd) -> io::Result<()> {
        // SAFETY: eventfd has no memory-safety preconditions; checked below.
        let fresh = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fresh < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fresh` was just returned by eventfd and is owned here.
        let fresh = unsafe { OwnedFd::from_raw_fd(fresh) };
        for target in [self.wake_fd.as_raw_fd(), perl_fd] {
            // SAFETY: dup3 atomically replaces `target`, a descriptor this
            // process owns (the mailbox's, and the loop's duplicate of it),
            // with the new eventfd; no other thread uses it yet.
            if unsafe { libc::dup3(fresh.as_raw_fd(), target, libc::O_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // A wake-up inherited half-way must not leave the flag set with no
        // write to come: start from "not notified".
        self.notified.store(false, Ordering::Release);
        Ok(())
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
    fn one_wakeup_per_batch_and_rearm_when_empty() {
        let mb = Mailbox::new().unwrap();
        mb.push(ToPerl::Stop);
        mb.push(ToPerl::Stop);
        let mut counter: u64 = 0;
        let n = unsafe { libc::read(mb.wake_fd.as_raw_fd(), (&mut counter as *mut u64).cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(counter, 1, "two pushes, one wake-up");
        let mut got = VecDeque::new();
        assert_eq!(mb.take_all(&mut got), 2);
        // The interpreter is still draining: a push now needs no wake-up,
        // and the next take picks it up.
        mb.push(ToPerl::Stop);
        assert!(
            !eventfd_readable(&mb),
            "a push while draining writes nothing"
        );
        assert_eq!(mb.take_all(&mut got), 1);
        // Empty: re-armed, so the interpreter may sleep and a push wakes it.
        assert_eq!(mb.take_all(&mut got), 0);
        assert!(!eventfd_readable(&mb));
        mb.push(ToPerl::Stop);
        assert!(eventfd_readable(&mb), "a push after the re-arm wakes again");
    }

    fn eventfd_readable(mb: &Mailbox) -> bool {
        let mut pfd = libc::pollfd {
            fd: mb.wake_fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    /// Whatever the interleaving of a push with take_all, a consumer that
    /// drains until empty and then sleeps until the eventfd is readable, as
    /// the interpreter does, never misses a message.
    #[test]
    fn no_push_is_left_without_a_wakeup() {
        for _ in 0..200 {
            let mb = std::sync::Arc::new(Mailbox::new().unwrap());
            let producer = {
                let mb = mb.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        mb.push(ToPerl::Stop);
                    }
                })
            };
            let mut got = VecDeque::new();
            let mut taken = 0;
            while taken < 500 {
                // Consume only on a wake-up, as the interpreter's loop does;
                // a lost wake-up would stall here (bounded for the test).
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while !eventfd_readable(&mb) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "stalled: {taken} of 500 taken, no wake-up pending"
                    );
                    std::thread::yield_now();
                }
                loop {
                    let n = mb.take_all(&mut got);
                    if n == 0 {
                        break;
                    }
                    taken += n;
                }
                got.clear();
            }
            producer.join().unwrap();
        }
    }
}
