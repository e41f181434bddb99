//! The machine's tempo: how fast it zeroes memory, how long it takes to wake a sleeping thread
//! and how late a short sleep ends, measured once per process, and every wall-clock bound of
//! the deferred-free helper and the heap's hand-off derived from them.
//!
//! The same program runs on a desktop, where a 256 KiB piece is zeroed in a few microseconds and
//! a woken thread runs within tens of them, and in an emulated VM, where both take tens of
//! times longer. A bound fixed for one (how long an allocation waits for the worker, how late
//! the worker may be before releases stop queueing for it) leaves the worker idle on the other
//! while callers zero. So the bounds are multiples of what this machine measures: the unit is
//! [`Tempo::handoff_wait`], the longest wait for work in another thread's hands that makes no
//! progress, and the rest follow from it (the multiples are in `config.rs`, with the reasons).
//! The measurement also chooses how large buffers are zeroed: where streaming stores beat
//! `memset` even on memory that fits in the cache (an emulated CPU, where `rep stosb` runs
//! byte by byte), every buffer is zeroed with them.

use crate::config::{
    CLAIM_DELAY_OF_PIECE, EARLY_BY_OF_WAIT, HANDOFF_CAP_OF_WAIT, HANDOFF_WAIT_MAX,
    HANDOFF_WAIT_MIN, HANDOFF_WAIT_OF_PIECE, HANDOFF_WAIT_OF_WAKE, LATE_HOLD_MAX_OF_GRACE,
    LATE_HOLD_OF_GRACE, NAP_FIRST_OF_EARLY, NAP_LONGEST_OF_FIRST, NAP_STEADY_OF_FIRST,
    RHYTHM_MAX_OF_NAP, STREAMING_WIN, WAKE_GRACE_OF_GRACE, WORKER_GRACE_OF_WAIT,
};
use std::time::Duration;

/// What this machine measured, and the bounds derived from it.
///
/// Three measurements: zeroing a 256 KiB piece of resident memory (with `memset` and with
/// streaming stores), waking a sleeping thread, and how late a short sleep ends. Every
/// wall-clock bound of the deferred-free worker and the heap's hand-off is a multiple of them,
/// so that on a slow machine (an emulated CPU) the worker is waited for as long as it needs,
/// and on a fast one no longer. The unit is [`handoff_wait`](Self::handoff_wait).
///
/// Read with [`tempo`](crate::stats::tempo); measured the first time anything asks for it
/// (building a heap does), in a few milliseconds, once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tempo {
    memset_ns: u64,
    streaming_ns: u64,
    streaming_from: usize,
    wake_ns: u64,
    sleep_late_ns: u64,
    handoff_wait_ns: u64,
}

impl Tempo {
    /// The bounds derived from the three measurements: `piece_ns` (zeroing one worker piece,
    /// 256 KiB, the faster way), `wake_ns` and `sleep_late_ns`.
    fn derive(memset_ns: u64, streaming_ns: u64, wake_ns: u64, sleep_late_ns: u64) -> Tempo {
        let streaming_wins = streaming_ns.saturating_mul(STREAMING_WIN) < memset_ns;
        let streaming_from = if streaming_wins {
            0
        } else {
            last_level_cache().map_or(8 << 20, |c| c / 2)
        };
        let piece = if streaming_wins {
            streaming_ns
        } else {
            memset_ns
        };
        let wait = (piece.saturating_mul(HANDOFF_WAIT_OF_PIECE))
            .max(wake_ns.saturating_mul(HANDOFF_WAIT_OF_WAKE))
            .clamp(
                HANDOFF_WAIT_MIN.as_nanos() as u64,
                HANDOFF_WAIT_MAX.as_nanos() as u64,
            );
        Tempo {
            memset_ns,
            streaming_ns,
            streaming_from,
            wake_ns,
            sleep_late_ns,
            handoff_wait_ns: wait,
        }
    }

