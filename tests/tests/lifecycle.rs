//! Plugin lifecycle and plugin resource bounds, end to end on the real binary: loads and
//! unloads racing each other and the traffic, a load racing a purge, the bytes one call may
//! write to state, and the compile cache (collected, and a host fault when unwritable).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use evhost_tests::{
    CountingServer, Host, all_events, append, caught_up, get, jitter, upload, upload_granted,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");
const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(PLUGINS).join(format!("{name}.wasm"))).unwrap()
}

const COUNTER: &str = "name = \"type-counter\"\nversion = \"0.1.0\"\nkind = \"projection\"\n\
                       subscriptions = [\"test.>\"]\n";

fn http_get_manifest(authority: &str) -> String {
    format!(
        "name = \"http-get\"\nversion = \"0.1.0\"\nkind = \"tool\"\n[limits]\n\
         batch_timeout_ms = 5000\nconcurrency = 8\n[capabilities]\nhttp = [\"{authority}\"]\n"
    )
}

/// `DELETE /v1/plugins/{name}[?purge=true]`, bounded; returns the status.
async fn delete(client: &reqwest::Client, h: &Host, name: &str, purge: bool) -> u16 {
    let q = if purge { "?purge=true" } else { "" };
    client
        .delete(format!("{}/v1/plugins/{name}{q}", h.url))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the host answers a DELETE within 30 s")
        .status()
        .as_u16()
}

/// Polls `GET /v1/plugins` until `stop`, each answer bounded by 5 s; returns how many it
/// got. The registry must stay responsive whatever loads and unloads are under way.
fn poll_status(h: &Host, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let url = format!("{}/v1/plugins", h.url);
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut answers = 0;
        while !stop.load(Ordering::Relaxed) {
            let r = client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .expect("GET /v1/plugins answers within 5 s during loads and unloads");
            assert_eq!(r.status(), 200);
            answers += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers
    })
}

/// The stored count of `test.tick` events in type-counter.
async fn counted(h: &Host) -> Option<u64> {
    let (s, body) = get(&format!(
        "{}/v1/projections/type-counter/state?key=test.tick",
        h.url
    ))
    .await;
    (s == 200).then(|| body["value"].as_u64().unwrap())
}

