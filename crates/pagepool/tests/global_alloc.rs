//! `PoolAlloc` as this test binary's global allocator: zeroed vectors from the pools, plain
//! allocations never zeroed, only the allocated size zeroed, realloc, alignments, threads
//! freeing each other's buffers, fork (copy-on-write, a child allocating on its own), bad
//! frees ending the process with one line, trim and the registry's table, and the pressure
//! monitor the pools start.
//!
//! The pools and their counters are process-wide, so the tests here take one lock and compare
//! counters before and after.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;

use pagepool::alloc::PoolAlloc;

#[global_allocator]
static GLOBAL: PoolAlloc = PoolAlloc::new();

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn stats() -> pagepool::alloc::PrivateStats {
    GLOBAL
        .stats()
        .expect("the pools exist after a large allocation")
}

/// Makes the pools if no test did yet.
fn warm() {
    drop(vec![0u8; 1 << 20]);
}

#[test]
fn zeroed_vectors_come_from_the_pools_and_are_zero() {
    let _g = serial();
    warm();
    GLOBAL.trim(); // nothing pooled: the first vector is fresh, every other one reused
    let before = stats();
    for round in 0..50u8 {
        let mut v = vec![0u8; 8 << 20];
        assert!(GLOBAL.owns(v.as_ptr()), "an 8 MiB vector is the pools'");
        assert!(v.iter().all(|&b| b == 0), "round {round}: not zero");
        v.fill(round | 1);
        drop(v);
        GLOBAL.flush();
    }
    let after = stats();
    assert_eq!(after.allocs - before.allocs, 50);
    assert_eq!(after.fresh - before.fresh, 1, "{after}");
    // Reused: clean (the worker zeroed it), or dirty and zeroed inline where the worker had no
    // core (a busy machine).
    assert_eq!(
        after.clean_hits + after.dirty_hits - before.clean_hits - before.dirty_hits,
        49,
        "{after}"
    );
    // Each release zeroed once, whole: the first 49 by the time the next vector was made, the
    // last one too if the worker had it.
    let zeroed = after.zeroed_worker_bytes + after.zeroed_inline_bytes
        - before.zeroed_worker_bytes
        - before.zeroed_inline_bytes;
    assert!(
        zeroed == 49 * (8 << 20) || zeroed == 50 * (8 << 20),
        "{zeroed} bytes zeroed: {after}"
    );
    // Small requests are the inner allocator's.
    let small = vec![0u8; 1000];
    assert!(!GLOBAL.owns(small.as_ptr()));
}

#[test]
fn plain_allocations_are_never_zeroed_needlessly() {
    let _g = serial();
    warm();
    // A class no other test zeroes in: 3 MiB (4 MiB blocks). Plain allocations only.
    for _ in 0..ZEROED_MEMORY_ROUNDS {
        let mut v: Vec<u8> = Vec::with_capacity(3 << 20);
        v.resize(3 << 20, 1);
        drop(v);
    }
    GLOBAL.flush();
    let before = stats();
    for i in 0..40u8 {
        let mut v: Vec<u8> = Vec::with_capacity(3 << 20);
        assert!(GLOBAL.owns(v.as_ptr()));
        v.resize(3 << 20, i);
        drop(v);
    }
    GLOBAL.flush();
    let after = stats();
    assert_eq!(after.dirty_hits - before.dirty_hits, 40, "{after}");
    assert_eq!(
        (after.zeroed_worker_bytes, after.zeroed_inline_bytes),
        (before.zeroed_worker_bytes, before.zeroed_inline_bytes),
        "nothing zeroed for plain allocations: {after}"
    );
}

/// Plain allocations after which a class stops sending its releases to the worker.
const ZEROED_MEMORY_ROUNDS: usize = 20;

#[test]
fn only_the_allocated_size_is_zeroed() {
    let _g = serial();
    warm();
    // 33 MiB lives in a 64 MiB block: its release zeroes 33 MiB, not 64.
    GLOBAL.trim();
    let before = stats();
    let mut v = vec![0u8; 33 << 20];
    assert!(GLOBAL.owns(v.as_ptr()));
    v[(33 << 20) - 1] = 1;
    drop(v);
    GLOBAL.flush();
    // The same block again (by the worker, or inline if it had no core), at a larger size.
    let again = vec![0u8; 60 << 20];
    let after = stats();
    let zeroed = after.zeroed_worker_bytes + after.zeroed_inline_bytes
        - before.zeroed_worker_bytes
        - before.zeroed_inline_bytes;
    assert_eq!(zeroed, 33 << 20, "{after}");
    assert!(
        again.iter().all(|&b| b == 0),
        "the block's tail was never dirty"
    );
    drop(again);
    GLOBAL.flush();
    // A block whose usable size was asked may be written in full: it is zeroed in full.
    let mut v = vec![0u8; 33 << 20];
    assert_eq!(GLOBAL.usable_size(v.as_ptr()), Some(64 << 20));
    // SAFETY: the usable size says the whole block may be written.
    unsafe { v.as_mut_ptr().add((64 << 20) - 1).write(5) };
    drop(v);
    GLOBAL.flush();
    let big = vec![0u8; 64 << 20];
    assert_eq!(
        big[(64 << 20) - 1],
        0,
        "the last byte of the block was zeroed"
    );
}

