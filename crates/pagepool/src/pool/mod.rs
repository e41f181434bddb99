//! The generic page pool: free blocks of one order, kept for reuse.
//!
//! This is the user-space `drm_page_pool`: created with an order and a release callback that
//! gives a block back to the system (`drm_page_pool_create(order, free_page)`), with `give` to put
//! a free block in and `take` to get one out. Blocks must be zeroed before they are given:
//! whatever comes out of a pool is clean.
//!
//! ## Bookkeeping without a per-block object
//! The kernel reviewers refused a private heap object per pooled page. A pool here allocates
//! nothing per block either. The most recently given blocks (up to `HOT_BLOCKS`) sit in a
//! fixed ring of addresses inside the pool, like the kernel's per-CPU page lists; older ones
//! form an intrusive singly linked list whose link (the address of the next free block) is
//! stored in the first 8 bytes of each free block itself, the way the kernel threads
//! `page->lru` through free pages. Together they are one LIFO stack: the ring is its top, and
//! when the ring is full its oldest entry moves to the head of the list. Takes come from the
//! top, except where that would break up blocks that lie end to end (a larger buffer's
//! released set) while the ring holds a better choice: see `take_many`. The pool's state is a
//! fixed ~600 bytes whatever it holds, so the metadata cost per pooled byte is zero.
//!
//! The ring is there for speed: taking the blocks of a 32 MiB buffer from a linked list means
//! 32 dependent reads, each a cache miss on memory that was just zeroed with streaming stores
//! (measured: docs/DESIGN.md, Tuning); from the ring they are 32 reads of one hot array. `take`
//! clears a list block's link word before handing it out, so a block leaves the pool all-zero.
//!
//! This file holds the pool itself and what it hands out: [`PagePool`], [`Block`], the
//! `Tally` hook and the orders; the stack of free blocks (ring and list) and the choice of
//! which blocks a take gets are in `stack.rs`, the unit tests in `tests.rs`.

use std::fmt;
use std::ptr::NonNull;

pub use crate::attrs::HUGE_ORDER;
use crate::sync::{Arc, AtomicU64, AtomicUsize, Mutex, Ordering, lock, lock_within};

mod stack;
#[cfg(all(test, not(loom)))]
mod tests;

pub(crate) use stack::Near;
use stack::{BlockStack, Pick};

/// The largest block order pagepool serves: 2^10 pages (4 MiB with 4 KiB pages), like the
/// kernel's buddy allocator.
pub const MAX_ORDER: u8 = 10;

/// The bytes of a block of `order`: `usize::MAX` for an order whose blocks no address space
/// holds (no such block exists, so a pool of that order never uses it).
fn block_bytes(order: u8) -> usize {
    let page = crate::os::page_size();
    if u32::from(order) < page.leading_zeros() {
        page << order
    } else {
        usize::MAX
    }
}

/// A block of 2^order pages of memory, owned by whoever holds this value.
///
/// A `Block` is a raw, page-aligned address plus its order; it does not free anything when
/// dropped. Ownership moves with the value: into a pool with [`PagePool::give`], out with
/// [`PagePool::take`], and to the release callback when a pool shrinks.
pub struct Block {
    ptr: NonNull<u8>,
    order: u8,
}

// SAFETY: a `Block` is exclusive ownership of a memory range (see `from_raw`), like a `Box<[u8]>`;
// moving that ownership to another thread is sound.
unsafe impl Send for Block {}

impl Block {
    /// Makes a block from a raw address and order.
    ///
    /// # Safety
    /// - `ptr` points to `page_size() << order` bytes of readable and writable memory,
    ///   aligned to at least 8 bytes;
    /// - the caller owns that memory exclusively and passes that ownership to the block: nobody
    ///   else reads or writes it until the block is turned back into a raw pointer or released;
    /// - the memory stays mapped for as long as the block, or a pool holding it, exists.
    pub unsafe fn from_raw(ptr: NonNull<u8>, order: u8) -> Block {
        Block { ptr, order }
    }

    /// The block's first byte.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The block's order: it spans 2^order pages.
    pub fn order(&self) -> u8 {
        self.order
    }

    /// The number of pages in the block (2^order).
    pub fn pages(&self) -> usize {
        1 << self.order
    }

    /// Gives up the block, returning its address; the caller owns the memory again.
    pub fn into_raw(self) -> NonNull<u8> {
        self.ptr
    }
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Block({:p}, order {})", self.ptr, self.order)
    }
}

