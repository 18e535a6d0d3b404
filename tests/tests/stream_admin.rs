//! A stream's lifecycle against the real binary: archive it to files with a manifest,
//! delete it (reads 410, appends refused, a tombstone in the log), restore it, and erase its
//! events from disk for good, with `kill -9` during the erasure.

use std::path::Path;
use std::time::Duration;

use evhost_tests::{Host, all_events, append, get, jitter, post};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

async fn delete(h: &Host, stream: &str, hard: bool) -> (u16, Value) {
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/streams/{stream}?hard={hard}", h.url))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// Archive, delete, restore, over HTTP and through the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_archived_deleted_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    append(
        &h,
        "order-1",
        json!([
            {"type": "order.placed", "payload": {"total": 12}, "id": "o1-a"},
            {"type": "order.paid", "payload": {"amount": 12}},
            {"type": "order.shipped", "payload": {}},
        ]),
    )
    .await;
    append(
        &h,
        "order-2",
        json!([{"type": "order.placed", "payload": {"total": 3}}]),
    )
    .await;

    // Archive: JSON lines, and a manifest whose checksum and counts match them.
    let (s, m) = post(
        &format!("{}/v1/streams/order-1/archive", h.url),
        Value::Null,
    )
    .await;
    assert_eq!(s, 200, "{m}");
    let file = Path::new(m["file"].as_str().unwrap());
    assert!(file.starts_with(dir.path().join("archive")), "{m}");
    let text = std::fs::read(file).unwrap();
    assert_eq!(format!("{:x}", Sha256::digest(&text)), m["sha256"]);
    assert_eq!(m["bytes"], text.len());
    let lines: Vec<Value> = String::from_utf8(text)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(m["events"], 3);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["id"], "o1-a");
    assert_eq!(lines[2]["type"], "order.shipped");
    assert_eq!(
        (&m["first_version"], &m["last_version"]),
        (&json!(0), &json!(2))
    );
    let manifest = file.with_file_name(
        file.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .replace(".jsonl", ".manifest.json"),
    );
    let on_disk: Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    assert_eq!(on_disk["sha256"], m["sha256"]);

    // A client cannot forge the host's own events.
    let (s, v) = post(
        &format!("{}/v1/streams/order-2", h.url),
        json!({"events": [{"type": "evhost.stream.deleted", "payload": {}}]}),
    )
    .await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (400, &json!("reserved_type")),
        "{v}"
    );

    // Delete: a tombstone, 410 on reads and appends, listed as deleted.
    let (s, d) = delete(&h, "order-1", false).await;
    assert_eq!(s, 200, "{d}");
    let tombstone = d["deleted_at"].as_u64().unwrap();
    assert_eq!(tombstone, 4);
    let (s, v) = get(&format!("{}/v1/streams/order-1", h.url)).await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (410, &json!("stream_deleted")),
        "{v}"
    );
    assert_eq!(v["error"]["position"], tombstone);
    let (s, v) = post(
        &format!("{}/v1/streams/order-1", h.url),
        json!({"events": [{"type": "order.refunded", "payload": {}}]}),
    )
    .await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (410, &json!("stream_deleted")),
        "{v}"
    );
    let (s, v) = post(
        &format!("{}/v1/events", h.url),
        json!({"events": [
            {"stream": "order-2", "type": "order.paid", "payload": {}},
            {"stream": "order-1", "type": "order.refunded", "payload": {}},
        ]}),
    )
    .await;
    assert_eq!(
        s, 410,
        "a multi-stream append touching it writes nothing: {v}"
    );
    let events = all_events(&h).await;
    assert_eq!(events.len(), 5);
    assert_eq!(events[4]["type"], "evhost.stream.deleted");
    assert_eq!(events[4]["stream"], "order-1");
    let (_, list) = get(&format!("{}/v1/streams", h.url)).await;
    let deleted: Vec<(&str, bool)> = list["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stream"].as_str().unwrap(),
                s["deleted"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(deleted, vec![("order-1", true), ("order-2", false)]);
    let (s, again) = delete(&h, "order-1", false).await;
    assert_eq!(
        (s, &again["already_deleted"], &again["deleted_at"]),
        (200, &json!(true), &json!(tombstone))
    );
    let (s, _) = delete(&h, "no-such-stream", false).await;
    assert_eq!(s, 404);

    // Restore through the CLI: appends work again, and the events read again.
    let (ok, out, err) = h.cli(&["stream", "restore", "order-1"]);
    assert!(ok, "{out} {err}");
    assert!(out.contains("restored_at"), "{out}");
    append(
        &h,
        "order-1",
        json!([{"type": "order.refunded", "payload": {}}]),
    )
    .await;
    let (s, v) = get(&format!("{}/v1/streams/order-1", h.url)).await;
    assert_eq!(s, 200, "{v}");
    let types: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "order.placed",
            "order.paid",
            "order.shipped",
            "evhost.stream.deleted",
            "evhost.stream.restored",
            "order.refunded"
        ]
    );
    let (ok, _, err) = h.cli(&["stream", "restore", "order-1"]);
    assert!(!ok && err.contains("409"), "{err}");
    let (ok, out, err) = h.cli(&["stream", "archive", "order-2"]);
    assert!(ok && out.contains("\"events\":1"), "{out} {err}");
    let (ok, out, err) = h.cli(&["stream", "delete", "order-2", "--hard"]);
    assert!(ok && out.contains("\"erased\""), "{out} {err}");
}

