//! `NatsLog`: the event log kept in a NATS JetStream stream, for hosts that share one log
//! across machines (`evhost serve --log nats://HOST:PORT`).
//!
//! - **Layout.** One JetStream stream (default `EVHOST`) with subjects
//!   `EVHOST.<stream>.<event type>` (a stream name that is not one subject token is
//!   hex-encoded after a `~`), so type patterns and stream reads filter on the server. A
//!   position is the message's stream sequence minus one; timestamps are the server's.
//! - **Durability.** An append is acknowledged when JetStream acknowledged it: durable only
//!   if the server runs with `sync_interval: always` (its default fsyncs every two minutes).
//! - **Atomicity.** A multi-event append is one atomic batch (ADR-50): all stored or none.
//!   Servers cap a batch at 1,000 messages, so a larger append is refused whole.
//! - **Expected versions.** The first event of each stream in an append carries
//!   `Nats-Expected-Last-Subject-Sequence` over `EVHOST.<stream>.>`: the server refuses it
//!   if any writer, on any host, appended to the stream since this host looked.
//! - **Idempotency.** Every event's id is its `Nats-Msg-Id`, deduplicated by the server
//!   within the stream's duplicate window; client ids are also kept in a local index
//!   (`DATA/nats-index`, disposable, rebuilt from the stream), which answers
//!   [`EventLog::find`] and dedupes retries after the window.
//! - **The bus.** A tail (an ordered consumer) hands every stored event, whichever host
//!   appended it, to the [`CommitSink`] in position order; [`EventLog::head`] is how far it
//!   got, and an append returns once the tail has passed it.

mod direct;
mod reader;
mod wire;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use self::direct::{Direct, Stored};
use self::wire::{Body, Subjects};
use super::{
    AppendError, Appended, CommitSink, Erased, EventLog, LogError, ReadFilter, ReadPage,
    STREAM_DELETED_TYPE, STREAM_RESTORED_TYPE, StreamAppend, StreamInfo, StreamList,
    StreamListQuery,
};
use crate::event::Event;

/// Most messages one JetStream atomic batch may hold (nats-server 2.12 and later).
pub const MAX_ATOMIC_BATCH: usize = 1000;

/// How many times an append is tried again after another writer moved a stream on.
const RETRIES: usize = 8;

/// Memory for the cache of the local id index.
const INDEX_CACHE_BYTES: u64 = 16 << 20;

/// Streams whose version this host remembers before it forgets them all.
const MAX_TIPS: usize = 100_000;

/// How a host reaches its JetStream log.
#[derive(Debug, Clone)]
pub struct NatsLogConfig {
    /// The servers, `nats://HOST:PORT`, comma-separated.
    pub servers: String,
    /// The JetStream stream (and the first token of its subjects).
    pub stream: String,
    /// Replicas of the stream when this host creates it.
    pub replicas: usize,
    /// How long the server remembers message ids to drop a retried append.
    pub duplicate_window: Duration,
    /// Largest event, in bytes of text.
    pub max_event_bytes: usize,
    /// Most events per append (at most [`MAX_ATOMIC_BATCH`]).
    pub max_batch_events: usize,
    /// Where the local index of client ids lives (`DATA/nats-index`).
    pub index_dir: PathBuf,
}

impl NatsLogConfig {
    /// Reads `nats://HOST:PORT[,nats://HOST:PORT...][?stream=NAME&replicas=N&duplicate_window=SECS]`,
    /// keeping the local index under `data`.
    pub fn parse(url: &str, data: &Path) -> Result<Self, String> {
        let (servers, query) = url.split_once('?').unwrap_or((url, ""));
        if servers.is_empty()
            || !servers
                .split(',')
                .all(|s| s.starts_with("nats://") && s.len() > "nats://".len())
        {
            return Err(format!(
                "--log {url:?} is not a NATS address: give nats://HOST:PORT (comma-separated for several servers)"
            ));
        }
        let mut config = Self {
            servers: servers.to_owned(),
            stream: "EVHOST".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_event_bytes: crate::event::DEFAULT_MAX_EVENT_BYTES,
            max_batch_events: MAX_ATOMIC_BATCH,
            index_dir: data.join("nats-index"),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("--log: {key}={value:?} is not a whole number"))
            };
            match key {
                "stream" => {
                    let ok = !value.is_empty()
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !ok {
                        return Err(format!(
                            "--log: stream={value:?} is not a JetStream stream name: use letters, digits, - and _"
                        ));
                    }
                    config.stream = value.to_owned();
                }
                "replicas" => match number()? {
                    r @ 1..=5 => config.replicas = r as usize,
                    r => return Err(format!("--log: replicas={r}: JetStream keeps 1 to 5")),
                },
                "duplicate_window" => config.duplicate_window = Duration::from_secs(number()?),
                other => {
                    return Err(format!(
                        "--log: unknown option {other:?}; the options are stream, replicas and duplicate_window"
                    ));
                }
            }
        }
        Ok(config)
    }
}

