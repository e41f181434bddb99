//! The OS layer: every system call pagepool makes, behind one contract.
//!
//! Memory comes from *memfd arenas*: an anonymous in-memory file (`memfd_create`), sized with
//! `ftruncate` (sparse: no memory is used until pages are touched), and mapped once, shared, at a
//! fixed *home* address. A block is a page range of an arena. Because the memory belongs to a
//! file, the same pages can be mapped a second time anywhere else (`mmap(MAP_SHARED | MAP_FIXED)`
//! at the block's file offset) without copying: that is how blocks scattered over arenas become
//! one contiguous buffer, and how buffers can later be shared as file descriptors.
//!
//! The contract, stated once for all functions here:
//! - lengths and file offsets are multiples of [`page_size`]; addresses are page-aligned;
//! - every failure is returned as an [`OsError`] naming the operation; nothing here panics;
//! - functions that take raw addresses are `unsafe`: the caller owns the address range and
//!   guarantees no Rust reference into it outlives an unmap or remap.

use std::ffi::c_void;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::{self, NonNull};

use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{Advice, MapFlags, ProtFlags};

use crate::error::OsError;

/// The size of a base page in bytes (4096 on x86-64). A block of order `k` is `page_size() << k`
/// bytes.
///
/// # Examples
/// ```
/// assert!(pagepool::page_size().is_power_of_two());
/// ```
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Creates an anonymous in-memory file of `len` bytes (a sparse file: no memory is used yet),
/// sealed against shrinking: `/dev/udmabuf` exports ranges only of memfds that cannot shrink.
///
/// Allocates nothing (it runs inside [`crate::fork::Gate`]s): a name the kernel would refuse
/// for its length is refused before it is copied.
pub(crate) fn memfd(name: &str, len: usize) -> Result<OwnedFd, OsError> {
    check_memfd_name(name).map_err(|e| OsError::new("memfd_create", e))?;
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(|e| OsError::new("memfd_create", e))?;
    rustix::fs::ftruncate(&fd, len as u64).map_err(|e| OsError::new("ftruncate memfd", e))?;
    rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::SHRINK)
        .map_err(|e| OsError::new("seal memfd", e))?;
    Ok(fd)
}

/// Creates a memfd of `len` bytes (a multiple of 2 MiB) backed by 2 MiB hugetlbfs pages,
/// sealed against shrinking like [`memfd`]. Fails where the kernel has no hugetlbfs.
pub(crate) fn memfd_hugetlb(name: &str, len: usize) -> Result<OwnedFd, OsError> {
    check_memfd_name(name).map_err(|e| OsError::new("memfd_create hugetlb", e))?;
    let flags = MemfdFlags::CLOEXEC
        | MemfdFlags::ALLOW_SEALING
        | MemfdFlags::HUGETLB
        | MemfdFlags::HUGE_2MB;
    let fd = rustix::fs::memfd_create(name, flags)
        .map_err(|e| OsError::new("memfd_create hugetlb", e))?;
    rustix::fs::ftruncate(&fd, len as u64)
        .map_err(|e| OsError::new("ftruncate hugetlb memfd", e))?;
    rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::SHRINK)
        .map_err(|e| OsError::new("seal memfd", e))?;
    Ok(fd)
}

/// Refuses a memfd name longer than the kernel takes (249 bytes: `NAME_MAX` less the `memfd:`
/// prefix), as `memfd_create` would (`EINVAL`): shorter names are converted to C strings on
/// the stack, longer ones would be allocated.
fn check_memfd_name(name: &str) -> Result<(), rustix::io::Errno> {
    const MFD_NAME_MAX_LEN: usize = 249;
    if name.len() > MFD_NAME_MAX_LEN {
        return Err(rustix::io::Errno::INVAL);
    }
    Ok(())
}

