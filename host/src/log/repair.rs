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
    /// Each damaged range that was moved aside, as the log described it.
    pub repaired: Vec<String>,
    /// Files moved into `DATA/damaged/`.
    pub moved: Vec<PathBuf>,
    /// Index entries from this position on were dropped, to be rebuilt at the next start.
    pub reindex_from: Option<u64>,
    /// One past the last readable position after the repair.
    pub head: u64,
}

/// Repairs the log under `data` (the host must be stopped: sled's lock refuses a second
/// opener). Safe to run on an undamaged log, where it changes nothing.
pub fn repair(data: &Path) -> Result<RepairReport, LogError> {
    let events = data.join("events");
    let aside = data.join("damaged");
    let db = sled::Config::new()
        .path(data.join("index"))
        .open()
        .map_err(|e| {
            LogError::Storage(format!(
                "cannot open the index under {} (is the host still running? stop it first): {e}",
                data.display()
            ))
        })?;
    let mut report = RepairReport::default();
    let mut first_damage: Option<u64> = None;
    let end = loop {
        let mut expected = 0u64;
        let scanned = segment::scan(&events, (0, 0), 0, |_, h, bytes| {
            let count = codec::Chunk::parse(h.first_position, bytes)?.len() as u64;
            expected = h.first_position + count;
            Ok(())
        })?;
        let ScanEnd::Damaged(d) = scanned else {
            break expected;
        };
        if report.repaired.len() >= 1000 {
            return Err(LogError::Corrupt(
                "more than 1,000 damaged ranges; the segments look overwritten rather than damaged, restore them from a backup".into(),
            ));
        }
        first_damage.get_or_insert(d.first_position);
        report.repaired.push(d.to_string());
        report.moved.extend(cut_out(&events, &aside, &d)?);
    };
    let indexed_end = last_indexed_end(&db)?;
    let cut = match first_damage {
        Some(p) => Some(p.min(end)),
        None if indexed_end > end => Some(end),
        None => None,
    };
    if let Some(cut) = cut {
        drop_index_from(&db, cut)?;
    }
    db.flush().map_err(|e| LogError::Storage(e.to_string()))?;
    report.reindex_from = cut;
    report.head = end;
    Ok(report)
}

/// Moves the damaged segment (and any segment wholly inside the damage) aside and writes it
/// again with placeholders instead of the damaged bytes.
fn cut_out(events: &Path, aside: &Path, d: &Damage) -> Result<Vec<PathBuf>, LogError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        LogError::Storage(format!("{what} {}: {e}", p.display()))
    };
    fs::create_dir_all(aside).map_err(|e| io("cannot create", aside, e))?;
    let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3f");
    let mut moved = Vec::new();
    let mut move_aside = |seg: u32| -> Result<Vec<u8>, LogError> {
        let path = segment::path(events, seg);
        let bytes = fs::read(&path).map_err(|e| io("cannot read", &path, e))?;
        let to = aside.join(format!("{seg:08}.seg.{stamp}"));
        fs::copy(&path, &to).map_err(|e| io("cannot copy aside", &path, e))?;
        moved.push(to);
        Ok(bytes)
    };
    let old = move_aside(d.segment)?;
    let mut new = old[..d.offset as usize].to_vec();
    let resume_position = d.resume_position.unwrap_or(d.first_position);
    let lost = resume_position.saturating_sub(d.first_position);
    if lost > MAX_PLACEHOLDERS {
        return Err(LogError::Corrupt(format!(
            "{d}: {lost} positions would need placeholders, which suggests the bytes after the damage are not a continuation of the log; restore the segment from a backup"
        )));
    }
    let note = serde_json::json!({
        "segment": format!("{:08}.seg", d.segment),
        "offset": d.offset,
        "saved_in": "damaged/",
    });
    new.extend(placeholders(d.first_position, resume_position, &note));
    let later: Vec<u32> = segment::list(events)?
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| *n > d.segment)
        .collect();
    match d.resume {
        Some((seg, off)) if seg == d.segment => new.extend_from_slice(&old[off as usize..]),
        Some((seg, off)) => {
            for n in later.iter().copied().filter(|n| *n < seg) {
                move_aside(n)?;
                remove(&segment::path(events, n))?;
            }
            let tail = move_aside(seg)?;
            write_atomically(&segment::path(events, seg), &tail[off as usize..])?;
        }
        None => {
            for n in later {
                move_aside(n)?;
                remove(&segment::path(events, n))?;
            }
        }
    }
    write_atomically(&segment::path(events, d.segment), &new)?;
    Ok(moved)
}

/// Chunks of one `evhost.log.damaged` event per position in `from..to`, closing a group.
fn placeholders(from: u64, to: u64, note: &serde_json::Value) -> Vec<u8> {
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
                    id: format!("evhost-damaged-{p}"),
                    event_type: EventType::new(DAMAGED_TYPE).expect("a valid type"),
                    stream: stream.clone(),
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
    out
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
        Some((k, v)) => codec::position_of_event_key(&k)? + u64::from(ChunkEntry::decode(&v)?.count),
        None => 0,
    })
}

/// Drops every index entry (chunks, stream runs, client ids) at or past `cut`.
fn drop_index_from(db: &sled::Db, cut: u64) -> Result<(), LogError> {
    let st = |e: sled::Error| LogError::Storage(e.to_string());
    let mut batch = sled::Batch::default();
    for item in db.range(codec::event_key(cut)..=codec::event_key(u64::MAX)) {
        batch.remove(item.map_err(st)?.0);
    }
    // Chunks are keyed by first position: one that starts before the cut and runs past it
    // must go too (its bytes may have moved).
    if let Some(item) = db.range(codec::event_key(0)..codec::event_key(cut)).next_back() {
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
