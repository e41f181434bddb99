//! Pool types (TTM's second pool user): locked, huge and node(N) heaps, checked against what
//! the kernel reports (`/proc/self/smaps`, `numa_maps`, `status`), one registry table for all
//! of them, `reserve`, `RLIMIT_MEMLOCK` refusals, and fork.
//!
//! What this machine cannot show (hugetlbfs pages, shared-memory THP, a second NUMA node) is
//! skipped here with the reason printed; the VM suite (`vm/run`) boots a kernel that has them
//! (two NUMA nodes, reserved huge pages) and checks them there (`pool_type_*` in `vm-tests`).
//!
//! Tests that change process-wide state (`RLIMIT_MEMLOCK`, capabilities) run in a child: the
//! test binary re-runs itself with `PAGEPOOL_TEST_CHILD` naming the case.

mod child;

use pagepool::{AllocError, ConfigError, HugeBacking, PoolType, SystemHeap, registry::Registry};

fn heap(ty: PoolType) -> SystemHeap {
    SystemHeap::builder()
        .name(&format!("test-{ty}"))
        .pool_type(ty)
        .registry(Registry::new(usize::MAX / 2))
        .pressure(None)
        .build()
        .unwrap()
}

/// The entry of the child cases (does nothing in a normal run).
#[test]
fn child_entry() {
    let Some(case) = child::case() else {
        return;
    };
    match case.as_str() {
        "memlock" => memlock_child(),
        "vmlck" => vmlck_child(),
        other => panic!("unknown case {other}"),
    }
    println!("case {case} done");
}

#[test]
fn locked_memory_is_locked_on_carving_stays_locked_in_the_pool_and_unlocks_on_trim() {
    let heap = heap(PoolType::SYSTEM.locked());
    let mut b = heap.alloc(3 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let r = heap.backing().unwrap();
    assert!(r.locked_bytes >= 3 << 20, "locked after carving: {r}");
    assert!(r.resident_bytes >= 3 << 20, "{r}");
    b.fill(7);
    drop(b);
    heap.flush();
    let pooled = heap.backing().unwrap();
    assert!(
        pooled.locked_bytes >= 3 << 20,
        "still locked in the pool: {pooled}"
    );
    let again = heap.alloc(3 << 20).unwrap();
    assert!(again.iter().all(|&x| x == 0), "zeroed on reuse");
    let s = heap.stats();
    assert_eq!(s.fresh_pages, 768, "reused, not fresh: {s}");
    assert_eq!(s.pool_type, PoolType::SYSTEM.locked());
    assert!(heap.backing().unwrap().locked_bytes >= 3 << 20);
    drop(again);
    heap.flush();
    heap.trim();
    let r = heap.backing().unwrap();
    assert_eq!(r.locked_bytes, 0, "unlocked when given back: {r}");
    assert_eq!(r.mapped_bytes, 0, "no arena left: {r}");
}

#[test]
fn reserve_warms_the_pools_within_the_limit() {
    let heap = SystemHeap::builder()
        .pool_type(PoolType::SYSTEM.locked())
        .pool_limit(6 << 20)
        .registry(Registry::new(usize::MAX / 2))
        .pressure(None)
        .build()
        .unwrap();
    assert_eq!(
        heap.reserve(2 << 20, 10).unwrap(),
        3,
        "up to the 6 MiB limit"
    );
    let s = heap.stats();
    assert_eq!(s.owner.pages, 3 * 512);
    assert_eq!(s.fresh_pages, 3 * 512);
    assert!(heap.backing().unwrap().locked_bytes >= 6 << 20);
    let bufs: Vec<_> = (0..3).map(|_| heap.alloc(2 << 20).unwrap()).collect();
    let s = heap.stats();
    assert_eq!(s.misses, 0, "every block was reserved: {s}");
    assert_eq!(
        s.remapped, 0,
        "each reserved buffer's blocks lie end to end: {s}"
    );
    assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 0)));
    assert!(matches!(heap.reserve(0, 1), Err(AllocError::ZeroLength)));
    assert!(matches!(
        heap.reserve(usize::MAX, 1),
        Err(AllocError::TooLarge { .. })
    ));
    assert_eq!(heap.reserve(2 << 20, 0).unwrap(), 0);
}

#[test]
fn past_rlimit_memlock_a_locked_heap_fails_clearly_and_leaks_nothing() {
    let out = child::run("child_entry", "memlock");
    println!("{out}");
}

