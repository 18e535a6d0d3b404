//! Extractors and tool workers end to end: the real binary with the real `.wasm` plugins,
//! real sled, real HTTP on loopback, and a local HTTP server whose request counts are the
//! tools' side effects.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use evhost_tests::{
    CountingServer, Host, all_events, answered, append, get, jitter, logged_flows,
    position_reaches, upload, upload_granted,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");
const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(PLUGINS).join(format!("{name}.wasm"))).unwrap()
}

/// The http-get manifest granting exactly `authority`.
/// What the bundled http-get asks for, granted as the README's `scripts/run.sh` grants it.
const GRANT: &str = "http-get=http:127.0.0.1:8931";

fn http_get_manifest(authority: &str, timeout_ms: u64) -> String {
    format!(
        "name = \"http-get\"\nversion = \"0.1.0\"\nkind = \"tool\"\n[limits]\nbatch_timeout_ms = {timeout_ms}\n\
         [capabilities]\nhttp = [\"{authority}\"]\n"
    )
}

fn query(text: &str, correlation: &str) -> Value {
    json!({"type": "user.query.received", "payload": {"query": text},
           "metadata": {"correlation_id": correlation}})
}

fn request(invocation: &str, tool: &str, input: Value) -> Value {
    json!({"type": "tool.invocation.requested",
           "payload": {"invocation_id": invocation, "tool": tool, "input": input}})
}

