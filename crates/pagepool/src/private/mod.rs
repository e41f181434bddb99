//! Private-memory pools: the third pool user, serving ordinary private anonymous memory of
//! size classes from one reserved range (`range.rs`), for the global allocator
//! ([`crate::alloc::PoolAlloc`]).
//!
//! Memory behaves as malloc's does: private and anonymous, so a forked child sees its parent's
//! blocks copy-on-write and allocates and frees on its own. Each size class (a power of two
//! from the threshold to the largest pooled size) keeps two page pools of the same registry as
//! every other user:
//!
//! - **dirty** blocks, for `alloc` (malloc promises nothing about contents: they are never
//!   zeroed needlessly);
//! - **clean** blocks, for `alloc_zeroed` (calloc), zeroed by the worker through the
//!   deferred-free helper; zeroed inline only when none is clean.
//!
//! A released block goes to the worker to be zeroed only while its class is asked for zeroed
//! memory (a `calloc` among the class's last [`ZEROED_MEMORY`] allocations); otherwise it is
//! pooled dirty. Only what may have been written is zeroed: the block's *extent*, the largest
//! size it was allocated with since it was last zeroed (a `Vec` of 33 MiB in a 64 MiB block
//! costs 33 MiB of zeroing, never 64). Both pools are owners of the registry like any other
//! (their limits, the global maximum, shrinking, the pressure monitor and `trim` give their
//! memory back: `MADV_DONTNEED`, the slot then kept, empty, for the next fresh block).
//!
//! A forked child keeps the range (its blocks are copy-on-write copies) but starts with empty
//! pools and no worker (its state is a [`ForkCell`]): the parent's pooled blocks are left as
//! they are (shared with the parent until written, never reused), blocks the child frees go
//! to its own pools, and blocks it frees for zeroing are zeroed on its own time.

mod range;

use std::ptr::NonNull;
use std::sync::Arc;

use crate::deferred::{Item, Reason, ReleaseQueue};
use crate::fork::ForkCell;
use crate::pool::{Block, PagePool};
use crate::registry::{Owner, Registry, Shrinker};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::sync::{Mutex, lock};

pub(crate) use range::Range;
use range::Slot;

/// A class releases blocks for zeroing while a `calloc` was among its last this many
/// allocations (each `calloc` sets the score to it, each plain allocation takes one off).
pub(crate) const ZEROED_MEMORY: u32 = 16;

/// The smallest block a `realloc` moves by its pages (`mremap`) rather than by copying: two
/// system calls and the page-table moves cost more than copying a smaller block.
pub(crate) const MOVE_FROM: usize = 1 << 20;

/// What the pools were built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// The smallest request served (smaller ones go to the next allocator).
    pub(crate) threshold: usize,
    /// The smallest class's order (its blocks are `page << min_order` bytes).
    pub(crate) min_order: u8,
    /// The largest class's order.
    pub(crate) max_order: u8,
    /// Each kind of pool's limit (dirty, clean), in pages.
    pub(crate) limit_pages: usize,
    /// Whether released blocks may be zeroed by a worker thread (off: never started).
    pub(crate) worker: bool,
    /// Whether the first generation starts the pressure monitor of the process's registry
    /// (unless one runs already), with its default settings.
    pub(crate) pressure: bool,
}

/// The private pools: their range and this fork generation's state.
pub(crate) struct Pools {
    range: &'static Range,
    settings: Settings,
    state: ForkCell<State>,
}

/// One fork generation's pools, worker and counters.
struct State {
    classes: Vec<Class>,
    dirty_owner: Arc<Owner>,
    clean_owner: Arc<Owner>,
    queue: Option<Arc<ReleaseQueue<Dirty>>>,
    counters: Arc<Counters>,
}

/// Slots whose memory went back to the system (all zero, using no memory), per class.
type EmptySlots = Arc<Mutex<Vec<u32>>>;

/// What the worker needs of a class: where a zeroed block goes, where a slot whose memory it
/// gave back under pressure goes, and the count of the class's blocks it is zeroing.
type WorkerClass = (Arc<PagePool>, EmptySlots, Arc<AtomicUsize>);

