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
//! zeroing (measured: docs/DESIGN.md, Small buffers). See the `cache` module for the bounds and
//! how caches are emptied.
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
//!   With the load check ([`HeapBuilder::load_check`]) a hold starts only while more threads
//!   want to run than the machine has CPUs, and lasts while they do: a worker late on a
//!   machine with idle cores was held up by a passing stall, and releases keep queueing.
//! - allocations keep released sets of blocks whole: one that needs several blocks of an order
//!   takes pooled ones only if they lie end to end, else a queued set first; the pools hand a
//!   single block out of the shortest run they hold; and after a few allocations in a row that
//!   needed a view anyway, one takes fresh pages as one range (see `alloc_blocks`).
//!
//! So under full CPU load a deferred heap behaves like a synchronous one; `heap-bench --mode
//! loaded --switches --systems pagepool,pagepool-sync` measures both side by side.

//! ## Mapping count bound
//! pagepool's share of `/proc/self/maps` is at most `2A + Σ r(b)`: two mappings per arena (the
//! arena and the guard page after it, `A` arenas), plus, for each live buffer `b` that needed a
//! view, one mapping per run of blocks lying end to end (`r(b)`, at most the buffer's block
//! count: `len / 1 MiB + 30` with the default orders). Views are unmapped when their buffer is
//! dropped, and pooled blocks cost no mapping of their own, so the count depends only on the
//! arenas and the live buffers, never on the allocation history. Arenas are created only when no
//! arena has a large enough unused range, and unmapped as soon as nothing in them is used.
//! `tests/mappings.rs` checks the bound throughout 100,000 mixed-size allocations.

pub(crate) mod buffer;
mod builder;
mod cache;
mod cache_slots;
pub(crate) mod core;
mod gather;
pub(crate) mod handoff;
pub(crate) mod job;
mod stats;
mod worker;

use std::fmt;

pub use self::buffer::{BlockInfo, Buffer};
use self::builder::Config;
pub use self::builder::HeapBuilder;
use self::cache_slots::CacheShared;
use self::core::{Counters, HeapInner};
use self::gather::{Gathered, Streak};
use self::handoff::Handoff;
use self::job::{Run, Runs};
use crate::arena::Arenas;
use crate::error::{AllocError, ConfigError};
use crate::fork::ForkCell;
use crate::pool::Block;
use crate::registry::Owner;
use crate::shrinker::Shrinker;
use crate::stats::HeapStats;
use crate::sync::{Arc, AtomicBool, Ordering};

