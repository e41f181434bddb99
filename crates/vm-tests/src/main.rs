//! `vm-tests`: pagepool's tests that need a real kernel with the dma-buf system heap, udmabuf,
//! real memory pressure, two NUMA nodes and reserved hugetlbfs pages. `vm/run` boots Debian's
//! kernel under QEMU with this program as the workload. It runs on any machine, but on one
//! without `/dev/dma_heap/system`, `/dev/udmabuf`, a NUMA node 1 and free 2 MiB huge pages
//! those cases fail: that is the point. The pool-type cases are in `pool_types.rs`.
//!
//! Output: `ok <case> ...` or `FAIL <case>: <why>` per case, then `N passed, M failed`; the exit
//! status is non-zero if any case failed. `vm-tests hog <MiB> [cgroup]` and `vm-tests hold <fd> <len>
//! <byte>` are the helper processes some cases start.

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagepool::dmabuf::{Access, CpuAccess, DmaBuf, DmaBufError, DmaHeap, file_count};
use pagepool::dmapool::DmaBufPool;
use pagepool::{PoolType, SystemHeap, pressure::PressureConfig, registry::Registry};

mod pool_types;

type Result<T = String> = std::result::Result<T, String>;

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond { Ok(()) } else { Err(what()) }
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// Every byte of a mapped dma-buf, copied out.
fn contents(cpu: &CpuAccess<'_, '_>) -> Result<Vec<u8>> {
    let mut v = vec![0; cpu.len()];
    cpu.read(0, &mut v).map_err(e)?;
    Ok(v)
}

/// The descriptor is close-on-exec, as every descriptor pagepool makes.
fn check_cloexec(fd: impl AsFd) -> Result<()> {
    let flags = rustix::io::fcntl_getfd(fd).map_err(e)?;
    check(flags.contains(rustix::io::FdFlags::CLOEXEC), || {
        "descriptor not close-on-exec".into()
    })
}

/// The kernel selftest's first case: allocate and map 1 MiB.
fn dmabuf_alloc_and_map_1m() -> Result {
    let heap = DmaHeap::open("system").map_err(e)?;
    let buf = heap.alloc(1 << 20).map_err(e)?;
    check(buf.len() == 1 << 20, || format!("len {}", buf.len()))?;
    check_cloexec(&buf)?;
    let mut map = buf.map().map_err(e)?;
    let mut cpu = map.access(Access::ReadWrite).map_err(e)?;
    cpu.fill(0x42);
    check(contents(&cpu)?.iter().all(|&b| b == 0x42), || {
        "write/read back".into()
    })?;
    cpu.write(4093, &[1, 2, 3, 4, 5, 6]).map_err(e)?;
    let mut back = [0; 8];
    cpu.read(4092, &mut back).map_err(e)?;
    check(back == [0x42, 1, 2, 3, 4, 5, 6, 0x42], || {
        format!("unaligned write/read back: {back:?}")
    })?;
    check(
        matches!(
            cpu.read((1 << 20) - 4, &mut back),
            Err(DmaBufError::OutOfRange { .. })
        ),
        || "read past the end".into(),
    )?;
    Ok(format!("heaps {:?}", DmaHeap::list()))
}

/// The kernel selftest's zeroing case: dirty buffers freed, new ones all-zero.
fn dmabuf_zeroed_after_dirty_free(size: usize) -> Result {
    let heap = DmaHeap::open("system").map_err(e)?;
    let dirty: Vec<DmaBuf> = (0..32)
        .map(|_| heap.alloc(size))
        .collect::<std::result::Result<_, _>>()
        .map_err(e)?;
    for b in &dirty {
        b.map()
            .map_err(e)?
            .access(Access::Write)
            .map_err(e)?
            .fill(0xff);
    }
    drop(dirty);
    for i in 0..32 {
        let b = heap.alloc(size).map_err(e)?;
        let mut map = b.map().map_err(e)?;
        let cpu = map.access(Access::Read).map_err(e)?;
        check(contents(&cpu)?.iter().all(|&x| x == 0), || {
            format!("buffer {i} not zeroed")
        })?;
    }
    Ok(String::new())
}

