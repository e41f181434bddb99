//! The sparse mode: `calloc` a buffer, write a fraction of its pages (one byte each, spread
//! evenly), free it; the whole process's CPU time per call (every thread: pagepool's worker
//! included, and its zeroing of the last buffers waited for at the end), beside the wall time,
//! for the allocator layer and glibc's `calloc`. glibc hands out fresh pages a `calloc` never
//! touches (a fault per page written, nothing for the rest), so where few pages are written it
//! pays little; a pool that zeroes whole buffers pays for every page. The `write-tracking` row
//! is one block under userfaultfd write-protection, cleaned by `PAGEMAP_SCAN` of what was
//! written (`tracking.rs`): what the pools would pay if they tracked writes.

use std::time::Instant;

use serde::Serialize;

use crate::report::Report;

/// The mode's rows; ratios are the row's CPU over glibc's.
pub const ROWS: [&str; 4] = ["pagepool-alloc", "pagepool-c", "write-tracking", "calloc"];

/// The buffer size.
pub const SIZE: usize = 32 << 20;

/// The fractions of pages written: every page, 1 in 4, 1 in 32, 1 in 256.
pub const EVERY: [usize; 4] = [1, 4, 32, 256];

/// Calls per repetition, and repetitions (the median is reported).
pub const CALLS: usize = 50;
/// See [`CALLS`].
pub const REPS: usize = 3;

/// One row of the sparse mode.
#[derive(Debug, Clone, Serialize)]
pub struct SparseRow {
    /// The system.
    pub system: String,
    /// One page in this many written.
    pub every: usize,
    /// The buffer size.
    pub size: usize,
    /// The whole process's CPU ns per call (median of the repetitions).
    pub cpu_ns: f64,
    /// Wall-clock ns per call (the same repetition).
    pub wall_ns: f64,
}

/// `calls` calls of `system`, writing one page in `every`; then the pools' pending zeroing,
/// waited for. Returns (CPU ns, wall ns) per call.
fn run(system: &str, every: usize, calls: usize) -> Result<(f64, f64), String> {
    if system == "write-tracking" {
        return run_tracked(every, calls);
    }
    let (c0, t0) = (crate::measure::process_cpu_ns(), Instant::now());
    for _ in 0..calls {
        let p: *mut u8 = match system {
            "pagepool-alloc" => {
                // SAFETY: a non-zero layout; released below with the same one.
                unsafe {
                    std::alloc::GlobalAlloc::alloc_zeroed(&crate::systems::POOL_ALLOC, layout())
                }
            }
            "pagepool-c" => pagepool_c::pagepool_calloc(SIZE, 1).cast(),
            // SAFETY: calloc has no preconditions.
            _ => unsafe { libc::calloc(SIZE, 1) }.cast(),
        };
        if p.is_null() {
            return Err(format!("{system}: no memory for {SIZE} bytes"));
        }
        let mut off = 0;
        while off < SIZE {
            // SAFETY: `off < SIZE`, within the buffer.
            unsafe { p.add(off).write_volatile(1) };
            off += 4096 * every;
        }
        // SAFETY: the buffer allocated above, by the same system, no longer used.
        unsafe {
            match system {
                "pagepool-alloc" => {
                    std::alloc::GlobalAlloc::dealloc(&crate::systems::POOL_ALLOC, p, layout())
                }
                "pagepool-c" => pagepool_c::pagepool_free(p.cast()),
                _ => libc::free(p.cast()),
            }
        }
    }
    match system {
        "pagepool-alloc" => crate::systems::POOL_ALLOC.flush(),
        "pagepool-c" => pagepool_c::flush(),
        _ => {}
    }
    let (cpu, wall) = (
        (crate::measure::process_cpu_ns() - c0) as f64,
        t0.elapsed().as_nanos() as f64,
    );
    Ok((cpu / calls as f64, wall / calls as f64))
}

