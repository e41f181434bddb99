//! Per-thread caches of small released buffers: the 4 KiB fast path.
//!
//! For a small buffer, every shared step costs more than the zeroing itself: a trip through the
//! pool, the worker's queue and the shared counters (three locks and eight atomic
//! read-modify-writes) took longer than zeroing 4 KiB (docs/DESIGN.md, Small buffers), and
//! handing the block to the worker on the other core would add cache-line transfers on top.
//! So a thread keeps the last few small buffers it released, still dirty, in a cache of its
//! own (per heap), and zeroes one inline when it allocates that size again: no lock, no atomic
//! read-modify-write, and the zeroed lines are hot in the allocating core's cache when the
//! program writes them. The same idea as the network stack's page_pool allocation cache and
//! glibc's tcache.
//!
//! What it costs, and the bounds:
//! - each thread holds at most [`HeapBuilder::thread_cache`](crate::HeapBuilder::thread_cache)
//!   bytes per heap (default 64 KiB); a release past that sends the cache's oldest buffer down
//!   the usual path (the worker's queue);
//! - a cache is emptied by its own thread: at the thread's next use of the heap after a
//!   `shrink`, `trim`, `flush` or heap drop (each bumps the heap's cache epoch), and when the
//!   thread exits. Those calls empty the calling thread's cache at once; another thread's cache,
//!   at most the bound above, waits for that thread. Pressure scans do not reach thread caches
//!   (they are that small);
//! - a cache holds the heap's internals (not its handle) alive, so that the memory it holds
//!   stays mapped; a dropped heap's internals go away when the last cache lets go: when its
//!   thread exits, or starts using another heap (a thread's caches of dropped heaps are
//!   removed whenever it makes a new one).
//!
//! The counters a cached allocation or release changes live in a per-thread [`Slot`] that only
//! its thread writes (plain loads and stores, no read-modify-write); [`stats`](crate::SystemHeap::stats)
//! adds them up.

use std::cell::RefCell;

use crossbeam_utils::CachePadded;

use super::cache_slots::{Slot, SlotTotals, add_own};
use super::core::HeapInner;
use super::job::{Run, Runs};
use crate::sync::{Arc, Ordering, lock};

/// One thread's cache of one heap.
struct ThreadCache {
    /// The heap's internals, from `Arc::into_raw`: the entry always holds one strong reference
    /// (so the address cannot be reused by another heap while the entry exists), plus `refs`
    /// more taken over from released buffers.
    heap: *const HeapInner,
    refs: usize,
    epoch: u64,
    /// The fork generation of the heap state (see [`crate::fork`]): an entry inherited by a
    /// forked child is leaked, never emptied.
    generation: u64,
    /// Released buffers as (address, pages): order-0 blocks end to end, oldest first. Dirty.
    runs: smallvec::SmallVec<[(usize, usize); 8]>,
    pages: usize,
    slot: Arc<CachePadded<Slot>>,
}

impl ThreadCache {
    #[inline]
    fn heap(&self) -> &HeapInner {
        // SAFETY: the entry holds a strong reference to the heap internals (see `heap`), so
        // they are alive for as long as `self` is.
        unsafe { &*self.heap }
    }

    #[inline]
    fn set_pages(&mut self, pages: usize) {
        self.pages = pages;
        self.slot.cached_pages.store(pages, Ordering::Relaxed);
    }

    /// One strong reference for a new buffer: one a released buffer left here if there is
    /// one (no atomic operation), else a new one.
    #[inline]
    fn take_ref(&mut self) -> Arc<HeapInner> {
        if self.refs > 0 {
            self.refs -= 1;
        } else {
            // SAFETY: the entry's base reference keeps the pointer valid; this adds one.
            unsafe { Arc::increment_strong_count(self.heap) };
        }
        // SAFETY: a strong reference this entry owned (counted in `refs`, from `Arc::into_raw`
        // of this pointer in `stash_ref`) or just added, handed over.
        unsafe { Arc::from_raw(self.heap) }
    }

    /// Keeps a released buffer's strong reference without an atomic operation (up to one per
    /// cached run; extra ones are dropped).
    #[inline]
    fn stash_ref(&mut self, heap: Arc<HeapInner>) {
        debug_assert!(std::ptr::eq(Arc::as_ptr(&heap), self.heap));
        if self.refs <= self.runs.len() {
            let _ = Arc::into_raw(heap);
            self.refs += 1;
        }
    }