/// In a child: without `CAP_IPC_LOCK` and with `RLIMIT_MEMLOCK` at 4 MiB, a locked heap
/// refuses what would pass the limit with `MemlockLimit`, takes nothing, and still serves
/// what fits.
fn memlock_child() {
    child::drop_ipc_lock();
    let limit = 4u64 << 20;
    child::set_memlock(limit);
    let base_lck = child::status_bytes("VmLck");
    let heap = heap(PoolType::SYSTEM.locked());
    let e = heap.alloc(8 << 20).unwrap_err();
    assert!(
        matches!(e, AllocError::MemlockLimit { bytes, limit: Some(l) } if bytes == 8 << 20 && l == limit),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("RLIMIT_MEMLOCK") && msg.contains("ulimit -l"),
        "{msg}"
    );
    let s = heap.stats();
    assert_eq!(s.fresh_pages, 0, "nothing counted: {s}");
    assert_eq!(s.live_buffers, 0);
    assert_eq!(s.arenas, 0, "the arena made for it is gone: {s}");
    assert_eq!(
        child::status_bytes("VmLck"),
        base_lck,
        "nothing stays locked"
    );
    // What fits is served, and locked.
    let b = heap.alloc(2 << 20).unwrap();
    assert_eq!(child::status_bytes("VmLck"), base_lck + (2 << 20));
    // Reserving past the limit stops with the same error; what was reserved stays pooled.
    let e = heap.reserve(1 << 20, 4).unwrap_err();
    assert!(matches!(e, AllocError::MemlockLimit { .. }), "{e:?}");
    assert_eq!(
        heap.stats().owner.pages,
        512,
        "two 1 MiB buffers fitted beside the live 2 MiB"
    );
    drop(b);
    heap.flush();
    heap.trim();
    assert_eq!(
        child::status_bytes("VmLck"),
        base_lck,
        "all unlocked after trim"
    );
    println!("refused: {msg}");
}

#[test]
fn locked_bytes_is_what_the_heap_adds_to_vmlck_with_views_live() {
    let out = child::run("child_entry", "vmlck");
    println!("{out}");
}

/// In a child (alone, so that no other test's locked memory comes and goes): a locked heap's
/// `locked_bytes` equals the change in `VmLck` it causes, its home mappings counted once,
/// while a buffer that spans blocks lives in a view of the same locked pages.
fn vmlck_child() {
    let base = child::status_bytes("VmLck");
    let heap = heap(PoolType::SYSTEM.locked());
    let check = |what: &str| {
        let r = heap.backing().unwrap();
        let added = child::status_bytes("VmLck") - base;
        assert_eq!(r.locked_bytes, added, "{what}: VmLck +{added}: {r}");
        println!("{what}: VmLck +{} KiB, {r}", added >> 10);
    };
    // Three 1 MiB blocks end to end; the first and the third pooled, the middle one live.
    let bufs: Vec<_> = (0..3).map(|_| heap.alloc(1 << 20).unwrap()).collect();
    let [a, b, c] = <[_; 3]>::try_from(bufs).ok().unwrap();
    drop((a, c));
    heap.flush();
    check("two pooled, one live");
    // A 2 MiB buffer of the two pooled blocks, which do not lie end to end: a view.
    let mut spans = heap.alloc(2 << 20).unwrap();
    assert!(spans.is_remapped(), "a buffer over two separate blocks");
    spans.fill(3);
    check("a view of two locked blocks live");
    let s = heap.stats();
    assert_eq!(s.fresh_pages, 3 * 256, "{s}");
    assert_eq!(
        child::status_bytes("VmLck") - base,
        3 << 20,
        "each page once"
    );
    drop((b, spans));
    heap.flush();
    check("all pooled");
    heap.trim();
    check("trimmed");
    assert_eq!(child::status_bytes("VmLck"), base);
}