/// The callback a pool calls to give a block back to the system when it shrinks.
pub type ReleaseFn = Box<dyn Fn(Block) + Send + Sync>;

/// A pool of free, zeroed blocks of one order.
///
/// # Examples
/// ```
/// use std::ptr::NonNull;
/// use pagepool::pool::{Block, PagePool};
///
/// // A pool of order-0 blocks whose release callback frees memory from the global allocator.
/// let layout = std::alloc::Layout::from_size_align(pagepool::page_size(), 4096).unwrap();
/// let pool = PagePool::new(0, Box::new(move |b: Block| {
///     // SAFETY: every block given to this pool came from `alloc_zeroed` with `layout`.
///     unsafe { std::alloc::dealloc(b.into_raw().as_ptr(), layout) }
/// }));
/// // SAFETY: a fresh, zeroed, exclusively owned page-sized allocation.
/// let block = unsafe {
///     Block::from_raw(NonNull::new(std::alloc::alloc_zeroed(layout)).unwrap(), 0)
/// };
/// pool.give(block).unwrap();
/// assert_eq!(pool.pages(), 1);
/// let b = pool.take().unwrap();
/// assert_eq!(pool.pages(), 0);
/// pool.give(b).unwrap();
/// assert_eq!(pool.shrink(1), 1); // released through the callback
/// ```
pub struct PagePool {
    order: u8,
    /// `page_size() << order`: blocks this far apart lie end to end.
    block_bytes: usize,
    list: Mutex<BlockStack>,
    /// Pages pooled, readable without the lock (the shrinker's `count`).
    pages: AtomicUsize,
    released: AtomicU64,
    release: ReleaseFn,
    owner: Option<Arc<dyn Tally>>,
}

/// Whom a pool counts its pages for (its owner in the registry), told of every change: pages
/// added and removed, under the pool's lock, so that the running totals built from them see
/// each pool's gives and takes in the order they happened and never go below zero; and each
/// public [`PagePool::give`] done, after which limits are enforced. The pool knows nothing
/// else of it: whoever gives enforces the limits, through this call.
pub(crate) trait Tally: Send + Sync {
    /// `pages` entered the pool.
    fn added(&self, pages: usize);
    /// `pages` left the pool.
    fn removed(&self, pages: usize);
    /// A block was given through [`PagePool::give`]: enforce the limits.
    fn given(&self);
}

impl PagePool {
    /// Creates a standalone pool of blocks of `order` (2^order pages each). `release` is called
    /// with every block the pool gives back to the system. A pool that should count against an
    /// owner's limit is made with [`Owner::add_pool`](crate::registry::Owner::add_pool) instead.
    ///
    /// Any order is accepted; a pool of an order whose blocks no address space holds (52 and
    /// above with 4 KiB pages) is never given a block (none can exist, see
    /// [`Block::from_raw`]) and stays empty.
    pub fn new(order: u8, release: ReleaseFn) -> PagePool {
        PagePool::with_tally(order, release, None)
    }

    /// A pool whose changes are told to `owner` (see [`Tally`]).
    pub(crate) fn with_tally(
        order: u8,
        release: ReleaseFn,
        owner: Option<Arc<dyn Tally>>,
    ) -> PagePool {
        PagePool {
            order,
            block_bytes: block_bytes(order),
            list: Mutex::new(BlockStack::new()),
            pages: AtomicUsize::new(0),
            released: AtomicU64::new(0),
            release,
            owner,
        }
    }

    /// The order of this pool's blocks.
    pub fn order(&self) -> u8 {
        self.order
    }

    /// Pages currently pooled (blocks x 2^order).
    pub fn pages(&self) -> usize {
        self.pages.load(Ordering::Relaxed)
    }

    /// Blocks currently pooled.
    pub fn blocks(&self) -> usize {
        // An order of 64 or more is a pool that stays empty (see `new`): no blocks.
        self.pages().checked_shr(self.order.into()).unwrap_or(0)
    }

    /// Puts a free block into the pool. The block must be all-zero: the pool hands it out as
    /// clean memory. If the pool belongs to an owner, the owner's limit and the registry's
    /// maximum are enforced afterwards (give first, then shrink what is over its limit).
    ///
    /// Returns the block back as `Err` if its order is not the pool's.
    pub fn give(&self, block: Block) -> Result<(), Block> {
        self.give_quiet(block)?;
        if let Some(owner) = &self.owner {
            owner.given();
        }
        Ok(())
    }