/// Reserves `len` bytes of address space aligned to `align` (a power of two, at least a page),
/// with no access and no memory behind it; the slack taken to align it is given back.
pub(crate) fn reserve_aligned(len: usize, align: usize) -> Result<NonNull<u8>, OsError> {
    let page = page_size();
    if align <= page {
        return reserve(len);
    }
    let span = len
        .checked_add(align)
        .ok_or_else(|| OsError::new("mmap reserve", rustix::io::Errno::NOMEM))?;
    let p = reserve(span)?;
    let start = p.as_ptr() as usize;
    // Bounded: `start + span` is the end of the reservation just made, and `align - 1 < span`.
    let aligned = (start + align - 1) & !(align - 1);
    let (head, tail) = (aligned - start, span - len - (aligned - start));
    // SAFETY: both slack ranges lie inside the reservation just made, which nobody else knows.
    unsafe {
        if head > 0 {
            unmap(p, head)?;
        }
        if tail > 0 {
            unmap(NonNull::new_unchecked((aligned + len) as *mut u8), tail)?;
        }
        Ok(NonNull::new_unchecked(aligned as *mut u8))
    }
}

/// Asks for transparent huge pages on `p..p + len` (`MADV_HUGEPAGE`).
///
/// # Safety
/// The caller owns the range.
pub(crate) unsafe fn advise_huge(p: NonNull<u8>, len: usize) -> Result<(), OsError> {
    // SAFETY: advice only; the caller owns the range.
    unsafe { rustix::mm::madvise(p.as_ptr().cast(), len, Advice::LinuxHugepage) }
        .map_err(|e| OsError::new("madvise hugepage", e))
}

/// Asks the kernel to back `p..p + len` (populated, 2 MiB aligned) with transparent huge pages
/// now, where populating left base pages (`MADV_COLLAPSE`, Linux 6.1+). Best effort: false
/// where the kernel lacks it or could not collapse.
///
/// # Safety
/// The caller owns the range.
pub(crate) unsafe fn collapse(p: NonNull<u8>, len: usize) -> bool {
    const MADV_COLLAPSE: i32 = 25;
    // SAFETY: collapsing keeps the range's contents; the caller owns it.
    unsafe { libc::madvise(p.as_ptr().cast(), len, MADV_COLLAPSE) == 0 }
}

/// Binds the memory of `p..p + len` to NUMA node `node` (`mbind(MPOL_BIND)`): pages allocated
/// for the range come from that node only. On a shared file mapping the policy belongs to the
/// file's range, so every mapping of it gets the same placement.
///
/// # Safety
/// The caller owns the range.
pub(crate) unsafe fn bind_node(p: NonNull<u8>, len: usize, node: u32) -> Result<(), OsError> {
    const WORDS: usize = 16; // nodes 0..1024
    let (word, bit) = (node as usize / 64, node % 64);
    if word >= WORDS {
        return Err(OsError::new("mbind", rustix::io::Errno::INVAL));
    }
    let mut mask = [0u64; WORDS];
    mask[word] = 1 << bit;
    // SAFETY: `mbind` reads `mask` (WORDS * 64 bits, as `maxnode` says) and changes only the
    // memory policy of the caller's range.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            p.as_ptr(),
            len,
            libc::MPOL_BIND,
            mask.as_ptr(),
            WORDS * 64,
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(OsError::new("mbind", std::io::Error::last_os_error()))
    }
}

/// Locks `p..p + len` in memory (`mlock`): resident, never swapped, no fault on access.
///
/// # Safety
/// The caller owns the range.
pub(crate) unsafe fn lock(p: NonNull<u8>, len: usize) -> Result<(), rustix::io::Errno> {
    // Under ThreadSanitizer (`.ci/san`: rustix on libc) the sanitizer runtime's `mlock`
    // interceptor locks nothing; the system call itself, which touches no memory TSan tracks,
    // keeps a locked heap locked there too.
    #[cfg(pagepool_tsan)]
    {
        // SAFETY: as below; `mlock` reads and writes no memory of the process.
        let r = unsafe { libc::syscall(libc::SYS_mlock, p.as_ptr(), len) };
        if r != 0 {
            return Err(
                rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
                    .unwrap_or(rustix::io::Errno::NOMEM),
            );
        }
        Ok(())
    }
    // SAFETY: locking changes no contents; the caller owns the range.
    #[cfg(not(pagepool_tsan))]
    unsafe {
        rustix::mm::mlock(p.as_ptr().cast(), len)
    }
}

