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
//! The Rust functions below are the C functions, callable from Rust too (the tests do).

use std::ptr::{self, NonNull};

use pools::alloc::PoolAlloc;

/// The pools behind every function (their inner allocator is never asked: requests they do
/// not serve go to the C library here).
static POOLS: PoolAlloc = PoolAlloc::new();

/// glibc's `malloc` alignment: what `pagepool_malloc` promises.
const MALLOC_ALIGN: usize = 16;

/// Runs `f` with `errno` as it was before (as glibc's `free` does).
fn keeping_errno<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: `__errno_location` returns this thread's errno, valid for the thread's life.
    let e = unsafe { *libc::__errno_location() };
    let r = f();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e };
    r
}

fn set_errno(e: i32) {
    // SAFETY: `__errno_location` returns this thread's errno, valid for the thread's life.
    unsafe { *libc::__errno_location() = e };
}

/// `malloc`: `size` bytes, contents unspecified; NULL and `ENOMEM` when there is no memory.
#[unsafe(no_mangle)]
pub extern "C" fn pagepool_malloc(size: usize) -> *mut libc::c_void {
    match POOLS.alloc_pooled(size, MALLOC_ALIGN, false) {
        Some(p) => p.as_ptr().cast(),
        // SAFETY: malloc has no preconditions.
        None => unsafe { libc::malloc(size) },
    }
}

/// `calloc`: `n * size` zeroed bytes; NULL and `ENOMEM` when the product overflows or there
/// is no memory.
#[unsafe(no_mangle)]
pub extern "C" fn pagepool_calloc(n: usize, size: usize) -> *mut libc::c_void {
    let Some(bytes) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    };
    match POOLS.alloc_pooled(bytes, MALLOC_ALIGN, true) {
        Some(p) => p.as_ptr().cast(),
        // SAFETY: calloc has no preconditions.
        None => unsafe { libc::calloc(n, size) },
    }
}

/// `aligned_alloc`: `size` bytes aligned to `align`, a power of two (else NULL and `EINVAL`).
#[unsafe(no_mangle)]
pub extern "C" fn pagepool_aligned_alloc(align: usize, size: usize) -> *mut libc::c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    match POOLS.alloc_pooled(size, align, false) {
        Some(p) => p.as_ptr().cast(),
        None => {
            let mut p = ptr::null_mut();
            // posix_memalign wants a multiple of sizeof(void *); smaller powers of two are
            // served as that.
            let a = align.max(std::mem::size_of::<usize>());
            // SAFETY: `a` is a power of two and a multiple of the pointer size.
            match unsafe { libc::posix_memalign(&mut p, a, size) } {
                0 => p,
                e => {
                    set_errno(e);
                    ptr::null_mut()
                }
            }
        }
    }
}

/// `free`: releases a pointer from these functions; NULL does nothing; `errno` is kept.
///
/// # Safety
/// `p` is NULL or a live pointer from these functions, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagepool_free(p: *mut libc::c_void) {
    let Some(nn) = NonNull::new(p.cast::<u8>()) else {
        return;
    };
    keeping_errno(|| {
        if POOLS.owns(nn.as_ptr()) {
            // SAFETY: the pools' pointer, released by its holder (the caller's contract).
            unsafe { POOLS.free_pooled(nn) }
        } else {
            // SAFETY: not the pools', so the C library's (the caller's contract).
            unsafe { libc::free(p) }
        }
    })
}

/// `malloc_usable_size`: the bytes usable at `p`, all of which its holder may write; 0 for
/// NULL.
///
/// # Safety
/// `p` is NULL or a live pointer from these functions.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagepool_usable_size(p: *mut libc::c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    match POOLS.usable_size(p.cast()) {
        Some(n) => n,
        // SAFETY: a live pointer of the C library (the caller's contract).
        None => unsafe { libc::malloc_usable_size(p) },
    }
}

/// `realloc`: contents kept up to the smaller size; NULL `p` is `malloc`; size 0 frees `p`
/// and returns NULL (as glibc does); on failure NULL with `ENOMEM`, `p` untouched.
///
/// # Safety
/// `p` is NULL or a live pointer from these functions; on success it is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pagepool_realloc(p: *mut libc::c_void, size: usize) -> *mut libc::c_void {
    if p.is_null() {
        return pagepool_malloc(size);
    }
    if size == 0 {
        // SAFETY: forwarded from the caller.
        unsafe { pagepool_free(p) };
        return ptr::null_mut();
    }
    let ours = POOLS.owns(p.cast());
    if ours && POOLS.resize_in_place(p.cast(), size, MALLOC_ALIGN) {
        return p;
    }
    if ours
        // SAFETY: the caller's live block of the pools, replaced by the result on success.
        && let Some(q) = unsafe { POOLS.grow_pooled(NonNull::new_unchecked(p.cast()), size, MALLOC_ALIGN) }
    {
        return q.as_ptr().cast();
    }
    // SAFETY: `p` is live (the caller's contract): its usable size is known to whoever made it.
    let old = unsafe { pagepool_usable_size(p) };
    if !ours && !POOLS.serves(size) {
        // Neither end is the pools': the C library's own realloc (it may move pages itself).
        // SAFETY: the C library's live pointer.
        return unsafe { libc::realloc(p, size) };
    }
    let q = pagepool_malloc(size);
    if q.is_null() {
        return q;
    }
    // SAFETY: both are live and distinct, each at least the smaller size long.
    unsafe { ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), old.min(size)) };
    // SAFETY: the caller's live pointer, replaced by `q`.
    unsafe { pagepool_free(p) };
    q
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
    POOLS.flush();
    POOLS.trim() * pools::page_size()
}

/// Writes the pools' statistics as text to `fd`: 0 on success, -1 with `errno` set on error.
#[unsafe(no_mangle)]
pub extern "C" fn pagepool_write_stats(fd: libc::c_int) -> libc::c_int {
    let text = match POOLS.stats() {
        Some(s) => s.to_string(),
        None => "private pools: not used yet\n".to_string(),
    };
    let mut rest = text.as_bytes();
    while !rest.is_empty() {
        // SAFETY: `rest` is initialised memory we own; write(2) only reads it.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return -1;
        }
        rest = &rest[n as usize..];
    }
    0
}
