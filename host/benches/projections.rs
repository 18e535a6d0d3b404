//! Projection benchmarks: assistant-stats as wasm against the same logic compiled natively,
//! in the same runner and storage, side by side; catch-up of a fresh projection; latency
//! from append to committed state under live load; plugin load time; time travel.
//!
//! Needs the plugins built: `scripts/build-plugins.sh`, then
//! `cargo bench -p evhost --bench projections` (EVHOST_BENCH_EVENTS sets the log size,
//! default 1,000,000; EVHOST_BENCH_ROUNDS the native/wasm catch-up rounds, default 3).

// The allocator the `evhost` binary uses, so the figures are the binary's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use evhost::plugin::{
    Handler, HandlerError, Manifest, Output, PluginStore, ProjectionPlugin, StateView,
};
use evhost::runner::{Runner, RunnerOptions};
use evhost::{Bus, Event, EventLog, ExpectedVersion, PatternSet, StreamAppend};

/// assistant-stats compiled natively, run through the same runner and store as the wasm.
struct Native;

#[async_trait::async_trait]
impl Handler for Native {
    fn id(&self) -> &str {
        "assistant-stats@native"
    }
    async fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, HandlerError> {
        // On a blocking thread, as a wasm component's call runs.
        tokio::task::spawn_blocking(move || fold_native(view, &events))
            .await
            .expect("the native fold does not panic")
    }
}

/// The native projection's fold over one batch.
fn fold_native(view: Arc<dyn StateView>, events: &[Arc<Event>]) -> Result<Output, HandlerError> {
    // Borrowing the host's events, as the guest's decode borrows its batch.
    let evs: Vec<evhost_sdk::Event> = events.iter().map(|e| common::to_sdk(e)).collect();
    let mut store = common::ViewStore::new(view);
    evhost_sdk::testing::apply_batch::<assistant_stats::AssistantStatsProjection>(&mut store, &evs)
        .map_err(|e| HandlerError::Plugin(e.to_string()))?;
    Ok(Output {
        writes: store.writes,
        derived: Vec::new(),
    })
}

