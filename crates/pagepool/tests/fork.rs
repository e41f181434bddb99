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

/// What a freshly forked child finds of pagepool in itself: the bit 1 for a descriptor of a
/// pagepool memfd (`/proc/self/fd`), 2 for any mapping of one (`/proc/self/maps`; the
/// placeholders put over inherited buffers are anonymous, so any line naming the memfd counts).
/// Each finding is written to standard error. Runs in a child of a multi-threaded process, so
/// it allocates nothing and makes only async-signal-safe calls (`open`, `getdents64`,
/// `readlinkat`, `read`, `write`, `close`), with buffers on the stack.
fn pagepool_left_in_me() -> i32 {
    const NEEDLE: &[u8] = b"memfd:pagepool";
    fn contains(hay: &[u8]) -> bool {
        hay.windows(NEEDLE.len()).any(|w| w == NEEDLE)
    }
    fn say(what: &[u8], line: &[u8]) {
        for part in [what, line, b"\n".as_slice()] {
            // SAFETY: writes `part`, a live slice, to standard error.
            unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
        }
    }
    let mut found = 0;
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let dir = unsafe {
        libc::open(
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return 4;
    }
    #[repr(C, align(8))]
    struct Dirents([u8; 4096]);
    let mut ents = Dirents([0; 4096]);
    loop {
        // SAFETY: getdents64 writes at most the buffer's length into it.
        let n =
            unsafe { libc::syscall(libc::SYS_getdents64, dir, ents.0.as_mut_ptr(), ents.0.len()) };
        if n <= 0 {
            break;
        }
        let mut at = 0;
        while at < n as usize {
            // struct linux_dirent64: ino (8), off (8), reclen (2), type (1), name (NUL-ended).
            let reclen = u16::from_ne_bytes([ents.0[at + 16], ents.0[at + 17]]) as usize;
            let name = &ents.0[at + 19..at + reclen];
            if name[0] != b'.' {
                let mut link = [0u8; 512];
                // SAFETY: `name` is NUL-terminated inside the record; readlinkat writes at most
                // `link.len()` bytes.
                let len = unsafe {
                    libc::readlinkat(
                        dir,
                        name.as_ptr().cast(),
                        link.as_mut_ptr().cast(),
                        link.len(),
                    )
                };
                if len > 0 && contains(&link[..len as usize]) {
                    say(b"descriptor: ", &link[..len as usize]);
                    found |= 1;
                }
            }
            at += reclen;
        }
    }
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(dir) };
    // SAFETY: as for the directory.
    let maps = unsafe {
        libc::open(
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if maps < 0 {
        return 4;
    }
    let mut chunk = [0u8; 4096];
    let mut line = [0u8; 512]; // longer lines keep their first 512 bytes
    let mut len = 0;
    loop {
        // SAFETY: read writes at most the buffer's length into it.
        let n = unsafe { libc::read(maps, chunk.as_mut_ptr().cast(), chunk.len()) };
        if n <= 0 {
            break;
        }
        for &b in &chunk[..n as usize] {
            if b == b'\n' {
                if contains(&line[..len]) {
                    say(b"mapping: ", &line[..len]);
                    found |= 2;
                }
                len = 0;
            } else if len < line.len() {
                line[len] = b;
                len += 1;
            }
        }
    }
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(maps) };
    found
}

/// Issue 23: threads keep making and unmapping arenas (heaps that pool nothing: every
/// allocation maps a new arena, every release unmaps and closes it), buffer views, and whole
/// heaps, while the main thread forks child after child; no child may find a pagepool memfd
/// among its descriptors or mappings, however the fork fell among the creations.
#[test]
fn no_child_inherits_a_descriptor_or_mapping_made_during_the_fork() {
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    let stop = Arc::new(AtomicBool::new(false));
    let views = Arc::new(AtomicUsize::new(0));
    let rounds: Arc<Vec<AtomicUsize>> = Arc::new((0..5).map(|_| AtomicUsize::new(0)).collect());
    let mut threads = Vec::new();
    // Arenas: each allocation makes one (memfd, mapping), each release unmaps and closes it.
    for t in 0..2 {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        threads.push(std::thread::spawn(move || {
            let heap = SystemHeap::builder()
                .name(&format!("fork-arenas-{t}"))
                .orders(&[4, 0])
                .pool_limit(0)
                .thread_cache(0)
                .deferred(false)
                .arena_size(64 << 10)
                .build()
                .unwrap();
            let sizes = [4096, 16 << 10, 64 << 10, 8192];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let b = heap.alloc(sizes[i % sizes.len()]).unwrap();
                assert!(all(&b, 0));
                drop(b);
                i += 1;
                rounds[t].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Views: pooled blocks that are not end to end, mapped together for each buffer.
    for t in 2..4 {
        let (stop, rounds, views) = (stop.clone(), rounds.clone(), views.clone());
        threads.push(std::thread::spawn(move || {
            let heap = SystemHeap::builder()
                .name(&format!("fork-views-{t}"))
                .orders(&[4, 0])
                .thread_cache(0)
                .deferred(false)
                .build()
                .unwrap();
            let blocks: Vec<_> = (0..8).map(|_| heap.alloc(64 << 10).unwrap()).collect();
            let (gaps, _keep): (Vec<_>, Vec<_>) = blocks
                .into_iter()
                .enumerate()
                .partition(|(i, _)| i % 2 == 1);
            drop(gaps);
            while !stop.load(Ordering::Relaxed) {
                let b = heap.alloc(3 * (64 << 10)).unwrap();
                if b.is_remapped() {
                    views.fetch_add(1, Ordering::Relaxed);
                }
                drop(b);
                rounds[t].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Whole heaps, made, used and dropped.
    {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let heap = SystemHeap::builder()
                    .name("fork-heaps")
                    .orders(&[4, 0])
                    .pool_limit(0)
                    .deferred(false)
                    .arena_size(64 << 10)
                    .build()
                    .unwrap();
                let a = heap.alloc(4096).unwrap();
                let b = heap.alloc(128 << 10).unwrap();
                drop(a);
                drop(heap);
                drop(b);
                rounds[4].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    while rounds.iter().any(|r| r.load(Ordering::Relaxed) == 0)
        && !threads.iter().any(|t| t.is_finished())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut children = 0;
    let mut bad = Vec::new();
    while children < 300 && Instant::now() < deadline && !threads.iter().any(|t| t.is_finished()) {
        // SAFETY: fork has no preconditions; the child only scans and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: alarm and _exit are async-signal-safe and have no preconditions.
            unsafe {
                libc::alarm(10);
                libc::_exit(pagepool_left_in_me());
            }
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            bad.push(status);
        }
        children += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let done: Vec<_> = rounds.iter().map(|r| r.load(Ordering::Relaxed)).collect();
    assert!(
        bad.is_empty(),
        "{} of {children} children inherited pagepool memory (wait statuses; exit code bit 1: \
         a descriptor, bit 2: a mapping): {bad:?}; rounds per thread {done:?}",
        bad.len()
    );
    assert!(children > 0 && done.iter().all(|&n| n > 0));
    assert!(views.load(Ordering::Relaxed) > 0, "no views were made");
    eprintln!(
        "{children} children in {:?}; rounds per thread {done:?}, {} views",
        started.elapsed(),
        views.load(Ordering::Relaxed)
    );
}
