//! The pressure monitor: gives pooled and queued memory back when the system runs short.
//!
//! The kernel runs shrinkers from reclaim. A user-space process learns of memory pressure from:
//! - **PSI triggers** (Linux 5.2+): a line such as `some 100000 2000000` written to a pressure
//!   file asks the kernel to signal `POLLPRI` when tasks stalled on memory for 100 ms within a
//!   2 s window. The file is the process's cgroup v2 `memory.pressure` where the process is in a
//!   v2 cgroup that has one, else the system-wide `/proc/pressure/memory`. The string is written
//!   with its terminating NUL (the kernel drops the last byte written); without
//!   `CAP_SYS_RESOURCE` the window must be a multiple of 2 s. `POLLERR` means the source went
//!   away (the cgroup was removed): the monitor then falls back to the watermark.
//! - **a limit watermark**: where the process's cgroup has a memory limit (v2 `memory.max`, v1
//!   `memory.limit_in_bytes`), usage above a fraction of it (default 90%) counts as pressure,
//!   checked every [`PressureConfig::interval`].
//!
//! On a signal the monitor asks the registry to free a share of what it could free
//! ([`Registry::shrink_all`](crate::registry::Registry::shrink_all): deferred release queues first, then the
//! pools), records the event, and logs it through the `log` facade. It runs on a thread of its
//! own (`pagepool-pressure`) and never takes a lock that allocation holds for long.
//!
//! Defaults, for comparison: systemd's PSI-based tools speak of 200 ms of stall per 2 s; Android's
//! lmkd reacts to `some 70ms/1s`. Releasing a cache is cheap and harmless, so pagepool reacts
//! earlier: 100 ms of stall in a 2 s window, the shortest window allowed without privileges.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::{PollFd, PollFlags};

use crate::config::RECENT;
use crate::shrinker::Shrinker;
use crate::stats::{PressureEvent, PressureStats};

/// How the pressure monitor listens and responds.
#[derive(Debug, Clone, PartialEq)]
pub struct PressureConfig {
    /// Register a PSI trigger (default `true`).
    pub psi: bool,
    /// PSI: stall time that triggers, in microseconds (default 100 ms).
    pub stall_us: u64,
    /// PSI: the window, in microseconds (default 2 s; a multiple of 2 s without privileges).
    pub window_us: u64,
    /// Watermark: usage above this fraction of the cgroup's memory limit counts as pressure
    /// (default `Some(0.9)`; `None` turns the watermark off).
    pub watermark: Option<f64>,
    /// How often the watermark is checked (default 1 s).
    pub interval: Duration,
    /// The share of reclaimable pages released per signal (default 0.5).
    pub share: f64,
}

impl Default for PressureConfig {
    fn default() -> Self {
        PressureConfig {
            psi: true,
            stall_us: 100_000,
            window_us: 2_000_000,
            watermark: Some(0.9),
            interval: Duration::from_secs(1),
            share: 0.5,
        }
    }
}

/// What a [`PressureSource`] reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Memory pressure.
    Signal,
    /// The timeout passed.
    Timeout,
    /// The monitor is being stopped.
    Stopped,
}

/// Something that signals memory pressure: a PSI trigger, or a test's injected source.
pub trait PressureSource: Send {
    /// A short description for statistics and logs (for example the PSI file's path).
    fn describe(&self) -> String;
    /// Waits up to `timeout` for pressure. Must return [`Wait::Stopped`] promptly once `stop`
    /// becomes readable. An error means the source is gone.
    fn wait(&mut self, timeout: Duration, stop: BorrowedFd<'_>) -> io::Result<Wait>;
}

/// A registered PSI trigger.
///
/// # Examples
/// ```no_run
/// use pagepool::pressure::PsiTrigger;
/// let trigger = PsiTrigger::register("/proc/pressure/memory".as_ref(), 100_000, 2_000_000)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct PsiTrigger {
    file: File,
    path: PathBuf,
}

impl PsiTrigger {
    /// Opens `path` and registers the trigger `some <stall_us> <window_us>` on it.
    pub fn register(path: &Path, stall_us: u64, window_us: u64) -> io::Result<PsiTrigger> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        // The kernel drops the last byte written: send the terminating NUL too, in one write.
        let line = format!("some {stall_us} {window_us}\0");
        let n = file.write(line.as_bytes())?;
        if n != line.len() {
            return Err(io::Error::other(format!(
                "short write of PSI trigger to {path:?}"
            )));
        }
        Ok(PsiTrigger {
            file,
            path: path.to_owned(),
        })
    }
}

