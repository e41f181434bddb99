//! Every default and tuning constant of the library, in one place.
//!
//! The heap's settings are [`crate::HeapBuilder`] methods; the constants below them are fixed
//! tuning of the allocation path, the worker and the pools. Each is documented once, here; the
//! design notes (`docs/DESIGN.md`) say how they were chosen.
//!
//! | knob | default | where it is set | what it bounds |
//! |---|---|---|---|
//! | block orders | 8, 4, 0 (1 MiB, 64 KiB, 4 KiB) | `HeapBuilder::orders` | the blocks buffers are built of, largest first |
//! | pool limit | 256 MiB (0: no pooling; `usize::MAX`: unlimited) | `HeapBuilder::pool_limit` | clean memory a heap keeps pooled |
//! | registry maximum | a quarter of physical memory (`Registry::global`; `usize::MAX`: unlimited) | `Registry::new`, `HeapBuilder::registry` | pooled memory of all owners together |
//! | largest buffer | 1 GiB (at least 1 byte; above [`MAX_BUFFER_CEILING`]: no ceiling of the heap's own) | `HeapBuilder::max_buffer` | one allocation |
//! | arena size | 64 MiB (from the largest block to [`MAX_ARENA_SIZE`], 64 TiB) | `HeapBuilder::arena_size` | one memfd's address space |
//! | deferred freeing | on | `HeapBuilder::deferred` | off: every release zeroes synchronously |
//! | queue limit | 64 MiB (any; 0: every release zeroes itself) | `HeapBuilder::queue_limit` | memory queued for the worker; past it releases zero themselves |
//! | worker spin | 200 us | `HeapBuilder::worker_spin` | an idle worker's polling before it naps |
//! | worker naps | 100 ms | `HeapBuilder::worker_naps` | an idle worker's napping before it sleeps |
//! | thread cache | 64 KiB (buffers up to 16 KiB) | `HeapBuilder::thread_cache` | small released buffers kept per thread |
//! | pressure monitor | on: PSI 100 ms stall in 2 s, cgroup watermark 90 %, checked every 1 s, shrink by half | `HeapBuilder::pressure`, `PressureConfig` | `None`: no monitor thread |
//! | claim chunk | [`CHUNK_PAGES`] (1 MiB) | fixed | the worker's largest claim |
//! | stripe | [`STRIPE_BYTES`] (64 KiB) | fixed | the smallest piece two threads split a run into |
//! | worker piece | [`WORKER_PIECE`] stripes (256 KiB) | fixed | what the worker zeroes at once |
//! | shared zeroing | [`SHARE_FROM`] (16 MiB, and any buffer taken whole in one run) | fixed | the smallest buffer whose stolen blocks an allocation shares with the worker |
//! | hand-off wait | the longer of 8 pieces' zeroing and 2 wake-ups, 20 us to 20 ms ([`HANDOFF_WAIT_OF_PIECE`], [`HANDOFF_WAIT_OF_WAKE`]) | measured (`crate::tempo`) | an allocation's wait for work in the worker's hands |
//! | hand-off cap | [`HANDOFF_CAP_OF_WAIT`] hand-off waits | measured | that wait while the worker makes progress |
//! | worker grace | [`WORKER_GRACE_OF_WAIT`] hand-off waits; woken: [`WAKE_GRACE_OF_GRACE`] graces | measured | lateness before releases stop queueing |
//! | hold | as long as the worker was late: [`LATE_HOLD_OF_GRACE`] to [`LATE_HOLD_MAX_OF_GRACE`] graces | measured | how long releases zero their own buffers then |
//! | naps | from a short sleep's lateness ([`EARLY_BY_OF_WAIT`], [`NAP_FIRST_OF_EARLY`], [`NAP_STEADY_OF_FIRST`], [`NAP_LONGEST_OF_FIRST`]) | measured | an idle worker's nap lengths |
//! | claim delay | half a piece's zeroing ([`CLAIM_DELAY_OF_PIECE`]) | measured | a spinning worker leaves new work to a following allocation |
//! | streaming stores | above half the last-level cache, or always where they win by [`STREAMING_WIN`] | measured | how buffers are zeroed |
//! | ring | [`HOT_BLOCKS`] (64) | fixed | pooled blocks whose addresses a pool keeps in an array |
//! | regathering | [`REGATHER_FIRST`] (8) to [`REGATHER_LONGEST`] (1024) | fixed | scattered allocations in a row before one takes fresh pages |

