//! Pool types against a kernel that has what the host lacks: two NUMA nodes, reserved 2 MiB
//! hugetlbfs pages, `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`. Each attribute is checked twice:
//! through [`SystemHeap::backing`] and independently (`move_pages(2)`, `/proc/self/smaps`,
//! `VmLck`, the per-node free huge page counts), also in a forked child, and a
//! [`DmaBufPool`]'s `reserve` on the kernel's dma-buf heap.

use std::io::Read;

use pagepool::{
    AllocError, ConfigError, HugeBacking, PoolType, SystemHeap,
    dmabuf::{DmaBufError, DmaHeap},
    dmapool::DmaBufPool,
    registry::Registry,
};

use crate::{Result, check, e};

const HUGE: usize = 2 << 20;

/// A heap of pool type `ty` on a registry of its own, with no pressure monitor.
fn typed_heap(ty: PoolType) -> Result<SystemHeap> {
    typed_builder(ty).build().map_err(e)
}

fn typed_builder(ty: PoolType) -> pagepool::HeapBuilder {
    SystemHeap::builder()
        .name(&format!("vm-{ty}"))
        .pool_type(ty)
        .registry(Registry::new(usize::MAX))
        .pressure(None)
}

/// A field of `/proc/self/status` in bytes (`VmLck`).
fn status_bytes(field: &str) -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").map_err(e)?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no {field} in /proc/self/status"))
}

/// Free 2 MiB hugetlbfs pages: of the system, or of one node.
fn free_huge_pages(node: Option<u32>) -> u64 {
    let path = match node {
        None => "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages".to_owned(),
        Some(n) => {
            format!("/sys/devices/system/node/node{n}/hugepages/hugepages-2048kB/free_hugepages")
        }
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The NUMA node of every `step`-th byte's page of `buf` and of its last page, from
/// `move_pages(2)` with no target nodes: a query that moves nothing. A negative entry is the
/// error for that page (`-ENOENT`: not present).
fn page_nodes(buf: &[u8], step: usize) -> Result<Vec<i32>> {
    let mut pages: Vec<*const libc::c_void> = (0..buf.len())
        .step_by(step)
        .map(|off| buf[off..].as_ptr().cast())
        .collect();
    pages.push(buf[buf.len() - 1..].as_ptr().cast());
    let mut status = vec![i32::MIN; pages.len()];
    // SAFETY: with a null `nodes` argument move_pages only queries: it reads `pages.len()`
    // addresses from `pages` and writes as many ints to `status`, both that long, and changes
    // no mapping or contents. The addresses are pages of `buf`, borrowed for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len(),
            pages.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0,
        )
    };
    check(r == 0, || {
        format!("move_pages: {}", std::io::Error::last_os_error())
    })?;
    Ok(status)
}

/// Every sampled page of `buf` is on `node` (move_pages).
fn check_on_node(buf: &[u8], node: u32, step: usize) -> Result<usize> {
    let nodes = page_nodes(buf, step)?;
    check(nodes.iter().all(|&n| n == node as i32), || {
        format!("move_pages says the pages are on {nodes:?}, not all on node {node}")
    })?;
    Ok(nodes.len())
}

/// `/proc/self/smaps` over the mappings that overlap `buf`: the sum of `keys`, and the
/// mappings' `KernelPageSize`s in kB.
fn smaps_over(buf: &[u8], keys: &[&str]) -> Result<(u64, Vec<u64>)> {
    let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
    let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(e)?;
    let (mut sum, mut page_kb, mut inside) = (0, Vec::new(), false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            inside = a < end && b > start;
            continue;
        }
        let Some((key, rest)) = line.split_once(':').filter(|_| inside) else {
            continue;
        };
        let kb: u64 = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if keys.contains(&key) {
            sum += kb * 1024;
        } else if key == "KernelPageSize" {
            page_kb.push(kb);
        }
    }
    check(!page_kb.is_empty(), || {
        format!("no mapping at {start:#x} in smaps")
    })?;
    Ok((sum, page_kb))
}