async fn catch_up(
    projector: Arc<dyn Handler>,
    log: &Arc<dyn EventLog>,
    db: &sled::Db,
    name: &str,
    bus: &Bus,
    head: u64,
    batch: usize,
) -> Duration {
    let store = PluginStore::open(db, name).unwrap();
    let start = Instant::now();
    let runner = Runner::spawn(
        name,
        projector,
        store,
        bus.clone(),
        log.clone(),
        PatternSet::parse_list("assistant.>").unwrap(),
        RunnerOptions {
            batch_size: batch,
            ..RunnerOptions::default()
        },
    )
    .unwrap();
    while runner.status().position < head {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = start.elapsed();
    runner.stop().await;
    took
}

fn main() {
    let (n, wasm, manifest_text) = common::assistant_stats();
    let manifest = Manifest::parse(&manifest_text).unwrap();
    let rt = common::tokio();
    println!("evhost projection benchmarks ({n} events)");
    rt.block_on(async {
        let host = common::host().await;
        let (log, dyn_log, bus, runtime) = (&host.log, &host.dyn_log, &host.bus, &host.runtime);
        common::ingest(log, n).await;
        let head = log.head();
        let db = host.db.clone();

        // Load: compile cold, then from the cache, then link and start.
        let cold = runtime.compile(&wasm).unwrap();
        let t = Instant::now();
        let warm = runtime.compile(&wasm).unwrap();
        assert!(warm.cached);
        let plugin: ProjectionPlugin = runtime.plugin(&warm, &manifest).unwrap();
        let ready = t.elapsed();
        println!("load      compile (first load):                   {:>10.1} ms", cold.took.as_secs_f64() * 1e3);
        println!("load      cached compiled form + link, to ready:  {:>10.2} ms  (target < 10 ms)", ready.as_secs_f64() * 1e3);

        // Side by side in one run, in rounds (EVHOST_BENCH_ROUNDS, default 3) of one
        // native and one wasm catch-up, the order swapped each round: on a noisy machine
        // the ratio within a round is what compares, and their median is the figure.
        let rounds: usize = std::env::var("EVHOST_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3)
            .max(1);
        let batch = manifest.limits.batch_size;
        let (mut natives, mut wasms, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let (native_name, wasm_name) = (format!("native-{r}"), format!("wasm-{r}"));
            let native_run = catch_up(Arc::new(Native), &dyn_log, &db, &native_name, &bus, head, batch);
            let wasm_run = catch_up(Arc::new(plugin.clone()), &dyn_log, &db, &wasm_name, &bus, head, batch);
            let (native, wasm_took) = if r % 2 == 0 {
                let native = native_run.await;
                (native, wasm_run.await)
            } else {
                let w = wasm_run.await;
                (native_run.await, w)
            };
            let a = PluginStore::open(&db, &wasm_name).unwrap().get("assistant-7").unwrap();
            let b = PluginStore::open(&db, &native_name).unwrap().get("assistant-7").unwrap();
            assert_eq!(a, b, "wasm and native states differ");
            natives.push(native);
            wasms.push(wasm_took);
            ratios.push(native.as_secs_f64() / wasm_took.as_secs_f64());
        }
        let rate = |d: &Duration| n as f64 / d.as_secs_f64();
        let list = |ds: &[Duration]| ds.iter().map(|d| format!("{:.0}", rate(d))).collect::<Vec<_>>().join(", ");
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 }
        };
        println!("catch-up  assistant-stats native, same runner:    {:>10.0} events/s (median; rounds: {})", median(natives.iter().map(rate).collect()), list(&natives));
        println!("catch-up  assistant-stats wasm:                   {:>10.0} events/s (median; rounds: {})  (target >= 500,000)", median(wasms.iter().map(rate).collect()), list(&wasms));
        println!(
            "ratio     wasm / native within each round:        {:>10.2}x (median; rounds: {})  (target >= 0.8x)",
            median(ratios.clone()),
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
        );

        // Time travel to the middle, through the registry as the API does it.
        let registry = &host.registry;
        registry.load(&manifest_text, wasm.clone(), false, Default::default(), Default::default()).await.unwrap();
        let t = Instant::now();
        let then = registry.state_at("assistant-stats", head / 2).await.unwrap().get("assistant-7");
        let travel = t.elapsed();
        assert!(then.is_some());
        println!("travel    state at position {} of {head}:      {:>10.0} ms  (target < 2,000 ms; no snapshots)", head / 2, travel.as_secs_f64() * 1e3);
        while registry.info("assistant-stats").await.unwrap().lag > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Live: append at 20,000 events/s (20 per millisecond) for 5 s; time from each
        // acknowledgement until the projection's committed checkpoint passes it.
        let appender = {
            let log = log.clone();
            tokio::spawn(async move {
                let mut acks: Vec<(u64, Instant)> = Vec::new();
                let start = Instant::now();
                for tick in 0..5_000u64 {
                    let due = start + Duration::from_millis(tick);
                    tokio::time::sleep_until(due.into()).await;
                    let r = log
                        .append(vec![StreamAppend {
                            stream: format!("assistant-{}", tick % 1000).into(),
                            expected: ExpectedVersion::Any,
                            events: (0..20).map(|i| common::event(tick * 20 + i)).collect(),
                        }])
                        .await
                        .unwrap();
                    acks.push((*r[0].positions.last().unwrap() + 1, Instant::now()));
                }
                (acks, start.elapsed())
            })
        };
        let mut seen: Vec<(u64, Instant)> = Vec::new();
        while !appender.is_finished() {
            seen.push((registry.info("assistant-stats").await.unwrap().status.position, Instant::now()));
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let (acks, took) = appender.await.unwrap();
        let end = acks.last().unwrap().0;
        while registry.info("assistant-stats").await.unwrap().status.position < end {
            seen.push((registry.info("assistant-stats").await.unwrap().status.position, Instant::now()));
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        seen.push((end, Instant::now()));
        let mut lat: Vec<Duration> = acks
            .iter()
            .map(|(pos, at)| {
                let done = seen.iter().find(|(p, t)| p >= pos && t >= at).map(|(_, t)| *t).unwrap_or_else(Instant::now);
                done.saturating_duration_since(*at)
            })
            .collect();
        lat.sort();
        println!(
            "live      {:.0} events/s appended: ack -> committed  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (target p99 < 50 ms)",
            100_000.0 / took.as_secs_f64(),
            lat[lat.len() / 2].as_secs_f64() * 1e3,
            lat[lat.len() * 99 / 100].as_secs_f64() * 1e3,
            lat.last().unwrap().as_secs_f64() * 1e3
        );
        registry.stop_all().await;
    });
}
