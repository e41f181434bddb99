//! Deferred freeing: release queues a buffer; a low-priority worker zeroes it later.
//!
//! This is the kernel series' deferred-free helper, generic as it is there (its
//! `deferred_free(item, free_cb, nr_pages)`): a released [`Item`] and the pages it holds go on
//! a bounded [`ReleaseQueue`] in O(1); a worker at nice 19 ([`spawn_worker`]) takes queued work
//! and makes the memory reusable (the kernel's `DF_NORMAL`); under memory pressure the queue, a
//! [`Shrinker`](crate::registry::Shrinker), hands queued items straight to the release callback with
//! [`Reason::UnderPressure`], unzeroed. Both pool users run on it: [`crate::dmapool::DmaBufPool`]
//! (items are whole dma-bufs, which its worker takes one at a time with
//! [`serve`](ReleaseQueue::serve)) and [`crate::SystemHeap`], whose hand-off between
//! allocations and its worker (`heap/handoff.rs`) owns a queue of buffers' runs of blocks and
//! drives it through the hooks below: a [`Tally`] the queue keeps under its lock, the locked
//! queue itself ([`ReleaseQueue::lock_bounded`]), and the worker's own loop step
//! ([`ReleaseQueue::next_with`]).
//!
//! Beyond the kernel helper:
//! - **backpressure**: queued and in-flight pages never exceed the release queue's bound;
//!   [`ReleaseQueue::queue`] refuses an item that would pass it, and the releasing thread then
//!   frees it itself (so memory stays bounded and nothing is dropped on the floor);
//! - **a worker that is not scheduled is not waited for**: the worker promises when it looks
//!   at the queue next; while it is late (a busy machine), releases free their own items (its
//!   [`Punctuality`], `punctual.rs`).
//!
//! The release queue deals in items and numbers; it never touches memory itself, which is what
//! lets the loom models run it with plain numbers. It knows nothing of blocks, orders or heaps.

mod punctual;
mod queue;
#[cfg(all(test, not(loom)))]
mod tests;
mod worker;

use std::collections::VecDeque;

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering, lock};

pub(crate) use self::punctual::Punctuality;

/// What a [`ReleaseQueue`] holds: a released thing and the pages it holds.
pub(crate) trait Item: Send + 'static {
    /// The pages it holds (what counts against the queue's bound).
    fn pages(&self) -> usize;
}

/// Bookkeeping of a kind of [`Item`], kept by the queue under its lock beside its own counts
/// (the heap's: queued and in-flight blocks per order). The queue tells it what it does with
/// items; whoever takes part of an item or claims one through [`ReleaseQueue::lock_bounded`]
/// or [`ReleaseQueue::next_with`] updates it there. `()` keeps nothing.
pub(crate) trait Tally<I>: Default + Send + 'static {
    /// `item` was queued.
    fn queued(&mut self, item: &I);
    /// `item` (what is left of it) left the queue whole, for a pressure scan.
    fn taken(&mut self, item: &I);
    /// Every queued item left the queue (it stopped).
    fn cleared(&mut self);
}

impl<I> Tally<I> for () {
    fn queued(&mut self, _: &I) {}
    fn taken(&mut self, _: &I) {}
    fn cleared(&mut self) {}
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
/// only uses cores nothing else wants, and with a small timer slack ([`WORKER_TIMER_SLACK_NS`](crate::config::WORKER_TIMER_SLACK_NS)),
/// so that its naps end on time (the default slack is 50 us).
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
            crate::os::set_timer_slack(crate::config::WORKER_TIMER_SLACK_NS);
            body()
        })
}

/// The queue's state under its lock.
pub(crate) struct Queue<I, T> {
    /// Released items, oldest first, with the pages they were queued with (a buffer's size:
    /// what is left of it may be less).
    pub(super) items: VecDeque<(I, usize)>,
    /// Pages queued (not counting in-flight claims).
    pub(super) pages: usize,
    /// Pages claimed by the worker and not yet landed.
    pub(super) in_flight: usize,
    pub(super) peak: usize,
    /// Claims landed so far (what `landings` watches).
    pub(super) landings: u64,
    /// Workers asleep in `next_with` until woken (a wake-up costs a system call: only made
    /// when needed).
    pub(super) sleeping: usize,
    /// Workers napping: asleep for a short time, they look for work by themselves when they
    /// wake, so a release does not wake them.
    pub(super) napping: usize,
    /// Threads in `flush` (the worker must run even for a small queue).
    pub(super) flushing: usize,
    pub(super) stopped: bool,
    /// The item kind's bookkeeping.
    pub(super) tally: T,
}

