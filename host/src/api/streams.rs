//! Finding streams: `GET /v1/streams` (names in order, by prefix, paged) and the backward
//! read of `GET /v1/streams/{stream}?direction=backward` (newest first).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::extract::ApiQuery;
use super::reads::Bounded;
use super::{ApiError, AppState};
use crate::event::Event;
use crate::log::{MAX_STREAM_LIST, StreamInfo, StreamListQuery};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

/// The body of `GET /v1/streams`.
#[derive(Serialize)]
struct StreamsPage<'a> {
    streams: &'a [StreamInfo],
    /// The name to send as `after` for the next page; `null` on the last page.
    next: Option<&'a str>,
}

/// A 400 naming the query parameter `name` when `value` holds a control character, which
/// no stream name can (so it could match nothing).
fn name_part(name: &str, value: &str) -> Result<(), ApiError> {
    if value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("{name}={value:?} holds a control character, which no stream name has"),
        ));
    }
    Ok(())
}

/// `GET /v1/streams`: streams in name order with their versions, first and last positions
/// and timestamps; `prefix` filters, `after` pages, `limit` (default 100) is clamped to
/// 1..=[`MAX_STREAM_LIST`].
pub(super) async fn list_streams(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    name_part("prefix", &q.prefix)?;
    if let Some(after) = &q.after {
        name_part("after", after)?;
    }
    let listing = st
        .log
        .list_streams(&StreamListQuery {
            prefix: q.prefix,
            after: q.after,
            limit: q.limit.unwrap_or(100).clamp(1, MAX_STREAM_LIST),
        })
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(StreamsPage {
        streams: &listing.streams,
        next: listing.next.as_deref(),
    })
    .into_response())
}

/// The body of a backward read of a stream.
#[derive(Serialize)]
struct BackwardPage<'a> {
    stream: &'a str,
    direction: &'static str,
    /// Newest first.
    events: &'a [Event],
    /// The stream's version: one past its last event.
    version: u64,
    /// The next older version to read (send it as `from`); `null` once version 0 is read.
    next: Option<u64>,
    /// True when this page reached the stream's first event (version 0).
    start_reached: bool,
}

/// Reads `stream` (at `version`, which is above 0) newest first from version `from` (the
/// last when absent or past it), at most `limit` events and the byte bound.
pub(super) async fn read_backward(
    st: &AppState,
    stream: &str,
    version: u64,
    from: Option<u64>,
    limit: usize,
) -> Result<Response, ApiError> {
    let last = version - 1;
    let mut out = Bounded::new(&st.config);
    let mut next = Some(from.unwrap_or(last).min(last));
    'pages: while let Some(at) = next
        && out.events.len() < limit
    {
        let step = out.step(limit - out.events.len());
        let events = match st.log.read_stream_backward(stream, at, step).await {
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
            next = v.checked_sub(1);
        }
        if !full {
            break;
        }
    }
    Ok(Json(BackwardPage {
        stream,
        direction: "backward",
        events: &out.events,
        version,
        next,
        start_reached: next.is_none(),
    })
    .into_response())
}
