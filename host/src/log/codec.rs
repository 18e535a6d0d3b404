//! How events and indexes are laid out as sled keys and values.
//!
//! Key space of the log's tree (one tree, so one `Batch` commits everything atomically):
//!
//! | key                                   | value                                   |
//! |---------------------------------------|-----------------------------------------|
//! | `E` first_position (u64 BE)           | where a chunk of consecutive events is  |
//! | `S` stream 0x00 first_version (u64 BE) | a run: first_position (u64), count (u32) |
//! | `I` id                                 | position (u64 BE)                       |
//! | `D` stream                             | position of its deletion (u64 BE)       |
//!
//! Events are stored in chunks of consecutive positions, written to segment files of our
//! own (see `segment`), with one small sled entry per chunk rather than one per event:
//! sled costs about the same per key whatever its size, so chunking is what lets a batch
//! append outrun sled's per-key insert rate, and keeping event bytes out of sled keeps its
//! memory small. A chunk carries an offset table so one event can be decoded without
//! decoding its neighbours.

use chrono::DateTime;
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventType, Metadata, Payload};
use crate::log::LogError;

pub(super) const EVENT_PREFIX: u8 = b'E';
pub(super) const STREAM_PREFIX: u8 = b'S';
pub(super) const ID_PREFIX: u8 = b'I';
pub(super) const DELETED_PREFIX: u8 = b'D';
/// One past the last position whose client ids are all in the id index. Ids go into sled
/// after their group is acknowledged, so at start-up the ids from here to the last chunk
/// entry are indexed again. An index without it (written before ids lagged) holds every id
/// of its chunks. Its prefix `M` is the index's own records.
pub(super) const IDS_INDEXED_KEY: &[u8] = b"Mids-indexed-through";

/// Most events per chunk.
pub(super) const CHUNK_MAX_EVENTS: usize = 256;
/// Soft size limit of a chunk's encoded events; a single larger event gets a chunk alone.
pub(super) const CHUNK_MAX_BYTES: usize = 64 * 1024;

pub(super) fn event_key(position: u64) -> [u8; 9] {
    let mut k = [EVENT_PREFIX; 9];
    k[1..].copy_from_slice(&position.to_be_bytes());
    k
}

pub(super) fn position_of_event_key(key: &[u8]) -> Result<u64, LogError> {
    key.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| LogError::Corrupt(format!("event key {key:?}")))
}

/// Prefix of every run key of `stream`.
pub(super) fn stream_prefix(stream: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 10);
    k.push(STREAM_PREFIX);
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k
}

pub(super) fn stream_key(stream: &str, first_version: u64) -> Vec<u8> {
    let mut k = stream_prefix(stream);
    k.extend_from_slice(&first_version.to_be_bytes());
    k
}

pub(super) fn version_of_stream_key(key: &[u8]) -> Result<u64, LogError> {
    key.len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| LogError::Corrupt(format!("stream key {key:?}")))
}

/// The stream a run key belongs to: the bytes between the prefix byte and the 0x00 before
/// the version (stream names hold no control characters, so the 0x00 is the separator).
pub(super) fn stream_of_stream_key(key: &[u8]) -> Result<&str, LogError> {
    key.len()
        .checked_sub(9)
        .filter(|&end| end >= 1 && key[end] == 0)
        .and_then(|end| std::str::from_utf8(&key[1..end]).ok())
        .ok_or_else(|| LogError::Corrupt(format!("stream key {key:?}")))
}

/// The first key past every run key of `stream` (and before the next stream's): the
/// stream's prefix with 0x01 for the separator. Every longer name that starts with
/// `stream` continues with a byte above 0x01, since names hold no control characters.
pub(super) fn past_stream(stream: &str) -> Vec<u8> {
    let mut k = stream_prefix(stream);
    *k.last_mut().expect("the separator") = 1;
    k
}

