//! fork(): pagepool memory is not inherited, and every heap starts afresh in the child.
//!
//! Each child runs in its own process under a watchdog alarm; the parent checks how it ended
//! (exit code or signal) and that nothing the child did reached the parent's memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pagepool::{Buffer, SystemHeap};

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exit(i32),
    Signal(i32),
}

/// Forks; the child runs `f` under a `secs` alarm and exits with its result (0 when it
/// returns true, 1 when false, 2 when it panics); the parent waits and returns how it ended.
fn in_child(secs: u32, f: impl FnOnce() -> bool) -> End {
    // SAFETY: fork has no preconditions; the child only runs `f` and then `_exit`s, so it never
    // returns into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: alarm and _exit are async-signal-safe and have no preconditions.
        unsafe { libc::alarm(secs) };
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let code = match ok {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(_) => 2,
        };
        // SAFETY: as above.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    if libc::WIFEXITED(status) {
        End::Exit(libc::WEXITSTATUS(status))
    } else {
        End::Signal(libc::WTERMSIG(status))
    }
}

fn fill(b: &mut Buffer, v: u8) {
    b.fill(v);
}

fn all(b: &[u8], v: u8) -> bool {
    b.iter().all(|&x| x == v)
}

#[test]
fn an_inherited_buffer_faults_in_the_child() {
    let heap = SystemHeap::new().unwrap();
    for len in [4096, 1 << 20, 3 << 20] {
        let mut b = heap.alloc(len).unwrap();
        fill(&mut b, 0xa5);
        let p = b.as_ptr() as usize;
        let end = in_child(10, || {
            // SAFETY: none: this read is meant to fault (the mapping is not inherited).
            let v = unsafe { std::ptr::read_volatile(p as *const u8) };
            v == 0xa5 // reaching here at all fails the test
        });
        assert_eq!(end, End::Signal(libc::SIGSEGV), "{len} bytes");
        assert!(all(&b, 0xa5));
    }
}

#[test]
fn an_inherited_remapped_buffer_faults_too() {
    let heap = SystemHeap::builder().orders(&[4, 0]).build().unwrap();
    // Interleave so that a later buffer is built from blocks not end to end.
    let keep: Vec<_> = (0..8).map(|_| heap.alloc(64 << 10).unwrap()).collect();
    let (odd, even): (Vec<_>, Vec<_>) = keep.into_iter().enumerate().partition(|(i, _)| i % 2 == 1);
    drop(odd);
    heap.flush();
    let mut b = heap.alloc(3 * (64 << 10)).unwrap();
    assert!(b.is_remapped(), "the test needs a view");
    fill(&mut b, 0x3c);
    let p = b.as_ptr() as usize;
    let end = in_child(10, || {
        // SAFETY: none: meant to fault.
        let v = unsafe { std::ptr::read_volatile(p as *const u8) };
        v == 0x3c
    });
    assert_eq!(end, End::Signal(libc::SIGSEGV));
    assert!(all(&b, 0x3c));
    drop(even);
}

