//! Gathering a buffer's blocks: per order, from its pool, the queue or the worker's claims
//! (clean blocks taken and zeroed); the streak of scattered allocations that makes one take
//! fresh pages instead ([`Streak`]); and the fresh carve for what is missing, which gives up
//! what it replaces only once it has the pages.

use super::core::HeapInner;
use super::job::{Run, Runs};
use crate::config::{CHUNK_PAGES, REGATHER_FIRST, REGATHER_LONGEST};
use crate::error::AllocError;
use crate::pool::Near;
use crate::shrinker::Shrinker;
use crate::sync::{AtomicUsize, Ordering};

/// What [`HeapInner::gather`] found for a buffer: its runs (sorted, joined where blocks lie end
/// to end), the queued blocks it zeroed (`stolen`), the fresh range it carved (`fresh`:
/// address and length), and how many blocks came from each source.
pub(crate) struct Gathered {
    pub(crate) runs: Runs,
    pub(crate) stolen: Runs,
    pub(crate) fresh: Option<(usize, usize)>,
    pub(crate) hits: usize,
    pub(crate) inline: usize,
    pub(crate) misses: usize,
}

/// A buffer's blocks while they are gathered: the runs (largest order first; `missing`: the
/// indices of placeholder runs, `start` 0, for blocks still to come fresh), the queued blocks
/// zeroed here (for `undo_alloc`), how many blocks came from the pools (`hits`) and the queue
/// (`inline`), and the blocks gathered but left out in favour of fresh pages, if the system
/// gives them: back to the pools (`to_pool`) or to the system (`to_system`) once it has.
#[derive(Default)]
struct Gathering {
    runs: Runs,
    stolen: Runs,
    missing: Vec<usize>,
    hits: usize,
    inline: usize,
    to_pool: Runs,
    to_system: Runs,
}

impl Gathering {
    /// A placeholder for `count` blocks of `order` still to come fresh.
    fn miss(&mut self, order: u8, count: usize) {
        self.missing.push(self.runs.len());
        self.runs.push(Run {
            start: 0,
            order,
            count,
        });
    }

    /// The pages still to come fresh.
    fn missing_pages(&self) -> usize {
        self.missing.iter().map(|&i| self.runs[i].pages()).sum()
    }
}

/// When an allocation whose blocks stay scattered takes fresh pages instead (see
/// [`regather`](Self::regather)): allocations that needed a view, two per such allocation less
/// one per allocation of several blocks that needed none, and half how many make the next one
/// take fresh pages.
pub(crate) struct Streak {
    scattered: AtomicUsize,
    after: AtomicUsize,
}

impl Streak {
    /// No streak; the first regathering after [`REGATHER_FIRST`] scattered allocations.
    pub(crate) fn new() -> Streak {
        Streak {
            scattered: AtomicUsize::new(0),
            after: AtomicUsize::new(REGATHER_FIRST),
        }
    }

    /// Counts an allocation that needed a view (`needs_view`) or not, of `several` blocks or
    /// not; true if it takes fresh pages as one range instead of its scattered blocks.
    ///
    /// Blocks gathered from the pools that do not lie end to end need a view, and as they
    /// circulate, so do later buffers of the same size: with a worker, whose claims land
    /// while allocations take what is queued, two threads that share a pool can keep a set
    /// scattered for good (each takes what the other left; without a worker the pools'
    /// choice of blocks keeps sets whole, see `PagePool::take_many`); so can one thread
    /// with two buffers in circulation, when a set the worker had in its hands once came
    /// back beside a fresh block: the pooled set has a hole and the queued one a stray
    /// block, and each allocation takes the queued set whole. After REGATHER_FIRST such
    /// allocations in a row, one takes fresh pages as one range and gives the blocks it
    /// gathered back to the system; if scattering goes on anyway (a mix of sizes
    /// that no fresh set helps), the count before the next one doubles, up to
    /// REGATHER_LONGEST, so that fresh pages never cost more than a small share of the
    /// views they save. Not on a busy machine (`busy()`), where fresh pages cost the most (a
    /// fault per page, each a chance to lose the core): a view costs one system call.
    ///
    /// The count goes up by two per such allocation and down by one per allocation of
    /// several blocks that needed no view, so that it also grows while a scattered set and a
    /// whole one take turns (two buffers in circulation, one of them scattered for good: a
    /// count reset by every whole allocation would never get there), but not while views
    /// are the exception.
    ///
    /// On a busy machine the count stands still: neither scattered allocations nor whole
    /// ones move it. `busy` (it reads the clock) is asked only when the answer matters.
    fn regather(&self, needs_view: bool, several: bool, busy: impl Fn() -> bool) -> bool {
        if needs_view && !busy() {
            let streak = self.scattered.fetch_add(2, Ordering::Relaxed) + 2;
            let after = self.after.load(Ordering::Relaxed);
            if streak >= 2 * after {
                self.scattered.store(0, Ordering::Relaxed);
                self.after
                    .store((after * 2).min(REGATHER_LONGEST), Ordering::Relaxed);
                return true;
            }
        } else if !needs_view && several && self.scattered.load(Ordering::Relaxed) > 0 && !busy() {
            let before = self
                .scattered
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            if before == Ok(1) {
                self.after.store(REGATHER_FIRST, Ordering::Relaxed);
            }
        }
        false
    }
}

