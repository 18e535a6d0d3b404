//! Damaged segments against the real binary: a flipped bit with acknowledged events after
//! it never costs those events. The host refuses to start and says where the damage is;
//! `evhost log repair` moves the damaged bytes aside and keeps every valid event at its
//! acknowledged position; a damaged chunk under an intact index shows in `/health` while
//! the events around it stay readable.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evhost_tests::{Host, append, get};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

/// Appends 60 x 100 events with client ids; returns id -> acknowledged position.
async fn fill(h: &Host) -> HashMap<String, u64> {
    let mut acked = HashMap::new();
    for g in 0..60 {
        let events: Vec<Value> = (0..100)
            .map(|j| json!({"type": "order.placed", "id": format!("o{g}-{j}"), "payload": {"g": g, "j": j}}))
            .collect();
        let reply = append(h, &format!("orders-{}", g % 7), events.clone()).await;
        for (e, p) in events.iter().zip(reply["positions"].as_array().unwrap()) {
            acked.insert(e["id"].as_str().unwrap().to_owned(), p.as_u64().unwrap());
        }
    }
    acked
}

fn flip_middle_bit(data: &Path) {
    use std::os::unix::fs::FileExt;
    let seg = data.join("events").join("00000000.seg");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
}

/// Runs `serve` expecting it to refuse to start; returns what it printed.
fn refused_start(data: &Path) -> String {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "the host started over damaged segments");
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the host neither started nor refused within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn all(h: &Host) -> Vec<Value> {
    evhost_tests::all_events(h).await
}

