//! Deferred freeing: release queues a buffer; a low-priority worker zeroes it later.
//!
//! This is the kernel series' deferred-free helper, generic as it is there: a released
//! [`Item`] and the pages it holds go on a bounded [`ReleaseQueue`] in O(1); a worker at nice
//! 19 ([`spawn_worker`]) takes queued work and makes the memory reusable (the kernel's
//! `DF_NORMAL`); under memory pressure the queue, a [`Shrinker`](crate::Shrinker), hands queued
//! items straight to the release callback with [`Reason::UnderPressure`], unzeroed. Both pool
//! users run on it: [`crate::SystemHeap`] (items are a buffer's [`Runs`] of blocks, which its
//! worker claims a chunk at a time and zeroes, sharing stripes with allocations) and
//! [`crate::DmaBufPool`] (items are whole dma-bufs, which its worker takes one at a time).
//!
//! Beyond the kernel helper:
//! - **backpressure**: queued and in-flight pages never exceed the release queue's bound;
//!   [`ReleaseQueue::queue`] refuses an item that would pass it, and the releasing thread then
//!   frees it itself (so memory stays bounded and nothing is dropped on the floor);
//! - **a worker that is not scheduled is not waited for**: the worker promises when it looks
//!   at the queue next; while it is late (a busy machine), releases free their own items
//!   (`idle.rs`);
//! - **inline zeroing** (blocks): an allocation that misses its pool can
//!   [`steal`](ReleaseQueue::steal) queued dirty blocks and zero them on its own thread, which
//!   is far cheaper than fresh pages from the kernel; it takes them from the start of the
//!   oldest buffer while the worker works from its end, so the two zero in parallel and the
//!   allocation ends up with that buffer's blocks, end to end (`share.rs`).
//!
//! The release queue deals in items and numbers; it never touches memory itself, which is what
//! lets the loom models run it with plain numbers.

mod punctual;
mod queue;
mod share;
mod worker;

use std::collections::VecDeque;

use crossbeam_utils::CachePadded;

use crate::pool::MAX_ORDER;
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering, lock};

use self::punctual::Punctuality;
pub(crate) use self::share::Job;

/// A buffer's runs: up to two inline (most buffers), more on the heap.
pub(crate) type Runs = smallvec::SmallVec<[Run; 2]>;

/// What a [`ReleaseQueue`] holds: a released thing and the pages it holds.
pub(crate) trait Item: Send + 'static {
    /// The pages it holds (what counts against the queue's bound).
    fn pages(&self) -> usize;

    /// Its blocks, as (order, count), for the queue's per-order counts (what
    /// [`steal`](ReleaseQueue::steal) looks at). None for an item not made of blocks.
    fn blocks(&self) -> impl Iterator<Item = (u8, usize)> {
        std::iter::empty()
    }
}

impl Item for Runs {
    fn pages(&self) -> usize {
        self.iter().map(Run::pages).sum()
    }

    fn blocks(&self) -> impl Iterator<Item = (u8, usize)> {
        self.iter().map(|r| (r.order, r.count))
    }
}

/// Why the release callback of a [`ReleaseQueue`] is given an item (the kernel helper's
/// `DF_NORMAL` and `DF_UNDER_PRESSURE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The worker is done with it: make it reusable (zero and pool it).
    Normal,
    /// Memory is short, or the queue stops: give it back to the system, unzeroed.
    UnderPressure,
}

