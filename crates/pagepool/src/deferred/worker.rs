//! The worker's side of the queue: how it waits for work (spin, naps, sleep: when, its
//! [`Punctuality`] says), the loop step that takes work, and the serve loop for whole items.

use crate::config::{CHUNK_PAGES, CLAIM_DELAY};
use crate::sync::{MutexGuard, Ordering, lock, wait, wait_timeout};

use super::punctual::nap_length;
use super::{Item, Job, Locking, Queue, Reason, ReleaseQueue, Run, Runs, Work};

impl<I: Item> ReleaseQueue<I> {
    /// How long an idle worker keeps polling for work before it sleeps (default 0). Waking a
    /// sleeping thread costs the releasing thread a system call and the worker a scheduling
    /// delay (tens of microseconds in a VM); a short poll keeps a busy heap's worker awake
    /// between releases. The poll runs at the worker's low priority.
    pub(crate) fn set_worker_spin(&self, d: std::time::Duration) {
        self.punctuality.set_spin(d);
    }

    /// How long an idle worker keeps napping, after its spin, before it sleeps until woken
    /// (default 0: it sleeps at once; see [`Punctuality::set_naps`](super::punctual::Punctuality::set_naps)).
    pub(crate) fn set_worker_naps(&self, d: std::time::Duration) {
        self.punctuality.set_naps(d);
    }

