//! The component sandbox, on the real runtime with a real `.wasm` (the sandbox-probe test
//! plugin): time and memory limits, traps, and a WASI context that grants nothing. A
//! failing call fails only itself: the next call on the same plugin works.

use std::sync::Arc;

use chrono::Utc;
use evhost::plugin::{Manifest, MemState, PluginError, ProjectionPlugin, Runtime, StateView};
use evhost::{Event, EventType, Metadata, Payload};

const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");

fn probe(cache: &std::path::Path) -> ProjectionPlugin {
    probe_with(cache, "")
}

/// The probe with `extra` manifest lines (e.g. a `[capabilities]` table).
fn probe_with(cache: &std::path::Path, extra: &str) -> ProjectionPlugin {
    let runtime = Runtime::new(cache).unwrap();
    let wasm = std::fs::read(format!("{BUILD}/sandbox_probe.wasm")).unwrap();
    let compiled = runtime.compile(&wasm).unwrap();
    let manifest = Manifest::parse(&format!(
        "name = \"probe\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\"probe.>\"]\n\
         [limits]\nmemory_mb = 32\nbatch_timeout_ms = 300\n{extra}"
    ))
    .unwrap();
    runtime.plugin(&compiled, &manifest).unwrap()
}

fn event(ty: &str, position: u64) -> Arc<Event> {
    Arc::new(Event {
        id: format!("e{position}").into(),
        event_type: EventType::new(ty).unwrap(),
        stream: "s".into(),
        position,
        version: position,
        timestamp: Utc::now(),
        source: String::new(),
        payload: Payload::from_json("{}").unwrap(),
        metadata: Metadata::default(),
    })
}

fn call(p: &ProjectionPlugin, state: &Arc<MemState>, ty: &str) -> Result<(), PluginError> {
    let view: Arc<dyn StateView> = state.clone();
    let writes = p.fold(view, &[event(ty, 0)])?;
    state.apply(writes);
    Ok(())
}

fn seen(state: &MemState) -> serde_json::Value {
    serde_json::from_str(&state.get("probe").unwrap().unwrap_or_else(|| "{}".into())).unwrap()
}

fn assert_trapped(r: Result<(), PluginError>, want: &str) {
    match r {
        Err(
            PluginError::Trapped { plugin, message } | PluginError::TimedOut { plugin, message },
        ) => {
            assert_eq!(plugin, "probe@1");
            assert!(message.contains(want), "{message}");
        }
        other => panic!("expected a trap naming {want:?}, got {other:?}"),
    }
}

#[test]
fn limits_and_traps_fail_only_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path());
    let state = Arc::new(MemState::default());
    call(&p, &state, "probe.ok").unwrap();

    let started = std::time::Instant::now();
    let looped = call(&p, &state, "probe.loop");
    assert!(
        matches!(looped, Err(PluginError::TimedOut { .. })),
        "{looped:?}"
    );
    assert_trapped(looped, "longer than its limit of 300 ms");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the loop was stopped"
    );
    assert_trapped(call(&p, &state, "probe.alloc"), "memory limit of 32 MiB");
    // A Rust guest's panic message is the trap's reason.
    assert_trapped(
        call(&p, &state, "probe.trap"),
        "trapped: wasm `unreachable` executed: the plugin panicked at ",
    );
    assert_trapped(
        call(&p, &state, "probe.trap"),
        "the probe was asked to panic",
    );
    assert_trapped(call(&p, &state, "probe.recurse"), "trapped");

    // Nothing of the failed calls was kept, and the plugin still works.
    call(&p, &state, "probe.ok").unwrap();
    assert_eq!(seen(&state)["probe.ok"], "2");
    assert!(seen(&state).get("alloc").is_none());
}