impl HeapInner {
    /// Gathers the blocks of a buffer of `pages` pages: largest first, each order from its pool,
    /// the queue or the worker's claims ([`gather_order`](Self::gather_order)), the rest from
    /// the system as one range ([`carve_fresh`](Self::carve_fresh)). Counts nothing: the caller
    /// counts the allocation with [`count_alloc`](Self::count_alloc) once its buffer is made,
    /// or undoes it with [`undo_alloc`](Self::undo_alloc).
    ///
    /// Where fresh pages would make a better buffer than what was gathered (an order short of
    /// blocks, or a set that stays scattered: see [`whole_order_fresh`] and
    /// [`Streak::regather`]), the fresh range is carved *before* anything gathered is given up;
    /// if the system refuses it, the buffer is made of what was gathered and only what is
    /// missing comes fresh. If the system refuses even that for want of room
    /// (`RLIMIT_MEMLOCK`, `ENOMEM`), this heap's pooled memory is given back (counted in
    /// `reclaimed_pages`) and the carve tried once more. A failure leaves the pools and the
    /// counters as they were.
    pub(crate) fn gather(&self, pages: usize) -> Result<Gathered, AllocError> {
        let h = self;
        // Largest blocks first. Each order's blocks are sorted by address and runs of blocks
        // that lie end to end merged, so the bookkeeping grows with the number of separate
        // pieces, not with the buffer's size, and blocks freed together come back together.
        let mut g = Gathering::default();
        // Whether the machine looks busy (see `Punctuality::busy`): read only where it decides
        // something, as it reads the clock.
        let busy = || h.handoff.as_ref().is_some_and(|l| l.queue().busy());
        for (order, want) in split(&h.orders, pages) {
            h.gather_order(&mut g, order, want, pages, busy);
        }
        // Cheapest question first: `scattered` looks at the runs in hand, `pooling` reads the
        // owner's limit (a cache line of its own, often cold after zeroing a large buffer:
        // asked on every allocation, it made a deferred heap's large allocations slower than a
        // synchronous heap's on the same work; docs/DESIGN.md, A busy machine).
        let needs_view = h.handoff.is_some()
            && g.hits + g.inline > 0
            && scattered(&g.runs, &g.missing, h.page)
            && h.pooling();
        if h.streak.regather(needs_view, g.runs.len() > 1, busy) {
            // The scattered blocks go back to the system rather than to the pools: pooled,
            // they would stay in circulation beside the fresh set and scatter it in turn.
            for (i, r) in g.runs.iter().enumerate() {
                if !g.missing.contains(&i) {
                    g.to_system.push(*r);
                }
            }
            g.runs = layout(&h.orders, pages, &[]);
            g.missing = (0..g.runs.len()).collect();
        }
        let fresh = h.carve_fresh(&mut g, pages)?;
        let Gathering {
            mut runs,
            stolen,
            missing,
            hits,
            inline,
            ..
        } = g;
        let misses: usize = missing.iter().map(|&i| runs[i].count).sum();
        let page = h.page;
        runs.dedup_by(|next, prev| {
            let joined = prev.order == next.order && prev.end(page) == next.start;
            if joined {
                prev.count += next.count;
            }
            joined
        });
        Ok(Gathered {
            runs,
            stolen,
            fresh,
            hits,
            inline,
            misses,
        })
    }

