//! Real dma-bufs from the kernel's DMA-BUF heaps (`/dev/dma_heap/<name>`).
//!
//! A [`DmaHeap`] is an open heap device; [`DmaHeap::alloc`] asks the kernel for a buffer
//! (`DMA_HEAP_IOCTL_ALLOC`) and returns it as a [`DmaBuf`]: a file descriptor that can be passed
//! to devices and other processes. CPU access goes through a mapping ([`DmaBuf::map`]) and is
//! bracketed by `DMA_BUF_IOCTL_SYNC` start/end calls ([`DmaBufMap::access`]), which keep caches
//! coherent with devices on the architectures that need it.
//!
//! A dma-buf's memory is shared by nature: every holder of a descriptor (a duplicate, another
//! process), every mapping and every device the buffer is attached to may write it at any time,
//! and the kernel does not tell. A Rust `&[u8]` promises that nothing writes the bytes while it
//! lives, and a `&mut [u8]` that nothing else even reads them; neither promise can be kept for
//! such memory, so safe code never gets a slice of it. [`CpuAccess`] copies instead, with
//! relaxed atomic loads and stores of aligned 8-byte words, which are defined whatever else
//! writes at the same time (a racing writer's bytes may or may not be seen, each word whole);
//! its `unsafe` slice accessors are for callers who know that nobody else holds the buffer.
//!
//! Many machines have no `/dev/dma_heap` (the kernel needs `CONFIG_DMABUF_HEAPS`); opening a heap
//! there fails with [`DmaBufError::NoHeap`].
//!
//! This file holds the heap and its buffers: [`DmaHeap`], [`DmaBuf`], its mappings
//! ([`DmaBufMap`]) and their CPU access brackets ([`CpuAccess`]); the udmabuf device's call
//! ([`udmabuf_create`]) is in `udmabuf.rs`, the atomic copies behind [`CpuAccess`] in
//! `shared.rs`, the unit tests in `tests.rs`.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::ptr::{self, NonNull};

use rustix::fs::{Mode, OFlags};
use rustix::ioctl::{Setter, Updater, opcode};
use rustix::mm::{MapFlags, ProtFlags};

mod shared;
#[cfg(test)]
mod tests;
mod udmabuf;

pub(crate) use shared::SharedMem;
pub use udmabuf::{UDMABUF_PATH, udmabuf_create};

/// Errors from the dma-buf heap interface.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DmaBufError {
    /// The heap name is empty or not a plain file name.
    #[error("invalid dma-buf heap name {0:?}")]
    InvalidName(String),
    /// The heap does not exist on this machine.
    #[error("no dma-buf heap at {path}: {source}")]
    NoHeap {
        /// The device path tried.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: std::io::Error,
    },
    /// A zero-length buffer was asked for.
    #[error("cannot allocate a zero-length dma-buf")]
    ZeroLength,
    /// A CPU copy reached outside the buffer: `len` bytes at `offset` of a buffer of `size`.
    #[error("{len} bytes at offset {offset} are outside the buffer of {size} bytes")]
    OutOfRange {
        /// Where the copy started.
        offset: usize,
        /// How many bytes it copied.
        len: usize,
        /// The buffer's size in bytes.
        size: usize,
    },
    /// The kernel refused (bad flags, out of memory, ...).
    #[error("{op} failed: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

