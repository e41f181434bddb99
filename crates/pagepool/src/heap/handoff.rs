//! The hand-off between allocations and the heap's worker: the heap's release queue of
//! buffers' runs ([`Handoff`] owns it), with what only the heap does with it. The worker claims
//! a chunk of the oldest buffer at a time, from its end, as a [`Job`] open to helpers; an
//! allocation that misses its pool steals queued blocks from the start of a buffer and zeroes
//! them itself (offering a large run to the idle worker, stripe by stripe), helps with the
//! worker's claim and waits, boundedly, for it to land; and gives up on a worker the scheduler
//! does not run, abandoning the run to it (adopted: the worker lands it).

use crossbeam_utils::CachePadded;

use super::core::HeapInner;
use super::job::{Blocks, Job, Run, Runs};
use crate::config::{CHUNK_PAGES, FIT_SCAN, SHARE_FROM, STRIPE_BYTES};
use crate::deferred::{Queue, Reason, ReleaseQueue, Work};
use crate::shrinker::Shrinker;
use crate::sync::{AtomicBool, Mutex, Ordering, lock, lock_within, try_lock};
use std::sync::Arc;

/// The heap's release queue: items are a buffer's runs, with per-order counts.
pub(crate) type RunQueue = ReleaseQueue<Runs, Blocks>;

/// The hand-off: the heap's release queue, the worker's current claim (open to helpers), and
/// the run an allocation shares with the idle worker.
pub(crate) struct Handoff {
    queue: RunQueue,
    /// The worker's current claim, open to helpers.
    job: Mutex<Option<Arc<Job>>>,
    /// A run an allocation is zeroing inline, open to the idle worker.
    shared: Mutex<Option<Arc<Job>>>,
    shared_hint: CachePadded<AtomicBool>,
}

impl Handoff {
    /// A hand-off over a release queue of `page`-byte pages holding at most `max_pages`
    /// queued and in-flight pages; `release` gives queued runs back to the system (a pressure
    /// scan, or the queue's stop), as the worker lands the others itself. `load_check`: see
    /// `HeapBuilder::load_check`.
    pub(crate) fn new(
        page: usize,
        max_pages: usize,
        release: Box<dyn Fn(Runs, Reason) + Send + Sync>,
        load_check: bool,
    ) -> Handoff {
        let mut queue = ReleaseQueue::new(page, max_pages, release);
        if !load_check {
            queue.set_load_check(None);
        }
        Handoff {
            queue,
            job: Mutex::new(None),
            shared: Mutex::new(None),
            shared_hint: CachePadded::new(AtomicBool::new(false)),
        }
    }

    /// The release queue: queueing, flush, stop, the worker's promise, statistics.
    pub(crate) fn queue(&self) -> &RunQueue {
        &self.queue
    }

    /// The heap worker's loop step (see `ReleaseQueue::next_with`): claims up to
    /// [`CHUNK_PAGES`] pages from the end of the oldest buffer's last run, as a [`Job`] open to
    /// helpers, with the size in pages of the buffer it came from (the worker zeroes runs of
    /// large buffers with streaming stores). The claim is *in flight* until
    /// [`landed`](Self::landed) is called with it.
    pub(crate) fn next_work(&self) -> Option<Work<Arc<Job>>> {
        let take = |l: &RunQueue, q: &mut Queue<Runs, Blocks>| {
            let (item, buffer_pages) = q.items().front_mut()?;
            let buffer_pages = *buffer_pages;
            let last = item.last_mut().expect("queued items are never empty");
            let k = last.count.min((CHUNK_PAGES >> last.order).max(1));
            last.count -= k;
            let run = Run {
                start: last.start + last.count * (l.page() << last.order),
                order: last.order,
                count: k,
            };
            if last.count == 0 {
                item.pop();
                if item.is_empty() {
                    q.items().pop_front();
                }
            }
            q.tally().queued[run.order as usize] -= run.count;
            l.took(q, run.pages());
            q.tally().in_flight[run.order as usize] += run.pages();
            q.claimed(run.pages());
            // Open to helpers before the queue's lock is released: whoever sees the claim in
            // flight finds its job (see `current_job`).
            let job = Arc::new(Job::new(run, buffer_pages, l.page()));
            *lock(&self.job) = Some(job.clone());
            Some(job)
        };
        self.queue
            .next_with(None, take, |o| self.shared_hint.load(o))
    }

