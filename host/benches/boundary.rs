//! The cost of crossing the plugin boundary, with the runtime alone: events in memory, state
//! in a `MemState`, no log, bus, runner or sled. Each projection folds the same batches as
//! wasm and as the same Rust compiled natively (through the SDK's batch semantics, the
//! native side borrowing the host's events), side by side. type-counter does almost nothing
//! per event, so its wasm figure is mostly the boundary and the SDK's fold; it runs built
//! against contract 0.2.0 (the batch as one encoded buffer, decoded in place) and against
//! 0.1.0 (a list of records, a string per field), the two ways a batch can cross.
//! batch-count only decodes and counts: the boundary alone. Also the cost of one call of
//! one event.
//!
//! Needs the plugins built: `scripts/build-plugins.sh`, then
//! `cargo bench -p evhost --bench boundary` (EVHOST_BENCH_EVENTS sets the events per pass,
//! default 200,000).

// The allocator the `evhost` binary uses, so the figures are the binary's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use evhost::plugin::{Manifest, MemState, ProjectionPlugin, Runtime, StateView, Writes};
use evhost::{Event, EventType, Metadata, Payload};

/// type-counter's projection (plugins/type-counter), compiled here: its crate exports the
/// same guest symbols as assistant-stats, so the two cannot both be linked natively.
struct TypeCounter;

impl evhost_sdk::Projection for TypeCounter {
    type State = u64;

    fn key<'e>(
        event: &'e evhost_sdk::Event,
    ) -> Result<std::borrow::Cow<'e, str>, evhost_sdk::Error> {
        Ok(std::borrow::Cow::Borrowed(&event.event_type))
    }

    fn apply(
        _type: &str,
        count: &mut u64,
        _event: &evhost_sdk::Event,
    ) -> Result<(), evhost_sdk::Error> {
        *count += 1;
        Ok(())
    }
}

/// Events per call in the batched runs.
const BATCH: usize = 2048;

/// `n` events of the assistant types, in memory, as the log would hand them out: spread
/// over 1,000 streams in turn, or in runs of `run` events per stream (as the projection
/// bench's log holds them, 100 per stream per append).
fn events_in_runs(n: usize, run: usize) -> Vec<Arc<Event>> {
    let now = chrono::Utc::now();
    (0..n)
        .map(|i| {
            let (ty, payload) = common::TYPES[i % common::TYPES.len()];
            Arc::new(Event {
                id: uuid::Uuid::now_v7().to_string().into(),
                event_type: EventType::new(ty).unwrap(),
                stream: format!("assistant-{}", i / run % 1000).into(),
                position: i as u64,
                version: (i / 1000) as u64,
                timestamp: now,
                source: "bench".into(),
                payload: Payload::from_json(payload).unwrap(),
                metadata: Metadata::default(),
            })
        })
        .collect()
}

/// How one side folds a batch into the state.
type Fold<'a> = Box<dyn Fn(Arc<dyn StateView>, &[Arc<Event>]) -> Writes + 'a>;

/// Folds every event in calls of `batch`, applying each call's writes; time per event.
fn run(fold: &Fold<'_>, events: &[Arc<Event>], batch: usize) -> Duration {
    let state = Arc::new(MemState::default());
    let t = Instant::now();
    for chunk in events.chunks(batch) {
        let writes = fold(state.clone(), chunk);
        state.apply(writes);
    }
    t.elapsed() / events.len() as u32
}

/// The SDK's batch semantics over the same events, natively.
fn native<P: evhost_sdk::Projection>() -> Fold<'static> {
    Box::new(|view, events| {
        let evs: Vec<evhost_sdk::Event> = events.iter().map(|e| common::to_sdk(e)).collect();
        let mut store = common::ViewStore::new(view);
        evhost_sdk::testing::apply_batch::<P>(&mut store, &evs).unwrap();
        store.writes
    })
}

fn wasm(plugin: &ProjectionPlugin) -> Fold<'_> {
    Box::new(move |view, events| plugin.fold(view, events).unwrap())
}

