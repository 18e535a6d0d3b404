//! WASM projections end to end: the real binary with the real `.wasm` plugins built from
//! `plugins/`, real sled, real HTTP on loopback.

use std::path::Path;
use std::time::{Duration, Instant};

use evhost_tests::{Host, append, caught_up, get, jitter, load_ok, positions, post, upload};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");

async fn state(h: &Host, plugin: &str, key: &str) -> (u16, Value) {
    get(&format!(
        "{}/v1/projections/{plugin}/state?key={key}",
        h.url
    ))
    .await
}

fn ev(ty: &str, payload: Value) -> Value {
    json!({"type": ty, "payload": payload})
}

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(PLUGINS).join(format!("{name}.wasm"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_projections_fold_the_log_and_serve_state_now_and_at_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
    let (_, list) = get(&format!("{}/v1/plugins", h.url)).await;
    let names: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for bundled in [
        "assistant-stats",
        "history",
        "type-counter",
        "knowledge-graph",
    ] {
        assert!(names.contains(&bundled), "{names:?}");
    }

    append(&h, "assistant-42", vec![
        ev("assistant.created", json!({"assistant_key": "my_assistant", "config": {}})),
        ev("assistant.tool.executed", json!({"tool_name": "say", "parameters": {}, "reasoning": "greet", "success": true})),
        ev("assistant.goal.created", json!({"goal_id": "g1", "description": "Build tavern", "priority": 1})),
    ]).await;
    let mid = caught_up(&h, "assistant-stats").await["head"]
        .as_u64()
        .unwrap()
        - 1;
    append(
        &h,
        "assistant-42",
        vec![
            ev("assistant.tool.executed", json!({"tool_name": "say"})),
            ev(
                "assistant.tool.executed",
                json!({"tool_name": "inspect_location"}),
            ),
            ev(
                "assistant.goal.completed",
                json!({"goal_id": "g1", "outcome": "built"}),
            ),
            ev(
                "assistant.emergency_stop.triggered",
                json!({"reason": "Too many errors", "consecutive_errors": 5}),
            ),
        ],
    )
    .await;
    let (_, r) = post(&format!("{}/v1/events", h.url), json!({"events": [
        {"stream": "chat-1", "type": "user.message.received", "payload": {"text": "hi"}, "metadata": {"correlation_id": "c-1"}},
        {"stream": "chat-1", "type": "agent.reply.sent", "payload": {"text": "hello"}, "metadata": {"correlation_id": "c-1"}},
    ]})).await;
    assert_eq!(r["positions"], json!([7, 8]));
    for p in ["assistant-stats", "history", "type-counter"] {
        caught_up(&h, p).await;
    }

    let (s, now) = state(&h, "assistant-stats", "assistant-42").await;
    assert_eq!(s, 200, "{now}");
    let v = &now["value"];
    assert_eq!(v["assistant_key"], "my_assistant");
    assert_eq!(v["tool_count"], 3);
    assert_eq!(v["tool_stats"], json!({"say": 2, "inspect_location": 1}));
    assert_eq!(
        (v["active_goals"].as_u64(), v["completed_goals"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(v["is_stopped"], true);
    assert_eq!(v["version"], 7);

    // Time travel: as it was right after position `mid`.
    let (s, then) = get(&format!(
        "{}/v1/projections/assistant-stats/state?key=assistant-42&at={mid}",
        h.url
    ))
    .await;
    assert_eq!(s, 200, "{then}");
    assert_eq!(then["value"]["tool_count"], 1);
    assert_eq!(then["value"]["active_goals"], 1);
    assert_eq!(then["value"]["is_stopped"], false);
    assert_eq!(then["value"]["version"], 3);
    let (s, _) = get(&format!(
        "{}/v1/projections/assistant-stats/state?key=assistant-42&at=999",
        h.url
    ))
    .await;
    assert_eq!(s, 400, "a position past the head is refused");

    // The query export (default: the request is a key). A JSON string is passed as its
    // text; other JSON as JSON text; a body that is not JSON is refused.
    let (s, q) = post(
        &format!("{}/v1/projections/assistant-stats/query", h.url),
        json!("assistant-42"),
    )
    .await;
    assert_eq!(s, 200, "{q}");
    assert_eq!(q["answer"]["tool_count"], 3, "{q}");
    let (s, q) = post(
        &format!("{}/v1/projections/assistant-stats/query", h.url),
        json!({"key": "assistant-42"}),
    )
    .await;
    assert_eq!(
        (s, &q["answer"]),
        (200, &Value::Null),
        "an object is no key: {q}"
    );
    let r = reqwest::Client::new()
        .post(format!("{}/v1/projections/assistant-stats/query", h.url))
        .header("content-type", "application/json")
        .body("assistant-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "bare text is not JSON");
    let (_, q) = post(
        &format!("{}/v1/projections/assistant-stats/query", h.url),
        json!("assistant-42"),
    )
    .await;
    assert_eq!(q["answer"]["tool_count"], 3);

    let (_, flow) = state(&h, "history", "c-1").await;
    let types: Vec<&str> = flow["value"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["user.message.received", "agent.reply.sent"]);
    let (_, counted) = state(&h, "type-counter", "assistant.tool.executed").await;
    assert_eq!(counted["value"], 3);
    let (_, prefix) = get(&format!(
        "{}/v1/projections/type-counter/state?prefix=assistant.",
        h.url
    ))
    .await;
    assert_eq!(prefix["items"].as_array().unwrap().len(), 5);
    let (s, _) = state(&h, "assistant-stats", "nobody").await;
    assert_eq!(s, 404);
    let (s, _) = state(&h, "no-such-projection", "x").await;
    assert_eq!(s, 404);

    // CLI reads the same.
    let (ok, out, err) = h.cli(&[
        "state",
        "at",
        "assistant-stats",
        "assistant-42",
        &mid.to_string(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["tool_count"],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_hot_load_replace_and_unload_in_a_running_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Host::start(BIN, dir.path(), &[]).await;
    append(
        &h,
        "a",
        vec![
            ev("assistant.tool.executed", json!({"tool_name": "x"})),
            ev("other.thing", json!({})),
        ],
    )
    .await;
    let manifest = "name = \"tools\"\nversion = \"1.0.0\"\nkind = \"projection\"\nsubscriptions = [\"assistant.tool.*\"]\n";
    let (s, info) = upload(&h, "tools", manifest, wasm("type-counter")).await;
    assert_eq!(s, 200, "{info}");
    assert_eq!(info["compiled_from_cache"], false);
    caught_up(&h, "tools").await;
    assert_eq!(
        state(&h, "tools", "assistant.tool.executed").await.1["value"],
        1
    );
    assert_eq!(
        state(&h, "tools", "other.thing").await.0,
        404,
        "only subscribed types are folded"
    );

    // Replacing with the same component keeps state and uses the compile cache.
    let (s, info) = upload(
        &h,
        "tools",
        &manifest.replace("1.0.0", "1.0.1"),
        wasm("type-counter"),
    )
    .await;
    assert_eq!(s, 200, "{info}");
    assert_eq!(info["compiled_from_cache"], true);
    assert!(info["load_ms"].as_f64().unwrap() < 1000.0);
    append(
        &h,
        "a",
        vec![ev("assistant.tool.executed", json!({"tool_name": "y"}))],
    )
    .await;
    caught_up(&h, "tools").await;
    assert_eq!(
        state(&h, "tools", "assistant.tool.executed").await.1["value"],
        2
    );

    // A hot-loaded plugin survives a restart.
    h.stop();
    let h = Host::start(BIN, dir.path(), &[]).await;
    caught_up(&h, "tools").await;
    assert_eq!(
        state(&h, "tools", "assistant.tool.executed").await.1["value"],
        2
    );

    // Unload keeps state unless purged.
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/plugins/tools", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&format!("{}/v1/plugins/tools", h.url)).await.0, 404);
    upload(&h, "tools", manifest, wasm("type-counter")).await;
    caught_up(&h, "tools").await;
    assert_eq!(
        state(&h, "tools", "assistant.tool.executed").await.1["value"],
        2
    );
    let (ok, out, _) = h.cli(&["plugin", "list"]);
    let row = out
        .lines()
        .find(|l| l.starts_with("tools "))
        .unwrap_or_default();
    assert!(
        ok && row.contains("projection") && row.contains("live"),
        "{out}"
    );
    let (ok, out, _) = h.cli(&["plugin", "list", "--json"]);
    assert!(ok && out.contains("\"tools\""), "{out}");
    let (ok, out, _) = h.cli(&["plugin", "status", "tools"]);
    assert!(
        ok && out.starts_with("tools@") && out.contains("lag 0"),
        "{out}"
    );
    let (ok, _, err) = h.cli(&["plugin", "unload", "tools", "--purge"]);
    assert!(ok, "{err}");
    let (s, _) = upload(&h, "tools", manifest, wasm("type-counter")).await;
    assert_eq!(s, 200);
    caught_up(&h, "tools").await;
    assert_eq!(
        state(&h, "tools", "assistant.tool.executed").await.1["value"],
        2,
        "rebuilt from the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plugins_are_refused_with_a_reason_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let good = "name = \"p\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\">\"]\n";
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "unknown manifest key",
            format!("{good}colour = \"red\"\n"),
            wasm("type-counter"),
            "unknown field",
        ),
        (
            "bad pattern",
            good.replace("\">\"", "\"a..b\""),
            wasm("type-counter"),
            "invalid pattern",
        ),
        (
            "name differs from URL",
            good.replace("\"p\"", "\"q\""),
            wasm("type-counter"),
            "URL says",
        ),
        (
            "not wasm",
            good.to_owned(),
            b"hello".to_vec(),
            "not WebAssembly",
        ),
        (
            "core module",
            good.to_owned(),
            core_module,
            "core WebAssembly module, not a component",
        ),
        (
            "a projection declared an extractor",
            good.replace("projection", "extractor"),
            wasm("type-counter"),
            "its manifest says kind = \"extractor\" but the component is a projection (it implements evhost:plugin/projection@0.2.0)",
        ),
    ];
    for (what, manifest, bytes, want) in cases {
        let (s, body) = upload(&h, "p", &manifest, bytes).await;
        assert_eq!(s, 400, "{what}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{what}: {msg}");
    }
    assert!(
        get(&format!("{}/v1/plugins", h.url)).await.1["plugins"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// A poison event fails only itself: the projection finds it inside its batch, retries it,
/// parks it in its dead-letter store and goes on with the next event; other projections
/// never notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_and_the_projection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
    append(
        &h,
        "a",
        vec![
            ev("assistant.tool.executed", json!({"no_tool_name": true})),
            ev("assistant.created", json!({"assistant_key": "a"})),
        ],
    )
    .await;
    caught_up(&h, "type-counter").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let (_, info) = get(&format!("{}/v1/plugins/assistant-stats", h.url)).await;
        if info["dead_letters"] == 1 && info["lag"] == 0 {
            break info;
        }
        assert!(Instant::now() < deadline, "not dead-lettered: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(info["errors"].as_u64() >= Some(4), "{info}");
    let (_, dlq) = get(&format!("{}/v1/dlq?plugin=assistant-stats", h.url)).await;
    let d = &dlq["dead_letters"][0];
    assert_eq!(d["position"], 0);
    assert_eq!(
        d["attempts"], 4,
        "its own call and 3 retries (the default): {d}"
    );
    let err = d["error"].as_str().unwrap();
    assert!(
        err.contains("assistant-stats@0.1.0") && err.contains("tool_name"),
        "{err}"
    );
    assert_eq!(
        state(&h, "assistant-stats", "a").await.0,
        200,
        "the event after the poison one was handled"
    );
    assert_eq!(
        state(&h, "type-counter", "assistant.tool.executed").await.1["value"],
        1
    );
    assert_eq!(get(&format!("{}/health", h.url)).await.0, 200);
}

/// Every stream's assistant-stats state after `kill -9` rounds equals a replay from scratch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_state_after_kill_9_rounds_equals_a_replay_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let streams = 6;
    for round in 0..4 {
        let mut h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
        let url = h.url.clone();
        let writer = tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0u64.. {
                let s = i % streams;
                let events = json!({"events": [
                    {"type": "assistant.tool.executed", "payload": {"tool_name": format!("t{}", i % 3)}},
                    {"type": if i % 4 == 0 { "assistant.goal.created" } else { "assistant.tick.completed" }, "payload": {"goal_id": format!("g{round}-{i}"), "tick_number": i}},
                ]});
                if client
                    .post(format!("{url}/v1/streams/assistant-{s}"))
                    .json(&events)
                    .send()
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300 + jitter(700))).await;
        h.kill9();
        let _ = writer.await;
    }
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
    caught_up(&h, "assistant-stats").await;
    // The same component under another name builds its state from scratch.
    let manifest = std::fs::read_to_string(Path::new(PLUGINS).join("assistant-stats.toml"))
        .unwrap()
        .replace("assistant-stats", "replay");
    let (s, body) = upload(&h, "replay", &manifest, wasm("assistant-stats")).await;
    assert_eq!(s, 200, "{body}");
    caught_up(&h, "replay").await;
    caught_up(&h, "assistant-stats").await;
    let mut compared = 0;
    for s in 0..streams {
        let key = format!("assistant-{s}");
        let (a, b) = (
            state(&h, "assistant-stats", &key).await,
            state(&h, "replay", &key).await,
        );
        assert_eq!(a.0, b.0);
        assert_eq!(a.1["value"], b.1["value"], "{key} differs from a replay");
        if a.0 == 200 {
            compared += 1;
        }
    }
    assert!(compared > 0, "the load wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_that_starts_now_folds_only_later_events_also_when_travelling_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    append(&h, "a", vec![ev("x.y", json!(1)), ev("x.y", json!(2))]).await; // 0, 1
    let manifest = "name = \"late\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\">\"]\nstart = \"now\"\n";
    let (s, body) = upload(&h, "late", manifest, wasm("type-counter")).await;
    assert_eq!(s, 200, "{body}");
    // The load itself is announced (evhost.plugin.loaded), so these follow it.
    let reply = append(
        &h,
        "a",
        vec![
            ev("x.y", json!(3)),
            ev("x.y", json!(4)),
            ev("x.y", json!(5)),
        ],
    )
    .await;
    let p = |i: usize| reply["positions"][i].as_u64().unwrap();
    caught_up(&h, "late").await;
    assert_eq!(state(&h, "late", "x.y").await.1["value"], 3);
    let at = |p: u64| get_at(&h, p);
    assert_eq!(
        at(p(1)).await,
        (200, json!(2)),
        "the first two events after the load, not the ones before it"
    );
    assert_eq!(at(p(2)).await, (200, json!(3)));
    assert_eq!(at(0).await.0, 400, "no state before the projection started");
}

async fn get_at(h: &Host, position: u64) -> (u16, Value) {
    let (s, body) = get(&format!(
        "{}/v1/projections/late/state?key=x.y&at={position}",
        h.url
    ))
    .await;
    (s, body["value"].clone())
}

/// Time travel replays what the live run did: an event the projection failed on (and the
/// live run dead-lettered) is passed over, so `at=` answers at and past it instead of
/// failing on it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_travel_passes_over_what_the_live_run_dead_lettered() {
    const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let manifest = "name = \"probe\"\nversion = \"1\"\nkind = \"projection\"\n\
        subscriptions = [\"probe.>\"]\n[limits]\nbatch_size = 64\n\
        [on_failure]\nretries = 0\nbackoff_ms = 1\nmax_backoff_ms = 1\nquarantine_after = 0\n";
    let wasm = std::fs::read(Path::new(BUILD).join("sandbox_probe.wasm")).unwrap();
    let (s, body) = upload(&h, "probe", manifest, wasm).await;
    assert_eq!(s, 200, "{body}");
    let types = ["probe.a", "probe.a", "probe.trap", "probe.a", "probe.b"];
    let events: Vec<Value> = types.iter().map(|t| ev(t, json!({}))).collect();
    let reply = append(&h, "p", events).await;
    let positions: Vec<u64> = positions(&reply);
    caught_up(&h, "probe").await;
    let (_, letters) = get(&format!("{}/v1/dlq?plugin=probe", h.url)).await;
    assert_eq!(
        letters["dead_letters"].as_array().map(Vec::len),
        Some(1),
        "{letters}"
    );
    let (_, now) = state(&h, "probe", "probe").await;
    assert_eq!(
        now["value"],
        json!({"probe.a": "3", "probe.b": "1"}),
        "{now}"
    );
    for (at, want) in [
        (positions[1], json!({"probe.a": "2"})),
        (positions[2], json!({"probe.a": "2"})),
        (positions[3], json!({"probe.a": "3"})),
        (positions[4], json!({"probe.a": "3", "probe.b": "1"})),
    ] {
        let (s, then) = get(&format!(
            "{}/v1/projections/probe/state?key=probe&at={at}",
            h.url
        ))
        .await;
        assert_eq!(s, 200, "at={at}: {then}");
        assert_eq!(then["value"], want, "at={at}");
    }
}

/// A plugin unloaded without --purge keeps its state, and that state can still be read by
/// key or prefix; purged, it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloaded_plugins_kept_state_can_still_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let manifest =
        "name = \"kept\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\"k.>\"]\n";
    load_ok(&h, "kept", manifest, wasm("type-counter")).await;
    append(&h, "k", vec![ev("k.a", json!({})), ev("k.a", json!({}))]).await;
    caught_up(&h, "kept").await;
    let (ok, _, err) = h.cli(&["plugin", "unload", "kept"]);
    assert!(ok, "{err}");
    let (s, v) = state(&h, "kept", "k.a").await;
    assert_eq!(
        (s, &v["value"], &v["version"]),
        (200, &json!(2), &json!("(unloaded)")),
        "{v}"
    );
    let (s, v) = get(&format!("{}/v1/projections/kept/state?prefix=k.", h.url)).await;
    assert_eq!((s, &v["items"][0]["value"]), (200, &json!(2)), "{v}");
    let (ok, _, err) = h.cli(&["plugin", "unload", "kept", "--purge"]);
    assert!(
        !ok && err.contains("no plugin named"),
        "already unloaded: {err}"
    );
    load_ok(&h, "kept", manifest, wasm("type-counter")).await;
    let (ok, _, err) = h.cli(&["plugin", "unload", "kept", "--purge"]);
    assert!(ok, "{err}");
    let (s, v) = state(&h, "kept", "k.a").await;
    assert_eq!(s, 404, "{v}");
}
