//! The bounded queue of released items: queueing (or refusing past the bound), landing the
//! worker's claims and items, items given up on (adopted), flush and stop, the locked queue
//! for its owner, and the queue as a shrinker (under pressure, queued items go straight back
//! to the system).

use crate::shrinker::Shrinker;
use crate::sync::{MutexGuard, Ordering, lock, lock_within, wait_timeout};

use super::{Item, Queue, Reason, ReleaseQueue, Tally};

impl<I: Item, T: Tally<I>> ReleaseQueue<I, T> {
    /// Queues a released item in O(1). Refuses (returning it) when the bound would be passed,
    /// the queue has stopped or the worker is late (see `worker_late`): the caller then frees
    /// the item itself.
    ///
    /// A sleeping worker is woken only once [`CHUNK_PAGES`] pages are queued (by default, see
    /// [`set_wake_pages`](Self::set_wake_pages)): waking it costs a system call, more than
    /// zeroing a few small blocks. Smaller releases wait for the next wake-up, an allocation
    /// that takes them, or [`flush`](Self::flush).
    pub(crate) fn queue(&self, item: I) -> Result<(), I> {
        let now = self.punctuality.now_ns();
        self.punctuality.note_release(now);
        let pages = item.pages();
        let wake = {
            let Some(mut q) = lock_within(
                &self.queue,
                crate::tempo::tempo().handoff_wait(),
                &self.worker_locking,
            ) else {
                // The worker holds the lock and is not running: the caller frees the item.
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(item);
            };
            let pending = q.pages + q.in_flight_pages();
            if q.stopped || pending + pages > self.max_pages || self.punctuality.worker_late(now) {
                drop(q);
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(item);
            }
            // After a hold, releases go on freeing their own items until the worker shows it
            // runs again: the first one asks it to (the probe), and it answers when the
            // scheduler runs it (see `answer_probe`). Queuing meanwhile would pile work up
            // for a worker that may still get no core, for allocations to zero.
            if self.punctuality.on_probation() {
                let ask = self.punctuality.ask_probe();
                let sleeping = q.sleeping > 0;
                drop(q);
                if ask && sleeping {
                    // A napping or spinning worker answers by its own promise.
                    self.punctuality.expect_worker();
                    self.work.notify_one();
                }
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(item);
            }
            q.tally.queued(&item);
            q.pages += pages;
            q.peak = q.peak.max(pending + pages);
            q.items.push_back((item, pages));
            self.queued_hint.store(q.pages, Ordering::Relaxed);
            q.sleeping > 0 && (q.pages >= self.wake_pages.load(Ordering::Relaxed) || q.flushing > 0)
        };
        if wake {
            self.punctuality.expect_worker();
            self.work.notify_one();
        }
        Ok(())
    }

    /// Pages queued from which a release wakes a sleeping worker (default [`CHUNK_PAGES`](crate::config::CHUNK_PAGES)).
    /// A pool whose items nothing else takes (no allocation steals them) sets 1.
    pub(crate) fn set_wake_pages(&self, pages: usize) {
        self.wake_pages.store(pages.max(1), Ordering::Relaxed);
    }

    /// The worker's side: an item of `pages` pages taken with
    /// [`next_item`](Self::next_item) has been dealt with.
    pub(crate) fn land_item(&self, pages: usize) {
        self.land(pages, |_| {});
    }

    /// `pages` in flight have landed; `tally` updates the item kind's bookkeeping with the
    /// queue's lock held.
    pub(crate) fn land(&self, pages: usize, tally: impl FnOnce(&mut T)) {
        let mut q = lock(&self.queue);
        q.in_flight -= pages;
        tally(&mut q.tally);
        q.landings += 1;
        self.landings_hint.store(q.landings, Ordering::Release);
        drop(q);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.landed.notify_all();
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
            // With a timeout: adopted items land without the queue's lock held throughout.
            q = wait_timeout(&self.landed, q, std::time::Duration::from_millis(1));
        }
        q.flushing -= 1;
        drop(q);
        self.flushing_hint.fetch_sub(1, Ordering::Relaxed);
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// Claims landed so far, read without the queue's lock (see [`land`](Self::land)).
    pub(crate) fn landings(&self) -> u64 {
        self.landings_hint.load(Ordering::Acquire)
    }

