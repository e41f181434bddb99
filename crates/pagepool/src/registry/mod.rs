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

use std::fmt;

use crate::fork::ForkCell;
use crate::pool::{Block, PagePool, ReleaseFn, Tally};
use crate::pressure::{PressureConfig, PressureMonitor};
pub use crate::shrinker::Shrinker;
use crate::shrinker::scan_caught;
use crate::stats::{OwnerStats, PressureStats, RegistryStats};
use crate::sync::{Arc, AtomicU64, AtomicUsize, Mutex, Ordering, Weak, lock};

/// Something an owner's pages are in: one of its page pools, or another kind of pool that
/// counts against it (a [`DmaBufPool`](crate::dmapool::DmaBufPool)'s clean dma-bufs) and frees its
/// memory through [`Shrinker::scan`].
#[derive(Clone)]
enum Unit {
    Pool(Arc<PagePool>),
    Other(Arc<dyn Shrinker>),
}

impl Unit {
    /// Frees one unit's worth (a block; at least one buffer of another kind of pool); returns
    /// the pages freed.
    fn release_one(&self) -> usize {
        match self {
            Unit::Pool(p) => p.release_one(),
            Unit::Other(s) => scan_caught(&**s, 1),
        }
    }
}

/// One unit's worth taken out of a unit for the registry's shrink: a block not yet given back
/// to the system, or pages another kind of pool has freed already.
enum Taken<'a> {
    Block(&'a PagePool, Block),
    Freed(usize),
}

impl Unit {
    /// Takes one unit's worth out (a block; at least one buffer of another kind of pool, which
    /// frees it at once), or nothing if the unit is empty.
    fn take_one(&self) -> Option<Taken<'_>> {
        match self {
            Unit::Pool(p) => p.take().map(|b| Taken::Block(p, b)),
            Unit::Other(s) => match scan_caught(&**s, 1) {
                0 => None,
                f => Some(Taken::Freed(f)),
            },
        }
    }
}

impl Taken<'_> {
    /// The pages taken.
    fn pages(&self) -> usize {
        match self {
            Taken::Block(_, b) => 1 << b.order(),
            Taken::Freed(f) => *f,
        }
    }

    /// Gives what was taken back to the system.
    fn release(self) {
        if let Taken::Block(p, b) = self {
            p.release_taken(b);
        }
    }
}

/// Takes one unit's worth from the first of `units`, round robin from `cursor`, that has
/// something; `None` if a whole round found nothing.
fn take_round_robin<'a>(units: &'a [Unit], cursor: &AtomicUsize) -> Option<Taken<'a>> {
    (0..units.len()).find_map(|_| {
        let i = cursor.fetch_add(1, Ordering::Relaxed) % units.len();
        units[i].take_one()
    })
}

/// Scans `units` round robin from `cursor`: one block (or buffer) from a unit, then the next,
/// until `nr_pages` are freed or a whole round frees nothing.
fn scan_round_robin(units: &[Unit], cursor: &AtomicUsize, nr_pages: usize) -> usize {
    let n = units.len();
    let (mut freed, mut idle) = (0, 0);
    while freed < nr_pages && idle < n {
        let i = cursor.fetch_add(1, Ordering::Relaxed) % n;
        match units[i].release_one() {
            0 => idle += 1,
            f => {
                freed += f;
                idle = 0;
            }
        }
    }
    freed
}

/// What one unit of an owner's shrink pass is worth: its pass is the natural logarithm of how
/// many times over what it holds now it held, in units of `1 / PASS_SCALE`.
const PASS_SCALE: f64 = (1u64 << 20) as f64;

/// How far an owner's pass moves when it gives back `f` of the `held` pages it holds:
/// `ln(held / (held - f))`; `None` for its last pages (giving them back is infinitely far).
fn stride(held: usize, f: usize) -> Option<u64> {
    (f < held).then(|| ((held as f64 / (held - f) as f64).ln() * PASS_SCALE) as u64)
}

impl Unit {
    /// The pages the next unit's worth taken from this unit would free, if it holds any: a
    /// block; one page for another kind of pool (its buffers' sizes are its own).
    fn next_pages(&self) -> Option<usize> {
        match self {
            Unit::Pool(p) => (p.pages() > 0).then(|| 1 << p.order()),
            Unit::Other(s) => (s.count() > 0).then_some(1),
        }
    }
}

