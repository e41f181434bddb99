//! The mapping count stays bounded whatever the allocation pattern (alone in its binary, so
//! that no other test's mappings come and go meanwhile). Counted as this heap's mappings of
//! its memfds (arenas' home mappings and views; each arena's guard page is one more by
//! construction), so that what a sanitizer's runtime maps meanwhile does not count.

mod common;

use pagepool::{SystemHeap, registry::Registry, stats::mapping_count};
use rand::{RngExt, SeedableRng, rngs::StdRng};

#[test]
fn mapping_count_bounded_after_100k_mixed_allocations() {
    let heap = SystemHeap::builder()
        .name("mappings")
        .registry(Registry::new(usize::MAX))
        .pool_limit(64 << 20)
        .pressure(None) // no monitor thread whose first malloc could map an arena mid-test
        .build()
        .unwrap();
    // Taken after the heap exists: its worker thread's stack is a mapping of its own. One
    // allocation first, for the worker's malloc arena.
    drop(heap.alloc(1).unwrap());
    heap.flush();
    heap.trim();
    assert!(mapping_count().unwrap() > 0, "the process's count reads");
    let baseline = common::memfd_mappings("mappings");
    let mut rng = StdRng::seed_from_u64(42);
    let mut live = Vec::new();
    let mut worst = 0;
    for i in 0..100_000 {
        let len = match rng.random_range(0..10) {
            0 => rng.random_range(1..=4 << 20),
            1..=3 => rng.random_range(1..=256 << 10),
            _ => rng.random_range(1..=24 << 10),
        };
        let b = heap.alloc(len).unwrap();
        live.push(b);
        if live.len() > 24 || rng.random_range(0..3) == 0 {
            live.swap_remove(rng.random_range(0..live.len()));
        }
        if i % 1000 == 0 {
            let maps = common::memfd_mappings("mappings") - baseline;
            // The documented bound: two mappings per arena (the arena and its guard page), plus
            // one per run of blocks of each live buffer that needed a view; without the guard
            // pages, one per arena.
            let arenas = heap.stats().arenas;
            let views: usize = live
                .iter()
                .filter(|b| b.is_remapped())
                .map(|b| b.blocks().count())
                .sum();
            assert!(
                maps <= arenas + views,
                "{maps} memfd mappings > {arenas} + {views}"
            );
            worst = worst.max(maps);
        }
    }
    let st = heap.stats();
    assert!(
        st.remapped > 1000,
        "the pattern exercised views: {}",
        st.remapped
    );
    assert!(worst < 500, "mapping count stayed small: worst {worst}");
    drop(live);
    heap.flush();
    heap.trim();
    assert_eq!(heap.stats().arenas, 0);
    assert_eq!(
        common::memfd_mappings("mappings"),
        baseline,
        "nothing left mapped after trim"
    );
    println!("worst extra mappings {worst}; {st}");
}