#[test]
fn a_huge_heap_hands_out_2_mib_blocks_and_reports_its_backing() {
    let heap = heap(PoolType::SYSTEM.huge());
    let planned = heap
        .stats()
        .huge_backing
        .expect("a huge heap has a backing");
    let mut b = heap.alloc(5000).unwrap();
    assert_eq!(b.len(), 2 << 20, "rounded up to one 2 MiB block");
    assert_eq!(b.as_ptr() as usize % (2 << 20), 0, "2 MiB aligned");
    b.fill(1);
    let big = heap.alloc(6 << 20).unwrap();
    assert_eq!(big.len(), 6 << 20);
    let r = heap.backing().unwrap();
    let got = heap.stats().huge_backing.unwrap();
    println!("planned {planned}, now {got}: {r}");
    match got {
        HugeBacking::Hugetlb => assert!(r.hugetlb_bytes >= 8 << 20, "{r}"),
        HugeBacking::Thp => assert!(
            r.thp_bytes > 0,
            "shared-memory THP allowed but none mapped: {r}"
        ),
        HugeBacking::Base => {
            println!(
                "skipped: this system offers neither hugetlbfs pages nor shared-memory THP \
                 (shmem_enabled); blocks are 2 MiB of base pages"
            );
            assert_eq!(r.thp_bytes + r.hugetlb_bytes, 0, "{r}");
            assert!(r.resident_bytes >= 8 << 20, "{r}");
        }
    }
    // Pooled blocks keep their backing across reuse.
    drop(b);
    heap.flush();
    let again = heap.alloc(2 << 20).unwrap();
    assert!(again.iter().all(|&x| x == 0));
    assert_eq!(heap.stats().fresh_pages, 4 * 512, "reused, not fresh");
    let r2 = heap.backing().unwrap();
    assert_eq!(r2.hugetlb_bytes, r.hugetlb_bytes, "{r2}");
    assert_eq!(r2.thp_bytes, r.thp_bytes, "{r2}");
}

