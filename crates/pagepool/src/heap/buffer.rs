//! The buffer: a zeroed, page-aligned, contiguous view of a list of blocks.
//!
//! A [`Buffer`] is what the kernel heap exports as a dma-buf: a scatter-gather list of blocks
//! ([`Buffer::blocks`]) that a Rust program also sees as one `&mut [u8]`. [`Buffer::export`]
//! turns it into a real dma-buf, an [`ExportedBuffer`], whose memory is shared and so reached
//! by copies only.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use super::cache::Dirty;
use super::core::HeapInner;
use super::job::{Run, Runs};
use crate::error::AllocError;
use crate::os;
use crate::sync::Arc;

/// One entry of a buffer's scatter-gather list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    /// Where the block starts in the buffer, in bytes.
    pub offset: usize,
    /// The block's length in bytes (`page_size() << order`).
    pub len: usize,
    /// The block's order.
    pub order: u8,
}

/// A zeroed, page-aligned buffer from a [`SystemHeap`](crate::SystemHeap).
///
/// It dereferences to one contiguous `[u8]` of [`len`](Self::len) bytes (the requested length
/// rounded up to whole pages). Dropping it returns its blocks to the heap's pools, zeroed.
///
/// The slices are sound because a `Buffer`'s memory is its own: nothing else reaches its blocks
/// while it lives. Sharing it as a dma-buf ([`export`](Self::export)) consumes the buffer and
/// gives an [`ExportedBuffer`](crate::ExportedBuffer), which has no slices in safe code, since every holder of the
/// dma-buf (another descriptor, a mapping, another process, a device) may write the memory at
/// any time.
///
/// # Examples
/// ```
/// let heap = pagepool::SystemHeap::new().unwrap();
/// let mut buf = heap.alloc(70 * 1024).unwrap(); // one 64 KiB block and two 4 KiB blocks
/// assert_eq!(buf.len(), 72 * 1024);
/// assert_eq!(buf.as_ptr() as usize % pagepool::page_size(), 0);
/// let orders: Vec<u8> = buf.blocks().map(|b| b.order).collect();
/// assert_eq!(orders, [4, 0, 0]);
/// buf.fill(0xab);
/// ```
pub struct Buffer {
    /// The buffer's first byte: the first block's home address, or else a view mapping of our
    /// own (to unmap on drop; see [`Buffer::is_remapped`]). No separate flag: a one-byte field
    /// would be the `Result<Buffer, _>` niche, and its byte-sized store, read back as part of a
    /// wider load when the result is moved, stalled store forwarding on every allocation.
    pub(crate) ptr: NonNull<u8>,
    pub(crate) len: usize,
    /// The blocks, as runs lying end to end in their arenas, in buffer order.
    pub(crate) runs: Runs,
    /// Dropped in `drop`, or handed to this thread's cache of small buffers.
    pub(crate) heap: ManuallyDrop<Arc<HeapInner>>,
}

// SAFETY: a Buffer owns its memory exclusively (its blocks were taken out of pools or carved
// fresh, and no dma-buf shares them: `export` consumes the buffer); it is like a `Box<[u8]>`,
// so moving it to or sharing `&Buffer` with another thread is sound. The heap handle it holds
// is itself Send + Sync.
unsafe impl Send for Buffer {}
// SAFETY: as above: `&Buffer` gives only `&[u8]`.
unsafe impl Sync for Buffer {}

impl Buffer {
    /// Makes the buffer's blocks one contiguous range: the blocks themselves if they lie end to
    /// end, else a view mapping. On failure every block goes back where it came from.
    /// On failure the runs come back with the error, for the caller to undo.
    pub(crate) fn assemble(
        heap: Arc<HeapInner>,
        runs: Runs,
        bytes: usize,
    ) -> Result<Buffer, (AllocError, Runs)> {
        let page = heap.page;
        let end_to_end = runs.windows(2).all(|w| w[0].end(page) == w[1].start);
        let ptr = if end_to_end {
            runs[0].ptr()
        } else {
            match map_view(&heap, &runs, bytes) {
                Ok(p) => {
                    heap.counters.remapped.fetch_add(1, Ordering::Relaxed);
                    p
                }
                Err(e) => return Err((e, runs)),
            }
        };
        heap.counters.allocs.fetch_add(1, Ordering::Relaxed);
        heap.counters
            .live_pages
            .fetch_add((bytes / page) as u64, Ordering::Relaxed);
        Ok(Buffer {
            ptr,
            len: bytes,
            runs,
            heap: ManuallyDrop::new(heap),
        })
    }