/// One size class's pools, its empty slots and its appetite for zeroed memory.
struct Class {
    dirty: Arc<PagePool>,
    clean: Arc<PagePool>,
    /// Slots whose memory went back to the system (all zero, using no memory).
    empty: EmptySlots,
    zeroed_score: AtomicU32,
    /// Blocks of this class the worker is zeroing now (an allocation that finds no block
    /// waits for one of them rather than fault in fresh memory).
    zeroing: Arc<AtomicUsize>,
}

/// The counters of [`PrivateStats`](crate::alloc::PrivateStats).
#[derive(Default)]
struct Counters {
    allocs: AtomicU64,
    clean_hits: AtomicU64,
    dirty_hits: AtomicU64,
    fresh: AtomicU64,
    frees: AtomicU64,
    zeroed_inline_bytes: AtomicU64,
    zeroed_worker_bytes: AtomicU64,
    released: AtomicU64,
    moved: AtomicU64,
    waited: AtomicU64,
}

/// A released block on its way to the worker.
struct Dirty {
    slot: Slot,
    pages: usize,
}

impl Item for Dirty {
    fn pages(&self) -> usize {
        self.pages
    }
}

impl Pools {
    /// Reserves the range and builds the first generation's pools (registered with the
    /// process's registry) and, with `settings.worker`, starts the worker.
    pub(crate) fn new(settings: Settings) -> Result<Pools, crate::OsError> {
        let range: &'static Range = Box::leak(Box::new(Range::new(
            settings.min_order,
            settings.max_order,
        )?));
        let state = State::new(range, settings, settings.worker);
        Ok(Pools {
            range,
            settings,
            state: ForkCell::new(state),
        })
    }

    fn state(&self) -> &State {
        let (range, settings) = (self.range, self.settings);
        // A forked child: fresh pools, no worker (see the module).
        self.state.get(|_| State::new(range, settings, false))
    }

    /// Whether `p` lies in the pools' range (is theirs to free).
    #[inline]
    pub(crate) fn contains(&self, p: *mut u8) -> bool {
        self.range.contains(p as usize)
    }

    /// A block for `size` bytes aligned to `align` (all zero with `zeroed`), or `None` when no
    /// class holds it or its region and the system have no memory for it.
    pub(crate) fn alloc(&self, size: usize, align: usize, zeroed: bool) -> Option<NonNull<u8>> {
        let class = self.range.class_for(size, align)?;
        let st = self.state();
        let c = &st.classes[class];
        let counters = &st.counters;
        counters.allocs.fetch_add(1, Ordering::Relaxed);
        if zeroed {
            c.zeroed_score.store(ZEROED_MEMORY, Ordering::Relaxed);
        } else if c.zeroed_score.load(Ordering::Relaxed) > 0 {
            let _ = c
                .zeroed_score
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_sub(1));
        }
        let (first, second) = if zeroed {
            (&c.clean, &c.dirty)
        } else {
            (&c.dirty, &c.clean)
        };
        let slot = if let Some(b) = first.take() {
            let hit = if zeroed {
                &counters.clean_hits
            } else {
                &counters.dirty_hits
            };
            hit.fetch_add(1, Ordering::Relaxed);
            self.slot_of_block(b)
        } else if let Some(s) = second
            .take()
            .map(|b| self.slot_of_block(b))
            .or_else(|| steal(st, class))
        {
            if zeroed {
                counters.dirty_hits.fetch_add(1, Ordering::Relaxed);
                let n = self.zero_extent(s);
                counters
                    .zeroed_inline_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
            } else {
                counters.clean_hits.fetch_add(1, Ordering::Relaxed);
            }
            s
        } else if let Some(s) = self.wait_for_worker(c, class) {
            counters.waited.fetch_add(1, Ordering::Relaxed);
            if zeroed {
                counters.clean_hits.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.dirty_hits.fetch_add(1, Ordering::Relaxed);
            }
            s
        } else {
            let s = self.empty_or_carved(c, class)?;
            counters.fresh.fetch_add(1, Ordering::Relaxed);
            s
        };
        if !self.range.set_live(slot, true) {
            fatal("a pooled block handed out twice");
        }
        // What its user may write: zeroed when it comes back.
        self.range.widen(slot, size);
        Some(self.range.addr(slot))
    }

    /// A block of `class` the worker is zeroing now, waited for: as long as zeroing the block
    /// takes at the speed this machine measured, twice over (at most the hand-off cap). Fresh
    /// memory costs a page fault per page, several times the zeroing. `None` when the worker
    /// zeroes none of the class, or it did not land in time.
    fn wait_for_worker(&self, c: &Class, class: usize) -> Option<Slot> {
        if c.zeroing.load(Ordering::Acquire) == 0 {
            return None;
        }
        let tempo = crate::tempo::tempo();
        let piece_ns = tempo.memset_piece_ns().min(tempo.streaming_piece_ns());
        let pieces = (self.range.block_bytes(class) / crate::config::WORKER_PIECE_BYTES).max(1);
        let budget = std::time::Duration::from_nanos(piece_ns.saturating_mul(2 * pieces as u64))
            .min(tempo.handoff_cap());
        let start = std::time::Instant::now();
        loop {
            if let Some(b) = c.clean.take() {
                return Some(self.slot_of_block(b));
            }
            if c.zeroing.load(Ordering::Acquire) == 0 || start.elapsed() >= budget {
                return None;
            }
            for _ in 0..32 {
                std::hint::spin_loop();
            }
        }
    }

    /// Releases a block of the range (its extent covers what it was allocated with, grown in
    /// place to, or said to be usable at: see [`note_written`](Self::note_written)).
    ///
    /// # Safety
    /// `p` came from [`alloc`](Self::alloc) of these pools, and nothing uses it any more.
    pub(crate) unsafe fn dealloc(&self, p: NonNull<u8>) {
        let Some(slot) = self.range.slot_of(p.as_ptr() as usize) else {
            fatal("free of a pointer inside the pools that no block starts");
        };
        if !self.range.set_live(slot, false) {
            fatal("double free of a pooled block");
        }
        let st = self.state();
        st.counters.frees.fetch_add(1, Ordering::Relaxed);
        let c = &st.classes[slot.class];
        let pages = self.range.extent(slot) / crate::os::page_size();
        if pages == 0 {
            // Never written (a block taken clean and released as it was): clean already.
            return self.give(&c.clean, slot);
        }
        if c.zeroed_score.load(Ordering::Relaxed) > 0
            && let Some(q) = &st.queue
            && q.queue(Dirty { slot, pages }).is_ok()
        {
            return;
        }
        self.give(&c.dirty, slot);
    }

    /// The usable size of a block that `p` starts, if it is one of the range's.
    pub(crate) fn usable_size(&self, p: *mut u8) -> Option<usize> {
        let s = self.range.slot_of(p as usize)?;
        Some(self.range.block_bytes(s.class))
    }

    /// How much of the block that `p` starts may hold data (its extent), if it is one of the
    /// range's.
    pub(crate) fn extent_of(&self, p: *mut u8) -> Option<usize> {
        let s = self.range.slot_of(p as usize)?;
        Some(self.range.extent(s))
    }

    /// Whether a block that `p` starts, allocated in a block of its class, can hold `size`
    /// bytes aligned to `align` where it is (a realloc in place).
    pub(crate) fn fits_in_place(&self, p: *mut u8, size: usize, align: usize) -> bool {
        let Some(s) = self.range.slot_of(p as usize) else {
            return false;
        };
        self.range.class_for(size, align) == Some(s.class)
    }

    /// Moves the live block that `p` starts to a block of the class that holds `size` bytes
    /// aligned to `align`, without copying: its pages move (`mremap`) to an empty or fresh
    /// slot of that class, and the old slot is mapped again, zero, and kept empty. `None` where
    /// the pools cannot (no larger class holds it, no slot, the block is smaller than
    /// [`MOVE_FROM`], its range spans mappings a program split with `madvise`, the system
    /// refused), and the caller copies instead; the block is then untouched.
    ///
    /// # Safety
    /// `p` is a live block of these pools whose holder gives it up for the returned one.
    pub(crate) unsafe fn grow(&self, p: *mut u8, size: usize, align: usize) -> Option<NonNull<u8>> {
        let old = self.range.slot_of(p as usize)?;
        let class = self.range.class_for(size, align)?;
        let bytes = self.range.block_bytes(old.class);
        if class <= old.class || bytes < MOVE_FROM {
            return None;
        }
        let st = self.state();
        let c = &st.classes[class];
        let to = self.empty_or_carved(c, class)?;
        let (from_addr, to_addr) = (self.range.addr(old), self.range.addr(to));
        // SAFETY: `old` is the caller's live block, `to` a slot no one holds (empty or just
        // carved), both in our reservation; the caller gives `p` up.
        if unsafe { crate::os::move_pages(from_addr, bytes, to_addr) }.is_err() {
            lock(&c.empty).push(to.index as u32); // zero and unused still
            return None;
        }
        let extent = self.range.extent(old);
        self.range.set_live(old, false);
        self.range.clear(old);
        // SAFETY: `from_addr..+bytes` is the hole the move left in our reservation.
        match unsafe { crate::os::refill_private(from_addr, bytes) } {
            Ok(()) => lock(&st.classes[old.class].empty).push(old.index as u32),
            // Something else was mapped into the hole meanwhile (another thread's `mmap`):
            // that slot is lost to the pools, never handed out again.
            Err(e) => log::debug!("pagepool: a moved block's slot is lost: {e}"),
        }
        if !self.range.set_live(to, true) {
            fatal("a pooled block handed out twice");
        }
        self.range.widen(to, extent);
        self.range.widen(to, size);
        st.counters.moved.fetch_add(1, Ordering::Relaxed);
        Some(to_addr)
    }

    /// Records that a live block of the range that `p` starts may be written over its first
    /// `size` bytes (a block grown in place by a `realloc`, or whose usable size was asked).
    pub(crate) fn note_written(&self, p: *mut u8, size: usize) {
        if let Some(s) = self.range.slot_of(p as usize) {
            self.range.widen(s, size);
        }
    }

    /// Waits until the worker has zeroed every released block (none in a forked child).
    pub(crate) fn flush(&self) {
        if let Some(q) = &self.state().queue {
            q.flush();
        }
    }

    /// Gives every pooled and queued block's memory back to the system; returns the pages.
    pub(crate) fn trim(&self) -> usize {
        let st = self.state();
        let mut freed = 0;
        if let Some(q) = &st.queue {
            freed += q.scan(usize::MAX);
            q.flush();
        }
        for c in &st.classes {
            freed += c.dirty.shrink(usize::MAX) + c.clean.shrink(usize::MAX);
        }
        freed
    }

    /// A snapshot of the pools' statistics.
    pub(crate) fn stats(&self) -> crate::alloc::PrivateStats {
        let st = self.state();
        let c = &st.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::alloc::PrivateStats {
            threshold: self.settings.threshold,
            largest: self.range.block_bytes(self.range.classes() - 1),
            allocs: get(&c.allocs),
            clean_hits: get(&c.clean_hits),
            dirty_hits: get(&c.dirty_hits),
            fresh: get(&c.fresh),
            frees: get(&c.frees),
            zeroed_inline_bytes: get(&c.zeroed_inline_bytes),
            zeroed_worker_bytes: get(&c.zeroed_worker_bytes),
            released_blocks: get(&c.released),
            moved_blocks: get(&c.moved),
            waited_for_worker: get(&c.waited),
            dirty_pages: st.dirty_owner.count(),
            clean_pages: st.clean_owner.count(),
            queued_pages: st.queue.as_ref().map_or(0, |q| q.pages()),
            worker: st.queue.is_some(),
            dirty: st.dirty_owner.stats(),
            clean: st.clean_owner.stats(),
        }
    }

    /// A slot of `class` with no memory behind it (all zero): one given back to the system
    /// before, else a fresh one; `None` when the region is full or the system refuses.
    fn empty_or_carved(&self, c: &Class, class: usize) -> Option<Slot> {
        let empty = lock(&c.empty).pop();
        match empty {
            Some(index) => Some(Slot {
                class,
                index: index as usize,
            }),
            None => self.range.carve(class),
        }
    }

    fn slot_of_block(&self, b: Block) -> Slot {
        let p = b.into_raw();
        match self.range.slot_of(p.as_ptr() as usize) {
            Some(s) => s,
            None => fatal("a pooled block outside its range"),
        }
    }

    /// Zeroes what of the slot may be dirty; returns the bytes zeroed.
    fn zero_extent(&self, s: Slot) -> usize {
        zero_extent(self.range, s)
    }

    fn give(&self, pool: &PagePool, s: Slot) {
        // SAFETY: the slot is a carved block of the range, readable and writable, owned by the
        // caller (released, not live), and the range is never unmapped while the pools exist.
        let b = unsafe { Block::from_raw(self.range.addr(s), self.range.order(s.class)) };
        if let Err(b) = pool.give(b) {
            // Not the pool's order: impossible, the pools are built per class.
            let _ = b.into_raw();
            fatal("a block given to a pool of another class");
        }
    }
}

