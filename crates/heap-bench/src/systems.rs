//! The rows of the benchmark: pagepool in three configurations and the allocators a user would
//! pick instead; and the attrs mode's rows, pagepool's pool types (locked, huge, node 0) beside
//! the system calls a user would make for the same memory instead. One call obtains a buffer,
//! optionally checks it reads all-zero, writes one byte in every 4 KiB page (so every row
//! delivers resident, zeroed, usable memory), and releases it.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::{self, NonNull};

use mimalloc::MiMalloc;
use pagepool::dmabuf::{Access, DmaHeap};
use pagepool::{PoolType, SystemHeap, registry::Registry};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{Advice, MapFlags, ProtFlags};
use tikv_jemallocator::Jemalloc;

/// Every system, in table order.
pub const ALL: [&str; 14] = [
    "pagepool",
    "pagepool-nopool",
    "pagepool-syncfree",
    "pagepool-alloc",
    "pagepool-c",
    "calloc",
    "mimalloc",
    "jemalloc",
    "calloc-tuned",
    "mimalloc-tuned",
    "jemalloc-tuned",
    "mmap",
    "memfd",
    "dmabuf",
];

/// Rows that run only when `--systems` names them, after [`ALL`]'s: `pagepool-sync`, the
/// default heap but for `deferred(false)` (its releases zeroed on the releasing thread; its
/// thread cache and registry as the default heap's), against which the deferred heap's
/// allocation latency is judged; and `pagepool-control`, a second default heap, whose ratio to
/// `pagepool` is what the machine and the heaps' places in memory make of two heaps doing the
/// same work: the noise floor of a comparison between pagepool rows.
pub const EXTRA: [&str; 2] = ["pagepool-sync", "pagepool-control"];

/// The attrs mode's rows, in table order: each pagepool pool type, then what a user would do
/// per call instead for the same memory.
pub const ATTRS: [&str; 6] = [
    "pagepool-locked",
    "mmap-mlock",
    "pagepool-huge",
    "mmap-thp",
    "pagepool-node0",
    "mmap-mbind",
];

/// The attrs mode's pairs, `(pagepool row, peer row)`: its ratios are peer / pagepool within a
/// pair.
pub const ATTRS_PAIRS: [(&str, &str); 3] = [
    ("pagepool-locked", "mmap-mlock"),
    ("pagepool-huge", "mmap-thp"),
    ("pagepool-node0", "mmap-mbind"),
];

/// The `pagepool-alloc` row's allocator: pagepool's global allocator with its defaults (called
/// directly here; a program would name it `#[global_allocator]`).
pub static POOL_ALLOC: pagepool::alloc::PoolAlloc = pagepool::alloc::PoolAlloc::new();

/// A huge page: 2 MiB (x86-64, and arm64 with 4 KiB base pages).
pub const HUGE: usize = 2 << 20;

/// The general-purpose allocators a user would pick instead, with their defaults and tuned: the
/// benchmark's "best peer" is the fastest of these.
pub const PEERS: [&str; 6] = [
    "calloc",
    "mimalloc",
    "jemalloc",
    "calloc-tuned",
    "mimalloc-tuned",
    "jemalloc-tuned",
];

/// Whether every mode runs `name` when no `--systems` are given: pagepool, its synchronous
/// configuration and the [`PEERS`]. The rows that get fresh memory from the kernel on every call
/// (`pagepool-nopool`, `mmap`, `memfd`, `dmabuf`) run in the tight mode only, the seed's loop:
/// at 32 MiB each of their rows takes 2-6 s (the fewest calls a row makes, each a fresh
/// mapping), and in the paced, loaded and threads modes they would take most of the default
/// run's time to show again what the tight mode shows.
pub fn in_every_mode(name: &str) -> bool {
    [
        "pagepool",
        "pagepool-syncfree",
        "pagepool-alloc",
        "pagepool-c",
    ]
    .contains(&name)
        || PEERS.contains(&name)
}

/// The peers configured as a performance-minded user would: each allocator's settings are
/// process-wide (and mimalloc's and jemalloc's are read when the process starts), so these rows
/// run in a child process of their own (see [`tuned_env`] and [`tune_this_process`]).
pub const TUNED: [&str; 3] = ["calloc-tuned", "mimalloc-tuned", "jemalloc-tuned"];

/// glibc's largest `M_MMAP_THRESHOLD` on 64-bit (`HEAP_MAX_SIZE / 2`): allocations up to it come
/// from the heap and are kept there when freed.
const GLIBC_MMAP_THRESHOLD_MAX: i32 = 32 << 20;

