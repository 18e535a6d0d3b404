//! The crash harness: the real binary with several plugins (projections, extractors, tools,
//! and the hostile extractor dead-lettering poison events) under concurrent load, killed
//! with `kill -9` at random moments, round after round. Afterwards nothing acknowledged is
//! lost, nothing is duplicated, every projection equals a replay from scratch, and no
//! derived event, dead letter or tool invocation happened twice.
//!
//! `EVHOST_CRASH_ROUNDS` sets the number of rounds (20 by default); each round runs for
//! 0.2 to 1 s of load, so the test stays bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use evhost_tests::{Host, all_events, get, jitter, upload};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");
const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");

fn wasm(dir: &str, file: &str) -> Vec<u8> {
    std::fs::read(Path::new(dir).join(file)).unwrap()
}

/// Waits until every loaded plugin is at the head and none is failing.
async fn settled(h: &Host) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, list) = get(&format!("{}/v1/plugins", h.url)).await;
        let plugins = list["plugins"].as_array().unwrap();
        if plugins
            .iter()
            .all(|p| p["lag"] == 0 && p["state"] == "live")
        {
            return;
        }
        assert!(Instant::now() < deadline, "plugins did not settle: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every key and value a projection stores.
async fn dump(h: &Host, plugin: &str) -> BTreeMap<String, Value> {
    let (s, body) = get(&format!(
        "{}/v1/projections/{plugin}/state?prefix=&limit=10000",
        h.url
    ))
    .await;
    assert_eq!(s, 200, "{body}");
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["key"].as_str().unwrap().to_owned(), i["value"].clone()))
        .collect()
}

