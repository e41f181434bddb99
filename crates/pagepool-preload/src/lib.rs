//! `libpagepool_preload.so`: pagepool's private-memory pools for any Linux program, without a
//! rebuild (`LD_PRELOAD=.../libpagepool_preload.so program`, or `pagepool run -- program`).
//!
//! A hybrid: requests from the threshold (64 KiB by default) to the largest pooled size
//! (64 MiB) come from the pools of [`PoolAlloc`]; every other request, and every pointer
//! outside the pools' range, goes to glibc's own allocator through its exported `__libc_*`
//! functions (no `dlsym` on the allocation path, nothing recurses). One range check decides
//! where a `free` goes. The routing is [`pagepool::route::Router`], as for the C library.
//!
//! What makes it safe to preload into programs nobody here wrote:
//! - **Before it is ready**: calls made before its constructor ran (the dynamic loader, other
//!   libraries' constructors), during it (its settings, `dlsym`) and after a failure pass
//!   through to glibc; an atomic state says when the pools may be used.
//! - **No thread-local variable** on any allocation path (the pools run with
//!   [`PoolAlloc::thread_guard`] off: pagepool's own Rust code allocates through this
//!   library's `#[global_allocator]`, which calls glibc's `__libc_*` functions directly), so
//!   no `__tls_get_addr`, no TLS destructor, and a `free` after glibc's thread cleanup is as
//!   safe as any other.
//! - **Threads**: the pools' worker is started lazily (on the first pooled request) with the
//!   real `pthread_create`, under no lock of the allocator; a failed start means zeroing on the
//!   caller. A request of the thread making the pools meanwhile goes to glibc.
//! - **fork**: a child keeps every buffer copy-on-write and gets fresh pools of its own
//!   without a worker (it zeroes on its own time); nothing here holds a lock across `fork`.
//! - **`RTLD_DEEPBIND`**: `dlopen` is wrapped to clear the flag (a library bound deeply would
//!   call glibc's `free` on pointers of the pools); the wrapper jumps to glibc's `dlopen`
//!   with the caller's return address untouched, so `$ORIGIN` and `RUNPATH` lookups still see
//!   the real caller.
//! - **AddressSanitizer**: in a process where it runs, the drop-in steps aside (one line on
//!   stderr) and forwards every call to the next definition (AddressSanitizer's).
//! - **No panic reaches C**: every exported function is `extern "C"`, which aborts the process
//!   on unwinding.
//! - **Settings** are read once from `environ` directly (not `std::env`); a bad value prints
//!   one line naming the variable and the value, and the default is used:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `PAGEPOOL_THRESHOLD` | `64K` | smallest request served by the pools |
//! | `PAGEPOOL_LARGEST` | `64M` | largest request served by the pools |
//! | `PAGEPOOL_LIMIT` | `256M` | most memory each kind of pool (dirty, zeroed) keeps |
//! | `PAGEPOOL_STATS` | `0` | `1`: the statistics table on stderr at exit (of each process that used the pools) |
//! | `PAGEPOOL_WORKER` | `1` | `0`: no background worker (released blocks zeroed by the `calloc` that takes them) |
//! | `PAGEPOOL_PRESSURE` | `1` | `0`: no pressure monitor (PSI, cgroup watermark) |
//! | `PAGEPOOL_DISABLE` | `0` | `1`: every call goes to glibc |
//!
//! Sizes are bytes or a number with `K`, `M` or `G` (powers of 1024).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, Ordering};

use pagepool::alloc::PoolAlloc;
use pagepool::route::{Next, Router};

mod settings;

use settings::Settings;

unsafe extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
}

/// glibc's allocator as Rust's: this library's own allocations (pagepool's statistics, the
/// worker's state, thread start) never reach its exported `malloc`.
struct Glibc;

/// glibc's `malloc` alignment.
const MALLOC_ALIGN: usize = 16;

