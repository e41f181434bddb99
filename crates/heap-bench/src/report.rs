//! What a run found: the seed-format lines, the summary tables, memory, JSON and the SVG chart.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::measure::{Bandwidth, Switch, TouchFloor};
use crate::systems::{CallOpts, PEERS};

/// One system at one size in one mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// `tight`, `paced`, `loaded`, `threads-T` or `attrs`.
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
    /// per call, the median repetition's. (The loaded mode's busy threads run in a process of
    /// their own: not counted.)
    pub cpu_ns_per_call: f64,
    /// Threads mode: how many threads ran the loop at once (`iters` counts all their calls).
    pub threads: Option<usize>,
    /// Threads mode: calls per second, all threads together (the median repetition's).
    pub calls_per_sec: Option<f64>,
    /// A tuned peer's settings, as they were in effect; an attrs mode row's: what it does per
    /// call and what its memory got (checked outside the timed calls).
    pub settings: Option<String>,
    /// Why the system could not run, if it could not.
    pub absent: Option<String>,
    /// Resident set size before the size's first call, pools empty (pagepool rows), bytes.
    pub rss_before: Option<u64>,
    /// Peak resident set size during the row (pagepool rows), bytes.
    pub peak_rss: Option<u64>,
    /// With `--switches`: the calls during which the scheduler preempted the calling thread or
    /// it slept, and those that kept the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switches: Option<Switches>,
}

/// A row's calls sorted by what happened to the calling thread during each (`--switches`): on a
/// busy machine a call the scheduler preempted takes a time slice or more of another thread's,
/// which decides the row's mean and max by chance; the calls that kept the CPU are the
/// system's own cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Switches {
    /// Calls during which the thread was preempted (an involuntary context switch).
    pub preempted: usize,
    /// Their share of the row's time in calls.
    pub preempted_share: f64,
    /// The slowest of them, ns.
    pub preempted_max_ns: u64,
    /// Calls during which it slept (a voluntary context switch, no involuntary one): it
    /// waited for something, a lock or the heap's worker.
    pub slept: usize,
    /// Their share of the row's time in calls.
    pub slept_share: f64,
    /// The slowest of them, ns.
    pub slept_max_ns: u64,
    /// Calls that kept the CPU throughout.
    pub kept: usize,
    /// Their mean, ns.
    pub kept_mean_ns: f64,
    /// Their 99th percentile, ns.
    pub kept_p99_ns: u64,
    /// The slowest of them, ns.
    pub kept_max_ns: u64,
}

impl Switches {
    /// The figures of calls timed `per_call` (ns), each with what happened to its thread
    /// (`how`, in the same order).
    pub fn of(per_call: &[u64], how: &[Switch]) -> Switches {
        let total: u64 = per_call.iter().sum();
        let of = |kind: Switch| {
            let mut v: Vec<u64> = per_call
                .iter()
                .zip(how)
                .filter(|&(_, &h)| h == kind)
                .map(|(&ns, _)| ns)
                .collect();
            v.sort_unstable();
            v
        };
        let share = |v: &[u64]| v.iter().sum::<u64>() as f64 / total.max(1) as f64;
        let (preempted, slept, kept) = (of(Switch::Preempted), of(Switch::Slept), of(Switch::Ran));
        let max = |v: &[u64]| v.last().copied().unwrap_or(0);
        Switches {
            preempted: preempted.len(),
            preempted_share: share(&preempted),
            preempted_max_ns: max(&preempted),
            slept: slept.len(),
            slept_share: share(&slept),
            slept_max_ns: max(&slept),
            kept: kept.len(),
            kept_mean_ns: kept.iter().sum::<u64>() as f64 / kept.len().max(1) as f64,
            kept_p99_ns: crate::calls::quantile(&kept, 0.99),
            kept_max_ns: max(&kept),
        }
    }
}

