//! Finding streams on the real binary over HTTP: the stream listing, backward stream reads,
//! reads by time, and the `evhost stream` commands.

use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};
use evhost_tests::{Host, append, post};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

/// `GET url` with `query` (form-encoded by reqwest); the status and the JSON reply.
async fn get(url: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(url)
        .query(query)
        .send()
        .await
        .expect("the host answers");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn events(n: usize, ty: &str) -> Value {
    (0..n)
        .map(|i| json!({"type": ty, "payload": {"i": i}}))
        .collect::<Vec<_>>()
        .into()
}

fn names(page: &Value) -> Vec<String> {
    page["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap().to_owned())
        .collect()
}

fn versions(page: &Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect()
}

/// The JSON lines a CLI run printed, expecting it to succeed.
fn cli_lines(h: &Host, args: &[&str]) -> Vec<Value> {
    let (ok, out, err) = h.cli(args);
    assert!(ok, "evhost {args:?} failed: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn error_code(body: &Value) -> (&str, &str) {
    (
        body["error"]["code"].as_str().unwrap_or(""),
        body["error"]["message"].as_str().unwrap_or(""),
    )
}

#[tokio::test]
async fn streams_are_listed_in_name_order_paged_and_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let url = format!("{}/v1/streams", h.url);
    // 1,005 streams in two appends (the NATS log takes at most 1,000 events in one), then
    // two more in appends of their own.
    let bulk: Vec<Value> = (0..1005)
        .map(|i| json!({"stream": format!("bulk-{i:04}"), "type": "bulk.made", "payload": i}))
        .collect();
    for part in bulk.chunks(1000) {
        let (s, reply) = post(&format!("{}/v1/events", h.url), json!({"events": part})).await;
        assert_eq!(s, 200, "{reply}");
    }
    let alpha = append(&h, "alpha", events(2, "a.one")).await;
    append(&h, "beta", events(1, "b.one")).await;
    let alpha_last = append(&h, "alpha", events(1, "a.two")).await;

    let (s, page) = get(&url, &[("prefix", "bulk-"), ("limit", "5000")]).await;
    assert_eq!(s, 200, "{page}");
    let got = names(&page);
    assert_eq!(got.len(), 1000, "the limit is clamped to 1000");
    assert_eq!(got[0], "bulk-0000");
    assert_eq!(got[999], "bulk-0999");
    assert_eq!(page["next"], "bulk-0999");
    let (_, page) = get(&url, &[("prefix", "bulk-"), ("after", "bulk-0999")]).await;
    assert_eq!(
        names(&page),
        [
            "bulk-1000",
            "bulk-1001",
            "bulk-1002",
            "bulk-1003",
            "bulk-1004"
        ]
    );
    assert_eq!(page["next"], Value::Null);

    // Everything, in name order, with each stream's numbers.
    let (_, page) = get(&url, &[("limit", "2")]).await;
    assert_eq!(names(&page), ["alpha", "beta"]);
    assert_eq!(page["next"], "beta");
    let a = &page["streams"][0];
    let (_, read) = get(&format!("{}/v1/streams/alpha", h.url), &[]).await;
    let evs = read["events"].as_array().unwrap();
    assert_eq!(
        *a,
        json!({
            "stream": "alpha",
            "version": 3,
            "first_position": alpha["positions"][0],
            "last_position": alpha_last["positions"][0],
            "first_timestamp": evs[0]["timestamp"],
            "last_timestamp": evs[2]["timestamp"],
            "deleted": false,
        })
    );
    let (_, page) = get(&url, &[("after", "beta"), ("limit", "1")]).await;
    assert_eq!(names(&page), ["bulk-0000"]);
    let (_, page) = get(&url, &[("limit", "0")]).await;
    assert_eq!(names(&page), ["alpha"], "a limit of 0 is clamped to 1");
    let (s, page) = get(&url, &[("prefix", "zzz")]).await;
    assert_eq!(s, 200);
    assert_eq!(page, json!({"streams": [], "next": null}));

    let (s, body) = get(&url, &[("limit", "many")]).await;
    assert_eq!((s, error_code(&body).0), (400, "invalid_query"), "{body}");
    let (s, body) = get(&url, &[("prefix", "a\u{1}")]).await;
    assert_eq!((s, error_code(&body).0), (400, "invalid_query"), "{body}");
    assert!(error_code(&body).1.contains("prefix="), "{body}");
    let (s, body) = get(&url, &[("colour", "red")]).await;
    assert_eq!((s, error_code(&body).0), (400, "invalid_query"), "{body}");

    // The CLI pages through the listing up to its limit.
    let lines = cli_lines(
        &h,
        &["stream", "list", "--prefix", "bulk-", "--limit", "1003"],
    );
    assert_eq!(lines.len(), 1003);
    assert_eq!(lines[0]["stream"], "bulk-0000");
    assert_eq!(lines[1002]["stream"], "bulk-1002");
    assert!(
        lines
            .windows(2)
            .all(|w| w[0]["stream"].as_str() < w[1]["stream"].as_str()),
        "in name order, each once"
    );
    let lines = cli_lines(&h, &["stream", "list", "--limit", "3"]);
    let got: Vec<&str> = lines
        .iter()
        .map(|l| l["stream"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["alpha", "beta", "bulk-0000"]);
    assert_eq!(lines[0], *a);
    let lines = cli_lines(&h, &["stream", "list", "--prefix", "bulk-100"]);
    assert_eq!(
        lines.len(),
        5,
        "the default limit is more than what there is"
    );
}

#[tokio::test]
async fn a_stream_reads_backward_page_by_page_and_forward_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    // Three appends of four, interleaved with another stream: several runs.
    for i in 0..3 {
        append(&h, "order-7", events(4, "order.changed")).await;
        append(&h, &format!("other-{i}"), events(2, "other.thing")).await;
    }
    let url = format!("{}/v1/streams/order-7", h.url);
    let (_, forward) = get(&url, &[]).await;
    let forward = forward["events"].as_array().unwrap().clone();
    assert_eq!(forward.len(), 12);

    let (s, page) = get(&url, &[("direction", "backward"), ("limit", "5")]).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(versions(&page), [11, 10, 9, 8, 7]);
    assert_eq!(page["stream"], "order-7");
    assert_eq!(page["direction"], "backward");
    assert_eq!(page["version"], 12);
    assert_eq!(page["next"], 6);
    assert_eq!(page["start_reached"], false);
    assert_eq!(
        page["events"][0], forward[11],
        "the same events as a forward read"
    );
    let (_, page) = get(&url, &[("direction", "backward"), ("from", "6")]).await;
    assert_eq!(versions(&page), [6, 5, 4, 3, 2, 1, 0]);
    assert_eq!(page["next"], Value::Null);
    assert_eq!(page["start_reached"], true);
    let (_, page) = get(
        &url,
        &[("direction", "backward"), ("from", "100"), ("limit", "2")],
    )
    .await;
    assert_eq!(
        versions(&page),
        [11, 10],
        "a start past the last is the last"
    );
    let (_, page) = get(&url, &[("direction", "backward"), ("from", "0")]).await;
    assert_eq!(versions(&page), [0]);
    assert_eq!(page["start_reached"], true);

    // Forward reads answer as they always have.
    let (s, page) = get(&url, &[("from_version", "10")]).await;
    assert_eq!(s, 200);
    assert_eq!(
        page,
        json!({"stream": "order-7", "events": [forward[10], forward[11]], "version": 12, "next_version": 12})
    );
    let (_, page) = get(&url, &[("direction", "forward"), ("limit", "2")]).await;
    assert_eq!(versions(&page), [0, 1]);
    assert_eq!(page["next_version"], 2);

    for (query, names) in [
        (vec![("direction", "sideways")], "direction="),
        (
            vec![("direction", "backward"), ("from_version", "3")],
            "from_version=",
        ),
        (vec![("from", "3")], "from="),
        (vec![("direction", "backward"), ("from", "-1")], "from"),
    ] {
        let (s, body) = get(&url, &query).await;
        assert_eq!(
            (s, error_code(&body).0),
            (400, "invalid_query"),
            "{query:?}: {body}"
        );
        assert!(error_code(&body).1.contains(names), "{query:?}: {body}");
    }
    let (s, _) = get(
        &format!("{}/v1/streams/nope", h.url),
        &[("direction", "backward")],
    )
    .await;
    assert_eq!(s, 404);

    let of = |lines: &[Value]| -> Vec<u64> {
        lines
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect()
    };
    let lines = cli_lines(
        &h,
        &["stream", "read", "order-7", "--backward", "--limit", "3"],
    );
    assert_eq!(of(&lines), [11, 10, 9]);
    assert_eq!(lines[0], forward[11]);
    let lines = cli_lines(
        &h,
        &["stream", "read", "order-7", "--backward", "--from", "2"],
    );
    assert_eq!(of(&lines), [2, 1, 0]);
    let lines = cli_lines(&h, &["stream", "read", "order-7", "--from", "9"]);
    assert_eq!(of(&lines), [9, 10, 11]);
    let lines = cli_lines(&h, &["stream", "read", "order-7"]);
    assert_eq!(lines, forward);
    let (ok, _, err) = h.cli(&["stream", "read", "nope", "--backward"]);
    assert!(!ok && err.contains("404"), "{err}");
}

#[tokio::test]
async fn events_are_read_by_time_with_filters_and_paging() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    // Three appends with time between them: A, then B (two types), then C.
    append(&h, "t-a", events(3, "x.one")).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    append(
        &h,
        "t-b",
        json!([{"type": "x.one", "payload": 1}, {"type": "x.two", "payload": 2}]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    append(&h, "t-c", events(2, "x.two")).await;
    let url = format!("{}/v1/events", h.url);
    let (_, all) = get(&url, &[]).await;
    let all = all["events"].as_array().unwrap().clone();
    assert_eq!(all.len(), 7);
    let ts = |p: usize| all[p]["timestamp"].as_str().unwrap().to_owned();
    let (t_b, t_c) = (ts(3), ts(5));
    let positions = |page: &Value| -> Vec<u64> {
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect()
    };

    let (s, page) = get(&url, &[("since", &t_b)]).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(positions(&page), [3, 4, 5, 6], "since is inclusive");
    assert!(page.get("until_reached").is_none(), "{page}");
    let (_, page) = get(&url, &[("since", &t_b), ("until", &t_c)]).await;
    assert_eq!(positions(&page), [3, 4], "until is exclusive");
    assert_eq!(page["next"], 5);
    assert_eq!(page["until_reached"], true);
    let (_, page) = get(&url, &[("until", &t_b)]).await;
    assert_eq!(positions(&page), [0, 1, 2]);
    assert_eq!(page["until_reached"], true);

    // Microseconds and other offsets name the same instant.
    let instant: DateTime<Utc> = t_b.parse().unwrap();
    let micros = instant.timestamp_micros().to_string();
    let (_, page) = get(&url, &[("since", &micros), ("until", &t_c)]).await;
    assert_eq!(positions(&page), [3, 4]);
    let east = instant
        .with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339();
    assert!(east.contains("+02:00"), "{east}");
    let (_, page) = get(&url, &[("since", &east)]).await;
    assert_eq!(positions(&page), [3, 4, 5, 6]);
    // Unencoded, the + arrives as a space, and is taken back.
    let raw = format!("{url}?since={}", east.replace(':', "%3A"));
    let page: Value = reqwest::get(&raw).await.unwrap().json().await.unwrap();
    assert_eq!(positions(&page), [3, 4, 5, 6], "{raw}: {page}");

    // With the other filters, and paged by position.
    let (_, page) = get(&url, &[("since", &ts(0)), ("type", "x.two")]).await;
    assert_eq!(positions(&page), [4, 5, 6]);
    let (_, page) = get(&url, &[("since", &t_b), ("until", &t_c), ("limit", "1")]).await;
    assert_eq!(positions(&page), [3]);
    assert_eq!(page["until_reached"], false);
    let next = page["next"].to_string();
    let (_, page) = get(&url, &[("since", &t_b), ("until", &t_c), ("from", &next)]).await;
    assert_eq!(positions(&page), [4]);
    assert_eq!(page["until_reached"], true);
    let next = page["next"].to_string();
    let (_, page) = get(&url, &[("since", &t_b), ("until", &t_c), ("from", &next)]).await;
    assert_eq!(positions(&page), Vec::<u64>::new());
    assert_eq!(page["next"], 5);
    assert_eq!(page["until_reached"], true);
    let (_, page) = get(&url, &[("from", "6"), ("since", &t_b)]).await;
    assert_eq!(positions(&page), [6], "from still bounds the start");

    // An until no event has reached yet: the read goes to the head, and is not over.
    let later = (Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
    let (_, page) = get(&url, &[("since", &t_c), ("until", &later)]).await;
    assert_eq!(positions(&page), [5, 6]);
    assert_eq!(page["until_reached"], false);
    let (_, page) = get(&url, &[("since", &later)]).await;
    assert_eq!(positions(&page), Vec::<u64>::new());
    assert_eq!(page["next"], 7);

    for (name, value) in [
        ("since", "yesterday"),
        ("until", "2025-13-01T00:00:00Z"),
        ("since", "2025-01-01"),
    ] {
        let (s, body) = get(&url, &[(name, value)]).await;
        assert_eq!((s, error_code(&body).0), (400, "invalid_query"), "{body}");
        assert!(error_code(&body).1.contains(&format!("{name}=")), "{body}");
    }
}
