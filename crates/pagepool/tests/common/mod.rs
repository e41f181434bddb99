//! Helpers shared by the integration tests.

/// How many mappings of the memfd arenas of the heap named `name` this process has.
pub(crate) fn memfd_mappings(name: &str) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("memfd:pagepool:{name} ")))
        .count()
}