/// A block of `class` taken back from the worker's queue before the worker claimed it (the
/// newest such among the last [`FIT_SCAN`](crate::config::FIT_SCAN) queued), for an allocation
/// that found both pools empty: zeroing it on the allocating thread (for `calloc`; `malloc`
/// takes it as it is) costs what glibc's `calloc` costs, where fresh memory costs a page fault
/// per page. `None` when there is none, or the queue's lock stays held by a worker that does not
/// run.
fn steal(st: &State, class: usize) -> Option<Slot> {
    let q = st.queue.as_ref()?;
    let mut g = q.lock_bounded()?;
    let items = g.items();
    let i = (0..items.len())
        .rev()
        .take(crate::config::FIT_SCAN)
        .find(|&i| items[i].0.slot.class == class)?;
    let (d, _) = items.remove(i)?;
    q.took(&mut g, d.pages);
    let drained = g.drained();
    drop(g);
    if drained {
        q.wake_waiters();
    }
    Some(d.slot)
}

/// Zeroes what of slot `s` may be dirty (its extent) and marks it clean; returns the bytes.
fn zero_extent(range: &Range, s: Slot) -> usize {
    let n = range.extent(s);
    if n > 0 {
        let streaming = n > crate::tempo::tempo().streaming_from();
        // SAFETY: the slot is carved (readable and writable) and owned by the caller (taken
        // from a pool or the queue), so nothing else reads or writes it.
        unsafe { crate::zero::zero(range.addr(s), n, streaming) };
        range.clear(s);
    }
    n
}

