//! Erasing a deleted stream's events from storage for good (a hard delete), the
//! operation privacy requests need, without moving any other event.
//!
//! Each chunk holding an event of the stream is rewritten in place with the same length:
//! the event's slot gets an erased event (nothing of the original but its time) padded with
//! zeros, the CRC is recomputed, and the index's chunk locations stay valid. In-place
//! writes are made crash-safe by an intent written first (a redo record):
//!
//! 1. `DATA/erase.intent` is written whole, synced, and renamed into place: it holds every
//!    rewritten chunk's new bytes and the index changes;
//! 2. the index drops the stream's runs (but the tombstone's) and the erased events' ids;
//! 3. the chunks are overwritten in place, readers held off meanwhile, and synced;
//! 4. the intent is removed.
//!
//! A crash before 1 completes leaves everything as it was (the stream stays soft-deleted;
//! erase again). After it, the next start applies the intent again before the log opens:
//! every step is idempotent. A large stream is erased in rounds of bounded size.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::{Shared, chunk_at, deletion_of, read_chunk, storage};
use crate::log::codec::ChunkLocation;
use crate::log::codec::{self, Chunk, Run, TypeCache};
use crate::log::segment::SegmentReader;
use crate::log::{ERASED_TYPE, Erased, LogError};

/// Stops the process on the spot, as `kill -9` would, when the environment variable
/// `EVHOST_FAULT` names `point`: how the tests put a crash at each step of an erasure.
fn fault(point: &str) {
    if std::env::var_os("EVHOST_FAULT").is_some_and(|v| v == point) {
        std::process::abort();
    }
}

/// One erasure at a time per process.
static ERASING: Mutex<()> = Mutex::new(());

#[derive(Serialize, Deserialize)]
struct Intent {
    stream: String,
    tombstone: u64,
    tombstone_version: u64,
    /// Client ids of the events this round erases, dropped from the id index.
    ids: Vec<String>,
    /// The last round: the stream's run keys as they were when the erasure began, removed
    /// (exactly these: runs appended after a restore meanwhile stay), and the tombstone's
    /// run put back. Earlier rounds leave the runs, so an erasure cut short between rounds
    /// leaves a soft-deleted stream that a new hard delete finishes.
    runs: Option<Vec<Vec<u8>>>,
    /// Segment, offset and new bytes of each rewritten chunk.
    patches: Vec<(u32, u64, Vec<u8>)>,
}

fn intent_path(data: &Path) -> PathBuf {
    data.join("erase.intent")
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
    let msg = format!("{what} {}", path.display());
    move |e| LogError::Storage(format!("{msg}: {e}"))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync the directory", dir))
}

/// Writes `intent` whole and durably, then makes it the pending erasure.
fn write_intent(data: &Path, intent: &Intent) -> Result<(), LogError> {
    let mut bytes = postcard::to_stdvec(intent).expect("encoding to a Vec cannot fail");
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let tmp = data.join("erase.intent.tmp");
    let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(&bytes).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    let path = intent_path(data);
    fs::rename(&tmp, &path).map_err(io("cannot rename into place", &path))?;
    sync_dir(data)
}

fn read_intent(path: &Path) -> Result<Intent, LogError> {
    let bytes = fs::read(path).map_err(io("cannot read", path))?;
    let damaged = || {
        LogError::Storage(format!(
            "{} is damaged (its checksum fails), so an interrupted erasure cannot be finished; restore the data directory from a backup, or delete the file and erase the stream again",
            path.display()
        ))
    };
    let (body, crc) = bytes
        .split_at_checked(bytes.len().saturating_sub(4))
        .ok_or_else(damaged)?;
    if crc.len() != 4 || crc32fast::hash(body).to_le_bytes() != crc {
        return Err(damaged());
    }
    postcard::from_bytes(body).map_err(|_| damaged())
}

/// Applies `intent`: the index changes, then the chunks, then drops the intent file.
fn apply(
    data: &Path,
    db: &sled::Db,
    segments: &SegmentReader,
    intent: &Intent,
) -> Result<(), LogError> {
    let mut batch = sled::Batch::default();
    for id in &intent.ids {
        batch.remove(codec::id_key(id));
    }
    if let Some(runs) = &intent.runs {
        for k in runs {
            batch.remove(k.as_slice());
        }
        let run = Run {
            first_position: intent.tombstone,
            count: 1,
        };
        // After the removals: the tombstone's own run key may be among them.
        batch.insert(
            codec::stream_key(&intent.stream, intent.tombstone_version),
            &run.encode()[..],
        );
    }
    db.apply_batch(batch).map_err(storage)?;
    db.flush().map_err(storage)?;
    fault("erase-after-index");
    let patches: Vec<(ChunkLocation, Vec<u8>)> = intent
        .patches
        .iter()
        .map(|(segment, offset, bytes)| {
            (
                ChunkLocation {
                    segment: *segment,
                    offset: *offset,
                    len: bytes.len() as u32,
                },
                bytes.clone(),
            )
        })
        .collect();
    if std::env::var_os("EVHOST_FAULT").is_some_and(|v| v == "erase-mid-overwrite") {
        // The first chunk rewritten, then the crash.
        segments.overwrite(&patches[..patches.len().min(1)])?;
        fault("erase-mid-overwrite");
    }
    segments.overwrite(&patches)?;
    fault("erase-before-intent-removed");
    let path = intent_path(data);
    fs::remove_file(&path).map_err(io("cannot remove", &path))?;
    sync_dir(data)
}

