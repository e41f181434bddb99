//! Arenas: where a heap's memory comes from and goes back to.
//!
//! An arena is a memfd of a fixed size with one shared *home* mapping (see [`crate::os`]). A
//! range of it is either *unused* (a hole in the file: no memory, reads zero) or *used* (a block
//! that is pooled or in a live buffer). Getting fresh pages means carving an unused range and
//! populating it (the kernel zeroes each page); giving pages back means punching a hole and
//! marking the range unused. An arena with nothing used is unmapped and closed, so a heap that
//! is trimmed holds no memory and no mappings at all.
//!
//! Unused ranges are kept per arena in an ordered map of `offset -> length`, coalesced on
//! release; this is metadata for memory the process does *not* hold, never for pooled blocks.

use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::attrs::{HUGE_PAGE, HugeBacking, PoolType};
use crate::error::{AllocError, OsError};
use crate::sync::{AtomicU64, Mutex, MutexGuard, Ordering, lock};
use crate::{fork, os};

/// An arena's memfd: recorded so that a forked child closes its copy (see [`crate::fork`]).
pub(crate) struct ArenaFd(ManuallyDrop<OwnedFd>);

impl ArenaFd {
    /// Records `fd`, just made inside the caller's gate; on an error `fd` is closed (in the
    /// caller's gate too).
    fn new(fd: OwnedFd) -> Result<ArenaFd, OsError> {
        fork::record_fd(fd.as_fd())?;
        Ok(ArenaFd(ManuallyDrop::new(fd)))
    }
}

impl AsFd for ArenaFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Drop for ArenaFd {
    /// Forgets and closes the descriptor in one gate: a child forked between the two would
    /// keep it open, unrecorded.
    fn drop(&mut self) {
        let _gate = fork::Gate::open();
        fork::forget_fd(self.0.as_fd());
        // SAFETY: dropped once, here; the field is not used again.
        unsafe { ManuallyDrop::drop(&mut self.0) };
    }
}

struct Arena {
    fd: Arc<ArenaFd>,
    base: NonNull<u8>,
    len: usize,
    /// Unused ranges: offset -> length in bytes.
    free: BTreeMap<usize, usize>,
    used: usize,
    /// For a huge pool type: where this arena's huge pages come from.
    huge: Option<HugeBacking>,
    /// No more carving here (its hugetlbfs pages ran out): used ranges stay until released.
    full: bool,
}

impl Arena {
    fn contains(&self, p: NonNull<u8>) -> bool {
        let (a, b) = (self.base.as_ptr() as usize, p.as_ptr() as usize);
        b >= a && b < a + self.len
    }

    /// Takes the first unused range of at least `bytes`; returns its offset.
    fn carve(&mut self, bytes: usize) -> Option<usize> {
        if self.full {
            return None;
        }
        let (&off, &len) = self.free.iter().find(|&(_, &len)| len >= bytes)?;
        self.free.remove(&off);
        if len > bytes {
            self.free.insert(off + bytes, len - bytes);
        }
        self.used += bytes;
        Some(off)
    }

    /// Marks `off..off + bytes` unused, merging with its neighbours.
    fn uncarve(&mut self, mut off: usize, mut bytes: usize) {
        self.used -= bytes;
        if let Some((&prev, &plen)) = self.free.range(..off).next_back()
            && prev + plen == off
        {
            self.free.remove(&prev);
            off = prev;
            bytes += plen;
        }
        if let Some(next) = self.free.remove(&(off + bytes)) {
            bytes += next;
        }
        self.free.insert(off, bytes);
    }
}

/// Why one attempt to carve failed.
enum Carve {
    /// A hugetlbfs arena could not populate: its huge pages ran out.
    HugetlbRanOut(OsError),
    Failed(AllocError),
}

/// Where a block lives: the arena's file and the block's offset in it.
pub(crate) struct Location {
    pub(crate) fd: Arc<ArenaFd>,
    pub(crate) offset: usize,
}

/// A heap's arenas, and the counters of pages taken from and given back to the system.
pub(crate) struct Arenas {
    mapped: Mutex<Vec<Arena>>,
    name: String,
    arena_size: usize,
    pool_type: PoolType,
    /// For a huge pool type: the backing new arenas get (hugetlbfs falls back once its pages
    /// run out).
    huge: Mutex<Option<HugeBacking>>,
    pub(crate) fresh_pages: AtomicU64,
    pub(crate) released_pages: AtomicU64,
}

