//! A global allocator: large requests from pagepool's private-memory pools, the rest from an
//! inner allocator.
//!
//! [`PoolAlloc`] serves requests of at least its threshold (64 KiB by default) up to its
//! largest pooled size (64 MiB) from pools of ordinary private memory, kept by the same page
//! pools, registry and deferred-free worker as [`SystemHeap`](crate::SystemHeap): `vec![0; n]`
//! and every other `alloc_zeroed` takes a block the worker zeroed in the background, `alloc`
//! takes a block as it was left (never zeroed needlessly), and releasing one costs a push.
//! Everything else, and every pointer outside the pools' one reserved range, goes to the inner
//! allocator ([`System`] by default; any [`GlobalAlloc`] through the type parameter).
//!
//! ```
//! use pagepool::alloc::PoolAlloc;
//!
//! #[global_allocator]
//! static GLOBAL: PoolAlloc = PoolAlloc::new();
//!
//! fn main() {
//!     for _ in 0..100 {
//!         let frame = vec![0u8; 8 << 20]; // a zeroed block from the pools, after the first
//!         assert_eq!(frame[4096], 0);
//!     }
//!     let stats = GLOBAL.stats().expect("a large allocation was made");
//!     assert_eq!(stats.allocs, 100); // how many were clean, zeroed inline or fresh: see the text
//!     println!("{stats}");
//! }
//! ```
//!
//! Memory behaves as malloc's does: a forked child sees its parent's buffers copy-on-write and
//! allocates and frees on its own (without a worker: it zeroes what `alloc_zeroed` needs on
//! its own time). The allocator never calls itself: while it runs pagepool's own code
//! (statistics, the worker's queue, starting the worker thread), every allocation that code
//! makes goes to the inner allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicU32, AtomicUsize, Ordering};

use crate::private::{Pools, Settings};
use crate::stats::OwnerStats;

/// The default threshold: requests of 64 KiB and more go to the pools.
pub const DEFAULT_THRESHOLD: usize = 64 << 10;

/// The default largest pooled size: larger requests go to the inner allocator.
pub const DEFAULT_LARGEST: usize = 64 << 20;

/// The default limit of each kind of pooled memory (dirty, clean): 256 MiB.
pub const DEFAULT_POOL_LIMIT: usize = 256 << 20;

const UNINIT: u8 = 0;
const STARTING: u8 = 1;
const READY: u8 = 2;
const FAILED: u8 = 3;

thread_local! {
    /// Set while this thread runs pagepool's own code for the allocator: whatever it
    /// allocates goes to the inner allocator. A `const` initialiser and no destructor: reading
    /// it never allocates, and it is readable until the thread's very end.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's allocations sent to the inner allocator.
fn inside<R>(f: impl FnOnce() -> R) -> R {
    let was = INSIDE.replace(true);
    let r = f();
    INSIDE.set(was);
    r
}

/// The calling thread, as `pthread_self` names it (read from the thread's control block: no
/// thread-local variable, no allocation).
fn this_thread() -> usize {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as usize }
}

/// A [`GlobalAlloc`] that serves large requests from pagepool's private-memory pools and the
/// rest from `A` (see the [module](self)).
///
/// Settings are `const`, for a `static`: [`threshold`](Self::threshold),
/// [`largest`](Self::largest), [`pool_limit`](Self::pool_limit). The pools are made on the
/// first request at or above the threshold (other threads' requests wait for them meanwhile);
/// if the system refuses their address space, every request goes to `A`.
pub struct PoolAlloc<A = System> {
    inner: A,
    threshold: usize,
    largest: usize,
    limit: usize,
    worker: bool,
    pressure: bool,
    guard: bool,
    state: AtomicU8,
    /// The thread making the pools, and its process (while `state` is `STARTING`).
    starter: AtomicUsize,
    starter_pid: AtomicU32,
    pools: AtomicPtr<Pools>,
}

impl PoolAlloc<System> {
    /// The allocator with the default settings over the system allocator.
    pub const fn new() -> PoolAlloc<System> {
        PoolAlloc::with_inner(System)
    }
}