/// The environment the tuned rows' child process starts with: mimalloc never purges freed
/// memory (`purge_delay` -1; it is read at start-up), jemalloc runs its background threads
/// (which purge dirty pages off the allocating threads).
pub fn tuned_env() -> [(&'static str, &'static str); 2] {
    [
        ("MIMALLOC_PURGE_DELAY", "-1"),
        ("_RJEM_MALLOC_CONF", "background_thread:true"),
    ]
}

unsafe extern "C" {
    /// mimalloc's option getter (in the library whatever the Rust binding declares).
    fn mi_option_get(option: libc::c_int) -> libc::c_long;
}

/// `mi_option_purge_delay` in mimalloc v2's `mi_option_t`.
const MI_OPTION_PURGE_DELAY: libc::c_int = 15;

/// In the tuned rows' child: raises glibc's mmap and trim thresholds (freed memory is kept and
/// reused), and reads back every tuned allocator's settings as they are in effect, one line
/// per row name.
pub fn tune_this_process() -> Vec<(&'static str, String)> {
    // SAFETY: mallopt only changes glibc's malloc parameters; no memory is involved.
    let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX) };
    // SAFETY: as above.
    let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
    let glibc = format!(
        "mallopt M_MMAP_THRESHOLD=32 MiB ({}), M_TRIM_THRESHOLD=2 GiB ({})",
        if mmap == 1 { "set" } else { "refused" },
        if trim == 1 { "set" } else { "refused" }
    );
    // SAFETY: a plain getter of mimalloc's options.
    let purge = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) };
    let mimalloc = format!("MIMALLOC_PURGE_DELAY=-1 (purge_delay in effect: {purge})");
    let mut on = false;
    let mut len = std::mem::size_of::<bool>();
    // SAFETY: `opt.background_thread` is a bool; `on` and `len` describe a bool-sized buffer.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"opt.background_thread".as_ptr(),
            (&raw mut on).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    let jemalloc = format!(
        "_RJEM_MALLOC_CONF=background_thread:true (opt.background_thread in effect: {})",
        if rc == 0 {
            on.to_string()
        } else {
            format!("unreadable, error {rc}")
        }
    );
    vec![
        ("calloc-tuned", glibc),
        ("mimalloc-tuned", mimalloc),
        ("jemalloc-tuned", jemalloc),
    ]
}

/// What one call does besides allocating and releasing.
#[derive(Debug, Clone, Copy)]
pub struct CallOpts {
    /// Write one byte in every 4 KiB page.
    pub touch: bool,
    /// Check that the buffer reads all-zero first.
    pub verify: bool,
}

enum Kind {
    Heap(SystemHeap),
    /// The global allocator, [`POOL_ALLOC`]: `alloc_zeroed` + `dealloc`.
    PoolAlloc,
    /// The C library: `pagepool_calloc` + `pagepool_free`.
    PoolC,
    Calloc,
    Mimalloc,
    Jemalloc,
    Mmap,
    Memfd,
    Dmabuf(DmaHeap),
    /// `mmap` + `mlock` + `munmap`.
    MmapLock,
    /// `mmap` (2 MiB-aligned) + `MADV_HUGEPAGE` + `MADV_POPULATE_WRITE` + `munmap`.
    MmapThp,
    /// `mmap` + `mbind(MPOL_BIND, node 0)` + `MADV_POPULATE_WRITE` + `munmap`.
    MmapBind,
}

/// One row: a name and how to call it, or why it cannot run here.
pub struct System {
    /// The row's name.
    pub name: &'static str,
    kind: Option<Kind>,
    /// Why the system is absent on this machine.
    pub absent: Option<String>,
}