    /// `give` without limit enforcement: the caller enforces once after a batch.
    pub(crate) fn give_quiet(&self, block: Block) -> Result<(), Block> {
        if block.order != self.order {
            return Err(block);
        }
        let ptr = block.into_raw();
        {
            let mut list = lock(&self.list);
            // SAFETY: the block is at least 8 bytes, 8-aligned (`Block::from_raw`'s contract)
            // and its ownership passes to the pool here.
            unsafe { list.push(ptr) };
            list.given += 1;
            // A plain store: only lock holders write it. Bounded by the blocks' memory
            // (`Block::from_raw`'s contract), as is the shift below.
            self.pages
                .store(list.blocks << self.order, Ordering::Relaxed);
            // Counted while the lock is held, so that a take of this block (which needs the
            // lock) is counted after it: see `take_from`.
            if let Some(owner) = &self.owner {
                owner.added(1 << self.order);
            }
        }
        Ok(())
    }

    /// Puts back a block a failed allocation took from this pool: like a give, but the pool's
    /// give and take counts end as if the block had never left.
    pub(crate) fn restore(&self, block: Block) -> Result<(), Block> {
        self.give_quiet(block)?;
        let mut list = lock(&self.list);
        list.given -= 1;
        list.taken -= 1;
        Ok(())
    }

    /// Takes a clean block out of the pool, or `None` if the pool is empty. Which block: see
    /// [`take_many`](Self::take_many).
    pub fn take(&self) -> Option<Block> {
        let mut out = None;
        self.take_many(1, |b| out = Some(b));
        out
    }

    /// Takes up to `n` clean blocks at once, handing each to `f`; returns how many. One lock
    /// and one update of the owner's counts for the whole batch, where `n` calls of [`take`]
    /// would pay both `n` times.
    ///
    /// Blocks come from the top of the pool's stack (the most recently given first), except
    /// among the 64 most recently given: where the top `n` do not lie end to end and `n`
    /// others do, those are taken (lowest address first); and a single block that has a
    /// neighbour there is taken from the shortest run of neighbours (its last block, or a block
    /// with no neighbour), so that a larger buffer's released set stays whole for its next use.
    ///
    /// [`take`]: Self::take
    pub fn take_many(&self, n: usize, f: impl FnMut(Block)) -> usize {
        self.take_from(n, lock(&self.list), false, None, f)
    }

    /// [`take_many`](Self::take_many), but takes nothing if the pool's lock stays busy for
    /// `bound` while a low-priority thread is inside its locked sections (`worker_locking`;
    /// see `sync::lock_within`): such a holder may not run again for a long time. With
    /// `end_to_end`, takes `n` blocks that lie end to end (among the most recent
    /// [`HOT_BLOCKS`](crate::config::HOT_BLOCKS)) or nothing. `near`: the blocks of the same
    /// buffer the caller holds already; blocks that fill the holes between them and continue
    /// them are preferred, and with `end_to_end` required (blocks that lie end to end among
    /// themselves but not with the caller's would still leave its buffer in pieces).
    pub(crate) fn take_within(
        &self,
        n: usize,
        end_to_end: bool,
        near: Option<Near>,
        bound: std::time::Duration,
        worker_locking: &crate::sync::AtomicBool,
        f: impl FnMut(Block),
    ) -> usize {
        if n == 0 {
            return 0;
        }
        match lock_within(&self.list, bound, worker_locking) {
            Some(list) => self.take_from(n, list, end_to_end, near, f),
            None => 0,
        }
    }

