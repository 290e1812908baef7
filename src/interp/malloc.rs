//! Perl's allocator: glibc's malloc (the Rust side uses mimalloc).
//!
//! Left at its defaults, glibc gives an interpreter thread's free memory
//! back to the kernel as soon as more than 128 KiB of it lies at the top of
//! the thread's heap, and takes it back, page fault by page fault, at the
//! next allocation.  Request bodies are 64 KiB strings made and freed all
//! the time, so an upload kept doing both: about 45 page faults per MiB
//! echoed and a tenth of the interpreter thread (`perf`: exc_page_fault,
//! clear_page_erms).  glibc raises the limit by itself only after freeing
//! a block it had mapped on its own (128 KiB and larger), which a server of
//! 64 KiB chunks never does.
//!
//! So the limits are set once, before any thread exists, to what glibc's
//! own adjustment would reach for 4 MiB blocks: blocks under 4 MiB come from
//! the heap, and up to 8 MiB of free heap stays with the process.  A limit
//! the user set (`GLIBC_TUNABLES`, or glibc's older `MALLOC_*_` variables)
//! is left as given.
//!
//! Because Perl allocates through the C library's `malloc`, a buffer taken
//! from it on the network thread can become a Perl string's own buffer
//! ([`PerlBuffer`]): a request-body chunk is copied once, on the thread that
//! just read it, and the interpreter adopts it without a copy of its own.

use std::ffi::c_int;
use std::ptr::NonNull;

/// Bytes in a buffer from the C library's `malloc`, followed by a NUL and
/// one spare byte, as Perl keeps its strings (the NUL after the string, the
/// last byte for its copy-on-write count).  The interpreter may adopt it as
/// a string's buffer (`take`), after which Perl frees it; otherwise it is
/// freed when dropped, on whichever thread that happens.
pub struct PerlBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is owned by this value alone; malloc'd memory may be
// freed on any thread.
unsafe impl Send for PerlBuffer {}

impl PerlBuffer {
    /// What a string of `len` bytes takes: the NUL and the count byte.
    const SPARE: usize = 2;

    /// The pieces joined into one buffer; None when `malloc` fails (the
    /// caller keeps the pieces instead).
    pub fn joined(pieces: &[bytes::Bytes], len: usize) -> Option<PerlBuffer> {
        let size = len.checked_add(Self::SPARE)?;
        // SAFETY: malloc may be called with any size; a null return is
        // handled below.
        let ptr = NonNull::new(unsafe { libc::malloc(size) }.cast::<u8>())?;
        let mut at = 0;
        for piece in pieces {
            let n = piece.len().min(len - at);
            // SAFETY: `at + n <= len < size`, inside the allocation, which
            // nothing else can see yet; the source is a live Bytes.
            unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), ptr.as_ptr().add(at), n) };
            at += n;
        }
        // SAFETY: `at <= len` and `len + 2 == size`: both bytes are inside.
        unsafe {
            ptr.as_ptr().add(at).write(0);
            ptr.as_ptr().add(at + 1).write(0);
        }
        Some(PerlBuffer { ptr, len: at })
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written in `joined`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Give the buffer up: (pointer, string length, allocated size).  The
    /// caller owns it from here and must `free` it (Perl does, once a
    /// string's buffer).
    pub fn take(self) -> (*mut u8, usize, usize) {
        let taken = (self.ptr.as_ptr(), self.len, self.len + Self::SPARE);
        std::mem::forget(self);
        taken
    }
}

impl std::fmt::Debug for PerlBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PerlBuffer({} bytes)", self.len)
    }
}

impl Drop for PerlBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc in `joined` and not given up (`take`
        // forgets the value).
        unsafe { libc::free(self.ptr.as_ptr().cast()) };
    }
}

/// Allocations from this size up get their own mapping.
const MMAP_THRESHOLD: c_int = 4 * 1024 * 1024;
/// Free memory at the top of a heap beyond this goes back to the kernel.
const TRIM_THRESHOLD: c_int = 8 * 1024 * 1024;

/// Set the limits (see the module comment).  Call before any thread exists.
pub fn keep_freed_memory() {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    for (param, value, tunable, variable) in [
        (
            libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
            "glibc.malloc.mmap_threshold",
            "MALLOC_MMAP_THRESHOLD_",
        ),
        (
            libc::M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
            "glibc.malloc.trim_threshold",
            "MALLOC_TRIM_THRESHOLD_",
        ),
    ] {
        if user_set(&tunables, tunable) || std::env::var_os(variable).is_some() {
            continue;
        }
        // SAFETY: mallopt only changes malloc's parameters; called on the
        // main thread before any other exists.  A 0 (refused) leaves
        // glibc's defaults, which work, only slower.
        unsafe {
            libc::mallopt(param, value);
        }
    }
}

/// Whether `GLIBC_TUNABLES` (`name=value:name=value...`) sets `tunable`.
fn user_set(tunables: &str, tunable: &str) -> bool {
    tunables
        .split(':')
        .any(|entry| entry.split('=').next() == Some(tunable))
}

#[cfg(test)]
mod tests {
    use super::{user_set, PerlBuffer};
    use bytes::Bytes;

    #[test]
    fn a_perl_buffer_joins_the_pieces_and_ends_in_a_nul() {
        let pieces = [
            Bytes::from_static(b"hello, "),
            Bytes::new(),
            Bytes::from_static(b"world"),
        ];
        let buf = PerlBuffer::joined(&pieces, 12).unwrap();
        assert_eq!(buf.as_bytes(), b"hello, world");
        let (ptr, len, size) = buf.take();
        assert_eq!((len, size), (12, 14));
        // SAFETY: `take` handed over the 14-byte allocation.
        unsafe {
            assert_eq!(*ptr.add(12), 0, "NUL after the string");
            libc::free(ptr.cast());
        }
        let empty = PerlBuffer::joined(&[], 0).unwrap();
        assert_eq!(empty.as_bytes(), b"");
    }

    #[test]
    fn a_perl_buffer_takes_no_more_than_its_length() {
        let pieces = [Bytes::from_static(b"abcdef")];
        let buf = PerlBuffer::joined(&pieces, 4).unwrap();
        assert_eq!(buf.as_bytes(), b"abcd");
    }

    #[test]
    fn a_tunable_counts_as_set_only_under_its_own_name() {
        let t = "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=131072";
        assert!(user_set(t, "glibc.malloc.trim_threshold"));
        assert!(!user_set(t, "glibc.malloc.mmap_threshold"));
        assert!(!user_set("", "glibc.malloc.trim_threshold"));
        assert!(!user_set(
            "glibc.malloc.trim_threshold_x=1",
            "glibc.malloc.trim_threshold"
        ));
    }
}
