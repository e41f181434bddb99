//! The private pools' address space: one reservation, a region per size class, slots carved in
//! order, and how much of each slot may be dirty.
//!
//! Every block of the private pools lies in one reserved range, so "is this pointer ours?" is
//! one comparison, and its class and slot are arithmetic on its offset: region `c` holds
//! blocks of class `c` (`2^(min_order + c)` pages), each aligned to its own size (so blocks of
//! 2 MiB and more can be backed by transparent huge pages). Nothing about the range changes
//! after it is made but three kinds of atomic word, so a forked child inherits it whole: the
//! slots carved so far in each region, and for each slot the bytes that may be non-zero
//! (its *extent*, in pages).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::error::OsError;

/// Address space per class region: room for 64 blocks of the largest class (64 MiB), and for
/// 65536 of the smallest (64 KiB). A class whose region is full sends its requests to the next
/// allocator.
pub(crate) const REGION_BYTES: usize = 4 << 30;

/// The bit of a slot's extent word that says the block is handed out: set by an allocation,
/// cleared by its release, so that a second release of the same block is caught.
const LIVE: u32 = 1 << 31;

/// The private pools' reservation (see the module).
pub(crate) struct Range {
    base: usize,
    page: usize,
    min_order: u8,
    classes: usize,
    /// Per class: slots carved so far (the next fresh slot's index).
    carved: Box<[AtomicUsize]>,
    /// Per class: each slot's extent in pages (see the module), in a mapping of its own.
    extents: Box<[Extents]>,
}

/// One class's extents: `slots` words in an anonymous mapping (pages of it never written use
/// no memory).
struct Extents {
    words: NonNull<AtomicU32>,
    slots: usize,
}

// SAFETY: `words` points to a mapping owned by this value, read and written only through
// atomics.
unsafe impl Send for Extents {}
// SAFETY: as above.
unsafe impl Sync for Extents {}

impl Extents {
    fn new(slots: usize) -> Result<Extents, OsError> {
        let bytes = slots * std::mem::size_of::<AtomicU32>();
        let p = crate::os::reserve(bytes)?;
        // SAFETY: the reservation was just made, and is ours alone.
        unsafe { crate::os::open_private(p, bytes)? };
        Ok(Extents {
            words: p.cast(),
            slots,
        })
    }

    fn word(&self, slot: usize) -> &AtomicU32 {
        assert!(slot < self.slots, "slot {slot} of {}", self.slots);
        // SAFETY: `slot` is in bounds (checked); the mapping holds `slots` zero-initialised
        // words, alive as long as `self`, and every access is atomic.
        unsafe { &*self.words.as_ptr().add(slot) }
    }
}

impl Drop for Extents {
    fn drop(&mut self) {
        let bytes = self.slots * std::mem::size_of::<AtomicU32>();
        // SAFETY: the mapping is ours, and no reference into it outlives `self`.
        let _ = unsafe { crate::os::unmap(self.words.cast(), bytes) };
    }
}

/// Where a pointer of the range lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) class: usize,
    pub(crate) index: usize,
}

impl Range {
    /// Reserves regions for blocks of orders `min_order..=max_order`.
    pub(crate) fn new(min_order: u8, max_order: u8) -> Result<Range, OsError> {
        let page = crate::os::page_size();
        let classes = usize::from(max_order - min_order) + 1;
        let largest = page << max_order;
        let base = crate::os::reserve_aligned(classes * REGION_BYTES, largest)?;
        let mut extents = Vec::with_capacity(classes);
        for c in 0..classes {
            extents.push(Extents::new(
                REGION_BYTES / (page << (usize::from(min_order) + c)),
            )?);
        }
        Ok(Range {
            base: base.as_ptr() as usize,
            page,
            min_order,
            classes,
            carved: (0..classes).map(|_| AtomicUsize::new(0)).collect(),
            extents: extents.into_boxed_slice(),
        })
    }

    /// The number of classes.
    pub(crate) fn classes(&self) -> usize {
        self.classes
    }

    /// The order of class `class`'s blocks.
    pub(crate) fn order(&self, class: usize) -> u8 {
        self.min_order + class as u8
    }

    /// The bytes of a block of class `class`.
    pub(crate) fn block_bytes(&self, class: usize) -> usize {
        self.page << self.order(class)
    }

    /// Whether `p` lies in the range.
    #[inline]
    pub(crate) fn contains(&self, p: usize) -> bool {
        p.wrapping_sub(self.base) < self.classes * REGION_BYTES
    }

    /// The slot `p` starts, or `None` when `p` is outside the range, inside a block rather
    /// than at its start, or at a slot never carved.
    pub(crate) fn slot_of(&self, p: usize) -> Option<Slot> {
        if !self.contains(p) {
            return None;
        }
        let off = p - self.base;
        let class = off / REGION_BYTES;
        let within = off % REGION_BYTES;
        let bytes = self.block_bytes(class);
        if !within.is_multiple_of(bytes) {
            return None;
        }
        let index = within / bytes;
        (index < self.carved[class].load(Ordering::Acquire)).then_some(Slot { class, index })
    }

    /// The address of a slot.
    pub(crate) fn addr(&self, s: Slot) -> NonNull<u8> {
        let a = self.base + s.class * REGION_BYTES + s.index * self.block_bytes(s.class);
        // SAFETY: the range does not start at 0 (it is a mapping), so no slot's address is 0.
        unsafe { NonNull::new_unchecked(a as *mut u8) }
    }