impl Default for PoolAlloc<System> {
    fn default() -> Self {
        PoolAlloc::new()
    }
}

impl<A> PoolAlloc<A> {
    /// The allocator with the default settings over `inner`, which serves requests below the
    /// threshold and above the largest pooled size (mimalloc's or jemalloc's `GlobalAlloc`, for
    /// instance).
    pub const fn with_inner(inner: A) -> PoolAlloc<A> {
        PoolAlloc {
            inner,
            threshold: DEFAULT_THRESHOLD,
            largest: DEFAULT_LARGEST,
            limit: DEFAULT_POOL_LIMIT,
            worker: true,
            pressure: true,
            guard: true,
            state: AtomicU8::new(UNINIT),
            starter: AtomicUsize::new(0),
            starter_pid: AtomicU32::new(0),
            pools: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Requests of at least `bytes` go to the pools (default [`DEFAULT_THRESHOLD`]). Rounded
    /// up to a power of two of pages; at least one page.
    pub const fn threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// Requests larger than `bytes` go to the inner allocator (default [`DEFAULT_LARGEST`];
    /// rounded up to a power of two of pages, at most 2^30 pages). A largest size below the
    /// threshold leaves one class, of the threshold's size.
    pub const fn largest(mut self, bytes: usize) -> Self {
        self.largest = bytes;
        self
    }

    /// The most memory each kind of pool keeps (released blocks as they were left, and blocks
    /// zeroed for `alloc_zeroed`), default [`DEFAULT_POOL_LIMIT`]; 0 pools nothing.
    pub const fn pool_limit(mut self, bytes: usize) -> Self {
        self.limit = bytes;
        self
    }

    /// Whether released blocks are zeroed by a background worker (default on); off, they are
    /// zeroed by the `alloc_zeroed` that takes them.
    pub const fn worker(mut self, on: bool) -> Self {
        self.worker = on;
        self
    }

    /// Whether the pools start the pressure monitor of the process's registry
    /// ([`Registry::global`](crate::registry::Registry::global)) with
    /// [`PressureConfig::default`](crate::pressure::PressureConfig::default) when they are
    /// made (default on), unless one runs already (a heap's, or one the program started with
    /// [`Registry::start_monitor`](crate::registry::Registry::start_monitor)). Under memory pressure
    /// (PSI, or the cgroup's usage near its limit) it gives pooled blocks back to the system.
    /// A forked child's pools start none.
    pub const fn pressure(mut self, on: bool) -> Self {
        self.pressure = on;
        self
    }

    /// Whether pagepool's own allocations made while this allocator runs are marked, on a
    /// thread-local flag, to go to the inner allocator (default on). That is what keeps a
    /// `#[global_allocator]` from recursing into itself. Off, for an allocator that is not the
    /// program's global allocator and whose callers route requests themselves (a C library or
    /// an `LD_PRELOAD` drop-in, where pagepool's own allocations reach a different allocator),
    /// the allocator touches no thread-local variable at all.
    pub const fn thread_guard(mut self, on: bool) -> Self {
        self.guard = on;
        self
    }

    /// Whether this thread runs pagepool's own code for this allocator now.
    #[inline]
    fn guarded(&self) -> bool {
        self.guard && INSIDE.get()
    }

    /// Runs `f`, pagepool's own code, marked as such where the guard is on.
    #[inline]
    fn inside<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.guard { inside(f) } else { f() }
    }

    /// The pools, made on first use; `None` while another thread makes them, or if the system
    /// refused them.
    fn pools(&self) -> Option<&'static Pools> {
        let p = self.pools.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: a non-null `pools` is a leaked box, never freed.
            return Some(unsafe { &*p });
        }
        if let Err(state) =
            self.state
                .compare_exchange(UNINIT, STARTING, Ordering::AcqRel, Ordering::Acquire)
        {
            if state == STARTING
                && self.starter.load(Ordering::Acquire) != this_thread()
                && self.starter_pid.load(Ordering::Acquire) == std::process::id()
            {
                // Another thread makes them (a few milliseconds, once): wait, so that every
                // request at or above the threshold is the pools'. The thread making them
                // never waits here (its own allocations go to the inner allocator meanwhile,
                // by the guard, or by this test where the guard is off), nor does a child
                // forked while another thread made them: they are never made there, and its
                // requests go to the inner allocator.
                while self.state.load(Ordering::Acquire) == STARTING {
                    std::thread::yield_now();
                }
            }
            return self.made();
        }
        self.starter_pid
            .store(std::process::id(), Ordering::Release);
        self.starter.store(this_thread(), Ordering::Release);
        let made = self.inside(|| Pools::new(self.settings()).map(|p| Box::into_raw(Box::new(p))));
        match made {
            Ok(p) => {
                self.pools.store(p, Ordering::Release);
                self.state.store(READY, Ordering::Release);
                // SAFETY: just leaked.
                Some(unsafe { &*p })
            }
            Err(e) => {
                self.inside(|| log::debug!("pagepool: no private pools: {e}"));
                self.state.store(FAILED, Ordering::Release);
                None
            }
        }
    }

    /// The pools if they exist, without making them.
    fn made(&self) -> Option<&'static Pools> {
        let p = self.pools.load(Ordering::Acquire);
        // SAFETY: a non-null `pools` is a leaked box, never freed.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    fn settings(&self) -> Settings {
        let page = crate::os::page_size();
        let order = |bytes: usize| {
            let pages = bytes.max(1).div_ceil(page);
            pages
                .checked_next_power_of_two()
                .map_or(30, |p| p.trailing_zeros().min(30)) as u8
        };
        let min_order = order(self.threshold);
        Settings {
            threshold: self.threshold.max(1),
            min_order,
            max_order: order(self.largest).max(min_order),
            limit_pages: self.limit / page,
            worker: self.worker,
            pressure: self.pressure,
        }
    }

    /// Whether a request of `layout` goes to the pools.
    #[inline]
    fn pooled(&self, layout: Layout) -> bool {
        layout.size() >= self.threshold && layout.size() <= self.largest && !self.guarded()
    }

    /// A block of the pools for `size` bytes aligned to `align`, all zero with `zeroed`;
    /// `None` where the pools do not serve the request (below the threshold, above the largest
    /// size, an alignment no block has, no memory left in its class) and the caller should ask
    /// another allocator. For callers that route requests themselves (the C library): release
    /// it with [`free_pooled`](Self::free_pooled).
    pub fn alloc_pooled(&self, size: usize, align: usize, zeroed: bool) -> Option<NonNull<u8>> {
        if size < self.threshold || size > self.largest || self.guarded() {
            return None;
        }
        let pools = self.pools()?;
        self.inside(|| pools.alloc(size, align, zeroed))
    }

    /// Releases a block of the pools.
    ///
    /// A pointer inside the pools' range that starts no block handed out (a pointer into a
    /// block, a block released already) ends the process with a one-line message on standard
    /// error, as glibc does for a corrupted free: the pools are never corrupted.
    ///
    /// # Safety
    /// [`owns(p)`](Self::owns) is true, `p` was returned by this allocator, and nothing uses
    /// the block any more.
    pub unsafe fn free_pooled(&self, p: NonNull<u8>) {
        if let Some(pools) = self.made() {
            // SAFETY: forwarded from the caller.
            self.inside(|| unsafe { pools.dealloc(p) });
        }
    }

    /// Whether the block of the pools that `p` starts can hold `size` bytes aligned to `align`
    /// where it is; if so its holder may use `size` bytes from now on (a `realloc` in place).
    /// False for any other pointer.
    pub fn resize_in_place(&self, p: *mut u8, size: usize, align: usize) -> bool {
        let Some(pools) = self.made() else {
            return false;
        };
        if size < self.threshold || !pools.fits_in_place(p, size, align) {
            return false;
        }
        self.inside(|| pools.note_written(p, size));
        true
    }

    /// Moves the block of the pools that `p` starts to a larger one that holds `size` bytes
    /// aligned to `align`, by moving its pages rather than copying them (see
    /// [`PrivateStats::moved_blocks`]); `None` where it cannot (a block under 1 MiB, a size the
    /// pools do not serve, no room), and the caller allocates and copies instead, `p` untouched.
    ///
    /// # Safety
    /// [`owns(p)`](Self::owns) is true, `p` is a live block from this allocator, and on
    /// success its holder uses the returned pointer instead (the contents moved with it).
    pub unsafe fn grow_pooled(
        &self,
        p: NonNull<u8>,
        size: usize,
        align: usize,
    ) -> Option<NonNull<u8>> {
        if size > self.largest || self.guarded() {
            return None;
        }
        let pools = self.made()?;
        // SAFETY: forwarded from the caller.
        self.inside(|| unsafe { pools.grow(p.as_ptr(), size, align) })
    }

    /// The pools' statistics; `None` before the first request at or above the threshold.
    pub fn stats(&self) -> Option<PrivateStats> {
        let pools = self.made()?;
        Some(self.inside(|| pools.stats()))
    }

    /// Waits until the worker has zeroed every released block waiting for it.
    pub fn flush(&self) {
        if let Some(p) = self.made() {
            self.inside(|| p.flush());
        }
    }

    /// Gives every pooled block's memory back to the system (as under memory pressure); returns
    /// the pages given back. Blocks in use are not touched.
    pub fn trim(&self) -> usize {
        self.made().map_or(0, |p| self.inside(|| p.trim()))
    }

    /// Whether the pools serve requests of `size` bytes (from the threshold to the largest
    /// pooled size).
    pub fn serves(&self, size: usize) -> bool {
        size >= self.threshold && size <= self.largest
    }

    /// Whether `p` is a pointer of the pools (and not of the inner allocator).
    pub fn owns(&self, p: *const u8) -> bool {
        self.made()
            .is_some_and(|pools| pools.contains(p.cast_mut()))
    }

    /// The bytes usable at `p`, a pointer this allocator returned: its block's size for a
    /// pooled pointer (all of which its holder may then write, and which is zeroed in full
    /// when it comes back for `alloc_zeroed`); `None` for one of the inner allocator (which does
    /// not say).
    pub fn usable_size(&self, p: *const u8) -> Option<usize> {
        let pools = self.made()?;
        let n = pools.usable_size(p.cast_mut())?;
        self.inside(|| pools.note_written(p.cast_mut(), n));
        Some(n)
    }

    /// How many bytes from `p`, the start of a block of the pools, may hold data: at least
    /// what the block was allocated with, grown to or said usable, at most its usable size
    /// (a copy of the block's contents needs no more). Unlike [`usable_size`](Self::usable_size)
    /// it promises nothing to the holder. `None` for any other pointer.
    pub fn contents_len(&self, p: *const u8) -> Option<usize> {
        self.made()?.extent_of(p.cast_mut())
    }
}

