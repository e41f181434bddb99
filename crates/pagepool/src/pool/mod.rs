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
//! (~300 ns each measured here); from the ring they are 32 reads of one hot array. `take`
//! clears a list block's link word before handing it out, so a block leaves the pool all-zero.

use std::fmt;
use std::ptr::NonNull;

pub use crate::attrs::HUGE_ORDER;
use crate::config::HOT_BLOCKS;
use crate::sync::{Arc, AtomicU64, AtomicUsize, Mutex, Ordering, lock, lock_within};

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

/// Where a take's blocks come from (see `BlockStack::pick`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// The top of the stack, popped.
    Top,
    /// The `n` ring blocks within this address range (start, end), to be taken out of the ring
    /// ([`BlockStack::take_span`]): blocks that lie end to end, or that make the caller's
    /// blocks (see [`Near`]) lie end to end.
    Span(usize, usize),
    /// No `n` blocks lie end to end in the ring, or (with a [`Near`] and end to end asked
    /// for) none make the caller's blocks lie end to end: popped, or nothing where end to end
    /// is asked for.
    Scattered,
}

/// The blocks of one order a caller already holds for a buffer, for [`PagePool::take_within`]
/// to prefer blocks that make the buffer whole: the address range they span, `lo..hi`, and how
/// many bytes of it they are (`held`; the rest are holes between them).
///
/// The contract the choice relies on: `lo` is the start of a held block and `hi` the end of
/// one; `held` is the exact byte total of the held blocks, which do not overlap and none of
/// which is in the pool. (Then pooled blocks wholly inside `lo..hi` whose bytes make up the
/// holes fill them exactly, and no pooled block can straddle `lo` or `hi`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Near {
    pub(crate) lo: usize,
    pub(crate) hi: usize,
    pub(crate) held: usize,
}

/// The free blocks: the ring (top of the stack), the intrusive list below it, the count and the
/// give/take counts (plain fields: the lock already orders every update).
struct BlockStack {
    /// `hot[(bottom + i) % HOT_BLOCKS]` for `i < hot_len` are the newest blocks, the last one on
    /// top.
    hot: [usize; HOT_BLOCKS],
    bottom: usize,
    hot_len: usize,
    /// Head of the intrusive list of older blocks.
    head: Option<NonNull<u8>>,
    blocks: usize,
    given: u64,
    taken: u64,
}

impl BlockStack {
    fn new() -> BlockStack {
        BlockStack {
            hot: [0; HOT_BLOCKS],
            bottom: 0,
            hot_len: 0,
            head: None,
            blocks: 0,
            given: 0,
            taken: 0,
        }
    }

    /// Pushes a block owned by the pool on top of the stack.
    ///
    /// # Safety
    /// `ptr` is a block of at least 8 bytes, 8-aligned, now owned by the pool.
    unsafe fn push(&mut self, ptr: NonNull<u8>) {
        if self.hot_len == HOT_BLOCKS {
            // The ring is full: its oldest block goes to the head of the list.
            let old = self.hot[self.bottom];
            let next = self.head.map_or(0, |p| p.as_ptr() as usize);
            // SAFETY: `old` is a pooled block (it was pushed under this contract); its link word
            // is ours to write while the pool holds it.
            unsafe { (old as *mut usize).write(next) };
            self.head = NonNull::new(old as *mut u8);
            self.bottom = (self.bottom + 1) % HOT_BLOCKS;
            self.hot_len -= 1;
        }
        self.hot[(self.bottom + self.hot_len) % HOT_BLOCKS] = ptr.as_ptr() as usize;
        self.hot_len += 1;
        self.blocks += 1;
    }

