//! What listing the log's streams asks for and answers ([`EventLog::list_streams`]).
//!
//! [`EventLog::list_streams`]: super::EventLog::list_streams

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Most streams one listing returns; larger limits are clamped to it.
pub const MAX_STREAM_LIST: usize = 1000;

/// One stream as a listing reports it: its version and where its first and last events
/// are, in the log and in time.
///
/// More fields may be added, so build it with the log, not by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamInfo {
    /// The stream's name.
    pub stream: String,
    /// The stream's version: its number of events, the version its next event gets.
    pub version: u64,
    /// Position of the stream's first event (version 0).
    pub first_position: u64,
    /// Position of the stream's last event (version `version - 1`).
    pub last_position: u64,
    /// When the first event was appended.
    pub first_timestamp: DateTime<Utc>,
    /// When the last event was appended.
    pub last_timestamp: DateTime<Utc>,
    /// True when the stream is deleted (and not restored since).
    pub deleted: bool,
    /// The position of the tombstone that deleted it, when deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<u64>,
}

/// Which streams a listing returns: names starting with `prefix`, strictly after `after`,
/// in name order (by the bytes of the names), at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamListQuery {
    /// Only names starting with this; empty for every stream.
    pub prefix: String,
    /// Only names after this one (the `next` of the previous page).
    pub after: Option<String>,
    /// Most streams to return (at least one is asked for; at most [`MAX_STREAM_LIST`]).
    pub limit: usize,
}

/// A page of streams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamList {
    /// The streams, in name order.
    pub streams: Vec<StreamInfo>,
    /// The last name of this page when more streams match after it (pass it as `after`);
    /// `None` when this page holds the last match.
    pub next: Option<String>,
}