fn os(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> DmaBufError {
    move |e| DmaBufError::Os {
        op,
        source: e.into(),
    }
}

/// `struct dma_heap_allocation_data` from `<linux/dma-heap.h>`.
#[repr(C)]
struct AllocationData {
    len: u64,
    fd: u32,
    fd_flags: u32,
    heap_flags: u64,
}

/// `struct dma_buf_sync` from `<linux/dma-buf.h>`.
#[repr(C)]
struct SyncData {
    flags: u64,
}

const DMA_HEAP_IOCTL_ALLOC: rustix::ioctl::Opcode = opcode::read_write::<AllocationData>(b'H', 0);
const DMA_BUF_IOCTL_SYNC: rustix::ioctl::Opcode = opcode::write::<SyncData>(b'b', 0);
const SYNC_READ: u64 = 1;
const SYNC_WRITE: u64 = 2;
const SYNC_END: u64 = 4;

/// How many references the open file behind `fd` has (the `count:` line of
/// `/proc/self/fdinfo/<fd>`, which dma-bufs show): this descriptor, its duplicates, mappings,
/// and descriptors other processes received. Above 1, someone besides `fd` holds the file.
pub fn file_count(fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("count:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::Unsupported, "no count: in fdinfo"))
}

/// The directory where the kernel exposes its dma-buf heaps.
pub const HEAP_DIR: &str = "/dev/dma_heap";

/// An open dma-buf heap.
///
/// # Examples
/// ```no_run
/// use pagepool::dmabuf::{Access, DmaHeap};
///
/// let heap = DmaHeap::open("system")?;
/// let buf = heap.alloc(1 << 20)?;
/// let mut map = buf.map()?;
/// map.access(Access::ReadWrite)?.fill(1);
/// # Ok::<(), pagepool::dmabuf::DmaBufError>(())
/// ```
#[derive(Debug)]
pub struct DmaHeap {
    fd: OwnedFd,
    name: String,
}

impl DmaHeap {
    /// Opens `/dev/dma_heap/<name>` (for example `"system"`).
    pub fn open(name: &str) -> Result<DmaHeap, DmaBufError> {
        if name.is_empty()
            || name.contains('/')
            || name == "."
            || name == ".."
            || name.contains('\0')
        {
            return Err(DmaBufError::InvalidName(name.to_owned()));
        }
        let path = PathBuf::from(HEAP_DIR).join(name);
        let fd = rustix::fs::open(&path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).map_err(
            |e| DmaBufError::NoHeap {
                path: path.clone(),
                source: e.into(),
            },
        )?;
        Ok(DmaHeap {
            fd,
            name: name.to_owned(),
        })
    }

    /// The heaps this machine offers (names in [`HEAP_DIR`]); empty where there are none.
    pub fn list() -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(HEAP_DIR)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The heap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Allocates a dma-buf of `len` bytes (the kernel rounds up to pages), readable and writable.
    pub fn alloc(&self, len: usize) -> Result<DmaBuf, DmaBufError> {
        self.alloc_with_flags(len, (OFlags::RDWR | OFlags::CLOEXEC).bits(), 0)
    }

    /// Allocates with explicit file-descriptor flags (the kernel accepts the access mode and
    /// `O_CLOEXEC`, nothing else) and heap flags (none are defined today: any bit is an error).
    ///
    /// `O_CLOEXEC` is always added: every descriptor pagepool makes is close-on-exec, so that a
    /// program started by another thread never inherits one by accident. To hand a dma-buf to a
    /// child process, duplicate its descriptor without the flag (`dup`) for that child.
    pub fn alloc_with_flags(
        &self,
        len: usize,
        fd_flags: u32,
        heap_flags: u64,
    ) -> Result<DmaBuf, DmaBufError> {
        if len == 0 {
            return Err(DmaBufError::ZeroLength);
        }
        let mut data = AllocationData {
            len: len as u64,
            fd: 0,
            fd_flags: fd_flags | OFlags::CLOEXEC.bits(),
            heap_flags,
        };
        // SAFETY: DMA_HEAP_IOCTL_ALLOC takes a `struct dma_heap_allocation_data`, which
        // `AllocationData` mirrors field for field (`#[repr(C)]`); the kernel writes `fd`.
        unsafe {
            rustix::ioctl::ioctl(
                &self.fd,
                Updater::<DMA_HEAP_IOCTL_ALLOC, AllocationData>::new(&mut data),
            )
        }
        .map_err(os("DMA_HEAP_IOCTL_ALLOC"))?;
        // SAFETY: on success the kernel returned a new file descriptor that nobody else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(data.fd as i32) };
        let len = rustix::fs::fstat(&fd).map_err(os("fstat dma-buf"))?.st_size as usize;
        Ok(DmaBuf { fd, len })
    }
}

/// A dma-buf: a file descriptor for a buffer that devices and processes can share.
///
/// Its memory is reached through [`map`](Self::map) and [`DmaBufMap::access`], by copies. A
/// dma-buf's memory is shared by nature: every holder of a descriptor (a duplicate, another
/// process), every mapping and every device the buffer is attached to may write it at any
/// time, and the kernel does not tell. A Rust `&[u8]` promises that nothing writes the bytes
/// while it lives, and a `&mut [u8]` that nothing else even reads them; neither promise can be
/// kept for such memory, so safe code never gets a slice of it: [`CpuAccess`] copies with
/// relaxed atomic loads and stores of aligned 8-byte words, which are defined whatever else
/// writes at the same time, and its `unsafe` slice accessors are for callers who know that
/// nobody else holds the buffer. Every descriptor pagepool makes for a dma-buf is
/// close-on-exec.
#[derive(Debug)]
pub struct DmaBuf {
    fd: OwnedFd,
    len: usize,
}

/// Which CPU access a [`DmaBufMap::access`] bracket announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The CPU only reads.
    Read,
    /// The CPU only writes.
    Write,
    /// The CPU reads and writes.
    ReadWrite,
}

impl Access {
    fn flags(self) -> u64 {
        match self {
            Access::Read => SYNC_READ,
            Access::Write => SYNC_WRITE,
            Access::ReadWrite => SYNC_READ | SYNC_WRITE,
        }
    }
}

impl DmaBuf {
    /// Wraps a dma-buf file descriptor received from elsewhere.
    pub fn from_fd(fd: OwnedFd) -> Result<DmaBuf, DmaBufError> {
        let len = rustix::fs::fstat(&fd).map_err(os("fstat dma-buf"))?.st_size as usize;
        Ok(DmaBuf { fd, len })
    }

    /// The buffer's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty buffer (the kernel never makes one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives up the buffer's file descriptor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// A second descriptor for the same dma-buf (both refer to one open file).
    pub fn try_clone(&self) -> Result<DmaBuf, DmaBufError> {
        let fd = rustix::io::fcntl_dupfd_cloexec(&self.fd, 0).map_err(os("dup dma-buf"))?;
        Ok(DmaBuf { fd, len: self.len })
    }

    /// Maps the whole buffer, shared, readable and writable.
    ///
    /// It takes `&self` and may be called any number of times: a dma-buf is shared memory,
    /// which other mappings (here or in other processes, through duplicated or passed
    /// descriptors) and devices may write at any time. So neither the mapping nor its
    /// [`CpuAccess`] hands out a `&[u8]` or `&mut [u8]` in safe code (such a slice promises
    /// that nothing else writes the bytes while it lives, which nobody can promise here): they
    /// copy, with atomic word accesses that are defined whatever else writes. The `unsafe`
    /// [`CpuAccess::as_slice`] and [`CpuAccess::as_mut_slice`] are for callers who know that
    /// nothing else holds the buffer. A mapping holds a reference to the file: [`file_count`]
    /// counts it.
    ///
    /// # Examples
    /// ```no_run
    /// use pagepool::dmabuf::{Access, DmaHeap};
    ///
    /// let buf = DmaHeap::open("system")?.alloc(4096)?;
    /// let mut map = buf.map()?;
    /// let mut cpu = map.access(Access::ReadWrite)?;
    /// cpu.write(100, b"hello")?;
    /// let mut back = [0; 5];
    /// cpu.read(100, &mut back)?;
    /// assert_eq!(&back, b"hello");
    /// # Ok::<(), pagepool::dmabuf::DmaBufError>(())
    /// ```
    pub fn map(&self) -> Result<DmaBufMap<'_>, DmaBufError> {
        // Mapped and kept from fork in one gate: a child forked in between would share the
        // mapping (see `crate::fork`).
        let gate = crate::fork::Gate::open();
        // SAFETY: a null hint without MAP_FIXED: the kernel picks an unused range.
        let p = unsafe {
            rustix::mm::mmap(
                ptr::null_mut(),
                self.len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &self.fd,
                0,
            )
        }
        .map_err(os("mmap dma-buf"))?;
        let ptr =
            NonNull::new(p.cast()).ok_or_else(|| os("mmap dma-buf")(rustix::io::Errno::FAULT))?;
        // Not inherited by a forked child (see `crate::fork`).
        // SAFETY: the mapping made above, ours alone.
        if let Err(e) = unsafe { crate::fork::keep_mapping(ptr, self.len) } {
            // SAFETY: as above; nothing refers to it yet.
            let _ = unsafe { rustix::mm::munmap(p, self.len) };
            let (op, source) = e.into_parts();
            return Err(DmaBufError::Os { op, source });
        }
        drop(gate);
        // SAFETY: the mapping is page-aligned, covers `len` bytes rounded up to pages, and is
        // unmapped only when the `DmaBufMap` drops, after every `CpuAccess` borrowing it. This
        // program touches it only through `CpuAccess`: atomic copies, or slices whose callers
        // promise (`unsafe`) that no other access happens meanwhile.
        let mem = unsafe { SharedMem::new(ptr, self.len) };
        Ok(DmaBufMap {
            mem,
            buf: self,
            generation: crate::fork::generation(),
        })
    }

    fn sync(&self, flags: u64) -> Result<(), DmaBufError> {
        // SAFETY: DMA_BUF_IOCTL_SYNC takes a `struct dma_buf_sync` (one u64), mirrored by
        // `SyncData`.
        unsafe {
            rustix::ioctl::ioctl(
                &self.fd,
                Setter::<DMA_BUF_IOCTL_SYNC, SyncData>::new(SyncData { flags }),
            )
        }
        .map_err(os("DMA_BUF_IOCTL_SYNC"))
    }
}

