//! The deferred-free worker's loop: claim queued runs, zero them (sharing the stripes with
//! allocations that help), land them in the pools; and its throughput counters.

use super::core::HeapInner;
use super::handoff::Handoff;
use super::job::{Job, Run};
use crate::config::STRIPE_BYTES;
use crate::deferred::Work;
use crate::sync::{Arc, Ordering};

/// Starts the worker thread of `inner` (`pagepool-free`).
pub(super) fn spawn(inner: &Arc<HeapInner>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let h = inner.clone();
    crate::deferred::spawn_worker("pagepool-free", move || h.work())
}

impl HeapInner {
    /// The worker's [`zero_part`](Self::zero_part): a stripe at a time, renewing its promise
    /// after each, so that whoever waits for it sees it making progress (see
    /// `Handoff::wait_worker`).
    ///
    /// # Safety
    /// As for `zero_part`.
    unsafe fn zero_part_working(&self, handoff: &Handoff, job: &Job, off: usize, len: usize) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(STRIPE_BYTES);
            // SAFETY: a sub-range of the piece the caller was handed.
            unsafe { self.zero_part_uncounted(job, off + done, n) };
            handoff.queue().promise(std::time::Duration::ZERO);
            done += n;
        }
    }

    /// Lands a claimed (or adopted) run that is now zeroed: into the pools, and the claim
    /// counts as landed.
    fn land(&self, handoff: &Handoff, run: &Run) {
        let _locking = handoff.queue().locking();
        // Pooled first, counted after: a run counted as zeroed by the worker has landed.
        self.give_runs(std::slice::from_ref(run));
        self.counters
            .worker
            .zeroed
            .fetch_add(run.count as u64, Ordering::Relaxed);
        handoff.landed(run);
    }

    /// The worker: claims queued runs, zeroes them, gives them to the pools, until stopped.
    fn work(&self) {
        let Some(handoff) = &self.handoff else {
            return;
        };
        while let Some(work) = handoff.next_work() {
            let job = match work {
                Work::Claim(job) => job,
                Work::Idle => continue, // not asked for: no poll time
                Work::Other => {
                    let t = std::time::Instant::now();
                    let mut mine = 0;
                    handoff.assist(
                        |job, off, len| {
                            // SAFETY: `assist` handed the worker this stripe of the shared run.
                            unsafe { self.zero_part_working(handoff, job, off, len) };
                            mine += len;
                        },
                        // The allocation gave up on its run: it is the worker's to land.
                        |job| {
                            let _locking = handoff.queue().locking();
                            let run = job.run();
                            self.give_runs(std::slice::from_ref(&run));
                            self.counters
                                .worker
                                .zeroed
                                .fetch_add(run.count as u64, Ordering::Relaxed);
                            handoff.landed_adopted(&run);
                        },
                    );
                    self.count_worker(mine, t.elapsed());
                    continue;
                }
            };
            let t = std::time::Instant::now();
            // Zero the claim a piece at a time; an allocation waiting for it may take pieces
            // too (`next_work` published the job with the claim).
            let run = job.run();
            let mut mine = 0;
            while let Some((off, len)) = job.next_worker_piece(self.page) {
                // SAFETY: the stripe lies in the claimed run, which belongs to the worker (and to
                // helpers, one piece each) until it lands.
                unsafe { self.zero_part_working(handoff, &job, off, len) };
                let landed_by_me = job.finish(len);
                debug_assert!(!landed_by_me, "nobody abandons the worker's claim");
                mine += len;
            }
            // The worker's own zeroing ends here; what follows is waiting for helpers (each
            // zeroing a stripe of 64 KiB, a few microseconds): a short exponential spin, then
            // yielding the core at each look (a helper is an allocation, at normal priority; no
            // allocation waits for the worker meanwhile for long, see `Tempo::handoff_wait`).
            self.count_worker(mine, t.elapsed());
            let backoff = crossbeam_utils::Backoff::new();
            while !job.complete() {
                backoff.snooze();
            }
            self.land(handoff, &run);
        }
    }

    /// Adds `bytes` zeroed by the worker itself in `took` to its throughput counters.
    fn count_worker(&self, bytes: usize, took: std::time::Duration) {
        let w = &self.counters.worker;
        w.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        w.nanos.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }
}
