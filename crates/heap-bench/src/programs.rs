//! The programs mode: real workloads (`programs/workloads.py`: numpy's `np.zeros` paced by
//! Python work and back to back, numpy arithmetic, Pillow, `lzma`, `zstandard`, an SQLite
//! index build) in a Python process each, under glibc alone and under each preload (the
//! drop-in, Debian's mimalloc and jemalloc), interleaved, `--reps` times (median). Per
//! workload and preload: the workload's time and the process's CPU time (every thread, the
//! drop-in's worker included), as the script measures them, and its peak resident memory
//! (`wait4`'s `ru_maxrss`). Every run's check value must equal glibc's.
//!
//! The Python is `--python`, else `target/programs/venv/bin/python` beside this binary's
//! target directory (`programs/setup` makes it); the drop-in is `libpagepool_preload.so` beside
//! this binary (`cargo build --release -p pagepool-preload`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;

use crate::report::Report;

/// The workloads' script.
const SCRIPT: &str = include_str!("../../../programs/workloads.py");

/// The preloads, in table order; `glibc` is none.
pub const PRELOADS: [&str; 4] = ["glibc", "pagepool", "mimalloc", "jemalloc"];

/// Debian's preloads (`libmimalloc2.0`, `libjemalloc2`).
const MIMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2";
const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

/// One workload: the script's name for it, its argument (a size, or 0), and how the table
/// names it.
#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    arg: usize,
}

impl Workload {
    fn label(&self) -> String {
        if self.arg == 0 {
            self.name.to_string()
        } else {
            format!("{} {}M", self.name, self.arg >> 20)
        }
    }
}

fn workloads() -> Vec<Workload> {
    let mut w = Vec::new();
    for name in ["zeros-paced", "zeros-floor", "zeros-tight"] {
        for mib in [1, 8, 32] {
            w.push(Workload {
                name,
                arg: mib << 20,
            });
        }
    }
    for name in ["arithmetic", "pillow", "lzma", "zstd", "sqlite"] {
        w.push(Workload { name, arg: 0 });
    }
    w
}

/// One workload under one preload (medians over the repetitions).
#[derive(Debug, Clone, Serialize)]
pub struct ProgramRow {
    /// The workload, as the table names it.
    pub workload: String,
    /// The preload (`glibc`: none).
    pub preload: String,
    /// The workload's seconds.
    pub seconds: f64,
    /// The process's CPU seconds over the workload.
    pub cpu_seconds: f64,
    /// The process's peak resident memory, KiB.
    pub peak_rss_kib: u64,
    /// Why the row did not run (a preload not installed), if it did not.
    pub absent: Option<String>,
}

/// What one run gave: seconds, CPU seconds, peak RSS KiB, the check value.
type Run = (f64, f64, u64, String);

/// Runs `w` once in `python` with `preload` (or none).
fn run_one(
    python: &Path,
    script: &Path,
    w: &Workload,
    preload: Option<&Path>,
) -> Result<Run, String> {
    let mut cmd = Command::new(python);
    cmd.arg(script).arg(w.name).arg(w.arg.to_string());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PAGEPOOL_") {
            cmd.env_remove(k);
        }
    }
    match preload {
        Some(p) => cmd.env("LD_PRELOAD", p),
        None => cmd.env_remove("LD_PRELOAD"),
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let mut status = 0;
    // SAFETY: wait4 on our own child, with valid out-pointers; it reaps the child (the `Child`
    // is dropped after without waiting again).
    let ru = unsafe {
        let mut ru = std::mem::zeroed::<libc::rusage>();
        if libc::wait4(child.id() as i32, &mut status, 0, &mut ru) < 0 {
            return Err(format!("wait4: {}", std::io::Error::last_os_error()));
        }
        ru
    };
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!(
            "{} under {}: status {status}: {}",
            w.label(),
            preload.map_or("glibc".into(), |p| p.display().to_string()),
            err.lines().last().unwrap_or("")
        ));
    }
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .map_err(|e| format!("{}: output {out:?}: {e}", w.label()))?;
    let f = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("{}: no {k} in {out:?}", w.label()))
    };
    Ok((
        f("seconds")?,
        f("cpu_seconds")?,
        ru.ru_maxrss as u64,
        v["check"].to_string(),
    ))
}

/// The Python to use (see the module).
fn python(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/release/heap-bench -> target/programs/venv/bin/python
    let venv = exe
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("programs/venv/bin/python"));
    match venv {
        Some(p) if p.exists() => Ok(p),
        _ => Err(
            "programs mode: no Python with numpy: run programs/setup (it makes \
                  target/programs/venv), or name one with --python"
                .into(),
        ),
    }
}

/// The drop-in beside this binary; an error naming the build command if it is missing.
fn drop_in() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let so = exe.with_file_name("libpagepool_preload.so");
    if !so.exists() {
        return Err(format!(
            "programs mode: no drop-in at {}: cargo build --release -p pagepool-preload",
            so.display()
        ));
    }
    Ok(so)
}

/// The preload's library, or why its row is absent.
fn library(preload: &str, drop_in: &Path) -> Result<Option<PathBuf>, String> {
    let path = match preload {
        "glibc" => return Ok(None),
        "pagepool" => drop_in.to_path_buf(),
        "mimalloc" => PathBuf::from(MIMALLOC),
        _ => PathBuf::from(JEMALLOC),
    };
    if path.exists() {
        Ok(Some(path))
    } else {
        Err(format!(
            "{} not installed (programs/setup installs it)",
            path.display()
        ))
    }
}

