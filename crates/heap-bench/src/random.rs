//! The random mode: what huge pages buy for random reads over one large buffer, and when they do
//! not (a small buffer).
//!
//! Each row's buffer holds one dependent chain: every 64-byte line of the buffer, in one random
//! cyclic order (Sattolo's algorithm, a fixed seed), stores at its first 8 bytes the offset of
//! the next line. Reading follows the chain, so each read waits for the one before (no two
//! overlap, no prefetcher can guess the next): a read costs the latency of its line, including
//! the page walk when the TLB misses. Every row of a size has the same chain; only its memory
//! differs.

use std::time::{Duration, Instant};

use pagepool::{Buffer, PoolType, SystemHeap};
use rustix::mm::{Advice, MapFlags, ProtFlags};

use crate::Args;
use crate::measure::{self, RangePages};
use crate::report::{ModeReport, ReadRow, Report};
use crate::systems::HUGE;

/// The rows, in table order: the ratios are row / `pagepool` (4 KiB pages).
pub const ROWS: [&str; 4] = ["pagepool", "pagepool-huge", "mmap-thp", "mmap"];

/// The bytes per link of the chain: one line.
pub const LINE: usize = 64;

/// The chain's seed (every run reads in the same order).
pub const SEED: u64 = 0x5eed_c4a1_2b6f_0d13;

/// The most bytes a buffer may have: 2^32 lines (the chain's links are 32-bit while it is
/// built).
pub const MAX_BYTES: usize = (u32::MAX as usize + 1) * LINE;

/// The length a buffer of `bytes` gets: rounded up to 2 MiB (as the huge heap rounds it), so
/// that every row reads the same number of lines; `None` past [`MAX_BYTES`].
pub fn buffer_len(bytes: usize) -> Option<usize> {
    bytes
        .checked_next_multiple_of(HUGE)
        .filter(|&l| l <= MAX_BYTES)
}

/// The memory the mode holds at once for a buffer of `len` bytes: every row's buffer, and the
/// chain while it is built (4 bytes per line).
pub fn memory_needed(len: usize) -> u64 {
    (ROWS.len() * len + len / LINE * 4) as u64
}

/// splitmix64: a small, fast generator, good enough to shuffle.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (Lemire's multiply-shift; its bias is negligible here).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// A random cyclic permutation of `0..n` (Sattolo's algorithm): `succ[i]` follows `i`, and
/// following `succ` from any line visits every line once before it comes back.
pub fn cycle(n: usize, seed: u64) -> Vec<u32> {
    assert!(n <= MAX_BYTES / LINE, "at most 2^32 lines");
    let mut succ: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64) as usize;
        succ.swap(i, j);
    }
    succ
}

/// What a row's buffer is.
enum Memory {
    /// A pagepool buffer (held, not read: the chain is read through `base`), with its heap
    /// (dropped after it).
    Heap { _buf: Buffer, heap: Box<SystemHeap> },
    /// An anonymous mapping of `map_len` bytes at `p` (the buffer lies inside it, between two
    /// inaccessible guard ranges).
    Mmap { p: *mut u8, map_len: usize },
}

/// One row's buffer, holding the chain.
pub struct ReadBuffer {
    /// The row's name.
    pub name: &'static str,
    /// The buffer's first line.
    base: *mut u8,
    /// The bytes the chain covers.
    len: usize,
    mem: Memory,
    /// What the row is, besides its backing.
    pub how: String,
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        if let Memory::Mmap { p, map_len } = self.mem {
            // SAFETY: the mapping made in `ReadBuffer::new`; nothing refers to it any more.
            let _ = unsafe { rustix::mm::munmap(p.cast(), map_len) };
        }
    }
}

