//! The main job runs: a tiny configuration of `heap-bench` must print every row of every mode
//! (tight, paced, loaded, threads-2, threads-4) in the seed's format, tuned peers included, and
//! write JSON and an SVG chart that parse; so must the modes run only when asked for (attrs,
//! random).

use std::process::Command;

const SYSTEMS: [&str; 14] = [
    "pagepool",
    "pagepool-nopool",
    "pagepool-syncfree",
    "pagepool-alloc",
    "pagepool-c",
    "calloc",
    "mimalloc",
    "jemalloc",
    "calloc-tuned",
    "mimalloc-tuned",
    "jemalloc-tuned",
    "mmap",
    "memfd",
    "dmabuf",
];

const MODES: [&str; 5] = ["tight", "paced", "loaded", "threads-2", "threads-4"];

/// The systems of the modes other than tight when no `--systems` are given.
const EVERY_MODE: [&str; 10] = [
    "pagepool",
    "pagepool-syncfree",
    "pagepool-alloc",
    "pagepool-c",
    "calloc",
    "mimalloc",
    "jemalloc",
    "calloc-tuned",
    "mimalloc-tuned",
    "jemalloc-tuned",
];

/// The standard output of a run that must have succeeded; panics with both outputs if it did
/// not.
fn succeeded(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The systems `mode` runs by default.
fn systems_of(mode: &str) -> &'static [&'static str] {
    if mode == "tight" {
        &SYSTEMS
    } else {
        &EVERY_MODE
    }
}