/// What this host knows of a stream's end: its version, the sequence of its last message
/// and, when deleted, its tombstone's position.
#[derive(Debug, Clone, Copy, Default)]
struct Tip {
    version: u64,
    last_seq: u64,
    deleted: Option<u64>,
}

struct Inner {
    client: Client,
    config: NatsLogConfig,
    subjects: Subjects,
    direct: Direct,
    js: async_nats::jetstream::Context,
    readers: reader::Readers,
    /// One past the last position the tail handed to the sink.
    head: watch::Sender<u64>,
    tips: Mutex<HashMap<String, Tip>>,
    /// Appends from this host go one at a time, so they never race each other's versions.
    writer: tokio::sync::Mutex<()>,
    index: sled::Db,
    ids: sled::Tree,
    sink: Arc<dyn CommitSink>,
    max_payload: usize,
    /// The last sequence an append from this host was acknowledged at.
    acked: std::sync::atomic::AtomicU64,
    /// Why the last append failed on the servers, while none has succeeded since.
    last_error: Mutex<Option<String>>,
    write_errors: std::sync::atomic::AtomicU64,
}

/// The event log in a JetStream stream. See the module's documentation for what it
/// guarantees.
pub struct NatsLog {
    inner: Arc<Inner>,
    tail: tokio::task::JoinHandle<()>,
}

impl Drop for NatsLog {
    fn drop(&mut self) {
        self.tail.abort();
    }
}

fn storage(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Nats(format!("{what}: {e}"))
}

/// An error the JetStream API answered with.
#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// The server's answer to a publish.
#[derive(Debug, Deserialize)]
struct PubAck {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    count: Option<u64>,
    error: Option<ApiError>,
}

/// JetStream's error codes this log acts on.
const WRONG_LAST_SEQUENCE: u64 = 10071;
const BATCH_DUPLICATE_ID: u64 = 10201;
const STREAM_NOT_FOUND: u64 = 10059;

async fn api(client: &Client, subject: String, body: Value) -> Result<Value, LogError> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.clone(), body.to_string().into()),
    )
    .await
    .map_err(|_| storage(&subject, "no answer within 10 s"))?
    .map_err(|e| storage(&subject, e))?;
    serde_json::from_slice(&reply.payload).map_err(|e| storage(&subject, e))
}

fn api_error(v: &Value) -> Option<ApiError> {
    serde_json::from_value(v.get("error")?.clone()).ok()
}

/// Finds or creates the JetStream stream, with direct gets and atomic batches allowed, and
/// returns its state.
async fn ensure_stream(client: &Client, config: &NatsLogConfig) -> Result<Value, LogError> {
    let name = &config.stream;
    let info = api(client, format!("$JS.API.STREAM.INFO.{name}"), json!({})).await?;
    match api_error(&info) {
        None => {
            let c = &info["config"];
            if c["allow_atomic"] == json!(true) && c["allow_direct"] == json!(true) {
                return Ok(info);
            }
            let mut updated = c.clone();
            updated["allow_atomic"] = json!(true);
            updated["allow_direct"] = json!(true);
            let answer = api(client, format!("$JS.API.STREAM.UPDATE.{name}"), updated).await?;
            if let Some(e) = api_error(&answer) {
                return Err(LogError::Nats(format!(
                    "JetStream stream {name} does not allow atomic batches and direct gets, and enabling them failed: {}",
                    e.description
                )));
            }
            Ok(answer)
        }
        Some(e) if e.err_code == STREAM_NOT_FOUND => {
            let create = json!({
                "name": name,
                "subjects": [format!("{name}.>")],
                "storage": "file",
                "retention": "limits",
                "discard": "old",
                "num_replicas": config.replicas,
                "duplicate_window": config.duplicate_window.as_nanos() as u64,
                "allow_direct": true,
                "allow_atomic": true,
            });
            let answer = api(client, format!("$JS.API.STREAM.CREATE.{name}"), create).await?;
            match api_error(&answer) {
                None => Ok(answer),
                Some(e) => Err(LogError::Nats(format!(
                    "creating JetStream stream {name} failed: {} (atomic batches need nats-server 2.12 or later with JetStream enabled)",
                    e.description
                ))),
            }
        }
        Some(e) => Err(LogError::Nats(format!(
            "JetStream stream {name}: {} (is JetStream enabled on the server?)",
            e.description
        ))),
    }
}

