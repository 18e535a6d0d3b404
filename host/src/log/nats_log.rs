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

mod append;
mod config;
mod direct;
mod ids;
mod reader;
mod tail;
mod wire;

pub use config::NatsLogConfig;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::watch;

use self::config::{api, api_error, ensure_stream};
use self::direct::{Direct, Stored};
use self::wire::Subjects;
use super::{
    AppendError, Appended, CommitSink, Erased, EventLog, LogError, ReadFilter, ReadPage,
    STREAM_DELETED_TYPE, StreamAppend, StreamInfo, StreamList, StreamListQuery,
};
use crate::event::Event;

/// Most messages one JetStream atomic batch may hold (nats-server 2.12 and later).
pub const MAX_ATOMIC_BATCH: usize = 1000;

/// Memory for the cache of the local id index.
const INDEX_CACHE_BYTES: u64 = 16 << 20;

/// Streams whose version this host remembers before it forgets them all.
const MAX_TIPS: usize = 100_000;

/// What this host knows of a stream's end: its version, the sequence of its last message
/// and, when deleted, its tombstone's position.
#[derive(Debug, Clone, Copy, Default)]
struct Tip {
    version: u64,
    last_seq: u64,
    deleted: Option<u64>,
}

impl Tip {
    /// The tip a stream has when `event`, stored at `seq`, is its last.
    fn after(event: &Event, seq: u64) -> Self {
        Tip {
            version: event.version + 1,
            last_seq: seq,
            deleted: (event.event_type.as_str() == STREAM_DELETED_TYPE).then_some(event.position),
        }
    }
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

impl NatsLog {
    /// The JetStream context the log uses, for what shares its servers (the leases).
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        self.inner.js.clone()
    }

    /// The log's configuration.
    pub fn config(&self) -> &NatsLogConfig {
        &self.inner.config
    }
}

impl Drop for NatsLog {
    fn drop(&mut self) {
        self.tail.abort();
    }
}

fn storage(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Nats(format!("{what}: {e}"))
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

impl Inner {
    fn decode(&self, m: &Stored) -> Result<wire::Decoded, LogError> {
        wire::decode(&self.subjects, &m.subject, m.seq, m.stored_at, &m.body)
    }

    fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// The tip of `stream`: remembered, unless `fresh` or unknown, then read from the server.
    async fn tip(&self, stream: &str, fresh: bool) -> Result<Tip, LogError> {
        if !fresh && let Some(t) = self.tips.lock().unwrap().get(stream) {
            return Ok(*t);
        }
        let tip = match self.direct.last(&self.subjects.stream(stream)).await? {
            None => Tip::default(),
            Some(m) => Tip::after(&self.decode(&m)?.event, m.seq),
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

impl NatsLog {
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

    /// Indexed all the same: hosts share this log, and a runner's own check of what it
    /// derived before does not see what another host appended for the same plugin just
    /// before a lease moved (a stalled host's append in flight). Indexed, a repeated derived
    /// id is answered as already stored (`written` false), inside the server's duplicate
    /// window and after it.
    async fn append_unindexed(
        &self,
        groups: Vec<StreamAppend>,
    ) -> Result<Vec<Appended>, AppendError> {
        self.noted(self.append_with(groups, true).await)
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
                    inner.forget_id(&d.event.id)?;
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
        self.inner.find_id(id)
    }

    fn head(&self) -> u64 {
        self.inner.head()
    }
}
