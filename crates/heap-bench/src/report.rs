//! What a run found: the seed-format lines, the summary tables, memory, JSON and the SVG chart.

use std::fmt::Write as _;

use serde::Serialize;

use crate::measure::{Bandwidth, TouchFloor};
use crate::systems::CallOpts;

/// One system at one size in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `tight` or `paced`.
    pub mode: String,
    /// The system's name.
    pub system: String,
    /// Buffer size in bytes.
    pub size: usize,
    /// Calls per repetition.
    pub iters: usize,
    /// Each repetition's total time in the calls, in ns.
    pub reps_ns: Vec<u64>,
    /// The median repetition's total, in ns.
    pub total_ns: u64,
    /// `total_ns / iters`: the mean time per call.
    pub ns_per_call: f64,
    /// Median time per call over every repetition's calls, in ns (tight calls under 64 KiB
    /// are timed in batches of 50: their batch's mean).
    pub p50_ns: u64,
    /// 99th percentile, likewise.
    pub p99_ns: u64,
    /// The slowest call, likewise.
    pub max_ns: u64,
    /// CPU time of the whole process (all threads, user + system; the paced work included)
    /// per call, the median repetition's.
    pub cpu_ns_per_call: f64,
    /// Why the system could not run, if it could not.
    pub absent: Option<String>,
    /// Resident set size before the size's first call, pools empty (pagepool rows), bytes.
    pub rss_before: Option<u64>,
    /// Peak resident set size during the row (pagepool rows), bytes.
    pub peak_rss: Option<u64>,
}

impl Row {
    /// A row for a system that cannot run here.
    pub fn absent(mode: &str, system: &str, size: usize, why: String) -> Row {
        Row {
            mode: mode.into(),
            system: system.into(),
            size,
            iters: 0,
            reps_ns: Vec::new(),
            total_ns: 0,
            ns_per_call: f64::NAN,
            p50_ns: 0,
            p99_ns: 0,
            max_ns: 0,
            cpu_ns_per_call: f64::NAN,
            absent: Some(why),
            rss_before: None,
            peak_rss: None,
        }
    }

    /// The seed's output line.
    pub fn seed_line(&self) -> String {
        match &self.absent {
            Some(why) => format!("{} heap: absent ({why})", self.system),
            None => format!(
                "{} heap: alloc {} bytes {} times in {} ns \t {:.0} ns/call",
                self.system, self.size, self.iters, self.total_ns, self.ns_per_call
            ),
        }
    }
}

/// The worker's zeroing throughput while one size ran.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerFigure {
    /// The size.
    pub size: usize,
    /// Bytes the worker zeroed.
    pub bytes: u64,
    /// Its throughput, bytes per second of zeroing.
    pub bytes_per_sec: f64,
    /// The best one-thread zeroing of resident memory at this size (any method), bytes per
    /// second: the best of the run's first measurement and one made right after the size's rows.
    pub best_single: f64,
    /// The method that gave it.
    pub best_method: &'static str,
}

/// One mode's results.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// `tight` or `paced`.
    pub mode: String,
    /// Work between calls per size (ns; 0 in tight mode).
    pub work_ns: Vec<(usize, u64)>,
    /// Every row.
    pub rows: Vec<Row>,
    /// The worker's throughput per size.
    pub worker: Vec<WorkerFigure>,
}

fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 30 && s % (1 << 30) == 0 => format!("{} GiB", s >> 30),
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

impl ModeReport {
    /// An empty report for `mode`.
    pub fn new(mode: &str) -> ModeReport {
        ModeReport {
            mode: mode.into(),
            work_ns: Vec::new(),
            rows: Vec::new(),
            worker: Vec::new(),
        }
    }

    /// The fastest of the general-purpose allocators at `size`.
    fn fastest_peer(&self, size: usize) -> Option<&Row> {
        ["calloc", "mimalloc", "jemalloc"]
            .iter()
            .filter_map(|s| self.find(s, size))
            .filter(|r| r.absent.is_none())
            .min_by(|a, b| a.ns_per_call.total_cmp(&b.ns_per_call))
    }