/// Finishes an erasure a crash interrupted; run at start-up, before anything reads.
pub(in crate::log) fn finish_pending(
    data: &Path,
    db: &sled::Db,
    segments: &SegmentReader,
) -> Result<(), LogError> {
    let tmp = data.join("erase.intent.tmp");
    if tmp.exists() {
        // Never renamed into place: the erasure had not begun.
        fs::remove_file(&tmp).map_err(io("cannot remove", &tmp))?;
    }
    let path = intent_path(data);
    if !path.exists() {
        return Ok(());
    }
    let intent = read_intent(&path)?;
    tracing::warn!(
        stream = intent.stream,
        chunks = intent.patches.len(),
        "finishing the erasure of a deleted stream that a stop interrupted"
    );
    apply(data, db, segments, &intent)?;
    if intent.runs.is_none() {
        tracing::warn!(
            stream = intent.stream,
            "the interrupted erasure had more rounds to go: the stream stays deleted, and some of its events are still stored; run the hard delete again to finish it"
        );
    }
    Ok(())
}

/// Erases every event of the deleted `stream` but its tombstone (see the module docs).
pub(super) fn erase_stream(shared: &Shared, stream: &str) -> Result<Erased, LogError> {
    let _one = ERASING.lock().unwrap_or_else(|e| e.into_inner());
    // An intent a failed apply left behind is finished first, never overwritten.
    finish_pending(&shared.config.path, &shared.db, &shared.segments)?;
    let durable = shared.durable.load(Ordering::Acquire);
    // Ids reach sled after their group is acknowledged: an id the index thread put there
    // after this erasure took it out would name an erased event.
    while shared.ids_through.load(Ordering::Acquire) < durable
        && !shared.poisoned.load(Ordering::Acquire)
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    if shared.poisoned.load(Ordering::Acquire) {
        // Ids that never reached sled stay answered from memory: erasing their events
        // would leave them naming erased positions.
        return Err(LogError::Storage(
            "the log refuses writes after a write it could not take back; restart the host, then erase"
                .into(),
        ));
    }
    // A tombstone the writer has indexed but not yet made durable is not a deletion yet
    // (its runs and chunk entries may still be on their way into the index).
    let tombstone = deletion_of(&shared.db, stream)?
        .filter(|t| *t < durable)
        .ok_or_else(|| LogError::NotDeleted(stream.to_owned()))?;
    // Every position of the stream, by its runs (they only grow below the tombstone: a
    // deleted stream takes no appends).
    let mut positions = Vec::new();
    let mut run_keys = Vec::new();
    let mut tombstone_version = None;
    for item in shared.db.scan_prefix(codec::stream_prefix(stream)) {
        let (k, v) = item.map_err(storage)?;
        run_keys.push(k.to_vec());
        let first_version = codec::version_of_stream_key(&k)?;
        let run = Run::decode(&v)?;
        for i in 0..u64::from(run.count) {
            let p = run.first_position + i;
            if p == tombstone {
                tombstone_version = Some(first_version + i);
            } else {
                positions.push(p);
            }
        }
    }
    let tombstone_version = tombstone_version.ok_or_else(|| {
        LogError::Corrupt(format!(
            "the tombstone of stream {stream:?} at position {tombstone} is not among its runs"
        ))
    })?;
    positions.sort_unstable();
    let data = shared.config.path.clone();
    let mut report = Erased {
        tombstone,
        ..Erased::default()
    };
    let mut segments_touched = std::collections::BTreeSet::new();
    let mut rest = positions.as_slice();
    loop {
        let mut intent = Intent {
            stream: stream.to_owned(),
            tombstone,
            tombstone_version,
            ids: Vec::new(),
            runs: None,
            patches: Vec::new(),
        };
        let mut bytes = 0usize;
        let mut erased = 0u64;
        while let Some(&p) = rest.first() {
            if bytes >= shared.config.erase_round_bytes.max(1) {
                break;
            }
            let (first, entry) = chunk_at(&shared.db, p)?
                .ok_or_else(|| LogError::Corrupt(format!("no chunk holds position {p}")))?;
            let end = first + u64::from(entry.count);
            let n = rest.iter().take_while(|&&q| q < end).count();
            let (here, after) = rest.split_at(n);
            rest = after;
            let chunk = read_chunk(shared, first, entry)?;
            let parsed = Chunk::parse_checked(first, &chunk)?;
            let mut targets = Vec::new();
            let mut types = TypeCache::default();
            for &q in here {
                let (e, keyed) = parsed.event_keyed(q, &mut types)?;
                if e.event_type.as_str() == ERASED_TYPE {
                    continue;
                }
                if e.stream != stream {
                    return Err(LogError::Corrupt(format!(
                        "the index puts position {q} in stream {stream:?}, but its event is in {:?}",
                        e.stream
                    )));
                }
                if keyed {
                    intent.ids.push(e.id.clone().into());
                }
                targets.push(q);
            }
            if targets.is_empty() {
                continue;
            }
            let patched = codec::erase_in_chunk(first, &chunk, &targets)?;
            bytes += patched.len();
            erased += targets.len() as u64;
            segments_touched.insert(entry.location.segment);
            intent
                .patches
                .push((entry.location.segment, entry.location.offset, patched));
        }
        if rest.is_empty() {
            intent.runs = Some(std::mem::take(&mut run_keys));
        }
        write_intent(&data, &intent)?;
        fault("erase-after-intent");
        apply(&data, &shared.db, &shared.segments, &intent)?;
        report.events += erased;
        if rest.is_empty() {
            break;
        }
    }
    report.segments = segments_touched.len();
    shared.sink.erased(stream);
    tracing::info!(
        stream,
        events = report.events,
        segments = report.segments,
        tombstone,
        "erased a deleted stream's events from storage"
    );
    Ok(report)
}