/// Starts a deferred-free worker thread named `name` running `body`: at nice 19, so that it
/// only uses cores nothing else wants, and with a timer slack of 5 us, so that its naps end on
/// time (the default slack is 50 us).
pub(crate) fn spawn_worker(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19)
            {
                log::debug!("pagepool: cannot lower the worker's priority: {e}");
            }
            // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects this thread
            // only.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 5_000 as libc::c_ulong) };
            body()
        })
}

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

    /// Whether the run is a whole buffer of `buffer_pages` pages (a 1 MiB buffer of one
    /// block), not a chunk of a larger one: such a run is shared with the worker and zeroed from
    /// both ends (see `Job::next_worker_piece`).
    #[inline]
    pub(crate) fn is_whole(&self, buffer_pages: usize) -> bool {
        self.pages() == buffer_pages
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

pub(super) struct Queue<I> {
    /// Released items, oldest first, with the pages they were queued with (a buffer's size:
    /// what is left of it may be less).
    pub(super) items: VecDeque<(I, usize)>,
    /// Pages queued (not counting in-flight claims).
    pub(super) pages: usize,
    /// Queued blocks per order (lets `steal` skip a scan when there is nothing of its order).
    pub(super) blocks: [usize; MAX_ORDER as usize + 1],
    /// Pages claimed by the worker and not yet landed, per order (whole items: order 0).
    pub(super) in_flight: [usize; MAX_ORDER as usize + 1],
    pub(super) peak: usize,
    /// Claims landed so far (what `wait_landed` watches).
    pub(super) landings: u64,
    /// Workers asleep in `claim` until woken (a wake-up costs a system call: only made when
    /// needed).
    pub(super) sleeping: usize,
    /// Workers napping: asleep for a short time, they look for work by themselves when they
    /// wake, so a release does not wake them.
    pub(super) napping: usize,
    /// Threads in `flush` (the worker must run even for a small queue).
    pub(super) flushing: usize,
    pub(super) stopped: bool,
}

impl<I> Queue<I> {
    pub(super) fn in_flight_pages(&self) -> usize {
        self.in_flight.iter().sum()
    }
}

/// A bounded queue of released items waiting for the worker.
pub(crate) struct ReleaseQueue<I: Item = Runs> {
    pub(super) page: usize,
    pub(super) max_pages: usize,
    pub(super) queue: Mutex<Queue<I>>,
    /// Signalled when work is queued or the list stops.
    pub(super) work: Condvar,
    /// Signalled when an in-flight claim lands or the queue drains.
    pub(super) landed: Condvar,
    pub(super) release: Box<dyn Fn(I, Reason) + Send + Sync>,
    pub(super) pressure_pages: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) waiting: AtomicUsize,
    /// Lock-free mirrors for spinning (pages queued, landings so far), each on a cache line of
    /// its own: the idle worker polls them.
    pub(super) queued_hint: CachePadded<AtomicUsize>,
    pub(super) landings_hint: CachePadded<AtomicU64>,
    /// Pages queued from which a release wakes a sleeping worker.
    pub(super) wake_pages: AtomicUsize,
    /// The worker's current claim, open to helpers.
    pub(super) job: Mutex<Option<std::sync::Arc<Job>>>,
    /// A run an allocation is zeroing inline, open to the idle worker.
    pub(super) shared: Mutex<Option<std::sync::Arc<Job>>>,
    pub(super) shared_hint: CachePadded<AtomicBool>,
    /// Threads in `flush`, and whether the list stopped: a spinning worker stops spinning at
    /// once for either.
    pub(super) flushing_hint: AtomicUsize,
    pub(super) stopped_hint: AtomicBool,
    /// Pages of runs allocations gave up on, left to the worker to land (see `adopt`).
    pub(super) adopted: AtomicUsize,
    /// Set while the worker is in a section where it takes locks the allocation side also
    /// takes (see `sync::lock_within`).
    pub(super) worker_locking: AtomicBool,
    /// The worker's punctuality: its promise, holds, probation, spin and naps.
    pub(super) punctuality: Punctuality,
}

/// A section of the worker's in which it may hold locks the allocation side takes (see
/// [`ReleaseQueue::locking`]).
pub(crate) struct Locking<'a>(&'a AtomicBool);