/// Counts events of `ty` by their causation id.
fn by_cause(events: &[Value], ty: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in events.iter().filter(|e| e["type"] == ty) {
        *m.entry(
            e["metadata"]["causation_id"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        )
        .or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_rounds_under_load_lose_nothing_and_apply_nothing_twice() {
    let rounds: u64 = std::env::var("EVHOST_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Vec<String> = Vec::new();
    for round in 0..rounds {
        let mut h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
        if round == 0 {
            let manifest = "name = \"hostile\"\nversion = \"1\"\nkind = \"extractor\"\n\
                subscriptions = [\"hostile.>\"]\n[limits]\nbatch_timeout_ms = 500\n\
                [on_failure]\nretries = 0\nbackoff_ms = 5\nmax_backoff_ms = 5\nquarantine_after = 0\n";
            let (s, body) = upload(&h, "hostile", manifest, wasm(BUILD, "hostile.wasm")).await;
            assert_eq!(s, 200, "{body}");
        }
        let url = h.url.clone();
        let writer = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ids = Vec::new();
            for i in 0u64.. {
                let id = |k: &str| format!("r{round}-{i}-{k}");
                let cid = id("q");
                let poison = if i % 5 == 0 {
                    "hostile.trap"
                } else {
                    "hostile.good"
                };
                let body = json!({"events": [
                    {"id": id("m"), "stream": format!("mem-{round}"), "type": "memory.created",
                     "payload": {"content": format!("Ada Lovelace met Charles Babbage in round {round} step {i}")}},
                    {"id": cid, "stream": format!("chat-{cid}"), "type": "user.query.received",
                     "payload": {"query": format!("what is {i}+2*3")},
                     "metadata": {"correlation_id": cid}},
                    {"id": id("a"), "stream": format!("assistant-{}", i % 4), "type": "assistant.tool.executed",
                     "payload": {"tool_name": format!("t{}", i % 3)}},
                    {"id": id("h"), "stream": "h", "type": poison, "payload": {}},
                ]});
                match client
                    .post(format!("{url}/v1/events"))
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        ids.extend(["m", "q", "a", "h"].map(id));
                    }
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        });
        tokio::time::sleep(Duration::from_millis(200 + jitter(800))).await;
        h.kill9();
        acked.extend(writer.await.unwrap());
    }

    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
    // Replicas of the projections, loaded now, replay the whole log from scratch.
    for (name, file, toml) in [
        (
            "type-counter",
            "type-counter.wasm",
            "subscriptions = [\">\"]",
        ),
        (
            "assistant-stats",
            "assistant-stats.wasm",
            "subscriptions = [\"assistant.>\"]",
        ),
        (
            "knowledge-graph",
            "knowledge-graph.wasm",
            "subscriptions = [\"memory.entity.extracted\"]",
        ),
    ] {
        let manifest =
            format!("name = \"{name}-replay\"\nversion = \"1\"\nkind = \"projection\"\n{toml}\n");
        let (s, body) = upload(
            &h,
            &format!("{name}-replay"),
            &manifest,
            wasm(PLUGINS, file),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    settled(&h).await;
    let events = all_events(&h).await;

    // Nothing acknowledged was lost, nothing is in the log twice.
    let mut ids = BTreeSet::new();
    for e in &events {
        let id = e["id"].as_str().unwrap();
        assert!(
            ids.insert(id.to_owned()),
            "event id {id} is in the log twice"
        );
    }
    let lost: Vec<&String> = acked.iter().filter(|id| !ids.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged events lost: {lost:?}");

    // Each memory extracted once; each query planned and answered once; each invocation
    // answered once.
    let extracted = by_cause(&events, "memory.entity.extracted");
    let plans = by_cause(&events, "plan.generated");
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| e["type"] == "answer.synthesized") {
        *answers
            .entry(e["metadata"]["correlation_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut requested = 0;
    for e in &events {
        match e["type"].as_str().unwrap() {
            "tool.invocation.requested" => requested += 1,
            "tool.invocation.completed" | "tool.invocation.failed" => {
                *outcomes
                    .entry(e["payload"]["invocation_id"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
            _ => {}
        }
    }
    let (mut memories, mut queries) = (0, 0);
    for e in &events {
        let id = e["id"].as_str().unwrap();
        match e["type"].as_str().unwrap() {
            "memory.created" => {
                memories += 1;
                assert_eq!(extracted.get(id), Some(&1), "memory {id}");
            }
            "user.query.received" => {
                queries += 1;
                assert_eq!(plans.get(id), Some(&1), "plan for {id}");
                let cid = e["metadata"]["correlation_id"].as_str().unwrap();
                assert_eq!(answers.get(cid), Some(&1), "answer for {cid}");
            }
            _ => {}
        }
    }
    assert_eq!(outcomes.len(), requested, "every invocation has an outcome");
    assert!(outcomes.values().all(|n| *n == 1), "{outcomes:?}");

    // Each poison event dead-lettered and announced once; each good one handled once.
    let (_, dlq) = get(&format!("{}/v1/dlq?plugin=hostile", h.url)).await;
    let letters: BTreeSet<String> = dlq["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["event_id"].as_str().unwrap().to_owned())
        .collect();
    let announced = by_cause(&events, "evhost.plugin.dead_lettered");
    let handled = by_cause(&events, "hostile.ok");
    let mut poison = 0;
    for e in &events {
        let id = e["id"].as_str().unwrap();
        match e["type"].as_str().unwrap() {
            "hostile.trap" => {
                poison += 1;
                assert!(letters.contains(id), "no dead letter for {id}");
                assert_eq!(announced.get(id), Some(&1), "announced {id}");
                assert_eq!(handled.get(id), None);
            }
            "hostile.good" => assert_eq!(handled.get(id), Some(&1), "handled {id}"),
            _ => {}
        }
    }
    assert_eq!(letters.len(), poison);

    // Every projection equals its replay from scratch.
    for name in ["type-counter", "assistant-stats", "knowledge-graph"] {
        let (live, replay) = (
            dump(&h, name).await,
            dump(&h, &format!("{name}-replay")).await,
        );
        assert!(!live.is_empty(), "{name} has no state");
        assert_eq!(live, replay, "{name} differs from its replay");
    }
    eprintln!(
        "{rounds} kill -9 rounds: {} acknowledged events, {} in the log, {memories} memories, \
         {queries} queries, {requested} invocations, {poison} dead letters",
        acked.len(),
        events.len()
    );
    assert!(memories > 0 && queries > 0 && poison > 0);
}
