//! Real dma-bufs from the kernel's DMA-BUF heaps (`/dev/dma_heap/<name>`).
//!
//! A [`DmaHeap`] is an open heap device; [`DmaHeap::alloc`] asks the kernel for a buffer
//! (`DMA_HEAP_IOCTL_ALLOC`) and returns it as a [`DmaBuf`]: a file descriptor that can be passed
//! to devices and other processes. CPU access goes through a mapping ([`DmaBuf::map`]) and is
//! bracketed by `DMA_BUF_IOCTL_SYNC` start/end calls ([`DmaBufMap::access`]), which keep caches
//! coherent with devices on the architectures that need it.
//!
//! Many machines have no `/dev/dma_heap` (the kernel needs `CONFIG_DMABUF_HEAPS`); opening a heap
//! there fails with [`DmaBufError::NoHeap`].

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::ptr::{self, NonNull};

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

    /// Allocates with explicit file-descriptor flags (`O_RDWR | O_CLOEXEC` and no others are
    /// accepted by the kernel) and heap flags (none are defined today: any bit is an error).
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
            fd_flags,
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
    pub fn map(&self) -> Result<DmaBufMap<'_>, DmaBufError> {
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
        Ok(DmaBufMap { ptr, buf: self })
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
pub struct DmaBufMap<'a> {
    ptr: NonNull<u8>,
    buf: &'a DmaBuf,
}

impl<'a> DmaBufMap<'a> {
    /// Announces CPU access to the kernel (`DMA_BUF_SYNC_START`) and returns the mapped bytes;
    /// the end of access (`DMA_BUF_SYNC_END`) is announced when the guard is dropped.
    pub fn access(&mut self, access: Access) -> Result<CpuAccess<'_, 'a>, DmaBufError> {
        self.buf.sync(access.flags())?;
        Ok(CpuAccess { map: self, access })
    }
}

impl Drop for DmaBufMap<'_> {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; every `CpuAccess` borrowing it has ended.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.buf.len) } {
            log::error!("pagepool: munmap dma-buf: {e}");
        }
    }
}

impl fmt::Debug for DmaBufMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBufMap")
            .field("ptr", &self.ptr)
            .field("len", &self.buf.len)
            .finish()
    }
}

/// CPU access to a mapped dma-buf, between `DMA_BUF_SYNC_START` and `DMA_BUF_SYNC_END`.
#[derive(Debug)]
pub struct CpuAccess<'m, 'a> {
    map: &'m mut DmaBufMap<'a>,
    access: Access,
}

impl Deref for CpuAccess<'_, '_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping covers `len` bytes and lives as long as the borrow of `map`.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr(), self.map.buf.len) }
    }
}

impl DerefMut for CpuAccess<'_, '_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` holds the only borrow of the mapping.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr(), self.map.buf.len) }
    }
}

impl Drop for CpuAccess<'_, '_> {
    fn drop(&mut self) {
        if let Err(e) = self.map.buf.sync(self.access.flags() | SYNC_END) {
            log::error!("pagepool: {e}");
        }
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
