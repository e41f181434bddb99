//! A heap's configuration: the builder users call, every setting's default
//! ([`crate::config`]), and the checks that turn a builder into a [`Config`].

use std::fmt;

use crate::attrs::{HUGE_ORDER, HUGE_PAGE, PoolType};
use crate::config::{
    DEFAULT_ARENA_SIZE, DEFAULT_MAX_BUFFER, DEFAULT_ORDERS, DEFAULT_POOL_LIMIT,
    DEFAULT_QUEUE_LIMIT, DEFAULT_THREAD_CACHE, DEFAULT_WORKER_NAPS, DEFAULT_WORKER_SPIN,
    MAX_ARENA_SIZE, MAX_BUFFER_CEILING,
};
use crate::error::ConfigError;
use crate::os;
use crate::pool::MAX_ORDER;
use crate::pressure::PressureConfig;
use crate::registry::Registry;
use crate::sync::Arc;

/// Configures a [`SystemHeap`](crate::SystemHeap).
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
    /// Whether `orders` was set (a huge pool type has its own default).
    orders_set: bool,
    pool_type: PoolType,
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
    load_check: bool,
}

impl Default for HeapBuilder {
    fn default() -> Self {
        HeapBuilder {
            name: "system".to_owned(),
            orders: DEFAULT_ORDERS.to_vec(),
            orders_set: false,
            pool_type: PoolType::SYSTEM,
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
            load_check: true,
        }
    }
}

impl fmt::Debug for HeapBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapBuilder")
            .field("name", &self.name)
            .field("orders", &self.orders)
            .field("pool_type", &self.pool_type)
            .field("pool_limit", &self.pool_limit)
            .field("max_buffer", &self.max_buffer)
            .field("arena_size", &self.arena_size)
            .field("deferred", &self.deferred)
            .field("queue_limit", &self.queue_limit)
            .field("worker_spin", &self.worker_spin)
            .field("worker_naps", &self.worker_naps)
            .field("thread_cache", &self.thread_cache)
            .field("pressure", &self.pressure)
            .field("load_check", &self.load_check)
            .finish_non_exhaustive()
    }
}

impl HeapBuilder {
    /// The heap's name: its row in the statistics and the name of its memfds.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The block orders buffers are built from (default `[8, 4, 0]`; `[9]` for a huge pool
    /// type). Each must be at most [`MAX_ORDER`], and 0 must be among them (for a huge pool
    /// type: [`HUGE_ORDER`](crate::pool::HUGE_ORDER), and none smaller).
    pub fn orders(mut self, orders: &[u8]) -> Self {
        self.orders = orders.to_vec();
        self.orders_set = true;
        self
    }

    /// The heap's pool type (default [`PoolType::SYSTEM`]): the attributes its memory carries,
    /// applied once when memory comes from the system and kept while its blocks are pooled.
    ///
    /// - **locked** (`PoolType::SYSTEM.locked()`): fresh memory is `mlock`ed; allocations
    ///   that would pass `RLIMIT_MEMLOCK` fail with
    ///   [`AllocError::MemlockLimit`](crate::AllocError::MemlockLimit), with nothing leaked.
    /// - **huge** (`.huge()`): 2 MiB pages. Buffers are made of 2 MiB blocks (lengths round up
    ///   to 2 MiB), there is no thread cache, and the arena size rounds up to 2 MiB. The
    ///   backing is chosen when the heap starts: hugetlbfs pages if some are free, else
    ///   transparent huge pages of shared memory if the system allows them, else base pages;
    ///   when hugetlbfs pages run out later, new arenas take the next backing.
    ///   [`SystemHeap::backing`](crate::SystemHeap::backing) reports what the kernel gave.
    /// - **node(N)** (`.node(n)`): memory bound to NUMA node `n` (`mbind(MPOL_BIND)`);
    ///   [`build`](Self::build) fails if the node has no memory.
    ///
    /// The name of the type is the heap's row in the registry's table.
    ///
    /// # Examples
    /// ```
    /// use pagepool::{PoolType, SystemHeap};
    ///
    /// let heap = SystemHeap::builder().pool_type(PoolType::SYSTEM.huge()).build().unwrap();
    /// assert_eq!(heap.alloc(4096).unwrap().len(), 2 << 20, "2 MiB blocks");
    /// assert!(SystemHeap::builder().pool_type(PoolType::SYSTEM.node(4096)).build().is_err());
    /// ```
    pub fn pool_type(mut self, pool_type: PoolType) -> Self {
        self.pool_type = pool_type;
        self
    }