impl HeapBuilder {
    /// Checks the configuration and creates the heap. No memory is taken from the system yet.
    pub fn build(self) -> Result<SystemHeap, ConfigError> {
        let (config, limit_pages) = self.check()?;
        let core = Core::start(&config, limit_pages);
        Ok(SystemHeap {
            config,
            core: ForkCell::new(core),
        })
    }
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
        let owner = registry.register_typed(&cfg.name, &cfg.pool_type.name(), limit_pages);
        // A huge type's backing is what the system offers when (and where: a forked child
        // looks again) the heap starts.
        let huge = cfg
            .pool_type
            .is_huge()
            .then(crate::attrs::probe_huge_backing);
        let arenas = std::sync::Arc::new(Arenas::typed(
            &format!("pagepool:{}", cfg.name),
            cfg.arena_size,
            cfg.pool_type,
            huge,
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
        let handoff = cfg.deferred.then(|| {
            let arenas = arenas.clone();
            let handoff = Arc::new(Handoff::new(
                page,
                cfg.queue_limit / page,
                // Under pressure (or at stop), queued runs go back to the system unzeroed; the
                // worker lands the others itself (claims, not whole items).
                Box::new(move |runs: Runs, _| {
                    for r in runs {
                        arenas.release(r.ptr(), r.pages() * page)
                    }
                }),
                cfg.load_check,
            ));
            handoff.queue().set_worker_spin(cfg.worker_spin);
            handoff.queue().set_worker_naps(cfg.worker_naps);
            let weak: std::sync::Weak<dyn Shrinker> = Arc::downgrade(&handoff) as _;
            registry.add_shrinker(weak);
            handoff
        });
        if let Some(pc) = &cfg.pressure {
            registry.start_monitor(pc.clone());
        }
        let inner = Arc::new(HeapInner {
            pools,
            orders: cfg.orders.clone(),
            page,
            page_shift: page.trailing_zeros(),
            granule: 1 << cfg.orders.last().copied().unwrap_or(0),
            max_buffer: cfg.max_buffer,
            generation: crate::fork::generation(),
            owner,
            arenas,
            handoff,
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            no_worker: crate::sync::AtomicBool::new(false),
            streak: Streak::new(),
            cache: CacheShared::new(cfg.thread_cache, page),
        });
        let worker = match &inner.handoff {
            Some(_) => {
                match worker::spawn(&inner) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        // No thread: release synchronously rather than queue for nobody.
                        log::warn!("pagepool: cannot start the free worker ({e}); zeroing inline");
                        if let Some(handoff) = &inner.handoff {
                            handoff.queue().stop();
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
        if let Some(handoff) = &h.handoff {
            for r in handoff.queue().stop().into_iter().flatten() {
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
/// while the scheduler does not run the worker because other threads want the cores,
/// releases zero their buffers themselves. Under full CPU load the heap then behaves like a
/// synchronous one ([`HeapBuilder::deferred`]).
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
    /// [`Registry::global`](crate::registry::Registry::global).
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
        let pages = h.pages_for(len);
        let bytes = pages << h.page_shift;
        if pages <= h.cache.max_buffer_pages
            && let Some((run, heap)) = cache::take(h, pages)
        {
            // SAFETY: the run came out of this thread's cache of this heap, `pages` pages long.
            return Ok(unsafe { Buffer::from_cache(heap, run, bytes) });
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
        let Gathered {
            runs,
            stolen,
            fresh,
            hits,
            inline,
            misses,
        } = h.gather(pages)?;
        match Buffer::assemble(h.clone(), runs, bytes) {
            Ok(buf) => {
                // Counted only now: a failed allocation leaves every counter as it was.
                h.count_alloc(hits, inline, misses);
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
        stats::assemble(self.inner())
    }

    /// Warms the pools: adds fresh blocks for `count` more buffers of `len` bytes (each
    /// buffer's blocks end to end, with the heap's [pool type](HeapBuilder::pool_type)
    /// applied), as far as this heap's limit and its registry's maximum leave room, so that
    /// the first allocations of a program find them pooled instead of paying for fresh pages.
    /// Returns the number of buffers reserved (fewer than `count` when a limit stops it).
    ///
    /// The reserved blocks are pooled like any others: counted against the limits, shrunk
    /// under memory pressure. Fails like [`alloc`](Self::alloc) on a bad length, or when the
    /// system refuses memory (a locked type past `RLIMIT_MEMLOCK`:
    /// [`AllocError::MemlockLimit`]); the buffers reserved before the failure stay pooled.
    ///
    /// # Examples
    /// ```
    /// let heap = pagepool::SystemHeap::builder().pool_limit(16 << 20).build().unwrap();
    /// assert_eq!(heap.reserve(1 << 20, 4).unwrap(), 4);
    /// assert_eq!(heap.stats().owner.pages, 4 * 256);
    /// assert_eq!(heap.reserve(1 << 20, 100).unwrap(), 12, "up to the 16 MiB limit");
    /// let buf = heap.alloc(1 << 20).unwrap();
    /// assert_eq!(heap.stats().hits, 1, "pooled, not fresh");
    /// # drop(buf);
    /// ```
    pub fn reserve(&self, len: usize, count: usize) -> Result<usize, AllocError> {
        let h = self.inner();
        if len == 0 || len > h.max_buffer {
            return Err(self.refuse(len));
        }
        if !h.pooling() {
            return Ok(0);
        }
        let pages = h.pages_for(len);
        let registry = h.owner.registry();
        let room = (h.owner.limit_pages().saturating_sub(h.owner.count()))
            .min(registry.max_pages().saturating_sub(registry.count()));
        let n = count.min(room / pages);
        for _ in 0..n {
            let p = h.arenas.carve(pages * h.page)?;
            let mut at = p.as_ptr() as usize;
            let mut runs = Runs::new();
            for (order, count) in self::gather::split(&h.orders, pages) {
                runs.push(Run {
                    start: at,
                    order,
                    count,
                });
                at += (count << order) * h.page;
            }
            // Fresh pages read zero: pooled as they are.
            h.give_runs(&runs);
        }
        Ok(n)
    }

    /// What the kernel backs this heap's memory with now, read from `/proc/self/smaps` and
    /// `/proc/self/numa_maps`: resident, transparent-huge and hugetlbfs bytes, locked bytes,
    /// bytes per NUMA node, over the heap's arenas (pooled blocks and live buffers). Checks a
    /// [pool type](HeapBuilder::pool_type) against what the system actually gave.
    ///
    /// # Examples
    /// ```
    /// use pagepool::{PoolType, SystemHeap};
    ///
    /// let heap = SystemHeap::builder().pool_type(PoolType::SYSTEM.locked()).build().unwrap();
    /// let buf = heap.alloc(1 << 20).unwrap();
    /// let report = heap.backing().unwrap();
    /// assert!(report.resident_bytes >= 1 << 20);
    /// # drop(buf);
    /// ```
    pub fn backing(&self) -> std::io::Result<crate::attrs::BackingReport> {
        crate::attrs::BackingReport::read(&self.inner().arenas.ranges())
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
        if let Some(handoff) = &h.handoff {
            handoff.queue().flush();
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
