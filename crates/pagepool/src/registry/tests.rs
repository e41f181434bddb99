//! The registry's unit tests: owners' limits, the global maximum, the shrink's fairness among
//! owners and pools of every kind, and its statistics. Kept apart from the code they test so
//! that each file stays readable on its own.

use super::*;
use crate::pool::Block;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

fn layout(order: u8) -> Layout {
    Layout::from_size_align(4096 << order, 4096).unwrap()
}
fn block(order: u8) -> Block {
    // SAFETY: a fresh zeroed allocation, freed by `free` with the same layout.
    unsafe { Block::from_raw(NonNull::new(alloc_zeroed(layout(order))).unwrap(), order) }
}
fn free() -> ReleaseFn {
    Box::new(|b: Block| {
        let o = b.order();
        // SAFETY: every block here comes from `block`.
        unsafe { dealloc(b.into_raw().as_ptr(), layout(o)) }
    })
}

#[test]
fn owner_limit_shrinks_only_that_owner() {
    let reg = Registry::new(1000);
    let a = reg.register("a", 4);
    let b = reg.register("b", 100);
    let pa = a.add_pool(0, free());
    let pb = b.add_pool(1, free());
    for _ in 0..10 {
        pb.give(block(1)).unwrap();
    }
    for _ in 0..6 {
        pa.give(block(0)).unwrap();
    }
    assert_eq!(a.count(), 4, "give first, then shrink to the limit");
    assert_eq!(b.count(), 20, "the other owner is untouched");
    assert_eq!(reg.count(), 24);
    assert_eq!(pa.stats().released, 2);
    let s = reg.stats();
    assert_eq!(s.total_pages, 24);
    assert_eq!(s.owners.iter().map(|o| o.pages).sum::<usize>(), 24);
}

#[test]
fn lowering_a_limit_shrinks_at_once() {
    let reg = Registry::new(1000);
    let a = reg.register("a", 100);
    let p = a.add_pool(1, free());
    for _ in 0..10 {
        p.give(block(1)).unwrap();
    }
    assert_eq!(a.count(), 20);
    a.set_limit_pages(6);
    assert_eq!((a.limit_pages(), a.count()), (6, 6));
    assert_eq!(reg.count(), 6);
}

#[test]
fn global_max_shrinks_round_robin() {
    let reg = Registry::new(1000);
    let a = reg.register("a", 1000);
    let p0 = a.add_pool(0, free());
    let p2 = a.add_pool(2, free());
    for _ in 0..8 {
        p0.give(block(0)).unwrap();
        p2.give(block(2)).unwrap();
    }
    assert_eq!(reg.count(), 40);
    reg.set_max_pages(30);
    assert!(reg.count() <= 30);
    assert!(p0.blocks() < 8 && p2.blocks() < 8, "both pools gave blocks");
    let f = reg.scan(5);
    assert!(
        (5..9).contains(&f),
        "whole blocks: at most one block over, got {f}"
    );
}

type OwnerPool = (Arc<Owner>, Arc<PagePool>);

/// Owner `a` holds 100 pages in 4 KiB blocks, `b` 800 pages in 16 KiB blocks, on a
/// registry whose maximum lets them hold all of it.
fn two_owners() -> (Arc<Registry>, OwnerPool, OwnerPool) {
    let reg = Registry::new(1000);
    let a = reg.register("a", 1000);
    let b = reg.register("b", 1000);
    let pa = a.add_pool(0, free());
    let pb = b.add_pool(2, free());
    for _ in 0..100 {
        pa.give(block(0)).unwrap();
    }
    for _ in 0..200 {
        pb.give(block(2)).unwrap();
    }
    assert_eq!((a.count(), b.count()), (100, 800));
    (reg, (a, pa), (b, pb))
}

#[test]
fn global_max_shrinks_owners_in_proportion_to_what_they_hold() {
    let (reg, (a, _pa), (b, _pb)) = two_owners();
    // A fifth of what they hold may stay: each keeps a fifth of its own, within a block
    // (one block at a time, not one from each in turn: that would empty `a`, whose blocks
    // are the smaller, long before `b`).
    reg.set_max_pages(180);
    assert!(reg.count() <= 180);
    let (ka, kb) = (a.count(), b.count());
    assert!((19..=21).contains(&ka), "a keeps about 20 of 100: {ka}");
    assert!((156..=164).contains(&kb), "b keeps about 160 of 800: {kb}");
}

#[test]
fn repeated_small_shrinks_are_shared_in_proportion() {
    let (reg, (a, _pa), (b, _pb)) = two_owners();
    // Fifty small shrinks, each smaller than most of a round: shared by what each holds
    // over all of them (the turn carries over from one shrink to the next), so both keep
    // the same part of what they held.
    let mut freed = 0;
    for _ in 0..50 {
        freed += reg.scan(5);
    }
    let (ka, kb) = (a.count(), b.count());
    assert_eq!(ka + kb + freed, 900);
    let kept = (ka + kb) as f64 / 900.0;
    let (fa, fb) = (ka as f64 / 100.0, kb as f64 / 800.0);
    assert!(
        (fa - kept).abs() < 0.03 && (fb - kept).abs() < 0.03,
        "a kept {ka} of 100, b {kb} of 800 ({kept:.2} of all)"
    );
}

