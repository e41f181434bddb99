//! Statistics: one set of definitions for the text report and the structured (serde) output.
//!
//! Pooled pages are memory the process holds: they are reported as *pooled*, separately, never
//! as free memory (the kernel reviewers' demand, like `/proc/slabinfo` for caches).
//! [`render_table`] draws the shape of TTM's debugfs `page_pool` file: one row per owner, one
//! column per order, then `total : N of MAX` and a line for pages held by other owners.

use std::fmt::{self, Write as _};

/// One pool's contents and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct PoolStats {
    /// The pool's block order (blocks of 2^order pages).
    pub order: u8,
    /// Pages pooled now.
    pub pages: usize,
    /// Blocks pooled now.
    pub blocks: usize,
    /// Blocks given to the pool since it was created.
    pub given: u64,
    /// Blocks taken out of the pool (by users and by shrinking) since it was created.
    pub taken: u64,
    /// Blocks the pool gave back to the system (shrinking) since it was created.
    pub released: u64,
}

/// One owner's pools.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct OwnerStats {
    /// The owner's name.
    pub name: String,
    /// The owner's limit in pages.
    pub limit_pages: usize,
    /// Pages pooled by this owner now.
    pub pages: usize,
    /// Each pool, by ascending order.
    pub pools: Vec<PoolStats>,
}

/// Every owner of a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct RegistryStats {
    /// The registry's global maximum in pages.
    pub max_pages: usize,
    /// Pages pooled by all owners now.
    pub total_pages: usize,
    /// Each live owner.
    pub owners: Vec<OwnerStats>,
}

/// A heap's statistics: its pools, where its blocks came from, where they went.
///
/// Page counts are in pages of [`page_size`](Self::page_size) bytes. The accounting invariant,
/// tested by the property tests: `fresh_pages == pooled pages + live_pages + released_pages`
/// (every page obtained from the system is pooled, in a live buffer, or given back).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct HeapStats {
    /// The size of a page in bytes.
    pub page_size: usize,
    /// This heap's pools (as an owner of the registry).
    pub owner: OwnerStats,
    /// The registry's maximum in pages.
    pub registry_max_pages: usize,
    /// Pages pooled by every owner of the registry.
    pub registry_total_pages: usize,
    /// Pages pooled by the registry's other owners.
    pub other_owners_pages: usize,
    /// The most pages this heap's pools have held at once.
    pub peak_pooled_pages: usize,
    /// Buffers allocated.
    pub allocs: u64,
    /// Blocks taken from a pool (clean, nothing to do).
    pub hits: u64,
    /// Blocks that had to come from the system.
    pub misses: u64,
    /// Pages obtained from the system (each zeroed by the kernel).
    pub fresh_pages: u64,
    /// Pages given back to the system.
    pub released_pages: u64,
    /// Buffers alive now.
    pub live_buffers: u64,
    /// Pages in buffers alive now.
    pub live_pages: u64,
    /// Allocations served from a thread's cache of small buffers (not counted in `hits`).
    pub cache_hits: u64,
    /// Pages held in threads' caches of small buffers now (released, dirty; see
    /// [`HeapBuilder::thread_cache`](crate::HeapBuilder::thread_cache)).
    pub thread_cached_pages: usize,
    /// Buffers whose blocks were already contiguous (handed out with no mapping work).
    pub contiguous: u64,
    /// Buffers that needed a view mapping to make their blocks contiguous.
    pub remapped: u64,
    /// Blocks zeroed and pooled by a thread other than the worker without being handed out:
    /// on release (deferred freeing off, the queue at its bound, or the worker without a core),
    /// and queued blocks an allocation took and gave back (see `SystemHeap::alloc`).
    pub zeroed_sync: u64,
    /// Blocks zeroed by the background worker.
    pub zeroed_worker: u64,
    /// Dirty blocks zeroed inline by an allocation: queued blocks taken by an allocation that
    /// missed its pool, and blocks taken from a thread cache.
    pub zeroed_inline: u64,
    /// Times an allocation waited (briefly, spinning) for blocks the worker was zeroing and
    /// they landed in time.
    pub waited_for_worker: u64,
    /// Runs an allocation zeroed with the worker's help and gave up on, because the worker did
    /// not finish its stripe in time (on a busy machine the nice-19 worker may not run for a
    /// long while): the allocation took other memory, and the worker pooled the run later.
    pub abandoned_to_worker: u64,
    /// Released buffers the queue refused (its bound reached, or its lock held by a worker
    /// that was not running): the releasing thread zeroed them itself.
    pub queue_refused: u64,
    /// Times such an allocation took stripes of the worker's claim and zeroed them too.
    pub helped_worker: u64,
    /// Buffers exported as dma-bufs ([`Buffer::export`](crate::Buffer::export)).
    pub exported: u64,
    /// [`ExportedBuffer`](crate::ExportedBuffer)s dropped while their dma-buf was still
    /// referenced elsewhere (another descriptor, a mapping, another process): their memory went
    /// back to the system instead of the pools.
    pub exports_held_at_release: u64,
    /// Bytes the worker zeroed itself: its share of the runs it claimed (allocations may help
    /// with them) and of runs allocations shared with it.
    pub worker_bytes: u64,
    /// Nanoseconds the worker spent zeroing them (not waiting for helpers).
    pub worker_nanos: u64,
    /// Pages queued for the worker or being zeroed by it now.
    pub queued_pages: usize,
    /// The most pages queued or being zeroed at once.
    pub peak_queued_pages: usize,
    /// The queue's bound in pages (0 when releases are synchronous).
    pub queue_limit_pages: usize,
    /// Queued pages given back to the system unzeroed under memory pressure.
    pub pressure_freed_pages: u64,
    /// The registry's pressure monitor (source, events), if one runs.
    pub pressure: Option<PressureStats>,
    /// Memfd arenas mapped now.
    pub arenas: usize,
}

