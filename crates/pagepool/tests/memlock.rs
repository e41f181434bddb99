//! A locked heap under `RLIMIT_MEMLOCK` (without `CAP_IPC_LOCK`) serves every allocation that
//! fits the limit: it uses pooled blocks and locks only what is missing, gives back pooled
//! memory of other sizes before it refuses, keeps serving from the pool after the limit is
//! lowered below what it holds, and a refusal changes nothing. Each case runs in a child
//! process of its own, the limit being process-wide.

mod child;

use pagepool::{AllocError, PoolType, SystemHeap, registry::Registry};

const MIB: usize = 1 << 20;

/// The entry of the child cases (does nothing in a normal run).
#[test]
fn entry() {
    let Some(case) = child::case() else {
        return;
    };
    match case.as_str() {
        "pooled-and-fresh-sync" => pooled_and_fresh(false),
        "pooled-and-fresh-deferred" => pooled_and_fresh(true),
        "other-sizes-give-way-sync" => other_sizes_give_way(false),
        "other-sizes-give-way-deferred" => other_sizes_give_way(true),
        "lowered-limit" => lowered_limit(),
        "refusal-changes-nothing" => refusal_changes_nothing(),
        other => panic!("unknown case {other}"),
    }
    println!("case {case} done");
}

fn locked_heap(deferred: bool) -> SystemHeap {
    SystemHeap::builder()
        .name("memlock")
        .pool_type(PoolType::SYSTEM.locked())
        .deferred(deferred)
        .pool_limit(64 * MIB)
        .registry(Registry::new(usize::MAX / 2))
        .load_check(false)
        .pressure(None)
        .build()
        .unwrap()
}

/// Drops `CAP_IPC_LOCK`, sets the limit to what is locked now plus `bytes`, and returns the
/// limit. (Without `CAP_SYS_RESOURCE` the hard limit cannot be raised: `bytes` stays within
/// the usual default of 8 MiB.)
fn limit_to(bytes: u64) -> u64 {
    child::drop_ipc_lock();
    let limit = child::status_bytes("VmLck") + bytes;
    child::set_memlock(limit);
    limit
}

#[test]
fn pooled_blocks_serve_what_they_can_and_only_the_rest_is_locked() {
    child::run("entry", "pooled-and-fresh-sync");
    child::run("entry", "pooled-and-fresh-deferred");
}

/// 3 MiB pooled and 3 MiB live under an 8 MiB limit: a 4 MiB buffer takes the three pooled
/// blocks and locks one fresh MiB (a view over both), rather than 4 fresh MiB that do not fit.
fn pooled_and_fresh(deferred: bool) {
    let limit = limit_to(8 * MIB as u64);
    let heap = locked_heap(deferred);
    let live = heap.alloc(3 * MIB).unwrap();
    drop(heap.alloc(3 * MIB).unwrap());
    heap.flush();
    assert_eq!(heap.stats().pooled_pages(), 768);
    let before = heap.stats();
    let mut buf = heap
        .alloc(4 * MIB)
        .unwrap_or_else(|e| panic!("4 MiB fits beside 6 MiB under {limit}: {e}"));
    assert!(buf.iter().all(|&b| b == 0));
    buf.fill(3);
    let s = heap.stats();
    assert_eq!(
        s.fresh_pages - before.fresh_pages,
        256,
        "one fresh MiB: {s}"
    );
    assert_eq!(s.hits - before.hits, 3, "{s}");
    assert_eq!(s.released_pages, 0, "nothing given back: {s}");
    assert!(child::status_bytes("VmLck") <= limit);
    drop((buf, live));
    heap.flush();
    assert_eq!(heap.stats().pooled_pages(), 7 * 256);
}

#[test]
fn pooled_memory_of_other_sizes_is_given_back_before_a_refusal() {
    child::run("entry", "other-sizes-give-way-sync");
    child::run("entry", "other-sizes-give-way-deferred");
}

