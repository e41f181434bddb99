//! The C library from C and C++: `tests/c/pagepool_test.c` (glibc's edge cases, zeroed memory
//! after dirty frees, realloc growth, threads freeing each other's buffers, fork), built with
//! the system's C compiler as C99 against `libpagepool.so` and against `libpagepool.a`; the
//! header as C++; and bad frees, which must end the process with one line.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `libpagepool.so` and `libpagepool.a` of this checkout are: built for the test by
/// `cargo build -p pagepool-c` into a target directory of its own (`target/c-test`; `cargo
/// test` builds only the library's rlib, and a build into the test's own target directory
/// would wait for the lock that `cargo test` holds). Once per test binary; a no-op when they
/// are up to date.
fn lib_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let workspace = manifest().parent().unwrap().parent().unwrap();
        let target = workspace.join("target").join("c-test");
        let out = Command::new(env!("CARGO"))
            .args(["build", "-p", "pagepool-c", "--lib"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo build -p pagepool-c:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("debug")
    })
    .clone()
}

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles `source` with `compiler` and `args` into `out`; panics with the compiler's output.
fn compile(compiler: &str, source: &str, out: &Path, args: &[&str]) {
    let dir = manifest();
    let status = Command::new(compiler)
        .arg(dir.join(source))
        .arg(format!("-I{}", dir.join("include").display()))
        .arg("-o")
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{compiler} {source}:\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

fn run(exe: &Path, args: &[&str]) -> std::process::Output {
    Command::new(exe)
        .args(args)
        .env("LD_LIBRARY_PATH", lib_dir())
        .output()
        .unwrap()
}

/// A directory of this test's own (the tests run in parallel).
fn out_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pagepool-c-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const WARNINGS: [&str; 5] = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pthread"];

#[test]
fn the_c_test_passes_against_the_shared_and_the_static_library() {
    let lib = lib_dir();
    assert!(lib.join("libpagepool.so").exists() && lib.join("libpagepool.a").exists());
    let out = out_dir("shared-static");
    let shared = out.join("pagepool_test_shared");
    let mut args = WARNINGS.to_vec();
    let l = format!("-L{}", lib.display());
    args.extend([l.as_str(), "-lpagepool"]);
    compile("cc", "tests/c/pagepool_test.c", &shared, &args);
    let archive = lib.join("libpagepool.a");
    let archive = archive.to_str().unwrap();
    let static_ = out.join("pagepool_test_static");
    let mut args = WARNINGS.to_vec();
    args.extend([archive, "-ldl", "-lm", "-lrt", "-lgcc_s"]);
    compile("cc", "tests/c/pagepool_test.c", &static_, &args);
    for exe in [&shared, &static_] {
        let o = run(exe, &[]);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && stdout.contains("pagepool c test: ok"),
            "{}: {:?}\n{stdout}\n{}",
            exe.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            stdout.contains("private pools ("),
            "the statistics: {stdout}"
        );
        assert!(stdout.contains("private-clean"), "the table: {stdout}");
    }
    std::fs::remove_dir_all(out).unwrap();
}

/// Compiles and links the header from C++. Without a C++ compiler (a machine with a Rust
/// toolchain need not have one) it says so and passes, unless `PAGEPOOL_REQUIRE_CXX` is set, as
/// `.ci/test` sets it after installing one.
#[test]
fn the_header_compiles_as_cxx() {
    if Command::new("c++").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("PAGEPOOL_REQUIRE_CXX").is_none(),
            "no c++ compiler, and PAGEPOOL_REQUIRE_CXX is set"
        );
        eprintln!("the_header_compiles_as_cxx: no c++ compiler here; not checked");
        return;
    }
    let out = out_dir("cxx");
    let exe = out.join("header_cxx");
    let l = format!("-L{}", lib_dir().display());
    compile(
        "c++",
        "tests/c/header.cpp",
        &exe,
        &[
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-Werror",
            &l,
            "-lpagepool",
        ],
    );
    assert!(run(&exe, &[]).status.success());
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_frees_abort_with_one_line() {
    let out = out_dir("bad");
    let exe = out.join("pagepool_test_bad");
    let l = format!("-L{}", lib_dir().display());
    let mut args = WARNINGS.to_vec();
    args.extend([l.as_str(), "-lpagepool"]);
    compile("cc", "tests/c/pagepool_test.c", &exe, &args);
    for (case, says) in [
        ("double", "pagepool: double free of a pooled block"),
        (
            "inside",
            "pagepool: free of a pointer inside the pools that no block starts",
        ),
    ] {
        let o = run(&exe, &[case]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.signal(), Some(libc::SIGABRT), "{case}: {err}");
        assert_eq!(err.trim_end(), says, "{case}");
    }
    std::fs::remove_dir_all(out).unwrap();
}