// ---- Heap defaults (each one a `HeapBuilder` setting) and the allocation path ----

/// The default block orders: 1 MiB, 64 KiB and 4 KiB blocks (with 4 KiB pages).
pub(crate) const DEFAULT_ORDERS: [u8; 3] = [8, 4, 0];

/// The default limit on a heap's pooled memory: 256 MiB.
pub(crate) const DEFAULT_POOL_LIMIT: usize = 256 << 20;

/// The default maximum buffer size: 1 GiB.
pub(crate) const DEFAULT_MAX_BUFFER: usize = 1 << 30;

/// The default bound on memory queued for the deferred-free worker: 64 MiB.
pub(crate) const DEFAULT_QUEUE_LIMIT: usize = 64 << 20;

/// The default time an idle worker polls for work before napping: 200 us (see
/// [`crate::HeapBuilder::worker_spin`]).
pub(crate) const DEFAULT_WORKER_SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// The default time an idle worker keeps napping, after its spin, before it sleeps until woken:
/// 100 ms (see [`crate::HeapBuilder::worker_naps`]).
pub(crate) const DEFAULT_WORKER_NAPS: std::time::Duration = std::time::Duration::from_millis(100);

/// The default size of each thread's cache of small released buffers: 64 KiB, so buffers of
/// up to 16 KiB are cached (see [`crate::HeapBuilder::thread_cache`]).
pub(crate) const DEFAULT_THREAD_CACHE: usize = 64 << 10;

/// The default size of one memfd arena: 64 MiB (address space; memory is used only as blocks
/// are carved). Larger buffers get an arena of their own size.
pub(crate) const DEFAULT_ARENA_SIZE: usize = 64 << 20;

/// The largest arena a heap maps: 64 TiB, half of the 47-bit user address space of x86-64
/// with 4-level page tables (with 5-level ones, the kernel hands out addresses above it only to
/// a caller that asks for them, which pagepool does not). An arena is one contiguous
/// mapping of the address space, beside the program, its libraries and every other mapping;
/// an arena size no system could map is refused at build
/// ([`ConfigError::SizeTooLarge`](crate::ConfigError::SizeTooLarge)) rather than failing every
/// allocation later. A multiple of every block size, so the builder's rounding up to a page
/// (to 2 MiB for a huge pool type) never takes an accepted size past it.
#[cfg(target_pointer_width = "64")]
pub(crate) const MAX_ARENA_SIZE: usize = 1 << 46;

/// The largest arena on a 32-bit system: 1 GiB of its 3 GiB (or 4 GiB) of user address space.
#[cfg(not(target_pointer_width = "64"))]
pub(crate) const MAX_ARENA_SIZE: usize = 1 << 30;

/// The largest maximum buffer size a heap keeps: a larger one (`usize::MAX` among them) means
/// no ceiling of the heap's own, and lengths the system cannot map are refused by the system
/// ([`AllocError::Os`](crate::AllocError::Os)). A quarter of `usize::MAX`, so that rounding an
/// accepted length up to pages and to the smallest block (a 2 MiB huge page), adding an
/// arena's guard page and aligning its reservation never overflow.
pub(crate) const MAX_BUFFER_CEILING: usize = isize::MAX as usize / 2;

/// Scattered allocations in a row after which one takes fresh pages (see `alloc_blocks`).
pub(crate) const REGATHER_FIRST: usize = 8;

/// The most scattered allocations in a row between two that take fresh pages.
pub(crate) const REGATHER_LONGEST: usize = 1024;

// ---- The deferred-free worker and the hand-off between it and allocations ----

/// The most pages the worker claims at once (1 MiB with 4 KiB pages): small enough that an
/// allocation waiting for an in-flight claim waits briefly, large enough to amortise the lock.
pub(crate) const CHUNK_PAGES: usize = 256;

/// The stripe size of a [`Job`] in bytes: the smallest piece two threads split a run into.
pub(crate) const STRIPE_BYTES: usize = 64 << 10;

