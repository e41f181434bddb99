//! A pool of real dma-bufs from a kernel dma-buf heap, kept clean by a worker.
//!
//! The kernel's system heap zeroes every buffer on allocation. [`DmaBufPool`] keeps released
//! dma-bufs, per size (the page-rounded length is the size class), and hands them out again
//! after they were zeroed through a mapping, bracketed by `DMA_BUF_IOCTL_SYNC`. Releasing goes
//! through the same deferred-free helper as the system heap's (`deferred/`): a
//! bounded queue (at most the pool's limit), a worker thread (`pagepool-dmabuf`, nice 19) that
//! hands each released buffer to the pool's release callback (`Reason::Normal`: check, zero,
//! pool), and, under memory pressure, queued buffers closed unzeroed
//! (`Reason::UnderPressure`). A release that the queue refuses (full, or its worker kept off
//! its core by a busy machine) closes the buffer at once. Its clean buffers count against an
//! [`Owner`] of a [`Registry`], like the page pools, which shrinks them like its own pools
//! (limits, the registry's maximum, pressure).
//!
//! A dma-buf is shared by nature: another process, a duplicate descriptor or a mapping may
//! still hold it when the [`PooledDmaBuf`] is dropped. The worker reads the file's reference
//! count (`count:` in `/proc/self/fdinfo`) and recycles a buffer only when the pool's own
//! descriptor is the last reference; until then the buffer is parked, checked again every
//! 20 ms, and never handed out.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::deferred::{Item, Reason, ReleaseQueue};
use crate::dmabuf::{Access, DmaBuf, DmaBufError, DmaHeap, file_count};
use crate::fork::ForkCell;
use crate::registry::{Owner, Registry};
use crate::shrinker::Shrinker;

/// A dma-buf pool's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct DmaBufPoolStats {
    /// Clean buffers pooled now.
    pub pooled: usize,
    /// Bytes in them.
    pub pooled_bytes: usize,
    /// Released buffers still referenced elsewhere, parked until they are not.
    pub held: usize,
    /// Allocations served from the pool.
    pub hits: u64,
    /// Allocations that asked the kernel heap.
    pub misses: u64,
    /// Buffers zeroed by the worker.
    pub zeroed: u64,
    /// Times a released buffer was found still referenced elsewhere.
    pub held_events: u64,
    /// Buffers closed to give memory back (limit or pressure).
    pub released: u64,
    /// Released buffers closed at once, unqueued: the queue was full, or its worker was kept
    /// off its core (a busy machine).
    pub refused: u64,
    /// Pages of released buffers waiting for the worker now (queued or being zeroed).
    pub queued_pages: usize,
}

/// A released buffer on the pool's queue, with its pages.
struct Released {
    buf: DmaBuf,
    pages: usize,
}

impl Item for Released {
    fn pages(&self) -> usize {
        self.pages
    }
}

/// How often the worker looks again at released buffers still referenced elsewhere.
const HELD_POLL: Duration = Duration::from_millis(20);

/// How long the worker promises to take, before it looks at the queue again, for the system
/// calls that prepare a buffer for zeroing (counting its holders, mapping it, announcing CPU
/// access): a release finds it late only past this (plus the grace of a running worker).
const SETUP_ALLOWANCE: Duration = Duration::from_millis(10);

/// How much of a buffer the worker zeroes before it renews its promise to the queue (see
/// `ReleaseQueue::promise`): the heap's worker's largest piece, far less work than a running
/// worker's grace (`Tempo::worker_grace`) allows.
const ZERO_PIECE: usize = 256 << 10;

struct State {
    clean: BTreeMap<usize, Vec<DmaBuf>>,
    held: Vec<DmaBuf>,
    /// When the held buffers were last looked at.
    held_checked: Option<std::time::Instant>,
}

