//! pagepool on a busy machine: what the heap does when other threads keep every core busy.
//!
//! Run with `cargo run --release -p pagepool --example busy`. Two threads allocate, use and
//! release buffers (1 MiB and 4 MiB) from one default heap for half a second on an idle
//! machine, then for half a second while one busy thread per core computes at normal
//! priority, and the heap's counters of each phase are printed side by side: on an idle
//! machine the background worker (nice 19) zeroes most released buffers; on a busy one the
//! scheduler rarely runs it, so the releases are zeroed by the releasing threads themselves
//! (the queue refuses them), as a heap built with `deferred(false)` does, and no allocation
//! waits for the worker. (On a machine that other programs already keep busy, the first phase
//! looks like the second.)
//!
//! It measures no times: `heap-bench` does (`--mode loaded` runs its rows beside one busy thread
//! per core; `--switches` tells the calls the scheduler preempted from those that kept the CPU;
//! `--systems pagepool,pagepool-sync,pagepool-control` puts the heap beside a synchronous one
//! and beside a second default heap). What it checks is correctness: every byte it reads, one
//! per page of every buffer before writing it, must be zero; if one is not, it says so and
//! exits with status 1.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pagepool::{HeapStats, SystemHeap};

/// The buffer sizes, one allocating thread each.
const SIZES: [usize; 2] = [1 << 20, 4 << 20];
/// How long each phase lasts.
const PHASE: Duration = Duration::from_millis(500);
/// Work between a buffer's use and its release, as a program would do with it.
const WORK: Duration = Duration::from_micros(50);

/// Computes for `d`: no system call, no memory.
fn compute(d: Duration) {
    let end = Instant::now() + d;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while Instant::now() < end {
        for _ in 0..64 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
        }
        black_box(x);
    }
}

/// Reads one byte per page of `buf` and writes it; returns how many did not read zero.
fn use_buffer(buf: &mut [u8], page: usize) -> usize {
    let mut bad = 0;
    for off in (0..buf.len()).step_by(page) {
        // Volatile, so that neither the check nor the write is optimised away.
        let p = &raw mut buf[off];
        // SAFETY: `p` points into `buf`, which this thread borrows mutably.
        unsafe {
            bad += usize::from(p.read_volatile() != 0);
            p.write_volatile(1);
        }
    }
    bad
}

/// One phase: each size's thread allocates, uses, works and releases until `PHASE` is over.
/// Returns the calls made and the bytes that did not read zero.
fn phase(heap: &SystemHeap) -> Result<(usize, usize), String> {
    let page = pagepool::page_size();
    std::thread::scope(|s| {
        let threads: Vec<_> = SIZES
            .iter()
            .map(|&size| {
                s.spawn(move || -> Result<(usize, usize), String> {
                    let (mut calls, mut bad) = (0, 0);
                    let end = Instant::now() + PHASE;
                    while Instant::now() < end {
                        let mut buf = heap
                            .alloc(size)
                            .map_err(|e| format!("alloc({size}): {e}"))?;
                        bad += use_buffer(&mut buf, page);
                        compute(WORK);
                        drop(buf);
                        calls += 1;
                    }
                    Ok((calls, bad))
                })
            })
            .collect();
        threads.into_iter().try_fold((0, 0), |(c, b), t| {
            let (calls, bad) = t
                .join()
                .map_err(|_| "an allocating thread panicked".to_string())??;
            Ok((c + calls, b + bad))
        })
    })
}

/// One phase's counters: how the heap's allocations were served and who zeroed the releases.
struct Counts {
    calls: usize,
    pool_hits: u64,
    fresh_pages: u64,
    zeroed_by_worker: u64,
    zeroed_on_release: u64,
    zeroed_inline: u64,
    waited_for_worker: u64,
    refused_by_queue: u64,
}

impl Counts {
    fn between(calls: usize, a: &HeapStats, b: &HeapStats) -> Counts {
        Counts {
            calls,
            pool_hits: b.hits - a.hits,
            fresh_pages: b.fresh_pages - a.fresh_pages,
            zeroed_by_worker: b.zeroed_worker - a.zeroed_worker,
            zeroed_on_release: b.zeroed_sync - a.zeroed_sync,
            zeroed_inline: b.zeroed_inline - a.zeroed_inline,
            waited_for_worker: b.waited_for_worker - a.waited_for_worker,
            refused_by_queue: b.queue_refused - a.queue_refused,
        }
    }

    fn rows(&self) -> [(&'static str, u64); 8] {
        [
            ("calls", self.calls as u64),
            ("pool hits", self.pool_hits),
            ("fresh pages", self.fresh_pages),
            ("blocks zeroed by the worker", self.zeroed_by_worker),
            ("blocks zeroed on release", self.zeroed_on_release),
            ("blocks zeroed at allocation", self.zeroed_inline),
            (
                "allocations that waited for the worker",
                self.waited_for_worker,
            ),
            ("releases the queue refused", self.refused_by_queue),
        ]
    }
}

fn run() -> Result<usize, String> {
    let heap = SystemHeap::new().map_err(|e| format!("cannot build the heap: {e}"))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // A short warm-up, so that both phases start with warm pools.
    phase(&heap)?;
    heap.flush();

    let s0 = heap.stats();
    let (idle_calls, idle_bad) = phase(&heap)?;
    heap.flush();
    let idle = Counts::between(idle_calls, &s0, &heap.stats());

    let stop = AtomicBool::new(false);
    let s1 = heap.stats();
    let busy_phase = std::thread::scope(|s| {
        for _ in 0..cores {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    compute(Duration::from_millis(1));
                }
            });
        }
        let r = phase(&heap);
        stop.store(true, Ordering::Relaxed);
        r
    });
    let (busy_calls, busy_bad) = busy_phase?;
    heap.flush();
    let busy = Counts::between(busy_calls, &s1, &heap.stats());

    println!(
        "{} ms per phase, one thread allocating each of {} and {} KiB, {} us of work per call; \
         busy: {cores} threads computing at normal priority",
        PHASE.as_millis(),
        SIZES[0] >> 10,
        SIZES[1] >> 10,
        WORK.as_micros()
    );
    println!("{:<40} {:>10} {:>10}", "", "idle", "busy");
    for ((what, i), (_, b)) in idle.rows().into_iter().zip(busy.rows()) {
        println!("{what:<40} {i:>10} {b:>10}");
    }
    Ok(idle_bad + busy_bad)
}

fn main() {
    match run() {
        Ok(0) => println!("zero check: every byte read before it was written was zero"),
        Ok(bad) => {
            println!("ZERO CHECK FAILED: {bad} bytes were not zero");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("busy: {e}");
            std::process::exit(2);
        }
    }
}