    /// The bounds the loom models run with (no clock, no machine): those derived on a machine
    /// that zeroes a piece in 6.25 µs, wakes a thread in 25 µs and ends a short sleep 25 µs late:
    /// a 50 µs hand-off wait, a 1 ms worker grace, a 3 ms shortest hold, 100 µs first naps.
    #[cfg(any(loom, test))]
    pub(crate) fn fixed() -> Tempo {
        Tempo::derive(6_250, 12_500, 25_000, 25_000)
    }

    /// Nanoseconds to zero one 256 KiB piece of resident memory with `memset`, best of a few.
    pub fn memset_piece_ns(&self) -> u64 {
        self.memset_ns
    }

    /// Nanoseconds to zero one 256 KiB piece of resident memory with streaming
    /// (non-temporal) stores, best of a few; equal to [`memset_piece_ns`](Self::memset_piece_ns)
    /// where the CPU has none or they are not used (a ThreadSanitizer build).
    pub fn streaming_piece_ns(&self) -> u64 {
        self.streaming_ns
    }

    /// Buffers larger than this many bytes are zeroed with streaming stores: half the
    /// last-level cache, or 0 (every buffer) where streaming stores beat `memset` even on a
    /// piece that fits in the cache.
    pub fn streaming_from(&self) -> usize {
        self.streaming_from
    }

    /// Nanoseconds from waking a sleeping thread to its running (the median of a few round
    /// trips, halved).
    pub fn wake_ns(&self) -> u64 {
        self.wake_ns
    }

    /// How late a 50 µs sleep ends, in ns (the median of a few), with the worker's timer slack.
    pub fn sleep_late_ns(&self) -> u64 {
        self.sleep_late_ns
    }

    /// The unit of the bounds: the longest a thread waits for work in another thread's hands
    /// while that thread makes no progress (a piece the worker zeroes, a claim landing, a lock
    /// the worker holds). Several pieces' zeroing or a few wake-ups, whichever is longer,
    /// within 20 µs and 20 ms.
    pub fn handoff_wait(&self) -> Duration {
        Duration::from_nanos(self.handoff_wait_ns)
    }

    /// The longest an allocation waits for the worker even while it makes progress: past it,
    /// fresh pages are cheaper.
    pub fn handoff_cap(&self) -> Duration {
        self.handoff_wait() * HANDOFF_CAP_OF_WAIT
    }

    /// How late a running worker may be on its promise to look at the queue before it counts
    /// as kept off its core (releases then zero their own buffers for a while).
    pub fn worker_grace(&self) -> Duration {
        self.handoff_wait() * WORKER_GRACE_OF_WAIT
    }

    /// How late a worker woken by a release may be to run.
    pub fn wake_grace(&self) -> Duration {
        self.worker_grace() * WAKE_GRACE_OF_GRACE
    }

    /// The shortest time releases zero their own buffers after the worker was found late.
    pub fn late_hold(&self) -> Duration {
        self.worker_grace() * LATE_HOLD_OF_GRACE
    }

    /// The longest such hold.
    pub fn late_hold_max(&self) -> Duration {
        self.worker_grace() * LATE_HOLD_MAX_OF_GRACE
    }

    /// How long before the next release is due a napping worker wakes to spin: the lateness
    /// of a short sleep, at least a fraction of [`handoff_wait`](Self::handoff_wait).
    pub fn early_by(&self) -> Duration {
        Duration::from_nanos(self.sleep_late_ns)
            .max(self.handoff_wait() / EARLY_BY_OF_WAIT)
            .min(HANDOFF_WAIT_MAX)
    }

    /// An idle worker's first naps.
    pub fn nap_first(&self) -> Duration {
        self.early_by() * NAP_FIRST_OF_EARLY
    }

    /// How long an idle worker keeps taking its first naps.
    pub fn nap_steady_for(&self) -> Duration {
        self.nap_first() * NAP_STEADY_OF_FIRST
    }

    /// The longest nap.
    pub fn nap_longest(&self) -> Duration {
        self.nap_first() * NAP_LONGEST_OF_FIRST
    }

    /// The longest gap between releases the worker's rhythm records: longer ones are pauses.
    pub fn rhythm_max(&self) -> Duration {
        self.nap_longest() * RHYTHM_MAX_OF_NAP
    }

