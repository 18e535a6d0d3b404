//! A plugin's output end to end, on the real binary with the real `.wasm`: what it prints to
//! stdout and stderr and sends through the `log` import lands in its bounded log buffer,
//! read over `GET /v1/plugins/{name}/logs` and `evhost plugin logs`; a flood of output
//! drops the oldest lines (counted) and never fails the plugin; a panic's message is logged
//! and becomes the dead letter's reason.

use std::path::Path;

use evhost_tests::{Host, append, get, position_reaches, upload};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");

const MANIFEST: &str = "name = \"probe\"\nversion = \"1\"\nkind = \"projection\"\n\
    subscriptions = [\"probe.>\"]\n[limits]\nmemory_mb = 32\nbatch_timeout_ms = 2000\n\
    [on_failure]\nretries = 0\nbackoff_ms = 1\nmax_backoff_ms = 1\nquarantine_after = 0\n";

async fn logs(h: &Host, after: u64) -> Value {
    let (s, page) = get(&format!("{}/v1/plugins/probe/logs?after={after}", h.url)).await;
    assert_eq!(s, 200, "{page}");
    page
}

/// Appends one event of `ty` and waits until the probe's checkpoint passes it.
async fn handle(h: &Host, ty: &str) {
    let reply = append(h, "p", json!([{"type": ty, "payload": {}}])).await;
    position_reaches(h, "probe", reply["positions"][0].as_u64().unwrap() + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_plugin_prints_and_logs_is_kept_bounded_and_readable() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let wasm = std::fs::read(Path::new(BUILD).join("sandbox_probe.wasm")).unwrap();
    let (s, body) = upload(&h, "probe", MANIFEST, wasm).await;
    assert_eq!(s, 200, "{body}");

    handle(&h, "probe.print").await;
    let page = logs(&h, 0).await;
    let lines: Vec<(String, String)> = page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["source"].as_str().unwrap().into(),
                l["line"].as_str().unwrap().into(),
            )
        })
        .collect();
    for want in [
        ("stdout", "probe says hello on stdout"),
        ("stderr", "probe says hello on stderr"),
        ("info", "probe says hello through the log import"),
    ] {
        assert!(
            lines.iter().any(|(s, l)| s == want.0 && l == want.1),
            "{want:?} in {lines:?}"
        );
    }
    assert_eq!(page["dropped"], 0);
    let next = page["next"].as_u64().unwrap();
    assert!(logs(&h, next).await["lines"].as_array().unwrap().is_empty());

    // The CLI prints the same lines.
    let (ok, out, err) = h.cli(&["plugin", "logs", "probe"]);
    assert!(ok, "{err}");
    assert!(out.contains("probe says hello on stderr"), "{out}");

    // 5,000 lines of ~100 bytes: more than the buffer holds. The oldest go, counted; the
    // plugin is not failed, and the newest lines are all there, in order.
    handle(&h, "probe.spam").await;
    let (_, info) = get(&format!("{}/v1/plugins/probe", h.url)).await;
    assert_eq!(
        info["dead_letters"], 0,
        "output never fails a plugin: {info}"
    );
    let page = logs(&h, next).await;
    assert!(page["dropped"].as_u64().unwrap() > 0, "{}", page["dropped"]);
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = logs(&h, after).await;
        let lines = page["lines"].as_array().unwrap().clone();
        if lines.is_empty() {
            break;
        }
        after = page["next"].as_u64().unwrap();
        all.extend(lines);
    }
    let last = all.last().unwrap()["line"].as_str().unwrap().to_owned();
    assert!(last.starts_with("spam line 4999 "), "{last}");
    let seqs: Vec<u64> = all.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive, oldest first"
    );

    // A panic is logged, and its message is the dead letter's reason.
    handle(&h, "probe.trap").await;
    let page = logs(&h, after).await;
    assert!(
        page["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["source"] == "error"
                && l["line"]
                    .as_str()
                    .unwrap()
                    .contains("the probe was asked to panic")),
        "{page}"
    );
    let (_, dlq) = get(&format!("{}/v1/dlq?plugin=probe", h.url)).await;
    let reason = dlq["dead_letters"][0]["error"].as_str().unwrap();
    assert!(reason.contains("the probe was asked to panic"), "{reason}");

    // An unknown plugin is a 404 in the usual body.
    let (s, body) = get(&format!("{}/v1/plugins/nope/logs", h.url)).await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
}