    fn find(&self, system: &str, size: usize) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.system == system && r.size == size)
    }

    /// A table of one metric: one row per size, one column per system, with the ratio
    /// peer / pagepool.
    fn metric_table(
        &self,
        what: &str,
        bw: &[(usize, Bandwidth)],
        systems: &[&str],
        metric: fn(&Row) -> f64,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "-- {}: {what} ((x) = peer / pagepool) --", self.mode);
        let _ = write!(out, "{:>8}", "size");
        for s in systems {
            let _ = write!(out, " {s:>20}");
        }
        out.push('\n');
        for &(size, _) in bw {
            let _ = write!(out, "{:>8}", human(size));
            let base = self
                .find("pagepool", size)
                .filter(|r| r.absent.is_none())
                .map(metric);
            for s in systems {
                let cell = match self.find(s, size) {
                    Some(r) if r.absent.is_some() => "absent".to_string(),
                    Some(r) => match base {
                        Some(b) if *s != "pagepool" && b > 0.0 => {
                            format!("{:.0} ({:.2}x)", metric(r), metric(r) / b)
                        }
                        _ => format!("{:.0}", metric(r)),
                    },
                    None => "-".into(),
                };
                let _ = write!(out, " {cell:>20}");
            }
            out.push('\n');
        }
        out
    }

    /// The summary table: one row per size, one column per system (ns/call and the ratio to
    /// pagepool), then the zeroing limit (tight) or the touch floor (paced), and the worker's
    /// throughput.
    pub fn summary(
        &self,
        bw: &[(usize, Bandwidth)],
        floors: &[(usize, TouchFloor)],
        systems: &[&str],
    ) -> String {
        let floor = |size: usize| floors.iter().find(|f| f.0 == size).map(|f| f.1);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== summary: {} (ns/call; (x) = peer / pagepool: above 1 means pagepool is faster) ==",
            self.mode
        );
        let _ = write!(out, "{:>8}", "size");
        for s in systems {
            let _ = write!(out, " {s:>20}");
        }
        if self.mode == "tight" {
            let _ = write!(out, " {:>12} {:>14}", "limit", "pagepool/limit");
        } else if !floors.is_empty() {
            let _ = write!(out, " {:>12} {:>14}", "touch floor", "pagepool/floor");
        }
        out.push('\n');
        for &(size, b) in bw {
            let _ = write!(out, "{:>8}", human(size));
            let base = self.find("pagepool", size).map(|r| r.ns_per_call);
            for s in systems {
                let cell = match self.find(s, size) {
                    Some(r) if r.absent.is_some() => "absent".to_string(),
                    Some(r) => match base {
                        Some(b) if *s != "pagepool" => {
                            format!("{:.0} ({:.2}x)", r.ns_per_call, r.ns_per_call / b)
                        }
                        _ => format!("{:.0}", r.ns_per_call),
                    },
                    None => "-".into(),
                };
                let _ = write!(out, " {cell:>20}");
            }
            if self.mode == "tight" {
                let limit = b.limit_ns(size);
                let ratio = base.map_or(String::from("-"), |p| format!("{:.2}x", p / limit));
                let _ = write!(out, " {limit:>12.0} {ratio:>14}");
            } else if let Some(f) = floor(size) {
                let ratio = base.map_or(String::from("-"), |p| format!("{:.2}x", p / f.min_ns()));
                let _ = write!(out, " {:>12.0} {ratio:>14}", f.min_ns());
            }
            out.push('\n');
        }
        if self.mode == "paced" && !floors.is_empty() {
            let _ = writeln!(
                out,
                "touch floor: the time to write one byte per page of memory already zeroed (by \
                 this thread, or by another with memset or streaming stores, whichever is least, \
                 after the same work between calls; every row makes that write): an estimate of \
                 the least a paced call can cost. The fastest allocator against it, the ratio a \
                 row at the floor would show:"
            );
            for &(size, _) in bw {
                let (Some(f), Some(best)) = (floor(size), self.fastest_peer(size)) else {
                    continue;
                };
                let _ = writeln!(
                    out,
                    "  {}: {} {:.0} ns / floor {:.0} ns = {:.1}x",
                    human(size),
                    best.system,
                    best.ns_per_call,
                    f.min_ns(),
                    best.ns_per_call / f.min_ns()
                );
            }
        }
        for (what, metric) in [
            (
                "p50 ns per call",
                (|r: &Row| r.p50_ns as f64) as fn(&Row) -> f64,
            ),
            ("p99 ns per call", |r: &Row| r.p99_ns as f64),
            ("max ns per call", |r: &Row| r.max_ns as f64),
            (
                "CPU ns per call, whole process (all threads; paced work included)",
                |r: &Row| r.cpu_ns_per_call,
            ),
        ] {
            out.push_str(&self.metric_table(what, bw, systems, metric));
        }
        for w in &self.worker {
            let _ = writeln!(
                out,
                "worker zeroing at {}: {:.1} GB/s over {} MiB; best one-thread zeroing {:.1} GB/s ({}, best of two in this run): {:.0}%",
                human(w.size),
                w.bytes_per_sec / 1e9,
                w.bytes >> 20,
                w.best_single / 1e9,
                w.best_method,
                100.0 * w.bytes_per_sec / w.best_single
            );
        }
        out
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Seconds since the Unix epoch when the run started.
    pub unix_time: u64,
    /// Cores available.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// Whether each call wrote one byte per page / verified zeroes.
    pub touch: bool,
    /// Whether buffers were verified all-zero.
    pub verify: bool,
    /// Zeroing bandwidth per size (each method, and the best).
    pub bandwidth: Vec<(usize, Bandwidth)>,
    /// The touch floor per size (empty with `--no-touch`).
    pub touch_floor: Vec<(usize, TouchFloor)>,
    /// Each mode's results.
    pub modes: Vec<ModeReport>,
    /// Each pagepool heap's statistics at the end.
    pub heap_stats: Vec<(String, pagepool::HeapStats)>,
}