fn segment_bytes(data: &Path) -> Vec<u8> {
    let mut files: Vec<_> = std::fs::read_dir(data.join("events"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Hard deletes, each interrupted by `kill -9` at a random moment: after the restart every
/// event of the other streams is there at its position, the stream is soft-deleted or
/// erased (the erasure a crash cut short is finished at start), and once the delete is
/// asked again no byte of its events is left in the segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_delete_survives_kill_9_and_leaves_the_other_streams_intact() {
    const ROUNDS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let args = ["--segment-mb", "1"];
    let mut h = Host::start(BIN, dir.path(), &args).await;
    // Each round's stream interleaved with others, in every chunk, over several segments.
    let pad = "p".repeat(300);
    for batch in 0..30 {
        let mut events = Vec::new();
        for i in 0..100 {
            let n = batch * 100 + i;
            events.push(json!({"stream": format!("pii-{}", n % ROUNDS), "type": "user.noted",
                "payload": {"note": format!("secret-{}-{n}", n % ROUNDS), "pad": pad}, "id": format!("pii-id-{n}")}));
            events.push(
                json!({"stream": format!("keep-{}", n % 5), "type": "user.noted",
                "payload": {"note": format!("public-{n}"), "pad": pad}}),
            );
        }
        let (s, v) = post(&format!("{}/v1/events", h.url), json!({ "events": events })).await;
        assert_eq!(s, 200, "{v}");
    }
    let keep = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["stream"].as_str().unwrap().starts_with("keep-"))
            .cloned()
            .collect()
    };
    let kept = keep(&all_events(&h).await);
    assert_eq!(kept.len(), 3000);
    assert!(
        std::fs::read_dir(dir.path().join("events"))
            .unwrap()
            .count()
            > 3
    );

    for round in 0..ROUNDS {
        let stream = format!("pii-{round}");
        let url = h.url.clone();
        let s2 = stream.clone();
        let request = tokio::spawn(async move {
            reqwest::Client::new()
                .delete(format!("{url}/v1/streams/{s2}?hard=true"))
                .send()
                .await
        });
        tokio::time::sleep(Duration::from_millis(jitter(120))).await;
        h.kill9();
        let _ = request.await;
        h = Host::start(BIN, dir.path(), &args).await;
        let events = all_events(&h).await;
        assert_eq!(
            keep(&events),
            kept,
            "round {round}: every other event, at its position"
        );
        assert!(
            events.iter().all(|e| e["type"] != "evhost.event.erased"),
            "reads by position skip erased events"
        );
        let left = events
            .iter()
            .filter(|e| e["stream"] == stream.as_str())
            .count();
        assert!(
            left == 1000 || left == 1001 || left == 1,
            "round {round}: the stream is as it was, soft-deleted or erased ({left} events)"
        );
        let took = std::time::Instant::now();
        let (s, d) = delete(&h, &stream, true).await;
        assert_eq!(s, 200, "{d}");
        eprintln!(
            "round {round}: after the kill the stream had {left} events; the second hard delete took {:?} and erased {}",
            took.elapsed(),
            d["erased"]["events"]
        );
        let events = all_events(&h).await;
        assert_eq!(keep(&events), kept);
        let mine: Vec<&Value> = events
            .iter()
            .filter(|e| e["stream"] == stream.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "only the tombstone is left");
        assert_eq!(mine[0]["type"], "evhost.stream.deleted");
        let (s, _) = get(&format!("{}/v1/streams/{stream}", h.url)).await;
        assert_eq!(s, 410);
        let raw = segment_bytes(dir.path());
        assert!(
            !contains(&raw, format!("secret-{round}-").as_bytes()),
            "round {round}: no byte of its payloads is left on disk"
        );
        assert!(contains(&raw, b"public-2999"));
        if round + 1 < ROUNDS {
            assert!(contains(&raw, format!("secret-{}-", round + 1).as_bytes()));
        }
    }
    assert!(!dir.path().join("erase.intent").exists());
    // The index rebuilt from the segments agrees.
    h.stop();
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let h = Host::start(BIN, dir.path(), &args).await;
    let events = all_events(&h).await;
    assert_eq!(keep(&events), kept);
    assert_eq!(events.len(), 3000 + ROUNDS);
}