/// [`zero_extent`] a worker piece at a time, calling `after_piece` after each.
fn zero_extent_by_pieces(range: &Range, s: Slot, mut after_piece: impl FnMut()) -> usize {
    let n = range.extent(s);
    let streaming = n > crate::tempo::tempo().streaming_from();
    let mut done = 0;
    while done < n {
        let len = (n - done).min(crate::config::WORKER_PIECE_BYTES);
        // SAFETY: as in `zero_extent`; `done + len <= n`, within the slot.
        unsafe { crate::zero::zero(range.addr(s).add(done), len, streaming) };
        done += len;
        after_piece();
    }
    range.clear(s);
    n
}

/// Gives a slot's memory back to the system and keeps the slot as an empty one.
fn discard(range: &Range, empty: &Mutex<Vec<u32>>, s: Slot, counters: &Counters) {
    // SAFETY: the slot is carved and owned by the caller (a pool's release or the queue's).
    let _ = unsafe { crate::os::discard(range.addr(s), range.block_bytes(s.class)) };
    range.clear(s);
    counters.released.fetch_add(1, Ordering::Relaxed);
    lock(empty).push(s.index as u32);
}

impl State {
    fn new(range: &'static Range, settings: Settings, worker: bool) -> State {
        let registry = Registry::global();
        if worker && settings.pressure {
            // The parent's generation only: a forked child runs no threads of the pools.
            registry.start_monitor(crate::pressure::PressureConfig::default());
        }
        let dirty_owner = registry.register_typed("private-dirty", "private", settings.limit_pages);
        let clean_owner = registry.register_typed("private-clean", "private", settings.limit_pages);
        let counters = Arc::new(Counters::default());
        let mut classes = Vec::with_capacity(range.classes());
        for class in 0..range.classes() {
            let order = range.order(class);
            // Room for every slot of the class from the start: a push never allocates, so a
            // release from any thread (the registry's shrinking runs on others' threads, not
            // marked as the allocator's own) never asks the allocator for memory.
            let slots = range::REGION_BYTES / range.block_bytes(class);
            let empty = Arc::new(Mutex::new(Vec::with_capacity(slots)));
            let release = |empty: EmptySlots, counters: Arc<Counters>| {
                Box::new(move |b: Block| {
                    let p = b.into_raw();
                    match range.slot_of(p.as_ptr() as usize) {
                        Some(s) => discard(range, &empty, s, &counters),
                        None => fatal("a pooled block outside its range"),
                    }
                }) as crate::pool::ReleaseFn
            };
            classes.push(Class {
                dirty: dirty_owner.add_pool(order, release(empty.clone(), counters.clone())),
                clean: clean_owner.add_pool(order, release(empty.clone(), counters.clone())),
                empty,
                zeroed_score: AtomicU32::new(0),
                zeroing: Arc::new(AtomicUsize::new(0)),
            });
        }
        let classes_for_queue: Vec<WorkerClass> = classes
            .iter()
            .map(|c| (c.clean.clone(), c.empty.clone(), c.zeroing.clone()))
            .collect();
        let queue = worker
            .then(|| start_worker(range, settings, classes_for_queue, counters.clone()))
            .flatten();
        State {
            classes,
            dirty_owner,
            clean_owner,
            queue,
            counters,
        }
    }
}