// SAFETY: every pointer handed out is either the inner allocator's (for the same layout) or the
// start of a pooled block, which is at least `layout.size()` bytes (its class holds
// `max(size, align)` rounded up to a power of two of pages) and aligned to its own size, hence
// to `layout.align()` (the class was chosen for it); blocks are exclusive until released, and a
// release goes back where the pointer came from: the pools for a pointer in their range, `A`
// otherwise. `alloc_zeroed` memory is all zero (a clean block, a dirty one zeroed over its
// extent, which covers everything ever written to it, or fresh memory). Nothing here unwinds.
unsafe impl<A: GlobalAlloc> GlobalAlloc for PoolAlloc<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if self.pooled(layout)
            && let Some(pools) = self.pools()
            && let Some(p) = self.inside(|| pools.alloc(layout.size(), layout.align(), false))
        {
            return p.as_ptr();
        }
        // SAFETY: forwarded from the caller (a non-zero-size layout).
        unsafe { self.inner.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if self.pooled(layout)
            && let Some(pools) = self.pools()
            && let Some(p) = self.inside(|| pools.alloc(layout.size(), layout.align(), true))
        {
            return p.as_ptr();
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if let Some(pools) = self.made()
            && pools.contains(p)
        {
            // SAFETY: `p` is in the pools' range, so it came from them (the caller's contract:
            // this allocator returned it for `layout`), and the caller is done with it.
            return self.inside(|| unsafe { pools.dealloc(NonNull::new_unchecked(p)) });
        }
        // SAFETY: not the pools', so the inner allocator's, for `layout`.
        unsafe { self.inner.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let pools = self.made();
        let ours = pools.is_some_and(|pools| pools.contains(p));
        if ours
            && new_size >= self.threshold
            && pools.is_some_and(|pools| pools.fits_in_place(p, new_size, layout.align()))
        {
            // The block holds it where it is, and may now be written up to the new size.
            if let Some(pools) = pools {
                self.inside(|| pools.note_written(p, new_size));
            }
            return p;
        }
        // SAFETY: `new_size` is non-zero and rounds to at most isize::MAX (the caller's
        // contract), with the old layout's valid alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !ours && !self.pooled(new_layout) {
            // SAFETY: the inner allocator's pointer, forwarded with the caller's contract.
            return unsafe { self.inner.realloc(p, layout, new_size) };
        }
        if ours
            && self.pooled(new_layout)
            && let Some(pools) = pools
            // SAFETY: `p` is the caller's live block of the pools, given up on success.
            && let Some(q) = self.inside(|| unsafe { pools.grow(p, new_size, layout.align()) })
        {
            return q.as_ptr();
        }
        // SAFETY: as `alloc`'s contract: a valid non-zero layout.
        let q = unsafe { self.alloc(new_layout) };
        if !q.is_null() {
            // SAFETY: both blocks hold at least the smaller size, and are distinct (`p` is
            // still allocated while `q` is made).
            unsafe { ptr::copy_nonoverlapping(p, q, layout.size().min(new_size)) };
            // SAFETY: `p` was allocated with `layout`, and is no longer used.
            unsafe { self.dealloc(p, layout) };
        }
        q
    }
}

