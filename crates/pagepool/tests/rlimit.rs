//! OS refusal: with the address space limited (`RLIMIT_AS`), allocation fails with an error and
//! leaks nothing. Alone in its binary because the limit applies to the whole process.

use pagepool::{AllocError, SystemHeap, registry::Registry};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn address_space_limit_is_an_error_not_a_crash() {
    let heap = SystemHeap::builder()
        .registry(Registry::new(usize::MAX))
        .arena_size(8 << 20)
        .pressure(None)
        .build()
        .unwrap();
    // Warm the pool with 4 MiB so the failing allocation also takes pooled blocks first.
    drop(heap.alloc(4 << 20).unwrap());
    heap.flush();
    let before = heap.stats();
    let old = getrlimit(Resource::As);
    let limit = vm_size() + (32 << 20);
    setrlimit(
        Resource::As,
        Rlimit {
            current: Some(limit),
            maximum: old.maximum,
        },
    )
    .unwrap();
    let result = heap.alloc(256 << 20);
    let after_refusal = heap.stats();
    let small = heap.alloc(4 << 20).map(|b| b.len());
    setrlimit(Resource::As, old).unwrap();
    heap.flush();
    let err = result.unwrap_err();
    assert!(
        matches!(err, AllocError::Os(ref e) if e.raw_os_error() == Some(12)),
        "{err}"
    );
    assert_eq!(
        small.unwrap(),
        4 << 20,
        "the pooled blocks were given back and reused"
    );
    assert_eq!(after_refusal, before, "the refusal changed no counter");
    let st = heap.stats();
    assert_eq!(st.live_buffers, 0);
    assert_eq!(
        st.pooled_pages(),
        1024,
        "the failed allocation returned what it took"
    );
    assert_eq!(st.fresh_pages, st.pooled_pages() as u64 + st.released_pages);
}