impl PressureSource for PsiTrigger {
    fn describe(&self) -> String {
        format!("psi {}", self.path.display())
    }

    fn wait(&mut self, timeout: Duration, stop: BorrowedFd<'_>) -> io::Result<Wait> {
        let mut fds = [
            PollFd::new(&self.file, PollFlags::PRI),
            PollFd::from_borrowed_fd(stop, PollFlags::IN),
        ];
        let ts = rustix::event::Timespec::try_from(timeout).unwrap_or(rustix::event::Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => Ok(Wait::Timeout),
            Ok(_) => {
                if !fds[1].revents().is_empty() {
                    return Ok(Wait::Stopped);
                }
                let ev = fds[0].revents();
                if ev.intersects(PollFlags::ERR | PollFlags::NVAL | PollFlags::HUP) {
                    return Err(io::Error::other(format!(
                        "{:?}: source went away",
                        self.path
                    )));
                }
                Ok(if ev.contains(PollFlags::PRI) {
                    Wait::Signal
                } else {
                    Wait::Timeout
                })
            }
            Err(rustix::io::Errno::INTR) => Ok(Wait::Timeout),
            Err(e) => Err(e.into()),
        }
    }
}

/// A cgroup memory limit and the file that reports usage against it.
#[derive(Debug, Clone, PartialEq)]
pub struct Watermark {
    /// The file holding current usage in bytes (`memory.current` or `memory.usage_in_bytes`).
    pub usage: PathBuf,
    /// The limit in bytes.
    pub limit: u64,
    /// Usage above `limit * fraction` counts as pressure.
    pub fraction: f64,
}

impl Watermark {
    /// Reads usage and says whether it is above the watermark.
    pub fn over(&self) -> io::Result<bool> {
        let usage = read_u64(&self.usage)?;
        Ok(usage as f64 > self.limit as f64 * self.fraction)
    }
}

fn read_u64(path: &Path) -> io::Result<u64> {
    let mut s = String::new();
    File::open(path)?.read_to_string(&mut s)?;
    s.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path:?}: {e}")))
}

/// Where this process's cgroup files are: the v2 directory and the v1 memory directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupPaths {
    /// The process's cgroup v2 directory, if cgroup v2 is mounted.
    pub v2: Option<PathBuf>,
    /// The process's cgroup v1 memory-controller directory, if mounted.
    pub v1_memory: Option<PathBuf>,
}

impl CgroupPaths {
    /// Finds this process's cgroup directories from `/proc/self/cgroup` and
    /// `/proc/self/mountinfo`.
    pub fn detect() -> CgroupPaths {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        CgroupPaths::parse(&cgroup, &mountinfo)
    }

    /// [`detect`](Self::detect) on given file contents.
    pub fn parse(cgroup: &str, mountinfo: &str) -> CgroupPaths {
        // mountinfo: id parent major:minor root mountpoint options... - fstype source superopts
        let mounts: Vec<(&str, &str, &str, &str)> = mountinfo
            .lines()
            .filter_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                let f: Vec<&str> = pre.split(' ').collect();
                let p: Vec<&str> = post.split(' ').collect();
                Some((
                    *f.get(3)?,
                    *f.get(4)?,
                    *p.first()?,
                    *p.get(2).unwrap_or(&""),
                ))
            })
            .collect();
        let join = |root: &str, mnt: &str, path: &str| {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(path)
                .trim_start_matches('/');
            Path::new(mnt).join(rel)
        };
        let mut paths = CgroupPaths::default();
        for line in cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && ctrl.is_empty() {
                if let Some(&(root, mnt, _, _)) = mounts.iter().find(|m| m.2 == "cgroup2") {
                    paths.v2 = Some(join(root, mnt, path));
                }
            } else if ctrl.split(',').any(|c| c == "memory")
                && let Some(&(root, mnt, _, _)) = mounts
                    .iter()
                    .find(|m| m.2 == "cgroup" && m.3.split(',').any(|o| o == "memory"))
            {
                paths.v1_memory = Some(join(root, mnt, path));
            }
        }
        paths
    }

    /// The PSI file to use: the v2 cgroup's `memory.pressure` if it exists, else
    /// `/proc/pressure/memory`.
    pub fn psi_file(&self) -> PathBuf {
        self.v2
            .as_ref()
            .map(|d| d.join("memory.pressure"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("/proc/pressure/memory"))
    }

    /// The memory limit and usage file, if the cgroup has a limit (v2 `memory.max`, else v1
    /// `memory.limit_in_bytes`; v1's "unlimited" value, near 2^63, counts as none).
    pub fn watermark(&self, fraction: f64) -> Option<Watermark> {
        if let Some(d) = &self.v2
            && let Ok(max) = std::fs::read_to_string(d.join("memory.max"))
            && let Ok(limit) = max.trim().parse::<u64>()
        {
            return Some(Watermark {
                usage: d.join("memory.current"),
                limit,
                fraction,
            });
        }
        let d = self.v1_memory.as_ref()?;
        let limit = read_u64(&d.join("memory.limit_in_bytes")).ok()?;
        (limit < 1 << 62).then(|| Watermark {
            usage: d.join("memory.usage_in_bytes"),
            limit,
            fraction,
        })
    }
}

