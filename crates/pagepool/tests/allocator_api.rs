//! `&PoolAlloc` as an `allocator_api2` allocator (feature `allocator-api2`): collections on
//! the pools without a global allocator, zeroed and plain allocations, growth in place and by
//! moving pages, zero-size layouts, and threads sharing one `static`.

use allocator_api2::alloc::{Allocator, Layout};
use allocator_api2::vec::Vec;
use pagepool::alloc::PoolAlloc;

static POOLS: PoolAlloc = PoolAlloc::new();

#[test]
fn vectors_live_in_the_pools() {
    let mut v: Vec<u8, &PoolAlloc> = Vec::with_capacity_in(8 << 20, &POOLS);
    assert!(POOLS.owns(v.as_ptr()));
    v.resize(8 << 20, 7);
    drop(v);
    // Growth: 64 KiB to 32 MiB, contents kept (in place, then by moving pages).
    let mut g: Vec<u64, &PoolAlloc> = Vec::with_capacity_in((64 << 10) / 8, &POOLS);
    for i in 0..(32u64 << 20) / 8 {
        g.push(i);
    }
    assert!(POOLS.owns(g.as_ptr().cast()));
    assert!(g.iter().enumerate().all(|(i, &x)| x == i as u64));
    drop(g);
    // Small vectors are the inner allocator's.
    let small: Vec<u8, &PoolAlloc> = Vec::with_capacity_in(100, &POOLS);
    assert!(!POOLS.owns(small.as_ptr()));
    let s = POOLS.stats().unwrap();
    assert!(s.moved_blocks > 0, "{s}");
}

#[test]
fn zeroed_and_zero_size_allocations() {
    let a = &POOLS;
    for _ in 0..10 {
        let layout = Layout::from_size_align(4 << 20, 4096).unwrap();
        let p = a.allocate_zeroed(layout).unwrap();
        // SAFETY: `p` is 4 MiB of memory allocated above, released below.
        let bytes = unsafe { std::slice::from_raw_parts_mut(p.as_ptr().cast::<u8>(), 4 << 20) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes.fill(0x5a);
        // SAFETY: allocated above with `layout`.
        unsafe { a.deallocate(p.cast(), layout) };
    }
    let zst = Layout::from_size_align(0, 64).unwrap();
    let p = a.allocate(zst).unwrap();
    assert_eq!(p.len(), 0);
    assert_eq!(p.cast::<u8>().as_ptr() as usize % 64, 0);
    // SAFETY: a zero-size allocation of this allocator.
    unsafe { a.deallocate(p.cast(), zst) };
}

#[test]
fn threads_share_one_set_of_pools() {
    let threads: std::vec::Vec<_> = (0..4u8)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..50usize {
                    let mut v: Vec<u8, &PoolAlloc> =
                        Vec::with_capacity_in((1 << 20) + i * 4096, &POOLS);
                    v.resize((1 << 20) + i * 4096, t);
                    assert!(v.iter().all(|&b| b == t));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
