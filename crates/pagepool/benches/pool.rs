//! Micro-benchmarks, in ns per operation: the pool's give/take pair, and the heap's allocation
//! hit path (a buffer whose blocks come straight from the pools) with each release strategy.
//! Run with `cargo bench -p pagepool`.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::hint::black_box;
use std::ptr::NonNull;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use pagepool::{
    SystemHeap,
    pool::{Block, PagePool},
    registry::Registry,
};

const PAGE: Layout = match Layout::from_size_align(4096, 4096) {
    Ok(l) => l,
    Err(_) => panic!("a page layout"),
};

/// A release callback for blocks allocated with `alloc_zeroed(PAGE)`.
fn dealloc_page() -> pagepool::pool::ReleaseFn {
    Box::new(|b: Block| {
        // SAFETY: every block given to these pools comes from `alloc_zeroed(PAGE)` in `fill`.
        unsafe { dealloc(b.into_raw().as_ptr(), PAGE) }
    })
}

/// Gives `pool` 64 fresh zeroed pages.
fn fill(pool: &PagePool) {
    for _ in 0..64 {
        // SAFETY: a fresh zeroed page-sized allocation, owned by the pool from now on.
        let b = unsafe { Block::from_raw(NonNull::new(alloc_zeroed(PAGE)).unwrap(), 0) };
        pool.give(b).unwrap();
    }
}

fn bench_take_give(c: &mut Criterion, name: &str, pool: &PagePool) {
    fill(pool);
    c.bench_function(name, |b| {
        b.iter(|| {
            let block = pool.take().unwrap();
            pool.give(black_box(block)).unwrap();
        })
    });
}

fn pool_give_take(c: &mut Criterion) {
    let pool = PagePool::new(0, dealloc_page());
    bench_take_give(c, "pool take+give (order 0)", &pool);
    let registry = Registry::new(usize::MAX);
    let owner = registry.register("bench", usize::MAX);
    let owned = owner.add_pool(0, dealloc_page());
    bench_take_give(c, "owned pool take+give (order 0, limits enforced)", &owned);
}

/// The floor for the heap's hit path: zeroing the buffer once, on a resident, cache-hot page.
fn memset_reference(c: &mut Criterion) {
    let mut g = c.benchmark_group("memset (reference)");
    for size in [4096usize, 64 << 10, 1 << 20] {
        let mut v = vec![1u8; size];
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter(|| {
                // SAFETY: writes within `v`.
                unsafe { std::ptr::write_bytes(v.as_mut_ptr(), 0, size) };
                black_box(&mut v);
            })
        });
    }
    g.finish();
}

fn heap_hit_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("heap alloc+drop, hit");
    // The default heap (small buffers from the thread's cache), then the pools alone, with
    // deferred and with synchronous zeroing.
    for (name, deferred, thread_cache) in [
        (
            "default",
            true,
            64 << 10, /* the default thread cache */
        ),
        ("pools-deferred", true, 0),
        ("pools-syncfree", false, 0),
    ] {
        let heap = SystemHeap::builder()
            .name(name)
            .registry(Registry::new(usize::MAX))
            .deferred(deferred)
            .thread_cache(thread_cache)
            .pressure(None)
            .build()
            .unwrap();
        for size in [4096usize, 64 << 10, 1 << 20] {
            drop(heap.alloc(size).unwrap());
            heap.flush();
            g.bench_with_input(BenchmarkId::new(name, size), &size, |b, &size| {
                b.iter(|| black_box(heap.alloc(size).unwrap()));
            });
        }
    }
    g.finish();
}

// The macros generate undocumented items.
#[allow(missing_docs)]
mod harness {
    use super::*;
    criterion_group!(benches, pool_give_take, memset_reference, heap_hit_path);
}
criterion_main!(harness::benches);
