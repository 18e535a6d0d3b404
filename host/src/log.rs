//! The append-only event log: the [`EventLog`] contract every backend meets, and the
//! embedded sled backend ([`SledLog`]).
//!
//! The log is the source of truth. An append is acknowledged only once durable; positions
//! are global, gap-free and assigned in acknowledgement order; versions count events within
//! a stream.

mod codec;
mod nats_log;
mod repair;
mod segment;
mod sled_log;
mod stream_list;

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::{Event, NewEvent, StreamName, validate_id, validate_stream};
use crate::pattern::PatternSet;

pub use nats_log::{MAX_ATOMIC_BATCH, NatsLog, NatsLogConfig};
pub use repair::{DAMAGED_TYPE, RepairReport, repair};
pub use segment::Damage;
pub use sled_log::{LogHealth, SledLog, SledLogConfig};
pub use stream_list::{MAX_STREAM_LIST, StreamInfo, StreamList, StreamListQuery};

/// What the client believes the stream's version is before its append.
///
/// A stream's version is the number of events in it, i.e. the version its next event gets.
/// The reply to an append carries the new version, ready to send with the next append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version.
    #[default]
    Any,
    /// The stream must not exist yet (version 0).
    NoStream,
    /// The stream must be at exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// True when a stream at `current` satisfies this expectation.
    pub fn admits(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exact(v) => current == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no_stream"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

impl Serialize for ExpectedVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ExpectedVersion::Exact(v) => s.serialize_u64(*v),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for ExpectedVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Word(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected_version must be a non-negative integer, \"any\" or \"no_stream\"",
            )
        })? {
            Raw::Num(v) => Ok(ExpectedVersion::Exact(v)),
            Raw::Word(w) if w == "any" => Ok(ExpectedVersion::Any),
            Raw::Word(w) if w == "no_stream" => Ok(ExpectedVersion::NoStream),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected_version {w:?} is not a non-negative integer, \"any\" or \"no_stream\""
            ))),
        }
    }
}

/// Events to append to one stream, guarded by an expected version.
#[derive(Debug, Clone)]
pub struct StreamAppend {
    /// The stream to append to.
    pub stream: StreamName,
    /// The version the stream must be at; checked against events not already in the log.
    pub expected: ExpectedVersion,
    /// The events, appended in order.
    pub events: Vec<NewEvent>,
}

/// What one [`StreamAppend`] became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// The stream appended to.
    pub stream: StreamName,
    /// The position of each event, in request order; an event whose id was already in the
    /// log reports its original position.
    pub positions: Vec<u64>,
    /// For each event, in request order: true when this append stored it, false when its
    /// id was in the log already (an id repeated within one request: not specified). What
    /// a tool worker asks
    /// before it runs an invocation: only the host whose start event was stored runs it.
    /// Not part of the API's answer, which stays the same for a retry.
    #[serde(skip)]
    pub written: Vec<bool>,
    /// The stream's version after the append (the version its next event will get).
    pub next_version: u64,
}

/// Why an append was refused. Nothing was written, except possibly on `Storage`.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The stream was not at the expected version.
    #[error(
        "version conflict on stream {stream:?}: expected version {expected}, but the stream is at version {current}; read the stream and retry with expected_version {current}"
    )]
    Conflict {
        /// The stream whose version did not match.
        stream: String,
        /// What the client expected.
        expected: ExpectedVersion,
        /// The stream's actual version (number of events).
        current: u64,
    },
    /// The request itself is unusable (empty, too large, inconsistent).
    #[error("{0}")]
    Invalid(String),
    /// An event's client id is already the id of an event on another stream; nothing was
    /// written. (On the same stream the append is a retry and answers the original
    /// positions.)
    #[error(
        "event id {id:?} is already used by the event at position {position} on stream {stream:?}; ids are unique across the log, so give this event another id (or append it to {stream:?} if it is a retry)"
    )]
    IdInUse {
        /// The id sent.
        id: String,
        /// The stream of the event that has it.
        stream: String,
        /// That event's position.
        position: u64,
    },
    /// The stream was deleted by the tombstone at `position`; restore it to append again.
    #[error(
        "stream {stream:?} was deleted (its tombstone is at position {position}); appends to it are refused until an operator restores it"
    )]
    StreamDeleted {
        /// The deleted stream.
        stream: String,
        /// The tombstone's position.
        position: u64,
    },
    /// The storage failed. The host takes the append's bytes back out, and the next append
    /// is tried as usual; only if that fails too is the outcome unknown (as with any database
    /// whose disk fails mid-write), and the log refuses writes until a restart. A client that
    /// retries with the same event ids gets exactly-once either way.
    #[error(transparent)]
    Storage(#[from] LogError),
}

