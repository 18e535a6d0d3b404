//! Extractor and tool-worker benchmarks, through the registry as the host runs them:
//! entity-extractor over a log of `memory.created` events (the derived events appended
//! under their fixed ids, then the checkpoint), and `math` invocations from request appended
//! to result appended (start event, call, outcome event).
//!
//! Needs the plugins built: `scripts/build-plugins.sh`, then
//! `cargo bench -p evhost --bench extractors` (EVHOST_BENCH_EVENTS sets the number of
//! memories, default 1,000,000; EVHOST_BENCH_INVOCATIONS the number of invocations, default
//! 100,000).

// The allocator the `evhost` binary uses, so the figures are the binary's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::time::{Duration, Instant};

use evhost::registry::Registry;
use evhost::{EventLog, EventType, ExpectedVersion, NewEvent, Payload, SledLog, StreamAppend};

const NAMES: [&str; 8] = [
    "Ada Lovelace",
    "Charles Babbage",
    "Grace Hopper",
    "Alan Turing",
    "London",
    "Paris",
    "Edsger Dijkstra",
    "Barbara Liskov",
];

fn memory(i: u64) -> NewEvent {
    let a = NAMES[(i % 8) as usize];
    let b = NAMES[((i / 8) % 8) as usize];
    let payload = format!(r#"{{"content":"Note {i}: {a} wrote to {b} about the engine."}}"#);
    NewEvent::new(
        EventType::new("memory.created").unwrap(),
        Payload::from_json(&payload).unwrap(),
    )
}

fn request(i: u64) -> NewEvent {
    let payload = format!(
        r#"{{"invocation_id":"bench-{i}","tool":"math","input":{{"expression":"{i}+2*3"}}}}"#
    );
    NewEvent::new(
        EventType::new("tool.invocation.requested").unwrap(),
        Payload::from_json(&payload).unwrap(),
    )
}

async fn ingest(log: &SledLog, n: u64, make: fn(u64) -> NewEvent) {
    for b in 0..n.div_ceil(1000) {
        let events = (b * 1000..((b + 1) * 1000).min(n)).map(make).collect();
        log.append(vec![StreamAppend {
            stream: format!("s-{}", b % 100).into(),
            expected: ExpectedVersion::Any,
            events,
        }])
        .await
        .unwrap();
    }
}

fn manifest(plugins: &std::path::Path, name: &str) -> (String, Vec<u8>) {
    let m = std::fs::read_to_string(plugins.join(format!("{name}.toml"))).unwrap_or_else(|_| {
        panic!("target/plugins/{name}.toml: run scripts/build-plugins.sh first")
    });
    (
        m,
        std::fs::read(plugins.join(format!("{name}.wasm"))).unwrap(),
    )
}

/// Waits until `name` has derived `n` events; returns the time from `start`.
async fn derived(registry: &Registry, name: &str, n: u64, start: Instant) -> Duration {
    loop {
        let info = registry.info(name).await.unwrap();
        if info.status.derived >= n {
            return start.elapsed();
        }
        assert!(
            info.status.last_error.is_none(),
            "{:?}",
            info.status.last_error
        );
        // A runner that stops progressing shows up here instead of as a silent hang.
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{name} stalled: {}",
            serde_json::to_string(&info).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn main() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("EVHOST_BENCH_EVENTS", 1_000_000);
    let m = env("EVHOST_BENCH_INVOCATIONS", 100_000);
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let rt = common::tokio();
    println!("evhost extractor and tool benchmarks ({n} memories, {m} invocations)");
    rt.block_on(async {
        let host = common::host().await;
        let (log, registry) = (&host.log, &host.registry);

        // Extractor: a backlog of n memories, one derived event each.
        let t = Instant::now();
        ingest(&log, n, memory).await;
        let plain = t.elapsed();
        // For scale: the same appends carrying ids (as derived events do), which the log
        // checks and indexes for exactly-once.
        let t = Instant::now();
        ingest(&log, n / 4, |i| {
            let mut e = memory(i).with_id(format!("memory-{i}"));
            e.event_type = EventType::new("memory.imported").unwrap();
            e
        })
        .await;
        let with_ids = t.elapsed() * 4;
        println!(
            "append    1000-event appends, host ids / own ids:  {:>10.0} / {:.0} events/s",
            n as f64 / plain.as_secs_f64(),
            n as f64 / with_ids.as_secs_f64()
        );
        let (text, wasm) = manifest(&plugins, "entity-extractor");
        let start = Instant::now();
        registry.load(&text, wasm, false, Default::default(), Default::default()).await.unwrap();
        let took = derived(&registry, "entity-extractor", n, start).await;
        println!(
            "extract   entity-extractor, derived appended:      {:>10.0} input events/s  ({n} in {:.2} s; target >= 100,000)",
            n as f64 / took.as_secs_f64(),
            took.as_secs_f64()
        );
        registry.unload("entity-extractor", false).await.unwrap();

        // Tools: a backlog of m requests, then live requests in batches.
        let (text, wasm) = manifest(&plugins, "math");
        registry.load(&text, wasm, false, Default::default(), Default::default()).await.unwrap();
        let before = registry.info("math").await.unwrap().status.derived;
        let start = Instant::now();
        let offset = 10_000_000;
        for b in 0..m.div_ceil(1000) {
            let events = (b * 1000..((b + 1) * 1000).min(m)).map(|i| request(offset + i)).collect();
            log.append(vec![StreamAppend {
                stream: format!("calls-{}", b % 10).into(),
                expected: ExpectedVersion::Any,
                events,
            }])
            .await
            .unwrap();
        }
        let took = derived(&registry, "math", before + m, start).await;
        println!(
            "tools     math, request appended -> result appended: {:>8.0} invocations/s  ({m} in {:.2} s; target >= 10,000)",
            m as f64 / took.as_secs_f64(),
            took.as_secs_f64()
        );
        registry.stop_all().await;
    });
}