impl Report {
    /// An empty report.
    pub fn new(
        _sizes: &[usize],
        bw: &[(usize, Bandwidth)],
        floors: &[(usize, TouchFloor)],
        opts: CallOpts,
    ) -> Report {
        Report {
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            touch: opts.touch,
            verify: opts.verify,
            bandwidth: bw.to_vec(),
            touch_floor: floors.to_vec(),
            modes: Vec::new(),
            heap_stats: Vec::new(),
        }
    }

    /// Peak resident memory of the pagepool rows against the bound: the RSS before the size's
    /// first call (pools empty), plus the pool maximum, plus two of the row's buffers.
    pub fn memory_summary(&self, pool_limit: Option<usize>) -> String {
        let mut out = String::from("== memory: peak RSS of the pagepool rows ==\n");
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        for m in &self.modes {
            for r in m.rows.iter().filter(|r| r.peak_rss.is_some()) {
                let (before, peak) = (r.rss_before.unwrap_or(0), r.peak_rss.unwrap_or(0));
                let bound = pool_limit.map(|l| before + l as u64 + 2 * r.size as u64);
                let _ = writeln!(
                    out,
                    "{:>6} {:>18} {:>8}: peak {:8.1} MiB (+{:.1} MiB over the size's start){}",
                    m.mode,
                    r.system,
                    human(r.size),
                    mib(peak),
                    mib(peak.saturating_sub(before)),
                    match bound {
                        Some(b) if r.system == "pagepool" => format!(
                            "; bound {:.1} MiB: {}",
                            mib(b),
                            if peak <= b { "within" } else { "OVER" }
                        ),
                        _ => String::new(),
                    }
                );
            }
        }
        out
    }

