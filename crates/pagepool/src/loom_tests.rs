//! Loom models of the deferred-free helper and of the heap's hand-off with its worker, side by
//! side: the helper serving whole items while a pressure scan and a flush race with it; the
//! heap's release queue racing with its worker, a pressure scan and a steal; the worker's
//! claims helped with stripe by stripe; zeroing jobs shared stripe by stripe; and a run
//! abandoned to whoever finishes its last stripe having exactly one owner. In the crate, as the
//! queue is crate-private; run by `.ci/loom` (`--lib loom_tests`). The models of the pools, the
//! registry and the thread caches are in `tests/loom.rs`.

use crate::config::STRIPE_BYTES;
use crate::deferred::{Item, Reason, ReleaseQueue, Work};
use crate::heap::handoff::Handoff;
use crate::heap::job::{Job, Run, Runs};
use crate::shrinker::Shrinker;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use std::sync::Arc;

/// The generic helper as the dma-buf pool runs it: its worker serves whole items, a releasing
/// thread queues one, a pressure scan and a flush race with them. The item is served or
/// scanned, once, and the flush waits for the worker's hands to be empty.
#[test]
fn helper_serves_or_scans_each_item_once() {
    struct Thing(usize);
    impl Item for Thing {
        fn pages(&self) -> usize {
            self.0
        }
    }
    loom::model(|| {
        let served = Arc::new(AtomicUsize::new(0));
        let scanned = Arc::new(AtomicUsize::new(0));
        let (s, p) = (served.clone(), scanned.clone());
        let queue = Arc::new(ReleaseQueue::<Thing>::new(
            4096,
            16,
            Box::new(move |t: Thing, why| {
                let to = if why == Reason::Normal { &s } else { &p };
                to.fetch_add(t.0, Ordering::SeqCst);
            }),
        ));
        queue.set_wake_pages(1);
        let worker = {
            let queue = queue.clone();
            thread::spawn(move || queue.serve(|| None))
        };
        let releaser = {
            let queue = queue.clone();
            thread::spawn(move || assert!(queue.queue(Thing(2)).is_ok()))
        };
        let freed = queue.scan(usize::MAX);
        releaser.join().unwrap();
        queue.flush();
        assert_eq!(queue.pending_pages(), 0, "flush waits for the worker");
        assert!(queue.stop().is_empty());
        worker.join().unwrap();
        assert_eq!(freed, scanned.load(Ordering::SeqCst));
        assert_eq!(
            served.load(Ordering::SeqCst) + scanned.load(Ordering::SeqCst),
            2,
            "served or scanned, once"
        );
    });
}

