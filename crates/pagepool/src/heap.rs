//! The system heap: zeroed, page-aligned, contiguous buffers built from pooled blocks.
//!
//! The kernel's system heap builds each dma-buf from blocks of orders 8, 4 and 0 (1 MiB, 64 KiB,
//! 4 KiB, the page sizes IOMMUs use), largest first, taking each from the pool of its order before
//! asking the page allocator. [`SystemHeap`] does the same with blocks of memfd arenas
//! ([`crate::os`]), and hands the result out as one contiguous mapping:
//!
//! - if the blocks lie end to end in memory (always true for a buffer built from fresh pages,
//!   which are carved as one range, and usually true when a buffer of the same size was just
//!   freed, because pools are LIFO and blocks are given back in reverse order), the buffer *is*
//!   their home mapping: no system call at all;
//! - otherwise a range of address space is reserved and each run of blocks that are adjacent in
//!   the same arena file is mapped there once more (`mmap(MAP_SHARED | MAP_FIXED)`): page-table
//!   work only, no copying and no zeroing.
//!
//! ## Small buffers: per-thread caches
//! A released buffer of up to 16 KiB (a quarter of [`HeapBuilder::thread_cache`]) stays, still
//! dirty, in the releasing thread's own cache of this heap (64 KiB by default), and the
//! thread's next allocation of that size takes it back and zeroes it inline: no lock, no atomic
//! read-modify-write, no hand-off to another core, which at that size all cost more than the
//! zeroing (measured: 4 KiB allocate + release ~60 ns this way against ~120 ns through the
//! pools and the queue). See the `cache` module for the bounds and how caches are emptied.
//!
//! ## Releasing
//! By default a released buffer is queued for the heap's worker in O(1) (a buffer that needed
//! a view also unmaps it); the worker (`pagepool-free`, at nice 19 like the kernel's
//! deferred-free kthread) claims its blocks a chunk (1 MiB) at a time, zeroes them and gives
//! them to the pools. An allocation that misses a pool takes, in this order:
//! 1. queued dirty blocks, oldest buffer first, a chunk at a time, zeroed on its own thread; a
//!    run of two stripes (128 KiB) or more is shared with the worker if it is idle, so that two
//!    cores zero it;
//! 2. blocks the worker is zeroing right now: it zeroes pieces of the worker's claim too, then
//!    waits briefly for the claim to land;
//! 3. fresh pages from the system.
//!
//! Two threads zeroing one run split it in pieces: the allocation takes half of what is left
//! at a time, the worker at most 256 KiB at a time. A spinning worker leaves a newly queued
//! buffer alone for 2 us, so that an allocation coming right after the release takes it (as
//! in step 1) rather than waiting for the worker's claim to land (step 2). Buffers larger than half the
//! last-level cache are zeroed with streaming stores. Past the queue bound the releasing thread
//! zeroes the buffer itself. Releases under one chunk do not wake a sleeping worker (a wake-up
//! costs more than zeroing them); an idle worker polls for [`HeapBuilder::worker_spin`], then
//! naps and looks for work by itself for [`HeapBuilder::worker_naps`], before it sleeps until a
//! release wakes it. A flush or the heap's drop ends its spin at once. With
//! [`HeapBuilder::deferred`]`(false)` every release zeroes synchronously (TTM's way).
//!
//! ## A busy machine
//! The scheduler gives a nice-19 thread very little time while other threads want the cores:
//! the worker may wait hundreds of milliseconds to run again, in the middle of a stripe or
//! while it holds a lock. No allocation waits for it longer than a small fixed bound (50 us,
//! about the worker's largest piece of zeroing, 256 KiB):
//! - the allocation side takes the locks the worker also takes (pools, queue, claim) only if
//!   they are free within the bound; otherwise it does without (another source of blocks);
//! - a run shared with the worker whose last stripe the worker has not finished within the
//!   bound is *abandoned*: the worker lands it in the pools when it finishes, and the
//!   allocation takes other memory; a claim of the worker's that does not land within the
//!   bound is left to it the same way; whoever zeroes the last stripe of an abandoned run
//!   lands it, so nothing is lost and nothing is zeroed twice;
//! - the worker promises when it will look at the queue next (at once while it works or
//!   spins, at the end of a nap). A release that finds it later than that by 3 ms zeroes its
//!   buffer itself, as a synchronous heap would: queued work would otherwise wait for the next
//!   allocation, which would zero it on its own time. Releases go on doing so after such a
//!   hold until the worker, asked by the first of them, shows that the scheduler runs it again.
//! - allocations keep released sets of blocks whole: one that needs several blocks of an order
//!   takes pooled ones only if they lie end to end, else a queued set first; the pools hand a
//!   single block out of the shortest run they hold; and after a few allocations in a row that
//!   needed a view anyway, one takes fresh pages as one range (see `alloc_blocks`).
//!
//! So under full CPU load a deferred heap behaves like a synchronous one; `examples/busy.rs`
//! measures both side by side.