/// The kernel selftest's error cases, through the project's API.
fn dmabuf_invalid_flags_and_lengths() -> Result {
    let heap = DmaHeap::open("system").map_err(e)?;
    let rw = (rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC).bits();
    // Close-on-exec even when not asked for.
    let without = heap
        .alloc_with_flags(4096, rustix::fs::OFlags::RDWR.bits(), 0)
        .map_err(e)?;
    check_cloexec(&without)?;
    check(heap.alloc_with_flags(4096, rw | 0x4, 0).is_err(), || {
        "bad fd flags accepted".into()
    })?;
    check(heap.alloc_with_flags(4096, rw, 1).is_err(), || {
        "bad heap flags accepted".into()
    })?;
    check(
        matches!(heap.alloc(0), Err(DmaBufError::ZeroLength)),
        || "zero length".into(),
    )?;
    check(
        matches!(
            DmaHeap::open("no-such-heap"),
            Err(DmaBufError::NoHeap { .. })
        ),
        || "missing heap".into(),
    )?;
    check(
        matches!(DmaHeap::open("../system"), Err(DmaBufError::InvalidName(_))),
        || "bad name".into(),
    )?;
    Ok(String::new())
}

fn fill_dmabuf(b: &DmaBuf, byte: u8) -> Result<()> {
    b.map()
        .map_err(e)?
        .access(Access::Write)
        .map_err(e)?
        .fill(byte);
    Ok(())
}

fn all_bytes(b: &DmaBuf, byte: u8) -> Result<bool> {
    let mut map = b.map().map_err(e)?;
    let cpu = map.access(Access::Read).map_err(e)?;
    Ok(contents(&cpu)?.iter().all(|&x| x == byte))
}

/// A pool of the system heap's dma-bufs, on a registry of its own.
fn system_pool() -> Result<DmaBufPool> {
    let heap = DmaHeap::open("system").map_err(e)?;
    DmaBufPool::new(heap, &Registry::new(usize::MAX), 64 << 20).map_err(e)
}

/// A pooled dma-buf comes back zeroed, from the pool.
fn dmapool_recycles_zeroed() -> Result {
    let pool = system_pool()?;
    let b = pool.alloc(1 << 20).map_err(e)?;
    fill_dmabuf(&b, 0xab)?;
    drop(b);
    pool.flush();
    let again = pool.alloc(1 << 20).map_err(e)?;
    check(all_bytes(&again, 0)?, || {
        "recycled buffer not zeroed".into()
    })?;
    let st = pool.stats();
    check(st.hits == 1 && st.misses == 1 && st.zeroed == 1, || {
        format!("{st:?}")
    })?;
    Ok(format!("{st:?}"))
}

/// Released dma-bufs go through the deferred-free helper: bounded by the pool's limit (a
/// release past it is closed at once, counted as refused), and under memory pressure the
/// queue's shrinker closes queued buffers unzeroed.
fn dmapool_queue_is_bounded_and_shrinks() -> Result {
    let page = pagepool::page_size();
    let registry = Registry::new(usize::MAX);
    let heap = DmaHeap::open("system").map_err(e)?;
    let pool = DmaBufPool::new(heap, &registry, 2 << 20).map_err(e)?;
    // A 4 MiB buffer cannot be pooled under a 2 MiB limit: its release is refused and closed.
    drop(pool.alloc(4 << 20).map_err(e)?);
    pool.flush();
    let st = pool.stats();
    check(st.refused == 1 && st.pooled == 0 && st.zeroed == 0, || {
        format!("past the bound: {st:?}")
    })?;
    // A buffer of exactly the bound fits: zeroed and pooled by the worker. One buffer, released
    // while the worker sleeps, which is never late: a second release would race with the
    // worker's handling of the first, and under TCG each of its steps (mapping, each 256 KiB
    // piece) takes milliseconds, which the busy-machine rule reads as a worker kept off its
    // core: that release would be closed, as on a busy machine (docs/DESIGN.md, The VM).
    let a = pool.alloc(2 << 20).map_err(e)?;
    drop(a);
    pool.flush();
    let st = pool.stats();
    check(
        st.pooled == 1 && st.zeroed == 1 && st.refused == 1 && st.queued_pages == 0,
        || format!("within the bound: {st:?}"),
    )?;
    // The registry's shrinkers (what the pressure monitor runs) reach the pool.
    let freed = registry.shrink_all(usize::MAX);
    let st = pool.stats();
    check(st.pooled == 0 && freed >= (2 << 20) / page, || {
        format!("after shrink_all({freed}): {st:?}")
    })?;
    Ok(format!(
        "refused past the bound, then pooled and shrunk: {st:?}"
    ))
}