    /// Gathers the `want` blocks of `order` of a buffer of `pages` pages into `g`: clean ones
    /// from the pool, the queue or the worker's claims, placeholders for the rest; or, where
    /// what it got would scatter the set (see [`whole_order_fresh`]), placeholders for all of
    /// them, what it got set aside to go back to the pool once fresh pages replace it.
    fn gather_order(
        &self,
        g: &mut Gathering,
        order: u8,
        want: usize,
        pages: usize,
        busy: impl FnOnce() -> bool,
    ) {
        let h = self;
        let i = h.pool_index(order);
        let first = g.runs.len();
        let (p, z) = h.take_clean(i, want, pages, &mut g.runs, &mut g.stolen);
        (g.hits, g.inline) = (g.hits + p, g.inline + z);
        // The blocks still missing are in the worker's hands (it did not land them within
        // the bound): they will land in the pool beside the ones gathered here, and the
        // set is whole again there for the next buffer. Only they come fresh, then.
        let landing = |short: usize| {
            h.handoff
                .as_ref()
                .is_some_and(|l| l.in_flight(order) >= short << order)
        };
        let got = p + z;
        if whole_order_fresh(got, want, landing, busy) {
            // Blocks of one order gathered from the pools or the queue, with fresh ones
            // beside them, would need a view; and as they circulate, so would every later
            // buffer of this size: a single block short (taken by another buffer) would
            // scatter the set for good. So this order's blocks are all taken fresh, as one
            // range, and what was gathered goes back to the pools, clean. Not on a busy
            // machine (fresh pages cost most there), nor when the missing blocks are the
            // worker's, landing soon: only what is missing.
            g.to_pool.extend(g.runs.drain(first..));
            g.miss(order, want);
            return;
        }
        g.runs[first..].sort_unstable_by_key(|r| r.start);
        if got < want {
            g.miss(order, want - got);
        }
    }