    /// A buffer from this thread's cache: one run of blocks end to end, still dirty, counted by
    /// the cache. Zeroed here, after the buffer's fields are written: the caller moves the
    /// buffer (an 80-byte value, copied 16 bytes at a time) at once, and copying fields stored
    /// a moment before stalls store forwarding, a large part of a 4 KiB allocation and release
    /// (measured with rustc 1.95: docs/DESIGN.md, Small buffers; the order of the stores is the
    /// compiler's to keep).
    /// Written before the zeroing, they have reached the cache by the time they are copied.
    ///
    /// # Safety
    /// `run` came out of a thread cache of `heap` (see [`Dirty`]) and `bytes` is its length.
    #[inline]
    pub(crate) unsafe fn from_cache(heap: Arc<HeapInner>, run: Dirty, bytes: usize) -> Buffer {
        let Dirty(run) = run;
        let buf = Buffer {
            ptr: run.ptr(),
            len: bytes,
            runs: smallvec::smallvec![run],
            heap: ManuallyDrop::new(heap),
        };
        // SAFETY: by the contract above the run is a used range of this heap's arenas at its
        // home address, owned here; the buffer holding it has handed out no slice yet, so
        // nothing reads or writes it meanwhile.
        unsafe { buf.heap.zero_run(&run, run.pages()) };
        buf
    }

    /// The buffer's length in bytes (a multiple of the page size).
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: buffers are at least one page.
    #[inline]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The buffer's scatter-gather list: its blocks in order, largest first.
    pub fn blocks(&self) -> impl Iterator<Item = BlockInfo> + '_ {
        let page = self.heap.page;
        let mut offset = 0;
        self.runs
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.order, s.count))
            .map(move |order| {
                let info = BlockInfo {
                    offset,
                    len: page << order,
                    order,
                };
                offset += info.len;
                info
            })
    }

    /// True when the buffer needed a view mapping (its blocks were not end to end in memory).
    #[inline]
    pub fn is_remapped(&self) -> bool {
        self.ptr != self.runs[0].ptr()
    }
}

/// The stretches of `runs` that lie end to end in memory (and so, arenas being separated by
/// guard pages, in one arena file), as (first run, length in bytes).
pub(crate) fn stretches(runs: &[Run], page: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let len = r.end(page) - r.start;
        match out.last_mut() {
            Some((first, l)) if runs[*first].start + *l == r.start => *l += len,
            _ => out.push((i, len)),
        }
    }
    out
}

/// Reserves `bytes` of address space and maps each stretch of runs into it, in order.
fn map_view(heap: &HeapInner, runs: &[Run], bytes: usize) -> Result<NonNull<u8>, AllocError> {
    let stretches = stretches(runs, heap.page);
    let locs = heap
        .arenas
        .locate(stretches.iter().map(|&(i, _)| runs[i].ptr()));
    // The view is made, kept from fork and recorded in one gate: a child forked in between
    // would share it with this process (see `crate::fork`). System calls only, inside.
    let _gate = crate::fork::Gate::open();
    // Aligned like the heap's smallest block, so that huge pages map as such (hugetlbfs
    // requires it).
    let base = os::reserve_aligned(bytes, heap.page * heap.granule)?;
    let mut at = 0; // offset in the view
    let mut made = Ok(());
    for (loc, &(_, len)) in locs.iter().zip(&stretches) {
        // SAFETY: `base + at .. + len` lies inside the reservation made above, which nobody
        // else knows of yet.
        made = unsafe { os::map_fixed(&*loc.fd, loc.offset, len, base.add(at), true) };
        if made.is_err() {
            break;
        }
        at += len;
    }
    if made.is_ok() {
        // SAFETY: the view is the mapping made above, ours alone.
        made = unsafe { crate::fork::keep_mapping(base, bytes) };
    }
    if let Err(e) = made {
        // SAFETY: the reservation is ours and unreferenced (not recorded: `keep_mapping`
        // records nothing when it fails).
        let _ = unsafe { os::unmap(base, bytes) };
        return Err(e.into());
    }
    Ok(base)
}

