//! The embedded event log: event chunks in segment files, indexes in sled, group commit.
//!
//! One writer thread owns every write. It takes all appends waiting at that moment (a
//! group), checks versions and ids for each, and commits the whole group at once:
//!
//! 1. the group's chunks are written to the current segment and `fdatasync`ed: one sync
//!    for every append in the group, which is what makes the group durable;
//! 2. their index entries, stream runs and client ids are applied as one sled `Batch`.
//!
//! Then the appenders are acknowledged and the events published to the bus. sled flushes
//! its index in the background; at start-up, chunks in the segments past sled's last index
//! entry are verified and indexed again, so an index lost in a crash is rebuilt and bytes
//! of a group cut short are truncated. Readers never see past the durable head.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

use super::codec::{self, Chunk, ChunkEntry, Run, TypeCache};
use super::segment::{ChunkLocation, SegmentReader, SegmentWriter};
use super::{AppendError, Appended, EventLog, LogError, ReadFilter, ReadPage, StreamAppend};
use crate::bus::Hub;
use crate::event::{Event, validate_id, validate_stream};

/// Most appends combined into one durable group.
const MAX_GROUP_OPS: usize = 1024;
/// Most events combined into one durable group (a single larger append still goes alone).
const MAX_GROUP_EVENTS: usize = 32 * 1024;
/// Most positions one read examines.
const MAX_SCAN: u64 = 64 * 1024;

/// How to open a [`SledLog`].
#[derive(Debug, Clone)]
pub struct SledLogConfig {
    /// Directory of the sled database (created if missing).
    pub path: PathBuf,
    /// Bytes of sled page cache; bounds the host's memory (sled's default is 1 GiB).
    pub cache_bytes: u64,
    /// Largest payload accepted per event, in bytes of JSON text.
    pub max_event_bytes: usize,
    /// Most events accepted in one append.
    pub max_batch_events: usize,
}

impl SledLogConfig {
    /// Defaults for a log stored under `path`: 64 MiB cache, 1 MiB per event, 10,000 events
    /// per append.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_bytes: 64 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            max_batch_events: 10_000,
        }
    }
}

struct Shared {
    db: sled::Db,
    segments: SegmentReader,
    /// One past the last durable position.
    durable: AtomicU64,
    /// Set when storage failed; every later append is refused.
    poisoned: AtomicBool,
    hub: Arc<Hub>,
    config: SledLogConfig,
}

type Reply = oneshot::Sender<Result<Vec<Appended>, AppendError>>;

struct AppendOp {
    groups: Vec<StreamAppend>,
    /// False when the appender vouches its ids are new: they are kept but neither looked
    /// up nor indexed.
    index_ids: bool,
    reply: Reply,
}

/// The embedded event log: sled on local disk, durable appends with group commit.
pub struct SledLog {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<AppendOp>>,
    writer: Option<JoinHandle<()>>,
}