struct Inner {
    heap: Arc<DmaHeap>,
    /// The fork generation of this pool state (see [`crate::fork`]).
    generation: u64,
    owner: Arc<Owner>,
    page: usize,
    state: Mutex<State>,
    /// Released buffers waiting for the worker.
    queue: Arc<ReleaseQueue<Released>>,
    hits: AtomicU64,
    misses: AtomicU64,
    zeroed: AtomicU64,
    held_events: AtomicU64,
    released: AtomicU64,
}

impl Inner {
    /// Empty pool state of this fork generation; `stopped` pools nothing (no worker: its
    /// queue refuses every release).
    fn new(heap: Arc<DmaHeap>, owner: Arc<Owner>, page: usize, stopped: bool) -> Arc<Inner> {
        let max_pages = owner.limit_pages();
        let inner = Arc::new_cyclic(|me: &std::sync::Weak<Inner>| {
            let me = me.clone();
            Inner {
                heap,
                generation: crate::fork::generation(),
                owner,
                page,
                state: Mutex::new(State {
                    clean: BTreeMap::new(),
                    held: Vec::new(),
                    held_checked: None,
                }),
                queue: Arc::new(ReleaseQueue::new(
                    page,
                    max_pages,
                    Box::new(move |r: Released, why| match me.upgrade() {
                        Some(inner) => inner.release(r.buf, why),
                        None => close(r.buf),
                    }),
                )),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                zeroed: AtomicU64::new(0),
                held_events: AtomicU64::new(0),
                released: AtomicU64::new(0),
            }
        });
        // Nothing else takes queued buffers (no allocation zeroes them inline): every release
        // wakes a sleeping worker.
        inner.queue.set_wake_pages(1);
        if stopped {
            inner.queue.stop();
        }
        inner
    }

    /// The release callback of the pool's queue: `Normal` (the worker) recycles the buffer,
    /// `UnderPressure` closes it.
    fn release(&self, b: DmaBuf, why: Reason) {
        match why {
            Reason::Normal => self.recycle(b),
            Reason::UnderPressure => {
                self.released.fetch_add(1, Ordering::Relaxed);
                close(b);
            }
        }
    }

    /// The worker's `tick`: looks again at held buffers every [`HELD_POLL`] and recycles those
    /// no longer referenced elsewhere; returns how long to wait for releases before the next
    /// look (`None`: none held, sleep until woken).
    fn tick(&self) -> Option<Duration> {
        let free = {
            let mut st = self.state();
            if st.held.is_empty() {
                return None;
            }
            let now = std::time::Instant::now();
            if st.held_checked.is_some_and(|t| now - t < HELD_POLL) {
                return Some(HELD_POLL);
            }
            st.held_checked = Some(now);
            // Looked at in place, so that `stats` never misses a held buffer: only those whose
            // holders are gone (or that cannot be told) leave the list.
            let (free, held): (Vec<DmaBuf>, Vec<DmaBuf>) = std::mem::take(&mut st.held)
                .into_iter()
                .partition(|b| !file_count(b.as_fd()).is_ok_and(|n| n > 1));
            st.held = held;
            free
        };
        free.into_iter().for_each(|b| self.recycle(b));
        Some(HELD_POLL)
    }

    /// Recycles a released buffer: zeroed and pooled if the pool's descriptor is the last
    /// reference to it; parked among the held ones if another holder remains; closed if that
    /// cannot be told or it cannot be zeroed.
    fn recycle(&self, b: DmaBuf) {
        // The checks and the mapping below are system calls that may take milliseconds (in the
        // VM, whose CPU is emulated; docs/DESIGN.md, The VM): the worker is running, not kept
        // off its core, so it promises that long rather than be found late in the middle of them.
        self.queue.promise(SETUP_ALLOWANCE);
        match file_count(b.as_fd()) {
            Ok(1) => {}
            Ok(_) => {
                self.state().held.push(b);
                return;
            }
            Err(e) => {
                log::warn!("pagepool: cannot tell who holds a dma-buf ({e}); closing it");
                self.released.fetch_add(1, Ordering::Relaxed);
                close(b);
                return;
            }
        }
        // SAFETY: the count just read is 1, and `b` is the pool's own descriptor (its
        // `PooledDmaBuf` was dropped), handed to nobody.
        if let Err(e) = unsafe { self.zero(&b) } {
            log::warn!("pagepool: cannot zero a dma-buf ({e}); closing it");
            self.released.fetch_add(1, Ordering::Relaxed);
            close(b);
            return;
        }
        self.zeroed.fetch_add(1, Ordering::Relaxed);
        let pages = self.pages(&b);
        {
            let mut st = self.state();
            st.clean.entry(b.len()).or_default().push(b);
            self.owner.note_added(pages); // under the lock: see `shrink`
        }
        // The owner's limit, then the registry's maximum, as for any other pool: pooled
        // dma-bufs never push the other owners' pools out.
        self.owner.enforce_limits();
    }

