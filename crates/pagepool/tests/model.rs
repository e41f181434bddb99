//! Property test: the heap against a simple reference model of its pools.
//!
//! Releases are synchronous here (`deferred(false)`) so that every step is deterministic; the
//! deferred path is tested in `tests/deferred.rs`.
//!
//! The model knows only the documented policy: blocks largest first, each from its pool (LIFO
//! counts suffice) before the system; a released buffer's blocks go back to their pools, then
//! the owner shrinks round robin over its pools (largest order first) to its limit. The thread
//! cache is set to 16 KiB, so it keeps up to four released one-page buffers (a quarter of it is
//! one page), newest taken first, the oldest sent to the pools when a fifth comes, all of them
//! when the heap is shrunk. After every step the heap's statistics must equal the model's, and
//! the accounting invariant must hold: pages from the system = pages pooled + pages in live
//! buffers + pages released + pages in the thread cache.

use pagepool::{Buffer, SystemHeap, page_size, registry::Registry};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    Free(usize),
    Shrink(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            // Small buffers often, so that the thread cache fills, overflows and empties.
            3 => (1usize..3).prop_map(Op::Alloc),
            4 => (1usize..700).prop_map(Op::Alloc),
            3 => any::<usize>().prop_map(Op::Free),
            1 => (0usize..400).prop_map(Op::Shrink),
        ],
        1..100,
    )
}

struct Model {
    orders: Vec<u8>,
    pools: Vec<usize>, // blocks per pool, parallel to `orders`
    cursor: usize,
    limit: usize,
    fresh: u64,
    released: u64,
    hits: u64,
    misses: u64,
    live: Vec<Vec<u8>>, // each live buffer's block orders
    cache: usize,       // one-page buffers in this thread's cache
    cache_hits: u64,
}

/// One-page buffers a 16 KiB thread cache holds.
const CACHE_PAGES: usize = 4;

impl Model {
    fn pooled(&self) -> usize {
        self.pools
            .iter()
            .zip(&self.orders)
            .map(|(n, o)| n << o)
            .sum()
    }
    fn alloc(&mut self, pages: usize) {
        if pages == 1 && self.cache > 0 {
            self.cache -= 1;
            self.cache_hits += 1;
            self.live.push(vec![0]);
            return;
        }
        let mut left = pages;
        let mut blocks = Vec::new();
        for (i, &o) in self.orders.iter().enumerate() {
            let want = left >> o;
            left &= (1 << o) - 1;
            let mut got = want.min(self.pools[i]);
            if got < want {
                got = 0; // a partial set is not taken: the order's blocks all come fresh
            }
            self.pools[i] -= got;
            self.hits += got as u64;
            self.misses += (want - got) as u64;
            self.fresh += ((want - got) << o) as u64;
            blocks.extend(std::iter::repeat_n(o, want));
        }
        self.live.push(blocks);
    }
    fn free(&mut self, idx: usize) {
        let blocks = self.live.swap_remove(idx);
        if blocks == [0] && self.limit > 0 {
            if self.cache == CACHE_PAGES {
                self.cache -= 1;
                self.release(vec![0]);
            }
            self.cache += 1;
            return;
        }
        self.release(blocks);
    }
    fn empty_cache(&mut self) {
        while self.cache > 0 {
            self.cache -= 1;
            self.release(vec![0]);
        }
    }
    fn release(&mut self, blocks: Vec<u8>) {
        for o in blocks {
            let i = self.orders.iter().position(|&x| x == o).unwrap();
            self.pools[i] += 1;
        }
        let pooled = self.pooled();
        if pooled > self.limit {
            self.scan(pooled - self.limit);
        }
    }
    fn scan(&mut self, nr: usize) -> usize {
        let n = self.pools.len();
        let (mut freed, mut idle) = (0, 0);
        while freed < nr && idle < n {
            let i = self.cursor % n;
            self.cursor += 1;
            if self.pools[i] > 0 {
                self.pools[i] -= 1;
                freed += 1 << self.orders[i];
                idle = 0;
            } else {
                idle += 1;
            }
        }
        self.released += freed as u64;
        freed
    }
}

fn check(heap: &SystemHeap, m: &Model, live: &[Buffer]) -> Result<(), TestCaseError> {
    let st = heap.stats();
    for (p, (&o, &n)) in st
        .owner
        .pools
        .iter()
        .rev()
        .zip(m.orders.iter().zip(&m.pools))
    {
        prop_assert_eq!(p.order, o);
        prop_assert_eq!(p.blocks, n, "order {} pool", o);
    }
    prop_assert_eq!(st.pooled_pages(), m.pooled());
    prop_assert_eq!((st.hits, st.misses), (m.hits, m.misses));
    prop_assert_eq!((st.fresh_pages, st.released_pages), (m.fresh, m.released));
    let live_pages: usize = live.iter().map(|b| b.len() / page_size()).sum();
    prop_assert_eq!(st.live_pages, live_pages as u64);
    prop_assert_eq!(
        (st.thread_cached_pages, st.cache_hits),
        (m.cache, m.cache_hits)
    );
    prop_assert_eq!(
        st.fresh_pages,
        (st.pooled_pages() + live_pages + st.thread_cached_pages) as u64 + st.released_pages,
        "accounting invariant"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn heap_matches_model(
        orders in prop_oneof![Just(vec![8u8, 4, 0]), Just(vec![2u8, 0]), Just(vec![5u8, 3, 1, 0])],
        limit in prop_oneof![Just(0usize), 1usize..300, Just(100_000usize)],
        ops in ops(),
    ) {
        let ps = page_size();
        let heap = SystemHeap::builder()
            .orders(&orders)
            .deferred(false)
            .registry(Registry::new(usize::MAX))
            .pool_limit(limit * ps)
            .thread_cache(4 * ps)
            .build()
            .unwrap();
        let mut m = Model {
            orders: orders.clone(),
            pools: vec![0; orders.len()],
            cursor: 0,
            limit,
            fresh: 0,
            released: 0,
            hits: 0,
            misses: 0,
            live: Vec::new(),
            cache: 0,
            cache_hits: 0,
        };
        let mut live: Vec<Buffer> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(pages) => {
                    let mut b = heap.alloc(pages * ps - ps / 2).unwrap();
                    prop_assert_eq!(b.len(), pages * ps);
                    prop_assert!(b.iter().all(|&x| x == 0), "dirty buffer");
                    let expect: Vec<u8> = {
                        m.alloc(pages);
                        m.live.last().unwrap().clone()
                    };
                    prop_assert_eq!(b.blocks().map(|x| x.order).collect::<Vec<_>>(), expect);
                    b.fill(0x5a);
                    live.push(b);
                }
                Op::Free(i) if !live.is_empty() => {
                    let i = i % live.len();
                    drop(live.swap_remove(i));
                    m.free(i);
                }
                Op::Free(_) => {}
                Op::Shrink(n) => {
                    let freed = heap.shrink(n);
                    m.empty_cache();
                    prop_assert_eq!(freed, m.scan(n));
                }
            }
            check(&heap, &m, &live)?;
        }
    }
}