/// Where a log hands what it commits, so that it needs nothing of who follows it: in the
/// host, the bus's hub ([`crate::bus::Hub`]).
pub trait CommitSink: Send + Sync + 'static {
    /// The log opened with `head` (one past its last position).
    fn opened(&self, head: u64);
    /// Events just made durable, in position order; must never wait on readers.
    fn committed(&self, events: &[std::sync::Arc<Event>]);
    /// The events of `stream` were erased from the log: drop any copies kept.
    fn erased(&self, stream: &str);
}

/// Opens a sled database, waiting up to 2 s while another handle in this process lets go of
/// its file lock (sled releases it from a background thread after the last handle drops,
/// so a database closed and opened again at once can find it still held). A lock another
/// process holds is an error once the wait is over.
pub(crate) fn open_sled(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match config.open() {
            // sled reports a held lock as an `Other` error naming it.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The type of the tombstone an operator's delete appends to a stream; projections fold it.
pub const STREAM_DELETED_TYPE: &str = "evhost.stream.deleted";
/// The type of the event that re-opens a deleted stream.
pub const STREAM_RESTORED_TYPE: &str = "evhost.stream.restored";
/// The type an erased event reads back as (its position kept, nothing else of it).
pub const ERASED_TYPE: &str = "evhost.event.erased";
/// The stream an erased event reads back as belonging to.
pub const ERASED_STREAM: &str = "evhost-erased";

/// What [`EventLog::erase`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Erased {
    /// Events removed from storage by this call (events erased before are not counted).
    pub events: u64,
    /// Segment files rewritten.
    pub segments: usize,
    /// Where the tombstone is, which stays.
    pub tombstone: u64,
}

/// A failure of the log's storage, or a log that has shut down.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The storage engine reported an error.
    #[error(
        "event log storage failed: {0}; check the data directory's disk (free space, file descriptors, permissions): each append is tried again as it comes, and /health shows the last failure"
    )]
    Storage(String),
    /// The log has been closed.
    #[error("the event log is shut down")]
    Closed,
    /// The NATS servers holding the log failed or could not be reached.
    #[error(
        "the NATS JetStream log: {0}; check that the servers given to --log are up and reachable from this host"
    )]
    Nats(String),
    /// An erasure was asked of a stream that is not deleted.
    #[error(
        "stream {0:?} is not deleted: delete it first; only a deleted stream's events can be erased"
    )]
    NotDeleted(String),
    /// Stored bytes could not be decoded.
    #[error("corrupt record in the event log at {0}")]
    Corrupt(String),
    /// The segments hold damaged bytes with valid events after them: the log does not open
    /// over them, since writing on would lose or reuse acknowledged positions.
    #[error(
        "the event log is damaged: {0}. evhost does not start over damaged events, so that nothing acknowledged is lost or its position reused. Restore the segment from a backup, or stop the host and run `evhost log repair --data DIR`, which moves the damaged bytes aside into DIR/damaged/, puts an evhost.log.damaged event at each unreadable position, and keeps every valid event after them"
    )]
    Damaged(Box<Damage>),
}

/// Which events a read returns, beyond its position range.
#[derive(Debug, Clone, Default)]
pub struct ReadFilter {
    /// Only events whose type matches one of these patterns; `None` for all.
    pub types: Option<PatternSet>,
    /// Only events of this stream.
    pub stream: Option<String>,
    /// Only events with this `metadata.correlation_id`.
    pub correlation_id: Option<String>,
    /// Only events from this source.
    pub source: Option<String>,
}