/// The queue of blocks to zero and its worker: `None` when no thread can be started (blocks
/// are then pooled dirty, and zeroed by the `calloc` that takes them).
fn start_worker(
    range: &'static Range,
    settings: Settings,
    classes: Vec<WorkerClass>,
    counters: Arc<Counters>,
) -> Option<Arc<ReleaseQueue<Dirty>>> {
    let page = crate::os::page_size();
    let c = counters.clone();
    let queue = Arc::new_cyclic(|me: &std::sync::Weak<ReleaseQueue<Dirty>>| {
        let me = me.clone();
        ReleaseQueue::new(
            page,
            settings.limit_pages,
            Box::new(move |d: Dirty, why| {
                let (clean, empty, zeroing) = &classes[d.slot.class];
                match why {
                    Reason::Normal => {
                        zeroing.fetch_add(1, Ordering::Relaxed);
                        // A piece at a time, renewing the worker's promise after each: a release
                        // that finds the worker late on it pools its block dirty instead (see
                        // `ReleaseQueue::queue`), and a 64 MiB block takes milliseconds.
                        let n = zero_extent_by_pieces(range, d.slot, || {
                            if let Some(q) = me.upgrade() {
                                q.promise(std::time::Duration::ZERO);
                            }
                        });
                        c.zeroed_worker_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        // SAFETY: as in `Pools::give`: a carved slot the queue owned, now zeroed.
                        let b = unsafe {
                            Block::from_raw(range.addr(d.slot), range.order(d.slot.class))
                        };
                        if clean.give(b).is_err() {
                            fatal("a block given to a pool of another class");
                        }
                        zeroing.fetch_sub(1, Ordering::Release);
                    }
                    Reason::UnderPressure => discard(range, empty, d.slot, &c),
                }
            }),
        )
    });
    // Every release is the worker's (no allocation shares a block's zeroing with it): a
    // sleeping worker is woken by the first, a spinning one takes it; and as the heap's, it
    // spins and naps between releases rather than sleep, so that a release seldom pays a
    // wake-up.
    queue.set_wake_pages(1);
    queue.set_worker_spin(crate::config::DEFAULT_WORKER_SPIN);
    queue.set_worker_naps(crate::config::DEFAULT_WORKER_NAPS);
    // Under memory pressure, queued blocks go straight back to the system.
    let weak: std::sync::Weak<dyn Shrinker> = Arc::downgrade(&queue) as _;
    Registry::global().add_shrinker(weak);
    let q = queue.clone();
    match crate::deferred::spawn_worker("pagepool-private", move || q.serve(|| None)) {
        Ok(_) => Some(queue),
        Err(e) => {
            log::debug!("pagepool: no private-pool worker ({e}); calloc zeroes inline");
            None
        }
    }
}

/// Ends the process with a one-line message, as glibc does on a corrupted free: continuing
/// would hand the same memory out twice.
#[cold]
fn fatal(what: &str) -> ! {
    // Written with one system call and no allocation: the allocator may be what is broken.
    let mut line = [0u8; 160];
    let prefix = b"pagepool: ";
    let n = prefix.len().min(line.len());
    line[..n].copy_from_slice(&prefix[..n]);
    let body = what.as_bytes();
    let m = body.len().min(line.len() - n - 1);
    line[n..n + m].copy_from_slice(&body[..m]);
    line[n + m] = b'\n';
    // SAFETY: `line[..n + m + 1]` is initialised memory we own; write(2) only reads it.
    let _ = unsafe { libc::write(2, line.as_ptr().cast(), n + m + 1) };
    std::process::abort();
}