    /// The size of a buffer of `len` bytes: rounded up to pages; a zero or too large length is
    /// refused.
    fn buffer_size(&self, len: usize) -> Result<usize, DmaBufError> {
        if len == 0 {
            return Err(DmaBufError::ZeroLength);
        }
        len.checked_next_multiple_of(self.page)
            .ok_or(DmaBufError::Os {
                op: "DMA_HEAP_IOCTL_ALLOC",
                source: std::io::Error::from_raw_os_error(12),
            })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pages(&self, b: &DmaBuf) -> usize {
        b.len().div_ceil(self.page)
    }

    /// Zeroes a buffer through a mapping, with CPU access announced to the kernel.
    ///
    /// # Safety
    /// `b`'s descriptor is the last reference to its file ([`file_count`] is 1: no other
    /// descriptor, here or in another process, no mapping, no device attachment), and it is the
    /// pool's own, handed to nobody.
    unsafe fn zero(&self, b: &DmaBuf) -> Result<(), DmaBufError> {
        let mut map = b.map()?;
        let mut cpu = map.access(Access::Write)?;
        // SAFETY: nothing but this mapping can read or write the buffer while the slice lives.
        // Every way to its memory holds a reference to the file: a descriptor (in this process
        // or another), a mapping (an mmap holds the file), a device attachment (the importer
        // holds the file from `dma_buf_get` to `dma_buf_put`). The caller saw a count of 1:
        // `b`'s descriptor, the pool's own, which it hands to nobody. No reference can appear
        // since, as a new one is made only from an existing descriptor or mapping: `map` is the
        // one this call just made. (A `fork` by another thread copies neither into the child:
        // the mapping is `MADV_DONTFORK`, and the pool's descriptors are recorded and closed in
        // the child by `crate::fork` before `fork` returns there. A process allowed to ptrace
        // this one may take descriptors with `pidfd_getfd`, as it may write `/proc/<pid>/mem`:
        // no Rust code can guard against that.) The slice, not the safe atomic `fill`, because
        // zeroing is the worker's whole job: atomic stores go one word at a time, and the
        // compiler may not merge them into the vector or `rep stos` stores of `memset`.
        // A piece at a time, renewing the worker's promise after each: a release that finds
        // the worker late frees its buffer itself (see `ReleaseQueue::queue`).
        for piece in unsafe { cpu.as_mut_slice() }.chunks_mut(ZERO_PIECE) {
            piece.fill(0);
            self.queue.promise(Duration::ZERO);
        }
        Ok(())
    }

    /// Closes clean buffers, largest first, until `nr_pages` are freed; returns pages freed.
    fn shrink(&self, nr_pages: usize) -> usize {
        let mut freed = 0;
        let mut closing = Vec::new();
        {
            let mut st = self.state();
            while freed < nr_pages {
                let Some(mut entry) = st.clean.last_entry() else {
                    break;
                };
                let Some(b) = entry.get_mut().pop() else {
                    break;
                };
                if entry.get().is_empty() {
                    entry.remove();
                }
                freed += self.pages(&b);
                closing.push(b);
            }
            // Counted under the state lock, like every change of the pooled set, so that the
            // owner's count follows the pool's changes in order and never goes below zero.
            self.owner.note_removed(freed);
        }
        self.released
            .fetch_add(closing.len() as u64, Ordering::Relaxed);
        closing.into_iter().for_each(close);
        freed
    }
}

/// A pool of clean dma-bufs of a kernel dma-buf heap.
///
/// # Releasing
/// Dropping a [`PooledDmaBuf`] queues it for the pool's worker (`pagepool-dmabuf`, nice 19),
/// which zeroes it and pools it by size. Released buffers waiting for the worker count against
/// the pool's limit: a release that would pass it, or that comes while the worker is kept off
/// its core by a busy machine, closes the buffer at once (counted in
/// [`DmaBufPoolStats::refused`]). Under memory pressure, queued buffers are closed unzeroed.
/// [`flush`](DmaBufPool::flush) waits for the worker.
///
/// # Fork
/// A forked child does not inherit the pool's buffers: the descriptors of pooled and queued
/// buffers are closed in the child, and the pool's own mappings are `MADV_DONTFORK`. The pool
/// keeps working in the child: its first use there starts it afresh (empty, with a worker of
/// its own), without taking any lock another thread of the parent may have held at fork time;
/// nothing the child does changes the parent's pool. A [`PooledDmaBuf`] the child inherited is
/// a descriptor like any other: dropping it in the child closes the child's copy only.
///
/// # Examples
/// ```no_run
/// use pagepool::dmabuf::DmaHeap;
/// use pagepool::dmapool::DmaBufPool;
/// use pagepool::registry::Registry;
///
/// let pool = DmaBufPool::new(DmaHeap::open("system")?, &Registry::new(1 << 20), 64 << 20)?;
/// let buf = pool.alloc(1 << 20)?;   // from the kernel: nothing pooled yet
/// drop(buf);                        // zeroed by the worker, then pooled
/// pool.flush();
/// let again = pool.alloc(1 << 20)?; // from the pool
/// # Ok::<(), pagepool::dmabuf::DmaBufError>(())
/// ```
pub struct DmaBufPool {
    /// This process's pool state: a forked child builds its own on first use (see
    /// [`crate::fork`]).
    core: ForkCell<PoolCore>,
}

/// A pool's state in one process: the buffers and the worker.
struct PoolCore {
    inner: Arc<Inner>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl PoolCore {
    fn start(
        heap: Arc<DmaHeap>,
        registry: &Arc<Registry>,
        limit_pages: usize,
    ) -> Result<PoolCore, DmaBufError> {
        let page = crate::os::page_size();
        let owner = registry.register(&format!("dmabuf:{}", heap.name()), limit_pages);
        let inner = Inner::new(heap, owner, page, false);
        // One of the owner's pools, of another kind: its limit, the registry's maximum and
        // the registry's shrink reach it like a page pool (and its pages, counted in the
        // owner's, are not counted twice by the registry's pressure response).
        let weak: std::sync::Weak<dyn Shrinker> = Arc::downgrade(&inner) as _;
        inner.owner.add_other(weak);
        // Its queue, like the heaps': under pressure, queued buffers are closed unzeroed.
        let weak: std::sync::Weak<dyn Shrinker> = Arc::downgrade(&inner.queue) as _;
        registry.add_shrinker(weak);
        let w = inner.clone();
        let worker =
            crate::deferred::spawn_worker("pagepool-dmabuf", move || w.queue.serve(|| w.tick()))
                .map_err(|e| DmaBufError::Os {
                    op: "spawn dma-buf worker",
                    source: e,
                })?;
        Ok(PoolCore {
            inner,
            worker: Some(worker),
        })
    }

    /// The state a forked child starts with: like its parent's, empty. Without a worker (the
    /// thread could not be started) released buffers are closed, not pooled.
    fn renew(old: &PoolCore) -> PoolCore {
        let o = &old.inner;
        match PoolCore::start(o.heap.clone(), o.owner.registry(), o.owner.limit_pages()) {
            Ok(core) => core,
            Err(e) => {
                log::warn!("pagepool: {e}; the dma-buf pool does not pool in this process");
                PoolCore::stopped(o)
            }
        }
    }

    /// A pool state with no worker, that pools nothing.
    fn stopped(old: &Inner) -> PoolCore {
        let owner = old.owner.registry().register(old.owner.name(), 0);
        let inner = Inner::new(old.heap.clone(), owner, old.page, true);
        PoolCore {
            inner,
            worker: None,
        }
    }
}

impl Drop for PoolCore {
    /// Stops the worker and closes every pooled and queued buffer (buffers still held elsewhere
    /// stay valid for their holders: closing the pool's descriptor drops only its reference).
    fn drop(&mut self) {
        for r in self.inner.queue.stop() {
            close(r.buf);
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let held = std::mem::take(&mut self.inner.state().held);
        held.into_iter().for_each(close);
        self.inner.shrink(usize::MAX);
    }
}

/// Closes a descriptor the pool owned (and recorded for a forked child to close): forgotten
/// and closed in one gate, so that no child has it open and unrecorded.
fn close(b: DmaBuf) {
    let _gate = crate::fork::Gate::open();
    crate::fork::forget_fd(b.as_fd());
    drop(b);
}

impl DmaBufPool {
    /// A pool of buffers of `heap`, holding at most `limit_bytes` of clean buffers (and at most
    /// as much waiting for the worker), counted against `registry` as the owner
    /// `dmabuf:<heap name>`. `usize::MAX` sets no limit of the pool's own (the registry's
    /// maximum still holds; the owner's stats say `unlimited`). Starts the pool's worker
    /// thread.
    pub fn new(
        heap: DmaHeap,
        registry: &Arc<Registry>,
        limit_bytes: usize,
    ) -> Result<DmaBufPool, DmaBufError> {
        let page = crate::os::page_size();
        let limit_pages = match limit_bytes {
            usize::MAX => usize::MAX,
            bytes => bytes / page,
        };
        let core = PoolCore::start(Arc::new(heap), registry, limit_pages)?;
        Ok(DmaBufPool {
            core: ForkCell::new(core),
        })
    }

