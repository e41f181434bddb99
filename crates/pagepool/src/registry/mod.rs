//! The registry of all pools, per-owner limits, one global maximum, and shrinkers.
//!
//! In the kernel series every `drm_page_pool` sat on one global list under one global maximum,
//! with one shrinker. Its reviewers objected that one global maximum makes one user's pool shrink
//! because of another's. Here each user of the pools is an [`Owner`] with its own limit; the
//! [`Registry`] keeps the global maximum and the totals, and can report every owner's share.
//!
//! Limits are enforced after a give: the block goes into its pool first, then every owner over
//! its limit shrinks its own pools, round robin (one block from the next pool in turn), as the
//! kernel's shrinker did; and if the registry is over its maximum it shrinks all owners, each in
//! proportion to what it holds (weighted fair queueing by holdings: see `scan_owners`).
//!
//! This file holds the state: the [`Registry`] and its per-process books, and each [`Owner`]
//! with its limit and its pools; the shrinking policy (which pool gives next, and how much
//! each owner has given) is in `shrink.rs`, the unit tests in `tests.rs`.

use std::fmt;

use crate::fork::ForkCell;
use crate::pool::{PagePool, ReleaseFn, Tally};
use crate::pressure::{PressureConfig, PressureMonitor};
pub use crate::shrinker::Shrinker;
use crate::shrinker::scan_caught;
use crate::stats::{OwnerStats, PressureStats, RegistryStats};
use crate::sync::{Arc, AtomicU64, AtomicUsize, Mutex, Ordering, Weak, lock};

mod shrink;
#[cfg(all(test, not(loom)))]
mod tests;

use shrink::{Unit, scan_owners, scan_round_robin};

/// The registry of pool owners: a global maximum of pooled pages, the total, and the list of
/// shrinkers to run when memory runs short.
///
/// # Examples
/// ```
/// use pagepool::registry::{Registry, Shrinker};
///
/// let registry = Registry::new(1 << 20);
/// let gpu = registry.register("gpu", 4096);
/// let heap = registry.register("system", 8192);
/// assert_eq!(registry.count(), 0);
/// assert_eq!(registry.stats().owners.len(), 2);
/// # drop((gpu, heap));
/// ```
pub struct Registry {
    max_pages: AtomicUsize,
    cursor: AtomicUsize,
    /// The owners, totals, shrinkers and monitor of this process: a forked child starts with
    /// none (its heaps register anew; see [`crate::fork`]).
    books: ForkCell<Arc<Books>>,
}

/// What a registry knows of one process's owners.
struct Books {
    total: AtomicUsize,
    /// The shrink pass of the owner that last gave back to the registry's shrink (see
    /// [`scan_owners`]).
    clock: AtomicU64,
    owners: Mutex<Vec<Weak<Owner>>>,
    shrinkers: Mutex<Vec<Weak<dyn Shrinker>>>,
    monitor: std::sync::Mutex<Option<PressureMonitor>>,
}

impl Books {
    fn new() -> Arc<Books> {
        Arc::new(Books {
            total: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
            owners: Mutex::new(Vec::new()),
            shrinkers: Mutex::new(Vec::new()),
            monitor: std::sync::Mutex::new(None),
        })
    }
}

impl Registry {
    /// Creates a registry whose pools may hold at most `max_pages` pages in total
    /// (`usize::MAX`: no maximum; its [`stats`](Self::stats) say `unlimited`).
    pub fn new(max_pages: usize) -> Arc<Registry> {
        Arc::new(Registry {
            max_pages: AtomicUsize::new(max_pages),
            cursor: AtomicUsize::new(0),
            books: ForkCell::new(Books::new()),
        })
    }

    /// This process's books (fresh ones in a forked child).
    #[inline]
    fn books(&self) -> &Arc<Books> {
        self.books.get(|_| Books::new())
    }

    /// Starts a pressure monitor for this registry unless one runs already; returns whether
    /// one runs now. See [`PressureMonitor::start`].
    pub fn start_monitor(self: &Arc<Self>, config: PressureConfig) -> bool {
        let mut m = self
            .books()
            .monitor
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if m.is_none() {
            *m = PressureMonitor::start(self, config);
        }
        m.is_some()
    }

