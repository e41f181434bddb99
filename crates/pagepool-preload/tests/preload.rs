//! The drop-in from outside: `tests/c/preload_test.c` (pointers made before the drop-in was
//! ready, glibc's edge cases, every alignment, threads, fork, `RTLD_DEEPBIND`) run under
//! `LD_PRELOAD`, the settings' one-line complaints, statistics at exit, AddressSanitizer
//! stepping aside, and everyday programs giving the same output with and without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `libpagepool_preload.so` of this checkout: built for the test by `cargo build -p
/// pagepool-preload` into a target directory of its own (`target/preload-test`: the test's own
/// is locked by `cargo test`). Once per test binary.
fn drop_in() -> PathBuf {
    static SO: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SO.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .parent()
            .unwrap();
        let target = workspace.join("target").join("preload-test");
        let out = Command::new(env!("CARGO"))
            .args(["build", "-p", "pagepool-preload", "--lib"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo build -p pagepool-preload:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let so = target.join("debug").join("libpagepool_preload.so");
        assert!(so.exists());
        so
    })
    .clone()
}

/// A directory of this test's own (the tests run in parallel).
fn out_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pagepool-preload-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `cc` with `args`; panics with its output.
fn cc(args: &[&str]) {
    let out = Command::new("cc").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "cc {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn source(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(name)
        .display()
        .to_string()
}

/// The test program, its early library and the RTLD_DEEPBIND library, built in `dir`.
fn build_test_program(dir: &Path) -> (PathBuf, PathBuf) {
    let s = |p: &Path| p.display().to_string();
    let early = dir.join("libearly.so");
    let deep = dir.join("libdeep.so");
    let exe = dir.join("preload_test");
    let flags = ["-O1", "-Wall", "-Wextra", "-Werror", "-pthread"];
    let mut a = flags.to_vec();
    let (early_s, deep_s, exe_s, dir_s) = (s(&early), s(&deep), s(&exe), s(dir));
    let (early_c, deep_c, test_c) = (
        source("early.c"),
        source("deep.c"),
        source("preload_test.c"),
    );
    a.extend(["-shared", "-fPIC", "-o", &early_s, &early_c]);
    cc(&a);
    let mut a = flags.to_vec();
    a.extend(["-shared", "-fPIC", "-o", &deep_s, &deep_c]);
    cc(&a);
    let rpath = format!("-Wl,-rpath,{dir_s}");
    let ldir = format!("-L{dir_s}");
    let mut a = flags.to_vec();
    a.extend(["-o", &exe_s, &test_c, &ldir, "-learly", &rpath, "-ldl"]);
    cc(&a);
    (exe, deep)
}

