//! Per-thread caches of small buffers: reuse, zeroing, bounds, and that every page comes back
//! (thread exit, flush, shrink, heap drop), including buffers released on another thread.

mod common;
use common::memfd_mappings;
use pagepool::{SystemHeap, page_size, registry::Registry};

fn heap(name: &str) -> SystemHeap {
    SystemHeap::builder()
        .name(name)
        .registry(Registry::new(usize::MAX))
        .pressure(None)
        .build()
        .unwrap()
}

/// A heap whose releases (of buffers leaving a thread cache too) are zeroed and pooled at once,
/// so that its counters hold still between two reads.
fn sync_heap(name: &str) -> SystemHeap {
    SystemHeap::builder()
        .name(name)
        .registry(Registry::new(usize::MAX))
        .pressure(None)
        .deferred(false)
        .build()
        .unwrap()
}

/// `fresh == pooled + live + queued + cached + released`, the heap's accounting (read while
/// the worker is idle).
fn balanced(heap: &SystemHeap) -> bool {
    let st = heap.stats();
    st.fresh_pages
        == (st.pooled_pages() + st.live_pages as usize + st.queued_pages + st.thread_cached_pages)
            as u64
            + st.released_pages
}

#[test]
fn a_small_buffer_comes_back_from_the_cache_zeroed() {
    let heap = sync_heap("tc-reuse");
    let ps = page_size();
    let mut a = heap.alloc(ps).unwrap();
    a.fill(0xff);
    let addr = a.as_ptr();
    drop(a);
    let st = heap.stats();
    assert_eq!((st.thread_cached_pages, st.queued_pages), (1, 0), "{st}");
    let b = heap.alloc(ps).unwrap();
    assert_eq!(b.as_ptr(), addr, "the same block, from this thread's cache");
    assert!(b.iter().all(|&x| x == 0), "zeroed on the way out");
    let st = heap.stats();
    assert_eq!((st.cache_hits, st.thread_cached_pages), (1, 0));
    assert_eq!((st.allocs, st.live_buffers, st.live_pages), (2, 1, 1));
    assert!(balanced(&heap), "{st}");
}

#[test]
fn sizes_are_matched_and_the_bound_holds() {
    let heap = sync_heap("tc-bound");
    let ps = page_size();
    // Default 64 KiB per thread: buffers up to 16 KiB are cached, larger ones never.
    let big = heap.alloc(5 * ps).unwrap();
    drop(big);
    assert_eq!(
        heap.stats().thread_cached_pages,
        0,
        "5 pages is above a quarter"
    );
    let bufs: Vec<_> = (0..40)
        .map(|i| heap.alloc((i % 4 + 1) * ps).unwrap())
        .collect();
    drop(bufs);
    let st = heap.stats();
    assert!(st.thread_cached_pages <= 16, "{st}");
    assert!(st.thread_cached_pages >= 13, "the cache filled: {st}");
    // A 3-page request takes a 3-page buffer (no splitting, no merging).
    let cached_before = st.thread_cached_pages;
    let three = heap.alloc(3 * ps).unwrap();
    let st = heap.stats();
    assert_eq!(st.cache_hits, 1);
    assert_eq!(st.thread_cached_pages, cached_before - 3);
    assert!(three.iter().all(|&x| x == 0));
    assert!(balanced(&heap), "{st}");
}

#[test]
fn released_on_another_thread_and_returned_at_its_exit() {
    let heap = std::sync::Arc::new(heap("tc-threads"));
    let ps = page_size();
    let bufs: Vec<_> = (0..4)
        .map(|_| {
            let mut b = heap.alloc(ps).unwrap();
            b.fill(0x77);
            b
        })
        .collect();
    let h = heap.clone();
    // A joined thread (not a scoped one: a scope can end before the thread's thread-local
    // destructors have run).
    std::thread::spawn(move || {
        drop(bufs);
        let st = h.stats();
        assert_eq!(st.thread_cached_pages, 4, "in the releasing thread's cache");
        assert_eq!(st.live_pages, 0, "counted as released across threads");
    })
    .join()
    .unwrap();
    // The thread exited: its cache went back to the heap (queued for the worker).
    let st = heap.stats();
    assert_eq!(st.thread_cached_pages, 0, "{st}");
    assert_eq!((st.live_buffers, st.live_pages), (0, 0));
    heap.flush();
    assert_eq!(heap.stats().pooled_pages(), 4);
    assert!(balanced(&heap), "{}", heap.stats());
    let again: Vec<_> = (0..4).map(|_| heap.alloc(ps).unwrap()).collect();
    assert!(again.iter().all(|b| b.iter().all(|&x| x == 0)));
}

