//! # pagepool
//!
//! Large, page-aligned, **zeroed** buffers for Linux programs, handed out at once from pools of
//! clean memory, bounded by limits and shrunk when memory runs short.
//!
//! Getting fresh zeroed pages from the kernel is slow: every page faults and is zeroed by the
//! kernel on the caller's time. Re-zeroing memory the process already holds is many times
//! cheaper. pagepool is the Linux DMA-BUF system heap's page pool (a kernel patch series that
//! never reached mainline) rebuilt in user space:
//!
//! | kernel | pagepool | file |
//! |---|---|---|
//! | page allocator, `mmap` | memfd arenas, one system-call layer | `os.rs`, `arena.rs` |
//! | TTM pool types (caching, dma32, NUMA pools) | [`PoolType`]: locked, huge, node(N) ([`HeapBuilder::pool_type`]) | `attrs.rs`, `arena.rs` |
//! | `drm_page_pool` | [`PagePool`], [`Block`] | `pool.rs` |
//! | pool list, global max, shrinker | [`Registry`], [`Owner`], [`Shrinker`] | `registry.rs` |
//! | deferred-free helper | a generic bounded queue and its worker, used by [`SystemHeap`] (through its hand-off) and [`DmaBufPool`] | `deferred/`, `heap/handoff.rs` |
//! | shrinkers run by reclaim | [`PressureMonitor`] (PSI, cgroup watermark) | `pressure.rs` |
//! | system heap, sg table, udmabuf export | [`SystemHeap`], [`Buffer`], [`ExportedBuffer`] | `heap/`, `export.rs` |
//! | per-CPU page lists, page_pool alloc cache | per-thread caches of small buffers ([`HeapBuilder::thread_cache`]) | `heap/cache.rs` |
//! | dma-buf heaps, `DMA_BUF_IOCTL_SYNC` | [`DmaHeap`], [`DmaBuf`] | `dmabuf.rs` |
//! | a pool of real dma-bufs | [`DmaBufPool`] | `dmapool.rs` |
//! | debugfs `page_pool` | [`RegistryStats`] (its `Display`), [`HeapStats`] | `stats.rs` |
//!
//! Every public type is at the crate's root; the modules are private. With the default feature
//! `serde`, the statistics types implement `serde::Serialize` and `serde::Deserialize`.
//!
//! # Examples
//! ```
//! let heap = pagepool::SystemHeap::new()?;
//! let mut frame = heap.alloc(8 << 20)?;          // 8 MiB, zeroed, contiguous
//! frame[0] = 1;
//! drop(frame);                                   // queued; a worker zeroes and pools it
//! let next = heap.alloc(8 << 20)?;               // same blocks, no system call
//! assert_eq!(next[0], 0);
//! println!("{}", heap.stats());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod arena;
mod attrs;
mod config;
mod deferred;
mod dmabuf;
mod dmapool;
mod error;
mod export;
mod fork;
mod heap;
#[cfg(all(test, loom))]
mod loom_tests;
mod os;
mod pool;
mod pressure;
mod registry;
mod shrinker;
mod stats;
mod sync;
mod zero;

pub use attrs::{BackingReport, HUGE_ORDER, HugeBacking, PoolType};
pub use dmabuf::{
    Access, CpuAccess, DmaBuf, DmaBufError, DmaBufMap, DmaHeap, HEAP_DIR, UDMABUF_PATH, file_count,
    udmabuf_create,
};
pub use dmapool::{DmaBufPool, DmaBufPoolStats, PooledDmaBuf};
pub use error::{AllocError, ConfigError, OsError};
pub use export::{ExportError, ExportedBuffer};
pub use heap::{BlockInfo, Buffer};
pub use heap::{HeapBuilder, SystemHeap};
pub use os::{mapping_count, page_size};
pub use pool::{Block, MAX_ORDER, PagePool, ReleaseFn};
pub use pressure::{
    CgroupPaths, PressureConfig, PressureMonitor, PressureSource, PsiTrigger, Wait, Watermark,
};
pub use registry::{Owner, Registry};
pub use shrinker::Shrinker;
pub use stats::{
    HeapStats, OwnerStats, PoolStats, PoolTypeStats, PressureEvent, PressureStats, RegistryStats,
};

// The types a program shares between threads are `Send + Sync`; a change that loses that fails
// to compile here rather than in users' code.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Buffer>();
    send_sync::<ExportedBuffer>();
    send_sync::<SystemHeap>();
    send_sync::<HeapBuilder>();
    send_sync::<PagePool>();
    send::<Block>(); // exclusive ownership of a range, like `Box<[u8]>`: `Send` is enough
    send_sync::<Registry>();
    send_sync::<Owner>();
    send_sync::<PressureMonitor>();
    send_sync::<DmaBufPool>();
    send_sync::<PooledDmaBuf>();
    send_sync::<DmaBuf>();
    send_sync::<DmaHeap>();
    send_sync::<HeapStats>();
    send_sync::<RegistryStats>();
};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