//! ## Mapping count bound
//! pagepool's share of `/proc/self/maps` is at most `2A + Σ r(b)`: two mappings per arena (the
//! arena and the guard page after it, `A` arenas), plus, for each live buffer `b` that needed a
//! view, one mapping per run of blocks lying end to end (`r(b)`, at most the buffer's block
//! count: `len / 1 MiB + 30` with the default orders). Views are unmapped when their buffer is
//! dropped, and pooled blocks cost no mapping of their own, so the count depends only on the
//! arenas and the live buffers, never on the allocation history. Arenas are created only when no
//! arena has a large enough unused range, and unmapped as soon as nothing in them is used.
//! `tests/mappings.rs` checks the bound throughout 100,000 mixed-size allocations.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::arena::Arenas;
use crate::buffer::Buffer;
use crate::cache::{self, CacheShared};
use crate::config::{
    CHUNK_PAGES, DEFAULT_ARENA_SIZE, DEFAULT_MAX_BUFFER, DEFAULT_ORDERS, DEFAULT_POOL_LIMIT,
    DEFAULT_QUEUE_LIMIT, DEFAULT_THREAD_CACHE, DEFAULT_WORKER_NAPS, DEFAULT_WORKER_SPIN,
    HANDOFF_WAIT, REGATHER_FIRST, REGATHER_LONGEST, STRIPE_BYTES,
};
use crate::deferred::{Freelist, Job, Run, Runs, Work};
use crate::error::{AllocError, ConfigError};
use crate::fork::ForkCell;
use crate::os;
use crate::pool::{Block, MAX_ORDER, PagePool};
use crate::pressure::PressureConfig;
use crate::registry::{Owner, Registry};
use crate::shrinker::Shrinker;
use crate::stats::HeapStats;
use crate::sync::Arc;

/// Configures a [`SystemHeap`].
///
/// # Examples
/// ```
/// let heap = pagepool::SystemHeap::builder()
///     .name("camera")
///     .orders(&[4, 0])
///     .pool_limit(16 << 20)
///     .max_buffer(64 << 20)
///     .build()
///     .unwrap();
/// assert_eq!(heap.alloc(5000).unwrap().len(), 8192);
/// ```
#[derive(Clone)]
pub struct HeapBuilder {
    name: String,
    orders: Vec<u8>,
    pool_limit: usize,
    max_buffer: usize,
    arena_size: usize,
    registry: Option<Arc<Registry>>,
    deferred: bool,
    queue_limit: usize,
    worker_spin: std::time::Duration,
    worker_naps: std::time::Duration,
    thread_cache: usize,
    pressure: Option<PressureConfig>,
}

impl Default for HeapBuilder {
    fn default() -> Self {
        HeapBuilder {
            name: "system".to_owned(),
            orders: DEFAULT_ORDERS.to_vec(),
            pool_limit: DEFAULT_POOL_LIMIT,
            max_buffer: DEFAULT_MAX_BUFFER,
            arena_size: DEFAULT_ARENA_SIZE,
            registry: None,
            deferred: true,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            worker_spin: DEFAULT_WORKER_SPIN,
            worker_naps: DEFAULT_WORKER_NAPS,
            thread_cache: DEFAULT_THREAD_CACHE,
            pressure: Some(PressureConfig::default()),
        }
    }
}

impl fmt::Debug for HeapBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapBuilder")
            .field("name", &self.name)
            .field("orders", &self.orders)
            .field("pool_limit", &self.pool_limit)
            .field("max_buffer", &self.max_buffer)
            .field("arena_size", &self.arena_size)
            .field("deferred", &self.deferred)
            .field("queue_limit", &self.queue_limit)
            .field("worker_spin", &self.worker_spin)
            .field("worker_naps", &self.worker_naps)
            .field("thread_cache", &self.thread_cache)
            .field("pressure", &self.pressure)
            .finish_non_exhaustive()
    }
}

impl HeapBuilder {
    /// The heap's name: its row in the statistics and the name of its memfds.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The block orders buffers are built from (default `[8, 4, 0]`). Each must be at most
    /// [`MAX_ORDER`], and 0 must be among them.
    pub fn orders(mut self, orders: &[u8]) -> Self {
        self.orders = orders.to_vec();
        self
    }

    /// The most memory, in bytes, this heap's pools may hold (default 256 MiB; rounded down to
    /// pages). 0 turns pooling off: every buffer gets fresh pages from the system, and released
    /// buffers go straight back.
    pub fn pool_limit(mut self, bytes: usize) -> Self {
        self.pool_limit = bytes;
        self
    }

    /// The largest buffer the heap hands out, in bytes (default 1 GiB).
    pub fn max_buffer(mut self, bytes: usize) -> Self {
        self.max_buffer = bytes;
        self
    }

    /// The size of one memfd arena in bytes (default 64 MiB; rounded up to pages).
    pub fn arena_size(mut self, bytes: usize) -> Self {
        self.arena_size = bytes;
        self
    }