    /// The fresh range for what `g` is missing (`None`: nothing is), carved as one range and
    /// split in order; only once it is carved are the blocks it replaces given up. Refused, the
    /// buffer is made of what was gathered and only what is missing comes fresh; refused for
    /// want of room, this heap's pooled and queued memory is given back and the carve tried
    /// once more. On failure, what was gathered is given back as it was (see `undo_alloc`).
    fn carve_fresh(
        &self,
        g: &mut Gathering,
        pages: usize,
    ) -> Result<Option<(usize, usize)>, AllocError> {
        let h = self;
        // The misses come from the system as one range, split in order.
        let mut fresh = h.carve_missing(&mut g.runs, &g.missing);
        if !g.to_pool.is_empty() || !g.to_system.is_empty() {
            if fresh.is_ok() {
                // The fresh range replaces what was left out: only now is it given up.
                let stolen = &g.stolen;
                let queued = |r: &Run| stolen.iter().any(|s| s.holds(r.start, h.page));
                for r in &g.to_pool {
                    let (p, z) = if queued(r) {
                        (0, r.count)
                    } else {
                        (r.count, 0)
                    };
                    (g.hits, g.inline) = (g.hits - p, g.inline - z);
                }
                h.undo_alloc(&g.to_pool, &g.stolen, None);
                for r in &g.to_system {
                    // Those taken from a pool count as its releases (queued ones never
                    // entered it).
                    if queued(r) {
                        g.inline -= r.count;
                    } else {
                        g.hits -= r.count;
                        h.pools[h.pool_index(r.order)].count_released(r.count);
                    }
                    h.release_run(r);
                }
                let (to_pool, to_system) = (&g.to_pool, &g.to_system);
                g.stolen.retain(|s| {
                    !to_pool
                        .iter()
                        .chain(to_system)
                        .any(|r| s.holds(r.start, h.page))
                });
            } else {
                // Refused: the buffer is made of what was gathered, and only what is missing
                // comes fresh.
                let mut gathered: Runs = g
                    .runs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !g.missing.contains(i))
                    .map(|(_, r)| *r)
                    .collect();
                gathered.extend(g.to_pool.drain(..).chain(g.to_system.drain(..)));
                g.runs = layout(&h.orders, pages, &gathered);
                g.missing = (0..g.runs.len())
                    .filter(|&i| g.runs[i].start == 0)
                    .collect();
                fresh = h.carve_missing(&mut g.runs, &g.missing);
            }
        }
        if let Err(e) = &fresh
            && h.room_refused(e, g.missing_pages())
        {
            // What this heap holds pooled or queued counts against the same limit: given back,
            // it makes room (as reclaim runs the shrinkers before a kernel allocation fails).
            let need = g.missing_pages();
            let mut freed = self.owner.scan(need);
            if freed < need
                && let Some(handoff) = &h.handoff
            {
                freed += handoff.scan(need - freed);
            }
            if freed > 0 {
                h.counters
                    .reclaimed
                    .fetch_add(freed as u64, Ordering::Relaxed);
                fresh = h.carve_missing(&mut g.runs, &g.missing);
            }
        }
        fresh.inspect_err(|_| {
            for &i in g.missing.iter().rev() {
                g.runs.remove(i);
            }
            h.undo_alloc(&g.runs, &g.stolen, None);
        })
    }

    /// Takes up to `want` clean blocks of pool `i` for an allocation, appending them to `runs`:
    /// from the pool; for a single block, then the worker's claim of this order, helped with
    /// and waited for; then queued dirty blocks, zeroed here; then, while the worker is zeroing
    /// blocks of this order, waiting for them. Returns (from pool, zeroed inline).
    fn take_clean(
        &self,
        i: usize,
        want: usize,
        buffer_pages: usize,
        runs: &mut Runs,
        stolen_runs: &mut Runs,
    ) -> (usize, usize) {
        let order = self.orders[i];
        let pool = &self.pools[i];
        let worker_locking = self
            .handoff
            .as_ref()
            .map_or(&self.no_worker, |l| l.queue().worker_locking());
        let page = self.page;
        // Blocks that fill the holes between the ones of this order gathered so far (stolen
        // from the queue, or landed earlier) and continue them are preferred: the buffer is
        // then whole, without a view. `end_to_end`: `n` blocks that do that (or, with nothing
        // gathered yet, that lie end to end), or none.
        let take_pooled = |runs: &mut Runs, n: usize, end_to_end: bool| {
            let (mut lo, mut hi, mut bytes) = (usize::MAX, 0, 0);
            for r in runs.iter().filter(|r| r.order == order) {
                (lo, hi, bytes) = (
                    lo.min(r.start),
                    hi.max(r.end(page)),
                    bytes + r.pages() * page,
                );
            }
            let near = (bytes > 0).then_some(Near {
                lo,
                hi,
                held: bytes,
            });
            pool.take_within(
                n,
                end_to_end,
                near,
                crate::tempo::tempo().handoff_wait(),
                worker_locking,
                |b| runs.push(Run::from_block(b)),
            )
        };
        // A buffer of several blocks takes pooled blocks at once only if they lie end to end;
        // otherwise queued ones first, when there are any: a released set, part of it landed
        // in the pool and part still queued, is then taken whole rather than beside other
        // pooled blocks (which would scatter it; see `alloc_blocks`).
        let mut pooled = take_pooled(runs, want, want > 1 && self.handoff.is_some());
        let mut inline = 0;
        if let Some(handoff) = &self.handoff {
            // At most one bounded wait for the worker per order: past it, fresh pages.
            let mut waited = false;
            // A buffer of one block, none pooled, while the worker zeroes one of this order:
            // that one, helping from its front, rather than a queued one zeroed here. A block
            // that circulates is then zeroed by both cores each time, this thread's share from
            // the front and the worker's from the back (see `Job::next_worker_piece`), and its
            // lines stay where they were zeroed; a queued block is shared the same way (see
            // `zero_stolen`). (Taking the queued one, two blocks in circulation were each
            // zeroed whole by one core and the next time by the other, which was slower in a
            // tight loop of 1 MiB buffers: docs/DESIGN.md, Tuning.)
            if want == 1 && pooled == 0 && self.help_worker(handoff, order, true) {
                waited = true;
                pooled += take_pooled(runs, want, false);
            }
            while pooled + inline < want {
                // A chunk at a time, so that the worker keeps claiming from the other end.
                let chunk = (CHUNK_PAGES >> order).max(1);
                let need = want - pooled - inline;
                let stolen = handoff.steal(order, need.min(chunk), need);
                if !stolen.is_empty() {
                    for r in stolen {
                        // SAFETY: stolen runs left the queue; this thread owns them now.
                        if unsafe { self.zero_stolen(handoff, &r, buffer_pages) } {
                            inline += r.count;
                            runs.push(r);
                            stolen_runs.push(r);
                        }
                    }
                    continue;
                }
                // Nothing of this order is queued: what the worker claimed has either landed
                // in the pool already or is being zeroed now.
                let in_flight = handoff.in_flight(order);
                if in_flight == 0 || waited {
                    pooled += take_pooled(runs, want - pooled - inline, false);
                    break;
                }
                // Some of this order's blocks are in the worker's hands: the pool's blocks now
                // only if the rest lie end to end there (else the claim, once landed, would be
                // left out of the set it belongs to).
                pooled += take_pooled(runs, want - pooled - inline, want > 1);
                if pooled + inline == want {
                    break;
                }
                // Help the worker zero what it claimed, then wait (briefly) for it to land.
                self.help_worker(handoff, order, false);
                waited = true;
                pooled += take_pooled(runs, want - pooled - inline, false);
            }
        }
        (pooled, inline)
    }

    /// Whether the system refused `need` fresh pages for want of room that giving back this
    /// heap's pooled and queued memory could make: the locked-memory limit, when what is
    /// locked now less all of that leaves room for them; memory or address space (`ENOMEM`),
    /// when the heap holds at least as many pages (the carve needs `need` pages in one range,
    /// which no less than that can free).
    #[cold]
    fn room_refused(&self, e: &AllocError, need: usize) -> bool {
        let held = self.owner.count()
            + self
                .handoff
                .as_ref()
                .map_or(0, |l| l.queue().pending_pages());
        match e {
            AllocError::MemlockLimit {
                limit: Some(limit), ..
            } => {
                let held = (held * self.page) as u64;
                let need = (need * self.page) as u64;
                crate::os::locked_bytes()
                    .is_none_or(|locked| locked.saturating_sub(held) + need <= *limit)
            }
            AllocError::MemlockLimit { limit: None, .. } => true,
            AllocError::Os(e) => e.raw_os_error() == Some(libc::ENOMEM) && held >= need,
            _ => false,
        }
    }

    /// Carves one fresh range for the placeholder runs of an allocation (`missing`: their
    /// indices in `runs`) and places them in it, in order. Returns the range (address and
    /// length), or `None` when nothing is missing. On failure `runs` is unchanged.
    fn carve_missing(
        &self,
        runs: &mut Runs,
        missing: &[usize],
    ) -> Result<Option<(usize, usize)>, AllocError> {
        if missing.is_empty() {
            return Ok(None);
        }
        let bytes: usize = missing.iter().map(|&i| runs[i].pages() * self.page).sum();
        let p = self.arenas.carve(bytes)?;
        let mut at = p.as_ptr() as usize;
        for &i in missing {
            runs[i].start = at;
            at += runs[i].pages() * self.page;
        }
        Ok(Some((p.as_ptr() as usize, bytes)))
    }
}

