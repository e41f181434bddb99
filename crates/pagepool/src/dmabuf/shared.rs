//! Memory that others may write at any time, copied in and out with relaxed atomic words
//! ([`SharedMem`]): what [`CpuAccess`](super::CpuAccess) and an exported buffer's copies are
//! built on. Apart from the dma-buf types because it is the one place that reasons about
//! racing accesses to such memory word by word.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use super::DmaBufError;

/// The size of the words [`SharedMem`] copies with.
pub(super) const WORD: usize = size_of::<AtomicU64>();
const _: () = assert!(align_of::<AtomicU64>() == WORD);

/// Memory that others may write at any time (other mappings of the same pages, other
/// processes, devices), so that Rust must not form references to it: `len` bytes at `ptr`,
/// read and written only with relaxed atomic loads, stores and compare-and-swaps of whole
/// aligned 8-byte words. A word partly inside a copy is merged with a compare-and-swap, so
/// that its other bytes are never written back stale, and every access to a byte is one of the
/// same size at the same address, as the Rust memory model requires of racing atomic accesses.
///
/// It does not own or track the memory: its maker (see [`SharedMem::new`]) keeps the mapping
/// alive while it is used.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedMem {
    pub(super) ptr: NonNull<u8>,
    len: usize,
}

impl SharedMem {
    /// # Safety
    /// For as long as the value (or a copy) is used:
    /// - `ptr` is aligned to 8 bytes, and every aligned 8-byte word that overlaps
    ///   `ptr..ptr + len` is mapped, readable and writable (a page-aligned mapping of `len`
    ///   bytes is: mappings are whole pages);
    /// - no Rust code accesses those words other than through a `SharedMem` (or as
    ///   [`as_slice`](Self::as_slice) and [`as_mut_slice`](Self::as_mut_slice) allow), so that
    ///   every access racing with these is an atomic one of the same size; accesses the
    ///   program does not see (devices, other processes) are allowed.
    pub(crate) unsafe fn new(ptr: NonNull<u8>, len: usize) -> SharedMem {
        debug_assert!(ptr.as_ptr().addr().is_multiple_of(WORD));
        SharedMem { ptr, len }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The aligned word `i` (bytes `i * WORD..(i + 1) * WORD`).
    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i * WORD < self.len);
        // SAFETY: the word overlaps `ptr..ptr + len`, so it is mapped, aligned (`ptr` is), and
        // valid for reads and writes while `self` is used (see `new`); every racing access to
        // it is atomic and of this size (see `new`).
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(i * WORD).cast()) }
    }

    /// `Ok` if `len` bytes at `offset` lie inside the memory.
    fn check(&self, offset: usize, len: usize) -> Result<(), DmaBufError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(DmaBufError::OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Stores `src` at byte `at` of word `i`; `at + src.len() <= WORD`. The word's other bytes
    /// are left as they are, even if someone writes them meanwhile.
    fn store_part(&self, i: usize, at: usize, src: &[u8]) {
        let word = self.word(i);
        if let Ok(whole) = <[u8; WORD]>::try_from(src) {
            word.store(u64::from_ne_bytes(whole), Ordering::Relaxed);
            return;
        }
        let mut old = word.load(Ordering::Relaxed);
        loop {
            let mut bytes = old.to_ne_bytes();
            bytes[at..at + src.len()].copy_from_slice(src);
            let new = u64::from_ne_bytes(bytes);
            match word.compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => old = now,
            }
        }
    }

    /// Copies `out.len()` bytes at `offset` into `out`, or fails (copying nothing) if they are
    /// not all inside the memory.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), DmaBufError> {
        self.check(offset, out.len())?;
        let (mut i, at) = (offset / WORD, offset % WORD);
        let mut out = out;
        if at != 0 && !out.is_empty() {
            // The head: the end of a word.
            let n = out.len().min(WORD - at);
            let bytes = self.word(i).load(Ordering::Relaxed).to_ne_bytes();
            out[..n].copy_from_slice(&bytes[at..at + n]);
            out = &mut out[n..];
            i += 1;
        }
        let (words, tail) = out.as_chunks_mut::<WORD>();
        for chunk in words {
            *chunk = self.word(i).load(Ordering::Relaxed).to_ne_bytes();
            i += 1;
        }
        if !tail.is_empty() {
            // The tail: the start of a word.
            let bytes = self.word(i).load(Ordering::Relaxed).to_ne_bytes();
            tail.copy_from_slice(&bytes[..tail.len()]);
        }
        Ok(())
    }

    /// Copies `data` to `offset`, or fails (writing nothing) if it does not fit.
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> Result<(), DmaBufError> {
        self.check(offset, data.len())?;
        let (mut i, at) = (offset / WORD, offset % WORD);
        let mut data = data;
        if at != 0 && !data.is_empty() {
            let n = data.len().min(WORD - at);
            self.store_part(i, at, &data[..n]);
            data = &data[n..];
            i += 1;
        }
        let (words, tail) = data.as_chunks::<WORD>();
        for &chunk in words {
            self.word(i)
                .store(u64::from_ne_bytes(chunk), Ordering::Relaxed);
            i += 1;
        }
        if !tail.is_empty() {
            self.store_part(i, 0, tail);
        }
        Ok(())
    }

    /// Sets every byte to `byte`.
    pub(crate) fn fill(&self, byte: u8) {
        let whole = u64::from_ne_bytes([byte; WORD]);
        let full = self.len / WORD;
        for i in 0..full {
            self.word(i).store(whole, Ordering::Relaxed);
        }
        let rest = self.len % WORD;
        if rest != 0 {
            self.store_part(full, 0, &[byte; WORD][..rest]);
        }
    }

    /// The memory as a slice.
    ///
    /// # Safety
    /// The memory is still mapped as [`SharedMem::new`] requires for the slice's lifetime `'s`,
    /// and nothing writes it meanwhile: no other mapping, process or device, and no
    /// `SharedMem`.
    pub(crate) unsafe fn as_slice<'s>(&self) -> &'s [u8] {
        // SAFETY: `ptr..ptr + len` is mapped and readable for `'s`, and the caller promises
        // that nothing writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The memory as a mutable slice.
    ///
    /// # Safety
    /// The memory is still mapped as [`SharedMem::new`] requires for the slice's lifetime `'s`,
    /// and nothing else reads or writes it meanwhile: no other mapping, process or device, and
    /// no `SharedMem`.
    #[allow(clippy::mut_from_ref)] // exclusivity is the caller's promise, not `&mut self`'s
    pub(crate) unsafe fn as_mut_slice<'s>(&self) -> &'s mut [u8] {
        // SAFETY: `ptr..ptr + len` is mapped, readable and writable for `'s`, and the caller
        // promises that nothing else accesses it meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}