impl AsFd for DmaBuf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A CPU mapping of a [`DmaBuf`]. Unmapped when dropped.
///
/// The mapping itself gives no access: [`access`](Self::access) brackets CPU access with the
/// kernel's sync calls and returns a [`CpuAccess`], which copies bytes in and out.
pub struct DmaBufMap<'a> {
    /// The mapped bytes: `buf.len()` of them, page-aligned.
    mem: SharedMem,
    buf: &'a DmaBuf,
    /// The fork generation that made the mapping: a forked child does not have it.
    generation: u64,
}

impl<'a> DmaBufMap<'a> {
    /// Announces CPU access to the kernel (`DMA_BUF_SYNC_START`) and returns the mapped bytes;
    /// the end of access (`DMA_BUF_SYNC_END`) is announced when the guard is dropped.
    ///
    /// # Examples
    /// ```no_run
    /// use pagepool::dmabuf::{Access, DmaHeap};
    ///
    /// let buf = DmaHeap::open("system")?.alloc(1 << 20)?;
    /// let mut map = buf.map()?;
    /// map.access(Access::Write)?.fill(0xff); // SYNC_START, fill, SYNC_END
    /// # Ok::<(), pagepool::dmabuf::DmaBufError>(())
    /// ```
    pub fn access(&mut self, access: Access) -> Result<CpuAccess<'_, 'a>, DmaBufError> {
        self.buf.sync(access.flags())?;
        Ok(CpuAccess { map: self, access })
    }
}