impl NatsLog {
    /// Connects, creates the stream if it is missing, brings the local id index up to the
    /// stream's end and starts the tail from there.
    pub async fn open(config: NatsLogConfig, sink: Arc<dyn CommitSink>) -> Result<Self, LogError> {
        if config.max_batch_events > MAX_ATOMIC_BATCH {
            return Err(LogError::Nats(format!(
                "the NATS log appends at most {MAX_ATOMIC_BATCH} events at once (one JetStream atomic batch), not {}; lower --max-batch-events",
                config.max_batch_events
            )));
        }
        let servers = config
            .servers
            .split(',')
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| storage(&format!("--log {}", config.servers), e))?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .map_err(|e| storage(&format!("connecting to {}", config.servers), e))?;
        // The first connection is retried in the background: wait for it, bounded.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                return Err(LogError::Nats(format!(
                    "cannot reach the NATS server at {} within 10 s; is it running?",
                    config.servers
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A cluster that has just started answers once it has elected its leader.
        let info = loop {
            match ensure_stream(&client, &config).await {
                Ok(info) => break info,
                Err(e) if tokio::time::Instant::now() < deadline + Duration::from_secs(20) => {
                    tracing::info!(error = %e, "JetStream is not ready yet; trying again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let created = info["created"].as_str().unwrap_or_default().to_owned();
        let last_seq = info["state"]["last_seq"].as_u64().unwrap_or(0);
        // The index holds ids only: a small cache (sled's default is 1 GiB).
        let index = super::open_sled(
            &sled::Config::new()
                .path(&config.index_dir)
                .cache_capacity(INDEX_CACHE_BYTES),
        )
        .map_err(|e| storage("opening the NATS log's id index", e))?;
        let ids = index
            .open_tree("ids")
            .map_err(|e| storage("opening the NATS log's id index", e))?;
        let (head, _) = watch::channel(last_seq);
        let inner = Arc::new(Inner {
            max_payload: client.server_info().max_payload,
            subjects: Subjects::new(&config.stream),
            direct: Direct::new(client.clone(), &config.stream),
            js: async_nats::jetstream::new(client.clone()),
            readers: Default::default(),
            client,
            config,
            head,
            tips: Mutex::new(HashMap::new()),
            writer: tokio::sync::Mutex::new(()),
            index,
            ids,
            sink,
            last_error: Mutex::new(None),
            write_errors: Default::default(),
            acked: Default::default(),
        });
        inner.catch_up_index(&created, last_seq).await?;
        inner.sink.opened(last_seq);
        let tail = tokio::spawn(inner.clone().tail(last_seq + 1));
        Ok(Self { inner, tail })
    }
}

const CURSOR: &[u8] = b"cursor";
const CREATED: &[u8] = b"stream-created";

impl Inner {
    /// Indexes the client ids of every message up to `last_seq` that the index has not
    /// seen; a stream that was created anew since (another `created` time) starts it over.
    async fn catch_up_index(&self, created: &str, last_seq: u64) -> Result<(), LogError> {
        let err = |e| storage("the NATS log's id index", e);
        if self.index.get(CREATED).map_err(err)?.as_deref() != Some(created.as_bytes()) {
            self.ids.clear().map_err(err)?;
            self.index
                .insert(CURSOR, &0u64.to_be_bytes())
                .map_err(err)?;
            self.index
                .insert(CREATED, created.as_bytes())
                .map_err(err)?;
        }
        let mut cursor = self.cursor()?;
        let all = self.subjects.all();
        while cursor < last_seq {
            let batch = self.direct.batch(cursor + 1, 1000, &all).await?;
            let mut upto = cursor;
            for m in &batch.messages {
                if m.seq > last_seq {
                    break;
                }
                let d = self.decode(m)?;
                if d.client_id {
                    self.index_id(&d.event)?;
                }
                upto = m.seq;
            }
            if upto == cursor || !batch.more {
                upto = last_seq;
            }
            cursor = upto;
            self.index
                .insert(CURSOR, &cursor.to_be_bytes())
                .map_err(err)?;
        }
        Ok(())
    }

    fn cursor(&self) -> Result<u64, LogError> {
        Ok(self
            .index
            .get(CURSOR)
            .map_err(|e| storage("the NATS log's id index", e))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    fn index_id(&self, event: &Event) -> Result<(), LogError> {
        self.ids
            .insert(event.id.as_bytes(), &event.position.to_be_bytes())
            .map_err(|e| storage("the NATS log's id index", e))?;
        Ok(())
    }

    fn decode(&self, m: &Stored) -> Result<wire::Decoded, LogError> {
        wire::decode(&self.subjects, &m.subject, m.seq, m.stored_at, &m.body)
    }

    fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Hands every message from `start` on to the sink, in order, for as long as the log
    /// is open; a consumer that fails is made again from where it stopped.
    async fn tail(self: Arc<Self>, start: u64) {
        let mut next = start;
        loop {
            match self.follow(next).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, from = next, "the NATS log's tail stopped; starting it again");
                }
            }
            next = self.head() + 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn follow(&self, start: u64) -> Result<(), LogError> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let js = async_nats::jetstream::new(self.client.clone());
        let stream = js
            .get_stream_no_info(&self.config.stream)
            .await
            .map_err(|e| storage("opening the tail", e))?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: self.subjects.all(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| storage("opening the tail", e))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| storage("opening the tail", e))?;
        let mut events: Vec<Arc<Event>> = Vec::new();
        let mut idle = 0u32;
        loop {
            // A consumer whose node died stalls silently until its heartbeats time out
            // (tens of seconds): when idle, check that nothing stored is waiting, and make
            // the consumer again when something is.
            let first = match tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
                Ok(Some(first)) => first,
                Ok(None) => return Ok(()),
                Err(_) => {
                    idle += 1;
                    let behind = self.acked.load(std::sync::atomic::Ordering::Acquire)
                        > self.head()
                        || (idle % 5 == 0 && self.stored_end().await? > self.head());
                    if behind {
                        return Err(LogError::Nats(format!(
                            "the tail's consumer stopped delivering at position {}; making it again",
                            self.head()
                        )));
                    }
                    continue;
                }
            };
            idle = 0;
            let mut batch = vec![first];
            while batch.len() < 512 {
                match messages.next().now_or_never() {
                    Some(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            events.clear();
            let mut last = 0;
            for m in batch {
                let m = m.map_err(|e| storage("the tail", e))?;
                let info = m.info().map_err(|e| storage("the tail", e))?;
                let seq = info.stream_sequence;
                let stored_at = info.published;
                let d = wire::decode(&self.subjects, &m.subject, seq, stored_at, &m.payload)?;
                if d.client_id {
                    self.index_id(&d.event)?;
                }
                self.saw(&d.event, seq);
                last = seq;
                events.push(Arc::new(d.event));
            }
            self.index
                .insert(CURSOR, &last.to_be_bytes())
                .map_err(|e| storage("the NATS log's id index", e))?;
            self.sink.committed(&events);
            self.head.send_replace(last);
        }
    }

    /// Keeps a remembered stream's tip current with an event the tail saw.
    fn saw(&self, event: &Event, seq: u64) {
        let mut tips = self.tips.lock().unwrap();
        if let Some(tip) = tips.get_mut(event.stream.as_str())
            && seq > tip.last_seq
        {
            *tip = Tip {
                version: event.version + 1,
                last_seq: seq,
                deleted: (event.event_type.as_str() == STREAM_DELETED_TYPE)
                    .then_some(event.position),
            };
        }
    }

    /// The tip of `stream`: remembered, unless `fresh` or unknown, then read from the server.
    async fn tip(&self, stream: &str, fresh: bool) -> Result<Tip, LogError> {
        if !fresh && let Some(t) = self.tips.lock().unwrap().get(stream) {
            return Ok(*t);
        }
        let tip = match self.direct.last(&self.subjects.stream(stream)).await? {
            None => Tip::default(),
            Some(m) => {
                let e = self.decode(&m)?.event;
                Tip {
                    version: e.version + 1,
                    last_seq: m.seq,
                    deleted: (e.event_type.as_str() == STREAM_DELETED_TYPE).then_some(e.position),
                }
            }
        };
        self.remember(stream, tip);
        Ok(tip)
    }

    fn remember(&self, stream: &str, tip: Tip) {
        let mut tips = self.tips.lock().unwrap();
        if tips.len() >= MAX_TIPS {
            tips.clear();
        }
        let t = tips.entry(stream.to_owned()).or_default();
        if tip.last_seq >= t.last_seq {
            *t = tip;
        }
    }

    /// Waits until the tail has handed position `position` to the sink, for at most 10 s.
    async fn reach(&self, head: u64) {
        let mut rx = self.head.subscribe();
        let waited =
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|h| *h >= head)).await;
        if waited.is_err() {
            tracing::warn!(
                head,
                "the NATS log's tail is more than 10 s behind an acknowledged append"
            );
        }
    }

    /// The sequence of the last message stored.
    async fn stored_end(&self) -> Result<u64, LogError> {
        Ok(self
            .direct
            .last(&self.subjects.all())
            .await?
            .map_or(0, |m| m.seq))
    }

    /// Lets the tail reach the stream's current end, so the id index knows every id stored.
    async fn catch_up(&self) -> Result<(), LogError> {
        let last = self.stored_end().await?;
        self.reach(last).await;
        Ok(())
    }

    /// The stream of the event at `position`.
    async fn stream_at(&self, position: u64) -> Result<Option<String>, LogError> {
        Ok(match self.direct.at(position + 1).await? {
            Some(m) => Some(self.decode(&m)?.event.stream.into()),
            None => None,
        })
    }

    /// The sequence of `stream`'s first message whose version is at least `version`:
    /// versions grow with sequences, so a binary search over sequences.
    async fn seq_of_version(&self, stream: &str, version: u64, tip: Tip) -> Result<u64, LogError> {
        if version == 0 {
            return Ok(1);
        }
        let subject = self.subjects.stream(stream);
        let (mut lo, mut hi) = (1, tip.last_seq);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.direct.next(mid, &subject).await? {
                Some(m) if self.decode(&m)?.event.version >= version => hi = mid.min(m.seq),
                Some(m) => lo = m.seq + 1,
                None => break,
            }
        }
        Ok(lo)
    }
}

/// Where one event of an append stands.
enum Slot {
    /// Already in the log (a retried id) at this position.
    Known(u64),
    /// The n-th message of this append.
    New(usize),
}

/// What one try of an append came to.
enum Attempt {
    Done(Vec<Appended>),
    /// A stream moved on since this host looked: look again.
    Stale,
    /// The server holds some id already: let the index catch up and look again.
    Duplicate,
}

impl NatsLog {
    async fn append_with(
        &self,
        groups: Vec<StreamAppend>,
        index_ids: bool,
    ) -> Result<Vec<Appended>, AppendError> {
        let c = &self.inner.config;
        if groups.iter().map(|g| g.events.len()).sum::<usize>() > c.max_batch_events {
            return Err(AppendError::Invalid(format!(
                "the append has more than {} events, the most the NATS log appends atomically (one JetStream atomic batch); split it into several appends",
                c.max_batch_events
            )));
        }
        super::validate(&groups, c.max_batch_events, c.max_event_bytes)?;
        let _writer = self.inner.writer.lock().await;
        let mut fresh = false;
        let mut duplicates = 0;
        for _ in 0..RETRIES {
            match self.try_append(&groups, index_ids, fresh).await? {
                Attempt::Done(done) => return Ok(done),
                Attempt::Stale => fresh = true,
                Attempt::Duplicate => {
                    duplicates += 1;
                    if duplicates > 2 {
                        return Err(AppendError::Invalid(
                            "JetStream still remembers one of the append's event ids from within its duplicate window, though no stored event has it (an erased event's id is free again only once the window has passed); retry after the window or give the events new ids".into(),
                        ));
                    }
                    self.inner.catch_up().await?;
                    fresh = true;
                }
            }
        }
        Err(AppendError::Storage(LogError::Nats(format!(
            "the append lost the race for its streams to other writers {RETRIES} times in a row; retry it"
        ))))
    }

