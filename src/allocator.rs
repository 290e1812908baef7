//! The process's Rust allocator: mimalloc, asked for alignment only when a
//! type needs more than every mimalloc block already has.
//!
//! Per-request allocations (scope, exchange, frames) cross threads, a
//! pattern mimalloc handles with far less contention than glibc's malloc.
//! The `mimalloc` crate's allocator passes every request to
//! `mi_malloc_aligned`, whose fast path covers only blocks of up to 1 KiB;
//! anything larger whose size is not a power of two (hyper's route future,
//! a read buffer, a scope's header list) took the over-allocating path,
//! which also marks the block's page as holding interior pointers and
//! slows every later free on it.  Every mimalloc block is a whole number of
//! words from a page start aligned to 16 bytes, so a word's alignment needs
//! no aligned call (`bench/README.md`, session 32).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// The alignment every block `mi_malloc` returns has: one machine word.
const WORD_ALIGN: usize = std::mem::size_of::<usize>();

pub struct Allocator;

/// Whether `align` is met by any block without asking for it.
#[inline]
fn plain(align: usize) -> bool {
    align <= WORD_ALIGN
}

// SAFETY (the impl): every function hands mimalloc's pointers straight
// back, and frees and reallocates only pointers mimalloc returned (the
// GlobalAlloc contract guarantees the caller passes those).  mimalloc
// frees aligned and plain blocks alike through `mi_free`.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain calls with a size; mimalloc returns null on failure.
        unsafe {
            if plain(layout.align()) {
                mi_malloc(layout.size()) as *mut u8
            } else {
                mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as alloc.
        unsafe {
            if plain(layout.align()) {
                mi_zalloc(layout.size()) as *mut u8
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (GlobalAlloc's contract).
        unsafe { mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; the new
        // block keeps the alignment the layout asks for.
        unsafe {
            if plain(layout.align()) {
                mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The premise of `plain`: blocks of every size class, small, medium
    /// and huge, are word-aligned without asking.
    #[test]
    fn every_plain_block_is_word_aligned() {
        let sizes = (1..=512).chain((513..=70_000).step_by(97)).chain([
            1 << 20,
            (1 << 22) + 24,
            (1 << 25) + 8,
        ]);
        for size in sizes {
            let layout = Layout::from_size_align(size, WORD_ALIGN).unwrap();
            // Several blocks of a size, so that not only a page's first is seen.
            let blocks: Vec<*mut u8> = (0..3).map(|_| unsafe { Allocator.alloc(layout) }).collect();
            for &p in &blocks {
                assert!(!p.is_null(), "{size} bytes");
                assert_eq!(p as usize % WORD_ALIGN, 0, "{size} bytes at {p:p}");
            }
            for p in blocks {
                unsafe { Allocator.dealloc(p, layout) };
            }
        }
    }

    #[test]
    fn larger_alignments_are_asked_for_and_kept_through_realloc() {
        for align in [16, 64, 128, 4096] {
            for size in [1, 24, 1000, 1900, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = Allocator.alloc(layout);
                    assert_eq!(p as usize % align, 0, "{size} bytes aligned to {align}");
                    p.write_bytes(0xa5, size);
                    let q = Allocator.realloc(p, layout, size * 3);
                    assert_eq!(
                        q as usize % align,
                        0,
                        "grown to {} aligned to {align}",
                        size * 3
                    );
                    assert!((0..size).all(|i| *q.add(i) == 0xa5), "contents kept");
                    Allocator.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    let z = Allocator.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0), "zeroed");
                    Allocator.dealloc(z, layout);
                }
            }
        }
    }

    #[test]
    fn plain_realloc_keeps_contents_and_word_alignment() {
        let layout = Layout::from_size_align(100, WORD_ALIGN).unwrap();
        unsafe {
            let p = Allocator.alloc(layout);
            p.write_bytes(7, 100);
            let q = Allocator.realloc(p, layout, 100_000);
            assert_eq!(q as usize % WORD_ALIGN, 0);
            assert!((0..100).all(|i| *q.add(i) == 7));
            Allocator.dealloc(q, Layout::from_size_align(100_000, WORD_ALIGN).unwrap());
        }
    }
}
