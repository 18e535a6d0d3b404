//! The embedded event log: event chunks in segment files, indexes in sled, group commit.
//!
//! One writer thread owns every write. It takes all appends waiting at that moment (a
//! group), checks versions and ids for each, and commits the whole group at once:
//!
//! 1. the group's chunks are written to the current segment and `fdatasync`ed: one sync
//!    for every append in the group, which is what makes the group durable;
//! 2. its stream runs, then its chunk entries, are inserted into sled's index, in memory;
//!    then the group is readable, published to the bus and acknowledged (in that order: a
//!    subscriber from the head that an appender starts after its acknowledgement never sees
//!    its event);
//! 3. its client ids are inserted into sled after the acknowledgement; until they are
//!    there, every id lookup answers them from memory (`pending_ids`).
//!
//! Steps 2 and 3 run on the index thread (`indexer`), beside the writer's sync of the next
//! group; a group with nothing behind it, once every group before it is acknowledged, has
//! step 2 done by the writer itself. Nothing
//! waits for sled's disk: sled flushes its index in the background (every 500 ms). At
//! start-up the ids from the index's ids-indexed record to its last chunk entry are indexed
//! again, chunks in the segments past the last chunk entry are verified and indexed, so an
//! index lost in a crash is rebuilt, and bytes of a group cut short are truncated. Readers
//! never see past the durable head.
//!
//! The writer gives each append the later of the wall clock and the previous timestamp, so
//! timestamps never decrease along the log and `by_time` finds a time by binary search.
//! `streams` lists streams and reads one backward from the stream runs.

mod by_time;
pub(super) mod erase;
mod id_filter;
mod indexer;
mod streams;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use super::CommitSink;
use super::codec::ChunkLocation;
use super::codec::{self, Chunk, ChunkEntry, Run, TypeCache};
use super::segment::{ScanEnd, SegmentReader, SegmentWriter};
use super::{
    AppendError, Appended, EventLog, LogError, ReadFilter, ReadPage, StreamAppend, StreamList,
    StreamListQuery,
};
use crate::event::Event;

/// Most appends combined into one durable group.
const MAX_GROUP_OPS: usize = 1024;
/// Most events combined into one durable group (a single larger append still goes alone).
const MAX_GROUP_EVENTS: usize = 32 * 1024;
/// Most positions one read examines.
const MAX_SCAN: u64 = 64 * 1024;
/// Most ids of acknowledged groups waiting in memory for the index thread to put them into
/// sled; the writer waits at this bound.
const MAX_PENDING_IDS: usize = 256 * 1024;
/// Events recovery indexes per sled batch when it rebuilds the index from the segments.
const RECOVERY_BATCH_EVENTS: usize = 100_000;

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
    /// Size past which a segment file is closed and the next one started.
    pub segment_bytes: u64,
    /// The wall clock appends are stamped from (`Utc::now`); tests step it back to check
    /// that timestamps still never decrease.
    pub clock: fn() -> DateTime<Utc>,
    /// Most bytes of rewritten chunks one round of an erasure holds, in memory and in its
    /// intent file (32 MiB); small ones exercise multi-round erasures in tests.
    pub erase_round_bytes: usize,
}

impl SledLogConfig {
    /// Defaults for a log stored under `path`: 64 MiB cache, 1 MiB per event, 10,000 events
    /// per append.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_bytes: 64 * 1024 * 1024,
            max_event_bytes: crate::event::DEFAULT_MAX_EVENT_BYTES,
            max_batch_events: 10_000,
            segment_bytes: super::segment::SEGMENT_BYTES,
            clock: Utc::now,
            erase_round_bytes: 32 * 1024 * 1024,
        }
    }
}

struct Shared {
    db: sled::Db,
    segments: SegmentReader,
    /// One past the last durable position.
    durable: AtomicU64,
    /// Set when a failed write could not be taken back; every later append is refused.
    poisoned: AtomicBool,
    /// What is wrong with the stored events or the last write, for `/health`.
    health: HealthState,
    /// Set when the log closes, so the background check stops.
    closing: AtomicBool,
    /// Told of every commit (the bus, in the host).
    sink: Arc<dyn CommitSink>,
    config: SledLogConfig,
    /// Rules out most new ids before the id index is asked.
    ids: id_filter::IdFilter,
    /// Ids of groups handed to the index thread and not yet in sled, with their positions.
    pending_ids: std::sync::Mutex<HashMap<String, u64>>,
    /// One past the last position whose ids are all in sled (what
    /// [`codec::IDS_INDEXED_KEY`] says once sled flushes).
    ids_through: AtomicU64,
}

impl Shared {
    /// The position the id index holds for a client-supplied `id`.
    fn indexed_id(&self, id: &str) -> Result<Option<u64>, LogError> {
        if !self.ids.may_hold(id) {
            return Ok(None);
        }
        if let Some(p) = self.pending_ids.lock().expect("pending ids lock").get(id) {
            return Ok(Some(*p));
        }
        position_value(&self.db, codec::id_key(id), || {
            format!("id index entry of {id:?}")
        })
    }
}

/// What `/health` reports about the log.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LogHealth {
    /// False once a failed write could not be taken back: appends are refused until a
    /// restart.
    pub read_only: bool,
    /// Why the last append failed on storage (for example no space or no file descriptors
    /// left), while no append has succeeded since; later appends are tried as usual.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_write_error: Option<String>,
    /// Appends failed on storage since the start.
    pub write_errors: u64,
    /// Damaged chunks found by reads or by the background check, one line each.
    pub damaged: Vec<String>,
    /// Events whose chunks the background check has verified (CRC) since the start.
    pub verified_through: u64,
}

/// The log's own view of its health, shared by the writer, readers and the checker.
#[derive(Default)]
struct HealthState {
    /// Set while the last append failed on storage (cleared by the next one that succeeds).
    failing: AtomicBool,
    last_write_error: std::sync::Mutex<Option<String>>,
    write_errors: AtomicU64,
    /// Damaged chunks by first position.
    damaged: std::sync::Mutex<std::collections::BTreeMap<u64, String>>,
    verified_through: AtomicU64,
}

