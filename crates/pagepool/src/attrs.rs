//! Pool types: memory whose attributes are costly to apply, pooled with them.
//!
//! TTM pools pages per caching mode because changing a page's caching costs a lot (cache
//! flushes, page-table splits); a freed page keeps its caching and goes back to a pool of its
//! kind. pagepool's counterpart is a heap whose arenas carry an attribute, applied once when
//! memory is taken from the system and kept while its blocks are pooled and reused:
//! - **locked**: `mlock`ed on carving (resident, never swapped, no fault on access), unlocked
//!   only when given back to the system;
//! - **huge**: 2 MiB pages, from hugetlbfs (`MFD_HUGETLB`) where huge pages are reserved, else
//!   transparent huge pages of shared memory (`MADV_HUGEPAGE` on 2 MiB-aligned arenas, and
//!   `MADV_COLLAPSE` where populating left base pages) where the system allows them, else base
//!   pages; blocks are 2 MiB or larger;
//! - **node(N)**: bound to one NUMA node (`mbind(MPOL_BIND)` on each arena).
//!
//! [`BackingReport`] reads back what the kernel actually gave (`/proc/self/smaps`,
//! `/proc/self/numa_maps`).

use std::fmt;
use std::path::Path;

/// The order of a 2 MiB block with 4 KiB pages: the smallest block of a huge pool type.
pub const HUGE_ORDER: u8 = 9;

/// The size of a huge page, in bytes.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// A heap's pool type: the attributes its memory carries, applied once when the memory comes
/// from the system and kept while its blocks are pooled and reused.
///
/// Its [`name`](Self::name) is the heap's row in the registry's table (`system`, `locked`,
/// `huge`, `node1`, `locked+huge`, `huge+node1`, ...).
///
/// # Examples
/// ```
/// use pagepool::PoolType;
///
/// assert_eq!(PoolType::SYSTEM.name(), "system");
/// assert_eq!(PoolType::SYSTEM.locked().huge().name(), "locked+huge");
/// assert_eq!(PoolType::SYSTEM.huge().node(1).name(), "huge+node1");
/// assert!(PoolType::SYSTEM.node(0).node_id() == Some(0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PoolType {
    locked: bool,
    huge: bool,
    node: Option<u32>,
}

impl PoolType {
    /// Plain memory: zeroed base pages, placed by the kernel's default policy.
    pub const SYSTEM: PoolType = PoolType {
        locked: false,
        huge: false,
        node: None,
    };

    /// This type, locked in memory (`mlock`).
    pub const fn locked(self) -> PoolType {
        PoolType {
            locked: true,
            ..self
        }
    }

    /// This type, backed by 2 MiB pages.
    pub const fn huge(self) -> PoolType {
        PoolType { huge: true, ..self }
    }

    /// This type, bound to NUMA node `node`.
    pub const fn node(self, node: u32) -> PoolType {
        PoolType {
            node: Some(node),
            ..self
        }
    }

    /// Whether the memory is locked.
    pub const fn is_locked(&self) -> bool {
        self.locked
    }

    /// Whether the memory is backed by 2 MiB pages.
    pub const fn is_huge(&self) -> bool {
        self.huge
    }

    /// The NUMA node the memory is bound to, if any.
    pub const fn node_id(&self) -> Option<u32> {
        self.node
    }

    /// The type's name: `system`, or its attributes joined by `+` (`locked`, `huge`,
    /// `node<N>`, in that order).
    pub fn name(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if self.locked {
            parts.push("locked".into());
        }
        if self.huge {
            parts.push("huge".into());
        }
        if let Some(n) = self.node {
            parts.push(format!("node{n}"));
        }
        if parts.is_empty() {
            "system".into()
        } else {
            parts.join("+")
        }
    }
}

impl fmt::Display for PoolType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Where a huge pool type's 2 MiB pages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum HugeBacking {
    /// hugetlbfs pages (`MFD_HUGETLB`), from the huge pages the system reserved
    /// (`vm.nr_hugepages`, `hugepages=` on the kernel command line).
    Hugetlb,
    /// Transparent huge pages of shared memory (`MADV_HUGEPAGE`), where
    /// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` allows them.
    Thp,
    /// Base pages: neither is available; blocks are still 2 MiB.
    Base,
}

