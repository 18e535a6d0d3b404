//! evhost's NATS JetStream log against raw JetStream, side by side in one run, with the
//! same durability (`sync_interval: always`) on one node (R1) and on a three-node cluster
//! on loopback (R3):
//!
//! - batched appends: `NatsLog::append` of 1,000 events per call (one atomic batch, with
//!   its expected-version check and message ids) against a plain async-nats publisher
//!   sending the same bodies as atomic batches of 1,000 with message ids, alone and with
//!   an ordered consumer following the stream live (what evhost's tail does for its bus);
//! - lone appends: one event per append, each waiting for its acknowledgement;
//! - catch-up: reading every event back, through `EventLog::read` pages of 4,096 (what a projection's
//!   subscription does) against an ordered consumer of the raw stream, alone and decoding
//!   each body into a typed event (what a projection over raw JetStream must do).
//!
//! Run: `cargo bench -p evhost-tests --bench nats_log`. `EVHOST_BENCH_EVENTS` sets the
//! events per figure (default 100,000), `EVHOST_BENCH_LONE` the lone appends (default 500).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use evhost::{
    EventLog, EventType, ExpectedVersion, Hub, NatsLog, NatsLogConfig, NewEvent, Payload,
    ReadFilter, StreamAppend,
};
use evhost_tests::nats::Nats;
use futures::StreamExt;
use serde_json::json;