impl ReadBuffer {
    /// `len` bytes (a multiple of 2 MiB) for row `name`, resident and holding the chain `succ`.
    pub fn new(name: &'static str, len: usize, succ: &[u32]) -> Result<ReadBuffer, String> {
        let fail = |e: String| format!("{name}: {e}");
        let (base, mem, how) = match name {
            "pagepool" | "pagepool-huge" => {
                let pool_type = if name == "pagepool" {
                    PoolType::SYSTEM
                } else {
                    PoolType::SYSTEM.huge()
                };
                // A heap of the type with room for the buffer and no pool (the buffer's memory
                // goes back to the system when it is dropped).
                let heap = SystemHeap::builder()
                    .name(&format!("random-{}", pool_type.name()))
                    .pool_type(pool_type)
                    .max_buffer(len)
                    .pool_limit(0)
                    .build()
                    .map_err(|e| fail(e.to_string()))?;
                let mut buf = heap.alloc(len).map_err(|e| fail(e.to_string()))?;
                let base = buf.as_mut_ptr();
                let how = match heap.stats().huge_backing {
                    Some(b) => format!("pool type {pool_type}, huge backing: {b}"),
                    None => format!("pool type {pool_type} (4 KiB pages)"),
                };
                (
                    base,
                    Memory::Heap {
                        _buf: buf,
                        heap: Box::new(heap),
                    },
                    how,
                )
            }
            "mmap-thp" | "mmap" => {
                // Guard ranges on both sides keep the buffer a mapping of its own (the kernel
                // merges neighbouring anonymous mappings alike), so that smaps speaks of it alone.
                let map_len = len + 2 * HUGE;
                // SAFETY: a fresh private mapping at an address the kernel picks, no access yet.
                let p = unsafe {
                    rustix::mm::mmap_anonymous(
                        std::ptr::null_mut(),
                        map_len,
                        ProtFlags::empty(),
                        MapFlags::PRIVATE | MapFlags::NORESERVE,
                    )
                }
                .map_err(|e| fail(format!("mmap: {e}")))?
                .cast::<u8>();
                // The first 2 MiB boundary past `p`: at least one page of guard before, at
                // least 2 MiB after. Bounded: the boundary lies inside the mapping just made.
                let off = (p as usize + 1).next_multiple_of(HUGE) - p as usize;
                let base = p.wrapping_add(off);
                let mem = Memory::Mmap { p, map_len };
                // From here on, dropping `rb` unmaps.
                let mut rb = ReadBuffer {
                    name,
                    base,
                    len,
                    mem,
                    how: String::new(),
                };
                // SAFETY: `base..base + len` lies in the mapping made above (`off + len <
                // map_len`), ours; nothing refers to it yet.
                unsafe {
                    rustix::mm::mprotect(
                        base.cast(),
                        len,
                        rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE,
                    )
                }
                .map_err(|e| fail(format!("mprotect: {e}")))?;
                if name == "mmap-thp" {
                    // SAFETY: advice on the range made accessible above; no contents change.
                    unsafe { rustix::mm::madvise(base.cast(), len, Advice::LinuxHugepage) }
                        .map_err(|e| fail(format!("madvise(MADV_HUGEPAGE): {e}")))?;
                }
                // SAFETY: the range made writable above, ours.
                unsafe { crate::systems::populate(base, len) }.map_err(fail)?;
                rb.how = format!(
                    "anonymous mmap, 2 MiB-aligned, {}MADV_POPULATE_WRITE (THP enabled [{}], \
                     defrag [{}])",
                    if name == "mmap-thp" {
                        "MADV_HUGEPAGE, "
                    } else {
                        "no advice, "
                    },
                    measure::thp_setting("enabled"),
                    measure::thp_setting("defrag")
                );
                rb.write_chain(succ);
                return Ok(rb);
            }
            other => return Err(format!("unknown random-mode row {other:?}")),
        };
        let rb = ReadBuffer {
            name,
            base,
            len,
            mem,
            how,
        };
        rb.write_chain(succ);
        Ok(rb)
    }

