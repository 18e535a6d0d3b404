//! A stream's lifecycle, for operators: archive it to files, delete it (a tombstone that
//! projections fold; reads answer 410 and appends are refused), erase its events from
//! disk for good (`?hard=true`), and restore it.

use std::io::Write;
use std::path::{Path as FsPath, PathBuf};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::extract::ApiQuery;
use super::{ApiError, AppState, stream_name};
use crate::event::{EventType, NewEvent, Payload};
use crate::log::{
    ExpectedVersion, LogError, STREAM_DELETED_TYPE, STREAM_RESTORED_TYPE, StreamAppend,
};

/// The 410 a read of or an append to a deleted stream gets.
pub(super) fn gone(stream: &str, position: u64) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "stream_deleted",
        format!(
            "stream {stream:?} was deleted (its tombstone is at position {position}); an operator can restore it with POST /v1/streams/{{stream}}/restore"
        ),
    )
    .with("stream", json!(stream))
    .with("position", json!(position))
}

fn unavailable(e: LogError) -> ApiError {
    ApiError::unavailable(e.to_string())
}

/// The 410 for `stream` when it is deleted.
pub(super) async fn refuse_if_deleted(st: &AppState, stream: &str) -> Result<(), ApiError> {
    match st.log.deletion(stream).await.map_err(unavailable)? {
        Some(position) => Err(gone(stream, position)),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteQuery {
    #[serde(default)]
    hard: bool,
}

/// Appends the host's own event `event_type` to `stream`; its position.
async fn append_marker(
    st: &AppState,
    stream: &str,
    event_type: &str,
    payload: Value,
) -> Result<u64, ApiError> {
    let event = NewEvent {
        id: None,
        event_type: EventType::new(event_type).expect("a valid type"),
        source: "evhost".into(),
        payload: Payload::trusted(&payload.to_string()),
        metadata: Default::default(),
    };
    let mut done = st
        .log
        .append(vec![StreamAppend {
            stream: stream.to_owned().into(),
            expected: ExpectedVersion::Any,
            events: vec![event],
        }])
        .await
        .map_err(ApiError::from)?;
    Ok(done.pop().expect("one group in, one out").positions[0])
}

/// `DELETE /v1/streams/{stream}[?hard=true]`: appends the tombstone (once; deleting a
/// deleted stream answers the first deletion), and with `hard` erases the stream's other
/// events from storage.
pub(super) async fn delete_stream(
    State(st): State<AppState>,
    Path(stream): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<Json<Value>, ApiError> {
    stream_name(&stream)?;
    if st.log.stream_version(&stream).await.map_err(unavailable)? == 0 {
        return Err(ApiError::not_found(format!(
            "stream {stream:?} has no events"
        )));
    }
    let (tombstone, already) = match st.log.deletion(&stream).await.map_err(unavailable)? {
        Some(p) => (p, true),
        None => {
            let appended =
                append_marker(&st, &stream, STREAM_DELETED_TYPE, json!({"hard": q.hard})).await;
            match appended {
                Ok(p) => (p, false),
                // Deleted meanwhile by another request: that deletion stands.
                Err(_) if let Ok(Some(p)) = st.log.deletion(&stream).await => (p, true),
                Err(e) => return Err(e),
            }
        }
    };
    let mut body = json!({
        "stream": stream,
        "deleted_at": tombstone,
        "already_deleted": already,
        "hard": q.hard,
    });
    if q.hard {
        let erased = st.log.erase(&stream).await.map_err(unavailable)?;
        body["erased"] = json!(erased);
    }
    Ok(Json(body))
}

/// `POST /v1/streams/{stream}/restore`: re-opens a deleted stream for appends (with a
/// `evhost.stream.restored` event); its events, unless erased, read again.
pub(super) async fn restore_stream(
    State(st): State<AppState>,
    Path(stream): Path<String>,
) -> Result<Json<Value>, ApiError> {
    stream_name(&stream)?;
    let Some(tombstone) = st.log.deletion(&stream).await.map_err(unavailable)? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_deleted",
            format!("stream {stream:?} is not deleted; there is nothing to restore"),
        ));
    };
    let position = append_marker(
        &st,
        &stream,
        STREAM_RESTORED_TYPE,
        json!({"deleted_at": tombstone}),
    )
    .await
    .map_err(|e| {
        if e.status() == StatusCode::BAD_REQUEST {
            ApiError::new(
                StatusCode::CONFLICT,
                "not_deleted",
                format!("stream {stream:?} was restored meanwhile"),
            )
        } else {
            e
        }
    })?;
    Ok(Json(
        json!({"stream": stream, "restored_at": position, "deleted_at": tombstone}),
    ))
}

