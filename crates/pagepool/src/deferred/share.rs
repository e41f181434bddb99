//! Sharing a claimed run between the worker and allocations: a [`Job`] splits the run into
//! stripes that either side takes; an allocation helps the worker with its claim, or offers
//! its own run to an idle worker, and gives up on a worker the scheduler does not run
//! (abandoning the run to it) after a bounded wait.

use crate::config::{CLAIM_SHARE, HANDOFF_WAIT, STRIPE_BYTES, WORKER_PIECE};
use crate::sync::{AtomicU64, AtomicUsize, Ordering, lock, lock_within, try_lock};
use crossbeam_utils::CachePadded;

use super::{ReleaseQueue, Run, Runs};

/// A claimed run being zeroed, split into stripes that several threads can take: the worker
/// publishes its current claim as a job, and an allocation that would otherwise wait for it
/// helps instead, so that two cores zero one block.
#[derive(Debug)]
pub(crate) struct Job {
    pub(super) run: Run,
    pub(super) buffer_pages: usize,
    pub(super) stripe: usize,
    pub(super) stripes: usize,
    /// Stripes handed out: from the front (allocations, the low 32 bits) and from the back
    /// (the worker, the high 32 bits); apart from `done`, so that the two threads' claims and
    /// the waiting thread's polls do not share one cache line.
    pub(super) next: CachePadded<AtomicU64>,
    /// Stripes zeroed.
    pub(super) done: CachePadded<AtomicUsize>,
}