fn load(runtime: &Arc<Runtime>, name: &str) -> ProjectionPlugin {
    load_with(runtime, name, None)
}

/// A bundled plugin, with a fuel budget per event if `fuel` is given.
fn load_with(runtime: &Arc<Runtime>, name: &str, fuel: Option<u64>) -> ProjectionPlugin {
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let wasm = std::fs::read(plugins.join(format!("{name}.wasm"))).unwrap_or_else(|_| {
        panic!("target/plugins/{name}.wasm: run scripts/build-plugins.sh first")
    });
    let mut manifest =
        Manifest::parse(&std::fs::read_to_string(plugins.join(format!("{name}.toml"))).unwrap())
            .unwrap();
    if fuel.is_some() {
        manifest.limits.fuel_per_event = fuel;
    }
    let compiled = runtime.compile_for(&manifest, &wasm).unwrap();
    runtime.plugin(&compiled, &manifest).unwrap()
}

/// A test guest straight from the plugins' build (it has no manifest of its own).
fn load_built(runtime: &Arc<Runtime>, crate_name: &str, manifest: &str) -> ProjectionPlugin {
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins-build/wasm32-wasip2/release");
    let wasm = std::fs::read(built.join(format!("{crate_name}.wasm")))
        .unwrap_or_else(|_| panic!("{crate_name}.wasm: run scripts/build-plugins.sh first"));
    let manifest = Manifest::parse(manifest).unwrap();
    let compiled = runtime.compile_for(&manifest, &wasm).unwrap();
    runtime.plugin(&compiled, &manifest).unwrap()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: usize = std::env::var("EVHOST_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(&dir.path().join("compiled")).unwrap();
    let events = events_in_runs(n, 1);
    println!("evhost boundary benchmark ({n} events per pass, runtime only, state in memory)");
    let counter = load(&runtime, "type-counter");
    // The same projection built against evhost:plugin@0.1.0, whose batch crosses as a list
    // of records (a string per field, each allocated in the guest by the host): the other
    // way a batch can cross, measured beside the 0.2.0 buffer.
    let counter_v01 = load_built(
        &runtime,
        "v0_1_type_counter",
        "name = \"v0-1-type-counter\"\nversion = \"0.1.0\"\nkind = \"projection\"\nsubscriptions = [\">\"]\n",
    );
    let stats = load(&runtime, "assistant-stats");
    let sides: [(&str, Fold<'_>, Fold<'_>); 3] = [
        ("type-counter", wasm(&counter), native::<TypeCounter>()),
        (
            "type-counter@0.1",
            wasm(&counter_v01),
            native::<TypeCounter>(),
        ),
        (
            "assistant-stats",
            wasm(&stats),
            native::<assistant_stats::AssistantStatsProjection>(),
        ),
    ];
    for (name, wasm, native) in &sides {
        // Warm both (instances, caches), then native, wasm, native again (a noise check).
        run(wasm, &events[..BATCH.min(n)], BATCH);
        let n1 = run(native, &events, BATCH);
        let w = run(wasm, &events, BATCH);
        let n2 = run(native, &events, BATCH);
        let nat = (n1 + n2) / 2;
        println!(
            "batch     {name:<16} wasm {:>6} ns/event  native {:>5} ns/event ({} and {})  ratio {:.2}x  (target >= 0.5x, batches of {BATCH})",
            w.as_nanos(),
            nat.as_nanos(),
            n1.as_nanos(),
            n2.as_nanos(),
            nat.as_secs_f64() / w.as_secs_f64()
        );
    }
    // The boundary alone: a guest that decodes every envelope of each batch and only counts
    // (the host's encoding, the copy into wasm, the guest's decode, one state write a
    // batch).
    let count = load_built(
        &runtime,
        "batch_count",
        "name = \"batch-count\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\">\"]\n",
    );
    let counting = wasm(&count);
    run(&counting, &events[..BATCH.min(n)], BATCH);
    let b = run(&counting, &events, BATCH);
    println!(
        "boundary  batch-count      wasm {:>6} ns/event  (decode and count only, target <= 500 ns, batches of {BATCH})",
        b.as_nanos()
    );
    // The same projection written in JavaScript and Python (plugins/guests/), beside the
    // Rust build: the time to compile each (the load of a component not yet cached) and
    // its cost per event. Skipped, with a note, until scripts/build-guests.sh has run.
    let guests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins-guests");
    let compile_dir = tempfile::tempdir().unwrap();
    let fresh = Runtime::new(compile_dir.path()).unwrap();
    let rust_load = {
        let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
        let wasm = std::fs::read(plugins.join("type-counter.wasm")).unwrap();
        let manifest =
            Manifest::parse(&std::fs::read_to_string(plugins.join("type-counter.toml")).unwrap())
                .unwrap();
        fresh.compile_for(&manifest, &wasm).unwrap().took
    };
    let guest_events = &events[..n.min(50_000)];
    let rust_guest = run(&wasm(&counter), guest_events, BATCH);
    println!(
        "language  type-counter     rust   {:>6} ns/event  compile {:>7.0} ms  (batches of {BATCH})",
        rust_guest.as_nanos(),
        rust_load.as_secs_f64() * 1e3
    );
    for name in ["type-counter-js", "type-counter-py"] {
        let Ok(wasm_bytes) = std::fs::read(guests.join(format!("{name}.wasm"))) else {
            println!("language  {name}: not built (scripts/build-guests.sh)");
            continue;
        };
        let manifest =
            Manifest::parse(&std::fs::read_to_string(guests.join(format!("{name}.toml"))).unwrap())
                .unwrap();
        let compiled = fresh.compile_for(&manifest, &wasm_bytes).unwrap();
        let plugin: ProjectionPlugin = fresh.plugin(&compiled, &manifest).unwrap();
        let fold = wasm(&plugin);
        run(&fold, &guest_events[..BATCH.min(guest_events.len())], BATCH);
        let per = run(&fold, guest_events, BATCH);
        println!(
            "language  {name:<16} {:<6} {:>6} ns/event  compile {:>7.0} ms  ({:.1} MB of wasm; {:.1}x Rust's time per event)",
            if name.ends_with("js") { "js" } else { "python" },
            per.as_nanos(),
            compiled.took.as_secs_f64() * 1e3,
            wasm_bytes.len() as f64 / 1e6,
            per.as_secs_f64() / rust_guest.as_secs_f64()
        );
    }
    // The guests' own work per event, counted: fuel is wasmtime's count of the wasm
    // instructions run, so unlike the times above the machine's noise does not move it
    // (the host's encoding and copy are not in it). Both layouts: streams in turn (as
    // above) and runs of 100 events per stream (as the catch-up benchmark's log).
    let runs = events_in_runs(n.min(100_000), 100);
    for name in ["type-counter", "assistant-stats"] {
        for (layout, evs) in [
            ("spread", &events[..n.min(100_000)]),
            ("runs of 100", &runs[..]),
        ] {
            let plugin = load_with(&runtime, name, Some(100_000_000));
            run(&wasm(&plugin), evs, BATCH);
            println!(
                "fuel      {name:<16} {:>8.0} per event  (streams {layout}, batches of {BATCH})",
                plugin.usage().fuel_used_per_event.unwrap_or(f64::NAN)
            );
        }
    }
    let count = load_built(
        &runtime,
        "batch_count",
        "name = \"batch-count\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\">\"]\n[limits]\nfuel_per_event = 100000000\n",
    );
    run(&wasm(&count), &runs, BATCH);
    println!(
        "fuel      batch-count      {:>8.0} per event  (the SDK's decode, with its UTF-8 checks, and a count)",
        count.usage().fuel_used_per_event.unwrap_or(f64::NAN)
    );
    // One call of one event: the fixed cost of a call (instance, store, epoch deadline).
    let few = &events[..n.min(20_000)];
    for (name, wasm, _) in &sides[..2] {
        let one = run(wasm, few, 1);
        println!(
            "call      {name:<16} one event per call: {:>8.2} µs per call",
            one.as_secs_f64() * 1e6
        );
    }
}
