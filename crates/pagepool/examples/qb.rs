//! temp
use std::time::Instant;
fn main() {
    for deferred in [false, true] {
        let heap = pagepool::SystemHeap::builder()
            .deferred(deferred)
            .build()
            .unwrap();
        for &size in &[4096usize, 1 << 20, 8 << 20, 32 << 20] {
            let n = if size >= 8 << 20 { 300 } else { 3000 };
            for _ in 0..10 {
                drop(heap.alloc(size).unwrap());
            }
            let t = Instant::now();
            for _ in 0..n {
                let mut b = heap.alloc(size).unwrap();
                for i in (0..b.len()).step_by(4096) {
                    b[i] = 1;
                }
            }
            println!(
                "deferred={deferred} {size}: {} ns/call",
                t.elapsed().as_nanos() / n as u128
            );
        }
        heap.flush();
        println!("{}", heap.stats());
    }
}