/// `buf`'s pages are hugetlbfs pages, by smaps alone: the mappings holding it have 2 MiB
/// kernel pages and at least `buf.len()` bytes of hugetlb memory. The kernel counts a huge
/// page mapped once as `Private_Hugetlb` even in a shared mapping, and as `Shared_Hugetlb`
/// only when it is mapped more than once (a buffer's view beside the arena's home mapping),
/// so both count. Returns a description.
fn check_hugetlb_in_smaps(buf: &[u8]) -> Result {
    let (shared, page_kb) = smaps_over(buf, &["Shared_Hugetlb"])?;
    let (private, _) = smaps_over(buf, &["Private_Hugetlb"])?;
    check(page_kb.iter().all(|&k| k == 2048), || {
        format!("KernelPageSize {page_kb:?} kB, not 2048")
    })?;
    check(shared + private >= buf.len() as u64, || {
        format!(
            "smaps: Shared_Hugetlb {shared} + Private_Hugetlb {private} bytes over a buffer of {}",
            buf.len()
        )
    })?;
    Ok(format!(
        "smaps Shared_Hugetlb {} + Private_Hugetlb {} MiB",
        shared >> 20,
        private >> 20
    ))
}

/// `buf`, just allocated from `heap` while the process's `VmLck` was `vmlck_before`, carries
/// every attribute of the heap's pool type, checked independently of the heap's own report;
/// and the report agrees. Returns what was seen.
fn check_attributes(heap: &SystemHeap, buf: &[u8], vmlck_before: u64) -> Result {
    let ty = heap.stats().pool_type;
    let report = heap.backing().map_err(e)?;
    let mut seen = Vec::new();
    let hugetlb = ty.is_huge() && heap.stats().huge_backing == Some(HugeBacking::Hugetlb);
    if ty.is_huge() {
        check(hugetlb, || {
            format!(
                "backing {:?}, not hugetlb, with {} free huge pages",
                heap.stats().huge_backing,
                free_huge_pages(None)
            )
        })?;
        let smaps = check_hugetlb_in_smaps(buf)?;
        check(report.hugetlb_bytes >= buf.len() as u64, || {
            format!("backing report: {report}")
        })?;
        seen.push(format!("hugetlb ({smaps})"));
    }
    if ty.is_locked() {
        let lck = status_bytes("VmLck")?;
        if hugetlb {
            // The kernel neither marks hugetlbfs mappings locked nor counts them in VmLck
            // (mlock_fixup skips them; their pages are never swapped anyway).
            seen.push("locked (hugetlb: not in VmLck)".to_owned());
        } else {
            check(lck >= vmlck_before + buf.len() as u64, || {
                format!("VmLck {lck} after {vmlck_before} + {}", buf.len())
            })?;
            check(report.locked_bytes >= buf.len() as u64, || {
                format!("backing report: {report}")
            })?;
            seen.push(format!("VmLck +{} KiB", (lck - vmlck_before) >> 10));
        }
    }
    if let Some(node) = ty.node_id() {
        let step = if ty.is_huge() { HUGE } else { 64 << 10 };
        let n = check_on_node(buf, node, step)?;
        check(
            report.node_bytes.iter().all(|&(n, _)| n == node)
                && report.bound_to.iter().any(|&(n, _)| n == node),
            || format!("numa_maps: {report:?}"),
        )?;
        seen.push(format!("{n} sampled pages on node {node}"));
    }
    Ok(seen.join(", "))
}

