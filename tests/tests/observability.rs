//! Observability end to end on the real binary: `GET /metrics` in the Prometheus text
//! format, checked by `promtool check metrics` (Debian's `prometheus`, installed by
//! `scripts/setup.sh`), with figures that move with the work done.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evhost_tests::{Host, append, caught_up, get, load_ok, plugin_wasm};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

/// One scrape: the text, and each sample's value by `name{labels}` as printed.
async fn scrape(h: &Host) -> (String, BTreeMap<String, f64>) {
    let r = reqwest::get(format!("{}/metrics", h.url)).await.unwrap();
    assert_eq!(r.status(), 200);
    let kind = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let text = r.text().await.unwrap();
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((sorted_labels(name), value.parse().ok()?))
        })
        .collect();
    (text, samples)
}

/// `name{b="2",a="1"}` as `name{a="1",b="2"}`, so a sample is found whatever order the
/// exporter prints its labels in.
fn sorted_labels(sample: &str) -> String {
    let Some((name, labels)) = sample.split_once('{') else {
        return sample.to_owned();
    };
    let labels = labels.trim_end_matches('}');
    let mut pairs: Vec<String> = labels
        .split("\",")
        .map(|p| p.trim_end_matches('"').to_owned() + "\"")
        .collect();
    pairs.sort();
    format!("{name}{{{}}}", pairs.join(","))
}

