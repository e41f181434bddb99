//! What a forked child inherits, and how every heap starts afresh in it.
//!
//! pagepool's memory is `MAP_SHARED` memfd pages: inherited as it is, a child would share every
//! pooled and live page with its parent while keeping a private copy of the pools, queues and
//! caches that describe them, and the two processes would hand the same blocks out twice. So,
//! as with RDMA and DMA memory, pagepool memory is **not inherited**:
//!
//! - every mapping pagepool makes (arenas, buffer views, dma-buf mappings) is `MADV_DONTFORK`
//!   and recorded in a lock-free table; in the child a `pthread_atfork` handler puts an
//!   inaccessible placeholder over each recorded range, so an inherited buffer faults when
//!   touched, and no new mapping of the child can land where it points;
//! - the descriptors pagepool holds for itself (arena memfds, pooled dma-bufs) are recorded in a
//!   second table and closed in the child, so that a child never keeps its parent's memory
//!   alive, nor makes a pooled dma-buf look shared to its parent;
//! - the handler then bumps a process-wide *generation*. Every heap and pool keeps its state in
//!   a [`ForkCell`] stamped with the generation it was made in. On its first use in a newer
//!   generation the cell builds fresh state (empty pools, caches and queue, new arenas, its own
//!   worker when needed) and *leaks* the inherited state: never dropped, never locked (another
//!   thread of the parent may have held its locks at fork time, and that thread does not exist
//!   in the child), so nothing the child does reaches the parent's memory or files.
//!
//! The tables are fixed chunks of atomic words, chained and never freed; recording and
//! forgetting an entry is a compare-and-swap on one word. The child handler only reads words
//! and makes system calls (`mmap`, `close`): it allocates nothing and takes no lock, as a
//! handler running after `fork` must.

use std::ptr::{self, NonNull};
use std::sync::Once;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use rustix::mm::{MapFlags, ProtFlags};

/// The process's fork generation: 0 in the original process, bumped in each forked child.
static GENERATION: AtomicU64 = AtomicU64::new(0);

static INSTALL: Once = Once::new();

/// The current fork generation.
#[inline]
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// Registers the child handler (once per process; called before any state is recorded).
pub(crate) fn install() {
    INSTALL.call_once(|| {
        // SAFETY: `in_child` is an `extern "C"` function with no arguments that only reads
        // atomics and makes async-signal-safe system calls, as a child handler must.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            log::error!("pagepool: pthread_atfork failed ({rc}); forked children are unsafe");
        }
    });
}

/// Runs in a forked child, before `fork` returns there.
extern "C" fn in_child() {
    MAPPINGS.drain(|word| {
        let (addr, len) = decode_mapping(word);
        placeholder(addr, len);
    });
    FDS.drain(|word| {
        // SAFETY: the word is a descriptor pagepool owns (recorded by `record_fd`); in the
        // child the object owning it is leaked, never dropped, so closing it here is the only
        // close of the child's copy.
        drop(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd((word - 1) as i32)
        });
    });
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Maps an inaccessible, unbacked range at `addr` unless something is mapped there already.
fn placeholder(addr: usize, len: usize) {
    let at = ptr::with_exposed_provenance_mut::<std::ffi::c_void>(addr);
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping: the call either maps a
    // new, private, inaccessible range where nothing is, or fails.
    let r = unsafe {
        rustix::mm::mmap_anonymous(
            at,
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED_NOREPLACE,
        )
    };
    if let Ok(p) = r
        && p != at
    {
        // A kernel older than 4.17 took the address as a hint: the range is somewhere else,
        // and ours alone.
        // SAFETY: `p..p + len` is the mapping just made, known to nobody else.
        let _ = unsafe { rustix::mm::munmap(p, len) };
    }
}

/// Pages per mapping entry: an entry packs the address (in pages, 44 bits) and the length (in
/// pages, 20 bits) in one word, so a longer range takes several entries.
const ENTRY_PAGES: usize = (1 << 20) - 1;
const PAGE_SHIFT: u32 = 12;

fn encode_mapping(addr: usize, pages: usize) -> u64 {
    ((addr >> PAGE_SHIFT) as u64) << 20 | pages as u64
}

fn decode_mapping(word: u64) -> (usize, usize) {
    (
        ((word >> 20) as usize) << PAGE_SHIFT,
        ((word & ENTRY_PAGES as u64) as usize) << PAGE_SHIFT,
    )
}

/// Calls `f` for each entry of `len` bytes at `p`.
fn mapping_entries(p: NonNull<u8>, len: usize, mut f: impl FnMut(u64)) {
    let mut addr = p.as_ptr() as usize;
    let mut pages = len.div_ceil(1 << PAGE_SHIFT);
    while pages > 0 {
        let n = pages.min(ENTRY_PAGES);
        f(encode_mapping(addr, n));
        addr += n << PAGE_SHIFT;
        pages -= n;
    }
}