#[test]
fn the_sandbox_grants_no_environment_arguments_or_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path());
    let state = Arc::new(MemState::default());
    call(&p, &state, "probe.env").unwrap();
    call(&p, &state, "probe.file").unwrap();
    let s = seen(&state);
    assert!(s["env"].as_str().unwrap().starts_with("denied"), "{s}");
    assert_eq!(s["args"], "0");
    assert!(s["file"].as_str().unwrap().starts_with("Err"), "{s}");
    assert!(s["dir"].as_str().unwrap().starts_with("Err"), "{s}");
    call(&p, &state, "probe.net").unwrap();
    assert!(
        seen(&state)["net"].as_str().unwrap().starts_with("Err"),
        "{}",
        seen(&state)
    );
}

/// Reads what the probe saw of the clock and of randomness in one call over `batch`.
fn clock_and_random(p: &ProjectionPlugin, batch: &[Arc<Event>]) -> (String, String) {
    let state = Arc::new(MemState::default());
    let view: Arc<dyn StateView> = state.clone();
    state.apply(p.fold(view, batch).unwrap());
    let s = seen(&state);
    (
        s["clock"].as_str().unwrap().to_owned(),
        s["random"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn clock_and_randomness_are_fixed_unless_granted_and_deterministic_when_granted() {
    let dir = tempfile::tempdir().unwrap();
    let batch = [event("probe.clock", 0), event("probe.random", 1)];
    let bare = probe(dir.path());
    let (clock, random) = clock_and_random(&bare, &batch);
    assert_eq!(clock, "0", "no clock grant: the clock reads the Unix epoch");
    assert_eq!(
        clock_and_random(&bare, &batch).1,
        random,
        "no random grant: a fixed seed"
    );

    let granted = probe_with(dir.path(), "[capabilities]\nclock = true\nrandom = true\n");
    let (clock, random) = clock_and_random(&granted, &batch);
    let last = batch[1].timestamp.timestamp_micros().to_string();
    assert_eq!(
        clock, last,
        "a projection's clock reads its batch's last event"
    );
    assert_eq!(
        clock_and_random(&granted, &batch),
        (clock, random.clone()),
        "a replay of the batch sees the same time and numbers"
    );
    let other = [event("probe.clock", 7), event("probe.random", 8)];
    assert_ne!(
        clock_and_random(&granted, &other).1,
        random,
        "another batch, another seed"
    );
}

#[test]
fn a_compiled_component_is_cached_by_content_hash() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(format!("{BUILD}/sandbox_probe.wasm")).unwrap();
    let first = Runtime::new(dir.path()).unwrap().compile(&wasm).unwrap();
    assert!(!first.cached);
    let again = Runtime::new(dir.path()).unwrap().compile(&wasm).unwrap();
    assert!(again.cached);
    assert_eq!(first.hash, again.hash);
    eprintln!("compile {:?}, load from cache {:?}", first.took, again.took);
}

#[test]
fn a_component_of_another_world_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(dir.path()).unwrap();
    let wasm = std::fs::read(format!("{BUILD}/wrong_world.wasm")).unwrap();
    let compiled = runtime.compile(&wasm).unwrap();
    let manifest = Manifest::parse(
        "name = \"other\"\nversion = \"2\"\nkind = \"projection\"\nsubscriptions = [\">\"]\n",
    )
    .unwrap();
    let linked: Result<ProjectionPlugin, _> = runtime.plugin(&compiled, &manifest);
    match linked {
        Err(PluginError::Load { plugin, message }) => {
            assert_eq!(plugin, "other@2");
            // It names what the component exports and what each world wants.
            for part in [
                "implements no evhost plugin world: it exports greet",
                "evhost:plugin/projection@0.2.0 (evhost:plugin/projection-handler@0.2.0)",
                "evhost:plugin/tool@0.1.0 (describe, invoke)",
            ] {
                assert!(message.contains(part), "{part:?} not in: {message}");
            }
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a component of another world was accepted"),
    }
}

/// A fuel budget fails a runaway call the same way on every machine, well before its time
/// limit, and the plugin's usage shows the fuel, time and memory it used.
#[test]
fn a_fuel_budget_stops_a_runaway_call_and_usage_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(dir.path()).unwrap();
    let wasm = std::fs::read(format!("{BUILD}/sandbox_probe.wasm")).unwrap();
    let manifest = Manifest::parse(
        "name = \"probe\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\"probe.>\"]\n\
         [limits]\nmemory_mb = 32\nbatch_timeout_ms = 60000\nfuel_per_event = 50000000\n",
    )
    .unwrap();
    let plain = runtime.compile(&wasm).unwrap();
    let compiled = runtime.compile_for(&manifest, &wasm).unwrap();
    let p: ProjectionPlugin = runtime.plugin(&compiled, &manifest).unwrap();
    let state = Arc::new(MemState::default());
    call(&p, &state, "probe.count").unwrap();
    let started = std::time::Instant::now();
    assert_trapped(call(&p, &state, "probe.loop"), "ran out of fuel");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "fuel, not the 60 s time limit, stopped the loop"
    );
    call(&p, &state, "probe.count").unwrap();
    let u = p.usage();
    assert_eq!(u.calls, 3);
    assert_eq!(u.failed_calls, 1);
    assert_eq!(u.fuel_per_event, Some(50_000_000));
    assert!(u.max_call_fuel >= 50_000_000, "{u:?}");
    assert!(u.fuel_consumed > u.max_call_fuel, "{u:?}");
    // Per event: three calls of one event each, one of them burning its whole budget.
    assert_eq!(u.events, 3);
    let per = u
        .fuel_used_per_event
        .expect("a budgeted plugin shows fuel per event");
    assert!(
        per > 50_000_000.0 / 3.0 && per <= 50_000_000.0,
        "fuel per event {per}: {u:?}"
    );
    assert!(u.ns_per_event.is_some_and(|ns| ns > 0.0), "{u:?}");
    assert!(
        u.peak_memory_bytes > 0 && u.peak_memory_bytes <= 32 << 20,
        "{u:?}"
    );
    // A component compiled for the plain engine is refused for a fuel-budgeted manifest.
    let refused: Result<ProjectionPlugin, _> = runtime.plugin(&plain, &manifest);
    assert!(
        matches!(&refused, Err(PluginError::Load { message, .. }) if message.contains("other engine")),
        "{:?}",
        refused.err()
    );
}