impl<I, T> Queue<I, T> {
    /// The queued items, oldest first, with the pages each was queued with: what is taken out
    /// of them (in part or whole) the caller accounts for with [`ReleaseQueue::took`] and in
    /// the tally.
    pub(crate) fn items(&mut self) -> &mut VecDeque<(I, usize)> {
        &mut self.items
    }

    /// The item kind's bookkeeping.
    pub(crate) fn tally(&mut self) -> &mut T {
        &mut self.tally
    }

    /// Pages claimed and not yet landed.
    pub(crate) fn in_flight_pages(&self) -> usize {
        self.in_flight
    }

    /// The worker claims `pages` it took out of the queue: they are in flight until landed
    /// (see [`ReleaseQueue::land`]).
    pub(crate) fn claimed(&mut self, pages: usize) {
        self.in_flight += pages;
    }

    /// Nothing queued, nothing in flight.
    pub(crate) fn drained(&self) -> bool {
        self.pages == 0 && self.in_flight == 0
    }
}

/// A bounded queue of released items waiting for the worker, with the item kind's
/// bookkeeping `T` (see [`Tally`]).
pub(crate) struct ReleaseQueue<I: Item, T: Tally<I> = ()> {
    pub(super) page: usize,
    pub(super) max_pages: usize,
    pub(super) queue: Mutex<Queue<I, T>>,
    /// Signalled when work is queued or the queue stops.
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
    /// Threads in `flush`, and whether the queue stopped: a spinning worker stops spinning at
    /// once for either.
    pub(super) flushing_hint: AtomicUsize,
    pub(super) stopped_hint: AtomicBool,
    /// Pages of items their takers gave up on, left to the worker to land without the
    /// queue's lock (see `adopt`): in flight, as far as `flush` is concerned.
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

/// What the worker should do next (see [`ReleaseQueue::next_with`] and
/// [`ReleaseQueue::next_item`]).
#[derive(Debug)]
pub(crate) enum Work<W> {
    /// Work taken from the queue: what `next_with`'s `take` made of it, or a whole item (pass
    /// it to the release callback's owner and [`land_item`](ReleaseQueue::land_item) it).
    Claim(W),
    /// The queue's owner has other work for the worker (`next_with`'s `other` said so).
    Other,
    /// Nothing came within the poll time the worker asked for.
    Idle,
}

impl<I: Item, T: Tally<I>> ReleaseQueue<I, T> {
    /// Removes a whole item's pages from the queue's counts and the tally (the caller has
    /// taken it out). Counted from what is left of the item (the worker and allocations may
    /// have taken part of a buffer's runs), not from the pages it was queued with. Returns
    /// them.
    pub(super) fn take_item(&self, q: &mut Queue<I, T>, item: &I) -> usize {
        let pages = item.pages();
        q.pages -= pages;
        q.tally.taken(item);
        self.queued_hint.store(q.pages, Ordering::Relaxed);
        pages
    }

    /// Removes `pages` taken out of the queued items (part of an item, or a whole one, by the
    /// caller under the queue's lock) from the queue's count; the caller updates the tally.
    pub(crate) fn took(&self, q: &mut Queue<I, T>, pages: usize) {
        q.pages -= pages;
        self.queued_hint.store(q.pages, Ordering::Relaxed);
    }

    /// A release queue for items of `page`-byte pages, holding at most `max_pages` queued and
    /// in-flight pages. `release` frees an item: with [`Reason::UnderPressure`] when a pressure
    /// scan takes it (give it back to the system, unzeroed).
    pub(crate) fn new(
        page: usize,
        max_pages: usize,
        release: Box<dyn Fn(I, Reason) + Send + Sync>,
    ) -> ReleaseQueue<I, T> {
        ReleaseQueue {
            page,
            max_pages,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                pages: 0,
                in_flight: 0,
                peak: 0,
                landings: 0,
                sleeping: 0,
                napping: 0,
                flushing: 0,
                stopped: false,
                tally: T::default(),
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

    /// The worker's punctuality.
    #[cfg_attr(loom, allow(dead_code))] // the waits it serves do not wait under loom
    pub(crate) fn punctuality(&self) -> &Punctuality {
        &self.punctuality
    }

    /// The size of the queue's pages in bytes.
    pub(crate) fn page(&self) -> usize {
        self.page
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

    /// Pages queued now (not counting what the worker has in hand).
    pub(crate) fn pages(&self) -> usize {
        lock(&self.queue).pages
    }

    /// Pages queued or in the worker's hands now.
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

    /// Buffers refused by [`queue`](Self::queue) because of the bound, a stopped queue or a late worker.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl<I: Item, T: Tally<I>> std::fmt::Debug for ReleaseQueue<I, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseQueue")
            .field("max_pages", &self.max_pages)
            .field("pending_pages", &self.pending_pages())
            .finish_non_exhaustive()
    }
}
