//! The runner's policies with a scripted handler (no wasm), on real sled and the real log
//! and bus: a failing event costs only itself; retries back off as configured; dead letters
//! in a row quarantine, a success between resets the count, and resume continues from the
//! checkpoint; a crash between the append of derived events and the commit appends nothing
//! twice; an idle checkpoint settles at the head; the host's own failures are retried and
//! never dead-lettered.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evhost::plugin::Derived;
use evhost::plugin::OnFailure;
use evhost::plugin::{Handler, HandlerError, Output, PluginStore, StateView, Writes};
use evhost::runner::{RunState, Runner, RunnerOptions};
use evhost::{
    Bus, Event, EventLog, EventType, ExpectedVersion, Hub, NewEvent, PatternSet, Payload,
    ReadFilter, SledLog, SledLogConfig, StreamAppend,
};

/// Counts the events it folds in state key `count`; fails as the plugin on events whose
/// payload is `"bad"`, and as the host on the first `host_failures` calls. When `derives`,
/// it derives one `copy.made` event per event it folds.
struct Scripted {
    host_failures: AtomicU64,
    calls: AtomicU64,
    seen: Mutex<Vec<u64>>,
    /// When each call that met a bad event began.
    failed_at: Mutex<Vec<Instant>>,
    derives: bool,
}

#[async_trait::async_trait]
impl Handler for Scripted {
    fn id(&self) -> &str {
        "scripted@1"
    }

    async fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .host_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(HandlerError::Host("the store failed (scripted)".into()));
        }
        if let Some(bad) = events.iter().find(|e| e.payload.as_str() == "\"bad\"") {
            self.failed_at.lock().unwrap().push(Instant::now());
            return Err(HandlerError::Plugin(format!(
                "cannot fold position {}",
                bad.position
            )));
        }
        let mut count: u64 = view
            .get("count")
            .map_err(|e| HandlerError::Host(e.to_string()))?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.seen
            .lock()
            .unwrap()
            .extend(events.iter().map(|e| e.position));
        count += events.len() as u64;
        let mut writes = Writes::new();
        writes.insert("count".into(), Some(count.to_string()));
        let derived = events
            .iter()
            .map(|e| {
                let mut copy = NewEvent::new(
                    EventType::new("copy.made").unwrap(),
                    Payload::from_json(&e.position.to_string()).unwrap(),
                );
                copy.source = "scripted".into();
                let d = Derived {
                    stream: "copies".into(),
                    event: copy,
                };
                if self.derives { vec![d] } else { Vec::new() }
            })
            .collect();
        Ok(Output { writes, derived })
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
    append_typed(log, "test.e", payloads).await
}

