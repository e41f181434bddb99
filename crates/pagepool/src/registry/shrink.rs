//! The registry's shrinking policy: which of an owner's pools gives next (round robin), and
//! which owner gives next when the registry shrinks them all (each owner's pass and its stride,
//! weighted fair queueing by holdings). Apart from the registry's state so that the policy can
//! be read, and changed, on its own.

use super::Owner;
use crate::pool::{Block, PagePool};
use crate::shrinker::{Shrinker, scan_caught};
use crate::sync::{Arc, AtomicU64, AtomicUsize, Ordering};

/// Something an owner's pages are in: one of its page pools, or another kind of pool that
/// counts against it (a [`DmaBufPool`](crate::dmapool::DmaBufPool)'s clean dma-bufs) and frees its
/// memory through [`Shrinker::scan`].
#[derive(Clone)]
pub(super) enum Unit {
    Pool(Arc<PagePool>),
    Other(Arc<dyn Shrinker>),
}

impl Unit {
    /// Frees one unit's worth (a block; at least one buffer of another kind of pool); returns
    /// the pages freed.
    fn release_one(&self) -> usize {
        match self {
            Unit::Pool(p) => p.release_one(),
            Unit::Other(s) => scan_caught(&**s, 1),
        }
    }
}

/// One unit's worth taken out of a unit for the registry's shrink: a block not yet given back
/// to the system, or pages another kind of pool has freed already.
enum Taken<'a> {
    Block(&'a PagePool, Block),
    Freed(usize),
}

impl Unit {
    /// Takes one unit's worth out (a block; at least one buffer of another kind of pool, which
    /// frees it at once), or nothing if the unit is empty.
    fn take_one(&self) -> Option<Taken<'_>> {
        match self {
            Unit::Pool(p) => p.take().map(|b| Taken::Block(p, b)),
            Unit::Other(s) => match scan_caught(&**s, 1) {
                0 => None,
                f => Some(Taken::Freed(f)),
            },
        }
    }
}

impl Taken<'_> {
    /// The pages taken.
    fn pages(&self) -> usize {
        match self {
            Taken::Block(_, b) => 1 << b.order(),
            Taken::Freed(f) => *f,
        }
    }

    /// Gives what was taken back to the system.
    fn release(self) {
        if let Taken::Block(p, b) = self {
            p.release_taken(b);
        }
    }
}

/// Takes one unit's worth from the first of `units`, round robin from `cursor`, that has
/// something; `None` if a whole round found nothing.
fn take_round_robin<'a>(units: &'a [Unit], cursor: &AtomicUsize) -> Option<Taken<'a>> {
    (0..units.len()).find_map(|_| {
        let i = cursor.fetch_add(1, Ordering::Relaxed) % units.len();
        units[i].take_one()
    })
}

/// Scans `units` round robin from `cursor`: one block (or buffer) from a unit, then the next,
/// until `nr_pages` are freed or a whole round frees nothing.
pub(super) fn scan_round_robin(units: &[Unit], cursor: &AtomicUsize, nr_pages: usize) -> usize {
    let n = units.len();
    let (mut freed, mut idle) = (0, 0);
    while freed < nr_pages && idle < n {
        let i = cursor.fetch_add(1, Ordering::Relaxed) % n;
        match units[i].release_one() {
            0 => idle += 1,
            f => {
                freed += f;
                idle = 0;
            }
        }
    }
    freed
}

/// What one unit of an owner's shrink pass is worth: its pass is the natural logarithm of how
/// many times over what it holds now it held, in units of `1 / PASS_SCALE`.
const PASS_SCALE: f64 = (1u64 << 20) as f64;

/// How far an owner's pass moves when it gives back `f` of the `held` pages it holds:
/// `ln(held / (held - f))`; `None` for its last pages (giving them back is infinitely far).
fn stride(held: usize, f: usize) -> Option<u64> {
    (f < held).then(|| ((held as f64 / (held - f) as f64).ln() * PASS_SCALE) as u64)
}

impl Unit {
    /// The pages the next unit's worth taken from this unit would free, if it holds any: a
    /// block; one page for another kind of pool (its buffers' sizes are its own).
    fn next_pages(&self) -> Option<usize> {
        match self {
            Unit::Pool(p) => (p.pages() > 0).then(|| 1 << p.order()),
            Unit::Other(s) => (s.count() > 0).then_some(1),
        }
    }
}