impl fmt::Display for HugeBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HugeBacking::Hugetlb => "hugetlb",
            HugeBacking::Thp => "thp",
            HugeBacking::Base => "base pages",
        })
    }
}

/// The best huge backing this system offers now: hugetlbfs if 2 MiB huge pages are free,
/// else shared-memory THP if allowed, else base pages.
pub(crate) fn probe_huge_backing() -> HugeBacking {
    if free_hugetlb_pages() > 0 {
        HugeBacking::Hugetlb
    } else if shmem_thp_allowed() {
        HugeBacking::Thp
    } else {
        HugeBacking::Base
    }
}

/// Free 2 MiB hugetlbfs pages (0 where there are none or the system has no hugetlbfs).
pub(crate) fn free_hugetlb_pages() -> u64 {
    read_number("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").unwrap_or(0)
}

/// Whether shared memory may use 2 MiB transparent huge pages when asked (`MADV_HUGEPAGE`):
/// the system-wide `shmem_enabled` is `always`, `within_size`, `advise` or `force`, and the
/// 2 MiB size's own setting (where the kernel has one) does not say `never`.
pub(crate) fn shmem_thp_allowed() -> bool {
    let base = "/sys/kernel/mm/transparent_hugepage";
    let global = selected(&format!("{base}/shmem_enabled"));
    let global_ok = matches!(
        global.as_deref(),
        Some("always" | "within_size" | "advise" | "force")
    );
    match selected(&format!("{base}/hugepages-2048kB/shmem_enabled")).as_deref() {
        None | Some("inherit") => global_ok,
        Some("never") => false,
        Some(_) => true,
    }
}

/// Whether NUMA node `node` exists and has memory.
pub(crate) fn node_has_memory(node: u32) -> bool {
    match std::fs::read_to_string("/sys/devices/system/node/has_memory") {
        Ok(list) => parse_node_list(list.trim()).contains(&node),
        // No NUMA sysfs (a kernel without CONFIG_NUMA): one node, 0.
        Err(_) => node == 0 && !Path::new("/sys/devices/system/node").exists(),
    }
}

/// The nodes with memory, as the system lists them (`0-1,3`), for error messages.
pub(crate) fn nodes_with_memory() -> String {
    std::fs::read_to_string("/sys/devices/system/node/has_memory")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".to_owned())
}

/// Parses a kernel node list (`0-2,5`).
pub(crate) fn parse_node_list(s: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    out.extend(a..=b.min(a.saturating_add(4096)));
                }
            }
            None => out.extend(part.parse::<u32>().ok()),
        }
    }
    out
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The bracketed choice of a sysfs setting (`always [madvise] never` -> `madvise`).
fn selected(path: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let start = s.find('[')? + 1;
    let end = start + s[start..].find(']')?;
    Some(s[start..end].to_owned())
}

/// What the kernel actually backs a heap's arenas with, read from `/proc/self/smaps` and
/// `/proc/self/numa_maps` (see [`SystemHeap::backing`](crate::SystemHeap::backing)).
///
/// Bytes are summed over the arenas' home mappings (pooled blocks and blocks in live buffers;
/// views of the same pages are not counted again).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct BackingReport {
    /// The address space of the arenas, in bytes.
    pub mapped_bytes: u64,
    /// Memory resident in them (base and transparent huge pages, `Rss`).
    pub resident_bytes: u64,
    /// Memory in transparent huge pages mapped as such (`ShmemPmdMapped`, `FilePmdMapped`).
    pub thp_bytes: u64,
    /// Memory in hugetlbfs pages (`Shared_Hugetlb` + `Private_Hugetlb`; not part of
    /// `resident_bytes`). The kernel never swaps these and does not count them as locked.
    pub hugetlb_bytes: u64,
    /// Memory the arenas lock: the length of their home mappings' locked parts (`VmFlags`
    /// `lo`), each page counted once, which is what the heap adds to the process's `VmLck`
    /// and charges against `RLIMIT_MEMLOCK`. Views of locked blocks (a buffer that spans
    /// blocks) are not locked and not counted (unless the process locks every new mapping
    /// itself, `mlockall(MCL_FUTURE)`: then each view adds to `VmLck` too). Not `smaps`'
    /// `Locked`, which shares a page among the mappings of it and so shows a locked page that
    /// a view maps too as half a page. Hugetlbfs memory is never counted as locked (the kernel
    /// does not lock those mappings; their pages are never swapped).
    pub locked_bytes: u64,
    /// Memory per NUMA node: `(node, bytes)`, ascending by node.
    pub node_bytes: Vec<(u32, u64)>,
    /// Arenas whose policy binds them to a node: `(node, arenas)` (from `numa_maps`' `bind:`).
    pub bound_to: Vec<(u32, usize)>,
}