impl ReadFilter {
    /// True when `event` passes every set criterion.
    pub fn admits(&self, event: &Event) -> bool {
        self.admits_fields(
            event.event_type.as_str(),
            &event.stream,
            event.metadata.correlation_id.as_deref(),
            &event.source,
        )
    }

    /// [`ReadFilter::admits`] on an event's fields, for a log that filters before it
    /// decodes the whole event.
    pub(crate) fn admits_fields(
        &self,
        event_type: &str,
        stream: &str,
        correlation_id: Option<&str>,
        source: &str,
    ) -> bool {
        self.types.as_ref().is_none_or(|t| t.matches(event_type))
            && self.stream.as_deref().is_none_or(|s| s == stream)
            && self
                .correlation_id
                .as_deref()
                .is_none_or(|c| correlation_id == Some(c))
            && self.source.as_deref().is_none_or(|s| s == source)
    }

    /// True when no criterion is set.
    pub fn is_empty(&self) -> bool {
        self.types.is_none()
            && self.stream.is_none()
            && self.correlation_id.is_none()
            && self.source.is_none()
    }
}

/// A page of events read by position.
#[derive(Debug, Clone, Default)]
pub struct ReadPage {
    /// The matching events, in position order.
    pub events: Vec<Event>,
    /// Where the next read should start: one past the last position examined.
    pub next: u64,
}

/// The contract of an event log backend (embedded sled now, NATS JetStream next).
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends every group atomically: all are durable when this returns `Ok`, none on `Err`.
    async fn append(&self, groups: Vec<StreamAppend>) -> Result<Vec<Appended>, AppendError>;

    /// Appends like [`EventLog::append`] for an appender that vouches its event ids are new
    /// (a runner that has checked the log itself): the ids are kept but neither looked up
    /// nor indexed, so [`EventLog::find`] does not know them. Saves an index entry per event.
    async fn append_unindexed(
        &self,
        groups: Vec<StreamAppend>,
    ) -> Result<Vec<Appended>, AppendError> {
        self.append(groups).await
    }

    /// Reads up to `limit` matching events with positions in `from..head`. A call examines a
    /// bounded number of positions, so a selective filter cannot make it unbounded: continue
    /// from [`ReadPage::next`] until it reaches [`EventLog::head`].
    async fn read(
        &self,
        from: u64,
        limit: usize,
        filter: &ReadFilter,
    ) -> Result<ReadPage, LogError>;

    /// Reads like [`EventLog::read`], but only positions in `from..end` (and below the head):
    /// [`ReadPage::next`] stops at `end`. With [`EventLog::position_at`] this reads a span of
    /// time.
    async fn read_to(
        &self,
        from: u64,
        end: u64,
        limit: usize,
        filter: &ReadFilter,
    ) -> Result<ReadPage, LogError> {
        let mut page = self.read(from, limit, filter).await?;
        page.events.retain(|e| e.position < end);
        page.next = page.next.min(end.max(from));
        Ok(page)
    }

    /// The first durable position whose event was appended at or after `at`; `None` when
    /// every durable event is older. Timestamps never decrease along the log (see
    /// [`Event::timestamp`]), so this is a search, not a scan.
    async fn position_at(&self, at: DateTime<Utc>) -> Result<Option<u64>, LogError>;

    /// Reads up to `limit` events of `stream` starting at version `from_version`.
    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Event>, LogError>;

    /// Reads up to `limit` events of `stream` newest first: version `from_version` (or the
    /// stream's last, when `from_version` is past it), then each older one down to 0.
    async fn read_stream_backward(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Event>, LogError>;

    /// The streams that have durable events, in name order, as `query` selects them. One
    /// call looks at a bounded number of streams (about `query.limit`), however many events
    /// or appends each holds.
    async fn list_streams(&self, query: &StreamListQuery) -> Result<StreamList, LogError>;

    /// The stream's version (number of events); 0 when it does not exist.
    async fn stream_version(&self, stream: &str) -> Result<u64, LogError>;

    /// The position of the tombstone ([`STREAM_DELETED_TYPE`]) that deleted `stream`, if it
    /// is deleted and not restored since. Appends to a deleted stream are refused
    /// ([`AppendError::StreamDeleted`]) unless they start with a [`STREAM_RESTORED_TYPE`].
    async fn deletion(&self, stream: &str) -> Result<Option<u64>, LogError>;

    /// Removes the events of the deleted `stream` from storage for good, all but its
    /// tombstone: each becomes an [`ERASED_TYPE`] event at the same position, which reads
    /// by position skip. Other events and every position are unchanged. Crash-safe: after a
    /// crash the erasure is finished at the next start. Refused unless the stream is deleted.
    async fn erase(&self, stream: &str) -> Result<Erased, LogError>;

    /// The position of the event appended with the id `id` given by its appender (ids the
    /// host assigned are not indexed); `None` when there is none.
    async fn find(&self, id: &str) -> Result<Option<u64>, LogError>;

    /// One past the last durable position: the position the next event will get.
    fn head(&self) -> u64;

    /// Whether the log accepts writes and what is known to be wrong with its stored events,
    /// for `/health`.
    fn health(&self) -> LogHealth {
        LogHealth::default()
    }
}