impl System {
    /// Builds the system called `name`.
    pub fn new(name: &'static str) -> Result<System, String> {
        let heap = |b: pagepool::HeapBuilder| b.build().map_err(|e| e.to_string());
        let kind = match name {
            "pagepool" => Kind::Heap(SystemHeap::new().map_err(|e| e.to_string())?),
            "pagepool-nopool" => Kind::Heap(heap(
                SystemHeap::builder()
                    .name("nopool")
                    .registry(Registry::new(usize::MAX))
                    .pool_limit(0),
            )?),
            "pagepool-sync" => {
                Kind::Heap(heap(SystemHeap::builder().name("sync").deferred(false))?)
            }
            "pagepool-control" => Kind::Heap(heap(SystemHeap::builder().name("control"))?),
            "pagepool-syncfree" => Kind::Heap(heap(
                SystemHeap::builder()
                    .name("syncfree")
                    .registry(Registry::new(usize::MAX))
                    .deferred(false)
                    // Zero on release, as TTM and the v9 pool do, for every size.
                    .thread_cache(0),
            )?),
            // The tuned rows are the same calls, in a process whose allocators were configured
            // (see `tune_this_process`).
            "pagepool-alloc" => Kind::PoolAlloc,
            "pagepool-c" => Kind::PoolC,
            "calloc" | "calloc-tuned" => Kind::Calloc,
            "mimalloc" | "mimalloc-tuned" => Kind::Mimalloc,
            "jemalloc" | "jemalloc-tuned" => Kind::Jemalloc,
            "mmap" => Kind::Mmap,
            "memfd" => Kind::Memfd,
            // The pool types: default heaps (on the global registry, as a program's would be)
            // but for their type.
            "pagepool-locked" => Kind::Heap(heap(
                SystemHeap::builder()
                    .name("locked")
                    .pool_type(PoolType::SYSTEM.locked()),
            )?),
            "pagepool-huge" => Kind::Heap(heap(
                SystemHeap::builder()
                    .name("huge")
                    .pool_type(PoolType::SYSTEM.huge()),
            )?),
            // Node 0 exists on every machine, but may have no memory (a few NUMA systems).
            "pagepool-node0" => match heap(
                SystemHeap::builder()
                    .name("node0")
                    .pool_type(PoolType::SYSTEM.node(0)),
            ) {
                Ok(h) => Kind::Heap(h),
                Err(e) => {
                    return Ok(System {
                        name,
                        kind: None,
                        absent: Some(e),
                    });
                }
            },
            "mmap-mlock" => Kind::MmapLock,
            "mmap-thp" => Kind::MmapThp,
            "mmap-mbind" => Kind::MmapBind,
            "dmabuf" => match DmaHeap::open("system") {
                Ok(h) => Kind::Dmabuf(h),
                Err(e) => {
                    return Ok(System {
                        name,
                        kind: None,
                        absent: Some(e.to_string()),
                    });
                }
            },
            other => {
                return Err(format!(
                    "unknown system {other:?}; known: {}, {}, {}",
                    ALL.join(", "),
                    EXTRA.join(", "),
                    ATTRS.join(", ")
                ));
            }
        };
        Ok(System {
            name,
            kind: Some(kind),
            absent: None,
        })
    }

    /// The pagepool heap behind this row, if it is one.
    pub fn heap(&self) -> Option<&SystemHeap> {
        match &self.kind {
            Some(Kind::Heap(h)) => Some(h),
            _ => None,
        }
    }

    /// Empties a pagepool row's pools (after the worker is done), so that the next size starts
    /// from none: the heap's, or the allocator layer's.
    pub fn settle(&self) {
        match &self.kind {
            Some(Kind::Heap(h)) => {
                h.flush();
                h.trim();
            }
            Some(Kind::PoolAlloc) => {
                POOL_ALLOC.flush();
                POOL_ALLOC.trim();
            }
            Some(Kind::PoolC) => {
                pagepool_c::pagepool_trim();
            }
            _ => {}
        }
    }

    /// The allocator layer's statistics, for its rows.
    pub fn private_stats(&self) -> Option<pagepool::alloc::PrivateStats> {
        match &self.kind {
            Some(Kind::PoolAlloc) => POOL_ALLOC.stats(),
            Some(Kind::PoolC) => pagepool_c::stats(),
            _ => None,
        }
    }

