//! Upgrades end to end on the real binary: a projection's new version builds beside the
//! live one while readers see only complete states of one version, switches when caught up
//! (or when promoted), rolls back at once, runs as a shadow with a state diff; extractors
//! and tools are replaced at a batch boundary without deriving or running anything twice;
//! reads say where they stand and wait for `min_position`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use evhost_tests::{
    CountingServer, Host, all_events, append, get, get_refused, load_ok, post, upload,
    upload_granted,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");

use evhost_tests::plugin_wasm as wasm;

/// The same component with a custom section added: a different component (another hash)
/// that behaves the same, as a rebuilt plugin would.
fn rebuilt(wasm: &[u8], tag: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = format!("evhost-test-{tag}");
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(b"rebuilt");
    let mut out = wasm.to_vec();
    out.push(0);
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

fn counter(version: &str, extra: &str) -> String {
    format!(
        "name = \"counter\"\nversion = \"{version}\"\nkind = \"projection\"\n\
         subscriptions = [\"test.>\"]\n{extra}"
    )
}

/// `PUT /v1/plugins/{name}?QUERY` with a manifest and a component.
async fn upload_as(
    h: &Host,
    name: &str,
    query: &str,
    manifest: &str,
    wasm: Vec<u8>,
) -> (u16, Value) {
    let form = reqwest::multipart::Form::new()
        .part(
            "manifest",
            reqwest::multipart::Part::text(manifest.to_owned()),
        )
        .part("wasm", reqwest::multipart::Part::bytes(wasm));
    let r = reqwest::Client::new()
        .put(format!("{}/v1/plugins/{name}?{query}", h.url))
        .multipart(form)
        .send()
        .await
        .expect("the host answers");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn status(h: &Host, name: &str) -> Value {
    let (s, body) = get(&format!("{}/v1/plugins/{name}", h.url)).await;
    assert_eq!(s, 200, "{body}");
    body
}

/// Waits until `check` holds of `name`'s status; returns that status.
async fn until(h: &Host, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(h, name).await;
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{name} never {what}: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Appends `n` events: `test.a` and `test.b` in turn, in batches of 1,000.
async fn fill(h: &Host, n: u64) {
    for start in (0..n).step_by(1000) {
        let events: Vec<Value> = (start..(start + 1000).min(n))
            .map(|i| json!({"type": if i % 2 == 0 { "test.a" } else { "test.b" }, "payload": {"i": i}}))
            .collect();
        append(h, "fill", events).await;
    }
}

/// Reads `counter`'s `test.a` as fast as it can until stopped; every answer must be a
/// complete state (`want`) of a known version, at a position that never goes back.
fn reader(
    h: &Host,
    want: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    let url = format!("{}/v1/projections/counter/state?key=test.a", h.url);
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let (mut reads, mut versions, mut last) = (0u64, Vec::<String>::new(), 0u64);
        while !stop.load(Ordering::Relaxed) {
            let r = client.get(&url).send().await.expect("the host answers");
            let code = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            assert_eq!(code, 200, "a read failed during the upgrade: {body}");
            assert_eq!(body["value"], want, "a partial state was served: {body}");
            let p = body["position"].as_u64().unwrap();
            assert!(p >= last, "a read went back from position {last}: {body}");
            last = p;
            let hash = body["component_hash"].as_str().unwrap().to_owned();
            if versions.last() != Some(&hash) {
                versions.push(hash);
            }
            reads += 1;
        }
        (reads, versions)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_builds_beside_the_live_version_switches_when_caught_up_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let v1 = wasm("type-counter");
    let (s, info) = upload(&h, "counter", &counter("1.0.0", ""), v1.clone()).await;
    assert_eq!(s, 200, "{info}");
    let v1_hash = info["component_hash"].as_str().unwrap().to_owned();
    let n = 30_000;
    fill(&h, n).await;
    until(&h, "counter", "caught up", |s| s["lag"] == 0).await;

    // A manual switch: the candidate builds in its own store and waits for promote.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(&h, n / 2, stop.clone());
    let v2 = wasm("v0_1_type_counter");
    let (s, info) = upload_as(&h, "counter", "switch=manual", &counter("2.0.0", ""), v2).await;
    assert_eq!(s, 200, "{info}");
    assert_eq!(
        info["component_hash"],
        v1_hash.as_str(),
        "the live version stays: {info}"
    );
    assert_eq!(info["candidate"]["role"], "candidate", "{info}");
    assert_eq!(info["candidate"]["switch"], "manual", "{info}");
    assert_eq!(info["candidate"]["version"], "2.0.0", "{info}");
    let v2_hash = info["candidate"]["component_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    for field in ["position", "lag", "percent", "events_per_s", "state"] {
        assert!(
            !info["candidate"][field].is_null(),
            "candidate status lacks {field}: {info}"
        );
    }
    let caught = until(&h, "counter", "built its candidate", |s| {
        s["candidate"]["lag"] == 0 && s["candidate"]["percent"] == 100.0
    })
    .await;
    // Caught up, a manual candidate still waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s2 = status(&h, "counter").await;
    assert_eq!(s2["component_hash"], v1_hash.as_str(), "{caught}");
    let (code, promoted) = post(&format!("{}/v1/plugins/counter/promote", h.url), json!({})).await;
    assert_eq!(code, 200, "{promoted}");
    assert_eq!(promoted["component_hash"], v2_hash.as_str(), "{promoted}");
    assert_eq!(promoted["version"], "2.0.0");
    assert_eq!(promoted["wit"], "0.1.0");
    assert_eq!(
        promoted["previous"]["component_hash"],
        v1_hash.as_str(),
        "{promoted}"
    );
    assert!(promoted["candidate"].is_null(), "{promoted}");

    // Rollback is immediate: the previous version kept following the log.
    let (code, back) = post(&format!("{}/v1/plugins/counter/rollback", h.url), json!({})).await;
    assert_eq!(code, 200, "{back}");
    assert_eq!(back["component_hash"], v1_hash.as_str(), "{back}");
    assert_eq!(
        back["previous"]["component_hash"],
        v2_hash.as_str(),
        "{back}"
    );

    // An automatic switch over a rebuilt component.
    let v3 = rebuilt(&v1, "v3");
    let (s, info) = upload_as(&h, "counter", "", &counter("3.0.0", ""), v3).await;
    assert_eq!(s, 200, "{info}");
    assert_eq!(info["candidate"]["switch"], "auto", "{info}");
    let v3_hash = info["candidate"]["component_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let switched = until(&h, "counter", "switched to 3.0.0", |s| {
        s["component_hash"] == v3_hash.as_str()
    })
    .await;
    assert_eq!(
        switched["previous"]["component_hash"],
        v1_hash.as_str(),
        "{switched}"
    );
    stop.store(true, Ordering::Relaxed);
    let (count, seen) = reads.await.unwrap();
    assert!(count > 10, "the reader made only {count} reads");
    assert_eq!(seen.first(), Some(&v1_hash), "{seen:?}");
    assert_eq!(seen.last(), Some(&v3_hash), "{seen:?}");

    // The switches are announced, and the live version survives a restart.
    let switches: Vec<Value> = all_events(&h)
        .await
        .into_iter()
        .filter(|e| e["type"] == "evhost.plugin.switched")
        .collect();
    let reasons: Vec<&str> = switches
        .iter()
        .map(|e| e["payload"]["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["promoted", "rolled_back", "caught_up"],
        "{switches:?}"
    );

    // Discarding drops the previous version; then there is nothing to roll back to.
    let (code, info) = post(&format!("{}/v1/plugins/counter/discard", h.url), json!({})).await;
    assert_eq!(code, 200, "{info}");
    assert!(info["previous"].is_null(), "{info}");
    let (code, err) = post(&format!("{}/v1/plugins/counter/rollback", h.url), json!({})).await;
    assert_eq!(code, 409, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no previous version"),
        "{err}"
    );

    let mut h = h;
    h.stop();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let after = until(&h, "counter", "caught up after the restart", |s| {
        s["lag"] == 0
    })
    .await;
    assert_eq!(after["component_hash"], v3_hash.as_str(), "{after}");
    let (s, body) = get(&format!(
        "{}/v1/projections/counter/state?key=test.a",
        h.url
    ))
    .await;
    assert_eq!((s, &body["value"]), (200, &json!(n / 2)), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_run_never_switches_by_itself_and_its_diff_names_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let (s, info) = upload(&h, "counter", &counter("1.0.0", ""), wasm("type-counter")).await;
    assert_eq!(s, 200, "{info}");
    fill(&h, 200).await;
    until(&h, "counter", "caught up", |s| s["lag"] == 0).await;

    // Refused: a manual switch needs a different component.
    let (s, err) = upload_as(
        &h,
        "counter",
        "switch=manual",
        &counter("1.0.0", ""),
        wasm("type-counter"),
    )
    .await;
    assert_eq!(s, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already loaded"),
        "{err}"
    );

    // Verify: a shadow of the live component rebuilds from the log and compares equal.
    let (s, info) = upload_as(
        &h,
        "counter",
        "shadow=true",
        &counter("1.0.0", ""),
        wasm("type-counter"),
    )
    .await;
    assert_eq!(s, 200, "{info}");
    until(&h, "counter", "rebuilt its shadow", |s| {
        s["candidate"]["lag"] == 0
    })
    .await;
    let (code, diff) = get(&format!("{}/v1/plugins/counter/diff", h.url)).await;
    assert_eq!(code, 200, "{diff}");
    assert_eq!(
        (
            diff["same"].as_u64(),
            diff["differ"].as_u64(),
            diff["only_in_old"].as_u64(),
            diff["only_in_new"].as_u64()
        ),
        (Some(2), Some(0), Some(0), Some(0)),
        "{diff}"
    );
    assert_eq!(
        diff["position"],
        status(&h, "counter").await["position"],
        "{diff}"
    );
    let (code, info) = post(&format!("{}/v1/plugins/counter/discard", h.url), json!({})).await;
    assert_eq!(code, 200, "{info}");
    assert!(info["candidate"].is_null(), "{info}");

    // The shadow counts only what comes after it, and other.> too.
    let shadow =
        counter("2.0.0", "start = \"now\"\n").replace("[\"test.>\"]", "[\"test.>\", \"other.>\"]");
    let (s, info) = upload_as(
        &h,
        "counter",
        "shadow=true",
        &shadow,
        wasm("v0_1_type_counter"),
    )
    .await;
    assert_eq!(s, 200, "{info}");
    assert_eq!(info["candidate"]["role"], "shadow", "{info}");
    append(
        &h,
        "more",
        (0..10)
            .map(|_| json!({"type": "test.a", "payload": {}}))
            .collect::<Vec<_>>(),
    )
    .await;
    append(&h, "more", vec![json!({"type": "other.x", "payload": {}})]).await;
    until(&h, "counter", "caught up with its shadow", |s| {
        s["lag"] == 0 && s["candidate"]["lag"] == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = status(&h, "counter").await;
    assert_eq!(s["version"], "1.0.0", "a shadow switched by itself: {s}");

    let (code, diff) = get(&format!("{}/v1/plugins/counter/diff", h.url)).await;
    assert_eq!(code, 200, "{diff}");
    assert_eq!(diff["old"]["role"], "live", "{diff}");
    assert_eq!(diff["new"]["role"], "shadow", "{diff}");
    assert_eq!(
        (
            diff["differ"].as_u64(),
            diff["only_in_old"].as_u64(),
            diff["only_in_new"].as_u64(),
            diff["same"].as_u64()
        ),
        (Some(1), Some(1), Some(1), Some(0)),
        "{diff}"
    );
    let sample = diff["sample"].as_array().unwrap();
    let a = sample
        .iter()
        .find(|x| x["key"] == "test.a")
        .expect("test.a in the sample");
    assert_eq!((&a["old"], &a["new"]), (&json!(110), &json!(10)), "{diff}");
    assert!(
        sample
            .iter()
            .any(|x| x["key"] == "test.b" && x["new"].is_null()),
        "{diff}"
    );
    assert!(
        sample
            .iter()
            .any(|x| x["key"] == "other.x" && x["old"].is_null()),
        "{diff}"
    );
    let (ok, out, _) = h.cli(&["plugin", "diff", "counter"]);
    assert!(ok && out.contains("\"differ\":1"), "{out}");

    // Promoted, the shadow's state is what reads answer.
    let (ok, out, err) = h.cli(&["plugin", "promote", "counter"]);
    assert!(ok, "{out}{err}");
    let (s, body) = get(&format!(
        "{}/v1/projections/counter/state?key=test.a",
        h.url
    ))
    .await;
    assert_eq!(
        (s, &body["value"], &body["version"]),
        (200, &json!(10), &json!("2.0.0")),
        "{body}"
    );
    // Now the old version is the previous one: the diff compares it with the live one.
    let (code, diff) = get(&format!("{}/v1/plugins/counter/diff", h.url)).await;
    assert_eq!(code, 200, "{diff}");
    assert_eq!(
        (&diff["old"]["role"], &diff["new"]["role"]),
        (&json!("previous"), &json!("live")),
        "{diff}"
    );
    let (ok, out, err) = h.cli(&["plugin", "discard", "counter"]);
    assert!(ok, "{out}{err}");
    let (code, err) = get(&format!("{}/v1/plugins/counter/diff", h.url)).await;
    assert_eq!(code, 409, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_say_where_they_stand_and_wait_for_min_position() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let (s, info) = upload(&h, "counter", &counter("1.0.0", ""), wasm("type-counter")).await;
    assert_eq!(s, 200, "{info}");
    let hash = info["component_hash"].as_str().unwrap().to_owned();
    for round in 1..=20u64 {
        let reply = append(&h, "own", vec![json!({"type": "test.a", "payload": {}})]).await;
        let p = reply["positions"][0].as_u64().unwrap();
        // Read your own write: the state reflects the append just acknowledged.
        let (s, body) = get(&format!(
            "{}/v1/projections/counter/state?key=test.a&min_position={p}",
            h.url
        ))
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["value"], round, "{body}");
        assert!(body["position"].as_u64().unwrap() > p, "{body}");
        assert_eq!(
            (&body["version"], &body["component_hash"]),
            (&json!("1.0.0"), &json!(hash)),
            "{body}"
        );
        let (s, body) = get(&format!(
            "{}/v1/projections/counter/state?prefix=test.&min_position={p}",
            h.url
        ))
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["items"][0]["value"], round, "{body}");
        assert!(body["position"].as_u64().unwrap() > p, "{body}");
    }
    get_refused(
        &format!(
            "{}/v1/projections/counter/state?key=test.a&min_position=999999",
            h.url
        ),
        400,
        "not in the log yet",
    )
    .await;
    let (s, body) = get(&format!(
        "{}/v1/projections/counter/state?key=test.a&at=1&min_position=1",
        h.url
    ))
    .await;
    assert_eq!(s, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_extractor_derives_nothing_twice_and_a_tool_finishes_on_the_version_that_started()
 {
    let dir = tempfile::tempdir().unwrap();
    let slow = CountingServer::start(Duration::from_secs(2)).await;
    let h = Host::start(BIN, dir.path(), &[]).await;

    // The extractor: replaced at a batch boundary, it goes on from its checkpoint.
    let extractor = "name = \"entities\"\nversion = \"1.0.0\"\nkind = \"extractor\"\n\
                     subscriptions = [\"memory.created\"]\n";
    let memory = |i: u64| json!({"type": "memory.created", "payload": {"content": format!("Ada Lovelace met Person{i} in London")}});
    let ee = wasm("entity-extractor");
    load_ok(&h, "entities", extractor, ee.clone()).await;
    append(&h, "memories", (0..50).map(memory).collect::<Vec<_>>()).await;
    until(&h, "entities", "caught up", |s| s["lag"] == 0).await;
    let (s, info) = upload(
        &h,
        "entities",
        &extractor.replace("1.0.0", "1.1.0"),
        rebuilt(&ee, "e2"),
    )
    .await;
    assert_eq!(s, 200, "{info}");
    assert!(
        info["candidate"].is_null(),
        "an extractor is replaced in place: {info}"
    );
    append(&h, "memories", (50..80).map(memory).collect::<Vec<_>>()).await;
    until(&h, "entities", "caught up after the upgrade", |s| {
        s["lag"] == 0 && s["version"] == "1.1.0"
    })
    .await;
    let events = all_events(&h).await;
    let mut sources: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "memory.entity.extracted")
        .map(|e| e["payload"]["memory_event_id"].as_str().unwrap())
        .collect();
    let derived = sources.len();
    sources.sort_unstable();
    sources.dedup();
    assert_eq!(
        (derived, sources.len()),
        (80, 80),
        "each memory derives exactly once"
    );

    // The tool: an invocation in flight finishes before the new version starts.
    let tool = format!(
        "name = \"http-get\"\nversion = \"1.0.0\"\nkind = \"tool\"\n[limits]\nbatch_timeout_ms = 10000\n\
         [capabilities]\nhttp = [\"{}\"]\n",
        slow.authority
    );
    let grant = format!("http:{}", slow.authority);
    let hg = wasm("http-get");
    let (s, info) = upload_granted(&h, "http-get", &tool, hg.clone(), &[&grant]).await;
    assert_eq!(s, 200, "{info}");
    let url = format!("http://{}/slow", slow.authority);
    append(
        &h,
        "calls",
        vec![json!({"type": "tool.invocation.requested",
        "payload": {"invocation_id": "inv-1", "tool": "http-get", "input": {"url": url}}})],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while slow.count("/slow") == 0 {
        assert!(Instant::now() < deadline, "the tool never made its request");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, info) = upload_granted(
        &h,
        "http-get",
        &tool.replace("1.0.0", "1.1.0"),
        rebuilt(&hg, "t2"),
        &[&grant],
    )
    .await;
    assert_eq!(s, 200, "{info}");
    assert_eq!(info["version"], "1.1.0");
    // The replace waited for the call in flight: its outcome is in the log already.
    let outcomes: Vec<Value> = all_events(&h)
        .await
        .into_iter()
        .filter(|e| {
            e["type"] == "tool.invocation.completed" || e["type"] == "tool.invocation.failed"
        })
        .collect();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(
        outcomes[0]["type"], "tool.invocation.completed",
        "{outcomes:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(slow.count("/slow"), 1, "the invocation ran twice");
}

/// Rounds of `kill -9` while a rebuilt projection builds beside the live one and switches,
/// with a writer appending throughout: after each restart exactly one version serves, its
/// state counts every acknowledged event once, and no candidate is left building.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_rebuild_or_a_switch_leaves_one_version_with_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = wasm("type-counter");
    let mut h = Host::start(BIN, dir.path(), &[]).await;
    let (s, info) = upload(&h, "counter", &counter("1", ""), v1.clone()).await;
    assert_eq!(s, 200, "{info}");
    let mut hashes = vec![info["component_hash"].as_str().unwrap().to_owned()];
    fill(&h, 20_000).await;
    let mut acked = 10_000u64;
    let rounds: u64 = std::env::var("EVHOST_UPGRADE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for round in 0..rounds {
        let wasm = rebuilt(&v1, &format!("round-{round}"));
        let url = h.url.clone();
        // A writer appending test.a, one acknowledged event at a time, until the kill.
        let writer = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ok = 0u64;
            loop {
                let r = client
                    .post(format!("{url}/v1/streams/w"))
                    .json(&json!({"events": [{"type": "test.a", "payload": {}}]}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => return ok,
                }
            }
        });
        let (s, info) =
            upload_as(&h, "counter", "", &counter(&format!("r{round}"), ""), wasm).await;
        assert_eq!(s, 200, "{info}");
        hashes.push(
            info["candidate"]["component_hash"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        // Early in the rebuild, around the switch, or after it.
        tokio::time::sleep(Duration::from_millis(evhost_tests::jitter(600))).await;
        h.kill9();
        acked += writer.await.unwrap();
        h = Host::start(BIN, dir.path(), &[]).await;
        let s = until(&h, "counter", "caught up after the crash", |s| {
            s["lag"] == 0
        })
        .await;
        let live = s["component_hash"].as_str().unwrap();
        assert!(
            live == hashes[hashes.len() - 1] || live == hashes[hashes.len() - 2],
            "round {round}: an unknown version serves: {s}"
        );
        assert!(
            s["candidate"].is_null() && s["previous"].is_null(),
            "round {round}: {s}"
        );
        // Each acknowledged test.a counted once: the fill's 10,000 and the writer's.
        let (code, body) = get(&format!(
            "{}/v1/projections/counter/state?key=test.a",
            h.url
        ))
        .await;
        assert_eq!(code, 200, "{body}");
        let counted = body["value"].as_u64().unwrap();
        let in_log = all_events(&h)
            .await
            .iter()
            .filter(|e| e["type"] == "test.a")
            .count() as u64;
        assert!(
            in_log >= acked,
            "round {round}: acknowledged events lost: {in_log} < {acked}"
        );
        assert_eq!(
            counted, in_log,
            "round {round}: the state does not count each event once"
        );
        acked = in_log;
        eprintln!(
            "round {round}: {} is live after the crash",
            if live == hashes[hashes.len() - 1] {
                "the new version"
            } else {
                "the old version"
            }
        );
        if live != hashes[hashes.len() - 1] {
            // The candidate did not survive: the version before it stays live.
            hashes.pop();
        }
    }
}

/// The `evhost` commands of README's "Upgrading a plugin", in order: continued lines
/// joined, comments dropped.
fn readme_upgrade_commands() -> Vec<Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme
        .find("### Upgrading a plugin")
        .expect("the section is in README");
    let section = &readme[start..];
    let section = &section[..section[4..].find("\n### ").map_or(section.len(), |e| e + 4)];
    let mut commands = Vec::new();
    for block in section.split("```sh\n").skip(1) {
        let block = &block[..block.find("```").unwrap()];
        for line in block.replace("\\\n", " ").lines() {
            let line = line.split(" #").next().unwrap().trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            assert_eq!(words[0], "evhost", "README runs only evhost here: {line}");
            commands.push(words[1..].to_vec());
        }
    }
    commands
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_upgrade_walk_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(
        BIN,
        dir.path(),
        &[
            "--plugins",
            PLUGINS,
            "--grant",
            "http-get=http:127.0.0.1:8931",
        ],
    )
    .await;
    append(
        &h,
        "readme",
        (0..100)
            .map(|i| json!({"type": "test.a", "payload": {"i": i}}))
            .collect::<Vec<_>>(),
    )
    .await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let commands = readme_upgrade_commands();
    assert!(commands.len() >= 8, "{commands:?}");
    let mut outputs = Vec::new();
    for args in &commands {
        // promote and diff wait as README says: until the other version has caught up.
        let deadline = Instant::now() + Duration::from_secs(30);
        let out = loop {
            let out = std::process::Command::new(BIN)
                .args(args)
                .current_dir(&root)
                .env("EVHOST_URL", &h.url)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.success() || !err.contains("409") || Instant::now() > deadline {
                break out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(
            out.status.success(),
            "evhost {}: {stdout}{stderr}",
            args.join(" ")
        );
        outputs.push((args.join(" "), stdout));
    }
    let promoted = outputs
        .iter()
        .find(|(c, _)| c.starts_with("plugin promote"))
        .unwrap();
    assert!(promoted.1.contains("\"wit\":\"0.1.0\""), "{promoted:?}");
    let diff = outputs
        .iter()
        .find(|(c, _)| c.starts_with("plugin diff"))
        .unwrap();
    assert!(
        diff.1.contains("\"differ\":0") && diff.1.contains("\"only_in_old\":0"),
        "{diff:?}"
    );
    let verified = outputs
        .iter()
        .find(|(c, _)| c.starts_with("plugin verify"))
        .unwrap();
    assert!(verified.1.contains("\"equal\":true"), "{verified:?}");
    // The walk ends with a reset, which switches to its rebuild once caught up.
    let s = until(&h, "type-counter", "switched to its rebuild", |s| {
        s["candidate"].is_null()
    })
    .await;
    assert_eq!(s["wit"], "0.2.0", "rolled back to the bundled build: {s}");
    assert_eq!(s["previous"]["component_hash"], s["component_hash"], "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_state_that_is_not_a_replay_and_reset_rebuilds_it_blue_green() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let v1 = wasm("type-counter");
    let only_a = counter("1.0.0", "").replace("[\"test.>\"]", "[\"test.a\"]");
    load_ok(&h, "counter", &only_a, v1.clone()).await;
    fill(&h, 2_000).await;
    until(&h, "counter", "caught up", |s| s["lag"] == 0).await;
    let (ok, out, err) = h.cli(&["plugin", "verify", "counter"]);
    assert!(ok, "{out}{err}");
    let verified: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verified["equal"], true, "{verified}");
    assert_eq!(
        verified["live_hash"], verified["replayed_hash"],
        "{verified}"
    );
    assert_eq!(verified["same"], 1, "{verified}");

    // The same component with wider subscriptions keeps its state as it is: test.b was
    // never counted before, and verify says so.
    load_ok(&h, "counter", &counter("1.0.0", ""), v1.clone()).await;
    fill(&h, 10).await;
    until(&h, "counter", "caught up", |s| s["lag"] == 0).await;
    let (code, verified) = post(&format!("{}/v1/plugins/counter/verify", h.url), json!({})).await;
    assert_eq!(code, 200, "{verified}");
    assert_eq!(verified["equal"], false, "{verified}");
    assert_ne!(
        verified["live_hash"], verified["replayed_hash"],
        "{verified}"
    );
    assert_eq!(verified["differ"], 1, "{verified}");
    let b = &verified["sample"][0];
    assert_eq!(
        (&b["key"], &b["old"], &b["new"]),
        (&json!("test.b"), &json!(5), &json!(1005)),
        "{verified}"
    );

    // Reset rebuilds beside the live state and switches when caught up.
    let (ok, out, err) = h.cli(&["plugin", "reset", "counter", "--switch", "manual"]);
    assert!(ok, "{out}{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        info["candidate"]["component_hash"], info["component_hash"],
        "{info}"
    );
    let (s, body) = get(&format!(
        "{}/v1/projections/counter/state?key=test.b",
        h.url
    ))
    .await;
    assert_eq!(
        (s, &body["value"]),
        (200, &json!(5)),
        "the live state serves while the reset builds: {body}"
    );
    until(&h, "counter", "rebuilt", |s| s["candidate"]["lag"] == 0).await;
    let (code, info) = post(&format!("{}/v1/plugins/counter/promote", h.url), json!({})).await;
    assert_eq!(code, 200, "{info}");
    let (s, body) = get(&format!(
        "{}/v1/projections/counter/state?key=test.b",
        h.url
    ))
    .await;
    assert_eq!((s, &body["value"]), (200, &json!(1005)), "{body}");
    let (_, verified) = post(&format!("{}/v1/plugins/counter/verify", h.url), json!({})).await;
    assert_eq!(verified["equal"], true, "{verified}");

    // --keep-state: a rebuilt component goes on from the state as it stands, in place.
    let before = status(&h, "counter").await;
    let (s, info) = upload_as(
        &h,
        "counter",
        "keep_state=true",
        &counter("1.0.1", ""),
        rebuilt(&v1, "fix"),
    )
    .await;
    assert_eq!(s, 200, "{info}");
    assert!(info["candidate"].is_null(), "{info}");
    assert_ne!(info["component_hash"], before["component_hash"], "{info}");
    assert!(
        info["position"].as_u64() >= before["position"].as_u64(),
        "{info}"
    );
    fill(&h, 10).await;
    until(&h, "counter", "caught up", |s| s["lag"] == 0).await;
    let (_, body) = get(&format!(
        "{}/v1/projections/counter/state?key=test.b",
        h.url
    ))
    .await;
    assert_eq!(
        (&body["value"], &body["version"]),
        (&json!(1010), &json!("1.0.1")),
        "{body}"
    );
    let (s, err) = upload_as(
        &h,
        "counter",
        "keep_state=true&shadow=true",
        &counter("1.0.2", ""),
        rebuilt(&v1, "x"),
    )
    .await;
    assert_eq!(s, 400, "{err}");
}
