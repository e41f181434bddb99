//! Write tracking, measured as the pools would use it: a clean block kept write-protected
//! through userfaultfd's asynchronous write-protect mode (`UFFD_FEATURE_WP_ASYNC`: a write to a
//! protected page is resolved by the kernel, which clears the page's protection, without a
//! message to a handler), and on its way back the pages written found with `PAGEMAP_SCAN`
//! (`PAGE_IS_WRITTEN`), zeroed, and protected again (`PM_SCAN_WP_MATCHING`). It is the
//! sparse mode's `write-tracking` row: the cost per call of tracking beside the pools' (which
//! zero what a block was allocated with) and glibc's (fresh pages, a fault for each written).
//! The pools do not track writes: docs/DESIGN.md says why, from this row.

use std::io;

/// `struct page_region` of `<linux/fs.h>` (Linux 6.7).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` of `<linux/fs.h>` (Linux 6.7).
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16) | (0x66 << 8) | 16;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = (3 << 30) | (32 << 16) | (0xAA << 8);

/// How many written regions one `PAGEMAP_SCAN` call reports at most (a region is a run of
/// written pages); the scan goes on where the kernel stopped.
const REGIONS: usize = 4096;

/// One anonymous block under write tracking, clean and protected between calls.
pub struct TrackedBlock {
    ptr: *mut u8,
    len: usize,
    uffd: libc::c_int,
    pagemap: libc::c_int,
    regions: Vec<PageRegion>,
    found: Vec<PageRegion>,
}

impl TrackedBlock {
    /// A block of `len` bytes (a multiple of the page size), zeroed and protected; an error
    /// where the kernel has no asynchronous write-protect or no `PAGEMAP_SCAN`.
    pub fn new(len: usize) -> io::Result<TrackedBlock> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut block = TrackedBlock {
            ptr: ptr.cast(),
            len,
            uffd: -1,
            pagemap: -1,
            regions: vec![PageRegion::default(); REGIONS],
            found: Vec::new(),
        };
        // SAFETY: plain syscalls on descriptors and memory this value owns; each result checked.
        unsafe {
            block.uffd = libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
            ) as libc::c_int;
            if block.uffd < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut api = UffdioApi {
                api: UFFD_API,
                features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
                ioctls: 0,
            };
            if libc::ioctl(block.uffd, UFFDIO_API, &mut api) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut reg = UffdioRegister {
                start: block.ptr as u64,
                len: len as u64,
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            if libc::ioctl(block.uffd, UFFDIO_REGISTER, &mut reg) != 0 {
                return Err(io::Error::last_os_error());
            }
            block.pagemap = libc::open(
                c"/proc/self/pagemap".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if block.pagemap < 0 {
                return Err(io::Error::last_os_error());
            }
            std::ptr::write_bytes(block.ptr, 0, len);
        }
        block.scan(true)?;
        Ok(block)
    }

    /// The block's memory: zero, every page protected.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Scans the block for written pages, protecting them again if `protect`; the regions
    /// found are in `self.found`. A scan reports at most `REGIONS` regions: it goes on from
    /// where the kernel stopped until the block's end.
    fn scan(&mut self, protect: bool) -> io::Result<()> {
        self.found.clear();
        let end = self.ptr as u64 + self.len as u64;
        let mut start = self.ptr as u64;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: if protect {
                    PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
                } else {
                    0
                },
                start,
                end,
                walk_end: 0,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: REGIONS as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: `arg` describes part of this block's range and a vector of REGIONS
            // entries the kernel fills; both live across the call.
            let n = unsafe { libc::ioctl(self.pagemap, PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            self.found.extend_from_slice(&self.regions[..n as usize]);
            if arg.walk_end <= start {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            start = arg.walk_end;
        }
        Ok(())
    }

    /// The block's way back to the clean pool: finds what was written, zeroes it, protects
    /// it again. Returns the bytes zeroed.
    pub fn clean(&mut self) -> io::Result<usize> {
        self.scan(false)?;
        let mut zeroed = 0;
        for r in &self.found {
            let len = (r.end - r.start) as usize;
            // SAFETY: the kernel reported this range inside the block's own mapping.
            unsafe { std::ptr::write_bytes(r.start as *mut u8, 0, len) };
            zeroed += len;
        }
        self.scan(true)?;
        Ok(zeroed)
    }
}

impl Drop for TrackedBlock {
    fn drop(&mut self) {
        // SAFETY: the mapping and descriptors this value made, released once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
            if self.uffd >= 0 {
                libc::close(self.uffd);
            }
            if self.pagemap >= 0 {
                libc::close(self.pagemap);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_written_pages_are_found_and_zeroed() {
        let mut b = match TrackedBlock::new(4 << 20) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("write tracking unavailable here ({e}): not tested");
                return;
            }
        };
        for round in 0..3 {
            for page in (0..1024).step_by(32) {
                // SAFETY: page < 1024, inside the 4 MiB block.
                unsafe { b.ptr().add(page * 4096 + 7).write_volatile(round + 1) };
            }
            assert_eq!(b.clean().unwrap(), 32 * 4096, "round {round}");
            // SAFETY: the whole block, read.
            let all = unsafe { std::slice::from_raw_parts(b.ptr(), 4 << 20) };
            assert!(all.iter().all(|&x| x == 0), "round {round}");
        }
        assert_eq!(b.clean().unwrap(), 0, "nothing written since");
    }
}
