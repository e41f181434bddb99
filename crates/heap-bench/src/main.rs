//! `heap-bench`: the seed's `dmabuf_heap_bench` (allocate + free, many times, at 4 KiB, 1 MiB,
//! 8 MiB and 32 MiB), run against pagepool and the allocators a user would pick instead, side by
//! side in one run. The protocol (described in `docs/BENCHMARKS.md` with the figures it gave):
//! two modes (`tight`: calls back to back; `paced`: busy work between calls), every system in
//! interleaved order with a warm-up, the median of several repetitions, peak resident memory of
//! the pagepool rows, and the heap's own statistics at the end.

// A binary: `pub` marks each module's interface to the others.
#![allow(unreachable_pub)]

mod measure;
mod report;
mod systems;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::measure::{Bandwidth, TouchFloor};
use crate::report::{ModeReport, Report, Row, WorkerFigure};
use crate::systems::{CallOpts, System};

/// Benchmarks pagepool against calloc, mimalloc, jemalloc, mmap, memfd and the kernel's dma-buf
/// heap: allocate, write one byte per page, free; ns per call.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Modes to run: tight, paced or both.
    #[arg(long, default_value = "both", value_parser = ["tight", "paced", "both"])]
    mode: String,
    /// Buffer sizes (bytes; K, M, G suffixes allowed), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "4K,1M,8M,32M", value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Systems to run, comma separated (default: all).
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Calls per repetition for every row (default: as many as fit the row's budget by the mean
    /// of 20 ms of warmed calls, at least 200 and at most the seed's 5000).
    #[arg(long)]
    iters: Option<usize>,
    /// Repetitions per row; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Time budget per row in milliseconds (all repetitions), used to choose the call count.
    #[arg(long, default_value_t = 900)]
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
    /// Write every figure to this JSON file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Draw the summary as an SVG chart to this file.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    no_progress: bool,
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

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
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

/// The value at fraction `q` of sorted `v` (0 when empty).
fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("heap-bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    if args.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    if args.iters == Some(0) {
        return Err("--iters must be at least 1".into());
    }
    let names: Vec<&'static str> = if args.systems.is_empty() {
        systems::ALL.to_vec()
    } else {
        args.systems
            .iter()
            .map(|s| {
                systems::ALL
                    .iter()
                    .find(|n| **n == s.as_str())
                    .copied()
                    .ok_or_else(|| {
                        format!("unknown system {s:?}; known: {}", systems::ALL.join(", "))
                    })
            })
            .collect::<Result<_, _>>()?
    };
    let systems: Vec<System> = names
        .iter()
        .map(|n| System::new(n))
        .collect::<Result<_, _>>()?;
    let opts = CallOpts {
        touch: !args.no_touch,
        verify: args.verify,
    };
    let modes: Vec<&str> = match args.mode.as_str() {
        "both" => vec!["tight", "paced"],
        m => vec![m],
    };
    let started = Instant::now();
    println!(
        "heap-bench: {} cores, sizes {:?}, {} repetitions, touch {}, verify {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.sizes,
        args.reps,
        opts.touch,
        opts.verify
    );
    // The machine's zeroing bandwidth, on resident memory.
    let bw: Vec<(usize, Bandwidth)> = args
        .sizes
        .iter()
        .map(|&s| (s, measure::bandwidth(s, Duration::from_millis(150))))
        .collect();
    for (s, b) in &bw {
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
    // What the touch alone costs, where memory is already zeroed (on this core or the other),
    // after the paced mode's work between calls.
    let paced_work = |size: usize, b: &Bandwidth| {
        let us = args
            .work_us
            .unwrap_or(2.0 * size as f64 / b.memset_single() * 1e6);
        Duration::from_nanos((us * 1000.0) as u64)
    };
    let floors: Vec<(usize, TouchFloor)> = if opts.touch {
        bw.iter()
            .map(|(s, b)| {
                let settle = paced_work(*s, b);
                (
                    *s,
                    measure::touch_floor(*s, Duration::from_millis(100), settle),
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
    let present: Vec<&System> = systems.iter().filter(|s| s.absent.is_none()).collect();
    let rows_total = (modes.len() * args.sizes.len() * present.len() * (args.reps + 1)) as u64;
    let bar = if std::io::stderr().is_terminal() && !args.no_progress {
        indicatif::ProgressBar::new(rows_total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut report = Report::new(&args.sizes, &bw, &floors, opts);
    for mode in &modes {
        println!("== mode: {mode} ==");
        let mut mr = ModeReport::new(mode);
        for (si, &size) in args.sizes.iter().enumerate() {
            let b = bw[si].1;
            let work = if *mode == "paced" {
                paced_work(size, &b)
            } else {
                Duration::ZERO
            };
            if *mode == "paced" {
                println!(
                    "work between calls at {size} bytes: {:.1} us",
                    work.as_secs_f64() * 1e6
                );
            }
            mr.work_ns.push((size, work.as_nanos() as u64));
            // Pools were trimmed after the previous size: this is the size's baseline.
            let rss_start = measure::rss().1;
            let before = systems[0]
                .heap()
                .filter(|_| systems[0].name == "pagepool")
                .map(|h| h.stats());
            // Warm up and calibrate each system: three calls untimed (a first call may map a
            // fresh segment), then calls timed until they add up to CALIBRATE (or
            // CALIBRATE_MAX calls): the estimate of a call's cost that sets the row's count.
            let mut est = Vec::new();
            for sys in &present {
                bar.set_message(format!("{mode} {size} {} warm-up", sys.name));
                let fail = |e: String| format!("{} at {size}: {e}", sys.name);
                run_calls(sys, size, 3, opts, work).map_err(fail)?;
                let (mut ns, mut calls) = (0u64, 0usize);
                while ns < CALIBRATE.as_nanos() as u64 && calls < CALIBRATE_MAX {
                    ns += run_calls(sys, size, 1, opts, work).map_err(fail)?.ns;
                    calls += 1;
                }
                est.push(ns as f64 / calls as f64);
                bar.inc(1);
            }
            // Within the row's budget, but never fewer than MIN_CALLS a repetition (a slow row
            // takes longer than its budget then), nor more than the seed's 5000.
            let counts: Vec<usize> = est
                .iter()
                .map(|e| {
                    args.iters.unwrap_or_else(|| {
                        let per_rep = args.budget_ms as f64 * 1e6 / args.reps as f64;
                        ((per_rep / e) as usize).clamp(MIN_CALLS, 5000)
                    })
                })
                .collect();
            let mut totals: Vec<Vec<u64>> = vec![Vec::new(); present.len()];
            let mut cpus: Vec<Vec<u64>> = vec![Vec::new(); present.len()];
            let mut calls: Vec<Vec<u64>> = vec![Vec::new(); present.len()];
            let mut peaks: Vec<Option<(u64, u64)>> = vec![None; present.len()];
            for rep in 0..args.reps {
                for k in 0..present.len() {
                    let i = (k + rep) % present.len(); // interleaved, rotated each repetition
                    let sys = present[i];
                    bar.set_message(format!("{mode} {size} {} rep {}", sys.name, rep + 1));
                    let tracked = sys.heap().is_some() && measure::reset_peak_rss();
                    let rep = run_calls(sys, size, counts[i], opts, work)
                        .map_err(|e| format!("{} at {size}: {e}", sys.name))?;
                    let ns = rep.ns;
                    cpus[i].push(rep.cpu_ns);
                    calls[i].extend(rep.per_call);
                    if tracked {
                        let (hwm, _) = measure::rss();
                        let p = peaks[i].get_or_insert((rss_start, 0));
                        p.1 = p.1.max(hwm);
                    }
                    totals[i].push(ns);
                    bar.inc(1);
                }
            }
            for (i, sys) in present.iter().enumerate() {
                let n = counts[i];
                let total = median(&mut totals[i].clone());
                let per_call = &mut calls[i];
                per_call.sort_unstable();
                let row = Row {
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
                    absent: None,
                    rss_before: peaks[i].map(|p| p.0),
                    peak_rss: peaks[i].map(|p| p.1),
                };
                bar.suspend(|| println!("{}", row.seed_line()));
                mr.rows.push(row);
            }
            for sys in systems.iter().filter(|s| s.absent.is_some()) {
                let row = Row::absent(mode, sys.name, size, sys.absent.clone().unwrap_or_default());
                bar.suspend(|| println!("{}", row.seed_line()));
                mr.rows.push(row);
            }
            // The worker's zeroing throughput during this size, beside one-thread memset.
            if let (Some(before), Some(h)) = (
                before,
                systems[0].heap().filter(|_| systems[0].name == "pagepool"),
            ) {
                h.flush();
                let after = h.stats();
                let bytes = after.worker_bytes - before.worker_bytes;
                let nanos = after.worker_nanos - before.worker_nanos;
                // Below a few MiB the figure is timer noise (small releases are zeroed inline).
                if nanos > 0 && bytes >= 16 << 20 {
                    // The reference, measured again now: the best one-thread zeroing of any
                    // method, in this and the run's first measurement (a reference lowered by a
                    // noisy neighbour would flatter the worker).
                    let again = measure::bandwidth(size, Duration::from_millis(100));
                    let (best, method) = if again.single > b.single {
                        (again.single, again.single_method)
                    } else {
                        (b.single, b.single_method)
                    };
                    mr.worker.push(WorkerFigure {
                        size,
                        bytes,
                        bytes_per_sec: bytes as f64 * 1e9 / nanos as f64,
                        best_single: best,
                        best_method: method,
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
        report.modes.push(mr);
    }
    bar.finish_and_clear();
    for sys in &systems {
        if let Some(h) = sys.heap() {
            let st = h.stats();
            println!("== {} heap statistics ==\n{st}", sys.name);
            report.heap_stats.push((sys.name.to_string(), st));
        }
    }
    let pool_limit = systems
        .iter()
        .find(|s| s.name == "pagepool")
        .and_then(System::heap)
        .map(|h| h.owner().limit_pages() * pagepool::page_size());
    print!("{}", report.memory_summary(pool_limit));
    println!(
        "heap-bench: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report.svg(&names)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
