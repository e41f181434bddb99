//! A seeded multi-thread stress test of the system heap, in the spirit of mimalloc's
//! `test-stress.c`. Do not use this test as a benchmark: it measures nothing, it checks.
//!
//! Eight worker threads allocate buffers of odd sizes (1 byte to 40 MiB, mostly small and
//! medium, sometimes large) from four heaps, within a shared budget of live memory (384 MiB),
//! check each one zeroed on arrival (every word up to 2 MiB; above, the first and last pages
//! and three words in every page), write a pattern derived from its id (three words in every
//! page, the first and last bytes among them), hand many of them to other threads (channels),
//! and check the pattern intact right before dropping them, wherever they are dropped. Now and
//! then a worker runs a burst of small buffers allocated and dropped in batches, often right
//! after a trim. Four racer threads allocate and drop buffers of 1 to 4 pages in a tight loop.
//! The heaps:
//! - `stress-a`: small pool limit, small queue, small thread cache, small arenas, on a private
//!   registry with a small maximum, so that every path runs: thread caches (and their overflow),
//!   the deferred queue and its bound (synchronous zeroing past it), the worker, inline zeroing
//!   of queued blocks, pools, fresh pages, remapped views, limits, arenas coming and going;
//! - `stress-b`: `deferred(false)`, other block orders, on the same registry;
//! - `system`: the default configuration (`SystemHeap::new()`: the global registry, a
//!   pressure monitor);
//! - `stress-d`: `deferred(false)`, no thread cache, a pool of 4 pages: the racers' heap,
//!   whose few blocks change hands between threads all the time.
//!
//! Meanwhile a control thread shrinks, trims, flushes, scans a registry like a pressure
//! response, and samples the statistics, checking at every sample that every counter is within
//! the bounds the code guarantees (see [`check_sample`] for each bound and why it holds); every
//! 400 ms it pauses the workers (between two operations), flushes, and checks the exact
//! accounting (see [`check_quiet`]). A sampler thread reads `Owner::count()` and
//! `Registry::count()` in a tight loop: read without any lock, they must never exceed what the
//! heaps hold, nor read as wrapped negatives.
//!
//! At the end every buffer is dropped, the heaps are flushed and trimmed, every page must have
//! gone back to the system, and the test checks that it did not pass vacuously: many
//! allocations of each size class, thread cache hits, pool hits, fresh pages, remapped views,
//! the worker, synchronous zeroing, a full queue, several arenas, buffers dropped on another
//! thread, stats samples and pauses.
//!
//! Environment: `PAGEPOOL_STRESS_SEED` (decimal or `0x` hex; default a fixed seed) and
//! `PAGEPOOL_STRESS_SECS` (default 3; the run goes on, up to four times as long, until every
//! size class was met often enough). The seed is printed at the start and in every failure.
//! Violations of the statistics' bounds are collected (not fatal at once) and reported
//! together, with how often each one failed; a damaged buffer fails at once.
//!
//! `owner_and_registry_counts_never_exceed_one_block` isolates the counters' race: two threads
//! give and take one block, a third reads the counts.

mod common;

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pagepool::{
    Buffer, HeapStats, SystemHeap, page_size,
    pool::Block,
    registry::{Registry, Shrinker},
};
use rand::{RngExt, SeedableRng, rngs::StdRng};

const SEQ: Ordering = Ordering::SeqCst;

/// The seed used unless `PAGEPOOL_STRESS_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0x5eed_f00d_ca5e_0001;
/// Seconds the workers run unless `PAGEPOOL_STRESS_SECS` says otherwise.
const DEFAULT_SECS: f64 = 3.0;
/// Worker threads (allocating, filling, handing over, dropping).
const WORKERS: usize = 8;
/// Threads that allocate and drop small buffers on `stress-d` in a tight loop.
const RACERS: usize = 4;
/// Threads that may allocate from or release to the heaps: the workers, the racers, the
/// control thread and the test's main thread (for bounds that grow with the number of threads).
const THREADS: usize = WORKERS + RACERS + 2;
/// The most bytes of buffers alive (or being allocated or dropped) at once, over all heaps.
const BUDGET: usize = 384 << 20;
/// The largest buffer asked for.
const MAX_LEN: usize = 40 << 20;
/// Buffers a worker keeps before it drops some.
const LOCAL_MAX: usize = 12;
/// A counter read above this is a negative number wrapped around (or garbage).
const WRAPPED: u64 = 1 << 62;
/// Buffers up to this size (all small and medium ones) are checked zeroed in every word.
const FULL_ZERO_CHECK: usize = 2 << 20;
/// The deferred queue's claims: at most this many pages at once (the crate's `CHUNK_PAGES`, 1 MiB
/// of 4 KiB pages; the module is private).
const CHUNK_PAGES: usize = 256;
/// How often the control thread pauses the workers for the exact checks.
const PAUSE_EVERY: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------------------------
// Configuration and the record of violations

struct Config {
    seed: u64,
    secs: f64,
}

fn config() -> Config {
    let seed = match std::env::var("PAGEPOOL_STRESS_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("PAGEPOOL_STRESS_SEED={s:?}: {e}"))
        }
        Err(_) => DEFAULT_SEED,
    };
    let secs = match std::env::var("PAGEPOOL_STRESS_SECS") {
        Ok(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x > 0.0)
            .unwrap_or_else(|| panic!("PAGEPOOL_STRESS_SECS={s:?}: not a positive number")),
        Err(_) => DEFAULT_SECS,
    };
    Config { seed, secs }
}

#[derive(Default)]
struct Tally {
    checked: u64,
    failed: u64,
    examples: Vec<String>,
}