#[test]
fn realloc_keeps_the_contents_growing_and_shrinking() {
    let _g = serial();
    let mut v: Vec<u32> = Vec::new();
    for i in 0..(16u32 << 20) {
        v.push(i); // doubling from 4 bytes to 64 MiB: inner, then the pools, then inner
    }
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    v.truncate(100_000);
    v.shrink_to_fit(); // 400 KB: back into a smaller class
    assert!(GLOBAL.owns(v.as_ptr().cast()));
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    v.truncate(10);
    v.shrink_to_fit(); // 40 bytes: to the inner allocator
    assert!(!GLOBAL.owns(v.as_ptr().cast()));
    assert_eq!(v, (0..10).collect::<Vec<u32>>());

    // Grown in place within its block, then released: what the larger size wrote is zeroed
    // before the block is handed out clean.
    let layout = Layout::from_size_align(300 << 10, 8).unwrap(); // a 512 KiB block
    // SAFETY: a valid layout; the pointer is used within it and released with it below.
    unsafe {
        let p = GLOBAL.alloc_zeroed(layout);
        assert!(GLOBAL.owns(p));
        let q = GLOBAL.realloc(p, layout, 500 << 10);
        assert_eq!(p, q, "in place");
        q.add((500 << 10) - 1).write(9);
        let r = GLOBAL.realloc(q, Layout::from_size_align(500 << 10, 8).unwrap(), 260 << 10);
        assert_eq!(q, r, "in place");
        GLOBAL.dealloc(r, Layout::from_size_align(260 << 10, 8).unwrap());
        GLOBAL.flush();
        let z = GLOBAL.alloc_zeroed(layout);
        let again = GLOBAL.realloc(z, layout, 500 << 10);
        let s = std::slice::from_raw_parts(again, 500 << 10);
        assert!(
            s.iter().all(|&b| b == 0),
            "the byte written at 500 KiB was zeroed"
        );
        GLOBAL.dealloc(again, Layout::from_size_align(500 << 10, 8).unwrap());
    }
}

#[test]
fn realloc_moves_large_blocks_by_their_pages() {
    let _g = serial();
    warm();
    let before = stats();
    // Twenty growths, then twenty more: moving pages splits and merges mappings (a moved block
    // is a mapping of its own until its neighbours match), so the first rounds make some; the
    // next ones, reusing the same slots, must not make more with every move.
    let mut maps = Vec::new();
    for half in 0..2u64 {
        for round in 0..20u64 {
            let mark = half * 20 + round;
            let mut v: Vec<u64> = Vec::with_capacity((1 << 20) / 8);
            for i in 0..(32u64 << 20) / 8 {
                v.push(i ^ mark); // 1 MiB to 32 MiB: moved at 2, 4, 8, 16 and 32 MiB
            }
            assert!(GLOBAL.owns(v.as_ptr().cast()));
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 ^ mark));
            drop(v);
        }
        maps.push(pagepool::stats::mapping_count().unwrap());
    }
    let after = stats();
    assert!(
        after.moved_blocks - before.moved_blocks >= 5 * 40,
        "every doubling from 1 MiB moved pages: {after}"
    );
    assert!(
        maps[1] <= maps[0] + 16,
        "{} mappings after 100 moves, {} after 100 more",
        maps[0],
        maps[1]
    );
    // The slots the blocks left are zero and used again.
    GLOBAL.trim();
    for _ in 0..4 {
        let v = vec![0u8; 2 << 20];
        assert!(v.iter().all(|&b| b == 0));
    }
}

/// numpy marks arrays of 4 MiB and more `MADV_HUGEPAGE`, and the mark outlives the array: a
/// block released with it comes back zeroed all the same (whatever backs it, a huge page or
/// base pages), through the worker, inline zeroing and `trim`.
#[test]
fn a_block_left_marked_for_huge_pages_comes_back_zero() {
    let _g = serial();
    for round in 0..6u8 {
        let mut v = vec![0u8; 6 << 20]; // an 8 MiB block, aligned to 8 MiB
        assert!(GLOBAL.owns(v.as_ptr()));
        // SAFETY: the vector's own memory; advice changes no contents.
        let r = unsafe { libc::madvise(v.as_mut_ptr().cast(), 6 << 20, libc::MADV_HUGEPAGE) };
        assert_eq!(r, 0);
        assert!(v.iter().all(|&b| b == 0), "round {round}");
        v.fill(0xa0 | round);
        drop(v);
        match round % 3 {
            0 => GLOBAL.flush(), // zeroed by the worker
            1 => {}              // perhaps taken back and zeroed inline
            _ => {
                GLOBAL.flush();
                GLOBAL.trim(); // given back, the slot reused
            }
        }
    }
}

