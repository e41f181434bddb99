//! Statistics: one set of definitions for the text report and the structured (serde) output.
//!
//! Pooled pages are memory the process holds: they are reported as *pooled*, separately, never
//! as free memory (the kernel reviewers' demand, like `/proc/slabinfo` for caches).
//! `render_table` draws the shape of TTM's debugfs `page_pool` file: one row per pool type
//! (per owner in a heap's own stats), one column per order, then `total : N of MAX` and a line
//! for pages held by other owners.
//!
//! A maximum or limit of `usize::MAX` pages ([`Registry::new(usize::MAX)`](crate::registry::Registry::new),
//! an owner registered with `usize::MAX`, [`HeapBuilder::pool_limit(usize::MAX)`](crate::HeapBuilder::pool_limit))
//! is no limit: the structured stats hold `None` for it (`null` in JSON), and the text says
//! `unlimited` (`total : 0 of unlimited`), never a number of pages no system holds.

use std::fmt::{self, Write as _};

pub use crate::os::mapping_count;
pub use crate::tempo::{Tempo, tempo};

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
    /// The pool type of its pools (see [`Registry::register_typed`](crate::registry::Registry::register_typed)).
    pub pool_type: String,
    /// The owner's limit in pages; `None`: unlimited (registered with `usize::MAX`; serialised
    /// as `null`).
    pub limit_pages: Option<usize>,
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
    /// The registry's global maximum in pages; `None`: unlimited (`Registry::new(usize::MAX)`;
    /// serialised as `null`).
    pub max_pages: Option<usize>,
    /// Pages pooled by all owners now.
    pub total_pages: usize,
    /// Each live owner.
    pub owners: Vec<OwnerStats>,
    /// Each pool type with live owners, in the order first registered: its owners' pools
    /// summed per order.
    pub pool_types: Vec<PoolTypeStats>,
    /// Pages held by the registry's other shrinkers (buffers queued for a worker, pools of
    /// dma-bufs): what it could free besides its page pools.
    pub other_pages: usize,
}

/// The pools of one pool type, over all owners of that type.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct PoolTypeStats {
    /// The pool type's name (`system`, `locked`, `huge`, `node1`, ...).
    pub name: String,
    /// Owners of this type.
    pub owners: usize,
    /// Pages pooled now.
    pub pages: usize,
    /// One entry per order: the owners' pools of that order summed (counters included).
    pub pools: Vec<PoolStats>,
}

/// A maximum or limit in pages as the stats report it: `usize::MAX` is unlimited (`None`).
pub(crate) fn limit(pages: usize) -> Option<usize> {
    (pages != usize::MAX).then_some(pages)
}

/// A maximum or limit as text: the number, or `unlimited`.
struct Limit(Option<usize>);

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("unlimited"),
        }
    }
}

/// Groups owners' pools by pool type, summing them per order.
pub(crate) fn by_pool_type(owners: &[OwnerStats]) -> Vec<PoolTypeStats> {
    let mut out: Vec<PoolTypeStats> = Vec::new();
    for o in owners {
        let i = match out.iter().position(|t| t.name == o.pool_type) {
            Some(i) => i,
            None => {
                out.push(PoolTypeStats {
                    name: o.pool_type.clone(),
                    owners: 0,
                    pages: 0,
                    pools: Vec::new(),
                });
                out.len() - 1
            }
        };
        let t = &mut out[i];
        t.owners += 1;
        t.pages += o.pages;
        for p in &o.pools {
            match t.pools.iter_mut().find(|q| q.order == p.order) {
                Some(q) => {
                    q.pages += p.pages;
                    q.blocks += p.blocks;
                    q.given += p.given;
                    q.taken += p.taken;
                    q.released += p.released;
                }
                None => t.pools.push(p.clone()),
            }
        }
        t.pools.sort_by_key(|p| p.order);
    }
    out
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
    /// The heap's pool type (see [`HeapBuilder::pool_type`](crate::HeapBuilder::pool_type)).
    pub pool_type: crate::PoolType,
    /// For a huge pool type, the backing new arenas get now (hugetlbfs falls back when its
    /// pages run out); `None` otherwise. What the kernel actually gave is in
    /// [`SystemHeap::backing`](crate::SystemHeap::backing).
    pub huge_backing: Option<crate::HugeBacking>,
    /// This heap's pools (as an owner of the registry).
    pub owner: OwnerStats,
    /// The registry's maximum in pages; `None`: unlimited (`Registry::new(usize::MAX)`;
    /// serialised as `null`).
    pub registry_max_pages: Option<usize>,
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
    /// Pooled and queued pages given back to the system to make room for an allocation that
    /// the system refused at first for want of it (`RLIMIT_MEMLOCK`, `ENOMEM`); pooled pages
    /// among them are in `released_pages` too, queued ones in `pressure_freed_pages`.
    pub reclaimed_pages: u64,
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
    /// Bytes zeroed by every other thread: allocations (queued blocks they took, their share
    /// of runs zeroed with the worker, blocks from a thread cache) and releases that zeroed
    /// their own buffers. With [`worker_bytes`](Self::worker_bytes), the worker's share of the
    /// zeroing ([`worker_share`](Self::worker_share)).
    pub caller_zeroed_bytes: u64,
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

    /// The share of the bytes this heap zeroed that the worker zeroed, from 0 to 1; `None`
    /// before anything was zeroed.
    ///
    /// # Examples
    /// ```
    /// let heap = pagepool::SystemHeap::builder().deferred(false).build()?;
    /// drop(heap.alloc(1 << 20)?); // zeroed on release, by the releasing thread
    /// assert_eq!(heap.stats().worker_share(), Some(0.0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn worker_share(&self) -> Option<f64> {
        let all = self.worker_bytes.saturating_add(self.caller_zeroed_bytes);
        (all > 0).then(|| self.worker_bytes as f64 / all as f64)
    }
}

