//! Helpers shared by the integration tests.

/// How many mappings of the memfd arenas of the heap named `name` this process has.
pub(crate) fn memfd_mappings(name: &str) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("memfd:pagepool:{name} ")))
        .count()
}

/// Whether more threads want to run than the machine has CPUs (the running count of
/// `/proc/loadavg`, as the heap's load check reads it), for tests whose subject needs the
/// nice-19 worker to run.
#[allow(dead_code)] // not every test binary that includes this module asks
pub(crate) fn cores_oversubscribed() -> bool {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap();
    // "0.52 0.58 0.59 3/467 12345": the fourth field is running/total.
    let running: usize = loadavg
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split('/').next())
        .and_then(|r| r.parse().ok())
        .unwrap();
    running > std::thread::available_parallelism().map_or(1, |n| n.get())
}