/// Unlocks `p..p + len` (`munlock`).
///
/// # Safety
/// The caller owns the range.
pub(crate) unsafe fn unlock(p: NonNull<u8>, len: usize) -> Result<(), OsError> {
    // The system call itself under ThreadSanitizer, as in `lock`.
    #[cfg(pagepool_tsan)]
    {
        // SAFETY: `munlock` reads and writes no memory of the process.
        let r = unsafe { libc::syscall(libc::SYS_munlock, p.as_ptr(), len) };
        if r != 0 {
            return Err(OsError::new("munlock", std::io::Error::last_os_error()));
        }
        Ok(())
    }
    // SAFETY: unlocking changes no contents; the caller owns the range.
    #[cfg(not(pagepool_tsan))]
    unsafe { rustix::mm::munlock(p.as_ptr().cast(), len) }.map_err(|e| OsError::new("munlock", e))
}

/// The process's `RLIMIT_MEMLOCK` soft limit in bytes (`None`: unlimited).
pub(crate) fn memlock_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Memlock).current
}

/// The process's locked memory in bytes (`VmLck` of `/proc/self/status`), or `None` if it
/// cannot be read.
pub(crate) fn locked_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    kb.checked_mul(1024)
}

/// Reserves `len` bytes of address space with no access and no memory behind it.
pub(crate) fn reserve(len: usize) -> Result<NonNull<u8>, OsError> {
    // SAFETY: a null hint without MAP_FIXED lets the kernel choose an unused range, so no
    // existing mapping (and no Rust reference) is affected.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            ptr::null_mut(),
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }
    .map_err(|e| OsError::new("mmap reserve", e))?;
    NonNull::new(p.cast()).ok_or_else(|| OsError::new("mmap reserve", rustix::io::Errno::FAULT))
}

/// Makes `len` bytes at `p`, part of a reservation made with [`reserve`], readable and
/// writable private anonymous memory (zero until written; counted as committed memory).
///
/// # Safety
/// The caller owns `p..p + len`, a range of its own reservation with no live reference into it.
#[cfg(not(loom))] // the private pools are not in the loom models
pub(crate) unsafe fn open_private(p: NonNull<u8>, len: usize) -> Result<(), OsError> {
    // SAFETY: the caller owns the range; changing its protection affects no one else.
    unsafe {
        rustix::mm::mprotect(
            p.as_ptr().cast(),
            len,
            rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE,
        )
    }
    .map_err(|e| OsError::new("mprotect", e))
}

/// Gives the pages of private anonymous memory at `p..p + len` back to the system
/// (`MADV_DONTNEED`): the range stays mapped and reads as zero, using no memory until written.
///
/// # Safety
/// The caller owns the range, and nothing reads or writes it during the call.
#[cfg(not(loom))]
pub(crate) unsafe fn discard(p: NonNull<u8>, len: usize) -> Result<(), OsError> {
    // SAFETY: the caller owns the range; its contents are no longer wanted.
    unsafe { rustix::mm::madvise(p.as_ptr().cast(), len, rustix::mm::Advice::LinuxDontNeed) }
        .map_err(|e| OsError::new("madvise(MADV_DONTNEED)", e))
}

