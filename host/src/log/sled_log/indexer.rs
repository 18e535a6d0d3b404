//! The index thread: puts each durable group into sled's index, publishes and
//! acknowledges it, then puts its client ids into sled, while the writer already writes and
//! syncs the next group.
//!
//! sled's inserts were most of the writer's time on small groups (a tool's starts and
//! outcomes: two ids and a run or two per invocation, about 9 us per id), and they all
//! waited for each other before an acknowledgement. Now the acknowledgement waits only for
//! the runs and chunk entries (a few inserts per group); the ids follow, one group after
//! another in log order, each group's then the index's ids-indexed record past them. Until
//! a group's ids are in sled they are answered from `Shared::pending_ids` (at most
//! `MAX_PENDING_IDS`; the writer waits at that bound), so an acknowledged id is always
//! found. Readers and subscribers see what they did before: a group's positions become
//! readable (`durable`), are published and are acknowledged only once its chunk entries
//! are in sled, in log order. The writer hands over at most [`QUEUED`] groups beyond the
//! one this thread works on (then it waits), and keeps the groups whose chunk entries are
//! not in sled yet, so its checks of stored ids' streams see them. An append that wrote
//! nothing (all retries, or refused) waits here behind the groups before it, so what it
//! is told of is readable when it is told. A group with nothing queued behind it, while no group waits here for its
//! acknowledgement, is acknowledged by the writer itself, so a lone appender pays no
//! hand-over between threads; its ids still come here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use super::{Entries, OrderedWrites, Shared, Staged, codec, index_events, poisoned, storage};
use crate::event::Event;
use crate::log::{AppendError, LogError};

/// Groups the writer may hand over while one is being indexed.
const QUEUED: usize = 2;

/// One durable group, for the index thread.
pub(super) struct IndexJob {
    /// One past the group's last position.
    pub(super) end: u64,
    /// The group's events, in position order.
    pub(super) events: Arc<[Arc<Event>]>,
    /// Whether each event's id goes into the id index.
    pub(super) keyed: Vec<bool>,
    /// The group's chunk entries: key and encoded entry.
    pub(super) chunks: Vec<([u8; 9], [u8; 20])>,
    /// The appends to acknowledge once the group's chunk entries are in sled and it is
    /// published.
    pub(super) staged: Vec<Staged>,
    /// Set when the group is already readable, published and acknowledged (the writer did
    /// that itself): only its ids are left.
    pub(super) acknowledged: bool,
}

/// The writer's handle on the index thread.
pub(super) struct Indexer {
    tx: Option<SyncSender<IndexJob>>,
    thread: Option<JoinHandle<()>>,
    /// One past the last position acknowledged (or refused), by this thread or the writer.
    acked: Arc<AtomicU64>,
}

impl Indexer {
    /// Starts the index thread over `shared`'s database and sink.
    pub(super) fn start(shared: Arc<Shared>, head: u64) -> Result<Self, LogError> {
        let (tx, rx) = sync_channel::<IndexJob>(QUEUED);
        let acked = Arc::new(AtomicU64::new(head));
        let done = acked.clone();
        let thread = std::thread::Builder::new()
            .name("evhost-log-index".into())
            .spawn(move || {
                let _poison = PoisonOnPanic(&shared);
                let mut recorded = head;
                while let Ok(mut job) = rx.recv() {
                    if !job.acknowledged {
                        acknowledge(&shared, &mut job);
                        // Never back: an empty job ends where the writer may have
                        // acknowledged a later group itself.
                        done.fetch_max(job.end, Ordering::AcqRel);
                    }
                    index_ids(&shared, &job, &mut recorded);
                }
                // Closing: the record covers everything, so the next start indexes nothing
                // again.
                let through = shared.ids_through.load(Ordering::Acquire);
                if through > recorded && !shared.poisoned.load(Ordering::Acquire) {
                    let _ = record(&shared, through);
                }
            })
            .map_err(|e| LogError::Storage(format!("cannot start the log's index thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            acked,
        })
    }

    /// Whether every group before `position` is acknowledged, so none waits in this
    /// thread's hands for its chunk entries (its ids may).
    pub(super) fn idle_at(&self, position: u64) -> bool {
        self.acked.load(Ordering::Acquire) == position
    }

    /// Makes `job` readable, publishes and acknowledges it on the caller's thread (only
    /// when [`Self::idle_at`] its first position, so groups are still acknowledged in log
    /// order), then hands its ids over.
    pub(super) fn acknowledge_here(
        &self,
        shared: &Shared,
        mut job: IndexJob,
    ) -> Result<(), IndexJob> {
        acknowledge(shared, &mut job);
        self.acked.store(job.end, Ordering::Release);
        job.acknowledged = true;
        self.send(job)
    }

    /// Hands `job` over, waiting while [`QUEUED`] groups are already waiting. Gives the
    /// job back if the thread is gone.
    pub(super) fn send(&self, job: IndexJob) -> Result<(), IndexJob> {
        match &self.tx {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }

    /// Waits until every group handed over is acknowledged and its ids are in sled.
    pub(super) fn stop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!(
                "the log's index thread had panicked; the next start indexes again what it had not"
            );
        }
    }
}

