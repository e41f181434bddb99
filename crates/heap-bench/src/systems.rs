//! The rows of the benchmark: pagepool in three configurations and the allocators a user would
//! pick instead. One call obtains a buffer, optionally checks it reads all-zero, writes one byte
//! in every 4 KiB page (so every row delivers resident, zeroed, usable memory), and releases it.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::{self, NonNull};

use mimalloc::MiMalloc;
use pagepool::{Access, DmaHeap};
use pagepool::{Registry, SystemHeap};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};
use tikv_jemallocator::Jemalloc;

/// Every system, in table order.
pub const ALL: [&str; 12] = [
    "pagepool",
    "pagepool-nopool",
    "pagepool-syncfree",
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

/// Whether the loaded and threads modes run `name` when no `--systems` are given: pagepool, its
/// synchronous configuration and the [`PEERS`]. The rows that get fresh memory from the kernel
/// on every call (`pagepool-nopool`, `mmap`, `memfd`, `dmabuf`) are slow enough in tight and
/// paced mode already, and would take most of the default run's time.
pub fn in_busy_modes(name: &str) -> bool {
    name == "pagepool" || name == "pagepool-syncfree" || PEERS.contains(&name)
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
    Calloc,
    Mimalloc,
    Jemalloc,
    Mmap,
    Memfd,
    Dmabuf(DmaHeap),
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
            "calloc" | "calloc-tuned" => Kind::Calloc,
            "mimalloc" | "mimalloc-tuned" => Kind::Mimalloc,
            "jemalloc" | "jemalloc-tuned" => Kind::Jemalloc,
            "mmap" => Kind::Mmap,
            "memfd" => Kind::Memfd,
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
                    "unknown system {other:?}; known: {}",
                    ALL.join(", ")
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
        }
    }
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
