//! The realloc mode: a buffer grown by `realloc`, writing one byte per page of each new part as
//! it grows, then freed: by doubling from 4 KiB to 256 MiB, and by steps of 64 KiB from 64 KiB
//! to 32 MiB (SQLite grows its page cache so); through pagepool's allocator layer (the global
//! allocator and the C library) and the allocators a program would use instead (glibc's
//! `realloc`, mimalloc's, jemalloc's). ns per whole growth, the median of the repetitions,
//! rows interleaved within each repetition.

use std::alloc::{GlobalAlloc, Layout};
use std::time::Instant;

use mimalloc::MiMalloc;
use serde::Serialize;
use tikv_jemallocator::Jemalloc;

use crate::report::Report;
use crate::systems::POOL_ALLOC;

/// The mode's rows, in table order; ratios are peer / `pagepool-alloc`.
pub const ROWS: [&str; 5] = [
    "pagepool-alloc",
    "pagepool-c",
    "calloc",
    "mimalloc",
    "jemalloc",
];

/// The growth patterns: name, first size, how the next size follows, last size.
pub const PATTERNS: [(&str, usize, Step, usize); 2] = [
    (
        "doubling 4 KiB to 256 MiB",
        4 << 10,
        Step::Double,
        256 << 20,
    ),
    (
        "steps of 64 KiB to 32 MiB",
        64 << 10,
        Step::Add(64 << 10),
        32 << 20,
    ),
];

/// How a growing buffer's next size follows from its size.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// Twice the size.
    Double,
    /// The size plus this many bytes.
    Add(usize),
}

impl Step {
    fn next(self, size: usize) -> usize {
        match self {
            Step::Double => size * 2,
            Step::Add(n) => size + n,
        }
    }
}

/// Repetitions per row (the median is reported).
pub const REPS: usize = 5;

/// One row of the realloc mode.
#[derive(Debug, Clone, Serialize)]
pub struct GrowthRow {
    /// The pattern (see [`PATTERNS`]).
    pub pattern: String,
    /// The system.
    pub system: String,
    /// The median ns per whole growth (every realloc, the writes, the free).
    pub ns: f64,
    /// Each repetition's ns.
    pub runs: Vec<f64>,
    /// Reallocs per growth.
    pub reallocs: usize,
}

/// Grows one buffer by `pattern` with `system`, writing one byte per page of each new part;
/// returns the ns it took, or why it failed (a null pointer, contents lost).
fn grow(system: &str, first: usize, step: Step, last: usize) -> Result<f64, String> {
    let t = Instant::now();
    let mut size = first;
    let mut p = alloc(system, size)?;
    touch(p, 0, size);
    while size < last {
        let next = step.next(size).min(last);
        p = realloc(system, p, size, next)?;
        // The first byte of every page written so far is still there.
        // SAFETY: `p` holds `next` bytes, of which the first `size` were written below.
        if unsafe { p.read() } != 1 || unsafe { p.add(size - 1).read() } != 0 {
            return Err(format!("{system}: contents lost growing to {next} bytes"));
        }
        touch(p, size, next);
        size = next;
    }
    free(system, p, size);
    Ok(t.elapsed().as_nanos() as f64)
}

/// Writes 1 to the first byte of every 4 KiB page in `from..to` of `p`, and 0 to its last byte
/// (`from` and `to` are multiples of 4 KiB, as every size of the patterns is, so the last byte
/// starts no page).
fn touch(p: *mut u8, from: usize, to: usize) {
    let mut off = from;
    while off < to {
        // SAFETY: `off < to`, within the buffer of `to` bytes at `p`.
        unsafe { p.add(off).write_volatile(1) };
        off += 4096;
    }
    // SAFETY: `to - 1` is within the buffer.
    unsafe { p.add(to - 1).write_volatile(0) };
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 16).expect("sizes are far below isize::MAX")
}

fn alloc(system: &str, size: usize) -> Result<*mut u8, String> {
    // SAFETY: a non-zero size; each pointer is released by `free` with the same system.
    let p = unsafe {
        match system {
            "pagepool-alloc" => POOL_ALLOC.alloc(layout(size)),
            "pagepool-c" => pagepool_c::pagepool_malloc(size).cast(),
            "calloc" => libc::malloc(size).cast(),
            "mimalloc" => MiMalloc.alloc(layout(size)),
            _ => Jemalloc.alloc(layout(size)),
        }
    };
    if p.is_null() {
        Err(format!("{system}: no memory for {size} bytes"))
    } else {
        Ok(p)
    }
}

