//! Zeroing: ordinary stores for buffers that fit in the cache, streaming stores for larger ones.
//!
//! Zeroing is the one real cost pagepool moves around. For a buffer that fits in the last-level
//! cache, ordinary stores (`memset`) are fastest and leave the lines cached for the program that
//! uses the buffer next. For a larger buffer they only thrash the cache: each line is read before
//! it is overwritten, and evicted before it is used. Non-temporal (streaming) stores write whole
//! lines straight to memory instead, and beat `memset` on such buffers (measured: docs/DESIGN.md,
//! Tuning, "Zeroing method").

// Under ThreadSanitizer (`--cfg pagepool_tsan`) the streaming stores are not used.
#![cfg_attr(pagepool_tsan, allow(dead_code))]
use std::ptr::NonNull;

/// Zeroes `len` bytes at `p`; `streaming` asks for non-temporal stores where the CPU has them.
///
/// # Safety
/// `p..p + len` is writable memory the caller owns exclusively.
#[inline]
pub(crate) unsafe fn zero(p: NonNull<u8>, len: usize, streaming: bool) {
    // Under ThreadSanitizer (`--cfg pagepool_tsan`, see `.ci/san`) plain stores only: it does
    // not see streaming stores, and would take the next owner's accesses for races.
    #[cfg(all(target_arch = "x86_64", not(pagepool_tsan)))]
    if streaming && (p.as_ptr() as usize).is_multiple_of(64) && len.is_multiple_of(64) {
        // SAFETY: forwarded from the caller; alignment and length checked just above.
        unsafe { zero_streaming(p.as_ptr(), len) };
        return;
    }
    let _ = streaming;
    // SAFETY: forwarded from the caller.
    unsafe { p.as_ptr().write_bytes(0, len) };
}

/// Streaming zeroing: 64-byte AVX-512 or 32-byte AVX stores where the CPU has them (one
/// streaming store per cycle is the limit, so the width matters), SSE2 (every x86-64) otherwise.
///
/// # Safety
/// `p` is 64-byte aligned, `len` a multiple of 64, and `p..p + len` writable and exclusively
/// owned.
#[cfg(target_arch = "x86_64")]
unsafe fn zero_streaming(p: *mut u8, len: usize) {
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); the rest is the caller's contract.
        unsafe { zero_streaming_avx512(p, len) }
    } else if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above); the rest is the caller's contract.
        unsafe { zero_streaming_avx(p, len) }
    } else {
        // SAFETY: the caller's contract.
        unsafe { zero_streaming_sse2(p, len) }
    }
    // Order the streaming stores before whatever publishes the memory (a pool push).
    // SAFETY: SSE is part of the x86-64 baseline.
    unsafe { std::arch::x86_64::_mm_sfence() };
}

/// See [`zero_streaming`]; one 64-byte store per line.
///
/// # Safety
/// As [`zero_streaming`], and the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn zero_streaming_avx512(p: *mut u8, len: usize) {
    use std::arch::x86_64::{__m512i, _mm512_setzero_si512, _mm512_stream_si512};
    let z = _mm512_setzero_si512();
    let base = p.cast::<__m512i>();
    for i in 0..len / 64 {
        // SAFETY: line `i` lies inside `p..p + len` and is 64-byte aligned.
        unsafe { _mm512_stream_si512(base.add(i), z) };
    }
}

/// See [`zero_streaming`]; two 32-byte stores per line.
///
/// # Safety
/// As [`zero_streaming`], and the CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn zero_streaming_avx(p: *mut u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_setzero_si256, _mm256_stream_si256};
    let z = _mm256_setzero_si256();
    let base = p.cast::<__m256i>();
    for i in 0..len / 32 {
        // SAFETY: 32-byte piece `i` lies inside `p..p + len` and is 32-byte aligned.
        unsafe { _mm256_stream_si256(base.add(i), z) };
    }
}

/// See [`zero_streaming`]; four 16-byte stores per line.
///
/// # Safety
/// As [`zero_streaming`].
#[cfg(target_arch = "x86_64")]
unsafe fn zero_streaming_sse2(p: *mut u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_setzero_si128, _mm_stream_si128};
    // SAFETY: SSE2 is part of the x86-64 baseline.
    let z = unsafe { _mm_setzero_si128() };
    let base = p.cast::<__m128i>();
    for i in 0..len / 16 {
        // SAFETY: 16-byte piece `i` lies inside `p..p + len` and is 16-byte aligned.
        unsafe { _mm_stream_si128(base.add(i), z) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_streaming_width_zeroes_exactly_its_range() {
        let variants: [unsafe fn(*mut u8, usize); 3] = [
            zero_streaming_sse2,
            zero_streaming_avx,
            zero_streaming_avx512,
        ];
        let needs = [None, Some("avx"), Some("avx512f")];
        for (f, need) in variants.into_iter().zip(needs) {
            let have = match need {
                None => true,
                Some("avx") => std::arch::is_x86_feature_detected!("avx"),
                Some(_) => std::arch::is_x86_feature_detected!("avx512f"),
            };
            if !have {
                continue;
            }
            let mut v = vec![0xffu8; 2 * 4096 + 128];
            let off = v.as_ptr().align_offset(64);
            // SAFETY: the range is inside `v`, aligned; the CPU has the feature (checked).
            unsafe { f(v.as_mut_ptr().add(off), 2 * 4096) };
            assert!(v[off..off + 2 * 4096].iter().all(|&b| b == 0), "{need:?}");
            assert!(
                v[off + 2 * 4096..].iter().all(|&b| b == 0xff),
                "{need:?} wrote past the end"
            );
        }
    }

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
    }
}
