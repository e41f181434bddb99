//! Builds the drop-in (`libpagepool_preload.so`) for the `pagepool` command to carry inside
//! itself, so that a command installed alone (`cargo install --path crates/pagepool-cli`) still
//! has it: `cargo build -p pagepool-preload` with this build's profile, into a target directory
//! of its own under `OUT_DIR` (the workspace's is locked by the build that runs this script).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target = out.join("preload-target");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    for dir in ["pagepool-preload", "pagepool"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join("crates").join(dir).display()
        );
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "pagepool-preload", "--lib"])
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", &target)
        // The outer build's flags are for this crate and its target, not for the drop-in.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building the drop-in failed: {status}");
    let so = target
        .join(if release { "release" } else { "debug" })
        .join("libpagepool_preload.so");
    let bytes = std::fs::read(&so).expect("the drop-in was built");
    // FNV-1a of the library: the name of the file it is unpacked to.
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    std::fs::copy(&so, out.join("libpagepool_preload.so")).unwrap();
    println!("cargo:rustc-env=PAGEPOOL_PRELOAD_HASH={hash:016x}");
}
