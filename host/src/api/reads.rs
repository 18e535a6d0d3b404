//! Read endpoints: events by position (and by time), a stream's events, the bus history.
//!
//! Responses are typed structs serialized straight to the body, so a payload's text goes
//! out as it was appended and is never built into a `serde_json::Value` (whose depth limit
//! made a deeply nested payload panic every read covering it, and which cost ~17x the
//! response in memory). One response holds at most [`ApiConfig::max_read_bytes`] of event
//! text: a read past it returns fewer events, with `next` at the first one left out.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::by_time::{parse_time, span};
use super::extract::ApiQuery;
use super::{ApiConfig, ApiError, AppState, limit, patterns, stream_name};
use crate::event::Event;
use crate::log::ReadFilter;

/// Bytes an event's envelope adds to its text in a response (keys, position, version,
/// timestamp, quoting), counted toward the read bound.
const ENVELOPE_BYTES: usize = 160;

/// An event's share of a response's byte bound.
fn response_bytes(e: &Event) -> usize {
    e.text_len() + ENVELOPE_BYTES
}

/// Collects events under a read's byte bound.
pub(super) struct Bounded {
    pub(super) events: Vec<Event>,
    used: usize,
    bound: usize,
    /// Largest share one event can have, by the configured event limit.
    per_event: usize,
}

impl Bounded {
    pub(super) fn new(cfg: &ApiConfig) -> Self {
        Self {
            events: Vec::new(),
            used: 0,
            bound: cfg.max_read_bytes,
            per_event: cfg.max_event_bytes.saturating_add(ENVELOPE_BYTES + 512),
        }
    }

    /// How many events the next read of the log may fetch: as many as fit in what is left
    /// of the bound even if each were as large as an event can be, and at least one. So a
    /// read never holds more than the bound plus one event.
    pub(super) fn step(&self, wanted: usize) -> usize {
        (self.bound.saturating_sub(self.used) / self.per_event).clamp(1, wanted.max(1))
    }