#[test]
fn alignments_up_to_the_largest_block_and_sizes_past_it() {
    let _g = serial();
    for align in [8usize, 4096, 64 << 10, 1 << 20, 2 << 20, 32 << 20] {
        let layout = Layout::from_size_align(100 << 10, align).unwrap();
        // SAFETY: a valid layout, released with it.
        unsafe {
            let p = GLOBAL.alloc(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0, "align {align}");
            assert!(GLOBAL.owns(p), "align {align}");
            p.write_bytes(3, layout.size());
            GLOBAL.dealloc(p, layout);
        }
    }
    // Past the largest pooled size: the inner allocator's.
    let big = vec![0u8; 80 << 20];
    assert!(!GLOBAL.owns(big.as_ptr()));
    drop(big);
    // An alignment no block has: the inner allocator's too.
    let layout = Layout::from_size_align(100 << 10, 128 << 20).unwrap();
    // SAFETY: a valid layout, released with it.
    unsafe {
        let p = GLOBAL.alloc(layout);
        if !p.is_null() {
            assert_eq!(p as usize % (128 << 20), 0);
            assert!(!GLOBAL.owns(p));
            GLOBAL.dealloc(p, layout);
        }
    }
    // A size no system can serve: null, no panic.
    let layout = Layout::from_size_align(isize::MAX as usize / 2, 8).unwrap();
    // SAFETY: a valid non-zero layout.
    let p = unsafe { GLOBAL.alloc_zeroed(layout) };
    assert!(p.is_null());
}

#[test]
fn threads_allocate_and_free_each_others_buffers() {
    let _g = serial();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let rx = std::sync::Arc::new(Mutex::new(rx));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let tx = tx.clone();
            let rx = rx.clone();
            std::thread::spawn(move || {
                let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                // Under ThreadSanitizer every store of the pools' zeroing is instrumented (and
                // 300 rounds took minutes of CI's hour): fewer rounds, the same interleavings.
                let rounds = if cfg!(pagepool_tsan) { 40 } else { 300 };
                for i in 0..rounds {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let size = (64 << 10) + (x % (16 << 20)) as usize;
                    let mut v = if i % 2 == 0 {
                        let v = vec![0u8; size];
                        assert!(v.iter().step_by(4096).all(|&b| b == 0), "not zero");
                        v
                    } else {
                        Vec::with_capacity(size)
                    };
                    v.resize(size, 0);
                    v.fill((t as u8) | 0x80);
                    if i % 3 == 0 {
                        tx.send(v).unwrap(); // freed by another thread
                    }
                    if i % 5 == 0
                        && let Ok(other) = rx.lock().unwrap().try_recv()
                    {
                        let mark = other[0];
                        assert!(mark & 0x80 != 0 && other.iter().step_by(4096).all(|&b| b == mark));
                    }
                }
            })
        })
        .collect();
    drop(tx);
    for t in threads {
        t.join().unwrap();
    }
    let left: Vec<Vec<u8>> = rx.lock().unwrap().try_iter().collect();
    drop(left);
    GLOBAL.flush();
    let s = stats();
    assert_eq!(s.queued_pages, 0);
    assert!(s.dirty_hits + s.clean_hits > 0, "{s}");
}

#[test]
fn a_forked_child_sees_its_parents_buffers_and_allocates_on_its_own() {
    let _g = serial();
    let mut parent = vec![7u8; 8 << 20];
    assert!(GLOBAL.owns(parent.as_ptr()));
    // SAFETY: fork; the child below only runs this test's code and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = (|| {
            if !parent.iter().all(|&b| b == 7) {
                return 1;
            }
            parent.fill(9); // its own copy
            drop(parent);
            for _ in 0..20 {
                let v = vec![0u8; 8 << 20];
                if !GLOBAL.owns(v.as_ptr()) || !v.iter().all(|&b| b == 0) {
                    return 2;
                }
                drop(v);
            }
            let s = GLOBAL.stats().unwrap();
            if s.worker {
                return 3; // no worker in a child
            }
            if s.dirty_hits == 0 {
                return 4; // its own releases were reused
            }
            0
        })();
        // SAFETY: ends the child without running the test harness's exit path.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    assert!(
        parent.iter().all(|&b| b == 7),
        "the child wrote its own copy"
    );
    parent.fill(1);
}