    async fn try_append(
        &self,
        groups: &[StreamAppend],
        index_ids: bool,
        fresh: bool,
    ) -> Result<Attempt, AppendError> {
        let inner = &self.inner;
        let mut slots: Vec<Vec<Slot>> = Vec::with_capacity(groups.len());
        let mut messages: Vec<(String, HeaderMap, bytes::Bytes)> = Vec::new();
        let mut pending: HashMap<&str, usize> = HashMap::new();
        // Each stream's version and tombstone as this append leaves it.
        let mut tips: HashMap<&str, Tip> = HashMap::new();
        let mut next_versions = Vec::with_capacity(groups.len());
        for g in groups {
            let stream = g.stream.as_str();
            let mut group_slots = Vec::with_capacity(g.events.len());
            let mut new = Vec::new();
            for (i, e) in g.events.iter().enumerate() {
                let id = e.id.as_deref().filter(|_| index_ids);
                if let Some(id) = id {
                    if let Some(&n) = pending.get(id) {
                        group_slots.push(Slot::New(n));
                        continue;
                    }
                    if let Some(p) = self.find_local(id)? {
                        let Some(on) = inner.stream_at(p).await? else {
                            // Erased since: the id is free again.
                            self.forget_id(id)?;
                            let n = messages.len() + new.len();
                            pending.insert(id, n);
                            group_slots.push(Slot::New(n));
                            new.push(i);
                            continue;
                        };
                        if on != stream {
                            return Err(AppendError::IdInUse {
                                id: id.to_owned(),
                                stream: on,
                                position: p,
                            });
                        }
                        group_slots.push(Slot::Known(p));
                        continue;
                    }
                }
                let n = messages.len() + new.len();
                if let Some(id) = id {
                    pending.insert(id, n);
                }
                group_slots.push(Slot::New(n));
                new.push(i);
            }
            let first_of_stream = !tips.contains_key(stream);
            let mut tip = match tips.get(stream) {
                Some(t) => *t,
                None => inner.tip(stream, fresh).await?,
            };
            if !new.is_empty() {
                if !g.expected.admits(tip.version) {
                    if !fresh {
                        return Ok(Attempt::Stale);
                    }
                    return Err(AppendError::Conflict {
                        stream: stream.to_owned(),
                        expected: g.expected,
                        current: tip.version,
                    });
                }
                let expected_seq = tip.last_seq;
                for (k, &i) in new.iter().enumerate() {
                    let e = &g.events[i];
                    match (e.event_type.as_str(), tip.deleted) {
                        (STREAM_RESTORED_TYPE, Some(_)) => tip.deleted = None,
                        (STREAM_RESTORED_TYPE, None) => {
                            return Err(AppendError::Invalid(format!(
                                "stream {stream:?} is not deleted, so it cannot be restored"
                            )));
                        }
                        (_, Some(position)) => {
                            return Err(AppendError::StreamDeleted {
                                stream: stream.to_owned(),
                                position,
                            });
                        }
                        // Its position is known once stored; any placeholder marks it.
                        (STREAM_DELETED_TYPE, None) => tip.deleted = Some(u64::MAX),
                        _ => {}
                    }
                    let id = match &e.id {
                        Some(id) => id.to_string(),
                        None => uuid::Uuid::now_v7().to_string(),
                    };
                    let body = Body {
                        id: &id,
                        stream,
                        version: tip.version,
                        source: &e.source,
                        metadata: &e.metadata,
                        client_id: e.id.is_some() && index_ids,
                        payload: &e.payload,
                    }
                    .encode();
                    let subject = inner.subjects.event(stream, e.event_type.as_str());
                    if body.len() + subject.len() + 512 > inner.max_payload {
                        return Err(AppendError::Invalid(format!(
                            "a {} event takes {} bytes as a NATS message, more than the server's max_payload of {} bytes; raise max_payload in the NATS server's configuration or send a smaller event",
                            e.event_type,
                            body.len(),
                            inner.max_payload
                        )));
                    }
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    if first_of_stream && k == 0 {
                        headers.insert(
                            "Nats-Expected-Last-Subject-Sequence",
                            expected_seq.to_string().as_str(),
                        );
                        headers.insert(
                            "Nats-Expected-Last-Subject-Sequence-Subject",
                            inner.subjects.stream(stream).as_str(),
                        );
                    }
                    messages.push((subject, headers, body.into()));
                    tip.version += 1;
                }
            }
            tips.insert(stream, tip);
            next_versions.push(tip.version);
            slots.push(group_slots);
        }
        let first_seq = if messages.is_empty() {
            None
        } else {
            match self.publish(messages).await? {
                Ok(first) => Some(first),
                Err(again) => return Ok(again),
            }
        };
        let mut out = Vec::with_capacity(groups.len());
        let mut last_seq_of: HashMap<&str, u64> = HashMap::new();
        for ((g, group_slots), next_version) in groups.iter().zip(slots).zip(next_versions) {
            let positions: Vec<u64> = group_slots
                .iter()
                .map(|s| match s {
                    Slot::Known(p) => *p,
                    Slot::New(n) => first_seq.unwrap_or(1) - 1 + *n as u64,
                })
                .collect();
            for s in &group_slots {
                if let Slot::New(n) = s {
                    let seq = first_seq.unwrap_or(1) + *n as u64;
                    let e = last_seq_of.entry(g.stream.as_str()).or_default();
                    *e = (*e).max(seq);
                }
            }
            out.push(Appended {
                stream: g.stream.clone(),
                positions,
                next_version,
            });
        }
        if let Some(first) = first_seq {
            for (stream, tip) in &tips {
                if let Some(&last_seq) = last_seq_of.get(stream) {
                    let deleted = tip.deleted.map(|_| {
                        // The tombstone is the stream's last event: a deleted stream takes
                        // nothing after it.
                        last_seq - 1
                    });
                    inner.remember(
                        stream,
                        Tip {
                            version: tip.version,
                            last_seq,
                            deleted,
                        },
                    );
                }
            }
            let last = last_seq_of.values().copied().max().unwrap_or(first);
            inner
                .acked
                .fetch_max(last, std::sync::atomic::Ordering::Release);
            inner.reach(last).await;
        }
        Ok(Attempt::Done(out))
    }

