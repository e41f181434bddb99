//! The buffer: a zeroed, page-aligned, contiguous view of a list of blocks.
//!
//! A [`Buffer`] is what the kernel heap exports as a dma-buf: a scatter-gather list of blocks
//! ([`Buffer::blocks`]) that a Rust program also sees as one `&mut [u8]`. [`Buffer::export`]
//! turns it into a real dma-buf, an [`ExportedBuffer`], whose memory is shared and so reached
//! by copies only.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use crate::deferred::{Run, Runs};
use crate::dmabuf::{DmaBuf, DmaBufError, SharedMem, file_count};
use crate::error::AllocError;
use crate::heap::HeapInner;
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
/// gives an [`ExportedBuffer`], which has no slices in safe code, since every holder of the
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
    ptr: NonNull<u8>,
    len: usize,
    /// The blocks, as runs lying end to end in their arenas, in buffer order.
    runs: Runs,
    /// Dropped in `drop`, or handed to this thread's cache of small buffers.
    heap: ManuallyDrop<Arc<HeapInner>>,
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

    /// A buffer from this thread's cache: one run of blocks end to end, already zeroed and
    /// counted by the cache.
    #[inline]
    pub(crate) fn from_cache(heap: Arc<HeapInner>, run: Run, bytes: usize) -> Buffer {
        Buffer {
            ptr: run.ptr(),
            len: bytes,
            runs: smallvec::smallvec![run],
            heap: ManuallyDrop::new(heap),
        }
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

    /// Exports the buffer as a real dma-buf through `/dev/udmabuf`: one `UDMABUF_CREATE_LIST`
    /// item per stretch of blocks lying end to end in one memfd arena. The dma-buf shares the
    /// buffer's memory (writes through either are seen by both) and can be handed to devices and
    /// other processes ([`ExportedBuffer::dmabuf`]).
    ///
    /// It consumes the buffer: a `Buffer` hands out `&[u8]` and `&mut [u8]`, which must not
    /// alias memory that a dma-buf's holders may write at any time. The [`ExportedBuffer`]
    /// owns both the buffer and the dma-buf, and copies bytes in and out with atomic accesses.
    /// While the dma-buf lives, the buffer's pages are never reused: if it is still referenced
    /// elsewhere when the `ExportedBuffer` is dropped, the blocks go back to the system instead
    /// of the pools, and the pages stay the dma-buf's until it is closed.
    ///
    /// Fails with [`DmaBufError::NoHeap`] where `/dev/udmabuf` does not exist; the
    /// [`ExportError`] gives the buffer back untouched.
    ///
    /// # Examples
    /// ```
    /// let heap = pagepool::SystemHeap::new()?;
    /// let mut buf = heap.alloc(1 << 20)?;
    /// buf[..5].copy_from_slice(b"hello");
    /// match buf.export() {
    ///     Ok(exported) => {
    ///         let mut head = [0; 5];
    ///         exported.read(0, &mut head)?;
    ///         assert_eq!(&head, b"hello");
    ///         let _fd = exported.dmabuf().try_clone()?; // for a device or another process
    ///     }
    ///     Err(e) => {
    ///         // No /dev/udmabuf here: the buffer comes back as it was.
    ///         let buf = e.into_buffer();
    ///         assert_eq!(&buf[..5], b"hello");
    ///     }
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn export(self) -> Result<ExportedBuffer, ExportError> {
        match self.udmabuf() {
            Ok(dmabuf) => {
                self.heap.counters.exported.fetch_add(1, Ordering::Relaxed);
                Ok(ExportedBuffer {
                    buffer: ManuallyDrop::new(self),
                    dmabuf: ManuallyDrop::new(dmabuf),
                })
            }
            Err(error) => Err(ExportError {
                buffer: self,
                error,
            }),
        }
    }

    /// A dma-buf of the buffer's blocks, in order, through `/dev/udmabuf`.
    fn udmabuf(&self) -> Result<DmaBuf, DmaBufError> {
        let page = self.heap.page;
        let stretches = stretches(&self.runs, page);
        let locs = self
            .heap
            .arenas
            .locate(stretches.iter().map(|&(i, _)| self.runs[i].ptr()));
        let ranges: Vec<_> = locs
            .iter()
            .zip(&stretches)
            .map(|(loc, &(_, len))| (loc.fd.as_fd(), loc.offset as u64, len as u64))
            .collect();
        crate::dmabuf::udmabuf_create(&ranges)
    }
}