    /// Takes up to `n` blocks under the lock (`end_to_end`: `n` that lie end to end, or none;
    /// `near`: see [`take_within`](Self::take_within)).
    fn take_from(
        &self,
        n: usize,
        mut list: crate::sync::MutexGuard<'_, BlockStack>,
        end_to_end: bool,
        near: Option<Near>,
        mut f: impl FnMut(Block),
    ) -> usize {
        if n == 0 {
            return 0;
        }
        let pick = list.pick(n, self.block_bytes, near, end_to_end);
        if end_to_end && pick == Pick::Scattered {
            return 0;
        }
        let mut got = 0;
        if let Pick::Span(lo, hi) = pick {
            // Blocks that lie end to end make a buffer without a view mapping: prefer them to
            // the top of the stack when the top is not (one block taken fresh elsewhere would
            // otherwise keep every later buffer of the same size scattered).
            let order = self.order;
            got = list.take_span(lo, hi, n, |p| {
                // SAFETY: the block left the pool's ring in `take_span` (ring addresses are
                // pooled blocks, never null); ownership passes to the caller. Ring blocks
                // carry no link word: they are all-zero.
                f(unsafe { Block::from_raw(NonNull::new_unchecked(p as *mut u8), order) })
            });
            debug_assert_eq!(got, n, "a span holds exactly the blocks picked");
        }
        // The top of the stack: for a pick of it, or what a span lacked (never where end to
        // end was asked for: the top's blocks would not be).
        let from_top = !end_to_end || !matches!(pick, Pick::Span(..));
        while got < n && from_top {
            let Some(ptr) = list.pop() else { break };
            // SAFETY: the block left the pool above; ownership passes to the caller.
            f(unsafe { Block::from_raw(ptr, self.order) });
            got += 1;
        }
        if got == 0 {
            // Nothing changed (and a pool of an order past the address space, see `new`,
            // always ends here: its shifts would overflow).
            return 0;
        }
        list.taken += got as u64;
        // Bounded: the pool held these blocks, whose memory bounds both shifts
        // (`Block::from_raw`'s contract).
        self.pages
            .store(list.blocks << self.order, Ordering::Relaxed);
        // Under the lock, as in `give_quiet`: the owner's and the registry's counts then see
        // this pool's gives and takes in the order they happened, and never go below zero.
        if let Some(owner) = &self.owner {
            owner.removed(got << self.order);
        }
        drop(list);
        got
    }

    /// Gives up to one block back to the system through the release callback; returns the pages
    /// freed (0 if the pool was empty). The unit of a round-robin scan.
    pub(crate) fn release_one(&self) -> usize {
        self.take().map_or(0, |block| self.release_taken(block))
    }

    /// Gives `block`, just taken from this pool (with [`take`](Self::take)), back to the system
    /// through the release callback, counted as released; returns its pages. The second half
    /// of [`release_one`](Self::release_one), for a caller that does something between the two.
    pub(crate) fn release_taken(&self, block: Block) -> usize {
        self.released.fetch_add(1, Ordering::Relaxed);
        // A panicking callback must not unwind into whoever enforces limits (the worker, an
        // allocation, the pressure monitor): the block is then lost.
        let release = std::panic::AssertUnwindSafe(|| (self.release)(block));
        if std::panic::catch_unwind(release).is_err() {
            log::error!("pagepool: a pool's release callback panicked; block leaked");
        }
        1 << self.order
    }

    /// Counts `n` blocks taken from this pool that its owner gave back to the system rather
    /// than to a buffer, as [`release_one`](Self::release_one) counts its own: every block that
    /// leaves a pool is a hit or a release.
    pub(crate) fn count_released(&self, n: usize) {
        self.released.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Releases blocks to the system until at least `nr_pages` pages are freed or the pool is
    /// empty; returns the pages freed. Whole blocks are freed, so the result can exceed
    /// `nr_pages` by less than one block.
    pub fn shrink(&self, nr_pages: usize) -> usize {
        let mut freed = 0;
        while freed < nr_pages {
            match self.release_one() {
                0 => break,
                n => freed += n,
            }
        }
        freed
    }

    /// A snapshot of this pool's counters.
    pub fn stats(&self) -> crate::stats::PoolStats {
        let (blocks, given, taken) = {
            let list = lock(&self.list);
            (list.blocks, list.given, list.taken)
        };
        crate::stats::PoolStats {
            order: self.order,
            // Bounded by the blocks' memory (`Block::from_raw`'s contract) when there are any;
            // an order of 64 or more is a pool that stays empty (see `new`).
            pages: blocks.checked_shl(self.order.into()).unwrap_or(0),
            blocks,
            given,
            taken,
            released: self.released.load(Ordering::Relaxed),
        }
    }
}

impl Drop for PagePool {
    /// A pool that goes away gives every block it holds back to the system.
    fn drop(&mut self) {
        self.shrink(usize::MAX);
    }
}

impl fmt::Debug for PagePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagePool")
            .field("order", &self.order)
            .field("pages", &self.pages())
            .finish_non_exhaustive()
    }
}
