//! Fault containment end to end, on the real binary with the real `.wasm` plugins: poison
//! events are found inside their batch, retried, dead-lettered and passed over; too many in
//! a row quarantine a plugin until it is resumed; dead letters can be retried and dropped;
//! every transition is an `evhost.plugin.>` event; the schema registry refuses bad appends
//! and bad derived events. The hostile test plugin does each thing a plugin can do wrong.

use std::path::Path;
use std::time::{Duration, Instant};

use evhost_tests::{Host, append, get, post, upload};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");
const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");

fn hostile_wasm() -> Vec<u8> {
    std::fs::read(Path::new(BUILD).join("hostile.wasm")).unwrap()
}

/// The hostile extractor's manifest with quick limits and `on_failure` lines.
fn hostile_manifest(on_failure: &str) -> String {
    format!(
        "name = \"hostile\"\nversion = \"1\"\nkind = \"extractor\"\nsubscriptions = [\"hostile.>\"]\n\
         [limits]\nmemory_mb = 32\nbatch_timeout_ms = 200\nbatch_size = 64\n\
         [on_failure]\nbackoff_ms = 10\nmax_backoff_ms = 40\n{on_failure}"
    )
}

fn ev(ty: &str) -> Value {
    json!({"type": ty, "payload": {}})
}

async fn info(h: &Host, plugin: &str) -> Value {
    let (s, info) = get(&format!("{}/v1/plugins/{plugin}", h.url)).await;
    assert_eq!(s, 200, "{info}");
    info
}

