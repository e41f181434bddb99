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
//! | hand-off wait | [`HANDOFF_WAIT`] (50 us) | fixed | an allocation's wait for work in the worker's hands |
//! | hand-off cap | [`HANDOFF_CAP`] (5 ms) | fixed | that wait while the worker makes progress |
//! | worker grace | [`WORKER_GRACE`] (1 ms), [`WAKE_GRACE`] (10 ms), [`PREEMPTED`] (1 ms) | fixed | lateness before releases stop queueing |
//! | hold | as long as the worker was late: [`LATE_HOLD`] (3 ms) to [`LATE_HOLD_MAX`] (1 s) | fixed | how long releases zero their own buffers then |
//! | naps | [`NAP_FIRST`], [`NAP_STEADY_FOR`], [`NAP_LONGEST`] | fixed | an idle worker's nap lengths |
//! | claim delay | [`CLAIM_DELAY`] (2 us) | fixed | a spinning worker leaves new work to a following allocation |
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

/// The longest a thread waits for work in another thread's hands while that thread makes no
/// progress (a piece being zeroed by the worker, a claim landing, a lock the worker holds):
/// about the time the worker takes to zero its largest piece ([`WORKER_PIECE`] stripes,
/// 256 KiB) here. Past it, an allocation does without: it takes other queued blocks or fresh pages, and
/// whoever holds the work finishes it on their own time. The worker runs at nice 19; on a busy
/// machine the scheduler can leave it waiting for hundreds of milliseconds, even in the middle
/// of a stripe or while it holds a lock, and no allocation must wait that long with it.
pub(crate) const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_micros(50);

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

/// The longest an allocation waits for the worker even while it makes progress (see
/// `Handoff::wait_worker`): beyond this, fresh pages are cheaper. (Loom's models do not
/// time that wait.)
#[cfg_attr(loom, allow(dead_code))]
pub(crate) const HANDOFF_CAP: std::time::Duration = std::time::Duration::from_millis(5);

/// How long before the next release is due a worker napping through an idle spell wakes up to
/// spin (see `ReleaseQueue::next_with`): covers the nap's lateness (the worker's timer slack is
/// set small) and some variation in the program's rhythm.
pub(crate) const EARLY_BY: std::time::Duration = std::time::Duration::from_micros(25);

/// The longest gap between releases the rhythm records (10 ms): longer ones are pauses.
pub(crate) const RHYTHM_MAX_NS: u64 = 10_000_000;

/// How late the worker may be (see `ReleaseQueue::due_ns`) before a release stops queueing for it:
/// on a busy machine a nice-19 thread can wait hundreds of milliseconds for a core, and work
/// queued for it would be zeroed by the next allocation instead, on the allocation's time. A
/// release that zeroes its own buffer does what a synchronous heap does, at the same cost. A
/// running worker renews its promise every few microseconds (each spin round, each stripe it
/// zeroes), so a worker this late has lost its core.
pub(crate) const WORKER_GRACE: std::time::Duration = std::time::Duration::from_millis(1);

/// How late a worker woken by a release may be to look at the queue (see `WORKER_GRACE`):
/// longer than a running worker's grace, as a woken thread waits for the scheduler, and in a
/// VM for an idle virtual CPU to be run again, which took milliseconds even on an idle machine
/// (docs/DESIGN.md, Tuning).
pub(crate) const WAKE_GRACE: std::time::Duration = std::time::Duration::from_millis(10);

/// The shortest time releases keep zeroing their own buffers after the worker was found late,
/// or found itself kept off its core (a hold lasts as long as the worker was late, see
/// `ReleaseQueue::hold`): a worker that runs for a moment meanwhile is likely to lose its core
/// again before it is done, leaving what it took on for the next allocation.
pub(crate) const LATE_HOLD: std::time::Duration = std::time::Duration::from_millis(3);

/// The longest hold (see `ReleaseQueue::hold`).
pub(crate) const LATE_HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// How late past its promise the worker must renew it to count as having been kept off its
/// core (see `ReleaseQueue::promise`).
pub(crate) const PREEMPTED: std::time::Duration = std::time::Duration::from_millis(1);

/// How long a spinning worker leaves newly queued work alone before claiming it. A program that
/// allocates right after it releases (the same buffer size, back to back) takes the dirty
/// blocks itself and shares their zeroing with the idle worker; had the worker claimed them
/// first, the allocation would help with the claim, then wait for it to land in a pool and take
/// it from there, which is slower (docs/DESIGN.md, Tuning). A program that works between
/// releases loses nothing: the worker still zeroes long before its next allocation.
pub(crate) const CLAIM_DELAY: std::time::Duration = std::time::Duration::from_micros(2);

/// An idle worker's first naps (see [`ReleaseQueue::set_worker_naps`]); the worker's own small
/// timer slack (see `spawn_worker`) keeps them about this short.
pub(crate) const NAP_FIRST: std::time::Duration = std::time::Duration::from_micros(100);

/// How long an idle worker keeps taking its first, shortest naps.
pub(crate) const NAP_STEADY_FOR: std::time::Duration = std::time::Duration::from_millis(2);

/// The longest nap.
pub(crate) const NAP_LONGEST: std::time::Duration = std::time::Duration::from_micros(6400);

// ---- Pools ----

/// How many of a pool's most recently given blocks it keeps in its ring of addresses (the top of
/// its LIFO stack; older blocks are linked through their own first word).
pub(crate) const HOT_BLOCKS: usize = 64;

// ---- The pressure monitor ----

pub(crate) const RECENT: usize = 32;
