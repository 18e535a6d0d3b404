//! The dashboard at `/` in a real headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from npm; `scripts/setup.sh` installs both): see
//! `tests/browser/dashboard.mjs` for what it checks. Screenshots go to
//! `target/dashboard-screenshots/`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use evhost_tests::{Host, append, get, load_ok, plugin_wasm};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let counter = "name = \"counter\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\"test.>\"]\n";
    load_ok(&h, "counter", counter, plugin_wasm("type-counter")).await;
    let probe = &evhost_tests::probe_manifest(0);
    load_ok(&h, "probe", probe, plugin_wasm("sandbox_probe")).await;
    append(&h, "p", vec![json!({"type": "probe.trap", "payload": {}})]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, d) = get(&format!("{}/v1/dlq?plugin=probe", h.url)).await;
        if d["dead_letters"].as_array().is_some_and(|l| l.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The page itself and its assets need no token, and say where they may load from.
    let r = reqwest::get(format!("{}/", h.url)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = root.join("target/dashboard-screenshots");
    let run = Command::new("node")
        .arg(root.join("tests/browser/dashboard.mjs"))
        .arg(&h.url)
        .arg(&out)
        .output()
        .expect("node (scripts/setup.sh installs the browser test's packages)");
    assert!(
        run.status.success(),
        "the browser test failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    for shot in ["overview", "plugin", "state", "tail"] {
        assert!(
            out.join(format!("{shot}.png")).exists(),
            "no screenshot {shot}.png"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_page_loads_and_its_data_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--token", "s3cret-admin-token"]).await;
    for path in ["/", "/ui/app.js", "/ui/app.css"] {
        let r = reqwest::get(format!("{}{path}", h.url)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let (s, _) = get(&format!("{}/v1/plugins", h.url)).await;
    assert_eq!(s, 401);
    let r = reqwest::get(format!("{}/ui/other.js", h.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