async fn append_typed(log: &SledLog, event_type: &str, payloads: &[&str]) {
    let events = payloads
        .iter()
        .map(|p| {
            NewEvent::new(
                EventType::new(event_type).unwrap(),
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

/// A policy with `retries` and `quarantine_after` and waits of a few milliseconds.
fn quick(retries: u32, quarantine_after: u32) -> OnFailure {
    OnFailure {
        retries,
        backoff_ms: 1,
        max_backoff_ms: 5,
        quarantine_after,
    }
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
        failed_at: Mutex::new(Vec::new()),
        derives: false,
    })
}

fn deriving() -> Arc<Scripted> {
    Arc::new(Scripted {
        derives: true,
        ..Arc::into_inner(scripted(0)).unwrap()
    })
}

/// The `copy.made` events in the log, by the position they copy.
async fn copies(log: &SledLog) -> Vec<u64> {
    let filter = ReadFilter {
        source: Some("scripted".into()),
        ..ReadFilter::default()
    };
    let page = log.read(0, 10_000, &filter).await.unwrap();
    page.events
        .iter()
        .map(|e| e.payload.as_str().parse().unwrap())
        .collect()
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
    let (runner, store) = spawn(&s, handler.clone(), quick(2, 0));
    until("the checkpoint passes the head", || {
        runner.status().position >= 5
    })
    .await;
    let seen: HashSet<u64> = handler.seen.lock().unwrap().iter().copied().collect();
    assert_eq!(seen, HashSet::from([0, 1, 3, 4]));
    assert_eq!(store.get("count").unwrap().as_deref(), Some("4"));
    let letters = store.dead_letters().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].position, 2, "exactly the failing event");
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
    let (runner, store) = spawn(&s, handler.clone(), quick(0, 1));
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

/// A failing event is retried `retries` times, each wait twice the last from `backoff_ms`
/// and never longer than `max_backoff_ms`, then dead-lettered with every attempt counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_as_configured() {
    let s = setup();
    append(&s.log, &["\"bad\""]).await;
    let handler = scripted(0);
    let (runner, store) = spawn(
        &s,
        handler.clone(),
        OnFailure {
            retries: 3,
            backoff_ms: 60,
            max_backoff_ms: 150,
            quarantine_after: 0,
        },
    );
    until("the event is dead-lettered", || {
        store.dead_letter_count() == 1
    })
    .await;
    let at = handler.failed_at.lock().unwrap().clone();
    assert_eq!(at.len(), 4, "the first call and three retries");
    let waits: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (wait, least) in waits.iter().zip([60, 120, 150]) {
        assert!(
            *wait >= Duration::from_millis(least),
            "waits {waits:?}: each at least {least} ms (doubling, capped at 150 ms)"
        );
    }
    let letter = store.dead_letter(0).unwrap().expect("the dead letter");
    assert_eq!(letter.attempts, 4);
    assert!(
        letter.error.contains("cannot fold position 0"),
        "{}",
        letter.error
    );
    runner.stop().await;
}

/// `quarantine_after` dead letters in a row quarantine the plugin at its checkpoint; an
/// event handled between two dead letters resets the count; the quarantine survives a
/// restart, and resume continues from the checkpoint with every event after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_in_a_row_quarantine_until_resumed() {
    let s = setup();
    let policy = quick(0, 2);
    // Dead letters at 0, 2 and 3: the good event at 1 resets the count, so only 2 and 3
    // are two in a row.
    append(&s.log, &["\"bad\"", "1", "\"bad\"", "\"bad\"", "4", "5"]).await;
    let handler = scripted(0);
    let (runner, store) = spawn(&s, handler.clone(), policy.clone());
    until("the plugin is quarantined", || {
        runner.status().state == RunState::Quarantined
    })
    .await;
    let q = runner.status().quarantine.expect("why it is quarantined");
    assert_eq!(q.dead_letters_in_a_row, 2);
    assert_eq!(q.position, 4, "quarantined past the third dead letter");
    let positions: Vec<u64> = store
        .dead_letters()
        .unwrap()
        .iter()
        .map(|d| d.position)
        .collect();
    assert_eq!(positions, [0, 2, 3]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !handler.seen.lock().unwrap().iter().any(|p| *p >= 4),
        "nothing past the quarantine is handled"
    );
    assert_eq!(store.get("count").unwrap().as_deref(), Some("1"));

    // A restart keeps the quarantine.
    runner.stop().await;
    let handler = scripted(0);
    let (runner, store) = spawn(&s, handler.clone(), policy);
    assert_eq!(runner.status().state, RunState::Quarantined);
    assert_eq!(store.quarantine().unwrap().map(|q| q.position), Some(4));

    assert!(
        runner.controller().resume().await.unwrap(),
        "it was quarantined"
    );
    until("the checkpoint passes the head", || {
        runner.status().position >= 6
    })
    .await;
    assert_eq!(
        *handler.seen.lock().unwrap(),
        [4, 5],
        "from the checkpoint on"
    );
    assert_eq!(store.get("count").unwrap().as_deref(), Some("3"));
    assert!(store.quarantine().unwrap().is_none());
    assert!(
        !runner.controller().resume().await.unwrap(),
        "no longer quarantined"
    );
    runner.stop().await;
}