/// A running pressure monitor. Stopped when dropped.
pub struct PressureMonitor {
    stats: Arc<Mutex<PressureStats>>,
    wake: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The fork generation that started the thread (see [`crate::fork`]).
    generation: u64,
}

impl PressureMonitor {
    /// Starts a monitor for `target` (a [`Registry`](crate::registry::Registry), or any [`Shrinker`]) with the sources this machine offers: a PSI trigger
    /// (cgroup v2 `memory.pressure`, else `/proc/pressure/memory`) and a limit watermark.
    /// Failures degrade (PSI to the watermark alone) and are reported in
    /// [`stats`](Self::stats) and the log. Returns `None` when there is nothing to watch.
    pub fn start<S: Shrinker + 'static>(
        target: &Arc<S>,
        config: PressureConfig,
    ) -> Option<PressureMonitor> {
        let cg = CgroupPaths::detect();
        let mut errors = Vec::new();
        let source: Option<Box<dyn PressureSource>> = if config.psi {
            let path = cg.psi_file();
            match PsiTrigger::register(&path, config.stall_us, config.window_us) {
                Ok(t) => Some(Box::new(t)),
                Err(e) => {
                    let msg = format!("PSI trigger on {}: {e}", path.display());
                    log::warn!("pagepool: {msg}; using the limit watermark only");
                    errors.push(msg);
                    None
                }
            }
        } else {
            None
        };
        let watermark = config.watermark.and_then(|f| cg.watermark(f));
        if source.is_none() && watermark.is_none() {
            log::info!("pagepool: no memory pressure source here; monitor not started");
            return None;
        }
        PressureMonitor::spawn(target, source, watermark, config, errors).ok()
    }

    /// Starts a monitor on a given source and optional watermark (tests inject sources here).
    pub fn with_source<S: Shrinker + 'static>(
        target: &Arc<S>,
        source: Option<Box<dyn PressureSource>>,
        watermark: Option<Watermark>,
        config: PressureConfig,
    ) -> io::Result<PressureMonitor> {
        PressureMonitor::spawn(target, source, watermark, config, Vec::new())
    }

    fn spawn<S: Shrinker + 'static>(
        target: &Arc<S>,
        source: Option<Box<dyn PressureSource>>,
        watermark: Option<Watermark>,
        config: PressureConfig,
        errors: Vec<String>,
    ) -> io::Result<PressureMonitor> {
        let stats = Arc::new(Mutex::new(PressureStats {
            source: source.as_ref().map(|s| s.describe()),
            watermark: watermark
                .as_ref()
                .map(|w| format!("{} > {} x {}", w.usage.display(), w.limit, w.fraction)),
            errors,
            ..PressureStats::default()
        }));
        let (wake_rx, wake_tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let mut run = MonitorThread {
            target: {
                let target: Arc<dyn Shrinker> = target.clone();
                Arc::downgrade(&target)
            },
            source,
            watermark,
            config,
            stats: stats.clone(),
            stop: wake_rx,
        };
        let thread = std::thread::Builder::new()
            .name("pagepool-pressure".into())
            .spawn(move || run.main())?;
        Ok(PressureMonitor {
            stats,
            wake: Some(wake_tx),
            thread: Some(thread),
            generation: crate::fork::generation(),
        })
    }

    /// A snapshot of the monitor's state and recent events.
    pub fn stats(&self) -> PressureStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the monitor and waits for its thread (unless called from that thread).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.wake.take()); // the read end sees end-of-file: the thread stops
        if self.generation != crate::fork::generation() {
            // Inherited from the parent: the thread is not in this process.
            std::mem::forget(self.thread.take());
            return;
        }
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

impl Drop for PressureMonitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for PressureMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PressureMonitor")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The monitor thread's state.
struct MonitorThread {
    target: Weak<dyn Shrinker>,
    source: Option<Box<dyn PressureSource>>,
    watermark: Option<Watermark>,
    config: PressureConfig,
    stats: Arc<Mutex<PressureStats>>,
    stop: OwnedFd,
}

