//! Containment under a hostile plugin: how fast assistant-stats catches up on its own,
//! against the same catch-up while the hostile extractor works through poison events spread
//! over the log (infinite loops, memory bombs, traps, recursion, floods, huge and invalid
//! output), side by side in one run. The hostile plugin never stops failing during the
//! measurement (no quarantine), so this is the worst case.
//!
//! Needs the test plugins built (`scripts/build-plugins.sh`), then
//! `cargo bench -p evhost --bench hostile` (EVHOST_BENCH_EVENTS sets the log size, default
//! 300,000).

// The allocator the `evhost` binary uses, so the figures are the binary's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use evhost::registry::Registry;
use evhost::{EventLog, EventType, ExpectedVersion, NewEvent, Payload, SledLog, StreamAppend};

const POISON: [&str; 8] = [
    "hostile.loop",
    "hostile.alloc",
    "hostile.trap",
    "hostile.recurse",
    "hostile.flood",
    "hostile.huge",
    "hostile.invalid",
    "hostile.file",
];

fn event(ty: &str, payload: &str) -> NewEvent {
    NewEvent::new(
        EventType::new(ty).unwrap(),
        Payload::from_json(payload).unwrap(),
    )
}

/// `n` assistant events, with `poison` hostile events spread evenly among them (and a good
/// hostile event beside each).
async fn ingest(log: &SledLog, n: u64, poison: u64) {
    let every = (n / poison.max(1)).max(1);
    let mut kind = 0;
    for b in 0..n / 1000 {
        let mut groups: Vec<StreamAppend> = (0..10)
            .map(|s| StreamAppend {
                stream: format!("assistant-{}", (b * 10 + s) % 1000).into(),
                expected: ExpectedVersion::Any,
                events: (0..100)
                    .map(|i| {
                        if (b * 1000 + s * 100 + i) % 2 == 0 {
                            event(
                                "assistant.tool.executed",
                                r#"{"tool_name":"say","success":true}"#,
                            )
                        } else {
                            event(
                                "assistant.tick.completed",
                                r#"{"tick_number":42,"duration_ms":250.0}"#,
                            )
                        }
                    })
                    .collect(),
            })
            .collect();
        if (b * 1000) % every < 1000 {
            groups.push(StreamAppend {
                stream: "hostile".into(),
                expected: ExpectedVersion::Any,
                events: vec![
                    event(POISON[kind % POISON.len()], "{}"),
                    event("hostile.good", "{}"),
                ],
            });
            kind += 1;
        }
        log.append(groups).await.unwrap();
    }
}

async fn catch_up(registry: &Arc<Registry>, name: &str, wasm: &[u8]) -> Duration {
    let manifest = format!(
        "name = \"{name}\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\"assistant.>\"]\n\
         [limits]\nbatch_size = 2048\n"
    );
    let start = Instant::now();
    registry
        .load(
            &manifest,
            wasm.to_vec(),
            false,
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    while registry.info(name).await.unwrap().lag > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    start.elapsed()
}

fn main() {
    let n: u64 = std::env::var("EVHOST_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stats = std::fs::read(root.join("target/plugins/assistant-stats.wasm"))
        .expect("target/plugins/assistant-stats.wasm: run scripts/build-plugins.sh first");
    let hostile =
        std::fs::read(root.join("target/plugins-build/wasm32-wasip2/release/hostile.wasm"))
            .expect("hostile.wasm: run scripts/build-plugins.sh first");
    let rt = common::tokio();
    println!("evhost containment benchmark ({n} events, 40 poison events)");
    rt.block_on(async {
        let host = common::host().await;
        let registry = &host.registry;
        ingest(&host.log, n, 40).await;
        // Compile once so neither side pays for it.
        catch_up(registry, "warm-up", &stats).await;

        let alone = catch_up(registry, "alone-1", &stats).await;
        let hostile_manifest = "name = \"hostile\"\nversion = \"1\"\nkind = \"extractor\"\nsubscriptions = [\"hostile.>\"]\n\
            [limits]\nmemory_mb = 32\nbatch_timeout_ms = 100\nbatch_size = 64\n\
            [on_failure]\nretries = 1\nbackoff_ms = 10\nmax_backoff_ms = 100\nquarantine_after = 0\n";
        registry.load(hostile_manifest, hostile.clone(), false, Default::default(), Default::default()).await.unwrap();
        let beside = catch_up(registry, "beside-hostile", &stats).await;
        let failing = registry.info("hostile").await.unwrap();
        registry.unload("hostile", true).await.unwrap();
        let alone2 = catch_up(registry, "alone-2", &stats).await;

        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        let best_alone = alone.min(alone2);
        println!("alone     assistant-stats catch-up:               {:>10.0} events/s ({:.0} and {:.0})", rate(best_alone), rate(alone), rate(alone2));
        println!("hostile   assistant-stats beside the offender:    {:>10.0} events/s", rate(beside));
        println!("ratio     beside / alone:                         {:>10.2}x  (target >= 0.8x)", best_alone.as_secs_f64() / beside.as_secs_f64());
        println!(
            "offender  while measured: {} calls, {} failed, {:.0} ms busy, {} dead letters, state {:?}",
            failing.usage.calls, failing.usage.failed_calls, failing.usage.busy_ms, failing.dead_letters, failing.status.state
        );
    });
}
