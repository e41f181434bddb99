//! The bounded queue of released items: queueing (or refusing past the bound), the
//! allocation's steals, landing the worker's claims and items, flush and stop, and the queue
//! as a shrinker (under pressure, queued items go straight back to the system).

use crate::config::{FIT_SCAN, HANDOFF_WAIT};
use crate::pool::MAX_ORDER;
use crate::shrinker::Shrinker;
use crate::sync::{Ordering, lock, lock_within, wait_timeout};

use super::{Item, Reason, ReleaseQueue, Run, Runs};

impl<I: Item> ReleaseQueue<I> {
    /// Queues a released item in O(1). Refuses (returning it) when the bound would be passed,
    /// the list has stopped or the worker is late (see `worker_late`): the caller then frees
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
            let Some(mut q) = lock_within(&self.queue, HANDOFF_WAIT, &self.worker_locking) else {
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
            for (order, count) in item.blocks() {
                q.blocks[order as usize] += count;
            }
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
        self.land_pages(0, pages);
    }

    /// `pages` of `order` in flight have landed.
    pub(super) fn land_pages(&self, order: u8, pages: usize) {
        let mut q = lock(&self.queue);
        q.in_flight[order as usize] -= pages;
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
            // With a timeout: adopted runs land without the queue's lock held throughout.
            q = wait_timeout(&self.landed, q, std::time::Duration::from_millis(1));
        }
        q.flushing -= 1;
        drop(q);
        self.flushing_hint.fetch_sub(1, Ordering::Relaxed);
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// Stops the list: the worker's next look at the queue returns `None`, further items are
    /// refused. Returns every queued item, for the caller to release.
    pub(crate) fn stop(&self) -> Vec<I> {
        self.stopped_hint.store(true, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        q.stopped = true;
        let runs: Vec<I> = q.items.drain(..).map(|(item, _)| item).collect();
        q.pages = 0;
        q.blocks = [0; MAX_ORDER as usize + 1];
        self.queued_hint.store(0, Ordering::Relaxed);
        drop(q);
        self.work.notify_all();
        self.landed.notify_all();
        runs
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
        if q.pages == 0 && q.in_flight_pages() == 0 {
            self.landed.notify_all();
        }
        out
    }
}

impl ReleaseQueue<Runs> {
    /// The worker's side: a claimed run has been zeroed and given to the pools.
    pub(crate) fn landed(&self, run: &Run) {
        {
            let mut job = lock(&self.job);
            if job.as_ref().is_some_and(|j| j.run() == *run) {
                *job = None;
            }
        }
        self.land_pages(run.order, run.pages());
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
}

impl<I: Item> Shrinker for ReleaseQueue<I> {
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