/// Stops appends if the index thread unwinds: nothing it held can be acknowledged, and
/// the writer's and an erasure's waits for it give up once the log is poisoned.
struct PoisonOnPanic<'a>(&'a Shared);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                "the log's index thread panicked; refusing further appends until a restart"
            );
            self.0.poisoned.store(true, Ordering::Release);
        }
    }
}

/// Puts the group's stream runs, deletion marks and chunk entries into sled, then makes
/// it readable, publishes and acknowledges it; refuses it once the log is poisoned.
fn acknowledge(shared: &Shared, job: &mut IndexJob) {
    let staged = std::mem::take(&mut job.staged);
    if shared.poisoned.load(Ordering::Acquire) {
        // Durable in the segment, but an earlier group's index failed: the next start
        // indexes both again from the segments.
        for s in staged {
            s.fail(poisoned());
        }
        return;
    }
    match apply_runs(shared, job) {
        Ok(()) => {
            shared.durable.fetch_max(job.end, Ordering::AcqRel);
            if !job.events.is_empty() {
                shared.sink.committed(&job.events);
            }
            staged.into_iter().for_each(Staged::answer);
        }
        Err(e) => {
            failed(shared, &e);
            for s in staged {
                s.fail(AppendError::Storage(e.clone()));
            }
        }
    }
}

/// Stops appends after an index write failed: what it wrote may be partly in sled's memory,
/// so its positions must not be reused until a restart indexes the group again.
fn failed(shared: &Shared, e: &LogError) {
    let health = &shared.health;
    health.write_errors.fetch_add(1, Ordering::Relaxed);
    health.failing.store(true, Ordering::Release);
    *health.last_write_error.lock().expect("health lock") = Some(e.to_string());
    tracing::error!(error = %e, "a durable group could not be indexed; refusing further appends until a restart, which indexes it again from the segments");
    shared.poisoned.store(true, Ordering::Release);
}

/// Runs and marks first, the chunk entries last (so an index recovered up to any write
/// never holds a chunk entry whose runs are missing; a group's chunk entries go in at once,
/// one insert or one batch, so recovery finds all or none).
fn apply_runs(shared: &Shared, job: &IndexJob) -> Result<(), LogError> {
    let mut index = OrderedWrites::default();
    index_events(
        &mut index,
        job.events.iter().zip(&job.keyed).map(|(e, k)| (&**e, *k)),
        Entries::Runs,
    );
    let db = &shared.db;
    index.apply(db).map_err(storage)?;
    if let [(key, value)] = &job.chunks[..] {
        db.insert(key, &value[..]).map_err(storage)?;
    } else if !job.chunks.is_empty() {
        let mut batch = sled::Batch::default();
        for (key, value) in &job.chunks {
            batch.insert(&key[..], &value[..]);
        }
        db.apply_batch(batch).map_err(storage)?;
    }
    Ok(())
}

/// Groups without client ids move [`codec::IDS_INDEXED_KEY`] at least this often, so a
/// start after a crash indexes at most this many positions again for nothing.
const RECORD_EVERY: u64 = 64 * 1024;

/// Writes [`codec::IDS_INDEXED_KEY`]: every id before `through` is in sled.
fn record(shared: &Shared, through: u64) -> sled::Result<()> {
    shared
        .db
        .insert(codec::IDS_INDEXED_KEY, &through.to_be_bytes()[..])
        .map(|_| ())
}

/// Puts an acknowledged group's ids into sled, then [`codec::IDS_INDEXED_KEY`] past them
/// (`recorded` is where it stands), and only then takes them out of the ids answered from
/// memory.
fn index_ids(shared: &Shared, job: &IndexJob, recorded: &mut u64) {
    if shared.poisoned.load(Ordering::Acquire) {
        shared.ids_through.fetch_max(job.end, Ordering::AcqRel);
        return;
    }
    if !job.keyed.iter().any(|k| *k) {
        if job.end >= *recorded + RECORD_EVERY {
            if let Err(e) = record(shared, job.end) {
                failed(shared, &storage(e));
                return;
            }
            *recorded = job.end;
        }
        shared.ids_through.fetch_max(job.end, Ordering::AcqRel);
        return;
    }
    let mut index = OrderedWrites::default();
    index_events(
        &mut index,
        job.events.iter().zip(&job.keyed).map(|(e, k)| (&**e, *k)),
        Entries::Ids,
    );
    let written = index
        .apply(&shared.db)
        .and_then(|()| record(shared, job.end));
    if let Err(e) = written {
        // Acknowledged already and durable in the segment: the ids stay answered from
        // memory, and the next start indexes them again from the segments.
        failed(shared, &storage(e));
        return;
    }
    *recorded = job.end;
    {
        let mut pending = shared.pending_ids.lock().expect("pending ids lock");
        for (e, _) in job.events.iter().zip(&job.keyed).filter(|(_, k)| **k) {
            pending.remove(e.id.as_str());
        }
    }
    shared.ids_through.fetch_max(job.end, Ordering::AcqRel);
}
