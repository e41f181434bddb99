//! Measurements of the machine itself: zeroing bandwidth on resident memory (memset, streaming
//! stores, `rep stosb`; one thread and all threads), the busy work between paced calls, and resident set size.

use std::time::{Duration, Instant};

/// One way of zeroing memory, measured at one size: bytes per second.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MethodBandwidth {
    /// `memset`, `streaming` (non-temporal stores) or `rep stosb`.
    pub method: &'static str,
    /// One thread zeroing one resident buffer of the size, over and over.
    pub single: f64,
    /// Every core's thread zeroing its own resident buffer of the size at once (total).
    pub all: f64,
}

/// Zeroing bandwidth at one size: each method's, and the best one-thread and all-thread figures
/// with the method that gave each.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Bandwidth {
    /// The best one-thread figure, bytes per second.
    pub single: f64,
    /// The method that gave it.
    pub single_method: &'static str,
    /// The best all-thread figure (total), bytes per second.
    pub all: f64,
    /// The method that gave it.
    pub all_method: &'static str,
    /// Every method's figures: memset, streaming stores, `rep stosb`.
    pub methods: [MethodBandwidth; 3],
}

impl Bandwidth {
    /// The best one-thread and all-thread figures of these methods' (each method's best kept).
    fn best_of(methods: [MethodBandwidth; 3]) -> Bandwidth {
        let best_single = methods
            .iter()
            .max_by(|a, b| a.single.total_cmp(&b.single))
            .copied()
            .unwrap_or(methods[0]);
        let best_all = methods
            .iter()
            .max_by(|a, b| a.all.total_cmp(&b.all))
            .copied()
            .unwrap_or(methods[0]);
        Bandwidth {
            single: best_single.single,
            single_method: best_single.method,
            all: best_all.all,
            all_method: best_all.method,
            methods,
        }
    }

    /// This measurement and `other` (of the same size) together: each method's best of both.
    pub fn merged(&self, other: &Bandwidth) -> Bandwidth {
        let mut methods = self.methods;
        for (m, o) in methods.iter_mut().zip(&other.methods) {
            m.single = m.single.max(o.single);
            m.all = m.all.max(o.all);
        }
        Bandwidth::best_of(methods)
    }

    /// The zeroing limit: the fastest any allocator can hand out `size` zeroed bytes back to
    /// back, in ns: every core zeroing with the fastest method.
    pub fn limit_ns(&self, size: usize) -> f64 {
        size as f64 / self.all * 1e9
    }

    /// One-thread `memset` (the paced mode's work between calls is counted in it).
    pub fn memset_single(&self) -> f64 {
        self.methods[0].single
    }
}

/// A way to zero `size` bytes at a pointer (the caller owns them).
type ZeroFn = unsafe fn(*mut u8, usize);

/// The zeroing methods measured.
const METHODS: [(&str, ZeroFn); 3] = [
    ("memset", zero_memset),
    ("streaming", zero_streaming),
    ("rep stosb", zero_rep_stosb),
];

/// Zeroes with `memset` (`ptr::write_bytes`).
///
/// # Safety
/// `p` spans `size` writable bytes nobody else uses meanwhile.
unsafe fn zero_memset(p: *mut u8, size: usize) {
    // SAFETY: the caller's contract.
    unsafe { p.write_bytes(0, size) }
}

