//! `pagepool run` and `pagepool path` as a user calls them: the exit status passed through
//! (a signal too), the drop-in prepended to `LD_PRELOAD` with the settings set, statistics at
//! exit, and clear errors for a missing program or a bad size.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

fn pagepool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagepool"))
        .args(args)
        .env_remove("PAGEPOOL_PRELOAD")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_exit_status_is_the_programs() {
    assert_eq!(
        pagepool(&["run", "--", "sh", "-c", "exit 7"]).status.code(),
        Some(7)
    );
    assert_eq!(pagepool(&["run", "--", "true"]).status.code(), Some(0));
    let killed = pagepool(&["run", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(killed.status.signal(), Some(9));
}

#[test]
fn the_drop_in_is_prepended_and_the_settings_set() {
    let path = text(&pagepool(&["path"]).stdout).trim().to_string();
    assert!(path.ends_with("libpagepool_preload.so") && std::path::Path::new(&path).is_file());
    let out = Command::new(env!("CARGO_BIN_EXE_pagepool"))
        .args(["run", "--threshold", "128K", "--largest", "16M", "--limit", "1G", "--no-worker"])
        .args(["--", "sh", "-c", "echo $LD_PRELOAD $PAGEPOOL_THRESHOLD $PAGEPOOL_LARGEST $PAGEPOOL_LIMIT $PAGEPOOL_WORKER"])
        .env("LD_PRELOAD", "")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("{path} 131072 16777216 1073741824 0")
    );
}

#[test]
fn stats_come_from_the_program_at_exit() {
    // dd's 1 MiB buffer comes from the pools; dd closes its stderr before it exits.
    let out = pagepool(&[
        "run",
        "--stats",
        "--",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=1M",
        "count=4",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("pagepool: statistics of process") && err.contains("private pools ("),
        "{err}"
    );
}

#[test]
fn a_missing_program_or_a_bad_size_is_a_clear_error() {
    let out = pagepool(&["run", "--", "no-such-program-here"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("no program `no-such-program-here`"),
        "{}",
        text(&out.stderr)
    );
    let out = pagepool(&["run", "--limit", "lots", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("`lots` is not a size"),
        "{}",
        text(&out.stderr)
    );
    let out = pagepool(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_pagepool"))
        .args(["run", "--", "true"])
        .env("PAGEPOOL_PRELOAD", "/nonexistent/libx.so")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("PAGEPOOL_PRELOAD names /nonexistent/libx.so"));
}