/// Waits until every invocation in `ids` has an outcome; returns outcomes by id.
async fn outcomes(h: &Host, ids: &[&str]) -> BTreeMap<String, Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for e in all_events(h).await {
            let t = e["type"].as_str().unwrap();
            if t == "tool.invocation.completed" || t == "tool.invocation.failed" {
                let id = e["payload"]["invocation_id"].as_str().unwrap().to_owned();
                by_id.entry(id).or_default().push(e);
            }
        }
        if ids.iter().all(|id| by_id.contains_key(*id)) {
            return by_id;
        }
        assert!(Instant::now() < deadline, "missing outcomes: {by_id:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_flows_through_plan_and_tool_to_an_answer_with_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS, "--grant", GRANT]).await;
    append(&h, "chat-1", json!([query("what is 2+3*4", "flow-1")])).await;
    let flow = answered(&h, "flow-1").await;
    let events = flow["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "user.query.received",
            "plan.generated",
            "tool.invocation.requested",
            "tool.invocation.started",
            "tool.invocation.completed",
            "answer.synthesized"
        ]
    );
    let answer = events[5]["payload"]["answer"].as_str().unwrap();
    assert!(answer.contains("14"), "{answer}");
    // Every derived event names its cause, which comes earlier in the same flow.
    for (i, e) in events.iter().enumerate().skip(1) {
        assert_eq!(e["metadata"]["correlation_id"], "flow-1");
        let cause = e["metadata"]["causation_id"].as_str().unwrap();
        assert!(events[..i].iter().any(|c| c["id"] == cause), "{e}");
    }
    assert_eq!(events[4]["payload"]["output"]["value"], 14);
    assert_eq!(flow["tools"][0]["tool"], "math");
    assert!(flow["tools"][0]["latency_ms"].as_f64().unwrap() >= 0.0);
    assert!(flow["latency_ms"].as_f64().unwrap() > 0.0);

    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let (_, m) = get(&format!("{}/v1/metrics", h.url)).await;
        if m["flows"]["answered"] == 1 {
            break m;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metrics["tools"]["math"]["completed"], 1);
    assert_eq!(metrics["tools"]["math"]["latency"]["count"], 1);
    let (_, tools) = get(&format!("{}/v1/tools", h.url)).await;
    let names: Vec<&str> = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"math") && names.contains(&"http-get"),
        "{tools}"
    );
    assert_eq!(
        get(&format!("{}/v1/flows/no-such-flow", h.url)).await.0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invocation_runs_once_and_bad_requests_fail_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS, "--grant", GRANT]).await;
    append(
        &h,
        "calls",
        json!([
            request("twice", "math", json!({"expression": "6*7"})),
            request("twice", "math", json!({"expression": "6*7"})),
            request("schema", "math", json!({"expr": "1"})),
            request("zero", "math", json!({"expression": "1/0"})),
            request("ghost", "no-such-tool", json!({})),
        ]),
    )
    .await;
    let by_id = outcomes(&h, &["twice", "schema", "zero", "ghost"]).await;
    // The same invocation id again, later: still no second run.
    append(
        &h,
        "calls",
        json!([request("twice", "math", json!({"expression": "6*7"}))]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let by_id_later = outcomes(&h, &["twice"]).await;
    for (id, list) in &by_id_later {
        assert_eq!(list.len(), 1, "{id} has {} outcomes: {list:?}", list.len());
    }
    let started = all_events(&h)
        .await
        .into_iter()
        .filter(|e| {
            e["type"] == "tool.invocation.started" && e["payload"]["invocation_id"] == "twice"
        })
        .count();
    assert_eq!(started, 1, "the invocation ran once");

    let one = |id: &str| by_id[id][0].clone();
    assert_eq!(one("twice")["type"], "tool.invocation.completed");
    assert_eq!(one("twice")["payload"]["output"]["value"], 42);
    let schema = one("schema");
    assert_eq!(schema["type"], "tool.invocation.failed");
    assert_eq!(schema["payload"]["error"]["code"], "invalid_input");
    let msg = schema["payload"]["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("schema of tool math") && msg.contains("expression"),
        "{msg}"
    );
    let zero = one("zero");
    assert_eq!(zero["payload"]["error"]["code"], "refused");
    assert!(
        zero["payload"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("division by zero")
    );
    let ghost = one("ghost");
    assert_eq!(ghost["payload"]["error"]["code"], "unknown_tool");
    assert!(
        ghost["payload"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-tool")
    );
    // No start was recorded for what never ran.
    assert!(
        !all_events(&h)
            .await
            .iter()
            .any(|e| e["type"] == "tool.invocation.started"
                && ["schema", "ghost"].contains(&e["payload"]["invocation_id"].as_str().unwrap()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_reaches_granted_hosts_only() {
    let granted = CountingServer::start(Duration::ZERO).await;
    let other = CountingServer::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let (s, body) = upload_granted(
        &h,
        "http-get",
        &http_get_manifest(&granted.authority, 5000),
        wasm("http-get"),
        &[&format!("http:{}", granted.authority)],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    append(
        &h,
        "fetch",
        json!([
            request(
                "yes",
                "http-get",
                json!({"url": format!("http://{}/hello", granted.authority)})
            ),
            request(
                "no",
                "http-get",
                json!({"url": format!("http://{}/secret", other.authority)})
            ),
        ]),
    )
    .await;
    let by_id = outcomes(&h, &["yes", "no"]).await;
    let yes = &by_id["yes"][0];
    assert_eq!(yes["type"], "tool.invocation.completed", "{yes}");
    assert_eq!(yes["payload"]["output"]["status"], 200);
    assert_eq!(yes["payload"]["output"]["body"], "ok /hello");
    assert_eq!(granted.count("/hello"), 1);
    let no = &by_id["no"][0];
    assert_eq!(no["type"], "tool.invocation.failed", "{no}");
    // The tool's own failure (Error::Failed), not a refusal of its input.
    assert_eq!(no["payload"]["error"]["code"], "failed", "{no}");
    let msg = no["payload"]["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("denied") && msg.contains("not granted"),
        "{msg}"
    );
    assert_eq!(other.total(), 0, "a host outside the grant saw no request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractor_cycle_stops_at_the_depth_limit() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let manifest =
        "name = \"echo\"\nversion = \"1\"\nkind = \"extractor\"\nsubscriptions = [\"echo.>\"]\n";
    let component = std::fs::read(format!("{BUILD}/echo_cycle.wasm")).unwrap();
    let (s, body) = upload(&h, "echo", manifest, component).await;
    assert_eq!(s, 200, "{body}");
    append(&h, "loop", json!([{"type": "echo.start", "payload": {}}])).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let (_, info) = get(&format!("{}/v1/plugins/echo", h.url)).await;
        if info["dropped_by_depth"] == 1 && info["lag"] == 0 {
            break info;
        }
        assert!(Instant::now() < deadline, "{info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(info["derived"], 16, "{info}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let echoes = all_events(&h)
        .await
        .iter()
        .filter(|e| e["type"] == "echo.again")
        .count();
    assert_eq!(echoes, 16, "the chain ends at depth 16");
    assert_eq!(get(&format!("{}/health", h.url)).await.0, 200);
}

/// `kill -9` at random moments while memories and queries arrive: afterwards every memory
/// has exactly one extraction, every flow is answered exactly once, every invocation has
/// exactly one outcome, and the local server saw each URL at most once (exactly once when
/// the invocation completed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_rounds_derived_events_and_tool_calls_happen_exactly_once() {
    let server = CountingServer::start(Duration::from_millis(40)).await;
    let dir = tempfile::tempdir().unwrap();
    let rounds = 5;
    let mut flows: Vec<String> = Vec::new();
    let mut memories = 0u64;
    for round in 0..rounds {
        let mut h = Host::start(
            BIN,
            dir.path(),
            // The uploaded http-get (granted the counting server) must outlive restarts.
            &["--plugins", PLUGINS, "--plugin-precedence", "uploaded"],
        )
        .await;
        if round == 0 {
            let m = http_get_manifest(&server.authority, 5000);
            // The load's grant is kept with the upload and holds at every restart.
            let grant = format!("http:{}", server.authority);
            let (s, body) = upload_granted(&h, "http-get", &m, wasm("http-get"), &[&grant]).await;
            assert_eq!(s, 200, "{body}");
        }
        let url = h.url.clone();
        let authority = server.authority.clone();
        let writer = tokio::spawn(async move {
            let mut sent: Vec<(String, u64)> = Vec::new();
            for i in 0u64.. {
                let cid = format!("r{round}-q{i}");
                let events = json!({"events": [
                    {"stream": format!("mem-{round}"), "type": "memory.created",
                     "payload": {"content": format!("Ada Lovelace met Charles Babbage in round {round} step {i}")}},
                    {"stream": format!("chat-{cid}"), "type": "user.query.received",
                     "payload": {"query": format!("what is {i}+2*3 and fetch http://{authority}/{cid}")},
                     "metadata": {"correlation_id": cid}},
                ]});
                let r = reqwest::Client::new()
                    .post(format!("{url}/v1/events"))
                    .json(&events)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => sent.push((cid, 1)),
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            sent
        });
        tokio::time::sleep(Duration::from_millis(300 + jitter(700))).await;
        h.kill9();
        let sent = writer.await.unwrap();
        memories += sent.len() as u64;
        flows.extend(sent.into_iter().map(|(c, _)| c));
    }
    let h = Host::start(
        BIN,
        dir.path(),
        // The uploaded http-get (granted the counting server) must outlive restarts.
        &["--plugins", PLUGINS, "--plugin-precedence", "uploaded"],
    )
    .await;
    // A query the kill left unanswered may still be in the log: check every flow it holds.
    let acked = flows;
    let flows = logged_flows(&all_events(&h).await);
    assert!(
        acked.iter().all(|c| flows.contains(c)),
        "an acknowledged query was lost"
    );
    for cid in &flows {
        answered(&h, cid).await;
    }
    // Let the runners settle so a late duplicate would show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = all_events(&h).await;
    let count = |ty: &str| events.iter().filter(|e| e["type"] == ty).count();
    assert!(
        count("memory.created") as u64 >= memories,
        "an acknowledged memory was lost"
    );
    let mut extracted_from: BTreeMap<String, usize> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e["type"] == "memory.entity.extracted")
    {
        *extracted_from
            .entry(e["metadata"]["causation_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for e in events.iter().filter(|e| e["type"] == "memory.created") {
        let id = e["id"].as_str().unwrap();
        assert_eq!(
            extracted_from.get(id),
            Some(&1),
            "memory {id} extracted {:?} times",
            extracted_from.get(id)
        );
    }
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e["type"] == "answer.synthesized" || e["type"] == "plan.generated")
    {
        *answers
            .entry(format!("{}:{}", e["type"], e["metadata"]["correlation_id"]))
            .or_default() += 1;
    }
    assert!(answers.values().all(|n| *n == 1), "{answers:?}");
    assert_eq!(answers.len(), 2 * flows.len());
    let (completed, interrupted) = evhost_tests::check_tool_outcomes(&events, &flows, &server);
    eprintln!(
        "{rounds} rounds: {} flows, {memories} memories, http-get completed {completed}, interrupted by a kill {interrupted}",
        flows.len()
    );
    assert!(completed > 0);
}

/// An invocation that waits on a slow host is cut off at the tool's time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_invocation_fails_at_the_time_limit() {
    let slow = CountingServer::start(Duration::from_secs(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let (s, body) = upload_granted(
        &h,
        "http-get",
        &http_get_manifest(&slow.authority, 1_500),
        wasm("http-get"),
        &[&format!("http:{}", slow.authority)],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let url = format!("http://{}/slow", slow.authority);
    append(
        &h,
        "fetch",
        json!([request("slow", "http-get", json!({ "url": url }))]),
    )
    .await;
    let by_id = outcomes(&h, &["slow"]).await;
    let o = &by_id["slow"][0];
    assert_eq!(o["type"], "tool.invocation.failed", "{o}");
    let msg = o["payload"]["error"]["message"].as_str().unwrap();
    assert!(msg.to_lowercase().contains("timeout"), "{msg}");
    let ms = o["payload"]["duration_ms"].as_f64().unwrap();
    // The limit is generous and the host far slower, so that a loaded machine still sends
    // the request inside the limit; what matters is that the call ends near the limit,
    // long before the host would answer, and that the request was made once, not retried.
    assert!(
        ms < 8_000.0,
        "ran {ms} ms against a limit of 1500 ms and a 20 s host"
    );
    assert_eq!(slow.count("/slow"), 1, "the slow host saw the request once");
}

/// `/v1/metrics` counts every invocation of a tool, with or without a correlation id, and
/// tells the completed ones from the failed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_metrics_count_every_invocation_by_its_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS, "--grant", GRANT]).await;
    let calls = json!([
        request("ok-1", "math", json!({"expression": "1+2"})),
        request("ok-2", "math", json!({"expression": "2*3"})),
        request("bad-1", "math", json!({"expression": "2/"})),
    ]);
    append(&h, "calls", calls).await;
    let by_id = outcomes(&h, &["ok-1", "ok-2", "bad-1"]).await;
    assert_eq!(by_id["bad-1"][0]["type"], "tool.invocation.failed");
    let deadline = Instant::now() + Duration::from_secs(20);
    let math = loop {
        let (_, m) = get(&format!("{}/v1/metrics", h.url)).await;
        if m["tools"]["math"]["invocations"] == 3 {
            break m["tools"]["math"].clone();
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(math["completed"], 2, "{math}");
    assert_eq!(math["failed"], 1, "{math}");
    assert_eq!(math["latency"]["count"], 3, "{math}");
}

/// A worker handles its next batch while the last one's outcomes are still being appended:
/// a request repeated in that batch, on another stream or with other input, must be
/// skipped as a duplicate, as it is once the outcome is in the log: the invocation neither
/// runs again nor gets a second outcome, and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_repeated_in_the_next_batch_runs_once_with_its_real_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS, "--grant", GRANT]).await;
    // 700 invocations, each requested twice: more than math's batch of 512 apart, with a
    // batch of another tool's requests (nothing for math to derive) between, and the
    // repeats in reverse order, so those of the first request's last batch come first.
    // The odd ones first fail the tool's schema (no start, a failed outcome) and come back
    // valid.
    let ids: Vec<String> = (0..700).map(|i| format!("rep-{i}")).collect();
    let first = Value::Array(
        ids.iter()
            .enumerate()
            .map(|(i, id)| match i % 2 {
                0 => request(id, "math", json!({"expression": format!("{i}*2")})),
                _ => request(id, "math", json!({"expr": format!("{i}*2")})),
            })
            .collect(),
    );
    let other = Value::Array(
        (0..600)
            .map(|i| request(&format!("other-{i}"), "no-such-tool", json!({})))
            .collect(),
    );
    let again = Value::Array(
        ids.iter()
            .enumerate()
            .rev()
            .map(|(i, id)| request(id, "math", json!({"expression": format!("{i}*3")})))
            .collect(),
    );
    append(&h, "calls", first).await;
    append(&h, "others", other).await;
    let reply = append(&h, "calls-again", again).await;
    let last = reply["positions"][699].as_u64().unwrap();
    // Past the last repeat: every outcome either batch derived is appended.
    let info = position_reaches(&h, "math", last + 1).await;
    assert_eq!(info["events_processed"], json!(2000), "{info}");
    assert_eq!(info["dead_lettered"], json!(0), "{info}");
    assert_eq!(info["errors"], json!(0), "{info}");
    assert_eq!(info["derived"], json!(700), "one outcome each: {info}");
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let by_id = outcomes(&h, &id_refs).await;
    let events = all_events(&h).await;
    for (i, id) in ids.iter().enumerate() {
        let list = &by_id[id];
        assert_eq!(list.len(), 1, "{id} has {} outcomes: {list:?}", list.len());
        let starts = events
            .iter()
            .filter(|e| {
                e["type"] == "tool.invocation.started" && e["payload"]["invocation_id"] == **id
            })
            .count();
        if i % 2 == 0 {
            assert_eq!(
                list[0]["type"], "tool.invocation.completed",
                "{id}: {}",
                list[0]
            );
            assert_eq!(list[0]["payload"]["output"]["value"], json!(i * 2), "{id}");
            assert_eq!(starts, 1, "{id} started {starts} times");
        } else {
            assert_eq!(
                list[0]["payload"]["error"]["code"], "invalid_input",
                "{id}: {}",
                list[0]
            );
            assert_eq!(starts, 0, "{id} ran after its outcome said it did not");
        }
    }
}
