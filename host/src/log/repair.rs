//! `evhost log repair`: the operator's way past damaged segments.
//!
//! The log refuses to open over [`Damage`] (bad bytes with valid events after them), since
//! writing on would lose acknowledged events or reuse their positions. Repair keeps every
//! valid event: it moves each damaged segment file aside into `DATA/damaged/` (nothing is
//! deleted), writes the segment again without the damaged bytes, puts one
//! `evhost.log.damaged` event at each position that cannot be read (so positions stay
//! gap-free and every later event keeps its position), and drops the index entries from
//! the first damaged position on, which the next start rebuilds from the segments.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::Utc;

use super::LogError;
use super::codec::{self, CHUNK_MAX_EVENTS, ChunkEntry, Run};
use super::segment::{self, Damage, ScanEnd};
use crate::event::{Event, EventType, Metadata, Payload};

/// The event type put at each position whose bytes were damaged.
pub const DAMAGED_TYPE: &str = "evhost.log.damaged";

/// Most placeholder events one damaged range may need; more means the bytes after the
/// damage are not what they seem, and repair stops rather than guess.
const MAX_PLACEHOLDERS: u64 = 10_000_000;

/// What a repair did.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// Each damaged range that was replaced, as the log described it.
    pub repaired: Vec<String>,
    /// Files moved into `DATA/damaged/`.
    pub moved: Vec<PathBuf>,
    /// Index entries from this position on were dropped, to be rebuilt at the next start.
    pub reindex_from: Option<u64>,
    /// One past the last readable position after the repair.
    pub head: u64,
}

/// Repairs the log under `data` (the host must be stopped: sled's lock refuses a second
/// opener). Safe to run on an undamaged log, where it changes nothing, and safe to run
/// again after it was interrupted: the index is dropped (durably) before any segment is
/// rewritten, and every segment is copied aside (synced) before it is.
pub fn repair(data: &Path) -> Result<RepairReport, LogError> {
    let events = data.join("events");
    let db = super::open_sled(&sled::Config::new().path(data.join("index"))).map_err(|e| {
        LogError::Storage(format!(
            "cannot open the index under {} (is the host still running? stop it first): {e}",
            data.display()
        ))
    })?;
    // An erasure a crash interrupted is finished first: its chunks are whole again.
    super::sled_log::erase::finish_pending(
        data,
        &db,
        &super::segment::SegmentReader::new(events.clone()),
    )?;
    let mut aside = Aside::new(data.join("damaged"));
    // What the index knew was acknowledged, before anything changes.
    let indexed_end = last_indexed_end(&db)?;
    let mut report = RepairReport::default();
    let (committed, at) = loop {
        // The end of the last complete group, as recovery keeps it.
        let mut committed = 0u64;
        let mut at = (0u32, 0u64);
        let scanned = segment::scan(&events, (0, 0), 0, |loc, h, bytes| {
            let count = codec::Chunk::parse(h.first_position, bytes)?.len() as u64;
            if h.group_end {
                committed = h.first_position + count;
                at = (loc.segment, loc.end());
            }
            Ok(())
        })?;
        let ScanEnd::Damaged(d) = scanned else {
            break (committed, at);
        };
        if report.repaired.len() >= 1000 {
            return Err(LogError::Corrupt(
                "more than 1,000 damaged ranges; the segments look overwritten rather than damaged, restore them from a backup".into(),
            ));
        }
        drop_index_from(&db, d.first_position, &mut report)?;
        report.repaired.push(d.to_string());
        cut_out(&events, &mut aside, &d)?;
    };
    if indexed_end > committed {
        // Positions the index had acknowledged whose bytes are gone: they get placeholders,
        // so that no later event takes an acknowledged position.
        drop_index_from(&db, committed, &mut report)?;
        report.repaired.push(format!(
            "positions {committed}..={} were acknowledged but their bytes are gone (the segments end at segment {:08}.seg, byte {}); they get evhost.log.damaged events",
            indexed_end - 1,
            at.0,
            at.1
        ));
        let old = aside.keep(&events, at.0)?;
        let note = serde_json::json!({"segment": format!("{:08}.seg", at.0), "offset": at.1, "lost": "the segments end here"});
        let mut new = old[..at.1 as usize].to_vec();
        new.extend(placeholders(committed, indexed_end, &note)?);
        for (n, len) in segment::list(&events)? {
            if n > at.0 {
                if len > 0 {
                    aside.keep(&events, n)?;
                }
                remove(&segment::path(&events, n))?;
            }
        }
        write_atomically(&segment::path(&events, at.0), &new)?;
        report.head = indexed_end;
    } else {
        report.head = committed;
    }
    db.flush().map_err(|e| LogError::Storage(e.to_string()))?;
    report.moved = aside.kept;
    Ok(report)
}

