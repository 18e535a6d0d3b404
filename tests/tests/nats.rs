//! The NATS JetStream log end to end: the real binary on real nats-server processes (one
//! node, and a three-node cluster with R3) on loopback, with `sync_interval: always`.
//! Several hosts share one log; acknowledged appends survive `kill -9` of a server.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use evhost_tests::nats::Nats;
use evhost_tests::{
    Host, all_events, append, caught_up, get, load_ok, plugin_wasm, positions, post,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

async fn host_on(data: &std::path::Path, log: &str, extra: &[&str]) -> Host {
    let mut args = vec!["--log", log];
    args.extend_from_slice(extra);
    Host::start(BIN, data, &args).await
}

fn ev(ty: &str, id: Option<&str>) -> Value {
    match id {
        Some(id) => json!({"id": id, "type": ty, "payload": {"n": 1}}),
        None => json!({"type": ty, "payload": {"n": 1}}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_one_log_with_versions_ids_and_live_reads_across_them() {
    let nats = Nats::single();
    let log = format!("{}?stream=SHARED", nats.urls());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = host_on(da.path(), &log, &[]).await;
    let b = host_on(db.path(), &log, &[]).await;

    // B follows live what A appends.
    let sse = reqwest::get(format!("{}/v1/subscribe?pattern=order.%3E&from=0", b.url))
        .await
        .unwrap();
    let r = append(
        &a,
        "order-1",
        vec![ev("order.placed", None), ev("order.paid", None)],
    )
    .await;
    assert_eq!(positions(&r), vec![0, 1]);
    let mut body = sse.bytes_stream();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    use futures::StreamExt;
    while !seen.contains("order.paid") {
        let chunk = tokio::time::timeout_at(deadline.into(), body.next())
            .await
            .expect("B's subscription gets A's events within 10 s")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("order.placed"), "{seen}");

    // Both see one log, and one version per stream.
    assert_eq!(all_events(&a).await, all_events(&b).await);
    let (s, page) = get(&format!("{}/v1/streams/order-1", b.url)).await;
    assert_eq!((s, page["version"].as_u64()), (200, Some(2)), "{page}");

    // Two hosts appending at the same expected version: exactly one wins.
    let body = |ty: &str| json!({"expected_version": 2, "events": [ev(ty, None)]});
    let (ua, ub) = (
        format!("{}/v1/streams/order-1", a.url),
        format!("{}/v1/streams/order-1", b.url),
    );
    let (ra, rb) = tokio::join!(
        post(&ua, body("order.shipped")),
        post(&ub, body("order.cancelled")),
    );
    let mut codes = [ra.0, rb.0];
    codes.sort();
    assert_eq!(codes, [200, 409], "{ra:?} {rb:?}");
    let loser = if ra.0 == 409 { &ra.1 } else { &rb.1 };
    assert_eq!(loser["error"]["current_version"], 3, "{loser}");

    // A client id appended through A is a retry through B, and taken elsewhere.
    let first = append(&a, "pay-1", vec![ev("pay.made", Some("pay-abc"))]).await;
    let again = append(&b, "pay-1", vec![ev("pay.made", Some("pay-abc"))]).await;
    assert_eq!(positions(&first), positions(&again));
    assert_eq!(again["next_version"], 1);
    let (s, clash) = post(
        &format!("{}/v1/streams/pay-2", b.url),
        json!({"events": [ev("pay.made", Some("pay-abc"))]}),
    )
    .await;
    assert_eq!(s, 409, "{clash}");
    assert_eq!(clash["error"]["code"], "id_conflict", "{clash}");
    let (_, streams) = get(&format!("{}/v1/streams", b.url)).await;
    let names: Vec<&str> = streams["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["order-1", "pay-1"], "{streams}");

    // Stream names that are not subject tokens, and a type filter on the server.
    append(&a, "odd name.with*chars", vec![ev("order.noted", None)]).await;
    let (_, page) = get(&format!("{}/v1/streams/odd%20name.with*chars", b.url)).await;
    assert_eq!(page["events"][0]["stream"], "odd name.with*chars", "{page}");
    let (_, typed) = get(&format!("{}/v1/events?from=0&type=pay.*", b.url)).await;
    let types: Vec<&str> = typed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["pay.made"], "{typed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_is_one_atomic_batch_stored_whole_or_not_at_all() {
    let nats = Nats::single();
    let dir = tempfile::tempdir().unwrap();
    let h = host_on(dir.path(), &nats.urls(), &[]).await;
    append(&h, "b", vec![ev("x.one", None)]).await;

    // The second stream's expectation fails: the first stream's events are not stored.
    let (s, r) = post(
        &format!("{}/v1/events", h.url),
        json!({"events": [
            {"stream": "a", "type": "x.one", "payload": {}},
            {"stream": "a", "type": "x.two", "payload": {}},
            {"stream": "b", "type": "x.two", "payload": {}, "expected_version": 0},
        ]}),
    )
    .await;
    assert_eq!(s, 409, "{r}");
    let (s, a) = get(&format!("{}/v1/streams/a", h.url)).await;
    assert_eq!(s, 404, "stream a was not created: {a}");
    assert_eq!(all_events(&h).await.len(), 1);

    // Several events on one stream, each with its own expectation: each is checked
    // against the stream as the events before it in the append leave it.
    let url = format!("{}/v1/events", h.url);
    let two = |first: u64, second: u64| {
        json!({"events": [
            {"stream": "c", "type": "x.one", "payload": {}, "expected_version": first},
            {"stream": "c", "type": "x.two", "payload": {}, "expected_version": second},
        ]})
    };
    let (s, r) = post(&url, two(0, 1)).await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = post(&url, two(2, 2)).await;
    assert_eq!(
        s, 409,
        "the second event expects 2 but follows the first: {r}"
    );
    let (_, c) = get(&format!("{}/v1/streams/c", h.url)).await;
    assert_eq!(
        c["version"], 2,
        "nothing of the refused append is stored: {c}"
    );

    // At the batch limit it is stored; past it, refused whole with the limit named.
    let full: Vec<Value> = (0..1000).map(|_| ev("x.many", None)).collect();
    let r = append(&h, "full", full).await;
    assert_eq!(positions(&r), (3..1003).collect::<Vec<u64>>());
    let over: Vec<Value> = (0..1001).map(|_| ev("x.many", None)).collect();
    let (s, r) = post(
        &format!("{}/v1/streams/over", h.url),
        json!({"events": over}),
    )
    .await;
    assert_eq!(s, 413, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("1000"),
        "{r}"
    );
    let (s, o) = get(&format!("{}/v1/streams/over", h.url)).await;
    assert_eq!(s, 404, "{o}");
}

/// A writer that appends `total` events one per request with client ids, retrying each
/// failed append with the same id, and records every acknowledged position.
fn writer(
    url: String,
    total: usize,
    prefix: &'static str,
) -> (
    tokio::task::JoinHandle<HashMap<String, u64>>,
    Arc<AtomicUsize>,
) {
    let acked = Arc::new(AtomicUsize::new(0));
    let a = acked.clone();
    let task = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        let mut out = HashMap::new();
        for i in 0..total {
            let id = format!("{prefix}-{i}");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = client
                    .post(format!("{url}/v1/streams/{prefix}-{}", i % 7))
                    .json(&json!({"events": [ev("load.tick", Some(&id))]}))
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() == 200
                {
                    let v: Value = r.json().await.unwrap();
                    out.insert(id.clone(), v["positions"][0].as_u64().unwrap());
                    a.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                assert!(Instant::now() < deadline, "{id} was never acknowledged");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        out
    });
    (task, acked)
}

async fn wait_acked(acked: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "the writer stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every acknowledged id is in the log exactly once, at the position acknowledged.
fn check_log(events: &[Value], acked: &HashMap<String, u64>) {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for e in events {
        *count.entry(e["id"].as_str().unwrap()).or_default() += 1;
    }
    for (id, position) in acked {
        assert_eq!(
            count.get(id.as_str()),
            Some(&1),
            "{id} is not in the log exactly once"
        );
        let stored = events.iter().find(|e| e["id"] == *id).unwrap();
        assert_eq!(stored["position"], *position, "{id}");
    }
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["position"], i as u64, "positions are gap-free");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_kill9_of_the_server() {
    let mut nats = Nats::single();
    let dir = tempfile::tempdir().unwrap();
    let h = host_on(dir.path(), &nats.urls(), &[]).await;
    let (task, acked) = writer(h.url.clone(), 240, "crash");
    for round in 1..=2 {
        wait_acked(&acked, 80 * round).await;
        nats.nodes[0].kill9();
        // /health says the log is unreachable while it is.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, health) = get(&format!("{}/health", h.url)).await;
            if health["status"] == "degraded" {
                let why = health["log"]["last_write_error"]
                    .as_str()
                    .unwrap_or_default();
                assert!(why.contains("NATS"), "{health}");
                break;
            }
            assert!(Instant::now() < deadline, "{health}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nats.nodes[0].restart();
    }
    let acks = task.await.unwrap();
    assert_eq!(acks.len(), 240);
    // The host reconnected by itself; its log holds each acknowledged event once.
    check_log(&all_events(&h).await, &acks);
    let (_, health) = get(&format!("{}/health", h.url)).await;
    assert_eq!(health["status"], "ok", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_and_duplicates_nothing_when_a_node_dies() {
    let mut nats = Nats::cluster(3);
    let dir = tempfile::tempdir().unwrap();
    let log = format!("{}?replicas=3", nats.urls());
    // The host waits for the cluster to elect a leader before it creates its stream.
    let h = host_on(dir.path(), &log, &[]).await;
    let (task, acked) = writer(h.url.clone(), 200, "r3");
    wait_acked(&acked, 60).await;
    nats.nodes[0].kill9();
    wait_acked(&acked, 140).await;
    nats.nodes[0].restart();
    let acks = task.await.unwrap();
    check_log(&all_events(&h).await, &acks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_on_nats_folds_every_host_s_appends_and_keeps_its_state_across_restarts() {
    let nats = Nats::single();
    let log = format!("{}?stream=PROJ", nats.urls());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = host_on(da.path(), &log, &[]).await;
    let mut b = host_on(db.path(), &log, &[]).await;
    let manifest = "name = \"type-counter\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\">\"]\n";
    load_ok(&b, "type-counter", manifest, plugin_wasm("type-counter")).await;
    for i in 0..30 {
        let h = if i % 2 == 0 { &a } else { &b };
        append(
            h,
            &format!("s-{}", i % 3),
            vec![ev("item.added", None), ev("item.removed", None)],
        )
        .await;
    }
    caught_up(&b, "type-counter").await;
    let url = |h: &Host| format!("{}/v1/projections/type-counter/state?key=item.added", h.url);
    let (s, state) = get(&url(&b)).await;
    assert_eq!(s, 200, "{state}");
    assert_eq!(state["value"], 30, "{state}");
    b.stop();
    append(&a, "s-0", vec![ev("item.added", None)]).await;
    let b = host_on(db.path(), &log, &[]).await;
    caught_up(&b, "type-counter").await;
    let (_, state) = get(&url(&b)).await;
    assert_eq!(state["value"], 31, "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_delete_purges_the_stream_but_its_tombstone_and_frees_its_ids() {
    let nats = Nats::single();
    let dir = tempfile::tempdir().unwrap();
    // The server forgets message ids after one second.
    let log = format!("{}?duplicate_window=1", nats.urls());
    let h = host_on(dir.path(), &log, &[]).await;
    append(&h, "keep", vec![ev("x.kept", None)]).await;
    append(
        &h,
        "user-ada",
        vec![ev("x.secret", Some("ada-1")), ev("x.secret", None)],
    )
    .await;
    append(&h, "keep", vec![ev("x.kept", None)]).await;
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/streams/user-ada?hard=true", h.url))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let events = all_events(&h).await;
    let shown: Vec<(u64, &str)> = events
        .iter()
        .map(|e| (e["position"].as_u64().unwrap(), e["type"].as_str().unwrap()))
        .collect();
    // The secrets are gone; every other event keeps its position; the tombstone stays.
    assert_eq!(
        shown,
        [(0, "x.kept"), (3, "x.kept"), (4, "evhost.stream.deleted")],
        "{events:?}"
    );
    let (s, _) = get(&format!("{}/v1/streams/user-ada", h.url)).await;
    assert_eq!(s, 410);
    let (s, r) = post(
        &format!("{}/v1/streams/user-ada", h.url),
        json!({"events": [ev("x.again", None)]}),
    )
    .await;
    assert_eq!(s, 410, "{r}");
    // After a restore the stream takes appends again; its erased events stay gone.
    let (s, r) = post(&format!("{}/v1/streams/user-ada/restore", h.url), json!({})).await;
    assert_eq!(s, 200, "{r}");
    // Within the server's duplicate window the id is still refused; after it, free.
    let (s, r) = post(
        &format!("{}/v1/streams/other", h.url),
        json!({"events": [ev("x.reused", Some("ada-1"))]}),
    )
    .await;
    if s != 200 {
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("duplicate window"),
            "{r}"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let r = append(&h, "other", vec![ev("x.reused", Some("ada-1"))]).await;
        assert_eq!(
            positions(&r),
            [6],
            "the erased event's id is free again: {r}"
        );
    }
}

/// Pages of a long read come from consumers kept between pages; every page, filtered or
/// not, and one that starts where no consumer stands, gives exactly the log's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_reads_page_through_the_log_exactly() {
    let nats = Nats::single();
    let dir = tempfile::tempdir().unwrap();
    let h = host_on(dir.path(), &nats.urls(), &[]).await;
    let mut expected = Vec::new();
    for k in 0..5 {
        let events: Vec<Value> = (0..1000)
            .map(|i| {
                let ty = if i % 3 == 0 { "b.three" } else { "a.other" };
                json!({"id": format!("e-{k}-{i}"), "type": ty, "payload": i})
            })
            .collect();
        expected.extend(events.iter().map(|e| (e["id"].clone(), e["type"].clone())));
        append(&h, &format!("s-{k}"), events).await;
    }
    let read = |query: String| {
        let url = h.url.clone();
        async move {
            let mut out = Vec::new();
            let mut from = 0;
            loop {
                let (s, page) = get(&format!("{url}/v1/events?from={from}&limit=700{query}")).await;
                assert_eq!(s, 200, "{page}");
                let events = page["events"].as_array().unwrap();
                out.extend(events.iter().map(|e| (e["id"].clone(), e["type"].clone())));
                let next = page["next"].as_u64().unwrap();
                assert!(next > from, "a page moves on: {from} -> {next}");
                if next >= page["head"].as_u64().unwrap() {
                    return out;
                }
                from = next;
            }
        }
    };
    assert_eq!(read(String::new()).await, expected);
    let threes: Vec<_> = expected
        .iter()
        .filter(|(_, t)| *t == "b.three")
        .cloned()
        .collect();
    assert_eq!(read("&type=b.three".into()).await, threes);
    // Twice more: kept consumers, then ones that no longer stand at the start.
    assert_eq!(read("&type=b.three".into()).await, threes);
    assert_eq!(read(String::new()).await, expected);
    let (_, page) = get(&format!("{}/v1/events?from=4321&limit=600", h.url)).await;
    assert_eq!(page["events"][0]["position"], 4321, "{}", page["events"][0]);
}

const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");

/// Each loaded plugin's placement on `h`, by name.
async fn placements(h: &Host) -> HashMap<String, Value> {
    let (s, list) = get(&format!("{}/v1/plugins", h.url)).await;
    assert_eq!(s, 200, "{list}");
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let mut placement = p["placement"].clone();
            placement["state"] = p["state"].clone();
            (p["name"].as_str().unwrap().to_owned(), placement)
        })
        .collect()
}

/// Uploads http-get with `manifest`, granted `grant`.
async fn upload_http_get(h: &Host, manifest: &str, grant: &str) {
    let (s, body) =
        evhost_tests::upload_granted(h, "http-get", manifest, plugin_wasm("http-get"), &[grant])
            .await;
    assert_eq!(s, 200, "{body}");
}

/// Waits until every plugin on `h` runs there; returns how long it took.
async fn all_run_on(h: &Host, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let p = placements(h).await;
        if !p.is_empty() && p.values().all(|p| p["here"] == true) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not taken over in {limit:?}: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(h: &Host, sig: libc::c_int) {
    // SAFETY: kill(2) on the host's own child process.
    assert_eq!(unsafe { libc::kill(h.pid() as libc::pid_t, sig) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_move_to_another_host_when_theirs_stalls_or_dies_and_nothing_runs_twice() {
    let server = evhost_tests::CountingServer::start(Duration::from_millis(40)).await;
    let nats = Nats::single();
    // Leases lapse after 2 s: a dead host's plugins move within 2.5 s.
    let log = format!("{}?stream=LEASES&lease_ttl=2", nats.urls());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = |id: &'static str| {
        vec![
            "--plugins",
            PLUGINS,
            "--plugin-precedence",
            "uploaded",
            "--host-id",
            id,
        ]
    };
    let manifest = format!(
        "name = \"http-get\"\nversion = \"0.1.0\"\nkind = \"tool\"\n[limits]\nbatch_timeout_ms = 5000\n\
         [capabilities]\nhttp = [\"{}\"]\n",
        server.authority
    );
    let grant = format!("http:{}", server.authority);
    let a = host_on(da.path(), &log, &args("a")).await;
    upload_http_get(&a, &manifest, &grant).await;
    all_run_on(&a, Duration::from_secs(10)).await;
    let mut b = host_on(db.path(), &log, &args("b")).await;
    upload_http_get(&b, &manifest, &grant).await;
    // B has every plugin loaded and standing by; its status says A runs them, and where.
    let deadline = Instant::now() + Duration::from_secs(5);
    let on_b = loop {
        let p = placements(&b).await;
        if p.values().all(|p| p["host"] == "a") || Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(on_b.len() >= 5, "{on_b:?}");
    for (name, p) in &on_b {
        assert_eq!(p["state"], "standby", "{name}: {p}");
        assert_eq!(p["host"], "a", "{name}: {p}");
        assert_eq!(p["here"], false, "{name}: {p}");
        assert_eq!(p["api"], json!(a.url), "{name}: {p}");
    }
    // `evhost plugin list` names the host that runs each plugin; `plugin status` adds its API.
    let (ok, out, err) = b.cli(&["plugin", "list"]);
    assert!(ok, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("type-counter"))
        .unwrap_or_default();
    assert!(
        out.starts_with("NAME") && out.lines().next().unwrap().ends_with("HOST"),
        "{out}"
    );
    assert!(row.contains("standby") && row.ends_with(" a"), "{out}");
    let (ok, out, err) = b.cli(&["plugin", "status", "type-counter"]);
    assert!(
        ok && out.contains(&format!("runs on    a, API {}", a.url)),
        "{out}{err}"
    );
    let (_, out, _) = a.cli(&["plugin", "list"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("type-counter") && l.ends_with("a (here)")),
        "{out}"
    );
    let on_a = placements(&a).await;
    assert!(
        on_a.values().all(|p| p["token"].as_u64().is_some()),
        "{on_a:?}"
    );
    // A standby's state is stale: reads are sent to the host that runs the plugin.
    let (s, refused) = get(&format!(
        "{}/v1/projections/type-counter/state?key=x",
        b.url
    ))
    .await;
    assert_eq!(s, 421, "{refused}");
    assert_eq!(refused["error"]["code"], "runs_elsewhere", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"a\""),
        "{refused}"
    );

    // A writer appends memories and queries (whose plans call tools) to both hosts.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (urls, authority, halt) = (
        [a.url.clone(), b.url.clone()],
        server.authority.clone(),
        stop.clone(),
    );
    let writer = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        let mut acked: Vec<String> = Vec::new();
        for i in 0u64.. {
            if halt.load(Ordering::Relaxed) {
                break;
            }
            let cid = format!("q{i}");
            let events = json!({"events": [
                {"stream": "mem", "type": "memory.created",
                 "payload": {"content": format!("Ada Lovelace met Charles Babbage at step {i}")}},
                {"stream": format!("chat-{cid}"), "type": "user.query.received",
                 "payload": {"query": format!("what is {i}+2*3 and fetch http://{authority}/{cid}")},
                 "metadata": {"correlation_id": cid}},
            ]});
            let r = client
                .post(format!("{}/v1/events", urls[(i % 2) as usize]))
                .json(&events)
                .send()
                .await;
            if matches!(r, Ok(r) if r.status().is_success()) {
                acked.push(cid);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // A stalls (SIGSTOP): its leases lapse and B takes its plugins over.
    signal(&a, libc::SIGSTOP);
    let took = all_run_on(&b, Duration::from_secs(8)).await;
    eprintln!("B took the plugins over {took:?} after A stalled (lease ttl 2 s)");
    tokio::time::sleep(Duration::from_millis(800)).await;
    // A wakes: it finds its leases gone, commits nothing more and stands by.
    signal(&a, libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let p = placements(&a).await;
        if p.values()
            .all(|p| p["state"] == "standby" && p["host"] == "b")
        {
            break;
        }
        assert!(Instant::now() < deadline, "A did not stand by: {p:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;

    // B dies (kill -9): A takes the plugins back.
    b.kill9();
    let took = all_run_on(&a, Duration::from_secs(8)).await;
    eprintln!("A took the plugins back {took:?} after B was killed");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();

    // Every query in the log is answered once; memories extracted once; each invocation
    // has one outcome, and the tool ran at most once (once when it completed).
    let events = all_events(&a).await;
    let flows = evhost_tests::logged_flows(&events);
    assert!(
        acked.iter().all(|c| flows.contains(c)),
        "an acknowledged query was lost"
    );
    assert!(flows.len() > 20, "{} flows", flows.len());
    for cid in &flows {
        evhost_tests::answered(&a, cid).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = all_events(&a).await;
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for e in &events {
        *ids.entry(e["id"].as_str().unwrap()).or_default() += 1;
    }
    assert!(ids.values().all(|n| *n == 1), "an event id is stored twice");
    // No handled event was taken for a refused one after the moves.
    let letters: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "evhost.plugin.dead_lettered")
        .collect();
    assert!(letters.is_empty(), "{letters:?}");
    let (_, dlq) = get(&format!("{}/v1/dlq", a.url)).await;
    assert_eq!(
        dlq["dead_letters"].as_array().map(Vec::len),
        Some(0),
        "{dlq}"
    );
    let mut per_cause: HashMap<String, usize> = HashMap::new();
    for e in events.iter().filter(|e| {
        [
            "memory.entity.extracted",
            "plan.generated",
            "answer.synthesized",
        ]
        .contains(&e["type"].as_str().unwrap())
    }) {
        let key = match e["type"].as_str().unwrap() {
            "memory.entity.extracted" => format!("x:{}", e["metadata"]["causation_id"]),
            t => format!("{t}:{}", e["metadata"]["correlation_id"]),
        };
        *per_cause.entry(key).or_default() += 1;
    }
    for e in events.iter().filter(|e| e["type"] == "memory.created") {
        assert_eq!(
            per_cause.get(&format!("x:{}", e["id"])),
            Some(&1),
            "memory {}",
            e["id"]
        );
    }
    assert!(per_cause.values().all(|n| *n == 1), "{per_cause:?}");
    let (completed, interrupted) = evhost_tests::check_tool_outcomes(&events, &flows, &server);
    assert!(completed > 0);
    // The projection's state on A, which ran, stood by and ran again, equals a replay.
    caught_up(&a, "type-counter").await;
    let events = all_events(&a).await;
    let mut by_type: HashMap<&str, u64> = HashMap::new();
    for e in &events {
        *by_type.entry(e["type"].as_str().unwrap()).or_default() += 1;
    }
    for (ty, n) in &by_type {
        let (s, state) = get(&format!(
            "{}/v1/projections/type-counter/state?key={ty}",
            a.url
        ))
        .await;
        assert_eq!(s, 200, "{state}");
        assert_eq!(state["value"], *n, "{ty}: {state}");
    }
    eprintln!(
        "{} flows, {} events; http-get completed {completed}, interrupted {interrupted}",
        flows.len(),
        events.len()
    );
}

/// Two hosts' logs on one stream: an event id that one appended first is reported as not
/// written to the other, which is how two hosts never both run one tool invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_host_to_append_an_id_is_told_it_wrote_it() {
    use evhost::{EventLog, EventType, ExpectedVersion, Hub, NatsLog, NatsLogConfig, NewEvent};
    let nats = Nats::single();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let open = |dir: std::path::PathBuf| {
        let urls = format!("{}?stream=WRITTEN", nats.urls());
        async move {
            let config = NatsLogConfig::parse(&urls, &dir).unwrap();
            NatsLog::open(config, Hub::new(100)).await.unwrap()
        }
    };
    let (a, b) = (open(da.path().into()).await, open(db.path().into()).await);
    let start = |id: &str| {
        vec![evhost::StreamAppend {
            stream: "s".into(),
            expected: ExpectedVersion::Any,
            events: vec![
                NewEvent::new(
                    EventType::new("tool.invocation.started").unwrap(),
                    evhost::Payload::from_json("{}").unwrap(),
                )
                .with_id(id),
            ],
        }]
    };
    let first = a.append(start("inv-1")).await.unwrap();
    let second = b.append(start("inv-1")).await.unwrap();
    assert_eq!(first[0].written, vec![true]);
    assert_eq!(second[0].written, vec![false]);
    assert_eq!(second[0].positions, first[0].positions);
    // And so on at the same time: exactly one of the two stores each id.
    for i in 0..20 {
        let id = format!("inv-race-{i}");
        let (x, y) = tokio::join!(a.append(start(&id)), b.append(start(&id)));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x[0].positions, y[0].positions, "{id}");
        assert!(
            x[0].written[0] ^ y[0].written[0],
            "{id}: {:?} {:?}",
            x[0].written,
            y[0].written
        );
    }
}