/// A claim takes 1/`CLAIM_SHARE` of the stripes left (at least one): large pieces first, small
/// ones at the end, so that a 1 MiB run is split between two threads in about five claims (each
/// one a cache-line transfer between cores) and they still finish together: on tight 1 MiB
/// allocations, half beat a quarter and one stripe a claim (docs/DESIGN.md, Tuning).
pub(crate) const CLAIM_SHARE: usize = 2;

/// The most stripes the worker takes at once (256 KiB): large enough that it pays few
/// cache-line transfers per chunk, small enough that a helper waits for it only briefly.
pub(crate) const WORKER_PIECE: usize = 4;

/// How many of the oldest queued buffers `steal` looks through for one holding a whole set of
/// the blocks an allocation wants (a bound on the time it holds the queue's lock).
pub(crate) const FIT_SCAN: usize = 32;

/// The smallest buffer whose queued blocks an allocation that takes them shares with the idle
/// worker (16 MiB), besides a buffer taken whole in one run (a 1 MiB buffer of one block): the
/// allocation zeroes the run from the front and the worker from the back (see
/// `Job::next_worker_piece`), so that two cores zero it and, as the buffer circulates, each
/// zeroes the same part of it every time, in its own cache. Other runs are zeroed by the
/// allocation alone, while the worker zeroes the buffer's other end: sharing each 1 MiB chunk
/// of an 8 MiB buffer as well was slower. (With pieces handed out from one end, to whoever
/// asked first, a shared block's lines moved between the cores' caches at every zeroing, and a
/// tight loop of 1 MiB buffers was slower shared than alone; zeroed from both ends, it is
/// faster than alone. Measured: docs/DESIGN.md, Tuning.)
pub(crate) const SHARE_FROM: usize = 16 << 20;

/// The worker's piece in bytes ([`WORKER_PIECE`] stripes): the unit of zeroing the machine's
/// tempo is measured in (`crate::tempo`).
#[cfg_attr(loom, allow(dead_code))] // measured only outside the loom models
pub(crate) const WORKER_PIECE_BYTES: usize = WORKER_PIECE * STRIPE_BYTES;

// ---- The wall-clock bounds: multiples of what the machine measures (`crate::tempo`) ----
//
// The unit is the hand-off wait: the longest a thread waits for work in another thread's hands
// while that thread makes no progress. It is the longer of several pieces' zeroing and a few
// wake-ups on this machine; every other bound is a multiple of it (or of the lateness of a short
// sleep). On the machine the constants were first tuned on (a piece zeroed in ~3-5 us, a
// wake-up in ~25 us) they come out as the fixed values they replace: a 50 us wait, a 1 ms grace,
// a 10 ms wake grace, a 3 ms hold. In an emulated VM (pieces ~20 times slower, wake-ups
// slower still) they grow with it, so that allocations wait for a worker that is merely slow
// instead of zeroing alongside it, and a worker is not held to be off its core while it zeroes.

/// Streaming stores zero every buffer where they zero a cached piece this many times faster
/// than `memset` (an emulated CPU, where `rep stosb` runs byte by byte: ten times slower
/// there). Otherwise only buffers larger than half the last-level cache are streamed.
pub(crate) const STREAMING_WIN: u64 = 2;

/// The hand-off wait is at least this many pieces' zeroing: a waiter gives the worker time
/// to finish the piece it holds and the next.
pub(crate) const HANDOFF_WAIT_OF_PIECE: u64 = 8;

/// ... and at least this many wake-ups: the worker may have to be woken, or wake its waiter.
pub(crate) const HANDOFF_WAIT_OF_WAKE: u64 = 2;

/// The hand-off wait's floor: below it, a wait is lost in the scheduler's own noise.
pub(crate) const HANDOFF_WAIT_MIN: std::time::Duration = std::time::Duration::from_micros(20);

/// The hand-off wait's ceiling: an allocation never waits longer for work that does not move.
pub(crate) const HANDOFF_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(20);

/// The hand-off cap (the longest an allocation waits for the worker even while it makes
/// progress; beyond it, fresh pages are cheaper), in hand-off waits.
pub(crate) const HANDOFF_CAP_OF_WAIT: u32 = 100;

/// How late a running worker may be on its promise to look at the queue (it renews it every
/// spin round and every stripe), in hand-off waits. Past it, on a loaded machine, it counts as
/// kept off its core: on a busy machine a nice-19 thread can wait hundreds of milliseconds for
/// a core, and work queued for it would be zeroed by the next allocation instead, on the
/// allocation's time. A release that zeroes its own buffer does what a synchronous heap does,
/// at the same cost. Renewing its promise more than this late past it is "preempted" too.
pub(crate) const WORKER_GRACE_OF_WAIT: u32 = 20;