#[tokio::test]
async fn a_flipped_bit_refuses_the_start_and_repair_keeps_every_valid_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let acked = {
        let mut h = Host::start(BIN, &data, &[]).await;
        let acked = fill(&h).await;
        assert!(h.stop().success());
        acked
    };
    flip_middle_bit(&data);
    // The index is disposable: without it the segments are all there is.
    std::fs::remove_dir_all(data.join("index")).unwrap();
    let seg = data.join("events").join("00000000.seg");
    let len = std::fs::metadata(&seg).unwrap().len();
    let err = refused_start(&data);
    assert!(
        err.contains("00000000.seg") && err.contains("evhost log repair"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        len,
        "nothing truncated"
    );

    let out = Command::new(BIN)
        .args(["log", "repair", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("repaired: segment 00000000.seg"),
        "{stdout}"
    );

    let h = Host::start(BIN, &data, &[]).await;
    let events = all(&h).await;
    assert_eq!(events.len(), 6000, "every position is still there");
    let mut kept = 0;
    let mut placeholders = 0;
    for e in &events {
        if e["type"] == "evhost.log.damaged" {
            placeholders += 1;
            continue;
        }
        let id = e["id"].as_str().unwrap();
        assert_eq!(e["position"].as_u64(), acked.get(id).copied(), "{id} moved");
        kept += 1;
    }
    assert!(placeholders > 0 && placeholders <= 256, "{placeholders}");
    assert_eq!(kept + placeholders, 6000);
    // New events continue after the last acknowledged position.
    let r = append(
        &h,
        "after",
        vec![json!({"type": "order.placed", "payload": {}})],
    )
    .await;
    assert_eq!(r["positions"][0], 6000);
    let (s, health) = get(&format!("{}/health", h.url)).await;
    assert_eq!(
        (s, health["status"].as_str()),
        (200, Some("ok")),
        "{health}"
    );
}

#[tokio::test]
async fn a_damaged_chunk_under_an_intact_index_shows_in_health_and_the_rest_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let mut h = Host::start(BIN, &data, &[]).await;
        fill(&h).await;
        assert!(h.stop().success());
    }
    flip_middle_bit(&data);
    let h = Host::start(BIN, &data, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        let (s, health) = get(&format!("{}/health", h.url)).await;
        assert_eq!(s, 200);
        if health["status"] == "degraded" {
            break health;
        }
        assert!(Instant::now() < deadline, "damage never reported: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let damage = health["log"]["damaged"][0].as_str().unwrap();
    assert!(damage.contains("00000000.seg"), "{damage}");
    // A read from 0 gets the events before the damaged chunk and a `next` pointing at it.
    let (s, page) = get(&format!("{}/v1/events?from=0&limit=10000", h.url)).await;
    assert_eq!(s, 200, "{page}");
    let served = page["events"].as_array().unwrap().len() as u64;
    assert!(served > 0 && served < 6000);
    assert_eq!(page["next"], served);
    // Starting at the damaged chunk answers 503 naming the positions.
    let (s, err) = get(&format!("{}/v1/events?from={served}", h.url)).await;
    assert_eq!(s, 503, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("positions {served}..="))
    );
    // A subscriber reaching the chunk gets the events before it, then errors at a
    // backing-off pace, not a storm (55,000 error frames in 3 s before).
    let mut sse = reqwest::get(format!("{}/v1/subscribe?from=0", h.url))
        .await
        .unwrap();
    let mut text = String::new();
    let until = Instant::now() + Duration::from_secs(3);
    while let Ok(Ok(Some(chunk))) =
        tokio::time::timeout(until.saturating_duration_since(Instant::now()), sse.chunk()).await
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let errors = text.matches("event: error").count();
    assert!(
        text.contains(&format!("id: {}", served - 1)),
        "events before the damage delivered"
    );
    assert!((1..=20).contains(&errors), "{errors} error frames in 3 s");
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mb` MiB; `None` when this process may not mount (not root).
    fn mount(mb: u64) -> Option<Self> {
        let path = std::env::temp_dir().join(format!("evhost-small-disk-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { path })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[tokio::test]
async fn a_full_disk_fails_appends_with_503_shows_in_health_and_writing_resumes_once_space_is_back()
{
    let Some(disk) = SmallDisk::mount(24) else {
        assert!(
            !is_root(),
            "running as root, yet a tmpfs could not be mounted"
        );
        eprintln!("skipped: mounting a small disk needs root");
        return;
    };
    let data = disk.path.join("data");
    // Room the test can give back later.
    let ballast = disk.path.join("ballast");
    let h = Host::start(
        BIN,
        &data,
        &["--max-event-bytes", "300000", "--segment-mb", "2"],
    )
    .await;
    std::fs::write(&ballast, vec![7u8; 6 * 1024 * 1024]).unwrap();
    let client = reqwest::Client::new();
    let big = "x".repeat(250_000);
    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let id = format!("e{i}");
        let r = client
            .post(format!("{}/v1/streams/fill", h.url))
            .json(&json!({"events": [{"type": "blob.stored", "id": id, "payload": {"b": big}}]}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        if status == 200 {
            acked.push((id, body["positions"][0].as_u64().unwrap()));
        } else {
            refused = Some((status, body));
            break;
        }
    }
    let (status, body) = refused.expect("the disk never filled");
    assert_eq!(status, 503, "{body}");
    assert!(acked.len() > 10, "{}", acked.len());
    let (_, health) = get(&format!("{}/health", h.url)).await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["log"]["last_write_error"]
            .as_str()
            .unwrap()
            .contains("space"),
        "{health}"
    );

    // Space comes back: the next append succeeds without a restart, right after the last
    // acknowledged position.
    std::fs::remove_file(&ballast).unwrap();
    let r = append(
        &h,
        "fill",
        vec![json!({"type": "blob.stored", "id": "after", "payload": {}})],
    )
    .await;
    assert_eq!(
        r["positions"][0].as_u64().unwrap(),
        acked.last().unwrap().1 + 1
    );
    let (_, health) = get(&format!("{}/health", h.url)).await;
    assert_eq!(health["status"], "ok", "{health}");

    // Every acknowledged event is there after a restart, and nothing refused is.
    let mut h = h;
    assert!(h.stop().success());
    let h = Host::start(
        BIN,
        &data,
        &["--max-event-bytes", "300000", "--segment-mb", "2"],
    )
    .await;
    let events = all(&h).await;
    assert_eq!(events.len(), acked.len() + 1);
    for (id, pos) in &acked {
        assert_eq!(events[*pos as usize]["id"], id.as_str());
    }
    drop(h);
    drop(disk);
}
