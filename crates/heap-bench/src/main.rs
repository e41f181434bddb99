//! `heap-bench`: the seed's `dmabuf_heap_bench` (allocate + free, many times, at 4 KiB, 1 MiB,
//! 8 MiB and 32 MiB), run against pagepool and the allocators a user would pick instead (with
//! their defaults, and tuned), side by side in one run. The protocol (described in
//! `docs/BENCHMARKS.md` with the figures it gave): four modes (`tight`: calls back to back;
//! `paced`: busy work between calls; `loaded`: paced while one busy thread per core runs at
//! normal priority; `threads-T`: T threads running the tight loop on one shared heap or
//! allocator), every system in interleaved order with a warm-up, the median of several
//! repetitions, peak resident memory of the pagepool rows, and the heap's own statistics at the
//! end. Two more modes run only when asked for: `attrs` (pagepool's pool types, locked, huge
//! and node 0, each beside the system calls a user would make instead, tight) and `random`
//! (random dependent reads over one large buffer: what huge pages buy, and over a small one:
//! when they do not).

// A binary: `pub` marks each module's interface to the others.
#![allow(unreachable_pub)]

mod measure;
mod random;
mod report;
mod systems;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::measure::{Bandwidth, TouchFloor};
use crate::report::{ModeReport, ReadRow, Report, Row, WorkerFigure};
use crate::systems::{CallOpts, System};

/// Benchmarks pagepool against calloc, mimalloc, jemalloc, mmap, memfd and the kernel's dma-buf
/// heap: allocate, write one byte per page, free; ns per call. Asked for (`--mode attrs`,
/// `--mode random`): pagepool's pool types against mmap with mlock, THP or mbind per call, and
/// random reads over huge and base pages.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Modes to run, comma separated: tight, paced, loaded, threads (one mode per `--threads`
    /// count); `both` is tight and paced. Not in the default run: `attrs`, pagepool's pool types
    /// beside what a user would do per call instead, tight (pagepool-locked vs mmap-mlock:
    /// mmap + mlock + munmap; pagepool-huge vs mmap-thp: mmap 2 MiB-aligned + MADV_HUGEPAGE +
    /// MADV_POPULATE_WRITE + munmap; pagepool-node0 vs mmap-mbind: mmap + mbind(MPOL_BIND,
    /// node 0) + MADV_POPULATE_WRITE + munmap; at `--sizes`); and `random`, random dependent
    /// 8-byte reads (a pointer chase through every 64-byte line in random order) over one buffer
    /// of `--random-bytes` and one of `--random-small`, for a pagepool buffer (4 KiB pages), a
    /// pagepool huge buffer, an anonymous mmap with MADV_HUGEPAGE and one without: ns per read,
    /// and the huge pages each got.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tight,paced,loaded,threads",
        value_parser = ["tight", "paced", "loaded", "threads", "both", "attrs", "random"]
    )]
    mode: Vec<String>,
    /// Threads mode: how many threads share the heap or allocator, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    threads: Vec<usize>,
    /// Buffer sizes (bytes; K, M, G suffixes allowed), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "4K,1M,8M,32M", value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Systems to run, comma separated (default: all); the attrs mode's rows are named here
    /// too (pagepool-locked, mmap-mlock, pagepool-huge, mmap-thp, pagepool-node0, mmap-mbind).
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Calls per repetition for every row, per thread in threads mode (default: as many as fit
    /// the row's budget by the mean of 20 ms of warmed calls, at least 200 and at most the
    /// seed's 5000, per thread in threads mode). Random mode: reads per repetition (default: as
    /// many as fit the row's budget, at least 20 ms of reads).
    #[arg(long)]
    iters: Option<usize>,
    /// Repetitions per row (default: 9 at sizes under 64 KiB, 2 above, for every system alike;
    /// random mode 5); the median is reported (of two, the slower). Without `--iters`, a row
    /// whose fewest calls (200) take more than its budget runs one repetition.
    #[arg(long)]
    reps: Option<usize>,
    /// Time budget per row in milliseconds (time in calls, all repetitions; paced work between
    /// calls comes on top), used to choose the call count.
    #[arg(long, default_value_t = 400)]
    budget_ms: u64,
    /// Paced mode: microseconds of work between calls (default: twice the time to memset the
    /// size once on one core).
    #[arg(long)]
    work_us: Option<f64>,
    /// Allocate and release only, as the seed does (no write per page).
    #[arg(long)]
    no_touch: bool,
    /// Check that every buffer reads all-zero before it is written (slow: a correctness run).
    #[arg(long)]
    verify: bool,
    /// Random mode: the large buffer's size (bytes; K, M, G suffixes allowed; rounded up to
    /// 2 MiB). Four buffers of it are held at once: they must fit in available memory.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    random_bytes: usize,
    /// Random mode: the small buffer's size, whose reads huge pages should not speed up much
    /// (its page tables stay in the caches).
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    random_small: usize,
    /// Write every figure to this JSON file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Draw the summary as an SVG chart to this file.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    no_progress: bool,
    /// Internal: this process runs the tuned peers' rows for its parent.
    #[arg(long, hide = true)]
    child_tuned: bool,
    /// Internal: the paced work per size, as SIZE=NS, from the parent.
    #[arg(long, hide = true, value_delimiter = ',')]
    work_ns: Vec<String>,
    /// Internal: spin this many threads at normal priority until standard input closes (the
    /// loaded mode's load).
    #[arg(long, hide = true)]
    busy_child: Option<usize>,
}

impl Args {
    /// Repetitions per row of the modes of calls.
    fn reps(&self) -> usize {
        self.reps.unwrap_or(2)
    }