/// The key marking `stream` deleted (soft or hard) by the tombstone at its value.
pub(super) fn deleted_key(stream: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 1);
    k.push(DELETED_PREFIX);
    k.extend_from_slice(stream.as_bytes());
    k
}

pub(super) fn id_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(ID_PREFIX);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Where a chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChunkLocation {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
}

impl ChunkLocation {
    pub(super) fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// The index entry of a chunk: where its bytes are and how many events it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChunkEntry {
    pub location: ChunkLocation,
    pub count: u32,
}

impl ChunkEntry {
    pub(super) fn encode(self) -> [u8; 20] {
        let mut v = [0u8; 20];
        v[..4].copy_from_slice(&self.location.segment.to_be_bytes());
        v[4..12].copy_from_slice(&self.location.offset.to_be_bytes());
        v[12..16].copy_from_slice(&self.location.len.to_be_bytes());
        v[16..].copy_from_slice(&self.count.to_be_bytes());
        v
    }

    pub(super) fn decode(v: &[u8]) -> Result<Self, LogError> {
        if v.len() != 20 {
            return Err(LogError::Corrupt(format!(
                "chunk index entry of {} bytes",
                v.len()
            )));
        }
        let u32_at = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().expect("4 bytes"));
        Ok(Self {
            location: ChunkLocation {
                segment: u32_at(0),
                offset: u64::from_be_bytes(v[4..12].try_into().expect("8 bytes")),
                len: u32_at(12),
            },
            count: u32_at(16),
        })
    }
}

/// A run of a stream's events with consecutive versions and consecutive positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub first_position: u64,
    pub count: u32,
}

impl Run {
    pub(super) fn encode(self) -> [u8; 12] {
        let mut v = [0u8; 12];
        v[..8].copy_from_slice(&self.first_position.to_be_bytes());
        v[8..].copy_from_slice(&self.count.to_be_bytes());
        v
    }

    pub(super) fn decode(v: &[u8]) -> Result<Self, LogError> {
        if v.len() != 12 {
            return Err(LogError::Corrupt(format!(
                "stream run of {} bytes",
                v.len()
            )));
        }
        Ok(Self {
            first_position: u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
            count: u32::from_be_bytes(v[8..].try_into().expect("4 bytes")),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct StoredEvent<'a> {
    id: &'a str,
    event_type: &'a str,
    stream: &'a str,
    version: u64,
    timestamp_micros: i64,
    /// The id was the client's: it goes in the id index when the index is rebuilt.
    keyed: bool,
    source: &'a str,
    payload: &'a str,
    #[serde(borrow)]
    metadata: StoredMetadata<'a>,
}

#[derive(Serialize, Deserialize)]
struct StoredMetadata<'a> {
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    user_id: Option<&'a str>,
    agent_id: Option<&'a str>,
    schema_version: Option<&'a str>,
    #[serde(borrow)]
    extra: Vec<(&'a str, &'a str)>,
}

/// [`StoredEvent`] as it is written: the same fields in the same order, read straight from
/// an [`Event`] (the metadata's other keys from its map, with no list built per event).
#[derive(Serialize)]
struct StoredEventOut<'a> {
    id: &'a str,
    event_type: &'a str,
    stream: &'a str,
    version: u64,
    timestamp_micros: i64,
    keyed: bool,
    source: &'a str,
    payload: &'a str,
    metadata: StoredMetadataOut<'a>,
}

#[derive(Serialize)]
struct StoredMetadataOut<'a> {
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    user_id: Option<&'a str>,
    agent_id: Option<&'a str>,
    schema_version: Option<&'a str>,
    extra: ExtraPairs<'a>,
}

/// A metadata map written as the sequence of pairs [`StoredMetadata::extra`] reads.
struct ExtraPairs<'a>(&'a std::collections::BTreeMap<String, String>);

impl Serialize for ExtraPairs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