#[test]
fn trim_gives_pooled_memory_back_and_the_registry_shows_the_pools() {
    let _g = serial();
    for _ in 0..4 {
        drop(vec![0u8; 4 << 20]);
        drop(Vec::<u8>::with_capacity(5 << 20));
    }
    GLOBAL.flush();
    let s = stats();
    assert!(s.dirty_pages + s.clean_pages > 0, "{s}");
    let table = pagepool::registry::Registry::global().stats().to_string();
    assert!(
        table.contains("private-clean") && table.contains("private-dirty"),
        "{table}"
    );
    assert!(GLOBAL.trim() > 0);
    let s = stats();
    assert_eq!(
        (s.dirty_pages, s.clean_pages, s.queued_pages),
        (0, 0, 0),
        "{s}"
    );
    assert!(s.released_blocks > 0);
    // Given back, the slots are reused, zero.
    let v = vec![0u8; 4 << 20];
    assert!(v.iter().all(|&b| b == 0));
}

/// A bad free ends the process with one line, as glibc does; run in a child (this binary
/// again), which must die of SIGABRT.
#[test]
fn bad_frees_end_the_process_with_one_line() {
    if let Ok(case) = std::env::var("PAGEPOOL_BAD_FREE") {
        let layout = Layout::from_size_align(1 << 20, 8).unwrap();
        // SAFETY: deliberately wrong, in a child that must abort before any harm.
        unsafe {
            let p = GLOBAL.alloc(layout);
            match case.as_str() {
                "double" => {
                    GLOBAL.dealloc(p, layout);
                    GLOBAL.dealloc(p, layout);
                }
                _ => GLOBAL.dealloc(p.add(4096), layout),
            }
        }
        println!("survived {case}");
        return;
    }
    for (case, says) in [
        ("double", "pagepool: double free of a pooled block"),
        (
            "inside",
            "pagepool: free of a pointer inside the pools that no block starts",
        ),
    ] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "bad_frees_end_the_process_with_one_line",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PAGEPOOL_BAD_FREE", case)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{case}: {err}");
        assert!(err.lines().any(|l| l == says), "{case}: {err}");
    }
}

/// A pressure source that signals once, then waits out every timeout (or stops).
struct SignalOnce(bool);

impl pagepool::pressure::PressureSource for SignalOnce {
    fn describe(&self) -> String {
        "signal once".into()
    }
    fn wait(
        &mut self,
        timeout: std::time::Duration,
        stop: std::os::fd::BorrowedFd<'_>,
    ) -> std::io::Result<pagepool::pressure::Wait> {
        if !std::mem::replace(&mut self.0, true) {
            return Ok(pagepool::pressure::Wait::Signal);
        }
        let mut fds = [rustix::event::PollFd::from_borrowed_fd(
            stop,
            rustix::event::PollFlags::IN,
        )];
        let t =
            rustix::event::Timespec::try_from(timeout.min(std::time::Duration::from_millis(50)))
                .expect("a short timeout");
        Ok(match rustix::event::poll(&mut fds, Some(&t)) {
            Ok(n) if n > 0 => pagepool::pressure::Wait::Stopped,
            _ => pagepool::pressure::Wait::Timeout,
        })
    }
}

/// The pools start the process registry's pressure monitor when they are made, and a pressure
/// signal to that registry gives pooled blocks back.
#[test]
fn the_pools_start_the_pressure_monitor_and_pressure_shrinks_them() {
    use pagepool::pressure::{PressureConfig, PressureMonitor};
    use pagepool::registry::Registry;
    let _g = serial();
    warm();
    let ps = Registry::global().pressure_stats();
    assert!(ps.is_some(), "no monitor after the pools were made");
    let bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 2 << 20]).collect();
    drop(bufs);
    GLOBAL.flush();
    let before = stats();
    let pooled = |s: &pagepool::alloc::PrivateStats| s.dirty_pages + s.clean_pages;
    assert!(pooled(&before) >= 8 * 512, "{before}");
    // The monitor replaced by one on a source that signals once (the registry's own, with
    // its default share: half of what the owners hold).
    let monitor = PressureMonitor::with_source(
        Registry::global(),
        Some(Box::new(SignalOnce(false))),
        None,
        PressureConfig::default(),
    )
    .expect("a monitor thread");
    Registry::global().set_monitor(Some(monitor));
    let t = std::time::Instant::now();
    loop {
        let p = Registry::global().pressure_stats().unwrap_or_default();
        if p.events > 0 {
            assert!(p.pages_released > 0, "{p:?}");
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "no event: {p:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let after = stats();
    assert!(
        pooled(&after) < pooled(&before) && after.released_blocks > before.released_blocks,
        "{before}\n{after}"
    );
    // The default monitor back, as the pools started it.
    Registry::global().set_monitor(None);
    assert!(Registry::global().start_monitor(PressureConfig::default()));
}
