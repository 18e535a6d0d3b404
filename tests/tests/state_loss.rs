//! Losing a directory of the host's data never derives anything twice. `DATA/index` (the
//! log's index) is disposable: it is rebuilt from the segments and the plugins' state,
//! checkpoints and schemas are untouched. `DATA/state` (plugin state and checkpoints) is
//! not, but when it is lost anyway the extractors and tools find what they derived before
//! in the log and derive nothing again, while projections rebuild from the log.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use evhost_tests::{Host, all_events, get};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");

/// Waits until every loaded plugin has caught up with the head.
async fn settled(h: &Host) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, list) = get(&format!("{}/v1/plugins", h.url)).await;
        let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
        let answered = {
            let events = all_events(h).await;
            let q = events
                .iter()
                .filter(|e| e["type"] == "user.query.received")
                .count();
            let a = events
                .iter()
                .filter(|e| e["type"] == "answer.synthesized")
                .count();
            a >= q
        };
        if answered && !plugins.is_empty() && plugins.iter().all(|p| p["lag"] == 0) {
            // Let a late duplicate show.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return;
        }
        assert!(
            Instant::now() < deadline,
            "plugins did not catch up: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many times each derived event type was derived from each source event.
fn derivations(events: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in events {
        let ty = e["type"].as_str().unwrap();
        if matches!(
            ty,
            "memory.entity.extracted"
                | "plan.generated"
                | "answer.synthesized"
                | "tool.invocation.requested"
        ) {
            let key = format!("{ty} <- {}", e["metadata"]["causation_id"]);
            *out.entry(key).or_default() += 1;
        }
    }
    out
}

fn assert_once(events: &[Value], when: &str) {
    let d = derivations(events);
    assert!(!d.is_empty());
    let twice: Vec<_> = d.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{when}: derived more than once: {twice:?}"
    );
}

async fn put_schema(h: &Host) {
    let r = reqwest::Client::new()
        .put(format!("{}/v1/schemas/note.*", h.url))
        .json(&json!({"type": "object", "required": ["text"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn violating_append(h: &Host) -> u16 {
    let (s, _) = evhost_tests::post(
        &format!("{}/v1/streams/notes", h.url),
        json!({"events": [{"type": "note.added", "payload": {"no_text": 1}}]}),
    )
    .await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_index_or_the_state_directory_derives_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--plugins", PLUGINS];
    {
        let mut h = Host::start(BIN, &data, &args).await;
        put_schema(&h).await;
        let mut events = Vec::new();
        for i in 0..20 {
            events.push(
                json!({"stream": format!("mem-{i}"), "type": "memory.created",
                "payload": {"content": format!("Ada Lovelace met Charles Babbage on day {i}")}}),
            );
        }
        for i in 0..5 {
            events.push(
                json!({"stream": format!("chat-{i}"), "type": "user.query.received",
                "payload": {"query": format!("what is {i}+2*3")},
                "metadata": {"correlation_id": format!("c{i}")}}),
            );
        }
        let (s, r) =
            evhost_tests::post(&format!("{}/v1/events", h.url), json!({"events": events})).await;
        assert_eq!(s, 200, "{r}");
        settled(&h).await;
        assert_once(&all_events(&h).await, "before any loss");
        assert!(h.stop().success());
    }

    // The log's index is disposable (on NATS, the local index of client ids).
    let index = if evhost_tests::nats::on_nats() {
        "nats-index"
    } else {
        "index"
    };
    std::fs::remove_dir_all(data.join(index)).unwrap();
    let before = {
        let mut h = Host::start(BIN, &data, &args).await;
        settled(&h).await;
        let events = all_events(&h).await;
        assert_once(&events, "after losing DATA/index");
        assert_eq!(
            violating_append(&h).await,
            422,
            "schemas survive the index's loss"
        );
        assert!(h.stop().success());
        events.len()
    };

    // Operational state lost too: plugins start over, yet nothing is derived again.
    std::fs::remove_dir_all(data.join("state")).unwrap();
    let mut h = Host::start(BIN, &data, &args).await;
    settled(&h).await;
    let events = all_events(&h).await;
    assert_once(&events, "after losing DATA/state");
    assert_eq!(events.len(), before, "no event was derived again");
    // Projections rebuilt their state from the log.
    let (s, state) = get(&format!(
        "{}/v1/projections/type-counter/state?key=memory.created",
        h.url
    ))
    .await;
    assert_eq!(s, 200, "{state}");
    assert!(h.stop().success());
}