/// A dead letter the operator deleted no longer counts toward a quarantine: with
/// `quarantine_after = 2`, a dead letter, its deletion, and another dead letter leave the
/// plugin running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_dead_letter_no_longer_counts_toward_quarantine() {
    let s = setup();
    let handler = scripted(0);
    let (runner, store) = spawn(&s, handler.clone(), quick(0, 2));
    append(&s.log, &["\"bad\""]).await;
    until("the first dead letter", || store.dead_letter_count() == 1).await;
    assert_eq!(runner.status().dead_letters_in_a_row, 1);
    assert!(runner.controller().delete(0).await.unwrap(), "it was there");
    assert_eq!(runner.status().dead_letters_in_a_row, 0);
    append(&s.log, &["\"bad\"", "2"]).await;
    until("the checkpoint passes the head", || {
        runner.status().position >= 3
    })
    .await;
    assert_ne!(
        runner.status().state,
        RunState::Quarantined,
        "{:?}",
        runner.status()
    );
    assert_eq!(store.get("count").unwrap().as_deref(), Some("1"));
    runner.stop().await;
}

/// A crash between the append of derived events and the commit of the checkpoint (the
/// checkpoint is put back where it was, as after such a crash): the batch runs again on
/// restart and each derived event is in the log once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_append_and_commit_appends_nothing_twice() {
    let s = setup();
    append(&s.log, &["0", "1", "2", "3"]).await;
    let policy = OnFailure::default();
    let (runner, store) = spawn(&s, deriving(), policy.clone());
    until("the checkpoint passes the source events", || {
        runner.status().position >= 4
    })
    .await;
    runner.stop().await;
    assert_eq!(copies(&s.log).await, [0, 1, 2, 3]);
    // The commit is lost: the checkpoint is back at the start, the derived events stay.
    store.commit(&Writes::new(), 0, 0).unwrap();

    let handler = deriving();
    let (runner, _store) = spawn(&s, handler.clone(), policy);
    append(&s.log, &["8"]).await;
    until("the new event is copied", || runner.status().position >= 9).await;
    let seen = handler.seen.lock().unwrap().clone();
    assert!(
        seen.starts_with(&[0, 1, 2, 3]),
        "the batch ran again: {seen:?}"
    );
    assert_eq!(
        copies(&s.log).await,
        [0, 1, 2, 3, 8],
        "each derived event once, and the new one"
    );
    runner.stop().await;
}

/// With nothing matching after its last event, the checkpoint settles at the head (so a
/// restart rescans nothing), the runner is live, and nothing is counted as handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_checkpoint_settles_at_the_head() {
    let s = setup();
    let handler = scripted(0);
    let (runner, store) = spawn(&s, handler.clone(), OnFailure::default());
    append(&s.log, &["1", "2", "3"]).await;
    until("the matching events are handled", || {
        runner.status().position >= 3
    })
    .await;
    // Live now: what follows matches nothing the runner subscribed to.
    let others: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    append_typed(&s.log, "other.e", &others).await;
    until("the checkpoint settles at the head", || {
        store.checkpoint().unwrap() == Some(53)
    })
    .await;
    let status = runner.status();
    assert_eq!(status.position, 53);
    assert_eq!(status.state, RunState::Live);
    assert_eq!(status.events_processed, 3, "only matching events count");
    runner.stop().await;

    let handler = scripted(0);
    let (runner, _store) = spawn(&s, handler.clone(), OnFailure::default());
    append(&s.log, &["4"]).await;
    until("the new event is handled", || {
        runner.status().position >= 54
    })
    .await;
    assert_eq!(
        *handler.seen.lock().unwrap(),
        [53],
        "a restart reads from the head"
    );
    runner.stop().await;
}