/// 6.25 MiB of pooled 64 KiB blocks and nothing live under an 8 MiB limit: a 4 MiB buffer
/// needs 4 fresh MiB, so at least 2.25 MiB of the pooled blocks go back to the system first,
/// counted as reclaimed and released.
fn other_sizes_give_way(deferred: bool) {
    let limit = limit_to(8 * MIB as u64);
    let heap = locked_heap(deferred);
    let small: Vec<_> = (0..100).map(|_| heap.alloc(64 << 10).unwrap()).collect();
    drop(small);
    heap.flush();
    assert_eq!(heap.stats().pooled_pages(), 1600);
    let mut buf = heap
        .alloc(4 * MIB)
        .unwrap_or_else(|e| panic!("4 MiB fits under {limit} once the pool gives way: {e}"));
    assert!(buf.iter().all(|&b| b == 0));
    buf.fill(1);
    let s = heap.stats();
    assert!(s.reclaimed_pages >= 576, "2.25 MiB reclaimed: {s}");
    assert!(s.released_pages >= s.reclaimed_pages, "{s}");
    assert_eq!(s.pooled_pages() as u64, 1600 - s.released_pages, "{s}");
    assert!(
        s.to_string().contains("reclaimed for allocations"),
        "the table says so: {s}"
    );
    assert!(child::status_bytes("VmLck") <= limit);
    // What cannot fit even with the pool given back is refused, and the pool is as it was.
    let before = heap.stats();
    let e = heap.alloc(8 * MIB).unwrap_err();
    assert!(matches!(e, AllocError::MemlockLimit { .. }), "{e:?}");
    let after = heap.stats();
    assert_eq!(after.pooled_pages(), before.pooled_pages(), "{after}");
    assert_eq!(after.reclaimed_pages, before.reclaimed_pages, "{after}");
    assert_eq!(after.fresh_pages, before.fresh_pages);
    assert_eq!(after.live_buffers, 1);
}

#[test]
fn after_the_limit_is_lowered_the_pool_keeps_serving() {
    child::run("entry", "lowered-limit");
}

/// Three pooled 1 MiB blocks with live ones between them, then the limit lowered below what
/// is locked: every 3 MiB buffer is a view over the pooled blocks. The heap would rather take
/// a scattered set fresh after a streak of views; refused, it keeps the pooled blocks.
fn lowered_limit() {
    limit_to(7 * MIB as u64);
    let heap = locked_heap(true);
    let mut b: Vec<_> = (0..5).map(|_| Some(heap.alloc(MIB).unwrap())).collect();
    for i in [0, 2, 4] {
        b[i] = None;
    }
    heap.flush();
    let locked = child::status_bytes("VmLck");
    child::set_memlock(locked - MIB as u64);
    let before = heap.stats();
    for k in 0..40 {
        let mut buf = heap
            .alloc(3 * MIB)
            .unwrap_or_else(|e| panic!("allocation {k}: the pool holds it: {e}"));
        assert!(buf.iter().all(|&x| x == 0), "allocation {k}");
        buf.fill(9);
        drop(buf);
        heap.flush();
        // A moment for the worker: on a machine that looks busy the heap takes no fresh
        // pages at all, and the case this is about (fresh pages refused) does not arise.
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let s = heap.stats();
    assert_eq!(s.fresh_pages, before.fresh_pages, "{s}");
    assert_eq!(s.released_pages, 0, "no pooled block thrown away: {s}");
    assert_eq!(s.pooled_pages(), 768, "{s}");
    assert_eq!(s.hits - before.hits, 120, "{s}");
}

#[test]
fn a_refused_allocation_changes_nothing() {
    child::run("entry", "refusal-changes-nothing");
}

/// A refusal after blocks were gathered (some pooled, the rest refused) leaves every counter
/// and the pool as they were, on a heap with nothing else pooled to give way.
fn refusal_changes_nothing() {
    limit_to(4 * MIB as u64);
    let heap = locked_heap(false);
    drop(heap.alloc(2 * MIB).unwrap());
    let live = heap.alloc(2 * MIB).unwrap();
    heap.flush();
    let before = heap.stats();
    assert_eq!(before.pooled_pages(), 0);
    drop(live);
    let before = heap.stats();
    assert_eq!(before.pooled_pages(), 512);
    let lck = child::status_bytes("VmLck");
    // 2 MiB pooled, 3 more needed: past the limit even with the pool given back.
    let e = heap.alloc(5 * MIB).unwrap_err();
    assert!(matches!(e, AllocError::MemlockLimit { .. }), "{e:?}");
    let after = heap.stats();
    assert_eq!(after.fresh_pages, before.fresh_pages, "{after}");
    assert_eq!(after.hits, before.hits, "{after}");
    assert_eq!(after.misses, before.misses, "{after}");
    assert_eq!(after.allocs, before.allocs, "{after}");
    assert_eq!(after.live_buffers, 0, "{after}");
    // Giving the pool back could not have made room: it stays.
    assert_eq!(after.pooled_pages(), 512, "{after}");
    assert_eq!(after.released_pages, 0, "{after}");
    assert_eq!(after.reclaimed_pages, 0, "{after}");
    assert!(child::status_bytes("VmLck") <= lck);
    // A request the pool holds is still served after it.
    let c = heap.alloc(MIB).unwrap();
    assert!(c.iter().all(|&x| x == 0));
}