fn payload(i: u64) -> String {
    evhost_tests::sample_payload(i).to_string()
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn evhost_log(urls: &str, replicas: usize, dir: &std::path::Path) -> Arc<NatsLog> {
    let mut config =
        NatsLogConfig::parse(&format!("{urls}?stream=EVB&replicas={replicas}"), dir).unwrap();
    config.max_batch_events = 1000;
    Arc::new(NatsLog::open(config, Hub::new(1000)).await.unwrap())
}

fn appends(from: u64, n: u64) -> Vec<StreamAppend> {
    vec![StreamAppend {
        stream: format!("s-{}", from % 100).into(),
        expected: ExpectedVersion::Any,
        events: (from..from + n)
            .map(|i| {
                NewEvent::new(
                    EventType::new("bench.tick").unwrap(),
                    Payload::from_json(&payload(i)).unwrap(),
                )
            })
            .collect(),
    }]
}

/// The body evhost stores for event `i`, so the raw publisher sends the same bytes.
fn raw_body(i: u64) -> bytes::Bytes {
    format!(
        r#"{{"id":"{}","stream":"s-{}","version":{i},"payload":{}}}"#,
        uuid_like(i),
        i % 100,
        payload(i)
    )
    .into()
}

fn uuid_like(i: u64) -> String {
    format!("0190a7c2-0000-7000-8000-{i:012}")
}

struct Raw {
    client: async_nats::Client,
}

impl Raw {
    async fn new(urls: &str, replicas: usize) -> Raw {
        let servers: Vec<async_nats::ServerAddr> =
            urls.split(',').map(|u| u.parse().unwrap()).collect();
        let client = async_nats::connect(servers).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let create = json!({
                "name": "RAW", "subjects": ["RAW.>"], "storage": "file",
                "num_replicas": replicas, "allow_direct": true, "allow_atomic": true,
            });
            let r = client
                .request("$JS.API.STREAM.CREATE.RAW", create.to_string().into())
                .await;
            if let Ok(r) = r
                && !String::from_utf8_lossy(&r.payload).contains("\"error\"")
            {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster took no stream");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Raw { client }
    }

    /// One atomic batch of events `from..from + n`.
    async fn batch(&self, from: u64, n: u64) {
        let id = format!("b{from}");
        let last = from + n - 1;
        for i in from..=last {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", uuid_like(i).as_str());
            if n > 1 {
                h.insert("Nats-Batch-Id", id.as_str());
                h.insert("Nats-Batch-Sequence", (i - from + 1).to_string().as_str());
            }
            let subject = format!("RAW.s-{}.bench.tick", i % 100);
            if i == last {
                if n > 1 {
                    h.insert("Nats-Batch-Commit", "1");
                }
                let ack = self
                    .client
                    .request_with_headers(subject, h, raw_body(i))
                    .await
                    .unwrap();
                assert!(
                    !String::from_utf8_lossy(&ack.payload).contains("\"error\""),
                    "{:?}",
                    ack.payload
                );
            } else {
                self.client
                    .publish_with_headers(subject, h, raw_body(i))
                    .await
                    .unwrap();
            }
        }
    }

    /// Follows the stream live, as evhost's tail does for its bus, until aborted.
    fn follow(&self) -> tokio::task::JoinHandle<()> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let js = async_nats::jetstream::new(self.client.clone());
        tokio::spawn(async move {
            let stream = js.get_stream_no_info("RAW").await.unwrap();
            let consumer = stream
                .create_consumer(OrderedConfig {
                    filter_subject: "RAW.>".into(),
                    deliver_policy: DeliverPolicy::New,
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut messages = consumer.messages().await.unwrap();
            while let Some(m) = messages.next().await {
                std::hint::black_box(m.unwrap().payload.len());
            }
        })
    }

    /// Reads every message back through an ordered consumer, decoding each body into a
    /// typed event when `decode`; returns how many.
    async fn consume(&self, total: u64, decode: bool) -> u64 {
        use async_nats::jetstream::consumer::pull::OrderedConfig;
        let js = async_nats::jetstream::new(self.client.clone());
        let stream = js.get_stream_no_info("RAW").await.unwrap();
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: "RAW.>".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut n = 0;
        let mut bytes = 0;
        while n < total {
            let m = messages.next().await.unwrap().unwrap();
            bytes += m.payload.len();
            if decode {
                let e: RawEvent = serde_json::from_slice(&m.payload).unwrap();
                std::hint::black_box(&e);
            }
            n += 1;
        }
        assert!(bytes > 0);
        n
    }
}

/// What a raw JetStream projection decodes each body into: the fields evhost's envelope has.
#[derive(serde::Deserialize, Debug)]
#[allow(dead_code)]
struct RawEvent {
    id: String,
    stream: String,
    version: u64,
    payload: Box<serde_json::value::RawValue>,
}

/// Events per second.
fn rate(n: u64, t: Duration) -> f64 {
    n as f64 / t.as_secs_f64()
}

async fn run(label: &str, nodes: usize) {
    let total = env("EVHOST_BENCH_EVENTS", 100_000);
    let lone = env("EVHOST_BENCH_LONE", 500);
    let nats = Nats::cluster(nodes);
    let urls = nats.urls();
    let dir = tempfile::tempdir().unwrap();
    let log = evhost_log(&urls, nodes, dir.path()).await;
    let raw = Raw::new(&urls, nodes).await;

    // Batched appends: alternate them, a third of the events each time, best of two. Raw
    // alone, and raw with a consumer following live, the work evhost's tail does so that
    // its bus sees every append.
    let (mut ev_best, mut raw_best, mut followed_best) = (0f64, 0f64, 0f64);
    let half = total / 3;
    let mut next_raw = 1;
    let mut next_ev = 0;
    for _ in 0..2 {
        let t = Instant::now();
        for k in (0..half).step_by(1000) {
            raw.batch(next_raw + k, 1000.min(half - k)).await;
        }
        raw_best = raw_best.max(rate(half, t.elapsed()));
        next_raw += half;
        let follower = raw.follow();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        for k in (0..half).step_by(1000) {
            raw.batch(next_raw + k, 1000.min(half - k)).await;
        }
        followed_best = followed_best.max(rate(half, t.elapsed()));
        follower.abort();
        next_raw += half;
        let t = Instant::now();
        for k in (0..half).step_by(1000) {
            log.append(appends(next_ev + k, 1000.min(half - k)))
                .await
                .unwrap();
        }
        ev_best = ev_best.max(rate(half, t.elapsed()));
        next_ev += half;
    }
    println!(
        "{label} batched appends of 1000: raw JetStream {raw_best:.0}/s, raw with a live follower {followed_best:.0}/s, evhost {ev_best:.0}/s; ratio {:.2}x to raw, {:.2}x to raw with a follower",
        ev_best / raw_best,
        ev_best / followed_best
    );

    // Lone appends, each waiting for its acknowledgement.
    let t = Instant::now();
    for i in 0..lone {
        raw.batch(next_raw + i, 1).await;
    }
    let raw_lone = t.elapsed().as_secs_f64() * 1e6 / lone as f64;
    next_raw += lone;
    let t = Instant::now();
    for i in 0..lone {
        log.append(appends(next_ev + i, 1)).await.unwrap();
    }
    let ev_lone = t.elapsed().as_secs_f64() * 1e6 / lone as f64;
    println!(
        "{label} lone appends: raw JetStream {raw_lone:.0} µs each, evhost {ev_lone:.0} µs each, ratio {:.2}x (time; lower is better)",
        ev_lone / raw_lone
    );
    let stored = next_raw - 1;

    // Catch-up: every event read back.
    let t = Instant::now();
    let n = raw.consume(stored, false).await;
    let raw_read = rate(n, t.elapsed());
    let t = Instant::now();
    let n = raw.consume(stored, true).await;
    let raw_decoded = rate(n, t.elapsed());
    let t = Instant::now();
    let (mut from, mut n, filter) = (0, 0u64, ReadFilter::default());
    while from < log.head() {
        let page = log.read(from, 4096, &filter).await.unwrap();
        n += page.events.len() as u64;
        from = page.next;
    }
    let ev_read = rate(n, t.elapsed());
    println!(
        "{label} catch-up over {n} events: raw ordered consumer {raw_read:.0}/s ({raw_decoded:.0}/s decoding each event), evhost reads {ev_read:.0}/s, ratio {:.2}x ({:.2}x to the decoding consumer)",
        ev_read / raw_read,
        ev_read / raw_decoded
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        run("R1", 1).await;
        run("R3", 3).await;
    });
}