    /// Writes the chain: at each line's first 8 bytes, the offset of the line that follows it.
    fn write_chain(&self, succ: &[u32]) {
        assert_eq!(succ.len(), self.len / LINE, "one link per line");
        for (i, &next) in succ.iter().enumerate() {
            // SAFETY: line `i < len / LINE` lies in the buffer, which this row owns and nobody
            // else uses; the base is page-aligned, so the 8-byte store is aligned.
            unsafe {
                self.base
                    .add(i * LINE)
                    .cast::<usize>()
                    .write(next as usize * LINE)
            };
        }
    }

    /// Follows the chain from the line at `offset` for `reads` reads; returns the offset
    /// reached.
    #[inline(never)]
    pub fn chase(&self, mut offset: usize, reads: u64) -> usize {
        let base = self.base.cast_const();
        for _ in 0..reads {
            // SAFETY: every offset in the chain (and the starting one, from `chase` or 0) is
            // `k * LINE` for a line `k < len / LINE` of the buffer, written by `write_chain`;
            // the buffer lives as long as `self`, and only reads happen now.
            offset = unsafe { base.add(offset).cast::<usize>().read() };
        }
        std::hint::black_box(offset)
    }

    /// What the kernel backs the buffer with now (smaps and numa_maps of its range).
    pub fn pages(&self) -> RangePages {
        measure::range_pages(self.base as usize, self.len)
    }

    /// The bytes the chain covers.
    pub fn bytes(&self) -> usize {
        self.len
    }

    /// The heap behind a pagepool row.
    pub fn heap(&self) -> Option<&SystemHeap> {
        match &self.mem {
            Memory::Heap { heap, .. } => Some(heap),
            Memory::Mmap { .. } => None,
        }
    }
}

/// Calibration: reads timed, in chunks, until they add up to this much.
pub const CALIBRATE: Duration = Duration::from_millis(20);
/// The least time a repetition reads for (without `--iters`).
pub const MIN_REP: Duration = Duration::from_millis(20);

/// The mean ns per read of the buffer's chain over at least [`CALIBRATE`], from `offset`;
/// returns it and the offset reached.
pub fn calibrate(rb: &ReadBuffer, mut offset: usize) -> (f64, usize) {
    const CHUNK: u64 = 10_000;
    let (mut reads, t) = (0u64, Instant::now());
    while t.elapsed() < CALIBRATE {
        offset = rb.chase(offset, CHUNK);
        reads += CHUNK;
    }
    (t.elapsed().as_nanos() as f64 / reads as f64, offset)
}

