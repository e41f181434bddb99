//! Loom models of the pool's concurrent give/take and of the registry's shrink racing with them.
//! (The deferred-free queue's models are in the crate: `src/deferred.rs`, `loom_tests`.)
//!
//! Run with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom`
//! (`.ci/loom` does). Blocks are small heap allocations: the pool only needs memory it can
//! thread its links through.
#![cfg(loom)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use pagepool::{Block, PagePool, Registry, Shrinker};
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

fn counting_release(released: Arc<AtomicUsize>) -> pagepool::ReleaseFn {
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