/// `promtool check metrics` over `text`: its lint findings fail the test.
fn promtool(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn value(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples.get(name).unwrap_or_else(|| {
        panic!(
            "no sample {name} in {:?}",
            samples.keys().collect::<Vec<_>>()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_move_with_the_work_done() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let counter = "name = \"counter\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\"test.>\"]\n";
    load_ok(&h, "counter", counter, plugin_wasm("type-counter")).await;
    let math = "name = \"math\"\nversion = \"1\"\nkind = \"tool\"\n";
    load_ok(&h, "math", math, plugin_wasm("math")).await;
    append(
        &h,
        "m",
        (0..100)
            .map(|i| json!({"type": "test.a", "payload": {"i": i}}))
            .collect::<Vec<_>>(),
    )
    .await;
    caught_up(&h, "counter").await;
    let (text, before) = scrape(&h).await;
    promtool(&text);
    for name in [
        "evhost_log_appended_events_total",
        "evhost_log_fsync_seconds_count",
        "evhost_log_group_events_count",
        "evhost_log_head",
        "evhost_bus_subscribers",
        "evhost_plugin_lag_events{plugin=\"counter\"}",
        "evhost_plugin_batch_duration_seconds_count{plugin=\"counter\"}",
    ] {
        value(&before, name);
    }
    assert_eq!(
        value(
            &before,
            "evhost_plugin_events_processed_total{plugin=\"counter\"}"
        ),
        100.0
    );

    // Work moves the figures: 50 more events, three HTTP appends, one invocation.
    for _ in 0..2 {
        append(
            &h,
            "m",
            (0..25)
                .map(|_| json!({"type": "test.a", "payload": {}}))
                .collect::<Vec<_>>(),
        )
        .await;
    }
    append(
        &h,
        "calls",
        vec![json!({"type": "tool.invocation.requested",
        "payload": {"invocation_id": "i-1", "tool": "math", "input": {"expression": "6*7"}}})],
    )
    .await;
    caught_up(&h, "counter").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let (text, after) = scrape(&h).await;
        if after.get("evhost_tool_invocations_total{outcome=\"completed\",tool=\"math\"}")
            == Some(&1.0)
        {
            promtool(&text);
            break after;
        }
        assert!(
            Instant::now() < deadline,
            "the invocation never showed: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let grew = |name: &str| value(&after, name) - value(&before, name);
    assert!(grew("evhost_log_appended_events_total") >= 51.0);
    assert_eq!(
        grew("evhost_plugin_events_processed_total{plugin=\"counter\"}"),
        50.0
    );
    assert!(grew("evhost_log_fsync_seconds_count") >= 3.0);
    let appends =
        "evhost_http_requests_total{method=\"POST\",route=\"/v1/streams/{stream}\",status=\"200\"}";
    assert_eq!(grew(appends), 3.0);
    assert_eq!(
        value(
            &after,
            "evhost_tool_invocations_total{outcome=\"failed\",tool=\"math\"}"
        ),
        0.0
    );
    let latency = "evhost_tool_latency_seconds_count{tool=\"math\"}";
    assert_eq!(value(&after, latency), 1.0);
    assert!(value(&after, "evhost_tool_latency_seconds_sum{tool=\"math\"}") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_and_the_batch_they_belong_to() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("host.log");
    let mut h = Host::start_logging(
        BIN,
        &dir.path().join("data"),
        &["--log-format", "json"],
        &log,
    )
    .await;
    let probe = &evhost_tests::probe_manifest(0);
    load_ok(&h, "probe", probe, plugin_wasm("sandbox_probe")).await;
    let reply = append(
        &h,
        "p",
        vec![
            json!({"type": "probe.a", "payload": {}}),
            json!({"type": "probe.trap", "payload": {}, "metadata": {"correlation_id": "c-9"}}),
        ],
    )
    .await;
    let trap = reply["positions"][1].as_u64().unwrap();
    caught_up(&h, "probe").await;
    h.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().all(|l| l["timestamp"].is_string()
            && l["level"].is_string()
            && l["fields"].is_object()),
        "{text}"
    );
    // The line with `message`, and its span called `span`.
    let find = |message: &str, span: &str| {
        let line = lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no line {message:?}"));
        let found = line["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == span)
            .unwrap_or_else(|| panic!("{message:?} is not in a {span} span: {line}"))
            .clone();
        (line.clone(), found)
    };
    let (loaded, request) = find("plugin loaded", "request");
    assert_eq!(
        (&request["method"], &request["route"]),
        (&json!("PUT"), &json!("/v1/plugins/{name}")),
        "{loaded}"
    );
    let (lettered, batch) = find("event dead-lettered", "batch");
    assert_eq!(batch["plugin"], "probe@1", "{lettered}");
    assert_eq!(batch["correlation_id"], "c-9", "{lettered}");
    let (from, to) = (
        batch["from"].as_u64().unwrap(),
        batch["to"].as_u64().unwrap(),
    );
    assert!(from <= trap && trap <= to, "{lettered}");
}

/// The alert events in the log, as (type, alert, subject).
async fn alert_events(h: &Host) -> Vec<(String, String, String)> {
    evhost_tests::all_events(h)
        .await
        .into_iter()
        .filter(|e| e["stream"] == "evhost-alerts")
        .map(|e| {
            let p = &e["payload"];
            (
                e["type"].as_str().unwrap().to_owned(),
                p["alert"].as_str().unwrap().to_owned(),
                p["subject"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_plugin_raises_an_alert_that_clears_when_it_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--alert-lag", "50"]).await;
    // Quarantined by its first dead letter, the probe falls behind what comes after it.
    let probe = &evhost_tests::probe_manifest(1);
    load_ok(&h, "probe", probe, plugin_wasm("sandbox_probe")).await;
    append(&h, "p", vec![json!({"type": "probe.trap", "payload": {}})]).await;
    append(
        &h,
        "p",
        (0..100)
            .map(|_| json!({"type": "probe.a", "payload": {}}))
            .collect::<Vec<_>>(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, a) = get(&format!("{}/v1/alerts", h.url)).await;
        if a["alerts"].as_array().is_some_and(|l| !l.is_empty()) {
            assert_eq!(
                (&a["alerts"][0]["alert"], &a["alerts"][0]["subject"]),
                (&json!("lag"), &json!("probe")),
                "{a}"
            );
            assert!(a["alerts"][0]["value"].as_f64().unwrap() > 50.0, "{a}");
            break;
        }
        assert!(Instant::now() < deadline, "no alert raised: {a}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, on) = scrape(&h).await;
    assert_eq!(
        value(&on, "evhost_alert_active{alert=\"lag\",subject=\"probe\"}"),
        1.0
    );

    let (code, body) =
        evhost_tests::post(&format!("{}/v1/plugins/probe/resume", h.url), json!({})).await;
    assert_eq!(code, 200, "{body}");
    caught_up(&h, "probe").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = alert_events(&h).await;
        if events.len() == 2 {
            assert_eq!(
                events,
                vec![
                    (
                        "evhost.alert.raised".to_owned(),
                        "lag".to_owned(),
                        "probe".to_owned()
                    ),
                    (
                        "evhost.alert.cleared".to_owned(),
                        "lag".to_owned(),
                        "probe".to_owned()
                    ),
                ]
            );
            break;
        }
        assert!(Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, a) = get(&format!("{}/v1/alerts", h.url)).await;
    assert_eq!(a["alerts"], json!([]), "{a}");
    let (_, off) = scrape(&h).await;
    assert_eq!(
        value(&off, "evhost_alert_active{alert=\"lag\",subject=\"probe\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_to_people_and_takes_its_url_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // --url before the subcommand, and after it.
    let (ok, out, err) = run(&["--url", &h.url, "plugin", "list"]);
    assert!(ok && out.starts_with("NAME"), "{out}{err}");
    let (ok, out, err) = run(&["plugin", "list", "--url", &h.url, "--json"]);
    assert!(ok && out.is_empty(), "{out}{err}");

    // A load that waits until caught up, with its progress on stderr.
    let plugins = env!("EVHOST_TEST_PLUGINS");
    append(
        &h,
        "w",
        (0..300)
            .map(|_| json!({"type": "assistant.tick.completed", "payload": {}}))
            .collect::<Vec<_>>(),
    )
    .await;
    let manifest = format!("{plugins}/type-counter.toml");
    let (ok, out, err) = run(&["plugin", "load", &manifest, "--wait", "--url", &h.url]);
    assert!(ok, "{out}{err}");
    assert!(err.contains("type-counter: caught up"), "{err}");
    let (_, s) = get(&format!("{}/v1/plugins/type-counter", h.url)).await;
    assert_eq!(
        s["lag"], 0,
        "--wait returned before the plugin caught up: {s}"
    );

    // Schemas.
    let schema = dir.path().join("order.json");
    std::fs::write(&schema, r#"{"type": "object", "required": ["id"]}"#).unwrap();
    let (ok, out, err) = run(&[
        "schema",
        "put",
        "order.*",
        schema.to_str().unwrap(),
        "--url",
        &h.url,
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = run(&["schema", "list", "--url", &h.url]);
    assert!(ok && out.contains("order.*"), "{out}");
    let (ok, out, _) = run(&["schema", "delete", "order.*", "--url", &h.url]);
    assert!(ok && out.contains("\"deleted\":\"order.*\""), "{out}");
    let (ok, out, _) = run(&["schema", "list", "--url", &h.url]);
    assert!(ok && out.is_empty(), "{out}");

    // Metrics and a flow, for people.
    append(&h, "chat", vec![
        json!({"type": "user.query.received", "payload": {"query": "hi"}, "metadata": {"correlation_id": "c-1"}}),
        json!({"type": "answer.synthesized", "payload": {"answer": "hello"}, "metadata": {"correlation_id": "c-1"}}),
    ]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let (ok, out, _) = run(&["flows", "c-1", "--url", &h.url]);
        if ok && out.contains("answered in") {
            break out;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        out.contains("user.query.received") && out.contains("answer.synthesized"),
        "{out}"
    );
    let (ok, out, err) = run(&["metrics", "--url", &h.url]);
    assert!(
        ok && out.starts_with("TOOL") && out.contains("flows answered: 1"),
        "{out}{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_slow_flows_and_failing_tools_raise_their_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(
        BIN,
        dir.path(),
        &[
            "--alert-dead-letters-per-minute",
            "2",
            "--alert-flow-ms",
            "50",
            "--alert-tool-failure-rate",
            "0.5",
        ],
    )
    .await;
    let probe = &evhost_tests::probe_manifest(0);
    load_ok(&h, "probe", probe, plugin_wasm("sandbox_probe")).await;
    let math = "name = \"math\"\nversion = \"1\"\nkind = \"tool\"\n";
    load_ok(&h, "math", math, plugin_wasm("math")).await;
    // The flow index's figures count from the first check after the start (they are kept
    // across restarts), so the work comes after it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Three dead letters in a minute; five invocations that all fail; one flow of 200 ms.
    append(
        &h,
        "p",
        (0..3)
            .map(|_| json!({"type": "probe.trap", "payload": {}}))
            .collect::<Vec<_>>(),
    )
    .await;
    append(&h, "calls", (0..5).map(|i| json!({"type": "tool.invocation.requested",
        "payload": {"invocation_id": format!("z-{i}"), "tool": "math", "input": {"expression": "1/0"}}})).collect::<Vec<_>>()).await;
    append(&h, "chat", vec![json!({"type": "user.query.received", "payload": {"query": "slow"}, "metadata": {"correlation_id": "slow-1"}})]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    append(&h, "chat", vec![json!({"type": "answer.synthesized", "payload": {"answer": "late"}, "metadata": {"correlation_id": "slow-1"}})]).await;
    let want = [
        ("dead_letters_per_minute", "probe"),
        ("flow_ms", "flows"),
        ("tool_failure_rate", "math"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let raised: Vec<(String, String)> = alert_events(&h)
            .await
            .into_iter()
            .filter(|(t, _, _)| t == "evhost.alert.raised")
            .map(|(_, a, s)| (a, s))
            .collect();
        if want
            .iter()
            .all(|(a, s)| raised.contains(&(a.to_string(), s.to_string())))
        {
            break;
        }
        assert!(Instant::now() < deadline, "raised only {raised:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, a) = get(&format!("{}/v1/alerts", h.url)).await;
    assert_eq!(a["alerts"].as_array().unwrap().len(), 3, "{a}");
    let data = dir.path().join("refused");
    let (ok, _, err) = h.cli(&[
        "serve",
        "--data",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--alert-tool-failure-rate",
        "2",
    ]);
    assert!(!ok && err.contains("between 0 and 1"), "{err}");
}