/// Every invariant checked, how often, how often it failed, and the first few failures.
#[derive(Default)]
struct Checks(Mutex<BTreeMap<&'static str, Tally>>);

impl Checks {
    fn check(&self, name: &'static str, ok: bool, detail: impl FnOnce() -> String) {
        self.add(
            name,
            1,
            u64::from(!ok),
            if ok { None } else { Some(detail()) },
        );
    }

    fn add(&self, name: &'static str, checked: u64, failed: u64, example: Option<String>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let t = map.entry(name).or_default();
        t.checked += checked;
        t.failed += failed;
        if let Some(e) = example
            && t.examples.len() < 3
        {
            t.examples.push(e);
        }
    }

    /// The table of every check, and the failed ones alone.
    fn report(&self) -> (String, String) {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (mut all, mut failed) = (String::new(), String::new());
        for (name, t) in map.iter() {
            let _ = writeln!(all, "  {name}: {} of {} failed", t.failed, t.checked);
            if t.failed > 0 {
                let _ = writeln!(
                    failed,
                    "  {name}: failed {} of {} times; first: {}",
                    t.failed,
                    t.checked,
                    t.examples.join(" | ")
                );
            }
        }
        (all, failed)
    }
}

/// Fails the test at once (a damaged buffer, an allocation error), with the seed.
macro_rules! fatal {
    ($seed:expr, $($arg:tt)*) => {
        panic!("[PAGEPOOL_STRESS_SEED={:#x}] {}", $seed, format!($($arg)*))
    };
}

// ---------------------------------------------------------------------------------------------
// The heaps, and what the test knows of each

/// The test's own count of what it did with one heap. Each operation bumps its `*_started`
/// counters before calling the heap and its `*_done` counters after, with a SeqCst fence
/// between the test's counters and the call, so that a reader that reads the heap's counters
/// between two snapshots of these (fences on its side too) may bracket them: a heap counter
/// of completed work is at least the `done` count of the snapshot before, at most the
/// `started` count of the snapshot after.
#[derive(Default)]
struct Track {
    allocs_started: AtomicU64,
    allocs_done: AtomicU64,
    /// Blocks the allocations are built from (the heap's plan: largest orders first).
    blocks_started: AtomicU64,
    blocks_done: AtomicU64,
    pages_started: AtomicU64,
    pages_done: AtomicU64,
    drops_done: AtomicU64,
    pages_dropped: AtomicU64,
    /// Buffers seen remapped (`Buffer::is_remapped`) on arrival.
    remapped: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Snap {
    allocs_started: u64,
    allocs_done: u64,
    blocks_started: u64,
    blocks_done: u64,
    pages_started: u64,
    pages_done: u64,
    drops_done: u64,
    pages_dropped: u64,
    remapped: u64,
}

impl Track {
    fn snap(&self) -> Snap {
        fence(SEQ);
        let s = Snap {
            allocs_started: self.allocs_started.load(SEQ),
            allocs_done: self.allocs_done.load(SEQ),
            blocks_started: self.blocks_started.load(SEQ),
            blocks_done: self.blocks_done.load(SEQ),
            pages_started: self.pages_started.load(SEQ),
            pages_done: self.pages_done.load(SEQ),
            drops_done: self.drops_done.load(SEQ),
            pages_dropped: self.pages_dropped.load(SEQ),
            remapped: self.remapped.load(SEQ),
        };
        fence(SEQ);
        s
    }
}

struct HeapCtx {
    name: &'static str,
    heap: SystemHeap,
    limit_pages: usize,
    /// Pages one thread's cache of this heap may hold.
    cache_pages: usize,
    /// The most pages a pool's block can have.
    max_block_pages: usize,
    track: Track,
}

struct World {
    seed: u64,
    page: usize,
    heaps: Vec<HeapCtx>,
    /// The registries the heaps count against, each with the heaps on it.
    registries: Vec<(Arc<Registry>, Vec<usize>)>,
    checks: Checks,
    /// Bytes reserved by the workers for live buffers (see `BUDGET`).
    budget: AtomicUsize,
    /// Held for reading around every operation of a worker; the control thread takes it for
    /// writing to pause them all between two operations.
    gate: RwLock<()>,
    /// The workers stop allocating.
    stop: AtomicBool,
    /// The control and sampler threads stop.
    stop_control: AtomicBool,
    kinds: Kinds,
}

/// How many allocations of each kind, and other events, the workers saw (for the non-vacuity
/// checks at the end).
#[derive(Default)]
struct Kinds {
    small: AtomicU64,
    medium: AtomicU64,
    large: AtomicU64,
    huge: AtomicU64,
    /// Allocations in bursts (counted in their size class too).
    burst: AtomicU64,
    /// Allocations by the racers (counted as small too).
    raced: AtomicU64,
    handed_over: AtomicU64,
    dropped_elsewhere: AtomicU64,
    budget_skips: AtomicU64,
    worker_samples: AtomicU64,
    control_samples: AtomicU64,
    pauses: AtomicU64,
    sampler_reads: AtomicU64,
    shrunk_pages: AtomicU64,
    pressure_scanned_pages: AtomicU64,
    max_arenas_a: AtomicUsize,
}

fn build_world(seed: u64) -> World {
    let page = page_size();
    // `stress-a` and `stress-b` share a registry whose maximum (24 MiB) is below the sum of
    // their limits (16 MiB each), so that the registry's own shrinking runs too.
    let shared = Registry::new((24 << 20) / page);
    let a = SystemHeap::builder()
        .name("stress-a")
        .registry(shared.clone())
        .pool_limit(16 << 20)
        .queue_limit(16 << 20)
        .thread_cache(32 << 10)
        .arena_size(8 << 20)
        .pressure(None)
        .build()
        .unwrap();
    let b = SystemHeap::builder()
        .name("stress-b")
        .registry(shared.clone())
        .orders(&[9, 4, 1, 0])
        .pool_limit(16 << 20)
        .thread_cache(16 << 10)
        .deferred(false)
        .pressure(None)
        .build()
        .unwrap();
    let c = SystemHeap::new().unwrap();
    // `stress-d`: synchronous, no thread cache, a pool of 4 pages: the heap of the racers and
    // of half the bursts, whose few blocks change hands between threads all the time.
    let d = SystemHeap::builder()
        .name("stress-d")
        .registry(Registry::new((4 << 30) / page))
        .pool_limit(4 * page)
        .thread_cache(0)
        .deferred(false)
        .pressure(None)
        .build()
        .unwrap();
    let d_registry = d.owner().registry().clone();
    let global = c.owner().registry().clone();
    assert_eq!(
        global.stats().owners.len(),
        1,
        "the default heap is alone on the global registry (its bounds assume it)"
    );
    let ctx = |name, heap: SystemHeap, cache_bytes: usize| {
        let limit_pages = heap.owner().limit_pages();
        let max_block_pages = 1 << heap.orders()[0];
        HeapCtx {
            name,
            heap,
            limit_pages,
            cache_pages: cache_bytes / page,
            max_block_pages,
            track: Track::default(),
        }
    };
    World {
        seed,
        page,
        heaps: vec![
            ctx("stress-a", a, 32 << 10),
            ctx("stress-b", b, 16 << 10),
            ctx("system", c, 64 << 10 /* the default thread cache */),
            ctx("stress-d", d, 0),
        ],
        registries: vec![
            (shared, vec![0, 1]),
            (global, vec![2]),
            (d_registry, vec![3]),
        ],
        checks: Checks::default(),
        budget: AtomicUsize::new(0),
        gate: RwLock::new(()),
        stop: AtomicBool::new(false),
        stop_control: AtomicBool::new(false),
        kinds: Kinds::default(),
    }
}

/// The blocks the heap builds a buffer of `pages` pages from: for each order, largest first,
/// as many as fit in what is left (`SystemHeap::alloc`'s plan).
fn plan(orders: &[u8], pages: usize) -> Vec<u8> {
    let mut left = pages;
    let mut out = Vec::new();
    for &o in orders {
        out.extend(std::iter::repeat_n(o, left >> o));
        left &= (1 << o) - 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Buffers: zero checks and patterns

/// A buffer in the test's hands.
struct Item {
    buf: Buffer,
    id: u64,
    heap: usize,
    /// The length asked for.
    asked: usize,
    /// The worker that allocated it.
    origin: usize,
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser.
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pattern word `i` of a buffer holds, `base` being `mix` of its id: never zero. Cheap (a
/// multiplication per word), so that patterns cost little in debug builds.
fn pattern(base: u64, i: usize) -> u64 {
    (base ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// Zero words to compare with: slice equality of integers is a `memcmp`, fast in debug builds.
static ZEROS: [u64; 4096] = [0; 4096];

/// The index of the first non-zero word.
fn first_nonzero(w: &[u64]) -> Option<usize> {
    let mut off = 0;
    for c in w.chunks(ZEROS.len()) {
        if c != &ZEROS[..c.len()] {
            return c.iter().position(|&x| x != 0).map(|i| off + i);
        }
        off += c.len();
    }
    None
}

fn words(buf: &[u8]) -> &[u64] {
    // SAFETY: every bit pattern is a valid u64.
    let (pre, w, post) = unsafe { buf.align_to::<u64>() };
    assert!(
        pre.is_empty() && post.is_empty(),
        "buffers are page-aligned"
    );
    w
}

fn words_mut(buf: &mut [u8]) -> &mut [u64] {
    // SAFETY: every bit pattern is a valid u64.
    let (pre, w, post) = unsafe { buf.align_to_mut::<u64>() };
    assert!(
        pre.is_empty() && post.is_empty(),
        "buffers are page-aligned"
    );
    w
}

/// The words a buffer's pattern covers: in every page its first word (where a pooled block
/// keeps its link, so that a link left behind is caught, and where every buffer writes, so that
/// a page not zeroed is caught), its last word, and one more chosen by the buffer's id. The
/// buffer's first and last bytes are among them.
fn pattern_words(id: u64, n: usize, wpp: usize, mut f: impl FnMut(usize)) {
    for p in 0..n / wpp {
        f(p * wpp);
        f(p * wpp + 1 + (mix(id ^ ((p as u64) << 32)) as usize % (wpp - 2)));
        f(p * wpp + wpp - 1);
    }
}

fn fill(item: &mut Item, wpp: usize) {
    let (id, base) = (item.id, mix(item.id));
    let w = words_mut(&mut item.buf);
    let n = w.len();
    pattern_words(id, n, wpp, |i| w[i] = pattern(base, i));
}

/// The first word of the pattern that is not intact, as (index, found).
fn damaged(item: &Item, wpp: usize) -> Option<(usize, u64)> {
    let w = words(&item.buf);
    let base = mix(item.id);
    let mut bad = None;
    pattern_words(item.id, w.len(), wpp, |i| {
        if bad.is_none() && w[i] != pattern(base, i) {
            bad = Some((i, w[i]));
        }
    });
    bad
}

/// The first non-zero word of a new buffer: every word up to `FULL_ZERO_CHECK`; above, the
/// first and last pages whole and in every page its first word, its last and one at random.
fn first_dirty(buf: &[u8], wpp: usize, rng: &mut StdRng) -> Option<(usize, u64)> {
    let w = words(buf);
    let n = w.len();
    let at = |i: usize| (w[i] != 0).then_some((i, w[i]));
    if buf.len() <= FULL_ZERO_CHECK {
        return first_nonzero(w).map(|i| (i, w[i]));
    }
    if let Some(i) = first_nonzero(&w[..wpp]) {
        return Some((i, w[i]));
    }
    if let Some(i) = first_nonzero(&w[n - wpp..]) {
        return Some((n - wpp + i, w[n - wpp + i]));
    }
    (1..n / wpp - 1).find_map(|p| {
        at(p * wpp)
            .or_else(|| at(p * wpp + wpp - 1))
            .or_else(|| at(p * wpp + rng.random_range(0..wpp)))
    })
}

// ---------------------------------------------------------------------------------------------
// The workers

/// A length to ask for: mostly small (up to 16 KiB) and medium (up to 2 MiB), sometimes large
/// (up to 16 MiB), rarely huge (up to 40 MiB); odd sizes, rarely whole pages. Medium and large
/// sizes are log-uniform, so that every size class is met often.
fn pick_len(page: usize, rng: &mut StdRng) -> usize {
    let (lo, hi) = match rng.random_range(0..1000) {
        0..560 => (1, 16 << 10),
        560..960 => ((16 << 10) + 1, 2 << 20),
        960..995 => ((2 << 20) + 1, 16 << 20),
        _ => ((16 << 20) + 1, MAX_LEN),
    };
    let len = if lo == 1 || hi == MAX_LEN {
        rng.random_range(lo..=hi)
    } else {
        let x = rng.random_range((lo as f64).ln()..=(hi as f64).ln());
        (x.exp() as usize).clamp(lo, hi)
    };
    if rng.random_range(0..8) == 0 {
        // Exactly a page count, or one byte past it.
        (len.next_multiple_of(page) + rng.random_range(0..2)).clamp(lo, hi)
    } else {
        len
    }
}

/// A size for a burst on heap `h`: a few pages (blocks of order 0 mostly), most of them above
/// what its thread caches keep, so that releases and allocations go through the pools (and, on
/// the deferred heaps, the queue and the worker).
fn burst_len(h: usize, page: usize, rng: &mut StdRng) -> usize {
    let pages = match h {
        0 => rng.random_range(3..=15),
        1 => rng.random_range(1..=15),
        2 => rng.random_range(5..=15),
        _ => rng.random_range(1..=15),
    };
    pages * page - rng.random_range(0..page)
}

struct Worker<'w> {
    w: &'w World,
    me: usize,
    rng: StdRng,
    local: Vec<Item>,
    next_id: u64,
}

/// A worker's pass through the gate, for one operation.
fn gate(w: &World) -> std::sync::RwLockReadGuard<'_, ()> {
    w.gate.read().unwrap_or_else(|e| e.into_inner())
}

impl Worker<'_> {
    fn wpp(&self) -> usize {
        self.w.page / 8
    }

    fn reserve(&self, bytes: usize) -> bool {
        self.w
            .budget
            .fetch_update(SEQ, SEQ, |cur| {
                (cur + bytes <= BUDGET).then_some(cur + bytes)
            })
            .is_ok()
    }

    /// A heap picked at random.
    fn pick_heap(&mut self) -> usize {
        match self.rng.random_range(0..100) {
            0..42 => 0,
            42..70 => 1,
            70..95 => 2,
            _ => 3,
        }
    }

    /// Allocates `len` bytes from heap `h`, checks and fills the buffer.
    fn alloc(&mut self, h: usize, len: usize) -> Option<Item> {
        let w = self.w;
        let ctx = &w.heaps[h];
        let pages = len.div_ceil(w.page);
        let bytes = pages * w.page;
        while !self.reserve(bytes) {
            // Over the budget: drop some of ours first, or give up this one.
            if self.local.is_empty() {
                w.kinds.budget_skips.fetch_add(1, SEQ);
                return None;
            }
            let item = self.local.swap_remove(0);
            self.drop_item(item);
        }
        let blocks = plan(ctx.heap.orders(), pages);
        let t = &ctx.track;
        t.allocs_started.fetch_add(1, SEQ);
        t.blocks_started.fetch_add(blocks.len() as u64, SEQ);
        t.pages_started.fetch_add(pages as u64, SEQ);
        fence(SEQ);
        let buf = ctx
            .heap
            .alloc(len)
            .unwrap_or_else(|e| fatal!(w.seed, "{}: alloc({len}) failed: {e}", ctx.name));
        fence(SEQ);
        t.allocs_done.fetch_add(1, SEQ);
        t.blocks_done.fetch_add(blocks.len() as u64, SEQ);
        t.pages_done.fetch_add(pages as u64, SEQ);
        if buf.is_remapped() {
            t.remapped.fetch_add(1, SEQ);
        }
        let id = ((self.me as u64) << 48) | self.next_id;
        self.next_id += 1;
        if buf.len() != bytes || !(buf.as_ptr() as usize).is_multiple_of(w.page) {
            fatal!(
                w.seed,
                "{}: alloc({len}) gave {} bytes at {:p}",
                ctx.name,
                buf.len(),
                buf.as_ptr()
            );
        }
        let got: Vec<u8> = buf.blocks().map(|b| b.order).collect();
        if got != blocks {
            fatal!(
                w.seed,
                "{}: alloc({len}) built of blocks {got:?}, planned {blocks:?}",
                ctx.name
            );
        }
        let wpp = self.wpp();
        if let Some((i, x)) = first_dirty(&buf, wpp, &mut self.rng) {
            fatal!(
                w.seed,
                "{}: a new buffer of {len} bytes (id {id:#x}, remapped {}) is not zeroed: word {i} \
                 (page {}, offset {}) is {x:#018x}",
                ctx.name,
                buf.is_remapped(),
                i * 8 / w.page,
                i * 8 % w.page,
            );
        }
        let kind = match pages {
            0..=4 => &w.kinds.small,
            5..=512 => &w.kinds.medium,
            513..=4096 => &w.kinds.large,
            _ => &w.kinds.huge,
        };
        kind.fetch_add(1, SEQ);
        let mut item = Item {
            buf,
            id,
            heap: h,
            asked: len,
            origin: self.me,
        };
        fill(&mut item, wpp);
        Some(item)
    }

    /// Checks the pattern, drops the buffer, counts it.
    fn drop_item(&self, item: Item) {
        let w = self.w;
        let ctx = &w.heaps[item.heap];
        if let Some((i, x)) = damaged(&item, self.wpp()) {
            fatal!(
                w.seed,
                "{}: buffer {:#x} ({} bytes asked, {} held, remapped {}, from worker {}, dropped \
                 by worker {}) was damaged: word {i} (page {}) is {x:#018x}, not {:#018x}",
                ctx.name,
                item.id,
                item.asked,
                item.buf.len(),
                item.buf.is_remapped(),
                item.origin,
                self.me,
                i * 8 / w.page,
                pattern(mix(item.id), i)
            );
        }
        if item.origin != self.me {
            w.kinds.dropped_elsewhere.fetch_add(1, SEQ);
        }
        let pages = item.buf.len() / w.page;
        let t = &ctx.track;
        fence(SEQ);
        drop(item);
        fence(SEQ);
        t.drops_done.fetch_add(1, SEQ);
        t.pages_dropped.fetch_add(pages as u64, SEQ);
        w.budget.fetch_sub(pages * w.page, SEQ);
    }

    fn run(&mut self, senders: Vec<Sender<Item>>, rx: Receiver<Item>) {
        let w = self.w;
        while !w.stop.load(SEQ) {
            let _g = gate(w);
            while let Ok(item) = rx.try_recv() {
                self.local.push(item);
            }
            let r = self.rng.random_range(0..100);
            if r < 5 {
                self.burst();
            } else if r < 55 || self.local.is_empty() {
                let h = self.pick_heap();
                let len = pick_len(w.page, &mut self.rng);
                if let Some(item) = self.alloc(h, len) {
                    if self.rng.random_range(0..100) < 35 {
                        self.hand_over(&senders, item);
                    } else {
                        self.local.push(item);
                    }
                }
            } else if r < 88 || self.local.len() > LOCAL_MAX {
                let i = self.rng.random_range(0..self.local.len());
                let item = self.local.swap_remove(i);
                self.drop_item(item);
            } else {
                let i = self.rng.random_range(0..self.local.len());
                let item = self.local.swap_remove(i);
                self.hand_over(&senders, item);
            }
            while self.local.len() > LOCAL_MAX {
                let i = self.rng.random_range(0..self.local.len());
                let item = self.local.swap_remove(i);
                self.drop_item(item);
            }
            if self.rng.random_range(0..400) == 0 {
                let h = self.rng.random_range(0..w.heaps.len());
                sample(w, h);
                w.kinds.worker_samples.fetch_add(1, SEQ);
            }
        }
        // Done handing over: the channels close once every worker is here.
        drop(senders);
        for item in std::mem::take(&mut self.local) {
            let _g = gate(w);
            self.drop_item(item);
        }
        for item in rx.iter() {
            let _g = gate(w);
            self.drop_item(item);
        }
        // Empty this thread's caches now, under the gate, rather than at thread exit.
        let _g = gate(w);
        for ctx in &w.heaps {
            ctx.heap.shrink(0);
        }
    }

    /// A burst of small buffers, often right after a trim: a few rounds of allocating a batch
    /// and dropping it whole. Their blocks change hands between threads (and the heap's worker)
    /// through nearly empty pools: the counters' race needs a take of a block racing its give
    /// while the owner's count is about as low as that block.
    fn burst(&mut self) {
        let w = self.w;
        if self.rng.random_bool(0.5) {
            // On `stress-d`: a buffer at a time, allocated and dropped at once.
            for _ in 0..self.rng.random_range(50..200) {
                let len = burst_len(3, w.page, &mut self.rng);
                if let Some(item) = self.alloc(3, len) {
                    w.kinds.burst.fetch_add(1, SEQ);
                    self.drop_item(item);
                }
            }
            return;
        }
        let h = self.pick_heap();
        if self.rng.random_bool(0.5) {
            w.heaps[h].heap.trim();
        }
        for _ in 0..self.rng.random_range(1..=4) {
            let n = self.rng.random_range(4..32);
            let batch: Vec<Item> = (0..n)
                .filter_map(|_| {
                    let len = burst_len(h, w.page, &mut self.rng);
                    self.alloc(h, len)
                })
                .collect();
            w.kinds.burst.fetch_add(batch.len() as u64, SEQ);
            for item in batch {
                self.drop_item(item);
            }
        }
    }

    /// A racer: allocates and drops buffers of 1 to 4 pages on `stress-d` in a tight loop, so
    /// that its tiny pool's blocks go back and forth between the racers and the bursts (the
    /// counters' race: an allocation taking more pages than the owner's count shows, because a
    /// give's update of the count lags behind its block).
    fn race(&mut self) {
        let w = self.w;
        // A buffer held throughout, so that the racers' arena stays mapped (an arena with
        // nothing used is unmapped at once, and mapping one per round would be most of the work).
        let anchor = {
            let _g = gate(w);
            self.alloc(3, 1)
        };
        while !w.stop.load(SEQ) {
            let _g = gate(w);
            for _ in 0..64 {
                let len = self.rng.random_range(1..=4 * w.page);
                if let Some(item) = self.alloc(3, len) {
                    w.kinds.raced.fetch_add(1, SEQ);
                    self.drop_item(item);
                }
            }
        }
        let _g = gate(w);
        if let Some(item) = anchor {
            self.drop_item(item);
        }
    }

    fn hand_over(&mut self, senders: &[Sender<Item>], item: Item) {
        let mut to = self.rng.random_range(0..WORKERS - 1);
        if to >= self.me {
            to += 1;
        }
        match senders[to].send(item) {
            Ok(()) => {
                self.w.kinds.handed_over.fetch_add(1, SEQ);
            }
            // That worker is gone (it panicked): drop it here.
            Err(e) => self.drop_item(e.0),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

/// Every counter of a sample, by name (for the wrap check).
fn counters(s: &HeapStats) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = vec![
        // An unlimited maximum (`None`) is no wrapped counter.
        (
            "registry_max_pages".into(),
            s.registry_max_pages.map_or(0, |m| m as u64),
        ),
        ("registry_total_pages".into(), s.registry_total_pages as u64),
        ("other_owners_pages".into(), s.other_owners_pages as u64),
        ("peak_pooled_pages".into(), s.peak_pooled_pages as u64),
        ("allocs".into(), s.allocs),
        ("hits".into(), s.hits),
        ("misses".into(), s.misses),
        ("fresh_pages".into(), s.fresh_pages),
        ("released_pages".into(), s.released_pages),
        ("live_buffers".into(), s.live_buffers),
        ("live_pages".into(), s.live_pages),
        ("cache_hits".into(), s.cache_hits),
        ("thread_cached_pages".into(), s.thread_cached_pages as u64),
        ("contiguous".into(), s.contiguous),
        ("remapped".into(), s.remapped),
        ("zeroed_sync".into(), s.zeroed_sync),
        ("zeroed_worker".into(), s.zeroed_worker),
        ("zeroed_inline".into(), s.zeroed_inline),
        ("waited_for_worker".into(), s.waited_for_worker),
        ("helped_worker".into(), s.helped_worker),
        ("worker_bytes".into(), s.worker_bytes),
        ("queued_pages".into(), s.queued_pages as u64),
        ("peak_queued_pages".into(), s.peak_queued_pages as u64),
        ("queue_limit_pages".into(), s.queue_limit_pages as u64),
        ("pressure_freed_pages".into(), s.pressure_freed_pages),
        ("arenas".into(), s.arenas as u64),
        ("owner.pages".into(), s.owner.pages as u64),
        (
            "owner.limit_pages".into(),
            s.owner.limit_pages.map_or(0, |l| l as u64),
        ),
    ];
    for p in &s.owner.pools {
        let o = p.order;
        v.push((format!("pool[{o}].pages"), p.pages as u64));
        v.push((format!("pool[{o}].blocks"), p.blocks as u64));
        v.push((format!("pool[{o}].given"), p.given));
        v.push((format!("pool[{o}].taken"), p.taken));
        v.push((format!("pool[{o}].released"), p.released));
    }
    v
}

/// Checks that hold for any single snapshot, whenever it is taken.
fn check_alone(w: &World, h: usize, s: &HeapStats) {
    let ctx = &w.heaps[h];
    let c = &w.checks;
    let name = ctx.name;
    // No counter reads like a negative number wrapped around.
    for (field, v) in counters(s) {
        c.check(
            "no counter reads as a wrapped negative (> 2^62)",
            v < WRAPPED,
            || format!("{name}: {field} = {v}"),
        );
    }
    c.check(
        "owner.limit_pages is the configured limit",
        s.owner.limit_pages.unwrap_or(usize::MAX) == ctx.limit_pages,
        || format!("{name}: {:?} != {}", s.owner.limit_pages, ctx.limit_pages),
    );
    // The queue refuses a release that would pass its bound (queued and in-flight pages are
    // counted together under one lock), and its peak is the largest such sum.
    c.check(
        "queued_pages <= queue_limit_pages",
        s.queued_pages <= s.queue_limit_pages,
        || format!("{name}: {} > {}", s.queued_pages, s.queue_limit_pages),
    );
    c.check(
        "queued_pages <= peak_queued_pages <= queue_limit_pages",
        s.queued_pages <= s.peak_queued_pages && s.peak_queued_pages <= s.queue_limit_pages,
        || {
            format!(
                "{name}: queued {} peak {} limit {}",
                s.queued_pages, s.peak_queued_pages, s.queue_limit_pages
            )
        },
    );
    // The remapped counter is bumped before the allocation counter, and read first.
    c.check("remapped <= allocs", s.remapped <= s.allocs, || {
        format!("{name}: remapped {} > allocs {}", s.remapped, s.allocs)
    });
    c.check("cache_hits <= allocs", s.cache_hits <= s.allocs, || {
        format!("{name}: cache_hits {} > allocs {}", s.cache_hits, s.allocs)
    });
    // A thread's cache holds at most `thread_cache` bytes (an overflowing release sends its
    // oldest buffers on first); every thread that touches the heap may have one.
    c.check(
        "thread_cached_pages <= threads x thread cache",
        s.thread_cached_pages <= THREADS * ctx.cache_pages,
        || {
            format!(
                "{name}: {} > {THREADS} x {}",
                s.thread_cached_pages, ctx.cache_pages
            )
        },
    );
    for p in &s.owner.pools {
        // Blocks, pages, given and taken are read together under the pool's lock.
        c.check(
            "pool: pages == blocks << order",
            p.pages == p.blocks << p.order,
            || format!("{name}: pool {p:?}"),
        );
        c.check(
            "pool: blocks == given - taken",
            p.given >= p.taken && p.given - p.taken == p.blocks as u64,
            || format!("{name}: pool {p:?}"),
        );
        // `released` is bumped after the block's `take` and read after the lock: at most one
        // release per thread shrinking right then can be ahead of `taken`.
        c.check(
            "pool: released <= taken (+ concurrent releases)",
            p.released <= p.taken + (THREADS + 4) as u64,
            || format!("{name}: pool {p:?}"),
        );
    }
}

/// Checks one snapshot `s` against snapshots `a` (taken just before) and `z` (just after) of
/// the same heap, and snapshots of the test's own counts before (`t0`) and after (`t1`).
///
/// The bounds and why the code guarantees them:
/// - pages from the system only grow (`fresh_pages`), pages given back only grow
///   (`released_pages`); a page is counted fresh (after it is carved) before it can reach a
///   pool, and counted released after it left its pool. So whatever is pooled at a moment is
///   at most `fresh - released` at that moment, and at most `z.fresh - a.released` for a moment
///   between the two snapshots. This holds for each pool's pages (read under its lock), for
///   their sum (read at different moments, but a page in two pools is two carvings, counted
///   twice as fresh), and for `owner.pages`, a counter updated next to the pool's lock: a block
///   counts in it from just after its give to just after its take, so it may count a block
///   being taken (not yet released) but never one that does not exist. It may *undercount*
///   while a give's update lags a take's: as an unsigned number that reads as a wrap (the known
///   race, caught by the wrap check and by the sampler).
/// - the registry's total is the sum of its owners' counters: at most the sum of their bounds.
/// - allocations are counted before `alloc` returns and after the test starts one;
///   `live_buffers = allocs - frees`, read from pieces at different moments, counts a buffer
///   only if its allocation was counted and its release not yet, so it is at most the buffers
///   the test started allocating minus those it finished dropping; the same for `live_pages`.
/// - every block of a buffer is a pool hit, a queued block zeroed inline (or a block from a
///   thread cache, counted in `zeroed_inline` too: one page each), or a miss; all counted before
///   `alloc` returns. So `hits + misses + zeroed_inline` lies between the blocks of the
///   allocations the test finished and those it started.
/// - misses are counted before their pages are carved: `a.fresh <= max block pages x misses`,
///   and `misses <= z.fresh` plus the blocks of allocations in progress.
/// - the memory the heap holds (`fresh - released`) is bounded: live buffers (the budget),
///   pooled pages (the limit, plus batches given and not yet trimmed to the limit: buffers
///   being released, in the budget again; claims landing, under the queue limit; thread
///   caches being emptied), queued pages (the queue limit), thread caches, and blocks being
///   taken by shrinks (one per thread).
/// - `owner.pages <= limit` is *not* guaranteed while threads run: a batch (a whole buffer
///   released synchronously, a landing claim, a thread cache emptied) is given first, then the
///   pool is trimmed to its limit. The same bound as above applies; the limit itself is
///   checked at quiet points ([`check_quiet`]).
///
/// The library updates its counters with relaxed atomics; the brackets assume what x86-64
/// gives (and the library's locks give on any target where the updates are ordered by them):
/// an update made before another, on one thread or across a lock, is not seen after it.
fn check_sample(
    w: &World,
    h: usize,
    a: &HeapStats,
    s: &HeapStats,
    z: &HeapStats,
    t0: Snap,
    t1: Snap,
) {
    let ctx = &w.heaps[h];
    let c = &w.checks;
    let name = ctx.name;
    if h == 0 {
        w.kinds.max_arenas_a.fetch_max(s.arenas, SEQ);
    }
    for st in [a, s, z] {
        check_alone(w, h, st);
    }
    // Monotonic counters.
    c.check(
        "fresh/released/allocs/hits/misses never go down",
        a.fresh_pages <= s.fresh_pages
            && s.fresh_pages <= z.fresh_pages
            && a.released_pages <= s.released_pages
            && s.released_pages <= z.released_pages
            && a.allocs <= s.allocs
            && s.allocs <= z.allocs
            && a.hits <= s.hits
            && a.misses <= s.misses
            && s.misses <= z.misses,
        || format!("{name}: a {a:?}\n s {s:?}\n z {z:?}"),
    );
    let held = z.fresh_pages.saturating_sub(a.released_pages);
    c.check(
        "owner.pages <= fresh - released (bracketed)",
        (s.owner.pages as u64) <= held,
        || format!("{name}: owner.pages {} > {held}", s.owner.pages),
    );
    for p in &s.owner.pools {
        c.check(
            "pool pages <= fresh - released (bracketed)",
            (p.pages as u64) <= held,
            || format!("{name}: pool {} pages {} > {held}", p.order, p.pages),
        );
    }
    let pools: usize = s.owner.pools.iter().map(|p| p.pages).sum();
    c.check(
        "sum of pools' pages <= fresh - released (bracketed)",
        pools as u64 <= held,
        || format!("{name}: {pools} > {held}"),
    );
    c.check(
        "peak_pooled_pages <= fresh_pages",
        s.peak_pooled_pages as u64 <= z.fresh_pages,
        || format!("{name}: {} > {}", s.peak_pooled_pages, z.fresh_pages),
    );
    c.check(
        "allocs between the test's finished and started allocations",
        t0.allocs_done <= s.allocs && s.allocs <= t1.allocs_started,
        || {
            format!(
                "{name}: allocs {} not in [{}, {}]",
                s.allocs, t0.allocs_done, t1.allocs_started
            )
        },
    );
    let live_max = t1.allocs_started.saturating_sub(t0.drops_done);
    c.check(
        "live_buffers <= buffers allocated - dropped by the test",
        s.live_buffers <= live_max,
        || format!("{name}: live_buffers {} > {live_max}", s.live_buffers),
    );
    let live_pages_max = t1.pages_started.saturating_sub(t0.pages_dropped);
    c.check(
        "live_pages <= pages allocated - dropped by the test",
        s.live_pages <= live_pages_max,
        || format!("{name}: live_pages {} > {live_pages_max}", s.live_pages),
    );
    let blocks = s.hits + s.misses + s.zeroed_inline;
    c.check(
        "hits + misses + zeroed_inline between the blocks allocated (finished, started)",
        t0.blocks_done <= blocks && blocks <= t1.blocks_started,
        || {
            format!(
                "{name}: hits {} + misses {} + inline {} = {blocks} not in [{}, {}]",
                s.hits, s.misses, s.zeroed_inline, t0.blocks_done, t1.blocks_started
            )
        },
    );
    c.check(
        "remapped >= buffers the test saw remapped",
        s.remapped >= t0.remapped,
        || format!("{name}: remapped {} < {}", s.remapped, t0.remapped),
    );
    let max_block = ctx.max_block_pages as u64;
    let in_progress = t1.blocks_started - t0.blocks_done;
    c.check(
        "fresh <= misses x largest block, misses <= fresh + blocks in progress",
        a.fresh_pages <= s.misses * max_block && s.misses <= z.fresh_pages + in_progress,
        || {
            format!(
                "{name}: fresh {} / {}, misses {}, blocks in progress {in_progress}",
                a.fresh_pages, z.fresh_pages, s.misses
            )
        },
    );
    let held_low = a.fresh_pages.saturating_sub(z.released_pages);
    let budget = (BUDGET / w.page) as u64;
    let bound = 2 * budget
        + (ctx.limit_pages + 2 * s.queue_limit_pages) as u64
        + (2 * THREADS * ctx.cache_pages) as u64
        + (THREADS * ctx.max_block_pages.max(CHUNK_PAGES)) as u64;
    c.check(
        "memory held (fresh - released) within budget + limits",
        held_low <= bound,
        || format!("{name}: held {held_low} > {bound} pages"),
    );
    // An arena is unmapped when nothing in it is used: each holds a page at least (a new one
    // is listed just before its pages are counted fresh).
    c.check(
        "arenas <= pages held (+ arenas being made)",
        s.arenas as u64 <= held + THREADS as u64,
        || format!("{name}: arenas {} > {held} + {THREADS}", s.arenas),
    );
}

/// Samples heap `h`: three snapshots and the test's counts around the middle one, checked.
fn sample(w: &World, h: usize) {
    let heap = &w.heaps[h].heap;
    let a = heap.stats();
    let t0 = w.heaps[h].track.snap();
    let s = heap.stats();
    let t1 = w.heaps[h].track.snap();
    let z = heap.stats();
    check_sample(w, h, &a, &s, &z, t0, t1);
}

/// Samples every heap together, to check the registries' totals: each is at most the sum of
/// its owners' `fresh - released`, bracketed.
fn sample_all(w: &World) {
    let n = w.heaps.len();
    let a: Vec<HeapStats> = w.heaps.iter().map(|c| c.heap.stats()).collect();
    let t0: Vec<Snap> = w.heaps.iter().map(|c| c.track.snap()).collect();
    let s: Vec<HeapStats> = w.heaps.iter().map(|c| c.heap.stats()).collect();
    let regs: Vec<usize> = w.registries.iter().map(|(r, _)| r.count()).collect();
    let t1: Vec<Snap> = w.heaps.iter().map(|c| c.track.snap()).collect();
    let z: Vec<HeapStats> = w.heaps.iter().map(|c| c.heap.stats()).collect();
    for h in 0..n {
        check_sample(w, h, &a[h], &s[h], &z[h], t0[h], t1[h]);
    }
    for (i, (reg, owners)) in w.registries.iter().enumerate() {
        let held: u64 = owners
            .iter()
            .map(|&h| z[h].fresh_pages.saturating_sub(a[h].released_pages))
            .sum();
        let mut seen: Vec<(&str, usize)> = vec![("Registry::count()", regs[i])];
        for &h in owners {
            seen.push(("registry_total_pages", s[h].registry_total_pages));
        }
        for (what, v) in seen {
            w.checks.check(
                "registry total <= its owners' fresh - released (bracketed)",
                v as u64 <= held,
                || format!("registry {i} ({}): {what} {v} > {held}", reg.max_pages()),
            );
        }
    }
    w.kinds.control_samples.fetch_add(1, SEQ);
}

/// The exact checks, with every worker paused between two operations, after a flush of every
/// heap: nothing is being allocated, released, queued or zeroed (only the default heap's
/// pressure monitor could act; then its checks that depend on the pools are skipped).
fn check_quiet(w: &World, when: &str) {
    let c = &w.checks;
    for ctx in &w.heaps {
        ctx.heap.flush();
    }
    let events = |ctx: &HeapCtx| ctx.heap.stats().pressure.map_or(0, |p| p.events);
    let ev0: Vec<u64> = w.heaps.iter().map(events).collect();
    let stats: Vec<HeapStats> = w.heaps.iter().map(|c| c.heap.stats()).collect();
    let regs: Vec<usize> = w.registries.iter().map(|(r, _)| r.count()).collect();
    let ev1: Vec<u64> = w.heaps.iter().map(events).collect();
    for (h, ctx) in w.heaps.iter().enumerate() {
        let s = &stats[h];
        let t = ctx.track.snap();
        let name = ctx.name;
        check_alone(w, h, s);
        let steady = ev0[h] == ev1[h];
        c.check(
            "quiet: allocs == the test's allocations",
            s.allocs == t.allocs_done && t.allocs_done == t.allocs_started,
            || format!("{name} ({when}): {} vs {t:?}", s.allocs),
        );
        c.check(
            "quiet: live_buffers == allocated - dropped",
            s.live_buffers == t.allocs_done - t.drops_done,
            || format!("{name} ({when}): {} vs {t:?}", s.live_buffers),
        );
        c.check(
            "quiet: live_pages == pages allocated - dropped",
            s.live_pages == t.pages_done - t.pages_dropped,
            || format!("{name} ({when}): {} vs {t:?}", s.live_pages),
        );
        c.check(
            "quiet: hits + misses + zeroed_inline == blocks allocated",
            s.hits + s.misses + s.zeroed_inline == t.blocks_done,
            || {
                format!(
                    "{name} ({when}): {} + {} + {} vs {}",
                    s.hits, s.misses, s.zeroed_inline, t.blocks_done
                )
            },
        );
        c.check(
            "quiet: remapped == buffers seen remapped",
            s.remapped == t.remapped,
            || format!("{name} ({when}): {} vs {}", s.remapped, t.remapped),
        );
        c.check(
            "quiet: nothing queued after a flush",
            s.queued_pages == 0,
            || format!("{name} ({when}): {}", s.queued_pages),
        );
        if !steady {
            continue;
        }
        let pools: usize = s.owner.pools.iter().map(|p| p.pages).sum();
        c.check(
            "quiet: owner.pages == sum of its pools",
            s.owner.pages == pools,
            || format!("{name} ({when}): {} vs {pools}", s.owner.pages),
        );
        // Every give is followed by a trim to the limit, by the same thread.
        c.check(
            "quiet: owner.pages <= limit",
            s.owner.pages <= ctx.limit_pages,
            || format!("{name} ({when}): {} > {}", s.owner.pages, ctx.limit_pages),
        );
        let accounted = (s.owner.pages + s.queued_pages + s.thread_cached_pages) as u64
            + s.live_pages
            + s.released_pages;
        c.check(
            "quiet: fresh == pooled + live + queued + thread-cached + released",
            s.fresh_pages == accounted,
            || {
                format!(
                    "{name} ({when}): fresh {} vs {accounted}: {s}",
                    s.fresh_pages
                )
            },
        );
        let taken: u64 = s.owner.pools.iter().map(|p| p.taken).sum();
        let given: u64 = s.owner.pools.iter().map(|p| p.given).sum();
        let released: u64 = s.owner.pools.iter().map(|p| p.released).sum();
        // Blocks leave a pool for an allocation (a hit) or for the system (a release).
        c.check(
            "quiet: taken == hits + released (blocks)",
            taken == s.hits + released,
            || {
                format!(
                    "{name} ({when}): taken {taken}, hits {}, released {released}",
                    s.hits
                )
            },
        );
        // Blocks enter a pool zeroed by the worker or by the releasing thread.
        c.check(
            "quiet: given == zeroed_worker + zeroed_sync (blocks)",
            given == s.zeroed_worker + s.zeroed_sync,
            || {
                format!(
                    "{name} ({when}): given {given}, worker {}, sync {}",
                    s.zeroed_worker, s.zeroed_sync
                )
            },
        );
    }
    for (i, (reg, owners)) in w.registries.iter().enumerate() {
        if owners.iter().any(|&h| ev0[h] != ev1[h]) {
            continue;
        }
        let pooled: usize = owners.iter().map(|&h| stats[h].owner.pages).sum();
        c.check(
            "quiet: Registry::count() == sum of its owners' pages",
            regs[i] == pooled,
            || format!("registry {i} ({when}): {} vs {pooled}", regs[i]),
        );
        c.check(
            "quiet: Registry::count() <= its maximum",
            regs[i] <= reg.max_pages(),
            || format!("registry {i} ({when}): {} > {}", regs[i], reg.max_pages()),
        );
    }
    w.kinds.pauses.fetch_add(1, SEQ);
}

// ---------------------------------------------------------------------------------------------
// The control and sampler threads

fn control(w: &World) {
    let mut rng = StdRng::seed_from_u64(w.seed ^ 0xc0_17_01);
    let mut last_pause = Instant::now();
    while !w.stop_control.load(SEQ) {
        std::thread::sleep(Duration::from_micros(rng.random_range(0..2000)));
        let h = rng.random_range(0..w.heaps.len());
        let heap = &w.heaps[h].heap;
        match rng.random_range(0..100) {
            0..30 => sample_all(w),
            30..55 => {
                let freed = heap.shrink(rng.random_range(1..4096));
                w.kinds.shrunk_pages.fetch_add(freed as u64, SEQ);
            }
            55..63 => {
                let freed = heap.trim();
                w.kinds.shrunk_pages.fetch_add(freed as u64, SEQ);
            }
            63..78 => heap.flush(),
            78..88 => {
                // What a pressure response does: the queues first (unzeroed), then the pools.
                let freed = w.registries[0].0.shrink_all(rng.random_range(1..8192));
                w.kinds.pressure_scanned_pages.fetch_add(freed as u64, SEQ);
            }
            _ => {
                for (i, (reg, _)) in w.registries.iter().enumerate() {
                    let st = reg.stats();
                    let mut vals = vec![("total_pages".to_owned(), st.total_pages)];
                    for o in &st.owners {
                        vals.push((format!("{}.pages", o.name), o.pages));
                        for p in &o.pools {
                            vals.push((format!("{}.pool[{}].pages", o.name, p.order), p.pages));
                        }
                    }
                    for (what, v) in vals {
                        w.checks.check(
                            "no counter reads as a wrapped negative (> 2^62)",
                            (v as u64) < WRAPPED,
                            || format!("registry {i}: {what} = {v}"),
                        );
                    }
                }
            }
        }
        if last_pause.elapsed() >= PAUSE_EVERY {
            let _g = w.gate.write().unwrap_or_else(|e| e.into_inner());
            check_quiet(w, "paused");
            last_pause = Instant::now();
        }
    }
}

/// Reads every owner's and registry's count in a tight loop. Between a snapshot of each
/// heap's `released_pages` before a round and of its `fresh_pages` after, every count must be
/// at most `fresh - released` (summed over the owners, for a registry), and never a wrapped
/// negative.
fn sampler(w: &World) {
    // A round: SLICES slices of READS reads of every count, with a short sleep after each (a
    // count that reads wrong for long, because a thread was preempted between its give and
    // the count's update, is caught; the sampler leaves the CPU to the others meanwhile).
    const SLICES: usize = 64;
    const READS: usize = 256;
    let n = w.heaps.len();
    let (mut reads, mut wrapped, mut rounds, mut over) = (0u64, 0u64, 0u64, 0u64);
    let mut examples: Vec<String> = Vec::new();
    while !w.stop_control.load(SEQ) {
        let released: Vec<u64> = w
            .heaps
            .iter()
            .map(|c| c.heap.stats().released_pages)
            .collect();
        let mut max_owner = vec![0usize; n];
        let mut max_reg = vec![0usize; w.registries.len()];
        for k in 0..SLICES * READS {
            if k % READS == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
            for (h, ctx) in w.heaps.iter().enumerate() {
                let v = ctx.heap.owner().count();
                if v as u64 >= WRAPPED {
                    wrapped += 1;
                    if examples.len() < 3 {
                        examples.push(format!("{}: owner.count() = {v}", ctx.name));
                    }
                } else {
                    max_owner[h] = max_owner[h].max(v);
                }
            }
            for (i, (reg, _)) in w.registries.iter().enumerate() {
                let v = reg.count();
                if v as u64 >= WRAPPED {
                    wrapped += 1;
                    if examples.len() < 3 {
                        examples.push(format!("registry {i}: Registry::count() = {v}"));
                    }
                } else {
                    max_reg[i] = max_reg[i].max(v);
                }
            }
            reads += (n + w.registries.len()) as u64;
        }
        rounds += 1;
        let fresh: Vec<u64> = w.heaps.iter().map(|c| c.heap.stats().fresh_pages).collect();
        let held = |h: usize| fresh[h].saturating_sub(released[h]);
        for (h, &max) in max_owner.iter().enumerate() {
            if max as u64 > held(h) {
                over += 1;
                if examples.len() < 6 {
                    let name = w.heaps[h].name;
                    examples.push(format!("{name}: owner.count() {max} > {}", held(h)));
                }
            }
        }
        for (i, (_, owners)) in w.registries.iter().enumerate() {
            let bound: u64 = owners.iter().map(|&h| held(h)).sum();
            if max_reg[i] as u64 > bound {
                over += 1;
                if examples.len() < 6 {
                    examples.push(format!("registry {i}: count() {} > {bound}", max_reg[i]));
                }
            }
        }
    }
    w.kinds.sampler_reads.fetch_add(reads, SEQ);
    let ex = examples.join(" | ");
    w.checks.add(
        "sampler: Owner::count()/Registry::count() never read as wrapped negatives",
        reads,
        wrapped,
        (wrapped > 0).then(|| ex.clone()),
    );
    w.checks.add(
        "sampler: Owner::count()/Registry::count() <= fresh - released (rounds)",
        rounds,
        over,
        (over > 0).then_some(ex),
    );
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn stress_heaps_from_many_threads() {
    let cfg = config();
    let seed = cfg.seed;
    eprintln!(
        "stress: PAGEPOOL_STRESS_SEED={seed:#x} PAGEPOOL_STRESS_SECS={} ({WORKERS} workers, \
         {RACERS} racers)",
        cfg.secs
    );
    let started = Instant::now();
    let w = Arc::new(build_world(seed));

    let (senders, receivers): (Vec<_>, Vec<_>) = (0..WORKERS).map(|_| channel::<Item>()).unzip();
    let workers: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(me, rx)| {
            let w = w.clone();
            let senders = senders.clone();
            std::thread::Builder::new()
                .name(format!("stress-{me}"))
                .spawn(move || {
                    let mut worker = Worker {
                        w: &w,
                        me,
                        rng: StdRng::seed_from_u64(mix(seed ^ me as u64)),
                        local: Vec::new(),
                        next_id: 1,
                    };
                    worker.run(senders, rx);
                })
                .unwrap()
        })
        .collect();
    drop(senders);
    let racers: Vec<_> = (WORKERS..WORKERS + RACERS)
        .map(|me| {
            let w = w.clone();
            std::thread::Builder::new()
                .name(format!("racer-{me}"))
                .spawn(move || {
                    Worker {
                        w: &w,
                        me,
                        rng: StdRng::seed_from_u64(mix(seed ^ me as u64)),
                        local: Vec::new(),
                        next_id: 1,
                    }
                    .race();
                })
                .unwrap()
        })
        .collect();
    let ctl = {
        let w = w.clone();
        let t = std::thread::Builder::new().name("control".into());
        t.spawn(move || control(&w)).unwrap()
    };
    let smp = {
        let w = w.clone();
        let t = std::thread::Builder::new().name("sampler".into());
        t.spawn(move || sampler(&w)).unwrap()
    };

    // Run for the time asked; then on (at most 4 times as long) until every kind of
    // allocation was seen often enough.
    let run_for = Duration::from_secs_f64(cfg.secs);
    let cap = run_for * 4;
    let k = &w.kinds;
    let enough = || {
        k.small.load(SEQ) >= 1000
            && k.medium.load(SEQ) >= 500
            && k.large.load(SEQ) >= 30
            && k.huge.load(SEQ) >= 3
    };
    // A thread that panicked (a damaged buffer) ends the run at once.
    let failed = || workers.iter().chain(&racers).any(|t| t.is_finished());
    while (started.elapsed() < run_for || (!enough() && started.elapsed() < cap)) && !failed() {
        std::thread::sleep(Duration::from_millis(20));
    }
    w.stop.store(true, SEQ);
    let panicked: Vec<usize> = workers
        .into_iter()
        .chain(racers)
        .enumerate()
        .filter_map(|(i, t)| t.join().is_err().then_some(i))
        .collect();
    w.stop_control.store(true, SEQ);
    let ctl_ok = ctl.join().is_ok();
    let smp_ok = smp.join().is_ok();
    assert!(
        panicked.is_empty() && ctl_ok && smp_ok,
        "[PAGEPOOL_STRESS_SEED={seed:#x}] workers {panicked:?} panicked (control ok: {ctl_ok}, \
         sampler ok: {smp_ok}); see their messages above"
    );
    let ran = started.elapsed();

    // The end: every buffer is dropped (the workers dropped theirs and exited, which emptied
    // their thread caches). Flush, check, trim, and every page must be back.
    check_quiet(&w, "end");
    let c = &w.checks;
    // Once the load stops, the deferred heaps' releases (a and default) go back to their
    // workers: the run keeps both cores busy, so a worker may have been found late (releases
    // then zero their own buffers) up to the end; as soon as it runs on time again, releases
    // queue and it zeroes them. Within the longest hold and 2 s more (the hold's length is a
    // multiple of what the machine measured: see `pagepool::stats::tempo`). (Unless other
    // programs keep every core busy all that time: the releases are then zeroed by the
    // releasing thread, the busy-machine behaviour, checked instead. "All that time" is read
    // as most of the samples: builds and test runs beside this one come and go between
    // samples, and one quiet sample does not give a nice-19 worker the core.)
    // Per heap: whether other programs kept every core busy through that phase (the worker
    // then may never have had a core, and the checks that it ran accept that).
    let mut busy_all_along = [false; 4];
    let longest_wait = pagepool::stats::tempo().late_hold_max() + Duration::from_secs(2);
    for h in [0, 2] {
        let heap = &w.heaps[h].heap;
        let t = Instant::now();
        let sync_before = heap.stats().zeroed_sync;
        let (mut samples, mut busy_samples) = (0u32, 0u32);
        let recovered = loop {
            samples += 1;
            busy_samples += u32::from(common::cores_oversubscribed());
            let before = heap.stats().zeroed_worker;
            drop(heap.alloc(1 << 20).unwrap());
            heap.flush();
            if heap.stats().zeroed_worker > before {
                break true;
            }
            if t.elapsed() > longest_wait {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        busy_all_along[h] = !recovered && 2 * busy_samples >= samples;
        c.check(
            "end: once the load stops, the worker zeroes releases again (or, while other \
             programs keep every core busy, each release zeroes its own buffer)",
            recovered || (busy_all_along[h] && heap.stats().zeroed_sync > sync_before),
            || format!("{}: {}", w.heaps[h].name, heap.stats()),
        );
    }
    let mut summary = String::new();
    for (h, ctx) in w.heaps.iter().enumerate() {
        let name = ctx.name;
        ctx.heap.flush();
        let s = ctx.heap.stats();
        let _ = writeln!(summary, "{name} before trim:\n{s}");
        c.check(
            "end: no buffer alive",
            s.live_buffers == 0 && s.live_pages == 0,
            || format!("{name}: {s}"),
        );
        c.check(
            "end: no thread cache holds pages",
            s.thread_cached_pages == 0,
            || format!("{name}: {s}"),
        );
        // Non-vacuity: every path this heap has ran.
        let t = ctx.track.snap();
        let ran_path = |what: &'static str, ok: bool| {
            c.check(what, ok, || format!("{name}: {s}"));
        };
        ran_path("ran: many allocations per heap", t.allocs_done >= 200);
        ran_path("ran: pool hits", s.hits > 0);
        ran_path("ran: fresh pages", s.misses > 0 && s.fresh_pages > 0);
        ran_path("ran: pages given back while running", s.released_pages > 0);
        if h != 3 {
            ran_path("ran: thread cache hits", s.cache_hits > 0);
            ran_path("ran: remapped views", s.remapped > 0);
        }
        match h {
            0 => {
                // Unless other programs kept every core busy from start to end: a nice-19
                // worker then gets no core, which is the busy-machine behaviour (checked at the
                // end above).
                ran_path(
                    "ran: the worker zeroed (a)",
                    s.zeroed_worker > 0 || busy_all_along[h],
                );
                ran_path(
                    "ran: releases zeroed past the queue bound (a)",
                    s.zeroed_sync > 0,
                );
                // The queue refuses releases past its bound, and also while the worker is kept off
                // its core (this test keeps both cores busy): either way a release zeroes its
                // own buffer, and queued work was seen.
                ran_path(
                    "ran: the queue was used and refused releases (a)",
                    (s.peak_queued_pages > 0 || busy_all_along[h]) && s.queue_refused > 0,
                );
                ran_path("ran: several arenas (a)", k.max_arenas_a.load(SEQ) > 1);
                ran_path(
                    "ran: the pool reached its limit (a)",
                    s.peak_pooled_pages > ctx.limit_pages / 2,
                );
            }
            1 => {
                ran_path("ran: synchronous releases (b)", s.zeroed_sync > 0);
                ran_path(
                    "ran: nothing queued (b)",
                    s.zeroed_worker == 0 && s.queue_limit_pages == 0,
                );
            }
            2 => ran_path(
                "ran: the worker zeroed (default)",
                s.zeroed_worker > 0 || busy_all_along[h],
            ),
            _ => ran_path(
                "ran: no thread cache (d)",
                s.cache_hits == 0 && s.zeroed_sync > 0,
            ),
        }
        let freed = ctx.heap.trim();
        ctx.heap.flush();
        let s = ctx.heap.stats();
        let _ = writeln!(summary, "{name} after trim (freed {freed}):\n{s}");
        c.check(
            "end: every page back (fresh == released)",
            s.fresh_pages == s.released_pages,
            || format!("{name}: {s}"),
        );
        c.check(
            "end: nothing pooled, queued, cached or mapped",
            s.owner.pages == 0
                && s.owner
                    .pools
                    .iter()
                    .all(|p| p.pages == 0 && p.given == p.taken)
                && s.queued_pages == 0
                && s.thread_cached_pages == 0
                && s.arenas == 0,
            || format!("{name}: {s}"),
        );
    }
    for (i, (reg, _)) in w.registries.iter().enumerate() {
        c.check("end: registries hold nothing", reg.count() == 0, || {
            format!("registry {i}: {}", reg.stats())
        });
    }
    let kinds = format!(
        "small {} (in bursts {}, by racers {}) medium {} large {} huge {}; handed over {}, dropped by another thread {}, \
         budget skips {}; samples: control {} workers {} pauses {}; sampler reads {}; \
         shrunk {} pages, registry scans {} pages",
        k.small.load(SEQ),
        k.burst.load(SEQ),
        k.raced.load(SEQ),
        k.medium.load(SEQ),
        k.large.load(SEQ),
        k.huge.load(SEQ),
        k.handed_over.load(SEQ),
        k.dropped_elsewhere.load(SEQ),
        k.budget_skips.load(SEQ),
        k.control_samples.load(SEQ),
        k.worker_samples.load(SEQ),
        k.pauses.load(SEQ),
        k.sampler_reads.load(SEQ),
        k.shrunk_pages.load(SEQ),
        k.pressure_scanned_pages.load(SEQ),
    );
    c.check("ran: every kind of allocation, often", enough(), || {
        kinds.clone()
    });
    c.check(
        "ran: buffers dropped by another thread",
        k.dropped_elsewhere.load(SEQ) > 100,
        || kinds.clone(),
    );
    c.check(
        "ran: checks while running",
        k.control_samples.load(SEQ) > 10
            && k.pauses.load(SEQ) >= 1
            && k.sampler_reads.load(SEQ) > 100_000,
        || kinds.clone(),
    );

    // Dropped heaps leave no mapping behind (every thread that cached their buffers exited).
    let w = Arc::try_unwrap(w).unwrap_or_else(|_| panic!("threads still hold the world"));
    let names: Vec<&str> = w.heaps.iter().map(|c| c.name).collect();
    let World { heaps, checks, .. } = w;
    drop(heaps);
    for name in names {
        let left = common::memfd_mappings(name);
        checks.check("end: a dropped heap leaves no mapping", left == 0, || {
            format!("{name}: {left} mappings")
        });
    }

    let (all, failed) = checks.report();
    eprintln!("stress: ran {ran:.1?}; {kinds}\n{summary}checks:\n{all}");
    assert!(
        failed.is_empty(),
        "[PAGEPOOL_STRESS_SEED={seed:#x}] the heaps' statistics broke their bounds:\n{failed}"
    );
}

/// The counters' race alone: `Owner::count()` and `Registry::count()` are updated after the
/// pool's lock is released, so a take's update can come before the give's it undoes. Two
/// threads give and take one block (never more than one exists: a new one is made only after
/// the old one was released), a third reads both counts for a second: each must be at most
/// the block's pages, never a wrapped negative. A misread count also makes the give's limit
/// check release the block (the owner's limit is exactly one block): that must never happen.
#[test]
fn owner_and_registry_counts_never_exceed_one_block() {
    let page = page_size();
    let layout = Layout::from_size_align(page, page).unwrap();
    let registry = Registry::new(1 << 20);
    let owner = registry.register("race", 1);
    let exists = Arc::new(AtomicUsize::new(1));
    let released = Arc::new(AtomicU64::new(0));
    let pool = {
        let (exists, released) = (exists.clone(), released.clone());
        owner.add_pool(
            0,
            Box::new(move |b: Block| {
                // SAFETY: every block given to this pool comes from `alloc_zeroed(layout)`.
                unsafe { std::alloc::dealloc(b.into_raw().as_ptr(), layout) };
                released.fetch_add(1, SEQ);
                exists.fetch_sub(1, SEQ);
            }),
        )
    };
    let new_block = move || {
        // SAFETY: a fresh zeroed page-sized, page-aligned allocation, owned by nobody else; it
        // goes back through the pool's release callback.
        unsafe {
            let p = std::alloc::alloc_zeroed(layout);
            Block::from_raw(NonNull::new(p).expect("out of memory"), 0)
        }
    };
    pool.give(new_block()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let movers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, stop, exists, cycles) =
                (pool.clone(), stop.clone(), exists.clone(), cycles.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(b) = pool.take() {
                        pool.give(b).unwrap();
                        cycles.fetch_add(1, Ordering::Relaxed);
                    } else if exists.compare_exchange(0, 1, SEQ, SEQ).is_ok() {
                        pool.give(new_block()).unwrap();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            })
        })
        .collect();
    let (mut samples, mut bad_owner, mut bad_registry, mut wrapped) = (0u64, 0u64, 0u64, 0u64);
    let mut worst: Vec<String> = Vec::new();
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        for _ in 0..1024 {
            let (o, r) = (owner.count(), registry.count());
            samples += 1;
            for (what, v, bad) in [
                ("owner.count()", o, &mut bad_owner),
                ("registry.count()", r, &mut bad_registry),
            ] {
                if v > 1 {
                    *bad += 1;
                    if v as u64 >= WRAPPED {
                        wrapped += 1;
                    }
                    if worst.len() < 4 {
                        worst.push(format!("{what} = {v}"));
                    }
                }
            }
        }
    }
    stop.store(true, SEQ);
    for t in movers {
        t.join().unwrap();
    }
    let cycles = cycles.load(SEQ);
    let released = released.load(SEQ);
    let (o, r) = (owner.count(), registry.count());
    let pooled = pool.pages();
    let blocks = exists.load(SEQ);
    drop(pool); // releases the block
    eprintln!(
        "count race: {samples} samples, {cycles} take/give cycles; owner.count() above one page \
         {bad_owner} times, registry.count() {bad_registry} times ({wrapped} wrapped); the \
         block was released by a limit check {released} times"
    );
    assert!(cycles > 1000, "the two threads raced: {cycles} cycles");
    assert!(
        blocks <= 1 && (o, r) == (pooled, pooled) && pooled == blocks,
        "once quiet, the counts are exact: owner {o}, registry {r}, pooled {pooled}, blocks {blocks}"
    );
    assert!(
        bad_owner == 0 && bad_registry == 0,
        "of {samples} samples, owner.count() read above one block's pages {bad_owner} times and \
         registry.count() {bad_registry} times ({wrapped} of them wrapped negatives), e.g. {worst:?}"
    );
    assert_eq!(
        released, 0,
        "a misread count made the owner's limit check release the only block {released} times"
    );
}