/// A heap of `node(1)` places every page on node 1, and `node(0)` on node 0, by numa_maps
/// and by move_pages; reused pooled blocks stay on their node.
pub(crate) fn node_places_pages_on_its_node() -> Result {
    let mut out = Vec::new();
    for node in [1, 0] {
        let heap = typed_heap(PoolType::SYSTEM.node(node))?;
        let len = 8 << 20;
        let mut b = heap.alloc(len).map_err(e)?;
        let seen = check_attributes(&heap, &b, 0)?;
        let r = heap.backing().map_err(e)?;
        let on: u64 = r.node_bytes.iter().map(|&(_, b)| b).sum();
        check(on >= len as u64, || {
            format!("numa_maps counts {on} bytes: {r:?}")
        })?;
        b.fill(0x33);
        drop(b);
        heap.flush();
        let fresh = heap.stats().fresh_pages;
        let again = heap.alloc(len).map_err(e)?;
        let st = heap.stats();
        check(st.fresh_pages == fresh && st.hits > 0, || {
            format!("not reused: {st}")
        })?;
        check(again.iter().all(|&x| x == 0), || "reused dirty".into())?;
        check_on_node(&again, node, 64 << 10)?;
        out.push(format!("node{node}: {seen}, reused in place ({r})"));
    }
    Ok(out.join("; "))
}

/// A node without memory is refused when the heap is built.
pub(crate) fn node_without_memory_is_refused() -> Result {
    let Err(err) = typed_builder(PoolType::SYSTEM.node(7)).build() else {
        return Err("a heap bound to node 7 was built".into());
    };
    check(
        matches!(err, ConfigError::NoSuchNode { node: 7, ref available } if available == "0-1"),
        || format!("{err:?}"),
    )?;
    Ok(err.to_string())
}

/// A huge heap takes hugetlbfs pages (smaps and the free count say so), and its pooled blocks
/// keep them across reuse.
pub(crate) fn huge_is_hugetlb_and_keeps_it_on_reuse() -> Result {
    let free = free_huge_pages(None);
    check(free >= 8, || format!("only {free} free huge pages"))?;
    let heap = typed_heap(PoolType::SYSTEM.huge())?;
    let mut b = heap.alloc(5 << 20).map_err(e)?;
    check(
        b.len() == 6 << 20 && (b.as_ptr() as usize).is_multiple_of(HUGE),
        || format!("len {} at {:p}", b.len(), b.as_ptr()),
    )?;
    check(b.iter().all(|&x| x == 0), || "fresh not zeroed".into())?;
    let seen = check_attributes(&heap, &b, 0)?;
    let taken = free.saturating_sub(free_huge_pages(None));
    check(taken == 3, || format!("{taken} huge pages taken for 6 MiB"))?;
    b.fill(0xc3);
    drop(b);
    heap.flush();
    let fresh = heap.stats().fresh_pages;
    let again = heap.alloc(6 << 20).map_err(e)?;
    let st = heap.stats();
    check(st.fresh_pages == fresh && st.hits > 0, || {
        format!("not reused: {st}")
    })?;
    check(again.iter().all(|&x| x == 0), || "reused dirty".into())?;
    let smaps = check_hugetlb_in_smaps(&again)?;
    check(free.saturating_sub(free_huge_pages(None)) == 3, || {
        "reuse took more huge pages".into()
    })?;
    drop(again);
    drop(heap);
    check(free_huge_pages(None) == free, || {
        format!(
            "{} free huge pages after the heap's drop, {free} before",
            free_huge_pages(None)
        )
    })?;
    Ok(format!(
        "{free} free, 3 taken; {seen}; reused with no fresh pages, {smaps}"
    ))
}

/// Restores a sysfs setting when dropped.
struct Setting {
    path: &'static str,
    old: String,
}

impl Setting {
    /// Writes `value` to the sysfs file `path` (a bracketed choice: `always [never]`).
    fn set(path: &'static str, value: &str) -> Result<Setting> {
        let s = std::fs::read_to_string(path).map_err(|err| format!("{path}: {err}"))?;
        let old = s
            .split_once('[')
            .and_then(|(_, r)| r.split_once(']'))
            .map(|(v, _)| v.to_owned())
            .ok_or_else(|| format!("{path}: {s}"))?;
        crate::write_file(path, value)?;
        Ok(Setting { path, old })
    }
}

impl Drop for Setting {
    fn drop(&mut self) {
        if let Err(err) = crate::write_file(self.path, &self.old) {
            println!("warning: cannot restore {}: {err}", self.path);
        }
    }
}