/// The pages the next unit's worth that [`take_round_robin`] would take from `units` frees, if
/// they hold any.
fn next_pages(units: &[Unit], cursor: &AtomicUsize) -> Option<usize> {
    let c = cursor.load(Ordering::Relaxed);
    (0..units.len()).find_map(|k| units[c.wrapping_add(k) % units.len()].next_pages())
}

/// Frees about `nr_pages` from `owners` (each with its pools of every kind), one block (or
/// buffer) at a time, each from the owner that keeps the largest part of what it held after
/// giving it: weighted fair queueing by holdings. Every owner has a *pass*, how far it has
/// shrunk: giving back `f` of the `held` pages it holds moves it by `ln(held / (held - f))`,
/// so that an owner's pass over a run of shrinks is the logarithm of how many times over it
/// held what it holds now. The next block comes from the owner whose pass would be lowest
/// after giving its next block (ties in turn from `cursor`; an owner's last block only when
/// every other's is its last too). So owners keep the same part of what they held, within
/// one block, whatever the size of their blocks; and shrinks smaller than a block of each
/// still share fairly over several shrinks, as passes carry over from one to the next.
/// `clock` is the lowest pass among the owners that held something at the end of the last
/// shrink; an owner whose pass is behind it (it held nothing while others gave) starts from
/// it, so that it does not pay for shrinks from before it had pages.
///
/// The turn is charged when the block is taken, before it goes back to the system (which
/// takes a while: `munlock`, a hole punched), so that concurrent shrinks choose by passes that
/// count it. Whole blocks (buffers of another kind of pool): less than one more than asked is
/// freed (one per racing caller).
/// Within an owner, its pools give in turn (its own round robin).
fn scan_owners(
    owners: &[(Arc<Owner>, Vec<Unit>)],
    clock: &AtomicU64,
    cursor: &AtomicUsize,
    nr_pages: usize,
) -> usize {
    let mut live: Vec<&(Arc<Owner>, Vec<Unit>)> =
        owners.iter().filter(|(_, u)| !u.is_empty()).collect();
    if live.is_empty() || nr_pages == 0 {
        return 0;
    }
    let now = clock.load(Ordering::Relaxed);
    for (o, _) in &live {
        o.pass.fetch_max(now, Ordering::Relaxed);
    }
    let start = cursor.fetch_add(1, Ordering::Relaxed);
    let mut freed = 0;
    while freed < nr_pages && !live.is_empty() {
        let n = live.len();
        let i = if n == 1 {
            0
        } else {
            // Each owner's pass after its next block (`u64::MAX` for one that holds nothing,
            // far ahead for its last block); the first lowest, counting from this shrink's
            // turn.
            let after = |(o, units): &(Arc<Owner>, Vec<Unit>)| match next_pages(units, &o.cursor) {
                None => u64::MAX,
                Some(b) => o
                    .pass
                    .load(Ordering::Relaxed)
                    .saturating_add(stride(o.count(), b).unwrap_or(u64::MAX / 2)),
            };
            (0..n)
                .map(|k| start.wrapping_add(k) % n)
                .min_by_key(|&i| after(live[i]))
                .unwrap_or(0)
        };
        let (owner, units) = live[i];
        let held = owner.count();
        match take_round_robin(units, &owner.cursor) {
            None => {
                live.swap_remove(i);
            }
            Some(taken) => {
                let f = taken.pages();
                // An owner's last pages move it nowhere: it is out of the shrink until it
                // holds some again, and then starts from the clock.
                owner
                    .pass
                    .fetch_add(stride(held, f).unwrap_or(0), Ordering::Relaxed);
                taken.release();
                freed += f;
            }
        }
    }
    // The clock: the lowest pass among the owners that hold something (not that of the owner
    // that gave last, which may be ahead of others that wait for their turn).
    let holding = live.iter().filter(|(o, _)| o.count() > 0);
    if let Some(min) = holding.map(|(o, _)| o.pass.load(Ordering::Relaxed)).min() {
        clock.fetch_max(min, Ordering::Relaxed);
    }
    freed
}

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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::pool::Block;
    use std::alloc::{Layout, alloc_zeroed, dealloc};
    use std::ptr::NonNull;

    fn layout(order: u8) -> Layout {
        Layout::from_size_align(4096 << order, 4096).unwrap()
    }
    fn block(order: u8) -> Block {
        // SAFETY: a fresh zeroed allocation, freed by `free` with the same layout.
        unsafe { Block::from_raw(NonNull::new(alloc_zeroed(layout(order))).unwrap(), order) }
    }
    fn free() -> ReleaseFn {
        Box::new(|b: Block| {
            let o = b.order();
            // SAFETY: every block here comes from `block`.
            unsafe { dealloc(b.into_raw().as_ptr(), layout(o)) }
        })
    }

    #[test]
    fn owner_limit_shrinks_only_that_owner() {
        let reg = Registry::new(1000);
        let a = reg.register("a", 4);
        let b = reg.register("b", 100);
        let pa = a.add_pool(0, free());
        let pb = b.add_pool(1, free());
        for _ in 0..10 {
            pb.give(block(1)).unwrap();
        }
        for _ in 0..6 {
            pa.give(block(0)).unwrap();
        }
        assert_eq!(a.count(), 4, "give first, then shrink to the limit");
        assert_eq!(b.count(), 20, "the other owner is untouched");
        assert_eq!(reg.count(), 24);
        assert_eq!(pa.stats().released, 2);
        let s = reg.stats();
        assert_eq!(s.total_pages, 24);
        assert_eq!(s.owners.iter().map(|o| o.pages).sum::<usize>(), 24);
    }

    #[test]
    fn lowering_a_limit_shrinks_at_once() {
        let reg = Registry::new(1000);
        let a = reg.register("a", 100);
        let p = a.add_pool(1, free());
        for _ in 0..10 {
            p.give(block(1)).unwrap();
        }
        assert_eq!(a.count(), 20);
        a.set_limit_pages(6);
        assert_eq!((a.limit_pages(), a.count()), (6, 6));
        assert_eq!(reg.count(), 6);
    }

    #[test]
    fn global_max_shrinks_round_robin() {
        let reg = Registry::new(1000);
        let a = reg.register("a", 1000);
        let p0 = a.add_pool(0, free());
        let p2 = a.add_pool(2, free());
        for _ in 0..8 {
            p0.give(block(0)).unwrap();
            p2.give(block(2)).unwrap();
        }
        assert_eq!(reg.count(), 40);
        reg.set_max_pages(30);
        assert!(reg.count() <= 30);
        assert!(p0.blocks() < 8 && p2.blocks() < 8, "both pools gave blocks");
        let f = reg.scan(5);
        assert!(
            (5..9).contains(&f),
            "whole blocks: at most one block over, got {f}"
        );
    }

    type OwnerPool = (Arc<Owner>, Arc<PagePool>);

    /// Owner `a` holds 100 pages in 4 KiB blocks, `b` 800 pages in 16 KiB blocks, on a
    /// registry whose maximum lets them hold all of it.
    fn two_owners() -> (Arc<Registry>, OwnerPool, OwnerPool) {
        let reg = Registry::new(1000);
        let a = reg.register("a", 1000);
        let b = reg.register("b", 1000);
        let pa = a.add_pool(0, free());
        let pb = b.add_pool(2, free());
        for _ in 0..100 {
            pa.give(block(0)).unwrap();
        }
        for _ in 0..200 {
            pb.give(block(2)).unwrap();
        }
        assert_eq!((a.count(), b.count()), (100, 800));
        (reg, (a, pa), (b, pb))
    }

    #[test]
    fn global_max_shrinks_owners_in_proportion_to_what_they_hold() {
        let (reg, (a, _pa), (b, _pb)) = two_owners();
        // A fifth of what they hold may stay: each keeps a fifth of its own, within a block
        // (one block at a time, not one from each in turn: that would empty `a`, whose blocks
        // are the smaller, long before `b`).
        reg.set_max_pages(180);
        assert!(reg.count() <= 180);
        let (ka, kb) = (a.count(), b.count());
        assert!((19..=21).contains(&ka), "a keeps about 20 of 100: {ka}");
        assert!((156..=164).contains(&kb), "b keeps about 160 of 800: {kb}");
    }

    #[test]
    fn repeated_small_shrinks_are_shared_in_proportion() {
        let (reg, (a, _pa), (b, _pb)) = two_owners();
        // Fifty small shrinks, each smaller than most of a round: shared by what each holds
        // over all of them (the turn carries over from one shrink to the next), so both keep
        // the same part of what they held.
        let mut freed = 0;
        for _ in 0..50 {
            freed += reg.scan(5);
        }
        let (ka, kb) = (a.count(), b.count());
        assert_eq!(ka + kb + freed, 900);
        let kept = (ka + kb) as f64 / 900.0;
        let (fa, fb) = (ka as f64 / 100.0, kb as f64 / 800.0);
        assert!(
            (fa - kept).abs() < 0.03 && (fb - kept).abs() < 0.03,
            "a kept {ka} of 100, b {kb} of 800 ({kept:.2} of all)"
        );
    }

    #[test]
    fn an_owner_that_was_empty_does_not_pay_for_shrinks_before_it_joined() {
        let (reg, (a, pa), (b, _pb)) = two_owners();
        // `b` alone gives back for a while; then `a` fills again: from then on they share.
        pa.shrink(usize::MAX);
        assert_eq!(reg.scan(400), 400);
        assert_eq!(b.count(), 400);
        for _ in 0..100 {
            pa.give(block(0)).unwrap();
        }
        reg.set_max_pages(250);
        let (ka, kb) = (a.count(), b.count());
        assert!((49..=51).contains(&ka), "a keeps about 50 of 100: {ka}");
        assert!((196..=204).contains(&kb), "b keeps about 200 of 400: {kb}");
    }

    #[test]
    fn concurrent_shrinks_share_in_proportion() {
        let (reg, (a, _pa), (b, _pb)) = two_owners();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    while reg.count() > 300 {
                        reg.scan(3);
                    }
                });
            }
        });
        let (ka, kb) = (a.count(), b.count());
        let kept = (ka + kb) as f64 / 900.0;
        let (fa, fb) = (ka as f64 / 100.0, kb as f64 / 800.0);
        assert!(
            (fa - kept).abs() < 0.1 && (fb - kept).abs() < 0.1,
            "a kept {ka} of 100, b {kb} of 800 ({kept:.2} of all)"
        );
    }

    struct Fixed(AtomicUsize);
    impl Shrinker for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn count(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
        fn scan(&self, nr: usize) -> usize {
            let n = nr.min(self.count());
            self.0.fetch_sub(n, Ordering::Relaxed);
            n
        }
    }

    /// Another kind of pool counting against an owner: `n` units of 4 pages, freed by `scan`.
    struct Other {
        owner: Arc<Owner>,
        units: AtomicUsize,
    }
    impl Shrinker for Other {
        fn name(&self) -> &str {
            "other"
        }
        fn count(&self) -> usize {
            self.units.load(Ordering::Relaxed) * 4
        }
        fn scan(&self, nr_pages: usize) -> usize {
            let mut freed = 0;
            while freed < nr_pages && self.units.load(Ordering::Relaxed) > 0 {
                self.units.fetch_sub(1, Ordering::Relaxed);
                self.owner.note_removed(4);
                freed += 4;
            }
            freed
        }
    }

    #[test]
    fn other_kinds_of_pools_are_shrunk_like_page_pools() {
        let reg = Registry::new(1000);
        let a = reg.register("a", 1000);
        let p = a.add_pool(0, free());
        for _ in 0..8 {
            p.give(block(0)).unwrap();
        }
        let b = reg.register("b", 1000);
        let other = Arc::new(Other {
            owner: b.clone(),
            units: AtomicUsize::new(4),
        });
        b.note_added(16);
        let weak: Weak<dyn Shrinker> = Arc::downgrade(&(other.clone() as Arc<dyn Shrinker>));
        b.add_other(weak);
        assert_eq!(reg.count(), 24);
        // Over a maximum of 16: both owners give, each for what it holds (not only a's page
        // pool).
        reg.set_max_pages(16);
        assert!(reg.count() <= 16);
        assert!(
            other.units.load(Ordering::Relaxed) < 4,
            "the other pool gave"
        );
        assert!(p.pages() < 8, "the page pool gave");
        // An owner's own limit reaches it too.
        b.set_limit_pages(4);
        assert!(b.count() <= 4);
        assert_eq!(reg.count_all(), reg.count(), "counted once");
        // The registry's shrink frees everything, the other pool included.
        let left = reg.count_all();
        assert_eq!(reg.shrink_all(usize::MAX), left);
        assert_eq!(reg.count(), 0);
        assert_eq!(other.units.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn shrink_all_asks_extra_shrinkers_first() {
        let reg = Registry::new(1000);
        let a = reg.register("a", 1000);
        let p = a.add_pool(0, free());
        for _ in 0..5 {
            p.give(block(0)).unwrap();
        }
        let extra: Arc<dyn Shrinker> = Arc::new(Fixed(AtomicUsize::new(3)));
        reg.add_shrinker(Arc::downgrade(&extra));
        assert_eq!(reg.count_all(), 8);
        assert_eq!(reg.shrink_all(4), 4);
        assert_eq!(extra.count(), 0, "extra shrinker emptied first");
        assert_eq!(p.pages(), 4);
        drop(extra);
        assert_eq!(reg.count_all(), 4, "dropped shrinkers unregister");
    }
}
