//! The runner's failure policy with a scripted handler (no wasm), on real sled and the real
//! log and bus: a failing event costs only itself, the host's own failures are retried and
//! never dead-lettered.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evhost::plugin::OnFailure;
use evhost::plugin::{Output, PluginStore, StateView, Writes};
use evhost::runner::{BatchError, BatchHandler, Runner, RunnerOptions};
use evhost::{
    Bus, Event, EventLog, EventType, ExpectedVersion, Hub, NewEvent, PatternSet, Payload, SledLog,
    SledLogConfig, StreamAppend,
};

/// Counts events per stream in state key `count`; fails as the plugin on events whose
/// payload is `"bad"`, and as the host on the first `host_failures` calls.
struct Scripted {
    host_failures: AtomicU64,
    calls: AtomicU64,
    seen: Mutex<Vec<u64>>,
}

#[async_trait::async_trait]
impl BatchHandler for Scripted {
    fn id(&self) -> &str {
        "scripted@1"
    }

    async fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, BatchError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .host_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(BatchError::Host("the store failed (scripted)".into()));
        }
        if let Some(bad) = events.iter().find(|e| e.payload.as_str() == "\"bad\"") {
            return Err(BatchError::Plugin(format!(
                "cannot fold position {}",
                bad.position
            )));
        }
        let mut count: u64 = view
            .get("count")
            .map_err(|e| BatchError::Host(e.to_string()))?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.seen
            .lock()
            .unwrap()
            .extend(events.iter().map(|e| e.position));
        count += events.len() as u64;
        let mut writes = Writes::new();
        writes.insert("count".into(), Some(count.to_string()));
        Ok(Output {
            writes,
            derived: Vec::new(),
        })
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    log: Arc<SledLog>,
    bus: Bus,
    db: sled::Db,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::new(1000);
    let log =
        Arc::new(SledLog::open(SledLogConfig::new(dir.path().join("log")), hub.clone()).unwrap());
    let dyn_log: Arc<dyn EventLog> = log.clone();
    let bus = Bus::new(dyn_log, hub);
    let db = sled::open(dir.path().join("state")).unwrap();
    Setup {
        _dir: dir,
        log,
        bus,
        db,
    }
}

async fn append(log: &SledLog, payloads: &[&str]) {
    let events = payloads
        .iter()
        .map(|p| {
            NewEvent::new(
                EventType::new("test.e").unwrap(),
                Payload::from_json(p).unwrap(),
            )
        })
        .collect();
    log.append(vec![StreamAppend {
        stream: "s".into(),
        expected: ExpectedVersion::Any,
        events,
    }])
    .await
    .unwrap();
}

fn options(on_failure: OnFailure) -> RunnerOptions {
    RunnerOptions {
        on_failure,
        ..RunnerOptions::built_in(64)
    }
}

/// A runner of `handler` over `test.>` events, with `on_failure`; its store too.
fn spawn(s: &Setup, handler: Arc<Scripted>, on_failure: OnFailure) -> (Runner, PluginStore) {
    let store = PluginStore::open(&s.db, "scripted").unwrap();
    let runner = Runner::spawn(
        "scripted",
        handler,
        store.clone(),
        s.bus.clone(),
        s.log.clone(),
        PatternSet::parse_list("test.>").unwrap(),
        options(on_failure),
    )
    .unwrap();
    (runner, store)
}

fn scripted(host_failures: u64) -> Arc<Scripted> {
    Arc::new(Scripted {
        host_failures: AtomicU64::new(host_failures),
        calls: AtomicU64::new(0),
        seen: Mutex::new(Vec::new()),
    })
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One failing event in a batch: the events before and after it are folded, exactly that
/// one is dead-lettered after its retries, and the checkpoint passes the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_costs_only_itself() {
    let s = setup();
    append(&s.log, &["1", "2", "\"bad\"", "4", "5"]).await;
    let handler = scripted(0);
    let (runner, store) = spawn(
        &s,
        handler.clone(),
        OnFailure {
            retries: 2,
            backoff_ms: 1,
            max_backoff_ms: 5,
            quarantine_after: 0,
        },
    );
    until("the checkpoint passes the head", || {
        runner.status().position >= 5
    })
    .await;
    let seen: HashSet<u64> = handler.seen.lock().unwrap().iter().copied().collect();
    assert_eq!(seen, HashSet::from([0, 1, 3, 4]));
    assert_eq!(store.get("count").unwrap().as_deref(), Some("4"));
    let letters = store.dead_letters().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0, 2, "exactly the failing event");
    assert_eq!(runner.status().dead_lettered, 1);
    runner.stop().await;
}

/// The host's own failures (a store or the log) are retried with backoff until they pass;
/// nothing is dead-lettered and nothing is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_failures_are_retried_never_dead_lettered() {
    let s = setup();
    append(&s.log, &["1", "2", "3"]).await;
    let handler = scripted(3);
    let (runner, store) = spawn(
        &s,
        handler.clone(),
        OnFailure {
            retries: 0,
            backoff_ms: 1,
            max_backoff_ms: 5,
            quarantine_after: 1,
        },
    );
    until("the checkpoint passes the head", || {
        runner.status().position >= 3
    })
    .await;
    assert!(
        handler.calls.load(Ordering::SeqCst) >= 4,
        "retried after each host failure"
    );
    assert_eq!(
        store.dead_letter_count(),
        0,
        "a host failure is never dead-lettered"
    );
    assert!(
        runner.status().quarantine.is_none(),
        "nor does it quarantine"
    );
    assert_eq!(
        store.get("count").unwrap().as_deref(),
        Some("3"),
        "each event once"
    );
    runner.stop().await;
}
