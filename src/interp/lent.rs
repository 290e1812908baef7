//! Response bodies lent to the network without a copy.
//!
//! A large body string (lend.c decides which) is not copied into a `Bytes`.
//! The C layer makes a
//! private scalar that shares the application's string buffer (Perl's
//! copy-on-write), and the network gets a `Bytes` over that buffer.  Perl
//! never writes into a buffer that another scalar shares (a writer copies
//! first), so the bytes stay as they were while the network reads them.
//!
//! The private scalar's reference count, and the buffer's copy-on-write
//! count, may only be touched on the interpreter's own thread.  So when the
//! network drops the `Bytes`, the scalar goes back to its [`Lender`], and the
//! interpreter frees it at the end of its next batch of messages
//! (lend.c's `release_returned_loans`, at the end of every batch).  If the interpreter is idle, a
//! return that brings the bytes waiting past [`WAKE_AT`] wakes it.
//!
//! An interpreter freed while scalars are still lent leaves them alone:
//! pagi_interp_free runs perl_destruct at level 0, which frees no plain
//! scalar, so the bytes stay readable until the process ends.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::mailbox::Mailbox;
use super::messages::ToPerl;

/// Bytes returned and not yet freed past which an idle interpreter is woken
/// to free them, so that a quiet server does not hold a large body.
pub const WAKE_AT: usize = 1024 * 1024;

/// One interpreter's loans: the scalars the network has let go of, waiting
/// for the interpreter to free them.
pub struct Lender {
    returned: Mutex<Returned>,
    mailbox: Arc<Mailbox>,
}

#[derive(Default)]
struct Returned {
    scalars: Vec<usize>,
    /// Their strings' lengths, added up.
    bytes: usize,
}

impl Lender {
    pub fn new(mailbox: Arc<Mailbox>) -> Arc<Lender> {
        Arc::new(Lender {
            returned: Mutex::new(Returned::default()),
            mailbox,
        })
    }

    /// A `Bytes` over `len` bytes at `ptr`, the string of scalar `sv`.
    ///
    /// # Safety
    ///
    /// `sv` is a scalar of this lender's interpreter, and the caller hands
    /// over one reference to it; `ptr`/`len` is its string, which nothing
    /// writes or frees while that reference is held.
    pub unsafe fn lend(self: &Arc<Self>, sv: *mut c_void, ptr: *const u8, len: usize) -> Bytes {
        Bytes::from_owner(Loan {
            sv: sv as usize,
            ptr,
            len,
            lender: Arc::clone(self),
        })
    }

    /// Moves up to `out.len()` returned scalars into `out`; returns how many.
    /// Only the interpreter's own thread may free what it gets.
    pub fn take_returned(&self, out: &mut [*mut c_void]) -> usize {
        let mut returned = self.lock();
        let scalars = &mut returned.scalars;
        let n = scalars.len().min(out.len());
        for (slot, sv) in out.iter_mut().zip(scalars.drain(scalars.len() - n..)) {
            *slot = sv as *mut c_void;
        }
        if returned.scalars.is_empty() {
            returned.bytes = 0;
        }
        n
    }

    fn give_back(&self, sv: usize, len: usize) {
        let before = {
            let mut returned = self.lock();
            returned.scalars.push(sv);
            let before = returned.bytes;
            returned.bytes = before.saturating_add(len);
            before
        };
        if before < WAKE_AT && before.saturating_add(len) >= WAKE_AT {
            // Ping: nothing for Perl, but the loop turns and frees these.
            self.mailbox.push(ToPerl::Ping);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Returned> {
        // A panic elsewhere while holding it leaves plain data: still valid.
        self.returned.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A lent body: the network reads it, and dropping it gives the scalar back.
struct Loan {
    sv: usize,
    ptr: *const u8,
    len: usize,
    lender: Arc<Lender>,
}

// SAFETY: the network only reads the bytes, which nothing writes while the
// loan lives (see Lender::lend); the scalar itself is only touched again by
// its interpreter, after the loan is dropped.
unsafe impl Send for Loan {}

impl AsRef<[u8]> for Loan {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: ptr/len stay valid and unchanged while the loan lives
        // (Lender::lend's contract).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        self.lender.give_back(self.sv, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a scalar's address: it only comes back, never read.
    fn fake_sv(n: usize) -> *mut c_void {
        (n * 0x1000) as *mut c_void
    }

    fn lender() -> Arc<Lender> {
        Lender::new(Arc::new(Mailbox::new().unwrap()))
    }

    #[test]
    fn a_loan_reads_the_lent_bytes_and_comes_back_when_every_clone_is_gone() {
        let lender = lender();
        let data = b"lent bytes".to_vec();
        // SAFETY: `data` outlives the loan and is not written; the "scalar"
        // is a stand-in address that only comes back, never dereferenced.
        let bytes = unsafe { lender.lend(fake_sv(1), data.as_ptr(), data.len()) };
        let tail = bytes.slice(5..);
        assert_eq!(&bytes[..], b"lent bytes");
        drop(bytes);
        let mut out = [std::ptr::null_mut(); 4];
        assert_eq!(lender.take_returned(&mut out), 0, "a slice still holds it");
        assert_eq!(&tail[..], b"bytes");
        drop(tail);
        assert_eq!(lender.take_returned(&mut out), 1);
        assert_eq!(out[0], fake_sv(1));
        assert_eq!(
            lender.take_returned(&mut out),
            0,
            "each scalar comes back once"
        );
    }

    #[test]
    fn returns_are_taken_in_batches_of_the_callers_size() {
        let lender = lender();
        let data = [7u8; 8];
        for sv in 1..=5usize {
            // SAFETY: as above.
            drop(unsafe { lender.lend(fake_sv(sv), data.as_ptr(), data.len()) });
        }
        let mut out = [std::ptr::null_mut(); 2];
        let mut got = Vec::new();
        loop {
            let n = lender.take_returned(&mut out);
            if n == 0 {
                break;
            }
            got.extend(out[..n].iter().map(|p| *p as usize / 0x1000));
        }
        got.sort_unstable();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn returning_past_the_mark_wakes_the_interpreter_once() {
        let mailbox = Arc::new(Mailbox::new().unwrap());
        let lender = Lender::new(Arc::clone(&mailbox));
        let big = vec![0u8; WAKE_AT / 2 + 1];
        // SAFETY: as above.
        drop(unsafe { lender.lend(fake_sv(1), big.as_ptr(), big.len()) });
        assert!(!mailbox.has_messages(), "below the mark: no wake-up");
        // SAFETY: as above.
        drop(unsafe { lender.lend(fake_sv(2), big.as_ptr(), big.len()) });
        assert!(mailbox.has_messages(), "past the mark: a wake-up");
        let mut inbox = std::collections::VecDeque::new();
        mailbox.take_all(&mut inbox);
        // SAFETY: as above.
        drop(unsafe { lender.lend(fake_sv(3), big.as_ptr(), big.len()) });
        assert!(
            !mailbox.has_messages(),
            "already past it: no second wake-up"
        );
        let mut out = [std::ptr::null_mut(); 8];
        assert_eq!(lender.take_returned(&mut out), 3);
        // SAFETY: as above.
        drop(unsafe { lender.lend(fake_sv(4), big.as_ptr(), big.len()) });
        drop(unsafe { lender.lend(fake_sv(5), big.as_ptr(), big.len()) });
        assert!(
            mailbox.has_messages(),
            "freed, then past the mark again: woken again"
        );
    }
}