/// A dma-buf pool is one of its registry's pools like any other: the registry's maximum and
/// its shrink reach its buffers, and its pages do not push the other owners' pools out alone.
fn dmapool_shrinks_like_any_owner() -> Result {
    let page = pagepool::page_size();
    let registry = Registry::new((8 << 20) / page);
    let heap = DmaHeap::open("system").map_err(e)?;
    let pool = DmaBufPool::new(heap, &registry, 64 << 20).map_err(e)?;
    // Six pooled dma-bufs, reserved: released ones would go through the worker, and under TCG
    // a release that comes while it handles another is often closed by the busy-machine rule
    // (see `dmapool_queue_is_bounded_and_shrinks`; 1 run in 5 pooled only five).
    let reserved = pool.reserve(1 << 20, 6).map_err(e)?;
    let pooled = pool.stats().pooled;
    check(
        reserved == 6 && pooled == 6 && registry.count() == (6 << 20) / page,
        || {
            format!(
                "six pooled dma-bufs counted: {:?}, registry {}",
                pool.stats(),
                registry.count()
            )
        },
    )?;
    // A heap on the same registry pools 4 MiB: 10 MiB against a maximum of 8.
    let sys = pagepool::SystemHeap::builder()
        .name("beside-dmabufs")
        .registry(registry.clone())
        .deferred(false)
        .pressure(None)
        .build()
        .map_err(e)?;
    drop(sys.alloc(4 << 20).map_err(e)?);
    let (st, hs) = (pool.stats(), sys.stats());
    check(registry.count() * page <= 8 << 20, || {
        format!("over the maximum: {} pages", registry.count())
    })?;
    check(st.released > 0 && st.pooled < 6, || {
        format!("the dma-buf pool gave nothing back: {st:?}; heap {hs}")
    })?;
    check(hs.pooled_pages() > 0, || {
        format!("the heap's pools alone were emptied: {hs}")
    })?;
    // The registry's shrink (what the pressure monitor runs) reaches the dma-bufs too.
    let freed = registry.shrink_all(usize::MAX);
    let after = pool.stats();
    check(after.pooled == 0 && registry.count() == 0, || {
        format!(
            "after shrink_all({freed}): {after:?}, registry {}",
            registry.count()
        )
    })?;
    Ok(format!(
        "max 8 MiB: dma-bufs {} -> {} pooled, heap {} pages pooled; shrink_all freed {freed} pages",
        pooled,
        st.pooled,
        hs.pooled_pages()
    ))
}