    /// Repetitions per row of the random mode.
    fn random_reps(&self) -> usize {
        self.reps.unwrap_or(5)
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: usize = num.parse().map_err(|e| format!("bad size {s:?}: {e}"))?;
    match n.checked_mul(mul) {
        Some(0) | None => Err(format!(
            "bad size {s:?}: must be between 1 byte and the address space"
        )),
        Some(v) => Ok(v),
    }
}

/// The warmed calls, in time spent in calls, whose mean sets a row's call count.
const CALIBRATE: Duration = Duration::from_millis(20);
/// The most calls calibration makes (tiny calls add up to `CALIBRATE` slowly).
const CALIBRATE_MAX: usize = 20_000;
/// The fewest calls a repetition of a row times.
const MIN_CALLS: usize = 200;
/// Repetitions of a row at a size under [`BATCHED_BELOW`] by default.
const SMALL_REPS: usize = 9;

/// How many repetitions every row of a size makes by default: two, or [`SMALL_REPS`] at the
/// sizes whose calls are timed in batches (under [`BATCHED_BELOW`]). There a repetition of the
/// seed's 5000 calls lasts ~0.3 ms at 4 KiB, and one slow moment of the machine decided the
/// slower of two; the median of nine is steadier. The same for every system of the size, in
/// this process and in the tuned peers' child, whatever its speed.
fn reps_for_size(size: usize) -> usize {
    if size < BATCHED_BELOW { SMALL_REPS } else { 2 }
}

/// A row's repetitions: `planned` (every row's at its size), but one for a row whose fewest
/// calls take more than its whole budget, when `--iters` does not force the count (a slow
/// row, e.g. fresh pages at 32 MiB, would otherwise take most of the run's time). `est_ns` is
/// the calibrated time of one call.
fn row_reps(est_ns: f64, planned: usize, budget_ms: u64, iters_forced: bool) -> usize {
    if !iters_forced && est_ns * MIN_CALLS as f64 > budget_ms as f64 * 1e6 {
        1
    } else {
        planned
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The fastest measured row at `size` among `rows`: its system and ns per call.
fn fastest_row(rows: &[Row], size: usize) -> Option<(String, f64)> {
    rows.iter()
        .filter(|r| r.size == size && r.absent.is_none() && r.ns_per_call > 0.0)
        .min_by(|a, b| a.ns_per_call.total_cmp(&b.ns_per_call))
        .map(|r| (r.system.clone(), r.ns_per_call))
}

/// Where the fastest row at `size` beats a bound read once at the start (the zeroing limit, the
/// touch floor; `ns` gives it in ns per call), reads the bound again with `again` (which keeps
/// each reading's best), up to twice: a bound read at a noisy moment is one rows can beat.
/// Returns the fastest row if it still beats the bound.
fn recheck_bound<T>(
    rows: &[Row],
    size: usize,
    bound: &mut T,
    ns: impl Fn(&T) -> f64,
    mut again: impl FnMut(&mut T),
) -> Option<(String, f64)> {
    for _ in 0..2 {
        match fastest_row(rows, size) {
            Some((_, fastest)) if fastest < ns(bound) => again(bound),
            _ => break,
        }
    }
    fastest_row(rows, size).filter(|f| f.1 < ns(bound))
}

/// What one repetition of a row measured.
struct Rep {
    /// Time spent in the calls (excluding paced work), in ns.
    ns: u64,
    /// Per-call times, in ns: every call's, or, where calls are too short to time one by one
    /// (`BATCHED_BELOW`), each batch of `BATCH` calls' mean, once per call of the batch.
    per_call: Vec<u64>,
    /// CPU time of the whole process (all threads, user + system) over the repetition, in ns.
    cpu_ns: u64,
}

/// Sizes below which tight calls are timed in batches: a clock read (~20 ns) would weigh on a
/// call of tens of ns.
const BATCHED_BELOW: usize = 64 << 10;
/// Calls per timed batch there.
const BATCH: usize = 50;

/// Runs `n` calls.
fn run_calls(
    sys: &System,
    size: usize,
    n: usize,
    opts: CallOpts,
    work: Duration,
) -> Result<Rep, String> {
    let cpu0 = measure::process_cpu_ns();
    let mut per_call = Vec::with_capacity(n);
    let mut total = 0u64;
    if work.is_zero() && size < BATCHED_BELOW {
        let mut left = n;
        while left > 0 {
            let k = left.min(BATCH);
            let t = Instant::now();
            for _ in 0..k {
                sys.call(size, opts)?;
            }
            let ns = t.elapsed().as_nanos() as u64;
            total += ns;
            per_call.extend(std::iter::repeat_n(ns / k as u64, k));
            left -= k;
        }
    } else {
        for _ in 0..n {
            let t = Instant::now();
            sys.call(size, opts)?;
            let ns = t.elapsed().as_nanos() as u64;
            total += ns;
            per_call.push(ns);
            if !work.is_zero() {
                measure::spin(work);
            }
        }
    }
    Ok(Rep {
        ns: total,
        per_call,
        cpu_ns: measure::process_cpu_ns().saturating_sub(cpu0),
    })
}

/// What a size's rows share, in every mode of calls.
struct SizePlan<'a> {
    mode: &'a str,
    size: usize,
    opts: CallOpts,
    /// Work between calls (zero but in the paced and loaded modes).
    work: Duration,
    /// Threads mode: how many threads share each system.
    threads: Option<usize>,
    /// Resident set size before the size's first call, pools empty.
    rss_start: u64,
}

/// Measures every system of `present` at one size, by the benchmark's rules: each warmed up and
/// calibrated, then the repetitions in interleaved order, rotated each repetition. One row per
/// system, in `present`'s order, without settings. With `absent_on_failure`, a system whose
/// warm-up fails (e.g. `mlock` past `RLIMIT_MEMLOCK`) gets an absent row saying why, instead of
/// failing the run.
fn measure_size(
    args: &Args,
    plan: &SizePlan<'_>,
    present: &[&System],
    bar: &indicatif::ProgressBar,
    absent_on_failure: bool,
) -> Result<Vec<Row>, String> {
    let SizePlan {
        mode,
        size,
        opts,
        work,
        threads,
        rss_start,
    } = *plan;
    // What the progress bar counted for each row, and what every row of this size makes.
    let bar_reps = args.reps();
    let planned = args.reps.unwrap_or_else(|| reps_for_size(size));
    // Warm up and calibrate each system: three calls untimed (a first call may map a fresh
    // segment), then calls timed until they add up to CALIBRATE (or CALIBRATE_MAX calls): the
    // estimate of a call's cost that sets the row's count.
    let mut est = Vec::new();
    let mut failed: Vec<Option<String>> = vec![None; present.len()];
    for (i, sys) in present.iter().enumerate() {
        bar.set_message(format!("{mode} {size} {} warm-up", sys.name));
        let fail = |e: String| format!("{} at {size}: {e}", sys.name);
        let warmed = run_calls(sys, size, 3, opts, work).and_then(|_| {
            let (mut ns, mut calls) = (0u64, 0usize);
            while ns < CALIBRATE.as_nanos() as u64 && calls < CALIBRATE_MAX {
                ns += run_calls(sys, size, 1, opts, work)?.ns;
                calls += 1;
            }
            Ok(ns as f64 / calls as f64)
        });
        match warmed {
            Ok(e) => est.push(e),
            Err(e) if absent_on_failure => {
                failed[i] = Some(e);
                est.push(f64::NAN);
                bar.inc(bar_reps as u64);
            }
            Err(e) => return Err(fail(e)),
        }
        bar.inc(1);
    }
    // Within the row's budget, but never fewer than MIN_CALLS a repetition (a slow row takes
    // longer than its budget then), nor more than the seed's 5000. With several threads, each
    // runs the seed's loop: up to 5000 calls per thread, as many as fit the budget counting
    // the threads' calls as if made one after another, and together at least MIN_CALLS. (A
    // thread's share of 5000 was 1,250 calls of ~60 ns at 4 KiB with four threads: 75 us,
    // the order of one wake-up of a thread, and the rates of one system ranged 30-fold.)
    let t = threads.unwrap_or(1);
    let counts: Vec<usize> = est
        .iter()
        .map(|e| {
            args.iters.unwrap_or_else(|| {
                let per_rep = args.budget_ms as f64 * 1e6 / planned as f64;
                ((per_rep / e / t as f64) as usize).clamp(MIN_CALLS.div_ceil(t), 5000)
            })
        })
        .collect();
    let reps: Vec<usize> = est
        .iter()
        .map(|&e| row_reps(e, planned, args.budget_ms, args.iters.is_some()))
        .collect();
    // The bar counted `bar_reps` repetitions a row: make it count these.
    let (counted, made) = (
        (bar_reps * present.len()) as u64,
        reps.iter()
            .zip(&failed)
            .map(|(&r, f)| if f.is_none() { r } else { bar_reps })
            .sum::<usize>() as u64,
    );
    if made > counted {
        bar.inc_length(made - counted);
    } else {
        bar.inc(counted - made);
    }
    let mut totals: Vec<Vec<u64>> = vec![Vec::new(); present.len()];
    let mut walls: Vec<Vec<u64>> = vec![Vec::new(); present.len()];
    let mut cpus: Vec<Vec<u64>> = vec![Vec::new(); present.len()];
    let mut calls: Vec<Vec<u64>> = vec![Vec::new(); present.len()];
    let mut peaks: Vec<Option<(u64, u64)>> = vec![None; present.len()];
    std::thread::scope(|scope| -> Result<(), String> {
        // Threads mode: each system's team, warmed by a quarter of a repetition's calls per thread
        // (at least three) before the first timed one.
        let mut teams: Vec<Option<Team>> = Vec::new();
        for (i, sys) in present.iter().enumerate() {
            let team = match threads {
                Some(t) if failed[i].is_none() => {
                    bar.set_message(format!("{mode} {size} {} threads warm-up", sys.name));
                    let team = Team::start(scope, sys, size, opts, t);
                    team.run(counts[i].div_ceil(4).max(3))
                        .map_err(|e| format!("{} at {size}: {e}", sys.name))?;
                    Some(team)
                }
                _ => None,
            };
            teams.push(team);
        }
        for rep in 0..planned {
            for k in 0..present.len() {
                let i = (k + rep) % present.len(); // interleaved, rotated each repetition
                if rep >= reps[i] || failed[i].is_some() {
                    continue;
                }
                let sys = present[i];
                bar.set_message(format!("{mode} {size} {} rep {}", sys.name, rep + 1));
                let tracked = sys.heap().is_some() && measure::reset_peak_rss();
                let fail = |e: String| format!("{} at {size}: {e}", sys.name);
                let (rep, wall) = match &teams[i] {
                    Some(team) => {
                        let (r, _) = team.run(counts[i]).map_err(fail)?;
                        (r.rep, Some(r.wall_ns))
                    }
                    None => (
                        run_calls(sys, size, counts[i], opts, work).map_err(fail)?,
                        None,
                    ),
                };
                cpus[i].push(rep.cpu_ns);
                calls[i].extend(rep.per_call);
                if tracked {
                    let (hwm, _) = measure::rss();
                    let p = peaks[i].get_or_insert((rss_start, 0));
                    p.1 = p.1.max(hwm);
                }
                totals[i].push(rep.ns);
                walls[i].extend(wall);
                bar.inc(1);
            }
        }
        Ok(())
    })?;
    let mut rows = Vec::new();
    for (i, sys) in present.iter().enumerate() {
        if let Some(why) = failed[i].take() {
            rows.push(Row::absent(mode, sys.name, size, why));
            continue;
        }
        let n = counts[i] * t;
        let total = median(&mut totals[i].clone());
        let per_call = &mut calls[i];
        per_call.sort_unstable();
        rows.push(Row {
            mode: mode.to_string(),
            system: sys.name.to_string(),
            size,
            iters: n,
            reps_ns: totals[i].clone(),
            total_ns: total,
            ns_per_call: total as f64 / n as f64,
            p50_ns: quantile(per_call, 0.50),
            p99_ns: quantile(per_call, 0.99),
            max_ns: per_call.last().copied().unwrap_or(0),
            cpu_ns_per_call: median(&mut cpus[i].clone()) as f64 / n as f64,
            threads,
            calls_per_sec: (!walls[i].is_empty())
                .then(|| n as f64 * 1e9 / median(&mut walls[i].clone()).max(1) as f64),
            settings: None,
            absent: None,
            rss_before: peaks[i].map(|p| p.0),
            peak_rss: peaks[i].map(|p| p.1),
        });
    }
    Ok(rows)
}

/// What one repetition of a threads-mode row measured.
struct ThreadsRep {
    /// Every thread's calls, together (time in calls summed over the threads).
    rep: Rep,
    /// Wall time from the first thread's start to the last thread's end, in ns.
    wall_ns: u64,
}

/// What a team thread sends back for one repetition: its calls, when it started and ended
/// them, which thread it is, and the CPU time it spent at the start line (ns).
type TeamResult = Result<(Rep, Instant, Instant, std::thread::ThreadId, u64), String>;

/// Threads mode's threads for one system at one size, kept for the whole row: each thread's
/// state in the system (glibc's tcache and arena, mimalloc's and jemalloc's thread caches,
/// pagepool's thread cache) is warmed before the first repetition and stays warm, as in a
/// program whose threads live long, and no thread starts or exits inside a repetition.
struct Team {
    /// One per thread: a repetition's call count.
    go: Vec<std::sync::mpsc::Sender<usize>>,
    done: std::sync::mpsc::Receiver<TeamResult>,
}

/// The CPUs this process may run on (empty if that cannot be read).
fn allowed_cpus() -> Vec<usize> {
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
fn pin_to(cpu: usize) {
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
/// barrier, the wake-ups skewed the threads' starts by tens of microseconds, a large part of a
/// 4 KiB repetition of ~0.3 ms, which the wall time from the first start counts.)
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
    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        sys: &'scope System,
        size: usize,
        opts: CallOpts,
        threads: usize,
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
                        let r = run_calls(sys, size, n, opts, Duration::ZERO);
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
    fn run(&self, n: usize) -> Result<(ThreadsRep, Vec<std::thread::ThreadId>), String> {
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
struct BusyLoad(std::process::Child);

impl BusyLoad {
    fn start(threads: usize) -> Result<BusyLoad, String> {
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
fn busy_child(threads: usize) -> ! {
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

/// The value at fraction `q` of sorted `v` (0 when empty).
fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let args = Args::parse();
    if let Some(n) = args.busy_child {
        busy_child(n);
    }
    if let Err(e) = run(args) {
        eprintln!("heap-bench: {e}");
        std::process::exit(1);
    }
}

/// The modes a run's arguments name, in order: `both` is tight and paced, `threads` one mode per
/// thread count.
fn expand_modes(args: &Args) -> Result<Vec<String>, String> {
    let mut modes: Vec<String> = Vec::new();
    for m in &args.mode {
        match m.as_str() {
            "both" => modes.extend(["tight".into(), "paced".into()]),
            "threads" => {
                for &t in &args.threads {
                    if !(1..=256).contains(&t) {
                        return Err(format!("--threads {t}: between 1 and 256"));
                    }
                    modes.push(format!("threads-{t}"));
                }
            }
            m => modes.push(m.into()),
        }
    }
    let mut seen = std::collections::HashSet::new();
    modes.retain(|m| seen.insert(m.clone()));
    Ok(modes)
}

/// The tuned peers' rows, run by a child process whose allocators are configured (their
/// settings are process-wide, and mimalloc's and jemalloc's are read when a process starts),
/// with the same modes, sizes and paced work as this run.
fn run_tuned_child(
    args: &Args,
    tuned: &[&str],
    works: &[(usize, Duration)],
) -> Result<Vec<ChildMode>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find heap-bench: {e}"))?;
    let json = std::env::temp_dir().join(format!("heap-bench-tuned-{}.json", std::process::id()));
    let mut cmd = std::process::Command::new(exe);
    let list = |v: Vec<String>| v.join(",");
    // The modes of calls whose rows the child runs (not attrs, not random).
    let modes: Vec<&str> = args
        .mode
        .iter()
        .map(String::as_str)
        .filter(|m| !matches!(*m, "attrs" | "random"))
        .collect();
    cmd.arg("--child-tuned")
        .args(["--mode", &modes.join(",")])
        .args([
            "--threads",
            &list(args.threads.iter().map(usize::to_string).collect()),
        ])
        .args([
            "--sizes",
            &list(args.sizes.iter().map(usize::to_string).collect()),
        ])
        .args(["--systems", &tuned.join(",")])
        .args(["--budget-ms", &args.budget_ms.to_string()])
        .args([
            "--work-ns",
            &list(
                works
                    .iter()
                    .map(|(s, w)| format!("{s}={}", w.as_nanos()))
                    .collect(),
            ),
        ])
        .arg("--no-progress")
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .envs(systems::tuned_env());
    if let Some(n) = args.iters {
        cmd.args(["--iters", &n.to_string()]);
    }
    // Only if asked: by default the child chooses each row's repetitions as this run does.
    if let Some(n) = args.reps {
        cmd.args(["--reps", &n.to_string()]);
    }
    if args.no_touch {
        cmd.arg("--no-touch");
    }
    if args.verify {
        cmd.arg("--verify");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run the tuned peers: {e}"))?;
    let text = std::fs::read_to_string(&json);
    let _ = std::fs::remove_file(&json);
    if !status.success() {
        return Err(format!("the tuned peers' run failed: {status}"));
    }
    let text = text.map_err(|e| format!("the tuned peers' figures: {e}"))?;
    let report: ChildReport =
        serde_json::from_str(&text).map_err(|e| format!("the tuned peers' figures: {e}"))?;
    Ok(report.modes)
}

/// What this run reads back from the tuned peers' child.
#[derive(serde::Deserialize)]
struct ChildReport {
    modes: Vec<ChildMode>,
}

/// One mode's rows from the tuned peers' child.
#[derive(serde::Deserialize)]
struct ChildMode {
    mode: String,
    rows: Vec<Row>,
}

fn run(args: Args) -> Result<(), String> {
    if args.reps == Some(0) {
        return Err("--reps must be at least 1".into());
    }
    if args.iters == Some(0) {
        return Err("--iters must be at least 1".into());
    }
    let modes = expand_modes(&args)?;
    // The modes of calls of the default run, then attrs and random, which run after them.
    let call_modes: Vec<String> = modes
        .iter()
        .filter(|m| !matches!(m.as_str(), "attrs" | "random"))
        .cloned()
        .collect();
    let attrs = modes.iter().any(|m| m == "attrs");
    let random = modes.iter().any(|m| m == "random");
    for s in &args.systems {
        if !systems::ALL.contains(&s.as_str()) && !systems::ATTRS.contains(&s.as_str()) {
            return Err(format!(
                "unknown system {s:?}; known: {}; attrs mode: {}",
                systems::ALL.join(", "),
                systems::ATTRS.join(", ")
            ));
        }
    }
    let chosen = |all: &[&'static str]| -> Vec<&'static str> {
        all.iter()
            .copied()
            .filter(|n| args.systems.is_empty() || args.systems.iter().any(|s| s == n))
            .collect()
    };
    let names: Vec<&'static str> = if call_modes.is_empty() {
        Vec::new()
    } else {
        chosen(&systems::ALL)
    };
    if !call_modes.is_empty() && names.is_empty() {
        return Err(format!(
            "--systems names none of the systems of mode {} (known: {})",
            call_modes.join(", "),
            systems::ALL.join(", ")
        ));
    }
    let attrs_names: Vec<&'static str> = if attrs {
        chosen(&systems::ATTRS)
    } else {
        Vec::new()
    };
    if attrs && attrs_names.is_empty() {
        return Err(format!(
            "--systems names none of the attrs mode's rows ({})",
            systems::ATTRS.join(", ")
        ));
    }
    // The random mode's buffers, smallest first; all four of a size are held at once.
    let mut random_sizes: Vec<usize> = Vec::new();
    if random {
        for (flag, bytes) in [
            ("--random-small", args.random_small),
            ("--random-bytes", args.random_bytes),
        ] {
            random_sizes.push(random::buffer_len(bytes).ok_or_else(|| {
                format!(
                    "{flag} {bytes}: at most {}",
                    measure::bytes(random::MAX_BYTES as u64)
                )
            })?);
        }
        random_sizes.sort_unstable();
        random_sizes.dedup();
        let largest = *random_sizes.last().unwrap_or(&0);
        let need = random::memory_needed(largest);
        if let Some(avail) = measure::mem_available()
            && need + (256 << 20) > avail
        {
            return Err(format!(
                "--random-bytes {}: the random mode holds four buffers of {} at once ({} in \
                 all, with its chain), more than this machine's available memory ({} with \
                 256 MiB to spare); choose a smaller --random-bytes",
                args.random_bytes,
                measure::bytes(largest as u64),
                measure::bytes(need),
                measure::bytes(avail)
            ));
        }
    }
    // Every row holds at least one buffer of each size at once (threads mode one per thread,
    // pools and queues a few more): a size that cannot fit is refused here, clearly, rather
    // than by an allocation failure that aborts the process mid-run.
    if let (Some(&largest), Some(avail)) = (args.sizes.iter().max(), measure::mem_available()) {
        let threads = args.threads.iter().copied().max().unwrap_or(1).max(1);
        let need = (largest as u64).saturating_mul(4 + threads as u64);
        if need > avail {
            return Err(format!(
                "--sizes: a buffer of {} needs about {} at once (4 + threads buffers), more \
                 than this machine's available memory ({}); choose smaller sizes",
                measure::bytes(largest as u64),
                measure::bytes(need),
                measure::bytes(avail)
            ));
        }
    }
    // The tuned peers run in a child process, unless this is it.
    let (tuned, local): (Vec<&'static str>, Vec<&'static str>) = if args.child_tuned {
        (Vec::new(), names.clone())
    } else {
        names.iter().partition(|n| systems::TUNED.contains(n))
    };
    let settings: Vec<(&'static str, String)> = if args.child_tuned {
        systems::tune_this_process()
    } else {
        Vec::new()
    };
    let systems: Vec<System> = local
        .iter()
        .map(|n| System::new(n))
        .collect::<Result<_, _>>()?;
    let opts = CallOpts {
        touch: !args.no_touch,
        verify: args.verify,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    if !call_modes.is_empty() || attrs {
        println!(
            "heap-bench: {cores} cores, modes {}, sizes {:?}, {} repetitions, touch {}, verify {}",
            modes.join(", "),
            args.sizes,
            match args.reps {
                Some(n) => n.to_string(),
                None => format!("{SMALL_REPS} under 64 KiB, else 2"),
            },
            opts.touch,
            opts.verify
        );
    }
    if random {
        println!(
            "heap-bench: {cores} cores, {}random mode buffers {:?}, {} repetitions",
            if call_modes.is_empty() && !attrs {
                format!("modes {}, ", modes.join(", "))
            } else {
                String::new()
            },
            random_sizes,
            args.random_reps()
        );
    }
    // The machine's zeroing bandwidth, on resident memory (briefly in the tuned peers' child:
    // its parent's figures are the run's); the modes of calls' limit and paced work.
    // Three rounds, each method's best kept: one reading at a noisy moment would be a limit
    // that rows can beat.
    let (bw_time, bw_rounds) = if args.child_tuned {
        (Duration::from_millis(10), 1)
    } else {
        (Duration::from_millis(50), 3)
    };
    let mut bw: Vec<(usize, Bandwidth)> = args
        .sizes
        .iter()
        .filter(|_| !call_modes.is_empty())
        .map(|&s| (s, measure::bandwidth(s, bw_time, bw_rounds)))
        .collect();
    for (s, b) in bw.iter().filter(|_| !args.child_tuned) {
        let each: Vec<String> = b
            .methods
            .iter()
            .map(|m| format!("{} {:.1} / {:.1}", m.method, m.single / 1e9, m.all / 1e9))
            .collect();
        println!(
            "zeroing {s} bytes, GB/s one thread / all threads: {}; best: {} one thread, {} all threads; zeroing limit {:.0} ns/call",
            each.join(", "),
            b.single_method,
            b.all_method,
            b.limit_ns(*s)
        );
    }
    // The paced and loaded modes' work between calls: twice a one-thread memset of the size
    // (or --work-us; or the parent's figure, in the tuned peers' child).
    let given: Vec<(usize, u64)> = args
        .work_ns
        .iter()
        .filter_map(|w| {
            let (s, n) = w.split_once('=')?;
            Some((s.parse().ok()?, n.parse().ok()?))
        })
        .collect();
    let works: Vec<(usize, Duration)> = bw
        .iter()
        .map(|(size, b)| {
            let w = match given.iter().find(|g| g.0 == *size) {
                Some(&(_, ns)) => Duration::from_nanos(ns),
                None => {
                    let us = args
                        .work_us
                        .unwrap_or(2.0 * *size as f64 / b.memset_single() * 1e6);
                    Duration::from_nanos((us * 1000.0) as u64)
                }
            };
            (*size, w)
        })
        .collect();
    let paced_work = |size: usize| {
        works
            .iter()
            .find(|w| w.0 == size)
            .map_or(Duration::ZERO, |w| w.1)
    };
    // What the touch alone costs, where memory is already zeroed (on this core or the other),
    // after the paced mode's work between calls.
    let mut floors: Vec<(usize, TouchFloor)> = if opts.touch && !args.child_tuned {
        bw.iter()
            .map(|(s, _)| {
                (
                    *s,
                    measure::touch_floor(*s, Duration::from_millis(100), paced_work(*s)),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    for (s, f) in &floors {
        println!(
            "touch {s} bytes (one byte per page) of zeroed memory: {:.0} ns after this thread zeroed it, \
             {:.0} ns after another thread did, {:.0} ns after another thread did with streaming stores",
            f.own_ns, f.other_ns, f.other_streaming_ns
        );
    }
    // The tuned peers first, in their own process; their rows join this run's tables.
    let mut child_modes = if tuned.is_empty() {
        Vec::new()
    } else {
        println!(
            "tuned peers ({}): running in a child process, same modes, sizes and work",
            tuned.join(", ")
        );
        let t = Instant::now();
        let modes = run_tuned_child(&args, &tuned, &works)?;
        println!("tuned peers: {:.1} s", t.elapsed().as_secs_f64());
        modes
    };
    for (name, how) in child_modes
        .iter()
        .flat_map(|m| m.rows.iter())
        .filter_map(|r| Some((r.system.clone(), r.settings.clone()?)))
        .collect::<std::collections::BTreeMap<_, _>>()
    {
        println!("  {name}: {how}");
    }
    // Which systems a mode runs: all of them, but for the modes other than tight in a run
    // without --systems, the general-purpose ones only (see `systems::in_every_mode`).
    let runs_in = |mode: &str, name: &str| {
        !args.systems.is_empty() || mode == "tight" || systems::in_every_mode(name)
    };
    let all_present: Vec<&System> = systems.iter().filter(|s| s.absent.is_none()).collect();
    let rows_total: u64 = call_modes
        .iter()
        .map(|m| {
            let n = all_present.iter().filter(|s| runs_in(m, s.name)).count();
            (args.sizes.len() * n * (args.reps() + 1)) as u64
        })
        .sum::<u64>()
        + (args.sizes.len() * attrs_names.len() * (args.reps() + 1)) as u64
        + (random_sizes.len() * random::ROWS.len() * (args.random_reps() + 1)) as u64;
    let bar = if std::io::stderr().is_terminal() && !args.no_progress {
        indicatif::ProgressBar::new(rows_total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut report = Report::new(&args.sizes, &bw, &floors, opts);
    for mode in &call_modes {
        println!("== mode: {mode} ==");
        let mode_started = Instant::now();
        let mode = mode.as_str();
        let threads: Option<usize> = mode.strip_prefix("threads-").and_then(|t| t.parse().ok());
        let with_work = mode == "paced" || mode == "loaded";
        let mut mr = ModeReport::new(mode);
        let present: Vec<&System> = all_present
            .iter()
            .copied()
            .filter(|s| runs_in(mode, s.name))
            .collect();
        // The loaded mode's load runs for all its rows.
        let _load = if mode == "loaded" {
            println!("load: {cores} busy threads at normal priority, in a process of their own");
            Some(BusyLoad::start(cores)?)
        } else {
            None
        };
        let mut child = child_modes
            .iter_mut()
            .find(|m| m.mode == mode)
            .map(|m| std::mem::take(&mut m.rows))
            .unwrap_or_default();
        for (si, &size) in args.sizes.iter().enumerate() {
            let b = bw[si].1;
            let work = if with_work {
                paced_work(size)
            } else {
                Duration::ZERO
            };
            if with_work {
                println!(
                    "work between calls at {size} bytes: {:.1} us",
                    work.as_secs_f64() * 1e6
                );
            }
            mr.work_ns.push((size, work.as_nanos() as u64));
            // Pools were trimmed after the previous size: this is the size's baseline.
            let rss_start = measure::rss().1;
            let pagepool_heap = systems
                .first()
                .filter(|s| s.name == "pagepool")
                .and_then(System::heap);
            let before = pagepool_heap.map(|h| h.stats());
            let plan = SizePlan {
                mode,
                size,
                opts,
                work,
                threads,
                rss_start,
            };
            for mut row in measure_size(&args, &plan, &present, &bar, false)? {
                row.settings = settings
                    .iter()
                    .find(|s| s.0 == row.system)
                    .map(|s| s.1.clone());
                bar.suspend(|| println!("{}", row.seed_line()));
                mr.rows.push(row);
            }
            // The tuned peers' rows of this size, measured by the child.
            for row in child.iter().filter(|r| r.size == size) {
                bar.suspend(|| println!("{}", row.seed_line()));
                mr.rows.push(row.clone());
            }
            child.retain(|r| r.size != size);
            for sys in systems
                .iter()
                .filter(|s| s.absent.is_some() && runs_in(mode, s.name))
            {
                let row = Row::absent(mode, sys.name, size, sys.absent.clone().unwrap_or_default());
                bar.suspend(|| println!("{}", row.seed_line()));
                mr.rows.push(row);
            }
            // No row may beat the zeroing limit. One that does says the limit was read at a
            // noisy moment: read it again (each method's best kept), and if a row still beats
            // it, say so; the limit is wrong.
            if mode == "tight" && !args.child_tuned {
                let beaten = recheck_bound(
                    &mr.rows,
                    size,
                    &mut bw[si].1,
                    |b| b.limit_ns(size),
                    |b| *b = b.merged(&measure::bandwidth(size, Duration::from_millis(100), 2)),
                );
                let limit = bw[si].1.limit_ns(size);
                if let Some((system, ns)) = beaten {
                    let msg = format!(
                        "zeroing limit at {size} bytes beaten by {system}: {ns:.0} ns < {limit:.0} ns \
                         after measuring it again: the limit is wrong"
                    );
                    bar.suspend(|| println!("{msg}"));
                    report.warnings.push(msg);
                } else if limit < b.limit_ns(size) {
                    bar.suspend(|| {
                        println!(
                            "zeroing limit at {size} bytes measured again: {limit:.0} ns/call ({})",
                            bw[si].1.all_method
                        )
                    });
                }
            }
            // The touch floor is an estimate (how the caches hold the lines depends on what
            // ran before), read once at the start: a paced row below it says it was read at a
            // slow moment. Read it again (each variant's least kept), and if a row is still
            // below it, say so.
            if let Some(fi) = floors.iter().position(|f| f.0 == size)
                && mode == "paced"
            {
                let first = floors[fi].1.min_ns();
                let beaten =
                    recheck_bound(&mr.rows, size, &mut floors[fi].1, TouchFloor::min_ns, |f| {
                        *f = f.merged(&measure::touch_floor(
                            size,
                            Duration::from_millis(100),
                            work,
                        ))
                    });
                let floor = floors[fi].1.min_ns();
                if let Some((system, ns)) = beaten {
                    let msg = format!(
                        "touch floor at {size} bytes beaten by {system}: {ns:.0} ns < {floor:.0} ns \
                         after measuring it again: the floor is too high"
                    );
                    bar.suspend(|| println!("{msg}"));
                    report.warnings.push(msg);
                } else if floor < first {
                    bar.suspend(|| {
                        println!("touch floor at {size} bytes measured again: {floor:.0} ns/call")
                    });
                }
            }
            // The worker's zeroing throughput during this size, beside one-thread zeroing.
            if let (Some(before), Some(h)) = (before, pagepool_heap) {
                h.flush();
                let after = h.stats();
                let bytes = after.worker_bytes - before.worker_bytes;
                let nanos = after.worker_nanos - before.worker_nanos;
                // Below a few MiB the figure is timer noise (small releases are zeroed inline).
                if nanos > 0 && bytes >= 16 << 20 {
                    // The reference, measured again now: the best one-thread zeroing of any
                    // method, in this and the run's first measurement (a reference lowered by a
                    // noisy neighbour would flatter the worker).
                    let best = b.merged(&measure::bandwidth(size, Duration::from_millis(50), 2));
                    mr.worker.push(WorkerFigure {
                        size,
                        bytes,
                        bytes_per_sec: bytes as f64 * 1e9 / nanos as f64,
                        best_single: best.single,
                        best_method: best.single_method,
                    });
                }
            }
            // Start every size from empty pools, so that memory figures are per size.
            for h in systems.iter().filter_map(System::heap) {
                h.flush();
                h.trim();
            }
        }
        bar.suspend(|| print!("{}", mr.summary(&bw, &floors, &names)));
        println!(
            "== mode {mode}: {:.1} s ==",
            mode_started.elapsed().as_secs_f64()
        );
        report.modes.push(mr);
    }
    report = report.with_bounds(&bw, &floors);
    let attrs_systems = if attrs {
        run_attrs(&args, &attrs_names, opts, &bar, &mut report)?
    } else {
        Vec::new()
    };
    if random {
        run_random(&args, &random_sizes, &bar, &mut report)?;
    }
    bar.finish_and_clear();
    for sys in systems.iter().chain(&attrs_systems) {
        if let Some(h) = sys.heap() {
            let st = h.stats();
            println!("== {} heap statistics ==\n{st}", sys.name);
            report.heap_stats.push((sys.name.to_string(), st));
        }
    }
    let limits = systems
        .iter()
        .find(|s| s.name == "pagepool")
        .and_then(System::heap)
        .map(|h| {
            let st = h.stats();
            (
                h.owner().limit_pages() * st.page_size,
                st.queue_limit_pages * st.page_size,
            )
        });
    if !call_modes.is_empty() || attrs {
        print!("{}", report.memory_summary(limits));
    }
    for w in &report.warnings {
        println!("warning: {w}");
    }
    println!(
        "heap-bench: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let drawn: Vec<&str> = names.iter().chain(&attrs_names).copied().collect();
        std::fs::write(path, report.svg(&drawn)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The attrs mode: each pagepool pool type beside what a user would do per call instead for the
/// same memory, tight (alloc, touch, free back to back), at every size, by the same rules as the
/// other modes. Each row's settings are checked outside its timed calls: an mmap row's by one
/// call of its own before them (what its mapping got, from smaps and numa_maps), a heap's after
/// them (its huge backing, what its arenas hold). A row that cannot run here (no memory on node
/// 0, `mlock` past `RLIMIT_MEMLOCK`, a kernel without `MADV_POPULATE_WRITE`) is absent, saying
/// why. Returns the rows' systems, whose heaps' statistics end the run.
fn run_attrs(
    args: &Args,
    names: &[&'static str],
    opts: CallOpts,
    bar: &indicatif::ProgressBar,
    report: &mut Report,
) -> Result<Vec<System>, String> {
    println!("== mode: attrs ==");
    let started = Instant::now();
    let systems: Vec<System> = names
        .iter()
        .map(|n| System::new(n))
        .collect::<Result<_, _>>()?;
    println!(
        "attrs: each pool type beside what a user would do per call instead, tight; \
         (x) = peer / its pagepool row; THP enabled [{}], defrag [{}], shmem_enabled [{}]; \
         free 2 MiB hugetlb pages {}; RLIMIT_MEMLOCK {}",
        measure::thp_setting("enabled"),
        measure::thp_setting("defrag"),
        measure::thp_setting("shmem_enabled"),
        measure::free_hugetlb_pages(),
        measure::memlock_limit()
    );
    let mut mr = ModeReport::new("attrs");
    for &size in &args.sizes {
        // Pools were trimmed after the previous size: this is the size's baseline.
        let rss_start = measure::rss().1;
        let mut absent: Vec<Option<String>> = systems.iter().map(|s| s.absent.clone()).collect();
        let mut settings: Vec<Option<String>> = vec![None; systems.len()];
        for (i, sys) in systems.iter().enumerate() {
            if absent[i].is_none() && sys.heap().is_none() {
                bar.set_message(format!("attrs {size} {} check", sys.name));
                match sys.attrs_settings(size, opts) {
                    Ok(s) => settings[i] = s,
                    Err(e) => absent[i] = Some(e),
                }
            }
        }
        let present: Vec<&System> = systems
            .iter()
            .zip(&absent)
            .filter(|(_, a)| a.is_none())
            .map(|(s, _)| s)
            .collect();
        for _ in 0..systems.len() - present.len() {
            bar.inc(args.reps() as u64 + 1);
        }
        let plan = SizePlan {
            mode: "attrs",
            size,
            opts,
            work: Duration::ZERO,
            threads: None,
            rss_start,
        };
        let mut rows = measure_size(args, &plan, &present, bar, true)?;
        for (i, sys) in systems.iter().enumerate() {
            let mut row = match &absent[i] {
                Some(why) => Row::absent("attrs", sys.name, size, why.clone()),
                None => {
                    let k = rows.iter().position(|r| r.system == sys.name);
                    match k {
                        Some(k) => rows.remove(k),
                        None => return Err(format!("{}: no row at {size}", sys.name)),
                    }
                }
            };
            if row.absent.is_none() {
                row.settings = match settings[i].take() {
                    Some(s) => Some(s),
                    // A heap: what its arenas hold after the row's calls.
                    None => sys.attrs_settings(size, opts).unwrap_or_else(Some),
                };
            }
            bar.suspend(|| {
                println!("{}", row.seed_line());
                if let Some(s) = &row.settings {
                    println!("  settings: {s}");
                }
            });
            mr.rows.push(row);
        }
        // Start every size from empty pools.
        for h in systems.iter().filter_map(System::heap) {
            h.flush();
            h.trim();
        }
    }
    let pairs: Vec<(&str, &str)> = systems::ATTRS_PAIRS
        .iter()
        .copied()
        .filter(|(a, b)| names.contains(a) || names.contains(b))
        .collect();
    bar.suspend(|| print!("{}", mr.pairs_summary(&args.sizes, &pairs)));
    println!("== mode attrs: {:.1} s ==", started.elapsed().as_secs_f64());
    report.modes.push(mr);
    Ok(systems)
}

/// The random mode: per buffer size, one buffer per row ([`random::ROWS`]), all holding the
/// same chain, all alive at once; each row warmed up and calibrated, then the repetitions in
/// interleaved order (rotated each repetition), each continuing the row's chain where the last
/// stopped. A row's figure is the median repetition's mean ns per read, beside the range.
fn run_random(
    args: &Args,
    sizes: &[usize],
    bar: &indicatif::ProgressBar,
    report: &mut Report,
) -> Result<(), String> {
    println!("== mode: random ==");
    let started = Instant::now();
    let reps = args.random_reps();
    println!(
        "random: dependent 8-byte reads, one per 64-byte line, through every line of the buffer \
         in one random cyclic order (seed {:#x}, the same for every row); {reps} repetitions per \
         row, interleaved, of at least {} ms each; THP enabled [{}], defrag [{}], \
         shmem_enabled [{}]; free 2 MiB hugetlb pages {}",
        random::SEED,
        random::MIN_REP.as_millis(),
        measure::thp_setting("enabled"),
        measure::thp_setting("defrag"),
        measure::thp_setting("shmem_enabled"),
        measure::free_hugetlb_pages()
    );
    let mut mr = ModeReport::new("random");
    for &size in sizes {
        let t = Instant::now();
        bar.set_message(format!("random {size} chain"));
        let lines = size / random::LINE;
        let succ = random::cycle(lines, random::SEED);
        let bufs: Vec<random::ReadBuffer> = random::ROWS
            .iter()
            .map(|n| random::ReadBuffer::new(n, size, &succ))
            .collect::<Result<_, _>>()?;
        drop(succ);
        let huge_before: Vec<u64> = bufs.iter().map(|b| b.pages().huge()).collect();
        bar.suspend(|| {
            println!(
                "buffers of {}: {lines} lines; chain and buffers ready in {:.1} s",
                measure::bytes(size as u64),
                t.elapsed().as_secs_f64()
            )
        });
        // Warm up (through up to 100,000 lines) and calibrate each row: its reads per
        // repetition fit its share of the budget, but last at least MIN_REP.
        let mut pos = vec![0usize; bufs.len()];
        let mut reads = vec![0u64; bufs.len()];
        for (i, b) in bufs.iter().enumerate() {
            bar.set_message(format!("random {size} {} warm-up", b.name));
            let p = b.chase(0, lines.min(100_000) as u64);
            let (est, p) = random::calibrate(b, p);
            pos[i] = p;
            reads[i] = match args.iters {
                Some(n) => n as u64,
                None => {
                    let per_rep = (args.budget_ms as f64 * 1e6 / reps as f64)
                        .max(random::MIN_REP.as_nanos() as f64);
                    (per_rep / est.max(0.1)).ceil() as u64
                }
            };
            bar.inc(1);
        }
        let mut ns: Vec<Vec<f64>> = vec![Vec::new(); bufs.len()];
        for rep in 0..reps {
            for k in 0..bufs.len() {
                let i = (k + rep) % bufs.len(); // interleaved, rotated each repetition
                bar.set_message(format!("random {size} {} rep {}", bufs[i].name, rep + 1));
                let t = Instant::now();
                pos[i] = bufs[i].chase(pos[i], reads[i]);
                ns[i].push(t.elapsed().as_nanos() as f64 / reads[i] as f64);
                bar.inc(1);
            }
        }
        let med = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let base = med(&ns[0]);
        for (i, b) in bufs.iter().enumerate() {
            let pages = b.pages();
            let mut backing = format!("{}; {}", b.how, pages.describe(b.bytes()));
            if huge_before[i] != pages.huge() {
                backing.push_str(&format!(
                    " (before the reads: {} in 2 MiB pages)",
                    measure::bytes(huge_before[i])
                ));
            }
            let row = ReadRow {
                mode: "random".into(),
                system: b.name.into(),
                size,
                reads: reads[i],
                reps_ns_per_read: ns[i].clone(),
                ns_per_read: med(&ns[i]),
                vs_pagepool: (base > 0.0).then(|| med(&ns[i]) / base),
                backing,
                huge_bytes: pages.huge(),
                resident_bytes: pages.rss,
            };
            bar.suspend(|| {
                println!("{}", row.seed_line());
                println!("  backing: {}", row.backing);
            });
            mr.reads.push(row);
        }
        for b in bufs.iter().filter_map(random::ReadBuffer::heap) {
            b.flush();
        }
    }
    bar.suspend(|| print!("{}", mr.random_summary(&random::ROWS)));
    println!(
        "== mode random: {:.1} s ==",
        started.elapsed().as_secs_f64()
    );
    report.modes.push(mr);
    Ok(())
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

    /// Repetitions: nine for every row under 64 KiB, two above, whatever the system's speed;
    /// one for a row whose fewest calls exceed the budget, unless `--iters` forces the count.
    #[test]
    fn every_row_of_a_size_repeats_alike() {
        assert_eq!(reps_for_size(4096), SMALL_REPS);
        assert_eq!(reps_for_size((64 << 10) - 4096), SMALL_REPS);
        assert_eq!(reps_for_size(64 << 10), 2);
        assert_eq!(reps_for_size(32 << 20), 2);
        // A fast and a slow system at one size: the same.
        assert_eq!(row_reps(50.0, 9, 400, false), 9);
        assert_eq!(row_reps(40_000.0, 9, 400, false), 9);
        // 200 calls over the budget: one, unless the count is forced.
        assert_eq!(row_reps(3e6, 2, 400, false), 1);
        assert_eq!(row_reps(3e6, 2, 400, true), 2);
        // Nonsense estimates (a failed warm-up) do not panic.
        assert_eq!(row_reps(f64::NAN, 2, 400, false), 2);
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
            let team = Team::start(scope, &sys, 4096, opts, cpus.len() + 1);
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
            let team = Team::start(scope, &sys, 64 << 10, opts, 3);
            let (first, mut before) = team.run(40).unwrap();
            assert_eq!(first.rep.per_call.len(), 120);
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
            let bad = Team::start(scope, &sys, usize::MAX / 2, opts, 2);
            for _ in 0..2 {
                let e = bad.run(5).err().expect("every call fails");
                assert!(e.contains("calloc"), "{e}");
            }
        });
    }
}
