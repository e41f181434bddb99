//! The `malloc` family over the private pools: requests the pools serve go to them, the rest
//! and every pointer outside their range to the *next* allocator, and each function behaves
//! as glibc's of the same name does at the edges (`free(NULL)`, `realloc(p, 0)`, `calloc`
//! overflow, `errno`). The C library (`crates/pagepool-c`) is a [`Router`] over the C
//! library's `malloc` family; the `LD_PRELOAD` drop-in (`crates/pagepool-preload`) one over
//! glibc's own `__libc_*` functions.
//!
//! ```
//! use std::ffi::c_void;
//! use pagepool::alloc::PoolAlloc;
//! use pagepool::route::{Next, Router};
//!
//! /// The C library's allocator as the next one.
//! struct Libc;
//! impl Next for Libc {
//!     fn malloc(&self, size: usize) -> *mut c_void { unsafe { libc::malloc(size) } }
//!     fn calloc(&self, n: usize, size: usize) -> *mut c_void { unsafe { libc::calloc(n, size) } }
//!     fn memalign(&self, align: usize, size: usize) -> *mut c_void {
//!         unsafe { libc::memalign(align, size) }
//!     }
//!     unsafe fn realloc(&self, p: *mut c_void, size: usize) -> *mut c_void {
//!         unsafe { libc::realloc(p, size) }
//!     }
//!     unsafe fn free(&self, p: *mut c_void) { unsafe { libc::free(p) } }
//!     unsafe fn usable_size(&self, p: *mut c_void) -> usize {
//!         unsafe { libc::malloc_usable_size(p) }
//!     }
//! }
//!
//! static POOLS: PoolAlloc = PoolAlloc::new().thread_guard(false);
//! let r = Router { pools: &POOLS, next: Libc };
//! let big = r.calloc(4 << 20, 1); // from the pools, zeroed
//! let small = r.malloc(100); // from the C library
//! assert!(POOLS.owns(big.cast()) && !POOLS.owns(small.cast()));
//! unsafe {
//!     r.free(big);
//!     r.free(small);
//! }
//! ```

use std::ffi::c_void;
use std::ptr::{self, NonNull};

use crate::alloc::PoolAlloc;

/// glibc's `malloc` alignment: what `malloc`, `calloc` and `realloc` promise.
pub const MALLOC_ALIGN: usize = 16;

/// The allocator that serves what the pools do not: requests below the threshold or above the
/// largest pooled size, and every pointer outside the pools' range. Each function behaves as
/// glibc's of the same name.
pub trait Next {
    /// `malloc(size)`.
    fn malloc(&self, size: usize) -> *mut c_void;
    /// `calloc(n, size)` (the product already checked for overflow).
    fn calloc(&self, n: usize, size: usize) -> *mut c_void;
    /// `memalign(align, size)`, `align` a power of two of at least the pointer size; NULL
    /// with `errno` set on failure.
    fn memalign(&self, align: usize, size: usize) -> *mut c_void;
    /// `realloc(p, size)`, `size` not 0.
    ///
    /// # Safety
    /// `p` is a live pointer of this allocator; on success it is not used afterwards.
    unsafe fn realloc(&self, p: *mut c_void, size: usize) -> *mut c_void;
    /// `free(p)`, `p` not NULL.
    ///
    /// # Safety
    /// `p` is a live pointer of this allocator, not used afterwards.
    unsafe fn free(&self, p: *mut c_void);
    /// `malloc_usable_size(p)`, `p` not NULL.
    ///
    /// # Safety
    /// `p` is a live pointer of this allocator.
    unsafe fn usable_size(&self, p: *mut c_void) -> usize;
}

/// The pools first, `N` for the rest.
pub struct Router<'a, N: Next, A = std::alloc::System> {
    /// The pools (their inner allocator is never asked: the router sends what they do not
    /// serve to `next`).
    pub pools: &'a PoolAlloc<A>,
    /// The next allocator.
    pub next: N,
}

/// Runs `f` with `errno` as it was before (as glibc's `free` does).
fn keeping_errno<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: `__errno_location` returns this thread's errno, valid for the thread's life.
    let e = unsafe { *libc::__errno_location() };
    let r = f();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e };
    r
}

/// Sets this thread's `errno`.
pub fn set_errno(e: i32) {
    // SAFETY: `__errno_location` returns this thread's errno, valid for the thread's life.
    unsafe { *libc::__errno_location() = e };
}