    /// [`next_work`](Self::next_work) for the tests and models: the claimed run, or `None`
    /// once the queue is stopped.
    #[cfg(test)]
    pub(crate) fn claim(&self) -> Option<Run> {
        loop {
            match self.next_work()? {
                Work::Claim(job) => return Some(job.run()),
                Work::Other | Work::Idle => continue,
            }
        }
    }

    /// The worker's side: a claimed run has been zeroed and given to the pools.
    pub(crate) fn landed(&self, run: &Run) {
        {
            let mut job = lock(&self.job);
            if job.as_ref().is_some_and(|j| j.run() == *run) {
                *job = None;
            }
        }
        let pages = run.pages();
        self.queue
            .land(pages, |t| t.in_flight[run.order as usize] -= pages);
    }

    /// The allocator's side: claims up to `n` queued blocks of `order`, from the start of a
    /// buffer's runs, for an allocation that needs `want` (at least `n`) blocks of that order in
    /// all. The buffer is, among the oldest [`FIT_SCAN`], the one holding the smallest run of at
    /// least `want` blocks of the order (the oldest among equals), else the oldest one with
    /// blocks of the order. The caller owns them (dirty) and must zero
    /// them.
    pub(crate) fn steal(&self, order: u8, mut n: usize, want: usize) -> Runs {
        let mut out = Runs::new();
        let Some(mut q) = self.queue.lock_bounded() else {
            return out; // the worker holds the lock and is not running: do without
        };
        if q.tally().queued[order as usize] == 0 {
            return out;
        }
        let size = self.queue.page() << order;
        // From the start of a buffer's runs, while the worker claims from the end of the oldest
        // buffer's last run: the two zero one buffer from both ends. A buffer with a run of the
        // `want` blocks goes first, so that an allocation takes one released set whole rather
        // than the first blocks of another (mixing two sets: this buffer would need a view,
        // and every later buffer of that size would too, as the sets circulate): the buffer
        // whose run fits best (the smallest of at least `want` blocks), the oldest among
        // equals, so that a queue of buffers of one size is taken oldest first.
        // The smallest run of at least `least` blocks of the order in a buffer.
        let fit = |item: &Runs, least: usize| {
            item.iter()
                .filter(|r| r.order == order && r.count >= least)
                .map(|r| r.count)
                .min()
        };
        while n > 0 {
            let least = want.max(n);
            let best = (q.items().iter().take(FIT_SCAN).enumerate())
                .filter_map(|(i, (item, _))| fit(item, least).map(|c| (c, i)))
                .min();
            let Some(i) = best.map(|(_, i)| i).or_else(|| {
                q.items()
                    .iter()
                    .position(|(item, _)| fit(item, 1).is_some())
            }) else {
                break;
            };
            let item = &mut q.items()[i].0;
            for r in item.iter_mut().filter(|r| r.order == order && r.count > 0) {
                let k = r.count.min(n);
                out.push(Run {
                    start: r.start,
                    order,
                    count: k,
                });
                r.start += k * size;
                r.count -= k;
                n -= k;
                if n == 0 {
                    break;
                }
            }
            item.retain(|r| r.count > 0);
            if item.is_empty() {
                q.items().remove(i);
            }
        }
        for r in &out {
            q.tally().queued[r.order as usize] -= r.count;
            self.queue.took(&mut q, r.pages());
        }
        let drained = q.drained();
        drop(q);
        if drained {
            self.queue.wake_waiters();
        }
        out
    }

    /// The allocator's side: offers a run it is about to zero inline to the idle worker, so
    /// that two cores zero it. Returns false (and shares nothing) if another run is shared
    /// already. [`withdraw`](Self::withdraw) it once the job is complete.
    pub(crate) fn offer(&self, job: Arc<Job>) -> bool {
        // Offering: only if the slot's lock is free now (the worker may hold it).
        let Some(mut slot) = lock_within(
            &self.shared,
            crate::tempo::tempo().handoff_wait(),
            self.queue.worker_locking(),
        ) else {
            return false;
        };
        if self.shared_hint.load(Ordering::Acquire) && slot.as_ref().is_some_and(|j| !j.taken()) {
            return false; // another allocation's run is being shared
        }
        *slot = Some(job);
        self.shared_hint.store(true, Ordering::Release);
        true
    }