/// The deletion rules every backend applies, event by event, to what an append adds to
/// `stream`: a deleted stream (its tombstone at `tombstone`) takes nothing but a
/// [`STREAM_RESTORED_TYPE`] first, a stream that is not deleted cannot be restored, and a
/// [`STREAM_DELETED_TYPE`] at `position` deletes it. Answers the tombstone after the event.
pub(crate) fn deletion_after(
    stream: &str,
    event_type: &str,
    tombstone: Option<u64>,
    position: u64,
) -> Result<Option<u64>, AppendError> {
    match (event_type, tombstone) {
        (STREAM_RESTORED_TYPE, Some(_)) => Ok(None),
        (STREAM_RESTORED_TYPE, None) => Err(AppendError::Invalid(format!(
            "stream {stream:?} is not deleted, so it cannot be restored"
        ))),
        (_, Some(position)) => Err(AppendError::StreamDeleted {
            stream: stream.to_owned(),
            position,
        }),
        (STREAM_DELETED_TYPE, None) => Ok(Some(position)),
        (_, None) => Ok(None),
    }
}

/// Checks what can be checked without the log's state (counts, names, sizes), so that bad
/// input never reaches a backend's writer.
pub(crate) fn validate(
    groups: &[StreamAppend],
    max_batch_events: usize,
    max_event_bytes: usize,
) -> Result<(), AppendError> {
    let total: usize = groups.iter().map(|g| g.events.len()).sum();
    if total == 0 {
        return Err(AppendError::Invalid(
            "the append has no events; send at least one".into(),
        ));
    }
    if total > max_batch_events {
        return Err(AppendError::Invalid(format!(
            "the append has {total} events, more than the limit of {}; split it",
            max_batch_events
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
            if size > max_event_bytes {
                return Err(AppendError::Invalid(format!(
                    "a {} event is {size} bytes (payload {}, metadata {}, source {}), more than the limit of {} bytes per event",
                    e.event_type,
                    e.payload.len(),
                    e.metadata.text_len(),
                    e.source.len(),
                    max_event_bytes
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod open_tests {
    /// A database another handle still holds opens once that handle lets go, within the
    /// wait; one held for longer is an error naming the lock.
    #[test]
    fn open_sled_waits_for_a_lock_being_released() {
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path().join("db"));
        let held = config.open().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(held);
        });
        let db = super::open_sled(&config).expect("opens once the other handle is gone");
        t.join().unwrap();
        drop(db);
        let _held = config.open().unwrap();
        let e = super::open_sled(&config).unwrap_err().to_string();
        assert!(e.contains("could not acquire lock"), "{e}");
    }
}