    /// One call: obtain `size` bytes, use them, release them.
    pub fn call(&self, size: usize, opts: CallOpts) -> Result<(), String> {
        let Some(kind) = &self.kind else {
            return Err("absent".into());
        };
        match kind {
            Kind::Heap(h) => {
                let mut b = h.alloc(size).map_err(|e| e.to_string())?;
                use_buffer(&mut b[..size], opts)
            }
            Kind::Calloc => {
                // SAFETY: plain C allocation; freed below, used only in between.
                let p = unsafe { libc::calloc(size, 1) }.cast::<u8>();
                let p = NonNull::new(p).ok_or("calloc returned NULL")?;
                // SAFETY: `p` points to `size` bytes we own until `free`.
                let r = use_buffer(
                    unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), size) },
                    opts,
                );
                // SAFETY: allocated by `calloc` above.
                unsafe { libc::free(p.as_ptr().cast()) };
                r
            }
            Kind::PoolAlloc => with_global(&POOL_ALLOC, size, opts),
            Kind::PoolC => {
                let p = pagepool_c::pagepool_calloc(size, 1).cast::<u8>();
                let p = NonNull::new(p).ok_or("pagepool_calloc returned NULL")?;
                // SAFETY: `p` points to `size` bytes we own until `pagepool_free`.
                let r = use_buffer(
                    unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), size) },
                    opts,
                );
                // SAFETY: allocated by `pagepool_calloc` above.
                unsafe { pagepool_c::pagepool_free(p.as_ptr().cast()) };
                r
            }
            Kind::Mimalloc => with_global(&MiMalloc, size, opts),
            Kind::Jemalloc => with_global(&Jemalloc, size, opts),
            Kind::Mmap => {
                // SAFETY: a fresh private mapping at an address the kernel picks.
                let p = unsafe {
                    rustix::mm::mmap_anonymous(
                        ptr::null_mut(),
                        size,
                        ProtFlags::READ | ProtFlags::WRITE,
                        MapFlags::PRIVATE | MapFlags::POPULATE,
                    )
                }
                .map_err(|e| format!("mmap: {e}"))?;
                // SAFETY: the mapping spans `size` bytes and is ours until `munmap`.
                let r = use_buffer(
                    unsafe { std::slice::from_raw_parts_mut(p.cast(), size) },
                    opts,
                );
                // SAFETY: the mapping made above; the slice is gone.
                unsafe { rustix::mm::munmap(p, size) }.map_err(|e| format!("munmap: {e}"))?;
                r
            }
            Kind::Memfd => {
                let fd = rustix::fs::memfd_create("heap-bench", MemfdFlags::CLOEXEC)
                    .map_err(|e| format!("memfd_create: {e}"))?;
                rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size as u64)
                    .map_err(|e| format!("fallocate: {e}"))?;
                // SAFETY: a fresh shared mapping of our own memfd.
                let p = unsafe {
                    rustix::mm::mmap(
                        ptr::null_mut(),
                        size,
                        ProtFlags::READ | ProtFlags::WRITE,
                        MapFlags::SHARED,
                        &fd,
                        0,
                    )
                }
                .map_err(|e| format!("mmap memfd: {e}"))?;
                drop(fd);
                // SAFETY: the mapping spans `size` bytes and is ours until `munmap`.
                let r = use_buffer(
                    unsafe { std::slice::from_raw_parts_mut(p.cast(), size) },
                    opts,
                );
                // SAFETY: the mapping made above; the slice is gone.
                unsafe { rustix::mm::munmap(p, size) }.map_err(|e| format!("munmap: {e}"))?;
                r
            }
            Kind::Dmabuf(heap) => {
                let buf = heap.alloc(size).map_err(|e| e.to_string())?;
                let mut map = buf.map().map_err(|e| e.to_string())?;
                let mut cpu = map.access(Access::ReadWrite).map_err(|e| e.to_string())?;
                // SAFETY: the kernel made this dma-buf just now; `buf` is its only descriptor
                // and `map` its only mapping, neither shared with anyone, and no device is
                // attached: nothing else reads or writes it while the slice lives. (A slice,
                // like every other row, not `CpuAccess`'s atomic copies: the row measures the
                // heap, not the copying.)
                let bytes = unsafe { cpu.as_mut_slice() };
                use_buffer(&mut bytes[..size], opts)
            }
            Kind::MmapLock | Kind::MmapThp | Kind::MmapBind => {
                mapped_call(kind, size, opts, false).map(drop)
            }
        }
    }

    /// What an attrs mode row does per call and what its memory got, checked outside the timed
    /// calls: for a pool-type heap, its type, its huge backing (`stats().huge_backing`) and
    /// what the kernel backs its arenas with while one buffer is held (`backing()`; call it
    /// after the row's calls, when the pools are warm);
    /// for an mmap row, what one call's mapping got, read from `/proc/self/smaps` and
    /// `numa_maps` while it is mapped (it makes that call). `None` for the other rows.
    pub fn attrs_settings(&self, size: usize, opts: CallOpts) -> Result<Option<String>, String> {
        let Some(kind) = &self.kind else {
            return Ok(None);
        };
        let what = match (self.name, kind) {
            ("pagepool-locked" | "pagepool-huge" | "pagepool-node0", Kind::Heap(h)) => {
                let st = h.stats();
                let how = match self.name {
                    "pagepool-locked" => format!(
                        "mlock on carving, kept locked while pooled; RLIMIT_MEMLOCK {}",
                        crate::measure::memlock_limit()
                    ),
                    "pagepool-huge" => format!(
                        "2 MiB blocks (lengths rounded up to 2 MiB); huge backing: {}",
                        st.huge_backing
                            .map_or("none".to_string(), |b| b.to_string())
                    ),
                    _ => "mbind(MPOL_BIND) to node 0 on each arena".to_string(),
                };
                // One buffer held (pooled memory, after the row's calls), touched as a call
                // does, while the arenas are read.
                let mut buf = h.alloc(size).map_err(|e| e.to_string())?;
                use_buffer(&mut buf[..size], opts)?;
                let b = h.backing().map_err(|e| format!("backing: {e}"))?;
                drop(buf);
                let bytes = |v: u64| crate::measure::bytes(v);
                let mut got = format!(
                    "mapped {}, resident {}, thp {}, hugetlb {}, locked {}",
                    bytes(b.mapped_bytes),
                    bytes(b.resident_bytes),
                    bytes(b.thp_bytes),
                    bytes(b.hugetlb_bytes),
                    bytes(b.locked_bytes)
                );
                for (n, v) in &b.node_bytes {
                    got.push_str(&format!(", node{n} {}", bytes(*v)));
                }
                for (n, arenas) in &b.bound_to {
                    got.push_str(&format!(", {arenas} arenas bound to node{n}"));
                }
                format!(
                    "pool type {}: {how}; arenas after the row, one buffer held: {got}",
                    st.pool_type
                )
            }
            (_, Kind::MmapLock) => format!(
                "mmap + mlock + munmap per call (RLIMIT_MEMLOCK {}); one call's mapping: {}",
                crate::measure::memlock_limit(),
                checked(kind, size, opts)?
            ),
            (_, Kind::MmapThp) => {
                let got = mapped_call(kind, size, opts, true)?.unwrap_or_default();
                // The call succeeded: the rounded length fits.
                let len = size.div_ceil(HUGE) * HUGE;
                let huge = match got.huge() {
                    0 => "no",
                    h if h >= len as u64 => "yes",
                    _ => "partly",
                };
                format!(
                    "mmap of {} + 2 MiB, its 2 MiB-aligned {} madvise(MADV_HUGEPAGE) + \
                     madvise(MADV_POPULATE_WRITE), munmap per call (THP enabled [{}], defrag \
                     [{}]); one call's mapping got huge pages: {huge}: {}",
                    crate::measure::bytes(len as u64),
                    crate::measure::bytes(len as u64),
                    crate::measure::thp_setting("enabled"),
                    crate::measure::thp_setting("defrag"),
                    got.describe(len)
                )
            }
            (_, Kind::MmapBind) => format!(
                "mmap + mbind(MPOL_BIND, node 0) + madvise(MADV_POPULATE_WRITE) + munmap per \
                 call; one call's mapping: {}",
                checked(kind, size, opts)?
            ),
            _ => return Ok(None),
        };
        Ok(Some(what))
    }
}