/// Encodes one event (its position is implied by the chunk it lands in); `keyed` says the
/// id was supplied by the client.
pub(super) fn encode_event(e: &Event, keyed: bool) -> Vec<u8> {
    encode_event_onto(e, keyed, Vec::new())
}

/// [`encode_event`] appended to `out`, which is returned: the writer encodes a whole chunk's
/// events into one buffer.
pub(super) fn encode_event_onto(e: &Event, keyed: bool, out: Vec<u8>) -> Vec<u8> {
    let m = &e.metadata;
    let stored = StoredEventOut {
        id: &e.id,
        event_type: e.event_type.as_str(),
        stream: &e.stream,
        version: e.version,
        timestamp_micros: e.timestamp.timestamp_micros(),
        keyed,
        source: &e.source,
        payload: e.payload.as_str(),
        metadata: StoredMetadataOut {
            correlation_id: m.correlation_id.as_deref(),
            causation_id: m.causation_id.as_deref(),
            user_id: m.user_id.as_deref(),
            agent_id: m.agent_id.as_deref(),
            schema_version: m.schema_version.as_deref(),
            extra: ExtraPairs(&m.extra),
        },
    };
    postcard::to_extend(&stored, out).expect("encoding to a Vec cannot fail")
}

/// Interns event types while decoding a chunk, so repeated types share one allocation.
#[derive(Default)]
pub(super) struct TypeCache(Vec<EventType>);

impl TypeCache {
    fn get(&mut self, s: &str) -> EventType {
        if let Some(t) = self.0.iter().find(|t| t.as_str() == s) {
            return t.clone();
        }
        let t = EventType::trusted(s);
        if self.0.len() < 16 {
            self.0.push(t.clone());
        }
        t
    }
}

/// What an erased event's slot holds: an event with empty strings (no stored event has an
/// empty type) and the original's time, never longer than the event it replaces (whose
/// id, type, stream and payload each hold at least one byte). Zeros pad the slot.
fn encode_erased(timestamp_micros: i64) -> Vec<u8> {
    let stored = StoredEvent {
        id: "",
        event_type: "",
        stream: "",
        version: 0,
        timestamp_micros,
        keyed: false,
        source: "",
        payload: "",
        metadata: StoredMetadata {
            correlation_id: None,
            causation_id: None,
            user_id: None,
            agent_id: None,
            schema_version: None,
            extra: Vec::new(),
        },
    };
    postcard::to_stdvec(&stored).expect("encoding to a Vec cannot fail")
}

/// The event an erased slot reads back as: type [`ERASED_TYPE`](crate::log::ERASED_TYPE),
/// with nothing of the original but its position and time.
fn erased_event(position: u64, timestamp_micros: i64) -> Result<Event, LogError> {
    Ok(Event {
        id: format!("erased-{position}").into(),
        event_type: EventType::trusted(crate::log::ERASED_TYPE),
        stream: crate::log::ERASED_STREAM.to_owned().into(),
        position,
        version: 0,
        timestamp: DateTime::from_timestamp_micros(timestamp_micros).ok_or_else(|| {
            LogError::Corrupt(format!("timestamp of the event at position {position}"))
        })?,
        source: "evhost".to_owned(),
        payload: Payload::trusted("{}"),
        metadata: Metadata::default(),
    })
}

