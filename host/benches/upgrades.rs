//! Upgrade and time-travel benchmarks: assistant-stats upgraded to a rebuilt component over
//! the whole log while a client reads state as fast as it can (failed and partial reads,
//! the switch itself), and `at=` the middle of the log with snapshots and without.
//!
//! Needs the plugins built: `scripts/build-plugins.sh`, then
//! `cargo bench -p evhost --bench upgrades` (EVHOST_BENCH_EVENTS sets the log size,
//! default 1,000,000).

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use evhost::EventLog;
use evhost::log::ReadFilter;
use evhost::registry::{Registry, Upgrade};

/// The same component with a custom section added: another hash, the same behaviour.
fn rebuilt(wasm: &[u8]) -> Vec<u8> {
    let name = b"evhost-bench-rebuilt";
    let mut out = wasm.to_vec();
    out.push(0);
    out.push((name.len() + 1) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out
}

async fn caught_up(registry: &Registry, name: &str) {
    while registry.info(name).await.unwrap().lag > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn main() {
    let (n, wasm, manifest) = common::assistant_stats();
    let rt = common::tokio();
    println!("evhost upgrade and time-travel benchmarks ({n} events)");
    rt.block_on(async {
        let host = common::host().await;
        let registry = host.registry.clone();
        common::ingest(&host.log, n).await;
        let head = host.log.head();

        // Time travel to the middle: the same projection with snapshots (the default) and
        // without, side by side.
        let plain = manifest.replace("name = \"assistant-stats\"", "name = \"no-snapshots\"")
            + "\n[snapshots]\nevery = 0\n";
        // Timed from the load's answer: the first load also compiles the component.
        registry.load(&manifest, wasm.clone(), false, Default::default(), Upgrade::default()).await.unwrap();
        let t = Instant::now();
        caught_up(&registry, "assistant-stats").await;
        let catch_up = t.elapsed();
        registry.load(&plain, wasm.clone(), false, Default::default(), Upgrade::default()).await.unwrap();
        let t = Instant::now();
        caught_up(&registry, "no-snapshots").await;
        let catch_up_plain = t.elapsed();
        let mid = head / 2;
        // The worst case: right before a snapshot, so the replay runs a whole interval.
        let snapshots = evhost::plugin::PluginStore::open(&host.db, "assistant-stats")
            .unwrap()
            .snapshot_checkpoints()
            .unwrap();
        let next = *snapshots.iter().find(|&&c| c > mid + 1).expect("a snapshot past the middle");
        let mut replayed = Vec::new();
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for at in [mid, next - 2] {
            let t = Instant::now();
            let a = registry.state_at("assistant-stats", at).await.unwrap();
            with.push(t.elapsed());
            replayed.push(at + 1 - a.replayed_from);
            let t = Instant::now();
            let b = registry.state_at("no-snapshots", at).await.unwrap();
            without.push(t.elapsed());
            assert_eq!(a.get("assistant-7"), b.get("assistant-7"), "snapshots changed a past state");
        }
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        println!("catch-up  assistant-stats with snapshots every 100,000: {:>8.0} ms ({:.0} events/s)", catch_up.as_secs_f64() * 1e3, n as f64 / catch_up.as_secs_f64());
        println!("catch-up  the same without snapshots:                  {:>8.0} ms ({:.0} events/s)", catch_up_plain.as_secs_f64() * 1e3, n as f64 / catch_up_plain.as_secs_f64());
        println!("travel    at= the middle, from the nearest snapshot:    {:>8.1} ms  ({} events replayed; target < 300 ms at 10M events)", ms(&with[0]), replayed[0]);
        println!("travel    at= right before a snapshot (the worst case): {:>8.1} ms  ({} events replayed)", ms(&with[1]), replayed[1]);
        println!("travel    the same two, replayed from the start:        {:>8.1} and {:.1} ms", ms(&without[0]), ms(&without[1]));
        registry.unload("no-snapshots", true).await.unwrap();

        // Upgrade while a client reads as fast as it can.
        let before = registry.state("assistant-stats", "assistant-7", None, Duration::ZERO).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (registry, stop, want) = (registry.clone(), stop.clone(), before.0.clone());
            tokio::spawn(async move {
                let (mut reads, mut failed, mut partial, mut versions) = (0u64, 0u64, 0u64, Vec::<String>::new());
                while !stop.load(Ordering::Relaxed) {
                    match registry.state("assistant-stats", "assistant-7", None, Duration::ZERO).await {
                        Ok((value, at)) => {
                            if value != want {
                                partial += 1;
                            }
                            if versions.last() != Some(&at.component_hash) {
                                versions.push(at.component_hash);
                            }
                        }
                        Err(_) => failed += 1,
                    }
                    reads += 1;
                    tokio::task::yield_now().await;
                }
                (reads, failed, partial, versions)
            })
        };
        let t = Instant::now();
        let info = registry.load(&manifest, rebuilt(&wasm), false, Default::default(), Upgrade::default()).await.unwrap();
        let new_hash = info.candidate.expect("a candidate builds").component_hash;
        while registry.info("assistant-stats").await.unwrap().component_hash != new_hash {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let rebuild = t.elapsed();
        // A little longer, so the reader also reads the new version.
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.store(true, Ordering::Relaxed);
        let (reads, failed, partial, versions) = reader.await.unwrap();
        let page = host.dyn_log.read(head, 10_000, &ReadFilter::default()).await.unwrap();
        let switch_us = page
            .events
            .iter()
            .rev()
            .find(|e| e.event_type.as_str() == "evhost.plugin.switched")
            .map(|e| e.payload.to_value()["switch_us"].as_u64().unwrap())
            .expect("the switch is announced");
        println!("upgrade   rebuild of {n} events and switch:          {:>8.0} ms", rebuild.as_secs_f64() * 1e3);
        println!("upgrade   reads during it: {reads}, failed {failed}, partial {partial}, versions seen {}  (target 0 failed, 0 partial)", versions.len());
        println!("upgrade   the switch itself:                          {:>8.3} ms  (target < 10 ms)", switch_us as f64 / 1e3);
    });
}
