//! The generic helper's tests: whole items, the bound, the worker's serve loop and its
//! punctuality (naps, holds, probation, the load check).

use super::punctual::nap_length;
use super::*;
use crate::shrinker::Shrinker;
use crate::tempo::Tempo;
use std::sync::Arc;

/// The tempo the tests' queues run with, whatever this machine measures: a 1 ms worker
/// grace, a 3 ms shortest hold, a 1 s longest, 100 us first naps (see `Tempo::fixed`).
fn t() -> Tempo {
    Tempo::fixed()
}

/// A queue of [`Thing`]s that frees nothing (the tests here look at the queue, not at the
/// callback), with the fixed tempo.
fn things(max: usize) -> (ReleaseQueue<Thing>, ()) {
    let mut q = ReleaseQueue::new(4096, max, Box::new(|_, _| {}));
    q.punctuality.tempo = t();
    (q, ())
}

#[test]
fn naps_start_short_grow_to_the_longest_and_end() {
    let ms = |m: u64| std::time::Duration::from_millis(m);
    let budget = 100_000_000; // 100 ms
    assert_eq!(nap_length(&t(), ms(0), budget), Some(t().nap_first()));
    assert_eq!(nap_length(&t(), ms(1), budget), Some(t().nap_first()));
    let mut last = t().nap_first();
    for m in 2..93 {
        let nap = nap_length(&t(), ms(m), budget).unwrap();
        assert!(nap >= last && nap <= t().nap_longest(), "{m} ms: {nap:?}");
        last = nap;
    }
    assert_eq!(last, t().nap_longest());
    assert_eq!(
        nap_length(&t(), std::time::Duration::from_micros(99_950), budget),
        Some(std::time::Duration::from_micros(50)),
        "the last nap ends with the budget"
    );
    assert_eq!(nap_length(&t(), ms(100), budget), None);
    assert_eq!(nap_length(&t(), ms(0), 0), None, "no naps: sleep at once");
}

#[test]
fn after_a_hold_releases_wait_for_the_worker_to_answer_a_probe() {
    let (mut l, _) = things(10_000);
    l.set_load_check(None); // the worker's punctuality alone
    let one = || Thing(0, 1);
    l.punctuality.hold(l.punctuality.now_ns(), 0);
    assert!(
        l.queue(one()).is_err(),
        "held: the release zeroes its buffer"
    );
    std::thread::sleep(t().late_hold() + std::time::Duration::from_millis(5));
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
    std::thread::sleep(t().worker_grace() + std::time::Duration::from_millis(1));
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
    let (mut l, _) = things(10_000);
    l.set_load_check(Some(|| true));
    let one = || Thing(0, 1);
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
    let one = || Thing(0, 1);
    let late = |l: &ReleaseQueue<Thing>| {
        l.promise(std::time::Duration::ZERO); // "I look at once"; then it does not
        std::thread::sleep(t().worker_grace() + std::time::Duration::from_millis(1));
    };

    // Idle cores: a late worker was kept away by something passing; releases queue.
    let (mut l, _) = things(10_000);
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
        "the machine is looked at once per shortest hold, not once per release"
    );
    // Its own lateness, found when it comes back, is not held against it either.
    l.promise(std::time::Duration::ZERO);
    std::thread::sleep(t().late_hold() + t().worker_grace() + std::time::Duration::from_millis(1));
    l.promise(std::time::Duration::ZERO);
    assert!(!l.punctuality.holding());
    assert_eq!(CHECKS.load(Ordering::Relaxed), 2, "looked at again");

    // Oversubscribed cores: a hold, releases zero their own buffers.
    let (mut l, _) = things(10_000);
    l.set_load_check(Some(|| true));
    late(&l);
    assert!(l.queue(one()).is_err(), "held");
    assert!(l.punctuality.holding());
    assert_eq!(l.pages(), 0);

    // No load check: punctuality alone.
    let (mut l, _) = things(10_000);
    l.set_load_check(None);
    late(&l);
    assert!(l.queue(one()).is_err(), "held");
    assert!(l.punctuality.holding());
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
    let (l, _) = things(10_000);
    let ms = |n: u64| n * 1_000_000;
    let now = l.punctuality.now_ns() + ms(1000);
    // A short hiccup: the shortest hold.
    l.punctuality.hold(now, ms(1));
    assert_eq!(
        l.punctuality.hold_ns.load(Ordering::Relaxed),
        t().late_hold().as_nanos() as u64
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
    // lateness (at most the longest hold).
    l.punctuality.probation.store(false, Ordering::Relaxed);
    let later = probing + ms(5000);
    l.punctuality.hold(later, ms(40));
    assert_eq!(l.punctuality.hold_ns.load(Ordering::Relaxed), ms(40));
    l.punctuality.probation.store(false, Ordering::Relaxed);
    l.punctuality.hold(later + ms(10_000), ms(50_000));
    assert_eq!(
        l.punctuality.hold_ns.load(Ordering::Relaxed),
        t().late_hold_max().as_nanos() as u64
    );
}