/// Appends 1,000 events of stream `pii` (payloads `secret-N`, ids `pii-N` when `ids`)
/// interleaved with 1,000 of stream `keep`, each padded to about 330 bytes; returns the
/// `keep` events as read back.
async fn interleaved(h: &Host, ids: bool) -> Vec<Value> {
    let pad = "p".repeat(300);
    for batch in 0..10 {
        let mut events = Vec::new();
        for i in 0..100 {
            let n = batch * 100 + i;
            let mut pii = json!({"stream": "pii", "type": "user.noted",
                "payload": {"note": format!("secret-{n}"), "pad": pad}});
            if ids {
                pii["id"] = json!(format!("pii-{n}"));
            }
            events.push(pii);
            events.push(json!({"stream": "keep", "type": "user.noted",
                "payload": {"note": format!("public-{n}"), "pad": pad}}));
        }
        let (s, v) = post(&format!("{}/v1/events", h.url), json!({ "events": events })).await;
        assert_eq!(s, 200, "{v}");
    }
    all_events(h)
        .await
        .into_iter()
        .filter(|e| e["stream"] == "keep")
        .collect()
}

/// A crash at each step of an erasure, put there by a fault point (the process aborts, as
/// with `kill -9`): the next start finishes what was begun, and nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_cut_short_at_any_step_is_finished_at_the_next_start() {
    let args = ["--segment-mb", "1"];
    for point in [
        "erase-after-intent",
        "erase-after-index",
        "erase-mid-overwrite",
        "erase-before-intent-removed",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Host::start_with_env(BIN, dir.path(), &args, &[("EVHOST_FAULT", point)]).await;
        let kept = interleaved(&h, true).await;
        let r = reqwest::Client::new()
            .delete(format!("{}/v1/streams/pii?hard=true", h.url))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        assert!(r.is_err(), "{point}: the host stopped before it answered");
        assert!(
            h.wait_exit(Duration::from_secs(10)).is_some(),
            "{point}: the host aborted"
        );
        assert!(
            dir.path().join("erase.intent").exists(),
            "{point}: the intent was left"
        );
        let h = Host::start(BIN, dir.path(), &args).await;
        assert!(
            !dir.path().join("erase.intent").exists(),
            "{point}: finished at start"
        );
        let events = all_events(&h).await;
        let now_kept: Vec<Value> = events
            .iter()
            .filter(|e| e["stream"] == "keep")
            .cloned()
            .collect();
        assert_eq!(now_kept, kept, "{point}: every other event at its position");
        let pii: Vec<&Value> = events.iter().filter(|e| e["stream"] == "pii").collect();
        assert_eq!(pii.len(), 1, "{point}: only the tombstone is left");
        let raw = segment_bytes(dir.path());
        assert!(!contains(&raw, b"secret-"), "{point}: no payload byte left");
        let (_, found) = get(&format!("{}/v1/events?from=0&limit=1", h.url)).await;
        assert_eq!(
            found["events"][0]["stream"], "keep",
            "{point}: reads skip the erased events"
        );
    }
}