/// `chunk` (whole, header included, CRC checked) with the events at `positions` erased:
/// each one's slot overwritten by an erased event padded with zeros, the offsets kept, the
/// CRC recomputed. The result has the same length, so the index's locations stay valid.
/// Already erased events are left as they are.
pub(super) fn erase_in_chunk(
    first_position: u64,
    chunk: &[u8],
    positions: &[u64],
) -> Result<Vec<u8>, LogError> {
    let parsed = Chunk::parse(first_position, chunk)?;
    let table_end = CHUNK_HEADER + 4 + 4 * parsed.count;
    let mut out = chunk.to_vec();
    for &p in positions {
        if p < first_position || p >= first_position + parsed.count as u64 {
            return Err(LogError::Corrupt(format!(
                "position {p} is not in the chunk at {first_position}"
            )));
        }
        let i = (p - first_position) as usize;
        let start = if i == 0 { 0 } else { parsed.end_offset(i - 1) };
        let end = parsed.end_offset(i);
        let slot = &chunk[table_end + start..table_end + end];
        let s: StoredEvent<'_> = postcard::from_bytes(slot)
            .map_err(|e| LogError::Corrupt(format!("event at position {p}: {e}")))?;
        let erased = encode_erased(s.timestamp_micros);
        if erased.len() > slot.len() {
            return Err(LogError::Corrupt(format!(
                "event at position {p} is shorter than an erased event"
            )));
        }
        let dst = &mut out[table_end + start..table_end + end];
        dst.fill(0);
        dst[..erased.len()].copy_from_slice(&erased);
    }
    let crc = crc32fast::hash(&out[CHUNK_HEADER..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn decode_event(
    bytes: &[u8],
    position: u64,
    types: &mut TypeCache,
) -> Result<(Event, bool), LogError> {
    owned(stored(bytes, position)?, position, types)
}

fn stored(bytes: &[u8], position: u64) -> Result<StoredEvent<'_>, LogError> {
    postcard::from_bytes(bytes)
        .map_err(|e| LogError::Corrupt(format!("event at position {position}: {e}")))
}

/// What a read filters on, borrowed from a stored event before anything is copied.
pub(super) struct Fields<'a> {
    pub event_type: &'a str,
    pub stream: &'a str,
    pub correlation_id: Option<&'a str>,
    pub source: &'a str,
}

fn owned(
    s: StoredEvent<'_>,
    position: u64,
    types: &mut TypeCache,
) -> Result<(Event, bool), LogError> {
    if s.event_type.is_empty() {
        return Ok((erased_event(position, s.timestamp_micros)?, false));
    }
    let m = s.metadata;
    let keyed = s.keyed;
    let event = Event {
        id: s.id.to_owned().into(),
        event_type: types.get(s.event_type),
        stream: s.stream.to_owned().into(),
        position,
        version: s.version,
        timestamp: DateTime::from_timestamp_micros(s.timestamp_micros).ok_or_else(|| {
            LogError::Corrupt(format!("timestamp of the event at position {position}"))
        })?,
        source: s.source.to_owned(),
        payload: Payload::trusted(s.payload),
        metadata: Metadata {
            correlation_id: m.correlation_id.map(str::to_owned),
            causation_id: m.causation_id.map(str::to_owned),
            user_id: m.user_id.map(str::to_owned),
            agent_id: m.agent_id.map(str::to_owned),
            schema_version: m.schema_version.map(str::to_owned),
            extra: m
                .extra
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        },
    };
    Ok((event, keyed))
}

/// Bytes before a chunk's body: body length (u32 LE, top bit set on the last chunk of a
/// group), CRC-32 of the body (u32 LE), first position (u64 LE). They let start-up find
/// where the last complete group ends.
pub(super) const CHUNK_HEADER: usize = 16;

/// Marks the last chunk of a commit group in the length field.
const GROUP_END: u32 = 1 << 31;

/// Builds a chunk: header, then `count: u32`, `count` end offsets (u32), the event bytes.
/// `group_end` marks the last chunk of a commit group: recovery keeps whole groups only.
pub(super) fn encode_chunk(first_position: u64, events: &[Vec<u8>], group_end: bool) -> Vec<u8> {
    let mut ends = Vec::with_capacity(events.len());
    let mut body = Vec::with_capacity(events.iter().map(Vec::len).sum());
    for e in events {
        body.extend_from_slice(e);
        ends.push(body.len() as u32);
    }
    let mut out = Vec::new();
    write_chunk(&mut out, first_position, &ends, &body, group_end);
    out
}

/// Appends to `out` the chunk of events encoded back to back in `body`, each ending at its
/// offset in `ends` (see [`encode_chunk`]).
pub(super) fn write_chunk(
    out: &mut Vec<u8>,
    first_position: u64,
    ends: &[u32],
    body: &[u8],
    group_end: bool,
) {
    let start = out.len();
    out.reserve(CHUNK_HEADER + 4 + 4 * ends.len() + body.len());
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&first_position.to_le_bytes());
    out.extend_from_slice(&(ends.len() as u32).to_le_bytes());
    for end in ends {
        out.extend_from_slice(&end.to_le_bytes());
    }
    out.extend_from_slice(body);
    let body_len = (out.len() - start - CHUNK_HEADER) as u32;
    let crc = crc32fast::hash(&out[start + CHUNK_HEADER..]);
    let len_field = if group_end {
        body_len | GROUP_END
    } else {
        body_len
    };
    out[start..start + 4].copy_from_slice(&len_field.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A decoded chunk header.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChunkHeader {
    pub body_len: u32,
    pub crc: u32,
    pub first_position: u64,
    /// The last chunk of its commit group.
    pub group_end: bool,
}

/// Reads a chunk header.
pub(super) fn chunk_header(h: &[u8]) -> Option<ChunkHeader> {
    let h: &[u8; CHUNK_HEADER] = h.get(..CHUNK_HEADER)?.try_into().ok()?;
    let len = u32::from_le_bytes(h[..4].try_into().ok()?);
    Some(ChunkHeader {
        body_len: len & !GROUP_END,
        crc: u32::from_le_bytes(h[4..8].try_into().ok()?),
        first_position: u64::from_le_bytes(h[8..].try_into().ok()?),
        group_end: len & GROUP_END != 0,
    })
}

/// A stored chunk, read lazily.
pub(super) struct Chunk<'a> {
    first_position: u64,
    count: usize,
    offsets: &'a [u8],
    body: &'a [u8],
}

impl<'a> Chunk<'a> {
    /// Parses a whole chunk (header included), checking its CRC and first position.
    pub(super) fn parse(first_position: u64, v: &'a [u8]) -> Result<Self, LogError> {
        Self::parse_inner(first_position, v, true)
    }

    /// Parses a chunk already checked by [`Chunk::parse`] (skips the CRC).
    pub(super) fn parse_checked(first_position: u64, v: &'a [u8]) -> Result<Self, LogError> {
        Self::parse_inner(first_position, v, false)
    }

    fn parse_inner(first_position: u64, v: &'a [u8], check_crc: bool) -> Result<Self, LogError> {
        let corrupt =
            |why: &str| LogError::Corrupt(format!("chunk at position {first_position}: {why}"));
        let h = chunk_header(v).ok_or_else(|| corrupt("short header"))?;
        let v = &v[CHUNK_HEADER..];
        if v.len() != h.body_len as usize
            || h.first_position != first_position
            || (check_crc && crc32fast::hash(v) != h.crc)
        {
            return Err(corrupt("checksum or header mismatch"));
        }
        let count = u32::from_le_bytes(
            v.get(..4)
                .ok_or_else(|| corrupt("short"))?
                .try_into()
                .expect("4"),
        ) as usize;
        let table_end = 4 + 4 * count;
        let offsets = v
            .get(4..table_end)
            .ok_or_else(|| corrupt("short offset table"))?;
        let body = v.get(table_end..).ok_or_else(|| corrupt("short body"))?;
        Ok(Self {
            first_position,
            count,
            offsets,
            body,
        })
    }

    /// Number of events in the chunk.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// One past the chunk's last position.
    pub(super) fn end(&self) -> u64 {
        self.first_position + self.count as u64
    }

    fn end_offset(&self, i: usize) -> usize {
        u32::from_le_bytes(self.offsets[4 * i..4 * i + 4].try_into().expect("4")) as usize
    }

    /// Decodes the event at `position`, which must lie in this chunk.
    pub(super) fn event(&self, position: u64, types: &mut TypeCache) -> Result<Event, LogError> {
        self.event_keyed(position, types).map(|(e, _)| e)
    }

    /// Decodes the event at `position` and whether its id was the client's.
    pub(super) fn event_keyed(
        &self,
        position: u64,
        types: &mut TypeCache,
    ) -> Result<(Event, bool), LogError> {
        decode_event(self.event_bytes(position)?, position, types)
    }

    /// The event at `position` if `keep` admits its fields, decoded only then: a read that
    /// filters copies nothing of the events it leaves out. Erased events are never kept.
    pub(super) fn event_where(
        &self,
        position: u64,
        types: &mut TypeCache,
        keep: impl FnOnce(&Fields<'_>) -> bool,
    ) -> Result<Option<Event>, LogError> {
        let s = stored(self.event_bytes(position)?, position)?;
        // Checked for every event, kept or not, as a full decode checks it.
        if DateTime::from_timestamp_micros(s.timestamp_micros).is_none() {
            return Err(LogError::Corrupt(format!(
                "timestamp of the event at position {position}"
            )));
        }
        let fields = Fields {
            event_type: s.event_type,
            stream: s.stream,
            correlation_id: s.metadata.correlation_id,
            source: s.source,
        };
        if s.event_type.is_empty() || !keep(&fields) {
            return Ok(None);
        }
        Ok(Some(owned(s, position, types)?.0))
    }

    fn event_bytes(&self, position: u64) -> Result<&[u8], LogError> {
        let i = (position - self.first_position) as usize;
        let start = if i == 0 { 0 } else { self.end_offset(i - 1) };
        let end = self.end_offset(i);
        self.body
            .get(start..end)
            .ok_or_else(|| LogError::Corrupt(format!("event at position {position}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(extra: &[(&str, &str)]) -> Event {
        let mut metadata = Metadata::default();
        metadata.correlation_id = Some("c-1".into());
        metadata.causation_id = Some("e-0".into());
        metadata.extra = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Event {
            id: "e-1".to_owned().into(),
            event_type: EventType::new("memory.entity.extracted").unwrap(),
            stream: "s-1".to_owned().into(),
            position: 7,
            version: 3,
            timestamp: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            source: "entity-extractor".into(),
            payload: Payload::from_json(r#"{"entities":["Ada"]}"#).unwrap(),
            metadata,
        }
    }

    /// The writer's encoding is the one the reader's `StoredEvent` has always had, byte for
    /// byte, and a chunk encoded onto one buffer reads back event for event.
    #[test]
    fn events_encoded_onto_one_buffer_read_back_as_written() {
        for extra in [&[][..], &[("derivation_depth", "1"), ("zone", "ü")][..]] {
            let e = event(extra);
            let m = &e.metadata;
            let reference = postcard::to_stdvec(&StoredEvent {
                id: &e.id,
                event_type: e.event_type.as_str(),
                stream: &e.stream,
                version: e.version,
                timestamp_micros: e.timestamp.timestamp_micros(),
                keyed: true,
                source: &e.source,
                payload: e.payload.as_str(),
                metadata: StoredMetadata {
                    correlation_id: m.correlation_id.as_deref(),
                    causation_id: m.causation_id.as_deref(),
                    user_id: None,
                    agent_id: None,
                    schema_version: None,
                    extra: m
                        .extra
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                },
            })
            .unwrap();
            assert_eq!(encode_event(&e, true), reference);
            let onto = encode_event_onto(&e, true, b"before".to_vec());
            assert_eq!(&onto[6..], &reference[..]);
            let (back, keyed) = decode_event(&reference, 7, &mut TypeCache::default()).unwrap();
            assert!(keyed);
            assert_eq!(back, e);
        }
    }
}
