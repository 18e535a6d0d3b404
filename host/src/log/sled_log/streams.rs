//! Streams from their runs in sled (`S stream 0x00 first_version -> first_position, count`):
//! listing them in name order, and reading one newest first.
//!
//! A stream's run keys are contiguous and sorted by version, and streams sort by name
//! (the 0x00 separator is below every byte a name can hold), so a listing visits each
//! stream by two seeks (its first run, its last) and skips the runs between: a page costs
//! the same whether its streams had one append or millions.

use std::sync::atomic::Ordering;

use super::{EventReader, LogError, Shared, codec, last_durable_run, storage};
use crate::event::Event;
use crate::log::codec::{Run, STREAM_PREFIX};
use crate::log::{MAX_STREAM_LIST, StreamInfo, StreamList, StreamListQuery};

/// The streams `query` selects, each with its version, first and last positions and
/// timestamps. Streams whose events are not durable yet are left out.
pub(super) fn list(shared: &Shared, query: &StreamListQuery) -> Result<StreamList, LogError> {
    let head = shared.durable.load(Ordering::Acquire);
    let limit = query.limit.clamp(1, MAX_STREAM_LIST);
    let mut scope = vec![STREAM_PREFIX];
    scope.extend_from_slice(query.prefix.as_bytes());
    let mut start = scope.clone();
    if let Some(after) = &query.after {
        start = start.max(codec::past_stream(after));
    }
    let mut out = StreamList::default();
    let mut reader = EventReader::default();
    loop {
        let Some(item) = shared.db.range(start.as_slice()..).next() else {
            break;
        };
        let (key, value) = item.map_err(storage)?;
        if !key.starts_with(&scope) {
            break;
        }
        let stream = codec::stream_of_stream_key(&key)?.to_owned();
        start = codec::past_stream(&stream);
        // The first run (version 0); when it is not durable, neither is any later one.
        let first = Run::decode(&value)?;
        if first.first_position >= head {
            continue;
        }
        if out.streams.len() == limit {
            out.next = out.streams.last().map(|s| s.stream.clone());
            break;
        }
        let (last_version, last) = last_durable_run(shared, &stream)?
            .ok_or_else(|| LogError::Corrupt(format!("stream {stream:?} lost its runs")))?;
        let last_position = last.first_position + u64::from(last.count) - 1;
        let first_timestamp = reader.event(shared, first.first_position)?.timestamp;
        let last_timestamp = reader.event(shared, last_position)?.timestamp;
        let deleted_at = super::deletion_of(&shared.db, &stream)?;
        out.streams.push(StreamInfo {
            stream,
            version: last_version + u64::from(last.count),
            first_position: first.first_position,
            last_position,
            first_timestamp,
            last_timestamp,
            deleted: deleted_at.is_some(),
            deleted_at,
        });
    }
    Ok(out)
}

/// Up to `limit` durable events of `stream`, newest first, from version `from_version`
/// (or the last, when it is past the last) down. The runs holding versions at or below
/// `from_version` are walked in reverse.
pub(super) fn read_backward(
    shared: &Shared,
    stream: &str,
    from_version: u64,
    limit: usize,
) -> Result<Vec<Event>, LogError> {
    let head = shared.durable.load(Ordering::Acquire);
    let prefix = codec::stream_prefix(stream);
    let mut out = Vec::new();
    let mut reader = EventReader::default();
    let runs = shared
        .db
        .range(prefix..=codec::stream_key(stream, from_version))
        .rev();
    for item in runs {
        let (key, value) = item.map_err(storage)?;
        let first_version = codec::version_of_stream_key(&key)?;
        let run = Run::decode(&value)?;
        // A run is written whole with its group: durable entirely or not at all.
        if run.first_position >= head || run.count == 0 {
            continue;
        }
        let top = (first_version + u64::from(run.count) - 1).min(from_version);
        for version in (first_version..=top).rev() {
            if out.len() >= limit {
                return Ok(out);
            }
            match reader.event(shared, run.first_position + (version - first_version)) {
                Ok(e) => out.push(e),
                // The events after a damaged chunk are served; the next read gets the error.
                Err(_) if !out.is_empty() => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}