/// The `write-tracking` row: one tracked block, written as the others are, cleaned after each
/// call (zeroing what was written). Where the kernel cannot track writes, the row's times are
/// NaN (printed as such) and the error is said once.
fn run_tracked(every: usize, calls: usize) -> Result<(f64, f64), String> {
    let mut block = match crate::tracking::TrackedBlock::new(SIZE) {
        Ok(b) => b,
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| eprintln!("sparse: no write tracking here ({e}): row left empty"));
            return Ok((f64::NAN, f64::NAN));
        }
    };
    let (c0, t0) = (crate::measure::process_cpu_ns(), Instant::now());
    for _ in 0..calls {
        let p = block.ptr();
        let mut off = 0;
        while off < SIZE {
            // SAFETY: `off < SIZE`, within the block.
            unsafe { p.add(off).write_volatile(1) };
            off += 4096 * every;
        }
        block.clean().map_err(|e| format!("write-tracking: {e}"))?;
    }
    let (cpu, wall) = (
        (crate::measure::process_cpu_ns() - c0) as f64,
        t0.elapsed().as_nanos() as f64,
    );
    Ok((cpu / calls as f64, wall / calls as f64))
}

fn layout() -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(SIZE, 4096).expect("a valid layout")
}

/// Runs the mode: per fraction, a warm-up repetition per row, then [`REPS`] with the rows
/// interleaved; prints the summary and adds the rows to `report`.
pub fn run_mode(bar: &indicatif::ProgressBar, report: &mut Report) -> Result<(), String> {
    println!("== mode: sparse ==");
    let started = Instant::now();
    let mut rows = Vec::new();
    for every in EVERY {
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); ROWS.len()];
        for rep in 0..=REPS {
            for (i, system) in ROWS.iter().enumerate() {
                bar.set_message(format!("sparse 1/{every} {system}"));
                let r = run(system, every, CALLS)?;
                if rep > 0 {
                    runs[i].push(r);
                }
                bar.inc(1);
            }
        }
        for (system, mut r) in ROWS.iter().zip(runs) {
            r.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (cpu_ns, wall_ns) = r[r.len() / 2];
            rows.push(SparseRow {
                system: system.to_string(),
                every,
                size: SIZE,
                cpu_ns,
                wall_ns,
            });
        }
    }
    bar.suspend(|| print!("{}", summary(&rows)));
    report.sparse.extend(rows);
    println!(
        "== mode sparse: {:.1} s ==",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The table: CPU and wall ns per call, (x) = the row's CPU over glibc's (below 1: pagepool
/// spends less).
fn summary(rows: &[SparseRow]) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "== summary: sparse (calloc {} MiB, write one page in N, free; the process's CPU ns per \
         call, every thread, the worker's zeroing included; (x) = CPU / glibc's) ==\n",
        SIZE >> 20
    );
    for every in EVERY {
        let glibc = rows
            .iter()
            .find(|r| r.every == every && r.system == "calloc")
            .map(|r| r.cpu_ns);
        for r in rows.iter().filter(|r| r.every == every) {
            let ratio = match glibc {
                Some(g) if r.system != "calloc" && g > 0.0 => format!(" ({:.2}x)", r.cpu_ns / g),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  1/{every:<4} {:>16} CPU {:>12.0}{ratio:<9} wall {:>12.0}",
                r.system, r.cpu_ns, r.wall_ns
            );
        }
    }
    out
}

/// Progress bar steps of the mode.
pub fn steps() -> u64 {
    (EVERY.len() * ROWS.len() * (REPS + 1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_runs_at_every_fraction() {
        for system in ROWS {
            for every in EVERY {
                let (cpu, wall) = run(system, every, 2).unwrap();
                if system == "write-tracking" && cpu.is_nan() {
                    continue; // said on stderr: the kernel cannot track writes
                }
                assert!(cpu >= 0.0 && wall > 0.0, "{system} 1/{every}");
            }
        }
    }
}