    /// Polls for queued work (a chunk's worth: smaller releases are left to the allocations
    /// that will want them, as they do not wake a sleeping worker either) or a shared run, for
    /// up to the worker spin time; true if some arrived.
    pub(super) fn spin_for_work(&self) -> bool {
        let ns = self.punctuality.spin();
        if ns == 0 {
            return false;
        }
        let end = crate::sync::Instant::now() + std::time::Duration::from_nanos(ns);
        // When queued work was first seen: it is claimed once it has waited CLAIM_DELAY.
        let mut seen: Option<crate::sync::Instant> = None;
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
                        Some(t) if t.elapsed() >= CLAIM_DELAY && !self.punctuality.holding() => {
                            return true;
                        }
                        Some(_) => {}
                        None => seen = Some(crate::sync::Instant::now()),
                    }
                } else {
                    seen = None; // an allocation took it
                }
                crate::sync::spin_loop();
            }
            self.punctuality.promise(std::time::Duration::ZERO);
            if self.punctuality.holding() && self.flushing_hint.load(Ordering::Relaxed) == 0 {
                return false; // queued work is the allocations' for now (see `next_work`)
            }
            if seen.is_none() && crate::sync::Instant::now() >= end {
                return false;
            }
        }
    }

    /// The worker naps for `nap`, having promised to look at the queue when it wakes; the
    /// queue's lock and the worker-locking flag are let go meanwhile.
    fn nap<'a>(
        &'a self,
        mut q: MutexGuard<'a, Queue<I>>,
        locking: &mut Option<Locking<'a>>,
        nap: std::time::Duration,
    ) -> MutexGuard<'a, Queue<I>> {
        q.napping += 1;
        self.punctuality.promise(nap);
        drop(locking.take());
        q = wait_timeout(&self.work, q, nap);
        *locking = Some(self.locking());
        q.napping -= 1;
        q
    }

    /// The worker's loop step: waits for queued work (spinning, napping or sleeping, see the
    /// module's documentation) and takes some with `take`, which is given the queue, locked,
    /// whenever it holds items the worker may take (not while releases free their own, see
    /// `hold`, unless a flush waits). Also returns [`Work::Assist`] when an allocation shared a
    /// run while the worker was idle, and [`Work::Idle`] when `poll` is given and passes
    /// without work. Returns `None` once the list is stopped.
    pub(crate) fn next_with<W>(
        &self,
        poll: Option<std::time::Duration>,
        mut take: impl FnMut(&Self, &mut Queue<I>) -> Option<W>,
    ) -> Option<Work<W>> {
        // Declared before the guard, so dropped after it: the flag stays set while the queue's
        // lock is held (see `sync::lock_within`).
        let mut locking = Some(self.locking());
        let mut q = lock(&self.queue);
        // When this worker went idle (for its naps).
        let mut idle_since: Option<crate::sync::Instant> = None;
        loop {
            if q.stopped {
                return None;
            }
            self.punctuality.answer_probe();
            if q.items.is_empty() && self.shared_hint.load(Ordering::Acquire) {
                self.punctuality.promise(std::time::Duration::ZERO);
                return Some(Work::Assist);
            }
            // While releases free their own items (the machine is busy, see `hold`), the
            // worker leaves queued work to allocations unless a flush waits for it: a nice-19
            // thread that may lose its core at any moment must not hold the pools' locks then.
            let claim = q.flushing > 0 || !self.punctuality.holding();
            if claim
                && !q.items.is_empty()
                && let Some(w) = take(self, &mut q)
            {
                // The work takes tens of microseconds (a chunk of blocks) or the worker renews
                // its promise as it goes (see `promise`).
                self.punctuality.promise(std::time::Duration::ZERO);
                return Some(Work::Claim(w));
            }
            let found = match idle_since {
                // Just out of work: spin first; but when releases come in a steady rhythm, nap
                // until shortly before the next one is due, and spin only then (spinning all
                // along would double the process's CPU time for a program that works between
                // its allocations).
                None => {
                    idle_since = Some(crate::sync::Instant::now());
                    if let Some(nap) = self.punctuality.until_next_release()
                        && q.flushing == 0
                    {
                        q = self.nap(q, &mut locking, nap);
                        if (!q.items.is_empty() && !self.punctuality.holding())
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
            if (!q.items.is_empty() && (q.flushing > 0 || !self.punctuality.holding()))
                || q.stopped
                || self.shared_hint.load(Ordering::Acquire)
            {
                continue;
            }
            let idle = idle_since.map_or(std::time::Duration::ZERO, |t| t.elapsed());
            // While releases zero their own buffers (the machine is busy), the worker sleeps
            // until the first release after the hold asks it to show that it runs (see
            // `queue`): a nap's timer would wake it, at its low priority, on a machine whose
            // cores other threads want, for nothing.
            let naps = if self.punctuality.holding() {
                0
            } else {
                self.punctuality.naps()
            };
            match nap_length(idle, naps) {
                Some(nap) => q = self.nap(q, &mut locking, nap),
                None => {
                    q.sleeping += 1;
                    self.punctuality.asleep();
                    drop(locking.take());
                    q = match poll {
                        Some(p) => wait_timeout(&self.work, q, p),
                        None => wait(&self.work, q),
                    };
                    locking = Some(self.locking());
                    q.sleeping -= 1;
                    idle_since = None;
                    if poll.is_some()
                        && !q.stopped
                        && (q.items.is_empty() || (q.flushing == 0 && self.punctuality.holding()))
                    {
                        return Some(Work::Idle);
                    }
                }
            }
        }
    }
}

impl ReleaseQueue<Runs> {
    /// The heap worker's loop step (see [`next_with`](Self::next_with)): claims up to
    /// [`CHUNK_PAGES`] pages from the end of the oldest buffer's last run, as a [`Job`] open to
    /// helpers, with the size in pages of the buffer it came from (the worker zeroes runs of
    /// large buffers with streaming stores). The claim is *in flight* until
    /// [`landed`](Self::landed) is called with it.
    pub(crate) fn next_work(&self) -> Option<Work<std::sync::Arc<Job>>> {
        self.next_with(None, |l, q| {
            let (item, buffer_pages) = q.items.front_mut()?;
            let buffer_pages = *buffer_pages;
            let last = item.last_mut().expect("queued items are never empty");
            let k = last.count.min((CHUNK_PAGES >> last.order).max(1));
            last.count -= k;
            let run = Run {
                start: last.start + last.count * (l.page << last.order),
                order: last.order,
                count: k,
            };
            if last.count == 0 {
                item.pop();
                if item.is_empty() {
                    q.items.pop_front();
                }
            }
            l.take(q, &run);
            q.in_flight[run.order as usize] += run.pages();
            // Open to helpers before the queue's lock is released: whoever sees the claim in
            // flight finds its job (see `current_job`).
            let job = std::sync::Arc::new(Job::new(run, buffer_pages, l.page));
            *lock(&l.job) = Some(job.clone());
            Some(job)
        })
    }

    /// [`next_work`](Self::next_work) for the tests and models: the claimed run, or `None`
    /// once the list is stopped.
    #[cfg(test)]
    pub(crate) fn claim(&self) -> Option<Run> {
        loop {
            match self.next_work()? {
                Work::Claim(job) => return Some(job.run()),
                Work::Assist | Work::Idle => continue,
            }
        }
    }
}

impl<I: Item> ReleaseQueue<I> {
    /// The worker's loop step for whole items (see [`next_with`](Self::next_with)): takes the
    /// oldest queued item, which is *in flight* until [`land_item`](Self::land_item) is called
    /// with its pages. With `poll`, returns [`Work::Idle`] when nothing came for that long.
    pub(crate) fn next_item(&self, poll: Option<std::time::Duration>) -> Option<Work<(I, usize)>> {
        self.next_with(poll, |l, q| {
            let (item, _) = q.items.pop_front()?;
            let pages = l.take_item(q, &item);
            q.in_flight[0] += pages;
            Some((item, pages))
        })
    }

    /// The seed's worker loop for whole items, until the list stops: takes each queued item
    /// and hands it to the release callback with [`Reason::Normal`], then lands it. After
    /// each item, and whenever the poll time passes without one, calls `tick`, which returns
    /// the next poll time (`None`: sleep until a release wakes the worker).
    pub(crate) fn serve(&self, mut tick: impl FnMut() -> Option<std::time::Duration>) {
        let mut poll = tick();
        while let Some(work) = self.next_item(poll) {
            if let Work::Claim((item, pages)) = work {
                (self.release)(item, Reason::Normal);
                self.land_item(pages);
            }
            poll = tick();
        }
    }
}
