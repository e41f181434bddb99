//! Loom models of the pool's concurrent give/take, of the registry's shrink racing with them,
//! and of the thread caches handing buffers back. (The models of the deferred-free helper
//! and of the heap's allocator-worker hand-off are in the crate, side by side:
//! `src/loom_tests.rs`.)
//!
//! Run with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom`
//! (`.ci/loom` does). Blocks are small heap allocations: the pool only needs memory it can
//! thread its links through.
#![cfg(loom)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use pagepool::{
    pool::{Block, PagePool},
    registry::{Registry, Shrinker},
};
use std::sync::Arc;

const LAYOUT: Layout = match Layout::from_size_align(64, 64) {
    Ok(l) => l,
    Err(_) => panic!(),
};

fn block() -> Block {
    // SAFETY: a fresh zeroed allocation, at least 8 bytes, freed with `free` below.
    unsafe { Block::from_raw(NonNull::new(alloc_zeroed(LAYOUT)).unwrap(), 0) }
}

fn free(b: Block) {
    // SAFETY: every block in these models comes from `block`.
    unsafe { dealloc(b.into_raw().as_ptr(), LAYOUT) }
}

fn counting_release(released: Arc<AtomicUsize>) -> pagepool::pool::ReleaseFn {
    Box::new(move |b| {
        released.fetch_add(1, Ordering::SeqCst);
        free(b);
    })
}

#[test]
fn give_take_race() {
    loom::model(|| {
        let released = Arc::new(AtomicUsize::new(0));
        let pool = Arc::new(PagePool::new(0, counting_release(released.clone())));
        pool.give(block()).unwrap();
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                thread::spawn(move || {
                    // Take (maybe), check the block is clean, give back.
                    if let Some(b) = pool.take() {
                        // SAFETY: the block is ours and 8 bytes long at least.
                        assert_eq!(unsafe { b.as_ptr().cast::<usize>().as_ptr().read() }, 0);
                        pool.give(b).unwrap();
                    }
                    pool.give(block()).unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(pool.blocks(), 3);
        let s = pool.stats();
        assert_eq!(s.given - s.taken, 3);
        drop(pool);
        assert_eq!(
            released.load(Ordering::SeqCst),
            3,
            "drop released every block once"
        );
    });
}

#[test]
fn registry_shrink_races_give_and_take() {
    loom::model(|| {
        let released = Arc::new(AtomicUsize::new(0));
        let registry = Registry::new(usize::MAX);
        let owner = registry.register("model", usize::MAX);
        let pool = owner.add_pool(0, counting_release(released.clone()));
        pool.give(block()).unwrap();
        pool.give(block()).unwrap();

        let p = pool.clone();
        let user = thread::spawn(move || {
            let b = p.take();
            p.give(block()).unwrap();
            b
        });
        let r = registry.clone();
        let shrinker = thread::spawn(move || r.scan(1));

        let held = user.join().unwrap();
        let freed = shrinker.join().unwrap();
        // Every block is pooled, held by the user, or released: none lost, none twice.
        let held_n = usize::from(held.is_some());
        assert_eq!(freed, released.load(Ordering::SeqCst));
        assert_eq!(pool.blocks() + held_n + freed, 3);
        assert_eq!(registry.count(), pool.pages());
        assert_eq!(owner.count(), pool.pages());
        if let Some(b) = held {
            free(b);
        }
    });
}

/// The thread caches' hand-back: two threads release dirty small buffers into their own caches
/// while the other allocates, releases and shrinks the same heap (a shrink asks every cache
/// to empty itself at its thread's next use of the heap; `flush` empties the caller's at
/// once). Whatever the interleaving, every buffer handed out reads zero, and at the end every
/// page is accounted for: given back, none left in a cache or lost. (Loom runs a finished
/// thread's thread-local destructors only when the model ends, so the hand-back at thread exit
/// is left to `tests/thread_cache.rs`.)
#[test]
fn thread_caches_hand_back_on_shrink_and_flush() {
    loom::model(|| {
        let heap = Arc::new(
            pagepool::SystemHeap::builder()
                .name("loom-cache")
                .registry(Registry::new(usize::MAX))
                .deferred(false) // no worker thread: loom models only its own threads
                .pressure(None)
                .thread_cache(16 << 10)
                .build()
                .unwrap(),
        );
        let other = {
            let heap = heap.clone();
            thread::spawn(move || {
                for fill in [0xee, 0xdd] {
                    let mut b = heap.alloc(4096).unwrap();
                    assert!(b.iter().all(|&x| x == 0), "a buffer handed out dirty");
                    b.fill(fill);
                    drop(b); // into this thread's cache, dirty
                }
                heap.flush(); // empties this thread's cache
            })
        };
        let mut b = heap.alloc(4096).unwrap();
        assert!(b.iter().all(|&x| x == 0), "a buffer handed out dirty");
        b.fill(0x11);
        drop(b);
        heap.shrink(usize::MAX);
        other.join().unwrap();
        let again = heap.alloc(4096).unwrap();
        assert!(again.iter().all(|&x| x == 0), "a buffer handed out dirty");
        drop(again);
        heap.trim();
        let st = heap.stats();
        assert_eq!(st.live_buffers, 0);
        assert_eq!(st.thread_cached_pages, 0, "no cache holds pages: {st}");
        assert_eq!(st.fresh_pages, st.released_pages, "every page back: {st}");
    });
}
