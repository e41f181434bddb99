//! The worker's punctuality: when it promised to look at the queue next, what releases do when
//! it breaks that promise (hold, probation, the machine's load check), and how it waits for
//! work meanwhile (its spin and naps, timed to the rhythm of releases). It knows nothing of the
//! queue's items: the queue asks it questions and tells it what happened.

use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::tempo::Tempo;

/// The nap an idle worker takes after `idle` without work, or `None` once it has napped for
/// `naps_ns` and should sleep until woken.
pub(super) fn nap_length(
    t: &Tempo,
    idle: std::time::Duration,
    naps_ns: u64,
) -> Option<std::time::Duration> {
    let naps = std::time::Duration::from_nanos(naps_ns);
    if idle >= naps {
        return None;
    }
    let nap = if idle < t.nap_steady_for() {
        t.nap_first()
    } else {
        // Double per steady spell of idleness past the first, up to the longest nap.
        let doublings = (idle.as_nanos() / t.nap_steady_for().as_nanos()).min(16) as u32;
        (t.nap_first() * 2u32.pow(doublings)).min(t.nap_longest())
    };
    Some(nap.min(naps - idle))
}

/// The worker's punctuality, owned by its [`ReleaseQueue`](super::ReleaseQueue): its promise,
/// the holds and probation that follow a broken one, its spin and naps, and the rhythm of
/// releases its naps are timed to.
pub(crate) struct Punctuality {
    /// How long an idle worker polls before napping, in ns (0: nap at once).
    pub(super) spin_ns: AtomicU64,
    /// How long an idle worker naps before it sleeps until woken, in ns (0: no naps).
    pub(super) naps_ns: AtomicU64,
    /// When the worker promised to look at the queue next, in ns since `born` (`u64::MAX`:
    /// asleep until a release wakes it). Past that by the worker grace (`Tempo::worker_grace`), the scheduler is not
    /// running the worker, and releases zero their buffers themselves.
    pub(super) due_ns: AtomicU64,
    /// Until when releases zero their own buffers after the worker was found late, and the
    /// length of that hold (see `hold`).
    pub(super) late_until_ns: AtomicU64,
    pub(super) hold_ns: AtomicU64,
    /// Set by a hold, cleared when the worker next runs on time: after a hold, releases keep
    /// zeroing their own buffers, and the first wakes a sleeping worker to show that it runs
    /// again (`probe_out`: asked, not answered; see `ReleaseQueue::queue` and `answer_probe`).
    pub(super) probation: AtomicBool,
    pub(super) probe_out: AtomicBool,
    pub(super) born: crate::sync::Instant,
    /// The rhythm of releases: when the last one came (ns since `born`), and a moving average
    /// of the gaps between them (0: none yet).
    pub(super) last_release_ns: AtomicU64,
    pub(super) release_gap_ns: AtomicU64,
    /// Whether more threads want the cores than there are (see `loaded`); the machine's
    /// answer, or a test's; `None`: no load check, the worker's punctuality alone decides.
    pub(super) load_check: Option<fn() -> bool>,
    /// Until when a worker found late is not held against (see `loaded`), in ns since `born`.
    pub(super) calm_until_ns: AtomicU64,
    /// The machine's tempo, which every wall-clock bound here is a multiple of.
    pub(super) tempo: Tempo,
}

/// The machine's load check (see [`crate::os::cores_oversubscribed`]); none under loom, whose
/// models must not depend on the machine.
fn machine_load_check() -> Option<fn() -> bool> {
    #[cfg(loom)]
    return None;
    #[cfg(not(loom))]
    Some(crate::os::cores_oversubscribed)
}

impl Punctuality {
    /// A worker asleep until woken, no spin, no naps, the machine's load check.
    pub(super) fn new() -> Punctuality {
        Punctuality {
            spin_ns: AtomicU64::new(0),
            naps_ns: AtomicU64::new(0),
            due_ns: AtomicU64::new(u64::MAX),
            late_until_ns: AtomicU64::new(0),
            hold_ns: AtomicU64::new(0),
            probation: AtomicBool::new(false),
            probe_out: AtomicBool::new(false),
            born: crate::sync::Instant::now(),
            last_release_ns: AtomicU64::new(0),
            release_gap_ns: AtomicU64::new(0),
            load_check: machine_load_check(),
            calm_until_ns: AtomicU64::new(0),
            tempo: *crate::tempo::tempo(),
        }
    }

