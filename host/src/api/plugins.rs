//! Plugin and projection endpoints: load, list, unload, read state, query, time travel.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::ApiQuery;
use super::{ApiError, AppState};
use crate::registry::{Registry, RegistryError};

pub(super) fn registry(st: &AppState) -> Result<&Arc<Registry>, ApiError> {
    st.registry.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "plugins_disabled",
            "this host runs without plugins",
        )
    })
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => ApiError::bad_request("invalid_plugin", m),
            RegistryError::Refused(m) => {
                ApiError::new(StatusCode::FORBIDDEN, "refused_by_policy", m)
            }
            e @ RegistryError::NotFound(_) => {
                ApiError::not_found(format!("{e}; see GET /v1/plugins"))
            }
            e @ RegistryError::DeadLetterNotFound(_) => {
                ApiError::not_found(format!("{e}; see GET /v1/dlq"))
            }
            RegistryError::Plugin(p @ crate::plugin::PluginError::Load { .. }) => {
                ApiError::bad_request("invalid_plugin", p.to_string())
            }
            RegistryError::Plugin(p) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "plugin_failed",
                p.to_string(),
            ),
            RegistryError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            e @ RegistryError::NotHere(..) => ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "runs_elsewhere",
                e.to_string(),
            ),
            RegistryError::NotReached(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "position_not_reached", m)
            }
            // The host's own storage (plugin stores, the data directory, the compile cache):
            // not the request's fault.
            e @ RegistryError::Storage(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_failed",
                e.to_string(),
            ),
        }
    }
}

/// How a `PUT` replaces a loaded version: `switch=auto|manual`, `shadow`, `keep_state`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PutQuery {
    #[serde(default)]
    switch: crate::registry::Switch,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    keep_state: bool,
}

/// `PUT /v1/plugins/{name}[?switch=manual|&shadow=true|&keep_state=true]`: multipart with
/// parts `manifest` (TOML) and `wasm`, and optionally `config` (a JSON object of strings
/// over the manifest's `[config]`) and `grants` (a JSON array of capabilities:
/// `"http:HOST:PORT"`, `"clock"`, `"random"`).
pub(super) async fn put_plugin(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<PutQuery>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let reg = registry(&st)?;
    reg.check_hot_load().map_err(ApiError::from)?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::bad_request(
            "bad_body",
            format!(
                "expected multipart/form-data with parts manifest and wasm: {}",
                e.body_text()
            ),
        )
    })?;
    let (mut manifest, mut wasm) = (None, None);
    let mut options = crate::registry::LoadOptions::default();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| upload_error(&st, "the upload", e))?
    {
        let part = field.name().unwrap_or_default().to_owned();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| upload_error(&st, &format!("part {part:?}"), e))?;
        match part.as_str() {
            "manifest" => {
                manifest = Some(String::from_utf8(bytes.to_vec()).map_err(|_| {
                    ApiError::bad_request("invalid_plugin", "the manifest is not UTF-8 text")
                })?)
            }
            "wasm" => wasm = Some(bytes.to_vec()),
            "config" => {
                // The error names where, never what: values may be secrets.
                options.config =
                    serde_json::from_slice(&bytes).map_err(|e: serde_json::Error| {
                        ApiError::bad_request(
                            "invalid_plugin",
                            format!(
                                "the config part must be a JSON object of strings (it is not, at \
                             line {} column {})",
                                e.line(),
                                e.column()
                            ),
                        )
                    })?
            }
            "grants" => {
                let caps: Vec<String> = serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::bad_request(
                        "invalid_plugin",
                        format!(
                            "the grants part must be a JSON array of capabilities \
                             (\"http:HOST:PORT\", \"clock\", \"random\"): {e}"
                        ),
                    )
                })?;
                for cap in &caps {
                    options
                        .grants
                        .add(cap)
                        .map_err(|e| ApiError::bad_request("invalid_plugin", e))?;
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    "bad_body",
                    format!(
                        "unexpected part {other:?}; send manifest and wasm, and optionally \
                         config and grants"
                    ),
                ));
            }
        }
    }
    let (Some(manifest), Some(wasm)) = (manifest, wasm) else {
        return Err(ApiError::bad_request(
            "bad_body",
            "send both parts: manifest (TOML) and wasm (the component)",
        ));
    };
    let parsed = crate::plugin::Manifest::parse(&manifest)
        .map_err(|e| ApiError::bad_request("invalid_plugin", e.to_string()))?;
    if parsed.name != name {
        return Err(ApiError::bad_request(
            "invalid_plugin",
            format!(
                "the manifest names the plugin {:?} but the URL says {name:?}",
                parsed.name
            ),
        ));
    }
    let upgrade = crate::registry::Upgrade {
        switch: q.switch,
        shadow: q.shadow,
        keep_state: q.keep_state,
    };
    let info = reg
        .load(&manifest, wasm, true, options, upgrade)
        .await
        .map_err(ApiError::from)?;
    Ok((StatusCode::OK, Json(info)).into_response())
}

