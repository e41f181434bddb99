//! The system heap end to end: zeroing guarantee, errors, contiguity, limits, teardown.

mod common;
use common::memfd_mappings;
use pagepool::{AllocError, ConfigError, SystemHeap, page_size, registry::Registry};
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn private_heap(name: &str) -> SystemHeap {
    SystemHeap::builder()
        .name(name)
        .registry(Registry::new(usize::MAX))
        .build()
        .unwrap()
}

/// The kernel selftest's check: dirty buffers freed, new ones allocated, every byte zero.
fn dirty_then_check(heap: &SystemHeap, size: usize) {
    let bufs: Vec<_> = (0..32)
        .map(|_| {
            let mut b = heap.alloc(size).unwrap();
            b.fill(0xff);
            b
        })
        .collect();
    drop(bufs);
    let fresh = heap.stats().fresh_pages;
    let again: Vec<_> = (0..32).map(|_| heap.alloc(size).unwrap()).collect();
    let more = heap.stats().fresh_pages - fresh;
    if heap.stats().queue_limit_pages == 0 {
        assert_eq!(
            more,
            0,
            "the second round reused the dirty blocks: {}",
            heap.stats()
        );
    } else {
        // A deferred heap reuses them too, but an allocation that finds a block in the hands
        // of a worker the scheduler does not run (a loaded test machine) takes fresh pages
        // rather than wait: some reuse, not necessarily all.
        let all = 32 * (size / page_size()) as u64;
        assert!(
            more < all,
            "the second round reused dirty blocks: {}",
            heap.stats()
        );
    }
    for b in &again {
        assert!(
            b.iter().all(|&x| x == 0),
            "a reused {size}-byte buffer is not zeroed"
        );
    }
}

#[test]
fn zeroed_after_dirty_free_4k() {
    let heap = private_heap("zero4k");
    dirty_then_check(&heap, 4096);
}

#[test]
fn zeroed_after_dirty_free_1m() {
    let heap = private_heap("zero1m");
    dirty_then_check(&heap, 1 << 20);
    let sync = SystemHeap::builder()
        .name("zero1m-sync")
        .registry(Registry::new(usize::MAX))
        .deferred(false)
        .build()
        .unwrap();
    dirty_then_check(&sync, 1 << 20);
}