    /// The most memory, in bytes, this heap's pools may hold (default 256 MiB; rounded down to
    /// pages). 0 turns pooling off: every buffer gets fresh pages from the system, and released
    /// buffers go straight back. `usize::MAX` sets no limit of the heap's own (its registry's
    /// maximum still holds); the statistics say `unlimited` (`None` in
    /// [`OwnerStats::limit_pages`](crate::stats::OwnerStats::limit_pages)). Any value is accepted.
    pub fn pool_limit(mut self, bytes: usize) -> Self {
        self.pool_limit = bytes;
        self
    }

    /// The largest buffer the heap hands out, in bytes (default 1 GiB). It must be at least 1
    /// ([`ConfigError::ZeroMaxBuffer`]). It is a ceiling, not a size the heap maps: a value
    /// larger than any system can map (`usize::MAX` among them) means no ceiling of the heap's
    /// own, and an allocation the system cannot map fails with
    /// [`AllocError::Os`](crate::AllocError::Os) (values above `isize::MAX / 2` are kept as
    /// that, a length rounding to pages and blocks cannot overflow from).
    pub fn max_buffer(mut self, bytes: usize) -> Self {
        self.max_buffer = bytes;
        self
    }

    /// The size of one memfd arena in bytes (default 64 MiB; rounded up to pages, to 2 MiB for a
    /// huge pool type): address space, of which memory is used only as blocks are carved; a
    /// larger buffer gets an arena of its own size. After rounding it must be at least the
    /// largest block ([`ConfigError::ArenaTooSmall`]) and at most 64 TiB on a 64-bit system
    /// (half of the 47-bit user address space of x86-64; 1 GiB on a 32-bit one):
    /// [`build`](Self::build) refuses a larger one with [`ConfigError::SizeTooLarge`] rather
    /// than let every allocation fail. A system with less address space (an arm64 kernel with
    /// 39-bit addresses has 512 GiB) refuses an arena it cannot map when the first allocation
    /// needs it, with [`AllocError::Os`](crate::AllocError::Os).
    ///
    /// # Examples
    /// ```
    /// use pagepool::{ConfigError, SystemHeap};
    ///
    /// let b = || SystemHeap::builder().pressure(None);
    /// assert!(b().arena_size(1 << 46).build().is_ok(), "address space only, until carved");
    /// let err = b().arena_size((1 << 46) + 1).build().unwrap_err();
    /// assert_eq!(
    ///     err,
    ///     ConfigError::SizeTooLarge { field: "arena_size", value: (1 << 46) + 1, max: 1 << 46 }
    /// );
    /// ```
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

    /// The most memory, in bytes, queued for the worker at once (default 64 MiB; rounded down to
    /// pages). A release that would pass it is zeroed by the releasing thread instead: 0 has
    /// every release zero its own buffer, `usize::MAX` sets no bound. Any value is accepted.
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
    /// once). While it naps, releases cost no wake-up (a system call on the releasing thread);
    /// each nap costs the worker a timer wake-up (short naps at first, longer ones as idleness
    /// goes on).
    pub fn worker_naps(mut self, d: std::time::Duration) -> Self {
        self.worker_naps = d;
        self
    }

    /// How many bytes of released small buffers each thread keeps for its own next
    /// allocations (default 64 KiB; 0, or less than four pages, turns thread caches off; any
    /// value is accepted).
    /// Buffers of up to a quarter of this (16 KiB by default) made of 4 KiB blocks are cached
    /// still dirty, and zeroed by the allocating thread when taken again: for them, zeroing
    /// costs less than any trip through the shared pools or the worker. A thread's cache is
    /// emptied into the heap when the thread exits (by its thread-local destructors: after
    /// `JoinHandle::join` returns, but possibly after a `std::thread::scope` ends), and at its
    /// next use of the heap after [`SystemHeap::shrink`](crate::SystemHeap::shrink), [`SystemHeap::trim`](crate::SystemHeap::trim),
    /// [`SystemHeap::flush`](crate::SystemHeap::flush) or the heap's drop, which empty the calling thread's cache at once.
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

