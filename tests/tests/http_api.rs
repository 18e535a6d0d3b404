//! The HTTP API and CLI of the real binary, over loopback, on real sled.

use std::time::Duration;

use evhost_tests::Host;
use futures::StreamExt;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

async fn post(url: &str, body: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn head(h: &Host) -> u64 {
    get(&format!("{}/health", h.url)).await.1["head"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn append_read_and_stream_endpoints_round_trip_the_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let (s, body) = post(
        &format!("{}/v1/streams/assistant-42", h.url),
        r#"{"expected_version":"no_stream","events":[
            {"type":"assistant.created","payload":{"assistant_key":"a42"},"id":"evt-1","source":"tour","metadata":{"correlation_id":"c1","custom":"v"}},
            {"type":"assistant.tool.executed","payload":{"tool_name":"say"}}]}"#,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body,
        json!({"stream": "assistant-42", "positions": [0, 1], "next_version": 2})
    );

    let (s, body) = post(
        &format!("{}/v1/events", h.url),
        r#"{"events":[{"stream":"m-1","type":"memory.created","payload":{"content":"Ada met Alan"}},
                      {"stream":"assistant-42","type":"assistant.tick.completed","payload":{},"expected_version":2}]}"#,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["positions"], json!([2, 3]));

    let (_, page) = get(&format!(
        "{}/v1/events?from=0&limit=10&type=assistant.*",
        h.url
    ))
    .await;
    assert_eq!(
        page["events"].as_array().unwrap().len(),
        1,
        "'*' is one segment"
    );
    let (_, page) = get(&format!(
        "{}/v1/events?from=0&limit=10&type=assistant.>",
        h.url
    ))
    .await;
    let evs = page["events"].as_array().unwrap();
    let positions: Vec<u64> = evs
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, vec![0, 1, 3]);
    let first = &evs[0];
    assert_eq!(first["id"], "evt-1");
    assert_eq!(first["type"], "assistant.created");
    assert_eq!(first["stream"], "assistant-42");
    assert_eq!(first["position"], 0);
    assert_eq!(first["version"], 0);
    assert_eq!(first["source"], "tour");
    assert_eq!(first["payload"], json!({"assistant_key": "a42"}));
    assert_eq!(
        first["metadata"],
        json!({"correlation_id": "c1", "custom": "v"})
    );
    assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(page["head"], 4);

    let (s, stream) = get(&format!("{}/v1/streams/assistant-42?from_version=1", h.url)).await;
    assert_eq!(s, 200);
    let versions: Vec<u64> = stream["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2]);
    assert_eq!(stream["version"], 3);
    let (s, nf) = get(&format!("{}/v1/streams/nobody", h.url)).await;
    assert_eq!((s, nf["error"]["code"].as_str()), (404, Some("not_found")));
}

/// A payload is stored as the text the client sent, escapes and all, through both append
/// endpoints, and reads back as the same value.
#[tokio::test]
async fn payloads_with_escapes_are_stored_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let payload = r#"{"say":"\"hi\"\n","cafe":"caf\u00e9","smile":"\ud83d\ude00","path":"C:\\tmp","n":[1.5e3,-0]}"#;
    let (s, body) = post(
        &format!("{}/v1/streams/esc", h.url),
        &format!(r#"{{"events":[{{"type":"a.b","payload":{payload}}},{{"type":"a.b","payload":{payload}}}]}}"#),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post(
        &format!("{}/v1/events", h.url),
        &format!(r#"{{"events":[{{"stream":"esc","type":"a.c","payload":{payload}}}]}}"#),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let text = reqwest::get(format!("{}/v1/streams/esc", h.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        text.matches(payload).count(),
        3,
        "each payload's text as sent: {text}"
    );
    let page: Value = serde_json::from_str(&text).unwrap();
    let expected: Value = serde_json::from_str(payload).unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    for e in events {
        assert_eq!(e["payload"], expected);
        assert_eq!(e["payload"]["smile"], "😀");
    }
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["a.b", "a.b", "a.c"]);
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(
        BIN,
        dir.path(),
        &["--max-event-bytes", "1000", "--max-batch-events", "5"],
    )
    .await;
    let url = format!("{}/v1/streams/s", h.url);
    let (s, _) = post(&url, r#"{"events":[{"type":"a.b","payload":1}]}"#).await;
    assert_eq!(s, 200);
    let big = format!(
        r#"{{"events":[{{"type":"a.b","payload":"{}"}}]}}"#,
        "x".repeat(2000)
    );
    let six = format!(
        r#"{{"events":[{}]}}"#,
        vec![r#"{"type":"a.b","payload":1}"#; 6].join(",")
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed json",
            r#"{"events":[{"type":"a.b","#.into(),
            400,
            "invalid_json",
        ),
        (
            "bad type",
            r#"{"events":[{"type":"a..b","payload":1}]}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "wildcard in type",
            r#"{"events":[{"type":"a.*","payload":1}]}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "missing payload",
            r#"{"events":[{"type":"a.b"}]}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "unknown field",
            r#"{"events":[{"type":"a.b","payload":1,"paylod":2}]}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "bad expected_version",
            r#"{"expected_version":"latest","events":[{"type":"a.b","payload":1}]}"#.into(),
            400,
            "invalid_json",
        ),
        (
            "lone surrogate in the payload",
            r#"{"events":[{"type":"a.b","payload":"\ud800x"}]}"#.into(),
            400,
            "invalid_json",
        ),
        ("no events", r#"{"events":[]}"#.into(), 400, "empty_append"),
        ("oversized payload", big, 413, "too_large"),
        ("too many events", six, 413, "too_large"),
        (
            "version conflict",
            r#"{"expected_version":0,"events":[{"type":"a.b","payload":1}]}"#.into(),
            409,
            "version_conflict",
        ),
    ];
    for (what, body, status, code) in cases {
        let (s, err) = post(&url, &body).await;
        assert_eq!(s, status, "{what}: {err}");
        assert_eq!(err["error"]["code"], code, "{what}: {err}");
        assert!(
            !err["error"]["message"].as_str().unwrap().is_empty(),
            "{what}"
        );
        assert_eq!(head(&h).await, 1, "{what} wrote something");
    }
    let (_, conflict) = post(
        &url,
        r#"{"expected_version":"no_stream","events":[{"type":"a.b","payload":1}]}"#,
    )
    .await;
    assert_eq!(conflict["error"]["current_version"], 1);
    // A batch where one stream conflicts writes none of its events.
    let (s, _) = post(
        &format!("{}/v1/events", h.url),
        r#"{"events":[{"stream":"fresh","type":"a.b","payload":1},{"stream":"s","type":"a.b","payload":1,"expected_version":"no_stream"}]}"#,
    )
    .await;
    assert_eq!(s, 409);
    assert_eq!(head(&h).await, 1);
    let (s, e) = get(&format!("{}/v1/events?type=a.>.b", h.url)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("invalid_pattern"))
    );
    let (s, e) = get(&format!("{}/v1/events?from=minus", h.url)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    let (s, e) = get(&format!("{}/v1/nothing-here", h.url)).await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn an_idempotent_retry_returns_the_original_positions() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let body = r#"{"expected_version":"no_stream","events":[{"type":"order.placed","payload":{},"id":"o-1"}]}"#;
    let url = format!("{}/v1/streams/orders", h.url);
    let (s1, a) = post(&url, body).await;
    let (s2, b) = post(&url, body).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(a, b);
    assert_eq!(head(&h).await, 1);
}

/// Reads SSE `data:` lines until `n` events arrived; returns their positions.
async fn sse_positions(url: &str, n: usize, last_event_id: Option<u64>) -> Vec<u64> {
    let mut req = reqwest::Client::new().get(url);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("an event within 10 s")
            .expect("stream open")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                let e: Value = serde_json::from_str(data.trim()).unwrap();
                out.push(e["position"].as_u64().unwrap());
            }
        }
    }
    out
}

