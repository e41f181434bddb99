//! The heap's core: its pools, arenas, hand-off and counters ([`HeapInner`]), and what
//! allocation and release do with blocks: zero them, give them to the pools, give them back.
//! Gathering a buffer's blocks (`gather.rs`), the hand-off with the worker (`handoff.rs`), the
//! worker's loop (`worker.rs`), the buffers (`buffer.rs`) and the thread caches (`cache.rs`)
//! are built on it; it knows none of them.

use crossbeam_utils::CachePadded;

use super::cache_slots::CacheShared;
use super::gather::Streak;
use super::handoff::Handoff;
use super::job::{Job, Run, Runs};
use crate::arena::Arenas;
use crate::pool::{Block, PagePool};
use crate::registry::Owner;
use crate::shrinker::Shrinker;
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// The heap's counters. The allocating threads' counters and the worker's sit on separate cache
/// lines, so that counting does not bounce a line between cores.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) allocs: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) frees: AtomicU64,
    pub(crate) live_pages: AtomicU64,
    pub(crate) remapped: AtomicU64,
    pub(crate) zeroed_sync: AtomicU64,
    pub(crate) zeroed_inline: AtomicU64,
    /// Bytes zeroed by threads other than the worker (see `zero_run`, `zero_part`).
    pub(crate) caller_bytes: AtomicU64,
    pub(crate) waited: AtomicU64,
    pub(crate) helped: AtomicU64,
    /// Runs an allocation gave up on, waiting for the worker (see `zero_stolen`).
    pub(crate) abandoned: AtomicU64,
    /// Pooled and queued pages given back to make room for an allocation (see `gather`).
    pub(crate) reclaimed: AtomicU64,
    pub(crate) exported: AtomicU64,
    pub(crate) exports_held: AtomicU64,
    pub(crate) peak_pooled: AtomicUsize,
    pub(crate) worker: CachePadded<WorkerCounters>,
}

/// The worker's counters, on a cache line of their own.
#[derive(Default)]
pub(crate) struct WorkerCounters {
    pub(crate) zeroed: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) nanos: AtomicU64,
}

/// What buffers share with their heap. Field order matters: the pools drop (releasing their
/// blocks into the arenas) before the arenas are unmapped.
pub(crate) struct HeapInner {
    pub(crate) pools: Vec<Arc<PagePool>>,
    /// Descending; parallel to `pools`.
    pub(crate) orders: Vec<u8>,
    pub(crate) page: usize,
    /// log2 of `page`.
    pub(crate) page_shift: u32,
    /// Pages in the smallest block (a power of two): buffers are a whole number of them.
    pub(crate) granule: usize,
    pub(crate) max_buffer: usize,
    /// The fork generation this heap state belongs to (see [`crate::fork`]).
    pub(crate) generation: u64,
    pub(crate) owner: Arc<Owner>,
    pub(crate) arenas: Arc<Arenas>,
    /// The hand-off with the worker and its release queue; `None` when releases zero
    /// synchronously.
    pub(crate) handoff: Option<Arc<Handoff>>,
    /// Set when the `SystemHeap` handle is dropped: buffers released later go straight back.
    pub(crate) closed: AtomicBool,
    pub(crate) counters: Counters,
    /// Never set: the worker-locking flag of a heap without a worker (see
    /// `sync::lock_within`).
    pub(crate) no_worker: crate::sync::AtomicBool,
    /// The streak of allocations whose blocks did not lie end to end (see `gather`).
    pub(crate) streak: Streak,
    /// The per-thread caches of small buffers.
    pub(crate) cache: CacheShared,
}

impl HeapInner {
    #[inline]
    pub(crate) fn pooling(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && self.owner.limit_pages() > 0
    }

    /// The pages of a buffer of `len` bytes (at most the maximum buffer): a whole number of
    /// the smallest blocks (one page, or 2 MiB for a huge pool type). Pages and blocks are
    /// powers of two: shifts and masks, not divisions, on the hot path. Bounded: the maximum
    /// buffer is at most `MAX_BUFFER_CEILING` (a quarter of `usize::MAX`), so neither rounding,
    /// nor the caller's shift back to bytes, overflows.
    #[inline]
    pub(crate) fn pages_for(&self, len: usize) -> usize {
        let pages = (len + self.page - 1) >> self.page_shift;
        (pages + self.granule - 1) & !(self.granule - 1)
    }

    /// Gives runs of zeroed blocks to their pools, last block first so that the pools, being
    /// LIFO, hand them out again in the same order, end to end; then enforces the limits.
    pub(crate) fn give_runs(&self, runs: &[Run]) {
        for r in runs.iter().rev() {
            let i = self.pool_index(r.order);
            let size = self.page << r.order;
            for k in (0..r.count).rev() {
                // SAFETY: the block is a used arena range of `2^order` pages, inside the run,
                // owned exclusively by the caller and zeroed.
                let block = unsafe { Block::from_raw(r.ptr().add(k * size), r.order) };
                if let Err(b) = self.pools[i].give_quiet(block) {
                    self.arenas.release(b.into_raw(), size);
                }
            }
        }
        self.owner.enforce_limits();
        let pooled = self.owner.count();
        if pooled > self.counters.peak_pooled.load(Ordering::Relaxed) {
            self.counters
                .peak_pooled
                .fetch_max(pooled, Ordering::Relaxed);
        }
    }