    /// Chooses where `n` blocks of `size` bytes come from: [`Pick::Top`] when popping the top
    /// `n` breaks up no set of blocks that could make a buffer without a view; else
    /// [`Pick::Span`], a range holding the `n` blocks to take from the ring (see
    /// [`take_span`](Self::take_span)); else [`Pick::Scattered`].
    ///
    /// - `near` (the blocks the caller already holds, of the same buffer): first, the blocks
    ///   (with `whole`, only these) that fill the holes between them, if the ring has all of
    ///   them, with the rest of the `n` continuing them end to end just after or just before:
    ///   a buffer gathered partly from elsewhere (the queue) is then whole. (A set that once
    ///   lost a block to a late worker and came back with a stray one beside it is then made
    ///   whole again by the next buffer that takes the hole, where taking the top would keep
    ///   it scattered for good.)
    /// - `n > 1`: if the top `n` do not lie end to end, the `n` highest that do, if any.
    /// - `n == 1`: if the top block has a neighbour in the ring (it belongs to a run of blocks
    ///   that lie end to end, such as a larger buffer's released set), the highest block with
    ///   no neighbour, else the last block of the shortest run: a one-block buffer then leaves
    ///   the other sets whole.
    fn pick(&mut self, n: usize, size: usize, near: Option<Near>, whole: bool) -> Pick {
        if n > self.hot_len || n == 0 {
            return Pick::Scattered;
        }
        let len = self.hot_len;
        let mut ring = [0usize; HOT_BLOCKS]; // bottom first
        for (i, a) in ring[..len].iter_mut().enumerate() {
            *a = self.hot[(self.bottom + i) % HOT_BLOCKS];
        }
        let mut addrs = ring;
        let run_of =
            |first: usize, k: usize| (0..k).all(|j| ring[..len].contains(&(first + j * size)));
        let continues = near.and_then(|near| {
            // The holes: every ring block wholly inside the range fills one (the caller's
            // blocks are not in the pool), and if as many do as the holes' bytes make, they
            // and the caller's blocks tile the range exactly.
            let gap = near.hi.checked_sub(near.lo)?.checked_sub(near.held)?;
            if gap % size != 0 || gap / size > n {
                return None;
            }
            let inside = ring[..len]
                .iter()
                .filter(|&&a| a >= near.lo && a.saturating_add(size) <= near.hi)
                .count();
            if inside != gap / size {
                return None;
            }
            let more = n - inside;
            if run_of(near.hi, more) {
                return Some((near.lo, near.hi + more * size));
            }
            let before = near.lo.checked_sub(more * size)?;
            run_of(before, more).then_some((before, near.hi))
        });
        if let Some((lo, hi)) = continues {
            return Pick::Span(lo, hi);
        }
        if near.is_some() && whole {
            return Pick::Scattered;
        }
        let first = if n == 1 {
            let top = ring[len - 1];
            let neighbour = |a: usize| {
                ring[..len]
                    .iter()
                    .any(|&b| b == a.wrapping_add(size) || b.wrapping_add(size) == a)
            };
            if !neighbour(top) {
                return Pick::Top; // the usual pop breaks nothing up
            }
            let sorted = &mut addrs[..len];
            sorted.sort_unstable();
            // The runs of the sorted ring; the shortest one, the highest address among equals.
            let (mut best, mut best_len) = (top, usize::MAX);
            let mut i = 0;
            while i < len {
                let mut j = i + 1;
                while j < len && sorted[j - 1] + size == sorted[j] {
                    j += 1;
                }
                if j - i <= best_len {
                    (best, best_len) = (sorted[j - 1], j - i);
                }
                i = j;
            }
            best
        } else {
            let mut top = [0usize; HOT_BLOCKS];
            let top = &mut top[..n];
            top.copy_from_slice(&addrs[len - n..len]);
            top.sort_unstable();
            if top.windows(2).all(|w| w[0] + size == w[1]) {
                return Pick::Top; // the usual pop gives them end to end
            }
            let sorted = &mut addrs[..len];
            sorted.sort_unstable();
            let found = sorted
                .windows(n)
                .rev() // higher addresses: more likely the most recent arena
                .find(|w| w.windows(2).all(|p| p[0] + size == p[1]));
            match found {
                Some(w) => w[0],
                None => return Pick::Scattered,
            }
        };
        Pick::Span(first, first + n * size)
    }