/// The stretches of `runs` that lie end to end in memory (and so, arenas being separated by
/// guard pages, in one arena file), as (first run, length in bytes).
fn stretches(runs: &[Run], page: usize) -> Vec<(usize, usize)> {
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
    let base = os::reserve(bytes)?;
    let mut at = 0; // offset in the view
    for (loc, &(_, len)) in locs.iter().zip(&stretches) {
        // SAFETY: `base + at .. + len` lies inside the reservation made above, which nobody
        // else knows of yet.
        let r = unsafe { os::map_fixed(&*loc.fd, loc.offset, len, base.add(at), true) };
        if let Err(e) = r {
            // SAFETY: the reservation is ours and unreferenced.
            let _ = unsafe { os::unmap(base, bytes) };
            return Err(e.into());
        }
        at += len;
    }
    // SAFETY: the view is the mapping made above, ours alone.
    unsafe { crate::fork::keep_mapping(base, bytes) };
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
            match crate::cache::give(heap, run) {
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

/// A [`Buffer`] exported as a dma-buf ([`Buffer::export`]): it owns the buffer and the
/// dma-buf's first descriptor.
///
/// It has no `Deref` to `[u8]`: the dma-buf shares the buffer's memory with whoever holds it
/// (a duplicated descriptor, a mapping, another process, a device), and any of them may write
/// it at any time, so a Rust slice of it (which promises that nothing writes the bytes while
/// it lives) cannot be handed out in safe code. [`read`](Self::read), [`write`](Self::write)
/// and [`fill`](Self::fill) copy with relaxed atomic loads and stores of aligned 8-byte words
/// instead, which are defined whatever else writes meanwhile; the `unsafe`
/// [`as_slice`](Self::as_slice) and [`as_mut_slice`](Self::as_mut_slice) are for callers who
/// know that nobody else uses the dma-buf. These accesses are not bracketed by
/// `DMA_BUF_IOCTL_SYNC`: to exchange data with a device on an architecture whose devices are
/// not cache-coherent, map the dma-buf ([`DmaBuf::map`]) and use
/// [`DmaBufMap::access`](crate::dmabuf::DmaBufMap::access).
///
/// Dropping it closes its descriptor and releases the buffer: to the pools as usual if that
/// descriptor was the file's last reference, else (the dma-buf is still held elsewhere)
/// straight back to the system, so that memory a dma-buf still uses is never reused; the pages
/// stay the dma-buf's until it is closed (counted in
/// [`HeapStats::exports_held_at_release`](crate::HeapStats::exports_held_at_release)).
///
/// # Examples
/// ```no_run
/// use std::os::fd::OwnedFd;
///
/// let heap = pagepool::SystemHeap::new()?;
/// let mut exported = heap.alloc(1 << 20)?.export()?;
/// exported.write(4096, b"frame header")?;
/// let for_device: OwnedFd = exported.dmabuf().try_clone()?.into_fd();
/// // ... send `for_device` to a device or another process ...
/// drop(exported); // still held through `for_device`: its pages are not reused
/// # drop(for_device);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ExportedBuffer {
    /// Never dereferenced to a slice (see above): reached only through `mem`.
    buffer: ManuallyDrop<Buffer>,
    dmabuf: ManuallyDrop<DmaBuf>,
}

impl ExportedBuffer {
    /// The dma-buf: to duplicate its descriptor ([`DmaBuf::try_clone`]), pass it on, or map it.
    pub fn dmabuf(&self) -> &DmaBuf {
        &self.dmabuf
    }

    /// The buffer's length in bytes (a multiple of the page size; also the dma-buf's).
    pub fn len(&self) -> usize {
        self.buffer.len
    }

    /// Always false: buffers are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The buffer's scatter-gather list: its blocks in order, largest first (see
    /// [`Buffer::blocks`]); the dma-buf lists the same pages in the same order.
    pub fn blocks(&self) -> impl Iterator<Item = BlockInfo> + '_ {
        self.buffer.blocks()
    }

    /// True when the buffer needed a view mapping (see [`Buffer::is_remapped`]).
    pub fn is_remapped(&self) -> bool {
        self.buffer.is_remapped()
    }

    /// The buffer's memory, for atomic copies.
    fn mem(&self) -> SharedMem {
        // SAFETY: `ptr..ptr + len` is the buffer's mapping (its blocks' home addresses or its
        // view): page-aligned, whole pages, readable and writable, and alive as long as `self`
        // owns the buffer, which it does until drop. This program reaches it only through
        // `SharedMem` (the buffer is never dereferenced while exported) and the `unsafe` slice
        // accessors, whose callers promise that nothing else accesses it meanwhile.
        unsafe { SharedMem::new(self.buffer.ptr, self.buffer.len) }
    }

    /// Copies `out.len()` bytes at `offset` into `out`; fails with
    /// [`DmaBufError::OutOfRange`], copying nothing, if they are not all inside the buffer.
    ///
    /// # Examples
    /// ```no_run
    /// let exported = pagepool::SystemHeap::new()?.alloc(4096)?.export()?;
    /// let mut word = [0xff; 8];
    /// exported.read(4088, &mut word)?;
    /// assert_eq!(word, [0; 8]);
    /// assert!(exported.read(4089, &mut word).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), DmaBufError> {
        self.mem().read(offset, out)
    }

    /// Copies `data` into the buffer at `offset`; fails with [`DmaBufError::OutOfRange`],
    /// writing nothing, if it does not fit.
    ///
    /// # Examples
    /// ```no_run
    /// let mut exported = pagepool::SystemHeap::new()?.alloc(4096)?.export()?;
    /// exported.write(3, b"abc")?;
    /// assert!(exported.write(4095, b"abc").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), DmaBufError> {
        self.mem().write(offset, data)
    }

    /// Sets every byte of the buffer to `byte`.
    ///
    /// # Examples
    /// ```no_run
    /// let mut exported = pagepool::SystemHeap::new()?.alloc(4096)?.export()?;
    /// exported.fill(0xaa);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn fill(&mut self, byte: u8) {
        self.mem().fill(byte);
    }

    /// The buffer's bytes as a slice, without copying.
    ///
    /// # Safety
    /// While the slice lives, nothing may write the buffer: no holder of another descriptor of
    /// the dma-buf (a duplicate, a descriptor passed to another process), no mapping of it (in
    /// this process or another), and no device it was handed to. For example: no descriptor
    /// of [`dmabuf`](Self::dmabuf) was ever duplicated or passed on, and it is not mapped.
    ///
    /// # Examples
    /// ```no_run
    /// let exported = pagepool::SystemHeap::new()?.alloc(4096)?.export()?;
    /// // SAFETY: the dma-buf was never duplicated, passed on or mapped: only `exported`
    /// // reaches its memory.
    /// let bytes = unsafe { exported.as_slice() };
    /// assert!(bytes.iter().all(|&b| b == 0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the buffer's mapping lives as long as the borrow of `self`; the caller
        // promises that nothing writes it meanwhile, and `&self` keeps this value's own
        // `write` and `fill` out.
        unsafe { self.mem().as_slice() }
    }

    /// The buffer's bytes as a mutable slice, without copying.
    ///
    /// # Safety
    /// While the slice lives, nothing else may read or write the buffer: no holder of another
    /// descriptor of the dma-buf (a duplicate, a descriptor passed to another process), no
    /// mapping of it (in this process or another), and no device it was handed to.
    ///
    /// # Examples
    /// ```no_run
    /// let mut exported = pagepool::SystemHeap::new()?.alloc(1 << 20)?.export()?;
    /// // SAFETY: the dma-buf was never duplicated, passed on or mapped: only `exported`
    /// // reaches its memory.
    /// let bytes = unsafe { exported.as_mut_slice() };
    /// bytes[..4].copy_from_slice(b"RIFF");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the buffer's mapping lives as long as the borrow of `self`; the caller
        // promises that nothing else accesses it meanwhile, and `&mut self` keeps this
        // value's own accessors out.
        unsafe { self.mem().as_mut_slice() }
    }
}