/// Copies of segment files as they were before repair changed them, in `DATA/damaged/`,
/// each taken once and synced before the original changes.
struct Aside {
    dir: PathBuf,
    stamp: String,
    kept: Vec<PathBuf>,
    done: std::collections::HashSet<u32>,
}

impl Aside {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            stamp: Utc::now().format("%Y%m%dT%H%M%S%.6f").to_string(),
            kept: Vec::new(),
            done: Default::default(),
        }
    }

    /// The segment's bytes, copied aside first if this repair has not copied it yet.
    fn keep(&mut self, events: &Path, seg: u32) -> Result<Vec<u8>, LogError> {
        let path = segment::path(events, seg);
        let bytes = fs::read(&path).map_err(|e| io_err("cannot read", &path, e))?;
        if self.done.insert(seg) {
            fs::create_dir_all(&self.dir).map_err(|e| io_err("cannot create", &self.dir, e))?;
            let to = self.dir.join(format!("{seg:08}.seg.{}", self.stamp));
            let res = (|| {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&to)?;
                std::io::Write::write_all(&mut &f, &bytes)?;
                f.sync_all()?;
                fs::File::open(&self.dir)?.sync_all()
            })();
            res.map_err(|e| io_err("cannot copy the segment aside to", &to, e))?;
            self.kept.push(to);
        }
        Ok(bytes)
    }
}

fn io_err(what: &str, p: &Path, e: std::io::Error) -> LogError {
    LogError::Storage(format!("{what} {}: {e}", p.display()))
}

/// Rewrites the damaged segment (and any segment wholly inside the damage) with
/// placeholders instead of the damaged bytes, after copying each aside.
fn cut_out(events: &Path, aside: &mut Aside, d: &Damage) -> Result<(), LogError> {
    let old = aside.keep(events, d.segment)?;
    let mut new = old[..d.offset as usize].to_vec();
    let resume_position = d.resume_position.unwrap_or(d.first_position);
    let note = serde_json::json!({
        "segment": format!("{:08}.seg", d.segment),
        "offset": d.offset,
        "saved_in": "damaged/",
    });
    new.extend(placeholders(d.first_position, resume_position, &note)?);
    let later: Vec<u32> = segment::list(events)?
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| *n > d.segment)
        .collect();
    match d.resume {
        Some((seg, off)) if seg == d.segment => new.extend_from_slice(&old[off as usize..]),
        Some((seg, off)) => {
            // Segment numbers may skip after this; positions stay gap-free.
            for n in later.iter().copied().filter(|n| *n < seg) {
                aside.keep(events, n)?;
                remove(&segment::path(events, n))?;
            }
            let tail = aside.keep(events, seg)?;
            write_atomically(&segment::path(events, seg), &tail[off as usize..])?;
        }
        None => {
            for n in later {
                aside.keep(events, n)?;
                remove(&segment::path(events, n))?;
            }
        }
    }
    write_atomically(&segment::path(events, d.segment), &new)
}