/// Moves the pages of private anonymous memory at `from..from + len` to `to..to + len`
/// (`mremap` with `MREMAP_FIXED`), replacing what was at `to`; `from..from + len` is left
/// unmapped. Fails (`EFAULT`) where the range spans mappings with different flags.
///
/// # Safety
/// The caller owns both ranges (parts of its own reservation), with no live reference into
/// either; afterwards the memory is at `to`, and `from` must be mapped again before use.
#[cfg(not(loom))] // the private pools are not in the loom models
pub(crate) unsafe fn move_pages(
    from: NonNull<u8>,
    len: usize,
    to: NonNull<u8>,
) -> Result<(), OsError> {
    // SAFETY: the caller owns both ranges; MREMAP_FIXED replaces only `to..to + len`.
    unsafe {
        rustix::mm::mremap_fixed(
            from.as_ptr().cast(),
            len,
            len,
            rustix::mm::MremapFlags::MAYMOVE,
            to.as_ptr().cast(),
        )
    }
    .map(|_| ())
    .map_err(|e| OsError::new("mremap", e))
}

/// Maps zero, readable and writable private anonymous memory at `at..at + len`, where nothing
/// is mapped (`MAP_FIXED_NOREPLACE`): fails (`EEXIST`) if anything is, leaving it alone.
///
/// # Safety
/// The caller owns `at..at + len`, a hole it made in its own reservation.
#[cfg(not(loom))]
pub(crate) unsafe fn refill_private(at: NonNull<u8>, len: usize) -> Result<(), OsError> {
    // SAFETY: FIXED_NOREPLACE maps only where nothing is mapped, so no mapping of anyone
    // else is replaced.
    unsafe {
        rustix::mm::mmap_anonymous(
            at.as_ptr().cast(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE | MapFlags::NORESERVE,
        )
    }
    .map(|_| ())
    .map_err(|e| OsError::new("mmap refill", e))
}

/// Maps `len` bytes of `fd` at file offset `offset` exactly at `at`, replacing what was there;
/// with `populate`, faults the pages in at once (`MAP_POPULATE`).
///
/// # Safety
/// - `at..at + len` must lie inside a range the caller reserved with [`reserve`] and owns;
/// - no reference into that range may be live.
pub(crate) unsafe fn map_fixed(
    fd: impl AsFd,
    offset: usize,
    len: usize,
    at: NonNull<u8>,
    populate: bool,
) -> Result<(), OsError> {
    // No reservation: memfds account their memory when it is allocated; for a hugetlbfs file
    // a reservation would claim huge pages for the whole range at once (and fail when fewer
    // are free), where pagepool wants them page by page, as it populates.
    let mut flags = MapFlags::SHARED | MapFlags::FIXED | MapFlags::NORESERVE;
    if populate {
        flags |= MapFlags::POPULATE;
    }
    // SAFETY: the caller owns `at..at + len` (a reservation of its own), so replacing it
    // with MAP_FIXED cannot clobber anyone else's mapping.
    unsafe {
        rustix::mm::mmap(
            at.as_ptr().cast(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            flags,
            fd,
            offset as u64,
        )
    }
    .map(|_| ())
    .map_err(|e| OsError::new("mmap view", e))
}

/// Unmaps `len` bytes at `p`.
///
/// # Safety
/// The caller owns the range and no reference into it outlives this call.
pub(crate) unsafe fn unmap(p: NonNull<u8>, len: usize) -> Result<(), OsError> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { rustix::mm::munmap(p.as_ptr().cast::<c_void>(), len) }
        .map_err(|e| OsError::new("munmap", e))
}

/// Gives the pages of `fd` in `offset..offset + len` back to the system: afterwards they read as
/// zero and use no memory until touched again. Every mapping of the range sees the change.
pub(crate) fn punch_hole(fd: impl AsFd, offset: usize, len: usize) -> Result<(), OsError> {
    rustix::fs::fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset as u64,
        len as u64,
    )
    .map_err(|e| OsError::new("fallocate punch hole", e))
}