/// With more 2 MiB buffers than free hugetlbfs pages, every allocation succeeds: the heap
/// falls back to shared-memory THP (`shmem_enabled` set to `advise` for this case), and gives
/// every huge page back at the end.
pub(crate) fn huge_falls_back_when_hugetlb_runs_out() -> Result {
    let _thp = Setting::set(
        "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
        "advise",
    )?;
    let free = free_huge_pages(None) as usize;
    check((1..=256).contains(&free), || {
        format!("{free} free huge pages")
    })?;
    let heap = typed_builder(PoolType::SYSTEM.huge())
        .arena_size(4 << 20)
        .build()
        .map_err(e)?;
    check(
        heap.stats().huge_backing == Some(HugeBacking::Hugetlb),
        || format!("starts with {:?}", heap.stats().huge_backing),
    )?;
    let bufs: Vec<_> = (0..free + 3)
        .map(|_| heap.alloc(HUGE))
        .collect::<std::result::Result<_, _>>()
        .map_err(e)?;
    check(
        bufs.iter().all(|b| b.iter().step_by(4096).all(|&x| x == 0)),
        || "a buffer not zeroed".into(),
    )?;
    let st = heap.stats();
    let r = heap.backing().map_err(e)?;
    let report = format!(
        "{free} free huge pages, {} buffers: now {:?}, {r}",
        free + 3,
        st.huge_backing
    );
    check(st.huge_backing == Some(HugeBacking::Thp), || {
        format!("no fallback to THP: {report}")
    })?;
    check(free_huge_pages(None) == 0, || {
        format!("{} huge pages left: {report}", free_huge_pages(None))
    })?;
    check(r.hugetlb_bytes == (free * HUGE) as u64, || report.clone())?;
    check(r.thp_bytes > 0, || format!("no THP mapped: {report}"))?;
    check(
        r.hugetlb_bytes + r.resident_bytes >= ((free + 3) * HUGE) as u64,
        || report.clone(),
    )?;
    drop(bufs);
    heap.flush();
    heap.trim();
    let after = heap.backing().map_err(e)?;
    check(after.mapped_bytes == 0, || format!("after trim: {after}"))?;
    check(free_huge_pages(None) == free as u64, || {
        format!("{} free huge pages after trim", free_huge_pages(None))
    })?;
    Ok(report)
}

/// huge+node(1) takes its huge pages from node 1's; when they run out, while node 0 still
/// has free ones, the heap falls back to the next backing and stays on node 1.
pub(crate) fn huge_node1_takes_node1_huge_pages() -> Result {
    let (free0, free1) = (free_huge_pages(Some(0)), free_huge_pages(Some(1)));
    check(free1 >= 4 && free0 >= 1, || {
        format!("free huge pages: node0 {free0}, node1 {free1}")
    })?;
    let heap = typed_heap(PoolType::SYSTEM.huge().node(1))?;
    let b = heap.alloc(4 << 20).map_err(e)?;
    let seen = check_attributes(&heap, &b, 0)?;
    let (now0, now1) = (free_huge_pages(Some(0)), free_huge_pages(Some(1)));
    check(now0 == free0 && free1.saturating_sub(now1) == 2, || {
        format!("free huge pages: node0 {free0} -> {now0}, node1 {free1} -> {now1}")
    })?;
    let r = heap.backing().map_err(e)?;
    check(r.node_bytes == [(1, 4 << 20)], || format!("{r:?}"))?;
    // One more 2 MiB buffer than node 1 has huge pages left.
    let more: Vec<_> = (0..now1 + 1)
        .map(|_| heap.alloc(HUGE))
        .collect::<std::result::Result<_, _>>()
        .map_err(e)?;
    let st = heap.stats();
    let r2 = heap.backing().map_err(e)?;
    let out = format!(
        "{free0}/{free1} free on node0/node1 -> {now1} on node1 after 4 MiB; {seen}; {} more buffers: {:?}, {r2}",
        more.len(),
        st.huge_backing
    );
    check(
        st.huge_backing != Some(HugeBacking::Hugetlb)
            && free_huge_pages(Some(1)) == 0
            && free_huge_pages(Some(0)) == free0,
        || format!("node 0's huge pages taken, or no fallback: {out}"),
    )?;
    for m in &more {
        check(m.iter().step_by(4096).all(|&x| x == 0), || {
            "a buffer not zeroed".into()
        })?;
        check_on_node(m, 1, 64 << 10)?;
    }
    check(r2.node_bytes.iter().all(|&(n, _)| n == 1), || out.clone())?;
    drop((b, more));
    drop(heap);
    check(free_huge_pages(Some(1)) == free1, || {
        format!(
            "node 1 has {} free huge pages after the drop",
            free_huge_pages(Some(1))
        )
    })?;
    Ok(out)
}