    /// How long a spinning worker leaves newly queued work alone before it claims it: a
    /// fraction of a piece's zeroing, at least 1 µs.
    pub fn claim_delay(&self) -> Duration {
        let piece = self.memset_ns.min(self.streaming_ns);
        Duration::from_nanos((piece / CLAIM_DELAY_OF_PIECE).max(1_000))
    }
}

/// The machine's tempo, measured on the first call (see [`Tempo`]).
///
/// # Examples
/// ```
/// let t = pagepool::stats::tempo();
/// assert!(t.handoff_wait() <= t.worker_grace());
/// assert!(t.worker_grace() < t.wake_grace());
/// println!("handoff wait {:?}, wake-up {} ns", t.handoff_wait(), t.wake_ns());
/// ```
pub fn tempo() -> &'static Tempo {
    #[cfg(loom)]
    {
        static FIXED: std::sync::OnceLock<Tempo> = std::sync::OnceLock::new();
        FIXED.get_or_init(Tempo::fixed)
    }
    #[cfg(not(loom))]
    {
        static T: std::sync::OnceLock<Tempo> = std::sync::OnceLock::new();
        T.get_or_init(measure)
    }
}

/// Measures the machine (see [`Tempo`]).
#[cfg(not(loom))]
fn measure() -> Tempo {
    let (memset_ns, streaming_ns) = zero_piece_ns();
    let (wake_ns, sleep_late_ns) = wake_and_sleep_ns();
    let t = Tempo::derive(memset_ns, streaming_ns, wake_ns, sleep_late_ns);
    log::debug!("pagepool: {t:?}");
    t
}

/// The best of twenty zeroings of one worker piece, warm, with `memset` and with streaming
/// stores, in ns.
#[cfg(not(loom))]
fn zero_piece_ns() -> (u64, u64) {
    use crate::config::WORKER_PIECE_BYTES;
    use std::ptr::NonNull;
    let mut buf = vec![1u8; WORKER_PIECE_BYTES + 64];
    let off = buf.as_ptr().align_offset(64);
    let p = NonNull::new(buf[off..].as_mut_ptr()).expect("a Vec's pointer is not null");
    let mut best = [u64::MAX; 2];
    for _ in 0..20 {
        for (i, streaming) in [false, true].into_iter().enumerate() {
            let t = std::time::Instant::now();
            // SAFETY: `p` points to WORKER_PIECE_BYTES of `buf`, 64-byte aligned, owned here
            // and not otherwise referenced while it is zeroed.
            unsafe { crate::zero::zero(p, WORKER_PIECE_BYTES, streaming) };
            best[i] = best[i].min(t.elapsed().as_nanos() as u64);
        }
    }
    std::hint::black_box(&buf);
    // No streaming stores under ThreadSanitizer (see `zero::zero`): both ways are memset.
    #[cfg(pagepool_tsan)]
    {
        best[1] = best[0];
    }
    (best[0].max(1), best[1].max(1))
}

/// The wake-up latency (the median of seven round trips between two sleeping threads,
/// halved) and the lateness of a 50 µs sleep with the worker's timer slack (the median of
/// seven), in ns. Where no thread can be started, a wake-up counts as 50 µs.
#[cfg(not(loom))]
fn wake_and_sleep_ns() -> (u64, u64) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    const ROUNDS: usize = 7;
    let turn = Arc::new(AtomicU32::new(0));
    let main = std::thread::current();
    let t2 = turn.clone();
    let spawned = std::thread::Builder::new()
        .name("pagepool-tempo".into())
        .spawn(move || {
            crate::os::set_timer_slack(crate::config::WORKER_TIMER_SLACK_NS);
            let mut late = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                let t = std::time::Instant::now();
                std::thread::sleep(Duration::from_micros(50));
                late.push((t.elapsed().as_nanos() as u64).saturating_sub(50_000));
            }
            // Answer each odd turn with the next even one.
            let mut want = 1;
            while want < 2 * ROUNDS as u32 {
                while turn.load(SeqCst) != want {
                    std::thread::park();
                }
                turn.store(want + 1, SeqCst);
                main.unpark();
                want += 2;
            }
            median(&mut late)
        });
    let Ok(helper) = spawned else {
        return (50_000, 50_000);
    };
    let mut trips = Vec::with_capacity(ROUNDS);
    for r in 0..ROUNDS as u32 {
        // Let the helper fall asleep first: a wake-up is what is measured.
        std::thread::sleep(Duration::from_micros(200));
        let t = std::time::Instant::now();
        t2.store(2 * r + 1, SeqCst);
        helper.thread().unpark();
        while t2.load(SeqCst) != 2 * r + 2 {
            std::thread::park_timeout(Duration::from_millis(100));
        }
        trips.push(t.elapsed().as_nanos() as u64 / 2);
    }
    let sleep_late = helper.join().unwrap_or(50_000);
    (median(&mut trips).max(1), sleep_late)
}