    /// The queue, locked, for its owner's bookkeeping (taking part of an item, reading the
    /// tally): if its lock is free within the hand-off wait (`Tempo::handoff_wait`), or taken by a thread other than
    /// the worker in a locking section (see `sync::lock_within`); `None` otherwise (the worker
    /// holds it and is not running: do without).
    pub(crate) fn lock_bounded(&self) -> Option<MutexGuard<'_, Queue<I, T>>> {
        lock_within(
            &self.queue,
            crate::tempo::tempo().handoff_wait(),
            &self.worker_locking,
        )
    }

    /// Wakes the threads waiting in `flush`, if any: the caller drained the queue (see
    /// [`Queue::drained`]) and let go of its lock.
    pub(crate) fn wake_waiters(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.landed.notify_all();
        }
    }

    /// The taker of `pages` gave up on them (they land through the worker, without the
    /// queue's lock): count them as in flight until then, so that `flush` waits for them.
    pub(crate) fn adopt(&self, pages: usize) {
        self.adopted.fetch_add(pages, Ordering::AcqRel);
    }

    /// Undoes [`adopt`](Self::adopt) when the taker kept them after all.
    pub(crate) fn disown(&self, pages: usize) {
        self.adopted.fetch_sub(pages, Ordering::AcqRel);
    }

    /// The worker's side: adopted pages (see [`adopt`](Self::adopt)) have landed.
    pub(crate) fn landed_adopted(&self, pages: usize) {
        self.adopted.fetch_sub(pages, Ordering::AcqRel);
        if self.waiting.load(Ordering::Relaxed) > 0 {
            let _q = lock(&self.queue);
            self.landed.notify_all();
        }
    }

    /// Stops the queue: the worker's next look at the queue returns `None`, further items are
    /// refused. Returns every queued item, for the caller to release.
    pub(crate) fn stop(&self) -> Vec<I> {
        self.stopped_hint.store(true, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        q.stopped = true;
        let items: Vec<I> = q.items.drain(..).map(|(item, _)| item).collect();
        q.pages = 0;
        q.tally.cleared();
        self.queued_hint.store(0, Ordering::Relaxed);
        drop(q);
        self.work.notify_all();
        self.landed.notify_all();
        items
    }

    /// Takes queued items, oldest first, until at least `nr_pages` pages are taken.
    pub(super) fn drain(&self, nr_pages: usize) -> Vec<(I, usize)> {
        let mut q = lock(&self.queue);
        let mut out = Vec::new();
        let mut taken = 0;
        while taken < nr_pages {
            let Some((item, _)) = q.items.pop_front() else {
                break;
            };
            let pages = self.take_item(&mut q, &item);
            taken += pages;
            out.push((item, pages));
        }
        if q.drained() {
            self.landed.notify_all();
        }
        out
    }
}

impl<I: Item, T: Tally<I>> Shrinker for ReleaseQueue<I, T> {
    fn name(&self) -> &str {
        "deferred release_queue"
    }

    fn count(&self) -> usize {
        self.pages()
    }

    /// Gives whole queued items, oldest first, straight back to the system, unzeroed.
    fn scan(&self, nr_pages: usize) -> usize {
        let items = self.drain(nr_pages);
        let freed: usize = items.iter().map(|(_, pages)| pages).sum();
        for (item, _) in items {
            (self.release)(item, Reason::UnderPressure);
        }
        self.pressure_pages
            .fetch_add(freed as u64, Ordering::Relaxed);
        freed
    }
}
