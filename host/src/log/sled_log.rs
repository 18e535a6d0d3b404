//! The embedded event log on sled, with group commit.
//!
//! One writer thread owns every write. It takes all appends waiting at that moment (a
//! group), checks versions and ids for each, applies the whole group as one sled `Batch`,
//! then makes it durable once: `Db::flush` (which on Linux ends in `sync_file_range`, not a
//! durability guarantee alone) followed by `fdatasync` of sled's data file and of any blob
//! files sled wrote. Only then are the appenders acknowledged and the events published to
//! the bus. Readers never see past the durable head.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

use super::codec::{self, Chunk, Run, TypeCache};
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
    reply: Reply,
}

/// The embedded event log: sled on local disk, durable appends with group commit.
pub struct SledLog {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<AppendOp>>,
    writer: Option<JoinHandle<()>>,
}

impl SledLog {
    /// Opens (or creates) the log and starts its writer; committed events go to `hub`.
    pub fn open(config: SledLogConfig, hub: Arc<Hub>) -> Result<Self, LogError> {
        std::fs::create_dir_all(&config.path).map_err(|e| {
            LogError::Storage(format!("cannot create {}: {e}", config.path.display()))
        })?;
        let db = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_bytes)
            // Pages above segment_size / 4 become blob files; large segments keep chunked
            // event pages inline in the log file.
            .segment_size(8 * 1024 * 1024)
            .open()
            .map_err(storage)?;
        let data_file = File::open(config.path.join("db")).map_err(|e| {
            LogError::Storage(format!("cannot open sled's data file to sync it: {e}"))
        })?;
        let head = recover_head(&db)?;
        hub.set_head(head);
        tracing::info!(path = %config.path.display(), head, "event log opened");
        let shared = Arc::new(Shared {
            db,
            durable: AtomicU64::new(head),
            poisoned: AtomicBool::new(false),
            hub,
            config,
        });
        let (tx, rx) = mpsc::channel(MAX_GROUP_OPS * 4);
        let writer = Writer {
            shared: shared.clone(),
            data_file,
            blobs: HashSet::new(),
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

fn storage(e: sled::Error) -> LogError {
    LogError::Storage(e.to_string())
}

/// One past the last stored position, from the last chunk.
fn recover_head(db: &sled::Db) -> Result<u64, LogError> {
    let last = db
        .range(codec::event_key(0)..=codec::event_key(u64::MAX))
        .next_back()
        .transpose()
        .map_err(storage)?;
    match last {
        None => Ok(0),
        Some((k, v)) => {
            let first = codec::position_of_event_key(&k)?;
            Ok(Chunk::parse(first, &v)?.end())
        }
    }
}

#[async_trait]
impl EventLog for SledLog {
    async fn append(&self, groups: Vec<StreamAppend>) -> Result<Vec<Appended>, AppendError> {
        validate(&groups, &self.shared.config)?;
        let tx = self.tx.as_ref().ok_or(LogError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.send(AppendOp { groups, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
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
            if e.payload.len() > config.max_event_bytes {
                return Err(AppendError::Invalid(format!(
                    "payload of a {} event is {} bytes, more than the limit of {} bytes",
                    e.event_type,
                    e.payload.len(),
                    config.max_event_bytes
                )));
            }
        }
    }
    Ok(())
}

/// The chunk holding `position`, if stored.
fn chunk_at(db: &sled::Db, position: u64) -> Result<Option<(u64, sled::IVec)>, LogError> {
    let found = db
        .range(codec::event_key(0)..=codec::event_key(position))
        .next_back()
        .transpose()
        .map_err(storage)?;
    match found {
        Some((k, v)) => Ok(Some((codec::position_of_event_key(&k)?, v))),
        None => Ok(None),
    }
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
        let chunk = Chunk::parse(codec::position_of_event_key(&k)?, &v)?;
        for pos in page.next.max(codec::position_of_event_key(&k)?)..chunk.end().min(stop) {
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
    let mut cached: Option<(u64, sled::IVec)> = None;
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
            let hit = matches!(&cached, Some((first, v)) if Chunk::parse(*first, v)?.end() > pos && *first <= pos);
            if !hit {
                cached = chunk_at(&shared.db, pos)?;
            }
            let (first, bytes) = cached
                .as_ref()
                .ok_or_else(|| LogError::Corrupt(format!("no chunk holds position {pos}")))?;
            out.push(Chunk::parse(*first, bytes)?.event(pos, &mut types)?);
        }
    }
    Ok(out)
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    data_file: File,
    /// Blob files already synced.
    blobs: HashSet<OsString>,
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
            match self.stage(&mut group, &op.groups) {
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
        let found = self.shared.db.get(codec::id_key(id)).map_err(storage)?;
        found
            .map(|v| {
                v.as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| LogError::Corrupt(format!("id index entry of {id:?}")))
            })
            .transpose()
    }

    /// Checks one append against the log and the group so far and stages its new events;
    /// on error the group is left exactly as it was.
    fn stage(
        &mut self,
        group: &mut Group,
        appends: &[StreamAppend],
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
                    Some(id) => {
                        ids.insert(id.clone(), position);
                        id.clone()
                    }
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
        let mut encoded: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0;
        let mut chunk_first = group.first_position;
        for e in &group.events {
            let enc = codec::encode_event(e);
            if !encoded.is_empty()
                && (encoded.len() == codec::CHUNK_MAX_EVENTS
                    || bytes + enc.len() > codec::CHUNK_MAX_BYTES)
            {
                batch.insert(
                    &codec::event_key(chunk_first),
                    codec::encode_chunk(&encoded),
                );
                chunk_first = e.position;
                encoded.clear();
                bytes = 0;
            }
            bytes += enc.len();
            encoded.push(enc);
        }
        batch.insert(
            &codec::event_key(chunk_first),
            codec::encode_chunk(&encoded),
        );

        // Stream runs: consecutive versions at consecutive positions share one index entry.
        let mut open: HashMap<&str, (u64, u64, u32)> = HashMap::new(); // first_version, first_position, count
        let flush_run = |batch: &mut sled::Batch, stream: &str, (v, p, n): (u64, u64, u32)| {
            batch.insert(
                codec::stream_key(stream, v),
                &Run {
                    first_position: p,
                    count: n,
                }
                .encode()[..],
            );
        };
        for e in &group.events {
            match open.get_mut(e.stream.as_str()) {
                Some((v, p, n))
                    if *v + u64::from(*n) == e.version && *p + u64::from(*n) == e.position =>
                {
                    *n += 1;
                }
                Some(run) => {
                    let done = *run;
                    *run = (e.version, e.position, 1);
                    flush_run(&mut batch, &e.stream, done);
                }
                None => {
                    open.insert(&e.stream, (e.version, e.position, 1));
                }
            }
        }
        for (stream, run) in open {
            flush_run(&mut batch, stream, run);
        }
        for (id, position) in &group.ids {
            batch.insert(codec::id_key(id), &position.to_be_bytes()[..]);
        }
        self.shared.db.apply_batch(batch).map_err(storage)?;
        self.sync()
    }

    /// Makes everything applied so far durable against a process kill and an OS crash.
    fn sync(&mut self) -> Result<(), LogError> {
        self.shared.db.flush().map_err(storage)?;
        self.data_file
            .sync_data()
            .map_err(|e| LogError::Storage(format!("fdatasync of sled's data file: {e}")))?;
        self.sync_blobs(&self.shared.config.path.join("blobs"))
    }

    /// Syncs blob files sled wrote since the last call (sled does not sync them itself).
    fn sync_blobs(&mut self, dir: &Path) -> Result<(), LogError> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(());
        };
        let mut present = HashSet::new();
        let mut synced_any = false;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !self.blobs.contains(&name) {
                File::open(entry.path())
                    .and_then(|f| f.sync_all())
                    .map_err(|e| LogError::Storage(format!("fsync of blob {name:?}: {e}")))?;
                synced_any = true;
            }
            present.insert(name);
        }
        if synced_any {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| LogError::Storage(format!("fsync of the blobs directory: {e}")))?;
        }
        self.blobs = present;
        Ok(())
    }
}

fn poisoned() -> AppendError {
    AppendError::Storage(LogError::Storage("an earlier write failed".into()))
}
