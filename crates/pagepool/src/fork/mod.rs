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
//! # The gate
//!
//! Making a mapping and marking it `MADV_DONTFORK`, or making a descriptor and recording it,
//! are several system calls: a `fork` by another thread between them would copy the mapping
//! (shared with the parent: both would write the same pages) or the unrecorded descriptor into
//! the child. Forgetting a descriptor and closing it are two steps as well: a `fork` between
//! them leaves the child an open, unrecorded descriptor. (Even the kernel's own copy is not
//! one step: `fork` copies the descriptor table before the memory, so a descriptor made or
//! closed meanwhile disagrees with the table the child reads.) So each such sequence runs
//! inside a [`Gate`], and `fork` waits for every gate to close and keeps new ones from opening
//! until it has returned: the `pthread_atfork` *prepare* handler counts a fork in, then waits
//! for the creators inside to drain; the *parent* handler counts it out; the *child* handler,
//! alone in the child, clears the word. Creators and forks share one atomic word (creators in
//! the low half, forks in progress in the high half), and a creator enters only by a
//! compare-and-swap that sees no fork in progress, so once a fork is counted the creators only
//! leave. The wait is a spin, a yield and then short sleeps: the prepare handler allocates
//! nothing and takes no lock. glibc runs the application's prepare handlers before it takes its
//! own locks (malloc's, stdio's), and code inside a gate makes system calls only (a table that
//! needs another chunk maps one with `mmap`, not the allocator), so a creator never waits for
//! something the forking thread holds.
//!
//! Unmapping needs no gate: a mapping is forgotten before it is unmapped, and `MADV_DONTFORK`
//! keeps it out of a child forked in between; a child never gets a recorded range that its
//! parent had unmapped (where a mapping of someone else may already be, although the
//! placeholder, mapped with `MAP_FIXED_NOREPLACE`, would not replace it).
//!
//! A thread never forks inside its own gate: the code inside makes system calls and calls
//! nothing else, and the gate blocks the thread's asynchronous signals while it is open (the
//! synchronous ones, `SIGSEGV` and the like, stay deliverable: they mean a bug), so not even a
//! signal handler can fork there. Forks that run no `pthread_atfork` handlers (`vfork`,
//! `posix_spawn`, `clone`, glibc's `_Fork`) are not gated: they must `exec` (or `_exit`) at
//! once, and every descriptor pagepool makes is close-on-exec (`MFD_CLOEXEC`, `O_CLOEXEC`),
//! so the program they start gets none, nor any mapping. `std::process::Command` spawns that
//! way, or with `fork` (a `pre_exec` closure), which runs the handlers.
//!
//! The tables are fixed chunks of atomic words, chained and never freed; recording and
//! forgetting an entry is a compare-and-swap on one word. The child handler only reads words
//! and makes system calls (`mmap`, `close`): it allocates nothing and takes no lock, as a
//! handler running after `fork` must.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::sync::Once;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use rustix::mm::{MapFlags, ProtFlags};

use crate::error::OsError;

/// The process's fork generation: 0 in the original process, bumped in each forked child.
static GENERATION: AtomicU64 = AtomicU64::new(0);

static INSTALL: Once = Once::new();

/// The current fork generation.
#[inline]
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// Registers the fork handlers (once per process; called before any state is recorded, and
/// never inside a [`Gate`]: older glibc holds its handler-list lock while prepare handlers run).
pub(crate) fn install() {
    INSTALL.call_once(|| {
        // SAFETY: the three are `extern "C"` functions with no arguments; they use atomics,
        // a constant thread-local, and system calls only (`sched_yield`, `nanosleep`, `mmap`,
        // `close`): no allocation, no lock, as fork handlers must.
        let rc =
            unsafe { libc::pthread_atfork(Some(before_fork), Some(in_parent), Some(in_child)) };
        if rc != 0 {
            log::error!("pagepool: pthread_atfork failed ({rc}); forked children are unsafe");
        }
    });
}

/// The fork gate's word: the creators inside a [`Gate`] (low half) and the forks in progress
/// (high half, counted in [`FORK_ONE`]s).
static GATE: AtomicU64 = AtomicU64::new(0);
const FORK_ONE: u64 = 1 << 32;
const CREATORS: u64 = FORK_ONE - 1;

