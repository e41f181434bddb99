//! Deferred freeing: release queues a buffer; a low-priority worker zeroes it later.
//!
//! This is the kernel series' deferred-free helper. Releasing a buffer puts its blocks on a
//! [`Freelist`] in O(1) and returns. A background worker (see [`crate::heap`]) claims runs of
//! blocks from the oldest queued buffer, at most [`CHUNK_PAGES`] at a time, zeroes them and gives
//! them to the pools (the kernel's `DF_NORMAL`). The freelist is a [`Shrinker`]: under memory
//! pressure its queued blocks go straight back to the system, unzeroed, through the release
//! callback (`DF_UNDER_PRESSURE`).
//!
//! Beyond the kernel helper:
//! - **backpressure**: queued and in-flight pages never exceed the freelist's bound;
//!   [`Freelist::queue`] refuses a buffer that would pass it, and the releasing thread then
//!   zeroes the buffer itself (so memory stays bounded and nothing is dropped on the floor);
//! - **inline zeroing**: an allocation that misses its pool can [`steal`](Freelist::steal)
//!   queued dirty blocks and zero them on its own thread, which is far cheaper than fresh pages
//!   from the kernel; it takes them from the start of the oldest buffer while the worker works
//!   from its end, so the two zero in parallel and the allocation ends up with that buffer's
//!   blocks, end to end.
//!
//! The freelist deals in [`Run`]s (address ranges); it never touches memory itself, which is
//! what lets `tests/loom.rs` model it with plain numbers.

use std::collections::VecDeque;

use crate::config::{
    CHUNK_PAGES, CLAIM_DELAY, CLAIM_SHARE, EARLY_BY, FIT_SCAN, HANDOFF_CAP, HANDOFF_WAIT,
    LATE_HOLD, LATE_HOLD_MAX, NAP_FIRST, NAP_LONGEST, NAP_STEADY_FOR, PREEMPTED, RHYTHM_MAX_NS,
    STRIPE_BYTES, WAKE_GRACE, WORKER_GRACE, WORKER_PIECE,
};
use crate::pool::MAX_ORDER;
use crate::shrinker::Shrinker;
use crate::sync::{
    AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering, lock, lock_within, try_lock,
    wait, wait_timeout,
};

/// A claimed run being zeroed, split into stripes that several threads can take: the worker
/// publishes its current claim as a job, and an allocation that would otherwise wait for it
/// helps instead, so that two cores zero one block.
#[derive(Debug)]
pub(crate) struct Job {
    run: Run,
    buffer_pages: usize,
    stripe: usize,
    stripes: usize,
    /// Stripes handed out; apart from `done`, so that the two threads' claims and the waiting
    /// thread's polls do not share one cache line.
    next: Line<AtomicUsize>,
    /// Stripes zeroed.
    done: Line<AtomicUsize>,
}

