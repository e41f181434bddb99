//! How a row is measured: its calls, timed one by one or in batches; its call count and
//! repetitions; and every system's row at one size, warmed up, calibrated and repeated in
//! interleaved order.

use std::time::{Duration, Instant};

use crate::Args;
use crate::measure::{self, Switch, ThreadSwitches};
use crate::report::{Row, Switches};
use crate::systems::{CallOpts, System};
use crate::team::Team;

/// The warmed calls, in time spent in calls, whose mean sets a row's call count.
const CALIBRATE: Duration = Duration::from_millis(20);
/// The most calls calibration makes (tiny calls add up to `CALIBRATE` slowly).
const CALIBRATE_MAX: usize = 20_000;
/// The fewest calls a repetition of a row times.
const MIN_CALLS: usize = 200;
/// Repetitions of a row at a size under [`BATCHED_BELOW`] by default.
pub const SMALL_REPS: usize = 9;

/// How many repetitions every row of a size makes by default: two, or [`SMALL_REPS`] at the
/// sizes whose calls are timed in batches (under [`BATCHED_BELOW`]). There a repetition of the
/// seed's 5000 calls is short, and one slow moment of the machine decided the slower of two
/// (docs/BENCHMARKS.md, heap-bench); the median of nine is steadier. The same for every system
/// of the size, in this process and in the tuned peers' child, whatever its speed.
pub fn reps_for_size(size: usize) -> usize {
    if size < BATCHED_BELOW { SMALL_REPS } else { 2 }
}

/// A row's repetitions: `planned` (every row's at its size), but one for a row whose fewest
/// calls take more than its whole budget, when `--iters` does not force the count (a slow
/// row, e.g. fresh pages at 32 MiB, would otherwise take most of the run's time). `est_ns` is
/// the calibrated time of one call.
pub fn row_reps(est_ns: f64, planned: usize, budget_ms: u64, iters_forced: bool) -> usize {
    if !iters_forced && est_ns * MIN_CALLS as f64 > budget_ms as f64 * 1e6 {
        1
    } else {
        planned
    }
}

pub fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// What one repetition of a row measured.
pub struct Rep {
    /// Time spent in the calls (excluding paced work), in ns.
    pub ns: u64,
    /// Per-call times, in ns: every call's, or, where calls are too short to time one by one
    /// (`BATCHED_BELOW`), each batch of `BATCH` calls' mean, once per call of the batch.
    pub per_call: Vec<u64>,
    /// CPU time of the whole process (all threads, user + system) over the repetition, in ns.
    pub cpu_ns: u64,
    /// With `--switches`, what happened to the calling thread during each call, in the order
    /// of `per_call`; else empty.
    pub how: Vec<Switch>,
}

/// Sizes below which tight calls are timed in batches: there a call costs only a few clock
/// reads, and reading the clock around each would weigh on it.
pub const BATCHED_BELOW: usize = 64 << 10;
/// Calls per timed batch there.
const BATCH: usize = 50;

/// Runs `n` calls, with `work` after each. With `switches`, each call is timed alone (never in
/// a batch) and the calling thread's context switches are read around it, outside the timed
/// span (the CPU time counts the reads).
pub fn run_calls(
    sys: &System,
    size: usize,
    n: usize,
    opts: CallOpts,
    work: Duration,
    switches: bool,
) -> Result<Rep, String> {
    let cpu0 = measure::process_cpu_ns();
    let mut per_call = Vec::with_capacity(n);
    let mut how = Vec::with_capacity(if switches { n } else { 0 });
    let mut total = 0u64;
    if work.is_zero() && size < BATCHED_BELOW && !switches {
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
            let before = switches.then(ThreadSwitches::now);
            let t = Instant::now();
            sys.call(size, opts)?;
            let ns = t.elapsed().as_nanos() as u64;
            if let Some(before) = before {
                how.push(before.until(ThreadSwitches::now()));
            }
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
        how,
    })
}

/// What a size's rows share, in every mode of calls.
pub struct SizePlan<'a> {
    pub mode: &'a str,
    pub size: usize,
    pub opts: CallOpts,
    /// Work between calls (zero but in the paced and loaded modes).
    pub work: Duration,
    /// Threads mode: how many threads share each system.
    pub threads: Option<usize>,
    /// Resident set size before the size's first call, pools empty.
    pub rss_start: u64,
    /// `--switches`: every call timed alone, the thread's context switches read around it.
    pub switches: bool,
}

/// Measures every system of `present` at one size, by the benchmark's rules: each warmed up and
/// calibrated, then the repetitions in interleaved order, rotated each repetition. One row per
/// system, in `present`'s order, without settings. With `absent_on_failure`, a system whose
/// warm-up fails (e.g. `mlock` past `RLIMIT_MEMLOCK`) gets an absent row saying why, instead of
/// failing the run.
pub fn measure_size(
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
        switches,
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
        let warmed = run_calls(sys, size, 3, opts, work, switches).and_then(|_| {
            let (mut ns, mut calls) = (0u64, 0usize);
            while ns < CALIBRATE.as_nanos() as u64 && calls < CALIBRATE_MAX {
                ns += run_calls(sys, size, 1, opts, work, switches)?.ns;
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
    // thread's share of 5000 at 4 KiB lasted about as long as one wake-up of a thread, and
    // the rates of one system ranged widely: docs/BENCHMARKS.md, heap-bench, threads-T.)
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
    let mut hows: Vec<Vec<Switch>> = vec![Vec::new(); present.len()];
    let mut peaks: Vec<Option<(u64, u64)>> = vec![None; present.len()];
    std::thread::scope(|scope| -> Result<(), String> {
        // Threads mode: each system's team, warmed by a quarter of a repetition's calls per thread
        // (at least three) before the first timed one.
        let mut teams: Vec<Option<Team>> = Vec::new();
        for (i, sys) in present.iter().enumerate() {
            let team = match threads {
                Some(t) if failed[i].is_none() => {
                    bar.set_message(format!("{mode} {size} {} threads warm-up", sys.name));
                    let team = Team::start(scope, sys, size, opts, t, switches);
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
                        run_calls(sys, size, counts[i], opts, work, switches).map_err(fail)?,
                        None,
                    ),
                };
                cpus[i].push(rep.cpu_ns);
                calls[i].extend(rep.per_call);
                hows[i].extend(rep.how);
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
        let switched = switches.then(|| Switches::of(&calls[i], &hows[i]));
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
            switches: switched,
        });
    }
    Ok(rows)
}

/// The value at fraction `q` of sorted `v` (0 when empty).
pub fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
