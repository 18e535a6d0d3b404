//! The HTTP surface under hostile clients, against the real binary over loopback: payloads
//! nested deep, events over the size limit in metadata or source, reads over the response
//! bound, bad `Last-Event-ID`s and dead-letter ids, oversized uploads, half-sent requests,
//! connection floods, and SIGTERM with clients attached.

use std::time::{Duration, Instant};

use evhost_tests::{Host, all_events};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

/// The deepest nesting the host accepts (`evhost::event::MAX_PAYLOAD_DEPTH`).
const MAX_DEPTH: usize = 64;

async fn post(url: &str, body: String) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `GET url`: the status and the body as text.
async fn get_text(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

fn authority(h: &Host) -> String {
    h.url.trim_start_matches("http://").to_owned()
}

/// A payload `depth` levels deep, with spacing a serializer would not reproduce, so that
/// finding its text in a response shows it went out as it was appended.
fn nested(depth: usize) -> String {
    format!(
        "{}{{\"leaf\" :  1}}{}",
        "[ ".repeat(depth - 1),
        " ]".repeat(depth - 1)
    )
}

/// Reads SSE from `req` until a `data:` line holding `needle` arrives (10 s at most);
/// returns the line.
async fn sse_line_with(req: reqwest::RequestBuilder, needle: &str) -> String {
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, body.next())
            .await
            .expect("the event within 10 s")
            .expect("stream open")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            if line.starts_with("data:") && line.contains(needle) {
                return line;
            }
        }
    }
}

/// True when the server closes `s` (EOF or reset) within `bound`; what it sends first is
/// appended to `got`.
async fn closed_by_server(s: &mut TcpStream, bound: Duration, got: &mut Vec<u8>) -> bool {
    let deadline = Instant::now() + bound;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A connection that sent part of a request head and nothing more.
async fn half_sent(h: &Host) -> TcpStream {
    let mut s = TcpStream::connect(authority(h)).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    s
}

/// Polls `/health` until it answers 200, for at most `bound`.
async fn health_answers_within(h: &Host, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{}/health", h.url)).send().await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_payload_too_deep_is_refused_and_one_at_the_limit_reads_back_as_sent_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    for depth in [MAX_DEPTH + 1, 200] {
        let body = format!(
            r#"{{"events":[{{"type":"deep.test","payload":{}}}]}}"#,
            nested(depth)
        );
        let (s, reply) = post(&format!("{}/v1/streams/deep", h.url), body).await;
        assert_eq!(s, 400, "depth {depth}: {reply}");
        assert_eq!(reply["error"]["code"], "too_deep", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(&MAX_DEPTH.to_string()), "{message}");
        let body = format!(
            r#"{{"events":[{{"stream":"deep","type":"deep.test","payload":{}}}]}}"#,
            nested(depth)
        );
        let (s, reply) = post(&format!("{}/v1/events", h.url), body).await;
        assert_eq!(s, 400, "depth {depth}: {reply}");
    }

    let payload = nested(MAX_DEPTH);
    let body = format!(
        r#"{{"events":[{{"type":"deep.test","id":"deep-1","payload":{payload},"metadata":{{"correlation_id":"deep-flow"}}}}]}}"#
    );
    let (s, reply) = post(&format!("{}/v1/streams/deep", h.url), body).await;
    assert_eq!(s, 200, "{reply}");

    for path in ["/v1/events?from=0", "/v1/streams/deep", "/v1/bus/history"] {
        let (s, text) = get_text(&format!("{}{path}", h.url)).await;
        assert_eq!(s, 200, "{path}: {text}");
        assert!(
            text.contains(&payload),
            "{path} changed the payload: {text}"
        );
        let _: Value = serde_json::from_str(&text).expect("a reader can parse the response");
    }
    // The flow index catches up moments after the append.
    let deadline = Instant::now() + Duration::from_secs(10);
    let flow = loop {
        let (s, text) = get_text(&format!("{}/v1/flows/deep-flow", h.url)).await;
        if s == 200 {
            break text;
        }
        assert!(Instant::now() < deadline, "no flow within 10 s: {s} {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        flow.contains(&payload),
        "the flow changed the payload: {flow}"
    );
    let line = sse_line_with(
        reqwest::Client::new().get(format!("{}/v1/subscribe?from=0", h.url)),
        "deep-1",
    )
    .await;
    assert!(line.contains(&payload), "SSE changed the payload: {line}");
}

#[tokio::test]
async fn metadata_and_source_count_toward_the_event_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--max-event-bytes", "1000"]).await;
    let url = format!("{}/v1/streams/sized", h.url);
    let event = |payload: Value, metadata: Value, source: &str| {
        json!({"events": [{"type": "size.test", "payload": payload, "metadata": metadata, "source": source}]})
            .to_string()
    };
    let (s, reply) = post(&url, event(json!({"a": "x".repeat(500)}), json!({}), "ok")).await;
    assert_eq!(s, 200, "{reply}");
    let too_large = [
        (
            "metadata",
            event(json!({}), json!({"note": "m".repeat(2000)}), ""),
        ),
        ("source", event(json!({}), json!({}), &"s".repeat(2000))),
        (
            "all together",
            event(
                json!({"a": "x".repeat(600)}),
                json!({"correlation_id": "c".repeat(300)}),
                &"s".repeat(200),
            ),
        ),
        (
            "a big metadata value",
            event(json!(1), json!({"blob": "b".repeat(2 * 1024 * 1024)}), ""),
        ),
    ];
    for (what, body) in too_large {
        let (s, reply) = post(&url, body).await;
        assert_eq!(s, 413, "{what}: {reply}");
        assert_eq!(reply["error"]["code"], "too_large", "{what}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains("1000"), "{what}: {message}");
    }
    let body = json!({"events": [{"stream": "sized", "type": "size.test", "payload": {}, "source": "s".repeat(2000)}]});
    let (s, reply) = post(&format!("{}/v1/events", h.url), body.to_string()).await;
    assert_eq!(s, 413, "{reply}");
    let (_, health) = get_text(&format!("{}/health", h.url)).await;
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["head"], 1, "only the first event was appended");
}