/// Waits until `plugin`'s status satisfies `done`; returns it.
async fn until(h: &Host, plugin: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = info(h, plugin).await;
        if done(&info) {
            return info;
        }
        assert!(Instant::now() < deadline, "{plugin}: {what}: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn caught_up(i: &Value) -> bool {
    i["lag"] == 0 && i["state"] != "failing"
}

/// Every event of a type pattern in the log.
async fn events_of(h: &Host, pattern: &str) -> Vec<Value> {
    let (s, page) = get(&format!("{}/v1/events?type={pattern}&limit=10000", h.url)).await;
    assert_eq!(s, 200, "{page}");
    page["events"].as_array().unwrap().clone()
}

async fn dlq(h: &Host, plugin: &str) -> Vec<Value> {
    let (s, body) = get(&format!("{}/v1/dlq?plugin={plugin}", h.url)).await;
    assert_eq!(s, 200, "{body}");
    body["dead_letters"].as_array().unwrap().clone()
}

/// One append holding every kind of misbehaviour between good events: each bad event ends
/// in the dead-letter store with a reason naming what happened, each good one is handled,
/// the host and the other plugins carry on, and the status shows what the plugin used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_events_are_dead_lettered_with_reasons_while_everything_else_runs() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
    let (s, body) = post(&format!("{}/v1/schemas/hostile.out", h.url), json!(null)).await;
    assert_eq!(s, 405, "schemas are PUT: {body}");
    let r = reqwest::Client::new()
        .put(format!("{}/v1/schemas/hostile.out", h.url))
        .json(&json!({"type": "object", "properties": {"n": {"type": "number"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let manifest = hostile_manifest("retries = 1\nquarantine_after = 0");
    let (s, body) = upload(&h, "hostile", &manifest, hostile_wasm()).await;
    assert_eq!(s, 200, "{body}");

    let bad: [(&str, &str); 11] = [
        ("hostile.trap", "hostile was asked to panic"),
        ("hostile.file", "/etc/hostname"),
        ("hostile.env", "HOME"),
        ("hostile.net", "127.0.0.1:9"),
        ("hostile.invalid", "Not A Type!"),
        ("hostile.huge", "more than the limit of 1048576"),
        ("hostile.flood", "derived 20000 events"),
        ("hostile.schema", "/n"),
        ("hostile.loop", "ran longer than its limit of 200 ms"),
        ("hostile.alloc", "memory limit of 32 MiB"),
        ("hostile.recurse", "recursion"),
    ];
    let mut batch = vec![ev("hostile.first")];
    for (ty, _) in bad {
        batch.push(ev(ty));
        batch.push(ev("hostile.good"));
    }
    let reply = append(&h, "hostile", batch).await;
    let first = reply["positions"][0].as_u64().unwrap();

    let done = until(&h, "hostile", "handles everything", |i| {
        caught_up(i) && i["dead_letters"] == bad.len()
    })
    .await;
    assert_eq!(done["state"], "live", "{done}");
    assert_eq!(done["dead_lettered"], bad.len(), "{done}");
    // Each good event was handled once, around the bad ones.
    let ok = events_of(&h, "hostile.ok").await;
    assert_eq!(ok.len(), 1 + bad.len(), "{ok:?}");
    let letters = dlq(&h, "hostile").await;
    for (i, (ty, reason)) in bad.iter().enumerate() {
        let position = first + 1 + 2 * i as u64;
        let d = letters
            .iter()
            .find(|d| d["position"] == position)
            .unwrap_or_else(|| panic!("no dead letter for {ty}: {letters:?}"));
        assert_eq!(d["event_type"], *ty);
        assert_eq!(d["id"], format!("hostile.{position}"));
        assert_eq!(d["attempts"], 2, "tried once and retried once: {d}");
        let error = d["error"].as_str().unwrap();
        assert!(
            error.contains("hostile@1") && error.contains(reason),
            "{ty}: {error}"
        );
    }
    // Announced once each, caused by the event that failed.
    let audits = events_of(&h, "evhost.plugin.dead_lettered").await;
    assert_eq!(audits.len(), bad.len());
    assert!(
        audits
            .iter()
            .all(|a| a["payload"]["plugin"] == "hostile"
                && a["metadata"]["causation_id"].is_string())
    );
    // What the plugin used, against its limits.
    let u = &done["usage"];
    assert!(u["calls"].as_u64().unwrap() > 2 * bad.len() as u64, "{u}");
    assert!(
        u["failed_calls"].as_u64().unwrap() >= 2 * bad.len() as u64,
        "{u}"
    );
    assert!(u["peak_memory_bytes"].as_u64().unwrap() <= 32 << 20, "{u}");
    assert_eq!(u["memory_limit_bytes"], 32 << 20);
    assert!(
        u["max_call_ms"].as_f64().unwrap() >= 200.0,
        "the loop ran to its limit: {u}"
    );
    // Per event: every event handed in is counted, and the time per event is shown.
    assert!(u["events"].as_u64().unwrap() > 2 * bad.len() as u64, "{u}");
    assert!(u["ns_per_event"].as_f64().unwrap() > 0.0, "{u}");
    assert!(u["fuel_used_per_event"].is_null(), "no fuel budget: {u}");
    // The other plugins and the host carried on.
    let counter = until(&h, "type-counter", "catches up", caught_up).await;
    assert_eq!(counter["dead_letters"], 0);
    assert_eq!(get(&format!("{}/health", h.url)).await.0, 200);

    // Retrying a bad event fails again and counts the attempt; the letter stays.
    let trap = format!("hostile.{}", first + 1);
    let (s, out) = post(&format!("{}/v1/dlq/{trap}/retry", h.url), json!({})).await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(out["handled"], false);
    assert_eq!(out["dead_letter"]["attempts"], 3);
    assert!(
        out["error"].as_str().unwrap().contains("unreachable"),
        "{out}"
    );
    // Relaxing the schema makes the schema-violating event good: its retry appends the
    // derived event and removes the letter.
    let schema_letter = letters
        .iter()
        .find(|d| d["event_type"] == "hostile.schema")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/schemas/hostile.out", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, out) = post(
        &format!("{}/v1/dlq/{schema_letter}/retry", h.url),
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(out["handled"], true, "{out}");
    assert_eq!(events_of(&h, "hostile.out").await.len(), 1);
    let retried = events_of(&h, "evhost.plugin.dead_letter_retried").await;
    assert_eq!(retried.len(), 2);
    // Dropping a letter; a second drop, unknown ids and plugins are clear errors.
    let client = reqwest::Client::new();
    let del = |id: String| {
        let client = client.clone();
        let url = format!("{}/v1/dlq/{id}", h.url);
        async move { client.delete(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(del(trap.clone()).await, 204);
    assert_eq!(del(trap.clone()).await, 404);
    assert_eq!(del("no-dots".into()).await, 400);
    assert_eq!(del("nope.3".into()).await, 404);
    assert_eq!(get(&format!("{}/v1/dlq?plugin=nope", h.url)).await.0, 404);
    assert_eq!(dlq(&h, "hostile").await.len(), bad.len() - 2);
    assert_eq!(
        events_of(&h, "evhost.plugin.dead_letter_deleted")
            .await
            .len(),
        1
    );
    let (s, all) = get(&format!("{}/v1/dlq", h.url)).await;
    assert_eq!(s, 200);
    assert_eq!(all["dead_letters"].as_array().unwrap().len(), bad.len() - 2);
}

/// Dead letters in a row quarantine a plugin: it stops consuming, says why, stays
/// quarantined across a restart, and `evhost plugin resume` sets it going again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_plugin_stops_until_resumed_even_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Host::start(BIN, dir.path(), &[]).await;
    let manifest = hostile_manifest("retries = 0\nquarantine_after = 2");
    let (s, body) = upload(&h, "hostile", &manifest, hostile_wasm()).await;
    assert_eq!(s, 200, "{body}");
    // A good event between two bad ones resets the count.
    let reply = append(
        &h,
        "q",
        vec![
            ev("hostile.trap"),
            ev("hostile.a"),
            ev("hostile.trap"),
            ev("hostile.trap"),
            ev("hostile.b"),
            ev("hostile.c"),
        ],
    )
    .await;
    let first = reply["positions"][0].as_u64().unwrap();
    let q = until(&h, "hostile", "is quarantined", |i| {
        i["state"] == "quarantined"
    })
    .await;
    let reason = q["quarantine"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("2 events in a row") && reason.contains("trapped"),
        "{reason}"
    );
    assert_eq!(q["dead_letters"], 3, "{q}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = info(&h, "hostile").await;
    assert_eq!(q["state"], "quarantined");
    assert_eq!(
        q["position"].as_u64(),
        Some(first + 4),
        "it stopped after the second trap in a row: {q}"
    );
    assert_eq!(
        events_of(&h, "hostile.ok").await.len(),
        1,
        "only a was handled"
    );
    assert_eq!(events_of(&h, "evhost.plugin.quarantined").await.len(), 1);

    h.kill9();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let q = info(&h, "hostile").await;
    assert_eq!(q["state"], "quarantined", "{q}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(events_of(&h, "hostile.ok").await.len(), 1);

    let (ok, out, err) = h.cli(&["plugin", "resume", "hostile"]);
    assert!(ok, "{out} {err}");
    assert!(out.contains("\"was_quarantined\":true"), "{out}");
    let done = until(&h, "hostile", "resumes", caught_up).await;
    assert!(done["quarantine"].is_null(), "{done}");
    assert_eq!(
        events_of(&h, "hostile.ok").await.len(),
        3,
        "b and c handled"
    );
    assert_eq!(events_of(&h, "evhost.plugin.resumed").await.len(), 1);
    let (ok, out, _) = h.cli(&["plugin", "resume", "hostile"]);
    assert!(ok && out.contains("\"was_quarantined\":false"), "{out}");
    let (ok, out, _) = h.cli(&["dlq", "list", "--plugin", "hostile"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 3, "{out}");
    let (ok, _, err) = h.cli(&["plugin", "resume", "nope"]);
    assert!(!ok && err.contains("no plugin named \"nope\""), "{err}");
    let (ok, out, _) = h.cli(&["dlq", "delete", &format!("hostile.{first}")]);
    let deleted: Value = serde_json::from_str(&out).unwrap();
    assert!(
        ok && deleted["deleted"] == format!("hostile.{first}"),
        "{out}"
    );
    // A retry that fails again is a failure of the command.
    let (ok, out, err) = h.cli(&["dlq", "retry", &format!("hostile.{}", first + 2)]);
    assert!(
        !ok && out.contains("\"handled\":false") && err.contains("failed again"),
        "{out}{err}"
    );
}

/// Appends that violate a registered schema are refused with the failing path and write
/// nothing; bad schemas are refused; schemas survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_registry_refuses_bad_appends_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Host::start(BIN, dir.path(), &[]).await;
    let client = reqwest::Client::new();
    let put = |pattern: &str, body: String| {
        let req = client
            .put(format!("{}/v1/schemas/{pattern}", h.url))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let r = req.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for (pattern, body, want) in [
        ("user.*", "{not json", "invalid request body"),
        ("user.*", r#"{"type": 12}"#, "not a valid JSON Schema"),
        ("user..x", r#"{"type": "object"}"#, "pattern"),
        ("user.*", "[1,2]", "must be a JSON object"),
    ] {
        let (s, body) = put(pattern, body.into()).await;
        assert_eq!(s, 400, "{pattern}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{pattern}: {msg}");
    }
    let schema = json!({
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}
    });
    let (s, body) = put("user.*", schema.to_string()).await;
    assert_eq!(s, 200, "{body}");
    let (_, list) = get(&format!("{}/v1/schemas", h.url)).await;
    assert_eq!(list["schemas"][0]["pattern"], "user.*");

    append(
        &h,
        "u",
        json!([{"type": "user.created", "payload": {"name": "ada", "age": 36}}]),
    )
    .await;
    let head = get(&format!("{}/health", h.url)).await.1["head"].clone();
    let refused = |stream: &'static str, events: Value| {
        let url = format!("{}/v1/streams/{stream}", h.url);
        async move { post(&url, json!({"events": events})).await }
    };
    let (s, body) = refused(
        "u",
        json!([
            {"type": "user.created", "payload": {"name": "bob"}},
            {"type": "user.created", "payload": {"name": "eve", "age": -1}},
        ]),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    let e = &body["error"];
    assert_eq!(e["code"], "schema_violation");
    assert_eq!(e["index"], 1);
    assert_eq!(e["path"], "/age");
    assert_eq!(e["pattern"], "user.*");
    let (s, body) = post(
        &format!("{}/v1/events", h.url),
        json!({"events": [
            {"stream": "o", "type": "order.created", "payload": {}},
            {"stream": "u", "type": "user.renamed", "payload": {"name": 5}},
        ]}),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["error"]["path"], "/name");
    assert_eq!(
        get(&format!("{}/health", h.url)).await.1["head"],
        head,
        "refused appends wrote nothing"
    );

    h.kill9();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let (s, body) = post(
        &format!("{}/v1/streams/u", h.url),
        json!({"events": [{"type": "user.created", "payload": {}}]}),
    )
    .await;
    assert_eq!(s, 422, "the schema survived the restart: {body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("name"),
        "{body}"
    );
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/schemas/user.*", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    append(&h, "u", json!([{"type": "user.created", "payload": {}}])).await;
}

/// A plugin that fails on the announcements of dead letters (an alert whose webhook is
/// down) cannot feed itself forever: announcements are derived from the failing event and
/// stop at the derivation depth limit, even when it is never quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_on_dead_letter_announcements_stops_at_the_depth_limit() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let manifest = "name = \"alarm\"\nversion = \"1\"\nkind = \"extractor\"\n\
        subscriptions = [\"hostile.trap\", \"evhost.plugin.dead_lettered\"]\n\
        [on_failure]\nretries = 0\nbackoff_ms = 1\nmax_backoff_ms = 1\nquarantine_after = 0\n";
    let (s, body) = upload(&h, "alarm", manifest, hostile_wasm()).await;
    assert_eq!(s, 200, "{body}");
    append(&h, "x", vec![ev("hostile.trap")]).await;
    let done = until(&h, "alarm", "stops", |i| {
        caught_up(i) && i["dead_letters"] == 17
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let announced = events_of(&h, "evhost.plugin.dead_lettered").await;
    assert_eq!(announced.len(), 16, "{done}");
    assert_eq!(
        announced.last().unwrap()["metadata"]["derivation_depth"],
        "16"
    );
    assert_eq!(info(&h, "alarm").await["dead_letters"], 17);
}

/// A tool's outcome is not held to a schema the way derived events are: the tool has run
/// (at most once), so refusing its outcome would lose the result. The outcome is appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_outcomes_are_not_lost_to_a_schema() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
    let r = reqwest::Client::new()
        .put(format!("{}/v1/schemas/tool.invocation.completed", h.url))
        .json(&json!({"required": ["no_such_field"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    append(
        &h,
        "t",
        json!([{"type": "tool.invocation.requested",
                "payload": {"invocation_id": "i1", "tool": "math", "input": {"expression": "1+1"}}}]),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while events_of(&h, "tool.invocation.completed").await.is_empty() {
        assert!(Instant::now() < deadline, "no outcome");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let math = until(&h, "math", "settles", caught_up).await;
    assert_eq!(math["dead_letters"], 0, "{math}");
    assert!(events_of(&h, "tool.invocation.failed").await.is_empty());
}
