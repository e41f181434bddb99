//! What the heap's hand-off deals in: runs of blocks ([`Run`]), a buffer's runs ([`Runs`], the
//! items of its release queue), the queue's per-order counts of them ([`Blocks`]), and a
//! claimed run split into stripes that the worker and allocations take ([`Job`]).

use crate::config::{CLAIM_SHARE, STRIPE_BYTES, WORKER_PIECE};
use crate::deferred::{Item, Tally};
use crate::pool::MAX_ORDER;
use crate::sync::{AtomicU64, AtomicUsize, Ordering};
use crossbeam_utils::CachePadded;

/// `count` blocks of one order lying end to end from address `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// The first block's address.
    pub(crate) start: usize,
    /// The blocks' order.
    pub(crate) order: u8,
    /// How many blocks.
    pub(crate) count: usize,
}

impl Run {
    /// `count` blocks of `order` from address `start`.
    #[cfg(all(test, not(loom)))]
    pub(crate) const fn new(start: usize, order: u8, count: usize) -> Run {
        Run {
            start,
            order,
            count,
        }
    }

    /// Whether address `a` lies in the run (of `page`-byte pages).
    #[inline]
    pub(crate) fn holds(&self, a: usize, page: usize) -> bool {
        a >= self.start && a < self.end(page)
    }

    /// Pages in the run.
    #[inline]
    pub(crate) fn pages(&self) -> usize {
        self.count << self.order
    }

    /// Whether the run is a whole buffer of `buffer_pages` pages (a 1 MiB buffer of one
    /// block), not a chunk of a larger one: such a run is shared with the worker and zeroed from
    /// both ends (see `Job::next_worker_piece`).
    #[inline]
    pub(crate) fn is_whole(&self, buffer_pages: usize) -> bool {
        self.pages() == buffer_pages
    }

    /// The address just past the run, with `page`-byte pages.
    pub(crate) fn end(&self, page: usize) -> usize {
        self.start + (page << self.order) * self.count
    }

    /// The run's first byte as a pointer (dangling for a null start).
    #[inline]
    pub(crate) fn ptr(&self) -> std::ptr::NonNull<u8> {
        std::ptr::NonNull::new(std::ptr::with_exposed_provenance_mut(self.start))
            .unwrap_or(std::ptr::NonNull::dangling())
    }

    /// A run of one block.
    pub(crate) fn from_block(b: crate::pool::Block) -> Run {
        Run {
            order: b.order(),
            start: b.into_raw().as_ptr().expose_provenance(),
            count: 1,
        }
    }
}

/// A buffer's runs: up to two inline (most buffers), more on the heap.
pub(crate) type Runs = smallvec::SmallVec<[Run; 2]>;

impl Item for Runs {
    fn pages(&self) -> usize {
        self.iter().map(Run::pages).sum()
    }
}

/// The hand-off's bookkeeping in its release queue, under the queue's lock: blocks queued and
/// pages in the worker's hands, per order (what `steal` and `in_flight` look at).
#[derive(Default)]
pub(crate) struct Blocks {
    /// Queued blocks per order (lets `steal` skip a scan when there is nothing of its order).
    pub(crate) queued: [usize; MAX_ORDER as usize + 1],
    /// Pages claimed by the worker and not yet landed, per order.
    pub(crate) in_flight: [usize; MAX_ORDER as usize + 1],
}

impl Tally<Runs> for Blocks {
    fn queued(&mut self, runs: &Runs) {
        for r in runs {
            self.queued[r.order as usize] += r.count;
        }
    }

    fn taken(&mut self, runs: &Runs) {
        for r in runs {
            self.queued[r.order as usize] -= r.count;
        }
    }

    fn cleared(&mut self) {
        self.queued = [0; MAX_ORDER as usize + 1];
    }
}