#[test]
fn the_child_gets_its_own_clean_memory_and_the_parent_sees_nothing() {
    let heap = SystemHeap::builder().name("fork-parent").build().unwrap();
    // Live buffers with data, pooled blocks, queued blocks and a thread cache, all at once.
    let mut live: Vec<Buffer> = [4096, 16 << 10, 1 << 20, 8 << 20]
        .iter()
        .map(|&n| heap.alloc(n).unwrap())
        .collect();
    for (i, b) in live.iter_mut().enumerate() {
        fill(b, 0x10 + i as u8);
    }
    for n in [4096, 1 << 20, 8 << 20, 16 << 10] {
        let mut b = heap.alloc(n).unwrap();
        fill(&mut b, 0xee);
        drop(b);
    }
    heap.flush();
    for n in [1 << 20, 4096] {
        let mut b = heap.alloc(n).unwrap();
        fill(&mut b, 0xdd);
        drop(b); // queued or cached, dirty
    }
    let before = heap.stats();
    let end = in_child(20, || {
        let s = heap.stats();
        if s.allocs != 0 || s.owner.pages != 0 || s.queued_pages != 0 {
            return false; // a fresh start: nothing inherited
        }
        let mut mine = Vec::new();
        for n in [8 << 20, 16 << 10, 1 << 20, 4096, 4096, 1 << 20] {
            let mut b = heap.alloc(n).unwrap();
            if !all(&b, 0) {
                return false;
            }
            b.fill(0x77);
            mine.push(b);
        }
        drop(mine);
        heap.flush();
        let again = heap.alloc(1 << 20).unwrap();
        if !all(&again, 0) {
            return false;
        }
        drop(again);
        heap.trim();
        heap.flush();
        let s = heap.stats();
        s.allocs == 7 && s.live_buffers == 0
    });
    assert_eq!(end, End::Exit(0));
    for (i, b) in live.iter().enumerate() {
        assert!(all(b, 0x10 + i as u8), "buffer {i} changed by the child");
    }
    // What the parent had pooled or queued is still clean when handed out.
    heap.flush();
    // Eight 1 MiB blocks are free in the parent (one freed buffer's block went into the 8 MiB).
    let again: Vec<Buffer> = [8 << 20, 4096, 16 << 10]
        .iter()
        .map(|&n| heap.alloc(n).unwrap())
        .collect();
    for b in &again {
        assert!(all(b, 0));
    }
    let after = heap.stats();
    assert_eq!(
        after.fresh_pages, before.fresh_pages,
        "no fresh pages needed"
    );
    drop(again);
    drop(live);
}

#[test]
fn the_child_drops_inherited_buffers_and_heaps_without_effect() {
    let heap = SystemHeap::new().unwrap();
    let mut a = heap.alloc(4 << 20).unwrap();
    let mut b = heap.alloc(4096).unwrap();
    fill(&mut a, 1);
    fill(&mut b, 2);
    let end = in_child(20, move || {
        drop(a);
        drop(b);
        heap.trim();
        heap.flush();
        let _ = heap.stats();
        drop(heap);
        true
    });
    assert_eq!(end, End::Exit(0));
}

#[test]
fn a_child_trim_and_drop_do_not_reach_the_parent() {
    let heap = SystemHeap::new().unwrap();
    let mut live = heap.alloc(4 << 20).unwrap();
    fill(&mut live, 9);
    let end = in_child(20, || {
        heap.trim();
        heap.flush();
        true
    });
    assert_eq!(end, End::Exit(0));
    assert!(all(&live, 9), "a child's trim punched the parent's memory");
    drop(live);
    heap.flush();
    let b = heap.alloc(4 << 20).unwrap();
    assert!(all(&b, 0));
}

#[test]
fn flush_and_drop_in_a_child_with_a_long_worker_spin() {
    let heap = SystemHeap::builder()
        .worker_spin(std::time::Duration::from_secs(30))
        .build()
        .unwrap();
    drop(heap.alloc(1 << 20).unwrap());
    let end = in_child(10, || {
        drop(heap.alloc(1 << 20).unwrap());
        heap.flush();
        drop(heap);
        true
    });
    assert_eq!(end, End::Exit(0));
}