/// Whether an allocation that gathered `got` of the `want` blocks of an order takes all of
/// them fresh instead (see `gather`): when it got some but not all, unless the missing ones
/// are in the worker's hands (`landing(missing)`: they land beside the others and the set is
/// whole again) or the machine is busy (`busy()`). Each question is asked only if the answer
/// matters: `landing` takes a lock, `busy` reads the clock.
fn whole_order_fresh(
    got: usize,
    want: usize,
    landing: impl FnOnce(usize) -> bool,
    busy: impl FnOnce() -> bool,
) -> bool {
    got > 0 && got < want && !landing(want - got) && !busy()
}

/// The blocks of a buffer of `pages` pages, per order: `(order, count)` for each of `orders`
/// (descending) that it takes at least one block of, largest first.
pub(crate) fn split(orders: &[u8], pages: usize) -> impl Iterator<Item = (u8, usize)> + '_ {
    let mut left = pages;
    orders.iter().filter_map(move |&order| {
        let count = left >> order;
        left &= (1 << order) - 1;
        (count > 0).then_some((order, count))
    })
}

/// A buffer of `pages` pages made of `have` (blocks in hand, any order of them) and
/// placeholder runs (`start` 0) for what is still missing, per order of `orders`: the runs
/// largest order first, each order's sorted by address, its placeholder last.
fn layout(orders: &[u8], pages: usize, have: &[Run]) -> Runs {
    let mut runs = Runs::new();
    for (order, want) in split(orders, pages) {
        let first = runs.len();
        runs.extend(have.iter().filter(|r| r.order == order).copied());
        runs[first..].sort_unstable_by_key(|r| r.start);
        let got: usize = runs[first..].iter().map(|r| r.count).sum();
        if got < want {
            runs.push(Run {
                start: 0,
                order,
                count: want - got,
            });
        }
    }
    runs
}