    /// An SVG chart: one panel per mode, buffer size (log) against ns per call (log), one line
    /// per system.
    pub fn svg(&self, systems: &[&str]) -> String {
        const COLORS: [&str; 9] = [
            "#d62728", "#ff9896", "#e377c2", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf",
            "#7f7f7f",
        ];
        let (pw, ph, ml, mt, mb) = (520.0, 380.0, 80.0, 50.0, 60.0);
        let width = ml + self.modes.len().max(1) as f64 * (pw + ml) + 170.0;
        let height = mt + ph + mb;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let vals: Vec<f64> = self
            .modes
            .iter()
            .flat_map(|m| m.rows.iter())
            .map(|r| r.ns_per_call)
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let lo = vals
            .iter()
            .cloned()
            .fold(f64::INFINITY, f64::min)
            .max(1.0)
            .log10()
            .floor();
        let hi = vals
            .iter()
            .cloned()
            .fold(1.0, f64::max)
            .log10()
            .ceil()
            .max(lo + 1.0);
        let sizes: Vec<usize> = self.bandwidth.iter().map(|b| b.0).collect();
        let (smin, smax) = (
            (*sizes.iter().min().unwrap_or(&4096) as f64).log2(),
            (*sizes.iter().max().unwrap_or(&4096) as f64).log2(),
        );
        let sspan = (smax - smin).max(1.0);
        for (mi, m) in self.modes.iter().enumerate() {
            let x0 = ml + mi as f64 * (pw + ml);
            let x = |size: usize| x0 + ((size as f64).log2() - smin) / sspan * pw;
            let y = |v: f64| mt + ph - (v.log10() - lo) / (hi - lo) * ph;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle" font-size="15" font-weight="bold">{} mode</text>"#,
                x0 + pw / 2.0,
                mt - 20.0,
                m.mode
            );
            let _ = writeln!(
                s,
                r##"<rect x="{x0}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
            );
            for d in (lo as i32)..=(hi as i32) {
                let yy = y(10f64.powi(d));
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" y1="{yy}" x2="{}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">1e{d}</text>"##,
                    x0 + pw,
                    x0 - 6.0,
                    yy + 4.0
                );
            }
            for &sz in &sizes {
                let xx = x(sz);
                let _ = writeln!(
                    s,
                    r##"<line x1="{xx}" y1="{mt}" x2="{xx}" y2="{}" stroke="#eee"/><text x="{xx}" y="{}" text-anchor="middle">{}</text>"##,
                    mt + ph,
                    mt + ph + 16.0,
                    human(sz)
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">buffer size (log scale)</text>"#,
                x0 + pw / 2.0,
                mt + ph + 40.0
            );
            let _ = writeln!(
                s,
                r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">ns per call (log scale, lower is better)</text>"#,
                x0 - 55.0,
                mt + ph / 2.0
            );
            for (si, sys) in systems.iter().enumerate() {
                let pts: Vec<(f64, f64)> = sizes
                    .iter()
                    .filter_map(|&sz| m.find(sys, sz))
                    .filter(|r| r.ns_per_call.is_finite() && r.ns_per_call > 0.0)
                    .map(|r| (x(r.size), y(r.ns_per_call)))
                    .collect();
                let color = COLORS[si % COLORS.len()];
                let width = if *sys == "pagepool" { 3 } else { 1 };
                let path: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
                if pts.len() > 1 {
                    let _ = writeln!(
                        s,
                        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="{width}"/>"#,
                        path.join(" ")
                    );
                }
                for (a, b) in &pts {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{a:.1}" cy="{b:.1}" r="3" fill="{color}"/>"#
                    );
                }
            }
        }
        let lx = ml + self.modes.len() as f64 * (pw + ml) - 40.0;
        for (si, sys) in systems.iter().enumerate() {
            let yy = mt + 10.0 + si as f64 * 20.0;
            let absent = self
                .modes
                .iter()
                .flat_map(|m| m.rows.iter())
                .any(|r| r.system == *sys && r.absent.is_some());
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{yy}" x2="{}" y2="{yy}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{sys}{}</text>"#,
                lx + 20.0,
                COLORS[si % COLORS.len()],
                lx + 26.0,
                yy + 4.0,
                if absent { " (absent)" } else { "" }
            );
        }
        s.push_str("</svg>\n");
        s
    }
}
