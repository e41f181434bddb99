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

mod calls;
mod growth;
mod measure;
mod plan;
mod programs;
mod random;
mod report;
mod sparse;
mod systems;
mod team;
mod tracking;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::calls::{SMALL_REPS, SizePlan, measure_size};
use crate::measure::{Bandwidth, TouchFloor};
use crate::plan::{ModePlan, Plan};
use crate::report::{ModeReport, Report, Row, WorkerFigure, ZeroingShare};
use crate::systems::{CallOpts, System};
use crate::team::{BusyLoad, busy_child};

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
    /// and the huge pages each got; and `programs`, real workloads (numpy, Pillow, lzma,
    /// zstandard, SQLite) in Python processes under glibc, pagepool's drop-in, mimalloc and
    /// jemalloc (programs/setup installs what it needs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tight,paced,loaded,threads,realloc,sparse",
        value_parser = ["tight", "paced", "loaded", "threads", "both", "attrs", "random", "realloc", "sparse", "programs"]
    )]
    mode: Vec<String>,
    /// Threads mode: how many threads share the heap or allocator, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    threads: Vec<usize>,
    /// Buffer sizes (bytes; K, M, G suffixes allowed), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "4K,1M,8M,32M", value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Systems to run, comma separated (default: all of the table's). Two more rows run only
    /// when named: pagepool-sync (the default heap with `deferred(false)`) and pagepool-control
    /// (a second default heap: its ratio to pagepool is the noise floor of a comparison). The
    /// attrs mode's rows are named here too (pagepool-locked, mmap-mlock, pagepool-huge,
    /// mmap-thp, pagepool-node0, mmap-mbind).
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
    /// Programs mode: the Python (with numpy, Pillow and zstandard) to run the workloads in
    /// (default: target/programs/venv/bin/python, which programs/setup makes).
    #[arg(long, value_name = "PATH")]
    python: Option<std::path::PathBuf>,
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
    /// Check that every buffer reads all-zero before it is written (slow: a correctness run;
    /// with `--mode loaded`, on a busy machine). A buffer that does not fails the run.
    #[arg(long)]
    verify: bool,
    /// Read the calling thread's context switches around every call (`getrusage(RUSAGE_THREAD)`,
    /// outside the timed span; the CPU time counts the reads) and time every call alone (no
    /// batches under 64 KiB). Each row then also reports the calls during which the scheduler
    /// preempted the thread or it slept (waited for a lock or the heap's worker), and the mean,
    /// p99 and max of the calls that kept the CPU: on a busy machine (`--mode loaded`) the
    /// preemptions decide the mean and the max by chance, and the calls that kept the CPU are
    /// the system's own cost.
    #[arg(long)]
    switches: bool,
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
    match pagepool::parse_size(s) {
        Some(0) => Err(format!("bad size {s:?}: must be at least 1 byte")),
        Some(v) => Ok(v),
        None => Err(format!(
            "bad size {s:?}: want bytes or a number with K, M or G"
        )),
    }
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
    if args.switches {
        cmd.arg("--switches");
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
    let plan = Plan::new(&args)?;
    let names = &plan.names;
    let (calls, attrs, random) = (
        !plan.call_modes.is_empty(),
        !plan.attrs.is_empty(),
        !plan.random.is_empty(),
    );
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
    if calls || attrs {
        println!(
            "heap-bench: {cores} cores, modes {}, sizes {:?}, {} repetitions, touch {}, verify {}",
            plan.modes.join(", "),
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
            if !calls && !attrs {
                format!("modes {}, ", plan.modes.join(", "))
            } else {
                String::new()
            },
            plan.random,
            args.random_reps()
        );
    }
    let mut bounds = Bounds::measure(&args, calls, opts);
    // The tuned peers first, in their own process; their rows join this run's tables.
    let mut child_modes = if tuned.is_empty() {
        Vec::new()
    } else {
        println!(
            "tuned peers ({}): running in a child process, same modes, sizes and work",
            tuned.join(", ")
        );
        let t = Instant::now();
        let modes = run_tuned_child(&args, &tuned, &bounds.works)?;
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
    let bar_len = plan.bar_len(&args.sizes, args.reps(), args.random_reps(), |name| {
        systems.iter().any(|s| s.name == name && s.absent.is_none())
    });
    let bar = if std::io::stderr().is_terminal() && !args.no_progress {
        indicatif::ProgressBar::new(bar_len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut report = Report::new(&args.sizes, &bounds.bw, &bounds.floors, opts);
    let run = CallModes {
        args: &args,
        names,
        systems: &systems,
        settings: &settings,
        opts,
        cores,
        bar: &bar,
    };
    for mode in &plan.call_modes {
        let child = child_modes
            .iter_mut()
            .find(|m| m.mode == mode.name)
            .map(|m| std::mem::take(&mut m.rows))
            .unwrap_or_default();
        let mr = run.mode(mode, child, &mut bounds, &mut report.warnings)?;
        report.modes.push(mr);
    }
    report = report.with_bounds(&bounds.bw, &bounds.floors);
    let attrs_systems = if attrs {
        run_attrs(&args, &plan.attrs, opts, &bar, &mut report)?
    } else {
        Vec::new()
    };
    if random {
        random::run_mode(&args, &plan.random, &bar, &mut report)?;
    }
    if plan.realloc && !args.child_tuned {
        growth::run_mode(&bar, &mut report)?;
    }
    if plan.sparse && !args.child_tuned {
        sparse::run_mode(&bar, &mut report)?;
    }
    if plan.programs && !args.child_tuned {
        programs::run_mode(
            args.python.as_deref(),
            args.reps.unwrap_or(1),
            &bar,
            &mut report,
        )?;
    }
    bar.finish_and_clear();
    for sys in systems.iter().chain(&attrs_systems) {
        if let Some(h) = sys.heap() {
            let st = h.stats();
            println!("== {} heap statistics ==\n{st}", sys.name);
            report.heap_stats.push((sys.name.to_string(), st));
        }
        if let Some(st) = sys.private_stats() {
            println!("== {} statistics ==\n{st}", sys.name);
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
    if calls || attrs {
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
        let drawn: Vec<&str> = names.iter().chain(&plan.attrs).copied().collect();
        std::fs::write(path, report.svg(&drawn)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// What the modes of calls measure against, per size: the machine's zeroing bandwidth (the
/// zeroing limit), the work between paced calls and the touch floor.
struct Bounds {
    bw: Vec<(usize, Bandwidth)>,
    works: Vec<(usize, Duration)>,
    floors: Vec<(usize, TouchFloor)>,
}

impl Bounds {
    /// Measures and prints them, at every size of a run with modes of calls (`calls`).
    fn measure(args: &Args, calls: bool, opts: CallOpts) -> Bounds {
        // The machine's zeroing bandwidth, on resident memory (briefly in the tuned peers'
        // child: its parent's figures are the run's); the modes of calls' limit and paced work.
        // Three rounds, each method's best kept: one reading at a noisy moment would be a limit
        // that rows can beat.
        let (bw_time, bw_rounds) = if args.child_tuned {
            (Duration::from_millis(10), 1)
        } else {
            (Duration::from_millis(50), 3)
        };
        if calls && !args.child_tuned {
            let t = pagepool::stats::tempo();
            println!(
                "pagepool's measure of this machine: a 256 KiB piece zeroed in {:.1} us (memset) / \
                 {:.1} us (streaming), a wake-up {:.1} us, a short sleep {:.1} us late; streaming \
                 stores above {} bytes; hand-off wait {:?}, worker grace {:?}, shortest hold {:?}, \
                 first nap {:?}",
                t.memset_piece_ns() as f64 / 1e3,
                t.streaming_piece_ns() as f64 / 1e3,
                t.wake_ns() as f64 / 1e3,
                t.sleep_late_ns() as f64 / 1e3,
                t.streaming_from(),
                t.handoff_wait(),
                t.worker_grace(),
                t.late_hold(),
                t.nap_first(),
            );
        }
        let bw: Vec<(usize, Bandwidth)> = args
            .sizes
            .iter()
            .filter(|_| calls)
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
        let mut bounds = Bounds {
            bw,
            works,
            floors: Vec::new(),
        };
        // What the touch alone costs, where memory is already zeroed (on this core or the
        // other), after the paced mode's work between calls.
        if opts.touch && !args.child_tuned {
            bounds.floors = bounds
                .bw
                .iter()
                .map(|(s, _)| {
                    let floor =
                        measure::touch_floor(*s, Duration::from_millis(100), bounds.work(*s));
                    (*s, floor)
                })
                .collect();
        }
        for (s, f) in &bounds.floors {
            println!(
                "touch {s} bytes (one byte per page) of zeroed memory: {:.0} ns after this thread zeroed it, \
                 {:.0} ns after another thread did, {:.0} ns after another thread did with streaming stores",
                f.own_ns, f.other_ns, f.other_streaming_ns
            );
        }
        bounds
    }

    /// The work between paced calls at `size`.
    fn work(&self, size: usize) -> Duration {
        self.works
            .iter()
            .find(|w| w.0 == size)
            .map_or(Duration::ZERO, |w| w.1)
    }

    /// No row may beat the zeroing limit. One that does says the limit was read at a noisy
    /// moment: reads it again (each method's best kept), and if a row still beats it, says so
    /// (a warning: the limit is wrong). `first` is the limit as the size's rows began.
    fn recheck_limit(
        &mut self,
        rows: &[Row],
        si: usize,
        first: &Bandwidth,
        bar: &indicatif::ProgressBar,
        warnings: &mut Vec<String>,
    ) {
        let size = self.bw[si].0;
        let beaten = recheck_bound(
            rows,
            size,
            &mut self.bw[si].1,
            |b| b.limit_ns(size),
            |b| *b = b.merged(&measure::bandwidth(size, Duration::from_millis(100), 2)),
        );
        let limit = self.bw[si].1.limit_ns(size);
        if let Some((system, ns)) = beaten {
            let msg = format!(
                "zeroing limit at {size} bytes beaten by {system}: {ns:.0} ns < {limit:.0} ns \
                 after measuring it again: the limit is wrong"
            );
            bar.suspend(|| println!("{msg}"));
            warnings.push(msg);
        } else if limit < first.limit_ns(size) {
            bar.suspend(|| {
                println!(
                    "zeroing limit at {size} bytes measured again: {limit:.0} ns/call ({})",
                    self.bw[si].1.all_method
                )
            });
        }
    }

    /// The touch floor is an estimate (how the caches hold the lines depends on what ran
    /// before), read once at the start: a paced row below it says it was read at a slow
    /// moment. Reads it again (each variant's least kept), and if a row is still below it,
    /// says so (a warning).
    fn recheck_floor(
        &mut self,
        rows: &[Row],
        size: usize,
        bar: &indicatif::ProgressBar,
        warnings: &mut Vec<String>,
    ) {
        let work = self.work(size);
        let Some(fi) = self.floors.iter().position(|f| f.0 == size) else {
            return;
        };
        let first = self.floors[fi].1.min_ns();
        let beaten = recheck_bound(
            rows,
            size,
            &mut self.floors[fi].1,
            TouchFloor::min_ns,
            |f| {
                *f = f.merged(&measure::touch_floor(
                    size,
                    Duration::from_millis(100),
                    work,
                ))
            },
        );
        let floor = self.floors[fi].1.min_ns();
        if let Some((system, ns)) = beaten {
            let msg = format!(
                "touch floor at {size} bytes beaten by {system}: {ns:.0} ns < {floor:.0} ns \
                 after measuring it again: the floor is too high"
            );
            bar.suspend(|| println!("{msg}"));
            warnings.push(msg);
        } else if floor < first {
            bar.suspend(|| {
                println!("touch floor at {size} bytes measured again: {floor:.0} ns/call")
            });
        }
    }
}

/// What every mode of calls of a run shares.
struct CallModes<'a> {
    args: &'a Args,
    /// The systems of the run's modes of calls, in table order (the summary's columns).
    names: &'a [&'static str],
    /// The systems measured in this process (the tuned peers are measured in a child).
    systems: &'a [System],
    /// In the tuned peers' child: each tuned row's settings, as in effect.
    settings: &'a [(&'static str, String)],
    opts: CallOpts,
    cores: usize,
    bar: &'a indicatif::ProgressBar,
}

impl CallModes<'_> {
    /// Runs one mode of calls, size by size: the rows of the systems measured here, the tuned
    /// peers' rows of the mode (`child`, measured in their own process) and the absent ones;
    /// the bounds checked against the rows; the summary. Pools are emptied after every size.
    fn mode(
        &self,
        mode: &ModePlan,
        mut child: Vec<Row>,
        bounds: &mut Bounds,
        warnings: &mut Vec<String>,
    ) -> Result<ModeReport, String> {
        let (args, bar) = (self.args, self.bar);
        let name = mode.name.as_str();
        println!("== mode: {name} ==");
        let mode_started = Instant::now();
        let mut mr = ModeReport::new(name);
        let present: Vec<&System> = self
            .systems
            .iter()
            .filter(|s| s.absent.is_none() && mode.runs(s.name))
            .collect();
        // The loaded mode's load runs for all its rows.
        let _load = if mode.load {
            println!(
                "load: {} busy threads at normal priority, in a process of their own",
                self.cores
            );
            Some(BusyLoad::start(self.cores)?)
        } else {
            None
        };
        for (si, &size) in args.sizes.iter().enumerate() {
            let b = bounds.bw[si].1;
            let work = if mode.work {
                bounds.work(size)
            } else {
                Duration::ZERO
            };
            if mode.work {
                println!(
                    "work between calls at {size} bytes: {:.1} us",
                    work.as_secs_f64() * 1e6
                );
            }
            mr.work_ns.push((size, work.as_nanos() as u64));
            // Pools were trimmed after the previous size: this is the size's baseline.
            let rss_start = measure::rss().1;
            let pagepool_heap = self
                .systems
                .first()
                .filter(|s| s.name == "pagepool")
                .and_then(System::heap);
            let before = pagepool_heap.map(|h| h.stats());
            let plan = SizePlan {
                mode: name,
                size,
                opts: self.opts,
                work,
                threads: mode.threads,
                rss_start,
                switches: args.switches,
            };
            for mut row in measure_size(args, &plan, &present, bar, false)? {
                row.settings = self
                    .settings
                    .iter()
                    .find(|s| s.0 == row.system)
                    .map(|s| s.1.clone());
                bar.suspend(|| println!("{}", row.lines()));
                mr.rows.push(row);
            }
            // The tuned peers' rows of this size, measured by the child.
            for row in child.iter().filter(|r| r.size == size) {
                bar.suspend(|| println!("{}", row.lines()));
                mr.rows.push(row.clone());
            }
            child.retain(|r| r.size != size);
            for sys in self
                .systems
                .iter()
                .filter(|s| s.absent.is_some() && mode.runs(s.name))
            {
                let row = Row::absent(name, sys.name, size, sys.absent.clone().unwrap_or_default());
                bar.suspend(|| println!("{}", row.seed_line()));
                mr.rows.push(row);
            }
            if name == "tight" && !args.child_tuned {
                bounds.recheck_limit(&mr.rows, si, &b, bar, warnings);
            }
            if name == "paced" {
                bounds.recheck_floor(&mr.rows, size, bar, warnings);
            }
            // The worker's zeroing throughput during this size, beside one-thread zeroing.
            if let (Some(before), Some(h)) = (before, pagepool_heap) {
                mr.worker.extend(worker_figure(h, &before, size, &b));
                let after = h.stats();
                mr.zeroing.push(ZeroingShare {
                    size,
                    worker_bytes: after.worker_bytes - before.worker_bytes,
                    caller_bytes: after.caller_zeroed_bytes - before.caller_zeroed_bytes,
                });
            }
            // Start every size from empty pools, so that memory figures are per size.
            for sys in self.systems.iter() {
                sys.settle();
            }
        }
        bar.suspend(|| print!("{}", mr.summary(&bounds.bw, &bounds.floors, self.names)));
        println!(
            "== mode {name}: {:.1} s ==",
            mode_started.elapsed().as_secs_f64()
        );
        Ok(mr)
    }
}

/// The worker's zeroing throughput since `before` (the size's first call), beside the best
/// one-thread zeroing of any method at `size`: `first`, the run's first measurement, and one made
/// now (a reference lowered by a noisy neighbour would flatter the worker). None below a few
/// MiB zeroed, where the figure is timer noise (small releases are zeroed inline).
fn worker_figure(
    heap: &pagepool::SystemHeap,
    before: &pagepool::HeapStats,
    size: usize,
    first: &Bandwidth,
) -> Option<WorkerFigure> {
    heap.flush();
    let after = heap.stats();
    let bytes = after.worker_bytes - before.worker_bytes;
    let nanos = after.worker_nanos - before.worker_nanos;
    if nanos == 0 || bytes < 16 << 20 {
        return None;
    }
    let best = first.merged(&measure::bandwidth(size, Duration::from_millis(50), 2));
    Some(WorkerFigure {
        size,
        bytes,
        bytes_per_sec: bytes as f64 * 1e9 / nanos as f64,
        best_single: best.single,
        best_method: best.single_method,
    })
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
            switches: args.switches,
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
                println!("{}", row.lines());
                if let Some(s) = &row.settings {
                    println!("  settings: {s}");
                }
            });
            mr.rows.push(row);
        }
        // Start every size from empty pools.
        for sys in &systems {
            sys.settle();
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
