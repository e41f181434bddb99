//! The shrinker contract, on its own: the registry's owners and pools, the deferred-free
//! queues and the registry itself implement it, and the pressure monitor drives whatever
//! implementation it is handed, so that neither of those two depends on the other.

/// Something that holds reclaimable memory: the kernel's shrinker contract.
///
/// `count` says how much could be freed, cheaply and without locking everything; `scan` frees up
/// to the amount asked, in whatever units the holder frees (whole blocks, whole buffers), and
/// reports what it actually freed. Pools, owners, the registry and (with deferred freeing) the
/// release queue are shrinkers; the pressure monitor and [`Registry::shrink_all`](crate::registry::Registry::shrink_all) drive them.
/// A [`Registry`](crate::registry::Registry) is one too: its `count` and `scan` are
/// [`count_all`](crate::registry::Registry::count_all) and [`shrink_all`](crate::registry::Registry::shrink_all), which
/// is what a [`PressureMonitor`](crate::pressure::PressureMonitor) it is handed drives.
pub trait Shrinker: Send + Sync {
    /// A short name for reports and logs.
    fn name(&self) -> &str;
    /// Pages that a scan could free now.
    fn count(&self) -> usize;
    /// Frees about `nr_pages` pages (whole units, so possibly a little more; fewer if there is
    /// less to free) and returns the pages freed.
    fn scan(&self, nr_pages: usize) -> usize;
}

/// `s.scan(nr_pages)`, with a shrinker that panics counted as freeing nothing (logged): whoever
/// drives shrinkers (limit enforcement, the pressure response) goes on with the others.
pub(crate) fn scan_caught(s: &dyn Shrinker, nr_pages: usize) -> usize {
    let scan = std::panic::AssertUnwindSafe(|| s.scan(nr_pages));
    std::panic::catch_unwind(scan).unwrap_or_else(|_| {
        log::error!("pagepool: shrinker {:?} panicked", s.name());
        0
    })
}