/// What an archive holds, written beside it as `<name>.manifest.json`.
#[derive(Debug, Serialize)]
pub(super) struct ArchiveManifest {
    /// The archived stream.
    pub stream: String,
    /// The JSON-lines file of its events, one event per line, in version order.
    pub file: PathBuf,
    /// Events in the file.
    pub events: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Versions and positions of its first and last events.
    pub first_version: u64,
    /// See `first_version`.
    pub last_version: u64,
    /// See `first_version`.
    pub first_position: u64,
    /// See `first_version`.
    pub last_position: u64,
    /// The stream's version when it was archived.
    pub stream_version: u64,
    /// When the archive was written.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A stream name as a file name: letters, digits, `-`, `_` and `.` kept, the rest
/// percent-encoded (so no name escapes the archive directory).
fn file_name(stream: &str) -> String {
    let mut out = String::new();
    for b in stream.bytes() {
        if b.is_ascii_alphanumeric() || b"-_".contains(&b) || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn sync_dir(dir: &FsPath) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// `POST /v1/streams/{stream}/archive`: writes every event of the stream (deleted or not)
/// as JSON lines into the archive directory, with a manifest of counts and a checksum, both
/// synced before the reply; replies the manifest.
pub(super) async fn archive_stream(
    State(st): State<AppState>,
    Path(stream): Path<String>,
) -> Result<Json<ArchiveManifest>, ApiError> {
    stream_name(&stream)?;
    let Some(root) = st.archive_dir.clone() else {
        return Err(ApiError::not_found("this host has no archive directory"));
    };
    let version = st.log.stream_version(&stream).await.map_err(unavailable)?;
    if version == 0 {
        return Err(ApiError::not_found(format!(
            "stream {stream:?} has no events"
        )));
    }
    let created_at = chrono::Utc::now();
    let dir = root.join(file_name(&stream));
    let name = created_at.format("%Y%m%dT%H%M%S%.6fZ").to_string();
    let file = dir.join(format!("{name}.jsonl"));
    let storage = |e: std::io::Error| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_failed",
            format!("writing the archive in {} failed: {e}", dir.display()),
        )
    };
    std::fs::create_dir_all(&dir).map_err(storage)?;
    let tmp = dir.join(format!("{name}.jsonl.tmp"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(storage)?);
    let mut hash = Sha256::new();
    let (mut events, mut bytes) = (0u64, 0u64);
    let mut first: Option<(u64, u64)> = None;
    let mut last = (0u64, 0u64);
    let mut next = 0u64;
    while next < version {
        let page = st
            .log
            .read_stream(&stream, next, 1000)
            .await
            .map_err(unavailable)?;
        let Some(end) = page.last() else { break };
        next = end.version + 1;
        for e in &page {
            let mut line = serde_json::to_vec(e).expect("an event encodes");
            line.push(b'\n');
            hash.update(&line);
            out.write_all(&line).map_err(storage)?;
            events += 1;
            bytes += line.len() as u64;
            first.get_or_insert((e.version, e.position));
            last = (e.version, e.position);
        }
    }
    let f = out.into_inner().map_err(|e| storage(e.into_error()))?;
    f.sync_all().map_err(storage)?;
    std::fs::rename(&tmp, &file).map_err(storage)?;
    let (first_version, first_position) = first.unwrap_or_default();
    let manifest = ArchiveManifest {
        stream: stream.clone(),
        file: file.clone(),
        events,
        bytes,
        sha256: format!("{:x}", hash.finalize()),
        first_version,
        last_version: last.0,
        first_position,
        last_position: last.1,
        stream_version: version,
        created_at,
    };
    let mpath = dir.join(format!("{name}.manifest.json"));
    let mtmp = dir.join(format!("{name}.manifest.json.tmp"));
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest encodes");
    let mut mf = std::fs::File::create(&mtmp).map_err(storage)?;
    mf.write_all(&text).map_err(storage)?;
    mf.sync_all().map_err(storage)?;
    std::fs::rename(&mtmp, &mpath).map_err(storage)?;
    sync_dir(&dir).map_err(storage)?;
    tracing::info!(stream, events, file = %file.display(), "archived a stream");
    Ok(Json(manifest))
}

#[cfg(test)]
mod tests {
    use super::file_name;

    #[test]
    fn stream_names_become_safe_file_names() {
        assert_eq!(file_name("orders-1"), "orders-1");
        assert_eq!(file_name("../etc"), "%2E.%2Fetc");
        assert_eq!(file_name(".."), "%2E.");
        assert_eq!(file_name("a/b c"), "a%2Fb%20c");
        assert_eq!(file_name("user.42"), "user.42");
    }
}