/// One call of an attrs mmap row, with what its mapping got.
fn checked(kind: &Kind, size: usize, opts: CallOpts) -> Result<String, String> {
    let got = mapped_call(kind, size, opts, true)?.unwrap_or_default();
    Ok(got.describe(size))
}

/// Binds `p..p + len` to NUMA node 0 (`mbind(MPOL_BIND)`).
///
/// # Safety
/// The caller owns the range.
unsafe fn bind_node0(p: *mut u8, len: usize) -> Result<(), String> {
    let mask: [libc::c_ulong; 1] = [1];
    // SAFETY: `mbind` reads `mask` (one word: `maxnode` 64 bits) and changes only the memory
    // policy of the range, which the caller owns; no memory is read or written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            p,
            len,
            libc::MPOL_BIND,
            mask.as_ptr(),
            libc::c_ulong::BITS as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("mbind: {}", std::io::Error::last_os_error()))
    }
}

/// One call of an attrs mode mmap row: a fresh private mapping, the row's attribute applied
/// and its pages populated as the row says, used (see [`use_buffer`]), unmapped. With
/// `inspect`, returns what the mapping got (read while it is still mapped, after the use).
fn mapped_call(
    kind: &Kind,
    size: usize,
    opts: CallOpts,
    inspect: bool,
) -> Result<Option<crate::measure::RangePages>, String> {
    // For huge pages: the length rounded up to 2 MiB (as the huge heap rounds it), at a 2 MiB
    // boundary inside a mapping 2 MiB longer (the rest is never touched).
    let (len, map_len) = match kind {
        Kind::MmapThp => {
            let len = size
                .checked_next_multiple_of(HUGE)
                .filter(|l| l.checked_add(HUGE).is_some())
                .ok_or("size past the address space")?;
            (len, len + HUGE)
        }
        _ => (size, size),
    };
    // SAFETY: a fresh private mapping at an address the kernel picks.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            ptr::null_mut(),
            map_len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }
    .map_err(|e| format!("mmap: {e}"))?;
    let p = p.cast::<u8>();
    let a = match kind {
        // Bounded: the mapping runs 2 MiB past `len`, so the boundary lies inside it.
        Kind::MmapThp => p.wrapping_add((p as usize).next_multiple_of(HUGE) - p as usize),
        _ => p,
    };
    let r = (|| {
        match kind {
            // SAFETY: `a..a + len` lies in the mapping made above, ours until `munmap`;
            // locking changes no contents.
            Kind::MmapLock => unsafe { rustix::mm::mlock(a.cast(), len) }.map_err(|e| {
                format!(
                    "mlock: {e} (RLIMIT_MEMLOCK {})",
                    crate::measure::memlock_limit()
                )
            })?,
            Kind::MmapThp => {
                // SAFETY: advice on `a..a + len`, inside the mapping made above, which is
                // ours; it changes no contents.
                unsafe { rustix::mm::madvise(a.cast(), len, Advice::LinuxHugepage) }
                    .map_err(|e| format!("madvise(MADV_HUGEPAGE): {e}"))?;
                // SAFETY: as above; the mapping is writable.
                unsafe { populate(a, len) }?;
            }
            _ => {
                // SAFETY: the mapping made above, ours until `munmap`.
                unsafe { bind_node0(a, len) }?;
                // SAFETY: the mapping made above, writable, ours until `munmap`.
                unsafe { populate(a, len) }?;
            }
        }
        // SAFETY: `a..a + len` (`len >= size`) lies in the mapping made above, ours until
        // `munmap`; nothing else refers to it.
        use_buffer(unsafe { std::slice::from_raw_parts_mut(a, size) }, opts)?;
        Ok(inspect.then(|| crate::measure::range_pages(a as usize, len)))
    })();
    // SAFETY: the mapping made above; the slice is gone.
    unsafe { rustix::mm::munmap(p.cast(), map_len) }.map_err(|e| format!("munmap: {e}"))?;
    r
}