impl HeapStats {
    /// Pages pooled by this heap now.
    pub fn pooled_pages(&self) -> usize {
        self.owner.pages
    }

    /// The worker's zeroing throughput in bytes per second (0 before it has zeroed anything).
    pub fn worker_bytes_per_sec(&self) -> f64 {
        if self.worker_nanos == 0 {
            0.0
        } else {
            self.worker_bytes as f64 * 1e9 / self.worker_nanos as f64
        }
    }
}

/// Renders pools in the shape of TTM's debugfs `page_pool` file: a header with one column per
/// order, one row per owner with the pages pooled at each order, then `total : N of MAX` and,
/// when given, `(N in other owners' pools)`.
///
pub(crate) fn render_table(
    owners: &[OwnerStats],
    total: usize,
    max: usize,
    others: Option<usize>,
) -> String {
    let mut orders: Vec<u8> = owners
        .iter()
        .flat_map(|o| o.pools.iter().map(|p| p.order))
        .collect();
    orders.sort_unstable();
    orders.dedup();
    let name_w = owners
        .iter()
        .map(|o| o.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let mut out = String::new();
    let _ = write!(out, "{:name_w$}  ", "");
    for o in &orders {
        let _ = write!(out, " ---{o:>2}---");
    }
    out.push('\n');
    for owner in owners {
        let _ = write!(out, "{:name_w$} :", owner.name);
        for o in &orders {
            let pages = owner
                .pools
                .iter()
                .find(|p| p.order == *o)
                .map_or(0, |p| p.pages);
            let _ = write!(out, " {pages:>8}");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "{:name_w$} : {total} of {max}", "total");
    if let Some(n) = others {
        let _ = writeln!(out, "({n} in other owners' pools)");
    }
    out
}

impl fmt::Display for RegistryStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render_table(
            &self.owners,
            self.total_pages,
            self.max_pages,
            None,
        ))
    }
}

impl fmt::Display for HeapStats {
    /// The pool table, then one line of counters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render_table(
            std::slice::from_ref(&self.owner),
            self.registry_total_pages,
            self.registry_max_pages,
            Some(self.other_owners_pages),
        ))?;
        writeln!(
            f,
            "allocs {} hits {} misses {} thread-cache hits {} (holding {} pages) fresh pages {} \
             released pages {} live buffers {} ({} pages) contiguous {} remapped {} arenas {} \
             peak pooled pages {}",
            self.allocs,
            self.hits,
            self.misses,
            self.cache_hits,
            self.thread_cached_pages,
            self.fresh_pages,
            self.released_pages,
            self.live_buffers,
            self.live_pages,
            self.contiguous,
            self.remapped,
            self.arenas,
            self.peak_pooled_pages,
        )?;
        writeln!(
            f,
            "zeroed: by worker {} inline {} on release {}; waited for worker {} (helped {}); \
             abandoned {}; queued pages {} (peak {} of {}, refused {}); freed under pressure {} \
             pages; worker {:.2} GB/s",
            self.zeroed_worker,
            self.zeroed_inline,
            self.zeroed_sync,
            self.waited_for_worker,
            self.helped_worker,
            self.abandoned_to_worker,
            self.queued_pages,
            self.peak_queued_pages,
            self.queue_limit_pages,
            self.queue_refused,
            self.pressure_freed_pages,
            self.worker_bytes_per_sec() / 1e9,
        )?;
        if let Some(p) = &self.pressure {
            writeln!(
                f,
                "pressure monitor: {} {}; {} events released {} pages{}",
                p.source.as_deref().unwrap_or("no PSI"),
                p.watermark
                    .as_deref()
                    .map_or(String::new(), |w| format!("+ watermark {w}")),
                p.events,
                p.pages_released,
                if p.errors.is_empty() {
                    String::new()
                } else {
                    format!("; errors: {}", p.errors.join("; "))
                },
            )?;
        }
        Ok(())
    }
}

/// One response to memory pressure.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct PressureEvent {
    /// When it happened, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// What signalled it (`psi ...`, `watermark`, or an injected source's description).
    pub source: String,
    /// Pages released (queued and pooled).
    pub pages_released: usize,
    /// How long releasing took, in microseconds.
    pub micros: u64,
}

/// The monitor's state and history.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct PressureStats {
    /// The signal source in use (`None` when only the watermark, or nothing, is watched).
    pub source: Option<String>,
    /// The watermark in use, as `usage file > limit x fraction`.
    pub watermark: Option<String>,
    /// Problems met while setting up or running (a PSI file that could not be used, ...).
    pub errors: Vec<String>,
    /// Responses so far.
    pub events: u64,
    /// Pages released by all responses so far.
    pub pages_released: u64,
    /// The most recent responses (up to 32), oldest first.
    pub recent: Vec<PressureEvent>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_ttms_shape() {
        let pool = PoolStats {
            order: 0,
            pages: 3,
            blocks: 3,
            given: 3,
            taken: 0,
            released: 0,
        };
        let owner = OwnerStats {
            name: "system".into(),
            limit_pages: 10,
            pages: 3,
            pools: vec![pool],
        };
        let text = render_table(&[owner], 3, 100, Some(5));
        assert!(text.contains("total"));
        assert!(text.contains("3 of 100"));
        assert!(text.contains("(5 in other owners' pools)"));
    }
}