/// How late a worker woken by a release may be to look at the queue, in worker graces: a
/// woken thread waits for the scheduler, and in a VM for an idle virtual CPU to be run again,
/// which took milliseconds even on an idle machine (docs/DESIGN.md, Tuning).
pub(crate) const WAKE_GRACE_OF_GRACE: u32 = 10;

/// The shortest time releases keep zeroing their own buffers after the worker was found late,
/// or found itself kept off its core (a hold lasts as long as the worker was late, see
/// `Punctuality::hold`), in worker graces: a worker that runs for a moment meanwhile is likely
/// to lose its core again before it is done, leaving what it took on for the next allocation.
pub(crate) const LATE_HOLD_OF_GRACE: u32 = 3;

/// The longest hold, in worker graces (1 s where the grace is 1 ms).
pub(crate) const LATE_HOLD_MAX_OF_GRACE: u32 = 1000;

/// How long before the next release is due a worker napping through an idle spell wakes up to
/// spin (see `Punctuality::until_next_release`): at least the lateness of a short sleep (the
/// nap's own lateness), and at least this fraction of the hand-off wait (some variation in the
/// program's rhythm).
pub(crate) const EARLY_BY_OF_WAIT: u32 = 4;

/// An idle worker's first naps, in `early_by`s (see `Punctuality::set_naps`; the worker's own
/// small timer slack, [`WORKER_TIMER_SLACK_NS`], keeps them about this short).
pub(crate) const NAP_FIRST_OF_EARLY: u32 = 4;

/// How long an idle worker keeps taking its first, shortest naps, in first naps.
pub(crate) const NAP_STEADY_OF_FIRST: u32 = 20;

/// The longest nap, in first naps.
pub(crate) const NAP_LONGEST_OF_FIRST: u32 = 64;

/// The longest gap between releases the rhythm records, in longest naps: longer ones are
/// pauses.
pub(crate) const RHYTHM_MAX_OF_NAP: u32 = 3;

/// How long a spinning worker leaves newly queued work alone before claiming it, as a
/// fraction of a piece's zeroing (at least 1 us). A program that allocates right after it
/// releases (the same buffer size, back to back) takes the dirty blocks itself and shares
/// their zeroing with the idle worker; had the worker claimed them first, the allocation would
/// help with the claim, then wait for it to land in a pool and take it from there, which is
/// slower (docs/DESIGN.md, Tuning). A program that works between releases loses nothing: the
/// worker still zeroes long before its next allocation.
pub(crate) const CLAIM_DELAY_OF_PIECE: u64 = 2;

/// The worker's timer slack in ns, so that its naps end on time (the default slack is 50 us).
pub(crate) const WORKER_TIMER_SLACK_NS: u64 = 5_000;

// ---- Pools ----

/// How many of a pool's most recently given blocks it keeps in its ring of addresses (the top of
/// its LIFO stack; older blocks are linked through their own first word).
pub(crate) const HOT_BLOCKS: usize = 64;

// ---- The pressure monitor ----

pub(crate) const RECENT: usize = 32;

/// A size as people write it: bytes, or a whole number with `K`, `M`, `G` or `T` (powers of
/// 1024; `KiB`, `kb` and the like too, in any case, spaces around allowed). `None` for anything
/// else, or a size past `usize`.
///
/// ```
/// use pagepool::parse_size;
/// assert_eq!(parse_size("64K"), Some(64 << 10));
/// assert_eq!(parse_size("8 MiB"), Some(8 << 20));
/// assert_eq!(parse_size("4096"), Some(4096));
/// assert_eq!(parse_size("1.5M"), None);
/// ```
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return None;
    }
    let n: usize = s[..digits].parse().ok()?;
    let shift = match s[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1usize << shift)
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("2gib"), Some(2 << 30));
        assert_eq!(parse_size(" 4096 "), Some(4096));
        assert_eq!(parse_size("0"), Some(0));
        for bad in [
            "",
            "K",
            "-1",
            "1.5M",
            "12Q",
            "99999999999999999999",
            "16777216T",
            "4K4",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