impl BackingReport {
    /// Reads the report for the mappings that start at the given addresses (`(start, len)`).
    pub(crate) fn read(ranges: &[(usize, usize)]) -> std::io::Result<BackingReport> {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        // numa_maps is absent on kernels without NUMA: no placement then.
        let numa = std::fs::read_to_string("/proc/self/numa_maps").unwrap_or_default();
        Ok(BackingReport::parse(ranges, &smaps, &numa))
    }

    /// The report from the text of `smaps` and `numa_maps`, for mappings inside `ranges`.
    pub(crate) fn parse(ranges: &[(usize, usize)], smaps: &str, numa: &str) -> BackingReport {
        let inside = |start: usize, end: usize| {
            ranges
                .iter()
                .any(|&(s, l)| start >= s && end <= s.saturating_add(l))
        };
        let mut r = BackingReport {
            mapped_bytes: ranges.iter().map(|&(_, l)| l as u64).sum(),
            ..BackingReport::default()
        };
        // The mapping being read, if it is inside `ranges`: its length.
        let mut current = None;
        for line in smaps.lines() {
            if let Some((start, end)) = vma_range(line) {
                current = inside(start, end).then(|| end.saturating_sub(start) as u64);
                continue;
            }
            let Some(len) = current else {
                continue;
            };
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let kb = || -> u64 {
                rest.split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024
            };
            match key {
                "Rss" => r.resident_bytes += kb(),
                "ShmemPmdMapped" | "FilePmdMapped" => r.thp_bytes += kb(),
                "Shared_Hugetlb" | "Private_Hugetlb" => r.hugetlb_bytes += kb(),
                // `VmLck` counts a locked mapping's whole length, once per mapping; `Locked`
                // is proportional (a page mapped twice counts half in each mapping).
                "VmFlags" if rest.split_whitespace().any(|f| f == "lo") => {
                    r.locked_bytes += len;
                }
                _ => {}
            }
        }
        let mut nodes: std::collections::BTreeMap<u32, u64> = Default::default();
        let mut bound: std::collections::BTreeMap<u32, usize> = Default::default();
        for line in numa.lines() {
            let mut words = line.split_whitespace();
            let Some(start) = words.next().and_then(|a| usize::from_str_radix(a, 16).ok()) else {
                continue;
            };
            if !ranges
                .iter()
                .any(|&(s, l)| start >= s && start < s.saturating_add(l))
            {
                continue;
            }
            let words: Vec<&str> = words.collect();
            let page_kb: u64 = words
                .iter()
                .find_map(|w| w.strip_prefix("kernelpagesize_kB="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(4);
            for w in &words {
                if let Some(policy) = w.strip_prefix("bind:") {
                    for n in parse_node_list(policy) {
                        *bound.entry(n).or_default() += 1;
                    }
                } else if let Some((n, pages)) = w.strip_prefix('N').and_then(|x| x.split_once('='))
                    && let (Ok(n), Ok(pages)) = (n.parse::<u32>(), pages.parse::<u64>())
                {
                    *nodes.entry(n).or_default() += pages * page_kb * 1024;
                }
            }
        }
        r.node_bytes = nodes.into_iter().collect();
        r.bound_to = bound.into_iter().collect();
        r
    }
}

/// The address range of a `smaps` mapping header line (`7f..-7f.. rw-s 00000000 00:01 ...`).
fn vma_range(line: &str) -> Option<(usize, usize)> {
    let first = line.split_whitespace().next()?;
    let (a, b) = first.split_once('-')?;
    if a.is_empty() || !a.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some((
        usize::from_str_radix(a, 16).ok()?,
        usize::from_str_radix(b, 16).ok()?,
    ))
}

impl fmt::Display for BackingReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        write!(
            f,
            "mapped {:.1} MiB, resident {:.1} MiB, thp {:.1} MiB, hugetlb {:.1} MiB, locked {:.1} MiB",
            mib(self.mapped_bytes),
            mib(self.resident_bytes),
            mib(self.thp_bytes),
            mib(self.hugetlb_bytes),
            mib(self.locked_bytes),
        )?;
        for (n, b) in &self.node_bytes {
            write!(f, ", node{n} {:.1} MiB", mib(*b))?;
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn names_join_attributes_in_a_fixed_order() {
        assert_eq!(PoolType::default(), PoolType::SYSTEM);
        assert_eq!(PoolType::SYSTEM.locked().name(), "locked");
        assert_eq!(PoolType::SYSTEM.node(3).locked().name(), "locked+node3");
        assert_eq!(
            PoolType::SYSTEM.node(1).huge().locked().to_string(),
            "locked+huge+node1"
        );
    }

    #[test]
    fn node_lists_parse_and_reject_junk() {
        assert_eq!(parse_node_list("0-2,5"), [0, 1, 2, 5]);
        assert_eq!(parse_node_list("0"), [0]);
        assert_eq!(parse_node_list(""), Vec::<u32>::new());
        assert_eq!(parse_node_list("x,3-y,4"), [4]);
        assert!(parse_node_list("0-4294967295").len() <= 4097, "bounded");
    }

    #[test]
    fn smaps_and_numa_maps_are_summed_over_the_arenas_only() {
        // The arena's home mapping, split by `mlock` into a locked first half (whose pages a
        // view maps too: `Locked` shows half of them) and an unlocked second half; its guard
        // page; the view (unlocked, outside the arena); another memfd.
        let smaps = "\
7f0000000000-7f0000200000 rw-s 00000000 00:01 10 /memfd:pagepool:x (deleted)
Size:               2048 kB
Rss:                2048 kB
ShmemPmdMapped:     2048 kB
Shared_Hugetlb:        0 kB
Locked:             1024 kB
VmFlags: rd wr sh mr mw me ms lo
7f0000200000-7f0000400000 rw-s 00200000 00:01 10 /memfd:pagepool:x (deleted)
Size:               2048 kB
Rss:                   0 kB
Locked:                0 kB
VmFlags: rd wr sh mr mw me ms
7f0000400000-7f0000401000 ---p 00000000 00:00 0
Rss:                   4 kB
VmFlags: mr mw me lo
7f0800000000-7f0800200000 rw-s 00000000 00:01 10 /memfd:pagepool:x (deleted)
Rss:                2048 kB
Locked:                0 kB
VmFlags: rd wr sh mr mw me ms
7f1000000000-7f1000200000 rw-s 00000000 00:0f 11 /memfd:other (deleted)
Rss:                2048 kB
Shared_Hugetlb:     2048 kB
VmFlags: rd wr sh mr mw me ms lo
";
        let numa = "\
7f0000000000 bind:1 file=/memfd:pagepool:x\\040(deleted) dirty=1 N1=1 kernelpagesize_kB=2048
7f1000000000 default file=/memfd:other N0=512 kernelpagesize_kB=4
";
        let r = BackingReport::parse(&[(0x7f00_0000_0000, 4 << 20)], smaps, numa);
        assert_eq!(r.mapped_bytes, 4 << 20);
        assert_eq!(r.resident_bytes, 2 << 20);
        assert_eq!(r.thp_bytes, 2 << 20);
        assert_eq!(r.hugetlb_bytes, 0);
        assert_eq!(
            r.locked_bytes,
            2 << 20,
            "the locked mapping's whole length, not its proportional `Locked`"
        );
        assert_eq!(r.node_bytes, [(1, 2 << 20)]);
        assert_eq!(r.bound_to, [(1, 1)]);
        let none = BackingReport::parse(&[], smaps, numa);
        assert_eq!(none, BackingReport::default());
    }
}