#[test]
fn forks_while_another_thread_uses_the_heap() {
    let heap = Arc::new(SystemHeap::builder().name("fork-busy").build().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let (heap, stop) = (heap.clone(), stop.clone());
            std::thread::spawn(move || {
                let sizes = [4096, 12 << 10, 1 << 20, 3 << 20, 64 << 10];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let mut b = heap.alloc(sizes[i % sizes.len()]).unwrap();
                    assert!(all(&b, 0), "parent got dirty memory");
                    b.fill(0xab);
                    if i % 7 == 0 {
                        heap.flush();
                    }
                    if i % 11 == 0 {
                        let _ = heap.stats();
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let mut ends = Vec::new();
    for k in 0..32 {
        let heap = heap.clone();
        ends.push(in_child(20, move || {
            let mut ok = true;
            for n in [4096, 1 << 20, 12 << 10, 3 << 20] {
                let mut b = heap.alloc(n + k).unwrap();
                ok &= all(&b, 0);
                b.fill(0x5a);
            }
            heap.flush();
            heap.trim();
            let _ = heap.stats();
            ok
        }));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let bad: Vec<_> = ends
        .iter()
        .enumerate()
        .filter(|(_, e)| **e != End::Exit(0))
        .collect();
    assert!(bad.is_empty(), "children that failed: {bad:?}");
}

#[test]
fn a_deferred_heap_and_a_sync_heap_in_a_grandchild() {
    let deferred = SystemHeap::new().unwrap();
    let sync = SystemHeap::builder().deferred(false).build().unwrap();
    let mut keep = deferred.alloc(1 << 20).unwrap();
    fill(&mut keep, 4);
    let end = in_child(30, || {
        let a = deferred.alloc(1 << 20).unwrap();
        let inner = in_child(10, || {
            let b = deferred.alloc(2 << 20).unwrap();
            let c = sync.alloc(2 << 20).unwrap();
            all(&b, 0) && all(&c, 0)
        });
        all(&a, 0) && inner == End::Exit(0)
    });
    assert_eq!(end, End::Exit(0));
    assert!(all(&keep, 4));
}

#[test]
fn every_pool_type_behaves_the_same_across_fork() {
    use pagepool::PoolType;
    let types = [
        PoolType::SYSTEM,
        PoolType::SYSTEM.locked(),
        PoolType::SYSTEM.huge(),
        PoolType::SYSTEM.node(0),
        PoolType::SYSTEM.locked().huge().node(0),
    ];
    for ty in types {
        let heap = SystemHeap::builder().pool_type(ty).build().unwrap();
        let mut live = heap.alloc(4 << 20).unwrap();
        fill(&mut live, 0x5a);
        let mut pooled = heap.alloc(2 << 20).unwrap();
        fill(&mut pooled, 0x6b);
        drop(pooled); // queued or pooled, dirty or clean: none of it is the child's
        let p = live.as_ptr() as usize;
        // The inherited buffer faults in the child.
        let end = in_child(10, || {
            // SAFETY: none: meant to fault.
            let v = unsafe { std::ptr::read_volatile(p as *const u8) };
            v == 0x5a
        });
        assert_eq!(end, End::Signal(libc::SIGSEGV), "{ty}");
        // The heap starts afresh in the child, with its attribute, and the parent sees none of
        // what the child does.
        let end = in_child(20, || {
            let s = heap.stats();
            if s.allocs != 0 || s.owner.pages != 0 || s.pool_type != ty {
                return false;
            }
            let mut b = heap.alloc(4 << 20).unwrap();
            if !all(&b, 0) {
                return false;
            }
            b.fill(0x77);
            let r = heap.backing().unwrap();
            let attributed = (!ty.is_locked() || r.locked_bytes + r.hugetlb_bytes >= 4 << 20)
                && ty
                    .node_id()
                    .is_none_or(|n| r.node_bytes.iter().all(|&(m, _)| m == n));
            drop(b);
            heap.flush();
            let again = heap.alloc(4 << 20).unwrap();
            let clean = all(&again, 0);
            drop(again);
            heap.trim();
            attributed && clean
        });
        assert_eq!(end, End::Exit(0), "{ty}");
        assert!(all(&live, 0x5a), "{ty}: the parent's buffer is untouched");
        heap.flush();
        let next = heap.alloc(2 << 20).unwrap();
        assert!(all(&next, 0), "{ty}");
        let s = heap.stats();
        assert_eq!(
            s.fresh_pages, 1536,
            "{ty}: the parent's pooled block is still its own: {s}"
        );
    }
}