#[cfg(not(loom))]
fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The last-level cache's size, from sysfs.
fn last_level_cache() -> Option<usize> {
    (0..8)
        .rev()
        .filter_map(|i| {
            let s = std::fs::read_to_string(format!(
                "/sys/devices/system/cpu/cpu0/cache/index{i}/size"
            ))
            .ok()?;
            let s = s.trim();
            let (num, mul) = match s.strip_suffix('K') {
                Some(n) => (n, 1024),
                None => match s.strip_suffix('M') {
                    Some(n) => (n, 1 << 20),
                    None => (s, 1),
                },
            };
            num.parse::<usize>().ok().map(|n| n * mul)
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_grow_with_the_machines_slowness() {
        let fast = Tempo::derive(6_250, 12_500, 25_000, 25_000);
        // An emulated CPU: memset 10 times slower than streaming stores, everything slower.
        let slow = Tempo::derive(800_000, 80_000, 400_000, 200_000);
        assert!(fast.streaming_from() > 0, "memset wins on a cached piece");
        assert_eq!(slow.streaming_from(), 0, "streaming stores win everywhere");
        for (f, s) in [
            (fast.handoff_wait(), slow.handoff_wait()),
            (fast.handoff_cap(), slow.handoff_cap()),
            (fast.worker_grace(), slow.worker_grace()),
            (fast.wake_grace(), slow.wake_grace()),
            (fast.late_hold(), slow.late_hold()),
            (fast.early_by(), slow.early_by()),
            (fast.nap_first(), slow.nap_first()),
            (fast.claim_delay(), slow.claim_delay()),
        ] {
            assert!(s > f, "{s:?} on the slow machine, {f:?} on the fast one");
        }
        // The order the helper relies on.
        for t in [fast, slow] {
            assert!(t.handoff_wait() < t.handoff_cap());
            assert!(t.handoff_wait() <= t.worker_grace());
            assert!(t.worker_grace() < t.wake_grace());
            assert!(t.worker_grace() < t.late_hold());
            assert!(t.late_hold() < t.late_hold_max());
            assert!(t.early_by() < t.nap_first());
            assert!(t.nap_first() < t.nap_steady_for());
            assert!(t.nap_first() < t.nap_longest());
        }
    }

    #[test]
    fn bounds_stay_within_their_limits_at_the_extremes() {
        for t in [
            Tempo::derive(1, 1, 1, 0),
            Tempo::derive(u64::MAX, u64::MAX, u64::MAX, u64::MAX),
        ] {
            assert!(t.handoff_wait() >= HANDOFF_WAIT_MIN && t.handoff_wait() <= HANDOFF_WAIT_MAX);
            // No overflow on the way to the largest bound.
            let _ = (
                t.late_hold_max(),
                t.nap_longest(),
                t.early_by(),
                t.claim_delay(),
            );
        }
    }

    #[test]
    fn this_machine_is_measured() {
        let t = tempo();
        assert!(t.memset_piece_ns() > 0 && t.streaming_piece_ns() > 0 && t.wake_ns() > 0);
        assert!(t.handoff_wait() >= HANDOFF_WAIT_MIN && t.handoff_wait() <= HANDOFF_WAIT_MAX);
        assert!(std::ptr::eq(t, tempo()), "measured once");
    }
}
