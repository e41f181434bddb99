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
//! | `drm_page_pool` | [`pool::PagePool`], [`pool::Block`] | `pool/` |
//! | pool list, global max, shrinker | [`registry::Registry`], [`registry::Owner`], [`registry::Shrinker`] | `registry/`, `shrinker.rs` |
//! | deferred-free helper | a generic bounded queue and its worker, used by [`SystemHeap`] (through its hand-off) and [`dmapool::DmaBufPool`] | `deferred/`, `heap/handoff.rs` |
//! | shrinkers run by reclaim | [`pressure::PressureMonitor`] (PSI, cgroup watermark) | `pressure.rs` |
//! | system heap, sg table, udmabuf export | [`SystemHeap`], [`Buffer`], [`ExportedBuffer`] | `heap/`, `export.rs` |
//! | per-CPU page lists, page_pool alloc cache | per-thread caches of small buffers ([`HeapBuilder::thread_cache`]) | `heap/cache.rs` |
//! | dma-buf heaps, `DMA_BUF_IOCTL_SYNC` | [`dmabuf::DmaHeap`], [`dmabuf::DmaBuf`] | `dmabuf/` |
//! | a pool of real dma-bufs | [`dmapool::DmaBufPool`] | `dmapool.rs` |
//! | debugfs `page_pool` | [`stats::RegistryStats`] (its `Display`), [`HeapStats`] | `stats.rs` |
//!
//! What a heap user needs is at the crate's root: [`SystemHeap`] and its [`HeapBuilder`], the
//! [`Buffer`] it hands out, [`PoolType`], the errors and [`HeapStats`]. The building blocks and
//! the interfaces for experts are in namespaces of their own:
//!
//! | module | what is in it |
//! |---|---|
//! | [`pool`] | the generic page pool: [`pool::PagePool`], [`pool::Block`], orders |
//! | [`registry`] | pool owners, limits, the global maximum, [`registry::Shrinker`] |
//! | [`pressure`] | memory-pressure sources (PSI, cgroup watermark) and the monitor |
//! | [`dmabuf`] | the kernel's dma-buf heaps and udmabuf |
//! | [`dmapool`] | a pool of real dma-bufs on the same registry |
//! | [`stats`] | every statistics record and the mapping count |
//!
//! With the default feature `serde`, the statistics types implement `serde::Serialize` and
//! `serde::Deserialize`.
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

#[cfg(not(loom))]
pub mod alloc;
mod arena;
mod attrs;
mod config;
mod deferred;
pub mod dmabuf;
pub mod dmapool;
mod error;
mod export;
mod fork;
mod heap;
#[cfg(all(test, loom))]
mod loom_tests;
mod os;
pub mod pool;
pub mod pressure;
#[cfg(not(loom))]
mod private;
pub mod registry;
#[cfg(not(loom))]
pub mod route;
mod shrinker;
pub mod stats;
mod sync;
mod tempo;
mod zero;

pub use attrs::{BackingReport, HugeBacking, PoolType};
pub use config::parse_size;
pub use error::{AllocError, ConfigError, OsError};
pub use export::{ExportError, ExportedBuffer};
pub use heap::{BlockInfo, Buffer, HeapBuilder, SystemHeap};
pub use os::page_size;
pub use stats::HeapStats;

// The types a program shares between threads are `Send + Sync`; a change that loses that fails
// to compile here rather than in users' code.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Buffer>();
    send_sync::<ExportedBuffer>();
    send_sync::<SystemHeap>();
    send_sync::<HeapBuilder>();
    send_sync::<pool::PagePool>();
    send::<pool::Block>(); // exclusive ownership of a range, like `Box<[u8]>`: `Send` is enough
    send_sync::<registry::Registry>();
    send_sync::<registry::Owner>();
    send_sync::<pressure::PressureMonitor>();
    send_sync::<dmapool::DmaBufPool>();
    send_sync::<dmapool::PooledDmaBuf>();
    send_sync::<dmabuf::DmaBuf>();
    send_sync::<dmabuf::DmaHeap>();
    send_sync::<HeapStats>();
    send_sync::<stats::RegistryStats>();
};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