// SAFETY: every block comes from glibc's allocator with at least the layout's size and
// alignment (`__libc_malloc` aligns to 16, `__libc_memalign` to any power of two), and goes
// back to it with `__libc_free`; `__libc_calloc` memory is zero.
unsafe impl GlobalAlloc for Glibc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain calls of glibc's allocator.
        unsafe {
            if layout.align() <= MALLOC_ALIGN {
                __libc_malloc(layout.size()).cast()
            } else {
                __libc_memalign(layout.align(), layout.size()).cast()
            }
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: a plain call of glibc's allocator.
            return unsafe { __libc_calloc(1, layout.size()).cast() };
        }
        // SAFETY: `alloc`'s contract is the caller's; the block is `layout.size()` long.
        unsafe {
            let p = self.alloc(layout);
            if !p.is_null() {
                p.write_bytes(0, layout.size());
            }
            p
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, _layout: Layout) {
        // SAFETY: `p` came from glibc's allocator (this allocator's contract).
        unsafe { __libc_free(p.cast()) }
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: `p` is glibc's; `realloc` keeps the 16-byte alignment.
            return unsafe { __libc_realloc(p.cast(), new_size).cast() };
        }
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe {
            let q = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
            q
        }
    }
}

#[global_allocator]
static RUST: Glibc = Glibc;

/// Not yet set up: every call goes to glibc.
const UNINIT: u8 = 0;
/// The constructor runs: every call goes to glibc.
const STARTING: u8 = 1;
/// The pools may serve requests.
const READY: u8 = 2;
/// Disabled, or the pools could not be set up: every call goes to the next allocator.
const OFF: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
static POOLS: OnceLock<PoolAlloc<Glibc>> = OnceLock::new();
/// Whether AddressSanitizer runs in this process: every call goes to the next definitions.
static ASAN: AtomicBool = AtomicBool::new(false);
/// Whether the statistics go to stderr at exit.
static STATS_AT_EXIT: AtomicBool = AtomicBool::new(false);
/// Where they go: a close-on-exec copy of stderr made by the constructor (programs such as
/// `dd` close their stderr before they exit), or -1 for stderr itself.
static STATS_FD: AtomicI32 = AtomicI32::new(-1);

/// A function found with `dlsym(RTLD_NEXT, name)`, once.
struct NextFn {
    name: &'static CStr,
    ptr: AtomicPtr<c_void>,
}