    /// Sends every cached run down the usual release path and drops the spare references.
    #[cold]
    #[inline(never)]
    fn empty(&mut self) {
        let runs = std::mem::take(&mut self.runs);
        self.set_pages(0);
        for (start, pages) in runs {
            self.heap().release_buffer(one_run(start, pages));
        }
        for _ in 0..std::mem::take(&mut self.refs) {
            // SAFETY: each counted reference is one this entry owns (see `take_ref`).
            unsafe { Arc::decrement_strong_count(self.heap) };
        }
    }

    /// Empties the cache if its heap asked since the last look.
    #[inline]
    fn check_epoch(&mut self) {
        let now = self.heap().cache.epoch.load(Ordering::Relaxed);
        if now != self.epoch {
            self.epoch = now;
            self.empty();
        }
    }
}

impl Drop for ThreadCache {
    /// The thread is exiting (or the heap closing): give everything back, fold the counters
    /// into the heap's, and let go of the heap.
    fn drop(&mut self) {
        if self.generation != crate::fork::generation() {
            return; // inherited: its heap, memory and locks are the parent's
        }
        self.empty();
        {
            let mut slots = lock(&self.heap().cache.slots);
            let t = self.slot.totals();
            slots.retired.add(SlotTotals {
                cached_pages: 0,
                ..t
            });
            let me: *const CachePadded<Slot> = &*self.slot;
            slots
                .live
                .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), me));
        }
        // SAFETY: the entry's base reference (see `heap`), released last.
        unsafe { Arc::decrement_strong_count(self.heap) };
    }
}

/// A released buffer of `pages` order-0 blocks at `start`, as the heap's release path takes it.
fn one_run(start: usize, pages: usize) -> Runs {
    smallvec::smallvec![Run {
        start,
        order: 0,
        count: pages,
    }]
}

#[cfg(not(loom))]
std::thread_local! {
    static CACHES: RefCell<Vec<ThreadCache>> = const { RefCell::new(Vec::new()) };
}
// Loom runs its threads on one OS thread: their thread-locals must be loom's.
#[cfg(loom)]
loom::thread_local! {
    static CACHES: RefCell<Vec<ThreadCache>> = RefCell::new(Vec::new());
}

/// Runs `f` on this thread's cache of the heap at `heap`, creating the cache if `create`
/// (after emptying it if the heap asked). `None` when there is none and `create` is false, or
/// during thread teardown.
///
/// # Safety
/// `heap` comes from `Arc::as_ptr` of a heap the caller holds a strong reference to.
#[inline]
unsafe fn with_cache<R>(
    heap: *const HeapInner,
    create: bool,
    f: impl FnOnce(&mut ThreadCache) -> R,
) -> Option<R> {
    CACHES
        .try_with(|c| {
            let mut caches = c.try_borrow_mut().ok()?;
            let i = match caches.iter().position(|c| std::ptr::eq(c.heap, heap)) {
                Some(i) => i,
                None if create => {
                    // Entries of heaps dropped since (whose handle is gone) go first: nothing
                    // else would empty them before this thread exits.
                    // Entries inherited from a parent process are leaked: their heaps are not
                    // this process's (see `crate::fork`).
                    let now = crate::fork::generation();
                    caches
                        .extract_if(.., |c| c.generation != now)
                        .for_each(std::mem::forget);
                    caches.retain(|c| !c.heap().closed.load(Ordering::Relaxed));
                    // SAFETY: the caller holds a strong reference, so `heap` is alive; the
                    // entry takes a reference of its own.
                    let shared = unsafe {
                        Arc::increment_strong_count(heap);
                        &(*heap).cache
                    };
                    let slot = Arc::new(CachePadded::new(Slot::default()));
                    lock(&shared.slots).live.push(Arc::downgrade(&slot));
                    caches.push(ThreadCache {
                        heap,
                        refs: 0,
                        epoch: shared.epoch.load(Ordering::Relaxed),
                        // SAFETY: as above.
                        generation: unsafe { (*heap).generation },
                        runs: smallvec::SmallVec::new(),
                        pages: 0,
                        slot,
                    });
                    caches.len() - 1
                }
                None => return None,
            };
            let cache = &mut caches[i];
            cache.check_epoch();
            Some(f(cache))
        })
        .ok()
        .flatten()
}