/// Zeroes with `rep stosb` where the CPU has it (x86-64), else `memset`.
///
/// # Safety
/// `p` spans `size` writable bytes nobody else uses meanwhile.
unsafe fn zero_rep_stosb(p: *mut u8, size: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `rep stosb` stores `rcx` bytes of `al` from `rdi` on: exactly the `size` bytes
    // at `p` the caller hands over; the direction flag is clear (the ABI guarantees it).
    unsafe {
        std::arch::asm!(
            "rep stosb",
            inout("rcx") size => _,
            inout("rdi") p => _,
            in("al") 0u8,
            options(nostack, preserves_flags)
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract.
    unsafe {
        p.write_bytes(0, size)
    };
}

fn zero_for(buf: &mut [u8], zero: ZeroFn, d: Duration) -> (usize, Duration) {
    // Read the clock once per 1 MiB zeroed, not once per buffer: at 4 KiB a clock read costs
    // about as much as the zeroing it would be timing.
    let batch = ((1 << 20) / buf.len().max(1)).max(1);
    let t = Instant::now();
    let mut bytes = 0;
    while t.elapsed() < d {
        for _ in 0..batch {
            // SAFETY: writes within `buf`, which this thread owns.
            unsafe { zero(buf.as_mut_ptr(), buf.len()) };
            std::hint::black_box(&mut *buf);
        }
        bytes += batch * buf.len();
    }
    (bytes, t.elapsed())
}

/// Measures the zeroing bandwidth of each method at `size` on resident memory, one thread and
/// then one thread per core at once, `rounds` times for `d` per measurement (the methods taking
/// turns), keeping each method's best: a limit read at a noisy moment would be one a row can beat.
pub fn bandwidth(size: usize, d: Duration, rounds: usize) -> Bandwidth {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut methods = METHODS.map(|(method, _)| MethodBandwidth {
        method,
        single: 0.0,
        all: 0.0,
    });
    let mut bufs: Vec<Vec<u8>> = (0..METHODS.len()).map(|_| vec![1u8; size]).collect();
    for round in 0..rounds.max(1) {
        for (i, &(_, zero)) in METHODS.iter().enumerate() {
            let buf = &mut bufs[i];
            if round == 0 {
                zero_for(buf, zero, d / 4); // warm
            }
            let (b, t) = zero_for(buf, zero, d);
            let single = b as f64 / t.as_secs_f64();
            let total: usize = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(move || {
                            let mut buf = vec![1u8; size];
                            zero_for(&mut buf, zero, d / 4);
                            zero_for(&mut buf, zero, d).0
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
            });
            // Every thread ran for `d` (after its warm-up), side by side.
            let all = (total as f64 / d.as_secs_f64()).max(single);
            let m = &mut methods[i];
            m.single = m.single.max(single);
            m.all = m.all.max(all);
        }
    }
    Bandwidth::best_of(methods)
}

/// CPU time of the whole process so far (every thread, user + system), in ns.
pub fn process_cpu_ns() -> u64 {
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF covers every thread.
    let ru = unsafe {
        let mut ru = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

/// The calling thread's CPU time, in ns (`CLOCK_THREAD_CPUTIME_ID`; 0 if it cannot be read).
pub fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The calling thread's context switches so far (`getrusage(RUSAGE_THREAD)`; zeros if it
/// cannot be read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadSwitches {
    /// Voluntary: the thread gave its CPU up, to wait for something (a lock, a sleep, I/O).
    pub voluntary: u64,
    /// Involuntary: the scheduler took its CPU and gave it to another thread.
    pub involuntary: u64,
}

impl ThreadSwitches {
    /// Reads the calling thread's counts.
    pub fn now() -> ThreadSwitches {
        // SAFETY: getrusage fills the struct it is given; RUSAGE_THREAD covers the calling
        // thread.
        let (rc, ru) = unsafe {
            let mut ru = std::mem::zeroed::<libc::rusage>();
            (libc::getrusage(libc::RUSAGE_THREAD, &mut ru), ru)
        };
        if rc != 0 {
            return ThreadSwitches::default();
        }
        ThreadSwitches {
            voluntary: ru.ru_nvcsw as u64,
            involuntary: ru.ru_nivcsw as u64,
        }
    }

    /// What happened to the thread between `self` and `later` (both its own readings): if
    /// the scheduler took its CPU at all, it was preempted; else if it gave the CPU up, it
    /// slept; else it ran throughout.
    pub fn until(self, later: ThreadSwitches) -> Switch {
        if later.involuntary > self.involuntary {
            Switch::Preempted
        } else if later.voluntary > self.voluntary {
            Switch::Slept
        } else {
            Switch::Ran
        }
    }
}

/// What happened to a thread during one call, from its context switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// It kept its CPU throughout.
    Ran,
    /// The scheduler gave its CPU to another thread at least once (another thread's turn,
    /// nothing the call waited for).
    Preempted,
    /// It gave its CPU up (and was not preempted): it waited for something.
    Slept,
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

/// What the touch in every call costs when the memory is already zeroed: writing one byte per
/// 4 KiB page of `size` resident, zeroed bytes, in ns per call, depending on who zeroed it and
/// how. An estimate of the least a paced call can cost, not a bound: how the caches hold the
/// lines depends on what ran in between.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TouchFloor {
    /// Zeroed by this thread just before (`memset`: its lines in this core's caches, as far as
    /// they fit).
    pub own_ns: f64,
    /// Zeroed by another thread just before, with `memset` (the lines in the other core's
    /// caches), as a worker zeroes buffers that fit in the cache.
    pub other_ns: f64,
    /// Zeroed by another thread with streaming stores (the lines in memory, in no cache), as
    /// a worker zeroes buffers too large for the cache.
    pub other_streaming_ns: f64,
}

impl TouchFloor {
    /// The least of the three.
    pub fn min_ns(&self) -> f64 {
        self.own_ns.min(self.other_ns).min(self.other_streaming_ns)
    }

    /// Two measurements as one: each variant's least.
    pub fn merged(&self, other: &TouchFloor) -> TouchFloor {
        TouchFloor {
            own_ns: self.own_ns.min(other.own_ns),
            other_ns: self.other_ns.min(other.other_ns),
            other_streaming_ns: self.other_streaming_ns.min(other.other_streaming_ns),
        }
    }
}

/// A pointer handed to the helper thread of [`touch_floor`].
struct Shared(*mut u8);
// SAFETY: the two threads take turns on the memory (see `touch_floor`); never both at once.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

fn touch_pages(p: *mut u8, size: usize) -> f64 {
    let t = Instant::now();
    for off in (0..size).step_by(4096) {
        // SAFETY: `off < size` and `p` spans `size` bytes (the callers' buffer).
        unsafe { p.add(off).write_volatile(1) };
    }
    t.elapsed().as_nanos() as f64
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Zeroes `size` bytes at `p` with streaming (non-temporal) stores where the CPU has them.
///
/// # Safety
/// `p` spans `size` writable bytes nobody else uses meanwhile.
unsafe fn zero_streaming(p: *mut u8, size: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_setzero_si128, _mm_sfence, _mm_stream_si128};
        let head = p.align_offset(16).min(size);
        // SAFETY: the unaligned head lies inside the buffer.
        unsafe { p.write_bytes(0, head) };
        let body = (size - head) / 16;
        // SAFETY: SSE2 is part of x86-64; every 16-byte store lies inside the buffer, aligned.
        unsafe {
            let z = _mm_setzero_si128();
            let base = p.add(head).cast::<__m128i>();
            for i in 0..body {
                _mm_stream_si128(base.add(i), z);
            }
            _mm_sfence();
            p.add(head + body * 16)
                .write_bytes(0, size - head - body * 16);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract.
    unsafe {
        p.write_bytes(0, size)
    };
}

/// Measures [`TouchFloor`] at `size` for about `d` per variant (median of the samples). Between
/// the zeroing and the touch the measuring thread computes for `settle` (the paced mode's work
/// between calls), as a program does between releasing a buffer and using the next one.
pub fn touch_floor(size: usize, d: Duration, settle: Duration) -> TouchFloor {
    use std::sync::atomic::{AtomicU32, Ordering};
    let mut buf = vec![1u8; size];
    let p = buf.as_mut_ptr();
    let mut own = Vec::new();
    let t = Instant::now();
    while own.len() < 5 || t.elapsed() < d {
        // SAFETY: `p` spans `size` bytes of `buf`, used by this thread only here.
        unsafe { p.write_bytes(0, size) };
        spin(settle);
        own.push(touch_pages(p, size));
    }
    // A helper zeroes, then this thread touches; they take turns.
    const ZERO: u32 = 0;
    const ZERO_STREAMING: u32 = 1;
    const TOUCH: u32 = 2;
    const STOP: u32 = 3;
    let turn = AtomicU32::new(TOUCH);
    let shared = Shared(p);
    let (mut other, mut streaming) = (Vec::new(), Vec::new());
    std::thread::scope(|s| {
        let (turn, shared) = (&turn, &shared);
        s.spawn(move || {
            loop {
                match turn.load(Ordering::Acquire) {
                    ZERO => {
                        // SAFETY: it is this thread's turn: the other one waits for TOUCH.
                        unsafe { shared.0.write_bytes(0, size) };
                        turn.store(TOUCH, Ordering::Release);
                    }
                    ZERO_STREAMING => {
                        // SAFETY: as above.
                        unsafe { zero_streaming(shared.0, size) };
                        turn.store(TOUCH, Ordering::Release);
                    }
                    STOP => return,
                    _ => std::hint::spin_loop(),
                }
            }
        });
        for (how, out) in [(ZERO, &mut other), (ZERO_STREAMING, &mut streaming)] {
            let t = Instant::now();
            while out.len() < 5 || t.elapsed() < d {
                turn.store(how, Ordering::Release);
                while turn.load(Ordering::Acquire) != TOUCH {
                    std::hint::spin_loop();
                }
                spin(settle);
                out.push(touch_pages(shared.0, size));
            }
        }
        turn.store(STOP, Ordering::Release);
    });
    drop(buf);
    TouchFloor {
        own_ns: median_f64(own),
        other_ns: median_f64(other),
        other_streaming_ns: median_f64(streaming),
    }
}

/// What `/proc/self/smaps` and `/proc/self/numa_maps` say about the mappings that overlap one
/// address range: how its memory is backed. Figures are per mapping (the kernel gives no finer
/// ones), so a mapping that reaches past the range counts whole: `span` says how far they go.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RangePages {
    /// Bytes of the mappings overlapping the range (their whole extent).
    pub span: u64,
    /// Resident bytes (`Rss`).
    pub rss: u64,
    /// Anonymous memory in transparent huge pages (`AnonHugePages`).
    pub anon_huge: u64,
    /// Shared memory (shmem, memfd) mapped as transparent huge pages (`ShmemPmdMapped`).
    pub shmem_pmd: u64,
    /// File memory mapped as transparent huge pages (`FilePmdMapped`).
    pub file_pmd: u64,
    /// hugetlbfs memory (`Shared_Hugetlb` + `Private_Hugetlb`).
    pub hugetlb: u64,
    /// Locked bytes (`Locked`).
    pub locked: u64,
    /// Pages per NUMA node, in bytes (`N<n>=` of `numa_maps`), ascending by node.
    pub nodes: Vec<(u32, u64)>,
    /// The memory policies of the mappings (`default`, `bind:0`, ...), each once.
    pub policies: Vec<String>,
}

impl RangePages {
    /// Bytes mapped by 2 MiB pages of any kind (transparent or hugetlbfs).
    pub fn huge(&self) -> u64 {
        self.anon_huge + self.shmem_pmd + self.file_pmd + self.hugetlb
    }

    /// One line: resident bytes, bytes in huge pages (and of which kind), locked bytes, nodes
    /// and policies; and the mappings' extent where it is wider than the range.
    pub fn describe(&self, len: usize) -> String {
        let mut s = format!(
            "resident {}, in 2 MiB pages {}",
            bytes(self.rss),
            bytes(self.huge())
        );
        for (name, b) in [
            ("AnonHugePages", self.anon_huge),
            ("ShmemPmdMapped", self.shmem_pmd),
            ("FilePmdMapped", self.file_pmd),
            ("hugetlb", self.hugetlb),
        ] {
            if b > 0 {
                s.push_str(&format!(" ({name} {})", bytes(b)));
            }
        }
        s.push_str(&format!(", locked {}", bytes(self.locked)));
        for (n, b) in &self.nodes {
            s.push_str(&format!(", node{n} {}", bytes(*b)));
        }
        if !self.policies.is_empty() {
            s.push_str(&format!(", policy {}", self.policies.join("/")));
        }
        if self.span > len as u64 {
            s.push_str(&format!(
                " (figures of mappings spanning {}, wider than the {} range)",
                bytes(self.span),
                bytes(len as u64)
            ));
        }
        s
    }
}

/// `b` bytes for people: `4 KiB`, `2.0 MiB`, `1.00 GiB`.
pub fn bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// Reads [`RangePages`] for `start..start + len` from this process's `smaps` and `numa_maps`
/// (zeroes where they cannot be read).
pub fn range_pages(start: usize, len: usize) -> RangePages {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let numa = std::fs::read_to_string("/proc/self/numa_maps").unwrap_or_default();
    parse_range_pages(start, len, &smaps, &numa)
}

/// [`range_pages`] from the text of `smaps` and `numa_maps`.
fn parse_range_pages(start: usize, len: usize, smaps: &str, numa: &str) -> RangePages {
    let end = start.saturating_add(len);
    let mut r = RangePages::default();
    let mut starts = Vec::new();
    let mut current = false;
    for line in smaps.lines() {
        if let Some((a, b)) = vma_range(line) {
            current = a < end && b > start;
            if current {
                r.span += (b - a) as u64;
                starts.push(a);
            }
            continue;
        }
        if !current {
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kb = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
        match key {
            "Rss" => r.rss += kb,
            "AnonHugePages" => r.anon_huge += kb,
            "ShmemPmdMapped" => r.shmem_pmd += kb,
            "FilePmdMapped" => r.file_pmd += kb,
            "Shared_Hugetlb" | "Private_Hugetlb" => r.hugetlb += kb,
            "Locked" => r.locked += kb,
            _ => {}
        }
    }
    let mut nodes = std::collections::BTreeMap::<u32, u64>::new();
    for line in numa.lines() {
        let mut words = line.split_whitespace();
        let Some(a) = words.next().and_then(|a| usize::from_str_radix(a, 16).ok()) else {
            continue;
        };
        if !starts.contains(&a) {
            continue;
        }
        let words: Vec<&str> = words.collect();
        if let Some(policy) = words.first()
            && !r.policies.iter().any(|p| p == policy)
        {
            r.policies.push((*policy).to_owned());
        }
        let page_kb: u64 = words
            .iter()
            .find_map(|w| w.strip_prefix("kernelpagesize_kB="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(4);
        for w in &words {
            if let Some((n, pages)) = w.strip_prefix('N').and_then(|x| x.split_once('='))
                && let (Ok(n), Ok(pages)) = (n.parse::<u32>(), pages.parse::<u64>())
            {
                *nodes.entry(n).or_default() += pages * page_kb * 1024;
            }
        }
    }
    r.nodes = nodes.into_iter().collect();
    r
}

/// The address range of a `smaps` mapping header line (`7f..-7f.. rw-p 00000000 00:00 0`).
fn vma_range(line: &str) -> Option<(usize, usize)> {
    let (a, b) = line.split_whitespace().next()?.split_once('-')?;
    if a.is_empty() || !a.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some((
        usize::from_str_radix(a, 16).ok()?,
        usize::from_str_radix(b, 16).ok()?,
    ))
}

/// The selected value of a transparent-huge-page setting
/// (`/sys/kernel/mm/transparent_hugepage/NAME`, `always [madvise] never` -> `madvise`), or
/// `absent`.
pub fn thp_setting(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{name}"))
        .ok()
        .and_then(|s| {
            let a = s.find('[')? + 1;
            let b = a + s[a..].find(']')?;
            Some(s[a..b].to_owned())
        })
        .unwrap_or_else(|| "absent".into())
}

/// Free 2 MiB hugetlbfs pages (0 where there are none).
pub fn free_hugetlb_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (`None` where it cannot be read).
pub fn mem_available() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// The process's `RLIMIT_MEMLOCK` soft limit, for people (`unlimited`, `8.0 MiB`), and whether
/// it binds: a process with `CAP_IPC_LOCK` (root, usually) may lock past it.
pub fn memlock_limit() -> String {
    let limit = match rustix::process::getrlimit(rustix::process::Resource::Memlock).current {
        None => "unlimited".into(),
        Some(b) => bytes(b),
    };
    // CAP_IPC_LOCK is capability 14 (linux/capability.h).
    let ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 14) != 0);
    if ipc_lock {
        format!("{limit}, not binding (CAP_IPC_LOCK)")
    } else {
        limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sleep is a voluntary switch; sharing one CPU with a busy thread is, sooner or later,
    /// an involuntary one; a call with neither ran throughout.
    #[test]
    fn thread_switches_tell_a_sleep_from_a_preemption() {
        let a = ThreadSwitches::now();
        assert_eq!(a.until(a), Switch::Ran);
        std::thread::sleep(Duration::from_millis(2));
        let b = ThreadSwitches::now();
        assert!(b.voluntary > a.voluntary, "{a:?} {b:?}");
        if b.involuntary == a.involuntary {
            assert_eq!(a.until(b), Switch::Slept);
        }
        let later = ThreadSwitches {
            voluntary: b.voluntary + 1,
            involuntary: b.involuntary + 1,
        };
        assert_eq!(
            b.until(later),
            Switch::Preempted,
            "a preemption counts first"
        );
        // This thread and a spinning one kept on the same CPU: the scheduler takes turns.
        let cpu = crate::team::allowed_cpus()[0];
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                crate::team::pin_to(cpu);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
            crate::team::pin_to(cpu);
            let start = ThreadSwitches::now();
            let deadline = Instant::now() + Duration::from_secs(30);
            while ThreadSwitches::now().involuntary == start.involuntary
                && Instant::now() < deadline
            {
                spin(Duration::from_millis(1));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(start.until(ThreadSwitches::now()), Switch::Preempted);
        });
    }

    #[test]
    fn touch_floors_merged_keep_each_variants_least() {
        let a = TouchFloor {
            own_ns: 10.0,
            other_ns: 30.0,
            other_streaming_ns: 50.0,
        };
        let b = TouchFloor {
            own_ns: 20.0,
            other_ns: 25.0,
            other_streaming_ns: 8.0,
        };
        let m = a.merged(&b);
        assert_eq!(
            (m.own_ns, m.other_ns, m.other_streaming_ns),
            (10.0, 25.0, 8.0)
        );
        assert_eq!(m.min_ns(), 8.0);
        assert_eq!(b.merged(&a).min_ns(), 8.0);
    }

    #[test]
    fn measurements_merged_keep_each_methods_best_and_name_the_new_winner() {
        let m = |method, single, all| MethodBandwidth {
            method,
            single,
            all,
        };
        // A first reading at a noisy moment, then a second one: each method's best of both.
        let first = Bandwidth::best_of([
            m("memset", 10.0, 30.0),
            m("streaming", 8.0, 20.0),
            m("rep stosb", 12.0, 25.0),
        ]);
        assert_eq!(
            (first.single_method, first.all_method),
            ("rep stosb", "memset")
        );
        let again = Bandwidth::best_of([
            m("memset", 11.0, 20.0),
            m("streaming", 9.0, 40.0),
            m("rep stosb", 5.0, 5.0),
        ]);
        let both = first.merged(&again);
        assert_eq!(
            both.methods.map(|m| (m.single, m.all)),
            [(11.0, 30.0), (9.0, 40.0), (12.0, 25.0)]
        );
        assert_eq!((both.single, both.single_method), (12.0, "rep stosb"));
        assert_eq!((both.all, both.all_method), (40.0, "streaming"));
        // The limit only falls: 1 MB at 40 bytes/s all threads.
        assert!(both.limit_ns(1_000_000) < first.limit_ns(1_000_000));
        assert_eq!(both.limit_ns(40), 1e9);
    }

    #[test]
    fn every_round_of_a_measurement_is_kept_at_its_best() {
        // Real zeroing, briefly: each method measured (nothing left at zero), the winners named
        // among them, the all-thread figure never below the one-thread one.
        let b = bandwidth(64 << 10, Duration::from_millis(2), 2);
        for m in &b.methods {
            assert!(m.single > 0.0 && m.all >= m.single, "{m:?}");
        }
        assert!(
            b.methods
                .iter()
                .all(|m| m.single <= b.single && m.all <= b.all)
        );
        assert!(
            b.methods
                .iter()
                .any(|m| m.method == b.single_method && m.single == b.single)
        );
    }

    #[test]
    fn range_pages_sum_the_overlapping_mappings_only() {
        let smaps = "\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Rss:                2048 kB
AnonHugePages:      2048 kB
Locked:             2048 kB
7f0000200000-7f0000400000 rw-p 00000000 00:00 0
Rss:                   8 kB
AnonHugePages:         0 kB
7f1000000000-7f1000200000 rw-s 00000000 00:0f 11 /memfd:x (deleted)
Rss:                2048 kB
ShmemPmdMapped:     2048 kB
";
        let numa = "\
7f0000000000 bind:0 anon=512 dirty=512 N0=1 kernelpagesize_kB=2048
7f0000200000 default anon=2 N0=2 kernelpagesize_kB=4
7f1000000000 default file=/memfd:x N0=512 kernelpagesize_kB=4
";
        let r = parse_range_pages(0x7f00_0000_0000, 2 << 20, smaps, numa);
        assert_eq!(r.span, 2 << 20);
        assert_eq!((r.rss, r.anon_huge, r.locked), (2 << 20, 2 << 20, 2 << 20));
        assert_eq!(r.huge(), 2 << 20);
        assert_eq!(r.nodes, [(0, 2 << 20)]);
        assert_eq!(r.policies, ["bind:0"]);
        let both = parse_range_pages(0x7f00_0010_0000, 2 << 20, smaps, numa);
        assert_eq!(both.span, 4 << 20, "both mappings overlap");
        assert!(both.describe(2 << 20).contains("wider than"));
        let shm = parse_range_pages(0x7f10_0000_0000, 4096, smaps, numa);
        assert_eq!((shm.shmem_pmd, shm.anon_huge), (2 << 20, 0));
        assert_eq!(bytes(4096), "4 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
