//! The pool's unit tests: gives and takes, the ring and the list, which blocks a take prefers
//! (with a property test against a model of the pool), shrinking and odd orders. Kept apart
//! from the code they test so that each file stays readable on its own.

use super::*;
use crate::config::HOT_BLOCKS;
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