const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");

/// A plugin cannot derive the host's own events: an extractor asked to forge a restore of a
/// deleted stream fails on that event (dead-lettered), and the stream stays deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_forge_the_hosts_own_events() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    append(
        &h,
        "locked",
        json!([{"type": "acct.opened", "payload": {}}]),
    )
    .await;
    let (s, _) = delete(&h, "locked", false).await;
    assert_eq!(s, 200);
    let manifest = "name = \"forger\"\nversion = \"1\"\nkind = \"extractor\"\nsubscriptions = [\"echo.>\"]\n[on_failure]\nretries = 0\nbackoff_ms = 1\n";
    let component = std::fs::read(format!("{BUILD}/echo_cycle.wasm")).unwrap();
    let (s, body) = evhost_tests::upload(&h, "forger", manifest, component).await;
    assert_eq!(s, 200, "{body}");
    for forged in [
        "evhost.stream.restored",
        "evhost.stream.deleted",
        "evhost.event.erased",
    ] {
        append(
            &h,
            "x",
            json!([{"type": "echo.forge", "payload": {"forge": {"type": forged, "stream": "locked"}}}]),
        )
        .await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, info) = get(&format!("{}/v1/plugins/forger", h.url)).await;
        if info["dead_letters"].as_u64().unwrap_or(0) >= 3 {
            assert!(
                info["last_error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("evhost."),
                "{info}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the forged events were not refused: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = post(
        &format!("{}/v1/streams/locked", h.url),
        json!({"events": [{"type": "acct.credited", "payload": {}}]}),
    )
    .await;
    assert_eq!(s, 410, "still deleted: {v}");
    let events = all_events(&h).await;
    assert!(
        events.iter().all(|e| e["source"] != "forger"),
        "nothing the plugin forged is in the log"
    );
}

/// An erasure in several rounds, cut short after its first: the stream stays deleted with
/// its index intact, the rest of its events are still stored, and a second hard delete
/// finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_cut_short_between_rounds_is_finished_by_the_next_delete() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--segment-mb", "1", "--erase-round-kb", "64"];
    let mut h = Host::start_with_env(
        BIN,
        dir.path(),
        &args,
        &[("EVHOST_FAULT", "erase-after-intent")],
    )
    .await;
    let kept = interleaved(&h, false).await;
    let _ = reqwest::Client::new()
        .delete(format!("{}/v1/streams/pii?hard=true", h.url))
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    assert!(
        h.wait_exit(Duration::from_secs(10)).is_some(),
        "the host aborted"
    );
    let h = Host::start(BIN, dir.path(), &args).await;
    let events = all_events(&h).await;
    let left = events.iter().filter(|e| e["stream"] == "pii").count();
    assert!(
        left > 1 && left < 1001,
        "the first round erased some, not all: {left}"
    );
    let (s, _) = get(&format!("{}/v1/streams/pii", h.url)).await;
    assert_eq!(s, 410, "still deleted");
    let (s, d) = delete(&h, "pii", true).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        d["erased"]["events"].as_u64().unwrap() as usize,
        left - 1,
        "{d}"
    );
    let events = all_events(&h).await;
    let now_kept: Vec<Value> = events
        .iter()
        .filter(|e| e["stream"] == "keep")
        .cloned()
        .collect();
    assert_eq!(now_kept, kept);
    assert_eq!(events.iter().filter(|e| e["stream"] == "pii").count(), 1);
    assert!(!contains(&segment_bytes(dir.path()), b"secret-"));
    let (_, v) = get(&format!("{}/v1/streams", h.url)).await;
    let pii = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "pii")
        .unwrap()
        .clone();
    assert_eq!(
        (&pii["version"], &pii["deleted"]),
        (&json!(1001), &json!(true)),
        "{pii}"
    );
}
