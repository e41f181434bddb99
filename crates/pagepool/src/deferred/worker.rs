//! The worker's side of the queue: how it waits for work (spin, naps, sleep: when, its
//! [`Punctuality`] says), the loop step that takes work, and the serve loop for whole items.

use crate::sync::{MutexGuard, Ordering, lock, wait, wait_timeout};

use super::punctual::nap_length;
use super::{Item, Locking, Queue, Reason, ReleaseQueue, Tally, Work};

impl<I: Item, T: Tally<I>> ReleaseQueue<I, T> {
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

    /// Polls for queued work (the pages that would wake a sleeping worker, a chunk's worth by
    /// default: smaller releases are left to the allocations that will want them, as they do
    /// not wake a sleeping worker either; see `set_wake_pages`) or other work (see
    /// [`next_with`](Self::next_with)), for up to the worker spin time; true if some arrived.
    pub(super) fn spin_for_work(&self, other: &impl Fn(Ordering) -> bool) -> bool {
        let ns = self.punctuality.spin();
        if ns == 0 {
            return false;
        }
        let end = crate::sync::Instant::now() + std::time::Duration::from_nanos(ns);
        // When queued work was first seen: it is claimed once it has waited the claim delay.
        let mut seen: Option<crate::sync::Instant> = None;
        loop {
            for _ in 0..64 {
                if other(Ordering::Relaxed) {
                    return true;
                }
                // A flush wants even a small queue zeroed now; a stop ends the spin at once.
                if self.stopped_hint.load(Ordering::Relaxed)
                    || (self.flushing_hint.load(Ordering::Relaxed) > 0
                        && self.queued_hint.load(Ordering::Relaxed) > 0)
                {
                    return true;
                }
                if self.queued_hint.load(Ordering::Relaxed)
                    >= self.wake_pages.load(Ordering::Relaxed)
                {
                    match seen {
                        Some(t)
                            if t.elapsed() >= self.punctuality.tempo().claim_delay()
                                && !self.punctuality.holding() =>
                        {
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
                return false; // queued work is the allocations' for now (see `next_with`)
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
        mut q: MutexGuard<'a, Queue<I, T>>,
        locking: &mut Option<Locking<'a>>,
        nap: std::time::Duration,
    ) -> MutexGuard<'a, Queue<I, T>> {
        q.napping += 1;
        self.punctuality.promise(nap);
        drop(locking.take());
        q = wait_timeout(&self.work, q, nap);
        *locking = Some(self.locking());
        q.napping -= 1;
        q
    }

    /// The worker's loop step: waits for queued work (spinning, napping or sleeping, as its
    /// [`Punctuality`](super::Punctuality) says) and takes some with `take`, which is given the
    /// queue, locked, whenever it holds items the worker may take (not while releases free
    /// their own, see `Punctuality::hold`, unless a flush waits). Also returns [`Work::Other`]
    /// when the queue is empty and `other(ordering)`, a flag the queue's owner raises for work
    /// of its own, is set (read with that ordering), and [`Work::Idle`] when `poll` is given and
    /// passes without work. Returns `None` once the queue is stopped.
    pub(crate) fn next_with<W>(
        &self,
        poll: Option<std::time::Duration>,
        mut take: impl FnMut(&Self, &mut Queue<I, T>) -> Option<W>,
        other: impl Fn(Ordering) -> bool,
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
            if q.items.is_empty() && other(Ordering::Acquire) {
                self.punctuality.promise(std::time::Duration::ZERO);
                return Some(Work::Other);
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
                            || other(Ordering::Acquire)
                        {
                            continue;
                        }
                    }
                    drop(q);
                    drop(locking.take());
                    let found = self.spin_for_work(&other);
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
                || other(Ordering::Acquire)
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
            match nap_length(self.punctuality.tempo(), idle, naps) {
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

impl<I: Item, T: Tally<I>> ReleaseQueue<I, T> {
    /// The worker's loop step for whole items (see [`next_with`](Self::next_with)): takes the
    /// oldest queued item, which is *in flight* until [`land_item`](Self::land_item) is called
    /// with its pages. With `poll`, returns [`Work::Idle`] when nothing came for that long.
    pub(crate) fn next_item(&self, poll: Option<std::time::Duration>) -> Option<Work<(I, usize)>> {
        self.next_with(
            poll,
            |l, q| {
                let (item, _) = q.items.pop_front()?;
                let pages = l.take_item(q, &item);
                q.in_flight += pages;
                Some((item, pages))
            },
            |_| false,
        )
    }

    /// The worker loop for whole items, until the queue stops: takes each queued item
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
