//! The stack of a pool's free blocks: the ring of the most recent ones on top of the intrusive
//! list of older ones, and the choice of which blocks a take gets (the top, or blocks that lie
//! end to end). It is the state behind a [`PagePool`](super::PagePool)'s lock, apart from the
//! pool so that the pool's file keeps to its contract (give, take, shrink, counts) and this one
//! to how the blocks are kept.

use std::ptr::NonNull;

use crate::config::HOT_BLOCKS;

/// Where a take's blocks come from (see `BlockStack::pick`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pick {
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

/// The blocks of one order a caller already holds for a buffer, for
/// [`PagePool::take_within`](super::PagePool::take_within)
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
pub(super) struct BlockStack {
    /// `hot[(bottom + i) % HOT_BLOCKS]` for `i < hot_len` are the newest blocks, the last one on
    /// top.
    hot: [usize; HOT_BLOCKS],
    bottom: usize,
    hot_len: usize,
    /// Head of the intrusive list of older blocks.
    head: Option<NonNull<u8>>,
    pub(super) blocks: usize,
    pub(super) given: u64,
    pub(super) taken: u64,
}

impl BlockStack {
    pub(super) fn new() -> BlockStack {
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
    pub(super) unsafe fn push(&mut self, ptr: NonNull<u8>) {
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
    pub(super) fn pick(&mut self, n: usize, size: usize, near: Option<Near>, whole: bool) -> Pick {
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
    pub(super) fn take_span(
        &mut self,
        lo: usize,
        hi: usize,
        max: usize,
        mut f: impl FnMut(usize),
    ) -> usize {
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
    pub(super) fn pop(&mut self) -> Option<NonNull<u8>> {
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
