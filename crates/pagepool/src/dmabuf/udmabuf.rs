//! udmabuf: dma-bufs made of memfd ranges, through `/dev/udmabuf` (how a heap's buffer is
//! exported). Its ioctl's layouts and the call are apart from the dma-buf heaps, which they do
//! not use, and only hand their result over as a [`DmaBuf`].

use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::ioctl::opcode;

use super::{DmaBuf, DmaBufError, os};

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

pub(super) const UDMABUF_CREATE_LIST: rustix::ioctl::Opcode =
    opcode::write::<UdmabufListHeader>(b'u', 0x43);
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
