//! Set-up the plugin benchmarks share: a two-thread tokio runtime like the host's, and a
//! host in a temporary directory started through [`Host`] (log, bus, state database, wasm
//! runtime, registry, the runner that answers requests for tools that are not loaded),
//! without the HTTP API and without the flow index (a runner over every event, which would
//! share the cores with the plugin measured).

#![allow(dead_code)] // each bench uses a part

use std::sync::Arc;

use evhost::plugin::{Runtime, StateView, Writes};
use evhost::registry::Registry;
use evhost::{
    Bus, Event, EventLog, EventType, ExpectedVersion, Host, HostConfig, NewEvent, Payload, SledLog,
    StreamAppend,
};

/// A host's parts, kept alive with their directory.
pub struct BenchHost {
    pub host: Host,
    pub log: Arc<SledLog>,
    pub dyn_log: Arc<dyn EventLog>,
    pub bus: Bus,
    /// The state database plugin stores live in.
    pub db: sled::Db,
    /// Its compile cache starts empty.
    pub runtime: Arc<Runtime>,
    pub registry: Arc<Registry>,
    pub dir: tempfile::TempDir,
}

/// The tokio runtime the benchmarks run in: two workers, like the machine.
pub fn tokio() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A fresh host in a temporary directory, with `evhost serve`'s defaults.
pub async fn host() -> BenchHost {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig {
        flow_index: false,
        ..HostConfig::new(dir.path())
    };
    let host = Host::start(config).await.unwrap();
    BenchHost {
        log: host.sled_log().expect("the embedded log").clone(),
        dyn_log: host.log().clone(),
        bus: host.bus().clone(),
        db: host.state_db().clone(),
        runtime: host.runtime().clone(),
        registry: host.registry().clone(),
        host,
        dir,
    }
}

/// The assistant event types the plugin benchmarks feed, with a payload each.
pub const TYPES: [(&str, &str); 6] = [
    (
        "assistant.tool.executed",
        r#"{"tool_name":"say","parameters":{"target":"room"},"reasoning":"greet the visitor","success":true}"#,
    ),
    (
        "assistant.tool.executed",
        r#"{"tool_name":"inspect_location","parameters":{},"reasoning":"look around","success":true}"#,
    ),
    (
        "assistant.tick.completed",
        r#"{"tick_number":42,"duration_ms":250.0,"action_taken":"say"}"#,
    ),
    (
        "assistant.goal.created",
        r#"{"goal_id":"g1","description":"Build tavern","priority":1}"#,
    ),
    (
        "assistant.reflection.recorded",
        r#"{"content":"went well","tags":["a"]}"#,
    ),
    (
        "assistant.goal.completed",
        r#"{"goal_id":"g1","outcome":"built"}"#,
    ),
];

/// A plugin's store over a state view, for native builds of the example plugins: writes
/// are kept aside, as the host's write buffer keeps them.
pub struct ViewStore {
    view: Arc<dyn StateView>,
    pub writes: Writes,
}

impl ViewStore {
    pub fn new(view: Arc<dyn StateView>) -> Self {
        Self {
            view,
            writes: Writes::new(),
        }
    }
}

impl evhost_sdk::Store for ViewStore {
    fn get(&mut self, key: &str) -> Option<String> {
        match self.writes.get(key) {
            Some(v) => v.clone(),
            // A benchmark's store does not fail; a real one would fail the call.
            None => self.view.get(key).expect("the benchmark's store reads"),
        }
    }
    fn set(&mut self, key: &str, value: &str) {
        self.writes.insert(key.to_owned(), Some(value.to_owned()));
    }
    fn delete(&mut self, key: &str) {
        self.writes.insert(key.to_owned(), None);
    }
    fn scan_prefix(&mut self, prefix: &str) -> Vec<(String, String)> {
        self.view
            .scan_prefix(prefix)
            .expect("the benchmark's store reads")
    }
}

/// An event as the SDK sees it, borrowing the host's event as the guest's decode borrows
/// its batch.
pub fn to_sdk(e: &Event) -> evhost_sdk::Event<'_> {
    evhost_sdk::Event {
        id: e.id.as_str().into(),
        event_type: e.event_type.as_str().into(),
        stream: e.stream.as_str().into(),
        position: e.position,
        version: e.version,
        timestamp_micros: e.timestamp.timestamp_micros(),
        source: e.source.as_str().into(),
        payload: e.payload.as_str().into(),
        metadata: Vec::new(),
    }
}

/// Event `i` of the assistant streams: the types of [`TYPES`] in turn.
pub fn event(i: u64) -> NewEvent {
    let (ty, payload) = TYPES[(i % TYPES.len() as u64) as usize];
    NewEvent::new(
        EventType::new(ty).unwrap(),
        Payload::from_json(payload).unwrap(),
    )
}

/// Appends `n` assistant events over 1,000 streams, 1,000 per append.
pub async fn ingest(log: &SledLog, n: u64) {
    for b in 0..n / 1000 {
        let groups = (0..10)
            .map(|s| StreamAppend {
                stream: format!("assistant-{}", (b * 10 + s) % 1000).into(),
                expected: ExpectedVersion::Any,
                events: (0..100).map(|i| event(b * 1000 + s * 100 + i)).collect(),
            })
            .collect();
        log.append(groups).await.unwrap();
    }
}

/// The log size of a plugin benchmark (`EVHOST_BENCH_EVENTS`, default 1,000,000), and
/// the bundled assistant-stats: its component and manifest text.
pub fn assistant_stats() -> (u64, Vec<u8>, String) {
    let n: u64 = std::env::var("EVHOST_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let wasm = std::fs::read(plugins.join("assistant-stats.wasm"))
        .expect("target/plugins/assistant-stats.wasm: run scripts/build-plugins.sh first");
    let manifest = std::fs::read_to_string(plugins.join("assistant-stats.toml")).unwrap();
    (n, wasm, manifest)
}