impl std::fmt::Display for Switches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "switches: preempted {} calls ({:.0}% of the time in calls, max {} ns), slept {} \
             ({:.0}%, max {} ns); kept the CPU {} calls: mean {:.0} ns, p99 {} ns, max {} ns",
            self.preempted,
            100.0 * self.preempted_share,
            self.preempted_max_ns,
            self.slept,
            100.0 * self.slept_share,
            self.slept_max_ns,
            self.kept,
            self.kept_mean_ns,
            self.kept_p99_ns,
            self.kept_max_ns
        )
    }
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
            threads: None,
            calls_per_sec: None,
            settings: None,
            absent: Some(why),
            rss_before: None,
            peak_rss: None,
            switches: None,
        }
    }

    /// The seed's output line, and with `--switches` a second one with the row's
    /// [`Switches`].
    pub fn lines(&self) -> String {
        match &self.switches {
            Some(s) => format!("{}\n  {s}", self.seed_line()),
            None => self.seed_line(),
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

/// One row of the random mode: random dependent 8-byte reads over one buffer.
#[derive(Debug, Clone, Serialize)]
pub struct ReadRow {
    /// `random`.
    pub mode: String,
    /// The row's name.
    pub system: String,
    /// The buffer's bytes, which the reads range over.
    pub size: usize,
    /// Reads per repetition.
    pub reads: u64,
    /// Each repetition's mean ns per read, in the order they ran.
    pub reps_ns_per_read: Vec<f64>,
    /// The median repetition's mean ns per read (of an even number, the slower of the middle
    /// two).
    pub ns_per_read: f64,
    /// `ns_per_read` over the `pagepool` row's (4 KiB pages) at the same size.
    pub vs_pagepool: Option<f64>,
    /// What the buffer is and what backs it (smaps of its range after the reads).
    pub backing: String,
    /// Bytes of the buffer mapped by 2 MiB pages of any kind, after the reads.
    pub huge_bytes: u64,
    /// Resident bytes of the buffer, after the reads.
    pub resident_bytes: u64,
}

impl ReadRow {
    /// The seed-format line: `NAME heap: read 8 bytes N times over SIZE bytes in T ns`.
    pub fn seed_line(&self) -> String {
        format!(
            "{} heap: read 8 bytes {} times over {} bytes in {:.0} ns \t {:.1} ns/read",
            self.system,
            self.reads,
            self.size,
            self.ns_per_read * self.reads as f64,
            self.ns_per_read
        )
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

/// Who zeroed the default heap's memory while one size ran: the worker, or the threads that
/// allocate and release (see `HeapStats::worker_share`).
#[derive(Debug, Clone, Serialize)]
pub struct ZeroingShare {
    /// The size.
    pub size: usize,
    /// Bytes the worker zeroed.
    pub worker_bytes: u64,
    /// Bytes the calling threads zeroed.
    pub caller_bytes: u64,
}

impl ZeroingShare {
    /// The worker's share, from 0 to 1 (0 when nothing was zeroed).
    pub fn worker_share(&self) -> f64 {
        let all = self.worker_bytes + self.caller_bytes;
        if all == 0 {
            0.0
        } else {
            self.worker_bytes as f64 / all as f64
        }
    }
}

/// One mode's results.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// `tight`, `paced`, `loaded`, `threads-T`, `attrs` or `random`.
    pub mode: String,
    /// Work between calls per size (ns; 0 in tight mode).
    pub work_ns: Vec<(usize, u64)>,
    /// Every row.
    pub rows: Vec<Row>,
    /// The worker's throughput per size.
    pub worker: Vec<WorkerFigure>,
    /// Who zeroed the default heap's memory, per size.
    pub zeroing: Vec<ZeroingShare>,
    /// The random mode's rows (none in the other modes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reads: Vec<ReadRow>,
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
    /// Whether the mode computes between calls (paced, loaded).
    fn has_work(&self) -> bool {
        self.mode == "paced" || self.mode == "loaded"
    }

    /// An empty report for `mode`.
    pub fn new(mode: &str) -> ModeReport {
        ModeReport {
            mode: mode.into(),
            work_ns: Vec::new(),
            rows: Vec::new(),
            worker: Vec::new(),
            zeroing: Vec::new(),
            reads: Vec::new(),
        }
    }

    /// `peer / pagepool` at every size of `bw` where both rows ran, for one summary line;
    /// `None` where the peer has no row (the kernel heap outside the VM).
    fn against(&self, peer: &str, bw: &[(usize, Bandwidth)]) -> Option<String> {
        let cells: Vec<String> = bw
            .iter()
            .filter_map(|&(size, _)| {
                let p = self.find(peer, size).filter(|r| r.absent.is_none())?;
                let b = self.find("pagepool", size)?;
                Some(format!(
                    "{} {:.2}x",
                    human(size),
                    p.ns_per_call / b.ns_per_call
                ))
            })
            .collect();
        (!cells.is_empty()).then(|| cells.join(", "))
    }

    /// The attrs mode's summary: one row per size, one column per system, each pagepool pool
    /// type beside its peer, (x) = peer / pagepool within a pair; then the same for p50, p99,
    /// the slowest call and CPU time.
    pub fn pairs_summary(&self, sizes: &[usize], pairs: &[(&str, &str)]) -> String {
        let mut out = String::new();
        for (i, (what, metric)) in [
            ("ns/call", (|r: &Row| r.ns_per_call) as fn(&Row) -> f64),
            ("p50 ns per call", |r: &Row| r.p50_ns as f64),
            ("p99 ns per call", |r: &Row| r.p99_ns as f64),
            ("max ns per call", |r: &Row| r.max_ns as f64),
            ("CPU ns per call, whole process (all threads)", |r: &Row| {
                r.cpu_ns_per_call
            }),
        ]
        .into_iter()
        .enumerate()
        {
            if i == 0 {
                let _ = writeln!(
                    out,
                    "== summary: {} ({what}; (x) = peer / its pagepool row: above 1 means \
                     pagepool is faster) ==",
                    self.mode
                );
            } else {
                let _ = writeln!(out, "-- {}: {what} ((x) = peer / pagepool) --", self.mode);
            }
            let _ = write!(out, "{:>8}", "size");
            for (a, b) in pairs {
                let _ = write!(out, " {a:>20} {b:>20}");
            }
            out.push('\n');
            for &size in sizes {
                let _ = write!(out, "{:>8}", human(size));
                for (a, b) in pairs {
                    let base = self
                        .find(a, size)
                        .filter(|r| r.absent.is_none())
                        .map(metric);
                    for (s, peer) in [(a, false), (b, true)] {
                        let cell = match self.find(s, size) {
                            Some(r) if r.absent.is_some() => "absent".to_string(),
                            Some(r) => match base {
                                Some(b) if peer && b > 0.0 => {
                                    format!("{:.0} ({:.2}x)", metric(r), metric(r) / b)
                                }
                                _ => format!("{:.0}", metric(r)),
                            },
                            None => "-".into(),
                        };
                        let _ = write!(out, " {cell:>20}");
                    }
                }
                out.push('\n');
            }
        }
        out
    }

    /// The random mode's summary: one row per buffer size, one column per row, ns per read
    /// (median of the repetitions, their range, and the ratio to `pagepool`); then the share of
    /// each buffer in 2 MiB pages.
    pub fn random_summary(&self, systems: &[&str]) -> String {
        let mut sizes: Vec<usize> = self.reads.iter().map(|r| r.size).collect();
        sizes.dedup();
        let find =
            |s: &str, size: usize| self.reads.iter().find(|r| r.system == s && r.size == size);
        let reps = self.reads.first().map_or(0, |r| r.reps_ns_per_read.len());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== summary: {} (ns per read: median of {reps} repetitions [lowest-highest]; (x) = \
             row / pagepool, 4 KiB pages: below 1 means fewer ns per read) ==",
            self.mode
        );
        let _ = write!(out, "{:>8}", "size");
        for s in systems {
            let _ = write!(out, " {s:>26}");
        }
        out.push('\n');
        for &size in &sizes {
            let _ = write!(out, "{:>8}", human(size));
            for s in systems {
                let cell = match find(s, size) {
                    Some(r) => {
                        let lo = r
                            .reps_ns_per_read
                            .iter()
                            .copied()
                            .fold(f64::INFINITY, f64::min);
                        let hi = r.reps_ns_per_read.iter().copied().fold(0.0, f64::max);
                        match r.vs_pagepool.filter(|_| *s != "pagepool") {
                            Some(x) => {
                                format!("{:.1} [{lo:.1}-{hi:.1}] ({x:.2}x)", r.ns_per_read)
                            }
                            None => format!("{:.1} [{lo:.1}-{hi:.1}]", r.ns_per_read),
                        }
                    }
                    None => "-".into(),
                };
                let _ = write!(out, " {cell:>26}");
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "-- {}: share of each buffer mapped by 2 MiB pages, after the reads --",
            self.mode
        );
        let _ = write!(out, "{:>8}", "size");
        for s in systems {
            let _ = write!(out, " {s:>26}");
        }
        out.push('\n');
        for &size in &sizes {
            let _ = write!(out, "{:>8}", human(size));
            for s in systems {
                let cell = find(s, size).map_or("-".into(), |r| {
                    format!("{:.1}%", 100.0 * r.huge_bytes as f64 / r.size.max(1) as f64)
                });
                let _ = write!(out, " {cell:>26}");
            }
            out.push('\n');
        }
        out
    }

    /// The fastest of the general-purpose allocators at `size`, tuned ones included.
    fn fastest_peer(&self, size: usize) -> Option<&Row> {
        PEERS
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
        } else if self.has_work() && !floors.is_empty() {
            let _ = write!(out, " {:>12} {:>14}", "touch floor", "pagepool/floor");
        }
        let _ = write!(out, " {:>24}", "best peer / pagepool");
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
            } else if let Some(f) = floor(size).filter(|_| self.has_work()) {
                let ratio = base.map_or(String::from("-"), |p| format!("{:.2}x", p / f.min_ns()));
                let _ = write!(out, " {:>12.0} {ratio:>14}", f.min_ns());
            }
            let best = match (self.fastest_peer(size), base) {
                (Some(r), Some(b)) if b > 0.0 => {
                    format!("{:.2}x ({})", r.ns_per_call / b, r.system)
                }
                _ => "-".into(),
            };
            let _ = write!(out, " {best:>24}");
            out.push('\n');
        }
        if self.has_work() && !floors.is_empty() {
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
        if self.rows.iter().any(|r| r.calls_per_sec.is_some()) {
            out.push_str(&self.metric_table(
                "calls per second, all threads (here (x) = peer / pagepool too: below 1 means \
                 pagepool is faster)",
                bw,
                systems,
                |r| r.calls_per_sec.unwrap_or(f64::NAN),
            ));
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
        for z in &self.zeroing {
            let _ = writeln!(
                out,
                "zeroing at {}: the worker {:.0}% of {} MiB, the calling thread {:.0}%",
                human(z.size),
                100.0 * z.worker_share(),
                (z.worker_bytes + z.caller_bytes) >> 20,
                100.0 * (1.0 - z.worker_share()),
            );
        }
        if let Some(kernel) = self.against("dmabuf", bw) {
            let _ = writeln!(
                out,
                "pagepool against the kernel's dma-buf system heap ((x) = dmabuf / pagepool): {kernel}"
            );
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

/// What bounds a call at one size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeInfo {
    /// Buffer size in bytes.
    pub size: usize,
    /// The zeroing limit: the size zeroed by every core with the fastest method, ns.
    pub limit_ns: f64,
    /// The method that gave it (`memset`, `streaming`, `rep stosb`).
    pub limit_method: &'static str,
    /// The touch floor (see `TouchFloor`), ns; none with `--no-touch`.
    pub floor_ns: Option<f64>,
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
    /// Per size: the zeroing limit and the touch floor, in ns per call.
    pub sizes: Vec<SizeInfo>,
    /// Each mode's results.
    pub modes: Vec<ModeReport>,
    /// Each pagepool heap's statistics at the end.
    pub heap_stats: Vec<(String, pagepool::HeapStats)>,
    /// The realloc mode's rows (empty: it did not run).
    pub growth: Vec<crate::growth::GrowthRow>,
    /// The sparse mode's rows (empty: it did not run).
    pub sparse: Vec<crate::sparse::SparseRow>,
    /// The programs mode's rows (empty: it did not run).
    pub programs: Vec<crate::programs::ProgramRow>,
    /// What the run found wrong with its own measurements (a row beating the zeroing limit or
    /// the touch floor after they were measured again).
    pub warnings: Vec<String>,
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
            bandwidth: Vec::new(),
            touch_floor: Vec::new(),
            sizes: Vec::new(),
            modes: Vec::new(),
            heap_stats: Vec::new(),
            growth: Vec::new(),
            sparse: Vec::new(),
            programs: Vec::new(),
            warnings: Vec::new(),
        }
        .with_bounds(bw, floors)
    }

    /// The report with the zeroing bandwidth and limits of `bw` and the touch floors of
    /// `floors` (either measured again during the run where a row beat the first measurement).
    pub fn with_bounds(
        mut self,
        bw: &[(usize, Bandwidth)],
        floors: &[(usize, TouchFloor)],
    ) -> Report {
        self.bandwidth = bw.to_vec();
        self.touch_floor = floors.to_vec();
        self.sizes = bw
            .iter()
            .map(|(size, b)| SizeInfo {
                size: *size,
                limit_ns: b.limit_ns(*size),
                limit_method: b.all_method,
                floor_ns: self
                    .touch_floor
                    .iter()
                    .find(|f| f.0 == *size)
                    .map(|f| f.1.min_ns()),
            })
            .collect();
        self
    }

    /// Peak resident memory of the pagepool rows against the bound. The bound: the RSS before the size's first call (pools empty), plus the pool limit, plus
    /// the deferred-free queue's bound (queued and in-flight releases), plus the live buffers
    /// (one per thread).
    pub fn memory_summary(&self, limits: Option<(usize, usize)>) -> String {
        let mut out = String::from("== memory: peak RSS of the pagepool rows ==\n");
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        for m in &self.modes {
            for r in m.rows.iter().filter(|r| r.peak_rss.is_some()) {
                let (before, peak) = (r.rss_before.unwrap_or(0), r.peak_rss.unwrap_or(0));
                let live = r.threads.unwrap_or(1) as u64 * r.size as u64;
                let bound = limits.map(|(pool, queue)| before + (pool + queue) as u64 + live);
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
    /// per system; below, a latency panel per mode with work between calls (paced, loaded):
    /// each system's p50 (solid) and p99 (dashed) per call.
    pub fn svg(&self, systems: &[&str]) -> String {
        const COLORS: [&str; 12] = [
            "#d62728", "#ff9896", "#e377c2", "#1f77b4", "#2ca02c", "#9467bd", "#aec7e8", "#98df8a",
            "#c5b0d5", "#8c564b", "#17becf", "#7f7f7f",
        ];
        let (pw, ph, ml, mt, mb) = (420.0, 320.0, 80.0, 50.0, 70.0);
        // The modes of calls (the random mode's reads are not drawn), and the systems in them.
        let modes: Vec<&ModeReport> = self.modes.iter().filter(|m| !m.rows.is_empty()).collect();
        let systems: Vec<&str> = systems
            .iter()
            .copied()
            .filter(|sys| {
                modes
                    .iter()
                    .any(|m| m.rows.iter().any(|r| r.system == *sys))
            })
            .collect();
        let latency: Vec<&ModeReport> = modes.iter().copied().filter(|m| m.has_work()).collect();
        let panels = modes.len().max(1);
        let width = ml + panels as f64 * (pw + ml) + 170.0;
        let rows = if latency.is_empty() { 1.0 } else { 2.0 };
        let height = rows * (mt + ph + mb);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let mut sizes: Vec<usize> = modes
            .iter()
            .flat_map(|m| m.rows.iter().map(|r| r.size))
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let color = |sys: &str| {
            let i = systems.iter().position(|x| *x == sys).unwrap_or(0);
            COLORS[i % COLORS.len()]
        };
        for (mi, m) in modes.iter().enumerate() {
            let series: Vec<Series> = systems
                .iter()
                .map(|sys| Series {
                    color: color(sys),
                    width: if *sys == "pagepool" { 3 } else { 1 },
                    dashed: false,
                    points: sizes
                        .iter()
                        .filter_map(|&sz| m.find(sys, sz))
                        .map(|r| (r.size, r.ns_per_call))
                        .collect(),
                })
                .collect();
            let x0 = ml + mi as f64 * (pw + ml);
            panel(
                &mut s,
                (x0, mt, pw, ph),
                &format!("{} mode", m.mode),
                "ns per call (log scale, lower is better)",
                &sizes,
                &series,
            );
        }
        for (mi, m) in latency.iter().enumerate() {
            let mut series = Vec::new();
            for sys in &systems {
                for (dashed, q) in [(false, 0.5), (true, 0.99)] {
                    series.push(Series {
                        color: color(sys),
                        width: if *sys == "pagepool" { 3 } else { 1 },
                        dashed,
                        points: sizes
                            .iter()
                            .filter_map(|&sz| m.find(sys, sz))
                            .filter(|r| r.absent.is_none())
                            .map(|r| (r.size, if q < 0.9 { r.p50_ns } else { r.p99_ns } as f64))
                            .collect(),
                    });
                }
            }
            let x0 = ml + mi as f64 * (pw + ml);
            panel(
                &mut s,
                (x0, 2.0 * mt + ph + mb, pw, ph),
                &format!("{} mode: p50 (solid), p99 (dashed)", m.mode),
                "ns per call (log scale)",
                &sizes,
                &series,
            );
        }
        let lx = ml + panels as f64 * (pw + ml) - 40.0;
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
                color(sys),
                lx + 26.0,
                yy + 4.0,
                if absent { " (absent)" } else { "" }
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// One line of a chart panel.
struct Series {
    color: &'static str,
    width: u32,
    dashed: bool,
    /// (buffer size, value) per point.
    points: Vec<(usize, f64)>,
}

/// Draws one panel at `(x0, y0, w, h)`: buffer size (log) against the series' values (log).
fn panel(
    s: &mut String,
    (x0, y0, pw, ph): (f64, f64, f64, f64),
    title: &str,
    ylabel: &str,
    sizes: &[usize],
    series: &[Series],
) {
    let vals: Vec<f64> = series
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
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
    let (smin, smax) = (
        (*sizes.iter().min().unwrap_or(&4096) as f64).log2(),
        (*sizes.iter().max().unwrap_or(&4096) as f64).log2(),
    );
    let sspan = (smax - smin).max(1.0);
    let x = |size: usize| x0 + ((size as f64).log2() - smin) / sspan * pw;
    let y = |v: f64| y0 + ph - (v.log10() - lo) / (hi - lo) * ph;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="15" font-weight="bold">{title}</text>"#,
        x0 + pw / 2.0,
        y0 - 20.0,
    );
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
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
    for &sz in sizes {
        let xx = x(sz);
        let _ = writeln!(
            s,
            r##"<line x1="{xx}" y1="{y0}" x2="{xx}" y2="{}" stroke="#eee"/><text x="{xx}" y="{}" text-anchor="middle">{}</text>"##,
            y0 + ph,
            y0 + ph + 16.0,
            human(sz)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">buffer size (log scale)</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 40.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">{ylabel}</text>"#,
        x0 - 55.0,
        y0 + ph / 2.0
    );
    for l in series {
        let pts: Vec<(f64, f64)> = l
            .points
            .iter()
            .filter(|p| p.1.is_finite() && p.1 > 0.0)
            .map(|&(sz, v)| (x(sz), y(v)))
            .collect();
        let dash = if l.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        if pts.len() > 1 {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="{}"{dash}/>"#,
                path.join(" "),
                l.color,
                l.width
            );
        }
        for (a, b) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{a:.1}" cy="{b:.1}" r="3" fill="{}"/>"#,
                l.color
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each call counts where its thread's switches put it: preempted first, then slept, else
    /// kept; shares of the time in calls, and the kept calls' own figures.
    #[test]
    fn switches_sort_calls_by_what_happened_to_the_thread() {
        use Switch::{Preempted, Ran, Slept};
        let per_call = [100, 4_000_000, 300, 200, 50_000, 400];
        let how = [Ran, Preempted, Ran, Ran, Slept, Ran];
        let s = Switches::of(&per_call, &how);
        let total = per_call.iter().sum::<u64>() as f64;
        assert_eq!((s.preempted, s.slept, s.kept), (1, 1, 4));
        assert_eq!(
            (s.preempted_max_ns, s.slept_max_ns, s.kept_max_ns),
            (4_000_000, 50_000, 400)
        );
        assert!((s.preempted_share - 4e6 / total).abs() < 1e-12);
        assert!((s.slept_share - 5e4 / total).abs() < 1e-12);
        assert_eq!(s.kept_mean_ns, 250.0);
        assert_eq!(s.kept_p99_ns, 400);
        let line = s.to_string();
        assert!(line.starts_with("switches: preempted 1 calls"), "{line}");
        assert!(line.contains("kept the CPU 4 calls: mean 250 ns"), "{line}");
        // No calls: zeros, not a panic or a NaN.
        let none = Switches::of(&[], &[]);
        assert_eq!(
            (none.kept, none.kept_mean_ns, none.preempted_share),
            (0, 0.0, 0.0)
        );
    }
}