impl HealthState {
    fn damaged(&self, first_position: u64, what: String) {
        let mut d = self.damaged.lock().expect("health lock");
        if let std::collections::btree_map::Entry::Vacant(slot) = d.entry(first_position) {
            tracing::error!(first_position, damage = %what, "damaged chunk in the event log");
            slot.insert(what);
        }
    }
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
    checker: Option<JoinHandle<()>>,
    id_scan: Option<JoinHandle<()>>,
}

impl SledLog {
    async fn send(
        &self,
        groups: Vec<StreamAppend>,
        index_ids: bool,
    ) -> Result<Vec<Appended>, AppendError> {
        super::validate(
            &groups,
            self.shared.config.max_batch_events,
            self.shared.config.max_event_bytes,
        )?;
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
    pub fn open(config: SledLogConfig, sink: Arc<dyn CommitSink>) -> Result<Self, LogError> {
        std::fs::create_dir_all(&config.path).map_err(|e| {
            LogError::Storage(format!("cannot create {}: {e}", config.path.display()))
        })?;
        let index_dir = config.path.join("index");
        let db = super::open_sled(
            &sled::Config::new()
                .path(&index_dir)
                .cache_capacity(config.cache_bytes),
        )
        .map_err(storage)?;
        let data_file = File::open(index_dir.join("db")).map_err(|e| {
            LogError::Storage(format!("cannot open sled's data file to sync it: {e}"))
        })?;
        let events_dir = config.path.join("events");
        // Before the scan: a chunk an erasure was rewriting in place is whole again.
        erase::finish_pending(&config.path, &db, &SegmentReader::new(events_dir.clone()))?;
        let (head, end, torn) = recover(&db, &events_dir, &data_file)?;
        let segment_writer = SegmentWriter::open(&events_dir, end, config.segment_bytes, torn)?;
        let deleted = deleted_streams(&db)?;
        sink.opened(head);
        tracing::info!(path = %config.path.display(), head, "event log opened");
        let shared = Arc::new(Shared {
            db,
            segments: SegmentReader::new(events_dir),
            durable: AtomicU64::new(head),
            poisoned: AtomicBool::new(false),
            health: HealthState::default(),
            closing: AtomicBool::new(false),
            sink,
            config,
            ids: id_filter::IdFilter::new(),
            pending_ids: Default::default(),
            ids_through: AtomicU64::new(head),
        });
        let (tx, rx) = mpsc::channel(MAX_GROUP_OPS * 4);
        let last_timestamp = by_time::last_timestamp(&shared, head);
        let writer = Writer {
            shared: shared.clone(),
            segment: segment_writer,
            data_file,
            versions: HashMap::new(),
            deleted,
            next_position: head,
            last_timestamp,
            indexer: indexer::Indexer::start(shared.clone(), head)?,
            handed: VecDeque::new(),
        };
        let handle = std::thread::Builder::new()
            .name("evhost-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::Storage(format!("cannot start the log writer: {e}")))?;
        let checked = shared.clone();
        let checker = std::thread::Builder::new()
            .name("evhost-log-check".into())
            .spawn(move || verify_chunks(&checked, head))
            .map_err(|e| LogError::Storage(format!("cannot start the log check: {e}")))?;
        // Last, so a failed open leaves no scan holding the database. Without the scan the
        // filter rules nothing out: every lookup asks sled, as it would without a filter.
        let scanned = shared.clone();
        let id_scan = std::thread::Builder::new()
            .name("evhost-id-filter".into())
            .spawn(move || id_filter::fill(&scanned.db, &scanned.ids, &scanned.closing))
            .map_err(|e| {
                tracing::warn!(
                    "the id filter's scan did not start, so every id lookup asks the index: {e}"
                )
            })
            .ok();
        Ok(Self {
            shared,
            tx: Some(tx),
            writer: Some(handle),
            checker: Some(checker),
            id_scan,
        })
    }

    /// Whether new ids are ruled out in memory before the id index is asked: false from
    /// open until the background scan has read every id the index holds (lookups ask the
    /// index meanwhile, so only their cost differs).
    pub fn id_filter_ready(&self) -> bool {
        self.shared.ids.is_complete()
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
        read_positions(&self.shared, from, u64::MAX, limit, filter)
    }

    /// Stops the writer after it has finished the appends already queued.
    pub fn close(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        if let Some(h) = self.checker.take() {
            let _ = h.join();
        }
        if let Some(h) = self.id_scan.take() {
            let _ = h.join();
        }
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The position of the tombstone that deleted `stream`, if it is deleted.
fn deletion_of(db: &sled::Db, stream: &str) -> Result<Option<u64>, LogError> {
    position_value(db, codec::deleted_key(stream), || {
        format!("deletion mark of stream {stream:?}")
    })
}

/// The position stored under `key`, if any; `what` names the entry when it is malformed.
fn position_value(
    db: &sled::Db,
    key: Vec<u8>,
    what: impl FnOnce() -> String,
) -> Result<Option<u64>, LogError> {
    db.get(key)
        .map_err(storage)?
        .map(|v| {
            v.as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| LogError::Corrupt(what()))
        })
        .transpose()
}

/// Every deleted stream with its tombstone's position.
fn deleted_streams(db: &sled::Db) -> Result<HashMap<String, u64>, LogError> {
    let mut out = HashMap::new();
    for item in db.scan_prefix([codec::DELETED_PREFIX]) {
        let (k, v) = item.map_err(storage)?;
        let stream = String::from_utf8(k[1..].to_vec())
            .map_err(|_| LogError::Corrupt(format!("deletion mark {k:?}")))?;
        let position = v
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| LogError::Corrupt(format!("deletion mark of stream {stream:?}")))?;
        out.insert(stream, position);
    }
    Ok(out)
}

fn storage(e: sled::Error) -> LogError {
    LogError::Storage(e.to_string())
}

/// Indexes chunks that reached the segments but not sled's index before the host stopped,
/// and makes the index durable. Returns the head and where the segments' valid data ends.
/// What recovery found: the head, where writing continues, and the segment holding a torn
/// tail, if any.
type Recovered = (u64, (u32, u64), Option<u32>);

fn recover(db: &sled::Db, dir: &Path, data_file: &File) -> Result<Recovered, LogError> {
    let last = last_chunk(db)?;
    let mut head = last
        .map(|(first, c)| first + u64::from(c.count))
        .unwrap_or(0);
    let from = last
        .map(|(_, c)| (c.location.segment, c.location.end()))
        .unwrap_or((0, 0));
    reindex_ids(db, dir, head)?;
    let mut recovered = 0u64;
    let mut batch = sled::Batch::default();
    let mut types = TypeCache::default();
    let mut events: Vec<(Event, bool)> = Vec::new();
    // Chunks of the group being read; indexed only once its last chunk is found, so a group
    // cut short by a crash (never acknowledged) is dropped whole.
    let mut group: Vec<(u64, ChunkEntry, Vec<(Event, bool)>)> = Vec::new();
    let mut committed_end = from;
    let scanned = super::segment::scan(dir, from, head, |location, h, bytes| {
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
        if h.group_end {
            for (first, entry, evs) in group.drain(..) {
                batch.insert(&codec::event_key(first), &entry.encode()[..]);
                recovered += u64::from(entry.count);
                events.extend(evs);
            }
            head = chunk.end();
            committed_end = (location.segment, location.end());
            // Whole groups are indexed in bounded batches, so rebuilding a lost index never
            // holds a large log in memory; a crash in between resumes after the last one.
            if events.len() >= RECOVERY_BATCH_EVENTS {
                index_events(
                    &mut batch,
                    events.iter().map(|(e, k)| (e, *k)),
                    Entries::All,
                );
                db.apply_batch(std::mem::take(&mut batch))
                    .map_err(storage)?;
                events.clear();
            }
        }
        Ok(())
    })?;
    let torn = match scanned {
        ScanEnd::Clean => None,
        ScanEnd::Torn { segment, offset } => {
            tracing::warn!(
                segment,
                offset,
                "the last segment ends in a write cut short by a crash (nothing valid after it, never acknowledged); it is truncated"
            );
            Some(segment)
        }
        ScanEnd::Damaged(d) => return Err(LogError::Damaged(Box::new(d))),
    };
    let torn = torn.or_else(|| group.first().map(|(_, entry, _)| entry.location.segment));
    if !group.is_empty() {
        tracing::warn!(
            chunks = group.len(),
            "dropping an incomplete group that was never acknowledged"
        );
    }
    let end = committed_end;
    if !events.is_empty() {
        index_events(
            &mut batch,
            events.iter().map(|(e, k)| (e, *k)),
            Entries::All,
        );
        db.apply_batch(batch).map_err(storage)?;
    }
    if torn.is_some() {
        // Nothing past the head survives in the index: entries of what was cut off (a
        // damaged last chunk is indistinguishable from a torn write) would otherwise point
        // at positions the next appends reuse.
        super::repair::drop_entries_from(db, head)?;
    }
    if recovered > 0 {
        tracing::info!(
            events = recovered,
            "indexed events written before the last stop"
        );
    }
    // Every id through the head is in the index now; an index sled recovers from here on
    // has this record, so a missing one always means an index of an older host.
    db.insert(codec::IDS_INDEXED_KEY, &head.to_be_bytes()[..])
        .map_err(storage)?;
    db.flush().map_err(storage)?;
    data_file
        .sync_data()
        .map_err(|e| LogError::Storage(format!("fdatasync of sled's data file: {e}")))?;
    Ok((head, end, torn))
}

/// Indexes again the ids of the chunks sled holds past [`codec::IDS_INDEXED_KEY`], up to
/// `indexed_end` (one past its last chunk entry's events): the ids of acknowledged groups
/// that a crash took out of sled before it flushed them.
fn reindex_ids(db: &sled::Db, dir: &Path, indexed_end: u64) -> Result<(), LogError> {
    let from = match db.get(codec::IDS_INDEXED_KEY).map_err(storage)? {
        Some(v) => v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| {
            LogError::Corrupt("the index's ids-indexed record is not 8 bytes".into())
        })?,
        None => return Ok(()),
    };
    if from >= indexed_end {
        return Ok(());
    }
    let segments = SegmentReader::new(dir.to_path_buf());
    let mut types = TypeCache::default();
    let mut batch = sled::Batch::default();
    let mut position = from;
    let mut count = 0u64;
    while position < indexed_end {
        let (first, entry) = chunk_at(db, position)?
            .ok_or_else(|| LogError::Corrupt(format!("no chunk holds position {position}")))?;
        let end = first + u64::from(entry.count);
        if end <= position {
            return Err(LogError::Corrupt(format!(
                "the index's chunk entries leave a gap at position {position}"
            )));
        }
        // A damaged chunk keeps the log open, as it does past this step: the background
        // check reports it in `/health`, and `evhost log repair` moves it aside.
        let chunk = match segments.read(entry.location).and_then(|bytes| {
            Chunk::parse(first, &bytes)?;
            Ok(bytes)
        }) {
            Ok(bytes) => bytes,
            // Only damage: a segment that cannot be opened now (descriptors, permissions)
            // fails the open, to be tried again, rather than lose the chunk's ids for good.
            Err(e @ LogError::Corrupt(_)) => {
                tracing::error!(error = %e, damage = %damaged_chunk(first, entry), "a chunk whose ids are indexed again at start-up is damaged; its ids are left out");
                position = end;
                continue;
            }
            Err(e) => return Err(e),
        };
        let chunk = Chunk::parse_checked(first, &chunk)?;
        if chunk.end() != end {
            return Err(LogError::Corrupt(format!(
                "the index's chunk entry at position {first} counts {} events, its chunk {}",
                entry.count,
                chunk.end() - first
            )));
        }
        let mut events = Vec::new();
        for p in position..end {
            events.push(chunk.event_keyed(p, &mut types)?);
        }
        count += events.len() as u64;
        index_events(
            &mut batch,
            events.iter().map(|(e, k)| (e, *k)),
            Entries::Ids,
        );
        position = end;
    }
    db.apply_batch(batch).map_err(storage)?;
    tracing::info!(
        from,
        events = count,
        "indexed again the ids of events acknowledged before the last stop"
    );
    Ok(())
}

/// Where index entries go: a sled batch when recovery rebuilds the index, the index
/// thread's [`OrderedWrites`] for each new group.
trait IndexSink {
    fn insert(&mut self, key: impl AsRef<[u8]>, value: &[u8]);
    fn remove(&mut self, key: impl AsRef<[u8]>);
}

impl IndexSink for sled::Batch {
    fn insert(&mut self, key: impl AsRef<[u8]>, value: &[u8]) {
        sled::Batch::insert(self, key.as_ref(), value);
    }
    fn remove(&mut self, key: impl AsRef<[u8]>) {
        sled::Batch::remove(self, key.as_ref());
    }
}

/// A group's index entries, applied one at a time in the order they were added.
///
/// Not a sled `Batch`: sled writes out and `sync_file_range`s its IO buffers around every
/// batch, which put two to four synchronous disk waits on each acknowledgement. Single
/// inserts only fill the buffer, which sled's flusher writes in the background. Atomicity
/// is not needed: sled recovers a prefix of its writes; each group's runs go in before its
/// chunk entries and its ids after them, followed by the ids-indexed record; recovery
/// indexes again the ids past that record and every group after the last chunk entry.
#[derive(Default)]
struct OrderedWrites(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl IndexSink for OrderedWrites {
    fn insert(&mut self, key: impl AsRef<[u8]>, value: &[u8]) {
        self.0.push((key.as_ref().to_vec(), Some(value.to_vec())));
    }
    fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), None));
    }
}