/// Makes `len` bytes at `p` (a mapping pagepool just made) not inherited by a forked child:
/// `MADV_DONTFORK`, and recorded so that the child puts a placeholder there. Undo with
/// [`forget_mapping`] before unmapping.
///
/// # Safety
/// `p..p + len` is a mapping the caller owns (advice changes no contents).
pub(crate) unsafe fn keep_mapping(p: NonNull<u8>, len: usize) {
    install();
    let advice = rustix::mm::Advice::LinuxDontFork;
    // SAFETY: forwarded; MADV_DONTFORK only changes what fork copies.
    let r = unsafe { rustix::mm::madvise(p.as_ptr().cast(), len, advice) };
    if let Err(e) = r {
        log::warn!("pagepool: madvise(MADV_DONTFORK): {e}");
    }
    mapping_entries(p, len, |w| MAPPINGS.insert(w));
}

/// Forgets a range recorded by [`keep_mapping`] (the caller is about to unmap it).
pub(crate) fn forget_mapping(p: NonNull<u8>, len: usize) {
    mapping_entries(p, len, |w| MAPPINGS.remove(w));
}

/// Records a descriptor pagepool owns, to be closed in a forked child. Undo with
/// [`forget_fd`] before closing it or handing it to the user.
pub(crate) fn record_fd(fd: std::os::fd::BorrowedFd<'_>) {
    install();
    FDS.insert(std::os::fd::AsRawFd::as_raw_fd(&fd) as u64 + 1);
}

/// Forgets a descriptor recorded by [`record_fd`].
pub(crate) fn forget_fd(fd: std::os::fd::BorrowedFd<'_>) {
    FDS.remove(std::os::fd::AsRawFd::as_raw_fd(&fd) as u64 + 1);
}

const CHUNK_WORDS: usize = 254;

/// A chunk of a [`Table`]: words (0: empty) and the next chunk.
struct Chunk {
    words: [AtomicU64; CHUNK_WORDS],
    next: AtomicPtr<Chunk>,
}

impl Chunk {
    const fn new() -> Chunk {
        Chunk {
            words: [const { AtomicU64::new(0) }; CHUNK_WORDS],
            next: AtomicPtr::new(ptr::null_mut()),
        }
    }
}

/// A lock-free multiset of non-zero words: chunks chained from a static one, allocated as
/// needed and never freed.
struct Table {
    first: Chunk,
}

static MAPPINGS: Table = Table {
    first: Chunk::new(),
};
static FDS: Table = Table {
    first: Chunk::new(),
};

impl Table {
    fn chunks(&self) -> impl Iterator<Item = &Chunk> {
        let mut next: *const Chunk = &self.first;
        std::iter::from_fn(move || {
            // SAFETY: chunks are the static first one or leaked boxes, never freed.
            let c = unsafe { next.as_ref()? };
            next = c.next.load(Ordering::Acquire);
            Some(c)
        })
    }

    fn insert(&self, word: u64) {
        debug_assert_ne!(word, 0);
        let mut chunk = &self.first;
        loop {
            for w in &chunk.words {
                if w.load(Ordering::Relaxed) == 0
                    && w.compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    return;
                }
            }
            let mut next = chunk.next.load(Ordering::Acquire);
            if next.is_null() {
                let fresh = Box::into_raw(Box::new(Chunk::new()));
                match chunk.next.compare_exchange(
                    ptr::null_mut(),
                    fresh,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => next = fresh,
                    Err(now) => {
                        // SAFETY: `fresh` was never published.
                        drop(unsafe { Box::from_raw(fresh) });
                        next = now;
                    }
                }
            }
            // SAFETY: a published chunk is never freed.
            chunk = unsafe { &*next };
        }
    }

    fn remove(&self, word: u64) {
        for chunk in self.chunks() {
            for w in &chunk.words {
                if w.load(Ordering::Relaxed) == word
                    && w.compare_exchange(word, 0, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    return;
                }
            }
        }
    }

    /// Empties the table, calling `f` with every word (the child handler: one thread).
    fn drain(&self, mut f: impl FnMut(u64)) {
        for chunk in self.chunks() {
            for w in &chunk.words {
                let word = w.swap(0, Ordering::AcqRel);
                if word != 0 {
                    f(word);
                }
            }
        }
    }
}