fn with_drop_in(cmd: &mut Command) -> Output {
    cmd.env("LD_PRELOAD", drop_in()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_c_test_passes_under_the_drop_in() {
    let dir = out_dir("c");
    let (exe, deep) = build_test_program(&dir);
    for worker in ["1", "0"] {
        let out = with_drop_in(Command::new(&exe).arg(&deep).env("PAGEPOOL_WORKER", worker));
        assert!(
            out.status.success() && text(&out.stdout).contains("preload test: ok"),
            "PAGEPOOL_WORKER={worker}: {}\nstdout: {}\nstderr: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), "", "nothing on stderr");
    }
    // Without the drop-in the pools' checks must fail: the test tells the two apart.
    let out = Command::new(&exe).arg(&deep).output().unwrap();
    assert!(
        !out.status.success() && text(&out.stderr).contains("failed"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_settings_say_one_line_each_and_the_program_runs() {
    let out = with_drop_in(
        Command::new("sh")
            .args(["-c", "echo ran"])
            .env("PAGEPOOL_THRESHOLD", "lots")
            .env("PAGEPOOL_STATS", "maybe"),
    );
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "ran\n");
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(err.contains("PAGEPOOL_THRESHOLD=lots") && err.contains("PAGEPOOL_STATS=maybe"));
}

#[test]
fn statistics_at_exit_from_the_processes_that_used_the_pools() {
    let dir = out_dir("stats");
    let (exe, deep) = build_test_program(&dir);
    let out = with_drop_in(Command::new(&exe).arg(&deep).env("PAGEPOOL_STATS", "1"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    // The program prints its own; its forked children end with `_exit`, which runs no
    // destructor.
    assert_eq!(
        err.matches("pagepool: statistics of process").count(),
        1,
        "{err}"
    );
    assert!(
        err.contains("private pools (") && err.contains("private-clean"),
        "{err}"
    );
    // A process that never asked the pools for anything says nothing.
    let out = with_drop_in(Command::new("true").env("PAGEPOOL_STATS", "1"));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn disabled_it_serves_nothing() {
    let dir = out_dir("disabled");
    let (exe, deep) = build_test_program(&dir);
    let out = with_drop_in(Command::new(&exe).arg(&deep).env("PAGEPOOL_DISABLE", "1"));
    // The pools' checks fail as without the drop-in; nothing crashes.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn address_sanitizer_runs_alone() {
    let dir = out_dir("asan");
    let exe = dir.join("asan_test");
    let src = dir.join("asan.c");
    std::fs::write(
        &src,
        "#include <stdlib.h>\n#include <string.h>\nint main(void) { char *p = malloc(4 << 20); \
         memset(p, 1, 4 << 20); free(p); p = malloc(10); p[10] = 1; free(p); return 0; }\n",
    )
    .unwrap();
    let built = Command::new("cc")
        .args(["-fsanitize=address", "-g", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    if !built.status.success() {
        eprintln!(
            "no AddressSanitizer runtime here ({}): not tested",
            text(&built.stderr).lines().next().unwrap_or("")
        );
        return;
    }
    // AddressSanitizer insists on coming first in the library list; told not to check, it
    // runs after the drop-in, which must step aside so that its heap checks still work: the
    // program's one-byte overflow must be caught.
    let out = with_drop_in(Command::new(&exe).env("ASAN_OPTIONS", "verify_asan_link_order=0"));
    let err = text(&out.stderr);
    assert!(
        err.contains("AddressSanitizer runs in this process"),
        "{err}"
    );
    assert!(err.contains("heap-buffer-overflow"), "{err}");
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

/// Everyday programs under the inherited `LD_PRELOAD`: the same output and exit status.
#[test]
fn everyday_programs_behave_the_same() {
    let script = "set -e; seq 1 200000 | sort -rn | head -3; printf 'a\\nb\\n' | tr a-z A-Z; \
                  dd if=/dev/zero bs=1M count=16 2>/dev/null | gzip -c | gzip -dc | wc -c; \
                  ls / | grep -c . >/dev/null; awk 'BEGIN { s = \"\"; for (i = 0; i < 100000; i++) s = s \"x\"; print length(s) }'; \
                  (exit 3) || echo status $?";
    let plain = Command::new("sh").args(["-c", script]).output().unwrap();
    let dropped = with_drop_in(Command::new("sh").args(["-c", script]));
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    assert_eq!(text(&dropped.stdout), text(&plain.stdout));
    assert_eq!(dropped.status.code(), plain.status.code());
    assert_eq!(text(&dropped.stderr), text(&plain.stderr));
    if Command::new("git").arg("--version").output().is_ok() {
        let dir = out_dir("git");
        let git = |args: &[&str], pre: bool| {
            let mut c = Command::new("git");
            c.args(args).current_dir(&dir);
            if pre {
                with_drop_in(&mut c)
            } else {
                c.output().unwrap()
            }
        };
        assert!(git(&["init", "-q"], true).status.success());
        std::fs::write(dir.join("big"), vec![b'x'; 8 << 20]).unwrap();
        for pre in [true, false] {
            let out = git(&["hash-object", "big"], pre);
            assert!(out.status.success());
            assert_eq!(text(&out.stdout).len(), 41);
        }
        assert_eq!(
            git(&["hash-object", "big"], true).stdout,
            git(&["hash-object", "big"], false).stdout
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