#[test]
fn release_queue_races_worker_pressure_scan_and_steal() {
    loom::model(|| {
        let released = Arc::new(AtomicUsize::new(0));
        let r = released.clone();
        let handoff = Arc::new(Handoff::new(
            4096,
            1 << 20,
            Box::new(move |runs: Runs, _| {
                r.fetch_add(Item::pages(&runs), Ordering::SeqCst);
            }),
            false,
        ));
        let zeroed = Arc::new(AtomicUsize::new(0));
        // The worker: claims and lands until stopped.
        let worker = {
            let (handoff, zeroed) = (handoff.clone(), zeroed.clone());
            thread::spawn(move || {
                while let Some(run) = handoff.claim() {
                    zeroed.fetch_add(run.pages(), Ordering::SeqCst);
                    handoff.landed(&run);
                }
            })
        };
        // A releasing thread queues a 2-chunk buffer; a pressure scan runs concurrently.
        let releaser = {
            let handoff = handoff.clone();
            thread::spawn(move || {
                handoff
                    .queue()
                    .queue(
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
        let scanned = handoff.scan(usize::MAX);
        releaser.join().unwrap();
        let stolen: usize = handoff.steal(8, 2, 2).iter().map(Run::pages).sum();
        handoff.queue().flush();
        let leftover: usize = handoff.queue().stop().iter().map(Item::pages).sum();
        worker.join().unwrap();
        // Every queued page was zeroed by the worker, released by the scan, or stolen: once.
        assert_eq!(leftover, 0, "flush drained the queue");
        assert_eq!(scanned, released.load(Ordering::SeqCst));
        assert_eq!(zeroed.load(Ordering::SeqCst) + scanned + stolen, 512);
        assert_eq!(handoff.queue().pending_pages(), 0);
    });
}

#[test]
fn job_stripes_are_zeroed_once_by_worker_and_helper() {
    /// The stripes a piece `(off, len)` covers, as bits.
    fn stripe_bits(off: usize, len: usize) -> usize {
        let (first, n) = (off / STRIPE_BYTES, len.div_ceil(STRIPE_BYTES));
        ((1 << n) - 1) << first
    }
    loom::model(|| {
        let handoff = Arc::new(Handoff::new(4096, 1 << 20, Box::new(|_, _| {}), false));
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
            let (handoff, taken) = (handoff.clone(), taken.clone());
            thread::spawn(move || {
                handoff.assist(
                    |_, off, len| {
                        let bits = stripe_bits(off, len);
                        assert_eq!(
                            taken.fetch_or(bits, Ordering::SeqCst) & bits,
                            0,
                            "stripe twice"
                        );
                    },
                    |_| panic!("nobody abandoned the run"),
                );
            })
        };
        assert!(handoff.offer(job.clone()));
        while let Some((off, len)) = job.next_stripe(4096) {
            let bits = stripe_bits(off, len);
            assert_eq!(
                taken.fetch_or(bits, Ordering::SeqCst) & bits,
                0,
                "stripe twice"
            );
            assert!(!job.finish(len));
        }
        helper.join().unwrap();
        assert!(job.complete(), "every stripe finished");
        assert_eq!(taken.load(Ordering::SeqCst), 0b11111);
        handoff.withdraw();
    });
}

/// The allocator-worker hand-off as the heap runs it: the worker claims a chunk, zeroes it
/// a piece at a time (the job open to helpers), waits for its helpers and lands it; an
/// allocation steals queued blocks from the other end, helps with the worker's claim and
/// waits (boundedly) for it to land. Every stripe is zeroed once, and every block ends up
/// either stolen or landed, once.
#[test]
fn steal_help_claim_land_hand_each_block_to_one_side() {
    fn stripe_bits(start: usize, off: usize, len: usize) -> usize {
        // Two blocks of 256 KiB (order 6): 4 stripes each, 8 bits over the two.
        let at = (start - (1 << 30)) + off;
        let (first, n) = (at / STRIPE_BYTES, len.div_ceil(STRIPE_BYTES));
        ((1 << n) - 1) << first
    }
    loom::model(|| {
        let handoff = Arc::new(Handoff::new(4096, 1 << 20, Box::new(|_, _| {}), false));
        let block_pages = 1 << 6;
        handoff
            .queue()
            .queue(
                [Run {
                    start: 1 << 30,
                    order: 6,
                    count: 2,
                }]
                .into_iter()
                .collect(),
            )
            .unwrap();
        let zeroed = Arc::new(AtomicUsize::new(0)); // one bit per stripe
        let landed = Arc::new(AtomicUsize::new(0)); // pages
        let zero = {
            let zeroed = zeroed.clone();
            move |run: Run, off: usize, len: usize| {
                let bits = stripe_bits(run.start, off, len);
                assert_eq!(
                    zeroed.fetch_or(bits, Ordering::SeqCst) & bits,
                    0,
                    "stripe zeroed twice"
                );
            }
        };
        let worker = {
            let (handoff, landed, zero) = (handoff.clone(), landed.clone(), zero.clone());
            thread::spawn(move || {
                while let Some(work) = handoff.next_work() {
                    let Work::Claim(job) = work else { continue };
                    while let Some((off, len)) = job.next_worker_piece(4096) {
                        zero(job.run(), off, len);
                        assert!(!job.finish(len), "nobody abandons the worker's claim");
                    }
                    while !job.complete() {
                        thread::yield_now();
                    }
                    landed.fetch_add(job.run().pages(), Ordering::SeqCst);
                    handoff.landed(&job.run());
                }
            })
        };
        // The allocation: one block stolen (zeroed whole by itself), then help with
        // whatever the worker holds, then a bounded wait for it to land.
        let stolen: Vec<Run> = handoff.steal(6, 1, 2).into_iter().collect();
        for r in &stolen {
            zero(*r, 0, r.pages() * 4096);
        }
        let z = zero.clone();
        handoff.help(6, |job, off, len| z(job.run(), off, len));
        handoff.wait_landed();
        handoff.queue().flush();
        let leftover: usize = handoff.queue().stop().iter().map(Item::pages).sum();
        worker.join().unwrap();
        let stolen_pages: usize = stolen.iter().map(Run::pages).sum();
        assert_eq!(leftover, 0, "flush drained the queue");
        assert_eq!(
            stolen_pages + landed.load(Ordering::SeqCst),
            2 * block_pages,
            "each block stolen or landed, once"
        );
        assert_eq!(zeroed.load(Ordering::SeqCst), 0xff, "every stripe zeroed");
        assert_eq!(handoff.queue().pending_pages(), 0);
    });
}

/// An allocation that gives up waiting for the worker's stripe and the worker finishing
/// it: whatever the interleaving, exactly one of them owns the run afterwards.
#[test]
fn an_abandoned_run_has_exactly_one_owner() {
    loom::model(|| {
        let pages = 2 * STRIPE_BYTES / 4096;
        let run = Run {
            start: 1 << 30,
            order: 0,
            count: pages,
        };
        let job = Arc::new(Job::new(run, pages, 4096));
        let owners = Arc::new(AtomicUsize::new(0));
        // The worker holds one stripe (half of the two: the last).
        let (off, len) = job.next_worker_piece(4096).unwrap();
        assert_eq!(off, STRIPE_BYTES);
        let worker = {
            let (job, owners) = (job.clone(), owners.clone());
            thread::spawn(move || {
                if job.finish(len) {
                    owners.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // The allocation zeroes the other one, then gives up on the run.
        let (_, len2) = job.next_stripe(4096).unwrap();
        assert!(!job.finish(len2));
        assert!(job.next_stripe(4096).is_none());
        if job.complete() || !job.abandon() {
            owners.fetch_add(1, Ordering::SeqCst);
        }
        worker.join().unwrap();
        assert_eq!(owners.load(Ordering::SeqCst), 1);
    });
}