    /// The registry whose global maximum this heap's pools count against (default
    /// [`Registry::global`]). Heaps sharing a registry have separate limits.
    pub fn registry(mut self, registry: Arc<Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Whether released buffers are zeroed by a background worker (default `true`) or
    /// synchronously by the thread that releases them (`false`).
    pub fn deferred(mut self, on: bool) -> Self {
        self.deferred = on;
        self
    }

    /// The most memory, in bytes, queued for the worker at once (default 64 MiB). A release
    /// that would pass it is zeroed by the releasing thread instead.
    pub fn queue_limit(mut self, bytes: usize) -> Self {
        self.queue_limit = bytes;
        self
    }

    /// The pressure monitor: `Some(config)` (the default, with [`PressureConfig::default`])
    /// makes sure the heap's registry has one running, where this machine offers a source;
    /// `None` starts none (one started by another heap on the same registry keeps running).
    pub fn pressure(mut self, config: Option<PressureConfig>) -> Self {
        self.pressure = config;
        self
    }

    /// How long the idle worker polls for work before it sleeps (default 200 us; zero sleeps at
    /// once). Polling avoids a wake-up per release when releases come often; it costs up to
    /// this much CPU time, at nice 19, after each burst of work.
    pub fn worker_spin(mut self, d: std::time::Duration) -> Self {
        self.worker_spin = d;
        self
    }

    /// How long the idle worker, after its spin, keeps taking short naps and looking for work
    /// when it wakes, before it sleeps until a release wakes it (default 100 ms; zero sleeps at
    /// once). While it naps, releases cost no wake-up (8-10 us of the releasing thread's time
    /// measured in this project's VMs); each nap costs the worker a timer wake-up (about 20 in
    /// the first 2 ms of idleness, a few more after that).
    pub fn worker_naps(mut self, d: std::time::Duration) -> Self {
        self.worker_naps = d;
        self
    }

    /// How many bytes of released small buffers each thread keeps for its own next
    /// allocations (default 64 KiB; 0, or less than four pages, turns thread caches off).
    /// Buffers of up to a quarter of this (16 KiB by default) made of 4 KiB blocks are cached
    /// still dirty, and zeroed by the allocating thread when taken again: for them, zeroing
    /// costs less than any trip through the shared pools or the worker. A thread's cache is
    /// emptied into the heap when the thread exits (by its thread-local destructors: after
    /// `JoinHandle::join` returns, but possibly after a `std::thread::scope` ends), and at its
    /// next use of the heap after [`SystemHeap::shrink`], [`SystemHeap::trim`],
    /// [`SystemHeap::flush`] or the heap's drop, which empty the calling thread's cache at once.
    ///
    /// # Examples
    /// ```
    /// let heap = pagepool::SystemHeap::builder().thread_cache(0).build().unwrap();
    /// drop(heap.alloc(4096).unwrap());
    /// assert_eq!(heap.stats().thread_cached_pages, 0, "no cache: queued for the worker");
    /// let cached = pagepool::SystemHeap::new().unwrap();
    /// drop(cached.alloc(4096).unwrap());
    /// assert_eq!(cached.stats().thread_cached_pages, 1);
    /// ```
    pub fn thread_cache(mut self, bytes: usize) -> Self {
        self.thread_cache = bytes;
        self
    }

    /// Checks the configuration and creates the heap. No memory is taken from the system yet.
    pub fn build(self) -> Result<SystemHeap, ConfigError> {
        let page = os::page_size();
        let mut orders = self.orders.clone();
        orders.sort_unstable_by(|a, b| b.cmp(a));
        if orders.is_empty() {
            return Err(ConfigError::NoOrders);
        }
        if let Some(w) = orders.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::DuplicateOrder(w[0]));
        }
        if orders[0] > MAX_ORDER {
            return Err(ConfigError::OrderTooLarge {
                order: orders[0],
                max: MAX_ORDER,
            });
        }
        if orders.last() != Some(&0) {
            return Err(ConfigError::MissingOrderZero);
        }
        if self.max_buffer == 0 {
            return Err(ConfigError::ZeroMaxBuffer);
        }
        // Round to pages; keep lengths well inside `isize` so page rounding cannot overflow.
        let max_buffer = self.max_buffer.min(isize::MAX as usize / 2);
        let arena_size = self.arena_size.div_ceil(page).saturating_mul(page);
        let largest = page << orders[0];
        if arena_size < largest {
            return Err(ConfigError::ArenaTooSmall {
                arena: self.arena_size,
                block: largest,
            });
        }
        let registry = match self.registry {
            Some(r) => r,
            #[cfg(not(loom))]
            None => Registry::global().clone(),
            #[cfg(loom)]
            None => Registry::new(usize::MAX),
        };
        // Read the cache size now (sysfs), not on the first release.
        crate::zero::streaming_threshold();
        let config = Config {
            name: self.name,
            orders,
            page,
            max_buffer,
            arena_size,
            registry,
            deferred: self.deferred,
            queue_limit: self.queue_limit,
            worker_spin: self.worker_spin,
            worker_naps: self.worker_naps,
            thread_cache: self.thread_cache,
            pressure: self.pressure,
        };
        let core = Core::start(&config, self.pool_limit / page);
        Ok(SystemHeap {
            config,
            core: ForkCell::new(core),
        })
    }
}

/// A checked configuration: what a heap is built from, and rebuilt from in a forked child.
struct Config {
    name: String,
    /// Descending.
    orders: Vec<u8>,
    page: usize,
    max_buffer: usize,
    arena_size: usize,
    registry: Arc<Registry>,
    deferred: bool,
    queue_limit: usize,
    worker_spin: std::time::Duration,
    worker_naps: std::time::Duration,
    thread_cache: usize,
    pressure: Option<PressureConfig>,
}