impl Drop for Locking<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What the worker should do next (see [`ReleaseQueue::next_work`] and
/// [`ReleaseQueue::next_item`]).
#[derive(Debug)]
pub(crate) enum Work<W> {
    /// Work taken from the queue: a claimed run of blocks ([`Job`]: zero it and land it; the
    /// job is open to helpers from the moment of the claim), or a whole item (pass it to the
    /// release callback's owner and [`land_item`](ReleaseQueue::land_item) it).
    Claim(W),
    /// An allocation shared a run it is zeroing: take stripes of it ([`ReleaseQueue::assist`]).
    Assist,
    /// Nothing came within the poll time the worker asked for.
    Idle,
}

impl ReleaseQueue<Runs> {
    /// Removes `run`'s pages from the queue's counts (the caller has taken the run out).
    pub(super) fn take(&self, q: &mut Queue<Runs>, run: &Run) {
        q.pages -= run.pages();
        q.blocks[run.order as usize] -= run.count;
        self.queued_hint.store(q.pages, Ordering::Relaxed);
    }
}

impl<I: Item> ReleaseQueue<I> {
    /// Removes a whole item's pages and blocks from the queue's counts (the caller has taken
    /// it out). Counted from what is left of the item (the worker and allocations may have
    /// taken part of a buffer's runs), not from the pages it was queued with. Returns them.
    pub(super) fn take_item(&self, q: &mut Queue<I>, item: &I) -> usize {
        let pages = item.pages();
        q.pages -= pages;
        for (order, count) in item.blocks() {
            q.blocks[order as usize] -= count;
        }
        self.queued_hint.store(q.pages, Ordering::Relaxed);
        pages
    }

    /// A release queue for items of `page`-byte pages, holding at most `max_pages` queued and
    /// in-flight pages. `release` frees an item: with [`Reason::UnderPressure`] when a pressure
    /// scan takes it (give it back to the system, unzeroed).
    pub(crate) fn new(
        page: usize,
        max_pages: usize,
        release: Box<dyn Fn(I, Reason) + Send + Sync>,
    ) -> ReleaseQueue<I> {
        ReleaseQueue {
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
            queued_hint: CachePadded::new(AtomicUsize::new(0)),
            landings_hint: CachePadded::new(AtomicU64::new(0)),
            wake_pages: AtomicUsize::new(crate::config::CHUNK_PAGES),
            job: Mutex::new(None),
            shared: Mutex::new(None),
            shared_hint: CachePadded::new(AtomicBool::new(false)),
            flushing_hint: AtomicUsize::new(0),
            stopped_hint: AtomicBool::new(false),
            adopted: AtomicUsize::new(0),
            worker_locking: AtomicBool::new(false),
            punctuality: Punctuality::new(),
        }
    }

    /// Replaces the check of whether the machine's cores are oversubscribed (see `loaded`);
    /// `None` turns it off.
    pub(crate) fn set_load_check(&mut self, check: Option<fn() -> bool>) {
        self.punctuality.set_load_check(check);
    }

    /// The worker's promise: it looks at the queue again within `d` (see
    /// [`Punctuality::promise`]).
    pub(crate) fn promise(&self, d: std::time::Duration) {
        self.punctuality.promise(d);
    }

    /// True while the machine looks busy (see [`Punctuality::busy`]).
    pub(crate) fn busy(&self) -> bool {
        self.punctuality.busy()
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
}

impl<I: Item> std::fmt::Debug for ReleaseQueue<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseQueue")
            .field("max_pages", &self.max_pages)
            .field("pending_pages", &self.pending_pages())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::punctual::nap_length;
    use super::*;
    use crate::config::*;
    use crate::shrinker::Shrinker;
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

    fn list(max: usize) -> (ReleaseQueue, Arc<std::sync::Mutex<Vec<Run>>>) {
        let released = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = released.clone();
        (
            ReleaseQueue::new(
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
            ),
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
        let (mut l, _) = list(10_000);
        l.set_load_check(None); // the worker's punctuality alone
        let one = || smallvec::smallvec![run(0, 0, 1)];
        l.punctuality.hold(l.punctuality.now_ns(), 0);
        assert!(
            l.queue(one()).is_err(),
            "held: the release zeroes its buffer"
        );
        std::thread::sleep(LATE_HOLD + std::time::Duration::from_millis(5));
        assert!(!l.punctuality.holding());
        assert!(l.queue(one()).is_err(), "on probation: the probe is asked");
        assert!(l.punctuality.probe_out.load(Ordering::Relaxed));
        assert!(l.queue(one()).is_err(), "still unanswered");
        l.punctuality.answer_probe(); // the worker runs, within its grace
        assert!(!l.punctuality.probation.load(Ordering::Relaxed));
        assert!(l.queue(one()).is_ok(), "queued again");
        assert_eq!(l.pages(), 1);

        // A worker that answers late starts a longer hold.
        l.punctuality.hold(l.punctuality.now_ns(), 0);
        let first = l.punctuality.hold_ns.load(Ordering::Relaxed);
        std::thread::sleep(
            std::time::Duration::from_nanos(first) + std::time::Duration::from_millis(5),
        );
        assert!(l.queue(one()).is_err(), "the probe");
        l.promise(std::time::Duration::ZERO); // the worker: "I look at once"; then it does not
        std::thread::sleep(WORKER_GRACE + std::time::Duration::from_millis(1));
        l.punctuality.answer_probe();
        assert!(l.punctuality.holding(), "late: held again");
        assert!(
            l.punctuality.hold_ns.load(Ordering::Relaxed) > first,
            "for longer"
        );
        assert!(l.queue(one()).is_err());
    }

    #[test]
    fn a_worker_on_time_on_an_oversubscribed_machine_starts_another_hold() {
        let (mut l, _) = list(10_000);
        l.set_load_check(Some(|| true));
        let one = || smallvec::smallvec![run(0, 0, 1)];
        l.punctuality.hold(l.punctuality.now_ns(), 0);
        let first = l.punctuality.hold_ns.load(Ordering::Relaxed);
        std::thread::sleep(
            std::time::Duration::from_nanos(first) + std::time::Duration::from_millis(5),
        );
        assert!(!l.punctuality.holding());
        assert!(l.queue(one()).is_err(), "the probe");
        l.promise(std::time::Duration::ZERO);
        l.punctuality.answer_probe(); // on time, but more threads want the cores than there are
        assert!(l.punctuality.holding(), "held again");
        assert!(l.punctuality.probation.load(Ordering::Relaxed));
        assert!(
            l.punctuality.hold_ns.load(Ordering::Relaxed) > first,
            "longer, as a repeat"
        );
        assert!(l.queue(one()).is_err());
        assert_eq!(l.pages(), 0);
    }

    #[test]
    fn a_late_worker_is_held_against_only_on_a_loaded_machine() {
        static CHECKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let one = || smallvec::smallvec![run(0, 0, 1)];
        let late = |l: &ReleaseQueue| {
            l.promise(std::time::Duration::ZERO); // "I look at once"; then it does not
            std::thread::sleep(WORKER_GRACE + std::time::Duration::from_millis(1));
        };

        // Idle cores: a late worker was kept away by something passing; releases queue.
        let (mut l, _) = list(10_000);
        l.set_load_check(Some(|| {
            CHECKS.fetch_add(1, Ordering::Relaxed);
            false
        }));
        late(&l);
        assert!(l.queue(one()).is_ok(), "queued for the late worker");
        assert!(l.queue(one()).is_ok());
        assert!(!l.punctuality.holding() && !l.punctuality.probation.load(Ordering::Relaxed));
        assert_eq!(l.pages(), 2);
        assert_eq!(
            CHECKS.load(Ordering::Relaxed),
            1,
            "the machine is looked at once per LATE_HOLD, not once per release"
        );
        // Its own lateness, found when it comes back, is not held against it either.
        l.promise(std::time::Duration::ZERO);
        std::thread::sleep(LATE_HOLD + PREEMPTED + std::time::Duration::from_millis(1));
        l.promise(std::time::Duration::ZERO);
        assert!(!l.punctuality.holding());
        assert_eq!(CHECKS.load(Ordering::Relaxed), 2, "looked at again");

        // Oversubscribed cores: a hold, releases zero their own buffers.
        let (mut l, _) = list(10_000);
        l.set_load_check(Some(|| true));
        late(&l);
        assert!(l.queue(one()).is_err(), "held");
        assert!(l.punctuality.holding());
        assert_eq!(l.pages(), 0);

        // No load check: punctuality alone.
        let (mut l, _) = list(10_000);
        l.set_load_check(None);
        late(&l);
        assert!(l.queue(one()).is_err(), "held");
        assert!(l.punctuality.holding());
    }

    #[test]
    fn a_scan_counts_what_is_left_of_a_partly_claimed_buffer() {
        let (l, released) = list(10_000);
        l.queue(smallvec::smallvec![run(0, 8, 3)]).unwrap();
        let claimed = l.claim().unwrap();
        assert_eq!(claimed.pages(), 256, "one chunk from the end");
        // What is left (two blocks), not what was queued (three), goes back and is counted.
        assert_eq!(l.scan(usize::MAX), 512);
        assert_eq!(released.lock().unwrap().as_slice(), [run(0, 8, 2)]);
        assert_eq!(l.pages(), 0);
        assert_eq!(l.pending_pages(), 256, "the claim is still in flight");
        l.landed(&claimed);
        assert_eq!(l.pending_pages(), 0);
    }

    /// A whole item for the generic helper's tests: an id and its pages.
    struct Thing(u32, usize);

    impl Item for Thing {
        fn pages(&self) -> usize {
            self.1
        }
    }

    #[test]
    fn the_helper_serves_whole_items_normally_and_frees_them_under_pressure() {
        type Log = Arc<std::sync::Mutex<Vec<(u32, Reason)>>>;
        let log: Log = Arc::default();
        let l2 = log.clone();
        let mut q = Arc::new(ReleaseQueue::<Thing>::new(
            4096,
            10,
            Box::new(move |t: Thing, why| {
                // The worker's share of the work takes a while: a flush waits for it.
                if why == Reason::Normal {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                l2.lock().unwrap().push((t.0, why));
            }),
        ));
        q.set_wake_pages(1);
        // The machine's load is not this test's subject.
        Arc::get_mut(&mut q).unwrap().set_load_check(None);
        // Bounded: 10 pages in all.
        q.queue(Thing(1, 4)).map_err(|_| ()).unwrap();
        q.queue(Thing(2, 4)).map_err(|_| ()).unwrap();
        let refused = q.queue(Thing(3, 4)).err().map(|t| t.0);
        assert_eq!(refused, Some(3), "past the bound: refused, handed back");
        assert_eq!(q.refused(), 1);
        // Under pressure, the oldest queued item is freed unzeroed, through the callback.
        assert_eq!(q.scan(1), 4);
        assert_eq!(log.lock().unwrap().as_slice(), [(1, Reason::UnderPressure)]);
        // The worker: a tick after each item and on each poll timeout.
        let ticks = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (q, ticks) = (q.clone(), ticks.clone());
            spawn_worker("test-helper", move || {
                q.serve(|| {
                    ticks.fetch_add(1, Ordering::Relaxed);
                    Some(std::time::Duration::from_millis(1))
                })
            })
            .unwrap()
        };
        q.flush();
        assert_eq!(
            q.pending_pages(),
            0,
            "flush waits for the item in the worker's hands"
        );
        assert_eq!(
            log.lock().unwrap().as_slice(),
            [(1, Reason::UnderPressure), (2, Reason::Normal)]
        );
        // On a loaded machine the nice-19 worker may be found late, and releases refused for
        // a while (a hold): retry for up to 5 s.
        let t = std::time::Instant::now();
        while q.queue(Thing(4, 1)).is_err() {
            assert!(t.elapsed().as_secs() < 5, "never queued again");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        q.flush();
        assert_eq!(log.lock().unwrap().last(), Some(&(4, Reason::Normal)));
        // Polls come with nothing queued.
        // (A nice-19 worker on a loaded or instrumented machine may wait a while for its
        // core: up to 5 s.)
        let before = ticks.load(Ordering::Relaxed);
        let t = std::time::Instant::now();
        while ticks.load(Ordering::Relaxed) == before {
            assert!(t.elapsed().as_secs() < 5, "idle polls tick");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Stopped: the worker ends, later items are refused, queued ones handed back.
        assert!(q.stop().is_empty());
        worker.join().unwrap();
        assert!(q.queue(Thing(5, 1)).is_err());
    }

    #[test]
    fn a_hold_lasts_as_long_as_the_worker_was_late_and_grows_on_repeats() {
        let (l, _) = list(10_000);
        let ms = |n: u64| n * 1_000_000;
        let now = l.punctuality.now_ns() + ms(1000);
        // A short hiccup: the shortest hold.
        l.punctuality.hold(now, ms(1));
        assert_eq!(
            l.punctuality.hold_ns.load(Ordering::Relaxed),
            LATE_HOLD.as_nanos() as u64
        );
        assert_eq!(
            l.punctuality.late_until_ns.load(Ordering::Relaxed),
            now + ms(3)
        );
        // The worker comes back within the hold and saw itself away for 20 ms: the hold runs
        // 20 ms from then.
        l.punctuality.hold(now + ms(2), ms(20));
        assert_eq!(
            l.punctuality.late_until_ns.load(Ordering::Relaxed),
            now + ms(22)
        );
        // Late again soon after the hold ended: four times the last hold.
        let again = now + ms(23);
        l.punctuality.hold(again, ms(1));
        assert_eq!(l.punctuality.hold_ns.load(Ordering::Relaxed), ms(12));
        assert_eq!(
            l.punctuality.late_until_ns.load(Ordering::Relaxed),
            again + ms(12)
        );
        // Before the worker showed it runs again (probation): four times again.
        let probing = again + ms(100);
        l.punctuality.hold(probing, ms(1));
        assert_eq!(l.punctuality.hold_ns.load(Ordering::Relaxed), ms(48));
        // Long after, the worker having answered on time: a first hold again, as long as the
        // lateness (at most LATE_HOLD_MAX).
        l.punctuality.probation.store(false, Ordering::Relaxed);
        let later = probing + ms(5000);
        l.punctuality.hold(later, ms(40));
        assert_eq!(l.punctuality.hold_ns.load(Ordering::Relaxed), ms(40));
        l.punctuality.probation.store(false, Ordering::Relaxed);
        l.punctuality.hold(later + ms(10_000), ms(50_000));
        assert_eq!(
            l.punctuality.hold_ns.load(Ordering::Relaxed),
            LATE_HOLD_MAX.as_nanos() as u64
        );
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

    /// Allocations zero a job that is a whole buffer from the front and the worker from the
    /// back, whichever asks first, so that a block that circulates is zeroed by the same core
    /// piece by piece; the two meet without a gap or an overlap, the last stripe short when the
    /// run is not a whole number of stripes. A chunk of a larger buffer: both from the front.
    #[test]
    fn a_job_is_zeroed_from_the_front_by_allocations_and_from_the_back_by_the_worker() {
        let page = 4096;
        // 20 stripes and a short one: 1.3 MiB.
        let pages = (20 * STRIPE_BYTES + 3 * page) / page;
        let job = Job::new(run(0, 0, pages), pages, page);
        let bytes = pages * page;
        let mut covered = vec![0u8; bytes / page];
        let (mut front, mut back) = (0, bytes);
        let mut turn = 0;
        loop {
            turn += 1;
            let worker = turn % 3 == 0; // the worker asks once for every two allocations
            let piece = if worker {
                job.next_worker_piece(page)
            } else {
                job.next_stripe(page)
            };
            let Some((off, len)) = piece else { break };
            if worker {
                assert_eq!(
                    off + len,
                    back,
                    "the worker's pieces end where its last began"
                );
                back = off;
            } else {
                assert_eq!(off, front, "an allocation's pieces follow its last");
                front = off + len;
            }
            for c in &mut covered[off / page..(off + len).div_ceil(page)] {
                *c += 1;
            }
            assert!(!job.finish(len));
        }
        assert_eq!(front, back, "the two ends meet");
        assert!(covered.iter().all(|&c| c == 1), "every page once");
        assert!(job.taken() && job.complete());
        assert!(job.next_stripe(page).is_none() && job.next_worker_piece(page).is_none());
        // A chunk of a larger buffer: both from the front.
        let chunk = Job::new(run(0, 0, pages), 4 * pages, page);
        assert_eq!(chunk.next_worker_piece(page), Some((0, 4 * STRIPE_BYTES)));
        assert_eq!(chunk.next_stripe(page).map(|p| p.0), Some(4 * STRIPE_BYTES));
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
            [(131072, 131072), (65536, 65536), (0, 65536)],
            "from the back, half of what is left per claim, whole stripes, at least one"
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
        let left: Vec<Run> = l.stop().into_iter().flatten().collect();
        assert_eq!(left, [run(1 << 20, 4, 2)]);
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
    #[allow(unused_imports)]
    use crate::config::*;
    #[allow(unused_imports)]
    use crate::shrinker::Shrinker;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::thread;
    use std::sync::Arc;

    #[test]
    fn freelist_queue_races_worker_and_pressure_scan() {
        loom::model(|| {
            let released = Arc::new(AtomicUsize::new(0));
            let r = released.clone();
            let list = Arc::new(ReleaseQueue::new(
                4096,
                1 << 20,
                Box::new(move |runs: Runs, _| {
                    r.fetch_add(Item::pages(&runs), Ordering::SeqCst);
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
            let leftover: usize = list.stop().iter().map(Item::pages).sum();
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
            let list = Arc::new(ReleaseQueue::<Runs>::new(
                4096,
                1 << 20,
                Box::new(|_, _| {}),
            ));
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
            let list = Arc::new(ReleaseQueue::<Runs>::new(
                4096,
                1 << 20,
                Box::new(|_, _| {}),
            ));
            let block_pages = 1 << 6;
            list.queue(
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
                let (list, landed, zero) = (list.clone(), landed.clone(), zero.clone());
                thread::spawn(move || {
                    while let Some(work) = list.next_work() {
                        let Work::Claim(job) = work else { continue };
                        while let Some((off, len)) = job.next_worker_piece(4096) {
                            zero(job.run(), off, len);
                            assert!(!job.finish(len), "nobody abandons the worker's claim");
                        }
                        while !job.complete() {
                            thread::yield_now();
                        }
                        landed.fetch_add(job.run().pages(), Ordering::SeqCst);
                        list.landed(&job.run());
                    }
                })
            };
            // The allocation: one block stolen (zeroed whole by itself), then help with
            // whatever the worker holds, then a bounded wait for it to land.
            let stolen: Vec<Run> = list.steal(6, 1, 2).into_iter().collect();
            for r in &stolen {
                zero(*r, 0, r.pages() * 4096);
            }
            let z = zero.clone();
            list.help(6, |job, off, len| z(job.run(), off, len));
            list.wait_landed();
            list.flush();
            let leftover: usize = list.stop().iter().map(Item::pages).sum();
            worker.join().unwrap();
            let stolen_pages: usize = stolen.iter().map(Run::pages).sum();
            assert_eq!(leftover, 0, "flush drained the queue");
            assert_eq!(
                stolen_pages + landed.load(Ordering::SeqCst),
                2 * block_pages,
                "each block stolen or landed, once"
            );
            assert_eq!(zeroed.load(Ordering::SeqCst), 0xff, "every stripe zeroed");
            assert_eq!(list.pending_pages(), 0);
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
}
