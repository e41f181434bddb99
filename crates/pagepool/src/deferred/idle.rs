//! The worker's idle policy: how it waits for work (spin, naps timed to the rhythm of
//! releases, sleep), the promise of when it looks at the queue next, and what releases do when
//! it breaks that promise (hold, probation).

use crate::config::{
    CHUNK_PAGES, CLAIM_DELAY, EARLY_BY, LATE_HOLD, LATE_HOLD_MAX, NAP_FIRST, NAP_LONGEST,
    NAP_STEADY_FOR, PREEMPTED, RHYTHM_MAX_NS, WAKE_GRACE, WORKER_GRACE,
};
use crate::sync::{MutexGuard, Ordering, lock, wait, wait_timeout};

use super::{Item, Job, Locking, Queue, Reason, ReleaseQueue, Run, Runs, Work};

/// The nap an idle worker takes after `idle` without work, or `None` once it has napped for
/// `naps_ns` and should sleep until woken.
pub(super) fn nap_length(idle: std::time::Duration, naps_ns: u64) -> Option<std::time::Duration> {
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

impl<I: Item> ReleaseQueue<I> {
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
    pub(super) fn spin_for_work(&self) -> bool {
        let ns = self.spin_ns.load(Ordering::Relaxed);
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
                        Some(t) if t.elapsed() >= CLAIM_DELAY && !self.holding() => return true,
                        Some(_) => {}
                        None => seen = Some(crate::sync::Instant::now()),
                    }
                } else {
                    seen = None; // an allocation took it
                }
                crate::sync::spin_loop();
            }
            self.promise(std::time::Duration::ZERO);
            if self.holding() && self.flushing_hint.load(Ordering::Relaxed) == 0 {
                return false; // queued work is the allocations' for now (see `next_work`)
            }
            if seen.is_none() && crate::sync::Instant::now() >= end {
                return false;
            }
        }
    }

    /// Records a release (queued or not) in the rhythm of releases: the time of the last one
    /// and a moving average of the gaps between them.
    pub(super) fn note_release(&self, now: u64) {
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
    pub(super) fn until_next_release(&self) -> Option<std::time::Duration> {
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
    pub(super) fn now_ns(&self) -> u64 {
        self.born.elapsed().as_nanos() as u64
    }

    /// The worker's promise: it looks at the queue again within `d` (see `due_ns`).
    ///
    /// Called by the worker only (and by a release that wakes it). A worker that renews its
    /// promise more than [`PREEMPTED`] after it fell due was kept off its core meanwhile: on a
    /// loaded machine (see [`loaded`](Self::loaded)), releases then zero their own buffers for
    /// at least the next [`LATE_HOLD`].
    pub(crate) fn promise(&self, d: std::time::Duration) {
        let now = self.now_ns();
        let prev = self
            .due_ns
            .swap(now.saturating_add(d.as_nanos() as u64), Ordering::Relaxed);
        if prev != u64::MAX
            && now > prev.saturating_add(PREEMPTED.as_nanos() as u64)
            && self.loaded(now)
        {
            self.hold(now, now - prev);
        }
    }

    /// Whether a worker found late `now` is held against (a hold starts): always without a
    /// load check; with one, only while more threads want the cores than the machine has. A
    /// worker late on a machine with idle cores was kept away by something passing (a virtual
    /// CPU the host did not run, a timer that fired late), not by other work that will keep it
    /// away: releases go on queueing for it, and the machine is not looked at again for
    /// [`LATE_HOLD`] (a late worker is noticed by every release until it comes back).
    pub(super) fn loaded(&self, now: u64) -> bool {
        let Some(check) = self.load_check else {
            return true;
        };
        if now < self.calm_until_ns.load(Ordering::Relaxed) {
            return false;
        }
        if check() {
            return true;
        }
        self.calm_until_ns
            .store(now + LATE_HOLD.as_nanos() as u64, Ordering::Relaxed);
        false
    }

    /// True when the worker is late by more than [`WORKER_GRACE`] on its promise on a loaded
    /// machine (see [`loaded`](Self::loaded)), or was so within the last [`LATE_HOLD`]: a
    /// machine busy enough to leave the worker without a core usually stays so, and a worker
    /// that runs for a moment meanwhile is likely to lose its core again before it is done.
    pub(super) fn worker_late(&self, now: u64) -> bool {
        if now < self.late_until_ns.load(Ordering::Relaxed) {
            return true;
        }
        match self.past_grace(now) {
            Some(late) if self.loaded(now) => {
                self.hold(now, late);
                true
            }
            _ => false,
        }
    }

    /// How late the worker is on its promise `now`, if by more than [`WORKER_GRACE`] (never
    /// while it sleeps until woken).
    fn past_grace(&self, now: u64) -> Option<u64> {
        let due = self.due_ns.load(Ordering::Relaxed);
        (due != u64::MAX && now > due.saturating_add(WORKER_GRACE.as_nanos() as u64))
            .then(|| now - due)
    }

    /// True while the machine looks busy: the worker was found late or kept off its core
    /// lately, and releases zero their own buffers (see [`hold`](Self::hold)).
    pub(crate) fn busy(&self) -> bool {
        self.holding()
    }

    /// True while releases zero their own buffers (see [`hold`](Self::hold)).
    pub(super) fn holding(&self) -> bool {
        self.now_ns() < self.late_until_ns.load(Ordering::Relaxed)
    }

    /// Releases zero their own buffers from `now` for a while, the worker having been found
    /// `late` past its promise: as long again as that (at least [`LATE_HOLD`]), as a thread
    /// kept off its core that long is likely to be kept off again as long; four times as long
    /// (up to [`LATE_HOLD_MAX`]) each time the worker is found late again soon after the last hold
    /// ended or before it showed that it runs again, so that a machine that stays busy queues almost nothing for a worker that gets
    /// no core, while a single hiccup (another thread taking the worker's core for a few
    /// milliseconds) costs one short hold. A worker found late while a hold runs (it comes
    /// back, and sees how long it was away) extends the hold to as long again from now.
    pub(super) fn hold(&self, now: u64, late: u64) {
        let until = self.late_until_ns.load(Ordering::Relaxed);
        let floor = LATE_HOLD.as_nanos() as u64;
        let late = late.clamp(floor, LATE_HOLD_MAX.as_nanos() as u64);
        if now < until {
            // One hiccup, seen twice (by a release and by the worker): one hold.
            if now + late > until {
                self.late_until_ns.store(now + late, Ordering::Relaxed);
            }
            return;
        }
        let last = self.hold_ns.load(Ordering::Relaxed).max(floor);
        // Again soon after the last hold, or before the worker showed it runs again since
        // (probation: see `answer_probe`).
        let again = now < until.saturating_add(last) || self.probation.load(Ordering::Relaxed);
        let hold = if until > 0 && again {
            (last * 4).max(late).min(LATE_HOLD_MAX.as_nanos() as u64)
        } else {
            late
        };
        self.hold_ns.store(hold, Ordering::Relaxed);
        self.late_until_ns.store(now + hold, Ordering::Relaxed);
        self.probe_out.store(false, Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
    }

    /// Before a sleeping worker is woken: it owes a look at the queue as soon as the scheduler
    /// runs it, and counts as late after [`WAKE_GRACE`] (a woken thread that has a core runs
    /// within tens of microseconds), not the longer grace of a running worker.
    pub(super) fn expect_worker(&self) {
        let due = self.due_ns.load(Ordering::Relaxed);
        // Due `WAKE_GRACE - WORKER_GRACE` from now, so that it counts as late `WAKE_GRACE`
        // from now (`worker_late` adds the grace of a running worker).
        let by = (self.now_ns() + WAKE_GRACE.as_nanos() as u64)
            .saturating_sub(WORKER_GRACE.as_nanos() as u64);
        if due == u64::MAX || by < due {
            self.due_ns.store(by, Ordering::Relaxed);
        }
    }

    /// The worker, running: ends the probation after a hold (see `queue`) if it runs on time
    /// (within its grace of its promise, or of a probe's wake-up) or the machine has idle
    /// cores, or starts a longer hold if it is late on a loaded machine or the load check says
    /// the cores are oversubscribed.
    pub(super) fn answer_probe(&self) {
        if !self.probation.load(Ordering::Relaxed) || self.holding() {
            return;
        }
        let now = self.now_ns();
        let late = self.past_grace(now);
        let loaded = self.load_check.map(|check| check());
        if let Some(late) = late.filter(|_| loaded != Some(false)) {
            self.hold(now, late);
        } else if loaded == Some(true) {
            // On time this once, but more threads want the cores than there are: a nice-19
            // worker that got a moment now will soon wait again. Another hold (longer, as a
            // repeat) rather than queueing work for it.
            self.hold(now, self.hold_ns.load(Ordering::Relaxed));
        } else {
            self.probation.store(false, Ordering::Relaxed);
            self.probe_out.store(false, Ordering::Relaxed);
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
        self.promise(nap);
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
            self.answer_probe();
            if q.items.is_empty() && self.shared_hint.load(Ordering::Acquire) {
                self.promise(std::time::Duration::ZERO);
                return Some(Work::Assist);
            }
            // While releases free their own items (the machine is busy, see `hold`), the
            // worker leaves queued work to allocations unless a flush waits for it: a nice-19
            // thread that may lose its core at any moment must not hold the pools' locks then.
            let claim = q.flushing > 0 || !self.holding();
            if claim
                && !q.items.is_empty()
                && let Some(w) = take(self, &mut q)
            {
                // The work takes tens of microseconds (a chunk of blocks) or the worker renews
                // its promise as it goes (see `promise`).
                self.promise(std::time::Duration::ZERO);
                return Some(Work::Claim(w));
            }
            let found = match idle_since {
                // Just out of work: spin first; but when releases come in a steady rhythm, nap
                // until shortly before the next one is due, and spin only then (spinning all
                // along would double the process's CPU time for a program that works between
                // its allocations).
                None => {
                    idle_since = Some(crate::sync::Instant::now());
                    if let Some(nap) = self.until_next_release()
                        && q.flushing == 0
                    {
                        q = self.nap(q, &mut locking, nap);
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
            // While releases zero their own buffers (the machine is busy), the worker sleeps
            // until the first release after the hold asks it to show that it runs (see
            // `queue`): a nap's timer would wake it, at its low priority, on a machine whose
            // cores other threads want, for nothing.
            let naps = if self.holding() {
                0
            } else {
                self.naps_ns.load(Ordering::Relaxed)
            };
            match nap_length(idle, naps) {
                Some(nap) => q = self.nap(q, &mut locking, nap),
                None => {
                    q.sleeping += 1;
                    self.due_ns.store(u64::MAX, Ordering::Relaxed);
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
                        && (q.items.is_empty() || (q.flushing == 0 && self.holding()))
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