impl<N: Next, A> Router<'_, N, A> {
    /// `malloc`: `size` bytes, contents unspecified; NULL and `ENOMEM` when there is no memory.
    pub fn malloc(&self, size: usize) -> *mut c_void {
        match self.pools.alloc_pooled(size, MALLOC_ALIGN, false) {
            Some(p) => p.as_ptr().cast(),
            None => self.next.malloc(size),
        }
    }

    /// `calloc`: `n * size` zeroed bytes; NULL and `ENOMEM` when the product overflows or
    /// there is no memory.
    pub fn calloc(&self, n: usize, size: usize) -> *mut c_void {
        let Some(bytes) = n.checked_mul(size) else {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        };
        match self.pools.alloc_pooled(bytes, MALLOC_ALIGN, true) {
            Some(p) => p.as_ptr().cast(),
            None => self.next.calloc(n, size),
        }
    }

    /// `size` bytes aligned to `align`, a power of two (anything smaller than the pointer size
    /// is served as that); NULL with `errno` set on failure.
    pub fn aligned(&self, align: usize, size: usize) -> *mut c_void {
        debug_assert!(align.is_power_of_two());
        match self.pools.alloc_pooled(size, align, false) {
            Some(p) => p.as_ptr().cast(),
            None => self
                .next
                .memalign(align.max(std::mem::size_of::<usize>()), size),
        }
    }

    /// `free`: NULL does nothing; `errno` is kept. A pointer in the pools' range that starts
    /// no live block ends the process with one line (see [`PoolAlloc::free_pooled`]).
    ///
    /// # Safety
    /// `p` is NULL or a live pointer of this router, not used afterwards.
    pub unsafe fn free(&self, p: *mut c_void) {
        let Some(nn) = NonNull::new(p.cast::<u8>()) else {
            return;
        };
        keeping_errno(|| {
            if self.pools.owns(nn.as_ptr()) {
                // SAFETY: the pools' pointer, released by its holder (the caller's contract).
                unsafe { self.pools.free_pooled(nn) }
            } else {
                // SAFETY: not the pools', so the next allocator's (the caller's contract).
                unsafe { self.next.free(p) }
            }
        })
    }

    /// `malloc_usable_size`: the bytes usable at `p`, all of which its holder may write; 0 for
    /// NULL.
    ///
    /// # Safety
    /// `p` is NULL or a live pointer of this router.
    pub unsafe fn usable_size(&self, p: *mut c_void) -> usize {
        if p.is_null() {
            return 0;
        }
        match self.pools.usable_size(p.cast()) {
            Some(n) => n,
            // SAFETY: a live pointer of the next allocator (the caller's contract).
            None => unsafe { self.next.usable_size(p) },
        }
    }

    /// `realloc`: contents kept up to the smaller size; NULL `p` is `malloc`; size 0 frees `p`
    /// and returns NULL (as glibc does); on failure NULL with `ENOMEM`, `p` untouched. A block
    /// of the pools grows in place within its class, moves by its pages from 1 MiB, and is
    /// otherwise copied over what it may hold (its extent), never its whole block.
    ///
    /// # Safety
    /// `p` is NULL or a live pointer of this router; on success it is not used afterwards.
    pub unsafe fn realloc(&self, p: *mut c_void, size: usize) -> *mut c_void {
        if p.is_null() {
            return self.malloc(size);
        }
        if size == 0 {
            // SAFETY: forwarded from the caller.
            unsafe { self.free(p) };
            return ptr::null_mut();
        }
        let ours = self.pools.owns(p.cast());
        if ours && self.pools.resize_in_place(p.cast(), size, MALLOC_ALIGN) {
            return p;
        }
        if ours
            // SAFETY: the caller's live block of the pools, replaced by the result on success.
            && let Some(q) = unsafe {
                self.pools
                    .grow_pooled(NonNull::new_unchecked(p.cast()), size, MALLOC_ALIGN)
            }
        {
            return q.as_ptr().cast();
        }
        if !ours && !self.pools.serves(size) {
            // Neither end is the pools': the next allocator's own realloc (glibc moves the
            // pages of its mapped chunks itself).
            // SAFETY: the next allocator's live pointer.
            return unsafe { self.next.realloc(p, size) };
        }
        let old = match self.pools.contents_len(p.cast()) {
            Some(n) => n,
            // SAFETY: the next allocator's live pointer (the caller's contract).
            None => unsafe { self.next.usable_size(p) },
        };
        let q = self.malloc(size);
        if q.is_null() {
            return q;
        }
        // SAFETY: both are live and distinct, each at least the smaller size long (`old` is
        // at most the old block's usable size).
        unsafe { ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), old.min(size)) };
        // SAFETY: the caller's live pointer, replaced by `q`.
        unsafe { self.free(p) };
        q
    }

    /// Gives every pooled block's memory back to the system, after the worker's pending
    /// zeroing; returns the bytes given back.
    pub fn trim(&self) -> usize {
        self.pools.flush();
        self.pools.trim() * crate::page_size()
    }

    /// Writes the pools' statistics and the registry's table as text to `fd`: 0 on success,
    /// -1 with `errno` set on error.
    pub fn write_stats(&self, fd: libc::c_int) -> libc::c_int {
        let text = match self.pools.stats() {
            Some(s) => format!("{s}\n{}", crate::registry::Registry::global().stats()),
            None => "pagepool: the private pools were not used\n".to_string(),
        };
        write_all(fd, text.as_bytes())
    }
}

/// Writes `bytes` to `fd`, whole (retrying after an interrupted or short write), without
/// allocating: 0 on success, -1 with `errno` set on error.
pub fn write_all(fd: libc::c_int, bytes: &[u8]) -> libc::c_int {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: `rest` is initialised memory; write(2) only reads it.
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