thread_local! {
    /// How many gates this thread is inside (they may nest).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Waits a little, longer each time: spins, then yields, then sleeps 20 us.
fn back_off(round: &mut u32) {
    *round = round.saturating_add(1);
    if *round < 16 {
        std::hint::spin_loop();
    } else if *round < 64 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(20));
    }
}

/// The prepare handler: counts this fork in, then waits for every creator inside a gate.
extern "C" fn before_fork() {
    GATE.fetch_add(FORK_ONE, Ordering::SeqCst);
    let mut round = 0;
    while GATE.load(Ordering::SeqCst) & CREATORS != 0 {
        back_off(&mut round);
    }
}

/// The parent handler: counts the fork out; when none is left, creators may enter again.
extern "C" fn in_parent() {
    GATE.fetch_sub(FORK_ONE, Ordering::SeqCst);
}

/// Runs in a forked child, before `fork` returns there.
extern "C" fn in_child() {
    MAPPINGS.drain(|word| {
        let (addr, len) = decode_mapping(word);
        placeholder(addr, len);
    });
    FDS.drain(|word| {
        // The word is a descriptor pagepool owns (recorded by `record_fd`), open at the fork
        // (the gate): in the child the object owning it is leaked, never dropped, so this is
        // the only close of the child's copy. A raw close: nothing here may abort.
        // SAFETY: closing a descriptor number has no memory-safety preconditions.
        unsafe { libc::close((word - 1) as i32) };
    });
    GENERATION.fetch_add(1, Ordering::Relaxed);
    // No other thread is here: no creator, no other fork (the one that made this child is
    // over). This thread was inside no gate (see the module docs).
    GATE.store(0, Ordering::SeqCst);
}

/// A section that `fork` never splits: while any gate is open, a fork waits (in its prepare
/// handler) for it to close; while a fork is in progress, no gate opens. Every creation of a
/// mapping or descriptor that pagepool keeps runs inside one, up to its `MADV_DONTFORK` and
/// its record, and so does every forgetting and closing of a recorded descriptor.
///
/// Inside a gate: system calls only (no allocation, no lock, no logging: the forking thread may
/// hold what those need), and nothing that could fork. The thread's asynchronous signals are
/// blocked while it is open. Gates nest; a gate belongs to the thread that opened it.
pub(crate) struct Gate {
    /// The signal mask to put back (`None` for a nested gate).
    mask: Option<libc::sigset_t>,
    _this_thread: PhantomData<*const ()>,
}

impl Gate {
    /// Opens a gate, waiting for a fork in progress to return first.
    pub(crate) fn open() -> Gate {
        install();
        if DEPTH.get() > 0 {
            // Already counted: a fork waits for this thread's outer gate anyway.
            GATE.fetch_add(1, Ordering::SeqCst);
            DEPTH.set(DEPTH.get() + 1);
            return Gate {
                mask: None,
                _this_thread: PhantomData,
            };
        }
        let mask = block_signals();
        let mut round = 0;
        let mut now = GATE.load(Ordering::SeqCst);
        loop {
            if now >= FORK_ONE {
                back_off(&mut round);
                now = GATE.load(Ordering::SeqCst);
                continue;
            }
            match GATE.compare_exchange_weak(now, now + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(seen) => now = seen,
            }
        }
        DEPTH.set(1);
        Gate {
            mask: Some(mask),
            _this_thread: PhantomData,
        }
    }

    /// Whether this thread is inside a gate.
    pub(crate) fn inside() -> bool {
        DEPTH.get() > 0
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        DEPTH.set(DEPTH.get() - 1);
        GATE.fetch_sub(1, Ordering::SeqCst);
        if let Some(mask) = &self.mask {
            // SAFETY: `mask` is the signal mask `block_signals` read; setting it back has no
            // memory-safety preconditions.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, mask, ptr::null_mut()) };
        }
    }
}