    /// Publishes the messages, one alone or as one atomic batch, and answers the first
    /// one's sequence, or what to do when the server refused them.
    async fn publish(
        &self,
        mut messages: Vec<(String, HeaderMap, bytes::Bytes)>,
    ) -> Result<Result<u64, Attempt>, AppendError> {
        let client = &self.inner.client;
        let count = messages.len();
        let unknown = |e: &dyn std::fmt::Display| {
            AppendError::Storage(LogError::Nats(format!(
                "publishing to JetStream failed: {e}; the append's outcome is unknown, so retry it with the same event ids (retries within the duplicate window are not appended twice)"
            )))
        };
        if count > 1 {
            let batch = uuid::Uuid::now_v7().simple().to_string();
            for (i, (_, headers, _)) in messages.iter_mut().enumerate() {
                headers.insert("Nats-Batch-Id", batch.as_str());
                headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
                if i + 1 == count {
                    headers.insert("Nats-Batch-Commit", "1");
                }
            }
        }
        let (subject, headers, body) = messages.pop().expect("at least one message");
        for (subject, headers, body) in messages {
            client
                .publish_with_headers(subject, headers, body)
                .await
                .map_err(|e| unknown(&e))?;
        }
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request_with_headers(subject, headers, body),
        )
        .await
        .map_err(|_| unknown(&"no acknowledgement within 10 s"))?
        .map_err(|e| unknown(&e))?;
        let ack: PubAck = serde_json::from_slice(&reply.payload).map_err(|e| unknown(&e))?;
        if let Some(e) = ack.error {
            return match e.err_code {
                WRONG_LAST_SEQUENCE => Ok(Err(Attempt::Stale)),
                BATCH_DUPLICATE_ID => Ok(Err(Attempt::Duplicate)),
                _ => Err(AppendError::Storage(LogError::Nats(format!(
                    "JetStream refused the append: {} (error {}); nothing was appended",
                    e.description, e.err_code
                )))),
            };
        }
        if ack.duplicate {
            return Ok(Err(Attempt::Duplicate));
        }
        let stored = ack.count.unwrap_or(1) as usize;
        if stored != count {
            return Err(unknown(&format!(
                "the server stored {stored} of {count} messages"
            )));
        }
        Ok(Ok(ack.seq + 1 - count as u64))
    }