/// Runs the mode: every workload under every preload, `reps` times, interleaved.
pub fn run_mode(
    python_arg: Option<&Path>,
    reps: usize,
    bar: &indicatif::ProgressBar,
    report: &mut Report,
) -> Result<(), String> {
    println!("== mode: programs ==");
    let started = Instant::now();
    let python = python(python_arg)?;
    let drop_in = drop_in()?;
    println!(
        "programs: Python {}, the drop-in {}",
        python.display(),
        drop_in.display()
    );
    let dir = std::env::temp_dir().join(format!("heap-bench-programs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let script = dir.join("workloads.py");
    std::fs::write(&script, SCRIPT).map_err(|e| e.to_string())?;
    let libs: Vec<Result<Option<PathBuf>, String>> =
        PRELOADS.iter().map(|p| library(p, &drop_in)).collect();
    let mut rows = Vec::new();
    for w in workloads() {
        // The floor is allocation-free: glibc alone.
        let preloads: &[&str] = if w.name == "zeros-floor" {
            &PRELOADS[..1]
        } else {
            &PRELOADS
        };
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); preloads.len()];
        for _ in 0..reps {
            for (i, p) in preloads.iter().enumerate() {
                bar.set_message(format!("programs {} {p}", w.label()));
                if let Ok(lib) = &libs[i] {
                    runs[i].push(run_one(&python, &script, &w, lib.as_deref())?);
                }
                bar.inc(1);
            }
        }
        let glibc_check = runs[0].first().map(|r| r.3.clone());
        for (i, p) in preloads.iter().enumerate() {
            if let Some(bad) = runs[i].iter().find(|r| Some(&r.3) != glibc_check.as_ref()) {
                return Err(format!(
                    "programs: {} under {p} computed {}, under glibc {:?}",
                    w.label(),
                    bad.3,
                    glibc_check
                ));
            }
            let mut r = runs[i].clone();
            r.sort_by(|a, b| a.0.total_cmp(&b.0));
            let m = r.get(r.len() / 2);
            rows.push(ProgramRow {
                workload: w.label(),
                preload: p.to_string(),
                seconds: m.map_or(f64::NAN, |m| m.0),
                cpu_seconds: m.map_or(f64::NAN, |m| m.1),
                peak_rss_kib: m.map_or(0, |m| m.2),
                absent: libs[i].as_ref().err().cloned(),
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    bar.suspend(|| print!("{}", summary(&rows)));
    report.programs.extend(rows);
    println!(
        "== mode programs: {:.1} s ==",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The tables: per workload and preload, time (x = glibc's over the row's: above 1, faster
/// than glibc), CPU (x = the row's over glibc's: below 1, less CPU) and peak RSS; then the
/// paced `np.zeros` rows against the best of the three others and the floor.
fn summary(rows: &[ProgramRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "== summary: programs (seconds of the workload; time (x) = glibc / row, above 1 faster; \
         CPU (x) = row / glibc, below 1 less; peak RSS MiB) ==\n",
    );
    let _ = writeln!(
        out,
        "  {:<16} {:>26} {:>26} {:>26} {:>26}",
        "workload", "glibc", "pagepool", "mimalloc", "jemalloc"
    );
    let mut labels: Vec<&str> = Vec::new();
    for r in rows {
        if !labels.contains(&r.workload.as_str()) {
            labels.push(&r.workload);
        }
    }
    let find = |w: &str, p: &str| rows.iter().find(|r| r.workload == w && r.preload == p);
    for w in &labels {
        let g = find(w, "glibc");
        let _ = write!(out, "  {w:<16}");
        for p in PRELOADS {
            let cell = match (find(w, p), g) {
                (Some(r), _) if r.absent.is_some() => "absent".to_string(),
                (Some(r), Some(g)) if p != "glibc" => format!(
                    "{:.3}s ({:.2}x) cpu {:.2}x {}M",
                    r.seconds,
                    g.seconds / r.seconds,
                    r.cpu_seconds / g.cpu_seconds,
                    r.peak_rss_kib >> 10
                ),
                (Some(r), _) => format!(
                    "{:.3}s cpu {:.3}s {}M",
                    r.seconds,
                    r.cpu_seconds,
                    r.peak_rss_kib >> 10
                ),
                (None, _) => "-".to_string(),
            };
            let _ = write!(out, " {cell:>26}");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "-- paced np.zeros: pagepool against the best of glibc, mimalloc and jemalloc, and the floor (one buffer allocated once) --"
    );
    for mib in [1, 8, 32] {
        let w = format!("zeros-paced {mib}M");
        let best = ["glibc", "mimalloc", "jemalloc"]
            .iter()
            .filter_map(|p| {
                find(&w, p)
                    .filter(|r| r.absent.is_none())
                    .map(|r| (p, r.seconds))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let pp = find(&w, "pagepool").map(|r| r.seconds);
        let floor = find(&format!("zeros-floor {mib}M"), "glibc").map(|r| r.seconds);
        if let (Some((bp, bs)), Some(pp), Some(floor)) = (best, pp, floor) {
            let _ = writeln!(
                out,
                "  {mib:>2} MiB: pagepool {pp:.3}s, best other {bp} {bs:.3}s: {:.2}x; floor {floor:.3}s: pagepool at {:.2}x the floor",
                bs / pp,
                pp / floor
            );
        }
    }
    out
}

/// Progress bar steps of the mode at `reps` repetitions.
pub fn steps(reps: usize) -> u64 {
    workloads()
        .iter()
        .map(|w| {
            if w.name == "zeros-floor" {
                1
            } else {
                PRELOADS.len()
            }
        })
        .sum::<usize>() as u64
        * reps as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_and_labels() {
        let w = workloads();
        assert_eq!(w.len(), 14);
        assert_eq!(w[0].label(), "zeros-paced 1M");
        assert_eq!(w[13].label(), "sqlite");
        assert_eq!(steps(1), 11 * 4 + 3);
        assert!(SCRIPT.contains("def zeros_paced"));
    }
}
