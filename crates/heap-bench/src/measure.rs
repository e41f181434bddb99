//! Measurements of the machine itself: memset bandwidth on resident memory (one thread and all
//! threads), the busy work between paced calls, and resident set size.

use std::time::{Duration, Instant};

/// memset bandwidth at one size, in bytes per second.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Bandwidth {
    /// One thread zeroing one resident buffer of the size, over and over.
    pub single: f64,
    /// Every core's thread zeroing its own resident buffer of the size at once (total).
    pub all: f64,
}

impl Bandwidth {
    /// The zeroing limit: the fastest any allocator can hand out `size` zeroed bytes back to
    /// back, in ns.
    pub fn limit_ns(&self, size: usize) -> f64 {
        size as f64 / self.all * 1e9
    }
}

fn zero_for(buf: &mut [u8], d: Duration) -> (usize, Duration) {
    let t = Instant::now();
    let mut bytes = 0;
    while t.elapsed() < d {
        // SAFETY: writes within `buf`.
        unsafe { std::ptr::write_bytes(buf.as_mut_ptr(), 0, buf.len()) };
        std::hint::black_box(&mut *buf);
        bytes += buf.len();
    }
    (bytes, t.elapsed())
}

/// Measures memset bandwidth at `size` on resident memory, for `d` per measurement.
pub fn bandwidth(size: usize, d: Duration) -> Bandwidth {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut buf = vec![1u8; size];
    zero_for(&mut buf, d / 4); // warm
    let (b, t) = zero_for(&mut buf, d);
    let single = b as f64 / t.as_secs_f64();
    let total: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let mut buf = vec![1u8; size];
                    zero_for(&mut buf, d / 4);
                    zero_for(&mut buf, d).0
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    // Every thread ran for `d` (after its warm-up), side by side.
    let all = total as f64 / d.as_secs_f64();
    Bandwidth {
        single,
        all: all.max(single),
    }
}

/// Busy work that touches no heap memory, for `d`.
pub fn spin(d: Duration) {
    let end = Instant::now() + d;
    let mut x = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
    }
}

/// Resets the peak resident set size (`VmHWM`) to the current one (Linux 4.0+).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `(VmHWM, VmRSS)` in bytes.
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}