    /// Runs `monitor` for this registry, replacing (and stopping) any other.
    pub fn set_monitor(&self, monitor: Option<PressureMonitor>) {
        let old = std::mem::replace(
            &mut *self
                .books()
                .monitor
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            monitor,
        );
        drop(old);
    }

    /// The pressure monitor's state and recent events, if one runs.
    pub fn pressure_stats(&self) -> Option<PressureStats> {
        self.books()
            .monitor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(PressureMonitor::stats)
    }

    /// The process-wide registry that heaps use unless told otherwise. Its maximum is a quarter
    /// of physical memory (the kernel's TTM pool defaults to half; a user-space cache should be
    /// more modest).
    #[cfg(not(loom))]
    pub fn global() -> &'static Arc<Registry> {
        static GLOBAL: std::sync::OnceLock<Arc<Registry>> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| {
            let ram = rustix::system::sysinfo();
            let bytes = (ram.totalram as u128 * ram.mem_unit.max(1) as u128 / 4) as usize;
            Registry::new(bytes / crate::os::page_size())
        })
    }

    /// Adds an owner with its own limit of `limit_pages` pooled pages (`usize::MAX`: no limit
    /// of its own, reported as `unlimited`; 0: it pools nothing), of pool type `system`.
    pub fn register(self: &Arc<Self>, name: &str, limit_pages: usize) -> Arc<Owner> {
        self.register_typed(name, "system", limit_pages)
    }

    /// Adds an owner whose pools are of `pool_type` (its row in the registry's table, see
    /// [`RegistryStats`]), with its own limit of `limit_pages` pooled pages.
    ///
    /// # Examples
    /// ```
    /// use pagepool::{pool::Block, registry::Registry};
    ///
    /// let registry = Registry::new(1 << 20);
    /// let gpu = registry.register_typed("gpu", "write-combined", 1024);
    /// let _pool = gpu.add_pool(0, Box::new(|_b: Block| {}));
    /// assert_eq!(registry.stats().pool_types[0].name, "write-combined");
    /// ```
    pub fn register_typed(
        self: &Arc<Self>,
        name: &str,
        pool_type: &str,
        limit_pages: usize,
    ) -> Arc<Owner> {
        let owner = Arc::new(Owner {
            name: name.to_owned(),
            pool_type: pool_type.to_owned(),
            limit: AtomicUsize::new(limit_pages),
            pages: AtomicUsize::new(0),
            pools: Mutex::new(Vec::new()),
            others: Mutex::new(Vec::new()),
            cursor: AtomicUsize::new(0),
            pass: AtomicU64::new(0),
            registry: self.clone(),
            books: self.books().clone(),
        });
        let mut owners = lock(&self.books().owners);
        owners.retain(|o| o.strong_count() > 0);
        owners.push(Arc::downgrade(&owner));
        owner
    }

    /// The global maximum of pooled pages.
    pub fn max_pages(&self) -> usize {
        self.max_pages.load(Ordering::Relaxed)
    }

    /// Changes the global maximum, shrinking the pools at once if they hold more.
    pub fn set_max_pages(&self, max_pages: usize) {
        self.max_pages.store(max_pages, Ordering::Relaxed);
        self.enforce_max();
    }

    /// Adds a shrinker that [`shrink_all`](Self::shrink_all) runs before the pools (the deferred
    /// release queue registers here). The registry holds it weakly: dropping it unregisters it.
    pub fn add_shrinker(&self, shrinker: Weak<dyn Shrinker>) {
        let mut list = lock(&self.books().shrinkers);
        list.retain(|s| s.strong_count() > 0);
        list.push(shrinker);
    }

    /// Pages pooled by all owners together (what the maximum bounds).
    pub fn count(&self) -> usize {
        self.books().total.load(Ordering::Relaxed)
    }

    /// Pages reclaimable through every registered shrinker and every pool.
    pub fn count_all(&self) -> usize {
        self.extra_shrinkers()
            .iter()
            .map(|s| s.count())
            .sum::<usize>()
            + self.count()
    }

    /// Frees about `nr_pages` pages, asking the registered shrinkers first (in the order they
    /// were added), then the owners' pools, each owner in proportion to what it holds (as
    /// when the registry is over its maximum). Returns the pages freed.
    pub fn shrink_all(&self, nr_pages: usize) -> usize {
        let mut freed = 0;
        for s in self.extra_shrinkers() {
            if freed >= nr_pages {
                break;
            }
            freed += scan_caught(&*s, nr_pages - freed);
        }
        if freed < nr_pages {
            freed += self.scan_pools(nr_pages - freed);
        }
        freed
    }

    fn extra_shrinkers(&self) -> Vec<Arc<dyn Shrinker>> {
        lock(&self.books().shrinkers)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    fn live_owners(&self) -> Vec<Arc<Owner>> {
        lock(&self.books().owners)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Shrinks all owners' pools, each owner in proportion to what it holds, if the total is
    /// over the maximum.
    pub(crate) fn enforce_max(&self) {
        let (total, max) = (self.count(), self.max_pages());
        if total > max {
            self.scan_pools(total - max);
        }
    }

    /// A snapshot of every owner's pools and the totals, with one entry per pool type (the
    /// owners' pools of that type summed, per order).
    pub fn stats(&self) -> RegistryStats {
        let owners: Vec<OwnerStats> = self.live_owners().iter().map(|o| o.stats()).collect();
        let total_pages = self.count();
        let other_pages = self.count_all().saturating_sub(total_pages);
        RegistryStats {
            max_pages: crate::stats::limit(self.max_pages()),
            total_pages,
            pool_types: crate::stats::by_pool_type(&owners),
            other_pages,
            owners,
        }
    }
}

impl Registry {
    /// Frees pages from all owners' pools (page pools and others), each owner in proportion
    /// to what it holds (see [`scan_owners`]).
    fn scan_pools(&self, nr_pages: usize) -> usize {
        let owners: Vec<(Arc<Owner>, Vec<Unit>)> = self
            .live_owners()
            .into_iter()
            .map(|o| {
                let units = o.units();
                (o, units)
            })
            .collect();
        scan_owners(&owners, &self.books().clock, &self.cursor, nr_pages)
    }
}

/// The registry as one shrinker, what a [`PressureMonitor`] drives: everything it could free,
/// its registered shrinkers and its pools ([`count_all`](Registry::count_all),
/// [`shrink_all`](Registry::shrink_all)).
impl Shrinker for Registry {
    fn name(&self) -> &str {
        "registry"
    }

    fn count(&self) -> usize {
        self.count_all()
    }

    fn scan(&self, nr_pages: usize) -> usize {
        self.shrink_all(nr_pages)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("max_pages", &self.max_pages())
            .field("total_pages", &self.count())
            .finish_non_exhaustive()
    }
}

/// One user of the pools (a heap, or any other cache of pages), with its own limit.
///
/// An owner's pools count against its limit and against the registry's maximum. When a give
/// takes the owner over its limit, only the owner's own pools shrink.
///
/// # Examples
/// ```
/// use pagepool::{pool::Block, registry::{Registry, Shrinker}};
///
/// let registry = Registry::new(1 << 20);
/// let owner = registry.register("example", 0);
/// let pool = owner.add_pool(0, Box::new(|_b: Block| { /* memory owned elsewhere */ }));
/// assert_eq!(owner.count(), 0);
/// assert_eq!(pool.order(), 0);
/// ```
pub struct Owner {
    name: String,
    pool_type: String,
    limit: AtomicUsize,
    pages: AtomicUsize,
    pools: Mutex<Vec<Weak<PagePool>>>,
    /// Other kinds of pools counting against this owner (see [`Owner::add_other`]).
    others: Mutex<Vec<Weak<dyn Shrinker>>>,
    cursor: AtomicUsize,
    /// Where this owner is in the registry's shrink: how much it has given back for what it
    /// held (see [`scan_owners`]).
    pass: AtomicU64,
    registry: Arc<Registry>,
    /// The registry's books this owner counts in (those of the process that registered it).
    books: Arc<Books>,
}

impl Owner {
    /// Creates a pool of `order` that counts against this owner. `release` gives a block back
    /// to the system. The owner holds the pool weakly: it leaves the owner when dropped.
    pub fn add_pool(self: &Arc<Self>, order: u8, release: ReleaseFn) -> Arc<PagePool> {
        let pool = Arc::new(PagePool::with_tally(
            order,
            release,
            Some(self.clone() as Arc<dyn Tally>),
        ));
        let mut pools = lock(&self.pools);
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(&pool));
        pool
    }

    /// The pool type of the owner's pools (`system` unless registered with
    /// [`Registry::register_typed`]).
    pub fn pool_type(&self) -> &str {
        &self.pool_type
    }

    /// The owner's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The registry this owner belongs to.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The most pages this owner's pools may hold.
    #[inline]
    pub fn limit_pages(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the limit, shrinking this owner's pools at once if they hold more.
    pub fn set_limit_pages(&self, limit_pages: usize) {
        self.limit.store(limit_pages, Ordering::Relaxed);
        self.enforce_limits();
    }

    pub(crate) fn live_pools(&self) -> Vec<Arc<PagePool>> {
        lock(&self.pools).iter().filter_map(Weak::upgrade).collect()
    }

    /// Adds a pool of another kind whose pages count against this owner (it tells the owner of
    /// them with `note_added` and `note_removed`): the owner's limit, the registry's maximum
    /// and the registry's shrink reach it like a page pool, through its `scan`. Held weakly.
    pub(crate) fn add_other(&self, other: Weak<dyn Shrinker>) {
        let mut others = lock(&self.others);
        others.retain(|o| o.strong_count() > 0);
        others.push(other);
    }

    /// This owner's pools of every kind, for scans.
    fn units(&self) -> Vec<Unit> {
        let mut units: Vec<Unit> = self.live_pools().into_iter().map(Unit::Pool).collect();
        units.extend(
            lock(&self.others)
                .iter()
                .filter_map(Weak::upgrade)
                .map(Unit::Other),
        );
        units
    }

    pub(crate) fn note_added(&self, pages: usize) {
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.books.total.fetch_add(pages, Ordering::Relaxed);
    }

    pub(crate) fn note_removed(&self, pages: usize) {
        self.pages.fetch_sub(pages, Ordering::Relaxed);
        self.books.total.fetch_sub(pages, Ordering::Relaxed);
    }

    /// Shrinks this owner's pools to its limit, then the registry's to its maximum.
    pub(crate) fn enforce_limits(&self) {
        let (pages, limit) = (self.count(), self.limit_pages());
        if pages > limit {
            self.scan(pages - limit);
        }
        self.registry.enforce_max();
    }

    /// A snapshot of this owner's pools.
    pub fn stats(&self) -> OwnerStats {
        let mut pools: Vec<_> = self.live_pools().iter().map(|p| p.stats()).collect();
        pools.sort_by_key(|p| p.order);
        OwnerStats {
            name: self.name.clone(),
            pool_type: self.pool_type.clone(),
            limit_pages: crate::stats::limit(self.limit_pages()),
            pages: self.count(),
            pools,
        }
    }
}

impl Shrinker for Owner {
    fn name(&self) -> &str {
        &self.name
    }

    fn count(&self) -> usize {
        self.pages.load(Ordering::Relaxed)
    }

    /// Frees pages from this owner's pools only (of every kind), round robin.
    fn scan(&self, nr_pages: usize) -> usize {
        scan_round_robin(&self.units(), &self.cursor, nr_pages)
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Owner")
            .field("name", &self.name)
            .field("limit_pages", &self.limit_pages())
            .field("pages", &self.count())
            .finish_non_exhaustive()
    }
}

impl Tally for Owner {
    fn added(&self, pages: usize) {
        self.note_added(pages);
    }

    fn removed(&self, pages: usize) {
        self.note_removed(pages);
    }

    fn given(&self) {
        self.enforce_limits();
    }
}
