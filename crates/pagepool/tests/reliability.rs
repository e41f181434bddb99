//! Failure paths: a refused allocation changes no counter; a panicking release callback or
//! shrinker does not wedge a heap; a long worker spin does not hold up `flush` or drop.

use std::alloc::{Layout, alloc_zeroed};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagepool::{
    AllocError, SystemHeap,
    pool::Block,
    registry::{Registry, Shrinker},
};

fn quiet_heap(registry: &Arc<Registry>) -> SystemHeap {
    SystemHeap::builder()
        .registry(registry.clone())
        .pressure(None)
        .max_buffer(usize::MAX)
        .build()
        .unwrap()
}

#[test]
fn a_refused_allocation_leaves_every_counter_as_it_was() {
    let registry = Registry::new(usize::MAX);
    let heap = quiet_heap(&registry);
    // Pooled blocks of every order, and a thread cache, so that the refused allocation takes
    // pooled blocks before it fails.
    let warm: Vec<_> = [4 << 20, (1 << 20) + (64 << 10) + 4096, 8192]
        .iter()
        .map(|&n| heap.alloc(n).unwrap())
        .collect();
    drop(warm);
    heap.flush();
    let before = heap.stats();
    assert!(before.pooled_pages() > 1000);
    for len in [
        isize::MAX as usize / 2,
        isize::MAX as usize / 4 + 4096 * 17 + (64 << 10),
    ] {
        let err = heap.alloc(len).unwrap_err();
        assert!(matches!(err, AllocError::Os(_)), "{err}");
        heap.flush();
        assert_eq!(heap.stats(), before, "after a refused alloc({len})");
    }
    // The blocks it took and gave back are still clean and still pooled.
    let b = heap.alloc(4 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert_eq!(heap.stats().misses, before.misses, "served from the pools");
}

#[test]
fn a_panicking_release_callback_does_not_wedge_a_heap() {
    let page = pagepool::page_size();
    // A registry whose maximum the heap's own pooling exceeds, so that every give by the
    // heap's worker shrinks all pools round robin, the other owner's included.
    let registry = Registry::new(64);
    let bad = registry.register("panics", usize::MAX);
    let pool = bad.add_pool(0, Box::new(|_b: Block| panic!("release callback panics")));
    // The pages: one zeroed allocation that outlives the pool (its release callback drops
    // the blocks it is given, and the pool may still hold some when the test ends), freed at
    // the end, so that nothing leaks.
    let layout = Layout::from_size_align(32 * page, page).unwrap();
    // SAFETY: a non-zero-sized layout.
    let pages = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
    for i in 0..32 {
        // SAFETY: page `i` of the allocation above: zeroed, page-aligned, given to the pool
        // alone, and freed only after the pool is gone (below).
        let b = unsafe { Block::from_raw(pages.add(i * page), 0) };
        pool.give(b).unwrap();
    }
    let heap = quiet_heap(&registry);
    for _ in 0..20 {
        let b = heap.alloc(1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        drop(b);
        heap.flush(); // returns: the worker's claims land
    }
    assert!(
        pool.stats().released > 0,
        "the panicking callback was called"
    );
    assert!(registry.count() <= 64 + 256, "the maximum still holds");
    // A shrinker that panics: the others still run.
    struct Bad;
    impl Shrinker for Bad {
        fn name(&self) -> &str {
            "bad"
        }
        fn count(&self) -> usize {
            1
        }
        fn scan(&self, _: usize) -> usize {
            panic!("scan panics")
        }
    }
    let s: Arc<dyn Shrinker> = Arc::new(Bad);
    registry.add_shrinker(Arc::downgrade(&s));
    drop(heap.alloc(1 << 20).unwrap());
    heap.flush();
    let _ = registry.shrink_all(usize::MAX);
    assert_eq!(
        heap.stats().owner.pages,
        0,
        "the pools were shrunk after it"
    );
    drop((heap, pool, bad, registry));
    // SAFETY: the allocation made above with this layout; the pool that held its pages is
    // gone.
    unsafe { std::alloc::dealloc(pages.as_ptr(), layout) };
}

#[test]
fn a_long_worker_spin_does_not_hold_up_flush_or_drop() {
    let heap = SystemHeap::builder()
        .registry(Registry::new(usize::MAX))
        .pressure(None)
        .worker_spin(Duration::from_secs(60))
        .build()
        .unwrap();
    for _ in 0..3 {
        drop(heap.alloc(64 << 10).unwrap()); // under a chunk: the spinning worker leaves it
        let t = Instant::now();
        heap.flush();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "flush waited for the spin"
        );
        assert_eq!(heap.stats().queued_pages, 0);
    }
    let t = Instant::now();
    drop(heap);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "drop waited for the spin"
    );
}