/// A run taken out of a thread cache, still dirty: a used range of its heap's arenas at its
/// home address (the cache holds only runs of buffers that were not views, see `Buffer`'s
/// `drop`), owned by whoever holds this. The only way to use it is
/// [`Buffer::from_cache`](super::buffer::Buffer::from_cache), which zeroes it.
pub(crate) struct Dirty(pub(crate) Run);

/// A cached buffer of `pages` pages for `heap`, still dirty (counted as zeroed: `Dirty` is
/// zeroed by the one function that takes it), with a reference to the heap for the buffer;
/// `None` if this thread has none of that size. The run has left the cache: the caller owns
/// it.
#[inline]
pub(crate) fn take(heap: &Arc<HeapInner>, pages: usize) -> Option<(Dirty, Arc<HeapInner>)> {
    let take = |c: &mut ThreadCache| {
        let (start, _) = match c.runs.last() {
            // The newest buffer is the size wanted (the usual case): no search.
            Some(&(_, p)) if p == pages => c.runs.pop()?,
            _ => {
                let i = c.runs.iter().rposition(|r| r.1 == pages)?;
                c.runs.remove(i)
            }
        };
        let run = Run {
            start,
            order: 0,
            count: pages,
        };
        c.set_pages(c.pages - pages);
        add_own(&c.slot.allocs, 1);
        add_own(&c.slot.zeroed_pages, pages as u64);
        c.slot.add_live(pages as i64);
        Some((Dirty(run), c.take_ref()))
    };
    // SAFETY: `heap` is a strong reference the caller holds.
    unsafe { with_cache(Arc::as_ptr(heap), false, take) }.flatten()
}

/// Offers a released buffer (one run of order-0 blocks, of at most `max_buffer_pages` pages:
/// the caller checks, as `SystemHeap::alloc` does before [`take`]) to this thread's cache, with
/// the buffer's heap reference. On refusal both come back.
#[inline]
pub(crate) fn give(heap: Arc<HeapInner>, run: Run) -> Result<(), (Arc<HeapInner>, Run)> {
    let pages = run.pages();
    if run.order != 0 || !heap.pooling() {
        return Err((heap, run));
    }
    let ptr = Arc::as_ptr(&heap);
    let mut held = Some(heap);
    let keep = |c: &mut ThreadCache| {
        while c.pages + pages > c.heap().cache.max_pages {
            // Full: the oldest buffer takes the usual path.
            let (start, old) = c.runs.remove(0);
            c.set_pages(c.pages - old);
            c.heap().release_buffer(one_run(start, old));
        }
        c.runs.push((run.start, pages));
        c.set_pages(c.pages + pages);
        add_own(&c.slot.frees, 1);
        c.slot.add_live(-(pages as i64));
        if let Some(h) = held.take() {
            c.stash_ref(h);
        }
    };
    // SAFETY: `held` is a strong reference to `ptr`, alive until the closure moves it into the
    // cache (which then holds it).
    let done = unsafe { with_cache(ptr, true, keep) };
    // The closure ran (and took `held`) exactly when `done` is `Some`.
    match held {
        Some(h) if done.is_none() => Err((h, run)),
        _ => Ok(()),
    }
}

/// Asks every thread to empty its cache of `heap`, and empties this thread's at once.
pub(crate) fn empty_all(heap: &Arc<HeapInner>) {
    heap.cache.ask_to_empty();
    // SAFETY: `heap` is a strong reference the caller holds.
    unsafe { with_cache(Arc::as_ptr(heap), false, |_| ()) }; // it looked at the epoch
}

/// Removes this thread's cache of `heap` (the heap is closing) and asks the other threads to
/// empty theirs.
pub(crate) fn forget_mine(heap: &Arc<HeapInner>) {
    heap.cache.ask_to_empty();
    let ptr = Arc::as_ptr(heap);
    let mine = CACHES
        .try_with(|c| {
            let mut caches = c.try_borrow_mut().ok()?;
            let i = caches.iter().position(|c| std::ptr::eq(c.heap, ptr))?;
            Some(caches.swap_remove(i))
        })
        .ok()
        .flatten();
    drop(mine); // outside the borrow: dropping releases into the heap
}