    /// Replaces the check of whether the machine's cores are oversubscribed (see `loaded`);
    /// `None` turns it off.
    pub(super) fn set_load_check(&mut self, check: Option<fn() -> bool>) {
        self.load_check = check;
    }

    /// The tempo the bounds are multiples of.
    pub(crate) fn tempo(&self) -> &Tempo {
        &self.tempo
    }

    /// How long an idle worker keeps polling for work before it sleeps (default 0). Waking a
    /// sleeping thread costs the releasing thread a system call and the worker a scheduling
    /// delay (tens of microseconds in a VM); a short poll keeps a busy heap's worker awake
    /// between releases. The poll runs at the worker's low priority.
    pub(crate) fn set_spin(&self, d: std::time::Duration) {
        self.spin_ns
            .store(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// How long an idle worker keeps napping, after its spin, before it sleeps until woken
    /// (default 0: it sleeps at once). A napping worker sleeps the first nap (`Tempo::nap_first`) at a time for the
    /// first `Tempo::nap_steady_for` of idleness, then naps twice as long each time up to
    /// the longest nap, and looks at the queue whenever it wakes up: releases never wake it.
    ///
    /// This is what keeps a wake-up off the releasing thread when releases come further apart
    /// than the spin: waking a sleeping thread costs the releasing thread far more than the
    /// release itself (measured: docs/DESIGN.md, Tuning, "Naps"). A nap costs only the worker
    /// a timer wake-up, and the worker finds queued work at most one nap late (an allocation
    /// that comes first zeroes the blocks it needs itself).
    pub(crate) fn set_naps(&self, d: std::time::Duration) {
        self.naps_ns
            .store(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// The worker's spin time (see [`set_spin`](Self::set_spin)), in ns.
    pub(super) fn spin(&self) -> u64 {
        self.spin_ns.load(Ordering::Relaxed)
    }

    /// The worker's napping time (see [`set_naps`](Self::set_naps)), in ns.
    pub(super) fn naps(&self) -> u64 {
        self.naps_ns.load(Ordering::Relaxed)
    }

    /// The worker's promise as it stands (see `due_ns`): it changes whenever the worker renews
    /// it, which is how a waiter sees the worker making progress.
    #[cfg_attr(loom, allow(dead_code))] // the waits it serves do not wait under loom
    pub(crate) fn due(&self) -> u64 {
        self.due_ns.load(Ordering::Relaxed)
    }

    /// The worker goes to sleep until a release wakes it: it promises nothing.
    pub(super) fn asleep(&self) {
        self.due_ns.store(u64::MAX, Ordering::Relaxed);
    }

    /// True after a hold until the worker shows that it runs again (see `answer_probe`).
    pub(super) fn on_probation(&self) -> bool {
        self.probation.load(Ordering::Relaxed)
    }

    /// A release on probation asks the worker to show that it runs: true for the first to
    /// ask since the hold (it wakes the worker), false once the probe is out.
    pub(super) fn ask_probe(&self) -> bool {
        !self.probe_out.swap(true, Ordering::Relaxed)
    }

    /// Records a release (queued or not) in the rhythm of releases: the time of the last one
    /// and a moving average of the gaps between them.
    pub(crate) fn note_release(&self, now: u64) {
        let last = self.last_release_ns.swap(now, Ordering::Relaxed);
        let gap = now.saturating_sub(last);
        if last == 0 || gap > self.tempo.rhythm_max().as_nanos() as u64 {
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
    /// awake `Tempo::early_by` before the next release is due. `None`: spin now.
    pub(crate) fn until_next_release(&self) -> Option<std::time::Duration> {
        let gap = self.release_gap_ns.load(Ordering::Relaxed);
        if gap == 0 {
            return None;
        }
        let due = self.last_release_ns.load(Ordering::Relaxed) + gap;
        let wake = due.saturating_sub(self.tempo.early_by().as_nanos() as u64);
        let now = self.now_ns();
        (wake > now + self.tempo.early_by().as_nanos() as u64)
            .then(|| std::time::Duration::from_nanos(wake - now))
    }

    /// Now, in ns since the queue was made.
    pub(crate) fn now_ns(&self) -> u64 {
        self.born.elapsed().as_nanos() as u64
    }

    /// The worker's promise: it looks at the queue again within `d` (see `due_ns`).
    ///
    /// Called by the worker only (and by a release that wakes it). A worker that renews its
    /// promise more than the worker grace after it fell due was kept off its core meanwhile: on a
    /// loaded machine (see [`loaded`](Self::loaded)), releases then zero their own buffers for
    /// at least the next the shortest hold (`Tempo::late_hold`).
    pub(crate) fn promise(&self, d: std::time::Duration) {
        let now = self.now_ns();
        let prev = self
            .due_ns
            .swap(now.saturating_add(d.as_nanos() as u64), Ordering::Relaxed);
        if prev != u64::MAX
            && now > prev.saturating_add(self.tempo.worker_grace().as_nanos() as u64)
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
    /// the shortest hold (`Tempo::late_hold`) (a late worker is noticed by every release until it comes back).
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
        self.calm_until_ns.store(
            now + self.tempo.late_hold().as_nanos() as u64,
            Ordering::Relaxed,
        );
        false
    }

    /// True when the worker is late by more than the worker grace (`Tempo::worker_grace`) on its promise on a loaded
    /// machine (see [`loaded`](Self::loaded)), or was so within the last the shortest hold (`Tempo::late_hold`): a
    /// machine busy enough to leave the worker without a core usually stays so, and a worker
    /// that runs for a moment meanwhile is likely to lose its core again before it is done.
    pub(crate) fn worker_late(&self, now: u64) -> bool {
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

    /// How late the worker is on its promise `now`, if by more than the worker grace (`Tempo::worker_grace`) (never
    /// while it sleeps until woken).
    fn past_grace(&self, now: u64) -> Option<u64> {
        let due = self.due_ns.load(Ordering::Relaxed);
        (due != u64::MAX && now > due.saturating_add(self.tempo.worker_grace().as_nanos() as u64))
            .then(|| now - due)
    }

    /// True while the machine looks busy: the worker was found late or kept off its core
    /// lately, and releases zero their own buffers (see [`hold`](Self::hold)).
    pub(crate) fn busy(&self) -> bool {
        self.holding()
    }

    /// True while releases zero their own buffers (see [`hold`](Self::hold)).
    pub(crate) fn holding(&self) -> bool {
        self.now_ns() < self.late_until_ns.load(Ordering::Relaxed)
    }

    /// Releases zero their own buffers from `now` for a while, the worker having been found
    /// `late` past its promise: as long again as that (at least the shortest hold (`Tempo::late_hold`)), as a thread
    /// kept off its core that long is likely to be kept off again as long; four times as long
    /// (up to the longest hold (`Tempo::late_hold_max`)) each time the worker is found late again soon after the last hold
    /// ended or before it showed that it runs again, so that a machine that stays busy queues almost nothing for a worker that gets
    /// no core, while a single hiccup (another thread taking the worker's core for a few
    /// milliseconds) costs one short hold. A worker found late while a hold runs (it comes
    /// back, and sees how long it was away) extends the hold to as long again from now.
    pub(super) fn hold(&self, now: u64, late: u64) {
        let until = self.late_until_ns.load(Ordering::Relaxed);
        let floor = self.tempo.late_hold().as_nanos() as u64;
        let late = late.clamp(floor, self.tempo.late_hold_max().as_nanos() as u64);
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
            (last * 4)
                .max(late)
                .min(self.tempo.late_hold_max().as_nanos() as u64)
        } else {
            late
        };
        self.hold_ns.store(hold, Ordering::Relaxed);
        self.late_until_ns.store(now + hold, Ordering::Relaxed);
        self.probe_out.store(false, Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
    }

    /// Before a sleeping worker is woken: it owes a look at the queue as soon as the scheduler
    /// runs it, and counts as late after the wake grace (`Tempo::wake_grace`) (a woken thread that has a core runs
    /// within tens of microseconds), not the longer grace of a running worker.
    pub(crate) fn expect_worker(&self) {
        let due = self.due_ns.load(Ordering::Relaxed);
        // Due the wake grace less the worker grace from now, so that it counts as late the wake grace
        // from now (`worker_late` adds the grace of a running worker).
        let by = (self.now_ns() + self.tempo.wake_grace().as_nanos() as u64)
            .saturating_sub(self.tempo.worker_grace().as_nanos() as u64);
        if due == u64::MAX || by < due {
            self.due_ns.store(by, Ordering::Relaxed);
        }
    }

    /// The worker, running: ends the probation after a hold (see `ReleaseQueue::queue`) if it runs on time
    /// (within its grace of its promise, or of a probe's wake-up) or the machine has idle
    /// cores, or starts a longer hold if it is late on a loaded machine or the load check says
    /// the cores are oversubscribed.
    pub(crate) fn answer_probe(&self) {
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
}