impl SledLog {
    async fn send(
        &self,
        groups: Vec<StreamAppend>,
        index_ids: bool,
    ) -> Result<Vec<Appended>, AppendError> {
        validate(&groups, &self.shared.config)?;
        let tx = self.tx.as_ref().ok_or(LogError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.send(AppendOp {
            groups,
            index_ids,
            reply,
        })
        .await
        .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Opens (or creates) the log and starts its writer; committed events go to `hub`.
    pub fn open(config: SledLogConfig, hub: Arc<Hub>) -> Result<Self, LogError> {
        std::fs::create_dir_all(&config.path).map_err(|e| {
            LogError::Storage(format!("cannot create {}: {e}", config.path.display()))
        })?;
        let index_dir = config.path.join("index");
        let db = sled::Config::new()
            .path(&index_dir)
            .cache_capacity(config.cache_bytes)
            .open()
            .map_err(storage)?;
        let data_file = File::open(index_dir.join("db")).map_err(|e| {
            LogError::Storage(format!("cannot open sled's data file to sync it: {e}"))
        })?;
        let events_dir = config.path.join("events");
        let (head, end) = recover(&db, &events_dir, &data_file)?;
        let segment_writer = SegmentWriter::open(&events_dir, end)?;
        hub.set_head(head);
        tracing::info!(path = %config.path.display(), head, "event log opened");
        let shared = Arc::new(Shared {
            db,
            segments: SegmentReader::new(events_dir),
            durable: AtomicU64::new(head),
            poisoned: AtomicBool::new(false),
            hub,
            config,
        });
        let (tx, rx) = mpsc::channel(MAX_GROUP_OPS * 4);
        let writer = Writer {
            shared: shared.clone(),
            segment: segment_writer,
            data_file,
            versions: HashMap::new(),
            next_position: head,
        };
        let handle = std::thread::Builder::new()
            .name("evhost-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::Storage(format!("cannot start the log writer: {e}")))?;
        Ok(Self {
            shared,
            tx: Some(tx),
            writer: Some(handle),
        })
    }

    /// The sled database, for modules that keep their own trees beside the log.
    pub fn db(&self) -> &sled::Db {
        &self.shared.db
    }

    /// Reads without an async runtime; see [`EventLog::read`].
    pub fn read_blocking(
        &self,
        from: u64,
        limit: usize,
        filter: &ReadFilter,
    ) -> Result<ReadPage, LogError> {
        read_positions(&self.shared, from, limit, filter)
    }

    /// Stops the writer after it has finished the appends already queued.
    pub fn close(&mut self) {
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The position the id index holds for a client-supplied `id`.
fn indexed_position(db: &sled::Db, id: &str) -> Result<Option<u64>, LogError> {
    let found = db.get(codec::id_key(id)).map_err(storage)?;
    found
        .map(|v| {
            v.as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| LogError::Corrupt(format!("id index entry of {id:?}")))
        })
        .transpose()
}

fn storage(e: sled::Error) -> LogError {
    LogError::Storage(e.to_string())
}

/// Indexes chunks that reached the segments but not sled's index before the host stopped,
/// and makes the index durable. Returns the head and where the segments' valid data ends.
fn recover(db: &sled::Db, dir: &Path, data_file: &File) -> Result<(u64, (u32, u64)), LogError> {
    let last = last_chunk(db)?;
    let mut head = last
        .map(|(first, c)| first + u64::from(c.count))
        .unwrap_or(0);
    let from = last
        .map(|(_, c)| (c.location.segment, c.location.end()))
        .unwrap_or((0, 0));
    let mut recovered = 0u64;
    let mut batch = sled::Batch::default();
    let mut types = TypeCache::default();
    let mut events: Vec<(Event, bool)> = Vec::new();
    // Chunks of the group being read; indexed only once its last chunk is found, so a group
    // cut short by a crash (never acknowledged) is dropped whole.
    let mut group: Vec<(u64, ChunkEntry, Vec<(Event, bool)>)> = Vec::new();
    let mut committed_end = from;
    let mut expected = head;
    super::segment::scan(dir, from, |location, bytes| {
        let Some(h) = codec::chunk_header(bytes) else {
            return Ok(false);
        };
        if h.first_position != expected {
            return Ok(false);
        }
        let chunk = Chunk::parse(h.first_position, bytes)?;
        let mut chunk_events = Vec::with_capacity(chunk.len());
        for pos in h.first_position..chunk.end() {
            chunk_events.push(chunk.event_keyed(pos, &mut types)?);
        }
        let count = chunk.len() as u32;
        group.push((
            h.first_position,
            ChunkEntry { location, count },
            chunk_events,
        ));
        expected = chunk.end();
        if h.group_end {
            for (first, entry, evs) in group.drain(..) {
                batch.insert(&codec::event_key(first), &entry.encode()[..]);
                recovered += u64::from(entry.count);
                events.extend(evs);
            }
            head = expected;
            committed_end = (location.segment, location.end());
        }
        Ok(true)
    })?;
    if !group.is_empty() {
        tracing::warn!(
            chunks = group.len(),
            "dropping an incomplete group that was never acknowledged"
        );
    }
    let end = committed_end;
    if recovered > 0 {
        index_events(&mut batch, events.iter().map(|(e, k)| (e, *k)));
        db.apply_batch(batch).map_err(storage)?;
        tracing::info!(
            events = recovered,
            "indexed events written before the last stop"
        );
    }
    db.flush().map_err(storage)?;
    data_file
        .sync_data()
        .map_err(|e| LogError::Storage(format!("fdatasync of sled's data file: {e}")))?;
    Ok((head, end))
}

/// Adds stream runs and client ids of `events` (consecutive positions) to `batch`.
fn index_events<'a>(batch: &mut sled::Batch, events: impl Iterator<Item = (&'a Event, bool)>) {
    // Consecutive versions at consecutive positions share one run entry.
    let mut open: HashMap<&str, (u64, u64, u32)> = HashMap::new(); // first version, first position, count
    let put = |batch: &mut sled::Batch, stream: &str, (v, p, n): (u64, u64, u32)| {
        let run = Run {
            first_position: p,
            count: n,
        };
        batch.insert(codec::stream_key(stream, v), &run.encode()[..]);
    };
    for (e, keyed) in events {
        if keyed {
            batch.insert(codec::id_key(&e.id), &e.position.to_be_bytes()[..]);
        }
        match open.get_mut(e.stream.as_str()) {
            Some((v, p, n))
                if *v + u64::from(*n) == e.version && *p + u64::from(*n) == e.position =>
            {
                *n += 1;
            }
            Some(run) => {
                let done = *run;
                *run = (e.version, e.position, 1);
                put(batch, &e.stream, done);
            }
            None => {
                open.insert(&e.stream, (e.version, e.position, 1));
            }
        }
    }
    for (stream, run) in open {
        put(batch, stream, run);
    }
}

/// The last indexed chunk: its first position and entry.
fn last_chunk(db: &sled::Db) -> Result<Option<(u64, ChunkEntry)>, LogError> {
    let last = db
        .range(codec::event_key(0)..=codec::event_key(u64::MAX))
        .next_back()
        .transpose()
        .map_err(storage)?;
    last.map(|(k, v)| Ok((codec::position_of_event_key(&k)?, ChunkEntry::decode(&v)?)))
        .transpose()
}

#[async_trait]
impl EventLog for SledLog {
    async fn append(&self, groups: Vec<StreamAppend>) -> Result<Vec<Appended>, AppendError> {
        self.send(groups, true).await
    }

    async fn append_unindexed(
        &self,
        groups: Vec<StreamAppend>,
    ) -> Result<Vec<Appended>, AppendError> {
        self.send(groups, false).await
    }

    async fn read(
        &self,
        from: u64,
        limit: usize,
        filter: &ReadFilter,
    ) -> Result<ReadPage, LogError> {
        let shared = self.shared.clone();
        let filter = filter.clone();
        tokio::task::spawn_blocking(move || read_positions(&shared, from, limit, &filter))
            .await
            .map_err(|e| LogError::Storage(format!("read task failed: {e}")))?
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Event>, LogError> {
        let shared = self.shared.clone();
        let stream = stream.to_owned();
        tokio::task::spawn_blocking(move || read_stream(&shared, &stream, from_version, limit))
            .await
            .map_err(|e| LogError::Storage(format!("read task failed: {e}")))?
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, LogError> {
        durable_stream_version(&self.shared, stream)
    }

    async fn find(&self, id: &str) -> Result<Option<u64>, LogError> {
        indexed_position(&self.shared.db, id)
    }

    fn head(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }
}

/// Checks what can be checked without the log's state, so bad input never reaches the writer.
fn validate(groups: &[StreamAppend], config: &SledLogConfig) -> Result<(), AppendError> {
    let total: usize = groups.iter().map(|g| g.events.len()).sum();
    if total == 0 {
        return Err(AppendError::Invalid(
            "the append has no events; send at least one".into(),
        ));
    }
    if total > config.max_batch_events {
        return Err(AppendError::Invalid(format!(
            "the append has {total} events, more than the limit of {}; split it",
            config.max_batch_events
        )));
    }
    for g in groups {
        validate_stream(&g.stream).map_err(|e| AppendError::Invalid(e.to_string()))?;
        for e in &g.events {
            if let Some(id) = &e.id {
                validate_id(id).map_err(|e| AppendError::Invalid(e.to_string()))?;
            }
            // The whole event counts: a limit on the payload alone let metadata and source
            // carry any amount.
            let size = e.text_len();
            if size > config.max_event_bytes {
                return Err(AppendError::Invalid(format!(
                    "a {} event is {size} bytes (payload {}, metadata {}, source {}), more than the limit of {} bytes per event",
                    e.event_type,
                    e.payload.len(),
                    e.metadata.text_len(),
                    e.source.len(),
                    config.max_event_bytes
                )));
            }
        }
    }
    Ok(())
}

/// The index entry of the chunk holding `position`, with the chunk's first position.
fn chunk_at(db: &sled::Db, position: u64) -> Result<Option<(u64, ChunkEntry)>, LogError> {
    let found = db
        .range(codec::event_key(0)..=codec::event_key(position))
        .next_back()
        .transpose()
        .map_err(storage)?;
    found
        .map(|(k, v)| Ok((codec::position_of_event_key(&k)?, ChunkEntry::decode(&v)?)))
        .transpose()
}

fn read_positions(
    shared: &Shared,
    from: u64,
    limit: usize,
    filter: &ReadFilter,
) -> Result<ReadPage, LogError> {
    let head = shared.durable.load(Ordering::Acquire);
    let mut page = ReadPage {
        events: Vec::with_capacity(limit.min(1024)),
        next: from.min(head),
    };
    if from >= head || limit == 0 {
        return Ok(page);
    }
    let Some((start, _)) = chunk_at(&shared.db, from)? else {
        return Err(LogError::Corrupt(format!("no chunk holds position {from}")));
    };
    let stop = head.min(from.saturating_add(MAX_SCAN));
    let mut types = TypeCache::default();
    for item in shared
        .db
        .range(codec::event_key(start)..codec::event_key(stop))
    {
        let (k, v) = item.map_err(storage)?;
        let first = codec::position_of_event_key(&k)?;
        let bytes = shared.segments.read(ChunkEntry::decode(&v)?.location)?;
        let chunk = Chunk::parse(first, &bytes)?;
        for pos in page.next.max(first)..chunk.end().min(stop) {
            let event = chunk.event(pos, &mut types)?;
            page.next = pos + 1;
            if filter.admits(&event) {
                page.events.push(event);
                if page.events.len() == limit {
                    return Ok(page);
                }
            }
        }
    }
    page.next = stop;
    Ok(page)
}

/// The last run of `stream` whose events are durable, with its first version.
fn last_durable_run(shared: &Shared, stream: &str) -> Result<Option<(u64, Run)>, LogError> {
    let head = shared.durable.load(Ordering::Acquire);
    let prefix = codec::stream_prefix(stream);
    for item in shared.db.scan_prefix(&prefix).rev() {
        let (k, v) = item.map_err(storage)?;
        let run = Run::decode(&v)?;
        if run.first_position + u64::from(run.count) <= head {
            return Ok(Some((codec::version_of_stream_key(&k)?, run)));
        }
    }
    Ok(None)
}

fn durable_stream_version(shared: &Shared, stream: &str) -> Result<u64, LogError> {
    Ok(last_durable_run(shared, stream)?
        .map(|(v, run)| v + u64::from(run.count))
        .unwrap_or(0))
}

fn read_stream(
    shared: &Shared,
    stream: &str,
    from_version: u64,
    limit: usize,
) -> Result<Vec<Event>, LogError> {
    let head = shared.durable.load(Ordering::Acquire);
    let prefix = codec::stream_prefix(stream);
    // The run holding `from_version` starts at or before it.
    let start = shared
        .db
        .range(prefix.clone()..=codec::stream_key(stream, from_version))
        .next_back()
        .transpose()
        .map_err(storage)?
        .map(|(k, _)| k.to_vec())
        .unwrap_or_else(|| codec::stream_key(stream, from_version));
    let mut out = Vec::new();
    let mut types = TypeCache::default();
    // The chunk last read: first position, one past its last, bytes.
    let mut cached: Option<(u64, u64, Vec<u8>)> = None;
    for item in shared.db.range(start..) {
        let (k, v) = item.map_err(storage)?;
        if !k.starts_with(&prefix) {
            break;
        }
        let first_version = codec::version_of_stream_key(&k)?;
        let run = Run::decode(&v)?;
        for i in 0..u64::from(run.count) {
            let version = first_version + i;
            if version < from_version {
                continue;
            }
            let pos = run.first_position + i;
            if pos >= head || out.len() >= limit {
                return Ok(out);
            }
            if !matches!(&cached, Some((first, end, _)) if *first <= pos && pos < *end) {
                let (first, entry) = chunk_at(&shared.db, pos)?
                    .ok_or_else(|| LogError::Corrupt(format!("no chunk holds position {pos}")))?;
                let bytes = shared.segments.read(entry.location)?;
                Chunk::parse(first, &bytes)?;
                cached = Some((first, first + u64::from(entry.count), bytes));
            }
            let (first, _, bytes) = cached.as_ref().expect("filled above");
            out.push(Chunk::parse_checked(*first, bytes)?.event(pos, &mut types)?);
        }
    }
    Ok(out)
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    segment: SegmentWriter,
    data_file: File,
    /// Next version of streams seen so far (everything applied is durable or poisoned).
    versions: HashMap<String, u64>,
    next_position: u64,
}

/// What one append became before the group is committed.
struct Staged {
    reply: Reply,
    results: Vec<Appended>,
}

/// State of one group while its appends are checked and staged.
struct Group {
    first_position: u64,
    events: Vec<Event>,
    /// Ids new in this group, with their positions.
    ids: HashMap<String, u64>,
    /// Next version of streams touched by this group.
    versions: HashMap<String, u64>,
    staged: Vec<Staged>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<AppendOp>) {
        while let Some(first) = rx.blocking_recv() {
            let mut ops = vec![first];
            let mut events = ops[0].groups.iter().map(|g| g.events.len()).sum::<usize>();
            while ops.len() < MAX_GROUP_OPS && events < MAX_GROUP_EVENTS {
                match rx.try_recv() {
                    Ok(op) => {
                        events += op.groups.iter().map(|g| g.events.len()).sum::<usize>();
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            if self.shared.poisoned.load(Ordering::Acquire) {
                for op in ops {
                    let _ = op.reply.send(Err(poisoned()));
                }
                continue;
            }
            self.commit_group(ops);
        }
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e, "could not flush the index at shutdown; it will be rebuilt at the next start");
        }
        tracing::debug!("event log writer stopped");
    }

    fn commit_group(&mut self, ops: Vec<AppendOp>) {
        let mut group = Group {
            first_position: self.next_position,
            events: Vec::new(),
            ids: HashMap::new(),
            versions: HashMap::new(),
            staged: Vec::new(),
        };
        for op in ops {
            match self.stage(&mut group, &op.groups, op.index_ids) {
                Ok(results) => group.staged.push(Staged {
                    reply: op.reply,
                    results,
                }),
                Err(e) => {
                    let _ = op.reply.send(Err(e));
                }
            }
        }
        if group.events.is_empty() {
            // Only duplicates (or rejects): nothing to write.
            for s in group.staged {
                let _ = s.reply.send(Ok(s.results));
            }
            return;
        }
        if let Err(e) = self.write(&group) {
            tracing::error!(error = %e, "event log write failed; refusing further appends");
            self.shared.poisoned.store(true, Ordering::Release);
            for s in group.staged {
                let _ = s.reply.send(Err(AppendError::Storage(e.clone())));
            }
            return;
        }
        let end = group.first_position + group.events.len() as u64;
        self.next_position = end;
        self.versions.extend(group.versions);
        self.shared.durable.store(end, Ordering::Release);
        let published: Vec<Arc<Event>> = group.events.into_iter().map(Arc::new).collect();
        self.shared.hub.publish(&published);
        for s in group.staged {
            let _ = s.reply.send(Ok(s.results));
        }
    }

    /// The stream's next version as this group sees it.
    fn version(&mut self, group: &Group, stream: &str) -> Result<u64, LogError> {
        if let Some(v) = group.versions.get(stream) {
            return Ok(*v);
        }
        if let Some(v) = self.versions.get(stream) {
            return Ok(*v);
        }
        let v = durable_stream_version(&self.shared, stream)?;
        if self.versions.len() > 1_000_000 {
            self.versions.clear();
        }
        self.versions.insert(stream.to_owned(), v);
        Ok(v)
    }

    /// Where an event with `id` already is, in the log or earlier in this group.
    fn existing(&self, group: &Group, id: &str) -> Result<Option<u64>, LogError> {
        if let Some(p) = group.ids.get(id) {
            return Ok(Some(*p));
        }
        indexed_position(&self.shared.db, id)
    }

    /// Checks one append against the log and the group so far and stages its new events;
    /// on error the group is left exactly as it was.
    fn stage(
        &mut self,
        group: &mut Group,
        appends: &[StreamAppend],
        index_ids: bool,
    ) -> Result<Vec<Appended>, AppendError> {
        let base = group.first_position + group.events.len() as u64;
        let mut staged: Vec<Event> = Vec::new();
        // Client ids new in this append, with the position each got.
        let mut ids: HashMap<String, u64> = HashMap::new();
        let mut versions: HashMap<String, u64> = HashMap::new();
        let mut results = Vec::with_capacity(appends.len());
        let now = Utc::now();
        for append in appends {
            // An id already stored, earlier in the group, or earlier in this append is not
            // appended again: it reports the original position.
            let mut positions: Vec<Option<u64>> = Vec::with_capacity(append.events.len());
            let mut fresh: Vec<usize> = Vec::new();
            let mut pending: HashSet<&str> = HashSet::new();
            for (i, e) in append.events.iter().enumerate() {
                if !index_ids {
                    fresh.push(i);
                    positions.push(None);
                    continue;
                }
                let known = match e.id.as_deref() {
                    Some(id) => match ids.get(id) {
                        Some(p) => Some(*p),
                        None => self.existing(group, id)?,
                    },
                    None => None,
                };
                match (known, e.id.as_deref()) {
                    (Some(p), _) => positions.push(Some(p)),
                    (None, Some(id)) if !pending.insert(id) => positions.push(None),
                    (None, _) => {
                        fresh.push(i);
                        positions.push(None);
                    }
                }
            }
            let current = match versions.get(&append.stream) {
                Some(v) => *v,
                None => self.version(group, &append.stream)?,
            };
            if !fresh.is_empty() && !append.expected.admits(current) {
                return Err(AppendError::Conflict {
                    stream: append.stream.clone(),
                    expected: append.expected,
                    current,
                });
            }
            let mut version = current;
            for &i in &fresh {
                let e = &append.events[i];
                let position = base + staged.len() as u64;
                let id = match &e.id {
                    Some(id) if index_ids => {
                        ids.insert(id.clone(), position);
                        id.clone()
                    }
                    Some(id) => id.clone(),
                    None => uuid::Uuid::now_v7().to_string(),
                };
                staged.push(Event {
                    id,
                    event_type: e.event_type.clone(),
                    stream: append.stream.clone(),
                    position,
                    version,
                    timestamp: now,
                    source: e.source.clone(),
                    payload: e.payload.clone(),
                    metadata: e.metadata.clone(),
                });
                positions[i] = Some(position);
                version += 1;
            }
            let positions = positions
                .into_iter()
                .zip(&append.events)
                .map(|(p, e)| p.or_else(|| e.id.as_deref().and_then(|id| ids.get(id).copied())))
                .collect::<Option<Vec<u64>>>()
                .expect("every event has a position");
            versions.insert(append.stream.clone(), version);
            results.push(Appended {
                stream: append.stream.clone(),
                positions,
                next_version: version,
            });
        }
        group.ids.extend(ids);
        group.versions.extend(versions);
        group.events.extend(staged);
        Ok(results)
    }

    /// Applies the group as one batch and makes it durable.
    fn write(&mut self, group: &Group) -> Result<(), LogError> {
        let mut batch = sled::Batch::default();
        // Every chunk of the group, back to back: one write, one fdatasync.
        let mut bytes: Vec<u8> = Vec::new();
        let mut chunks: Vec<(u64, usize, usize, u32)> = Vec::new(); // first, start, len, count
        let mut encoded: Vec<Vec<u8>> = Vec::new();
        let mut size = 0;
        let mut chunk_first = group.first_position;
        let mut close =
            |encoded: &mut Vec<Vec<u8>>, first: u64, bytes: &mut Vec<u8>, last: bool| {
                let chunk = codec::encode_chunk(first, encoded, last);
                chunks.push((first, bytes.len(), chunk.len(), encoded.len() as u32));
                bytes.extend_from_slice(&chunk);
                encoded.clear();
            };
        for e in &group.events {
            let enc = codec::encode_event(e, group.ids.contains_key(&e.id));
            if !encoded.is_empty()
                && (encoded.len() == codec::CHUNK_MAX_EVENTS
                    || size + enc.len() > codec::CHUNK_MAX_BYTES)
            {
                close(&mut encoded, chunk_first, &mut bytes, false);
                chunk_first = e.position;
                size = 0;
            }
            size += enc.len();
            encoded.push(enc);
        }
        close(&mut encoded, chunk_first, &mut bytes, true);
        let (segment, base) = self.segment.append(&bytes)?;
        if let Err(e) = self.segment.sync() {
            self.rollback(segment, base);
            return Err(e);
        }
        for (first, start, len, count) in chunks {
            let entry = ChunkEntry {
                location: ChunkLocation {
                    segment,
                    offset: base + start as u64,
                    len: u32::try_from(len).map_err(|_| {
                        LogError::Storage(format!("a chunk of {len} bytes is too large"))
                    })?,
                },
                count,
            };
            batch.insert(&codec::event_key(first), &entry.encode()[..]);
        }

        index_events(
            &mut batch,
            group
                .events
                .iter()
                .map(|e| (e, group.ids.contains_key(&e.id))),
        );
        // Durable already (the segment sync); sled's index is rebuilt from the segments if
        // a crash loses it, so it is flushed in the background, not here.
        self.shared.db.apply_batch(batch).map_err(|e| {
            self.rollback(segment, base);
            storage(e)
        })
    }

    /// Best effort to take a failed group's bytes back out of the segment. If even that
    /// fails, the group's outcome is unknown (see [`AppendError::Storage`]).
    fn rollback(&mut self, segment: u32, offset: u64) {
        if let Err(e) = self.segment.rollback(segment, offset) {
            tracing::error!(error = %e, "could not take a failed append back out of the segment");
        }
    }

    /// Makes sled's index durable, so the next start has nothing to index again.
    fn sync(&mut self) -> Result<(), LogError> {
        self.shared.db.flush().map_err(storage)?;
        self.data_file
            .sync_data()
            .map_err(|e| LogError::Storage(format!("fdatasync of sled's data file: {e}")))?;
        Ok(())
    }
}

fn poisoned() -> AppendError {
    AppendError::Storage(LogError::Storage("an earlier write failed".into()))
}