/// Four clients load and unload (no purge) type-counter and http-get over and over while
/// events and tool requests flow. Each plugin must never run twice at once: the projection
/// counts every event once, every invocation reaches the server at most once and is recorded
/// as what happened (an `unknown_tool` never ran; a `completed` ran once), none is
/// `interrupted` (nothing crashed), and `GET /v1/plugins` answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_loads_and_unloads_never_run_a_plugin_twice() {
    const ROUNDS: usize = 25;
    let server = CountingServer::start(Duration::from_millis(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let h = Arc::new(Host::start(BIN, dir.path(), &[]).await);
    let http = http_get_manifest(&server.authority);
    let grant = format!("http:{}", server.authority);
    assert_eq!(
        upload(&h, "type-counter", COUNTER, wasm("type-counter"))
            .await
            .0,
        200
    );
    assert_eq!(
        upload_granted(&h, "http-get", &http, wasm("http-get"), &[&grant])
            .await
            .0,
        200
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (ticks, requests) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let producer = {
        let (h, stop, ticks, requests) = (h.clone(), stop.clone(), ticks.clone(), requests.clone());
        let authority = server.authority.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let i = requests.load(Ordering::Relaxed);
                let mut events: Vec<Value> = (0..5)
                    .map(|_| json!({"type": "test.tick", "payload": {}}))
                    .collect();
                events.push(json!({"type": "tool.invocation.requested", "payload": {
                    "invocation_id": format!("inv-{i}"), "tool": "http-get",
                    "input": {"url": format!("http://{authority}/inv-{i}")}}}));
                append(&h, "load", events).await;
                ticks.fetch_add(5, Ordering::Relaxed);
                requests.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let poller = poll_status(&h, stop.clone());
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (h, http, grant) = (h.clone(), http.clone(), grant.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                for _ in 0..ROUNDS {
                    let (s, body) = if c % 2 == 0 {
                        upload(&h, "type-counter", COUNTER, wasm("type-counter")).await
                    } else {
                        upload_granted(&h, "http-get", &http, wasm("http-get"), &[&grant]).await
                    };
                    assert_eq!(s, 200, "{body}");
                    tokio::time::sleep(Duration::from_millis(jitter(40))).await;
                    let name = if c % 2 == 0 {
                        "type-counter"
                    } else {
                        "http-get"
                    };
                    let s = delete(&client, &h, name, false).await;
                    assert!(s == 200 || s == 404, "DELETE answered {s}");
                    tokio::time::sleep(Duration::from_millis(jitter(40))).await;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    assert!(poller.await.unwrap() > 0);
    // Both loaded at the end, so every request is answered and every event counted.
    assert_eq!(
        upload(&h, "type-counter", COUNTER, wasm("type-counter"))
            .await
            .0,
        200
    );
    assert_eq!(
        upload_granted(&h, "http-get", &http, wasm("http-get"), &[&grant])
            .await
            .0,
        200
    );

    let (ticks, requests) = (
        ticks.load(Ordering::Relaxed),
        requests.load(Ordering::Relaxed),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let outcomes: BTreeMap<String, Value> = loop {
        let mut by_id = BTreeMap::new();
        for e in all_events(&h).await {
            let t = e["type"].as_str().unwrap();
            if t == "tool.invocation.completed" || t == "tool.invocation.failed" {
                let id = e["payload"]["invocation_id"].as_str().unwrap().to_owned();
                assert!(
                    by_id.insert(id.clone(), e).is_none(),
                    "two outcomes for {id}"
                );
            }
        }
        if by_id.len() as u64 == requests {
            break by_id;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {requests} invocations answered",
            by_id.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    caught_up(&h, "type-counter").await;
    assert_eq!(
        counted(&h).await,
        Some(ticks),
        "the projection counted some events twice"
    );

    let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..requests {
        let o = &outcomes[&format!("inv-{i}")];
        let hits = server.count(&format!("/inv-{i}"));
        assert!(hits <= 1, "inv-{i} reached the server {hits} times");
        let code = if o["type"] == "tool.invocation.completed" {
            assert_eq!(
                hits, 1,
                "inv-{i} completed without reaching the server: {o}"
            );
            "completed".to_owned()
        } else {
            let code = o["payload"]["error"]["code"].as_str().unwrap().to_owned();
            assert_eq!(code, "unknown_tool", "inv-{i}: {o}");
            assert_eq!(hits, 0, "inv-{i} ran but was recorded as {code}");
            code
        };
        *by_code.entry(code).or_default() += 1;
    }
    eprintln!(
        "{} load/unload rounds: {ticks} ticks counted once, {requests} invocations: {by_code:?}",
        ROUNDS * 4
    );
}

/// A load racing `DELETE ?purge=true` of the same plugin, with events flowing: every
/// request is answered, `GET /v1/plugins` stays responsive, the plugin loaded last works
/// (its count equals the log's, with no storage error), and SIGTERM still stops the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_racing_a_purge_never_wedges_the_registry() {
    const RACE: Duration = Duration::from_secs(8);
    let dir = tempfile::tempdir().unwrap();
    let h = Arc::new(Host::start(BIN, dir.path(), &[]).await);
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (h, stop) = (h.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let events: Vec<Value> = (0..20)
                    .map(|_| json!({"type": "test.tick", "payload": {}}))
                    .collect();
                append(&h, "load", events).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let poller = poll_status(&h, stop.clone());
    let end = Instant::now() + RACE;
    let loader = {
        let h = h.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < end {
                let (s, body) = tokio::time::timeout(
                    Duration::from_secs(30),
                    upload(&h, "type-counter", COUNTER, wasm("type-counter")),
                )
                .await
                .expect("a PUT answers within 30 s");
                assert_eq!(s, 200, "{body}");
                n += 1;
                tokio::time::sleep(Duration::from_millis(jitter(10))).await;
            }
            n
        })
    };
    let purger = {
        let h = h.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0;
            while Instant::now() < end {
                let s = delete(&client, &h, "type-counter", true).await;
                assert!(s == 200 || s == 404, "DELETE answered {s}");
                n += 1;
                tokio::time::sleep(Duration::from_millis(jitter(10))).await;
            }
            n
        })
    };
    let (loads, purges) = (loader.await.unwrap(), purger.await.unwrap());
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    let polls = poller.await.unwrap();
    assert_eq!(
        upload(&h, "type-counter", COUNTER, wasm("type-counter"))
            .await
            .0,
        200
    );
    let info = caught_up(&h, "type-counter").await;
    assert!(info["last_error"].is_null(), "{info}");
    let ticks = all_events(&h)
        .await
        .iter()
        .filter(|e| e["type"] == "test.tick")
        .count() as u64;
    assert_eq!(counted(&h).await, Some(ticks));
    eprintln!("{loads} loads raced {purges} purges; {polls} status reads answered");
    let mut h = Arc::into_inner(h).expect("no other handle to the host");
    assert!(
        h.stop_within(Duration::from_secs(20)).is_some(),
        "the host did not exit within 20 s of SIGTERM"
    );
}

/// The hostile extractor's manifest: 16 MiB of memory, so a call may buffer 16 MiB of state
/// writes and one entry may be 4 MiB; a failing event is dead-lettered at once.
const HOSTILE: &str = "name = \"hostile\"\nversion = \"1\"\nkind = \"extractor\"\n\
                       subscriptions = [\"hostile.>\"]\n[limits]\nmemory_mb = 16\n\
                       [on_failure]\nretries = 0\nquarantine_after = 0\n";

/// One call's state writes are bounded in bytes (by default the memory limit), and so is one
/// entry (by default a quarter of it): past either the call fails as the plugin's fault
/// (dead-lettered with a message naming the limit) and nothing it wrote is committed; below
/// them writes commit as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_writes_of_one_call_are_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let hostile = std::fs::read(Path::new(BUILD).join("hostile.wasm")).unwrap();
    let (s, body) = upload(&h, "hostile", HOSTILE, hostile).await;
    assert_eq!(s, 200, "{body}");
    let mib = 1 << 20;
    append(
        &h,
        "h",
        json!([
            {"type": "hostile.state", "payload": {"count": 40, "bytes": mib}},
            {"type": "hostile.state", "payload": {"count": 1, "bytes": 6 * mib}},
        ]),
    )
    .await;
    caught_up(&h, "hostile").await;
    let (_, dlq) = get(&format!("{}/v1/dlq?plugin=hostile", h.url)).await;
    let letters = dlq["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{dlq}");
    let errors: Vec<&str> = letters
        .iter()
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    assert!(
        errors[0].contains("limits.state_write_bytes") && errors[0].contains("16777216"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("limits.state_value_bytes") && errors[1].contains("4194304"),
        "{}",
        errors[1]
    );
    let key = |k: &str| format!("{}/v1/projections/hostile/state?key={k}", h.url);
    assert_eq!(
        get(&key("big-0")).await.0,
        404,
        "a failed call's writes were committed"
    );
    let (_, info) = get(&format!("{}/v1/plugins/hostile", h.url)).await;
    assert_eq!(info["dead_letters"], 2, "{info}");

    // Below the bounds, writes commit.
    append(
        &h,
        "h",
        json!([{"type": "hostile.state", "payload": {"count": 3, "bytes": mib}}]),
    )
    .await;
    caught_up(&h, "hostile").await;
    let (s, body) = get(&key("big-2")).await;
    assert_eq!(s, 200);
    assert_eq!(body["value"].as_str().unwrap().len(), mib);
    let (_, dlq) = get(&format!("{}/v1/dlq?plugin=hostile", h.url)).await;
    assert_eq!(dlq["dead_letters"].as_array().unwrap().len(), 2, "{dlq}");
}

/// `wasm` with a custom section naming `i`: the same plugin, a distinct component.
fn variant(wasm: &[u8], i: u8) -> Vec<u8> {
    let name = b"evhost-test";
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.push(i);
    let mut out = wasm.to_vec();
    out.push(0);
    out.push(body.len() as u8);
    out.extend(body);
    out
}

/// Component hashes with a file in the compile cache.
fn cached(data: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data.join("compiled"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .map(|n| n.split('.').next().unwrap().to_owned())
        .collect()
}

/// The compile cache keeps what loaded plugins use: an unload with purge collects the
/// files no loaded plugin uses, and so does the next start (for unloads without purge);
/// a plugin loaded at start-up keeps its file and loads from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compile_cache_keeps_only_what_loaded_plugins_use() {
    let dir = tempfile::tempdir().unwrap();
    let (data, dirs) = (dir.path().join("data"), dir.path().join("plugins"));
    std::fs::create_dir_all(&dirs).unwrap();
    std::fs::write(dirs.join("type-counter.toml"), COUNTER).unwrap();
    std::fs::write(dirs.join("type-counter.wasm"), wasm("type-counter")).unwrap();
    let args = ["--plugins", dirs.to_str().unwrap()];
    let mut h = Host::start(BIN, &data, &args).await;
    let (_, base) = get(&format!("{}/v1/plugins/type-counter", h.url)).await;
    let base = base["component_hash"].as_str().unwrap().to_owned();

    let mut hashes = Vec::new();
    for i in 0..4u8 {
        let manifest = COUNTER.replace("type-counter", &format!("v{i}"));
        let (s, info) = upload(
            &h,
            &format!("v{i}"),
            &manifest,
            variant(&wasm("type-counter"), i),
        )
        .await;
        assert_eq!(s, 200, "{info}");
        hashes.push(info["component_hash"].as_str().unwrap().to_owned());
    }
    let all: BTreeSet<String> = hashes.iter().cloned().chain([base.clone()]).collect();
    assert_eq!(cached(&data), all);
    let client = reqwest::Client::new();
    for (i, hash) in hashes.iter().enumerate().take(3) {
        assert_eq!(delete(&client, &h, &format!("v{i}"), true).await, 200);
        assert!(!cached(&data).contains(hash), "v{i} is still cached");
    }
    assert_eq!(
        cached(&data),
        BTreeSet::from([base.clone(), hashes[3].clone()])
    );
    // Without purge the file stays, until the next start.
    assert_eq!(delete(&client, &h, "v3", false).await, 200);
    assert!(cached(&data).contains(&hashes[3]));
    assert!(h.stop().success());
    let h = Host::start(BIN, &data, &args).await;
    assert_eq!(cached(&data), BTreeSet::from([base]));
    let (_, info) = get(&format!("{}/v1/plugins/type-counter", h.url)).await;
    assert_eq!(info["compiled_from_cache"], true, "{info}");
}

/// A compile cache that cannot be written is the host's fault: 503 `storage_failed` naming
/// the cache, nothing loaded; once it can be written again the same upload loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_compile_cache_is_a_host_fault() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let cache = dir.path().join("compiled");
    std::fs::remove_dir_all(&cache).unwrap();
    // A file where the directory was: no write succeeds, whoever the tests run as.
    std::fs::write(&cache, b"not a directory").unwrap();
    let (s, body) = upload(&h, "type-counter", COUNTER, wasm("type-counter")).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_failed", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("compile cache"), "{message}");
    let (_, list) = get(&format!("{}/v1/plugins", h.url)).await;
    assert!(list["plugins"].as_array().unwrap().is_empty(), "{list}");

    std::fs::remove_file(&cache).unwrap();
    std::fs::create_dir(&cache).unwrap();
    let (s, body) = upload(&h, "type-counter", COUNTER, wasm("type-counter")).await;
    assert_eq!(s, 200, "{body}");
}

/// A text that is no dead-letter id is a bad request about the id, not about a plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_dead_letter_id_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let client = reqwest::Client::new();
    for r in [
        client.post(format!("{}/v1/dlq/no-position/retry", h.url)),
        client.delete(format!("{}/v1/dlq/no-position", h.url)),
    ] {
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 400);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_dead_letter_id", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("<plugin>.<position>"), "{message}");
    }
}

/// A second host told to listen where one already does exits at once, naming the address,
/// before it opens its data; the first goes on answering. With `--listen 127.0.0.1:0` a
/// host takes any free port and `--listen-file` says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_refused_at_start_and_listen_file_names_the_port_taken() {
    let first = tempfile::tempdir().unwrap();
    let mut h = Host::start(BIN, first.path(), &[]).await;
    let written = std::fs::read_to_string(first.path().join("listen-addr")).unwrap();
    assert_eq!(format!("http://{}", written.trim()), h.url);
    let taken = h.url.trim_start_matches("http://").to_owned();
    let second = tempfile::tempdir().unwrap();
    let data = second.path().join("data");
    let started = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--plugins", PLUGINS, "--data"])
        .arg(&data)
        .args(["--listen", &taken])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("binding {taken}")) && err.contains("--listen"),
        "{err}"
    );
    assert!(!data.exists(), "the refused host opened its data directory");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(get(&format!("{}/health", h.url)).await.0, 200);
    // A listen file in a directory that is not there is refused before anything starts.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .arg("--listen-file")
        .arg(second.path().join("missing").join("addr"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not exist"),
        "{err}"
    );
    assert!(!data.exists());
    // A clean stop removes the listen file.
    assert!(h.stop().success());
    assert!(!first.path().join("listen-addr").exists());
}