/// The random mode: per buffer size, one buffer per row ([`ROWS`]), all holding the
/// same chain, all alive at once; each row warmed up and calibrated, then the repetitions in
/// interleaved order (rotated each repetition), each continuing the row's chain where the last
/// stopped. A row's figure is the median repetition's mean ns per read, beside the range.
pub fn run_mode(
    args: &Args,
    sizes: &[usize],
    bar: &indicatif::ProgressBar,
    report: &mut Report,
) -> Result<(), String> {
    println!("== mode: random ==");
    let started = Instant::now();
    let reps = args.random_reps();
    println!(
        "random: dependent 8-byte reads, one per 64-byte line, through every line of the buffer \
         in one random cyclic order (seed {:#x}, the same for every row); {reps} repetitions per \
         row, interleaved, of at least {} ms each; THP enabled [{}], defrag [{}], \
         shmem_enabled [{}]; free 2 MiB hugetlb pages {}",
        SEED,
        MIN_REP.as_millis(),
        measure::thp_setting("enabled"),
        measure::thp_setting("defrag"),
        measure::thp_setting("shmem_enabled"),
        measure::free_hugetlb_pages()
    );
    let mut mr = ModeReport::new("random");
    for &size in sizes {
        let t = Instant::now();
        bar.set_message(format!("random {size} chain"));
        let lines = size / LINE;
        let succ = cycle(lines, SEED);
        let bufs: Vec<ReadBuffer> = ROWS
            .iter()
            .map(|n| ReadBuffer::new(n, size, &succ))
            .collect::<Result<_, _>>()?;
        drop(succ);
        let huge_before: Vec<u64> = bufs.iter().map(|b| b.pages().huge()).collect();
        bar.suspend(|| {
            println!(
                "buffers of {}: {lines} lines; chain and buffers ready in {:.1} s",
                measure::bytes(size as u64),
                t.elapsed().as_secs_f64()
            )
        });
        // Warm up (through up to 100,000 lines) and calibrate each row: its reads per
        // repetition fit its share of the budget, but last at least MIN_REP.
        let mut pos = vec![0usize; bufs.len()];
        let mut reads = vec![0u64; bufs.len()];
        for (i, b) in bufs.iter().enumerate() {
            bar.set_message(format!("random {size} {} warm-up", b.name));
            let p = b.chase(0, lines.min(100_000) as u64);
            let (est, p) = calibrate(b, p);
            pos[i] = p;
            reads[i] = match args.iters {
                Some(n) => n as u64,
                None => {
                    let per_rep =
                        (args.budget_ms as f64 * 1e6 / reps as f64).max(MIN_REP.as_nanos() as f64);
                    (per_rep / est.max(0.1)).ceil() as u64
                }
            };
            bar.inc(1);
        }
        let mut ns: Vec<Vec<f64>> = vec![Vec::new(); bufs.len()];
        for rep in 0..reps {
            for k in 0..bufs.len() {
                let i = (k + rep) % bufs.len(); // interleaved, rotated each repetition
                bar.set_message(format!("random {size} {} rep {}", bufs[i].name, rep + 1));
                let t = Instant::now();
                pos[i] = bufs[i].chase(pos[i], reads[i]);
                ns[i].push(t.elapsed().as_nanos() as f64 / reads[i] as f64);
                bar.inc(1);
            }
        }
        let med = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let base = med(&ns[0]);
        for (i, b) in bufs.iter().enumerate() {
            let pages = b.pages();
            let mut backing = format!("{}; {}", b.how, pages.describe(b.bytes()));
            if huge_before[i] != pages.huge() {
                backing.push_str(&format!(
                    " (before the reads: {} in 2 MiB pages)",
                    measure::bytes(huge_before[i])
                ));
            }
            let row = ReadRow {
                mode: "random".into(),
                system: b.name.into(),
                size,
                reads: reads[i],
                reps_ns_per_read: ns[i].clone(),
                ns_per_read: med(&ns[i]),
                vs_pagepool: (base > 0.0).then(|| med(&ns[i]) / base),
                backing,
                huge_bytes: pages.huge(),
                resident_bytes: pages.rss,
            };
            bar.suspend(|| {
                println!("{}", row.seed_line());
                println!("  backing: {}", row.backing);
            });
            mr.reads.push(row);
        }
        for b in bufs.iter().filter_map(ReadBuffer::heap) {
            b.flush();
        }
    }
    bar.suspend(|| print!("{}", mr.random_summary(&ROWS)));
    println!(
        "== mode random: {:.1} s ==",
        started.elapsed().as_secs_f64()
    );
    report.modes.push(mr);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_is_one_cycle_through_every_line() {
        for n in [1, 2, 3, 1000, 4096] {
            let succ = cycle(n, SEED);
            let (mut i, mut seen) = (0usize, vec![false; n]);
            for _ in 0..n {
                assert!(!seen[i], "line {i} twice in {n}");
                seen[i] = true;
                i = succ[i] as usize;
            }
            assert_eq!(i, 0, "back at the start after {n}");
            assert!(seen.iter().all(|&s| s));
        }
    }

    #[test]
    fn a_chase_follows_the_chain() {
        let len = HUGE;
        let succ = cycle(len / LINE, SEED);
        let rb = ReadBuffer::new("mmap", len, &succ).unwrap();
        let n = (len / LINE) as u64;
        assert_eq!(rb.chase(0, n), 0, "a whole cycle comes back");
        assert_eq!(rb.chase(0, 1), succ[0] as usize * LINE);
        assert!(rb.pages().rss >= len as u64);
    }
}