    /// Undoes an allocation's takes (it failed, or gave a partial set back), leaving every
    /// counter as it was: blocks taken from a pool go back to it uncounted, fresh pages
    /// (`fresh`: the carved range) go back to the arena uncounted. Queued blocks that were
    /// zeroed for it (`stolen`) are pooled and counted as zeroed by a releasing thread
    /// (`zeroed_sync`): that work was done, and no allocation got them.
    #[cold]
    pub(crate) fn undo_alloc(&self, runs: &[Run], stolen: &[Run], fresh: Option<(usize, usize)>) {
        let page = self.page;
        let mut given = 0;
        for r in runs {
            let i = self.pool_index(r.order);
            let size = page << r.order;
            for k in 0..r.count {
                let a = r.start + k * size;
                if fresh.is_some_and(|(p, n)| a >= p && a < p + n) {
                    continue; // given back below, as one range
                }
                // SAFETY: the block is a used arena range of `2^order` pages, zeroed, that this
                // failed allocation owns.
                let block = unsafe {
                    Block::from_raw(
                        Run {
                            start: a,
                            order: r.order,
                            count: 1,
                        }
                        .ptr(),
                        r.order,
                    )
                };
                let res = if stolen.iter().any(|s| s.holds(a, page)) {
                    given += 1;
                    self.pools[i].give_quiet(block)
                } else {
                    self.pools[i].restore(block)
                };
                if let Err(b) = res {
                    self.arenas.release(b.into_raw(), size);
                }
            }
        }
        if given > 0 {
            self.counters
                .zeroed_sync
                .fetch_add(given as u64, Ordering::Relaxed);
        }
        if let Some((p, n)) = fresh {
            self.arenas.unfresh(
                Run {
                    start: p,
                    order: 0,
                    count: 0,
                }
                .ptr(),
                n,
            );
        }
        self.owner.enforce_limits();
    }

    /// Gives a run's memory straight back to the system.
    pub(crate) fn release_run(&self, r: &Run) {
        self.arenas.release(r.ptr(), r.pages() * self.page);
    }

    /// Zeroes a run through its home mapping, with streaming stores when the buffer it belongs
    /// to (`buffer_pages`) is too large for the cache.
    ///
    /// # Safety
    /// The caller owns the run's blocks exclusively: no pool or claim refers to them, and
    /// nothing reads or writes them meanwhile (no slice of them exists; a buffer that holds
    /// the run has handed none out). The run is a used range of this heap's arenas, mapped at
    /// its home address.
    #[inline]
    pub(crate) unsafe fn zero_run(&self, r: &Run, buffer_pages: usize) {
        let streaming = buffer_pages * self.page > crate::tempo::tempo().streaming_from();
        let len = r.pages() * self.page;
        // SAFETY: the run is a used arena range, mapped at its home address, owned by the caller.
        unsafe { crate::zero::zero(r.ptr(), len, streaming) };
        self.count_caller_zeroing(len);
    }

    /// Zeroes `len` bytes at `off` into a job's run, on a thread other than the worker.
    ///
    /// # Safety
    /// The caller has taken that stripe of the job (see [`Job::next_stripe`]).
    pub(crate) unsafe fn zero_part(&self, job: &Job, off: usize, len: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { self.zero_part_uncounted(job, off, len) };
        self.count_caller_zeroing(len);
    }

    /// [`zero_part`](Self::zero_part) for the worker, which counts its own bytes.
    ///
    /// # Safety
    /// As for `zero_part`.
    pub(super) unsafe fn zero_part_uncounted(&self, job: &Job, off: usize, len: usize) {
        let streaming = job.buffer_pages() * self.page > crate::tempo::tempo().streaming_from();
        // SAFETY: the stripe is inside the job's run, a used arena range owned by the caller
        // for the stripe's duration.
        unsafe { crate::zero::zero(job.run().ptr().add(off), len, streaming) };
    }

    fn count_caller_zeroing(&self, bytes: usize) {
        self.counters
            .caller_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Releases a dropped buffer's runs: queued for the worker, else zeroed here and pooled,
    /// else (not pooling) straight back to the system.
    pub(crate) fn release_buffer(&self, runs: Runs) {
        if !self.pooling() {
            runs.iter().for_each(|r| self.release_run(r));
            return;
        }
        let runs = match &self.handoff {
            Some(handoff) => match handoff.queue().queue(runs) {
                Ok(()) => return,
                Err(runs) => runs,
            },
            None => runs,
        };
        let pages = runs.iter().map(Run::pages).sum();
        for r in &runs {
            // SAFETY: the dropped buffer owned these blocks; nothing else refers to them.
            unsafe { self.zero_run(r, pages) };
        }
        let blocks: usize = runs.iter().map(|r| r.count).sum();
        self.counters
            .zeroed_sync
            .fetch_add(blocks as u64, Ordering::Relaxed);
        self.give_runs(&runs);
    }

    pub(super) fn pool_index(&self, order: u8) -> usize {
        self.orders.iter().position(|&o| o == order).unwrap_or(0)
    }

    /// Counts an allocation made of what `gather` found: `hits` pooled blocks,
    /// `inline` queued blocks zeroed on the allocating thread, `misses` fresh blocks.
    pub(crate) fn count_alloc(&self, hits: usize, inline: usize, misses: usize) {
        let counters = &self.counters;
        if hits > 0 {
            counters.hits.fetch_add(hits as u64, Ordering::Relaxed);
        }
        if inline > 0 {
            counters
                .zeroed_inline
                .fetch_add(inline as u64, Ordering::Relaxed);
        }
        if misses > 0 {
            counters.misses.fetch_add(misses as u64, Ordering::Relaxed);
        }
    }
}