impl Drop for ExportedBuffer {
    /// Closes the descriptor, then releases the buffer: to the pools if the descriptor was the
    /// file's last reference, else straight back to the system.
    fn drop(&mut self) {
        // SAFETY: both fields are taken once, here, and not used again.
        let (buffer, dmabuf) = unsafe {
            (
                ManuallyDrop::take(&mut self.buffer),
                ManuallyDrop::take(&mut self.dmabuf),
            )
        };
        // Another descriptor, a mapping or another process still holds the dma-buf (or we
        // cannot tell): its pages must not be reused.
        let held = file_count(dmabuf.as_fd()).map_or(true, |n| n > 1);
        drop(dmabuf);
        if held {
            let counters = &buffer.heap.counters;
            counters.exports_held.fetch_add(1, Ordering::Relaxed);
            buffer.release_to_system();
        } else {
            drop(buffer);
        }
    }
}

impl fmt::Debug for ExportedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportedBuffer")
            .field("buffer", &*self.buffer)
            .field("dmabuf", &*self.dmabuf)
            .finish()
    }
}

/// A failed [`Buffer::export`]: why, and the buffer, untouched.
///
/// # Examples
/// ```
/// use pagepool::DmaBufError;
///
/// let heap = pagepool::SystemHeap::new()?;
/// if let Err(e) = heap.alloc(4096)?.export() {
///     if matches!(e.error(), DmaBufError::NoHeap { .. }) {
///         eprintln!("{e}"); // no /dev/udmabuf here
///     }
///     let buf = e.into_buffer();
///     assert!(buf.iter().all(|&b| b == 0));
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[error("cannot export a buffer as a dma-buf: {error}")]
pub struct ExportError {
    buffer: Buffer,
    #[source]
    error: DmaBufError,
}