/// Chunks of one `evhost.log.damaged` event per position in `from..to`, closing a group.
fn placeholders(from: u64, to: u64, note: &serde_json::Value) -> Result<Vec<u8>, LogError> {
    if to.saturating_sub(from) > MAX_PLACEHOLDERS {
        return Err(LogError::Corrupt(format!(
            "positions {from}..{to} would need placeholders, which suggests the bytes after the damage are not a continuation of the log; restore the segments from a backup"
        )));
    }
    let now = Utc::now();
    let stream = format!("evhost-damaged-{from}");
    let payload = Payload::from_value(note);
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(CHUNK_MAX_EVENTS as u64);
        let encoded: Vec<Vec<u8>> = (pos..pos + n)
            .map(|p| {
                let e = Event {
                    id: format!("evhost-damaged-{p}").into(),
                    event_type: EventType::new(DAMAGED_TYPE).expect("a valid type"),
                    stream: stream.clone().into(),
                    position: p,
                    version: p - from,
                    timestamp: now,
                    source: "evhost".into(),
                    payload: payload.clone(),
                    metadata: Metadata::default(),
                };
                codec::encode_event(&e, false)
            })
            .collect();
        out.extend(codec::encode_chunk(pos, &encoded, pos + n == to));
        pos += n;
    }
    Ok(out)
}

fn remove(path: &Path) -> Result<(), LogError> {
    fs::remove_file(path)
        .map_err(|e| LogError::Storage(format!("cannot remove {}: {e}", path.display())))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let tmp = path.with_extension("seg.tmp");
    let res = (|| {
        let f = fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut &f, bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok::<_, std::io::Error>(())
    })();
    res.map_err(|e| LogError::Storage(format!("cannot write {}: {e}", path.display())))
}

/// One past the last position the index has a chunk for.
fn last_indexed_end(db: &sled::Db) -> Result<u64, LogError> {
    let last = db
        .range(codec::event_key(0)..=codec::event_key(u64::MAX))
        .next_back()
        .transpose()
        .map_err(|e| LogError::Storage(e.to_string()))?;
    Ok(match last {
        Some((k, v)) => {
            codec::position_of_event_key(&k)? + u64::from(ChunkEntry::decode(&v)?.count)
        }
        None => 0,
    })
}

/// Drops, durably, every index entry (chunks, stream runs, client ids) at or past `cut`,
/// unless an earlier cut already covers it.
fn drop_index_from(db: &sled::Db, cut: u64, report: &mut RepairReport) -> Result<(), LogError> {
    if report.reindex_from.is_some_and(|c| c <= cut) {
        return Ok(());
    }
    report.reindex_from = Some(cut);
    drop_entries_from(db, cut)?;
    db.flush()
        .map(|_| ())
        .map_err(|e| LogError::Storage(e.to_string()))
}

/// Removes every index entry at or past position `cut`: chunk entries, the parts of stream
/// runs, client ids.
pub(super) fn drop_entries_from(db: &sled::Db, cut: u64) -> Result<(), LogError> {
    let st = |e: sled::Error| LogError::Storage(e.to_string());
    let mut batch = sled::Batch::default();
    for item in db.range(codec::event_key(cut)..=codec::event_key(u64::MAX)) {
        batch.remove(item.map_err(st)?.0);
    }
    // Chunks are keyed by first position: one that starts before the cut and runs past it
    // must go too (its bytes may have moved).
    if let Some(item) = db
        .range(codec::event_key(0)..codec::event_key(cut))
        .next_back()
    {
        let (k, v) = item.map_err(st)?;
        if codec::position_of_event_key(&k)? + u64::from(ChunkEntry::decode(&v)?.count) > cut {
            batch.remove(k);
        }
    }
    for item in db.scan_prefix([codec::STREAM_PREFIX]) {
        let (k, v) = item.map_err(st)?;
        let run = Run::decode(&v)?;
        if run.first_position >= cut {
            batch.remove(k);
        } else if run.first_position + u64::from(run.count) > cut {
            let kept = Run {
                first_position: run.first_position,
                count: (cut - run.first_position) as u32,
            };
            batch.insert(k, &kept.encode()[..]);
        }
    }
    for item in db.scan_prefix([codec::ID_PREFIX]) {
        let (k, v) = item.map_err(st)?;
        let at = v
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .unwrap_or(u64::MAX);
        if at >= cut {
            batch.remove(k);
        }
    }
    db.apply_batch(batch).map_err(st)
}