/// With the `allocator-api2` feature: the pools as a collection's allocator, without making
/// [`PoolAlloc`] the global allocator. Implemented for a shared reference (a `static`), so that
/// every collection uses one set of pools and one worker. Requests the pools do not serve go to
/// the inner allocator, as through [`GlobalAlloc`].
///
/// ```
/// # #[cfg(feature = "allocator-api2")] {
/// use allocator_api2::vec::Vec;
/// use pagepool::alloc::PoolAlloc;
///
/// static POOLS: PoolAlloc = PoolAlloc::new();
///
/// let mut frame: Vec<u8, &PoolAlloc> = Vec::with_capacity_in(8 << 20, &POOLS);
/// frame.resize(8 << 20, 0);
/// assert!(POOLS.owns(frame.as_ptr()));
/// # }
/// ```
#[cfg(feature = "allocator-api2")]
// SAFETY: `allocate` and `allocate_zeroed` return memory from `GlobalAlloc::alloc` /
// `alloc_zeroed` of this allocator for the same layout (valid for its size, aligned, exclusive
// until deallocated); `deallocate` and `grow` hand it back through `GlobalAlloc::dealloc` /
// `realloc` with the layout it was allocated with (the trait's contract), which route a
// pointer to whoever made it. A shared reference to one allocator is the same allocator in
// every copy (clones share the pools), as the trait requires.
unsafe impl<A: GlobalAlloc> allocator_api2::alloc::Allocator for &PoolAlloc<A> {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        self.allocate_with(layout, false)
    }

    fn allocate_zeroed(
        &self,
        layout: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        self.allocate_with(layout, true)
    }

    unsafe fn deallocate(&self, p: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: the trait's contract: `p` was allocated here with `layout`.
            unsafe { GlobalAlloc::dealloc(*self, p.as_ptr(), layout) }
        }
    }

    unsafe fn grow(
        &self,
        p: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        if old.size() == 0 || new.align() > old.align() {
            // No block yet, or a stricter alignment: a new allocation and a copy.
            let q = self.allocate(new)?;
            // SAFETY: the trait's contract: `p` holds `old.size()` bytes, `q` at least as many.
            unsafe {
                ptr::copy_nonoverlapping(p.as_ptr(), q.as_ptr().cast::<u8>(), old.size());
                self.deallocate(p, old);
            }
            return Ok(q);
        }
        // SAFETY: the trait's contract: `p` was allocated here with `old`, `new.size()` is at
        // least `old.size()`, and `new` is a valid layout with `old`'s alignment.
        let q = unsafe { GlobalAlloc::realloc(*self, p.as_ptr(), old, new.size()) };
        NonNull::new(q)
            .map(|q| NonNull::slice_from_raw_parts(q, new.size()))
            .ok_or(allocator_api2::alloc::AllocError)
    }
}