/// Renders pools in the shape of TTM's debugfs `page_pool` file: a header with one column per
/// order, one row per owner with the pages pooled at each order, then `total : N of MAX`
/// (`MAX` is `unlimited` for `None`) and, when given, `(N in other owners' pools)`.
pub(crate) fn render_table(
    rows: &[(&str, &[PoolStats])],
    total: usize,
    max: Option<usize>,
    others: Option<usize>,
) -> String {
    let mut orders: Vec<u8> = rows
        .iter()
        .flat_map(|(_, pools)| pools.iter().map(|p| p.order))
        .collect();
    orders.sort_unstable();
    orders.dedup();
    let name_w = rows
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let mut out = String::new();
    let _ = write!(out, "{:name_w$}  ", "");
    for o in &orders {
        let _ = write!(out, " ---{o:>2}---");
    }
    out.push('\n');
    for (name, pools) in rows {
        let _ = write!(out, "{name:name_w$} :");
        for o in &orders {
            let pages = pools.iter().find(|p| p.order == *o).map_or(0, |p| p.pages);
            let _ = write!(out, " {pages:>8}");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "{:name_w$} : {total} of {}", "total", Limit(max));
    if let Some(n) = others {
        let _ = writeln!(out, "({n} in other owners' pools)");
    }
    out
}

impl fmt::Display for RegistryStats {
    /// TTM's table: one row per pool type, one column per order (pages pooled), then
    /// `total : N of MAX` (`N of unlimited` for an unlimited maximum) and the pages the
    /// registry's other shrinkers hold; then one line naming each owner with its pool type,
    /// pages and limit (`name (type) N of LIMIT pages`, or `name (type) N pages, unlimited`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<(&str, &[PoolStats])> = self
            .pool_types
            .iter()
            .map(|t| (t.name.as_str(), t.pools.as_slice()))
            .collect();
        f.write_str(&render_table(
            &rows,
            self.total_pages,
            self.max_pages,
            Some(self.other_pages),
        ))?;
        if !self.owners.is_empty() {
            let owners: Vec<String> = self
                .owners
                .iter()
                .map(|o| match o.limit_pages {
                    Some(l) => format!("{} ({}) {} of {l} pages", o.name, o.pool_type, o.pages),
                    None => format!("{} ({}) {} pages, unlimited", o.name, o.pool_type, o.pages),
                })
                .collect();
            writeln!(f, "owners: {}", owners.join("; "))?;
        }
        Ok(())
    }
}

impl fmt::Display for HeapStats {
    /// The pool table (`total : N of MAX`, `N of unlimited` for an unlimited registry), then
    /// lines of counters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render_table(
            &[(self.owner.name.as_str(), self.owner.pools.as_slice())],
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
             pages; reclaimed for allocations {} pages; worker {:.2} GB/s, {} of the bytes zeroed",
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
            self.reclaimed_pages,
            self.worker_bytes_per_sec() / 1e9,
            self.worker_share()
                .map_or_else(|| "none".to_string(), |s| format!("{:.0}%", 100.0 * s)),
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
    fn the_table_has_ttms_shape_one_row_per_pool_type() {
        let pool = |order, pages| PoolStats {
            order,
            pages,
            blocks: pages >> order,
            given: 1,
            taken: 0,
            released: 0,
        };
        let owner = |name: &str, ty: &str, pools: Vec<PoolStats>| OwnerStats {
            name: name.into(),
            pool_type: ty.into(),
            limit_pages: Some(10_000),
            pages: pools.iter().map(|p| p.pages).sum(),
            pools,
        };
        let owners = [
            owner("a", "system", vec![pool(0, 3), pool(8, 256)]),
            owner("b", "locked", vec![pool(0, 1)]),
            owner("c", "system", vec![pool(0, 2)]),
            owner("d", "huge+node1", vec![pool(9, 1024)]),
        ];
        let types = by_pool_type(&owners);
        let names: Vec<&str> = types.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["system", "locked", "huge+node1"]);
        assert_eq!(types[0].owners, 2);
        assert_eq!(types[0].pages, 261);
        assert_eq!(types[0].pools[0].pages, 5, "order 0 summed over a and c");
        assert_eq!(types[0].pools[0].given, 2);
        let stats = RegistryStats {
            max_pages: Some(100_000),
            total_pages: 1286,
            owners: owners.to_vec(),
            pool_types: types,
            other_pages: 5,
        };
        let text = stats.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("--- 0---") && lines[0].contains("--- 9---"));
        assert!(lines[1].starts_with("system") && lines[1].contains(" 5 "));
        assert!(lines[2].starts_with("locked"));
        assert!(lines[3].starts_with("huge+node1") && lines[3].ends_with("1024"));
        assert!(text.contains("1286 of 100000"));
        assert!(text.contains("(5 in other owners' pools)"));
        assert!(text.contains("owners: a (system) 259 of 10000 pages; b (locked)"));
    }
}