// SAFETY: the raw base pointers are only addresses of mappings the set owns; all access to
// the arenas goes through the Mutex.
unsafe impl Send for Arenas {}
// SAFETY: as above.
unsafe impl Sync for Arenas {}

impl Arenas {
    #[cfg(all(test, not(loom)))]
    pub(crate) fn new(name: &str, arena_size: usize) -> Arenas {
        Arenas::typed(name, arena_size, PoolType::SYSTEM, None)
    }

    /// Arenas of a pool type; `huge` is the backing a huge type starts with.
    pub(crate) fn typed(
        name: &str,
        arena_size: usize,
        pool_type: PoolType,
        huge: Option<HugeBacking>,
    ) -> Arenas {
        Arenas {
            mapped: Mutex::new(Vec::new()),
            name: name.to_owned(),
            arena_size,
            pool_type,
            huge: Mutex::new(huge),
            fresh_pages: AtomicU64::new(0),
            released_pages: AtomicU64::new(0),
        }
    }

    fn mapped(&self) -> MutexGuard<'_, Vec<Arena>> {
        lock(&self.mapped)
    }

    /// The number of arenas mapped now.
    pub(crate) fn count(&self) -> usize {
        self.mapped().len()
    }

    /// Gets `bytes` (a multiple of the page size; of 2 MiB for a huge pool type) of fresh,
    /// zeroed, resident memory with the pool type's attributes, contiguous in one arena; makes
    /// a new arena if none has room. A locked type that would pass `RLIMIT_MEMLOCK` gets
    /// [`AllocError::MemlockLimit`], with the range given back.
    pub(crate) fn carve(&self, bytes: usize) -> Result<NonNull<u8>, AllocError> {
        loop {
            match self.carve_once(bytes) {
                Err(Carve::HugetlbRanOut(e)) => {
                    // Fewer hugetlbfs pages than the arena wanted: later arenas take the next
                    // best backing, and this carve tries again there.
                    let next = if crate::attrs::shmem_thp_allowed() {
                        HugeBacking::Thp
                    } else {
                        HugeBacking::Base
                    };
                    log::info!("pagepool: {e}: hugetlbfs pages ran out, falling back to {next}");
                    *lock(&self.huge) = Some(next);
                }
                Err(Carve::Failed(e)) => return Err(e),
                Ok(p) => return Ok(p),
            }
        }
    }

    /// The backing new arenas get now, for a huge pool type.
    pub(crate) fn huge_backing(&self) -> Option<HugeBacking> {
        *lock(&self.huge)
    }

    /// The pool type of the memory.
    pub(crate) fn pool_type(&self) -> PoolType {
        self.pool_type
    }

    /// Each arena's home mapping: `(address, length)`.
    pub(crate) fn ranges(&self) -> Vec<(usize, usize)> {
        self.mapped()
            .iter()
            .map(|a| (a.base.as_ptr() as usize, a.len))
            .collect()
    }

    fn carve_once(&self, bytes: usize) -> Result<NonNull<u8>, Carve> {
        let (fd, off, p, backing) = {
            let mut arenas = self.mapped();
            let found = arenas.iter_mut().find_map(|a| {
                let off = a.carve(bytes)?;
                // SAFETY: `off + bytes <= a.len`, inside the home mapping.
                Some((a.fd.clone(), off, unsafe { a.base.add(off) }, a.huge))
            });
            match found {
                Some(f) => f,
                None => {
                    let mut arena = self
                        .map_arena(bytes.max(self.arena_size))
                        .map_err(|e| Carve::Failed(e.into()))?;
                    let off = arena.carve(bytes).expect("a new arena has room");
                    let found = (arena.fd.clone(), off, arena.base, arena.huge);
                    let at = arenas.partition_point(|a| a.base < arena.base);
                    arenas.insert(at, arena);
                    found
                }
            }
        };
        // SAFETY: `p..p + bytes` is the range carved above, in the home mapping of `fd` at
        // `off`; it is marked used, so nobody else touches it.
        if let Err(e) = unsafe { os::populate(&*fd, off, p, bytes) } {
            let ran_out = backing == Some(HugeBacking::Hugetlb)
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EFAULT | libc::ENOMEM | libc::ENOSPC)
                );
            if ran_out {
                // Whatever part was populated goes back; no more carving in this arena.
                let mut arenas = self.mapped();
                if let Some(a) = arenas.iter_mut().find(|a| a.contains(p)) {
                    a.full = true;
                }
                drop(arenas);
                self.give_back(p, bytes, true);
                return Err(Carve::HugetlbRanOut(e));
            }
            self.give_back(p, bytes, false);
            return Err(Carve::Failed(e.into()));
        }
        if backing == Some(HugeBacking::Thp) {
            // Populating gives base pages where no free 2 MiB page was at hand; collapsing
            // compacts memory to make one. Best effort: the range is usable either way.
            // SAFETY: the range is ours (carved above).
            unsafe { os::collapse(p, bytes) };
        }
        if self.pool_type.is_locked() {
            // SAFETY: the range is ours (carved above).
            if let Err(e) = unsafe { os::lock(p, bytes) } {
                // Nothing stays locked: `mlock` checks the limit before locking anything.
                self.give_back(p, bytes, true);
                return Err(Carve::Failed(match e {
                    rustix::io::Errno::NOMEM | rustix::io::Errno::PERM => {
                        AllocError::MemlockLimit {
                            bytes,
                            limit: os::memlock_limit(),
                        }
                    }
                    e => AllocError::Os(OsError::new("mlock", e)),
                }));
            }
        }
        let pages = bytes / os::page_size();
        self.fresh_pages.fetch_add(pages as u64, Ordering::Relaxed);
        Ok(p)
    }

    /// Maps a new arena of `len` bytes, followed by one inaccessible guard page so that no two
    /// arenas are ever adjacent: blocks that lie end to end in memory are then always in the
    /// same arena, at consecutive file offsets.
    fn map_arena(&self, len: usize) -> Result<Arena, OsError> {
        let mut huge = self.huge_backing();
        // The builder bounds the arena size, and buffers are bounded by the maximum buffer
        // size, but the rounding is checked here all the same: past the address space, the
        // arena is refused like any other mapping the system cannot make.
        let len = if huge.is_some() {
            len.checked_next_multiple_of(HUGE_PAGE)
                .ok_or_else(|| OsError::new("mmap arena", rustix::io::Errno::NOMEM))?
        } else {
            len
        };
        // What a hugetlbfs arena falls back to, found before the gate (it reads sysfs).
        let fallback = (huge == Some(HugeBacking::Hugetlb)).then(|| {
            if crate::attrs::shmem_thp_allowed() {
                HugeBacking::Thp
            } else {
                HugeBacking::Base
            }
        });
        let mut no_hugetlb = None;
        let made = {
            // The memfd and the mapping are made, kept from fork and recorded in one gate: a
            // child forked in between would get them (see `crate::fork`).
            let _gate = fork::Gate::open();
            self.make_arena(len, &mut huge, fallback, &mut no_hugetlb)
        };
        if let Some(e) = no_hugetlb {
            log::info!("pagepool: {e}: no hugetlbfs, falling back");
            *lock(&self.huge) = huge;
        }
        let (fd, base) = made?;
        Ok(Arena {
            fd: Arc::new(fd),
            base,
            len,
            free: BTreeMap::from([(0, len)]),
            used: 0,
            huge,
            full: false,
        })
    }

    /// The system calls of [`map_arena`](Self::map_arena), inside its gate (no allocation, no
    /// lock, no logging): the memfd, its home mapping and guard page, their attributes,
    /// `MADV_DONTFORK` and the records. Where hugetlbfs refuses, switches `huge` to `fallback`
    /// and leaves the error in `no_hugetlb`. On an error nothing is left mapped or open.
    fn make_arena(
        &self,
        len: usize,
        huge: &mut Option<HugeBacking>,
        fallback: Option<HugeBacking>,
        no_hugetlb: &mut Option<OsError>,
    ) -> Result<(ArenaFd, NonNull<u8>), OsError> {
        let (fd, align) = match *huge {
            None => (os::memfd(&self.name, len)?, os::page_size()),
            Some(HugeBacking::Hugetlb) => match os::memfd_hugetlb(&self.name, len) {
                Ok(fd) => (fd, HUGE_PAGE),
                Err(e) => {
                    *huge = fallback;
                    *no_hugetlb = Some(e);
                    (os::memfd(&self.name, len)?, HUGE_PAGE)
                }
            },
            Some(_) => (os::memfd(&self.name, len)?, HUGE_PAGE),
        };
        let guard = os::page_size();
        let span = len
            .checked_add(guard)
            .ok_or_else(|| OsError::new("mmap arena", rustix::io::Errno::NOMEM))?;
        let base = os::reserve_aligned(span, align)?;
        // SAFETY: `base..base + len` is inside the reservation just made, known to nobody else.
        let mut made = unsafe { os::map_fixed(&fd, 0, len, base, false) };
        // The attributes that belong to the mapping, set before any page is allocated.
        if made.is_ok() && *huge == Some(HugeBacking::Thp) {
            // SAFETY: the mapping was just made, ours alone.
            made = unsafe { os::advise_huge(base, len) };
        }
        if let (Ok(()), Some(node)) = (&made, self.pool_type.node_id()) {
            // SAFETY: as above.
            made = unsafe { os::bind_node(base, len, node) };
        }
        let kept = made.is_ok() && {
            // SAFETY: the span is the mapping made above, ours alone.
            made = unsafe { fork::keep_mapping(base, span) };
            made.is_ok()
        };
        let fd = made.and_then(|()| ArenaFd::new(fd)); // on an error, `fd` is closed
        if fd.is_err() {
            if kept {
                fork::forget_mapping(base, span);
            }
            // SAFETY: the reservation and the mapping in it are ours, unreferenced.
            let _ = unsafe { os::unmap(base, span) };
        }
        Ok((fd?, base))
    }

    /// Gives `bytes` at `p` (memory obtained from [`carve`](Self::carve)) back to the system.
    pub(crate) fn release(&self, p: NonNull<u8>, bytes: usize) {
        self.give_back(p, bytes, true);
        self.released_pages
            .fetch_add((bytes / os::page_size()) as u64, Ordering::Relaxed);
    }

    /// Gives back fresh memory that was never used (a failed allocation's), undoing its count
    /// in [`fresh_pages`](Self::fresh_pages) instead of counting it as released.
    pub(crate) fn unfresh(&self, p: NonNull<u8>, bytes: usize) {
        self.give_back(p, bytes, true);
        self.fresh_pages
            .fetch_sub((bytes / os::page_size()) as u64, Ordering::Relaxed);
    }

    fn give_back(&self, p: NonNull<u8>, bytes: usize, punch: bool) {
        let mut arenas = self.mapped();
        let Some(i) = arenas.iter().position(|a| a.contains(p)) else {
            log::error!("pagepool: released range {p:p} is in no arena");
            return;
        };
        let arena = &mut arenas[i];
        let off = p.as_ptr() as usize - arena.base.as_ptr() as usize;
        if self.pool_type.is_locked() {
            // Unlocked before the hole is punched, so that the process's locked memory
            // (`RLIMIT_MEMLOCK`) goes down with it. Unlocking a range that was never locked
            // (a failed carve) is harmless.
            // SAFETY: the range is used memory of this arena that its owner is giving up.
            if let Err(e) = unsafe { os::unlock(p, bytes) } {
                log::warn!("pagepool: {e}");
            }
        }
        if punch && let Err(e) = os::punch_hole(&*arena.fd, off, bytes) {
            // The pages stay resident; zero them so that the range still reads as a hole.
            log::warn!("pagepool: {e}; zeroing the range instead");
            // SAFETY: the range is used memory of this arena that its owner is giving up.
            unsafe { p.as_ptr().write_bytes(0, bytes) };
        }
        arena.uncarve(off, bytes);
        if arena.used == 0 {
            let arena = arenas.remove(i);
            // Bounded: the same sum was checked when the arena was mapped (`map_arena`).
            let span = arena.len + os::page_size();
            fork::forget_mapping(arena.base, span);
            // SAFETY: nothing in the arena is used, so no block or buffer points into it.
            if let Err(e) = unsafe { os::unmap(arena.base, span) } {
                log::error!("pagepool: {e}");
            }
        }
    }

    /// Where each of `blocks` lives (for mapping views of them).
    pub(crate) fn locate(&self, blocks: impl Iterator<Item = NonNull<u8>>) -> Vec<Location> {
        let arenas = self.mapped();
        blocks
            .map(|p| {
                let a = arenas
                    .iter()
                    .find(|a| a.contains(p))
                    .expect("a used block lies in an arena");
                Location {
                    fd: a.fd.clone(),
                    offset: p.as_ptr() as usize - a.base.as_ptr() as usize,
                }
            })
            .collect()
    }
}

