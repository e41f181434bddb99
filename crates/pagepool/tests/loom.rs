//! Loom models of the pool's concurrent give/take and of the registry's shrink racing with them.
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

#[test]
fn freelist_queue_races_worker_and_pressure_scan() {
    use pagepool::deferred::{Freelist, Run};
    loom::model(|| {
        let released = Arc::new(AtomicUsize::new(0));
        let r = released.clone();
        let list = Arc::new(Freelist::new(
            4096,
            1 << 20,
            Box::new(move |run: Run| {
                r.fetch_add(run.pages(), Ordering::SeqCst);
            }),
        ));
        let zeroed = Arc::new(AtomicUsize::new(0));
        // The worker: claims and lands until stopped.
        let worker = {
            let (list, zeroed) = (list.clone(), zeroed.clone());
            thread::spawn(move || {
                while let Some(run) = list.claim() {
                    zeroed.fetch_add(run.pages(), Ordering::SeqCst);
                    list.landed(&run);
                }
            })
        };
        // A releasing thread queues a 2-chunk buffer; a pressure scan runs concurrently.
        let releaser = {
            let list = list.clone();
            thread::spawn(move || {
                list.queue(
                    [Run {
                        start: 1 << 30,
                        order: 8,
                        count: 2,
                    }]
                    .into_iter()
                    .collect(),
                )
                .unwrap();
            })
        };
        let scanned = list.scan(usize::MAX);
        releaser.join().unwrap();
        let stolen: usize = list.steal(8, 2).iter().map(Run::pages).sum();
        list.flush();
        let leftover: usize = list.stop().iter().map(Run::pages).sum();
        worker.join().unwrap();
        // Every queued page was zeroed by the worker, released by the scan, or stolen: once.
        assert_eq!(leftover, 0, "flush drained the queue");
        assert_eq!(scanned, released.load(Ordering::SeqCst));
        assert_eq!(zeroed.load(Ordering::SeqCst) + scanned + stolen, 512);
        assert_eq!(list.pending_pages(), 0);
    });
}

#[test]
fn job_stripes_are_zeroed_once_by_worker_and_helper() {
    /// The stripes a piece `(off, len)` covers, as bits.
    fn stripe_bits(off: usize, len: usize) -> usize {
        use pagepool::deferred::STRIPE_BYTES;
        let (first, n) = (off / STRIPE_BYTES, len.div_ceil(STRIPE_BYTES));
        ((1 << n) - 1) << first
    }
    use pagepool::deferred::{Freelist, Job, Run, STRIPE_BYTES};
    loom::model(|| {
        let list = Arc::new(Freelist::new(4096, 1 << 20, Box::new(|_| {})));
        // A run of three stripes.
        // Five stripes: the first claim takes two (half of what is left), then one at a time.
        let pages = 5 * STRIPE_BYTES / 4096;
        let run = Run {
            start: 1 << 30,
            order: 0,
            count: pages,
        };
        let job = Arc::new(Job::new(run, pages, 4096));
        let taken = Arc::new(AtomicUsize::new(0)); // one bit per stripe
        let helper = {
            let (list, taken) = (list.clone(), taken.clone());
            thread::spawn(move || {
                list.assist(|_, off, len| {
                    let bits = stripe_bits(off, len);
                    assert_eq!(
                        taken.fetch_or(bits, Ordering::SeqCst) & bits,
                        0,
                        "stripe twice"
                    );
                });
            })
        };
        assert!(list.share(Some(job.clone())));
        while let Some((off, len)) = job.next_stripe(4096) {
            let bits = stripe_bits(off, len);
            assert_eq!(
                taken.fetch_or(bits, Ordering::SeqCst) & bits,
                0,
                "stripe twice"
            );
            job.finish(len);
        }
        helper.join().unwrap();
        assert!(job.complete(), "every stripe finished");
        assert_eq!(taken.load(Ordering::SeqCst), 0b11111);
        list.share(None);
    });
}