/// True if an allocation's blocks, as gathered (`missing`: the placeholders for blocks still to
/// come fresh, as one range), need a view: more than one piece once blocks that lie end to end
/// are joined.
fn scattered(runs: &[Run], missing: &[usize], page: usize) -> bool {
    // The usual case, without sorting: nothing missing, and the runs (sorted within each order,
    // largest order first) already lie end to end in the order they are in.
    if missing.is_empty() && runs.windows(2).all(|w| w[0].end(page) == w[1].start) {
        return false;
    }
    let mut have: smallvec::SmallVec<[(usize, usize); 8]> = runs
        .iter()
        .enumerate()
        .filter(|(i, _)| !missing.contains(i))
        .map(|(_, r)| (r.start, r.end(page)))
        .collect();
    have.sort_unstable();
    let pieces = 1 + have.windows(2).filter(|w| w[0].1 != w[1].0).count();
    pieces + usize::from(!missing.is_empty()) > 1
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_set_short_of_blocks_is_taken_fresh_unless_they_are_landing_or_the_machine_is_busy() {
        let never = |_: usize| false;
        let idle = || false;
        assert!(
            !whole_order_fresh(0, 4, never, idle),
            "nothing gathered: fresh anyway"
        );
        assert!(!whole_order_fresh(4, 4, never, idle), "all gathered");
        assert!(
            whole_order_fresh(3, 4, never, idle),
            "one short, taken by another buffer"
        );
        assert!(
            !whole_order_fresh(3, 4, |missing| missing == 1, idle),
            "one short, in the worker's hands: only it comes fresh"
        );
        assert!(
            !whole_order_fresh(3, 4, never, || true),
            "busy: only what is missing"
        );
        // The lock and the clock are read only when they decide something.
        let asked = std::cell::Cell::new(0);
        let count = |_: usize| {
            asked.set(asked.get() + 1);
            false
        };
        whole_order_fresh(4, 4, count, || panic!("not asked"));
        assert_eq!(asked.get(), 0);
    }

    #[test]
    fn blocks_need_a_view_unless_they_make_one_piece() {
        const P: usize = 4096;
        let run = |start: usize, order: u8, count: usize| Run {
            start,
            order,
            count,
        };
        let mib = 256 * P;
        // End to end in the order gathered: one piece (the path without sorting).
        let whole = [run(0, 8, 2), run(2 * mib, 8, 2)];
        assert!(!scattered(&whole, &[], P));
        // End to end across orders: a 1 MiB block, then a 64 KiB one right after it.
        assert!(!scattered(&[run(0, 8, 1), run(mib, 4, 1)], &[], P));
        // The same pieces out of address order still make one piece.
        assert!(!scattered(&[run(2 * mib, 8, 2), run(0, 8, 2)], &[], P));
        // A gap: two pieces.
        assert!(scattered(&[run(0, 8, 1), run(2 * mib, 8, 1)], &[], P));
        // Something still to come fresh beside what was gathered: two pieces.
        assert!(scattered(&[run(0, 8, 1), run(0, 4, 1)], &[1], P));
    }

    #[test]
    fn a_streak_of_scattered_allocations_regathers_and_asks_only_what_decides() {
        let s = Streak::new();
        let idle = || false;
        for _ in 1..REGATHER_FIRST {
            assert!(!s.regather(true, true, idle));
        }
        assert!(
            s.regather(true, true, idle),
            "the REGATHER_FIRST-th in a row"
        );
        // Then twice as many; an allocation that needed no view takes one back (half a view).
        for _ in 1..2 * REGATHER_FIRST {
            assert!(!s.regather(true, true, idle));
        }
        assert!(!s.regather(false, true, idle));
        assert!(!s.regather(true, true, idle));
        assert!(s.regather(true, true, idle));
        // On a busy machine the count stands still.
        assert!(!s.regather(true, true, || true));
        // The clock is read only when it decides something: not for an allocation of one
        // block, nor for a whole one with no streak to take back.
        let fresh = Streak::new();
        fresh.regather(false, true, || panic!("not asked: no streak"));
        s.regather(false, false, || panic!("not asked: one block"));
    }
}
