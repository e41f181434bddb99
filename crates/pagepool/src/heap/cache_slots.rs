//! The shared half of the per-thread caches (`cache.rs`): a heap's cache settings, its epoch
//! (bumped to ask every thread to empty its cache) and the per-thread counter slots that
//! `stats` adds up. The heap's core holds it; the caches themselves, which reach into the
//! core, are built on top.

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicI64, AtomicU64, AtomicUsize, Mutex, Ordering, Weak, lock};

/// The cache settings and shared state of one heap.
pub(crate) struct CacheShared {
    /// Pages a thread may hold (0: no caches).
    pub(crate) max_pages: usize,
    /// The largest buffer cached, in pages.
    pub(crate) max_buffer_pages: usize,
    /// Bumped to ask every thread to empty its cache at its next use of the heap.
    pub(crate) epoch: AtomicU64,
    /// Every live thread's counters, and what exited threads' counted, for `stats`.
    pub(crate) slots: Mutex<Slots>,
}

pub(crate) struct Slots {
    pub(crate) live: Vec<Weak<CachePadded<Slot>>>,
    pub(crate) retired: SlotTotals,
}

/// One thread's counters for one heap; written only by that thread.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) allocs: AtomicU64,
    pub(crate) frees: AtomicU64,
    /// Signed: a buffer allocated on one thread may be released on another.
    pub(crate) live_pages: AtomicI64,
    pub(crate) cached_pages: AtomicUsize,
    pub(crate) zeroed_pages: AtomicU64,
}

/// Totals of the thread caches' counters.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotTotals {
    /// Allocations served from a thread cache.
    pub(crate) allocs: u64,
    /// Releases into a thread cache.
    pub(crate) frees: u64,
    /// Net pages of live buffers counted by the caches.
    pub(crate) live_pages: i64,
    /// Pages held in thread caches now.
    pub(crate) cached_pages: usize,
    /// Pages zeroed on their way out of a thread cache.
    pub(crate) zeroed_pages: u64,
}

impl SlotTotals {
    pub(crate) fn add(&mut self, o: SlotTotals) {
        self.allocs = self.allocs.wrapping_add(o.allocs);
        self.frees = self.frees.wrapping_add(o.frees);
        self.live_pages = self.live_pages.wrapping_add(o.live_pages);
        self.cached_pages += o.cached_pages;
        self.zeroed_pages = self.zeroed_pages.wrapping_add(o.zeroed_pages);
    }
}

/// Adds to a counter only one thread writes: a load and a store, no locked instruction.
#[inline]
pub(crate) fn add_own(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl Slot {
    pub(crate) fn totals(&self) -> SlotTotals {
        SlotTotals {
            allocs: self.allocs.load(Ordering::Relaxed),
            frees: self.frees.load(Ordering::Relaxed),
            live_pages: self.live_pages.load(Ordering::Relaxed),
            cached_pages: self.cached_pages.load(Ordering::Relaxed),
            zeroed_pages: self.zeroed_pages.load(Ordering::Relaxed),
        }
    }

    #[inline]
    pub(crate) fn add_live(&self, pages: i64) {
        let v = &self.live_pages;
        v.store(
            v.load(Ordering::Relaxed).wrapping_add(pages),
            Ordering::Relaxed,
        );
    }
}

impl CacheShared {
    /// Caches of `max_bytes` per thread, for buffers up to a quarter of that.
    pub(crate) fn new(max_bytes: usize, page: usize) -> CacheShared {
        let max_pages = max_bytes / page;
        CacheShared {
            max_pages,
            max_buffer_pages: max_pages / 4,
            epoch: AtomicU64::new(0),
            slots: Mutex::new(Slots {
                live: Vec::new(),
                retired: SlotTotals::default(),
            }),
        }
    }

    /// Asks every thread to empty its cache of this heap at its next use.
    pub(crate) fn ask_to_empty(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters of every thread's cache, added up (exited threads' included).
    pub(crate) fn totals(&self) -> SlotTotals {
        let slots = lock(&self.slots);
        let mut t = slots.retired;
        for s in slots.live.iter().filter_map(Weak::upgrade) {
            t.add(s.totals());
        }
        t
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::Arc;

    #[test]
    fn totals_add_live_slots_and_retired_ones_and_forget_dropped_slots() {
        let shared = CacheShared::new(1 << 20, 4096);
        assert_eq!((shared.max_pages, shared.max_buffer_pages), (256, 64));
        let a = Arc::new(CachePadded::new(Slot::default()));
        let b = Arc::new(CachePadded::new(Slot::default()));
        lock(&shared.slots)
            .live
            .extend([Arc::downgrade(&a), Arc::downgrade(&b)]);
        add_own(&a.allocs, 3);
        add_own(&b.frees, 2);
        a.add_live(5);
        b.add_live(-2); // a buffer allocated on one thread, released on the other
        b.cached_pages.store(7, Ordering::Relaxed);
        let t = shared.totals();
        assert_eq!(
            (t.allocs, t.frees, t.live_pages, t.cached_pages),
            (3, 2, 3, 7)
        );
        // A thread that exits hands its counts to `retired` and its slot goes away.
        {
            let mut slots = lock(&shared.slots);
            let gone = b.totals();
            slots.retired.add(gone);
        }
        drop(b);
        assert_eq!(shared.totals(), t, "nothing counted twice or lost");
        shared.ask_to_empty();
        assert_eq!(shared.epoch.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn counters_written_by_one_thread_are_read_whole_by_another() {
        let slot = Arc::new(CachePadded::new(Slot::default()));
        let writer = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    add_own(&slot.allocs, 1);
                    slot.add_live(1);
                }
            })
        };
        let mut last = 0;
        for _ in 0..100 {
            let now = slot.totals().allocs;
            assert!(now >= last, "a counter never goes back");
            last = now;
        }
        writer.join().unwrap();
        assert_eq!(slot.totals().allocs, 100);
        assert_eq!(slot.totals().live_pages, 100);
    }
}
