//! The synchronisation primitives the rest of the crate uses.
//!
//! Every module imports its atomics, locks, condition variables, spin hints and thread-locals
//! from `crate::sync` instead of `std`, so that building with `--cfg loom` swaps in
//! [loom](https://docs.rs/loom)'s model-checked versions: `tests/loom.rs` and the crate's
//! `loom_tests` (`src/loom_tests.rs`) explore every interleaving of the pool's give/take, the
//! registry's shrink, the deferred-free helper, the heap's allocator-worker hand-off and the thread caches.
//!
//! Not swapped: reference counting (`Arc`, `Weak`: structure, not the concurrency under test,
//! and loom has no `Weak`), and crossbeam's `Backoff` in the heap worker's wait for helpers
//! (`heap/worker.rs`: the models run the queue with a worker of their own). Loom does not model time, and a model must behave the same way
//! each time it replays an interleaving, so under loom the clock ([`Instant`]) stands still:
//! the idle policy's decisions that depend on time (a late worker, a hold, a nap's length)
//! come out the same in every replay, and every wait bounded by time has a loom branch that
//! yields once instead (`lock_within`, `wait_worker`, `wait_timeout`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::time::Instant;

/// The clock under loom: time stands still, so that a replayed interleaving takes the same
/// branches as the first run of it (a model that reads the real clock is not deterministic,
/// and loom gives up on it). Every instant is the same; nothing has elapsed since any of them.
#[cfg(loom)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Instant(std::time::Duration);

#[cfg(loom)]
impl Instant {
    /// The one instant of a model.
    pub(crate) fn now() -> Self {
        Instant(std::time::Duration::ZERO)
    }

    /// How long ago `self` was: nothing has elapsed in a model.
    pub(crate) fn elapsed(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

#[cfg(loom)]
impl std::ops::Add<std::time::Duration> for Instant {
    type Output = Instant;
    fn add(self, d: std::time::Duration) -> Instant {
        Instant(self.0.saturating_add(d))
    }
}

// Reference counting is structure, not the concurrency under test (and loom has no `Weak`):
// always std's.
pub(crate) use std::sync::{Arc, Weak};

/// A spin-wait hint: the processor's pause instruction, or under loom a yield to the other
/// model threads (a loop that spins must let them run).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(loom)]
    loom::hint::spin_loop();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Waits on `cv`, ignoring poisoning (see [`lock`]).
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

/// Locks `m`, ignoring poisoning: every structure guarded here is left consistent at each
/// point where user code (a release callback) could panic, so a poisoned lock is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` for at most `d`, ignoring poisoning (see [`lock`]). Under loom, which does not
/// model time, this is a plain wait.
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    d: std::time::Duration,
) -> MutexGuard<'a, T> {
    match cv.wait_timeout(g, d) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}

/// Locks `m` for the allocation side of a lock the low-priority worker also takes: if the lock
/// stays busy for `bound` while the worker is inside its locked sections (`worker_locking`),
/// gives up (`None`): on a busy machine the worker can be descheduled while it holds the lock,
/// for far longer than any allocation should wait. A lock held by anyone else (a thread at
/// normal priority, which the scheduler runs again soon) is waited for. Ignores poisoning.
/// Under loom, a plain lock.
pub(crate) fn lock_within<'a, T>(
    m: &'a Mutex<T>,
    bound: std::time::Duration,
    worker_locking: &AtomicBool,
) -> Option<MutexGuard<'a, T>> {
    #[cfg(loom)]
    {
        let _ = (bound, worker_locking);
        Some(lock(m))
    }
    #[cfg(not(loom))]
    {
        let mut end = None;
        loop {
            if let Some(g) = try_lock(m) {
                return Some(g);
            }
            let now = std::time::Instant::now();
            match end {
                None => end = Some(now + bound),
                Some(t) if now >= t => {
                    return if worker_locking.load(Ordering::Acquire) {
                        None
                    } else {
                        Some(lock(m))
                    };
                }
                Some(_) => {}
            }
            for _ in 0..16 {
                spin_loop();
            }
        }
    }
}

/// Locks `m` only if it is free now, ignoring poisoning.
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}