impl MonitorThread {
    fn main(&mut self) {
        loop {
            let signalled = match self.source.as_mut() {
                Some(src) => match src.wait(self.config.interval, self.stop.as_fd()) {
                    Ok(Wait::Stopped) => return,
                    Ok(Wait::Signal) => Some(src.describe()),
                    Ok(Wait::Timeout) => None,
                    Err(e) => {
                        let msg = format!("{}: {e}", src.describe());
                        log::warn!("pagepool: pressure source failed ({msg}); watermark only");
                        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                        st.errors.push(msg);
                        st.source = None;
                        self.source = None;
                        None
                    }
                },
                None => {
                    if self.sleep(self.config.interval) {
                        return;
                    }
                    None
                }
            };
            let signalled = signalled.or_else(|| match &self.watermark {
                Some(w) if w.over().unwrap_or(false) => Some("watermark".to_owned()),
                _ => None,
            });
            if let Some(what) = signalled {
                let Some(target) = self.target.upgrade() else {
                    return;
                };
                self.respond(&*target, what);
            } else if self.target.strong_count() == 0 {
                return;
            }
        }
    }

    /// Sleeps up to `d`; true if asked to stop.
    fn sleep(&self, d: Duration) -> bool {
        let mut fds = [PollFd::new(&self.stop, PollFlags::IN)];
        let ts = rustix::event::Timespec::try_from(d).unwrap_or(rustix::event::Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
    }

    fn respond(&self, target: &dyn Shrinker, source: String) {
        let t = Instant::now();
        let reclaimable = target.count();
        let nr = ((reclaimable as f64 * self.config.share).ceil() as usize).max(1);
        let released = target.scan(nr);
        let micros = t.elapsed().as_micros() as u64;
        log::info!(
            "pagepool: memory pressure ({source}): released {released} of {reclaimable} \
             reclaimable pages in {micros} us"
        );
        let event = PressureEvent {
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            source,
            pages_released: released,
            micros,
        };
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.events += 1;
        st.pages_released += released as u64;
        st.recent.push(event);
        if st.recent.len() > RECENT {
            st.recent.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_HYBRID: &str = "\
25 20 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
33 25 0:29 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
34 25 0:30 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu";

    #[test]
    fn parses_hybrid_cgroups() {
        let cg = CgroupPaths::parse(
            "4:memory:/jobs/a\n1:cpu:/\n0::/user.slice\n",
            MOUNTINFO_HYBRID,
        );
        assert_eq!(
            cg.v2,
            Some(PathBuf::from("/sys/fs/cgroup/unified/user.slice"))
        );
        assert_eq!(
            cg.v1_memory,
            Some(PathBuf::from("/sys/fs/cgroup/memory/jobs/a"))
        );
    }

    #[test]
    fn parses_pure_v2_with_a_namespaced_root() {
        let mi = "40 1 0:30 /ns /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        let cg = CgroupPaths::parse("0::/ns/app\n", mi);
        assert_eq!(cg.v2, Some(PathBuf::from("/sys/fs/cgroup/app")));
        assert_eq!(cg.v1_memory, None);
    }

    #[test]
    fn watermark_reads_limits() {
        let dir = std::env::temp_dir().join(format!("pagepool-wm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.max"), "1000\n").unwrap();
        std::fs::write(dir.join("memory.current"), "950\n").unwrap();
        let cg = CgroupPaths {
            v2: Some(dir.clone()),
            v1_memory: None,
        };
        let w = cg.watermark(0.9).unwrap();
        assert_eq!(w.limit, 1000);
        assert!(w.over().unwrap());
        std::fs::write(dir.join("memory.current"), "100\n").unwrap();
        assert!(!w.over().unwrap());
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        assert!(cg.watermark(0.9).is_none(), "no limit, no watermark");
        let v1 = CgroupPaths {
            v2: None,
            v1_memory: Some(dir.clone()),
        };
        std::fs::write(dir.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert!(v1.watermark(0.9).is_none(), "v1 'unlimited'");
        std::fs::write(dir.join("memory.limit_in_bytes"), "4096\n").unwrap();
        std::fs::write(dir.join("memory.usage_in_bytes"), "4000\n").unwrap();
        assert!(v1.watermark(0.9).unwrap().over().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_psi_file_is_an_error() {
        let e = PsiTrigger::register(Path::new("/nonexistent/memory.pressure"), 1, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
