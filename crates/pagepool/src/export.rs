//! Export on top of the heap: a [`Buffer`] handed out as a real dma-buf through
//! `/dev/udmabuf` ([`Buffer::export`]), and the [`ExportedBuffer`] that owns both. The core
//! `Buffer` type knows nothing of dma-bufs; this file joins the two.

use std::fmt;
use std::mem::ManuallyDrop;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use crate::dmabuf::{DmaBuf, DmaBufError, SharedMem, file_count};
use crate::heap::buffer::{BlockInfo, Buffer, stretches};

impl Buffer {
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
/// use pagepool::dmabuf::DmaBufError;
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
    use crate::SystemHeap;
    use crate::registry::Registry;

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