/// Blocks this thread's asynchronous signals; returns the mask to put back.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigfillset/pthread_sigmask before use; the
    // calls only read and write the two sets on this stack.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        // Synchronous signals stay deliverable: blocked, a fault would kill the process
        // without its handler. They mean a bug, and no handler of theirs forks.
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
            libc::SIGABRT,
        ] {
            libc::sigdelset(&mut all, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    }
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
/// `MADV_DONTFORK`, and recorded so that the child puts a placeholder there. Called inside the
/// [`Gate`] the mapping was made in. Undo with [`forget_mapping`] before unmapping. On an
/// error nothing is recorded, and the caller unmaps the range (still inside the gate).
///
/// # Safety
/// `p..p + len` is a mapping the caller owns (advice changes no contents).
pub(crate) unsafe fn keep_mapping(p: NonNull<u8>, len: usize) -> Result<(), OsError> {
    debug_assert!(Gate::inside(), "a mapping is made and kept inside a gate");
    let advice = rustix::mm::Advice::LinuxDontFork;
    // SAFETY: forwarded; MADV_DONTFORK only changes what fork copies.
    unsafe { rustix::mm::madvise(p.as_ptr().cast(), len, advice) }
        .map_err(|e| OsError::new("madvise(MADV_DONTFORK)", e))?;
    let mut done = 0;
    let mut failed = None;
    mapping_entries(p, len, |w| {
        if failed.is_none() {
            match MAPPINGS.insert(w) {
                Ok(()) => done += 1,
                Err(e) => failed = Some(e),
            }
        }
    });
    match failed {
        None => Ok(()),
        Some(e) => {
            let mut left = done;
            mapping_entries(p, len, |w| {
                if left > 0 {
                    MAPPINGS.remove(w);
                    left -= 1;
                }
            });
            Err(OsError::new("mmap fork table", e))
        }
    }
}

/// Forgets a range recorded by [`keep_mapping`] (the caller is about to unmap it).
pub(crate) fn forget_mapping(p: NonNull<u8>, len: usize) {
    mapping_entries(p, len, |w| MAPPINGS.remove(w));
}

/// Records a descriptor pagepool owns, to be closed in a forked child. Called inside the
/// [`Gate`] the descriptor was made in (or, for one the user handed over, any gate). Undo with
/// [`forget_fd`] before closing it (inside one gate with the close) or handing it to the user.
/// On an error nothing is recorded: the caller closes the descriptor, inside the gate.
pub(crate) fn record_fd(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), OsError> {
    debug_assert!(Gate::inside(), "a descriptor is recorded inside a gate");
    FDS.insert(std::os::fd::AsRawFd::as_raw_fd(&fd) as u64 + 1)
        .map_err(|e| OsError::new("mmap fork table", e))
}

/// Forgets a descriptor recorded by [`record_fd`]: before closing it (inside one [`Gate`] with
/// the close, so that a child never has it open and unrecorded) or handing it to the user.
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

    /// A new, empty chunk in a private anonymous mapping of its own (inherited by a child,
    /// which drains it).
    fn map() -> Result<*mut Chunk, rustix::io::Errno> {
        // SAFETY: a null hint without MAP_FIXED: the kernel picks an unused range.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                ptr::null_mut(),
                size_of::<Chunk>(),
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?
        .cast::<Chunk>();
        // SAFETY: the mapping is fresh, writable, page-aligned and large enough for a Chunk.
        unsafe { p.write(Chunk::new()) };
        Ok(p)
    }

    /// Unmaps a chunk made by [`map`](Self::map).
    ///
    /// # Safety
    /// `c` came from `map`, and nothing refers to it any more.
    unsafe fn unmap(c: *mut Chunk) {
        // SAFETY: the caller's contract; a Chunk holds nothing to drop.
        let _ = unsafe { rustix::mm::munmap(c.cast(), size_of::<Chunk>()) };
    }
}

/// A lock-free multiset of non-zero words: chunks chained from a static one, mapped as needed
/// (`mmap`, not the allocator: inserting runs inside a [`Gate`]) and never freed.
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

    /// Adds `word`; fails only when a new chunk is needed and cannot be mapped.
    fn insert(&self, word: u64) -> Result<(), rustix::io::Errno> {
        debug_assert_ne!(word, 0);
        let mut chunk = &self.first;
        loop {
            for w in &chunk.words {
                if w.load(Ordering::Relaxed) == 0
                    && w.compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    return Ok(());
                }
            }
            let mut next = chunk.next.load(Ordering::Acquire);
            if next.is_null() {
                let fresh = Chunk::map()?;
                match chunk.next.compare_exchange(
                    ptr::null_mut(),
                    fresh,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => next = fresh,
                    Err(now) => {
                        // SAFETY: `fresh` was never published.
                        unsafe { Chunk::unmap(fresh) };
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
            // SAFETY: chained chunks were mapped by `insert`, reachable only from here now
            // (`&mut self`); the next pointer is read before the chunk is unmapped.
            unsafe {
                let after = *(*next).next.get_mut();
                Chunk::unmap(next);
                next = after;
            }
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
mod tests;
