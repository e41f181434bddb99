//! Configurations: the sizes a heap refuses at build (with the field and the bound named), the
//! largest it accepts (a heap that works), and how unlimited maximums read in the statistics,
//! as text and as serde data.
//!
//! Tests run in a debug build: an arithmetic overflow anywhere on these paths panics here.

use pagepool::{
    ConfigError, HeapStats, PoolType, SystemHeap, registry::Registry, stats::RegistryStats,
};

fn types() -> [PoolType; 3] {
    [
        PoolType::SYSTEM,
        PoolType::SYSTEM.huge(),
        PoolType::SYSTEM.locked(),
    ]
}

fn builder(ty: PoolType) -> pagepool::HeapBuilder {
    SystemHeap::builder()
        .registry(Registry::new(usize::MAX))
        .pressure(None)
        .pool_type(ty)
}

/// The largest arena the builder accepts, read from its refusal of `usize::MAX`.
fn largest_arena() -> usize {
    match builder(PoolType::SYSTEM).arena_size(usize::MAX).build() {
        Err(ConfigError::SizeTooLarge { max, .. }) => max,
        Err(e) => panic!("arena_size(usize::MAX): {e}"),
        Ok(_) => panic!("arena_size(usize::MAX) accepted"),
    }
}

#[test]
fn an_arena_no_address_space_can_hold_is_refused_at_build() {
    for ty in types() {
        for size in [usize::MAX, usize::MAX - 4095, 1 << 62, (1 << 46) + 1] {
            match builder(ty).arena_size(size).build() {
                Err(ConfigError::SizeTooLarge { field, value, max }) => {
                    assert_eq!((field, value), ("arena_size", size), "{ty}");
                    assert!(max < size, "{ty}: {max}");
                    let msg = ConfigError::SizeTooLarge { field, value, max }.to_string();
                    assert!(
                        msg.contains("arena_size") && msg.contains(&max.to_string()),
                        "names the field and the bound: {msg}"
                    );
                }
                Err(e) => panic!("{ty}: arena_size({size}): {e}"),
                Ok(heap) => {
                    // Accepted: the first allocation maps an arena of that size (a huge type
                    // rounds it up to 2 MiB, which overflowed).
                    let r = heap.alloc(4096).map(|b| b.len());
                    panic!("{ty}: arena_size({size}) accepted; alloc(4096): {r:?}");
                }
            }
        }
    }
}

#[test]
fn the_largest_accepted_sizes_and_limits_make_a_working_heap() {
    let arena = largest_arena();
    assert!(arena.is_power_of_two() && arena >= 1 << 40, "{arena}");
    // The two roundings (pages, 2 MiB). Each arena is recorded for fork() in entries of 4 GiB
    // (see `fork::keep_mapping`): thousands for this one, seconds of a debug build's time.
    for ty in [PoolType::SYSTEM, PoolType::SYSTEM.huge()] {
        let heap = builder(ty)
            .arena_size(arena)
            .max_buffer(usize::MAX)
            .pool_limit(usize::MAX)
            .queue_limit(usize::MAX)
            .thread_cache(usize::MAX)
            .build()
            .unwrap_or_else(|e| panic!("{ty}: {e}"));
        let len = (2 << 20) + 4096;
        let mut b = heap.alloc(len).unwrap();
        assert!(b.len() >= len);
        assert!(b.iter().all(|&x| x == 0));
        b.fill(7);
        drop(b);
        heap.flush();
        let b = heap.alloc(len).unwrap();
        assert!(b.iter().all(|&x| x == 0), "{ty}: reused and zeroed");
        let st = heap.stats();
        assert_eq!(st.arenas, 1, "{ty}: one arena of {arena} bytes");
        assert_eq!(st.owner.limit_pages, None, "{ty}: pool_limit(usize::MAX)");
        assert_eq!(st.registry_max_pages, None);
        assert!(st.hits > 0 || st.cache_hits > 0, "{ty}: pooled: {st}");
        drop(b);
        heap.flush();
        heap.trim();
        assert_eq!(heap.stats().arenas, 0, "{ty}: given back");
    }
}

#[test]
fn an_unlimited_registry_and_owner_read_as_unlimited() {
    let registry = Registry::new(usize::MAX);
    let _owner = registry.register_typed("cache", "system", usize::MAX);
    let _limited = registry.register("small", 100);
    let text = registry.stats().to_string();
    assert!(!text.contains(&usize::MAX.to_string()), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("total") && l.ends_with("0 of unlimited")),
        "{text}"
    );
    assert!(text.contains("cache (system) 0 pages, unlimited"), "{text}");
    assert!(text.contains("small (system) 0 of 100 pages"), "{text}");

    let heap = builder(PoolType::SYSTEM)
        .pool_limit(usize::MAX)
        .build()
        .unwrap();
    drop(heap.alloc(4096).unwrap());
    let text = heap.stats().to_string();
    assert!(!text.contains(&usize::MAX.to_string()), "{text}");
    assert!(text.contains("of unlimited"), "{text}");
}

#[test]
fn unlimited_maximums_serialise_as_null_and_back() {
    let registry = Registry::new(usize::MAX);
    let _owner = registry.register("cache", usize::MAX);
    let _limited = registry.register("small", 100);
    let st = registry.stats();
    assert_eq!(st.max_pages, None);
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["max_pages"], serde_json::Value::Null, "{json}");
    let limits: Vec<_> = json["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["limit_pages"].clone())
        .collect();
    assert_eq!(limits, [serde_json::Value::Null, serde_json::json!(100)]);
    let back: RegistryStats = serde_json::from_value(json).unwrap();
    assert_eq!(back, st);

    let limited = Registry::new(1000).stats();
    let json = serde_json::to_string(&limited).unwrap();
    assert!(json.contains("\"max_pages\":1000"), "{json}");
    assert_eq!(
        serde_json::from_str::<RegistryStats>(&json).unwrap(),
        limited
    );

    let heap = builder(PoolType::SYSTEM)
        .pool_limit(usize::MAX)
        .build()
        .unwrap();
    let st = heap.stats();
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["registry_max_pages"], serde_json::Value::Null);
    assert_eq!(json["owner"]["limit_pages"], serde_json::Value::Null);
    let back: HeapStats = serde_json::from_value(json).unwrap();
    assert_eq!(back, st);
}