impl Job {
    /// A job for `run` (blocks of `page`-byte pages) from a buffer of `buffer_pages` pages.
    pub(crate) fn new(run: Run, buffer_pages: usize, page: usize) -> Job {
        let bytes = run.pages() * page;
        let stripe = STRIPE_BYTES.min(bytes).max(1);
        Job {
            run,
            buffer_pages,
            stripe,
            stripes: bytes.div_ceil(stripe),
            next: Line(AtomicUsize::new(0)),
            done: Line(AtomicUsize::new(0)),
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

    /// Takes the next piece to zero (one or more stripes: a share of what is left), as
    /// `(offset, len)` in bytes from the run's start, or `None` when every stripe is taken.
    /// Call [`finish`](Self::finish) with `len` after zeroing it. For the thread that waits
    /// for the whole run: large pieces first, so that it and a helper meet after a few claims.
    pub(crate) fn next_stripe(&self, page: usize) -> Option<(usize, usize)> {
        self.next_piece(page, |left| (left / CLAIM_SHARE).max(1))
    }

    /// Takes the worker's next piece, as [`next_stripe`](Self::next_stripe) does, but at most
    /// [`WORKER_PIECE`] stripes: the worker runs at low priority, and what it holds when the
    /// scheduler leaves it waiting is at most that, which nobody waits for longer than
    /// [`HANDOFF_WAIT`].
    pub(crate) fn next_worker_piece(&self, page: usize) -> Option<(usize, usize)> {
        self.next_piece(page, |left| (left / CLAIM_SHARE).clamp(1, WORKER_PIECE))
    }

    fn next_piece(&self, page: usize, share: impl Fn(usize) -> usize) -> Option<(usize, usize)> {
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            if cur >= self.stripes {
                return None;
            }
            let k = share(self.stripes - cur);
            match self.next.compare_exchange_weak(
                cur,
                cur + k,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    let bytes = self.run.pages() * page;
                    let off = cur * self.stripe;
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
        self.next.load(Ordering::Relaxed) >= self.stripes
    }

    /// True once every stripe is zeroed.
    pub(crate) fn complete(&self) -> bool {
        self.done.load(Ordering::Acquire) & !ABANDONED >= self.stripes
    }

    /// Waits up to [`HANDOFF_WAIT`] for the stripes other threads are zeroing; true once the
    /// run is complete. Spinning only: the pieces in other hands are small.
    pub(crate) fn wait_complete(&self) -> bool {
        spin_until(HANDOFF_WAIT, || self.complete())
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
const ABANDONED: usize = 1 << (usize::BITS - 1);

/// Spins until `done()` or `bound` has passed; returns `done()`'s last answer.
#[inline]
pub(crate) fn spin_until(bound: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    if done() {
        return true;
    }
    #[cfg(loom)]
    {
        let _ = bound;
        loom::thread::yield_now();
        done()
    }
    #[cfg(not(loom))]
    {
        let end = std::time::Instant::now() + bound;
        loop {
            for _ in 0..32 {
                std::hint::spin_loop();
                if done() {
                    return true;
                }
            }
            if std::time::Instant::now() >= end {
                return done();
            }
        }
    }
}

/// A buffer's runs: up to two inline (most buffers), more on the heap.
pub(crate) type Runs = smallvec::SmallVec<[Run; 2]>;

/// `count` blocks of one order lying end to end from address `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// The first block's address.
    pub(crate) start: usize,
    /// The blocks' order.
    pub(crate) order: u8,
    /// How many blocks.
    pub(crate) count: usize,
}

impl Run {
    /// Pages in the run.
    #[inline]
    pub(crate) fn pages(&self) -> usize {
        self.count << self.order
    }

    /// The address just past the run, with `page`-byte pages.
    pub(crate) fn end(&self, page: usize) -> usize {
        self.start + (page << self.order) * self.count
    }

    /// The run's first byte as a pointer (dangling for a null start).
    #[inline]
    pub(crate) fn ptr(&self) -> std::ptr::NonNull<u8> {
        std::ptr::NonNull::new(std::ptr::with_exposed_provenance_mut(self.start))
            .unwrap_or(std::ptr::NonNull::dangling())
    }

    /// A run of one block.
    pub(crate) fn from_block(b: crate::pool::Block) -> Run {
        Run {
            order: b.order(),
            start: b.into_raw().as_ptr().expose_provenance(),
            count: 1,
        }
    }
}

struct Queue {
    /// Released buffers, oldest first; each a list of runs.
    items: VecDeque<(Runs, usize)>,
    /// Pages queued (not counting in-flight claims).
    pages: usize,
    /// Queued blocks per order (lets `steal` skip a scan when there is nothing of its order).
    blocks: [usize; MAX_ORDER as usize + 1],
    /// Pages claimed by the worker and not yet landed, per order.
    in_flight: [usize; MAX_ORDER as usize + 1],
    peak: usize,
    /// Claims landed so far (what `wait_landed` watches).
    landings: u64,
    /// Workers asleep in `claim` until woken (a wake-up costs a system call: only made when
    /// needed).
    sleeping: usize,
    /// Workers napping: asleep for a short time, they look for work by themselves when they
    /// wake, so a release does not wake them.
    napping: usize,
    /// Threads in `flush` (the worker must run even for a small queue).
    flushing: usize,
    stopped: bool,
}

impl Queue {
    fn in_flight_pages(&self) -> usize {
        self.in_flight.iter().sum()
    }
}

/// A bounded queue of released buffers waiting to be zeroed.
pub(crate) struct Freelist {
    page: usize,
    max_pages: usize,
    queue: Mutex<Queue>,
    /// Signalled when work is queued or the list stops.
    work: Condvar,
    /// Signalled when an in-flight claim lands or the queue drains.
    landed: Condvar,
    release: Box<dyn Fn(Run) + Send + Sync>,
    pressure_pages: AtomicU64,
    refused: AtomicU64,
    waiting: AtomicUsize,
    /// Lock-free mirrors for spinning (pages queued, landings so far), each on a cache line of
    /// its own: the idle worker polls them.
    queued_hint: Line<AtomicUsize>,
    landings_hint: Line<AtomicU64>,
    /// How long an idle worker polls before napping, in ns (0: nap at once).
    spin_ns: AtomicU64,
    /// How long an idle worker naps before it sleeps until woken, in ns (0: no naps).
    naps_ns: AtomicU64,
    /// The worker's current claim, open to helpers.
    job: Mutex<Option<std::sync::Arc<Job>>>,
    /// A run an allocation is zeroing inline, open to the idle worker.
    shared: Mutex<Option<std::sync::Arc<Job>>>,
    shared_hint: Line<AtomicBool>,
    /// Threads in `flush`, and whether the list stopped: a spinning worker stops spinning at
    /// once for either.
    flushing_hint: AtomicUsize,
    stopped_hint: AtomicBool,
    /// Pages of runs allocations gave up on, left to the worker to land (see `adopt`).
    adopted: AtomicUsize,
    /// Set while the worker is in a section where it takes locks the allocation side also
    /// takes (see `sync::lock_within`).
    worker_locking: AtomicBool,
    /// When the worker promised to look at the queue next, in ns since `born` (`u64::MAX`:
    /// asleep until a release wakes it). Past that by [`WORKER_GRACE`], the scheduler is not
    /// running the worker, and releases zero their buffers themselves.
    due_ns: AtomicU64,
    /// Until when releases zero their own buffers after the worker was found late, and the
    /// length of that hold (see `hold`).
    late_until_ns: AtomicU64,
    hold_ns: AtomicU64,
    /// Set by a hold, cleared when the worker next runs on time: after a hold, releases keep
    /// zeroing their own buffers, and the first wakes a sleeping worker to show that it runs
    /// again (`probe_out`: asked, not answered; see `queue` and `answer_probe`).
    probation: AtomicBool,
    probe_out: AtomicBool,
    born: std::time::Instant,
    /// The rhythm of releases: when the last one came (ns since `born`), and a moving average
    /// of the gaps between them (0: none yet).
    last_release_ns: AtomicU64,
    release_gap_ns: AtomicU64,
}

/// A value alone on its cache line (two lines: adjacent-line prefetching pairs them).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A section of the worker's in which it may hold locks the allocation side takes (see
/// [`Freelist::locking`]).
pub(crate) struct Locking<'a>(&'a AtomicBool);

impl Drop for Locking<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What the worker should do next (see [`Freelist::next_work`]).
#[derive(Debug)]
pub(crate) enum Work {
    /// Zero this claimed run ([`Job::run`], from a buffer of [`Job::buffer_pages`] pages) and
    /// land it. The job is open to helpers from the moment of the claim.
    Claim(std::sync::Arc<Job>),
    /// An allocation shared a run it is zeroing: take stripes of it ([`Freelist::assist`]).
    Assist,
}

/// The nap an idle worker takes after `idle` without work, or `None` once it has napped for
/// `naps_ns` and should sleep until woken.
fn nap_length(idle: std::time::Duration, naps_ns: u64) -> Option<std::time::Duration> {
    let naps = std::time::Duration::from_nanos(naps_ns);
    if idle >= naps {
        return None;
    }
    let nap = if idle < NAP_STEADY_FOR {
        NAP_FIRST
    } else {
        // Double per NAP_STEADY_FOR of idleness past the first, up to the longest nap.
        let doublings = (idle.as_nanos() / NAP_STEADY_FOR.as_nanos()).min(16) as u32;
        (NAP_FIRST * 2u32.pow(doublings)).min(NAP_LONGEST)
    };
    Some(nap.min(naps - idle))
}

impl Freelist {
    /// Removes `run`'s pages from the queue's counts (the caller has taken the run out).
    fn take(&self, q: &mut Queue, run: &Run) {
        q.pages -= run.pages();
        q.blocks[run.order as usize] -= run.count;
        self.queued_hint.store(q.pages, Ordering::Relaxed);
    }

    /// A freelist for blocks of `page`-byte pages, holding at most `max_pages` queued and
    /// in-flight pages. `release` gives a run back to the system (pressure scans).
    pub(crate) fn new(
        page: usize,
        max_pages: usize,
        release: Box<dyn Fn(Run) + Send + Sync>,
    ) -> Freelist {
        Freelist {
            page,
            max_pages,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                pages: 0,
                blocks: [0; MAX_ORDER as usize + 1],
                in_flight: [0; MAX_ORDER as usize + 1],
                peak: 0,
                landings: 0,
                sleeping: 0,
                napping: 0,
                flushing: 0,
                stopped: false,
            }),
            work: Condvar::new(),
            landed: Condvar::new(),
            release,
            pressure_pages: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            queued_hint: Line(AtomicUsize::new(0)),
            landings_hint: Line(AtomicU64::new(0)),
            spin_ns: AtomicU64::new(0),
            naps_ns: AtomicU64::new(0),
            job: Mutex::new(None),
            shared: Mutex::new(None),
            shared_hint: Line(AtomicBool::new(false)),
            flushing_hint: AtomicUsize::new(0),
            stopped_hint: AtomicBool::new(false),
            adopted: AtomicUsize::new(0),
            worker_locking: AtomicBool::new(false),
            due_ns: AtomicU64::new(u64::MAX),
            late_until_ns: AtomicU64::new(0),
            hold_ns: AtomicU64::new(0),
            probation: AtomicBool::new(false),
            probe_out: AtomicBool::new(false),
            born: std::time::Instant::now(),
            last_release_ns: AtomicU64::new(0),
            release_gap_ns: AtomicU64::new(0),
        }
    }

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
            self.promise(std::time::Duration::ZERO);
            if job.finish(len) {
                land(&job);
                return;
            }
        }
    }

    /// The flag the allocation side checks before it waits for a busy lock (see
    /// `sync::lock_within`): pass it for the heap's pools too.
    pub(crate) fn worker_locking(&self) -> &AtomicBool {
        &self.worker_locking
    }

    /// The worker's side: marks a section in which it takes shared locks; ends when the
    /// returned value is dropped.
    pub(crate) fn locking(&self) -> Locking<'_> {
        self.worker_locking.store(true, Ordering::Release);
        Locking(&self.worker_locking)
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
    #[cfg(test)]
    pub(crate) fn current_job(&self) -> Option<std::sync::Arc<Job>> {
        lock(&self.job).clone()
    }

    /// The allocator's side: if the worker is zeroing a claim of `order`, takes stripes of it
    /// and zeroes them with `zero(offset, len)` (offsets from the run's start) until none is
    /// left. Returns true if there was such a claim. The run still lands through the worker.
    pub(crate) fn help(&self, order: u8, mut zero: impl FnMut(&Job, usize, usize)) -> bool {
        let Some(job) =
            lock_within(&self.job, HANDOFF_WAIT, &self.worker_locking).and_then(|j| j.clone())
        else {
            return false;
        };
        if job.run.order != order {
            return false;
        }
        while let Some((off, len)) = job.next_stripe(self.page) {
            zero(&job, off, len);
            let landed_by_me = job.finish(len);
            debug_assert!(!landed_by_me, "the worker never abandons its claim");
        }
        true
    }

    /// How long an idle worker keeps polling for work before it sleeps (default 0). Waking a
    /// sleeping thread costs the releasing thread a system call and the worker a scheduling
    /// delay (tens of microseconds in a VM); a short poll keeps a busy heap's worker awake
    /// between releases. The poll runs at the worker's low priority.
    pub(crate) fn set_worker_spin(&self, d: std::time::Duration) {
        self.spin_ns
            .store(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// How long an idle worker keeps napping, after its spin, before it sleeps until woken
    /// (default 0: it sleeps at once). A napping worker sleeps [`NAP_FIRST`] at a time for the
    /// first [`NAP_STEADY_FOR`] of idleness, then naps twice as long each time up to
    /// [`NAP_LONGEST`], and looks at the queue whenever it wakes up: releases never wake it.
    ///
    /// This is what keeps a wake-up off the releasing thread when releases come further apart
    /// than the spin: measured here (a VM), waking a sleeping thread cost the releasing thread
    /// 8-10 us, more than the release itself by a factor of fifty. A nap costs only the worker
    /// a timer wake-up, and the worker finds queued work at most one nap late (an allocation
    /// that comes first zeroes the blocks it needs itself).
    pub(crate) fn set_worker_naps(&self, d: std::time::Duration) {
        self.naps_ns
            .store(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Polls for queued work (a chunk's worth: smaller releases are left to the allocations
    /// that will want them, as they do not wake a sleeping worker either) or a shared run, for
    /// up to the worker spin time; true if some arrived.
    fn spin_for_work(&self) -> bool {
        let ns = self.spin_ns.load(Ordering::Relaxed);
        if ns == 0 {
            return false;
        }
        let end = std::time::Instant::now() + std::time::Duration::from_nanos(ns);
        // When queued work was first seen: it is claimed once it has waited CLAIM_DELAY.
        let mut seen: Option<std::time::Instant> = None;
        loop {
            for _ in 0..64 {
                if self.shared_hint.load(Ordering::Relaxed) {
                    return true;
                }
                // A flush wants even a small queue zeroed now; a stop ends the spin at once.
                if self.stopped_hint.load(Ordering::Relaxed)
                    || (self.flushing_hint.load(Ordering::Relaxed) > 0
                        && self.queued_hint.load(Ordering::Relaxed) > 0)
                {
                    return true;
                }
                if self.queued_hint.load(Ordering::Relaxed) >= CHUNK_PAGES {
                    match seen {
                        Some(t) if t.elapsed() >= CLAIM_DELAY && !self.holding() => return true,
                        Some(_) => {}
                        None => seen = Some(std::time::Instant::now()),
                    }
                } else {
                    seen = None; // an allocation took it
                }
                std::hint::spin_loop();
            }
            self.promise(std::time::Duration::ZERO);
            if self.holding() && self.flushing_hint.load(Ordering::Relaxed) == 0 {
                return false; // queued work is the allocations' for now (see `next_work`)
            }
            if seen.is_none() && std::time::Instant::now() >= end {
                return false;
            }
        }
    }

    /// Records a release (queued or not) in the rhythm of releases: the time of the last one
    /// and a moving average of the gaps between them.
    fn note_release(&self, now: u64) {
        let last = self.last_release_ns.swap(now, Ordering::Relaxed);
        let gap = now.saturating_sub(last);
        if last == 0 || gap > RHYTHM_MAX_NS {
            return; // no rhythm to learn from a first release or a long pause
        }
        let old = self.release_gap_ns.load(Ordering::Relaxed);
        let new = if old == 0 {
            gap
        } else {
            old - old / 4 + gap / 4
        };
        self.release_gap_ns.store(new, Ordering::Relaxed);
    }

    /// When releases come in a steady rhythm: how long the idle worker can nap and still be
    /// awake [`EARLY_BY`] before the next release is due. `None`: spin now.
    fn until_next_release(&self) -> Option<std::time::Duration> {
        let gap = self.release_gap_ns.load(Ordering::Relaxed);
        if gap == 0 {
            return None;
        }
        let due = self.last_release_ns.load(Ordering::Relaxed) + gap;
        let wake = due.saturating_sub(EARLY_BY.as_nanos() as u64);
        let now = self.now_ns();
        (wake > now + EARLY_BY.as_nanos() as u64)
            .then(|| std::time::Duration::from_nanos(wake - now))
    }

    /// Now, in ns since the list was made.
    fn now_ns(&self) -> u64 {
        self.born.elapsed().as_nanos() as u64
    }

    /// The worker's promise: it looks at the queue again within `d` (see `due_ns`).
    ///
    /// Called by the worker only (and by a release that wakes it). A worker that renews its
    /// promise more than [`PREEMPTED`] after it fell due was kept off its core meanwhile: the
    /// machine is busy, and releases zero their own buffers for the next [`LATE_HOLD`].
    pub(crate) fn promise(&self, d: std::time::Duration) {
        let now = self.now_ns();
        let prev = self
            .due_ns
            .swap(now.saturating_add(d.as_nanos() as u64), Ordering::Relaxed);
        if prev != u64::MAX && now > prev.saturating_add(PREEMPTED.as_nanos() as u64) {
            self.hold(now);
        }
    }

    /// True when the worker is late by more than [`WORKER_GRACE`] on its promise, or was so
    /// within the last [`LATE_HOLD`]: a machine busy enough to leave the worker without a core
    /// usually stays so, and a worker that runs for a moment meanwhile is likely to lose its
    /// core again before it is done.
    fn worker_late(&self, now: u64) -> bool {
        if now < self.late_until_ns.load(Ordering::Relaxed) {
            return true;
        }
        let due = self.due_ns.load(Ordering::Relaxed);
        let late = due != u64::MAX && now > due.saturating_add(WORKER_GRACE.as_nanos() as u64);
        if late {
            self.hold(now);
        }
        late
    }

    /// True while the machine looks busy: the worker was found late or kept off its core
    /// lately, and releases zero their own buffers (see [`hold`](Self::hold)).
    pub(crate) fn busy(&self) -> bool {
        self.holding()
    }

    /// True while releases zero their own buffers (see [`hold`](Self::hold)).
    fn holding(&self) -> bool {
        self.now_ns() < self.late_until_ns.load(Ordering::Relaxed)
    }

    /// Releases zero their own buffers from `now` for a while: [`LATE_HOLD`], doubled (up to
    /// [`LATE_HOLD_MAX`]) each time the worker is found late again soon after the last hold
    /// ended, so that a machine that stays busy queues almost nothing for a worker that gets
    /// no core, while a single hiccup costs one short hold.
    fn hold(&self, now: u64) {
        let until = self.late_until_ns.load(Ordering::Relaxed);
        if now < until {
            return; // one hiccup, seen twice (by a release and by the worker): one hold
        }
        let last = self
            .hold_ns
            .load(Ordering::Relaxed)
            .max(LATE_HOLD.as_nanos() as u64);
        let hold = if until > 0 && now < until.saturating_add(last) {
            (last * 2).min(LATE_HOLD_MAX.as_nanos() as u64)
        } else {
            LATE_HOLD.as_nanos() as u64
        };
        self.hold_ns.store(hold, Ordering::Relaxed);
        self.late_until_ns.store(now + hold, Ordering::Relaxed);
        self.probe_out.store(false, Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
    }

    /// The bound on queued plus in-flight pages.
    pub(crate) fn max_pages(&self) -> usize {
        self.max_pages
    }

    /// Pages queued now (not counting runs the worker is zeroing).
    pub(crate) fn pages(&self) -> usize {
        lock(&self.queue).pages
    }

    /// Pages queued or being zeroed now.
    pub(crate) fn pending_pages(&self) -> usize {
        let q = lock(&self.queue);
        q.pages + q.in_flight_pages() + self.adopted.load(Ordering::Acquire)
    }

    /// The most pages ever queued plus in flight at once.
    pub(crate) fn peak_pages(&self) -> usize {
        lock(&self.queue).peak
    }

    /// Pages given back to the system unzeroed by pressure scans.
    pub(crate) fn pressure_pages(&self) -> u64 {
        self.pressure_pages.load(Ordering::Relaxed)
    }

    /// Buffers refused by [`queue`](Self::queue) because of the bound or a stopped list.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Queues a released buffer's runs in O(1). Refuses (returning the runs) when the bound
    /// would be passed or the list has stopped: the caller then frees the buffer itself.
    ///
    /// A sleeping worker is woken only once [`CHUNK_PAGES`] pages are queued: waking it costs a
    /// system call, more than zeroing a few small blocks. Smaller releases wait for the next
    /// wake-up, an allocation that takes them, or [`flush`](Self::flush).
    pub(crate) fn queue(&self, runs: Runs) -> Result<(), Runs> {
        let now = self.now_ns();
        self.note_release(now);
        let pages: usize = runs.iter().map(Run::pages).sum();
        let wake = {
            let Some(mut q) = lock_within(&self.queue, HANDOFF_WAIT, &self.worker_locking) else {
                // The worker holds the lock and is not running: the caller zeroes the buffer.
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(runs);
            };
            let pending = q.pages + q.in_flight_pages();
            if q.stopped || pending + pages > self.max_pages || self.worker_late(now) {
                drop(q);
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(runs);
            }
            // After a hold, releases go on zeroing their own buffers until the worker shows
            // it runs again: the first one asks it to (the probe), and it answers when the
            // scheduler runs it (see `answer_probe`). Queuing meanwhile would pile work up
            // for a worker that may still get no core, for allocations to zero.
            if self.probation.load(Ordering::Relaxed) {
                let ask = !self.probe_out.swap(true, Ordering::Relaxed);
                let sleeping = q.sleeping > 0;
                drop(q);
                if ask && sleeping {
                    // A napping or spinning worker answers by its own promise.
                    self.expect_worker();
                    self.work.notify_one();
                }
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(runs);
            }
            for r in &runs {
                q.blocks[r.order as usize] += r.count;
            }
            q.pages += pages;
            q.peak = q.peak.max(pending + pages);
            q.items.push_back((runs, pages));
            self.queued_hint.store(q.pages, Ordering::Relaxed);
            q.sleeping > 0 && (q.pages >= CHUNK_PAGES || q.flushing > 0)
        };
        if wake {
            self.expect_worker();
            self.work.notify_one();
        }
        Ok(())
    }

    /// Before a sleeping worker is woken: it owes a look at the queue as soon as the scheduler
    /// runs it, and counts as late after [`WAKE_GRACE`] (a woken thread that has a core runs
    /// within tens of microseconds), not the longer grace of a running worker.
    fn expect_worker(&self) {
        let due = self.due_ns.load(Ordering::Relaxed);
        let grace_gap = (WORKER_GRACE - WAKE_GRACE).as_nanos() as u64;
        let by = self.now_ns().saturating_sub(grace_gap);
        if due == u64::MAX || by < due {
            self.due_ns.store(by, Ordering::Relaxed);
        }
    }

    /// The worker, running: ends the probation after a hold (see `queue`) if it runs on time
    /// (within its grace of its promise, or of a probe's wake-up), or starts a longer hold if
    /// it is late.
    fn answer_probe(&self) {
        if !self.probation.load(Ordering::Relaxed) || self.holding() {
            return;
        }
        let now = self.now_ns();
        let due = self.due_ns.load(Ordering::Relaxed);
        if due != u64::MAX && now > due.saturating_add(WORKER_GRACE.as_nanos() as u64) {
            self.hold(now);
        } else {
            self.probation.store(false, Ordering::Relaxed);
            self.probe_out.store(false, Ordering::Relaxed);
        }
    }

    /// The worker's side: waits for queued work and claims up to [`CHUNK_PAGES`] pages from the
    /// end of the oldest buffer's last run. Returns `None` once the list is stopped. The claim
    /// is *in flight* until [`landed`](Self::landed) is called with it.
    #[cfg(any(test, loom))]
    pub(crate) fn claim(&self) -> Option<Run> {
        loop {
            match self.next_work()? {
                Work::Claim(job) => return Some(job.run()),
                Work::Assist => continue,
            }
        }
    }

    /// The worker's loop step: like [`claim`](Self::claim), but also returns
    /// [`Work::Assist`] when an allocation shared a run while the worker was idle, and gives
    /// the size in pages of the buffer a claimed run came from (the worker zeroes runs of large
    /// buffers with streaming stores).
    pub(crate) fn next_work(&self) -> Option<Work> {
        // Declared before the guard, so dropped after it: the flag stays set while the queue's
        // lock is held (see `sync::lock_within`).
        let mut locking = Some(self.locking());
        let mut q = lock(&self.queue);
        // When this worker went idle (for its naps).
        let mut idle_since: Option<std::time::Instant> = None;
        loop {
            if q.stopped {
                return None;
            }
            self.answer_probe();
            if q.items.is_empty() && self.shared_hint.load(Ordering::Acquire) {
                self.promise(std::time::Duration::ZERO);
                return Some(Work::Assist);
            }
            // While releases zero their own buffers (the machine is busy, see `hold`), the
            // worker leaves queued work to allocations unless a flush waits for it: a nice-19
            // thread that may lose its core at any moment must not hold the pools' locks then.
            let claim = q.flushing > 0 || !self.holding();
            if let Some((item, buffer_pages)) = q.items.front_mut().filter(|_| claim) {
                let buffer_pages = *buffer_pages;
                let last = item.last_mut().expect("queued items are never empty");
                let k = last.count.min((CHUNK_PAGES >> last.order).max(1));
                last.count -= k;
                let run = Run {
                    start: last.start + last.count * (self.page << last.order),
                    order: last.order,
                    count: k,
                };
                if last.count == 0 {
                    item.pop();
                    if item.is_empty() {
                        q.items.pop_front();
                    }
                }
                self.take(&mut q, &run);
                q.in_flight[run.order as usize] += run.pages();
                // Open to helpers before the queue's lock is released: whoever sees the claim
                // in flight finds its job (see `current_job`).
                let job = std::sync::Arc::new(Job::new(run, buffer_pages, self.page));
                *lock(&self.job) = Some(job.clone());
                // Zeroing a chunk takes tens of microseconds: it looks again well within this.
                self.promise(std::time::Duration::ZERO);
                return Some(Work::Claim(job));
            }
            let found = match idle_since {
                // Just out of work: spin first; but when releases come in a steady rhythm, nap
                // until shortly before the next one is due, and spin only then (spinning all
                // along would double the process's CPU time for a program that works between
                // its allocations).
                None => {
                    idle_since = Some(std::time::Instant::now());
                    if let Some(nap) = self.until_next_release()
                        && q.flushing == 0
                    {
                        q.napping += 1;
                        self.promise(nap);
                        drop(locking.take());
                        q = wait_timeout(&self.work, q, nap);
                        locking = Some(self.locking());
                        q.napping -= 1;
                        if (!q.items.is_empty() && !self.holding())
                            || q.stopped
                            || self.shared_hint.load(Ordering::Acquire)
                        {
                            continue;
                        }
                    }
                    drop(q);
                    drop(locking.take());
                    let found = self.spin_for_work();
                    locking = Some(self.locking());
                    q = lock(&self.queue);
                    found
                }
                Some(_) => false,
            };
            if found {
                // Work came (even if an allocation took it first): the heap is busy, so the
                // next idle spell starts with a spin again.
                idle_since = None;
                continue;
            }
            if (!q.items.is_empty() && (q.flushing > 0 || !self.holding()))
                || q.stopped
                || self.shared_hint.load(Ordering::Acquire)
            {
                continue;
            }
            let idle = idle_since.map_or(std::time::Duration::ZERO, |t| t.elapsed());
            match nap_length(idle, self.naps_ns.load(Ordering::Relaxed)) {
                Some(nap) => {
                    q.napping += 1;
                    self.promise(nap);
                    drop(locking.take());
                    q = wait_timeout(&self.work, q, nap);
                    locking = Some(self.locking());
                    q.napping -= 1;
                }
                None => {
                    q.sleeping += 1;
                    self.due_ns.store(u64::MAX, Ordering::Relaxed);
                    drop(locking.take());
                    q = wait(&self.work, q);
                    locking = Some(self.locking());
                    q.sleeping -= 1;
                    idle_since = None;
                }
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
        let mut q = lock(&self.queue);
        q.in_flight[run.order as usize] -= run.pages();
        q.landings += 1;
        self.landings_hint.store(q.landings, Ordering::Release);
        drop(q);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.landed.notify_all();
        }
    }

    /// The allocator's side: claims up to `n` queued blocks of `order`, from the start of a
    /// buffer's runs, for an allocation that needs `want` (at least `n`) blocks of that order in
    /// all. The buffer is, among the oldest [`FIT_SCAN`], the one holding the smallest run of at
    /// least `want` blocks of the order (the oldest among equals), else the oldest one with
    /// blocks of the order. The caller owns them (dirty) and must zero
    /// them.
    pub(crate) fn steal(&self, order: u8, mut n: usize, want: usize) -> Runs {
        let mut out = Runs::new();
        let Some(mut q) = lock_within(&self.queue, HANDOFF_WAIT, &self.worker_locking) else {
            return out; // the worker holds the lock and is not running: do without
        };
        if q.blocks[order as usize] == 0 {
            return out;
        }
        let size = self.page << order;
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
            let best = (q.items.iter().take(FIT_SCAN).enumerate())
                .filter_map(|(i, (item, _))| fit(item, least).map(|c| (c, i)))
                .min();
            let Some(i) = best
                .map(|(_, i)| i)
                .or_else(|| q.items.iter().position(|(item, _)| fit(item, 1).is_some()))
            else {
                break;
            };
            let item = &mut q.items[i].0;
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
                q.items.remove(i);
            }
        }
        for r in &out {
            self.take(&mut q, r);
        }
        let drained = q.pages == 0 && q.in_flight_pages() == 0;
        drop(q);
        if drained && self.waiting.load(Ordering::Relaxed) > 0 {
            self.landed.notify_all();
        }
        out
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
    /// caller waits for), and after [`HANDOFF_CAP`] in any case. Returns `done()`'s last
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
            let (mut seen, mut progress) = (self.due_ns.load(Ordering::Relaxed), start);
            loop {
                for _ in 0..32 {
                    std::hint::spin_loop();
                    if done() {
                        return true;
                    }
                }
                let now = std::time::Instant::now();
                let due = self.due_ns.load(Ordering::Relaxed);
                if due != seen {
                    (seen, progress) = (due, now);
                }
                if now - progress >= HANDOFF_WAIT || now - start >= HANDOFF_CAP {
                    return done();
                }
            }
        }
    }

    /// Waits until nothing is queued or in flight.
    pub(crate) fn flush(&self) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.flushing_hint.fetch_add(1, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        q.flushing += 1;
        if q.sleeping > 0 || q.napping > 0 {
            self.work.notify_one();
        }
        while (q.pages > 0 || q.in_flight_pages() > 0 || self.adopted.load(Ordering::Acquire) > 0)
            && !q.stopped
        {
            // With a timeout: adopted runs land without the queue's lock held throughout.
            q = wait_timeout(&self.landed, q, std::time::Duration::from_millis(1));
        }
        q.flushing -= 1;
        drop(q);
        self.flushing_hint.fetch_sub(1, Ordering::Relaxed);
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// Stops the list: the worker's next [`claim`](Self::claim) returns `None`, further
    /// buffers are refused. Returns every queued run, for the caller to release.
    pub(crate) fn stop(&self) -> Vec<Run> {
        self.stopped_hint.store(true, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        q.stopped = true;
        let runs: Vec<Run> = q.items.drain(..).flat_map(|(runs, _)| runs).collect();
        q.pages = 0;
        q.blocks = [0; MAX_ORDER as usize + 1];
        self.queued_hint.store(0, Ordering::Relaxed);
        drop(q);
        self.work.notify_all();
        self.landed.notify_all();
        runs
    }

    /// Takes queued runs, oldest buffer first, until at least `nr_pages` pages are taken.
    fn drain(&self, nr_pages: usize) -> Vec<Run> {
        let mut q = lock(&self.queue);
        let mut out = Vec::new();
        let mut taken = 0;
        while taken < nr_pages {
            let Some((item, _)) = q.items.pop_front() else {
                break;
            };
            for r in &item {
                self.take(&mut q, r);
                taken += r.pages();
            }
            out.extend(item);
        }
        if q.pages == 0 && q.in_flight_pages() == 0 {
            self.landed.notify_all();
        }
        out
    }
}

impl Shrinker for Freelist {
    fn name(&self) -> &str {
        "deferred freelist"
    }

    fn count(&self) -> usize {
        self.pages()
    }

    /// Gives whole queued buffers, oldest first, straight back to the system, unzeroed.
    fn scan(&self, nr_pages: usize) -> usize {
        let runs = self.drain(nr_pages);
        let freed: usize = runs.iter().map(Run::pages).sum();
        for r in runs {
            (self.release)(r);
        }
        self.pressure_pages
            .fetch_add(freed as u64, Ordering::Relaxed);
        freed
    }
}

impl std::fmt::Debug for Freelist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Freelist")
            .field("max_pages", &self.max_pages)
            .field("pending_pages", &self.pending_pages())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn naps_start_short_grow_to_the_longest_and_end() {
        let ms = |m: u64| std::time::Duration::from_millis(m);
        let budget = 100_000_000; // 100 ms
        assert_eq!(nap_length(ms(0), budget), Some(NAP_FIRST));
        assert_eq!(nap_length(ms(1), budget), Some(NAP_FIRST));
        let mut last = NAP_FIRST;
        for m in 2..93 {
            let nap = nap_length(ms(m), budget).unwrap();
            assert!(nap >= last && nap <= NAP_LONGEST, "{m} ms: {nap:?}");
            last = nap;
        }
        assert_eq!(last, NAP_LONGEST);
        assert_eq!(
            nap_length(std::time::Duration::from_micros(99_950), budget),
            Some(std::time::Duration::from_micros(50)),
            "the last nap ends with the budget"
        );
        assert_eq!(nap_length(ms(100), budget), None);
        assert_eq!(nap_length(ms(0), 0), None, "no naps: sleep at once");
    }

    fn list(max: usize) -> (Freelist, Arc<std::sync::Mutex<Vec<Run>>>) {
        let released = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = released.clone();
        (
            Freelist::new(4096, max, Box::new(move |run| r.lock().unwrap().push(run))),
            released,
        )
    }

    fn run(start: usize, order: u8, count: usize) -> Run {
        Run {
            start,
            order,
            count,
        }
    }

    #[test]
    fn claim_takes_chunks_from_the_end_of_the_oldest() {
        let (l, _) = list(10_000);
        l.queue(smallvec::smallvec![run(0, 8, 3), run(3 << 20, 0, 2)])
            .unwrap();
        l.queue(smallvec::smallvec![run(1 << 30, 0, 1)]).unwrap();
        assert_eq!(l.claim(), Some(run(3 << 20, 0, 2)));
        assert_eq!(l.in_flight(0), 2);
        assert_eq!(
            l.claim(),
            Some(run(2 << 20, 8, 1)),
            "one 1 MiB block per claim"
        );
        assert_eq!(l.pages(), 2 * 256 + 1);
        l.landed(&run(3 << 20, 0, 2));
        assert_eq!(l.in_flight(0), 0);
    }

    #[test]
    fn steal_takes_from_the_oldest_front() {
        let (l, _) = list(10_000);
        l.queue(smallvec::smallvec![run(0, 4, 4)]).unwrap();
        l.queue(smallvec::smallvec![run(1 << 20, 4, 2), run(2 << 20, 0, 3)])
            .unwrap();
        assert!(l.steal(8, 1, 1).is_empty());
        let got = l.steal(4, 3, 3);
        assert_eq!(
            got.as_slice(),
            [run(0, 4, 3)],
            "the oldest buffer's first blocks"
        );
        assert_eq!(l.pages(), 16 + 2 * 16 + 3);
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
        let (l, _) = list(10_000);
        l.queue(smallvec::smallvec![run(0, 8, 4)]).unwrap(); // a 4 MiB buffer
        l.queue(smallvec::smallvec![run(8 << 20, 8, 1)]).unwrap(); // a 1 MiB one
        l.queue(smallvec::smallvec![run(16 << 20, 8, 4)]).unwrap(); // another 4 MiB
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
        assert_eq!(l.pages(), 0);
    }

    #[test]
    fn after_a_hold_releases_wait_for_the_worker_to_answer_a_probe() {
        let (l, _) = list(10_000);
        let one = || smallvec::smallvec![run(0, 0, 1)];
        l.hold(l.now_ns());
        assert!(
            l.queue(one()).is_err(),
            "held: the release zeroes its buffer"
        );
        std::thread::sleep(LATE_HOLD + std::time::Duration::from_millis(5));
        assert!(!l.holding());
        assert!(l.queue(one()).is_err(), "on probation: the probe is asked");
        assert!(l.probe_out.load(Ordering::Relaxed));
        assert!(l.queue(one()).is_err(), "still unanswered");
        l.answer_probe(); // the worker runs, within its grace
        assert!(!l.probation.load(Ordering::Relaxed));
        assert!(l.queue(one()).is_ok(), "queued again");
        assert_eq!(l.pages(), 1);

        // A worker that answers late starts a longer hold.
        l.hold(l.now_ns());
        let first = l.hold_ns.load(Ordering::Relaxed);
        std::thread::sleep(
            std::time::Duration::from_nanos(first) + std::time::Duration::from_millis(5),
        );
        assert!(l.queue(one()).is_err(), "the probe");
        l.promise(std::time::Duration::ZERO); // the worker: "I look at once"; then it does not
        std::thread::sleep(WORKER_GRACE + std::time::Duration::from_millis(1));
        l.answer_probe();
        assert!(l.holding(), "late: held again");
        assert!(l.hold_ns.load(Ordering::Relaxed) > first, "for longer");
        assert!(l.queue(one()).is_err());
    }

    #[test]
    fn a_claim_is_open_to_helpers_from_the_moment_it_is_made() {
        let (l, _) = list(10_000);
        l.queue(smallvec::smallvec![run(0, 8, 1)]).unwrap();
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

    #[test]
    fn a_shared_run_is_offered_to_the_idle_worker() {
        let (l, _) = list(10_000);
        let job = std::sync::Arc::new(Job::new(run(0, 4, 4), 64, 4096));
        assert!(l.share(Some(job.clone())));
        assert!(!l.share(Some(job.clone())), "one shared run at a time");
        assert!(matches!(l.next_work(), Some(Work::Assist)));
        let mut stripes = Vec::new();
        l.assist(
            |_, off, len| stripes.push((off, len)),
            |_| panic!("not abandoned"),
        );
        assert_eq!(
            stripes,
            [(0, 131072), (131072, 65536), (196608, 65536)],
            "half of what is left per claim, whole stripes, at least one"
        );
        assert!(job.complete());
        l.share(None);
        // Queued work comes before assisting.
        l.queue(smallvec::smallvec![run(1 << 20, 0, 1)]).unwrap();
        assert!(matches!(
            l.next_work(),
            Some(Work::Claim(job)) if job.run() == run(1 << 20, 0, 1) && job.buffer_pages() == 1
        ));
    }

    #[test]
    fn bound_refuses_and_scan_releases() {
        let (l, released) = list(100);
        l.queue(smallvec::smallvec![run(0, 4, 4)]).unwrap();
        assert!(
            l.queue(smallvec::smallvec![run(1 << 20, 4, 3)]).is_err(),
            "64 + 48 > 100"
        );
        l.queue(smallvec::smallvec![run(1 << 20, 4, 2)]).unwrap();
        assert_eq!(l.refused(), 1);
        assert_eq!(l.peak_pages(), 96);
        assert_eq!(l.scan(10), 64, "whole buffers, oldest first");
        assert_eq!(released.lock().unwrap().as_slice(), [run(0, 4, 4)]);
        assert_eq!(l.pressure_pages(), 64);
        assert_eq!(l.stop(), [run(1 << 20, 4, 2)]);
        assert_eq!(l.claim(), None);
        assert!(
            l.queue(smallvec::smallvec![run(0, 0, 1)]).is_err(),
            "stopped"
        );
    }
}

/// Loom models of the queue, the worker's claims and the striped sharing. Run by `.ci/loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::thread;
    use std::sync::Arc;

    #[test]
    fn freelist_queue_races_worker_and_pressure_scan() {
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
            let stolen: usize = list.steal(8, 2, 2).iter().map(Run::pages).sum();
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
            let (first, n) = (off / STRIPE_BYTES, len.div_ceil(STRIPE_BYTES));
            ((1 << n) - 1) << first
        }
        loom::model(|| {
            let list = Arc::new(Freelist::new(4096, 1 << 20, Box::new(|_| {})));
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
                    list.assist(
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
            assert!(list.share(Some(job.clone())));
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
            list.share(None);
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
            // The worker holds one stripe (half of the two).
            let (off, len) = job.next_worker_piece(4096).unwrap();
            assert_eq!(off, 0);
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
}
