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
//! | kernel | pagepool | module |
//! |---|---|---|
//! | page allocator, `mmap` | memfd arenas, one system-call layer | [`os`], `arena` |
//! | `drm_page_pool` | [`PagePool`], [`Block`] | [`pool`] |
//! | pool list, global max, shrinker | [`Registry`], [`Owner`], [`Shrinker`] | [`registry`] |
//! | deferred-free helper | the heap's queue and worker (see [`SystemHeap`]) | `deferred` |
//! | shrinkers run by reclaim | [`pressure::PressureMonitor`] (PSI, cgroup watermark) | [`pressure`] |
//! | system heap, sg table, udmabuf export | [`SystemHeap`], [`Buffer`], [`ExportedBuffer`] | [`heap`], [`buffer`] |
//! | per-CPU page lists, page_pool alloc cache | per-thread caches of small buffers ([`HeapBuilder::thread_cache`]) | `cache` |
//! | dma-buf heaps, `DMA_BUF_IOCTL_SYNC` | [`dmabuf::DmaHeap`], [`dmabuf::DmaBuf`] | [`dmabuf`] |
//! | a pool of real dma-bufs | [`dmapool::DmaBufPool`] | [`dmapool`] |
//! | debugfs `page_pool` | [`stats`] | [`stats`] |
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
pub mod buffer;
mod cache;
mod deferred;
pub mod dmabuf;
pub mod dmapool;
pub mod error;
mod fork;
pub mod heap;
pub mod os;
pub mod pool;
pub mod pressure;
pub mod registry;
pub mod stats;
mod sync;
mod zero;

pub use buffer::{BlockInfo, Buffer, ExportError, ExportedBuffer};
pub use error::{AllocError, ConfigError, OsError};
pub use heap::{HeapBuilder, SystemHeap};
pub use os::{mapping_count, page_size};
pub use pool::{Block, MAX_ORDER, PagePool, ReleaseFn};
pub use pressure::{PressureConfig, PressureMonitor, PressureStats};
pub use registry::{Owner, Registry, Shrinker};
pub use stats::{HeapStats, OwnerStats, PoolStats, RegistryStats};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