/// The pages the next unit's worth that [`take_round_robin`] would take from `units` frees, if
/// they hold any.
fn next_pages(units: &[Unit], cursor: &AtomicUsize) -> Option<usize> {
    let c = cursor.load(Ordering::Relaxed);
    (0..units.len()).find_map(|k| units[c.wrapping_add(k) % units.len()].next_pages())
}

/// Frees about `nr_pages` from `owners` (each with its pools of every kind), one block (or
/// buffer) at a time, each from the owner that keeps the largest part of what it held after
/// giving it: weighted fair queueing by holdings. Every owner has a *pass*, how far it has
/// shrunk: giving back `f` of the `held` pages it holds moves it by `ln(held / (held - f))`,
/// so that an owner's pass over a run of shrinks is the logarithm of how many times over it
/// held what it holds now. The next block comes from the owner whose pass would be lowest
/// after giving its next block (ties in turn from `cursor`; an owner's last block only when
/// every other's is its last too). So owners keep the same part of what they held, within
/// one block, whatever the size of their blocks; and shrinks smaller than a block of each
/// still share fairly over several shrinks, as passes carry over from one to the next.
/// `clock` is the lowest pass among the owners that held something at the end of the last
/// shrink; an owner whose pass is behind it (it held nothing while others gave) starts from
/// it, so that it does not pay for shrinks from before it had pages.
///
/// The turn is charged when the block is taken, before it goes back to the system (which
/// takes a while: `munlock`, a hole punched), so that concurrent shrinks choose by passes that
/// count it. Whole blocks (buffers of another kind of pool): less than one more than asked is
/// freed (one per racing caller).
/// Within an owner, its pools give in turn (its own round robin).
pub(super) fn scan_owners(
    owners: &[(Arc<Owner>, Vec<Unit>)],
    clock: &AtomicU64,
    cursor: &AtomicUsize,
    nr_pages: usize,
) -> usize {
    let mut live: Vec<&(Arc<Owner>, Vec<Unit>)> =
        owners.iter().filter(|(_, u)| !u.is_empty()).collect();
    if live.is_empty() || nr_pages == 0 {
        return 0;
    }
    let now = clock.load(Ordering::Relaxed);
    for (o, _) in &live {
        o.pass.fetch_max(now, Ordering::Relaxed);
    }
    let start = cursor.fetch_add(1, Ordering::Relaxed);
    let mut freed = 0;
    while freed < nr_pages && !live.is_empty() {
        let n = live.len();
        let i = if n == 1 {
            0
        } else {
            // Each owner's pass after its next block (`u64::MAX` for one that holds nothing,
            // far ahead for its last block); the first lowest, counting from this shrink's
            // turn.
            let after = |(o, units): &(Arc<Owner>, Vec<Unit>)| match next_pages(units, &o.cursor) {
                None => u64::MAX,
                Some(b) => o
                    .pass
                    .load(Ordering::Relaxed)
                    .saturating_add(stride(o.count(), b).unwrap_or(u64::MAX / 2)),
            };
            (0..n)
                .map(|k| start.wrapping_add(k) % n)
                .min_by_key(|&i| after(live[i]))
                .unwrap_or(0)
        };
        let (owner, units) = live[i];
        let held = owner.count();
        match take_round_robin(units, &owner.cursor) {
            None => {
                live.swap_remove(i);
            }
            Some(taken) => {
                let f = taken.pages();
                // An owner's last pages move it nowhere: it is out of the shrink until it
                // holds some again, and then starts from the clock.
                owner
                    .pass
                    .fetch_add(stride(held, f).unwrap_or(0), Ordering::Relaxed);
                taken.release();
                freed += f;
            }
        }
    }
    // The clock: the lowest pass among the owners that hold something (not that of the owner
    // that gave last, which may be ahead of others that wait for their turn).
    let holding = live.iter().filter(|(o, _)| o.count() > 0);
    if let Some(min) = holding.map(|(o, _)| o.pass.load(Ordering::Relaxed)).min() {
        clock.fetch_max(min, Ordering::Relaxed);
    }
    freed
}