fn realloc(system: &str, p: *mut u8, size: usize, next: usize) -> Result<*mut u8, String> {
    // SAFETY: `p` is the live buffer of `size` bytes from `alloc` or an earlier `realloc` of
    // the same system; on success it is replaced by the result.
    let q = unsafe {
        match system {
            "pagepool-alloc" => POOL_ALLOC.realloc(p, layout(size), next),
            "pagepool-c" => pagepool_c::pagepool_realloc(p.cast(), next).cast(),
            "calloc" => libc::realloc(p.cast(), next).cast(),
            "mimalloc" => MiMalloc.realloc(p, layout(size), next),
            _ => Jemalloc.realloc(p, layout(size), next),
        }
    };
    if q.is_null() {
        Err(format!("{system}: realloc to {next} bytes failed"))
    } else {
        Ok(q)
    }
}

fn free(system: &str, p: *mut u8, size: usize) {
    // SAFETY: the live buffer of `size` bytes of that system, not used afterwards.
    unsafe {
        match system {
            "pagepool-alloc" => POOL_ALLOC.dealloc(p, layout(size)),
            "pagepool-c" => pagepool_c::pagepool_free(p.cast()),
            "calloc" => libc::free(p.cast()),
            "mimalloc" => MiMalloc.dealloc(p, layout(size)),
            _ => Jemalloc.dealloc(p, layout(size)),
        }
    }
}

/// Runs the mode: a warm-up growth per row, then [`REPS`] repetitions with the rows
/// interleaved; prints each row and the summary, and adds the rows to `report`.
pub fn run_mode(bar: &indicatif::ProgressBar, report: &mut Report) -> Result<(), String> {
    println!("== mode: realloc ==");
    let started = Instant::now();
    for (name, first, step, last) in PATTERNS {
        let mut reallocs = 0;
        let mut s = first;
        while s < last {
            s = step.next(s).min(last);
            reallocs += 1;
        }
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); ROWS.len()];
        for rep in 0..=REPS {
            for (i, system) in ROWS.iter().enumerate() {
                bar.set_message(format!("realloc {name} {system}"));
                let ns = grow(system, first, step, last)?;
                if rep > 0 {
                    runs[i].push(ns); // the first is the warm-up
                }
                bar.inc(1);
            }
        }
        let rows: Vec<GrowthRow> = ROWS
            .iter()
            .zip(runs)
            .map(|(system, runs)| {
                let mut sorted = runs.clone();
                sorted.sort_by(f64::total_cmp);
                GrowthRow {
                    pattern: name.to_string(),
                    system: system.to_string(),
                    ns: sorted[sorted.len() / 2],
                    runs,
                    reallocs,
                }
            })
            .collect();
        bar.suspend(|| print!("{}", summary(name, reallocs, &rows)));
        report.growth.extend(rows);
    }
    println!(
        "== mode realloc: {:.1} s ==",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One pattern's table: ns per growth and per realloc, (x) = peer / pagepool-alloc.
fn summary(pattern: &str, reallocs: usize, rows: &[GrowthRow]) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "== summary: realloc, {pattern} ({reallocs} reallocs, one byte written per new page; \
         ns per growth, median of {REPS}; (x) = peer / pagepool-alloc: above 1 means pagepool \
         is faster) ==\n"
    );
    let base = rows
        .iter()
        .find(|r| r.system == "pagepool-alloc")
        .map(|r| r.ns);
    for r in rows {
        let ratio = match base {
            Some(b) if r.system != "pagepool-alloc" && b > 0.0 => format!(" ({:.2}x)", r.ns / b),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:>16} {:>14.0}{ratio:<9} {:>10.0} ns per realloc",
            r.system,
            r.ns,
            r.ns / reallocs as f64
        );
    }
    out
}

/// Progress bar steps of the mode: a warm-up and [`REPS`] repetitions per row and pattern.
pub fn steps() -> u64 {
    (PATTERNS.len() * ROWS.len() * (REPS + 1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_grows_and_keeps_its_contents() {
        for system in ROWS {
            grow(system, 4 << 10, Step::Double, 4 << 20).unwrap();
            grow(system, 64 << 10, Step::Add(64 << 10), 2 << 20).unwrap();
        }
    }
}
