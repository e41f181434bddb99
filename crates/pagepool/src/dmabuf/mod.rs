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

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{Mode, OFlags};
use rustix::ioctl::{Setter, Updater, opcode};
use rustix::mm::{MapFlags, ProtFlags};

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

/// `struct udmabuf_create_item` from `<linux/udmabuf.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UdmabufItem {
    memfd: u32,
    pad: u32,
    offset: u64,
    size: u64,
}

/// `struct udmabuf_create_list` (its header; the items follow it in memory).
#[repr(C)]
struct UdmabufListHeader {
    flags: u32,
    count: u32,
}

const UDMABUF_CREATE_LIST: rustix::ioctl::Opcode = opcode::write::<UdmabufListHeader>(b'u', 0x43);
const UDMABUF_FLAGS_CLOEXEC: u32 = 1;

/// The udmabuf device, which turns memfd ranges into dma-bufs.
pub const UDMABUF_PATH: &str = "/dev/udmabuf";

/// The `UDMABUF_CREATE_LIST` call: a header and its items, laid out as the kernel reads them.
struct CreateList {
    words: Vec<u64>,
}

// SAFETY: the opcode is UDMABUF_CREATE_LIST, whose argument is a `udmabuf_create_list` header
// followed by `count` items; `words` holds exactly that (u64-aligned, `#[repr(C)]` layouts). The
// kernel only reads it, and returns the new dma-buf's file descriptor as the ioctl's result.
unsafe impl rustix::ioctl::Ioctl for CreateList {
    type Output = OwnedFd;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> rustix::ioctl::Opcode {
        UDMABUF_CREATE_LIST
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        self.words.as_mut_ptr().cast()
    }
    unsafe fn output_from_ptr(
        out: rustix::ioctl::IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<OwnedFd> {
        // SAFETY: on success UDMABUF_CREATE_LIST returns a new file descriptor we now own.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(out) })
    }
}

/// Makes one dma-buf of the memfd ranges `(memfd, offset, size)`, in order, through
/// `/dev/udmabuf`. Offsets and sizes must be page-aligned, and each memfd sealed against
/// shrinking (`F_SEAL_SHRINK`) and not against writing. The dma-buf holds the pages: they stay
/// its memory even if the ranges are later punched out of the memfds.
pub fn udmabuf_create(ranges: &[(BorrowedFd<'_>, u64, u64)]) -> Result<DmaBuf, DmaBufError> {
    if ranges.is_empty() || ranges.iter().any(|r| r.2 == 0) {
        return Err(DmaBufError::ZeroLength);
    }
    let dev = rustix::fs::open(UDMABUF_PATH, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| DmaBufError::NoHeap {
            path: UDMABUF_PATH.into(),
            source: e.into(),
        })?;
    let header = UdmabufListHeader {
        flags: UDMABUF_FLAGS_CLOEXEC,
        count: ranges.len() as u32,
    };
    let mut words = vec![u64::from(header.flags) | (u64::from(header.count) << 32)];
    for (fd, offset, size) in ranges {
        let item = UdmabufItem {
            memfd: std::os::fd::AsRawFd::as_raw_fd(fd) as u32,
            pad: 0,
            offset: *offset,
            size: *size,
        };
        words.push(u64::from(item.memfd) | (u64::from(item.pad) << 32));
        words.push(item.offset);
        words.push(item.size);
    }
    // SAFETY: see the `Ioctl` implementation of `CreateList`; the memfds stay open (borrowed)
    // for the duration of the call.
    let fd = unsafe { rustix::ioctl::ioctl(&dev, CreateList { words }) }
        .map_err(os("UDMABUF_CREATE_LIST"))?;
    DmaBuf::from_fd(fd)
}

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

/// The size of the words [`SharedMem`] copies with.
const WORD: usize = size_of::<AtomicU64>();
const _: () = assert!(align_of::<AtomicU64>() == WORD);

/// Memory that others may write at any time (other mappings of the same pages, other
/// processes, devices), so that Rust must not form references to it: `len` bytes at `ptr`,
/// read and written only with relaxed atomic loads, stores and compare-and-swaps of whole
/// aligned 8-byte words. A word partly inside a copy is merged with a compare-and-swap, so
/// that its other bytes are never written back stale, and every access to a byte is one of the
/// same size at the same address, as the Rust memory model requires of racing atomic accesses.
///
/// It does not own or track the memory: its maker (see [`SharedMem::new`]) keeps the mapping
/// alive while it is used.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedMem {
    ptr: NonNull<u8>,
    len: usize,
}

impl SharedMem {
    /// # Safety
    /// For as long as the value (or a copy) is used:
    /// - `ptr` is aligned to 8 bytes, and every aligned 8-byte word that overlaps
    ///   `ptr..ptr + len` is mapped, readable and writable (a page-aligned mapping of `len`
    ///   bytes is: mappings are whole pages);
    /// - no Rust code accesses those words other than through a `SharedMem` (or as
    ///   [`as_slice`](Self::as_slice) and [`as_mut_slice`](Self::as_mut_slice) allow), so that
    ///   every access racing with these is an atomic one of the same size; accesses the
    ///   program does not see (devices, other processes) are allowed.
    pub(crate) unsafe fn new(ptr: NonNull<u8>, len: usize) -> SharedMem {
        debug_assert!(ptr.as_ptr().addr().is_multiple_of(WORD));
        SharedMem { ptr, len }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The aligned word `i` (bytes `i * WORD..(i + 1) * WORD`).
    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i * WORD < self.len);
        // SAFETY: the word overlaps `ptr..ptr + len`, so it is mapped, aligned (`ptr` is), and
        // valid for reads and writes while `self` is used (see `new`); every racing access to
        // it is atomic and of this size (see `new`).
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(i * WORD).cast()) }
    }

    /// `Ok` if `len` bytes at `offset` lie inside the memory.
    fn check(&self, offset: usize, len: usize) -> Result<(), DmaBufError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(DmaBufError::OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Stores `src` at byte `at` of word `i`; `at + src.len() <= WORD`. The word's other bytes
    /// are left as they are, even if someone writes them meanwhile.
    fn store_part(&self, i: usize, at: usize, src: &[u8]) {
        let word = self.word(i);
        if let Ok(whole) = <[u8; WORD]>::try_from(src) {
            word.store(u64::from_ne_bytes(whole), Ordering::Relaxed);
            return;
        }
        let mut old = word.load(Ordering::Relaxed);
        loop {
            let mut bytes = old.to_ne_bytes();
            bytes[at..at + src.len()].copy_from_slice(src);
            let new = u64::from_ne_bytes(bytes);
            match word.compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => old = now,
            }
        }
    }

    /// Copies `out.len()` bytes at `offset` into `out`, or fails (copying nothing) if they are
    /// not all inside the memory.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), DmaBufError> {
        self.check(offset, out.len())?;
        let (mut i, at) = (offset / WORD, offset % WORD);
        let mut out = out;
        if at != 0 && !out.is_empty() {
            // The head: the end of a word.
            let n = out.len().min(WORD - at);
            let bytes = self.word(i).load(Ordering::Relaxed).to_ne_bytes();
            out[..n].copy_from_slice(&bytes[at..at + n]);
            out = &mut out[n..];
            i += 1;
        }
        let (words, tail) = out.as_chunks_mut::<WORD>();
        for chunk in words {
            *chunk = self.word(i).load(Ordering::Relaxed).to_ne_bytes();
            i += 1;
        }
        if !tail.is_empty() {
            // The tail: the start of a word.
            let bytes = self.word(i).load(Ordering::Relaxed).to_ne_bytes();
            tail.copy_from_slice(&bytes[..tail.len()]);
        }
        Ok(())
    }

    /// Copies `data` to `offset`, or fails (writing nothing) if it does not fit.
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> Result<(), DmaBufError> {
        self.check(offset, data.len())?;
        let (mut i, at) = (offset / WORD, offset % WORD);
        let mut data = data;
        if at != 0 && !data.is_empty() {
            let n = data.len().min(WORD - at);
            self.store_part(i, at, &data[..n]);
            data = &data[n..];
            i += 1;
        }
        let (words, tail) = data.as_chunks::<WORD>();
        for &chunk in words {
            self.word(i)
                .store(u64::from_ne_bytes(chunk), Ordering::Relaxed);
            i += 1;
        }
        if !tail.is_empty() {
            self.store_part(i, 0, tail);
        }
        Ok(())
    }

    /// Sets every byte to `byte`.
    pub(crate) fn fill(&self, byte: u8) {
        let whole = u64::from_ne_bytes([byte; WORD]);
        let full = self.len / WORD;
        for i in 0..full {
            self.word(i).store(whole, Ordering::Relaxed);
        }
        let rest = self.len % WORD;
        if rest != 0 {
            self.store_part(full, 0, &[byte; WORD][..rest]);
        }
    }

    /// The memory as a slice.
    ///
    /// # Safety
    /// The memory is still mapped as [`SharedMem::new`] requires for the slice's lifetime `'s`,
    /// and nothing writes it meanwhile: no other mapping, process or device, and no
    /// `SharedMem`.
    pub(crate) unsafe fn as_slice<'s>(&self) -> &'s [u8] {
        // SAFETY: `ptr..ptr + len` is mapped and readable for `'s`, and the caller promises
        // that nothing writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The memory as a mutable slice.
    ///
    /// # Safety
    /// The memory is still mapped as [`SharedMem::new`] requires for the slice's lifetime `'s`,
    /// and nothing else reads or writes it meanwhile: no other mapping, process or device, and
    /// no `SharedMem`.
    #[allow(clippy::mut_from_ref)] // exclusivity is the caller's promise, not `&mut self`'s
    pub(crate) unsafe fn as_mut_slice<'s>(&self) -> &'s mut [u8] {
        // SAFETY: `ptr..ptr + len` is mapped, readable and writable for `'s`, and the caller
        // promises that nothing else accesses it meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "a/b", "..", ".", "x\0y"] {
            assert!(
                matches!(DmaHeap::open(name), Err(DmaBufError::InvalidName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_missing_heap_is_a_clear_error() {
        let e = DmaHeap::open("no-such-heap-here").unwrap_err();
        assert!(matches!(e, DmaBufError::NoHeap { .. }));
        assert!(e.to_string().contains("/dev/dma_heap/no-such-heap-here"));
    }

    #[test]
    fn udmabuf_errors_are_clear() {
        assert!(matches!(udmabuf_create(&[]), Err(DmaBufError::ZeroLength)));
        let fd = crate::os::memfd("pagepool-test", 4096).unwrap();
        match udmabuf_create(&[(fd.as_fd(), 0, 4096)]) {
            Err(DmaBufError::NoHeap { path, .. }) => assert_eq!(path, PathBuf::from(UDMABUF_PATH)),
            Ok(buf) => assert_eq!(buf.len(), 4096), // a machine with /dev/udmabuf
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn file_count_reads_fdinfo() {
        let fd = crate::os::memfd("pagepool-test", 4096).unwrap();
        // Regular files show no count: line.
        assert!(file_count(fd.as_fd()).is_err());
    }

    /// `len` bytes of `fd` from offset 0, mapped shared; unmapped on drop.
    struct Mapping {
        ptr: NonNull<u8>,
        len: usize,
    }

    impl Mapping {
        fn new(fd: BorrowedFd<'_>, len: usize) -> Mapping {
            // SAFETY: a null hint without MAP_FIXED: the kernel picks an unused range.
            let p = unsafe {
                rustix::mm::mmap(
                    ptr::null_mut(),
                    len,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED,
                    fd,
                    0,
                )
            }
            .unwrap();
            Mapping {
                ptr: NonNull::new(p.cast()).unwrap(),
                len,
            }
        }

        /// The first `len` bytes as shared memory.
        fn mem(&self, len: usize) -> SharedMem {
            assert!(len <= self.len);
            // SAFETY: a page-aligned mapping of at least `len` bytes, alive while the test
            // uses the value; the tests reach it only through `SharedMem`.
            unsafe { SharedMem::new(self.ptr, len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`; no `SharedMem` of it is used any more.
            unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) }.unwrap();
        }
    }

    fn page() -> usize {
        crate::os::page_size()
    }

    fn one_page() -> (OwnedFd, Mapping) {
        let fd = crate::os::memfd("pagepool-test", page()).unwrap();
        let map = Mapping::new(fd.as_fd(), page());
        (fd, map)
    }

    fn contents(mem: &SharedMem) -> Vec<u8> {
        let mut v = vec![0; mem.len()];
        mem.read(0, &mut v).unwrap();
        v
    }

    #[test]
    fn shared_copies_match_a_model_at_every_offset_and_length() {
        let (_fd, map) = one_page();
        let whole = map.mem(page());
        whole.fill(0xee);
        // An odd length: the last word is partly outside the memory.
        let len = 61;
        let mem = map.mem(len);
        let mut model = vec![0xee; len];
        for offset in 0..=len {
            for n in 0..=len - offset {
                let data: Vec<u8> = (0..n).map(|k| (offset * 31 + n * 7 + k) as u8).collect();
                mem.write(offset, &data).unwrap();
                model[offset..offset + n].copy_from_slice(&data);
                let mut back = vec![0; n];
                mem.read(offset, &mut back).unwrap();
                assert_eq!(back, data, "at {offset}, {n} bytes");
                assert_eq!(contents(&mem), model, "after writing {n} bytes at {offset}");
            }
        }
        for offset in 0..=len {
            for n in 0..=len - offset {
                let mut back = vec![0; n];
                mem.read(offset, &mut back).unwrap();
                assert_eq!(back, model[offset..offset + n], "at {offset}, {n} bytes");
            }
        }
        // Nothing past the end was touched, not even in the last word.
        assert!(contents(&whole)[len..].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn shared_fill_covers_exactly_the_memory() {
        let (_fd, map) = one_page();
        let whole = map.mem(page());
        for len in [0, 1, 7, 8, 9, 61, 64, page() - 3, page()] {
            whole.fill(0xee);
            let mem = map.mem(len);
            mem.fill(0x5a);
            let all = contents(&whole);
            assert!(all[..len].iter().all(|&b| b == 0x5a), "len {len}");
            assert!(all[len..].iter().all(|&b| b == 0xee), "len {len}");
        }
    }

    #[test]
    fn shared_copies_out_of_range_are_errors_and_touch_nothing() {
        let (_fd, map) = one_page();
        let mem = map.mem(61);
        mem.fill(1);
        let mut buf = [0; 64];
        mem.read(61, &mut buf[..0]).unwrap(); // empty, at the end: fine
        mem.write(61, &[]).unwrap();
        let cases: [(usize, usize); 6] = [
            (62, 0),
            (61, 1),
            (60, 2),
            (0, 62),
            (usize::MAX, 1),
            (usize::MAX, 0),
        ];
        for (offset, n) in cases {
            let e = mem.read(offset, &mut buf[..n]).unwrap_err();
            assert!(
                matches!(e, DmaBufError::OutOfRange { offset: o, len: l, size: 61 } if o == offset && l == n),
                "{e:?}"
            );
            assert!(mem.write(offset, &[9; 64][..n]).is_err());
        }
        let big = vec![9; 100];
        assert!(mem.write(1, &big).is_err());
        assert!(
            contents(&mem).iter().all(|&b| b == 1),
            "a failed write wrote"
        );
        let e = mem.write(60, &[0, 0]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "2 bytes at offset 60 are outside the buffer of 61 bytes"
        );
    }

    #[test]
    fn two_mappings_of_the_same_pages_see_each_others_copies() {
        let fd = crate::os::memfd("pagepool-test", 2 * page()).unwrap();
        let (a, b) = (
            Mapping::new(fd.as_fd(), 2 * page()),
            Mapping::new(fd.as_fd(), 2 * page()),
        );
        let (a, b) = (a.mem(2 * page()), b.mem(2 * page()));
        let at = page() - 5; // across the page boundary, unaligned at both ends
        a.write(at, b"0123456789abc").unwrap();
        let mut back = [0; 13];
        b.read(at, &mut back).unwrap();
        assert_eq!(&back, b"0123456789abc");
        b.fill(0);
        a.read(at, &mut back).unwrap();
        assert_eq!(back, [0; 13]);
    }

    #[test]
    fn racing_writes_to_neighbouring_bytes_lose_nothing() {
        // Two threads write alternate bytes, so that every word is shared and every write
        // merges into a word the other thread writes too; each checks that its own bytes keep
        // what it wrote (a merge that wrote back a stale neighbour would undo it). A third
        // thread reads all along.
        let (_fd, map) = one_page();
        let len = 67;
        map.mem(len).fill(0);
        let (ptr, rounds) = (map.ptr.as_ptr().addr(), 2000_usize);
        let mem = move || {
            // SAFETY: the mapping outlives the scope below; only `SharedMem`s reach it.
            unsafe { SharedMem::new(NonNull::new(ptr as *mut u8).unwrap(), len) }
        };
        let start = std::sync::Barrier::new(3);
        std::thread::scope(|s| {
            for parity in 0..2 {
                let start = &start;
                s.spawn(move || {
                    let mem = mem();
                    start.wait();
                    for round in 1..=rounds {
                        let value = round as u8;
                        for i in (parity..len).step_by(2) {
                            mem.write(i, &[value]).unwrap();
                            let mut mine = [0];
                            for j in (parity..=i).step_by(2) {
                                mem.read(j, &mut mine).unwrap();
                                assert_eq!(mine[0], value, "byte {j} lost round {round}");
                            }
                        }
                    }
                });
            }
            let start = &start;
            s.spawn(move || {
                let mem = mem();
                start.wait();
                for _ in 0..rounds {
                    let mut v = vec![0; len];
                    mem.read(0, &mut v).unwrap();
                    // Each word is read at once; in it, each thread's bytes were written in
                    // order, round after round: this round's, then the last round's.
                    for word in v.chunks(WORD) {
                        for parity in 0..2 {
                            let mine: Vec<u8> =
                                word.iter().copied().skip(parity).step_by(2).collect();
                            assert!(
                                mine.windows(2)
                                    .all(|w| w[0] == w[1] || w[0] == w[1].wrapping_add(1)),
                                "{v:?}"
                            );
                        }
                    }
                }
            });
        });
        assert!(contents(&mem()).iter().all(|&b| b == rounds as u8));
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // _IOWR('H', 0, 24 bytes) and _IOW('b', 0, 8 bytes), from <linux/dma-heap.h> and
        // <linux/dma-buf.h>.
        assert_eq!(DMA_HEAP_IOCTL_ALLOC as u64, 0xc018_4800);
        assert_eq!(DMA_BUF_IOCTL_SYNC as u64, 0x4008_6200);
        // _IOW('u', 0x43, 8 bytes) from <linux/udmabuf.h>.
        assert_eq!(UDMABUF_CREATE_LIST as u64, 0x4008_7543);
    }
}