    /// Adds `e` unless it would take the response over the bound (the first event always
    /// fits); false when it did not.
    pub(super) fn push(&mut self, e: Event) -> bool {
        let size = response_bytes(&e);
        if !self.events.is_empty() && self.used.saturating_add(size) > self.bound {
            return false;
        }
        self.used += size;
        self.events.push(e);
        true
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReadQuery {
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
    #[serde(rename = "type")]
    pattern: Option<String>,
    stream: Option<String>,
    correlation_id: Option<String>,
    source: Option<String>,
    /// Only events appended at or after this time (RFC 3339 or microseconds).
    since: Option<String>,
    /// Only events appended before this time.
    until: Option<String>,
}

/// The body of `GET /v1/events`.
#[derive(Serialize)]
struct EventsPage<'a> {
    events: &'a [Event],
    next: u64,
    head: u64,
    /// With `until`: true once the read has reached an event at or after it, so no later
    /// page holds more (absent without `until`).
    #[serde(skip_serializing_if = "Option::is_none")]
    until_reached: Option<bool>,
}

/// The filter of a read: a type pattern list (all types when absent) and the exact-match
/// fields.
fn filter_of(
    pattern: Option<&str>,
    stream: Option<String>,
    correlation_id: Option<String>,
    source: Option<String>,
) -> Result<ReadFilter, ApiError> {
    Ok(ReadFilter {
        types: pattern.map(|p| patterns(Some(p))).transpose()?,
        stream,
        correlation_id,
        source,
    })
}

/// `GET /v1/events`: events by position, at most `limit` and at most the byte bound;
/// `since` and `until` narrow the positions to a span of time (found by binary search, as
/// timestamps never decrease along the log).
pub(super) async fn read_events(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> Result<Response, ApiError> {
    let since = q
        .since
        .as_deref()
        .map(|v| parse_time("since", v))
        .transpose()?;
    let until = q
        .until
        .as_deref()
        .map(|v| parse_time("until", v))
        .transpose()?;
    let filter = filter_of(q.pattern.as_deref(), q.stream, q.correlation_id, q.source)?;
    let limit = limit(q.limit);
    let span = span(&*st.log, q.from, since, until).await?;
    let end = span.end.unwrap_or(u64::MAX);
    let mut out = Bounded::new(&st.config);
    let mut next = span.from;
    'pages: while out.events.len() < limit && next < end {
        let step = out.step(limit - out.events.len());
        let page = match st.log.read_to(next, end, step, &filter).await {
            Ok(page) => page,
            // A later step failed (a damaged chunk, say): answer what was read before it,
            // and the next read starting there gets the error.
            Err(_) if !out.events.is_empty() => break,
            Err(e) => return Err(ApiError::unavailable(e.to_string())),
        };
        let full = page.events.len() == step;
        for e in page.events {
            let position = e.position;
            if !out.push(e) {
                next = position;
                break 'pages;
            }
        }
        next = page.next;
        // A short page reached the head or the most positions one read examines.
        if !full {
            break;
        }
    }
    Ok(Json(EventsPage {
        events: &out.events,
        next,
        head: st.log.head(),
        until_reached: until.map(|_| next >= end),
    })
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamQuery {
    from_version: Option<u64>,
    limit: Option<usize>,
    /// `forward` (the default) or `backward`.
    direction: Option<String>,
    /// Where a backward read starts.
    from: Option<u64>,
}

/// Which way a stream is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward,
    Backward,
}

/// The direction of a stream read, refusing the start parameter of the other direction.
fn direction(q: &StreamQuery) -> Result<Direction, ApiError> {
    let bad = |m: String| ApiError::bad_request("invalid_query", m);
    match q.direction.as_deref() {
        None | Some("forward") if q.from.is_some() => Err(bad(
            "from= starts a backward read (direction=backward); a forward read starts at from_version=".into(),
        )),
        None | Some("forward") => Ok(Direction::Forward),
        Some("backward") if q.from_version.is_some() => Err(bad(
            "from_version= starts a forward read; a backward read (direction=backward) starts at from=".into(),
        )),
        Some("backward") => Ok(Direction::Backward),
        Some(other) => Err(bad(format!(
            "direction={other:?} is not a direction: send forward (the default) or backward"
        ))),
    }
}

/// The body of `GET /v1/streams/{stream}`.
#[derive(Serialize)]
struct StreamPage<'a> {
    stream: &'a str,
    events: &'a [Event],
    /// The stream's version: one past its last event.
    version: u64,
    /// Where the next read of the stream starts (`from_version`).
    next_version: u64,
}

/// `GET /v1/streams/{stream}`: a stream's events by version, under the same bounds; with
/// `direction=backward`, newest first (see `streams::read_backward`).
pub(super) async fn read_stream(
    State(st): State<AppState>,
    Path(stream): Path<String>,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    stream_name(&stream)?;
    let direction = direction(&q)?;
    super::stream_admin::refuse_if_deleted(&st, &stream).await?;
    let version = st
        .log
        .stream_version(&stream)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    if version == 0 {
        return Err(ApiError::not_found(format!(
            "stream {stream:?} has no events"
        )));
    }
    let limit = limit(q.limit);
    if direction == Direction::Backward {
        return super::streams::read_backward(&st, &stream, version, q.from, limit).await;
    }
    let from_version = q.from_version.unwrap_or(0);
    let mut out = Bounded::new(&st.config);
    let mut next = from_version;
    'pages: while out.events.len() < limit && next < version {
        let step = out.step(limit - out.events.len());
        let events = match st.log.read_stream(&stream, next, step).await {
            Ok(events) => events,
            Err(_) if !out.events.is_empty() => break,
            Err(e) => return Err(ApiError::unavailable(e.to_string())),
        };
        let full = events.len() == step;
        for e in events {
            let v = e.version;
            if !out.push(e) {
                break 'pages;
            }
            next = v + 1;
        }
        if !full {
            break;
        }
    }
    Ok(Json(StreamPage {
        stream: &stream,
        events: &out.events,
        version,
        next_version: next.max(from_version),
    })
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    #[serde(rename = "type")]
    pattern: Option<String>,
    stream: Option<String>,
    correlation_id: Option<String>,
    source: Option<String>,
    limit: Option<usize>,
}

/// The body of `GET /v1/bus/history`.
#[derive(Serialize)]
struct HistoryPage<'a> {
    events: Vec<&'a Event>,
}

/// `GET /v1/bus/history`: the most recent events the bus keeps, newest first, at most
/// `limit` and at most the byte bound.
pub(super) async fn history(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Response, ApiError> {
    let filter = filter_of(q.pattern.as_deref(), q.stream, q.correlation_id, q.source)?;
    let events = st.bus.history(&filter, limit(q.limit));
    let mut used = 0usize;
    let kept: Vec<&Event> = events
        .iter()
        .map(|e| &**e)
        .take_while(|e| {
            let first = used == 0;
            used = used.saturating_add(response_bytes(e));
            first || used <= st.config.max_read_bytes
        })
        .collect();
    Ok(Json(HistoryPage { events: kept }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_fits_the_rest_of_the_bound_and_is_at_least_one() {
        let cfg = ApiConfig {
            max_event_bytes: 1000,
            max_read_bytes: 10_000,
            ..ApiConfig::default()
        };
        let mut b = Bounded::new(&cfg);
        let per = b.per_event;
        assert_eq!(b.step(100), 10_000 / per);
        assert_eq!(b.step(2), 2);
        b.used = 9_999;
        assert_eq!(b.step(100), 1);
    }
}