impl NextFn {
    const fn new(name: &'static CStr) -> NextFn {
        NextFn {
            name,
            ptr: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The next definition of the function (glibc's, or a later preload's); NULL if none.
    fn get(&self) -> *mut c_void {
        let p = self.ptr.load(Ordering::Acquire);
        if !p.is_null() {
            return p;
        }
        // SAFETY: `name` is a C string; dlsym may allocate, which passes through to glibc
        // while the state is not READY, and otherwise never asks for this function again.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) };
        self.ptr.store(p, Ordering::Release);
        p
    }
}

static NEXT_USABLE_SIZE: NextFn = NextFn::new(c"malloc_usable_size");
static NEXT_TRIM: NextFn = NextFn::new(c"malloc_trim");
static NEXT_MALLOC: NextFn = NextFn::new(c"malloc");
static NEXT_CALLOC: NextFn = NextFn::new(c"calloc");
static NEXT_REALLOC: NextFn = NextFn::new(c"realloc");
static NEXT_FREE: NextFn = NextFn::new(c"free");
static NEXT_MEMALIGN: NextFn = NextFn::new(c"memalign");
/// glibc's `dlopen`, which the wrapper jumps to; found by the constructor.
static NEXT_DLOPEN: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// Calls the next definition `f` as a function of type `F`, or `fallback` if there is none.
macro_rules! call_next {
    ($f:expr, $ty:ty, $fallback:expr, $($arg:expr),*) => {{
        let p = $f.get();
        if p.is_null() {
            $fallback
        } else {
            // SAFETY: `p` is the next definition of a function with this C signature.
            let f: $ty = unsafe { std::mem::transmute::<*mut c_void, $ty>(p) };
            // SAFETY: the arguments are the caller's, as the function's contract wants.
            unsafe { f($($arg),*) }
        }
    }};
}

/// The allocator after this one: glibc's `__libc_*` functions, or where AddressSanitizer
/// runs, the next definitions of the `malloc` family (its own).
#[derive(Clone, Copy)]
struct Glibcs;

impl Next for Glibcs {
    fn malloc(&self, size: usize) -> *mut c_void {
        if ASAN.load(Ordering::Relaxed) {
            return call_next!(
                NEXT_MALLOC,
                unsafe extern "C" fn(usize) -> *mut c_void,
                std::ptr::null_mut(),
                size
            );
        }
        // SAFETY: malloc has no preconditions.
        unsafe { __libc_malloc(size) }
    }
    fn calloc(&self, n: usize, size: usize) -> *mut c_void {
        if ASAN.load(Ordering::Relaxed) {
            return call_next!(
                NEXT_CALLOC,
                unsafe extern "C" fn(usize, usize) -> *mut c_void,
                std::ptr::null_mut(),
                n,
                size
            );
        }
        // SAFETY: calloc has no preconditions.
        unsafe { __libc_calloc(n, size) }
    }
    fn memalign(&self, align: usize, size: usize) -> *mut c_void {
        if ASAN.load(Ordering::Relaxed) {
            return call_next!(
                NEXT_MEMALIGN,
                unsafe extern "C" fn(usize, usize) -> *mut c_void,
                std::ptr::null_mut(),
                align,
                size
            );
        }
        // SAFETY: memalign has no preconditions (a bad alignment is an error it reports).
        unsafe { __libc_memalign(align, size) }
    }
    unsafe fn realloc(&self, p: *mut c_void, size: usize) -> *mut c_void {
        if ASAN.load(Ordering::Relaxed) {
            return call_next!(
                NEXT_REALLOC,
                unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void,
                std::ptr::null_mut(),
                p,
                size
            );
        }
        // SAFETY: glibc's live pointer (the trait's contract).
        unsafe { __libc_realloc(p, size) }
    }
    unsafe fn free(&self, p: *mut c_void) {
        if ASAN.load(Ordering::Relaxed) {
            return call_next!(NEXT_FREE, unsafe extern "C" fn(*mut c_void), (), p);
        }
        // SAFETY: glibc's live pointer (the trait's contract).
        unsafe { __libc_free(p) }
    }
    unsafe fn usable_size(&self, p: *mut c_void) -> usize {
        call_next!(
            NEXT_USABLE_SIZE,
            unsafe extern "C" fn(*mut c_void) -> usize,
            0,
            p
        )
    }
}

/// The router when the pools may serve requests.
#[inline]
fn router() -> Option<Router<'static, Glibcs, Glibc>> {
    if STATE.load(Ordering::Acquire) != READY {
        return None;
    }
    release_router()
}

/// The router for a release: the pools if they exist (their pointers must go back to them
/// whatever the state), else the next allocator alone.
#[inline]
fn release_router() -> Option<Router<'static, Glibcs, Glibc>> {
    POOLS.get().map(|pools| Router {
        pools,
        next: Glibcs,
    })
}

/// `memalign`'s alignment as glibc takes it: at least the pointer size, and a power of two
/// (rounded up); `None` past the largest power of two.
fn memalign_align(align: usize) -> Option<usize> {
    align
        .max(std::mem::size_of::<usize>())
        .checked_next_power_of_two()
}

/// `malloc`.
#[unsafe(no_mangle)]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    match router() {
        Some(r) => r.malloc(size),
        None => Glibcs.malloc(size),
    }
}

/// `calloc`.
#[unsafe(no_mangle)]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    match router() {
        Some(r) => r.calloc(n, size),
        None => Glibcs.calloc(n, size),
    }
}

/// `free`.
///
/// # Safety
/// `p` is NULL or a live pointer of the `malloc` family, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    match release_router() {
        // SAFETY: forwarded from the caller.
        Some(r) => unsafe { r.free(p) },
        // SAFETY: no pools exist, so glibc's pointer (the caller's contract).
        None => unsafe { Glibcs.free(p) },
    }
}

