//! A heap's statistics, assembled from its counters, its caches, its queue, its arenas and
//! its registry: the one place that knows where each figure of [`HeapStats`] comes from.

use crate::heap::core::HeapInner;
use crate::stats::HeapStats;
use crate::sync::Ordering;

/// A snapshot of `h`'s statistics.
pub(super) fn assemble(h: &HeapInner) -> HeapStats {
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
        registry_max_pages: crate::stats::limit(registry.max_pages()),
        registry_total_pages: total,
        other_owners_pages: total.saturating_sub(owner.pages),
        peak_pooled_pages: c.peak_pooled.load(Ordering::Relaxed),
        allocs,
        hits: c.hits.load(Ordering::Relaxed),
        misses: c.misses.load(Ordering::Relaxed),
        fresh_pages: h.arenas.fresh_pages.load(Ordering::Relaxed),
        released_pages: h.arenas.released_pages.load(Ordering::Relaxed),
        reclaimed_pages: c.reclaimed.load(Ordering::Relaxed),
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
        queue_refused: h.handoff.as_ref().map_or(0, |l| l.queue().refused()),
        exported: c.exported.load(Ordering::Relaxed),
        exports_held_at_release: c.exports_held.load(Ordering::Relaxed),
        worker_bytes: c.worker.bytes.load(Ordering::Relaxed),
        worker_nanos: c.worker.nanos.load(Ordering::Relaxed),
        caller_zeroed_bytes: c.caller_bytes.load(Ordering::Relaxed),
        queued_pages: h.handoff.as_ref().map_or(0, |l| l.queue().pending_pages()),
        peak_queued_pages: h.handoff.as_ref().map_or(0, |l| l.queue().peak_pages()),
        queue_limit_pages: h.handoff.as_ref().map_or(0, |l| l.queue().max_pages()),
        pressure_freed_pages: h.handoff.as_ref().map_or(0, |l| l.queue().pressure_pages()),
        pressure: registry.pressure_stats(),
        arenas: h.arenas.count(),
        pool_type: h.arenas.pool_type(),
        huge_backing: h.arenas.huge_backing(),
        owner,
    }
}
