//! A pool of real dma-bufs from a kernel dma-buf heap, kept clean by a worker.
//!
//! The kernel's system heap zeroes every buffer on allocation. [`DmaBufPool`] keeps released
//! dma-bufs, per size (the page-rounded length is the size class), and hands them out again
//! after its worker thread (`pagepool-dmabuf`, nice 19) has zeroed them through a mapping,
//! bracketed by `DMA_BUF_IOCTL_SYNC`. Its pages count against an [`Owner`] of a [`Registry`],
//! like the page pools, and the pool is a [`Shrinker`] the registry's pressure monitor runs.
//!
//! A dma-buf is shared by nature: another process, a duplicate descriptor or a mapping may
//! still hold it when the [`PooledDmaBuf`] is dropped. The worker reads the file's reference
//! count (`count:` in `/proc/self/fdinfo`) and recycles a buffer only when the pool's own
//! descriptor is the last reference; until then the buffer is parked, checked again every
//! 20 ms, and never handed out.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Deref;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

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
}

struct State {
    clean: BTreeMap<usize, Vec<DmaBuf>>,
    dirty: VecDeque<DmaBuf>,
    held: Vec<DmaBuf>,
    stopped: bool,
}

struct Inner {
    heap: Arc<DmaHeap>,
    /// The fork generation of this pool state (see [`crate::fork`]).
    generation: u64,
    owner: Arc<Owner>,
    page: usize,
    state: Mutex<State>,
    work: Condvar,
    idle: Condvar,
    busy: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    zeroed: AtomicU64,
    held_events: AtomicU64,
    released: AtomicU64,
}

impl Inner {
    /// Empty pool state of this fork generation; `stopped` pools nothing (no worker).
    fn new(heap: Arc<DmaHeap>, owner: Arc<Owner>, page: usize, stopped: bool) -> Arc<Inner> {
        Arc::new(Inner {
            heap,
            generation: crate::fork::generation(),
            owner,
            page,
            state: Mutex::new(State {
                clean: BTreeMap::new(),
                dirty: VecDeque::new(),
                held: Vec::new(),
                stopped,
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
            busy: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            held_events: AtomicU64::new(0),
            released: AtomicU64::new(0),
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
        unsafe { cpu.as_mut_slice() }.fill(0);
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

    fn work(&self) {
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
            log::debug!("pagepool: cannot lower the dma-buf worker's priority: {e}");
        }
        loop {
            let (dirty, parked) = {
                let mut st = self.state();
                while st.dirty.is_empty() && st.held.is_empty() && !st.stopped {
                    self.busy.store(false, Ordering::Release);
                    self.idle.notify_all();
                    st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.stopped {
                    self.busy.store(false, Ordering::Release);
                    self.idle.notify_all();
                    return;
                }
                self.busy.store(true, Ordering::Release);
                (st.dirty.pop_front(), std::mem::take(&mut st.held))
            };
            let mut still_held = Vec::new();
            for b in dirty.into_iter().chain(parked) {
                // Recycle only when the pool's descriptor is the last reference to the file.
                match file_count(b.as_fd()) {
                    Ok(1) => {}
                    Ok(_) => {
                        still_held.push(b);
                        continue;
                    }
                    Err(e) => {
                        log::warn!("pagepool: cannot tell who holds a dma-buf ({e}); closing it");
                        self.released.fetch_add(1, Ordering::Relaxed);
                        close(b);
                        continue;
                    }
                }
                // SAFETY: the count just read is 1, and `b` is the pool's own descriptor (its
                // `PooledDmaBuf` was dropped), handed to nobody.
                if let Err(e) = unsafe { self.zero(&b) } {
                    log::warn!("pagepool: cannot zero a dma-buf ({e}); closing it");
                    self.released.fetch_add(1, Ordering::Relaxed);
                    close(b);
                    continue;
                }
                self.zeroed.fetch_add(1, Ordering::Relaxed);
                let pages = self.pages(&b);
                {
                    let mut st = self.state();
                    st.clean.entry(b.len()).or_default().push(b);
                    self.owner.note_added(pages); // under the lock: see `shrink`
                }
                // The owner's limit, then the registry's maximum, as for any other pool:
                // pooled dma-bufs never push the other owners' pools out.
                self.owner.enforce_limits();
            }
            let wait = !still_held.is_empty();
            {
                let mut st = self.state();
                st.held.extend(still_held);
                // This round is done: a flush waiting for it may return.
                self.busy.store(false, Ordering::Release);
                self.idle.notify_all();
                if wait && st.dirty.is_empty() && !st.stopped {
                    // Parked buffers only: look again in a while.
                    let _ = self
                        .work
                        .wait_timeout(st, Duration::from_millis(20))
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }
}

/// A pool of clean dma-bufs of a kernel dma-buf heap.
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
/// use pagepool::DmaHeap;
/// use pagepool::DmaBufPool;
/// use pagepool::Registry;
///
/// let pool = DmaBufPool::new(DmaHeap::open("system")?, &Registry::new(1 << 20), 64 << 20)?;
/// let buf = pool.alloc(1 << 20)?;   // from the kernel: nothing pooled yet
/// drop(buf);                        // zeroed by the worker, then pooled
/// pool.flush();
/// let again = pool.alloc(1 << 20)?; // from the pool
/// # Ok::<(), pagepool::DmaBufError>(())
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
        let w = inner.clone();
        let worker = std::thread::Builder::new()
            .name("pagepool-dmabuf".into())
            .spawn(move || w.work())
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
        let (dirty, held) = {
            let mut st = self.inner.state();
            st.stopped = true;
            (std::mem::take(&mut st.dirty), std::mem::take(&mut st.held))
        };
        dirty.into_iter().chain(held).for_each(close);
        self.inner.work.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        self.inner.shrink(usize::MAX);
    }
}

/// Closes a descriptor the pool owned (and recorded for a forked child to close).
fn close(b: DmaBuf) {
    crate::fork::forget_fd(b.as_fd());
    drop(b);
}

impl DmaBufPool {
    /// A pool of buffers of `heap`, holding at most `limit_bytes` of clean buffers, counted
    /// against `registry` as the owner `dmabuf:<heap name>`.
    pub fn new(
        heap: DmaHeap,
        registry: &Arc<Registry>,
        limit_bytes: usize,
    ) -> Result<DmaBufPool, DmaBufError> {
        let page = crate::os::page_size();
        let core = PoolCore::start(Arc::new(heap), registry, limit_bytes / page)?;
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
        if len == 0 {
            return Err(DmaBufError::ZeroLength);
        }
        let size = len
            .checked_next_multiple_of(inner.page)
            .ok_or(DmaBufError::Os {
                op: "DMA_HEAP_IOCTL_ALLOC",
                source: std::io::Error::from_raw_os_error(12),
            })?;
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

    /// Waits until every released buffer has been zeroed and pooled, or parked because it is
    /// still referenced elsewhere.
    pub fn flush(&self) {
        let inner = self.inner();
        let mut st = inner.state();
        while (!st.dirty.is_empty() || inner.busy.load(Ordering::Acquire)) && !st.stopped {
            st = inner.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
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
        let mut st = self.pool.state();
        if st.stopped {
            return;
        }
        crate::fork::record_fd(b.as_fd()); // the pool's again: a forked child closes it
        st.dirty.push_back(b);
        drop(st);
        self.pool.work.notify_one();
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