/// A locked heap's buffers count in `VmLck` when carved, stay counted while pooled, and stop
/// counting when trimmed.
pub(crate) fn locked_counts_in_vmlck_until_trim() -> Result {
    let base = status_bytes("VmLck")?;
    let heap = typed_heap(PoolType::SYSTEM.locked())?;
    let len = 6 << 20;
    let mut bufs = vec![
        heap.alloc(len / 2).map_err(e)?,
        heap.alloc(len / 2).map_err(e)?,
    ];
    check_attributes(&heap, &bufs[0], base)?;
    let live = status_bytes("VmLck")?;
    check(live == base + len as u64, || {
        format!("VmLck {live} with 6 MiB live, {base} before")
    })?;
    for b in &mut bufs {
        b.fill(0x5c);
    }
    drop(bufs);
    heap.flush();
    let pooled = status_bytes("VmLck")?;
    check(pooled == live, || {
        format!("VmLck {pooled} pooled, {live} live")
    })?;
    let again = heap.alloc(len).map_err(e)?;
    let st = heap.stats();
    check(st.fresh_pages == (len / 4096) as u64, || {
        format!("not reused: {st}")
    })?;
    check(again.iter().all(|&x| x == 0), || "reused dirty".into())?;
    check(status_bytes("VmLck")? == live, || {
        "reuse locked more".into()
    })?;
    drop(again);
    heap.flush();
    heap.trim();
    let trimmed = status_bytes("VmLck")?;
    check(trimmed == base, || {
        format!("VmLck {trimmed} after trim, {base} before")
    })?;
    Ok(format!(
        "VmLck {} -> {} KiB live, {} pooled, {} after trim",
        base >> 10,
        live >> 10,
        pooled >> 10,
        trimmed >> 10
    ))
}

/// How a forked child ended, and what it said.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exit(i32, String),
    Signal(i32),
}

/// Forks; the child runs `f` under a `secs` alarm, sends its message back through a pipe and
/// exits 0 when `f` returns `Ok`, 1 on `Err`, 2 on a panic. The parent waits.
fn in_child(secs: u32, f: impl FnOnce() -> Result) -> Result<End> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(e)?;
    // SAFETY: the child runs only `f` (a panic is caught), writes to the pipe and `_exit`s: it
    // never returns into the caller, whose state it shares a copy of.
    let pid = unsafe { libc::fork() };
    check(pid >= 0, || {
        format!("fork: {}", std::io::Error::last_os_error())
    })?;
    if pid == 0 {
        drop(r);
        // SAFETY: alarm has no preconditions; SIGALRM ends a child that hangs.
        unsafe { libc::alarm(secs) };
        let (code, msg) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Ok(msg)) => (0, msg),
            Ok(Err(msg)) => (1, msg),
            Err(_) => (2, "panicked".to_owned()),
        };
        let _ = rustix::io::write(&w, &msg.as_bytes()[..msg.len().min(4096)]);
        // SAFETY: _exit has no preconditions; the parent's exit handlers are not the child's.
        unsafe { libc::_exit(code) };
    }
    drop(w);
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    check(waited == pid, || "waitpid".into())?;
    let mut msg = Vec::new();
    std::fs::File::from(r).read_to_end(&mut msg).map_err(e)?;
    let msg = String::from_utf8_lossy(&msg).into_owned();
    Ok(if libc::WIFEXITED(status) {
        End::Exit(libc::WEXITSTATUS(status), msg)
    } else {
        End::Signal(libc::WTERMSIG(status))
    })
}

