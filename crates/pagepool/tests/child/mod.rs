//! Tests of process-wide state (`RLIMIT_MEMLOCK`, capabilities) run in a child process: the
//! test binary runs itself again with `PAGEPOOL_TEST_CHILD` naming the case, so that one case's
//! limits never reach another's.

use std::process::Command;

/// The case this process runs as a child, if it is one.
pub(crate) fn case() -> Option<String> {
    std::env::var("PAGEPOOL_TEST_CHILD").ok()
}

/// Runs this test binary again for one case (its test `entry` dispatches on [`case`]);
/// returns its output, and panics with it if the child failed or did not say it was done.
pub(crate) fn run(entry: &str, case: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", entry, "--nocapture", "--test-threads=1"])
        .env("PAGEPOOL_TEST_CHILD", case)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {case} failed:\n{text}");
    assert!(
        text.contains(&format!("case {case} done")),
        "child {case} did not run:\n{text}"
    );
    text
}

/// A field of `/proc/self/status` in bytes (`VmLck`, `VmRSS`, ...).
pub(crate) fn status_bytes(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Sets this process's `RLIMIT_MEMLOCK` (soft and hard) to `bytes`.
pub(crate) fn set_memlock(bytes: u64) {
    rustix::process::setrlimit(
        rustix::process::Resource::Memlock,
        rustix::process::Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        },
    )
    .unwrap();
}

/// Removes `CAP_IPC_LOCK` from this process's capabilities (root bypasses `RLIMIT_MEMLOCK`
/// with it).
pub(crate) fn drop_ipc_lock() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_IPC_LOCK: u32 = 14;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget writes two `Data` entries for version 3, as provided.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    assert_eq!(r, 0, "capget");
    for x in &mut d[..1] {
        x.effective &= !(1 << CAP_IPC_LOCK);
        x.permitted &= !(1 << CAP_IPC_LOCK);
    }
    // SAFETY: capset reads the header and two `Data` entries.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
    assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
}
