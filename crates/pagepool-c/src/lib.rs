//! pagepool's private-memory pools as a C library: `libpagepool.so`, `libpagepool.a` and
//! `include/pagepool.h`.
//!
//! Requests from [`DEFAULT_THRESHOLD`](pools::alloc::DEFAULT_THRESHOLD) (64 KiB) to
//! [`DEFAULT_LARGEST`](pools::alloc::DEFAULT_LARGEST) (64 MiB) come from the pools of
//! [`PoolAlloc`]; every other request, and every pointer outside the pools' range, goes to the
//! C library's `malloc` family. Each function behaves as glibc's does at the edges (see the
//! header). A C program links it as any library:
//!
//! ```c
//! #include <pagepool.h>
//!
//! float *frame = pagepool_calloc(1 << 20, sizeof(float)); /* 4 MiB, zeroed, from the pools */
//! frame[0] = 1.0f;
//! pagepool_free(frame);                                  /* the worker zeroes it again */
//! pagepool_write_stats(2);
//! ```
//!
//! `cc app.c -Iinclude -Ltarget/release -lpagepool` (with `LD_LIBRARY_PATH=target/release`
//! to run it), or `target/release/libpagepool.a -lpthread -ldl -lm` for a static link.
//!
//! The Rust functions below are the C functions, callable from Rust too (the tests do). The
//! routing itself is `pagepool::route::Router`, which the `LD_PRELOAD` drop-in
//! (`crates/pagepool-preload`) uses over glibc's own functions.

use std::ffi::c_void;

use pools::alloc::PoolAlloc;

use pools::route::{self, Next, Router};

/// The pools behind every function (their inner allocator is never asked: requests they do
/// not serve go to the C library here). pagepool's own allocations go to the Rust global
/// allocator, never to these functions, so no thread-local guard is needed.
static POOLS: PoolAlloc = PoolAlloc::new().thread_guard(false);

/// The C library's `malloc` family, as the next allocator.
struct Libc;

impl Next for Libc {
    fn malloc(&self, size: usize) -> *mut c_void {
        // SAFETY: malloc has no preconditions.
        unsafe { libc::malloc(size) }
    }
    fn calloc(&self, n: usize, size: usize) -> *mut c_void {
        // SAFETY: calloc has no preconditions.
        unsafe { libc::calloc(n, size) }
    }
    fn memalign(&self, align: usize, size: usize) -> *mut c_void {
        let mut p = std::ptr::null_mut();
        // SAFETY: `align` is a power of two and a multiple of the pointer size (the trait's
        // contract); `p` is a valid out-pointer.
        match unsafe { libc::posix_memalign(&mut p, align, size) } {
            0 => p,
            e => {
                route::set_errno(e);
                std::ptr::null_mut()
            }
        }
    }
    unsafe fn realloc(&self, p: *mut c_void, size: usize) -> *mut c_void {
        // SAFETY: the C library's live pointer (the trait's contract).
        unsafe { libc::realloc(p, size) }
    }
    unsafe fn free(&self, p: *mut c_void) {
        // SAFETY: the C library's live pointer (the trait's contract).
        unsafe { libc::free(p) }
    }
    unsafe fn usable_size(&self, p: *mut c_void) -> usize {
        // SAFETY: the C library's live pointer (the trait's contract).
        unsafe { libc::malloc_usable_size(p) }
    }
}

/// The routing of every function: the pools, then the C library.
#[inline]
fn router() -> Router<'static, Libc> {
    Router {
        pools: &POOLS,
        next: Libc,
    }
}

/// `malloc`: `size` bytes, contents unspecified; NULL and `ENOMEM` when there is no memory.
#[unsafe(no_mangle)]
pub extern "C" fn pagepool_malloc(size: usize) -> *mut c_void {
    router().malloc(size)
}

/// `calloc`: `n * size` zeroed bytes; NULL and `ENOMEM` when the product overflows or there
/// is no memory.
#[unsafe(no_mangle)]
pub extern "C" fn pagepool_calloc(n: usize, size: usize) -> *mut c_void {
    router().calloc(n, size)
}

/// `aligned_alloc`: `size` bytes aligned to `align`, a power of two (else NULL and `EINVAL`).
#[unsafe(no_mangle)]
pub extern "C" fn pagepool_aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        route::set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    router().aligned(align, size)
}

/// `free`: releases a pointer from these functions; NULL does nothing; `errno` is kept.
///
/// # Safety
/// `p` is NULL or a live pointer from these functions, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagepool_free(p: *mut c_void) {
    // SAFETY: forwarded from the caller.
    unsafe { router().free(p) }
}

/// `malloc_usable_size`: the bytes usable at `p`, all of which its holder may write; 0 for
/// NULL.
///
/// # Safety
/// `p` is NULL or a live pointer from these functions.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagepool_usable_size(p: *mut c_void) -> usize {
    // SAFETY: forwarded from the caller.
    unsafe { router().usable_size(p) }
}

/// `realloc`: contents kept up to the smaller size; NULL `p` is `malloc`; size 0 frees `p`
/// and returns NULL (as glibc does); on failure NULL with `ENOMEM`, `p` untouched.
///
/// # Safety
/// `p` is NULL or a live pointer from these functions; on success it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagepool_realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarded from the caller.
    unsafe { router().realloc(p, size) }
}

/// The pools' statistics, for Rust callers; `None` before the first pooled request.
pub fn stats() -> Option<pools::alloc::PrivateStats> {
    POOLS.stats()
}

/// Waits until the worker has zeroed every released block waiting for it, for Rust callers.
pub fn flush() {
    POOLS.flush();
}

/// Gives every pooled block's memory back to the system; returns the bytes given back.
#[unsafe(no_mangle)]
pub extern "C" fn pagepool_trim() -> usize {
    router().trim()
}

/// Writes the pools' statistics and the registry's table as text to `fd`: 0 on success, -1
/// with `errno` set on error.
#[unsafe(no_mangle)]
pub extern "C" fn pagepool_write_stats(fd: libc::c_int) -> libc::c_int {
    router().write_stats(fd)
}