impl OrderedWrites {
    fn apply(self, db: &sled::Db) -> sled::Result<()> {
        for (key, value) in self.0 {
            match value {
                Some(v) => db.insert(key, v)?,
                None => db.remove(key)?,
            };
        }
        Ok(())
    }
}

/// Which of an event's index entries [`index_events`] adds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entries {
    /// Stream runs and deletion marks: what reads and version checks need.
    Runs,
    /// Client ids: what the id index needs.
    Ids,
    /// Both (recovery).
    All,
}

/// Adds index entries of `events` (consecutive positions) to `batch`.
fn index_events<'a>(
    batch: &mut impl IndexSink,
    events: impl Iterator<Item = (&'a Event, bool)>,
    entries: Entries,
) {
    let (runs, ids) = (entries != Entries::Ids, entries != Entries::Runs);
    // Consecutive versions at consecutive positions share one run entry.
    let mut open: HashMap<&str, (u64, u64, u32)> = HashMap::new(); // first version, first position, count
    fn put(batch: &mut impl IndexSink, stream: &str, (v, p, n): (u64, u64, u32)) {
        let run = Run {
            first_position: p,
            count: n,
        };
        batch.insert(codec::stream_key(stream, v), &run.encode()[..]);
    }
    for (e, keyed) in events {
        match e.event_type.as_str() {
            // An erased event belongs to no stream and has no id.
            super::ERASED_TYPE => continue,
            _ if !runs => {}
            super::STREAM_DELETED_TYPE => {
                batch.insert(codec::deleted_key(&e.stream), &e.position.to_be_bytes()[..]);
            }
            super::STREAM_RESTORED_TYPE => batch.remove(codec::deleted_key(&e.stream)),
            _ => {}
        }
        if keyed && ids {
            batch.insert(codec::id_key(&e.id), &e.position.to_be_bytes()[..]);
        }
        if !runs {
            continue;
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
        blocking(move || read_positions(&shared, from, u64::MAX, limit, &filter)).await
    }

    async fn read_to(
        &self,
        from: u64,
        end: u64,
        limit: usize,
        filter: &ReadFilter,
    ) -> Result<ReadPage, LogError> {
        let shared = self.shared.clone();
        let filter = filter.clone();
        blocking(move || read_positions(&shared, from, end, limit, &filter)).await
    }

    async fn position_at(&self, at: DateTime<Utc>) -> Result<Option<u64>, LogError> {
        let shared = self.shared.clone();
        blocking(move || by_time::position_at(&shared, at)).await
    }

    async fn read_stream_backward(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Event>, LogError> {
        let shared = self.shared.clone();
        let stream = stream.to_owned();
        blocking(move || streams::read_backward(&shared, &stream, from_version, limit)).await
    }

    async fn list_streams(&self, query: &StreamListQuery) -> Result<StreamList, LogError> {
        let shared = self.shared.clone();
        let query = query.clone();
        blocking(move || streams::list(&shared, &query)).await
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Event>, LogError> {
        let shared = self.shared.clone();
        let stream = stream.to_owned();
        blocking(move || read_stream(&shared, &stream, from_version, limit)).await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, LogError> {
        durable_stream_version(&self.shared, stream)
    }

    async fn find(&self, id: &str) -> Result<Option<u64>, LogError> {
        // The writer indexes a group before it is durable: not found until it is.
        let durable = self.shared.durable.load(Ordering::Acquire);
        Ok(self.shared.indexed_id(id)?.filter(|p| *p < durable))
    }

    async fn deletion(&self, stream: &str) -> Result<Option<u64>, LogError> {
        deletion_of(&self.shared.db, stream)
    }

    async fn erase(&self, stream: &str) -> Result<super::Erased, LogError> {
        let shared = self.shared.clone();
        let stream = stream.to_owned();
        tokio::task::spawn_blocking(move || erase::erase_stream(&shared, &stream))
            .await
            .map_err(|e| LogError::Storage(format!("erase task failed: {e}")))?
    }

    fn head(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    fn health(&self) -> LogHealth {
        let h = &self.shared.health;
        LogHealth {
            read_only: self.shared.poisoned.load(Ordering::Acquire),
            last_write_error: h.last_write_error.lock().expect("health lock").clone(),
            write_errors: h.write_errors.load(Ordering::Relaxed),
            damaged: h
                .damaged
                .lock()
                .expect("health lock")
                .values()
                .cloned()
                .collect(),
            verified_through: h.verified_through.load(Ordering::Relaxed),
        }
    }
}

/// Runs a read of the index and segments on a blocking thread.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| LogError::Storage(format!("read task failed: {e}")))?
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

/// Bytes the background check reads before it pauses, and how long it pauses: at most
/// about 64 MiB/s, so that checking a large log never crowds out appends and reads.
const CHECK_SLICE_BYTES: u64 = 4 * 1024 * 1024;
const CHECK_PAUSE: std::time::Duration = std::time::Duration::from_millis(60);

/// Reads every chunk below `head` once and checks its CRC, recording damage for `/health`
/// (the chunks past the index end were checked at start-up already).
fn verify_chunks(shared: &Shared, head: u64) {
    let mut from = 0u64;
    let mut slice = 0u64;
    let mut file: Option<(u32, File)> = None;
    while from < head && !shared.closing.load(Ordering::Acquire) {
        let next = shared
            .db
            .range(codec::event_key(from)..codec::event_key(head))
            .next();
        let Some(Ok((k, v))) = next else { break };
        let (Ok(first), Ok(entry)) = (codec::position_of_event_key(&k), ChunkEntry::decode(&v))
        else {
            break;
        };
        // Its own file handles, one segment at a time, so the check never holds a
        // descriptor per segment.
        let loc = entry.location;
        if file.as_ref().is_none_or(|(n, _)| *n != loc.segment) {
            file = File::open(shared.segments.path(loc.segment))
                .ok()
                .map(|f| (loc.segment, f));
        }
        if let Some((_, f)) = &file {
            let mut bytes = vec![0u8; loc.len as usize];
            let reading = shared.segments.reading();
            let read = std::os::unix::fs::FileExt::read_exact_at(f, &mut bytes, loc.offset);
            drop(reading);
            match read {
                Ok(()) => {
                    let _ = check_chunk(shared, first, entry, bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    shared.health.damaged(first, damaged_chunk(first, entry));
                }
                Err(_) => {}
            }
        }
        from = first + u64::from(entry.count.max(1));
        shared
            .health
            .verified_through
            .store(from, Ordering::Relaxed);
        slice += u64::from(entry.location.len);
        if slice >= CHECK_SLICE_BYTES {
            slice = 0;
            std::thread::sleep(CHECK_PAUSE);
        }
    }
}

/// The bytes of the chunk `entry` (first position `first`), checked against its CRC; a
/// damaged chunk is recorded for `/health` and named in the error.
fn read_chunk(shared: &Shared, first: u64, entry: ChunkEntry) -> Result<Vec<u8>, LogError> {
    match shared.segments.read(entry.location) {
        Ok(bytes) => check_chunk(shared, first, entry, bytes),
        // The file is shorter than the index says, or the disk failed the read.
        Err(LogError::Corrupt(e)) => {
            let what = damaged_chunk(first, entry);
            shared.health.damaged(first, what.clone());
            tracing::debug!(error = %e, "chunk read failed");
            Err(LogError::Corrupt(what))
        }
        Err(e) => Err(e),
    }
}

/// `bytes` if they are the chunk `entry` says (CRC, first position), else the damage,
/// recorded for `/health`. (Errors opening or reading a file are not damage: they are
/// reported as they are, and nothing is recorded.)
fn check_chunk(
    shared: &Shared,
    first: u64,
    entry: ChunkEntry,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, LogError> {
    match Chunk::parse(first, &bytes) {
        Ok(_) => Ok(bytes),
        Err(e) => {
            let what = damaged_chunk(first, entry);
            shared.health.damaged(first, what.clone());
            tracing::debug!(error = %e, "chunk check failed");
            Err(LogError::Corrupt(what))
        }
    }
}

fn damaged_chunk(first: u64, entry: ChunkEntry) -> String {
    let l = entry.location;
    format!(
        "positions {first}..={} (segment {:08}.seg, bytes {}..{}): the chunk fails its checksum; the events before and after it are readable; stop the host and run `evhost log repair` to move it aside",
        first + u64::from(entry.count).saturating_sub(1),
        l.segment,
        l.offset,
        l.end()
    )
}

/// Reads matching events at positions `from..end` (below the head), examining at most
/// [`MAX_SCAN`] positions.
fn read_positions(
    shared: &Shared,
    from: u64,
    end: u64,
    limit: usize,
    filter: &ReadFilter,
) -> Result<ReadPage, LogError> {
    let head = shared.durable.load(Ordering::Acquire).min(end.max(from));
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
        let entry = ChunkEntry::decode(&v)?;
        let bytes = shared.segments.read(entry.location);
        let chunk = match bytes.as_deref().map(|b| Chunk::parse(first, b)) {
            Ok(Ok(chunk)) => chunk,
            // The events before a damaged chunk are served; the next read starts at it and
            // gets the error.
            _ if !page.events.is_empty() => {
                let _ = read_chunk(shared, first, entry);
                return Ok(page);
            }
            _ => {
                return Err(read_chunk(shared, first, entry).err().unwrap_or_else(|| {
                    LogError::Storage(format!(
                        "reading the chunk at position {first} failed once; retry the read"
                    ))
                }));
            }
        };
        for pos in page.next.max(first)..chunk.end().min(stop) {
            let kept = chunk.event_where(pos, &mut types, |f| {
                f.event_type != super::ERASED_TYPE
                    && filter.admits_fields(f.event_type, f.stream, f.correlation_id, f.source)
            })?;
            page.next = pos + 1;
            if let Some(event) = kept {
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
                let bytes = match read_chunk(shared, first, entry) {
                    Ok(b) => b,
                    Err(_) if !out.is_empty() => return Ok(out),
                    Err(e) => return Err(e),
                };
                cached = Some((first, first + u64::from(entry.count), bytes));
            }
            let (first, _, bytes) = cached.as_ref().expect("filled above");
            out.push(Chunk::parse_checked(*first, bytes)?.event(pos, &mut types)?);
        }
    }
    Ok(out)
}

/// Decodes single events by position, keeping the last chunk read (events looked up one by
/// one are often neighbours).
#[derive(Default)]
struct EventReader {
    /// First position of the chunk, one past its last, its checked bytes.
    cached: Option<(u64, u64, Vec<u8>)>,
    types: TypeCache,
}

impl EventReader {
    /// The durable event at `position`.
    fn event(&mut self, shared: &Shared, position: u64) -> Result<Event, LogError> {
        if !matches!(&self.cached, Some((first, end, _)) if *first <= position && position < *end) {
            let (first, entry) = chunk_at(&shared.db, position)?
                .ok_or_else(|| LogError::Corrupt(format!("no chunk holds position {position}")))?;
            let bytes = read_chunk(shared, first, entry)?;
            self.cached = Some((first, first + u64::from(entry.count), bytes));
        }
        let (first, _, bytes) = self.cached.as_ref().expect("filled above");
        Chunk::parse_checked(*first, bytes)?.event(position, &mut self.types)
    }
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    segment: SegmentWriter,
    data_file: File,
    /// Next version of streams seen so far (everything applied is durable or poisoned).
    versions: HashMap<String, u64>,
    /// Deleted streams with their tombstones' positions (everything applied is durable).
    deleted: HashMap<String, u64>,
    next_position: u64,
    /// The timestamp of the last durable event; no later append gets an earlier one.
    last_timestamp: DateTime<Utc>,
    /// Indexes, publishes and acknowledges each durable group (see `indexer`).
    indexer: indexer::Indexer,
    /// Groups handed to the indexer, oldest first, kept until they are indexed: the
    /// writer's checks of later groups look here before they look in sled.
    handed: VecDeque<Handed>,
}

/// A durable group whose chunk entries the index thread may not have put into sled yet.
struct Handed {
    first: u64,
    end: u64,
    events: Arc<[Arc<Event>]>,
}

/// What one append became before the group is committed.
struct Staged {
    reply: Reply,
    /// Its results, or why it was refused before anything was written.
    results: Result<Vec<Appended>, AppendError>,
}

impl Staged {
    /// Answers the appender: with its results once the group is acknowledged, or with its
    /// own refusal.
    fn answer(self) {
        let _ = self.reply.send(self.results);
    }

    /// Answers with `error` unless the append was refused already (its own refusal stands).
    fn fail(self, error: AppendError) {
        let _ = self.reply.send(self.results.and(Err(error)));
    }
}

/// State of one group while its appends are checked and staged.
struct Group {
    first_position: u64,
    events: Vec<Event>,
    /// Ids new in this group, with their positions.
    ids: HashMap<String, u64>,
    /// Next version of streams touched by this group.
    versions: HashMap<String, u64>,
    /// The latest timestamp given so far (the log's last before the first append).
    timestamp: DateTime<Utc>,
    /// Streams this group deleted (`Some(tombstone)`) or restored (`None`).
    deleted: HashMap<String, Option<u64>>,
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
            let alone = rx.is_empty();
            self.commit_group(ops, alone);
        }
        self.indexer.stop();
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e, "could not flush the index at shutdown; it will be rebuilt at the next start");
        }
        if let Err(e) = self.segment.cut_to_data() {
            tracing::warn!(error = %e, "could not cut the last segment to its data at shutdown; the next start keeps the space");
        }
        tracing::debug!("event log writer stopped");
    }

    /// Commits one group; `alone` when no append waits behind it.
    fn commit_group(&mut self, ops: Vec<AppendOp>, alone: bool) {
        self.forget_indexed();
        let mut group = Group {
            first_position: self.next_position,
            events: Vec::new(),
            ids: HashMap::new(),
            versions: HashMap::new(),
            timestamp: self.last_timestamp,
            deleted: HashMap::new(),
            staged: Vec::new(),
        };
        for mut op in ops {
            // Answered in log order, after every group before: a retry told its original
            // position, or a conflict told the current version, can then read what it was
            // told of.
            let results = self.stage(&mut group, &mut op.groups, op.index_ids);
            group.staged.push(Staged {
                reply: op.reply,
                results,
            });
        }
        if group.events.is_empty() {
            // Only duplicates (or rejects): nothing to write. Answered at once unless a
            // group before is still on its way to its acknowledgement.
            if self.indexer.idle_at(group.first_position)
                && !self.shared.poisoned.load(Ordering::Acquire)
            {
                group.staged.into_iter().for_each(Staged::answer);
            } else {
                let job = indexer::IndexJob {
                    end: group.first_position,
                    events: Arc::from(Vec::new()),
                    keyed: Vec::new(),
                    chunks: Vec::new(),
                    staged: group.staged,
                    acknowledged: false,
                };
                if let Err(job) = self.indexer.send(job) {
                    self.index_thread_gone(job);
                }
            }
            return;
        }
        if self.shared.poisoned.load(Ordering::Acquire) {
            // An index write failed while this group was staged.
            group.staged.into_iter().for_each(|s| s.fail(poisoned()));
            return;
        }
        let start = self.segment.position();
        let keyed: Vec<bool> = group
            .events
            .iter()
            .map(|e| group.ids.contains_key(e.id.as_str()))
            .collect();
        let chunks = match self.write(&group, &keyed) {
            Ok(chunks) => chunks,
            Err(e) => {
                let health = &self.shared.health;
                health.write_errors.fetch_add(1, Ordering::Relaxed);
                health.failing.store(true, Ordering::Release);
                *health.last_write_error.lock().expect("health lock") = Some(e.to_string());
                // Nothing of the group may stay behind; when its bytes are back out, the log
                // is as before the group and the next append is tried as usual (a full disk
                // or a descriptor shortage passes). Only when they cannot be taken out does
                // the log stop writing, since its end is then unknown.
                match self.segment.discard_since(start) {
                    Ok(()) => {
                        tracing::error!(error = %e, "an append failed on storage and was taken back; later appends are tried again")
                    }
                    Err(undo) => {
                        tracing::error!(error = %e, undo = %undo, "an append failed on storage and could not be taken back; refusing further appends until a restart");
                        self.shared.poisoned.store(true, Ordering::Release);
                    }
                }
                for s in group.staged {
                    s.fail(AppendError::Storage(e.clone()));
                }
                return;
            }
        };
        // Not when poisoned meanwhile: the index thread's error stays in `/health`.
        if !self.shared.poisoned.load(Ordering::Acquire)
            && self.shared.health.failing.swap(false, Ordering::AcqRel)
        {
            *self
                .shared
                .health
                .last_write_error
                .lock()
                .expect("health lock") = None;
            tracing::info!("appends succeed again after a storage failure");
        }
        let end = group.first_position + group.events.len() as u64;
        self.next_position = end;
        self.versions.extend(group.versions);
        for (stream, tombstone) in group.deleted {
            match tombstone {
                Some(p) => self.deleted.insert(stream, p),
                None => self.deleted.remove(&stream),
            };
        }
        self.last_timestamp = group.timestamp;
        let events: Arc<[Arc<Event>]> = group.events.into_iter().map(Arc::new).collect();
        if !group.ids.is_empty() {
            // Until the index thread has put them into sled, the group's ids are answered
            // from memory; it takes them out once they are there.
            self.wait_for_pending_room();
            self.shared
                .pending_ids
                .lock()
                .expect("pending ids lock")
                .extend(group.ids);
        }
        let inline = alone && self.indexer.idle_at(group.first_position);
        if !inline {
            self.handed.push_back(Handed {
                first: group.first_position,
                end,
                events: events.clone(),
            });
        }
        let job = indexer::IndexJob {
            end,
            events,
            keyed,
            chunks,
            staged: group.staged,
            acknowledged: false,
        };
        let handed = if inline {
            // Nothing to overlap with: a hand-over would only add its wake-up before the
            // acknowledgement. The ids still go to the index thread.
            self.indexer.acknowledge_here(&self.shared, job)
        } else {
            self.indexer.send(job)
        };
        if let Err(job) = handed {
            self.index_thread_gone(job);
        }
    }

    /// The index thread is gone (it panicked): nothing more can be acknowledged, and the
    /// ids it had not put into sled stay answered from memory until a restart.
    fn index_thread_gone(&self, job: indexer::IndexJob) {
        tracing::error!("the log's index thread stopped; refusing further appends until a restart");
        self.shared.poisoned.store(true, Ordering::Release);
        job.staged.into_iter().for_each(|s| s.fail(poisoned()));
    }

    /// Waits while the ids not yet in sled are at their bound, so they never hold more than
    /// [`MAX_PENDING_IDS`] in memory.
    fn wait_for_pending_room(&self) {
        while self
            .shared
            .pending_ids
            .lock()
            .expect("pending ids lock")
            .len()
            >= MAX_PENDING_IDS
            && !self.shared.poisoned.load(Ordering::Acquire)
        {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    /// Forgets the handed groups the index thread has finished.
    fn forget_indexed(&mut self) {
        let durable = self.shared.durable.load(Ordering::Acquire);
        while self.handed.front().is_some_and(|h| h.end <= durable) {
            self.handed.pop_front();
        }
    }

    /// Waits until the index thread has indexed every group handed to it (or the log is
    /// poisoned), so sled alone answers for everything written.
    fn wait_indexed(&mut self) {
        while self.shared.durable.load(Ordering::Acquire) < self.next_position
            && !self.shared.poisoned.load(Ordering::Acquire)
        {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        self.forget_indexed();
    }

    /// A handed group not yet indexed holding `position`.
    fn handed_event(&self, position: u64) -> Option<&Arc<Event>> {
        let durable = self.shared.durable.load(Ordering::Acquire);
        self.handed
            .iter()
            .find(|h| h.end > durable && h.first <= position && position < h.end)
            .map(|h| &h.events[(position - h.first) as usize])
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
            // The cache is what covers streams of groups not yet indexed: sled must hold
            // them all before it is emptied.
            self.wait_indexed();
            if self.shared.poisoned.load(Ordering::Acquire) {
                // Groups whose runs never reached sled are known only to the cache.
                return Err(LogError::Storage(poisoned_message().into()));
            }
            self.versions.clear();
        }
        self.versions.insert(stream.to_owned(), v);
        Ok(v)
    }

    /// The tombstone of `stream` as this group sees it.
    fn deletion(&self, group: &Group, stream: &str) -> Option<u64> {
        match group.deleted.get(stream) {
            Some(t) => *t,
            None => self.deleted.get(stream).copied(),
        }
    }

    /// Where an event with `id` already is, in the log or earlier in this group.
    fn existing(&self, group: &Group, id: &str) -> Result<Option<u64>, LogError> {
        if let Some(p) = group.ids.get(id) {
            return Ok(Some(*p));
        }
        // Ids of groups not yet in sled are in `pending_ids`, which this asks first.
        self.shared.indexed_id(id)
    }

    /// The stream of the event at `position`: staged in this append (from `base`), earlier
    /// in the group, or in the log (`cached` keeps the last chunk read).
    fn stream_at(
        &self,
        group: &Group,
        staged: &[Event],
        base: u64,
        position: u64,
        cached: &mut Option<(u64, u64, Vec<u8>)>,
    ) -> Result<String, LogError> {
        let stale = || {
            LogError::Corrupt(format!(
                "the id index points at position {position}, past the log's end"
            ))
        };
        if position >= base {
            return staged
                .get((position - base) as usize)
                .map(|e| e.stream.to_string())
                .ok_or_else(stale);
        }
        if position >= group.first_position {
            return group
                .events
                .get((position - group.first_position) as usize)
                .map(|e| e.stream.to_string())
                .ok_or_else(stale);
        }
        if let Some(e) = self.handed_event(position) {
            return Ok(e.stream.to_string());
        }
        if !matches!(cached, Some((first, end, _)) if *first <= position && position < *end) {
            let (first, entry) = chunk_at(&self.shared.db, position)?
                .ok_or_else(|| LogError::Corrupt(format!("no chunk holds position {position}")))?;
            let bytes = read_chunk(&self.shared, first, entry)?;
            *cached = Some((first, first + u64::from(entry.count), bytes));
        }
        let (first, _, bytes) = cached.as_ref().expect("filled above");
        Ok((Chunk::parse_checked(*first, bytes)?
            .event(position, &mut TypeCache::default())?
            .stream)
            .into())
    }

    /// Checks one append against the log and the group so far and stages its new events;
    /// on error the group is left exactly as it was.
    fn stage(
        &mut self,
        group: &mut Group,
        appends: &mut [StreamAppend],
        index_ids: bool,
    ) -> Result<Vec<Appended>, AppendError> {
        let base = group.first_position + group.events.len() as u64;
        let mut staged: Vec<Event> = Vec::new();
        // Client ids new in this append, with the position each got.
        let mut ids: HashMap<String, u64> = HashMap::new();
        let mut versions: HashMap<String, u64> = HashMap::new();
        let mut deleted: HashMap<String, Option<u64>> = HashMap::new();
        let mut results = Vec::with_capacity(appends.len());
        let mut cached: Option<(u64, u64, Vec<u8>)> = None;
        // Never before the previous append's: timestamps do not decrease along the log even
        // when the wall clock steps back.
        let now = (self.shared.config.clock)().max(group.timestamp);
        for append in appends.iter_mut() {
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
                if let (Some(p), Some(id)) = (known, e.id.as_deref()) {
                    let on = self.stream_at(group, &staged, base, p, &mut cached)?;
                    if on != append.stream {
                        return Err(AppendError::IdInUse {
                            id: id.to_owned(),
                            stream: on,
                            position: p,
                        });
                    }
                }
                match (known, e.id.as_deref()) {
                    (Some(p), _) => positions.push(Some(p)),
                    (None, Some(id)) if !pending.insert(id) => positions.push(None),
                    (None, _) => {
                        fresh.push(i);
                        positions.push(None);
                    }
                }
            }
            let current = match versions.get(append.stream.as_str()) {
                Some(v) => *v,
                None => self.version(group, &append.stream)?,
            };
            if !fresh.is_empty() && !append.expected.admits(current) {
                return Err(AppendError::Conflict {
                    stream: append.stream.clone().into(),
                    expected: append.expected,
                    current,
                });
            }
            let mut tombstone = match deleted.get(append.stream.as_str()) {
                Some(t) => *t,
                None => self.deletion(group, &append.stream),
            };
            let was = tombstone;
            for (n, &i) in fresh.iter().enumerate() {
                let position = base + (staged.len() + n) as u64;
                tombstone = super::deletion_after(
                    &append.stream,
                    append.events[i].event_type.as_str(),
                    tombstone,
                    position,
                )?;
            }
            if tombstone != was {
                deleted.insert(append.stream.clone().into(), tombstone);
            }
            let mut version = current;
            for &i in &fresh {
                // Moved, not copied: the append is the writer's, and only a stored event's
                // fields are read again (a fresh event's position is already known).
                let e = &mut append.events[i];
                let position = base + staged.len() as u64;
                let id = match e.id.take() {
                    Some(id) if index_ids => {
                        ids.insert(id.as_str().to_owned(), position);
                        id
                    }
                    Some(id) => id,
                    None => uuid::Uuid::now_v7().to_string().into(),
                };
                staged.push(Event {
                    id,
                    event_type: e.event_type.clone(),
                    stream: append.stream.clone(),
                    position,
                    version,
                    timestamp: now,
                    source: std::mem::take(&mut e.source),
                    payload: e.payload.clone(),
                    metadata: std::mem::take(&mut e.metadata),
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
            versions.insert(append.stream.clone().into(), version);
            let mut written = vec![false; append.events.len()];
            for &i in &fresh {
                written[i] = true;
            }
            results.push(Appended {
                stream: append.stream.clone(),
                positions,
                written,
                next_version: version,
            });
        }
        for id in ids.keys() {
            self.shared.ids.add(id);
        }
        group.ids.extend(ids);
        group.versions.extend(versions);
        group.deleted.extend(deleted);
        if !staged.is_empty() {
            group.timestamp = now;
        }
        group.events.extend(staged);
        Ok(results)
    }

    /// Makes the group durable (one write, one `fdatasync`) and returns its chunk entries
    /// for the index; `keyed` says which events' ids are indexed. On error nothing was
    /// synced.
    fn write(
        &mut self,
        group: &Group,
        keyed: &[bool],
    ) -> Result<Vec<([u8; 9], [u8; 20])>, LogError> {
        // Every chunk of the group, back to back: one write, one fdatasync.
        let mut bytes: Vec<u8> = Vec::new();
        let mut chunks: Vec<(u64, usize, u32, u32)> = Vec::new(); // first, start, len, count
        // The open chunk: its events encoded back to back, and where each ends.
        let (mut body, mut ends): (Vec<u8>, Vec<u32>) = (Vec::new(), Vec::new());
        let mut chunk_first = group.first_position;
        let mut close = |body: &mut Vec<u8>,
                         ends: &mut Vec<u32>,
                         first: u64,
                         bytes: &mut Vec<u8>,
                         last: bool|
         -> Result<(), LogError> {
            let start = bytes.len();
            codec::write_chunk(bytes, first, ends, body, last);
            let len = bytes.len() - start;
            let len = u32::try_from(len)
                .map_err(|_| LogError::Storage(format!("a chunk of {len} bytes is too large")))?;
            chunks.push((first, start, len, ends.len() as u32));
            body.clear();
            ends.clear();
            Ok(())
        };
        for (e, &keyed) in group.events.iter().zip(keyed) {
            let before = body.len();
            body = codec::encode_event_onto(e, keyed, body);
            if !ends.is_empty()
                && (ends.len() == codec::CHUNK_MAX_EVENTS || body.len() > codec::CHUNK_MAX_BYTES)
            {
                // The event opens the next chunk (the buffer is kept for it).
                let enc = body[before..].to_vec();
                body.truncate(before);
                close(&mut body, &mut ends, chunk_first, &mut bytes, false)?;
                chunk_first = e.position;
                body.extend_from_slice(&enc);
            }
            ends.push(body.len() as u32);
        }
        close(&mut body, &mut ends, chunk_first, &mut bytes, true)?;
        let (segment, base) = self.segment.append(&bytes)?;
        let synced = std::time::Instant::now();
        self.segment.sync()?;
        metrics::histogram!(crate::telemetry::FSYNC_SECONDS).record(synced.elapsed());
        metrics::histogram!(crate::telemetry::GROUP_EVENTS).record(group.events.len() as f64);
        metrics::counter!(crate::telemetry::APPENDED_EVENTS).increment(group.events.len() as u64);
        metrics::counter!(crate::telemetry::APPENDED_BYTES).increment(bytes.len() as u64);
        // Durable now: the index is the index thread's to write into sled, and sled's to
        // flush in the background; a crash that loses it has it rebuilt from the segments.
        Ok(chunks
            .into_iter()
            .map(|(first, start, len, count)| {
                let entry = ChunkEntry {
                    location: ChunkLocation {
                        segment,
                        offset: base + start as u64,
                        len,
                    },
                    count,
                };
                (codec::event_key(first), entry.encode())
            })
            .collect())
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

fn poisoned_message() -> &'static str {
    "an earlier write failed and could not be taken back, so the log's end is unknown; restart the host (it checks the segments at start-up)"
}

fn poisoned() -> AppendError {
    AppendError::Storage(LogError::Storage(poisoned_message().into()))
}
