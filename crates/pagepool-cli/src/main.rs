//! `pagepool`: runs any Linux program with pagepool's `LD_PRELOAD` drop-in, so that its large
//! `malloc`/`calloc`/`realloc` requests come from pagepool's pools.
//!
//! ```text
//! pagepool run [--threshold SIZE] [--largest SIZE] [--limit SIZE] [--stats] [--no-worker] -- PROGRAM ARGS...
//! pagepool path
//! ```
//!
//! `run` finds the drop-in (`libpagepool_preload.so`): `$PAGEPOOL_PRELOAD` if set, else beside
//! this command (as `cargo build --workspace` leaves them) or in `../lib` from it (an installed
//! layout) if that file is the drop-in this command was built with, else the copy this
//! command carries (unpacked once into `$XDG_CACHE_HOME/pagepool` or `~/.cache/pagepool`). It prepends the drop-in to `LD_PRELOAD`, sets the drop-in's
//! settings, and replaces itself with the program (`execvp`): the program's exit status, or
//! the signal that ended it, is the command's. `path` prints where the drop-in is.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The drop-in this command carries (see `build.rs`).
static EMBEDDED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libpagepool_preload.so"));

/// The drop-in's file name.
const SO: &str = "libpagepool_preload.so";

#[derive(Parser, Debug)]
#[command(
    name = "pagepool",
    version,
    about = "Run programs with pagepool's zeroed-memory pools"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs PROGRAM with the drop-in preloaded; its exit status is this command's.
    Run(Run),
    /// Prints the path of the drop-in `run` would use.
    Path,
}

#[derive(clap::Args, Debug)]
struct Run {
    /// Smallest request the pools serve (like 64K, 1M); smaller ones go to glibc.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    threshold: Option<usize>,
    /// Largest request the pools serve (like 64M); larger ones go to glibc.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    largest: Option<usize>,
    /// Most memory each kind of pool (dirty, zeroed) keeps (like 256M, 2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    limit: Option<usize>,
    /// Prints the pools' statistics on stderr when the program (and each child that used the
    /// pools) exits.
    #[arg(long)]
    stats: bool,
    /// No background worker: released blocks are zeroed by the `calloc` that takes them.
    #[arg(long)]
    no_worker: bool,
    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM"
    )]
    program: Vec<OsString>,
}

/// A size (see [`pagepool::parse_size`]).
fn parse_size(s: &str) -> Result<usize, String> {
    pagepool::parse_size(s).ok_or_else(|| format!("`{s}` is not a size (like 64K, 8M or 2G)"))
}

/// Where the drop-in is (see the module).
fn find_drop_in() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PAGEPOOL_PRELOAD") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "PAGEPOOL_PRELOAD names {}, which is not a file",
                p.display()
            );
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find this command's own path")?;
    if let Some(dir) = exe.parent() {
        for candidate in [dir.join(SO), dir.join("../lib").join(SO)] {
            // Only the drop-in this command was built with: a build of one crate leaves the
            // other's older file beside it.
            if std::fs::read(&candidate).is_ok_and(|bytes| bytes == EMBEDDED) {
                return Ok(candidate);
            }
        }
    }
    unpack()
}

/// The carried drop-in, unpacked once into the cache directory (written to a temporary file
/// and renamed, so that concurrent runs never see half a file).
fn unpack() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("pagepool").join(env!("PAGEPOOL_PRELOAD_HASH"));
    let so = dir.join(SO);
    if so.is_file() && std::fs::metadata(&so).map(|m| m.len()).ok() == Some(EMBEDDED.len() as u64) {
        return Ok(so);
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot make {} for the drop-in", dir.display()))?;
    let tmp = dir.join(format!("{SO}.{}", std::process::id()));
    std::fs::write(&tmp, EMBEDDED)
        .with_context(|| format!("cannot write the drop-in to {}", tmp.display()))?;
    std::fs::rename(&tmp, &so)
        .with_context(|| format!("cannot move the drop-in to {}", so.display()))?;
    Ok(so)
}

/// Whether `program` can be run: a path to an existing file, or a name found in `PATH`.
fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 || program.is_absolute() {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn run(args: Run) -> Result<()> {
    let so = find_drop_in()?;
    let program = Path::new(&args.program[0]);
    if find_program(program).is_none() {
        bail!(
            "no program `{}` (not a file, nor found in PATH)",
            program.display()
        );
    }
    let mut preload = so.into_os_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut cmd = Command::new(program);
    cmd.args(&args.program[1..]).env("LD_PRELOAD", preload);
    for (var, value) in [
        ("PAGEPOOL_THRESHOLD", args.threshold),
        ("PAGEPOOL_LARGEST", args.largest),
        ("PAGEPOOL_LIMIT", args.limit),
    ] {
        if let Some(v) = value {
            cmd.env(var, v.to_string());
        }
    }
    if args.stats {
        cmd.env("PAGEPOOL_STATS", "1");
    }
    if args.no_worker {
        cmd.env("PAGEPOOL_WORKER", "0");
    }
    // Only returns on failure.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run `{}`", program.display()))
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Path => find_drop_in().map(|p| println!("{}", p.display())),
    };
    if let Err(e) = result {
        eprintln!("pagepool: {e:#}");
        // As a shell says of a program it cannot run.
        std::process::exit(127);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("2X").unwrap_err().contains("not a size"));
        assert!(parse_size("").is_err() && parse_size("M").is_err());
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("not a size")
        );
    }

    #[test]
    fn the_carried_drop_in_is_a_shared_object() {
        assert_eq!(&EMBEDDED[..4], b"\x7fELF");
    }
}