/// 413 for an upload over the body limit, 400 for any other unreadable one.
fn upload_error(
    st: &AppState,
    what: &str,
    e: axum::extract::multipart::MultipartError,
) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(format!(
            "reading {what}: the upload is over the limit of {} bytes per request",
            st.config.max_body_bytes
        ))
    } else {
        ApiError::bad_request("bad_body", format!("reading {what}: {}", e.body_text()))
    }
}

pub(super) async fn list_plugins(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let reg = registry(&st)?;
    Ok(Json(json!({"plugins": reg.list().await})))
}

pub(super) async fn get_plugin(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let reg = registry(&st)?;
    Ok(Json(reg.info(&name).await.map_err(ApiError::from)?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteQuery {
    #[serde(default)]
    purge: bool,
}

pub(super) async fn delete_plugin(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<Json<Value>, ApiError> {
    let reg = registry(&st)?;
    reg.check_hot_load().map_err(ApiError::from)?;
    reg.unload(&name, q.purge).await.map_err(ApiError::from)?;
    Ok(Json(json!({"unloaded": name, "state_purged": q.purge})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateQuery {
    key: Option<String>,
    prefix: Option<String>,
    at: Option<u64>,
    limit: Option<usize>,
    version: Option<u64>,
    stream: Option<String>,
    min_position: Option<u64>,
    timeout_ms: Option<u64>,
}

/// `min_position` and `timeout_ms` of a read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReadQuery {
    min_position: Option<u64>,
    timeout_ms: Option<u64>,
    at: Option<u64>,
    version: Option<u64>,
    stream: Option<String>,
}

/// How long a read waits for `min_position` by default, and at most.
const READ_WAIT_MS: (u64, u64) = (5_000, 30_000);

fn read_wait(timeout_ms: Option<u64>) -> std::time::Duration {
    std::time::Duration::from_millis(timeout_ms.unwrap_or(READ_WAIT_MS.0).min(READ_WAIT_MS.1))
}

/// The JSON of where a read stands, merged into its reply.
fn with_at(mut reply: Value, at: crate::registry::ReadAt) -> Value {
    reply["position"] = json!(at.position);
    reply["version"] = json!(at.version);
    reply["component_hash"] = json!(at.component_hash);
    reply
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogsQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/plugins/{name}/logs[?after=SEQ][&limit=N]`: what the plugin printed to stdout and
/// stderr and sent through the `log` import, oldest first, from its bounded buffer; `next`
/// is the `after` of the following read, `dropped` the lines the buffer let go.
pub(super) async fn get_logs(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> Result<Json<crate::plugin::LogPage>, ApiError> {
    let reg = registry(&st)?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    Ok(Json(reg.logs(&name, q.after.unwrap_or(0), limit).await?))
}

/// Stored state is JSON text by convention; anything else is returned as a string.
fn as_json(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

/// The past position a read asks for: `at=POSITION`, or `version=N` of `stream` (by
/// default the key: a projection keyed by stream).
async fn past(
    reg: &Registry,
    at: Option<u64>,
    version: Option<u64>,
    stream: Option<&str>,
) -> Result<Option<u64>, ApiError> {
    match (at, version, stream) {
        (Some(_), Some(_), _) => Err(ApiError::bad_request(
            "invalid_query",
            "give at=POSITION or version=N (with stream=S), not both",
        )),
        (at, None, None) => Ok(at),
        (None, Some(v), Some(stream)) => Ok(Some(reg.position_of_version(stream, v).await?)),
        (None, Some(_), None) => Err(ApiError::bad_request(
            "invalid_query",
            "version=N needs the stream it counts in: stream=S (a key read defaults to the key)",
        )),
        (_, None, Some(_)) => Err(ApiError::bad_request(
            "invalid_query",
            "stream=S goes with version=N",
        )),
    }
}

/// `GET /v1/projections/{name}/state?key=K` or `?prefix=P[&limit=N]`, now (with
/// `min_position`) or in the past (`at=POSITION`, or `version=N[&stream=S]`).
pub(super) async fn get_state(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<StateQuery>,
) -> Result<Json<Value>, ApiError> {
    let reg = registry(&st)?;
    let wait = read_wait(q.timeout_ms);
    let stream = q.stream.as_deref().or(q.version.and(q.key.as_deref()));
    let at = past(reg, q.at, q.version, stream).await?;
    if at.is_some() && q.min_position.is_some() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "give at=POSITION (a past state) or min_position=POSITION (the current state once it reflects that position), not both",
        ));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    match (q.key, q.prefix, at) {
        (Some(key), None, None) => {
            let (value, at) = reg
                .state(&name, &key, q.min_position, wait)
                .await
                .map_err(ApiError::from)?;
            match value {
                Some(v) => Ok(Json(with_at(json!({"key": key, "value": as_json(v)}), at))),
                None => Err(ApiError::not_found(format!(
                    "projection {name:?} has no state under key {key:?} (at position {}, version {})",
                    at.position, at.version
                ))),
            }
        }
        (None, Some(prefix), None) => {
            let (items, at) = reg
                .state_prefix(&name, &prefix, limit, q.min_position, wait)
                .await
                .map_err(ApiError::from)?;
            Ok(Json(with_at(
                json!({"prefix": prefix, "items": items_json(items)}),
                at,
            )))
        }
        (Some(key), None, Some(at)) => {
            let past = reg.state_at(&name, at).await.map_err(ApiError::from)?;
            Ok(Json(json!({
                "key": key,
                "at": at,
                "value": past.get(&key).map(as_json),
                "replayed_from": past.replayed_from,
            })))
        }
        (None, Some(prefix), Some(at)) => {
            let past = reg.state_at(&name, at).await.map_err(ApiError::from)?;
            Ok(Json(json!({
                "prefix": prefix,
                "at": at,
                "items": items_json(past.scan(&prefix, limit)),
                "replayed_from": past.replayed_from,
            })))
        }
        _ => Err(ApiError::bad_request(
            "invalid_query",
            "give key=K or prefix=P, now or with at=POSITION or version=N",
        )),
    }
}

fn items_json(items: Vec<(String, String)>) -> Vec<Value> {
    items
        .into_iter()
        .map(|(k, v)| json!({"key": k, "value": as_json(v)}))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChangesQuery {
    from: u64,
    to: u64,
    sample: Option<usize>,
}

/// `GET /v1/projections/{name}/diff?from=P&to=Q[&sample=N]`: what changed in the state
/// between right after `from` and right after `to`.
pub(super) async fn get_changes(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ChangesQuery>,
) -> Result<Response, ApiError> {
    let reg = registry(&st)?;
    let sample = q.sample.unwrap_or(10).min(1_000);
    Ok(Json(reg.changes(&name, q.from, q.to, sample).await?).into_response())
}

/// `POST /v1/projections/{name}/query`: the body is passed to the plugin's `query` as text;
/// a JSON answer is returned as JSON.
/// The text a query body carries: a JSON string's contents, any other JSON value as its
/// JSON text, and an empty body as empty text.
fn query_request(body: &[u8]) -> Result<String, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the query must be JSON (a string is passed to the plugin as its text): {e}"),
        )
    })?;
    Ok(match value {
        Value::String(s) => s,
        other => other.to_string(),
    })
}

pub(super) async fn post_query(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let reg = registry(&st)?;
    let request = query_request(&body)?;
    if let Some(at) = past(reg, q.at, q.version, q.stream.as_deref()).await? {
        let past = reg.state_at(&name, at).await?;
        let answer = past.query(request).await?;
        return Ok(Json(
            json!({"answer": as_json(answer), "at": at, "replayed_from": past.replayed_from}),
        ));
    }
    let (answer, at) = reg
        .query(&name, request, q.min_position, read_wait(q.timeout_ms))
        .await
        .map_err(ApiError::from)?;
    Ok(Json(with_at(json!({"answer": as_json(answer)}), at)))
}

/// `POST /v1/plugins/{name}/promote`: the candidate or shadow run, once caught up, becomes
/// the live version.
pub(super) async fn promote(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let reg = registry(&st)?;
    Ok(Json(reg.promote(&name).await?).into_response())
}

/// `POST /v1/plugins/{name}/rollback`: the version the last switch replaced is live again.
pub(super) async fn rollback(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let reg = registry(&st)?;
    Ok(Json(reg.rollback(&name).await?).into_response())
}

/// `POST /v1/plugins/{name}/discard`: drops the candidate, shadow or previous version with
/// its state.
pub(super) async fn discard(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let reg = registry(&st)?;
    Ok(Json(reg.discard(&name).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResetQuery {
    #[serde(default)]
    switch: crate::registry::Switch,
}

/// `POST /v1/plugins/{name}/reset[?switch=manual]`: rebuilds a projection from the start
/// beside the live state, blue/green like an upgrade.
pub(super) async fn reset(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ResetQuery>,
) -> Result<Response, ApiError> {
    let reg = registry(&st)?;
    Ok(Json(reg.reset(&name, q.switch).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VerifyQuery {
    sample: Option<usize>,
}

/// `POST /v1/plugins/{name}/verify[?sample=N]`: replays the projection up to its
/// checkpoint and compares the replay with the live state.
pub(super) async fn verify(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<VerifyQuery>,
) -> Result<Response, ApiError> {
    let reg = registry(&st)?;
    let sample = q.sample.unwrap_or(10).min(1_000);
    Ok(Json(reg.verify(&name, sample).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiffQuery {
    sample: Option<usize>,
    timeout_ms: Option<u64>,
}

/// `GET /v1/plugins/{name}/diff[?sample=N][&timeout_ms=T]`: the live state against the
/// version kept beside it, at one checkpoint.
pub(super) async fn diff(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<DiffQuery>,
) -> Result<Response, ApiError> {
    let reg = registry(&st)?;
    let sample = q.sample.unwrap_or(10).min(1_000);
    let diff = reg.diff(&name, sample, read_wait(q.timeout_ms)).await?;
    Ok(Json(diff).into_response())
}