    /// Whether the machine's load decides, beside the worker's punctuality, when releases zero
    /// their own buffers rather than queue them (default `true`; see
    /// [`SystemHeap`](crate::SystemHeap)). With it, a worker found late starts a hold (releases
    /// zero their own buffers for a while, as with `deferred(false)`) only while more threads
    /// want to run than the machine has CPUs (the running count of `/proc/loadavg`), and
    /// releases go on zeroing their own buffers for as long as that lasts: a nice-19 worker
    /// gets almost no time then. A worker late on a machine with idle cores was kept away by a
    /// passing stall, and releases keep queueing for it. `false` trusts the worker's
    /// punctuality alone: for a process in a container that sees the host's load average but
    /// has cores of its own, or for tests of the worker itself.
    pub fn load_check(mut self, on: bool) -> Self {
        self.load_check = on;
        self
    }

    /// Checks the configuration: the heap's [`Config`] and its pool limit in pages.
    pub(crate) fn check(self) -> Result<(Config, usize), ConfigError> {
        let page = os::page_size();
        let huge = self.pool_type.is_huge();
        let mut orders = if huge && !self.orders_set {
            vec![HUGE_ORDER]
        } else {
            self.orders.clone()
        };
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
        if huge && orders.last() != Some(&HUGE_ORDER) {
            return Err(ConfigError::HugeOrders {
                got: self.orders.clone(),
                min: HUGE_ORDER,
            });
        }
        if !huge && orders.last() != Some(&0) {
            return Err(ConfigError::MissingOrderZero);
        }
        if let Some(node) = self.pool_type.node_id()
            && !crate::attrs::node_has_memory(node)
        {
            return Err(ConfigError::NoSuchNode {
                node,
                available: crate::attrs::nodes_with_memory(),
            });
        }
        if self.max_buffer == 0 {
            return Err(ConfigError::ZeroMaxBuffer);
        }
        // A ceiling above what any system maps is no ceiling: kept where rounding a length to
        // pages and blocks cannot overflow (see `MAX_BUFFER_CEILING`).
        let max_buffer = self.max_buffer.min(MAX_BUFFER_CEILING);
        let unit = if huge { HUGE_PAGE } else { page };
        // `MAX_ARENA_SIZE` is a multiple of `unit`: a size that rounds past it is refused,
        // whether the rounding overflows or not.
        let arena_size = self
            .arena_size
            .checked_next_multiple_of(unit)
            .filter(|&a| a <= MAX_ARENA_SIZE)
            .ok_or(ConfigError::SizeTooLarge {
                field: "arena_size",
                value: self.arena_size,
                max: MAX_ARENA_SIZE,
            })?;
        // Bounded: the order is at most `MAX_ORDER` (checked above), the page a few KiB.
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
        // Measure the machine now (a few milliseconds, once per process), not on the first
        // allocation or release.
        crate::tempo::tempo();
        let config = Config {
            name: self.name,
            orders,
            pool_type: self.pool_type,
            page,
            max_buffer,
            arena_size,
            registry,
            deferred: self.deferred,
            queue_limit: self.queue_limit,
            worker_spin: self.worker_spin,
            worker_naps: self.worker_naps,
            // The thread caches keep buffers of 4 KiB blocks; a huge type has none.
            thread_cache: if huge { 0 } else { self.thread_cache },
            pressure: self.pressure,
            load_check: self.load_check,
        };
        // `usize::MAX` bytes is no limit: kept as `usize::MAX` pages, which the registry and
        // the statistics read as unlimited (not as a number of pages no system holds).
        let limit_pages = match self.pool_limit {
            usize::MAX => usize::MAX,
            bytes => bytes / page,
        };
        Ok((config, limit_pages))
    }
}

/// A checked configuration: what a heap is built from, and rebuilt from in a forked child.
pub(crate) struct Config {
    pub(crate) name: String,
    /// Descending.
    pub(crate) orders: Vec<u8>,
    pub(crate) pool_type: PoolType,
    pub(crate) page: usize,
    pub(crate) max_buffer: usize,
    pub(crate) arena_size: usize,
    pub(crate) registry: Arc<Registry>,
    pub(crate) deferred: bool,
    pub(crate) queue_limit: usize,
    pub(crate) worker_spin: std::time::Duration,
    pub(crate) worker_naps: std::time::Duration,
    pub(crate) thread_cache: usize,
    pub(crate) pressure: Option<PressureConfig>,
    pub(crate) load_check: bool,
}