impl ExportError {
    /// Why the export failed.
    pub fn error(&self) -> &DmaBufError {
        &self.error
    }

    /// The buffer, as it was before the export was tried.
    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }

    /// Gives the buffer back.
    pub fn into_buffer(self) -> Buffer {
        self.buffer
    }

    /// The buffer and the error.
    pub fn into_parts(self) -> (Buffer, DmaBufError) {
        (self.buffer, self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Registry, SystemHeap};

    fn heap(name: &str) -> SystemHeap {
        SystemHeap::builder()
            .name(name)
            .registry(Registry::new(usize::MAX))
            .pressure(None)
            .thread_cache(0)
            .build()
            .unwrap()
    }

    /// An `ExportedBuffer` whose "dma-buf" is a memfd: no `/dev/udmabuf` needed, and since a
    /// memfd shows no reference count, its drop takes the "still held" path.
    fn fake_export(buffer: Buffer) -> ExportedBuffer {
        let fd = crate::os::memfd("pagepool-test", buffer.len()).unwrap();
        ExportedBuffer {
            buffer: ManuallyDrop::new(buffer),
            dmabuf: ManuallyDrop::new(DmaBuf::from_fd(fd).unwrap()),
        }
    }

    fn check_exported(heap: &SystemHeap, mut b: Buffer) {
        let page = crate::page_size();
        let (len, remapped) = (b.len(), b.is_remapped());
        let blocks: Vec<_> = b.blocks().collect();
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        let mut x = fake_export(b);
        assert_eq!((x.len(), x.is_remapped()), (len, remapped));
        assert_eq!(x.blocks().collect::<Vec<_>>(), blocks);
        assert_eq!(x.dmabuf().len(), len);
        // Across the first page boundary, unaligned at both ends.
        let mut back = [0; 11];
        x.read(page - 5, &mut back).unwrap();
        let want: Vec<u8> = (page - 5..page + 6).map(|i| (i % 251) as u8).collect();
        assert_eq!(back[..], want[..]);
        x.write(page - 3, b"abcdef").unwrap();
        x.read(page - 5, &mut back).unwrap();
        assert_eq!(&back[2..8], b"abcdef");
        assert_eq!(back[..2], want[..2]);
        assert_eq!(back[8..], want[8..]);
        assert!(matches!(
            x.write(len - 1, b"ab"),
            Err(DmaBufError::OutOfRange { .. })
        ));
        x.fill(7);
        let mut last = [0; 3];
        x.read(len - 3, &mut last).unwrap();
        assert_eq!(last, [7; 3]);
        // SAFETY: the fake dma-buf shares nothing: only `x` reaches the buffer's memory.
        assert!(unsafe { x.as_slice() }.iter().all(|&b| b == 7));
        // SAFETY: as above.
        let bytes = unsafe { x.as_mut_slice() };
        bytes[len - 1] = 8;
        x.read(len - 1, &mut last[..1]).unwrap();
        assert_eq!(last[0], 8);

        let before = heap.stats();
        drop(x);
        heap.flush();
        let after = heap.stats();
        let pages = (len / page) as u64;
        assert_eq!(
            after.exports_held_at_release,
            before.exports_held_at_release + 1
        );
        assert_eq!(after.released_pages, before.released_pages + pages);
        assert_eq!(after.pooled_pages(), before.pooled_pages());
        assert_eq!(after.live_pages, before.live_pages - pages);
        assert_eq!(after.live_buffers, before.live_buffers - 1);
    }

    #[test]
    fn an_exported_buffer_copies_and_goes_to_the_system_while_held() {
        let heap = heap("exported");
        let b = heap
            .alloc((1 << 20) + (64 << 10) + 3 * crate::page_size())
            .unwrap();
        assert!(!b.is_remapped());
        check_exported(&heap, b);
        assert_eq!(heap.stats().exports_held_at_release, 1);
    }

    #[test]
    fn an_exported_remapped_buffer_goes_to_the_system_while_held() {
        let heap = heap("exported-remapped");
        let page = crate::page_size();
        let a = heap.alloc(page).unwrap();
        let gap = heap.alloc(page).unwrap();
        let c = heap.alloc(page).unwrap();
        drop(a);
        drop(c);
        heap.flush();
        let b = heap.alloc(2 * page).unwrap();
        assert!(b.is_remapped());
        check_exported(&heap, b);
        drop(gap);
        heap.flush();
        let st = heap.stats();
        assert_eq!(st.pooled_pages(), 1, "{st}");
        assert_eq!(
            st.fresh_pages,
            st.pooled_pages() as u64 + st.live_pages + st.released_pages
        );
    }
}