/// A claimed run being zeroed, split into stripes that several threads can take: the worker
/// publishes its current claim as a job, and an allocation that would otherwise wait for it
/// helps instead, so that two cores zero one block.
#[derive(Debug)]
pub(crate) struct Job {
    pub(super) run: Run,
    pub(super) buffer_pages: usize,
    pub(super) stripe: usize,
    pub(super) stripes: usize,
    /// Stripes handed out: from the front (allocations, the low 32 bits) and from the back
    /// (the worker, the high 32 bits); apart from `done`, so that the two threads' claims and
    /// the waiting thread's polls do not share one cache line.
    pub(super) next: CachePadded<AtomicU64>,
    /// Stripes zeroed.
    pub(super) done: CachePadded<AtomicUsize>,
}

impl Job {
    /// A job for `run` (blocks of `page`-byte pages) from a buffer of `buffer_pages` pages.
    pub(crate) fn new(run: Run, buffer_pages: usize, page: usize) -> Job {
        let bytes = run.pages() * page;
        let stripe = STRIPE_BYTES.min(bytes).max(1);
        // Both ends' counts fit their halves of `next`: a run of 2^32 stripes would be 256 TiB.
        let stripe = stripe.max(bytes.div_ceil(u32::MAX as usize));
        Job {
            run,
            buffer_pages,
            stripe,
            stripes: bytes.div_ceil(stripe),
            next: CachePadded::new(AtomicU64::new(0)),
            done: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    /// The run being zeroed.
    pub(crate) fn run(&self) -> Run {
        self.run
    }

    /// The size in pages of the buffer the run came from.
    pub(crate) fn buffer_pages(&self) -> usize {
        self.buffer_pages
    }

    /// Takes the next piece to zero from the front of the run (one or more stripes: a share of
    /// what is left), as `(offset, len)` in bytes from the run's start, or `None` when every
    /// stripe is taken. Call [`finish`](Self::finish) with `len` after zeroing it. For the
    /// allocating thread: large pieces first, so that it and the worker meet after a few
    /// claims.
    pub(crate) fn next_stripe(&self, page: usize) -> Option<(usize, usize)> {
        self.next_piece(page, false, |left| (left / CLAIM_SHARE).max(1))
    }

    /// Takes the worker's next piece, as [`next_stripe`](Self::next_stripe) does but from the
    /// back of the run and at most [`WORKER_PIECE`] stripes: the worker runs at low priority,
    /// and what it holds when the scheduler leaves it waiting is at most that, which nobody
    /// waits for longer than the hand-off wait (`Tempo::handoff_wait`).
    ///
    /// For a run that is a whole buffer (a 1 MiB buffer of one block), allocations always zero
    /// it from the front and the worker from the back, whichever of them took the run: a
    /// buffer that circulates is then zeroed piece by piece by the same core each time, and
    /// its lines stay in that core's cache. (Handed out from one end, the pieces fell to
    /// whoever asked first, and a buffer's lines moved between the cores' caches at every
    /// zeroing, and a tight loop of 1 MiB buffers shared with the worker was slower than one
    /// zeroed by the allocating thread alone: docs/DESIGN.md, Tuning.) A chunk of a larger
    /// buffer, whose allocation zeroes the buffer's other chunks from its other end, is zeroed
    /// from the front by both, as before.
    pub(crate) fn next_worker_piece(&self, page: usize) -> Option<(usize, usize)> {
        let from_back = self.run.is_whole(self.buffer_pages);
        self.next_piece(page, from_back, |left| {
            (left / CLAIM_SHARE).clamp(1, WORKER_PIECE)
        })
    }

    fn next_piece(
        &self,
        page: usize,
        from_back: bool,
        share: impl Fn(usize) -> usize,
    ) -> Option<(usize, usize)> {
        const FRONT: u64 = u32::MAX as u64;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let (front, back) = ((cur & FRONT) as usize, (cur >> 32) as usize);
            let left = self.stripes - front - back;
            if left == 0 {
                return None;
            }
            let k = share(left).min(left);
            let next = if from_back {
                cur + ((k as u64) << 32)
            } else {
                cur + k as u64
            };
            match self
                .next
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let bytes = self.run.pages() * page;
                    let first = if from_back {
                        self.stripes - back - k
                    } else {
                        front
                    };
                    let off = first * self.stripe;
                    return Some((off, (k * self.stripe).min(bytes - off)));
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Records a zeroed piece of `len` bytes (as [`next_stripe`](Self::next_stripe) gave it).
    /// Returns true when the run was [`abandon`](Self::abandon)ed by the thread that waited for
    /// it and this piece completed it: the caller then owns the run and must land it.
    #[must_use = "a completed, abandoned run must be landed by the caller"]
    pub(crate) fn finish(&self, len: usize) -> bool {
        let k = len.div_ceil(self.stripe);
        let before = self.done.fetch_add(k, Ordering::AcqRel);
        before & ABANDONED != 0 && (before & !ABANDONED) + k == self.stripes
    }

    /// True once every stripe has been handed out.
    pub(crate) fn taken(&self) -> bool {
        let next = self.next.load(Ordering::Relaxed);
        (next & u32::MAX as u64) as usize + (next >> 32) as usize >= self.stripes
    }

    /// True once every stripe is zeroed.
    pub(crate) fn complete(&self) -> bool {
        self.done.load(Ordering::Acquire) & !ABANDONED >= self.stripes
    }

    /// Gives up waiting for the run: whoever finishes its last stripe owns it and lands it
    /// ([`finish`](Self::finish) returns true for them). Returns false if the run completed
    /// first: the caller still owns it. Call only once every stripe is taken.
    pub(crate) fn abandon(&self) -> bool {
        let before = self.done.fetch_or(ABANDONED, Ordering::AcqRel);
        before & !ABANDONED < self.stripes
    }
}

/// The bit of [`Job::done`] that says the run's waiter gave up on it.
const ABANDONED: usize = 1 << (usize::BITS - 1);

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn run(start: usize, order: u8, count: usize) -> Run {
        Run::new(start, order, count)
    }

    #[test]
    fn a_job_is_zeroed_from_the_front_by_allocations_and_from_the_back_by_the_worker() {
        let page = 4096;
        // 20 stripes and a short one: 1.3 MiB.
        let pages = (20 * STRIPE_BYTES + 3 * page) / page;
        let job = Job::new(run(0, 0, pages), pages, page);
        let bytes = pages * page;
        let mut covered = vec![0u8; bytes / page];
        let (mut front, mut back) = (0, bytes);
        let mut turn = 0;
        loop {
            turn += 1;
            let worker = turn % 3 == 0; // the worker asks once for every two allocations
            let piece = if worker {
                job.next_worker_piece(page)
            } else {
                job.next_stripe(page)
            };
            let Some((off, len)) = piece else { break };
            if worker {
                assert_eq!(
                    off + len,
                    back,
                    "the worker's pieces end where its last began"
                );
                back = off;
            } else {
                assert_eq!(off, front, "an allocation's pieces follow its last");
                front = off + len;
            }
            for c in &mut covered[off / page..(off + len).div_ceil(page)] {
                *c += 1;
            }
            assert!(!job.finish(len));
        }
        assert_eq!(front, back, "the two ends meet");
        assert!(covered.iter().all(|&c| c == 1), "every page once");
        assert!(job.taken() && job.complete());
        assert!(job.next_stripe(page).is_none() && job.next_worker_piece(page).is_none());
        // A chunk of a larger buffer: both from the front.
        let chunk = Job::new(run(0, 0, pages), 4 * pages, page);
        assert_eq!(chunk.next_worker_piece(page), Some((0, 4 * STRIPE_BYTES)));
        assert_eq!(chunk.next_stripe(page).map(|p| p.0), Some(4 * STRIPE_BYTES));
    }
}