/// A state store that fails its reads while `failing` is set.
struct FlakyView {
    inner: Arc<MemState>,
    failing: std::sync::atomic::AtomicBool,
}

impl StateView for FlakyView {
    fn get(&self, key: &str) -> Result<Option<String>, evhost::plugin::StateError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(evhost::plugin::StateError("injected read failure".into()));
        }
        self.inner.get(key)
    }
    fn scan_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, evhost::plugin::StateError> {
        self.inner.scan_prefix(prefix)
    }
}

/// A state read the store fails is the host's failure: the call fails as `Host` (which the
/// runner retries and never dead-letters), never as the plugin's fault, and the plugin never
/// sees the key as absent, so its state is not started over.
#[test]
fn a_failed_state_read_fails_the_call_as_the_hosts_fault() {
    let dir = tempfile::tempdir().unwrap();
    let p = probe(dir.path());
    let state = Arc::new(MemState::default());
    call(&p, &state, "probe.ok").unwrap();
    call(&p, &state, "probe.ok").unwrap();
    let before = seen(&state);
    let flaky = Arc::new(FlakyView {
        inner: state.clone(),
        failing: true.into(),
    });
    let view: Arc<dyn StateView> = flaky.clone();
    match p.fold(view, &[event("probe.ok", 2)]) {
        Err(PluginError::Host { plugin, message }) => {
            assert_eq!(plugin, "probe@1");
            assert!(message.contains("injected read failure"), "{message}");
        }
        other => panic!("expected the host's failure, got {other:?}"),
    }
    assert_eq!(seen(&state), before, "nothing was written");
    flaky
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let view: Arc<dyn StateView> = flaky.clone();
    let writes = p.fold(view, &[event("probe.ok", 2)]).unwrap();
    state.apply(writes);
    let after = seen(&state);
    assert_eq!(before["probe.ok"], "2");
    assert_eq!(
        after["probe.ok"], "3",
        "the retry folds onto the state as it was, not onto a reset one: {after}"
    );
}