/// A dma-buf another process holds is never recycled while it holds it.
fn dmapool_never_recycles_a_held_buffer() -> Result {
    let pool = system_pool()?;
    let b = pool.alloc(1 << 20).map_err(e)?;
    fill_dmabuf(&b, 0x5a)?;
    // Hand a descriptor to a second process (inherited: no close-on-exec).
    let inherit: OwnedFd = rustix::io::dup(b.as_fd()).map_err(e)?;
    let mut child = Command::new(std::env::current_exe().map_err(e)?)
        .args([
            "hold",
            &inherit.as_raw_fd().to_string(),
            &(1usize << 20).to_string(),
            "90",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(e)?;
    drop(inherit);
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).map_err(e)?;
    check(line.trim() == "ready", || format!("child said {line:?}"))?;
    check(file_count(b.as_fd()).map_err(e)? >= 2, || {
        "child holds no reference".into()
    })?;
    drop(b); // the child still holds it
    pool.flush();
    let st = pool.stats();
    check(st.held == 1 && st.zeroed == 0, || {
        format!("not parked: {st:?}")
    })?;
    let other = pool.alloc(1 << 20).map_err(e)?;
    check(pool.stats().misses == 2, || {
        "the held buffer was handed out".into()
    })?;
    fill_dmabuf(&other, 0x11)?;
    // The child checks its buffer is untouched (0x5a = 90), then exits.
    writeln!(child.stdin.as_mut().unwrap(), "check").map_err(e)?;
    let status = child.wait().map_err(e)?;
    check(status.success(), || {
        format!("child saw its buffer change: {status}")
    })?;
    // Now the pool's descriptor is the last reference: it is recycled.
    let t = Instant::now();
    while pool.stats().zeroed == 0 {
        check(t.elapsed() < Duration::from_secs(5), || {
            "never recycled after release".into()
        })?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = pool.stats();
    check(st.held == 0 && st.pooled == 1, || format!("{st:?}"))?;
    Ok(format!(
        "recycled {:?} after the holder exited",
        t.elapsed()
    ))
}

/// The `hold` helper: maps the dma-buf it inherited, says "ready", waits for a line, and
/// exits 0 if every byte is still `byte`.
fn hold(fd: i32, len: usize, byte: u8) -> i32 {
    // SAFETY: the parent passed us this descriptor number, open in our table.
    let buf = DmaBuf::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    let Ok(buf) = buf else { return 3 };
    if buf.len() != len {
        return 4;
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    match all_bytes(&buf, byte) {
        Ok(true) => 0,
        _ => 1,
    }
}

/// The dma-buf descriptors this process holds (`/proc/self/fd` links to `/dmabuf:`).
fn dmabuf_fds() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return usize::MAX;
    };
    dir.filter_map(|d| std::fs::read_link(d.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("dmabuf"))
        .count()
}

/// After fork, the child has none of the pool's own descriptors (only the user's), starts with
/// an empty pool that works, and the parent's pool is unchanged.
fn dmapool_after_fork() -> Result {
    let pool = system_pool()?;
    let a = pool.alloc(1 << 20).map_err(e)?;
    fill_dmabuf(&a, 0x21)?;
    drop(a);
    pool.flush(); // pooled, clean: the pool's own descriptor
    let b = pool.alloc(2 << 20).map_err(e)?; // the user's descriptor
    fill_dmabuf(&b, 0x42)?;
    let before = pool.stats();
    let fds = dmabuf_fds();
    check(before.pooled == 1 && fds == 2, || {
        format!("before the fork: {before:?}, {fds} dma-buf descriptors")
    })?;
    // SAFETY: the child runs only the closure below, then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = (|| {
            if dmabuf_fds() != 1 {
                return 10; // the pooled buffer's descriptor was inherited
            }
            let st = pool.stats();
            if st.pooled != 0 || st.hits != 0 || st.misses != 0 {
                return 11;
            }
            let Ok(c) = pool.alloc(1 << 20) else {
                return 12;
            };
            if !all_bytes(&c, 0).unwrap_or(false) || fill_dmabuf(&c, 0x77).is_err() {
                return 13;
            }
            drop(c);
            pool.flush();
            let st = pool.stats();
            if st.zeroed != 1 || st.pooled != 1 {
                return 14;
            }
            drop(b); // the child's copy of the user's descriptor only
            0
        })();
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child.
    check(unsafe { libc::waitpid(pid, &mut status, 0) } == pid, || {
        "waitpid".into()
    })?;
    check(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        || format!("child status {status:#x}"),
    )?;
    let after = pool.stats();
    check(after == before, || {
        format!("parent's pool changed: {after:?}")
    })?;
    check(all_bytes(&b, 0x42)?, || "the user's buffer changed".into())?;
    let again = pool.alloc(1 << 20).map_err(e)?;
    check(all_bytes(&again, 0)?, || "pooled buffer not clean".into())?;
    check(pool.stats().hits == before.hits + 1, || {
        "not from the pool".into()
    })?;
    Ok(format!("{after:?}"))
}

fn heap(name: &str) -> Result<SystemHeap> {
    SystemHeap::builder()
        .name(name)
        .registry(Registry::new(usize::MAX))
        .pressure(None)
        .build()
        .map_err(e)
}