impl Drop for DmaBufMap<'_> {
    fn drop(&mut self) {
        if self.generation != crate::fork::generation() {
            // Inherited by a forked child, which has no such mapping: the range holds the
            // placeholder `crate::fork` put there, and stays reserved.
            return;
        }
        crate::fork::forget_mapping(self.mem.ptr, self.buf.len);
        // SAFETY: the mapping is ours; every `CpuAccess` borrowing it, and with it every slice
        // it handed out, has ended.
        if let Err(e) = unsafe { rustix::mm::munmap(self.mem.ptr.as_ptr().cast(), self.buf.len) } {
            log::error!("pagepool: munmap dma-buf: {e}");
        }
    }
}

impl fmt::Debug for DmaBufMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBufMap")
            .field("ptr", &self.mem.ptr)
            .field("len", &self.buf.len)
            .finish()
    }
}

/// CPU access to a mapped dma-buf, between `DMA_BUF_SYNC_START` and `DMA_BUF_SYNC_END`.
///
/// It does not dereference to `[u8]`: while it lives, a duplicated descriptor, another mapping,
/// another process or a device may write the same memory, and a Rust slice over memory that
/// changes under it (or, for `&mut [u8]`, that anyone else reads) is undefined behaviour. The
/// safe methods copy with relaxed atomic loads and stores of aligned 8-byte words (bytes of a
/// partly covered word are merged with a compare-and-swap, so neighbouring bytes are never
/// overwritten with stale values): they are defined whatever else happens to the memory. A
/// racing writer's bytes may or may not be seen, each aligned word whole; to see a device's
/// writes, start the access after the device is done.
///
/// [`as_slice`](Self::as_slice) and [`as_mut_slice`](Self::as_mut_slice) give a slice, without
/// copying, to a caller who can promise that nothing else writes (or, for the mutable slice,
/// reads) the buffer meanwhile, for example because its own descriptor is the file's only
/// reference ([`file_count`]).
///
/// # Examples
/// ```no_run
/// use pagepool::dmabuf::{Access, DmaHeap};
///
/// let buf = DmaHeap::open("system")?.alloc(4096)?;
/// let mut map = buf.map()?;
/// let mut cpu = map.access(Access::ReadWrite)?;
/// cpu.fill(0);
/// cpu.write(4093, &[1, 2, 3])?;
/// let mut tail = [0; 4];
/// cpu.read(4092, &mut tail)?;
/// assert_eq!(tail, [0, 1, 2, 3]);
/// assert!(cpu.write(4094, &[1, 2, 3]).is_err()); // past the end: an error, no panic
/// # Ok::<(), pagepool::dmabuf::DmaBufError>(())
/// ```
#[derive(Debug)]
pub struct CpuAccess<'m, 'a> {
    map: &'m mut DmaBufMap<'a>,
    access: Access,
}