/// The fork behaviour for a pool type: in a forked child, a buffer inherited from the parent
/// faults when touched; the heap starts afresh there, and its fresh buffers are zeroed and
/// carry the type's attributes in the child; the parent's buffer, pool and counters are
/// untouched by the child.
pub(crate) fn after_fork(ty: PoolType) -> Result {
    let heap = typed_heap(ty)?;
    let len = 4 << 20;
    // A pooled buffer and a live one, with data, at fork time.
    let lck = status_bytes("VmLck")?;
    let mut b = heap.alloc(2 * len).map_err(e)?;
    let parent = check_attributes(&heap, &b, lck)?;
    b.fill(0xa5);
    let mut pooled = heap.alloc(len).map_err(e)?;
    pooled.fill(0xee);
    drop(pooled);
    heap.flush();
    let p = b.as_ptr() as usize;
    let before = heap.stats();
    let touched = in_child(60, || {
        // SAFETY: `p` is the start of a buffer the parent holds; in the child the range is an
        // inaccessible placeholder (MADV_DONTFORK, then `fork.rs`), so this volatile one-byte
        // read raises SIGSEGV and the child dies before any value exists. Were the protection
        // broken, the read would see the bytes of a shared mapping that stays valid for the
        // child's life: no reference to it is made, so nothing is aliased either way.
        let v = unsafe { std::ptr::read_volatile(p as *const u8) };
        Err(format!("read {v:#x} from the parent's buffer"))
    })?;
    check(touched == End::Signal(libc::SIGSEGV), || {
        format!("the inherited buffer: {touched:?}")
    })?;
    let child = in_child(120, || {
        let st = heap.stats();
        check(
            st.allocs == 0 && st.owner.pages == 0 && st.live_buffers == 0,
            || format!("inherited state: {st}"),
        )?;
        let lck = status_bytes("VmLck")?;
        let mut c = heap.alloc(len).map_err(e)?;
        check(c.iter().all(|&x| x == 0), || "not zeroed".into())?;
        let seen = check_attributes(&heap, &c, lck)?;
        c.fill(0x77);
        drop(c);
        heap.flush();
        let again = heap.alloc(len).map_err(e)?;
        check(again.iter().all(|&x| x == 0), || "reused dirty".into())?;
        check(heap.stats().hits > 0, || "the child's pool".into())?;
        Ok(seen)
    })?;
    let End::Exit(0, seen) = child else {
        return Err(format!("the child: {child:?}"));
    };
    check(b.iter().all(|&x| x == 0xa5), || {
        "the parent's buffer changed".into()
    })?;
    let after = heap.stats();
    check(
        after.allocs == before.allocs && after.fresh_pages == before.fresh_pages,
        || format!("the parent's counters changed: {after}"),
    )?;
    let again = heap.alloc(len).map_err(e)?;
    check(again.iter().all(|&x| x == 0), || {
        "the parent's pooled block is dirty".into()
    })?;
    check(heap.stats().fresh_pages == before.fresh_pages, || {
        "the parent's pool was emptied".into()
    })?;
    Ok(format!("parent: {parent}; child: {seen}"))
}

/// Without `CAP_IPC_LOCK` and with `RLIMIT_MEMLOCK` at 4 MiB (in a forked child: both are
/// the process's), a locked heap refuses what would pass the limit with
/// [`AllocError::MemlockLimit`], takes nothing, and still serves what fits; `reserve` past the
/// limit stops with the same error.
pub(crate) fn locked_past_rlimit_memlock_fails_clearly() -> Result {
    match in_child(120, memlock_child)? {
        End::Exit(0, msg) => Ok(msg),
        other => Err(format!("{other:?}")),
    }
}