impl Deref for Buffer {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is mapped, readable and owned by this buffer (see `assemble`);
        // the borrow of `self` keeps it alive. Nothing else reaches its blocks: a dma-buf of them
        // exists only once the buffer is consumed by `export`, and an `ExportedBuffer` never
        // dereferences the buffer it owns.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for Buffer {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for Buffer {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for Buffer {
    #[inline]
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Drop for Buffer {
    /// Hands the blocks back to the heap: queued for the worker to zero (the default), or
    /// zeroed here, or given straight back to the system when the heap no longer pools.
    #[inline]
    fn drop(&mut self) {
        if self.heap.generation != crate::fork::generation() {
            return self.forget();
        }
        if !self.is_remapped()
            && let [run] = self.runs[..]
            && run.pages() <= self.heap.cache.max_buffer_pages
        {
            // SAFETY: `self.heap` is not used again on this path unless it is put back below.
            let heap = unsafe { ManuallyDrop::take(&mut self.heap) };
            match super::cache::give(heap, run) {
                Ok(()) => return,
                Err((heap, _)) => self.heap = ManuallyDrop::new(heap),
            }
        }
        self.release(false);
        // SAFETY: the last use of the heap reference; `drop` runs once.
        unsafe { ManuallyDrop::drop(&mut self.heap) };
    }
}

impl Buffer {
    /// Drops a buffer inherited from the parent process: its memory is the parent's (not
    /// mapped here, see [`crate::fork`]), so nothing is unmapped, zeroed or given anywhere, and
    /// the reference to the inherited heap state is leaked: were it the last one, dropping it
    /// would free the parent's memory through descriptors this process no longer has.
    #[cold]
    #[inline(never)]
    fn forget(&mut self) {}

    /// The usual release (unmap the view, then hand the blocks to the heap), or with
    /// `to_system` the blocks' memory straight back to the system. Kept out of line so that the
    /// cached path stays small.
    #[inline(never)]
    fn release(&mut self, to_system: bool) {
        let h = &self.heap;
        if self.is_remapped() {
            crate::fork::forget_mapping(self.ptr, self.len);
            // SAFETY: the view is this buffer's own mapping; nothing refers to it any more. The
            // blocks stay mapped at their home addresses.
            if let Err(e) = unsafe { os::unmap(self.ptr, self.len) } {
                log::error!("pagepool: {e}");
            }
        }
        let runs = std::mem::take(&mut self.runs);
        if to_system {
            runs.iter().for_each(|r| h.release_run(r));
        } else {
            h.release_buffer(runs);
        }
        h.counters.frees.fetch_add(1, Ordering::Relaxed);
        h.counters
            .live_pages
            .fetch_sub((self.len / h.page) as u64, Ordering::Relaxed);
    }

    /// Drops the buffer, giving its blocks' memory straight back to the system instead of the
    /// pools or the thread cache: for memory that others (a dma-buf's holders) may still use.
    pub(crate) fn release_to_system(self) {
        let mut this = ManuallyDrop::new(self);
        if this.heap.generation != crate::fork::generation() {
            return; // inherited from the parent process: leaked, as in `forget`
        }
        this.release(true);
        // SAFETY: the last use of the heap reference; `this` is never dropped, and `release`
        // left nothing else in it that owns memory (its runs were taken).
        unsafe { ManuallyDrop::drop(&mut this.heap) };
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("runs", &self.runs.len())
            .field("remapped", &self.is_remapped())
            .finish()
    }
}