    /// Takes the ring's blocks that start within `lo..hi` out of it, at most `max` of them
    /// (the rest keep their order), handing each to `f`, lowest address first; returns how
    /// many. ([`pick`](Self::pick) names a range that holds exactly the blocks it chose: pooled
    /// blocks never overlap, and where the range is a [`Near`]'s, the caller holds the blocks
    /// that start at its `lo` and end at its `hi`, so no pooled block straddles either.)
    fn take_span(&mut self, lo: usize, hi: usize, max: usize, mut f: impl FnMut(usize)) -> usize {
        let mut taken = [0usize; HOT_BLOCKS];
        let (mut kept, mut n) = (0, 0);
        for i in 0..self.hot_len {
            let a = self.hot[(self.bottom + i) % HOT_BLOCKS];
            if a < lo || a >= hi || n == max {
                let slot = (self.bottom + kept) % HOT_BLOCKS;
                self.hot[slot] = a;
                kept += 1;
            } else {
                taken[n] = a;
                n += 1;
            }
        }
        self.hot_len = kept;
        self.blocks -= n;
        taken[..n].sort_unstable();
        taken[..n].iter().for_each(|&a| f(a));
        n
    }

    /// Pops the top block. A block from the list has its link word cleared, so what comes out
    /// is as clean as what went in.
    fn pop(&mut self) -> Option<NonNull<u8>> {
        let ptr = if self.hot_len > 0 {
            self.hot_len -= 1;
            let p = self.hot[(self.bottom + self.hot_len) % HOT_BLOCKS];
            // SAFETY: only non-null block addresses are pushed.
            unsafe { NonNull::new_unchecked(p as *mut u8) }
        } else {
            let ptr = self.head?;
            // SAFETY: `ptr` is a pooled block whose first word holds the link written by `push`;
            // the pool's lock makes this the only access.
            let next = unsafe { ptr.as_ptr().cast::<usize>().read() };
            self.head = NonNull::new(next as *mut u8);
            // SAFETY: the block is leaving the pool; restoring its first word to zero makes it
            // all-zero again.
            unsafe { ptr.as_ptr().cast::<usize>().write(0) };
            ptr
        };
        self.blocks -= 1;
        Some(ptr)
    }
}