#[cfg(feature = "allocator-api2")]
impl<A: GlobalAlloc> PoolAlloc<A> {
    fn allocate_with(
        &self,
        layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        if layout.size() == 0 {
            // A zero-size allocation: a dangling, aligned pointer (no memory).
            let p =
                NonNull::new(layout.align() as *mut u8).ok_or(allocator_api2::alloc::AllocError)?;
            return Ok(NonNull::slice_from_raw_parts(p, 0));
        }
        // SAFETY: a layout of non-zero size.
        let p = unsafe {
            if zeroed {
                GlobalAlloc::alloc_zeroed(self, layout)
            } else {
                GlobalAlloc::alloc(self, layout)
            }
        };
        NonNull::new(p)
            .map(|p| NonNull::slice_from_raw_parts(p, layout.size()))
            .ok_or(allocator_api2::alloc::AllocError)
    }
}

/// The private pools' statistics (see [`PoolAlloc::stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrivateStats {
    /// The smallest request the pools serve.
    pub threshold: usize,
    /// The largest block size.
    pub largest: usize,
    /// Requests the pools served.
    pub allocs: u64,
    /// Of them, served from a clean block (zeroed by the worker, or given back and fresh).
    pub clean_hits: u64,
    /// Served from a dirty block (for `alloc_zeroed`, zeroed inline first).
    pub dirty_hits: u64,
    /// Served from a fresh block (memory from the system, zero).
    pub fresh: u64,
    /// Blocks released.
    pub frees: u64,
    /// Bytes `alloc_zeroed` zeroed on the calling thread (dirty blocks, none clean).
    pub zeroed_inline_bytes: u64,
    /// Bytes the worker zeroed.
    pub zeroed_worker_bytes: u64,
    /// Blocks whose memory went back to the system (limits, pressure, trim).
    pub released_blocks: u64,
    /// Blocks a `realloc` moved to a larger class by their pages, without copying.
    pub moved_blocks: u64,
    /// Allocations that found no block but one the worker was zeroing, and waited for it.
    pub waited_for_worker: u64,
    /// Pages pooled dirty now.
    pub dirty_pages: usize,
    /// Pages pooled clean now.
    pub clean_pages: usize,
    /// Pages waiting for the worker or being zeroed.
    pub queued_pages: usize,
    /// Whether a worker zeroes released blocks (not in a forked child, nor where no thread
    /// could be started).
    pub worker: bool,
    /// The dirty pools, per order, as the registry counts them.
    pub dirty: OwnerStats,
    /// The clean pools.
    pub clean: OwnerStats,
}

impl fmt::Display for PrivateStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "private pools ({} B to {} B): allocs {} (clean {}, dirty {}, fresh {}), frees {}; \
             pooled dirty {} pages, clean {} pages, queued {} pages; zeroed by the worker {} B, \
             inline {} B; waited for the worker {}; released {} blocks, moved {}; worker {}",
            self.threshold,
            self.largest,
            self.allocs,
            self.clean_hits,
            self.dirty_hits,
            self.fresh,
            self.frees,
            self.dirty_pages,
            self.clean_pages,
            self.queued_pages,
            self.zeroed_worker_bytes,
            self.zeroed_inline_bytes,
            self.waited_for_worker,
            self.released_blocks,
            self.moved_blocks,
            if self.worker { "running" } else { "none" },
        )?;
        let rows = [
            ("private-dirty", self.dirty.pools.as_slice()),
            ("private-clean", self.clean.pools.as_slice()),
        ];
        let total = self.dirty.pages + self.clean.pages;
        let max = self
            .dirty
            .limit_pages
            .zip(self.clean.limit_pages)
            .map(|(a, b)| a.saturating_add(b));
        f.write_str(&crate::stats::render_table(&rows, total, max, None))
    }
}