    /// The allocator's side: withdraws the run it [`offer`](Self::offer)ed, its job complete.
    pub(crate) fn withdraw(&self) {
        // Withdrawing never waits: the hint alone keeps the worker away, and a job left in the
        // slot (its lock busy now) has no stripe left, so the next offer replaces it.
        self.shared_hint.store(false, Ordering::Release);
        if let Some(mut slot) = try_lock(&self.shared) {
            *slot = None;
        }
    }

    /// The worker's side: takes stripes of the shared run, if any, one at a time, and zeroes
    /// them with `zero(job, offset, len)`. If the allocation that shared the run gave up
    /// waiting for the worker's last stripe, the run is the worker's: `land(job)` lands it.
    pub(crate) fn assist(&self, mut zero: impl FnMut(&Job, usize, usize), land: impl FnOnce(&Job)) {
        let job = {
            let _locking = self.queue.locking();
            lock(&self.shared).clone()
        };
        let Some(job) = job else {
            return;
        };
        while let Some((off, len)) = job.next_worker_piece(self.queue.page()) {
            zero(&job, off, len);
            self.queue.promise(std::time::Duration::ZERO);
            if job.finish(len) {
                land(&job);
                return;
            }
        }
    }

    /// The allocator's side: it gave up waiting for `run` (abandoned to the thread zeroing its
    /// last stripe, which lands it): count it as in flight until then, so that `flush` waits
    /// for it.
    pub(crate) fn adopt(&self, run: &Run) {
        self.queue.adopt(run.pages());
    }

    /// Undoes [`adopt`](Self::adopt) when the run completed before it was abandoned.
    pub(crate) fn disown(&self, run: &Run) {
        self.queue.disown(run.pages());
    }

    /// The worker's side: an adopted run (see [`adopt`](Self::adopt)) is zeroed and pooled.
    pub(crate) fn landed_adopted(&self, run: &Run) {
        self.queue.landed_adopted(run.pages());
    }

    /// The job of the worker's current claim, while it is open to helpers (see
    /// [`help`](Self::help)).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn current_job(&self) -> Option<Arc<Job>> {
        lock(&self.job).clone()
    }

    /// The allocator's side: if the worker is zeroing a claim of `order`, takes stripes of it
    /// and zeroes them with `zero(offset, len)` (offsets from the run's start) until none is
    /// left. Returns true if it zeroed any. The run still lands through the worker.
    pub(crate) fn help(&self, order: u8, mut zero: impl FnMut(&Job, usize, usize)) -> bool {
        let Some(job) = lock_within(
            &self.job,
            crate::tempo::tempo().handoff_wait(),
            self.queue.worker_locking(),
        )
        .and_then(|j| j.clone()) else {
            return false;
        };
        if job.run.order != order {
            return false;
        }
        let mut helped = false;
        while let Some((off, len)) = job.next_stripe(self.queue.page()) {
            zero(&job, off, len);
            let landed_by_me = job.finish(len);
            debug_assert!(!landed_by_me, "the worker never abandons its claim");
            helped = true;
        }
        helped
    }

    /// Pages of `order` the worker is zeroing now: an allocation short of blocks of that order
    /// may do better to [`wait_landed`](Self::wait_landed) than to fault in fresh pages. 0 if
    /// the queue's lock stays busy for the hand-off wait (`Tempo::handoff_wait`).
    pub(crate) fn in_flight(&self, order: u8) -> usize {
        self.queue
            .lock_bounded()
            .map_or(0, |mut q| q.tally().in_flight[order as usize])
    }

    /// Waits, spinning, for some claim to land; true if one did. See
    /// [`wait_worker`](Self::wait_worker) for how long.
    pub(crate) fn wait_landed(&self) -> bool {
        let before = self.queue.landings();
        self.wait_worker(|| self.queue.landings() != before)
    }

    /// Spins until `done()`, for as long as the worker is seen making progress: it renews its
    /// promise (`due_ns`) after every piece it zeroes. Gives up once it has not for
    /// the hand-off wait (`Tempo::handoff_wait`) (the scheduler is not running it, or it is not working on what the
    /// caller waits for), and after the hand-off cap (`Tempo::handoff_cap`) in any case. Returns `done()`'s last
    /// answer.
    pub(crate) fn wait_worker(&self, mut done: impl FnMut() -> bool) -> bool {
        if done() {
            return true;
        }
        #[cfg(loom)]
        {
            loom::thread::yield_now();
            done()
        }
        #[cfg(not(loom))]
        {
            let tempo = self.queue.punctuality().tempo();
            let start = std::time::Instant::now();
            let (mut seen, mut progress) = (self.queue.punctuality().due(), start);
            loop {
                for _ in 0..32 {
                    crate::sync::spin_loop();
                    if done() {
                        return true;
                    }
                }
                let now = std::time::Instant::now();
                let due = self.queue.punctuality().due();
                if due != seen {
                    (seen, progress) = (due, now);
                }
                if now - progress >= tempo.handoff_wait() || now - start >= tempo.handoff_cap() {
                    return done();
                }
            }
        }
    }
}