#[test]
fn an_owner_that_was_empty_does_not_pay_for_shrinks_before_it_joined() {
    let (reg, (a, pa), (b, _pb)) = two_owners();
    // `b` alone gives back for a while; then `a` fills again: from then on they share.
    pa.shrink(usize::MAX);
    assert_eq!(reg.scan(400), 400);
    assert_eq!(b.count(), 400);
    for _ in 0..100 {
        pa.give(block(0)).unwrap();
    }
    reg.set_max_pages(250);
    let (ka, kb) = (a.count(), b.count());
    assert!((49..=51).contains(&ka), "a keeps about 50 of 100: {ka}");
    assert!((196..=204).contains(&kb), "b keeps about 200 of 400: {kb}");
}

#[test]
fn concurrent_shrinks_share_in_proportion() {
    let (reg, (a, _pa), (b, _pb)) = two_owners();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while reg.count() > 300 {
                    reg.scan(3);
                }
            });
        }
    });
    let (ka, kb) = (a.count(), b.count());
    let kept = (ka + kb) as f64 / 900.0;
    let (fa, fb) = (ka as f64 / 100.0, kb as f64 / 800.0);
    assert!(
        (fa - kept).abs() < 0.1 && (fb - kept).abs() < 0.1,
        "a kept {ka} of 100, b {kb} of 800 ({kept:.2} of all)"
    );
}

struct Fixed(AtomicUsize);
impl Shrinker for Fixed {
    fn name(&self) -> &str {
        "fixed"
    }
    fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
    fn scan(&self, nr: usize) -> usize {
        let n = nr.min(self.count());
        self.0.fetch_sub(n, Ordering::Relaxed);
        n
    }
}

/// Another kind of pool counting against an owner: `n` units of 4 pages, freed by `scan`.
struct Other {
    owner: Arc<Owner>,
    units: AtomicUsize,
}
impl Shrinker for Other {
    fn name(&self) -> &str {
        "other"
    }
    fn count(&self) -> usize {
        self.units.load(Ordering::Relaxed) * 4
    }
    fn scan(&self, nr_pages: usize) -> usize {
        let mut freed = 0;
        while freed < nr_pages && self.units.load(Ordering::Relaxed) > 0 {
            self.units.fetch_sub(1, Ordering::Relaxed);
            self.owner.note_removed(4);
            freed += 4;
        }
        freed
    }
}

#[test]
fn other_kinds_of_pools_are_shrunk_like_page_pools() {
    let reg = Registry::new(1000);
    let a = reg.register("a", 1000);
    let p = a.add_pool(0, free());
    for _ in 0..8 {
        p.give(block(0)).unwrap();
    }
    let b = reg.register("b", 1000);
    let other = Arc::new(Other {
        owner: b.clone(),
        units: AtomicUsize::new(4),
    });
    b.note_added(16);
    let weak: Weak<dyn Shrinker> = Arc::downgrade(&(other.clone() as Arc<dyn Shrinker>));
    b.add_other(weak);
    assert_eq!(reg.count(), 24);
    // Over a maximum of 16: both owners give, each for what it holds (not only a's page
    // pool).
    reg.set_max_pages(16);
    assert!(reg.count() <= 16);
    assert!(
        other.units.load(Ordering::Relaxed) < 4,
        "the other pool gave"
    );
    assert!(p.pages() < 8, "the page pool gave");
    // An owner's own limit reaches it too.
    b.set_limit_pages(4);
    assert!(b.count() <= 4);
    assert_eq!(reg.count_all(), reg.count(), "counted once");
    // The registry's shrink frees everything, the other pool included.
    let left = reg.count_all();
    assert_eq!(reg.shrink_all(usize::MAX), left);
    assert_eq!(reg.count(), 0);
    assert_eq!(other.units.load(Ordering::Relaxed), 0);
}

#[test]
fn shrink_all_asks_extra_shrinkers_first() {
    let reg = Registry::new(1000);
    let a = reg.register("a", 1000);
    let p = a.add_pool(0, free());
    for _ in 0..5 {
        p.give(block(0)).unwrap();
    }
    let extra: Arc<dyn Shrinker> = Arc::new(Fixed(AtomicUsize::new(3)));
    reg.add_shrinker(Arc::downgrade(&extra));
    assert_eq!(reg.count_all(), 8);
    assert_eq!(reg.shrink_all(4), 4);
    assert_eq!(extra.count(), 0, "extra shrinker emptied first");
    assert_eq!(p.pages(), 4);
    drop(extra);
    assert_eq!(reg.count_all(), 4, "dropped shrinkers unregister");
}