#[tokio::test]
async fn sse_subscribers_that_reconnect_with_from_miss_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let append = |ty: &'static str, n: usize| {
        let url = format!("{}/v1/streams/s", h.url);
        async move {
            let events: Vec<Value> = (0..n).map(|i| json!({"type": ty, "payload": i})).collect();
            let (s, _) = post(&url, &json!({"events": events}).to_string()).await;
            assert_eq!(s, 200);
        }
    };
    append("job.started", 3).await; // 0..3
    append("other.thing", 2).await; // 3..5
    append("job.finished", 3).await; // 5..8
    let first = sse_positions(
        &format!("{}/v1/subscribe?pattern=job.*&from=0", h.url),
        4,
        None,
    )
    .await;
    assert_eq!(first, vec![0, 1, 2, 5]);
    // Disconnected; more events arrive; reconnect from one past the last seen.
    append("job.started", 2).await; // 8..10
    let rest = sse_positions(
        &format!("{}/v1/subscribe?pattern=job.*&from=6", h.url),
        4,
        None,
    )
    .await;
    assert_eq!(rest, vec![6, 7, 8, 9]);
    let resumed = sse_positions(&format!("{}/v1/subscribe?pattern=job.*", h.url), 2, Some(7)).await;
    assert_eq!(resumed, vec![8, 9]);
    // Live: a subscriber at the head sees the next event.
    let url = format!("{}/v1/subscribe?pattern=job.finished", h.url);
    let live = tokio::spawn(async move { sse_positions(&url, 1, None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    append("job.finished", 1).await; // 10
    assert_eq!(live.await.unwrap(), vec![10]);
}

#[tokio::test]
async fn cli_appends_reads_and_tails_against_a_running_host() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let (ok, out, err) = h.cli(&[
        "events",
        "append",
        "--stream",
        "assistant-1",
        "--type",
        "assistant.created",
        "--payload",
        r#"{"assistant_key":"one"}"#,
        "--expected-version",
        "no_stream",
        "--correlation-id",
        "c9",
    ]);
    assert!(ok, "{err}");
    let reply: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(reply["positions"], json!([0]));
    let (ok, _, err) = h.cli(&[
        "events",
        "append",
        "--stream",
        "assistant-1",
        "--type",
        "assistant.created",
        "--expected-version",
        "no_stream",
    ]);
    assert!(!ok);
    assert!(
        err.contains("409") && err.contains("version conflict"),
        "{err}"
    );
    let (ok, _, err) = h.cli(&[
        "events",
        "append",
        "--stream",
        "s",
        "--type",
        "a.b",
        "--payload",
        "{not json",
    ]);
    assert!(!ok && err.contains("--payload is not valid JSON"), "{err}");
    h.cli(&["events", "append", "--stream", "other", "--type", "x.y"]);
    let (ok, out, _) = h.cli(&["events", "read", "--from", "0", "--type", "assistant.>"]);
    assert!(ok);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["metadata"]["correlation_id"], "c9");
    let (ok, out, err) = h.cli(&["events", "tail", "--from", "0", "--count", "2"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2);
}