#[tokio::test]
async fn a_read_past_the_byte_bound_returns_fewer_events_and_continues_without_a_gap() {
    const MIB: usize = 1024 * 1024;
    const BOUND: usize = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(
        BIN,
        dir.path(),
        &["--max-event-bytes", &(4 * MIB).to_string()],
    )
    .await;
    let big = "y".repeat(3 * MIB);
    for i in 0..6 {
        let body = json!({"events": [{"type": "big.blob", "payload": {"i": i, "blob": big}}]});
        let (s, reply) = post(&format!("{}/v1/streams/big", h.url), body.to_string()).await;
        assert_eq!(s, 200, "{reply}");
    }
    let small = json!({"events": [{"type": "big.small", "payload": 1}, {"type": "big.small", "payload": 2}, {"type": "big.small", "payload": 3}]});
    let (s, reply) = post(&format!("{}/v1/streams/big", h.url), small.to_string()).await;
    assert_eq!(s, 200, "{reply}");
    let total = 9;

    // By position.
    let mut positions = Vec::new();
    let mut from = 0;
    let mut pages = 0;
    while from < total {
        let (s, text) = get_text(&format!("{}/v1/events?from={from}&limit=100", h.url)).await;
        assert_eq!(s, 200);
        assert!(
            text.len() <= BOUND + 4 * MIB,
            "a {} byte response",
            text.len()
        );
        let page: Value = serde_json::from_str(&text).unwrap();
        let events = page["events"].as_array().unwrap();
        assert!(!events.is_empty(), "a page has at least one event");
        let got: Vec<u64> = events
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect();
        assert_eq!(
            page["next"].as_u64().unwrap(),
            got.last().unwrap() + 1,
            "next is the first event left out"
        );
        positions.extend(got);
        from = page["next"].as_u64().unwrap();
        pages += 1;
        assert!(pages <= total, "the reads make progress");
    }
    assert_eq!(
        positions,
        (0..total).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    assert!(
        pages >= 2,
        "18 MiB of events did not fit in one 16 MiB response"
    );

    // By stream version.
    let mut versions = Vec::new();
    let mut from_version = 0;
    while from_version < total {
        let (s, text) = get_text(&format!(
            "{}/v1/streams/big?from_version={from_version}&limit=100",
            h.url
        ))
        .await;
        assert_eq!(s, 200);
        assert!(text.len() <= BOUND + 4 * MIB);
        let page: Value = serde_json::from_str(&text).unwrap();
        let events = page["events"].as_array().unwrap();
        assert!(!events.is_empty());
        versions.extend(events.iter().map(|e| e["version"].as_u64().unwrap()));
        let next = page["next_version"].as_u64().unwrap();
        assert_eq!(next, *versions.last().unwrap() + 1);
        from_version = next;
    }
    assert_eq!(versions, (0..total).collect::<Vec<_>>());

    // The bus history, newest first, bounded the same way.
    let (s, text) = get_text(&format!("{}/v1/bus/history?limit=100", h.url)).await;
    assert_eq!(s, 200);
    assert!(
        text.len() <= BOUND + 4 * MIB,
        "a {} byte history",
        text.len()
    );
    let page: Value = serde_json::from_str(&text).unwrap();
    let n = page["events"].as_array().unwrap().len();
    assert!((1..total as usize).contains(&n), "history kept {n} events");
}

#[tokio::test]
async fn a_last_event_id_must_name_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let events: Vec<Value> = (0..8)
        .map(|i| json!({"type": "le.test", "payload": i, "id": format!("le-{i}")}))
        .collect();
    let (s, _) = post(
        &format!("{}/v1/streams/le", h.url),
        json!({ "events": events }).to_string(),
    )
    .await;
    assert_eq!(s, 200);
    let client = reqwest::Client::new();
    for bad in ["18446744073709551615", "abc", "-1", "1.5", ""] {
        let r = client
            .get(format!("{}/v1/subscribe?from=0", h.url))
            .header("Last-Event-ID", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "Last-Event-ID {bad:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_last_event_id", "{body}");
    }
    // A good one resumes just after it.
    let line = sse_line_with(
        client
            .get(format!("{}/v1/subscribe", h.url))
            .header("Last-Event-ID", "5"),
        "\"position\"",
    )
    .await;
    let e: Value = serde_json::from_str(line.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(e["position"], 6, "{line}");
}

#[tokio::test]
async fn bad_dead_letter_ids_and_oversized_uploads_get_codes_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let client = reqwest::Client::new();
    for (method, path) in [
        ("DELETE", "/v1/dlq/nodot"),
        ("POST", "/v1/dlq/nodot/retry"),
        ("DELETE", "/v1/dlq/plugin.notanumber"),
        ("POST", "/v1/dlq/plugin.-1/retry"),
    ] {
        let r = client
            .request(method.parse().unwrap(), format!("{}{path}", h.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{method} {path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_dead_letter_id", "{body}");
    }
    // Well formed, but no such plugin (and so no such dead letter).
    for (method, path) in [
        ("DELETE", "/v1/dlq/absent.5"),
        ("POST", "/v1/dlq/absent.5/retry"),
    ] {
        let r = client
            .request(method.parse().unwrap(), format!("{}{path}", h.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{method} {path}");
    }
    // A 100 MiB upload. The host answers 413 once the body passes 32 MiB and closes the
    // connection, while the client is still writing; so the reply is read while the body
    // is being sent (a client that only reads after writing sees just the close).
    let (mut rd, mut wr) = TcpStream::connect(authority(&h))
        .await
        .unwrap()
        .into_split();
    let head = format!(
        "PUT /v1/plugins/big HTTP/1.1\r\nHost: {}\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"wasm\"\r\n\r\n",
        authority(&h),
        100 * 1024 * 1024
    );
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let chunk = vec![0u8; 1024 * 1024];
        for _ in 0..100 {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.windows(4).any(|w| w == b"\r\n\r\n") && reply.ends_with(b"}") {
            break;
        }
    }
    writer.abort();
    let reply = String::from_utf8_lossy(&reply);
    let s: u16 = reply.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body: serde_json::Value = reply
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or_default();
    assert_eq!(s, 413, "{reply}");
    assert_eq!(body["error"]["code"], "too_large", "{body}");
}

#[tokio::test]
async fn half_sent_requests_and_idle_connections_are_closed_after_the_header_timeout() {
    const HALF_SENT: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--header-timeout-ms", "1000"]).await;
    let mut stalled = Vec::with_capacity(HALF_SENT);
    for _ in 0..HALF_SENT {
        stalled.push(half_sent(&h).await);
    }
    // An idle keep-alive connection: one whole request answered, then nothing.
    let mut idle = TcpStream::connect(authority(&h)).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    // A request whose body stops half way.
    let mut stalled_body = TcpStream::connect(authority(&h)).await.unwrap();
    stalled_body
        .write_all(b"POST /v1/streams/s HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"events\":")
        .await
        .unwrap();

    assert!(
        health_answers_within(&h, Duration::from_secs(5)).await,
        "/health answers beside {HALF_SENT} half-sent requests"
    );
    let closed = futures::future::join_all(stalled.iter_mut().map(|s| async move {
        closed_by_server(s, Duration::from_secs(15), &mut Vec::new()).await
    }))
    .await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "{open} half-sent requests still open after 15 s");
    assert!(
        closed_by_server(&mut idle, Duration::from_secs(15), &mut Vec::new()).await,
        "the idle keep-alive connection is closed"
    );
    let mut answer = Vec::new();
    assert!(
        closed_by_server(&mut stalled_body, Duration::from_secs(15), &mut answer).await,
        "the request with a stalled body is ended"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let (_, health) = get_text(&format!("{}/health", h.url)).await;
    assert!(
        health.contains("\"head\":0"),
        "nothing was appended: {health}"
    );
    assert!(health_answers_within(&h, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_connection_over_the_cap_is_closed_at_once_and_health_answers_once_others_go() {
    const CAP: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(
        BIN,
        dir.path(),
        &[
            "--max-connections",
            &CAP.to_string(),
            "--header-timeout-ms",
            "60000",
        ],
    )
    .await;
    // Fill the cap with half-sent requests. One may be refused while the start-up probe's
    // connection is still being closed: replace it (a few rounds at most).
    let mut held = Vec::with_capacity(CAP);
    for _ in 0..5 {
        while held.len() < CAP {
            held.push(half_sent(&h).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        held.retain(|s: &TcpStream| {
            let mut b = [0u8; 1];
            matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        if held.len() == CAP {
            break;
        }
    }
    assert_eq!(held.len(), CAP, "the host holds {CAP} connections");
    let mut probe = TcpStream::connect(authority(&h)).await.unwrap();
    let _ = probe
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let mut got = Vec::new();
    assert!(
        closed_by_server(&mut probe, Duration::from_secs(5), &mut got).await,
        "a connection over the cap is closed at once"
    );
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || (got.starts_with("HTTP/1.1 503") && got.contains("too_many_connections")),
        "{got}"
    );
    drop(held);
    assert!(
        health_answers_within(&h, Duration::from_secs(10)).await,
        "/health answers once the other connections are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_with_a_subscriber_and_a_half_sent_request_attached() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Host::start(BIN, dir.path(), &[]).await;
    let events: Vec<Value> = (0..20)
        .map(|i| json!({"type": "stop.test", "payload": i, "id": format!("stop-{i}")}))
        .collect();
    let (s, _) = post(
        &format!("{}/v1/streams/stop", h.url),
        json!({ "events": events }).to_string(),
    )
    .await;
    assert_eq!(s, 200);
    // A subscriber that has seen everything and waits for more.
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/subscribe?from=0", h.url))
        .send()
        .await
        .unwrap();
    let mut sse = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("stop-19") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), sse.next())
            .await
            .expect("events within 10 s")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // And `evhost events tail`, following from the head.
    let mut tail = std::process::Command::new(BIN)
        .args(["events", "tail"])
        .env("EVHOST_URL", &h.url)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _half = half_sent(&h).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let status = tokio::task::block_in_place(|| h.stop_within(Duration::from_secs(15)));
    let status = status.expect("the host exits within 15 s of SIGTERM");
    assert!(status.success(), "a clean exit: {status}");
    // The subscription ended instead of being cut.
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = sse.next().await {}
    })
    .await;
    assert!(rest.is_ok(), "the SSE stream ended");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tail.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "events tail exits");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(h);

    let h = Host::start(BIN, dir.path(), &[]).await;
    let all = all_events(&h).await;
    let ids: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let want: Vec<String> = (0..20).map(|i| format!("stop-{i}")).collect();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn running_out_of_file_descriptors_is_logged_and_survived() {
    const CONNECTIONS: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let listen_file = dir.path().join("listen-addr");
    let stderr_path = dir.path().join("stderr.log");
    // The host with few descriptors and a cap above them: accept fails with EMFILE.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(["serve", "--data"])
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--listen-file"])
        .arg(&listen_file)
        .args([
            "--max-connections",
            "5000",
            "--header-timeout-ms",
            "60000",
            "--segment-mb",
            "1",
        ])
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let url = evhost_tests::listen_url(&listen_file, &mut child).await;
    let addr = url.trim_start_matches("http://").to_owned();
    let up = async {
        for _ in 0..300 {
            if let Ok(r) = reqwest::get(format!("{url}/health")).await
                && r.status() == 200
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(up.await, "the host starts");
    // A client whose connection is open before the descriptors run out.
    let kept = reqwest::Client::new();
    let blob = |i: usize| {
        serde_json::json!({"events": [{"type": "blob.stored", "id": format!("blob-{i}"),
            "payload": {"b": "x".repeat(400_000)}}]})
    };
    let r = kept
        .post(format!("{url}/v1/streams/blobs"))
        .json(&blob(0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut held = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the host is still running"
    );
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        log.contains("accepting a connection failed"),
        "the accept error is logged: {log}"
    );
    // With no descriptor left, appends that fill the 1 MiB segment and start the next one
    // still succeed: the next segment's file was created ahead of time.
    for i in 1..4 {
        let r = kept
            .post(format!("{url}/v1/streams/blobs"))
            .json(&blob(i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "append {i}: {}", r.text().await.unwrap());
    }
    // The segment after that one could not be created ahead of time: an append needing it
    // is refused cleanly (or succeeds, if a descriptor came free), never poisoning the log.
    let r = kept
        .post(format!("{url}/v1/streams/blobs"))
        .json(&blob(4))
        .send()
        .await
        .unwrap();
    assert!(matches!(r.status().as_u16(), 200 | 503), "{}", r.status());
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(15);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    loop {
        if let Ok(r) = client.get(format!("{url}/health")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health answers again once the descriptors are back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the host is still running"
    );
    // Once descriptors are back, the same append (same id) succeeds exactly once.
    let r = client
        .post(format!("{url}/v1/streams/blobs"))
        .json(&blob(4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let page: serde_json::Value = client
        .get(format!("{url}/v1/streams/blobs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["version"], 5, "every acknowledged blob is there");
    let segments = std::fs::read_dir(dir.path().join("data").join("events"))
        .unwrap()
        .count();
    assert!(segments >= 2, "the appends crossed a segment boundary");
    let _ = child.kill();
    let _ = child.wait();
}