/// `realloc`.
///
/// # Safety
/// `p` is NULL or a live pointer of the `malloc` family; on success it is not used
/// afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if let Some(r) = router() {
        // SAFETY: forwarded from the caller.
        return unsafe { r.realloc(p, size) };
    }
    match release_router() {
        // Pools exist but may not serve (the drop-in was turned off after they were made):
        // the router still knows their pointers.
        // SAFETY: forwarded from the caller.
        Some(r) => unsafe { r.realloc(p, size) },
        None if p.is_null() => Glibcs.malloc(size),
        None if size == 0 => {
            // SAFETY: glibc's live pointer (the caller's contract).
            unsafe { Glibcs.free(p) };
            std::ptr::null_mut()
        }
        // SAFETY: glibc's live pointer (the caller's contract).
        None => unsafe { Glibcs.realloc(p, size) },
    }
}

/// `reallocarray`: `realloc(p, n * size)`, NULL and `ENOMEM` when the product overflows.
///
/// # Safety
/// As [`realloc`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: forwarded from the caller.
        Some(bytes) => unsafe { realloc(p, bytes) },
        None => {
            pagepool::route::set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// A block of `size` bytes aligned to `align` (a power of two, at least the pointer size).
fn aligned(align: usize, size: usize) -> *mut c_void {
    match router() {
        Some(r) => r.aligned(align, size),
        None => Glibcs.memalign(align, size),
    }
}

/// `posix_memalign`: `align` a power of two and a multiple of the pointer size, else
/// `EINVAL`; `ENOMEM` when there is no memory.
///
/// # Safety
/// `out` is valid for a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<usize>()) {
        return libc::EINVAL;
    }
    let p = aligned(align, size);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller's contract.
    unsafe { out.write(p) };
    0
}

/// `aligned_alloc`, as glibc's `memalign` (which it is in glibc 2.36): an alignment that is
/// not a power of two is rounded up to one.
#[unsafe(no_mangle)]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    memalign(align, size)
}

/// `memalign`: an alignment that is not a power of two is rounded up to one; one past the
/// largest power of two is `EINVAL`.
#[unsafe(no_mangle)]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    match memalign_align(align) {
        Some(a) => aligned(a, size),
        None => {
            pagepool::route::set_errno(libc::EINVAL);
            std::ptr::null_mut()
        }
    }
}

/// `valloc`: page-aligned.
#[unsafe(no_mangle)]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    aligned(pagepool::page_size(), size)
}

/// `pvalloc`: page-aligned, the size rounded up to whole pages (one page for 0).
#[unsafe(no_mangle)]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = pagepool::page_size();
    match size.max(1).checked_next_multiple_of(page) {
        Some(n) => aligned(page, n),
        None => {
            pagepool::route::set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// `malloc_usable_size`.
///
/// # Safety
/// `p` is NULL or a live pointer of the `malloc` family.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    match release_router() {
        // SAFETY: forwarded from the caller.
        Some(r) => unsafe { r.usable_size(p) },
        // SAFETY: glibc's pointer (the caller's contract).
        None if !p.is_null() => unsafe { Glibcs.usable_size(p) },
        None => 0,
    }
}

/// `malloc_trim`: the pools give every pooled block back (after the worker's pending zeroing),
/// then glibc trims its own heap; 1 if memory went back to the system.
#[unsafe(no_mangle)]
pub extern "C" fn malloc_trim(pad: usize) -> c_int {
    let pooled = release_router().map_or(0, |r| r.trim());
    let glibc = call_next!(NEXT_TRIM, unsafe extern "C" fn(usize) -> c_int, 0, pad);
    c_int::from(pooled > 0 || glibc != 0)
}

/// `dlopen` with `RTLD_DEEPBIND` cleared, so that a library loaded so still calls the `free`
/// of this library (and not glibc's, on a pointer of the pools). It jumps to glibc's `dlopen`
/// without a frame of its own: glibc takes the caller's return address for `$ORIGIN` and
/// `RUNPATH` lookups, and sees the real caller. Before the constructor found glibc's, the
/// call goes through [`dlopen_first`].
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub extern "C" fn dlopen(_file: *const c_char, _mode: c_int) -> *mut c_void {
    std::arch::naked_asm!(
        "and esi, {keep}",
        "mov rax, qword ptr [rip + {next}]",
        "test rax, rax",
        "jz {first}",
        "jmp rax",
        keep = const !libc::RTLD_DEEPBIND,
        next = sym NEXT_DLOPEN,
        first = sym dlopen_first,
    )
}

