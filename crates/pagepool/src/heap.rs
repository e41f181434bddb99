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
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::arena::Arenas;
use crate::buffer::{Buffer, Seg};
use crate::error::{AllocError, ConfigError};
use crate::os;
use crate::pool::{Block, MAX_ORDER, PagePool};
use crate::registry::{Owner, Registry, Shrinker};
use crate::stats::HeapStats;
use crate::sync::Arc;

/// The default block orders: 1 MiB, 64 KiB and 4 KiB blocks (with 4 KiB pages).
pub const DEFAULT_ORDERS: [u8; 3] = [8, 4, 0];
/// The default limit on a heap's pooled memory: 256 MiB.
pub const DEFAULT_POOL_LIMIT: usize = 256 << 20;
/// The default maximum buffer size: 1 GiB.
pub const DEFAULT_MAX_BUFFER: usize = 1 << 30;
/// The default size of one memfd arena: 64 MiB (address space; memory is used only as blocks
/// are carved). Larger buffers get an arena of their own size.
pub const DEFAULT_ARENA_SIZE: usize = 64 << 20;

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
        let owner = registry.register(&self.name, self.pool_limit / page);
        let arenas =
            std::sync::Arc::new(Arenas::new(&format!("pagepool:{}", self.name), arena_size));
        let pools = orders
            .iter()
            .map(|&order| {
                let arenas = arenas.clone();
                owner.add_pool(
                    order,
                    Box::new(move |b: Block| arenas.release(b.into_raw(), page << order)),
                )
            })
            .collect();
        Ok(SystemHeap {
            inner: Arc::new(HeapInner {
                pools,
                orders,
                page,
                max_buffer,
                owner,
                arenas,
                closed: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        })
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) allocs: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) live_buffers: AtomicU64,
    pub(crate) live_pages: AtomicU64,
    pub(crate) contiguous: AtomicU64,
    pub(crate) remapped: AtomicU64,
    pub(crate) zeroed_sync: AtomicU64,
    pub(crate) peak_pooled: AtomicUsize,
}

/// What buffers share with their heap. Field order matters: the pools drop (releasing their
/// blocks into the arenas) before the arenas are unmapped.
pub(crate) struct HeapInner {
    pub(crate) pools: Vec<Arc<PagePool>>,
    /// Descending; parallel to `pools`.
    pub(crate) orders: Vec<u8>,
    pub(crate) page: usize,
    max_buffer: usize,
    pub(crate) owner: Arc<Owner>,
    pub(crate) arenas: std::sync::Arc<Arenas>,
    /// Set when the `SystemHeap` handle is dropped: buffers released later go straight back.
    pub(crate) closed: AtomicBool,
    pub(crate) counters: Counters,
}

impl HeapInner {
    pub(crate) fn pooling(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && self.owner.limit_pages() > 0
    }

    /// Gives a buffer's blocks (zeroed) to their pools, last block first so that the pools,
    /// being LIFO, hand them out again in the same order, end to end.
    pub(crate) fn give_blocks(&self, segs: &[Seg]) {
        for s in segs.iter().rev() {
            let i = self.pool_index(s.order);
            let size = self.page << s.order;
            for k in (0..s.count).rev() {
                // SAFETY: the block is a used arena range of `2^order` pages, inside the
                // segment, that the dying buffer owned exclusively and has zeroed.
                let block = unsafe { Block::from_raw(s.home.add(k * size), s.order) };
                if let Err(b) = self.pools[i].give_quiet(block) {
                    self.arenas.release(b.into_raw(), size);
                }
            }
        }
        self.owner.enforce_limits();
        self.counters
            .peak_pooled
            .fetch_max(self.owner.count(), Ordering::Relaxed);
    }

    /// Gives a segment's memory straight back to the system.
    pub(crate) fn release_seg(&self, s: &Seg) {
        self.arenas
            .release(s.home, (self.page << s.order) * s.count);
    }

    fn pool_index(&self, order: u8) -> usize {
        self.orders.iter().position(|&o| o == order).unwrap_or(0)
    }
}

/// Appends a block to a segment list, extending the last segment when the block continues it.
fn push_block(segs: &mut Vec<Seg>, home: NonNull<u8>, order: u8, page: usize) {
    if let Some(last) = segs.last_mut()
        && last.order == order
        && last.end(page) == home.as_ptr() as usize
    {
        last.count += 1;
        return;
    }
    segs.push(Seg {
        home,
        order,
        count: 1,
    });
}

/// A heap of zeroed, page-aligned, contiguous buffers, built from pooled blocks.
///
/// Dropping a [`Buffer`] zeroes it and gives its blocks to the pools; the next allocation of a
/// similar size takes them back with no system call and no zeroing. Dropping the heap gives all
/// pooled memory back to the system; buffers still alive stay valid, and their memory goes
/// straight back to the system when they are dropped.
///
/// # Examples
/// ```
/// use pagepool::SystemHeap;
///
/// let heap = SystemHeap::new().unwrap();
/// let mut buf = heap.alloc(1 << 20).unwrap();
/// assert!(buf.iter().all(|&b| b == 0));
/// buf[..5].copy_from_slice(b"hello");
/// drop(buf); // zeroed and pooled
/// let again = heap.alloc(1 << 20).unwrap();
/// assert!(again.iter().all(|&b| b == 0));
/// assert_eq!(heap.stats().hits, 1);
/// ```
pub struct SystemHeap {
    inner: Arc<HeapInner>,
}