#[test]
fn zeroed_random_sizes_four_threads() {
    let heap = std::sync::Arc::new(private_heap("zero-mt"));
    // Joined threads, not scoped ones: a scope can end before the threads' thread-local
    // destructors (which give their small-buffer caches back) have run.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let heap = heap.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(t);
                let mut live = Vec::new();
                for i in 0..2600 {
                    let len = rng.random_range(1..=(if i % 50 == 0 { 3 << 20 } else { 300_000 }));
                    let mut b = heap.alloc(len).unwrap();
                    assert!(b.len() >= len && b.len().is_multiple_of(page_size()));
                    assert!(
                        b.iter().all(|&x| x == 0),
                        "thread {t} alloc {i}: dirty memory"
                    );
                    b.fill(0xa5 ^ t as u8);
                    live.push(b);
                    if live.len() > 8 {
                        live.swap_remove(rng.random_range(0..live.len()));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    heap.flush();
    let st = heap.stats();
    assert_eq!(st.allocs, 4 * 2600);
    assert_eq!(st.live_buffers, 0);
    assert!(st.cache_hits > 0, "small buffers came from thread caches");
    assert_eq!(
        st.thread_cached_pages, 0,
        "exited threads gave their caches back"
    );
    assert_eq!(
        st.fresh_pages,
        st.pooled_pages() as u64 + st.released_pages,
        "every page from the system is pooled or released"
    );
}

#[test]
fn bad_lengths_are_errors() {
    let heap = SystemHeap::builder()
        .registry(Registry::new(usize::MAX))
        .max_buffer(1 << 20)
        .build()
        .unwrap();
    assert!(matches!(heap.alloc(0), Err(AllocError::ZeroLength)));
    assert!(matches!(
        heap.alloc((1 << 20) + 1),
        Err(AllocError::TooLarge { len, max }) if len == (1 << 20) + 1 && max == 1 << 20
    ));
    assert!(matches!(
        heap.alloc(usize::MAX),
        Err(AllocError::TooLarge { .. })
    ));
    let big = SystemHeap::builder()
        .registry(Registry::new(usize::MAX))
        .max_buffer(usize::MAX)
        .build()
        .unwrap();
    // Beyond the address space: refused by the OS, reported, nothing leaked.
    let e = big.alloc(isize::MAX as usize / 2).unwrap_err();
    assert!(matches!(e, AllocError::Os(_)), "{e}");
    assert!(!e.to_string().is_empty());
    let st = big.stats();
    assert_eq!((st.live_buffers, st.fresh_pages, st.arenas), (0, 0, 0));
    assert_eq!(heap.stats().allocs, 0);
}

#[test]
fn bad_configurations_are_errors() {
    let b = || SystemHeap::builder().registry(Registry::new(1));
    assert_eq!(b().orders(&[]).build().unwrap_err(), ConfigError::NoOrders);
    assert_eq!(
        b().orders(&[4]).build().unwrap_err(),
        ConfigError::MissingOrderZero
    );
    assert_eq!(
        b().orders(&[0, 11]).build().unwrap_err(),
        ConfigError::OrderTooLarge { order: 11, max: 10 }
    );
    assert_eq!(
        b().orders(&[0, 4, 4]).build().unwrap_err(),
        ConfigError::DuplicateOrder(4)
    );
    assert_eq!(
        b().max_buffer(0).build().unwrap_err(),
        ConfigError::ZeroMaxBuffer
    );
    assert!(matches!(
        b().arena_size(4096).build().unwrap_err(),
        ConfigError::ArenaTooSmall { .. }
    ));
}

#[test]
fn buffers_are_built_largest_block_first() {
    let heap = private_heap("plan");
    let b = heap.alloc((1 << 20) + (64 << 10) + 3 * 4096 + 1).unwrap();
    let orders: Vec<u8> = b.blocks().map(|x| x.order).collect();
    assert_eq!(orders, [8, 4, 0, 0, 0, 0]);
    let offsets: Vec<usize> = b.blocks().map(|x| x.offset).collect();
    assert_eq!(offsets[1], 1 << 20);
    assert_eq!(b.len(), (1 << 20) + (64 << 10) + 4 * 4096);
    assert_eq!(b.as_ptr() as usize % page_size(), 0);
    assert!(!b.is_remapped(), "fresh blocks are carved end to end");
}

#[test]
fn same_size_reuse_needs_no_mapping() {
    let heap = private_heap("reuse");
    let b = heap.alloc(8 << 20).unwrap();
    let p = b.as_ptr();
    drop(b);
    heap.flush();
    let b = heap.alloc(8 << 20).unwrap();
    assert_eq!(
        b.as_ptr(),
        p,
        "the same blocks, in the same order, at the same place"
    );
    assert!(!b.is_remapped());
    let st = heap.stats();
    assert_eq!((st.hits, st.misses, st.remapped), (8, 8, 0));
}

#[test]
fn scattered_blocks_are_mapped_contiguously() {
    let heap = private_heap("scatter");
    let a = heap.alloc(4096).unwrap();
    let gap = heap.alloc(4096).unwrap();
    let c = heap.alloc(4096).unwrap();
    let (pa, pc) = (a.as_ptr(), c.as_ptr());
    drop(a);
    drop(c); // pool (LIFO): c, a, with a hole between them
    heap.flush();
    let mut both = heap.alloc(8192).unwrap();
    assert!(both.is_remapped());
    assert_ne!(both.as_ptr(), pa);
    assert_ne!(both.as_ptr(), pc);
    assert!(both.iter().all(|&x| x == 0));
    both.fill(7);
    drop(both);
    heap.flush(); // pooled before gap (a release may be zeroed at once, ahead of the queue)
    drop(gap);
    heap.flush();
    // The blocks went back zeroed. The pool's top is gap (released last), then a or c: either
    // lies end to end with gap once sorted by address, so the next 8 KiB buffer needs no view.
    let again = heap.alloc(8192).unwrap();
    assert!(again.iter().all(|&x| x == 0));
    assert!(!again.is_remapped());
    assert_eq!(heap.stats().remapped, 1);
}

/// A heap of its own (about regathering, not the busy machine: the tests beside it load this
/// one) and five live 1 MiB buffers from it, end to end.
fn five_blocks(name: &str) -> (SystemHeap, Vec<Option<pagepool::Buffer>>) {
    let heap = SystemHeap::builder()
        .name(name)
        .registry(Registry::new(usize::MAX))
        .load_check(false)
        .build()
        .unwrap();
    let b = (0..5).map(|_| Some(heap.alloc(1 << 20).unwrap())).collect();
    (heap, b)
}

/// Drops buffers 0, 2 and 4 of [`five_blocks`] and waits until they are pooled: three pooled
/// blocks with live ones between them, so that a 3 MiB buffer made of them needs a view.
fn free_every_other(heap: &SystemHeap, b: &mut [Option<pagepool::Buffer>]) {
    for i in [0, 2, 4] {
        b[i] = None;
    }
    heap.flush();
}

/// How long a test waits for scattered allocations to be counted while the machine looks
/// busy: each time the worker is found late (other tests keep both cores busy) the count stands
/// still for a hold of up to a second, and a run of the whole workspace's tests can keep the
/// machine busy for several seconds. (A bound of 400 rounds failed once in ~14 such runs, and
/// 3 times of 3 beside three busy loops on two cores, where these tests take 5-9 s.)
fn busy_deadline() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(60)
}

#[test]
fn a_set_that_stays_scattered_is_taken_fresh_once() {
    // Three pooled 1 MiB blocks with live ones between them: every 3 MiB buffer made of them
    // needs a view, and they come back to the pool as they were.
    let (heap, mut b) = five_blocks("regather");
    free_every_other(&heap, &mut b);
    let fresh = heap.stats().fresh_pages;
    for k in 1..=7 {
        let buf = heap.alloc(3 << 20).unwrap();
        assert!(buf.is_remapped(), "allocation {k}: scattered");
        drop(buf);
        heap.flush();
    }
    assert_eq!(heap.stats().remapped, 7);
    // The eighth in a row takes fresh pages as one range instead (a later one if the machine
    // looks busy meanwhile: the worker was found late, and fresh pages cost most then); from
    // then on the fresh set, pooled, makes every 3 MiB buffer without a view.
    let mut k = 8;
    let deadline = busy_deadline();
    loop {
        let buf = heap.alloc(3 << 20).unwrap();
        if !buf.is_remapped() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "allocation {k}: still scattered"
        );
        k += 1;
        drop(buf);
        heap.flush();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let views = heap.stats().remapped;
    for k in k..=k + 12 {
        let mut buf = heap.alloc(3 << 20).unwrap();
        assert!(!buf.is_remapped(), "allocation {k}: end to end");
        assert!(buf.iter().all(|&x| x == 0));
        buf.fill(1);
        drop(buf);
        heap.flush();
    }
    let st = heap.stats();
    assert_eq!(st.remapped, views);
    assert_eq!(st.fresh_pages - fresh, (3 << 20) / page_size() as u64);
    drop(b);
}

#[test]
fn a_scattered_set_taking_turns_with_a_whole_one_is_replaced_once() {
    // A whole 3 MiB set and a scattered one (pooled 1 MiB blocks with live ones between
    // them), both in circulation: each round takes the whole one, then the scattered one
    // (a view). Whole allocations in between do not keep the scattered set from being
    // replaced: it is taken fresh once, as one range, and its blocks go back to the system.
    let (heap, mut b) = five_blocks("turns");
    let whole = heap.alloc(3 << 20).unwrap();
    assert!(!whole.is_remapped());
    drop(whole);
    free_every_other(&heap, &mut b);
    let before = heap.stats();
    let mut rounds = 0;
    let deadline = busy_deadline();
    loop {
        let w = heap.alloc(3 << 20).unwrap();
        let s = heap.alloc(3 << 20).unwrap();
        assert!(!w.is_remapped(), "round {rounds}: the whole set");
        let scattered = s.is_remapped();
        assert!(w.iter().all(|&x| x == 0) && s.iter().all(|&x| x == 0));
        drop((w, s));
        heap.flush();
        if !scattered {
            break;
        }
        rounds += 1;
        // Later if the machine looks busy meanwhile (the worker found late: the count stands
        // still then), as in the test above.
        assert!(
            std::time::Instant::now() < deadline,
            "still scattered after {rounds} rounds"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        rounds >= 7,
        "views are not replaced at once: {rounds} rounds"
    );
    let after = heap.stats();
    let pages = ((3 << 20) / page_size()) as u64;
    assert_eq!(
        after.fresh_pages - before.fresh_pages,
        pages,
        "one fresh set"
    );
    assert_eq!(
        after.released_pages - before.released_pages,
        pages,
        "the scattered blocks went back to the system"
    );
    // Every block that left a pool went to a buffer (a hit) or to the system (a release).
    let taken: u64 = after.owner.pools.iter().map(|p| p.taken).sum();
    let released: u64 = after.owner.pools.iter().map(|p| p.released).sum();
    assert_eq!(taken, after.hits + released, "{after}");
    // From then on, both sets are whole.
    for k in 0..10 {
        let w = heap.alloc(3 << 20).unwrap();
        let s = heap.alloc(3 << 20).unwrap();
        assert!(!w.is_remapped() && !s.is_remapped(), "round {k} after");
        drop((w, s));
        heap.flush();
    }
    drop(b);
}

#[test]
fn owner_limits_are_separate() {
    let registry = Registry::new(usize::MAX);
    let small = SystemHeap::builder()
        .name("small")
        .registry(registry.clone())
        .pool_limit(2 << 20)
        .build()
        .unwrap();
    let big = SystemHeap::builder()
        .name("big")
        .registry(registry.clone())
        .pool_limit(64 << 20)
        .build()
        .unwrap();
    drop(big.alloc(16 << 20).unwrap());
    drop(small.alloc(8 << 20).unwrap());
    big.flush();
    small.flush();
    let (s, b) = (small.stats(), big.stats());
    assert!(
        s.pooled_pages() * page_size() <= 2 << 20,
        "small shrank to its limit"
    );
    assert_eq!(
        b.pooled_pages() * page_size(),
        16 << 20,
        "big was not touched"
    );
    assert_eq!(s.other_owners_pages, b.pooled_pages());
    assert_eq!(registry.count(), s.pooled_pages() + b.pooled_pages());
    let table = registry.stats().to_string();
    assert!(table.contains("small") && table.contains("big") && table.contains(" of "));
}

#[test]
fn global_maximum_bounds_all_owners() {
    let registry = Registry::new((4 << 20) / page_size());
    let heap = SystemHeap::builder()
        .registry(registry.clone())
        .build()
        .unwrap();
    drop(heap.alloc(16 << 20).unwrap());
    heap.flush();
    assert!(registry.count() * page_size() <= 4 << 20);
    assert!(heap.stats().released_pages > 0);
}

#[test]
fn shrink_and_trim() {
    let heap = private_heap("shrink");
    drop(heap.alloc(4 << 20).unwrap());
    heap.flush();
    assert_eq!(heap.stats().pooled_pages(), 1024);
    assert_eq!(heap.shrink(1), 256, "one whole 1 MiB block");
    assert_eq!(heap.trim(), 768);
    let st = heap.stats();
    assert_eq!(
        (st.pooled_pages(), st.released_pages, st.arenas),
        (0, 1024, 0)
    );
}

#[test]
fn pooling_off_gives_fresh_pages_every_time() {
    let heap = SystemHeap::builder()
        .registry(Registry::new(usize::MAX))
        .pool_limit(0)
        .build()
        .unwrap();
    for _ in 0..3 {
        let mut b = heap.alloc(1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        b.fill(1);
    }
    let st = heap.stats();
    assert_eq!(
        (st.hits, st.misses, st.fresh_pages, st.released_pages),
        (0, 3, 768, 768)
    );
    assert_eq!(st.zeroed_sync, 0, "nothing to zero when nothing is pooled");
}

#[test]
fn dropping_the_heap_returns_everything_and_live_buffers_stay_valid() {
    let heap = private_heap("teardown");
    drop(heap.alloc(2 << 20).unwrap());
    let mut live = heap.alloc(1 << 20).unwrap();
    assert!(memfd_mappings("teardown") > 0);
    drop(heap);
    assert!(live.iter().all(|&x| x == 0));
    live.fill(3);
    assert_eq!(live[12345], 3);
    drop(live);
    assert_eq!(memfd_mappings("teardown"), 0, "every arena unmapped");
}

#[test]
fn stats_serialise_and_render() {
    let heap = private_heap("stats");
    let b = heap.alloc(3 << 20).unwrap();
    drop(b);
    heap.flush();
    let st = heap.stats();
    let json = serde_json::to_string(&st).unwrap();
    let back: pagepool::HeapStats = serde_json::from_str(&json).unwrap();
    assert_eq!(back, st);
    let text = st.to_string();
    assert!(text.contains("---")); // header
    assert!(text.contains("stats :"));
    assert!(text.contains("in other owners' pools"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("stats") && l.contains("768"))
    );
}

#[test]
fn a_failed_export_gives_the_buffer_back() {
    let heap = private_heap("export");
    let page = page_size();
    let len = (1 << 20) + 3 * page;
    let mut b = heap.alloc(len).unwrap();
    let (ptr, blocks): (_, Vec<_>) = (b.as_ptr(), b.blocks().collect());
    b[..5].copy_from_slice(b"hello");
    let exported = b.export();
    if std::path::Path::new(pagepool::dmabuf::UDMABUF_PATH).exists() {
        // A machine with /dev/udmabuf (the VM suite checks this path fully).
        let x = exported.unwrap();
        assert_eq!(x.dmabuf().len(), len);
        let mut head = [0; 5];
        x.read(0, &mut head).unwrap();
        assert_eq!(&head, b"hello");
        return;
    }
    let e = exported.unwrap_err();
    assert!(e.to_string().contains("/dev/udmabuf"), "{e}");
    assert!(
        matches!(e.error(), pagepool::dmabuf::DmaBufError::NoHeap { .. }),
        "{e:?}"
    );
    assert!(std::error::Error::source(&e).is_some());
    assert_eq!(heap.stats().exported, 0);
    // The same buffer, untouched: its memory, blocks and contents.
    let mut b = e.into_buffer();
    assert_eq!((b.as_ptr(), b.len()), (ptr, len));
    assert_eq!(b.blocks().collect::<Vec<_>>(), blocks);
    assert_eq!(&b[..5], b"hello");
    assert!(b[5..].iter().all(|&x| x == 0), "no longer zeroed");
    b.fill(0xab);
    // Dropped normally: back to the pools, not to the system.
    let before = heap.stats();
    drop(b);
    heap.flush();
    let st = heap.stats();
    assert_eq!(st.exports_held_at_release, 0);
    assert_eq!(st.released_pages, before.released_pages);
    assert_eq!(st.pooled_pages(), before.pooled_pages() + len / page);
    assert_eq!(st.live_buffers, 0);
    assert!(heap.alloc(len).unwrap().iter().all(|&x| x == 0));
}

#[test]
fn a_failed_export_of_a_fresh_buffer_leaves_it_zeroed() {
    let heap = private_heap("export-zeroed");
    let Err(e) = heap.alloc(64 << 10).unwrap().export() else {
        return; // a machine with /dev/udmabuf
    };
    let (b, err) = e.into_parts();
    assert!(err.to_string().contains("/dev/udmabuf"), "{err}");
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn a_partial_set_of_blocks_is_not_mixed_with_fresh_ones() {
    // Synchronous releases: a deferred heap skips this rule while its worker is found late
    // (fresh pages cost most on a busy machine), which a loaded test machine can trigger.
    let heap = SystemHeap::builder()
        .name("partial")
        .registry(Registry::new(usize::MAX))
        .deferred(false)
        .build()
        .unwrap();
    drop(heap.alloc(4 << 20).unwrap());
    heap.flush();
    // One of the four 1 MiB blocks goes back to the system: three stay pooled.
    assert_eq!(heap.shrink(256), 256);
    let before = heap.stats();
    assert_eq!(before.pooled_pages(), 768);
    let b = heap.alloc(4 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert!(!b.is_remapped(), "all four fresh, as one range: no view");
    let st = heap.stats();
    assert_eq!(st.misses - before.misses, 4, "the whole order fresh");
    assert_eq!(st.hits, before.hits, "no pooled block taken");
    assert_eq!(st.pooled_pages(), 768, "the partial set stays pooled");
    drop(b);
    heap.flush();
    // Seven blocks now: the next two buffers are each end to end (one set each).
    let (x, y) = (heap.alloc(4 << 20).unwrap(), heap.alloc(3 << 20).unwrap());
    assert!(!x.is_remapped() && !y.is_remapped());
}