#[test]
fn flush_and_shrink_empty_the_cache() {
    let heap = heap("tc-flush");
    let ps = page_size();
    drop(heap.alloc(ps).unwrap());
    assert_eq!(heap.stats().thread_cached_pages, 1);
    heap.flush();
    let st = heap.stats();
    assert_eq!((st.thread_cached_pages, st.pooled_pages()), (0, 1), "{st}");
    drop(heap.alloc(2 * ps).unwrap());
    assert_eq!(heap.stats().thread_cached_pages, 2);
    heap.shrink(1);
    let st = heap.stats();
    assert_eq!(st.thread_cached_pages, 0, "{st}");
    // The 2 pages went to the worker's queue; once pooled, a trim gives everything back.
    heap.flush();
    heap.trim();
    let st = heap.stats();
    assert_eq!(st.released_pages, st.fresh_pages, "{st}");
}

#[test]
fn another_threads_cache_empties_at_its_next_use_after_a_shrink() {
    let heap = heap("tc-epoch");
    let ps = page_size();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (done, finished) = std::sync::mpsc::channel::<usize>();
    std::thread::scope(|s| {
        let heap = &heap;
        s.spawn(move || {
            drop(heap.alloc(ps).unwrap());
            done.send(heap.stats().thread_cached_pages).unwrap();
            wait.recv().unwrap();
            // The heap was shrunk meanwhile: this use empties the cache first.
            let b = heap.alloc(2 * ps).unwrap();
            done.send(heap.stats().thread_cached_pages).unwrap();
            drop(b);
            wait.recv().unwrap();
        });
        assert_eq!(finished.recv().unwrap(), 1);
        heap.shrink(usize::MAX);
        assert_eq!(
            heap.stats().thread_cached_pages,
            1,
            "still the other thread's"
        );
        go.send(()).unwrap();
        assert_eq!(finished.recv().unwrap(), 0, "emptied at its next use");
        go.send(()).unwrap();
    });
}

#[test]
fn dropping_the_heap_gives_cached_memory_back() {
    let name = "tc-drop";
    let heap = heap(name);
    let ps = page_size();
    // One buffer cached on this thread, one on a thread that outlives the heap.
    let other = heap.alloc(ps).unwrap();
    drop(heap.alloc(ps).unwrap());
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (dropped, was_dropped) = std::sync::mpsc::channel::<usize>();
    let t = std::thread::spawn(move || {
        drop(other);
        dropped.send(0).unwrap();
        wait.recv().unwrap();
    });
    was_dropped.recv().unwrap();
    assert_eq!(
        heap.stats().thread_cached_pages,
        2,
        "one page in each thread's cache"
    );
    assert!(memfd_mappings(name) > 0);
    drop(heap);
    // The other thread still holds a page: its cache keeps the arena until the thread exits.
    assert!(memfd_mappings(name) > 0);
    go.send(()).unwrap();
    t.join().unwrap();
    assert_eq!(memfd_mappings(name), 0, "every arena unmapped");
}

#[test]
fn no_cache_when_turned_off_or_not_pooling() {
    let ps = page_size();
    for (name, b) in [
        ("tc-off", SystemHeap::builder().thread_cache(0)),
        ("tc-nopool", SystemHeap::builder().pool_limit(0)),
    ] {
        let heap = b
            .name(name)
            .registry(Registry::new(usize::MAX))
            .pressure(None)
            .build()
            .unwrap();
        drop(heap.alloc(ps).unwrap());
        let st = heap.stats();
        assert_eq!(
            (st.thread_cached_pages, st.cache_hits),
            (0, 0),
            "{name}: {st}"
        );
    }
}

#[test]
fn a_thread_lets_go_of_a_dropped_heap_when_it_uses_another() {
    let name = "tc-dead";
    let dead = heap(name);
    let other = std::sync::Arc::new(heap("tc-alive"));
    let buf = dead.alloc(page_size()).unwrap();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (step, stepped) = std::sync::mpsc::channel::<()>();
    let o = other.clone();
    let t = std::thread::spawn(move || {
        drop(buf); // cached by this thread
        step.send(()).unwrap();
        wait.recv().unwrap();
        // The heap above is gone now; using another one lets go of its cache.
        drop(o.alloc(page_size()).unwrap());
        step.send(()).unwrap();
        wait.recv().unwrap();
    });
    stepped.recv().unwrap();
    drop(dead);
    assert!(
        memfd_mappings(name) > 0,
        "the thread's cache still holds a page"
    );
    go.send(()).unwrap();
    stepped.recv().unwrap();
    assert_eq!(memfd_mappings(name), 0, "let go without the thread exiting");
    go.send(()).unwrap();
    t.join().unwrap();
}