// SAFETY: the list only holds addresses of blocks the pool owns (see `Block::from_raw`); the
// Mutex around it serialises every access to the link words.
unsafe impl Send for BlockStack {}

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
    /// [`HOT_BLOCKS`]) or nothing. `near`: the blocks of the same buffer the caller holds
    /// already; blocks that fill the holes between them and continue them are preferred, and
    /// with `end_to_end` required (blocks that lie end to end among themselves but not with the
    /// caller's would still leave its buffer in pieces).
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::alloc::{Layout, alloc_zeroed, dealloc};
    use std::sync::atomic::AtomicUsize as StdAtomic;

    const SZ: usize = 4096;

    fn layout(order: u8) -> Layout {
        Layout::from_size_align(SZ << order, SZ).unwrap()
    }

    fn block(order: u8) -> Block {
        // SAFETY: a fresh zeroed allocation we own, released with the same layout below.
        unsafe { Block::from_raw(NonNull::new(alloc_zeroed(layout(order))).unwrap(), order) }
    }

    fn pool(order: u8, released: Arc<StdAtomic>) -> PagePool {
        PagePool::new(
            order,
            Box::new(move |b: Block| {
                released.fetch_add(1, Ordering::Relaxed);
                let o = b.order();
                // SAFETY: every block in these tests comes from `block(o)`.
                unsafe { dealloc(b.into_raw().as_ptr(), layout(o)) }
            }),
        )
    }

    /// Fresh zeroed pages to give to a pool of order-0 blocks whose release callback leaks
    /// them; freed on drop, so a test declares them before its pool.
    struct Pages {
        base: *mut u8,
        layout: Layout,
        page: usize,
    }

    impl Pages {
        fn new(n: usize) -> Pages {
            let page = crate::os::page_size();
            let layout = Layout::from_size_align(n * page, page).unwrap();
            // SAFETY: a non-zero size; freed with the same layout in `drop`.
            let base = unsafe { alloc_zeroed(layout) };
            assert!(!base.is_null());
            Pages { base, layout, page }
        }

        /// The address of page `i`.
        fn at(&self, i: usize) -> usize {
            self.base as usize + i * self.page
        }

        /// Page `i` as a block, to give to the pool: each page is given at most once at a time.
        fn block(&self, i: usize) -> Block {
            assert!(i * self.page < self.layout.size());
            // SAFETY: page `i` of the allocation, zeroed (or given back clean by the pool),
            // owned by the pool from the give on; the pool's callback never frees it.
            unsafe { Block::from_raw(NonNull::new(self.base.add(i * self.page)).unwrap(), 0) }
        }
    }

    impl Drop for Pages {
        fn drop(&mut self) {
            // SAFETY: the allocation made in `new`; the pool that held its pages is gone (it
            // was declared after this, and is dropped first).
            unsafe { dealloc(self.base, self.layout) };
        }
    }

    #[test]
    fn a_batch_prefers_blocks_that_lie_end_to_end() {
        let pages = Pages::new(8);
        let (page, block) = (pages.page, |i| pages.block(i));
        let p = PagePool::new(0, Box::new(|_: Block| {}));
        // Pages 0..3 end to end, then 7 and 5 on top: the top three do not lie end to end.
        for i in [0, 1, 2, 3, 7, 5] {
            p.give(block(i)).unwrap();
        }
        let mut got = Vec::new();
        assert_eq!(
            p.take_many(3, |b| got.push(b.into_raw().as_ptr() as usize)),
            3
        );
        let a = pages.at(0);
        assert_eq!(
            got,
            [a + page, a + 2 * page, a + 3 * page],
            "an end-to-end run"
        );
        assert_eq!(p.blocks(), 3);
        // The rest keep their order: 5 on top, then 7, then 0.
        let mut rest = Vec::new();
        for _ in 0..3 {
            rest.push(p.take().unwrap().into_raw().as_ptr() as usize);
        }
        assert_eq!(rest, [a + 5 * page, a + 7 * page, a]);
        // Top blocks already end to end are taken as they are.
        for i in [5, 4] {
            p.give(block(i)).unwrap();
        }
        let mut two = Vec::new();
        p.take_many(2, |b| two.push(b.into_raw().as_ptr() as usize));
        assert_eq!(two, [a + 4 * page, a + 5 * page]);
    }

    /// Takes up to `n` blocks from `p` (never waiting long) for a caller holding `held` of the
    /// pages `lo..hi` of `pages` (nothing, with `None`); returns their page numbers, as taken.
    fn take_near(
        p: &PagePool,
        pages: &Pages,
        n: usize,
        end_to_end: bool,
        near: Option<(usize, usize, usize)>,
    ) -> Vec<usize> {
        let (page, a) = (pages.page, pages.at(0));
        let never = crate::sync::AtomicBool::new(false);
        let wait = std::time::Duration::from_millis(10);
        let near = near.map(|(lo, hi, held)| Near {
            lo: a + lo * page,
            hi: a + hi * page,
            held: held * page,
        });
        let mut got = Vec::new();
        let n_got = p.take_within(n, end_to_end, near, wait, &never, |b| {
            got.push((b.into_raw().as_ptr() as usize - a) / page)
        });
        assert_eq!(n_got, got.len());
        got
    }

    #[test]
    fn blocks_that_continue_what_the_caller_holds_come_first() {
        let pages = Pages::new(16);
        let block = |i| pages.block(i);
        let p = PagePool::new(0, Box::new(|_: Block| {}));
        // The caller holds all the pages lo..hi.
        let take = |n: usize, end_to_end: bool, near: Option<(usize, usize)>| {
            take_near(
                &p,
                &pages,
                n,
                end_to_end,
                near.map(|(lo, hi)| (lo, hi, hi - lo)),
            )
        };
        // Two runs of three, 2..5 and 10..13, the higher one on top.
        for i in [2, 3, 4, 10, 11, 12] {
            p.give(block(i)).unwrap();
        }
        // The caller holds pages 0..2 of its buffer: 2..5 continue them.
        assert_eq!(take(3, true, Some((0, 2))), [2, 3, 4]);
        for i in [2, 3, 4] {
            p.give(block(i)).unwrap();
        }
        // It holds 5..8: 2..5 lie just before.
        assert_eq!(take(3, true, Some((5, 8))), [2, 3, 4]);
        for i in [2, 3, 4] {
            p.give(block(i)).unwrap();
        }
        // Nothing continues 6..8: three end to end among themselves would still leave the
        // caller's buffer in two pieces, so none where end to end is asked for; else the top
        // three, end to end, as without a range.
        assert!(take(3, true, Some((6, 8))).is_empty());
        assert_eq!(take(3, false, Some((6, 8))), [4, 3, 2]);
        assert_eq!(take(3, true, None), [12, 11, 10]);
        assert_eq!(p.blocks(), 0);
    }

    #[test]
    fn blocks_that_fill_the_holes_in_what_the_caller_holds_come_first() {
        let pages = Pages::new(16);
        let block = |i| pages.block(i);
        let p = PagePool::new(0, Box::new(|_: Block| {}));
        // The caller holds `held` of the pages lo..hi.
        let take = |n: usize, end_to_end: bool, near: (usize, usize, usize)| {
            let mut got = take_near(&p, &pages, n, end_to_end, Some(near));
            got.sort_unstable();
            got
        };
        // A set of eight, 0..8, came back with a stray page beside it (8) in place of page 5,
        // which landed in the pool later; another stray (12) too; 8 is on top.
        for i in [5, 12, 8] {
            p.give(block(i)).unwrap();
        }
        // The caller holds 0..5 and 6..8 (seven pages): page 5 fills the hole, not the top.
        assert_eq!(take(1, true, (0, 8, 7)), [5]);
        p.give(block(5)).unwrap();
        // It wants two: the hole and the page after what it holds.
        assert_eq!(take(2, true, (0, 8, 7)), [5, 8]);
        for i in [5, 8, 0, 1] {
            p.give(block(i)).unwrap();
        }
        // It holds 2..5 and 6..8 (five pages) and wants three: the hole, and (9 is not
        // pooled) 0..2 just before.
        assert_eq!(take(3, true, (2, 8, 5)), [0, 1, 5]);
        // Two holes (0..8 holding six) and only one of them pooled: none where end to end is
        // asked for; else the top.
        p.give(block(5)).unwrap();
        assert!(take(2, true, (0, 8, 6)).is_empty());
        assert_eq!(take(1, false, (0, 8, 6)), [5]);
        // More holes than blocks wanted: the top.
        assert_eq!(take(1, false, (0, 8, 5)), [8]);
        assert_eq!(p.blocks(), 1, "12 is left");
        assert_eq!(p.stats().taken, 8);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any mix of gives and takes, with and without blocks held: a take hands out only
        /// pooled blocks, each once, at most as many as asked; with `end_to_end`, what it hands
        /// out and what the caller holds lie end to end (or it hands out nothing). Not under
        /// Miri: proptest keeps its failures in files, which Miri's isolation forbids.
        #[test]
        #[cfg_attr(miri, ignore)]
        fn takes_near_held_blocks_hand_out_pooled_blocks_once_and_whole_sets_when_asked(
            ops in proptest::collection::vec((0u8..4, 0usize..32, 1usize..6, proptest::bool::ANY), 1..80)
        ) {
            use std::collections::BTreeSet;
            let pages = Pages::new(32);
            let p = PagePool::new(0, Box::new(|_: Block| {}));
            let (mut pooled, mut held) = (BTreeSet::new(), BTreeSet::new());
            for (op, i, n, end_to_end) in ops {
                match op {
                    0 if !pooled.contains(&i) && !held.contains(&i) => {
                        p.give(pages.block(i)).unwrap();
                        pooled.insert(i);
                    }
                    1 if !pooled.contains(&i) => {
                        held.insert(i); // gathered from elsewhere (the queue)
                    }
                    2 => {
                        let near = held
                            .first()
                            .zip(held.last())
                            .map(|(&lo, &hi)| (lo, hi + 1, held.len()));
                        let got = take_near(&p, &pages, n, end_to_end, near);
                        proptest::prop_assert!(got.len() <= n);
                        for g in &got {
                            proptest::prop_assert!(pooled.remove(g), "page {} was not pooled", g);
                        }
                        if end_to_end && !got.is_empty() {
                            proptest::prop_assert_eq!(got.len(), n);
                            // With nothing held, `got` alone; else `got` and what is held.
                            let whole: BTreeSet<usize> = held.iter().chain(&got).copied().collect();
                            let (lo, hi) = (whole.first().unwrap(), whole.last().unwrap());
                            proptest::prop_assert_eq!(hi - lo + 1, whole.len(), "{:?} + {:?}", held, got);
                        }
                        held.extend(got);
                    }
                    3 => held.clear(), // the buffer went elsewhere
                    _ => {}
                }
                proptest::prop_assert_eq!(p.blocks(), pooled.len());
            }
        }
    }

    #[test]
    fn a_single_take_leaves_sets_whole() {
        let pages = Pages::new(8);
        let (page, a, block) = (pages.page, pages.at(0), |i| pages.block(i));
        let p = PagePool::new(0, Box::new(|_: Block| {}));
        // Page 6 alone, then a released set of four (3, 2, 1, 0: page 0 on top).
        for i in [6, 3, 2, 1, 0] {
            p.give(block(i)).unwrap();
        }
        let take = || p.take().unwrap().into_raw().as_ptr() as usize;
        assert_eq!(take(), a + 6 * page, "the block with no neighbour");
        assert_eq!(take(), a + 3 * page, "then the end of the set");
        let mut got = Vec::new();
        p.take_many(3, |b| got.push(b.into_raw().as_ptr() as usize));
        assert_eq!(got, [a, a + page, a + 2 * page], "the rest, whole");
        // A top block with no neighbour is simply popped.
        for i in [0, 1, 4] {
            p.give(block(i)).unwrap();
        }
        assert_eq!(take(), a + 4 * page);
        assert_eq!(take(), a + page, "the end of the run 0..2");
        assert_eq!(take(), a);
    }

    #[test]
    fn give_take_is_lifo_and_clean() {
        let released = Arc::new(StdAtomic::new(0));
        let p = pool(2, released.clone());
        let (a, b) = (block(2), block(2));
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        p.give(a).unwrap();
        p.give(b).unwrap();
        assert_eq!((p.blocks(), p.pages()), (2, 8));
        let t = p.take().unwrap();
        assert_eq!(t.as_ptr(), pb);
        // SAFETY: `t` is ours and spans 4 pages.
        let bytes = unsafe { std::slice::from_raw_parts(t.as_ptr().as_ptr(), 4 * SZ) };
        assert!(bytes.iter().all(|&x| x == 0), "link word cleared on take");
        assert_eq!(p.take().unwrap().as_ptr(), pa);
        assert!(p.take().is_none());
        p.give(t).unwrap();
        drop(p);
        assert_eq!(
            released.load(Ordering::Relaxed),
            1,
            "drop releases pooled blocks"
        );
        // The block taken second was never given back: free it here.
        // SAFETY: allocated by `block(2)`.
        unsafe { dealloc(pa.as_ptr(), layout(2)) };
    }

    #[test]
    fn past_the_ring_blocks_stay_lifo_and_clean() {
        let released = Arc::new(StdAtomic::new(0));
        let p = pool(0, released.clone());
        let n = 3 * HOT_BLOCKS + 5;
        let blocks: Vec<Block> = (0..n).map(|_| block(0)).collect();
        let addrs: Vec<_> = blocks.iter().map(Block::as_ptr).collect();
        for b in blocks {
            p.give(b).unwrap();
        }
        assert_eq!(p.blocks(), n);
        // Take half, give them back (ring and list both in use), then take everything.
        let half: Vec<Block> = (0..n / 2).map(|_| p.take().unwrap()).collect();
        for b in half.into_iter().rev() {
            p.give(b).unwrap();
        }
        for want in addrs.iter().rev() {
            let b = p.take().unwrap();
            assert_eq!(b.as_ptr(), *want, "LIFO across the ring and the list");
            // SAFETY: `b` is ours and spans one page.
            let bytes = unsafe { std::slice::from_raw_parts(b.as_ptr().as_ptr(), SZ) };
            assert!(bytes.iter().all(|&x| x == 0), "link word cleared on take");
            p.give(b).unwrap();
            assert_eq!(p.take().unwrap().as_ptr(), *want);
            // SAFETY: allocated by `block(0)`, out of the pool for good.
            unsafe { dealloc(want.as_ptr(), layout(0)) };
        }
        assert!(p.take().is_none());
        assert_eq!(p.pages(), 0);
    }

    #[test]
    fn wrong_order_is_refused() {
        let released = Arc::new(StdAtomic::new(0));
        let p = pool(1, released.clone());
        let b = p.give(block(0)).unwrap_err();
        assert_eq!(b.order(), 0);
        assert_eq!(p.pages(), 0);
        // SAFETY: allocated by `block(0)`.
        unsafe { dealloc(b.into_raw().as_ptr(), layout(0)) };
    }

    #[test]
    fn a_pool_of_an_order_past_the_address_space_is_empty_not_an_overflow() {
        // No block of these orders fits in memory (`Block::from_raw`'s contract), so such a
        // pool never holds one; making it and reading it must not overflow (a panic in this
        // debug build), alone or in its registry's stats.
        let registry = crate::registry::Registry::new(usize::MAX);
        let owner = registry.register("huge orders", usize::MAX);
        for order in [52, 63, 64, 200, u8::MAX] {
            let p = owner.add_pool(order, Box::new(|_b: Block| {}));
            assert_eq!((p.order(), p.pages(), p.blocks()), (order, 0, 0));
            assert!(p.take().is_none());
            assert_eq!(p.take_many(3, |_| {}), 0);
            assert_eq!(p.shrink(usize::MAX), 0);
            let s = p.stats();
            assert_eq!((s.order, s.pages, s.blocks), (order, 0, 0));
            let back = p.give(block(0)).unwrap_err();
            // SAFETY: allocated by `block(0)`.
            unsafe { dealloc(back.into_raw().as_ptr(), layout(0)) };
            assert!(registry.stats().to_string().contains("unlimited"));
        }
    }

    #[test]
    fn shrink_frees_whole_blocks() {
        let released = Arc::new(StdAtomic::new(0));
        let p = pool(3, released.clone());
        for _ in 0..4 {
            p.give(block(3)).unwrap();
        }
        assert_eq!(p.shrink(1), 8, "one whole block");
        assert_eq!(p.shrink(9), 16);
        assert_eq!(p.shrink(100), 8, "only what is there");
        assert_eq!(p.shrink(1), 0);
        let s = p.stats();
        assert_eq!((s.given, s.taken, s.released), (4, 4, 4));
        assert_eq!(released.load(Ordering::Relaxed), 4);
    }
}
