//! The threads a run adds beside its own: a threads-mode row's team (threads kept for the whole
//! row, each pinned to a CPU, released together from a spinning start line), and the loaded
//! mode's load (busy threads in a process of their own).

use std::time::{Duration, Instant};

use crate::calls::{Rep, run_calls};
use crate::measure;
use crate::systems::{CallOpts, System};

/// What one repetition of a threads-mode row measured.
pub struct ThreadsRep {
    /// Every thread's calls, together (time in calls summed over the threads).
    pub rep: Rep,
    /// Wall time from the first thread's start to the last thread's end, in ns.
    pub wall_ns: u64,
}

/// What a team thread sends back for one repetition: its calls, when it started and ended
/// them, which thread it is, and the CPU time it spent at the start line (ns).
type TeamResult = Result<(Rep, Instant, Instant, std::thread::ThreadId, u64), String>;

/// Threads mode's threads for one system at one size, kept for the whole row: each thread's
/// state in the system (glibc's tcache and arena, mimalloc's and jemalloc's thread caches,
/// pagepool's thread cache) is warmed before the first repetition and stays warm, as in a
/// program whose threads live long, and no thread starts or exits inside a repetition.
pub struct Team {
    /// One per thread: a repetition's call count.
    go: Vec<std::sync::mpsc::Sender<usize>>,
    done: std::sync::mpsc::Receiver<TeamResult>,
}