#[test]
fn huge_and_node_configurations_are_checked() {
    let e = SystemHeap::builder()
        .pool_type(PoolType::SYSTEM.huge())
        .orders(&[9, 0])
        .build()
        .unwrap_err();
    assert!(matches!(e, ConfigError::HugeOrders { min: 9, .. }), "{e:?}");
    assert!(
        SystemHeap::builder()
            .pool_type(PoolType::SYSTEM.huge())
            .orders(&[10, 9])
            .build()
            .is_ok()
    );
    let e = SystemHeap::builder()
        .pool_type(PoolType::SYSTEM.node(4000))
        .build()
        .unwrap_err();
    assert!(
        matches!(e, ConfigError::NoSuchNode { node: 4000, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("nodes with memory"), "{e}");
}

#[test]
fn a_node_heap_places_its_memory_on_that_node() {
    let nodes = std::fs::read_to_string("/sys/devices/system/node/has_memory")
        .unwrap_or_else(|_| "0".into());
    let last: u32 = nodes
        .trim()
        .rsplit([',', '-'])
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if last == 0 {
        println!(
            "one NUMA node here ({}): placement checked on node 0 only",
            nodes.trim()
        );
    }
    for node in [0, last] {
        let heap = heap(PoolType::SYSTEM.node(node));
        let b = heap.alloc(4 << 20).unwrap();
        let r = heap.backing().unwrap();
        assert!(r.bound_to.iter().any(|&(n, _)| n == node), "{r:?}");
        let on: u64 = r.node_bytes.iter().map(|&(_, b)| b).sum();
        assert!(on >= 4 << 20, "{r:?}");
        assert!(
            r.node_bytes.iter().all(|&(n, _)| n == node),
            "every page on node {node}: {r:?}"
        );
        drop(b);
    }
}

#[test]
fn combinations_carry_every_attribute() {
    let heap = heap(PoolType::SYSTEM.locked().huge().node(0));
    let b = heap.alloc(4 << 20).unwrap();
    let r = heap.backing().unwrap();
    let backing = heap.stats().huge_backing.unwrap();
    if backing == HugeBacking::Hugetlb {
        // The kernel does not mark hugetlbfs mappings locked (their pages are never swapped).
        assert!(r.hugetlb_bytes >= 4 << 20, "{r}");
    } else {
        assert!(r.locked_bytes >= 4 << 20, "{r}");
    }
    assert!(r.node_bytes.iter().all(|&(n, _)| n == 0), "{r:?}");
    assert_eq!(b.as_ptr() as usize % (2 << 20), 0);
}

/// A heap of pool type `ty` named `name` on `registry`, releasing synchronously.
fn sync_heap_on(registry: &std::sync::Arc<Registry>, name: &str, ty: PoolType) -> SystemHeap {
    SystemHeap::builder()
        .name(name)
        .pool_type(ty)
        .registry(registry.clone())
        .pressure(None)
        .deferred(false)
        .build()
        .unwrap()
}

#[test]
fn one_registry_table_has_a_row_per_pool_type() {
    let registry = Registry::new(1 << 30);
    let build = |name: &str, ty: PoolType| sync_heap_on(&registry, name, ty);
    let a = build("a", PoolType::SYSTEM);
    let b = build("b", PoolType::SYSTEM);
    let l = build("l", PoolType::SYSTEM.locked());
    let h = build("h", PoolType::SYSTEM.huge());
    drop(a.alloc(1 << 20).unwrap());
    drop(b.alloc(4096 * 3).unwrap());
    b.flush();
    drop(l.alloc(64 << 10).unwrap());
    drop(h.alloc(2 << 20).unwrap());
    let stats = registry.stats();
    let names: Vec<&str> = stats.pool_types.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["system", "locked", "huge"]);
    assert_eq!(stats.pool_types[0].owners, 2);
    assert_eq!(stats.pool_types[0].pages, 256 + 3);
    assert_eq!(stats.pool_types[1].pages, 16);
    assert_eq!(stats.pool_types[2].pages, 512);
    let text = stats.to_string();
    println!("{text}");
    let rows: Vec<&str> = text.lines().collect();
    assert!(rows[0].contains("--- 9---"), "{text}");
    assert!(rows[1].starts_with("system"), "{text}");
    assert!(rows[2].starts_with("locked"), "{text}");
    assert!(rows[3].starts_with("huge"), "{text}");
    assert!(text.contains(&format!("{} of {}", 256 + 3 + 16 + 512, 1 << 30)));
    let owner_types: Vec<&str> = stats.owners.iter().map(|o| o.pool_type.as_str()).collect();
    assert_eq!(owner_types, ["system", "system", "locked", "huge"]);
}

/// A locked heap holding 8 MiB pooled (1 MiB blocks) and a huge heap 64 MiB (2 MiB blocks),
/// on one registry whose maximum lets them.
fn locked_and_huge_filled() -> (std::sync::Arc<Registry>, SystemHeap, SystemHeap) {
    let registry = Registry::new(usize::MAX / 2);
    let build = |name: &str, ty: PoolType| sync_heap_on(&registry, name, ty);
    let locked = build("l", PoolType::SYSTEM.locked());
    let huge = build("h", PoolType::SYSTEM.huge());
    assert_eq!(locked.reserve(1 << 20, 8).unwrap(), 8);
    assert_eq!(huge.reserve(2 << 20, 32).unwrap(), 32);
    assert_eq!(locked.stats().owner.pages, 2048);
    assert_eq!(huge.stats().owner.pages, 16384);
    (registry, locked, huge)
}

/// Checks that `locked` and `huge`, which held 2048 and 16384 pages, keep about the same part
/// of it: within `blocks` of their own blocks (256 and 512 pages) of that part, and something.
fn kept_in_proportion(registry: &Registry, locked: &SystemHeap, huge: &SystemHeap, blocks: f64) {
    let (l, h) = (locked.stats().owner.pages, huge.stats().owner.pages);
    let kept = registry.count() as f64 / (2048 + 16384) as f64;
    let text = format!(
        "locked kept {l} of 2048, huge {h} of 16384 ({kept:.2} of all)\n{}",
        registry.stats()
    );
    println!("{text}");
    assert_eq!(l + h, registry.count());
    assert!(l > 0 && h > 0, "neither is emptied: {text}");
    assert!((l as f64 - 2048.0 * kept).abs() <= blocks * 256.0, "{text}");
    assert!(
        (h as f64 - 16384.0 * kept).abs() <= blocks * 512.0,
        "{text}"
    );
}

#[test]
fn a_small_maximum_shrinks_locked_and_huge_heaps_in_proportion() {
    let (registry, locked, huge) = locked_and_huge_filled();
    // Far below what the heaps hold (and their own limits of 256 MiB): each keeps about
    // 4096 / 18432 of its own, not one emptied and the other kept whole.
    registry.set_max_pages(4096);
    assert!(registry.count() <= 4096);
    kept_in_proportion(&registry, &locked, &huge, 1.0);
    // Lower still, where the locked heap's part is less than one of its blocks: it keeps one
    // (rather than being emptied while the huge heap keeps all of the maximum).
    registry.set_max_pages(2048);
    assert!(registry.count() <= 2048);
    kept_in_proportion(&registry, &locked, &huge, 1.0);
    // Pooled memory that was given back is gone from the system too.
    let r = locked.backing().unwrap();
    assert_eq!(
        r.locked_bytes,
        locked.stats().owner.pages as u64 * 4096,
        "{r}"
    );
}

#[test]
fn concurrent_shrinks_of_locked_and_huge_heaps_share_in_proportion() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (registry, locked, huge) = locked_and_huge_filled();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut reads = 0u64;
            while !done.load(Ordering::Relaxed) {
                let st = registry.stats();
                assert!(st.total_pages <= 2048 + 16384, "{st}");
                reads += 1;
            }
            reads
        });
        let shrinkers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    while registry.count() > 8192 {
                        registry.shrink_all(200);
                    }
                })
            })
            .collect();
        for t in shrinkers {
            t.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
    // Each thread may free a block or two past the target, and two may take the same turn.
    kept_in_proportion(&registry, &locked, &huge, 3.0);
}