    /// This process's pool state.
    fn inner(&self) -> &Arc<Inner> {
        &self.core.get(PoolCore::renew).inner
    }

    /// A zeroed dma-buf of at least `len` bytes (rounded up to pages): a pooled one of that
    /// size if there is one, else a new one from the kernel heap.
    pub fn alloc(&self, len: usize) -> Result<PooledDmaBuf, DmaBufError> {
        let inner = self.inner();
        let size = inner.buffer_size(len)?;
        let pooled = {
            let mut st = inner.state();
            let b = st.clean.get_mut(&size).and_then(Vec::pop);
            if st.clean.get(&size).is_some_and(Vec::is_empty) {
                st.clean.remove(&size);
            }
            if let Some(b) = &b {
                inner.owner.note_removed(inner.pages(b)); // under the lock
                crate::fork::forget_fd(b.as_fd()); // the user's from now on
            }
            b
        };
        let buf = match pooled {
            Some(b) => {
                inner.hits.fetch_add(1, Ordering::Relaxed);
                b
            }
            None => {
                inner.misses.fetch_add(1, Ordering::Relaxed);
                inner.heap.alloc(size)?
            }
        };
        Ok(PooledDmaBuf {
            buf: Some(buf),
            pool: inner.clone(),
        })
    }

    /// Warms the pool: allocates `count` dma-bufs of `len` bytes (rounded up to pages) from the
    /// kernel heap and pools them (the kernel hands them out zeroed), as far as the pool's limit
    /// and its registry's maximum leave room. Returns the number of buffers reserved. On an
    /// error from the heap, the buffers reserved before it stay pooled.
    pub fn reserve(&self, len: usize, count: usize) -> Result<usize, DmaBufError> {
        let inner = self.inner();
        let size = inner.buffer_size(len)?;
        let pages = size / inner.page;
        let registry = inner.owner.registry();
        let room = (inner
            .owner
            .limit_pages()
            .saturating_sub(inner.owner.count()))
        .min(registry.max_pages().saturating_sub(registry.count()));
        let n = count.min(room / pages);
        for _ in 0..n {
            let b = {
                // Made and recorded in one gate: a child forked in between would keep the
                // pool's descriptor (see `crate::fork`).
                let _gate = crate::fork::Gate::open();
                let b = inner.heap.alloc(size)?;
                // The pool's: a forked child closes it.
                if let Err(e) = crate::fork::record_fd(b.as_fd()) {
                    drop(b); // closed in the gate
                    let (op, source) = e.into_parts();
                    return Err(DmaBufError::Os { op, source });
                }
                b
            };
            let mut st = inner.state();
            st.clean.entry(b.len()).or_default().push(b);
            inner.owner.note_added(pages); // under the lock: see `shrink`
        }
        inner.owner.enforce_limits();
        Ok(n)
    }

