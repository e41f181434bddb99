//! The fork table's and the gate's unit tests.

use super::*;

#[test]
fn mapping_words_round_trip_and_split() {
    let p = NonNull::new(0x7f12_3456_7000 as *mut u8).unwrap();
    let mut got = Vec::new();
    mapping_entries(p, 5 << 12, |w| got.push(decode_mapping(w)));
    assert_eq!(got, [(0x7f12_3456_7000, 5 << 12)]);
    got.clear();
    mapping_entries(p, (ENTRY_PAGES + 3) << 12, |w| got.push(decode_mapping(w)));
    assert_eq!(
        got,
        [
            (0x7f12_3456_7000, ENTRY_PAGES << 12),
            (0x7f12_3456_7000 + (ENTRY_PAGES << 12), 3 << 12)
        ]
    );
}

#[test]
fn table_inserts_removes_and_grows() {
    let t = Table {
        first: Chunk::new(),
    };
    for w in 1..=600u64 {
        t.insert(w).unwrap();
    }
    assert_eq!(t.chunks().count(), 3);
    for w in (1..=600u64).step_by(2) {
        t.remove(w);
    }
    t.insert(7).unwrap(); // reuses a free word
    let mut left = Vec::new();
    t.drain(|w| left.push(w));
    left.sort_unstable();
    let mut want: Vec<u64> = (2..=600).step_by(2).collect();
    want.push(7);
    want.sort_unstable();
    assert_eq!(left, want);
    let mut after = 0;
    t.drain(|_| after += 1);
    assert_eq!(after, 0);
}

/// A fork waits for a gate another thread has open: the child's memory shows what that
/// thread did before closing it. Without the wait the child would be forked at once, a
/// moment after the gate opened, and would see none of it.
#[test]
fn a_fork_waits_for_an_open_gate() {
    use std::sync::atomic::AtomicBool;
    static OPEN: AtomicBool = AtomicBool::new(false);
    static DONE: AtomicBool = AtomicBool::new(false);
    let creator = std::thread::spawn(|| {
        let outer = Gate::open();
        let inner = Gate::open(); // gates nest
        OPEN.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(100));
        DONE.store(true, Ordering::SeqCst);
        drop(inner);
        drop(outer);
    });
    while !OPEN.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    // SAFETY: the child only reads atomics and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = DONE.load(Ordering::SeqCst) && GATE.load(Ordering::SeqCst) == 0;
        // SAFETY: async-signal-safe, no preconditions.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    creator.join().unwrap();
    assert!(!Gate::inside());
}

#[test]
fn cell_keeps_its_value_within_a_generation() {
    let c = ForkCell::new(5);
    assert_eq!(*c.get(|_| unreachable!()), 5);
}