#[test]
fn a_huge_heap_falls_back_when_hugetlbfs_pages_run_out() {
    let free = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if free == 0 || free > 256 {
        println!("skipped: {free} free hugetlbfs pages here (this test needs 1 to 256)");
        return;
    }
    let heap = SystemHeap::builder()
        .pool_type(PoolType::SYSTEM.huge())
        .arena_size(4 << 20)
        .registry(Registry::new(usize::MAX / 2))
        .pressure(None)
        .build()
        .unwrap();
    assert_eq!(heap.stats().huge_backing, Some(HugeBacking::Hugetlb));
    // More 2 MiB buffers than there are free huge pages: every one is served.
    let bufs: Vec<_> = (0..free + 3)
        .map(|_| heap.alloc(2 << 20).unwrap())
        .collect();
    assert!(bufs.iter().all(|b| b[0] == 0 && b[b.len() - 1] == 0));
    let s = heap.stats();
    assert_ne!(s.huge_backing, Some(HugeBacking::Hugetlb), "fell back: {s}");
    let r = heap.backing().unwrap();
    println!("{free} free huge pages, then {:?}: {r}", s.huge_backing);
    assert!(r.hugetlb_bytes <= (free as u64) << 21, "{r}");
    assert!(
        r.hugetlb_bytes + r.resident_bytes >= ((free + 3) as u64) << 21,
        "{r}"
    );
    drop(bufs);
    heap.flush();
    heap.trim();
    assert_eq!(heap.backing().unwrap().mapped_bytes, 0);
}

#[test]
fn many_threads_on_typed_heaps_with_statistics_read_meanwhile() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for ty in [
        PoolType::SYSTEM.locked(),
        PoolType::SYSTEM.huge(),
        PoolType::SYSTEM.locked().huge().node(0),
    ] {
        let heap = SystemHeap::builder()
            .pool_type(ty)
            .pool_limit(32 << 20)
            .registry(Registry::new(usize::MAX / 2))
            .pressure(None)
            .build()
            .unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let readers = s.spawn(|| {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    let st = heap.stats();
                    assert_eq!(st.pool_type, ty);
                    // A released batch is pooled, then trimmed to the limit: while threads
                    // run, at most one buffer (6 MiB) per thread over it.
                    let slack = 4 * (6 << 20) / 4096;
                    let limit = st.owner.limit_pages.expect("a 32 MiB limit");
                    assert!(st.owner.pages <= limit + slack, "{st}");
                    heap.backing().unwrap();
                    reads += 1;
                }
                reads
            });
            let workers: Vec<_> = (0..4u64)
                .map(|t| {
                    let heap = &heap;
                    s.spawn(move || {
                        let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                        for _ in 0..200 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let len = 1 + (x % (6 << 20)) as usize;
                            let mut b = heap.alloc(len).unwrap();
                            assert!(b.len() >= len);
                            assert!(b.iter().step_by(4096).all(|&v| v == 0), "{ty}");
                            assert_eq!(b[b.len() - 1], 0);
                            b.iter_mut().step_by(4096).for_each(|v| *v = 0xaa);
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            assert!(readers.join().unwrap() > 0);
        });
        heap.flush();
        let s = heap.stats();
        assert!(
            s.owner.limit_pages.is_some_and(|l| s.owner.pages <= l),
            "{ty}: at rest, within the limit: {s}"
        );
        assert_eq!(s.live_pages, 0, "{ty}: {s}");
        assert_eq!(
            s.fresh_pages,
            s.owner.pages as u64 + s.released_pages,
            "{ty}: every fresh page is pooled or given back: {s}"
        );
        heap.trim();
        let r = heap.backing().unwrap();
        assert_eq!(r.locked_bytes, 0, "{ty}: {r}");
        assert_eq!(r.mapped_bytes, 0, "{ty}: {r}");
    }
}
