//! A tour of pagepool: allocate, use and free buffers of the benchmark's sizes, share a registry
//! between heaps of several pool types (system, locked, huge), warm one with `reserve`, shrink,
//! and print the statistics after each step.
//!
//! Run with `cargo run --release -p pagepool --example tour`.

use std::time::Instant;

use pagepool::{PoolType, SystemHeap, registry::Registry};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = Registry::new((512 << 20) / pagepool::page_size());
    let heap = SystemHeap::builder()
        .name("system")
        .registry(registry.clone())
        .build()?;
    let other = SystemHeap::builder()
        .name("camera")
        .registry(registry.clone())
        .pool_limit(8 << 20)
        .build()?;

    for size in [4 << 10, 1 << 20, 8 << 20, 32 << 20] {
        // First allocation: fresh pages from the system. Second: the same blocks, zeroed by the
        // worker in the meantime (`flush` waits for it) and taken from the pool.
        for round in ["fresh", "pooled"] {
            heap.flush();
            let t = Instant::now();
            let mut buf = heap.alloc(size)?;
            let took = t.elapsed();
            assert!(buf.iter().all(|&b| b == 0), "buffers are zeroed");
            buf.fill(0xff);
            println!(
                "{size:>9} bytes {round:>6}: alloc {:>9.1} us, {} blocks, remapped: {}",
                took.as_secs_f64() * 1e6,
                buf.blocks().count(),
                buf.is_remapped()
            );
        }
    }
    drop(other.alloc(16 << 20)?);
    // Pool types: memory whose attribute is applied once, when it comes from the system, and
    // kept while its blocks are pooled. `reserve` pays for it at start.
    let locked = SystemHeap::builder()
        .name("locked")
        .pool_type(PoolType::SYSTEM.locked())
        .registry(registry.clone())
        .build()?;
    match locked.reserve(1 << 20, 4) {
        Ok(n) => println!("locked: reserved {n} buffers of 1 MiB"),
        // Past RLIMIT_MEMLOCK without CAP_IPC_LOCK: a clear error, nothing leaked.
        Err(e) => println!("locked: {e}"),
    }
    let huge = SystemHeap::builder()
        .name("huge")
        .pool_type(PoolType::SYSTEM.huge())
        .registry(registry.clone())
        .build()?;
    let big = huge.alloc(4 << 20)?;
    println!(
        "huge: backing {}; {}",
        huge.stats()
            .huge_backing
            .map_or("-".into(), |b| b.to_string()),
        huge.backing()?
    );
    drop(big);
    huge.flush();
    println!("\n{}", heap.stats());
    println!("registry:\n{}", registry.stats());
    println!("shrink(1000) freed {} pages", heap.shrink(1000));
    println!("trim() freed {} pages", heap.trim());
    println!("\n{}", heap.stats());
    Ok(())
}