/// Allocates memory for `len` bytes at `p` (a range of an arena's home mapping, `offset` bytes
/// into `fd`) and maps it: the fresh-pages path, where the kernel zeroes every page.
/// Uses `MADV_POPULATE_WRITE` (Linux 5.14+); on older kernels falls back to `fallocate`, which
/// allocates the pages and leaves the mapping to fault on first touch.
///
/// # Safety
/// `p..p + len` must be a mapping of `fd` at `offset` that the caller owns.
pub(crate) unsafe fn populate(
    fd: impl AsFd,
    offset: usize,
    p: NonNull<u8>,
    len: usize,
) -> Result<(), OsError> {
    // SAFETY: the caller owns the range; populating does not change its contents (holes read
    // as zero before and after).
    match unsafe { rustix::mm::madvise(p.as_ptr().cast(), len, Advice::LinuxPopulateWrite) } {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) => {
            rustix::fs::fallocate(fd, FallocateFlags::KEEP_SIZE, offset as u64, len as u64)
                .map_err(|e| OsError::new("fallocate", e))
        }
        Err(e) => Err(OsError::new("madvise populate", e)),
    }
}

/// Whether more threads want to run, machine-wide, than the machine has cores: the running and
/// runnable count of `/proc/loadavg` (the caller included) above the online CPUs. A nice-19
/// thread then gets almost no time. `false` where it cannot be read.
#[cfg(not(loom))]
pub(crate) fn cores_oversubscribed() -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/loadavg") else {
        return false;
    };
    // "0.52 0.58 0.59 3/467 12345": the fourth field is running/total.
    let running = s
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split('/').next())
        .and_then(|r| r.parse::<usize>().ok());
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cores = usize::try_from(online).unwrap_or(1).max(1);
    running.is_some_and(|r| r > cores)
}

/// Sets the calling thread's timer slack to `ns` (how late the kernel may end its sleeps, to
/// batch wake-ups); on failure the default (50 us) stays.
pub(crate) fn set_timer_slack(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects the calling thread only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong) };
}

/// The number of mappings of this process (lines of `/proc/self/maps`).
///
/// The kernel caps it (`vm.max_map_count`, 65530 by default); pagepool keeps its share bounded,
/// see [`SystemHeap`](crate::SystemHeap).
///
/// # Examples
/// ```
/// let n = pagepool::stats::mapping_count().unwrap();
/// assert!(n > 0);
/// ```
pub fn mapping_count() -> std::io::Result<usize> {
    let maps = std::fs::read("/proc/self/maps")?;
    Ok(maps.iter().filter(|&&b| b == b'\n').count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_view_and_hole() {
        let ps = page_size();
        let fd = memfd("pagepool-test", 4 * ps).unwrap();
        let home = reserve(4 * ps).unwrap();
        // SAFETY: `home` maps 4 pages we own; the views below are ours too.
        unsafe {
            map_fixed(&fd, 0, 4 * ps, home, false).unwrap();
            populate(&fd, 0, home, 4 * ps).unwrap();
            home.as_ptr().add(ps).write(7);
            let view = reserve(2 * ps).unwrap();
            map_fixed(&fd, ps, ps, view, true).unwrap();
            assert_eq!(view.as_ptr().read(), 7, "the view aliases the home mapping");
            view.as_ptr().write(9);
            assert_eq!(home.as_ptr().add(ps).read(), 9);
            punch_hole(&fd, ps, ps).unwrap();
            // Volatile: the kernel changed the memory behind the compiler's back (an optimised
            // build would otherwise reuse the value read above).
            assert_eq!(
                home.as_ptr().add(ps).read_volatile(),
                0,
                "a punched hole reads zero"
            );
            unmap(view, 2 * ps).unwrap();
            unmap(home, 4 * ps).unwrap();
        }
    }

    #[test]
    fn errors_are_reported() {
        let fd = memfd("pagepool-test", page_size()).unwrap();
        let e = reserve(0).unwrap_err();
        assert_eq!(e.op(), "mmap reserve");
        let _ = fd;
        assert!(mapping_count().unwrap() > 0);
    }
}
