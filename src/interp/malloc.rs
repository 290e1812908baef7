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

use std::ffi::c_int;

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
    use super::user_set;

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