impl CpuAccess<'_, '_> {
    /// The buffer's size in bytes.
    pub fn len(&self) -> usize {
        self.map.mem.len()
    }

    /// True for an empty buffer (the kernel never makes one).
    pub fn is_empty(&self) -> bool {
        self.map.mem.len() == 0
    }

    /// Copies `out.len()` bytes at `offset` into `out`; fails with
    /// [`DmaBufError::OutOfRange`], copying nothing, if they are not all inside the buffer.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), DmaBufError> {
        self.map.mem.read(offset, out)
    }

    /// Copies `data` into the buffer at `offset`; fails with [`DmaBufError::OutOfRange`],
    /// writing nothing, if it does not fit.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), DmaBufError> {
        self.map.mem.write(offset, data)
    }

    /// Sets every byte of the buffer to `byte`.
    pub fn fill(&mut self, byte: u8) {
        self.map.mem.fill(byte);
    }

    /// The mapped bytes as a slice, without copying.
    ///
    /// # Safety
    /// While the slice lives, nothing may write the buffer: no other holder of a descriptor of
    /// the dma-buf (a duplicate, a descriptor in another process), no other mapping of it (in
    /// this process or another), no device, and no other view of its pages (the
    /// [`ExportedBuffer`](crate::ExportedBuffer) a dma-buf was exported from). [`file_count`]
    /// is a way to know: if it was 1 for the [`DmaBuf`] before it was mapped (its descriptor
    /// is the file's only reference), no descriptor of it was handed out since, and it is not
    /// an `ExportedBuffer`'s, this mapping is the only way to the memory. Reading a buffer that
    /// others only read is fine.
    ///
    /// # Examples
    /// ```no_run
    /// use pagepool::dmabuf::{file_count, Access, DmaHeap};
    /// use std::os::fd::AsFd;
    ///
    /// let buf = DmaHeap::open("system")?.alloc(4096)?;
    /// assert_eq!(file_count(buf.as_fd()).ok(), Some(1));
    /// let mut map = buf.map()?;
    /// let cpu = map.access(Access::Read)?;
    /// // SAFETY: `buf` was allocated above and its descriptor is the file's only reference:
    /// // no other descriptor, mapping or device can write it while `bytes` lives.
    /// let bytes = unsafe { cpu.as_slice() };
    /// assert!(bytes.iter().all(|&b| b == 0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: forwarded: the caller promises that nothing writes the buffer meanwhile; the
        // borrow of `self` keeps the mapping, and the `&mut` borrow it holds of it, alive.
        unsafe { self.map.mem.as_slice() }
    }

    /// The mapped bytes as a mutable slice, without copying.
    ///
    /// # Safety
    /// While the slice lives, nothing else may read or write the buffer: no other holder of a
    /// descriptor of the dma-buf (a duplicate, a descriptor in another process), no other
    /// mapping of it (in this process or another), no device, and no other view of its pages
    /// (the [`ExportedBuffer`](crate::ExportedBuffer) a dma-buf was exported from). As for
    /// [`as_slice`](Self::as_slice), a [`file_count`] of 1 before mapping, with no descriptor
    /// handed out since, guarantees it for a dma-buf that is not an `ExportedBuffer`'s.
    ///
    /// # Examples
    /// ```no_run
    /// use pagepool::dmabuf::{file_count, Access, DmaHeap};
    /// use std::os::fd::AsFd;
    ///
    /// let buf = DmaHeap::open("system")?.alloc(1 << 20)?;
    /// assert_eq!(file_count(buf.as_fd()).ok(), Some(1));
    /// let mut map = buf.map()?;
    /// let mut cpu = map.access(Access::Write)?;
    /// // SAFETY: `buf`'s descriptor is the file's only reference and `map` its only mapping:
    /// // nothing else can read or write it while the slice lives.
    /// unsafe { cpu.as_mut_slice() }.copy_from_slice(&vec![7; 1 << 20]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: forwarded: the caller promises exclusive access to the buffer meanwhile; the
        // `&mut` borrow of `self` keeps this bracket's own copies out.
        unsafe { self.map.mem.as_mut_slice() }
    }
}

impl Drop for CpuAccess<'_, '_> {
    fn drop(&mut self) {
        if let Err(e) = self.map.buf.sync(self.access.flags() | SYNC_END) {
            log::error!("pagepool: {e}");
        }
    }
}