    /// Waits until every released buffer has been zeroed and pooled, or parked because it is
    /// still referenced elsewhere.
    pub fn flush(&self) {
        self.inner().queue.flush();
    }

    /// Closes every clean pooled buffer; returns the pages freed.
    pub fn trim(&self) -> usize {
        self.inner().shrink(usize::MAX)
    }

    /// The pool's counters.
    pub fn stats(&self) -> DmaBufPoolStats {
        let inner = self.inner();
        let st = inner.state();
        DmaBufPoolStats {
            pooled: st.clean.values().map(Vec::len).sum(),
            pooled_bytes: st.clean.values().flatten().map(DmaBuf::len).sum(),
            held: st.held.len(),
            hits: inner.hits.load(Ordering::Relaxed),
            misses: inner.misses.load(Ordering::Relaxed),
            zeroed: inner.zeroed.load(Ordering::Relaxed),
            held_events: inner.held_events.load(Ordering::Relaxed),
            released: inner.released.load(Ordering::Relaxed),
            refused: inner.queue.refused(),
            queued_pages: inner.queue.pending_pages(),
        }
    }
}

impl Shrinker for Inner {
    fn name(&self) -> &str {
        "dma-buf pool"
    }
    fn count(&self) -> usize {
        self.owner.count()
    }
    fn scan(&self, nr_pages: usize) -> usize {
        self.shrink(nr_pages)
    }
}

/// A dma-buf from a [`DmaBufPool`]; dropping it hands it back to the pool's worker.
pub struct PooledDmaBuf {
    buf: Option<DmaBuf>,
    pool: Arc<Inner>,
}

impl Deref for PooledDmaBuf {
    type Target = DmaBuf;
    fn deref(&self) -> &DmaBuf {
        self.buf.as_ref().expect("present until drop")
    }
}

impl Drop for PooledDmaBuf {
    fn drop(&mut self) {
        let Some(b) = self.buf.take() else { return };
        if self.pool.generation != crate::fork::generation() {
            return; // inherited by a forked child: only this process's descriptor closes
        }
        if file_count(b.as_fd()).is_ok_and(|n| n > 1) {
            self.pool.held_events.fetch_add(1, Ordering::Relaxed);
        }
        {
            let _gate = crate::fork::Gate::open();
            // The pool's again: a forked child closes it.
            if crate::fork::record_fd(b.as_fd()).is_err() {
                drop(b); // not pooled: closed, in the gate
                return;
            }
        }
        let pages = self.pool.pages(&b);
        if let Err(r) = self.pool.queue.queue(Released { buf: b, pages }) {
            // Full, stopped, or a worker the scheduler does not run: back to the kernel now.
            close(r.buf);
        }
    }
}

impl std::fmt::Debug for PooledDmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PooledDmaBuf").field(&self.buf).finish()
    }
}

impl std::fmt::Debug for DmaBufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBufPool")
            .field("stats", &self.stats())
            .finish()
    }
}