    /// Carves the next fresh slot of `class` (readable and writable, all zero), or `None`
    /// when its region is full or the system refuses the memory.
    pub(crate) fn carve(&self, class: usize) -> Option<Slot> {
        let slots = REGION_BYTES / self.block_bytes(class);
        let carved = &self.carved[class];
        let mut index = carved.load(Ordering::Relaxed);
        loop {
            if index >= slots {
                return None;
            }
            // Opened before it is counted, so that `slot_of` never accepts a slot whose
            // memory is not there yet; two threads racing for the same index may both open
            // it (harmless: the same protection twice), and one of them takes the next.
            let s = Slot { class, index };
            // SAFETY: the slot lies in our reservation, and no reference into a slot that
            // has not been counted as carved exists.
            if unsafe { crate::os::open_private(self.addr(s), self.block_bytes(class)) }.is_err() {
                return None;
            }
            match carved.compare_exchange_weak(
                index,
                index + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(s),
                Err(now) => index = now,
            }
        }
    }

    /// The slot's extent in bytes: how much of it, from the start, may be non-zero.
    pub(crate) fn extent(&self, s: Slot) -> usize {
        (self.extents[s.class].word(s.index).load(Ordering::Relaxed) & !LIVE) as usize * self.page
    }

    /// Widens the slot's extent to at least `bytes` (rounded up to pages, within the block).
    pub(crate) fn widen(&self, s: Slot, bytes: usize) {
        let pages = bytes.min(self.block_bytes(s.class)).div_ceil(self.page) as u32;
        let _ = self.extents[s.class].word(s.index).fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |w| ((w & !LIVE) < pages).then_some((w & LIVE) | pages),
        );
    }

    /// The slot is all zero again (zeroed, or given back to the system). Not for a live block.
    pub(crate) fn clear(&self, s: Slot) {
        self.extents[s.class]
            .word(s.index)
            .store(0, Ordering::Relaxed);
    }

    /// Marks the slot handed out (`live`) or released; returns whether it was the other way
    /// before (false: a block handed out twice, or released twice).
    pub(crate) fn set_live(&self, s: Slot, live: bool) -> bool {
        let w = self.extents[s.class].word(s.index);
        if live {
            w.fetch_or(LIVE, Ordering::AcqRel) & LIVE == 0
        } else {
            w.fetch_and(!LIVE, Ordering::AcqRel) & LIVE != 0
        }
    }

    /// The class of the smallest block that holds `size` bytes aligned to `align`, if any.
    pub(crate) fn class_for(&self, size: usize, align: usize) -> Option<usize> {
        let need = size.max(align).max(1);
        let blocks = need.div_ceil(self.page).checked_next_power_of_two()?;
        let order = blocks.trailing_zeros() as usize;
        let min = usize::from(self.min_order);
        let class = order.saturating_sub(min);
        (class < self.classes).then_some(class)
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        // SAFETY: the reservation is ours; whoever drops the range holds no block of it.
        let _ = unsafe {
            crate::os::unmap(
                NonNull::new_unchecked(self.base as *mut u8),
                self.classes * REGION_BYTES,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_classes_and_extents() {
        let r = Range::new(4, 8).unwrap(); // 64 KiB .. 1 MiB
        assert_eq!(r.classes(), 5);
        assert_eq!(r.class_for(1, 8), Some(0));
        assert_eq!(r.class_for(64 << 10, 8), Some(0));
        assert_eq!(r.class_for((64 << 10) + 1, 8), Some(1));
        assert_eq!(r.class_for(1 << 20, 8), Some(4));
        assert_eq!(
            r.class_for((1 << 20) + 1, 8),
            None,
            "past the largest class"
        );
        assert_eq!(
            r.class_for(100, 256 << 10),
            Some(2),
            "alignment picks the class"
        );
        let a = r.carve(2).unwrap();
        let b = r.carve(2).unwrap();
        assert_eq!((a.index, b.index), (0, 1));
        let pa = r.addr(a).as_ptr() as usize;
        assert_eq!(pa % (256 << 10), 0, "aligned to its size");
        assert_eq!(r.slot_of(pa), Some(a));
        assert_eq!(r.slot_of(pa + 4096), None, "inside a block");
        assert_eq!(
            r.slot_of(r.addr(Slot { class: 2, index: 2 }).as_ptr() as usize),
            None,
            "never carved"
        );
        assert_eq!(r.slot_of(pa.wrapping_sub(1 << 40)), None);
        // SAFETY: the slot was just carved: 256 KiB of writable memory no one else uses.
        unsafe { r.addr(a).as_ptr().write_bytes(7, 4096) };
        assert_eq!(r.extent(a), 0);
        r.widen(a, 5000);
        assert_eq!(r.extent(a), 8192);
        r.widen(a, 100);
        assert_eq!(r.extent(a), 8192, "only widens");
        r.widen(a, usize::MAX);
        assert_eq!(r.extent(a), 256 << 10, "at most the block");
        r.clear(a);
        assert_eq!(r.extent(a), 0);
        assert!(
            r.set_live(a, true) && !r.set_live(a, true),
            "handed out once"
        );
        r.widen(a, 4096);
        assert_eq!(r.extent(a), 4096, "the live bit is not an extent");
        assert!(
            r.set_live(a, false) && !r.set_live(a, false),
            "released once"
        );
        assert_eq!(r.extent(a), 4096);
        assert_eq!(r.class_for(usize::MAX, 8), None);
    }
}
