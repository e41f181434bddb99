//! Deferred freeing: the worker zeroes, the releasing thread does not; flush; the queue bound;
//! inline zeroing; teardown with queued and live buffers.

mod common;
use common::memfd_mappings;
use pagepool::{SystemHeap, page_size, registry::Registry};
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn heap(name: &str, queue_limit: usize) -> SystemHeap {
    SystemHeap::builder()
        .name(name)
        .registry(Registry::new(usize::MAX))
        .queue_limit(queue_limit)
        .worker_spin(std::time::Duration::ZERO) // an idle worker sleeps at once
        .worker_naps(std::time::Duration::ZERO)
        .thread_cache(0) // small releases go to the worker's queue too
        // These tests are about the worker: the other tests running beside them load the
        // machine, which would keep releases synchronous (see `HeapBuilder::load_check`).
        .load_check(false)
        .build()
        .unwrap()
}

#[test]
fn release_queues_and_the_worker_zeroes() {
    let heap = heap("deferred-release", 64 << 20);
    let mut b = heap.alloc(32 << 20).unwrap();
    b.fill(0xee);
    drop(b);
    heap.flush();
    let st = heap.stats();
    assert_eq!(st.zeroed_sync, 0, "the releasing thread zeroed nothing");
    assert_eq!(st.zeroed_worker, 32, "the worker zeroed every 1 MiB block");
    assert_eq!(
        (st.queued_pages, st.pooled_pages()),
        (0, 8192),
        "flush drained the queue"
    );
    assert!(st.worker_bytes_per_sec() > 0.0);
    assert_eq!(st.worker_bytes, 32 << 20);
    assert_eq!(st.caller_zeroed_bytes, 0);
    assert_eq!(st.worker_share(), Some(1.0));
    let again = heap.alloc(32 << 20).unwrap();
    assert!(again.iter().all(|&x| x == 0));
    // A pooled buffer is handed out as it is: nothing more was zeroed, by anyone.
    let st = heap.stats();
    assert_eq!((st.worker_bytes, st.caller_zeroed_bytes), (32 << 20, 0));
}

#[test]
fn allocation_reuses_queued_blocks_instead_of_fresh_pages() {
    let heap = heap("deferred-inline", 64 << 20);
    drop(heap.alloc(4096).unwrap());
    let fresh = heap.stats().fresh_pages;
    for i in 0..1000u32 {
        let mut b = heap.alloc(4096).unwrap();
        assert!(b.iter().all(|&x| x == 0), "iteration {i}");
        b.fill(i as u8 | 1);
    }
    heap.flush();
    let st = heap.stats();
    assert_eq!(
        st.fresh_pages, fresh,
        "never fresh pages while dirty ones were queued"
    );
    assert_eq!(st.hits + st.zeroed_inline, 1000);
    assert!(
        st.zeroed_inline > 0,
        "small releases do not wake the worker: {st}"
    );
}