/// System-heap buffers exported as real dma-bufs through /dev/udmabuf share their memory, and
/// are not reused while the dma-buf lives.
fn udmabuf_export_shares_and_pins() -> Result {
    let heap = heap("export")?;
    let len = (1 << 20) + (64 << 10) + 3 * 4096;
    let mut b = heap.alloc(len).map_err(e)?;
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    let mut x = b.export().map_err(e)?;
    check_cloexec(x.dmabuf())?;
    check(x.dmabuf().len() == x.len(), || {
        format!("dma-buf len {} vs {}", x.dmabuf().len(), x.len())
    })?;
    {
        let mut map = x.dmabuf().map().map_err(e)?;
        let mut cpu = map.access(Access::ReadWrite).map_err(e)?;
        check(
            contents(&cpu)?
                .iter()
                .enumerate()
                .all(|(i, &x)| x == (i % 251) as u8),
            || "contents differ".into(),
        )?;
        cpu.write(10, &[0xee]).map_err(e)?;
    }
    let mut byte = [0];
    x.read(10, &mut byte).map_err(e)?;
    check(byte[0] == 0xee, || {
        "write through the dma-buf not seen".into()
    })?;
    x.write(12, &[0xdd]).map_err(e)?;
    // Drop the exported buffer while another descriptor of the dma-buf lives: its pages must
    // not be reused.
    let d = x.dmabuf().try_clone().map_err(e)?;
    check_cloexec(&d)?;
    drop(x);
    heap.flush();
    let st = heap.stats();
    check(st.exports_held_at_release == 1, || format!("{st}"))?;
    let reused = heap.alloc(len).map_err(e)?;
    check(reused.iter().all(|&x| x == 0), || {
        "new buffer not zeroed".into()
    })?;
    let mut map = d.map().map_err(e)?;
    let cpu = map.access(Access::Read).map_err(e)?;
    let mut head = [0; 3];
    cpu.read(10, &mut head).map_err(e)?;
    check(head == [0xee, 11, 0xdd], || {
        format!("the dma-buf's memory changed after release: {head:?}")
    })?;
    Ok(String::new())
}

/// A remapped (non-contiguous) buffer exports too; once its dma-buf is closed, the buffer is
/// recycled normally.
fn udmabuf_export_of_a_remapped_buffer() -> Result {
    let heap = heap("export2")?;
    let a = heap.alloc(4096).map_err(e)?;
    let gap = heap.alloc(4096).map_err(e)?;
    let c = heap.alloc(4096).map_err(e)?;
    drop(a);
    drop(c);
    heap.flush();
    let mut both = heap.alloc(8192).map_err(e)?;
    check(both.is_remapped(), || "expected a remapped buffer".into())?;
    both[0] = 1;
    both[4096] = 2;
    let x = both.export().map_err(e)?;
    {
        let mut map = x.dmabuf().map().map_err(e)?;
        let cpu = map.access(Access::Read).map_err(e)?;
        let (mut first, mut second) = ([0], [0]);
        cpu.read(0, &mut first).map_err(e)?;
        cpu.read(4096, &mut second).map_err(e)?;
        check(first == [1] && second == [2], || {
            "order of blocks in the dma-buf".into()
        })?;
    }
    // Its descriptor is the last reference (the mapping is gone): the buffer may be recycled.
    check(file_count(x.dmabuf().as_fd()).map_err(e)? == 1, || {
        "the dma-buf is still held".into()
    })?;
    drop(x);
    drop(gap);
    heap.flush();
    let st = heap.stats();
    check(st.exported == 1 && st.exports_held_at_release == 0, || {
        format!("{st}")
    })?;
    check(st.pooled_pages() == 3, || format!("{st}"))?;
    Ok(String::new())
}

fn write_file(path: &str, s: &str) -> Result<()> {
    std::fs::write(path, s).map_err(|err| format!("{path}: {err}"))
}