impl Shrinker for Handoff {
    fn name(&self) -> &str {
        self.queue.name()
    }

    fn count(&self) -> usize {
        self.queue.count()
    }

    /// Gives whole queued buffers, oldest first, straight back to the system, unzeroed.
    fn scan(&self, nr_pages: usize) -> usize {
        self.queue.scan(nr_pages)
    }
}

/// What the heap's allocations do with the hand-off.
impl HeapInner {
    /// Zeroes a run an allocation took from the queue; one of a buffer of at least
    /// [`SHARE_FROM`], or a whole buffer, is shared with the idle worker, stripe by stripe, so
    /// that two cores zero it. Returns false if the worker did not finish its stripe within
    /// the hand-off wait (`Tempo::handoff_wait`): the run is then the worker's to land, and the caller must do without
    /// it.
    ///
    /// # Safety
    /// The caller owns the run (it left the queue).
    pub(super) unsafe fn zero_stolen(
        &self,
        handoff: &Handoff,
        r: &Run,
        buffer_pages: usize,
    ) -> bool {
        // Shared for large buffers and for a buffer taken whole (see `SHARE_FROM`): a chunk
        // of a smaller one is zeroed faster by this thread alone.
        if r.pages() * self.page < 2 * STRIPE_BYTES
            || (buffer_pages * self.page < SHARE_FROM && !r.is_whole(buffer_pages))
        {
            // SAFETY: forwarded.
            unsafe { self.zero_run(r, buffer_pages) };
            return true;
        }
        let job = Arc::new(Job::new(*r, buffer_pages, self.page));
        let shared = handoff.offer(job.clone());
        while let Some((off, len)) = job.next_stripe(self.page) {
            // SAFETY: the stripe is in the run, owned by this thread.
            unsafe { self.zero_part(&job, off, len) };
            let landed_by_me = job.finish(len);
            debug_assert!(!landed_by_me, "only this thread abandons this run");
        }
        let done = handoff.wait_worker(|| job.complete());
        if shared {
            handoff.withdraw();
        }
        if done {
            return true;
        }
        // The worker holds a stripe and is not running: it lands the run when it finishes.
        handoff.adopt(r);
        if job.abandon() {
            self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        handoff.disown(r); // it finished just now after all
        true
    }

    /// Helps the worker zero its claim of `order`, if it has one with stripes left, then waits
    /// (briefly, see [`Handoff::wait_worker`]) for some claim to land: always, or with
    /// `only_if_helped`, only if it helped. Returns true if it helped.
    pub(super) fn help_worker(&self, handoff: &Handoff, order: u8, only_if_helped: bool) -> bool {
        let helped = handoff.help(order, |job, off, len| {
            // SAFETY: `help` handed this thread the stripe.
            unsafe { self.zero_part(job, off, len) }
        });
        if helped {
            self.counters.helped.fetch_add(1, Ordering::Relaxed);
        }
        if (helped || !only_if_helped) && handoff.wait_landed() {
            self.counters.waited.fetch_add(1, Ordering::Relaxed);
        }
        helped
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn handoff(max: usize) -> (Handoff, Arc<std::sync::Mutex<Vec<Run>>>) {
        let released = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = released.clone();
        (
            Handoff::new(
                4096,
                max,
                Box::new(move |runs: Runs, why| {
                    assert_eq!(
                        why,
                        Reason::UnderPressure,
                        "the queue frees only under pressure"
                    );
                    r.lock().unwrap().extend(runs)
                }),
                true,
            ),
            released,
        )
    }

    fn run(start: usize, order: u8, count: usize) -> Run {
        Run::new(start, order, count)
    }

    #[test]
    fn claim_takes_chunks_from_the_end_of_the_oldest() {
        let (l, _) = handoff(10_000);
        l.queue()
            .queue(smallvec::smallvec![run(0, 8, 3), run(3 << 20, 0, 2)])
            .unwrap();
        l.queue()
            .queue(smallvec::smallvec![run(1 << 30, 0, 1)])
            .unwrap();
        assert_eq!(l.claim(), Some(run(3 << 20, 0, 2)));
        assert_eq!(l.in_flight(0), 2);
        assert_eq!(
            l.claim(),
            Some(run(2 << 20, 8, 1)),
            "one 1 MiB block per claim"
        );
        assert_eq!(l.queue().pages(), 2 * 256 + 1);
        l.landed(&run(3 << 20, 0, 2));
        assert_eq!(l.in_flight(0), 0);
    }

    #[test]
    fn steal_takes_from_the_oldest_front() {
        let (l, _) = handoff(10_000);
        l.queue().queue(smallvec::smallvec![run(0, 4, 4)]).unwrap();
        l.queue()
            .queue(smallvec::smallvec![run(1 << 20, 4, 2), run(2 << 20, 0, 3)])
            .unwrap();
        assert!(l.steal(8, 1, 1).is_empty());
        let got = l.steal(4, 3, 3);
        assert_eq!(
            got.as_slice(),
            [run(0, 4, 3)],
            "the oldest buffer's first blocks"
        );
        assert_eq!(l.queue().pages(), 16 + 2 * 16 + 3);
        assert_eq!(
            l.claim(),
            Some(run(3 << 16, 4, 1)),
            "the worker: from the oldest's end"
        );
        let got = l.steal(4, 3, 3);
        assert_eq!(
            got.as_slice(),
            [run(1 << 20, 4, 2)],
            "then the next buffer's"
        );
        assert_eq!(l.claim(), Some(run(2 << 20, 0, 3)));
    }

    #[test]
    fn steal_takes_a_whole_set_rather_than_break_one_up() {
        let (l, _) = handoff(10_000);
        l.queue().queue(smallvec::smallvec![run(0, 8, 4)]).unwrap(); // a 4 MiB buffer
        l.queue()
            .queue(smallvec::smallvec![run(8 << 20, 8, 1)])
            .unwrap(); // a 1 MiB one
        l.queue()
            .queue(smallvec::smallvec![run(16 << 20, 8, 4)])
            .unwrap(); // another 4 MiB
        assert_eq!(
            l.steal(8, 1, 1).as_slice(),
            [run(8 << 20, 8, 1)],
            "one block: the one-block buffer, not the start of a set"
        );
        assert_eq!(
            l.steal(8, 1, 4).as_slice(),
            [run(0, 8, 1)],
            "four, a chunk at a time: the oldest whole set"
        );
        assert_eq!(l.steal(8, 3, 3).as_slice(), [run(1 << 20, 8, 3)]);
        assert_eq!(
            l.steal(8, 6, 6).as_slice(),
            [run(16 << 20, 8, 4)],
            "no set fits: the oldest with blocks of the order"
        );
        assert_eq!(l.queue().pages(), 0);
    }

    #[test]
    fn a_scan_counts_what_is_left_of_a_partly_claimed_buffer() {
        let (l, released) = handoff(10_000);
        l.queue().queue(smallvec::smallvec![run(0, 8, 3)]).unwrap();
        let claimed = l.claim().unwrap();
        assert_eq!(claimed.pages(), 256, "one chunk from the end");
        // What is left (two blocks), not what was queued (three), goes back and is counted.
        assert_eq!(l.scan(usize::MAX), 512);
        assert_eq!(released.lock().unwrap().as_slice(), [run(0, 8, 2)]);
        assert_eq!(l.queue().pages(), 0);
        assert_eq!(
            l.queue().pending_pages(),
            256,
            "the claim is still in flight"
        );
        l.landed(&claimed);
        assert_eq!(l.queue().pending_pages(), 0);
    }

    #[test]
    fn a_claim_is_open_to_helpers_from_the_moment_it_is_made() {
        let (l, _) = handoff(10_000);
        l.queue().queue(smallvec::smallvec![run(0, 8, 1)]).unwrap();
        let r = l.claim().unwrap();
        assert_eq!(l.in_flight(8), 256);
        let job = l.current_job().expect("published with the claim");
        assert_eq!(job.run(), r);
        // With the worker not started, a helper takes every piece, half of what is left each.
        let mut helped = Vec::new();
        assert!(l.help(8, |_, off, len| helped.push((off, len))));
        assert_eq!(helped.first(), Some(&(0, 1 << 19)), "half first");
        assert!(job.complete(), "the helper took every piece left");
        l.landed(&r);
        assert!(l.current_job().is_none(), "closed when the claim lands");
        assert_eq!(l.in_flight(8), 0);
    }

    /// Allocations zero a job that is a whole buffer from the front and the worker from the
    /// back, whichever asks first, so that a block that circulates is zeroed by the same core
    /// piece by piece; the two meet without a gap or an overlap, the last stripe short when the
    /// run is not a whole number of stripes. A chunk of a larger buffer: both from the front.
    #[test]
    fn a_shared_run_is_offered_to_the_idle_worker() {
        let (l, _) = handoff(10_000);
        let job = std::sync::Arc::new(Job::new(run(0, 4, 4), 64, 4096));
        assert!(l.offer(job.clone()));
        assert!(!l.offer(job.clone()), "one shared run at a time");
        assert!(matches!(l.next_work(), Some(Work::Other)));
        let mut stripes = Vec::new();
        l.assist(
            |_, off, len| stripes.push((off, len)),
            |_| panic!("not abandoned"),
        );
        assert_eq!(
            stripes,
            [(131072, 131072), (65536, 65536), (0, 65536)],
            "from the back, half of what is left per claim, whole stripes, at least one"
        );
        assert!(job.complete());
        l.withdraw();
        // Queued work comes before assisting.
        l.queue()
            .queue(smallvec::smallvec![run(1 << 20, 0, 1)])
            .unwrap();
        assert!(matches!(
            l.next_work(),
            Some(Work::Claim(job)) if job.run() == run(1 << 20, 0, 1) && job.buffer_pages() == 1
        ));
    }

    #[test]
    fn bound_refuses_and_scan_releases() {
        let (l, released) = handoff(100);
        l.queue().queue(smallvec::smallvec![run(0, 4, 4)]).unwrap();
        assert!(
            l.queue()
                .queue(smallvec::smallvec![run(1 << 20, 4, 3)])
                .is_err(),
            "64 + 48 > 100"
        );
        l.queue()
            .queue(smallvec::smallvec![run(1 << 20, 4, 2)])
            .unwrap();
        assert_eq!(l.queue().refused(), 1);
        assert_eq!(l.queue().peak_pages(), 96);
        assert_eq!(l.scan(10), 64, "whole buffers, oldest first");
        assert_eq!(released.lock().unwrap().as_slice(), [run(0, 4, 4)]);
        assert_eq!(l.queue().pressure_pages(), 64);
        let left: Vec<Run> = l.queue().stop().into_iter().flatten().collect();
        assert_eq!(left, [run(1 << 20, 4, 2)]);
        assert_eq!(l.claim(), None);
        assert!(
            l.queue().queue(smallvec::smallvec![run(0, 0, 1)]).is_err(),
            "stopped"
        );
    }
}