impl SystemHeap {
    /// A heap with the default configuration (see [`HeapBuilder`]).
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
    pub fn alloc(&self, len: usize) -> Result<Buffer, AllocError> {
        let h = &self.inner;
        if len == 0 {
            return Err(AllocError::ZeroLength);
        }
        if len > h.max_buffer {
            return Err(AllocError::TooLarge {
                len,
                max: h.max_buffer,
            });
        }
        let pages = len.div_ceil(h.page);
        let bytes = pages * h.page;
        // Largest blocks first: from each order's pool what it has, the rest from the system.
        // Runs of blocks that lie end to end are kept as one segment, so the bookkeeping grows
        // with the number of pool hits, not with the buffer's size.
        let mut segs: Vec<Seg> = Vec::new();
        let mut missing: Vec<(usize, u8, usize)> = Vec::new(); // (index in segs, order, count)
        let mut left = pages;
        for (pool, &order) in h.pools.iter().zip(&h.orders) {
            let want = left >> order;
            left &= (1 << order) - 1;
            let mut got = 0;
            while got < want {
                let Some(b) = pool.take() else { break };
                got += 1;
                push_block(&mut segs, b.into_raw(), order, h.page);
            }
            if got < want {
                missing.push((segs.len(), order, want - got));
                segs.push(Seg {
                    home: NonNull::dangling(),
                    order,
                    count: want - got,
                });
            }
        }
        let hits: usize = segs.iter().map(|s| s.count).sum::<usize>()
            - missing.iter().map(|m| m.2).sum::<usize>();
        let counters = &h.counters;
        counters.hits.fetch_add(hits as u64, Ordering::Relaxed);
        counters
            .misses
            .fetch_add(missing.iter().map(|m| m.2 as u64).sum(), Ordering::Relaxed);
        // The misses come from the system as one range, split in order.
        if !missing.is_empty() {
            let fresh: usize = missing.iter().map(|&(_, o, n)| (h.page << o) * n).sum();
            match h.arenas.carve(fresh) {
                Ok(mut p) => {
                    for &(i, order, n) in &missing {
                        segs[i].home = p;
                        // SAFETY: still inside (or one past) the range just carved.
                        p = unsafe { p.add((h.page << order) * n) };
                    }
                }
                Err(e) => {
                    // Give the pool blocks back: still clean, untouched.
                    for &(i, _, _) in missing.iter().rev() {
                        segs.remove(i);
                    }
                    h.give_blocks(&segs);
                    return Err(e.into());
                }
            }
        }
        Buffer::assemble(self.inner.clone(), segs, bytes)
    }

    /// A snapshot of the heap's statistics.
    pub fn stats(&self) -> HeapStats {
        let h = &self.inner;
        let c = &h.counters;
        let owner = h.owner.stats();
        let registry = h.owner.registry();
        let total = registry.count();
        HeapStats {
            page_size: h.page,
            registry_max_pages: registry.max_pages(),
            registry_total_pages: total,
            other_owners_pages: total.saturating_sub(owner.pages),
            peak_pooled_pages: c.peak_pooled.load(Ordering::Relaxed),
            allocs: c.allocs.load(Ordering::Relaxed),
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            fresh_pages: h.arenas.fresh_pages.load(Ordering::Relaxed),
            released_pages: h.arenas.released_pages.load(Ordering::Relaxed),
            live_buffers: c.live_buffers.load(Ordering::Relaxed),
            live_pages: c.live_pages.load(Ordering::Relaxed),
            contiguous: c.contiguous.load(Ordering::Relaxed),
            remapped: c.remapped.load(Ordering::Relaxed),
            zeroed_sync: c.zeroed_sync.load(Ordering::Relaxed),
            arenas: h.arenas.count(),
            owner,
        }
    }

    /// Gives about `nr_pages` pooled pages back to the system (whole blocks, round robin over
    /// this heap's pools); returns the pages freed.
    pub fn shrink(&self, nr_pages: usize) -> usize {
        self.inner.owner.scan(nr_pages)
    }

    /// Gives every pooled page back to the system; returns the pages freed.
    pub fn trim(&self) -> usize {
        self.shrink(usize::MAX)
    }

    /// This heap's owner entry in its registry (its limit can be changed there).
    pub fn owner(&self) -> &Arc<Owner> {
        &self.inner.owner
    }

    /// The block orders, largest first.
    pub fn orders(&self) -> &[u8] {
        &self.inner.orders
    }
}

impl Drop for SystemHeap {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.trim();
    }
}

impl fmt::Debug for SystemHeap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemHeap")
            .field("name", &self.inner.owner.name())
            .field("orders", &self.inner.orders)
            .field("pooled_pages", &self.inner.owner.count())
            .finish_non_exhaustive()
    }
}