/// A heap's state in one process: its internals and its worker. A forked child builds a new
/// one on its first use of the heap (see [`crate::fork`]).
struct Core {
    inner: Arc<HeapInner>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Core {
    /// Registers an owner with a limit of `limit_pages`, makes the pools, the queue and the
    /// worker. No memory is taken from the system yet.
    fn start(cfg: &Config, limit_pages: usize) -> Core {
        let page = cfg.page;
        let registry = &cfg.registry;
        let owner = registry.register(&cfg.name, limit_pages);
        let arenas = std::sync::Arc::new(Arenas::new(
            &format!("pagepool:{}", cfg.name),
            cfg.arena_size,
        ));
        let pools = cfg
            .orders
            .iter()
            .map(|&order| {
                let arenas = arenas.clone();
                owner.add_pool(
                    order,
                    Box::new(move |b: Block| arenas.release(b.into_raw(), page << order)),
                )
            })
            .collect();
        let freelist = cfg.deferred.then(|| {
            let arenas = arenas.clone();
            let list = Arc::new(Freelist::new(
                page,
                cfg.queue_limit / page,
                Box::new(move |r: Run| arenas.release(r.ptr(), r.pages() * page)),
            ));
            list.set_worker_spin(cfg.worker_spin);
            list.set_worker_naps(cfg.worker_naps);
            let weak: std::sync::Weak<dyn Shrinker> = Arc::downgrade(&list) as _;
            registry.add_shrinker(weak);
            list
        });
        if let Some(pc) = &cfg.pressure {
            registry.start_monitor(pc.clone());
        }
        let inner = Arc::new(HeapInner {
            pools,
            orders: cfg.orders.clone(),
            page,
            page_shift: page.trailing_zeros(),
            max_buffer: cfg.max_buffer,
            generation: crate::fork::generation(),
            owner,
            arenas,
            freelist,
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            no_worker: crate::sync::AtomicBool::new(false),
            scattered: AtomicUsize::new(0),
            regather_after: AtomicUsize::new(REGATHER_FIRST),
            cache: CacheShared::new(cfg.thread_cache, page),
        });
        let worker = match &inner.freelist {
            Some(_) => {
                let h = inner.clone();
                let spawned = std::thread::Builder::new()
                    .name("pagepool-free".into())
                    .spawn(move || h.work());
                match spawned {
                    Ok(w) => Some(w),
                    Err(e) => {
                        // No thread: release synchronously rather than queue for nobody.
                        log::warn!("pagepool: cannot start the free worker ({e}); zeroing inline");
                        if let Some(list) = &inner.freelist {
                            list.stop();
                        }
                        None
                    }
                }
            }
            None => None,
        };
        Core { inner, worker }
    }
}

impl Drop for Core {
    /// Stops the worker, gives queued and pooled memory back to the system, and waits for the
    /// worker to finish its last claim. Live buffers stay valid; when dropped later, their
    /// memory goes straight back to the system.
    fn drop(&mut self) {
        let h = &self.inner;
        h.closed.store(true, Ordering::Relaxed);
        cache::forget_mine(h);
        if let Some(list) = &h.freelist {
            for r in list.stop() {
                h.release_run(&r);
            }
        }
        if let Some(w) = self.worker.take()
            && w.join().is_err()
        {
            log::error!("pagepool: the free worker panicked");
        }
        cache::empty_all(h);
        h.owner.scan(usize::MAX);
    }
}

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
    pub(crate) waited: AtomicU64,
    pub(crate) helped: AtomicU64,
    /// Runs an allocation gave up on, waiting for the worker (see `zero_stolen`).
    pub(crate) abandoned: AtomicU64,
    pub(crate) exported: AtomicU64,
    pub(crate) exports_held: AtomicU64,
    pub(crate) peak_pooled: AtomicUsize,
    pub(crate) worker: WorkerCounters,
}

/// The worker's counters, on a cache line of their own.
#[derive(Default)]
#[repr(align(128))]
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
    page_shift: u32,
    max_buffer: usize,
    /// The fork generation this heap state belongs to (see [`crate::fork`]).
    pub(crate) generation: u64,
    pub(crate) owner: Arc<Owner>,
    pub(crate) arenas: Arc<Arenas>,
    /// The deferred-free queue; `None` when releases zero synchronously.
    pub(crate) freelist: Option<Arc<Freelist>>,
    /// Set when the `SystemHeap` handle is dropped: buffers released later go straight back.
    pub(crate) closed: AtomicBool,
    pub(crate) counters: Counters,
    /// Never set: the worker-locking flag of a heap without a worker (see
    /// `sync::lock_within`).
    no_worker: crate::sync::AtomicBool,
    /// Allocations in a row whose pooled blocks did not lie end to end (each needed a view),
    /// and how many of those make the next one take fresh pages instead (see
    /// `alloc_blocks`).
    scattered: AtomicUsize,
    regather_after: AtomicUsize,
    /// The per-thread caches of small buffers.
    pub(crate) cache: CacheShared,
}

impl HeapInner {
    #[inline]
    pub(crate) fn pooling(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && self.owner.limit_pages() > 0
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
        let within = |a: usize, r: &Run| a >= r.start && a < r.end(page);
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
                let res = if stolen.iter().any(|s| within(a, s)) {
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
    /// The caller owns the run's blocks exclusively (no buffer, pool or claim refers to them).
    #[inline]
    pub(crate) unsafe fn zero_run(&self, r: &Run, buffer_pages: usize) {
        let streaming = buffer_pages * self.page > crate::zero::streaming_threshold();
        // SAFETY: the run is a used arena range, mapped at its home address, owned by the caller.
        unsafe { crate::zero::zero(r.ptr(), r.pages() * self.page, streaming) };
    }

    /// Zeroes `len` bytes at `off` into a job's run.
    ///
    /// # Safety
    /// The caller has taken that stripe of the job (see [`Job::next_stripe`]).
    unsafe fn zero_part(&self, job: &Job, off: usize, len: usize) {
        let streaming = job.buffer_pages() * self.page > crate::zero::streaming_threshold();
        // SAFETY: the stripe is inside the job's run, a used arena range owned by the caller
        // for the stripe's duration.
        unsafe { crate::zero::zero(job.run().ptr().add(off), len, streaming) };
    }

    /// The worker's [`zero_part`](Self::zero_part): a stripe at a time, renewing its promise
    /// after each, so that whoever waits for it sees it making progress (see
    /// `Freelist::wait_worker`).
    ///
    /// # Safety
    /// As for `zero_part`.
    unsafe fn zero_part_working(&self, list: &Freelist, job: &Job, off: usize, len: usize) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(STRIPE_BYTES);
            // SAFETY: a sub-range of the piece the caller was handed.
            unsafe { self.zero_part(job, off + done, n) };
            list.promise(std::time::Duration::ZERO);
            done += n;
        }
    }