/// Real memory pressure: a cgroup with a memory limit, pools full, a memory hog growing in a
/// second process. The pressure monitor must give pooled memory back before the OOM killer
/// acts.
fn pressure_releases_before_oom() -> Result {
    const CG: &str = "/sys/fs/cgroup/pagepool";
    let limit: u64 = 384 << 20;
    let _ = std::fs::create_dir(CG);
    write_file("/sys/fs/cgroup/cgroup.subtree_control", "+memory")?;
    write_file(&format!("{CG}/memory.max"), &limit.to_string())?;
    write_file(
        &format!("{CG}/cgroup.procs"),
        &std::process::id().to_string(),
    )?;
    let registry = Registry::new(usize::MAX);
    let heap = SystemHeap::builder()
        .name("pressure")
        .registry(registry.clone())
        .pool_limit(256 << 20)
        .pressure(Some(PressureConfig {
            psi: true,
            stall_us: 50_000,
            window_us: 1_000_000,
            watermark: Some(0.75),
            interval: Duration::from_millis(100),
            share: 0.5,
        }))
        .build()
        .map_err(e)?;
    let ps = registry.pressure_stats().ok_or("no pressure monitor")?;
    // Fill the pools with 160 MiB.
    let bufs: Vec<_> = (0..40)
        .map(|_| heap.alloc(4 << 20))
        .collect::<std::result::Result<_, _>>()
        .map_err(e)?;
    drop(bufs);
    heap.flush();
    let pooled_before = heap.stats().pooled_pages();
    check(pooled_before * 4096 >= 150 << 20, || {
        format!("pools hold only {pooled_before} pages")
    })?;
    // The hog wants 280 MiB: with the pools full the cgroup would need ~440 MiB.
    let hog_mib = 280;
    let t = Instant::now();
    let status = Command::new(std::env::current_exe().map_err(e)?)
        .args(["hog", &hog_mib.to_string()])
        .status()
        .map_err(e)?;
    let took = t.elapsed();
    let events = std::fs::read_to_string(format!("{CG}/memory.events")).unwrap_or_default();
    let oom_kills: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let p = registry.pressure_stats().unwrap_or_default();
    let st = heap.stats();
    let mut report = format!(
        "source {:?} + watermark {:?}; hog {hog_mib} MiB done in {took:.2?}, exit {status}; oom_kill {oom_kills}; \
         pooled {} -> {} pages; {} events:",
        ps.source,
        ps.watermark,
        pooled_before,
        st.pooled_pages(),
        p.events
    );
    report.push_str(&recent_events(&p));
    hog_finished(status, oom_kills, &report)?;
    check(p.events > 0 && p.pages_released > 0, || {
        format!("no pressure response: {report}")
    })?;
    Ok(report)
}

/// The private pools (the allocator layer) under machine-wide memory pressure: this process in
/// the root cgroup, where no memory limit applies (the cgroup watermark has nothing to watch),
/// the pools holding most of what the registry allows, swap on (the VM's zram device: without
/// swap nothing can be reclaimed, no task stalls, and the OOM killer acts first), and a hog in
/// a cgroup of its own growing past what the machine has free. Only the machine's PSI (the
/// root cgroup's `memory.pressure`, which is `/proc/pressure/memory`) can see it: the monitor
/// the pools start by default must give their blocks back.
fn private_pools_release_under_machine_wide_pressure() -> Result {
    let swap = |on: bool| {
        Command::new("/bin/busybox")
            .args([if on { "swapon" } else { "swapoff" }, "/dev/zram0"])
            .status()
            .map_err(e)
            .and_then(|s| check(s.success(), || format!("swapon/swapoff /dev/zram0: {s}")))
    };
    swap(true)?;
    let r = machine_wide_pressure();
    swap(false)?;
    r
}

