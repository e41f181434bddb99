//! The pressure path: an injected signal source, a failing source, the watermark, and a real
//! PSI trigger registered on this machine.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use pagepool::pressure::{CgroupPaths, PressureSource, PsiTrigger, Wait, Watermark};
use pagepool::{
    SystemHeap,
    pressure::{PressureConfig, PressureMonitor},
    registry::Registry,
};
use rustix::event::{PollFd, PollFlags, Timespec};

/// A source driven by a channel: `Ok(())` signals pressure, `Err` makes the source fail.
struct Injected(Receiver<io::Result<()>>);

fn stopped(stop: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::from_borrowed_fd(stop, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}

impl PressureSource for Injected {
    fn describe(&self) -> String {
        "injected".into()
    }
    fn wait(&mut self, timeout: Duration, stop: BorrowedFd<'_>) -> io::Result<Wait> {
        if stopped(stop) {
            return Ok(Wait::Stopped);
        }
        match self.0.recv_timeout(timeout.min(Duration::from_millis(20))) {
            Ok(Ok(())) => Ok(Wait::Signal),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => Ok(Wait::Timeout),
        }
    }
}

fn injected() -> (Sender<io::Result<()>>, Box<dyn PressureSource>) {
    let (tx, rx) = channel();
    (tx, Box::new(Injected(rx)))
}

fn quick() -> PressureConfig {
    PressureConfig {
        interval: Duration::from_millis(20),
        ..PressureConfig::default()
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn filled_heap(registry: &std::sync::Arc<Registry>) -> SystemHeap {
    let heap = SystemHeap::builder()
        .registry(registry.clone())
        .pressure(None)
        .worker_spin(Duration::ZERO) // an idle worker sleeps at once
        .worker_naps(Duration::ZERO)
        .build()
        .unwrap();
    let bufs: Vec<_> = (0..8).map(|_| heap.alloc(1 << 20).unwrap()).collect();
    drop(bufs);
    heap.flush();
    heap
}

#[test]
fn injected_signal_releases_a_share() {
    let registry = Registry::new(usize::MAX);
    let heap = filled_heap(&registry);
    assert_eq!(registry.count_all(), 2048);
    let (tx, source) = injected();
    let monitor = PressureMonitor::with_source(&registry, Some(source), None, quick()).unwrap();
    tx.send(Ok(())).unwrap();
    wait_for("one event", || monitor.stats().events == 1);
    let st = monitor.stats();
    assert_eq!(st.source.as_deref(), Some("injected"));
    assert_eq!(st.recent.len(), 1);
    let ev = &st.recent[0];
    assert_eq!(ev.source, "injected");
    assert_eq!(ev.pages_released, 1024, "half of what was reclaimable");
    assert!(ev.unix_ms > 0);
    assert_eq!(heap.stats().pooled_pages(), 1024);
    tx.send(Ok(())).unwrap();
    wait_for("two events", || monitor.stats().events == 2);
    assert_eq!(monitor.stats().pages_released, 1536);
    // The registry can own a monitor built elsewhere, and report it.
    registry.set_monitor(Some(monitor));
    assert_eq!(registry.pressure_stats().unwrap().events, 2);
    let t = Instant::now();
    registry.set_monitor(None); // stops it
    assert!(t.elapsed() < Duration::from_secs(2), "stop is prompt");
    assert!(registry.pressure_stats().is_none());
}

#[test]
fn the_freelist_is_scanned_before_the_pools() {
    let registry = Registry::new(usize::MAX);
    let heap = filled_heap(&registry);
    // A 64 KiB release (16 pages) does not wake a sleeping worker, so it normally stays queued;
    // retry in the rare case the worker was still awake and took it.
    for _ in 0..20 {
        drop(heap.alloc(64 << 10).unwrap());
        // Reclaimable pages beyond the pools' are the queue's (its shrinker counts those).
        let queued = registry.count_all() - registry.count();
        if queued == 0 {
            heap.flush();
            continue;
        }
        let pooled = heap.stats().pooled_pages();
        let freed = registry.shrink_all(queued);
        let st = heap.stats();
        assert_eq!(freed, queued, "the queued buffer went first");
        assert_eq!(st.pressure_freed_pages, queued as u64);
        assert_eq!(st.pooled_pages(), pooled, "pools untouched");
        assert_eq!(st.queued_pages, 0);
        return;
    }
    panic!("a 64 KiB release never stayed queued");
}

#[test]
fn failing_source_degrades_to_the_watermark() {
    let dir = std::env::temp_dir().join(format!("pagepool-pressure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let usage = dir.join("memory.current");
    std::fs::write(&usage, "10\n").unwrap();
    let registry = Registry::new(usize::MAX);
    let heap = filled_heap(&registry);
    let (tx, source) = injected();
    let wm = Watermark {
        usage: usage.clone(),
        limit: 100,
        fraction: 0.9,
    };
    let monitor = PressureMonitor::with_source(&registry, Some(source), Some(wm), quick()).unwrap();
    tx.send(Err(io::Error::other("source went away"))).unwrap();
    wait_for("the error", || !monitor.stats().errors.is_empty());
    let st = monitor.stats();
    assert!(st.source.is_none());
    assert!(st.errors[0].contains("source went away"), "{:?}", st.errors);
    assert_eq!(st.events, 0);
    std::fs::write(&usage, "95\n").unwrap(); // over 90% of the limit
    wait_for("a watermark event", || monitor.stats().events >= 1);
    assert_eq!(monitor.stats().recent[0].source, "watermark");
    std::fs::write(&usage, "10\n").unwrap();
    drop(monitor);
    assert!(heap.stats().pooled_pages() < 2048);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn real_psi_trigger_registers_and_polls() {
    let path = CgroupPaths::detect().psi_file();
    let mut trigger = PsiTrigger::register(&path, 100_000, 2_000_000)
        .unwrap_or_else(|e| panic!("PSI trigger on {}: {e}", path.display()));
    let (stop_rx, _stop_tx) = rustix::pipe::pipe().unwrap();
    let t = Instant::now();
    let got = trigger.wait(
        Duration::from_millis(200),
        std::os::fd::AsFd::as_fd(&stop_rx),
    );
    assert!(matches!(got, Ok(Wait::Timeout | Wait::Signal)), "{got:?}");
    assert!(t.elapsed() >= Duration::from_millis(150) || got.unwrap() == Wait::Signal);
    // A window the kernel refuses is an error, not a panic.
    assert!(PsiTrigger::register(&path, 100_000, 1).is_err());
}

#[test]
fn monitor_starts_on_this_machine() {
    let registry = Registry::new(usize::MAX);
    let heap = SystemHeap::builder()
        .registry(registry.clone())
        .build()
        .unwrap();
    let st = heap.stats();
    let p = st
        .pressure
        .clone()
        .expect("a monitor runs where PSI exists");
    assert!(
        p.source.as_deref().unwrap_or("").starts_with("psi "),
        "{p:?}"
    );
    assert!(st.to_string().contains("pressure monitor: psi"));
}
