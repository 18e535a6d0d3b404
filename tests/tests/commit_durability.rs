//! A projection's commits reach the disk on sled's flush schedule, off the appends' path:
//! after `kill -9`, a projection runs again at most the batches it committed within the
//! last flush interval (500 ms), from a checkpoint whose state is whole, and nothing it
//! committed before that.

use std::path::Path;
use std::time::Duration;

use evhost_tests::{Host, append, get, position_reaches, upload};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");

/// The probe prints a line for each `probe.print` event: how many it printed since this
/// host process started.
async fn printed(h: &Host) -> usize {
    let (s, page) = get(&format!("{}/v1/plugins/probe/logs?after=0", h.url)).await;
    assert_eq!(s, 200, "{page}");
    page["lines"].to_string().matches("hello on stdout").count()
}

async fn prints(h: &Host, n: usize) -> u64 {
    let events: Vec<Value> = (0..n)
        .map(|_| json!({"type": "probe.print", "payload": {}}))
        .collect();
    let reply = append(h, "p", events).await;
    reply["positions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_u64()
        .unwrap()
        + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_reruns_at_most_the_last_flush_interval_of_a_projections_commits() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Host::start(BIN, dir.path(), &[]).await;
    let wasm = std::fs::read(Path::new(BUILD).join("sandbox_probe.wasm")).unwrap();
    let (s, body) = upload(&h, "probe", &evhost_tests::probe_manifest(0), wasm).await;
    assert_eq!(s, 200, "{body}");

    // Committed, then three flush intervals pass: a crash re-runs none of it.
    let head = prints(&h, 20).await;
    position_reaches(&h, "probe", head).await;
    assert_eq!(printed(&h).await, 20);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.kill9();
    let mut h = Host::start(BIN, dir.path(), &[]).await;
    let info = position_reaches(&h, "probe", head).await;
    assert_eq!(info["position"], head, "{info}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        printed(&h).await,
        0,
        "events committed more than a flush interval before the crash were handled again"
    );

    // Committed just before the crash: at most those run again, once, and the checkpoint
    // ends at the head.
    let head = prints(&h, 10).await;
    position_reaches(&h, "probe", head).await;
    h.kill9();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let info = position_reaches(&h, "probe", head).await;
    assert_eq!(info["position"], head, "{info}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = printed(&h).await;
    assert!(
        again <= 10,
        "{again} events ran again, more than the 10 since the last flush"
    );
    assert_eq!(info["events_processed"], json!(30), "{info}");
}
