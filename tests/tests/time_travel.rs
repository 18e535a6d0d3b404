//! Time travel end to end on the real binary: past states replayed from the nearest
//! snapshot, addressed by position or by a stream's version, read by key, prefix or
//! query, and compared between two positions.

use std::path::Path;

use evhost_tests::{Host, append, caught_up, get, get_refused, positions, upload};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");

const COUNTER: &str = "name = \"counter\"\nversion = \"1.0.0\"\nkind = \"projection\"\n\
                       subscriptions = [\"test.>\"]\n[snapshots]\nevery = 1000\nkeep = 3\n";

async fn at(h: &Host, query: &str) -> Value {
    let (s, body) = get(&format!("{}/v1/projections/counter/state?{query}", h.url)).await;
    assert_eq!(s, 200, "{query}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_states_replay_from_snapshots_by_position_or_version_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let wasm = std::fs::read(Path::new(PLUGINS).join("type-counter.wasm")).unwrap();
    let (s, info) = upload(&h, "counter", COUNTER, wasm).await;
    assert_eq!(s, 200, "{info}");
    // 10,000 events from `base` (after the load's audit event): test.a and test.b in turn;
    // committed a thousand at a time, so the projection passes a snapshot interval at each.
    let mut base = None;
    for start in (0..10_000u64).step_by(1000) {
        let events: Vec<Value> = (start..start + 1000)
            .map(|i| json!({"type": if i % 2 == 0 { "test.a" } else { "test.b" }, "payload": {}}))
            .collect();
        let reply = append(&h, "fill", events).await;
        base.get_or_insert(reply["positions"][0].as_u64().unwrap());
        caught_up(&h, "counter").await;
    }
    let base = base.unwrap();
    let a_at = |p: u64| (p - base) / 2 + 1;

    // Recent positions replay from a kept snapshot; older ones (past `keep`) from the start.
    for p in [0, 1_234, 4_999, 9_000, 9_501, 9_999].map(|p| p + base) {
        let body = at(&h, &format!("key=test.a&at={p}")).await;
        assert_eq!(body["value"], a_at(p), "at={p}: {body}");
        let from = body["replayed_from"].as_u64().unwrap();
        assert!(from <= p + 1, "at={p}: {body}");
        if p >= 8_100 + base {
            assert!(
                from >= 7_000,
                "at={p} replayed from {from}, not from a recent snapshot: {body}"
            );
        }
    }

    // By a stream's version: the third event of stream acct.
    let reply = append(
        &h,
        "acct",
        (0..5)
            .map(|i| json!({"type": "test.c", "payload": {"i": i}}))
            .collect::<Vec<_>>(),
    )
    .await;
    let positions: Vec<u64> = positions(&reply);
    caught_up(&h, "counter").await;
    let body = at(&h, "key=test.c&version=2&stream=acct").await;
    assert_eq!(
        (&body["value"], &body["at"]),
        (&json!(3), &json!(positions[2])),
        "{body}"
    );
    get_refused(
        &format!(
            "{}/v1/projections/counter/state?key=test.c&version=9&stream=acct",
            h.url
        ),
        400,
        "no event at version 9",
    )
    .await;

    // A prefix and a query at a past position.
    let body = at(&h, &format!("prefix=test.&at={}", base + 101)).await;
    assert_eq!(
        body["items"],
        json!([{"key": "test.a", "value": 51}, {"key": "test.b", "value": 51}]),
        "{body}"
    );
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v1/projections/counter/query?at={}",
            h.url,
            base + 101
        ))
        .json(&json!("test.a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["answer"], 51, "{body}");

    // What changed between two positions.
    let (s, diff) = get(&format!(
        "{}/v1/projections/counter/diff?from={}&to={}",
        h.url,
        base + 99,
        positions[4]
    ))
    .await;
    assert_eq!(s, 200, "{diff}");
    assert_eq!(
        (
            diff["changed"].as_u64(),
            diff["added"].as_u64(),
            diff["removed"].as_u64()
        ),
        (Some(2), Some(1), Some(0)),
        "{diff}"
    );
    let c = diff["sample"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["key"] == "test.c")
        .unwrap();
    assert_eq!((&c["old"], &c["new"]), (&Value::Null, &json!(5)), "{diff}");
    let a = diff["sample"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["key"] == "test.a")
        .unwrap();
    assert_eq!((&a["old"], &a["new"]), (&json!(50), &json!(5000)), "{diff}");
    let (s, _) = get(&format!(
        "{}/v1/projections/counter/diff?from=5&to=5",
        h.url
    ))
    .await;
    assert_eq!(s, 400);
}