fn machine_wide_pressure() -> Result {
    use std::alloc::{GlobalAlloc, Layout};
    static POOLS: pagepool::alloc::PoolAlloc = pagepool::alloc::PoolAlloc::new();
    const HOG_CG: &str = "/sys/fs/cgroup/hog";
    let block = Layout::from_size_align(4 << 20, 4096).map_err(e)?;
    // As much as the registry's maximum (a quarter of the machine) lets the pools keep.
    let max = Registry::global()
        .stats()
        .max_pages
        .unwrap_or(usize::MAX / 4096);
    let want = max.saturating_mul(4096).min(192 << 20) / (4 << 20);
    let ptrs: Vec<*mut u8> = (0..want)
        // SAFETY: a non-zero layout.
        .map(|_| unsafe { POOLS.alloc_zeroed(block) })
        .collect();
    if ptrs.iter().any(|p| p.is_null()) {
        return Err("the pools refused a block".into());
    }
    for &p in &ptrs {
        // SAFETY: a live 4 MiB block; then released once, with its layout.
        unsafe {
            p.write_bytes(0x5a, 4 << 20);
            POOLS.dealloc(p, block);
        }
    }
    POOLS.flush();
    let pooled = |st: &pagepool::alloc::PrivateStats| {
        ((st.dirty_pages + st.clean_pages + st.queued_pages) * 4096) as u64
    };
    let before = POOLS.stats().ok_or("no pools")?;
    check(pooled(&before) >= (want * (4 << 20)) as u64 / 2, || {
        format!(
            "the pools keep only {} bytes of {want} blocks: {before:?}",
            pooled(&before)
        )
    })?;
    let ps = Registry::global()
        .pressure_stats()
        .ok_or("the pools started no pressure monitor")?;
    check(ps.watermark.is_none(), || {
        format!("a watermark in the root cgroup: {ps:?}")
    })?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(e)?;
    let avail_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no MemAvailable")?
        >> 10;
    // More than the machine has available, less than that plus what the pools hold.
    let hog_mib = avail_mib + (pooled(&before) >> 20) * 3 / 4;
    let _ = std::fs::create_dir(HOG_CG);
    let t = Instant::now();
    let status = Command::new(std::env::current_exe().map_err(e)?)
        .args(["hog", &hog_mib.to_string(), HOG_CG])
        .status()
        .map_err(e)?;
    let took = t.elapsed();
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let oom_kills = vmstat
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let p = Registry::global().pressure_stats().unwrap_or_default();
    let after = POOLS.stats().ok_or("no pools")?;
    let mut report = format!(
        "source {:?}, watermark {:?}; MemAvailable {avail_mib} MiB, hog {hog_mib} MiB done in \
         {took:.2?}, exit {status}; oom_kill {oom_kills}; pooled {} -> {} MiB; {} events:",
        ps.source,
        ps.watermark,
        pooled(&before) >> 20,
        pooled(&after) >> 20,
        p.events
    );
    report.push_str(&recent_events(&p));
    hog_finished(status, oom_kills, &report)?;
    check(p.events > 0 && pooled(&after) < pooled(&before), || {
        format!("no pressure response: {report}")
    })?;
    check(
        p.recent.iter().all(|ev| ev.source.starts_with("psi")),
        || format!("a signal other than PSI: {report}"),
    )?;
    Ok(report)
}

/// The monitor's recent events, one bracket each, timed from the first.
fn recent_events(p: &pagepool::stats::PressureStats) -> String {
    let start_ms = p.recent.first().map_or(0, |ev| ev.unix_ms);
    p.recent
        .iter()
        .map(|ev| {
            format!(
                " [+{} ms {} released {} pages in {} us]",
                ev.unix_ms - start_ms,
                ev.source,
                ev.pages_released,
                ev.micros
            )
        })
        .collect()
}

/// The hog finished, and the OOM killer never acted.
fn hog_finished(status: std::process::ExitStatus, oom_kills: u64, report: &str) -> Result<()> {
    check(status.success(), || {
        format!("the hog did not finish: {report}")
    })?;
    check(oom_kills == 0, || format!("the OOM killer acted: {report}"))
}

/// The `hog` helper: moves into `cgroup` if one is named, grows to `mib` MiB in 8 MiB steps,
/// touching every page, then exits 0.
fn hog(mib: usize, cgroup: Option<&str>) -> i32 {
    if let Some(cg) = cgroup
        && let Err(err) =
            std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())
    {
        eprintln!("hog: {cg}: {err}");
        return 2;
    }
    let mut chunks = Vec::new();
    for i in 0..mib / 8 {
        let mut chunk = vec![1u8; 8 << 20];
        // A different word in every page: no page is all one byte (which zram would keep
        // as nothing).
        for (page, p) in chunk.chunks_mut(4096).enumerate() {
            p[..8].copy_from_slice(&((i << 16) + page).to_le_bytes());
        }
        chunks.push(chunk);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::hint::black_box(&chunks);
    0
}