/// `dlopen` before the constructor ran: finds glibc's and calls it (the one case where glibc
/// sees this library as the caller).
extern "C" fn dlopen_first(file: *const c_char, mode: c_int) -> *mut c_void {
    let next = find_dlopen();
    if next.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: glibc's dlopen, with the caller's arguments.
    let f = unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void>(
            next,
        )
    };
    // SAFETY: the caller's arguments, as dlopen's contract wants.
    unsafe { f(file, mode & !libc::RTLD_DEEPBIND) }
}

/// glibc's `dlopen`, found once.
fn find_dlopen() -> *mut c_void {
    let p = NEXT_DLOPEN.load(Ordering::Acquire);
    if !p.is_null() {
        return p;
    }
    // SAFETY: a C string; see `NextFn::get`.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"dlopen".as_ptr()) };
    NEXT_DLOPEN.store(p, Ordering::Release);
    p
}

/// Writes `text` to stderr, whole (no allocation).
fn say(text: &[u8]) {
    say_to(2, text)
}

/// Writes `text` to `fd`, whole (no allocation).
fn say_to(fd: c_int, text: &[u8]) {
    // A failed write of a message has nowhere to be said.
    let _ = pagepool::route::write_all(fd, text);
}

/// The constructor: finds glibc's functions, reads the settings, and makes the pools usable
/// (they are made on the first pooled request).
extern "C" fn init() {
    if STATE
        .compare_exchange(UNINIT, STARTING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    find_dlopen();
    NEXT_USABLE_SIZE.get();
    NEXT_TRIM.get();
    // SAFETY: a C string; a lookup only.
    if !unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__asan_init".as_ptr()) }.is_null() {
        for f in [
            &NEXT_MALLOC,
            &NEXT_CALLOC,
            &NEXT_REALLOC,
            &NEXT_FREE,
            &NEXT_MEMALIGN,
        ] {
            f.get();
        }
        ASAN.store(true, Ordering::Release);
        say(b"pagepool: AddressSanitizer runs in this process: the drop-in steps aside\n");
        STATE.store(OFF, Ordering::Release);
        return;
    }
    let s = Settings::from_environ(&mut |line| say(line.as_bytes()));
    STATS_AT_EXIT.store(s.stats, Ordering::Relaxed);
    if s.stats {
        // SAFETY: duplicates a descriptor; no memory is involved.
        let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 64) };
        STATS_FD.store(fd, Ordering::Relaxed);
    }
    if s.disable {
        STATE.store(OFF, Ordering::Release);
        return;
    }
    let _ = POOLS.set(
        PoolAlloc::with_inner(Glibc)
            .threshold(s.threshold)
            .largest(s.largest)
            .pool_limit(s.limit)
            .worker(s.worker)
            .pressure(s.pressure)
            .thread_guard(false),
    );
    STATE.store(READY, Ordering::Release);
}

/// The destructor: with `PAGEPOOL_STATS=1`, the statistics on stderr, headed by the
/// process's id and name, in every process that made the pools (children inherit the
/// setting: those that never asked for a pooled block stay silent).
extern "C" fn fini() {
    if !STATS_AT_EXIT.load(Ordering::Relaxed) {
        return;
    }
    let Some(r) = release_router() else { return };
    if r.pools.stats().is_none() {
        return;
    }
    let name = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    let fd = match STATS_FD.load(Ordering::Relaxed) {
        -1 => 2,
        fd => fd,
    };
    say_to(
        fd,
        format!(
            "pagepool: statistics of process {} ({}) at exit\n",
            std::process::id(),
            name.trim()
        )
        .as_bytes(),
    );
    r.write_stats(fd);
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = fini;