impl Drop for Arenas {
    fn drop(&mut self) {
        for a in self.mapped().drain(..) {
            if a.used != 0 {
                log::error!("pagepool: arena dropped with {} bytes in use", a.used);
            }
            // Bounded: checked when the arena was mapped (`map_arena`).
            let span = a.len + os::page_size();
            fork::forget_mapping(a.base, span);
            // SAFETY: the set is going away; every heap structure that pointed into it is gone.
            if let Err(e) = unsafe { os::unmap(a.base, span) } {
                log::error!("pagepool: {e}");
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn carve_release_coalesce_and_unmap() {
        let ps = os::page_size();
        let arenas = Arenas::new("pagepool:arena-test", 16 * ps);
        let a = arenas.carve(4 * ps).unwrap();
        let b = arenas.carve(4 * ps).unwrap();
        // SAFETY: `a` spans 4 pages we carved.
        assert_eq!(unsafe { a.add(4 * ps) }, b, "first fit, end to end");
        // SAFETY: fresh pages are ours and read zero.
        unsafe {
            assert_eq!(b.as_ptr().read(), 0);
            b.as_ptr().write(1);
        }
        assert_eq!(arenas.count(), 1);
        arenas.release(b, 4 * ps);
        let c = arenas.carve(8 * ps).unwrap();
        // SAFETY: `a` spans 4 pages, so `a + 4 pages` is one past its end.
        let after_a = unsafe { a.add(4 * ps) };
        assert_eq!(after_a, c, "released range coalesced with the tail");
        // SAFETY: `c` is ours again; the punched hole reads zero.
        assert_eq!(unsafe { c.as_ptr().read() }, 0);
        let big = arenas.carve(32 * ps).unwrap();
        assert_eq!(
            arenas.count(),
            2,
            "a request larger than the arena gets its own"
        );
        arenas.release(big, 32 * ps);
        assert_eq!(arenas.count(), 1, "an unused arena is unmapped");
        let fd = arenas.locate(std::iter::once(a)).remove(0).fd;
        let flags = rustix::io::fcntl_getfd(&*fd).unwrap();
        assert!(
            flags.contains(rustix::io::FdFlags::CLOEXEC),
            "memfds are close-on-exec"
        );
        drop(fd);
        arenas.release(a, 4 * ps);
        arenas.release(c, 8 * ps);
        assert_eq!(arenas.count(), 0);
        assert_eq!(arenas.fresh_pages.load(Ordering::Relaxed), 48);
        assert_eq!(arenas.released_pages.load(Ordering::Relaxed), 48);
    }

    #[test]
    fn an_arena_past_the_address_space_is_an_error_not_an_overflow() {
        // The builder refuses such sizes; the arenas stand on their own all the same: rounding
        // `usize::MAX` up to 2 MiB must not overflow (a panic in this debug build).
        for huge in [None, Some(HugeBacking::Base)] {
            let ty = if huge.is_some() {
                PoolType::SYSTEM.huge()
            } else {
                PoolType::SYSTEM
            };
            for size in [usize::MAX, usize::MAX - HUGE_PAGE + 2] {
                let arenas = Arenas::typed("pagepool:arena-test", size, ty, huge);
                let r = arenas.carve(HUGE_PAGE);
                assert!(
                    matches!(r, Err(AllocError::Os(_))),
                    "{huge:?} {size}: {:?}",
                    r.map(|_| ())
                );
                assert_eq!(arenas.count(), 0);
            }
        }
    }
}