/// The heap's zeroing guarantee, in the VM's kernel too.
fn heap_zeroed_after_dirty_free() -> Result {
    let heap = heap("zero")?;
    for size in [4096, 1 << 20] {
        let bufs: Vec<_> = (0..32)
            .map(|_| heap.alloc(size))
            .collect::<std::result::Result<_, _>>()
            .map_err(e)?;
        let mut bufs = bufs;
        for b in &mut bufs {
            b.fill(0xff);
        }
        drop(bufs);
        for i in 0..32 {
            let b = heap.alloc(size).map_err(e)?;
            check(b.iter().all(|&x| x == 0), || {
                format!("{size}: buffer {i} dirty")
            })?;
        }
    }
    Ok(String::new())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("hog") => std::process::exit(hog(
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64),
            args.get(3).map(String::as_str),
        )),
        Some("hold") => {
            let n = |i: usize| {
                args.get(i)
                    .and_then(|s| s.parse::<usize>().ok())
                    .unwrap_or(0)
            };
            std::process::exit(hold(n(2) as i32, n(3), n(4) as u8));
        }
        _ => {}
    }
    type Case = (&'static str, fn() -> Result);
    let cases: [Case; 25] = [
        ("dmabuf_alloc_and_map_1m", dmabuf_alloc_and_map_1m),
        ("dmabuf_zeroed_after_dirty_free_4k", || {
            dmabuf_zeroed_after_dirty_free(4096)
        }),
        ("dmabuf_zeroed_after_dirty_free_1m", || {
            dmabuf_zeroed_after_dirty_free(1 << 20)
        }),
        (
            "dmabuf_invalid_flags_and_lengths",
            dmabuf_invalid_flags_and_lengths,
        ),
        ("dmapool_recycles_zeroed", dmapool_recycles_zeroed),
        (
            "dmapool_queue_is_bounded_and_shrinks",
            dmapool_queue_is_bounded_and_shrinks,
        ),
        (
            "dmapool_never_recycles_a_held_buffer",
            dmapool_never_recycles_a_held_buffer,
        ),
        (
            "udmabuf_export_shares_and_pins",
            udmabuf_export_shares_and_pins,
        ),
        (
            "udmabuf_export_of_a_remapped_buffer",
            udmabuf_export_of_a_remapped_buffer,
        ),
        ("heap_zeroed_after_dirty_free", heap_zeroed_after_dirty_free),
        ("dmapool_after_fork", dmapool_after_fork),
        (
            "dmapool_shrinks_like_any_owner",
            dmapool_shrinks_like_any_owner,
        ),
        (
            "dmapool_reserve_prefills_within_the_limit",
            pool_types::dmapool_reserve_prefills_within_the_limit,
        ),
        (
            "pool_type_node_places_pages_on_its_node",
            pool_types::node_places_pages_on_its_node,
        ),
        (
            "pool_type_node_without_memory_is_refused",
            pool_types::node_without_memory_is_refused,
        ),
        (
            "pool_type_huge_is_hugetlb_and_keeps_it_on_reuse",
            pool_types::huge_is_hugetlb_and_keeps_it_on_reuse,
        ),
        (
            "pool_type_huge_falls_back_when_hugetlb_runs_out",
            pool_types::huge_falls_back_when_hugetlb_runs_out,
        ),
        (
            "pool_type_huge_node1_takes_node1_huge_pages",
            pool_types::huge_node1_takes_node1_huge_pages,
        ),
        (
            "pool_type_locked_counts_in_vmlck_until_trim",
            pool_types::locked_counts_in_vmlck_until_trim,
        ),
        (
            "pool_type_locked_past_rlimit_memlock_fails_clearly",
            pool_types::locked_past_rlimit_memlock_fails_clearly,
        ),
        ("pool_type_after_fork_system", || {
            pool_types::after_fork(PoolType::SYSTEM)
        }),
        ("pool_type_after_fork_locked", || {
            pool_types::after_fork(PoolType::SYSTEM.locked())
        }),
        ("pool_type_after_fork_huge", || {
            pool_types::after_fork(PoolType::SYSTEM.huge())
        }),
        ("pool_type_after_fork_node1", || {
            pool_types::after_fork(PoolType::SYSTEM.node(1))
        }),
        ("pool_type_after_fork_locked+huge+node1", || {
            pool_types::after_fork(PoolType::SYSTEM.locked().huge().node(1))
        }),
    ];
    let only: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let (mut passed, mut failed) = (0, 0);
    let mut run = |name: &str, f: &dyn Fn() -> Result| {
        if !only.is_empty() && !only.contains(&name) {
            return;
        }
        let t = Instant::now();
        match f() {
            Ok(note) => {
                passed += 1;
                println!("ok {name} ({:.2?}) {note}", t.elapsed());
            }
            Err(why) => {
                failed += 1;
                println!("FAIL {name}: {why}");
            }
        }
    };
    for (name, f) in cases {
        run(name, &f);
    }
    // In the root cgroup, before the next case leaves it.
    run(
        "private_pools_release_under_machine_wide_pressure",
        &private_pools_release_under_machine_wide_pressure,
    );
    // Last: it moves this process into a memory-limited cgroup.
    run(
        "pressure_releases_before_oom",
        &pressure_releases_before_oom,
    );
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