#[test]
fn zeroed_with_worker_and_four_threads() {
    let heap = heap("deferred-mt", 16 << 20);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let heap = &heap;
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + t);
                let mut live = Vec::new();
                for i in 0..2500 {
                    let len = rng.random_range(1..=(if i % 40 == 0 { 4 << 20 } else { 200_000 }));
                    let mut b = heap.alloc(len).unwrap();
                    assert!(b.iter().all(|&x| x == 0), "thread {t} alloc {i}: dirty");
                    b.fill(0xc3);
                    live.push(b);
                    if live.len() > 6 {
                        live.swap_remove(rng.random_range(0..live.len()));
                    }
                }
            });
        }
    });
    heap.flush();
    let st = heap.stats();
    assert_eq!(st.live_buffers, 0);
    assert_eq!(st.queued_pages, 0);
    assert_eq!(
        st.fresh_pages,
        st.pooled_pages() as u64 + st.released_pages,
        "every page is pooled or released"
    );
    // Four allocating threads on a machine of few cores keep it busy: the worker may be found
    // late for the whole run, and releases then zero their own buffers (`zeroed_sync`) rather
    // than queue for it. Whichever way, blocks were zeroed again and reused.
    assert!(
        st.zeroed_worker + st.zeroed_inline + st.zeroed_sync > 0,
        "{st}"
    );
    // Once the load stops, releases go back to the worker: within the longest hold (a multiple
    // of what this machine measured, `pagepool::stats::tempo`) and 2 s more.
    let longest = pagepool::stats::tempo().late_hold_max() + std::time::Duration::from_secs(2);
    let t = std::time::Instant::now();
    loop {
        let before = heap.stats().zeroed_worker;
        drop(heap.alloc(1 << 20).unwrap());
        heap.flush();
        if heap.stats().zeroed_worker > before {
            break;
        }
        assert!(
            t.elapsed() < longest,
            "the worker never zeroed a release once the load stopped: {}",
            heap.stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn release_flood_never_passes_the_queue_bound() {
    let limit = 4 << 20;
    let heap = heap("deferred-flood", limit);
    std::thread::scope(|s| {
        for _ in 0..4 {
            let heap = &heap;
            s.spawn(move || {
                for _ in 0..40 {
                    let burst: Vec<_> = (0..8).map(|_| heap.alloc(1 << 20).unwrap()).collect();
                    drop(burst); // 8 MiB released at once, from 4 threads
                }
            });
        }
    });
    let st = heap.stats();
    let bound = limit / page_size();
    assert_eq!(st.queue_limit_pages, bound);
    assert!(
        st.peak_queued_pages <= bound,
        "peak {} > bound {bound}",
        st.peak_queued_pages
    );
    assert!(st.queue_refused > 0, "the flood reached the bound");
    heap.flush();
    let st = heap.stats();
    assert!(
        st.zeroed_sync > 0,
        "past the bound, releasing threads zeroed"
    );
    assert_eq!(st.fresh_pages, st.pooled_pages() as u64 + st.released_pages);
}

#[test]
fn shrinking_everything_returns_queued_and_pooled_memory() {
    let registry = Registry::new(usize::MAX);
    let heap = SystemHeap::builder()
        .registry(registry.clone())
        .build()
        .unwrap();
    for _ in 0..4 {
        let bufs: Vec<_> = (0..4).map(|_| heap.alloc(2 << 20).unwrap()).collect();
        drop(bufs);
    }
    let freed = registry.shrink_all(usize::MAX);
    heap.flush();
    // Whatever the worker had claimed when the scan ran landed in the pools afterwards.
    let freed = freed + registry.shrink_all(usize::MAX);
    let st = heap.stats();
    assert_eq!(st.pooled_pages(), 0);
    assert_eq!(st.queued_pages, 0);
    assert_eq!(st.released_pages, st.fresh_pages);
    assert_eq!(freed as u64, st.fresh_pages);
    assert_eq!(registry.count_all(), 0);
}

#[test]
fn dropping_the_heap_with_queued_and_live_buffers() {
    let heap = heap("deferred-teardown", 64 << 20);
    let mut live = heap.alloc(3 << 20).unwrap();
    for _ in 0..5 {
        drop(heap.alloc(8 << 20).unwrap()); // queued, maybe being zeroed
    }
    drop(heap); // stops the worker, releases queued and pooled memory
    assert!(live.iter().all(|&x| x == 0));
    live.fill(9);
    assert!(live.iter().all(|&x| x == 9), "a live buffer stays valid");
    assert!(memfd_mappings("deferred-teardown") > 0);
    drop(live);
    assert_eq!(
        memfd_mappings("deferred-teardown"),
        0,
        "nothing left mapped"
    );
}

#[test]
fn synchronous_release_when_deferred_is_off() {
    let heap = SystemHeap::builder()
        .registry(Registry::new(usize::MAX))
        .deferred(false)
        .build()
        .unwrap();
    assert_eq!(heap.stats().queue_limit_pages, 0, "no queue");
    drop(heap.alloc(2 << 20).unwrap());
    let st = heap.stats();
    assert_eq!(
        (st.zeroed_sync, st.zeroed_worker, st.queue_limit_pages),
        (2, 0, 0)
    );
    assert_eq!(st.pooled_pages(), 512, "pooled before drop returned");
    assert_eq!(
        (st.caller_zeroed_bytes, st.worker_bytes),
        (2 << 20, 0),
        "the releasing thread zeroed the buffer, once"
    );
    assert_eq!(st.worker_share(), Some(0.0));
}

/// Waits up to 10 s for `done`.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(10) {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    false
}

#[test]
fn a_napping_worker_finds_small_releases_without_a_wake_up() {
    // A 4 KiB release is below a chunk: it never wakes a sleeping worker (with no naps, the
    // page would stay queued until a flush or an allocation takes it). A napping worker looks
    // at the queue by itself.
    let napper = SystemHeap::builder()
        .name("deferred-napper")
        .registry(Registry::new(usize::MAX))
        .worker_spin(std::time::Duration::ZERO)
        .worker_naps(std::time::Duration::from_secs(30))
        .thread_cache(0)
        // This tests the worker's naps: other tests beside it load the machine.
        .load_check(false)
        .build()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100)); // the worker is idle by now
    // On a loaded machine (other tests run beside this one) the nice-19 worker may be late on
    // its naps; releases then zero their pages themselves (refusals) for a hold (up to 1 s) and
    // until the worker runs on time again. Retry for up to 5 s until one is queued.
    let (mut queued, mut refused, mut busy_seen) = (false, 0, false);
    let before = napper.stats();
    for _ in 0..250 {
        busy_seen |= common::cores_oversubscribed();
        let r = napper.stats().queue_refused;
        let mut b = napper.alloc(page_size()).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        b.fill(0xa5);
        drop(b);
        if napper.stats().queue_refused == r {
            queued = true;
            break;
        }
        refused += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if !queued {
        // Under a load that never lets the nice-19 worker run (other programs keep every core
        // busy for all 5 s), no release is ever queued: that is the heap's busy-machine
        // behaviour, checked instead. On a machine with idle cores it is a failure.
        assert!(
            busy_seen,
            "no release was queued in 5 s, and the machine never looked busy"
        );
        let st = napper.stats();
        assert_eq!(st.queue_refused - before.queue_refused, refused);
        assert_eq!(
            st.zeroed_sync - before.zeroed_sync,
            refused,
            "each zeroed by its release"
        );
        assert_eq!(st.zeroed_worker, 0);
        return;
    }
    // Its count and the pool's are two counters: wait for both (the pool's may come a moment
    // before the worker's, never the other way round).
    assert!(
        eventually(|| {
            let st = napper.stats();
            st.zeroed_worker == 1 && st.pooled_pages() >= 1
        }),
        "the napping worker zeroed and pooled the page without flush or a wake-up: {}",
        napper.stats()
    );
}