#[test]
fn tiny_run_prints_every_row_of_every_mode() {
    let dir = std::env::temp_dir().join(format!("heap-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("run.json"), dir.join("run.svg"));
    let out = Command::new(env!("CARGO_BIN_EXE_heap-bench"))
        .args([
            "--iters", "3", "--reps", "2", "--sizes", "4K,64K", "--verify", "--json",
        ])
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    for mode in MODES {
        let threads: usize = mode
            .strip_prefix("threads-")
            .map_or(1, |t| t.parse().unwrap());
        let section = stdout
            .split(&format!("== mode: {mode} =="))
            .nth(1)
            .unwrap_or_else(|| panic!("no {mode} section:\n{stdout}"));
        let section = section.split("== summary").next().unwrap();
        for sys in SYSTEMS {
            let runs = systems_of(mode).contains(&sys);
            for size in [4096, 65536] {
                let prefix = format!("{sys} heap: ");
                let found = section.lines().any(|l| {
                    l.strip_prefix(&prefix).is_some_and(|rest| {
                        rest.starts_with("absent (")
                            || (rest.starts_with(&format!(
                                "alloc {size} bytes {} times in ",
                                3 * threads
                            )) && rest.trim_end().ends_with("ns/call"))
                    })
                });
                assert_eq!(found, runs, "{mode}: line for {sys} at {size}:\n{section}");
            }
        }
    }
    assert!(stdout.contains("zeroing limit"));
    assert!(
        stdout.contains("pagepool's measure of this machine: a 256 KiB piece zeroed in"),
        "the tempo the heap's bounds derive from"
    );
    assert!(
        stdout.contains("zeroing at ") && stdout.contains("the calling thread"),
        "the worker's share of zeroing"
    );
    for what in [
        "p50 ns per call",
        "p99 ns per call",
        "max ns per call",
        "CPU ns per call",
    ] {
        assert!(stdout.contains(what), "no {what} table");
    }
    assert!(stdout.contains("pagepool/floor") && stdout.contains("touch floor: "));
    assert!(stdout.contains("best peer / pagepool"));
    assert!(stdout.contains("calls per second, all threads"));
    // The tuned peers' settings, as read back in their process.
    for (sys, what) in [
        ("calloc-tuned", "M_MMAP_THRESHOLD=32 MiB (set)"),
        ("mimalloc-tuned", "purge_delay in effect: -1"),
        ("jemalloc-tuned", "opt.background_thread in effect: true"),
    ] {
        assert!(
            stdout.lines().any(|l| l.contains(sys) && l.contains(what)),
            "{sys}: {what} not in effect:\n{stdout}"
        );
    }
    assert!(stdout.contains("== pagepool heap statistics =="));
    // The allocator layer's rows, their statistics, and the realloc mode (in the default run).
    assert!(
        stdout.contains("== pagepool-alloc statistics ==")
            && stdout.contains("== pagepool-c statistics ==")
    );
    for pattern in ["doubling 4 KiB to 256 MiB", "steps of 64 KiB to 32 MiB"] {
        let section = stdout
            .split(&format!("== summary: realloc, {pattern}"))
            .nth(1)
            .unwrap_or_else(|| panic!("no realloc summary for {pattern}:\n{stdout}"));
        for sys in [
            "pagepool-alloc",
            "pagepool-c",
            "calloc",
            "mimalloc",
            "jemalloc",
        ] {
            assert!(
                section
                    .lines()
                    .take(6)
                    .any(|l| l.trim_start().starts_with(sys) && l.ends_with("ns per realloc")),
                "{pattern}: no {sys} row:\n{section}"
            );
        }
    }
    assert!(stdout.contains("== memory: peak RSS of the pagepool rows =="));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        report["growth"].as_array().unwrap().len(),
        10,
        "5 rows, 2 patterns"
    );
    assert_eq!(
        report["sparse"].as_array().unwrap().len(),
        16,
        "4 rows, 4 fractions"
    );
    let sparse = stdout
        .split("== summary: sparse")
        .nth(1)
        .unwrap_or_else(|| panic!("no sparse summary:\n{stdout}"));
    for every in ["1/1 ", "1/4 ", "1/32 ", "1/256 "] {
        for sys in ["pagepool-alloc", "pagepool-c", "write-tracking", "calloc"] {
            assert!(
                sparse.lines().any(|l| l.trim_start().starts_with(every)
                    && l.contains(sys)
                    && l.contains(" wall ")),
                "{every}{sys}: no row:\n{sparse}"
            );
        }
    }
    let floors = report["touch_floor"].as_array().unwrap();
    assert_eq!(floors.len(), 2, "one touch floor per size");
    for f in floors {
        for k in ["own_ns", "other_ns", "other_streaming_ns"] {
            assert!(f[1][k].as_f64().unwrap() > 0.0, "{k}: {f}");
        }
    }
    let sizes = report["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 2, "one object per size");
    for s in sizes {
        assert!(s["size"].as_u64().unwrap() > 0, "{s}");
        assert!(s["limit_ns"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["floor_ns"].as_f64().unwrap() > 0.0, "{s}");
        let method = s["limit_method"].as_str().unwrap();
        assert!(
            ["memset", "streaming", "rep stosb"].contains(&method),
            "{s}"
        );
    }
    let modes = report["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, MODES);
    let mut cpu_total = 0.0;
    for m in modes {
        let threads = m["mode"]
            .as_str()
            .unwrap()
            .strip_prefix("threads-")
            .map(|t| t.parse::<u64>().unwrap());
        let mode = m["mode"].as_str().unwrap();
        assert_eq!(
            m["rows"].as_array().unwrap().len(),
            systems_of(mode).len() * 2
        );
        for r in m["rows"].as_array().unwrap() {
            if r["absent"].is_null() {
                assert_eq!(r["iters"], 3 * threads.unwrap_or(1), "{r}");
                match threads {
                    Some(t) => {
                        assert_eq!(r["threads"], t, "{r}");
                        let rate = r["calls_per_sec"].as_f64().unwrap();
                        assert!(rate > 0.0, "{r}");
                        // Each thread's calls take no longer than the wall time, so the rate
                        // is at most T calls per mean call time (the wall time once started
                        // after the threads were done).
                        let bound = t as f64 * 1e9 / r["ns_per_call"].as_f64().unwrap();
                        assert!(rate <= bound * 1.01, "{rate} calls/s over {bound}: {r}");
                    }
                    None => assert!(r["calls_per_sec"].is_null(), "{r}"),
                }
                assert!(r.get("switches").is_none(), "only with --switches: {r}");
                let tuned = r["system"].as_str().unwrap().ends_with("-tuned");
                assert_eq!(r["settings"].is_string(), tuned, "{r}");
                assert_eq!(r["reps_ns"].as_array().unwrap().len(), 2);
                assert!(r["ns_per_call"].as_f64().unwrap() > 0.0);
                // Per-call percentiles, in order, and the process's CPU time per call.
                let (p50, p99, max) = (
                    r["p50_ns"].as_u64().unwrap(),
                    r["p99_ns"].as_u64().unwrap(),
                    r["max_ns"].as_u64().unwrap(),
                );
                assert!(0 < p50 && p50 <= p99 && p99 <= max, "{r}");
                // Process CPU time comes in the kernel's accounting granularity: a row of a few
                // short calls may read 0, but never a negative or missing figure.
                let cpu = r["cpu_ns_per_call"].as_f64().unwrap();
                assert!(cpu >= 0.0, "{r}");
                cpu_total += cpu;
            }
        }
    }
    assert!(cpu_total > 0.0, "some CPU time was counted");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    assert!(chart.contains("buffer size (log scale)") && chart.contains("tight mode"));
    for panel in ["threads-4 mode", "paced mode: p50", "loaded mode: p50"] {
        assert!(chart.contains(panel), "no {panel} panel");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The rows run only when named (`pagepool-sync`, `pagepool-control`) run in any mode of calls;
/// `--switches` sorts every row's calls by what happened to the calling thread, each call timed
/// alone (4 KiB included), and says so under each row and in the JSON; `--verify` checks every
/// buffer on a busy machine (the loaded mode) too.
#[test]
fn named_rows_and_switches_on_a_busy_machine() {
    let dir = std::env::temp_dir().join(format!("heap-bench-switches-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("run.json");
    let rows = ["pagepool", "pagepool-sync", "pagepool-control"];
    let out = Command::new(env!("CARGO_BIN_EXE_heap-bench"))
        .args([
            "--mode", "loaded", "--iters", "20", "--reps", "2", "--sizes", "4K,64K",
        ])
        .args([
            "--systems",
            &rows.join(","),
            "--switches",
            "--verify",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    for sys in rows {
        for size in [4096, 65536] {
            let at = lines
                .iter()
                .position(|l| {
                    l.starts_with(&format!("{sys} heap: alloc {size} bytes 20 times in "))
                })
                .unwrap_or_else(|| panic!("no {sys} row at {size}:\n{stdout}"));
            assert!(
                lines[at + 1].starts_with("  switches: preempted "),
                "{sys} at {size}: {}",
                lines[at + 1]
            );
        }
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let got = report["modes"][0]["rows"].as_array().unwrap();
    assert_eq!(got.len(), 6);
    for r in got {
        let s = &r["switches"];
        let calls: u64 = ["preempted", "slept", "kept"]
            .iter()
            .map(|k| s[k].as_u64().unwrap())
            .sum();
        // Every call of both repetitions, each timed alone.
        assert_eq!(calls, 40, "{r}");
        let share = s["preempted_share"].as_f64().unwrap() + s["slept_share"].as_f64().unwrap();
        assert!((0.0..=1.0 + 1e-9).contains(&share), "{r}");
        assert!(
            s["kept_max_ns"].as_u64().unwrap() <= r["max_ns"].as_u64().unwrap(),
            "{r}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_arguments_are_clear_errors() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_heap-bench"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["--sizes", "0"]).contains("bad size"));
    assert!(run(&["--sizes", "12Q"]).contains("bad size"));
    assert!(run(&["--systems", "nope", "--iters", "1"]).contains("unknown system"));
    assert!(run(&["--reps", "0"]).contains("--reps"));
    assert!(run(&["--mode", "fast"]).contains("invalid value"));
    assert!(run(&["--mode", "threads", "--threads", "0"]).contains("--threads"));
    // The attrs and random modes' arguments.
    let clear = |args: &[&str], what: &str| {
        let err = run(args);
        assert!(err.contains(what), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    };
    clear(&["--mode", "attrs", "--systems", "nope"], "unknown system");
    clear(
        &["--mode", "attrs", "--systems", "pagepool"],
        "none of the attrs mode's rows",
    );
    clear(
        &["--mode", "tight", "--systems", "mmap-thp"],
        "none of the systems of mode tight",
    );
    clear(&["--mode", "attrs", "--sizes", "0"], "bad size");
    // Sizes that cannot fit in memory: refused before any row runs, in every mode.
    clear(
        &["--mode", "tight", "--sizes", "18446744073709551615"],
        "available memory",
    );
    clear(
        &["--mode", "threads", "--sizes", "10000G"],
        "available memory",
    );
    clear(&["--mode", "random", "--random-bytes", "0"], "bad size");
    clear(&["--mode", "random", "--random-small", "1X"], "bad size");
    clear(
        &["--mode", "random", "--random-bytes", "255G"],
        "available memory",
    );
    clear(
        &["--mode", "random", "--random-bytes", "300G"],
        "at most 256",
    );
    clear(
        &["--mode", "random", "--random-bytes", "18446744073709551615"],
        "at most 256",
    );
    clear(&["--mode", "random", "--reps", "0"], "--reps");
    clear(&["--mode", "random", "--iters", "0"], "--iters");
    clear(&["--mode", "attrs,bogus"], "invalid value");
}

/// The attrs mode's rows, in table order.
const ATTRS: [&str; 6] = [
    "pagepool-locked",
    "mmap-mlock",
    "pagepool-huge",
    "mmap-thp",
    "pagepool-node0",
    "mmap-mbind",
];

#[test]
fn attrs_mode_prints_every_pair_with_its_settings() {
    let json = std::env::temp_dir().join(format!("heap-bench-attrs-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_heap-bench"))
        .args([
            "--mode",
            "attrs",
            "--sizes",
            "4K,64K",
            "--iters",
            "3",
            "--reps",
            "2",
            "--verify",
            "--no-progress",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert!(!stdout.contains("NaN"), "{stdout}");
    assert!(
        !stdout.contains("== mode: tight =="),
        "attrs only:\n{stdout}"
    );
    let section = stdout
        .split("== mode: attrs ==")
        .nth(1)
        .unwrap_or_else(|| panic!("no attrs section:\n{stdout}"));
    let (rows, summary) = section.split_once("== summary: attrs").unwrap();
    let lines: Vec<&str> = rows.lines().collect();
    for sys in ATTRS {
        for size in [4096, 65536] {
            let prefix = format!("{sys} heap: ");
            let at = lines
                .iter()
                .position(|l| {
                    l.strip_prefix(&prefix).is_some_and(|rest| {
                        rest.starts_with("absent (")
                            || (rest.starts_with(&format!("alloc {size} bytes 3 times in "))
                                && rest.trim_end().ends_with("ns/call"))
                    })
                })
                .unwrap_or_else(|| panic!("no line for {sys} at {size}:\n{rows}"));
            if lines[at].contains("absent (") {
                continue;
            }
            // Every row names its settings, checked outside the timed calls.
            let settings = lines[at + 1]
                .strip_prefix("  settings: ")
                .unwrap_or_else(|| panic!("{sys} at {size}: no settings:\n{rows}"));
            let expect = match sys {
                "pagepool-locked" => "pool type locked",
                "pagepool-huge" => "huge backing: ",
                "pagepool-node0" => "pool type node0",
                "mmap-mlock" => "mlock",
                "mmap-thp" => "got huge pages: ",
                _ => "mbind(MPOL_BIND, node 0)",
            };
            assert!(settings.contains(expect), "{sys}: {settings}");
        }
    }
    for what in [
        "(x) = peer / its pagepool row",
        "p50 ns per call",
        "p99 ns per call",
        "max ns per call",
        "CPU ns per call",
    ] {
        assert!(summary.contains(what), "no {what} table:\n{summary}");
    }
    for sys in ATTRS {
        assert!(summary.contains(sys), "{sys} not in the summary");
    }
    assert!(stdout.contains("== pagepool-huge heap statistics =="));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    let modes = report["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 1);
    assert_eq!(modes[0]["mode"], "attrs");
    let rows = modes[0]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), ATTRS.len() * 2);
    for r in rows {
        assert_eq!(r["mode"], "attrs", "{r}");
        assert!(ATTRS.contains(&r["system"].as_str().unwrap()), "{r}");
        assert!([4096, 65536].contains(&r["size"].as_u64().unwrap()), "{r}");
        if !r["absent"].is_null() {
            continue;
        }
        assert_eq!(r["iters"], 3, "{r}");
        assert!(r["ns_per_call"].as_f64().unwrap() > 0.0, "{r}");
        let (p50, p99, max) = (
            r["p50_ns"].as_u64().unwrap(),
            r["p99_ns"].as_u64().unwrap(),
            r["max_ns"].as_u64().unwrap(),
        );
        assert!(0 < p50 && p50 <= p99 && p99 <= max, "{r}");
        assert!(r["cpu_ns_per_call"].as_f64().unwrap() >= 0.0, "{r}");
        assert!(r["settings"].is_string(), "{r}");
    }
}

/// The random mode's rows.
const RANDOM: [&str; 4] = ["pagepool", "pagepool-huge", "mmap-thp", "mmap"];

#[test]
fn random_mode_reports_every_row_and_its_backing() {
    let json = std::env::temp_dir().join(format!("heap-bench-random-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_heap-bench"))
        .args([
            "--mode",
            "random",
            "--random-bytes",
            "4M",
            "--random-small",
            "2M",
            "--iters",
            "2000",
            "--reps",
            "2",
            "--no-progress",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = succeeded(&out);
    assert!(!stdout.contains("NaN"), "{stdout}");
    let section = stdout
        .split("== mode: random ==")
        .nth(1)
        .unwrap_or_else(|| panic!("no random section:\n{stdout}"));
    let (rows, summary) = section.split_once("== summary: random").unwrap();
    let lines: Vec<&str> = rows.lines().collect();
    for sys in RANDOM {
        for size in [2 << 20, 4 << 20] {
            let head = format!("{sys} heap: read 8 bytes 2000 times over {size} bytes in ");
            let at = lines
                .iter()
                .position(|l| l.starts_with(&head) && l.trim_end().ends_with("ns/read"))
                .unwrap_or_else(|| panic!("no line for {sys} at {size}:\n{rows}"));
            assert!(
                lines[at + 1].starts_with("  backing: "),
                "{sys} at {size}: no backing:\n{rows}"
            );
        }
    }
    assert!(summary.contains("(x) = row / pagepool"), "{summary}");
    assert!(summary.contains("2 MiB pages"), "{summary}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).unwrap();
    let modes = report["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 1);
    assert_eq!(modes[0]["mode"], "random");
    let reads = modes[0]["reads"].as_array().unwrap();
    assert_eq!(reads.len(), RANDOM.len() * 2);
    for r in reads {
        let sys = r["system"].as_str().unwrap();
        assert_eq!(r["mode"], "random", "{r}");
        assert!(RANDOM.contains(&sys), "{r}");
        assert!(
            [2 << 20, 4 << 20].contains(&r["size"].as_u64().unwrap()),
            "{r}"
        );
        assert_eq!(r["reads"], 2000, "{r}");
        let ns = r["ns_per_read"].as_f64().unwrap();
        assert!(ns.is_finite() && ns > 0.0, "{r}");
        assert_eq!(r["reps_ns_per_read"].as_array().unwrap().len(), 2, "{r}");
        let ratio = r["vs_pagepool"].as_f64().unwrap();
        assert!(ratio.is_finite() && ratio > 0.0, "{r}");
        if sys == "pagepool" {
            assert_eq!(ratio, 1.0, "{r}");
        }
        let backing = r["backing"].as_str().unwrap();
        assert!(backing.contains("resident "), "{r}");
        match sys {
            "pagepool-huge" => assert!(backing.contains("huge backing: "), "{r}"),
            "mmap-thp" => assert!(backing.contains("MADV_HUGEPAGE"), "{r}"),
            _ => {}
        }
        assert!(
            r["resident_bytes"].as_u64().unwrap() >= r["size"].as_u64().unwrap(),
            "{r}"
        );
        assert!(r["huge_bytes"].as_u64().is_some(), "{r}");
    }
}