impl Drop for Table {
    /// Frees the chunks chained after the first (a table that is not static: tests).
    fn drop(&mut self) {
        let mut next = *self.first.next.get_mut();
        while !next.is_null() {
            // SAFETY: chained chunks are boxes leaked by `insert`, reachable only from here
            // now (`&mut self`).
            let mut chunk = unsafe { Box::from_raw(next) };
            next = *chunk.next.get_mut();
        }
    }
}

/// State that a forked child rebuilds on first use: the value of the generation that made it,
/// or, in a newer generation, a fresh one (the inherited one is leaked, see the module docs).
pub(crate) struct ForkCell<T> {
    slot: AtomicPtr<Stamped<T>>,
}

struct Stamped<T> {
    generation: u64,
    value: T,
}

// SAFETY: the cell owns a `T` (boxed) and hands out only `&T`: it is Send/Sync when `T` is.
unsafe impl<T: Send + Sync> Send for ForkCell<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for ForkCell<T> {}

impl<T> ForkCell<T> {
    pub(crate) fn new(value: T) -> ForkCell<T> {
        install();
        let b = Box::new(Stamped {
            generation: generation(),
            value,
        });
        ForkCell {
            slot: AtomicPtr::new(Box::into_raw(b)),
        }
    }

    /// The value of this generation; in a forked child, the first call builds it with `renew`
    /// (given the inherited value, to read settings from: it must not lock or free anything).
    #[inline]
    pub(crate) fn get(&self, renew: impl FnOnce(&T) -> T) -> &T {
        let p = self.slot.load(Ordering::Acquire);
        // SAFETY: the slot always holds a live box: the current one (freed only by `drop`,
        // which takes `&mut self`) or, once replaced, a leaked one.
        let s = unsafe { &*p };
        if s.generation == generation() {
            return &s.value;
        }
        self.renew(p, renew)
    }

    #[cold]
    #[inline(never)]
    fn renew(&self, seen: *mut Stamped<T>, renew: impl FnOnce(&T) -> T) -> &T {
        // SAFETY: see `get`.
        let old = unsafe { &(*seen).value };
        let fresh = Box::into_raw(Box::new(Stamped {
            generation: generation(),
            value: renew(old),
        }));
        match self
            .slot
            .compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire)
        {
            // The inherited value is leaked on purpose: its drop could lock what a thread of
            // the parent held, or free the parent's memory.
            // SAFETY: `fresh` is now the cell's current box.
            Ok(_) => unsafe { &(*fresh).value },
            Err(now) => {
                // Another thread of this process renewed it first: ours was never seen.
                // SAFETY: `fresh` was never published.
                drop(unsafe { Box::from_raw(fresh) });
                // SAFETY: see `get`.
                unsafe { &(*now).value }
            }
        }
    }
}

impl<T> Drop for ForkCell<T> {
    fn drop(&mut self) {
        let p = *self.slot.get_mut();
        // SAFETY: the cell owns the box it holds.
        if unsafe { (*p).generation } == generation() {
            // SAFETY: as above; nothing borrows it (`&mut self`).
            drop(unsafe { Box::from_raw(p) });
        }
        // Else: inherited from the parent, leaked (see `renew`).
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn mapping_words_round_trip_and_split() {
        let p = NonNull::new(0x7f12_3456_7000 as *mut u8).unwrap();
        let mut got = Vec::new();
        mapping_entries(p, 5 << 12, |w| got.push(decode_mapping(w)));
        assert_eq!(got, [(0x7f12_3456_7000, 5 << 12)]);
        got.clear();
        mapping_entries(p, (ENTRY_PAGES + 3) << 12, |w| got.push(decode_mapping(w)));
        assert_eq!(
            got,
            [
                (0x7f12_3456_7000, ENTRY_PAGES << 12),
                (0x7f12_3456_7000 + (ENTRY_PAGES << 12), 3 << 12)
            ]
        );
    }

    #[test]
    fn table_inserts_removes_and_grows() {
        let t = Table {
            first: Chunk::new(),
        };
        for w in 1..=600u64 {
            t.insert(w);
        }
        assert_eq!(t.chunks().count(), 3);
        for w in (1..=600u64).step_by(2) {
            t.remove(w);
        }
        t.insert(7); // reuses a free word
        let mut left = Vec::new();
        t.drain(|w| left.push(w));
        left.sort_unstable();
        let mut want: Vec<u64> = (2..=600).step_by(2).collect();
        want.push(7);
        want.sort_unstable();
        assert_eq!(left, want);
        let mut after = 0;
        t.drain(|_| after += 1);
        assert_eq!(after, 0);
    }

    #[test]
    fn cell_keeps_its_value_within_a_generation() {
        let c = ForkCell::new(5);
        assert_eq!(*c.get(|_| unreachable!()), 5);
    }
}