/// Faults in `p..p + len` for writing (`MADV_POPULATE_WRITE`, Linux 5.14+).
///
/// # Safety
/// The caller owns the range: a writable mapping of its own.
pub unsafe fn populate(p: *mut u8, len: usize) -> Result<(), String> {
    // SAFETY: the caller owns the range; populating faults in its pages (zeroed where none
    // were) and changes no contents.
    unsafe { rustix::mm::madvise(p.cast(), len, Advice::LinuxPopulateWrite) }
        .map_err(|e| format!("madvise(MADV_POPULATE_WRITE): {e} (needs Linux 5.14)"))
}

fn with_global(a: &dyn GlobalAlloc, size: usize, opts: CallOpts) -> Result<(), String> {
    let layout = Layout::from_size_align(size, 4096).map_err(|e| e.to_string())?;
    // SAFETY: `layout` has a non-zero size (sizes are at least one page).
    let p = unsafe { a.alloc_zeroed(layout) };
    let p = NonNull::new(p).ok_or("allocation failed")?;
    // SAFETY: `p` points to `size` bytes we own until `dealloc`.
    let r = use_buffer(
        unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), size) },
        opts,
    );
    // SAFETY: allocated above with the same allocator and layout.
    unsafe { a.dealloc(p.as_ptr(), layout) };
    r
}

/// Checks (with `verify`) that the buffer is all-zero, then writes one byte per 4 KiB page.
fn use_buffer(buf: &mut [u8], opts: CallOpts) -> Result<(), String> {
    if opts.verify
        && let Some(i) = buf.iter().position(|&b| b != 0)
    {
        return Err(format!("non-zero byte at offset {i} of a fresh buffer"));
    }
    if opts.touch {
        let p = buf.as_mut_ptr();
        for off in (0..buf.len()).step_by(4096) {
            // SAFETY: `off < buf.len()`; volatile so the store is not optimised away before a
            // release the compiler can see through (free, munmap).
            unsafe { p.add(off).write_volatile(1) };
        }
    }
    Ok(())
}
