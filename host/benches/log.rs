//! Event log benchmarks: durable batch appends, group commit under 64 concurrent clients,
//! replay by position, and memory after ingest, beside a raw-sled baseline measured in the
//! same run (this machine is noisy: compare ratios).
//!
//! `cargo bench -p evhost --bench log` (set EVHOST_BENCH_EVENTS to change the 1M replay size).

// The allocator the `evhost` binary uses, so the figures are the binary's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use evhost::{
    EventLog, EventType, ExpectedVersion, Hub, Metadata, NewEvent, Payload, ReadFilter, SledLog,
    SledLogConfig, StreamAppend,
};

fn payload(i: u64) -> Payload {
    // About 200 bytes, like the envelope figures in DESIGN.md.
    Payload::from_json(&format!(
        r#"{{"tool_name":"inspect_location","parameters":{{"target":"room-{i}"}},"reasoning":"checking surroundings before acting","success":true,"execution_time_ms":150.0,"seq":{i}}}"#
    ))
    .unwrap()
}

fn event(i: u64) -> NewEvent {
    NewEvent::new(
        EventType::new("assistant.tool.executed").unwrap(),
        payload(i),
    )
    .with_metadata(Metadata {
        correlation_id: Some(format!("corr-{}", i / 10)),
        ..Metadata::default()
    })
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn open(dir: &std::path::Path) -> Arc<SledLog> {
    Arc::new(SledLog::open(SledLogConfig::new(dir), Hub::new(10_000)).unwrap())
}

/// Appends `batches` batches of `size` events; only the appends are timed, not building
/// the events (which in the host is the API's JSON parsing).
async fn batch_appends(log: &SledLog, batches: u64, size: u64, offset: u64) -> f64 {
    let mut timed = Duration::ZERO;
    for b in 0..batches {
        let events = (0..size).map(|i| event(offset + b * size + i)).collect();
        let group = vec![StreamAppend {
            stream: format!("bulk-{}", (offset / size + b) % 1000).into(),
            expected: ExpectedVersion::Any,
            events,
        }];
        let start = Instant::now();
        log.append(group).await.unwrap();
        timed += start.elapsed();
    }
    (batches * size) as f64 / timed.as_secs_f64()
}

fn raw_sled_single_inserts(dir: &std::path::Path, n: u64) -> f64 {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(64 << 20)
        .open()
        .unwrap();
    let value = payload(0).as_str().as_bytes().to_vec();
    let start = Instant::now();
    for i in 0..n {
        db.insert(i.to_be_bytes(), value.clone()).unwrap();
    }
    db.flush().unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

async fn concurrent_singles(
    log: Arc<SledLog>,
    clients: u64,
    per_client: u64,
) -> (f64, Duration, Duration) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client as usize);
            for i in 0..per_client {
                let t = Instant::now();
                log.append(vec![StreamAppend {
                    stream: format!("client-{c}").into(),
                    expected: ExpectedVersion::Any,
                    events: vec![event(i)],
                }])
                .await
                .unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort();
    let p50 = all[all.len() / 2];
    let p99 = all[all.len() * 99 / 100];
    (rate, p50, p99)
}

fn main() {
    let n: u64 = std::env::var("EVHOST_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("evhost log benchmarks ({n} events for replay/memory)");

    let base_dir = tempfile::tempdir().unwrap();
    let raw = raw_sled_single_inserts(base_dir.path(), 100_000);
    println!("baseline  raw sled, one 200 B key per insert:          {raw:>10.0} keys/s");

    rt.block_on(async {
        // 1. Durable batch appends of 1000 events.
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let rate = batch_appends(&log, 200, 1000, 0).await;
        println!(
            "append    batches of 1000, durable:                   {rate:>10.0} events/s  ({:.1}x raw sled inserts; target >= 200,000)",
            rate / raw
        );

        // 2. 64 concurrent clients, one event per append.
        let (rate, p50, p99) = concurrent_singles(log.clone(), 64, 400).await;
        println!(
            "append    64 clients x single events, durable:        {rate:>10.0} events/s  p50 {:.2} ms  p99 {:.2} ms  (targets >= 20,000/s, p99 < 20 ms)",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
        drop(log);

        // 3. Ingest n events, then memory and replay.
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let before = rss_mb();
        let ingest = batch_appends(&log, n / 1000, 1000, 0).await;
        let after_ingest = rss_mb();
        println!(
            "ingest    {n} events in batches of 1000:            {ingest:>10.0} events/s  RSS {after_ingest:.0} MB (was {before:.0} MB; target < 200 MB)"
        );
        let start = Instant::now();
        let mut from = 0;
        let mut count = 0u64;
        let mut bytes = 0usize;
        while from < log.head() {
            let page = log.read_blocking(from, 10_000, &ReadFilter::default()).unwrap();
            count += page.events.len() as u64;
            bytes += page.events.iter().map(|e| e.payload.len()).sum::<usize>();
            from = page.next;
        }
        let rate = count as f64 / start.elapsed().as_secs_f64();
        assert_eq!(count, n);
        println!(
            "replay    {n} events by position, decoded:          {rate:>10.0} events/s  ({:.0} MB of payload; target >= 750,000)",
            bytes as f64 / 1e6
        );
        // What a projection or worker that handles few of the events pays to pass the
        // rest: the same replay, keeping only the 10 events of one correlation id.
        let filter = ReadFilter {
            correlation_id: Some("corr-5".into()),
            ..ReadFilter::default()
        };
        let start = Instant::now();
        let (mut from, mut kept) = (0, 0);
        while from < log.head() {
            let page = log.read_blocking(from, 10_000, &filter).unwrap();
            kept += page.events.len();
            from = page.next;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        // corr-5 is on events 50 to 59.
        assert_eq!(kept, (50..60).filter(|i| *i < n).count());
        println!(
            "replay    {n} events by position, 10 kept by a filter: {rate:>10.0} events/s passed"
        );
        println!("memory    RSS after replay:                           {:>10.0} MB", rss_mb());
    });
}
