//! How every baseline starts: glibc malloc's thresholds fixed, then tokio's
//! multi-thread runtime.  Included with `#[path]`.
//!
//! glibc trims the heap top back to the kernel once 128 KiB of it is free,
//! until freeing a block it had mapped itself (a 1 MiB body, say) raises
//! both thresholds: so hyper-baseline's file route ran at 2.9k requests/s
//! when started fresh and at 6.1k after one 1 MiB echo, depending on what
//! came first.  Fixed at what pagi-rs sets for its Perl heaps
//! (src/interp/malloc.rs), a baseline is at its best from the start.

use std::future::Future;

/// Run `main` to completion on a multi-thread runtime.
pub fn run<F: Future>(main: F) -> std::io::Result<F::Output> {
    // SAFETY: mallopt is not thread-safe (MT-Unsafe in its manual page);
    // no thread exists yet, the runtime's are started below.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(main))
}