/// The CPUs this process may run on (empty if that cannot be read).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed `cpu_set_t` is a valid empty set; the call writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Keeps the calling thread on `cpu` (best effort: a refusal leaves it where it may run).
pub fn pin_to(cpu: usize) {
    // SAFETY: a zeroed `cpu_set_t` is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` comes from `allowed_cpus`, below CPU_SETSIZE; pid 0 is this thread, and
    // the set is read only.
    unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Where a team's threads wait for each other before each repetition. They look in a loop,
/// yielding the CPU between looks (with more threads than cores, the late ones must run),
/// instead of sleeping: they leave it within a yield of each other. (Behind a sleeping
/// barrier, the wake-ups skewed the threads' starts by a large part of a 4 KiB repetition,
/// which the wall time from the first start counts: docs/BENCHMARKS.md, heap-bench.)
struct StartLine {
    arrived: std::sync::atomic::AtomicUsize,
    threads: usize,
    /// A thread of the team left for good (its system failed it, or it panicked): nobody
    /// waits for it any more.
    abandoned: std::sync::atomic::AtomicBool,
}

impl StartLine {
    fn new(threads: usize) -> StartLine {
        StartLine {
            arrived: std::sync::atomic::AtomicUsize::new(0),
            threads,
            abandoned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Waits for every thread's `round`-th arrival (`round` counts from 1). False if a thread
    /// of the team left for good: the caller leaves too.
    fn wait(&self, round: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.arrived.fetch_add(1, Ordering::AcqRel);
        while self.arrived.load(Ordering::Acquire) < round * self.threads {
            if self.abandoned.load(Ordering::Acquire) {
                return false;
            }
            std::hint::spin_loop();
            std::thread::yield_now();
        }
        true
    }
}

/// Held by each thread of a team: when the thread ends (the team is dropped, the main thread
/// went away, or the thread panicked), the others stop waiting for it at the start line.
struct Leaving<'a>(&'a StartLine);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        self.0
            .abandoned
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The CPU thread `i` of a team is kept on: the allowed CPUs in turn (none if unknown).
fn cpu_for(i: usize, cpus: &[usize]) -> Option<usize> {
    (!cpus.is_empty()).then(|| cpus[i % cpus.len()])
}

impl Team {
    /// Starts `threads` threads in `scope`, each waiting for a call count. Each is kept on one
    /// of the CPUs this process may use, in turn: left to the scheduler, the threads a
    /// repetition wakes sometimes shared one CPU for a whole row while the other idled (their
    /// calls took as long as ever, one thread's after the other's, and the row's rate
    /// halved: 12-25 million calls a second for one system at 4 KiB with two threads).
    pub fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        sys: &'scope System,
        size: usize,
        opts: CallOpts,
        threads: usize,
        switches: bool,
    ) -> Team {
        let start = std::sync::Arc::new(StartLine::new(threads));
        let (done_tx, done) = std::sync::mpsc::channel();
        let cpus = allowed_cpus();
        let go = (0..threads)
            .map(|i| {
                let (tx, rx) = std::sync::mpsc::channel::<usize>();
                let (start, done_tx) = (start.clone(), done_tx.clone());
                let cpu = cpu_for(i, &cpus);
                scope.spawn(move || {
                    let _leaving = Leaving(&start);
                    if let Some(cpu) = cpu {
                        pin_to(cpu);
                    }
                    // Until the team is dropped (its senders with it).
                    let mut round = 0;
                    while let Ok(n) = rx.recv() {
                        round += 1;
                        // The CPU time spent waiting at the start line, not in calls: the
                        // repetition's CPU time leaves it out.
                        let waiting = measure::thread_cpu_ns();
                        if !start.wait(round) {
                            break;
                        }
                        let waited = measure::thread_cpu_ns().saturating_sub(waiting);
                        let t0 = Instant::now();
                        let r = run_calls(sys, size, n, opts, Duration::ZERO, switches);
                        let id = std::thread::current().id();
                        if done_tx
                            .send(r.map(|r| (r, t0, Instant::now(), id, waited)))
                            .is_err()
                        {
                            break;
                        }
                    }
                });
                tx
            })
            .collect();
        Team { go, done }
    }

    /// Runs `n` tight calls on each of the team's threads at once. Each thread notes when it
    /// started and ended its calls: the wall time runs from the first start to the last end.
    /// (Timed from the main thread, it would start whenever the scheduler ran that thread
    /// again, possibly after the threads had done their calls: short loops at 4 KiB then
    /// showed absurd rates.) Also returns the threads that ran, in no particular order.
    pub fn run(&self, n: usize) -> Result<(ThreadsRep, Vec<std::thread::ThreadId>), String> {
        let cpu0 = measure::process_cpu_ns();
        for g in &self.go {
            g.send(n)
                .map_err(|_| "a thread of the team exited".to_string())?;
        }
        let threads = self.go.len();
        let mut all = Rep {
            ns: 0,
            per_call: Vec::with_capacity(n * threads),
            cpu_ns: 0,
            how: Vec::new(),
        };
        let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
        let mut ids = Vec::with_capacity(threads);
        let mut waited_cpu = 0u64;
        let mut failed = None;
        // Every thread's answer, even after a failure: the next repetition must not find a
        // stale one.
        for _ in 0..threads {
            let answer = self
                .done
                .recv()
                .map_err(|_| "a thread of the team panicked".to_string())?;
            match answer {
                Ok((r, t0, t1, id, waited)) => {
                    waited_cpu += waited;
                    all.ns += r.ns;
                    all.per_call.extend(r.per_call);
                    all.how.extend(r.how);
                    first = Some(first.map_or(t0, |f| f.min(t0)));
                    last = Some(last.map_or(t1, |l| l.max(t1)));
                    ids.push(id);
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // The whole process's CPU time (the heap's worker included), but for the threads'
        // waits at the start line.
        all.cpu_ns = measure::process_cpu_ns()
            .saturating_sub(cpu0)
            .saturating_sub(waited_cpu);
        let wall = match (first, last) {
            (Some(f), Some(l)) => l.duration_since(f),
            _ => Duration::ZERO,
        };
        Ok((
            ThreadsRep {
                rep: all,
                wall_ns: wall.as_nanos() as u64,
            },
            ids,
        ))
    }
}

/// The loaded mode's load: a child process spinning one thread per core at normal priority
/// (a process of its own, so that its CPU time stays out of this one's), until dropped.
pub struct BusyLoad(std::process::Child);

impl BusyLoad {
    pub fn start(threads: usize) -> Result<BusyLoad, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find heap-bench: {e}"))?;
        let child = std::process::Command::new(exe)
            .args(["--busy-child", &threads.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the busy load: {e}"))?;
        // Let its threads start spinning.
        std::thread::sleep(Duration::from_millis(50));
        Ok(BusyLoad(child))
    }
}

impl Drop for BusyLoad {
    fn drop(&mut self) {
        drop(self.0.stdin.take()); // its cue to stop
        let _ = self.0.wait();
    }
}

/// `--busy-child N`: spins N threads until standard input closes.
pub fn busy_child(threads: usize) -> ! {
    use std::sync::atomic::{AtomicBool, Ordering};
    static STOP: AtomicBool = AtomicBool::new(false);
    for _ in 0..threads.clamp(1, 1024) {
        std::thread::spawn(|| {
            while !STOP.load(Ordering::Relaxed) {
                measure::spin(Duration::from_millis(1));
            }
        });
    }
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    STOP.store(true, Ordering::Relaxed);
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc's calloc, writing a byte per page and checking buffers read zero.
    fn calloc() -> (System, CallOpts) {
        let opts = CallOpts {
            touch: true,
            verify: true,
        };
        (System::new("calloc").unwrap(), opts)
    }

    /// Threads pass the start line of a round only when every thread has reached it, round
    /// after round; when one leaves for good, the others stop waiting.
    #[test]
    fn the_start_line_holds_every_thread_until_all_arrive() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const T: usize = 3;
        let line = StartLine::new(T);
        let reached = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for k in 0..T {
                let (line, reached) = (&line, &reached);
                s.spawn(move || {
                    for round in 1..=3 {
                        // Threads arrive at different times.
                        std::thread::sleep(Duration::from_millis(20 * k as u64));
                        reached.fetch_add(1, Ordering::SeqCst);
                        assert!(line.wait(round));
                        assert!(reached.load(Ordering::SeqCst) >= round * T, "left early");
                    }
                });
            }
        });
        // One thread of two never comes: the other leaves once it is gone.
        let line = StartLine::new(2);
        std::thread::scope(|s| {
            s.spawn(|| drop(Leaving(&line)));
            assert!(!line.wait(1));
        });
    }

    /// Team threads are kept on the CPUs this process may use, in turn.
    #[test]
    fn team_threads_are_kept_on_the_allowed_cpus_in_turn() {
        assert_eq!(cpu_for(0, &[]), None);
        let cpus = [3, 5];
        let chosen: Vec<_> = (0..5).map(|i| cpu_for(i, &cpus)).collect();
        assert_eq!(chosen, [Some(3), Some(5), Some(3), Some(5), Some(3)]);
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let (sys, opts) = calloc();
        // Threads of this process allowed on one CPU only (other tests' teams may add some).
        let pinned = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
                .filter(|st| {
                    st.lines()
                        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                        .is_some_and(|l| l.trim().parse::<usize>().is_ok())
                })
                .count()
        };
        std::thread::scope(|scope| {
            let team = Team::start(scope, &sys, 4096, opts, cpus.len() + 1, false);
            team.run(3).unwrap();
            if cpus.len() > 1 {
                assert!(pinned() > cpus.len(), "{} pinned", pinned());
            }
        });
        // Pinning one thread: it then runs on that CPU only.
        std::thread::spawn(move || {
            pin_to(cpus[cpus.len() - 1]);
            assert_eq!(allowed_cpus(), [cpus[cpus.len() - 1]]);
        })
        .join()
        .unwrap();
    }

    /// A team's threads live for the whole row: every repetition runs on the same threads,
    /// each making its calls, and the wall time spans them.
    #[test]
    fn a_team_runs_every_repetition_on_the_same_threads() {
        let (sys, opts) = calloc();
        std::thread::scope(|scope| {
            let team = Team::start(scope, &sys, 64 << 10, opts, 3, true);
            let (first, mut before) = team.run(40).unwrap();
            assert_eq!(first.rep.per_call.len(), 120);
            // Every call timed alone, with what happened to its thread.
            assert_eq!(first.rep.how.len(), 120);
            before.sort_unstable_by_key(|id| format!("{id:?}"));
            before.dedup();
            assert_eq!(before.len(), 3, "three distinct threads");
            assert!(!before.contains(&std::thread::current().id()));
            for _ in 0..3 {
                let (rep, mut ids) = team.run(25).unwrap();
                assert_eq!(rep.rep.per_call.len(), 75);
                // Three threads' time in calls fits in three times the wall time (a wall
                // time started after the threads were done would not hold them).
                assert!(
                    rep.wall_ns > 0 && rep.rep.ns <= 3 * rep.wall_ns,
                    "{}",
                    rep.wall_ns
                );
                ids.sort_unstable_by_key(|id| format!("{id:?}"));
                assert_eq!(ids, before, "the same threads, warm");
            }
        });
    }

    /// A failing call fails the repetition with the call's error, and the team still answers
    /// the next one (no thread stuck at the start barrier).
    #[test]
    fn a_failed_repetition_is_an_error_and_the_team_goes_on() {
        let (sys, opts) = calloc();
        std::thread::scope(|scope| {
            // Larger than any allocation can be: every call fails.
            let bad = Team::start(scope, &sys, usize::MAX / 2, opts, 2, false);
            for _ in 0..2 {
                let e = bad.run(5).err().expect("every call fails");
                assert!(e.contains("calloc"), "{e}");
            }
        });
    }
}
