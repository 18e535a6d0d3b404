//! Acknowledged events survive `kill -9`: concurrent clients append to the real binary, it
//! is killed at a random moment, restarted, and every acknowledged event must be there
//! exactly once, at the position it was acknowledged with, with positions gap-free.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evhost_tests::{Host, jitter};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const ROUNDS: usize = 5;
const CLIENTS: usize = 8;

/// What clients learned: acknowledged ids with positions, and requests left unanswered.
#[derive(Default)]
struct Ledger {
    acked: HashMap<String, u64>,
    unanswered: Vec<(String, Value)>,
}

async fn append(client: &reqwest::Client, url: &str, body: &Value) -> Result<Value, String> {
    let r = client
        .post(url)
        .json(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("status {}", r.status()));
    }
    r.json().await.map_err(|e| e.to_string())
}

fn record(ledger: &Mutex<Ledger>, body: &Value, reply: &Value) {
    let mut l = ledger.lock().unwrap();
    for (e, p) in body["events"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reply["positions"].as_array().unwrap())
    {
        l.acked
            .insert(e["id"].as_str().unwrap().to_owned(), p.as_u64().unwrap());
    }
}

async fn read_all(url: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page: Value = reqwest::get(format!("{url}/v1/events?from={from}&limit=10000"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.extend(page["events"].as_array().unwrap().iter().cloned());
        let next = page["next"].as_u64().unwrap();
        if next >= page["head"].as_u64().unwrap() {
            return out;
        }
        from = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..ROUNDS {
        let mut host = Host::start(BIN, dir.path(), &[]).await;
        // Requests cut off by the previous kill are retried with the same ids: each must end
        // up in the log exactly once, whether or not it had been written.
        let retries = std::mem::take(&mut ledger.lock().unwrap().unanswered);
        let client = reqwest::Client::new();
        for (stream, body) in retries {
            let reply = append(&client, &format!("{}/v1/streams/{stream}", host.url), &body)
                .await
                .expect("retry after restart");
            record(&ledger, &body, &reply);
        }
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let (url, ledger, client) = (host.url.clone(), ledger.clone(), client.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let stream = format!("client-{c}");
                    // Every fifth request is a batch, so multi-event commits are killed too.
                    let n = if i % 5 == 4 { 20 } else { 1 };
                    let events: Vec<Value> = (0..n)
                        .map(|k| json!({"id": format!("r{round}-c{c}-{i}-{k}"), "type": "load.appended", "payload": {"i": i, "k": k}}))
                        .collect();
                    let body = json!({"events": events});
                    match append(&client, &format!("{url}/v1/streams/{stream}"), &body).await {
                        Ok(reply) => record(&ledger, &body, &reply),
                        Err(_) => {
                            ledger.lock().unwrap().unanswered.push((stream, body));
                            return;
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(200 + jitter(800))).await;
        host.kill9();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let host = Host::start(BIN, dir.path(), &[]).await;
    let retries = std::mem::take(&mut ledger.lock().unwrap().unanswered);
    let client = reqwest::Client::new();
    for (stream, body) in retries {
        let reply = append(&client, &format!("{}/v1/streams/{stream}", host.url), &body)
            .await
            .unwrap();
        record(&ledger, &body, &reply);
    }
    let events = read_all(&host.url).await;
    let positions: Vec<u64> = events
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(
        positions,
        (0..events.len() as u64).collect::<Vec<_>>(),
        "positions are gap-free"
    );
    let mut ids = HashSet::new();
    let mut at: HashMap<&str, u64> = HashMap::new();
    for e in &events {
        let id = e["id"].as_str().unwrap();
        assert!(ids.insert(id), "event {id} is in the log twice");
        at.insert(id, e["position"].as_u64().unwrap());
    }
    let ledger = ledger.lock().unwrap();
    assert!(
        ledger.acked.len() > 100,
        "the load acknowledged only {} events",
        ledger.acked.len()
    );
    for (id, pos) in &ledger.acked {
        assert_eq!(
            at.get(id.as_str()),
            Some(pos),
            "acknowledged event {id} lost or moved"
        );
    }
    // Versions per stream are gap-free too.
    let mut versions: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in &events {
        versions
            .entry(e["stream"].as_str().unwrap())
            .or_default()
            .push(e["version"].as_u64().unwrap());
    }
    for (stream, v) in versions {
        assert_eq!(
            v,
            (0..v.len() as u64).collect::<Vec<_>>(),
            "versions of {stream}"
        );
    }
    eprintln!(
        "{ROUNDS} kill -9 rounds: {} events acknowledged, {} in the log",
        ledger.acked.len(),
        events.len()
    );
}