impl Job {
    /// A job for `run` (blocks of `page`-byte pages) from a buffer of `buffer_pages` pages.
    pub(crate) fn new(run: Run, buffer_pages: usize, page: usize) -> Job {
        let bytes = run.pages() * page;
        let stripe = STRIPE_BYTES.min(bytes).max(1);
        // Both ends' counts fit their halves of `next`: a run of 2^32 stripes would be 256 TiB.
        let stripe = stripe.max(bytes.div_ceil(u32::MAX as usize));
        Job {
            run,
            buffer_pages,
            stripe,
            stripes: bytes.div_ceil(stripe),
            next: CachePadded::new(AtomicU64::new(0)),
            done: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    /// The run being zeroed.
    pub(crate) fn run(&self) -> Run {
        self.run
    }

    /// The size in pages of the buffer the run came from.
    pub(crate) fn buffer_pages(&self) -> usize {
        self.buffer_pages
    }

    /// Takes the next piece to zero from the front of the run (one or more stripes: a share of
    /// what is left), as `(offset, len)` in bytes from the run's start, or `None` when every
    /// stripe is taken. Call [`finish`](Self::finish) with `len` after zeroing it. For the
    /// allocating thread: large pieces first, so that it and the worker meet after a few
    /// claims.
    pub(crate) fn next_stripe(&self, page: usize) -> Option<(usize, usize)> {
        self.next_piece(page, false, |left| (left / CLAIM_SHARE).max(1))
    }

    /// Takes the worker's next piece, as [`next_stripe`](Self::next_stripe) does but from the
    /// back of the run and at most [`WORKER_PIECE`] stripes: the worker runs at low priority,
    /// and what it holds when the scheduler leaves it waiting is at most that, which nobody
    /// waits for longer than [`HANDOFF_WAIT`].
    ///
    /// For a run that is a whole buffer (a 1 MiB buffer of one block), allocations always zero
    /// it from the front and the worker from the back, whichever of them took the run: a
    /// buffer that circulates is then zeroed piece by piece by the same core each time, and
    /// its lines stay in that core's cache. (Handed out from one end, the pieces fell to
    /// whoever asked first, and a buffer's lines moved between the cores' caches at every
    /// zeroing: a tight loop of 1 MiB buffers shared with the worker took 37-43 us a call,
    /// against 23-27 us zeroed by the allocating thread alone.) A chunk of a larger buffer,
    /// whose allocation zeroes the buffer's other chunks from its other end, is zeroed from
    /// the front by both, as before.
    pub(crate) fn next_worker_piece(&self, page: usize) -> Option<(usize, usize)> {
        let from_back = self.run.is_whole(self.buffer_pages);
        self.next_piece(page, from_back, |left| {
            (left / CLAIM_SHARE).clamp(1, WORKER_PIECE)
        })
    }

    fn next_piece(
        &self,
        page: usize,
        from_back: bool,
        share: impl Fn(usize) -> usize,
    ) -> Option<(usize, usize)> {
        const FRONT: u64 = u32::MAX as u64;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let (front, back) = ((cur & FRONT) as usize, (cur >> 32) as usize);
            let left = self.stripes - front - back;
            if left == 0 {
                return None;
            }
            let k = share(left).min(left);
            let next = if from_back {
                cur + ((k as u64) << 32)
            } else {
                cur + k as u64
            };
            match self
                .next
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let bytes = self.run.pages() * page;
                    let first = if from_back {
                        self.stripes - back - k
                    } else {
                        front
                    };
                    let off = first * self.stripe;
                    return Some((off, (k * self.stripe).min(bytes - off)));
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Records a zeroed piece of `len` bytes (as [`next_stripe`](Self::next_stripe) gave it).
    /// Returns true when the run was [`abandon`](Self::abandon)ed by the thread that waited for
    /// it and this piece completed it: the caller then owns the run and must land it.
    #[must_use = "a completed, abandoned run must be landed by the caller"]
    pub(crate) fn finish(&self, len: usize) -> bool {
        let k = len.div_ceil(self.stripe);
        let before = self.done.fetch_add(k, Ordering::AcqRel);
        before & ABANDONED != 0 && (before & !ABANDONED) + k == self.stripes
    }

    /// True once every stripe has been handed out.
    pub(crate) fn taken(&self) -> bool {
        let next = self.next.load(Ordering::Relaxed);
        (next & u32::MAX as u64) as usize + (next >> 32) as usize >= self.stripes
    }

    /// True once every stripe is zeroed.
    pub(crate) fn complete(&self) -> bool {
        self.done.load(Ordering::Acquire) & !ABANDONED >= self.stripes
    }

    /// Gives up waiting for the run: whoever finishes its last stripe owns it and lands it
    /// ([`finish`](Self::finish) returns true for them). Returns false if the run completed
    /// first: the caller still owns it. Call only once every stripe is taken.
    pub(crate) fn abandon(&self) -> bool {
        let before = self.done.fetch_or(ABANDONED, Ordering::AcqRel);
        before & !ABANDONED < self.stripes
    }
}

/// The bit of [`Job::done`] that says the run's waiter gave up on it.
pub(super) const ABANDONED: usize = 1 << (usize::BITS - 1);

impl ReleaseQueue<Runs> {
    /// The allocator's side: offers a run it is about to zero inline to the idle worker, so
    /// that two cores zero it. Returns false (and shares nothing) if another run is shared
    /// already. Call with `None` once the job is complete.
    pub(crate) fn share(&self, job: Option<std::sync::Arc<Job>>) -> bool {
        let Some(job) = job else {
            // Withdrawing never waits: the hint alone keeps the worker away, and a job left in
            // the slot (its lock busy now) has no stripe left, so the next offer replaces it.
            self.shared_hint.store(false, Ordering::Release);
            if let Some(mut slot) = try_lock(&self.shared) {
                *slot = None;
            }
            return true;
        };
        // Offering: only if the slot's lock is free now (the worker may hold it).
        let Some(mut slot) = lock_within(&self.shared, HANDOFF_WAIT, &self.worker_locking) else {
            return false;
        };
        if self.shared_hint.load(Ordering::Acquire) && slot.as_ref().is_some_and(|j| !j.taken()) {
            return false; // another allocation's run is being shared
        }
        *slot = Some(job);
        self.shared_hint.store(true, Ordering::Release);
        true
    }

    /// The worker's side: takes stripes of the shared run, if any, one at a time, and zeroes
    /// them with `zero(job, offset, len)`. If the allocation that shared the run gave up
    /// waiting for the worker's last stripe, the run is the worker's: `land(job)` lands it.
    pub(crate) fn assist(&self, mut zero: impl FnMut(&Job, usize, usize), land: impl FnOnce(&Job)) {
        let job = {
            let _locking = self.locking();
            lock(&self.shared).clone()
        };
        let Some(job) = job else {
            return;
        };
        while let Some((off, len)) = job.next_worker_piece(self.page) {
            zero(&job, off, len);
            self.punctuality.promise(std::time::Duration::ZERO);
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
        self.adopted.fetch_add(run.pages(), Ordering::AcqRel);
    }

    /// Undoes [`adopt`](Self::adopt) when the run completed before it was abandoned.
    pub(crate) fn disown(&self, run: &Run) {
        self.adopted.fetch_sub(run.pages(), Ordering::AcqRel);
    }

    /// The worker's side: an adopted run (see [`adopt`](Self::adopt)) is zeroed and pooled.
    pub(crate) fn landed_adopted(&self, run: &Run) {
        self.adopted.fetch_sub(run.pages(), Ordering::AcqRel);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            let _q = lock(&self.queue);
            self.landed.notify_all();
        }
    }

    /// The job of the worker's current claim, while it is open to helpers (see
    /// [`help`](Self::help)).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn current_job(&self) -> Option<std::sync::Arc<Job>> {
        lock(&self.job).clone()
    }

    /// The allocator's side: if the worker is zeroing a claim of `order`, takes stripes of it
    /// and zeroes them with `zero(offset, len)` (offsets from the run's start) until none is
    /// left. Returns true if it zeroed any. The run still lands through the worker.
    pub(crate) fn help(&self, order: u8, mut zero: impl FnMut(&Job, usize, usize)) -> bool {
        let Some(job) =
            lock_within(&self.job, HANDOFF_WAIT, &self.worker_locking).and_then(|j| j.clone())
        else {
            return false;
        };
        if job.run.order != order {
            return false;
        }
        let mut helped = false;
        while let Some((off, len)) = job.next_stripe(self.page) {
            zero(&job, off, len);
            let landed_by_me = job.finish(len);
            debug_assert!(!landed_by_me, "the worker never abandons its claim");
            helped = true;
        }
        helped
    }

    /// Pages of `order` the worker is zeroing now: an allocation short of blocks of that order
    /// may do better to [`wait_landed`](Self::wait_landed) than to fault in fresh pages. 0 if
    /// the queue's lock stays busy for [`HANDOFF_WAIT`].
    pub(crate) fn in_flight(&self, order: u8) -> usize {
        lock_within(&self.queue, HANDOFF_WAIT, &self.worker_locking)
            .map_or(0, |q| q.in_flight[order as usize])
    }

    /// Waits, spinning, for some claim to land; true if one did. See
    /// [`wait_worker`](Self::wait_worker) for how long.
    pub(crate) fn wait_landed(&self) -> bool {
        let before = self.landings_hint.load(Ordering::Acquire);
        self.wait_worker(|| self.landings_hint.load(Ordering::Acquire) != before)
    }

    /// Spins until `done()`, for as long as the worker is seen making progress: it renews its
    /// promise (`due_ns`) after every piece it zeroes. Gives up once it has not for
    /// [`HANDOFF_WAIT`] (the scheduler is not running it, or it is not working on what the
    /// caller waits for), and after [`HANDOFF_CAP`](crate::config::HANDOFF_CAP) in any case. Returns `done()`'s last
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
            let start = std::time::Instant::now();
            let (mut seen, mut progress) = (self.punctuality.due(), start);
            loop {
                for _ in 0..32 {
                    crate::sync::spin_loop();
                    if done() {
                        return true;
                    }
                }
                let now = std::time::Instant::now();
                let due = self.punctuality.due();
                if due != seen {
                    (seen, progress) = (due, now);
                }
                if now - progress >= HANDOFF_WAIT || now - start >= crate::config::HANDOFF_CAP {
                    return done();
                }
            }
        }
    }
}