    /// Zeroes a run an allocation took from the queue; a large one is shared with the idle
    /// worker, stripe by stripe, so that two cores zero it. Returns false if the worker did not
    /// finish its stripe within [`HANDOFF_WAIT`]: the run is then the worker's to land, and
    /// the caller must do without it.
    ///
    /// # Safety
    /// The caller owns the run (it left the queue).
    unsafe fn zero_stolen(&self, list: &Freelist, r: &Run, buffer_pages: usize) -> bool {
        if r.pages() * self.page < 2 * STRIPE_BYTES {
            // SAFETY: forwarded.
            unsafe { self.zero_run(r, buffer_pages) };
            return true;
        }
        let job = Arc::new(Job::new(*r, buffer_pages, self.page));
        let shared = list.share(Some(job.clone()));
        while let Some((off, len)) = job.next_stripe(self.page) {
            // SAFETY: the stripe is in the run, owned by this thread.
            unsafe { self.zero_part(&job, off, len) };
            let landed_by_me = job.finish(len);
            debug_assert!(!landed_by_me, "only this thread abandons this run");
        }
        let done = list.wait_worker(|| job.complete());
        if shared {
            list.share(None);
        }
        if done {
            return true;
        }
        // The worker holds a stripe and is not running: it lands the run when it finishes.
        list.adopt(r);
        if job.abandon() {
            self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        list.disown(r); // it finished just now after all
        true
    }

    /// Lands a claimed (or adopted) run that is now zeroed: into the pools, and the claim
    /// counts as landed.
    fn land(&self, list: &Freelist, run: &Run) {
        let _locking = list.locking();
        self.counters
            .worker
            .zeroed
            .fetch_add(run.count as u64, Ordering::Relaxed);
        self.give_runs(std::slice::from_ref(run));
        list.landed(run);
    }

    /// Releases a dropped buffer's runs: queued for the worker, else zeroed here and pooled,
    /// else (not pooling) straight back to the system.
    pub(crate) fn release_buffer(&self, runs: Runs) {
        if !self.pooling() {
            runs.iter().for_each(|r| self.release_run(r));
            return;
        }
        let runs = match &self.freelist {
            Some(list) => match list.queue(runs) {
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

    /// The worker: claims queued runs, zeroes them, gives them to the pools, until stopped.
    fn work(&self) {
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
            log::debug!("pagepool: cannot lower the free worker's priority: {e}");
        }
        // Naps end within a few microseconds of their time, not the default 50 us late: the
        // worker naps through idle spells and must be awake when the next release comes.
        // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects this thread only.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 5_000 as libc::c_ulong) };
        let Some(list) = &self.freelist else { return };
        while let Some(work) = list.next_work() {
            let job = match work {
                Work::Claim(job) => job,
                Work::Assist => {
                    let t = std::time::Instant::now();
                    let mut mine = 0;
                    list.assist(
                        |job, off, len| {
                            // SAFETY: `assist` handed the worker this stripe of the shared run.
                            unsafe { self.zero_part_working(list, job, off, len) };
                            mine += len;
                        },
                        // The allocation gave up on its run: it is the worker's to land.
                        |job| {
                            let _locking = list.locking();
                            let run = job.run();
                            self.counters
                                .worker
                                .zeroed
                                .fetch_add(run.count as u64, Ordering::Relaxed);
                            self.give_runs(std::slice::from_ref(&run));
                            list.landed_adopted(&run);
                        },
                    );
                    self.count_worker(mine, t.elapsed());
                    continue;
                }
            };
            let t = std::time::Instant::now();
            // Zero the claim a piece at a time; an allocation waiting for it may take pieces
            // too (`next_work` published the job with the claim).
            let run = job.run();
            let mut mine = 0;
            while let Some((off, len)) = job.next_worker_piece(self.page) {
                // SAFETY: the stripe lies in the claimed run, which belongs to the worker (and to
                // helpers, one piece each) until it lands.
                unsafe { self.zero_part_working(list, &job, off, len) };
                let landed_by_me = job.finish(len);
                debug_assert!(!landed_by_me, "nobody abandons the worker's claim");
                mine += len;
            }
            // The worker's own zeroing ends here; what follows is waiting for helpers: briefly
            // spinning, then yielding the core (a helper is an allocation, at normal priority;
            // nothing waits for the worker meanwhile for long, see `HANDOFF_WAIT`).
            self.count_worker(mine, t.elapsed());
            while !job.wait_complete() {
                std::thread::yield_now();
            }
            self.land(list, &run);
        }
    }

    /// Adds `bytes` zeroed by the worker itself in `took` to its throughput counters.
    fn count_worker(&self, bytes: usize, took: std::time::Duration) {
        let w = &self.counters.worker;
        w.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        w.nanos.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Takes up to `want` clean blocks of pool `i` for an allocation, appending them to `runs`:
    /// from the pool; then queued dirty blocks, zeroed here; then, while the worker is zeroing
    /// blocks of this order, waiting for them. Returns (from pool, zeroed inline).
    fn take_clean(
        &self,
        i: usize,
        want: usize,
        buffer_pages: usize,
        runs: &mut Runs,
        stolen_runs: &mut Runs,
    ) -> (usize, usize) {
        let order = self.orders[i];
        let pool = &self.pools[i];
        let worker_locking = self
            .freelist
            .as_ref()
            .map_or(&self.no_worker, |l| l.worker_locking());
        let take_pooled = |runs: &mut Runs, n: usize| {
            pool.take_many_within(n, HANDOFF_WAIT, worker_locking, |b| {
                runs.push(Run::from_block(b))
            })
        };
        // A buffer of several blocks takes pooled blocks at once only if they lie end to end;
        // otherwise queued ones first, when there are any: a released set, part of it landed
        // in the pool and part still queued, is then taken whole rather than beside other
        // pooled blocks (which would scatter it; see `alloc_blocks`).
        let mut pooled = if want > 1 && self.freelist.is_some() {
            pool.take_run_within(want, HANDOFF_WAIT, worker_locking, |b| {
                runs.push(Run::from_block(b))
            })
        } else {
            take_pooled(runs, want)
        };
        let mut inline = 0;
        if let Some(list) = &self.freelist {
            // At most one bounded wait for the worker per order: past it, fresh pages.
            let mut waited = false;
            while pooled + inline < want {
                // A chunk at a time, so that the worker keeps claiming from the other end.
                let chunk = (CHUNK_PAGES >> order).max(1);
                let need = want - pooled - inline;
                let stolen = list.steal(order, need.min(chunk), need);
                if !stolen.is_empty() {
                    for r in stolen {
                        // SAFETY: stolen runs left the queue; this thread owns them now.
                        if unsafe { self.zero_stolen(list, &r, buffer_pages) } {
                            inline += r.count;
                            runs.push(r);
                            stolen_runs.push(r);
                        }
                    }
                    continue;
                }
                // Nothing of this order is queued: what the worker claimed has either landed
                // in the pool already or is being zeroed now.
                let in_flight = list.in_flight(order);
                if in_flight == 0 || waited {
                    pooled += take_pooled(runs, want - pooled - inline);
                    break;
                }
                // Some of this order's blocks are in the worker's hands: the pool's blocks now
                // only if the rest lie end to end there (else the claim, once landed, would be
                // left out of the set it belongs to).
                pooled += if want > 1 {
                    pool.take_run_within(
                        want - pooled - inline,
                        HANDOFF_WAIT,
                        worker_locking,
                        |b| runs.push(Run::from_block(b)),
                    )
                } else {
                    take_pooled(runs, want - pooled - inline)
                };
                if pooled + inline == want {
                    break;
                }
                // Help the worker zero what it claimed, then wait (briefly) for it to land.
                let helped = list.help(order, |job, off, len| {
                    // SAFETY: `help` handed this thread the stripe.
                    unsafe { self.zero_part(job, off, len) }
                });
                if helped {
                    self.counters.helped.fetch_add(1, Ordering::Relaxed);
                }
                if list.wait_landed() {
                    self.counters.waited.fetch_add(1, Ordering::Relaxed);
                }
                waited = true;
                pooled += take_pooled(runs, want - pooled - inline);
            }
        }
        (pooled, inline)
    }

    fn pool_index(&self, order: u8) -> usize {
        self.orders.iter().position(|&o| o == order).unwrap_or(0)
    }
}

/// True if an allocation's blocks, as gathered (`missing`: the placeholders for blocks still to
/// come fresh, as one range), need a view: more than one piece once blocks that lie end to end
/// are joined.
fn scattered(runs: &[Run], missing: &[usize], page: usize) -> bool {
    let mut have: smallvec::SmallVec<[(usize, usize); 8]> = runs
        .iter()
        .enumerate()
        .filter(|(i, _)| !missing.contains(i))
        .map(|(_, r)| (r.start, r.end(page)))
        .collect();
    have.sort_unstable();
    let pieces = 1 + have.windows(2).filter(|w| w[0].1 != w[1].0).count();
    pieces + usize::from(!missing.is_empty()) > 1
}

/// A heap of zeroed, page-aligned, contiguous buffers, built from pooled blocks.
///
/// Dropping a [`Buffer`] queues it; the heap's worker zeroes its blocks and gives them to the
/// pools, and the next allocation of a similar size takes them back with no system call and no
/// zeroing. Dropping the heap stops the worker and gives all queued and pooled memory back to
/// the system; buffers still alive stay valid, and their memory goes straight back to the
/// system when they are dropped.
///
/// # Fork
/// A heap's memory is not inherited by a forked child (like RDMA and DMA memory): its mappings
/// are `MADV_DONTFORK`, and a child that touches a [`Buffer`] inherited from its parent gets
/// `SIGSEGV`. The heap itself keeps working in the child: its first use there (any method)
/// starts it afresh, with empty pools, caches and queue, new arenas and a worker of its own,
/// without taking any lock that another thread of the parent may have held when it forked. The
/// inherited state is never freed or locked in the child, so dropping an inherited buffer, or
/// the heap, has no effect on the parent, and nothing the child does is visible to the parent.
///
/// # A busy machine
/// The worker runs at nice 19. No allocation waits for it more than a small fixed bound
/// (50 us): past that it takes other memory and leaves the worker's work to the worker; and
/// while the scheduler does not run the worker, releases zero their buffers themselves. Under
/// full CPU load the heap then behaves like a synchronous one ([`HeapBuilder::deferred`]).
///
/// # Examples
/// ```
/// use pagepool::SystemHeap;
///
/// let heap = SystemHeap::new().unwrap();
/// let mut buf = heap.alloc(1 << 20).unwrap();
/// assert!(buf.iter().all(|&b| b == 0));
/// buf[..5].copy_from_slice(b"hello");
/// drop(buf); // queued for the worker
/// heap.flush(); // wait until it is zeroed and pooled
/// let again = heap.alloc(1 << 20).unwrap();
/// assert!(again.iter().all(|&b| b == 0));
/// assert_eq!(heap.stats().hits, 1);
/// ```
pub struct SystemHeap {
    config: Config,
    core: ForkCell<Core>,
}

impl SystemHeap {
    /// A heap with the default configuration (see [`HeapBuilder`]), registered with
    /// [`Registry::global`].
    ///
    /// Besides its worker thread (`pagepool-free`, started here), a default heap makes
    /// sure the global registry's pressure monitor runs: one process-wide thread
    /// (`pagepool-pressure`) that shrinks the pools when the kernel reports memory pressure
    /// (PSI) or the cgroup nears its limit. A program that does not want that thread builds its
    /// heaps with [`HeapBuilder::pressure`]`(None)`.
    pub fn new() -> Result<SystemHeap, ConfigError> {
        HeapBuilder::default().build()
    }

    /// A builder for a heap with its own configuration.
    pub fn builder() -> HeapBuilder {
        HeapBuilder::default()
    }

    /// Allocates a zeroed buffer of `len` bytes, rounded up to whole pages.
    ///
    /// Blocks of the configured orders are used largest first, each from its pool if the pool
    /// has one, else from the system. Fails with a clear error, and leaks nothing, on a zero
    /// length, a length over the maximum, or when the system refuses memory or mappings.
    #[inline]
    pub fn alloc(&self, len: usize) -> Result<Buffer, AllocError> {
        let h = self.inner();
        if len == 0 || len > h.max_buffer {
            return Err(self.refuse(len));
        }
        // Pages are a power of two: shifts, not divisions, on the hot path.
        let pages = (len + h.page - 1) >> h.page_shift;
        let bytes = pages << h.page_shift;
        if pages <= h.cache.max_buffer_pages
            && let Some((run, heap)) = cache::take(h, pages)
        {
            return Ok(Buffer::from_cache(heap, run, bytes));
        }
        self.alloc_blocks(pages, bytes)
    }

    /// This process's state of the heap: built afresh on the first use in a forked child.
    #[inline]
    fn core(&self) -> &Core {
        self.core
            .get(|old| Core::start(&self.config, old.inner.owner.limit_pages()))
    }

    #[inline]
    fn inner(&self) -> &Arc<HeapInner> {
        &self.core().inner
    }

    /// Why `len` is refused.
    #[cold]
    fn refuse(&self, len: usize) -> AllocError {
        if len == 0 {
            AllocError::ZeroLength
        } else {
            AllocError::TooLarge {
                len,
                max: self.config.max_buffer,
            }
        }
    }

    /// The allocation a thread cache could not serve: blocks from the pools, the queue or the
    /// system. Kept out of line so that the cached path does not pay for its stack frame.
    #[inline(never)]
    fn alloc_blocks(&self, pages: usize, bytes: usize) -> Result<Buffer, AllocError> {
        let h = self.inner();
        // Largest blocks first. Each order's blocks are sorted by address and runs of blocks
        // that lie end to end merged, so the bookkeeping grows with the number of separate
        // pieces, not with the buffer's size, and blocks freed together come back together.
        let mut runs = Runs::new();
        let mut stolen = Runs::new(); // queued blocks zeroed here (for `undo_alloc`)
        let mut missing: Vec<usize> = Vec::new(); // indices of placeholder runs
        let (mut hits, mut inline) = (0, 0);
        let mut left = pages;
        for i in 0..h.orders.len() {
            let order = h.orders[i];
            let want = left >> order;
            left &= (1 << order) - 1;
            if want == 0 {
                continue;
            }
            let first = runs.len();
            let (mut p, mut z) = h.take_clean(i, want, pages, &mut runs, &mut stolen);
            let busy = h.freelist.as_ref().is_some_and(|l| l.busy());
            if p + z > 0 && p + z < want && !busy {
                // Blocks of one order gathered from the pools or the queue, with fresh ones
                // beside them, would need a view; and as they circulate, so would every later
                // buffer of this size: a single block short (the worker had not landed it in
                // time) would scatter the set for good. So this order's blocks are all taken
                // fresh, as one range, and what was gathered goes back to the pools, clean.
                // Not on a busy machine (fresh pages cost most there): only what is missing.
                h.undo_alloc(&runs[first..], &stolen, None);
                stolen.retain(|r| r.order != order);
                runs.truncate(first);
                (p, z) = (0, 0);
            }
            (hits, inline) = (hits + p, inline + z);
            runs[first..].sort_unstable_by_key(|r| r.start);
            if p + z < want {
                missing.push(runs.len());
                runs.push(Run {
                    start: 0,
                    order,
                    count: want - p - z,
                });
            }
        }
        // Blocks gathered from the pools that do not lie end to end need a view, and as they
        // circulate, so do later buffers of the same size: with a worker, whose claims land
        // while allocations take what is queued, two threads that share a pool can keep a set
        // scattered for good (each takes what the other left; without a worker the pools'
        // choice of blocks keeps sets whole, see `PagePool::take_many`). After
        // REGATHER_FIRST such allocations in a row, one takes fresh pages as one range and
        // leaves the blocks it gathered to others; if scattering goes on anyway (a mix of sizes
        // that no fresh set helps), the count before the next one doubles, up to
        // REGATHER_LONGEST, so that fresh pages never cost more than a small share of the
        // views they save.
        if h.freelist.is_some()
            && h.pooling()
            && hits + inline > 0
            && scattered(&runs, &missing, h.page)
        {
            let streak = h.scattered.fetch_add(1, Ordering::Relaxed) + 1;
            let after = h.regather_after.load(Ordering::Relaxed);
            if streak >= after {
                h.scattered.store(0, Ordering::Relaxed);
                h.regather_after
                    .store((after * 2).min(REGATHER_LONGEST), Ordering::Relaxed);
                let gathered: Runs = runs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !missing.contains(i))
                    .map(|(_, r)| *r)
                    .collect();
                h.undo_alloc(&gathered, &stolen, None);
                stolen.clear();
                runs.clear();
                missing.clear();
                (hits, inline) = (0, 0);
                let mut left = pages;
                for &order in h.orders.iter() {
                    let count = left >> order;
                    left &= (1 << order) - 1;
                    if count > 0 {
                        missing.push(runs.len());
                        runs.push(Run {
                            start: 0,
                            order,
                            count,
                        });
                    }
                }
            }
        } else if runs.len() > 1 && h.scattered.load(Ordering::Relaxed) > 0 {
            h.scattered.store(0, Ordering::Relaxed);
            h.regather_after.store(REGATHER_FIRST, Ordering::Relaxed);
        }
        // The misses come from the system as one range, split in order.
        let misses: usize = missing.iter().map(|&i| runs[i].count).sum();
        let mut fresh = None;
        if !missing.is_empty() {
            let bytes: usize = missing.iter().map(|&i| runs[i].pages() * h.page).sum();
            match h.arenas.carve(bytes) {
                Ok(p) => {
                    let mut at = p.as_ptr() as usize;
                    fresh = Some((at, bytes));
                    for &i in &missing {
                        runs[i].start = at;
                        at += runs[i].pages() * h.page;
                    }
                }
                Err(e) => {
                    for &i in missing.iter().rev() {
                        runs.remove(i);
                    }
                    h.undo_alloc(&runs, &stolen, None);
                    return Err(e.into());
                }
            }
        }
        let page = h.page;
        runs.dedup_by(|next, prev| {
            let joined = prev.order == next.order && prev.end(page) == next.start;
            if joined {
                prev.count += next.count;
            }
            joined
        });
        match Buffer::assemble(h.clone(), runs, bytes) {
            Ok(buf) => {
                // Counted only now: a failed allocation leaves every counter as it was.
                let counters = &h.counters;
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
                Ok(buf)
            }
            Err((e, runs)) => {
                h.undo_alloc(&runs, &stolen, fresh);
                Err(e)
            }
        }
    }

    /// A snapshot of the heap's statistics.
    pub fn stats(&self) -> HeapStats {
        let h = self.inner();
        let c = &h.counters;
        // Racing allocations may make these a little off; never negative.
        let cached = h.cache.totals();
        let frees = c.frees.load(Ordering::Relaxed).wrapping_add(cached.frees);
        let remapped = c.remapped.load(Ordering::Relaxed);
        let allocs = c.allocs.load(Ordering::Relaxed).wrapping_add(cached.allocs);
        let live_pages = (c.live_pages.load(Ordering::Relaxed) as i64)
            .wrapping_add(cached.live_pages)
            .max(0) as u64;
        let owner = h.owner.stats();
        let registry = h.owner.registry();
        let total = registry.count();
        HeapStats {
            page_size: h.page,
            registry_max_pages: registry.max_pages(),
            registry_total_pages: total,
            other_owners_pages: total.saturating_sub(owner.pages),
            peak_pooled_pages: c.peak_pooled.load(Ordering::Relaxed),
            allocs,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            fresh_pages: h.arenas.fresh_pages.load(Ordering::Relaxed),
            released_pages: h.arenas.released_pages.load(Ordering::Relaxed),
            live_buffers: allocs.saturating_sub(frees),
            live_pages,
            cache_hits: cached.allocs,
            thread_cached_pages: cached.cached_pages,
            contiguous: allocs.saturating_sub(remapped),
            remapped,
            zeroed_sync: c.zeroed_sync.load(Ordering::Relaxed),
            zeroed_worker: c.worker.zeroed.load(Ordering::Relaxed),
            zeroed_inline: c
                .zeroed_inline
                .load(Ordering::Relaxed)
                .wrapping_add(cached.zeroed_pages),
            waited_for_worker: c.waited.load(Ordering::Relaxed),
            helped_worker: c.helped.load(Ordering::Relaxed),
            abandoned_to_worker: c.abandoned.load(Ordering::Relaxed),
            queue_refused: h.freelist.as_ref().map_or(0, |l| l.refused()),
            exported: c.exported.load(Ordering::Relaxed),
            exports_held_at_release: c.exports_held.load(Ordering::Relaxed),
            worker_bytes: c.worker.bytes.load(Ordering::Relaxed),
            worker_nanos: c.worker.nanos.load(Ordering::Relaxed),
            queued_pages: h.freelist.as_ref().map_or(0, |l| l.pending_pages()),
            peak_queued_pages: h.freelist.as_ref().map_or(0, |l| l.peak_pages()),
            queue_limit_pages: h.freelist.as_ref().map_or(0, |l| l.max_pages()),
            pressure_freed_pages: h.freelist.as_ref().map_or(0, |l| l.pressure_pages()),
            pressure: registry.pressure_stats(),
            arenas: h.arenas.count(),
            owner,
        }
    }

    /// Gives about `nr_pages` pooled pages back to the system (whole blocks, round robin over
    /// this heap's pools); returns the pages freed. The calling thread's cache of small buffers
    /// is emptied into the heap first, and other threads are asked to empty theirs.
    pub fn shrink(&self, nr_pages: usize) -> usize {
        let h = self.inner();
        cache::empty_all(h);
        h.owner.scan(nr_pages)
    }

    /// Gives every pooled page back to the system; returns the pages freed. Buffers still
    /// queued for the worker are not touched: [`flush`](Self::flush) first to include them.
    pub fn trim(&self) -> usize {
        self.shrink(usize::MAX)
    }

    /// Waits until every released buffer has been zeroed and pooled by the worker (returns at
    /// once when releases are synchronous). The calling thread's cache of small buffers is
    /// emptied into the heap first, and other threads are asked to empty theirs.
    pub fn flush(&self) {
        let h = self.inner();
        cache::empty_all(h);
        if let Some(list) = &h.freelist {
            list.flush();
        }
    }

    /// This heap's owner entry in its registry (its limit can be changed there).
    pub fn owner(&self) -> &Arc<Owner> {
        &self.inner().owner
    }

    /// The block orders, largest first.
    pub fn orders(&self) -> &[u8] {
        &self.config.orders
    }
}

impl fmt::Debug for SystemHeap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = self.inner();
        f.debug_struct("SystemHeap")
            .field("name", &h.owner.name())
            .field("orders", &h.orders)
            .field("pooled_pages", &h.owner.count())
            .finish_non_exhaustive()
    }
}