fn memlock_child() -> Result {
    use rustix::process::{Resource, Rlimit, setrlimit};
    use rustix::thread::{CapabilitySet, capabilities, set_capabilities};
    let mut caps = capabilities(None).map_err(e)?;
    caps.effective.remove(CapabilitySet::IPC_LOCK);
    caps.permitted.remove(CapabilitySet::IPC_LOCK);
    set_capabilities(None, caps).map_err(|err| format!("capset: {err}"))?;
    let limit = 4u64 << 20;
    setrlimit(
        Resource::Memlock,
        Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        },
    )
    .map_err(e)?;
    let base = status_bytes("VmLck")?;
    let heap = typed_heap(PoolType::SYSTEM.locked())?;
    let err = match heap.alloc(8 << 20) {
        Ok(_) => return Err("8 MiB locked under a 4 MiB RLIMIT_MEMLOCK".into()),
        Err(err) => err,
    };
    check(
        matches!(err, AllocError::MemlockLimit { bytes, limit: Some(l) } if bytes == 8 << 20 && l == limit),
        || format!("{err:?}"),
    )?;
    let msg = err.to_string();
    check(msg.contains("RLIMIT_MEMLOCK"), || msg.clone())?;
    let st = heap.stats();
    check(
        st.fresh_pages == 0 && st.live_buffers == 0 && st.arenas == 0,
        || format!("left behind: {st}"),
    )?;
    check(status_bytes("VmLck")? == base, || {
        "memory stayed locked".into()
    })?;
    let b = heap.alloc(2 << 20).map_err(e)?;
    check(status_bytes("VmLck")? == base + (2 << 20), || {
        "what fits is locked".into()
    })?;
    let err = match heap.reserve(1 << 20, 4) {
        Ok(n) => return Err(format!("reserved {n} MiB past RLIMIT_MEMLOCK")),
        Err(err) => err,
    };
    check(matches!(err, AllocError::MemlockLimit { .. }), || {
        format!("reserve: {err:?}")
    })?;
    check(heap.stats().owner.pages == 512, || {
        format!("reserved before the limit: {}", heap.stats())
    })?;
    check(status_bytes("VmLck")? == base + (4 << 20), || {
        "locked up to the limit".into()
    })?;
    drop(b);
    heap.flush();
    heap.trim();
    check(status_bytes("VmLck")? == base, || {
        "locked after trim".into()
    })?;
    Ok(format!("refused: {msg}; reserve stopped at 2 of 4"))
}

/// `DmaBufPool::reserve` fills the pool with dma-bufs of the kernel heap, which the next
/// allocations take, within the pool's limit; a zero length is refused.
pub(crate) fn dmapool_reserve_prefills_within_the_limit() -> Result {
    let registry = Registry::new(usize::MAX);
    let heap = DmaHeap::open("system").map_err(e)?;
    let pool = DmaBufPool::new(heap, &registry, 8 << 20).map_err(e)?;
    let n = pool.reserve(1 << 20, 4).map_err(e)?;
    let st = pool.stats();
    check(
        n == 4 && st.pooled == 4 && st.pooled_bytes == 4 << 20,
        || format!("reserved {n}: {st:?}"),
    )?;
    let bufs: Vec<_> = (0..4)
        .map(|_| pool.alloc(1 << 20).map_err(e))
        .collect::<std::result::Result<_, _>>()?;
    check(crate::all_bytes(&bufs[3], 0)?, || "not zeroed".into())?;
    let st = pool.stats();
    check(st.hits == 4 && st.misses == 0 && st.pooled == 0, || {
        format!("after 4 allocations: {st:?}")
    })?;
    // The four live buffers do not count against the limit: the 8 MiB limit leaves room for
    // eight more, no more. (The four are not released first: under TCG a release that comes
    // while the worker handles another is often closed, see
    // `dmapool_queue_is_bounded_and_shrinks`.)
    let more = pool.reserve(1 << 20, 10).map_err(e)?;
    let st = pool.stats();
    check(more == 8 && st.pooled == 8, || {
        format!("reserved {more} up to the limit: {st:?}")
    })?;
    check(pool.reserve(1 << 20, 1).map_err(e)? == 0, || {
        "past the limit".into()
    })?;
    drop(bufs);
    check(
        matches!(pool.reserve(0, 1), Err(DmaBufError::ZeroLength)),
        || "zero length".into(),
    )?;
    Ok(format!("{st:?}"))
}