    /// Keeps the last failure of the servers for `/health`, until an append succeeds.
    fn noted(
        &self,
        result: Result<Vec<Appended>, AppendError>,
    ) -> Result<Vec<Appended>, AppendError> {
        let mut last = self.inner.last_error.lock().unwrap();
        match &result {
            Ok(_) => *last = None,
            Err(AppendError::Storage(e)) => {
                self.inner
                    .write_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *last = Some(e.to_string());
            }
            Err(_) => {}
        }
        result
    }

    fn forget_id(&self, id: &str) -> Result<(), LogError> {
        self.inner
            .ids
            .remove(id.as_bytes())
            .map_err(|e| storage("the NATS log's id index", e))?;
        Ok(())
    }

    fn find_local(&self, id: &str) -> Result<Option<u64>, LogError> {
        Ok(self
            .inner
            .ids
            .get(id.as_bytes())
            .map_err(|e| storage("the NATS log's id index", e))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// The stream's events from the message at `seq` on, at most `limit`.
    async fn stream_from(
        &self,
        stream: &str,
        seq: u64,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Event>, LogError> {
        let subject = self.inner.subjects.stream(stream);
        let mut out = Vec::new();
        let mut seq = seq;
        while out.len() < limit {
            let batch = self
                .inner
                .direct
                .batch(seq, (limit - out.len()).min(1000), &subject)
                .await?;
            for m in &batch.messages {
                let e = self.inner.decode(m)?.event;
                if e.version >= from_version && out.len() < limit {
                    out.push(e);
                }
                seq = m.seq + 1;
            }
            if !batch.more || batch.messages.is_empty() {
                break;
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl EventLog for NatsLog {
    async fn append(&self, groups: Vec<StreamAppend>) -> Result<Vec<Appended>, AppendError> {
        self.noted(self.append_with(groups, true).await)
    }

    async fn append_unindexed(
        &self,
        groups: Vec<StreamAppend>,
    ) -> Result<Vec<Appended>, AppendError> {
        self.noted(self.append_with(groups, false).await)
    }

    fn health(&self) -> super::LogHealth {
        let inner = &self.inner;
        let connected = inner.client.connection_state() == async_nats::connection::State::Connected;
        let last_write_error = if connected {
            inner.last_error.lock().unwrap().clone()
        } else {
            Some(format!(
                "not connected to the NATS servers at {} (reconnecting)",
                inner.config.servers
            ))
        };
        super::LogHealth {
            last_write_error,
            write_errors: inner
                .write_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        }
    }

    async fn read(
        &self,
        from: u64,
        limit: usize,
        filter: &ReadFilter,
    ) -> Result<ReadPage, LogError> {
        let head = self.inner.head();
        if from >= head {
            return Ok(ReadPage {
                events: Vec::new(),
                next: from,
            });
        }
        // One type pattern and the stream filter run on the server; the rest here.
        let pattern = filter.types.as_ref().and_then(|t| match t.patterns() {
            [one] => Some(one.as_str()),
            _ => None,
        });
        let subject = self
            .inner
            .subjects
            .filter(filter.stream.as_deref(), pattern);
        let limit = limit.clamp(1, 10_000);
        if limit >= reader::MIN_PAGE {
            let inner = &self.inner;
            match inner
                .readers
                .page(
                    &inner.js,
                    &inner.config.stream,
                    &subject,
                    from + 1,
                    head,
                    limit,
                )
                .await
            {
                Ok(page) => {
                    let mut events = Vec::with_capacity(page.messages.len());
                    for m in &page.messages {
                        let e = inner.decode(m)?.event;
                        if filter.admits(&e) {
                            events.push(e);
                        }
                    }
                    let next = match (page.at_head, page.messages.last()) {
                        (false, Some(last)) => last.seq,
                        _ => head,
                    };
                    return Ok(ReadPage {
                        events,
                        next: next.max(from),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a consumer read failed; reading by direct gets");
                }
            }
        }
        let batch = self.inner.direct.batch(from + 1, limit, &subject).await?;
        let mut events = Vec::with_capacity(batch.messages.len());
        let mut next = head;
        let mut past_head = false;
        for m in &batch.messages {
            if m.seq > head {
                past_head = true;
                break;
            }
            let e = self.inner.decode(m)?.event;
            if filter.admits(&e) {
                events.push(e);
            }
            next = m.seq;
        }
        if past_head || !batch.more {
            next = head;
        }
        Ok(ReadPage {
            events,
            next: next.max(from),
        })
    }

    async fn position_at(&self, at: DateTime<Utc>) -> Result<Option<u64>, LogError> {
        let head = self.inner.head();
        Ok(self
            .inner
            .direct
            .first_since(at)
            .await?
            .filter(|m| m.seq <= head)
            .map(|m| m.seq - 1))
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Event>, LogError> {
        let tip = self.inner.tip(stream, true).await?;
        if from_version >= tip.version || limit == 0 {
            return Ok(Vec::new());
        }
        let seq = self.inner.seq_of_version(stream, from_version, tip).await?;
        self.stream_from(stream, seq, from_version, limit).await
    }

    async fn read_stream_backward(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Event>, LogError> {
        let tip = self.inner.tip(stream, true).await?;
        if tip.version == 0 || limit == 0 {
            return Ok(Vec::new());
        }
        let top = from_version.min(tip.version - 1);
        let bottom = (top + 1).saturating_sub(limit as u64);
        let seq = self.inner.seq_of_version(stream, bottom, tip).await?;
        let mut events = self
            .stream_from(stream, seq, bottom, (top - bottom + 1) as usize)
            .await?;
        events.retain(|e| e.version <= top);
        events.reverse();
        Ok(events)
    }

    async fn list_streams(&self, query: &StreamListQuery) -> Result<StreamList, LogError> {
        let inner = &self.inner;
        let limit = query.limit.clamp(1, super::MAX_STREAM_LIST);
        let mut names = BTreeSet::new();
        let mut offset = 0u64;
        loop {
            let info = api(
                &inner.client,
                format!("$JS.API.STREAM.INFO.{}", inner.config.stream),
                json!({ "subjects_filter": inner.subjects.filter(None, None), "offset": offset }),
            )
            .await?;
            let subjects = info["state"]["subjects"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if subjects.is_empty() {
                break;
            }
            offset += subjects.len() as u64;
            for subject in subjects.keys() {
                if let Some((name, _)) = inner.subjects.parse(subject)
                    && name.starts_with(&query.prefix)
                    && query.after.as_ref().is_none_or(|a| name > *a)
                {
                    names.insert(name);
                }
            }
            if offset >= info["total"].as_u64().unwrap_or(0) {
                break;
            }
        }
        let mut out = StreamList::default();
        for name in names {
            if out.streams.len() == limit {
                out.next = out.streams.last().map(|s| s.stream.clone());
                break;
            }
            let tip = inner.tip(&name, true).await?;
            let Some(first) = inner.direct.next(1, &inner.subjects.stream(&name)).await? else {
                continue;
            };
            let Some(last) = inner.direct.at(tip.last_seq).await? else {
                continue;
            };
            out.streams.push(StreamInfo {
                stream: name,
                version: tip.version,
                first_position: first.seq - 1,
                last_position: last.seq - 1,
                first_timestamp: inner.decode(&first)?.event.timestamp,
                last_timestamp: inner.decode(&last)?.event.timestamp,
                deleted: tip.deleted.is_some(),
                deleted_at: tip.deleted,
            });
        }
        Ok(out)
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, LogError> {
        Ok(self.inner.tip(stream, true).await?.version)
    }

    async fn deletion(&self, stream: &str) -> Result<Option<u64>, LogError> {
        Ok(self.inner.tip(stream, true).await?.deleted)
    }

    async fn erase(&self, stream: &str) -> Result<Erased, LogError> {
        let inner = &self.inner;
        let _writer = inner.writer.lock().await;
        let tip = inner.tip(stream, true).await?;
        let Some(tombstone) = tip.deleted else {
            return Err(LogError::NotDeleted(stream.to_owned()));
        };
        // The erased events' ids are free again: the index forgets them first.
        let mut seq = 1;
        loop {
            let batch = inner
                .direct
                .batch(seq, 1000, &inner.subjects.stream(stream))
                .await?;
            for m in batch.messages.iter().filter(|m| m.seq <= tombstone) {
                let d = inner.decode(m)?;
                if d.client_id {
                    self.forget_id(&d.event.id)?;
                }
            }
            match batch.messages.last() {
                Some(m) if batch.more && m.seq < tombstone => seq = m.seq + 1,
                _ => break,
            }
        }
        // Everything of the stream before its tombstone; the tombstone stays.
        let answer = api(
            &inner.client,
            format!("$JS.API.STREAM.PURGE.{}", inner.config.stream),
            json!({ "filter": inner.subjects.stream(stream), "seq": tombstone + 1 }),
        )
        .await?;
        if let Some(e) = api_error(&answer) {
            return Err(LogError::Nats(format!(
                "JetStream refused to purge stream {stream:?}: {}",
                e.description
            )));
        }
        inner.sink.erased(stream);
        Ok(Erased {
            events: answer["purged"].as_u64().unwrap_or(0),
            segments: 0,
            tombstone,
        })
    }

    async fn find(&self, id: &str) -> Result<Option<u64>, LogError> {
        self.find_local(id)
    }

    fn head(&self) -> u64 {
        self.inner.head()
    }
}
