//! The HTTP API: JSON over axum, errors as `{"error": {"code", "message"}}`.
//!
//! Nothing below this module knows about HTTP. Every handler validates its whole input
//! before calling the log, so a request that fails writes nothing.

mod access;
mod by_time;
mod dashboard;
mod error;
mod extract;
mod failures;
mod flows;
mod metrics;
mod plugins;
mod reads;
mod serve;
mod stream_admin;
mod streams;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

pub use access::{Access, AllowedHosts, Role, TokenError, Tokens};
pub use error::ApiError;
pub use serve::{Closing, ServeConfig};

use crate::bus::{Bus, Start};
use crate::event::{EventType, Metadata, NewEvent, Payload, PayloadError};
use crate::log::{AppendError, EventLog, ExpectedVersion, ReadFilter, StreamAppend};
use crate::pattern::PatternSet;
use extract::{ApiQuery, Body};

/// Most events returned by one read.
pub const MAX_READ_LIMIT: usize = 10_000;

/// Most bytes of event text in one read response, by default (see [`ApiConfig`]).
pub const MAX_READ_BYTES: usize = 16 * 1024 * 1024;

/// Limits the API enforces on requests.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest event, in bytes of text: payload, metadata keys and values, source, id and
    /// type (413 above it).
    pub max_event_bytes: usize,
    /// Largest request body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Most events per append request (413 above it).
    pub max_batch_events: usize,
    /// Most bytes of event text in one read response; a read past it returns fewer events
    /// (always at least one) with `next` at the first left out.
    pub max_read_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_event_bytes: crate::event::DEFAULT_MAX_EVENT_BYTES,
            max_body_bytes: 32 * 1024 * 1024,
            max_batch_events: 10_000,
            max_read_bytes: MAX_READ_BYTES,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    log: Arc<dyn EventLog>,
    bus: Bus,
    config: Arc<ApiConfig>,
    registry: Option<Arc<crate::registry::Registry>>,
    flows: Option<crate::plugin::PluginStore>,
    alerts: Option<crate::alerts::Alerts>,
    schemas: Option<crate::schemas::Schemas>,
    closing: Closing,
    access: Arc<Access>,
    archive_dir: Option<std::path::PathBuf>,
}

impl AppState {
    /// State over `log` and `bus` with `config`'s limits.
    pub fn new(log: Arc<dyn EventLog>, bus: Bus, config: ApiConfig) -> Self {
        Self {
            log,
            bus,
            config: Arc::new(config),
            registry: None,
            flows: None,
            alerts: None,
            schemas: None,
            closing: Closing::default(),
            access: Arc::new(Access::default()),
            archive_dir: None,
        }
    }

    /// Checks appended payloads against `schemas` and serves `/v1/schemas`.
    pub fn with_schemas(mut self, schemas: crate::schemas::Schemas) -> Self {
        self.schemas = Some(schemas);
        self
    }

    /// Serves `/v1/flows` and `/v1/metrics` from the flow index's store.
    pub fn with_flows(mut self, store: crate::plugin::PluginStore) -> Self {
        self.flows = Some(store);
        self
    }

    /// Serves `/v1/alerts` and the alerts in `/metrics` from the host's alert checks.
    pub fn with_alerts(mut self, alerts: crate::alerts::Alerts) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// Checks every request against `access` (tokens, hosts, origins) before it is served.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = Arc::new(access);
        self
    }

    /// Writes stream archives (`POST /v1/streams/{stream}/archive`) under `dir`.
    pub fn with_archive_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.archive_dir = Some(dir);
        self
    }

    /// Serves the plugin endpoints from `registry`.
    pub fn with_registry(mut self, registry: Arc<crate::registry::Registry>) -> Self {
        self.registry = Some(registry);
        self
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    let access = state.access.clone();
    Router::new()
        .route("/", get(dashboard::index))
        .route("/ui/{file}", get(dashboard::file))
        .route("/health", get(health))
        .route("/v1/streams", get(streams::list_streams))
        .route(
            "/v1/streams/{stream}",
            post(append_stream)
                .get(reads::read_stream)
                .delete(stream_admin::delete_stream),
        )
        .route(
            "/v1/streams/{stream}/archive",
            post(stream_admin::archive_stream),
        )
        .route(
            "/v1/streams/{stream}/restore",
            post(stream_admin::restore_stream),
        )
        .route("/v1/events", post(append_events).get(reads::read_events))
        .route("/v1/subscribe", get(subscribe))
        .route("/v1/wait", get(wait))
        .route("/v1/bus/stats", get(stats))
        .route("/v1/bus/history", get(reads::history))
        .route("/v1/plugins", get(plugins::list_plugins))
        .route(
            "/v1/plugins/{name}",
            put(plugins::put_plugin)
                .get(plugins::get_plugin)
                .delete(plugins::delete_plugin),
        )
        .route("/v1/plugins/{name}/resume", post(failures::resume))
        .route("/v1/plugins/{name}/promote", post(plugins::promote))
        .route("/v1/plugins/{name}/rollback", post(plugins::rollback))
        .route("/v1/plugins/{name}/discard", post(plugins::discard))
        .route("/v1/plugins/{name}/diff", get(plugins::diff))
        .route("/v1/plugins/{name}/reset", post(plugins::reset))
        .route("/v1/plugins/{name}/verify", post(plugins::verify))
        .route("/v1/plugins/{name}/logs", get(plugins::get_logs))
        .route("/v1/dlq", get(failures::list_dead_letters))
        .route(
            "/v1/dlq/{id}",
            axum::routing::delete(failures::delete_dead_letter),
        )
        .route("/v1/dlq/{id}/retry", post(failures::retry_dead_letter))
        .route("/v1/schemas", get(failures::list_schemas))
        .route(
            "/v1/schemas/{pattern}",
            put(failures::put_schema).delete(failures::delete_schema),
        )
        .route("/v1/projections/{name}/state", get(plugins::get_state))
        .route("/v1/projections/{name}/query", post(plugins::post_query))
        .route("/v1/projections/{name}/diff", get(plugins::get_changes))
        .route("/v1/tools", get(flows::list_tools))
        .route("/v1/flows/{correlation_id}", get(flows::get_flow))
        .route("/v1/metrics", get(flows::get_metrics))
        .route("/metrics", get(metrics::get_metrics))
        .route("/v1/alerts", get(metrics::get_alerts))
        .fallback(|| async { ApiError::not_found("no such endpoint; see README.md for the API") })
        .route_layer(axum::middleware::from_fn(metrics::track))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(access, access::guard))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves; then ends subscriptions and
/// waits, and gives the other connections `config.shutdown_timeout` to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "HTTP API listening");
    let closing = state.closing.clone();
    serve::serve_connections(listener, router(state), config, closing, shutdown).await;
    Ok(())
}

/// `ok`; `degraded` (still 200) when stored events are damaged or an append failed on
/// storage lately; `read_only` (503) when the log refuses writes until a restart.
async fn health(State(st): State<AppState>) -> Response {
    let log = st.log.health();
    let (code, status) = if log.read_only {
        (StatusCode::SERVICE_UNAVAILABLE, "read_only")
    } else if !log.damaged.is_empty() || log.last_write_error.is_some() {
        (StatusCode::OK, "degraded")
    } else {
        (StatusCode::OK, "ok")
    };
    let body = json!({
        "status": status,
        "head": st.log.head(),
        "version": env!("CARGO_PKG_VERSION"),
        "log": log,
    });
    (code, Json(body)).into_response()
}

/// One event in an append request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody<'a> {
    #[serde(rename = "type")]
    event_type: EventType,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamAppendBody<'a> {
    #[serde(default)]
    expected_version: ExpectedVersion,
    #[serde(borrow)]
    events: Vec<EventBody<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiEventBody<'a> {
    stream: String,
    #[serde(default)]
    expected_version: ExpectedVersion,
    #[serde(rename = "type")]
    event_type: EventType,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiAppendBody<'a> {
    #[serde(borrow)]
    events: Vec<MultiEventBody<'a>>,
}

/// Parses a JSON body, turning every failure into a 400 that says what was wrong.
fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))
}

/// Parses and validates the body of `POST /v1/streams/{stream}`: the append it asks for,
/// or the error the API answers. Nothing is written either way.
pub fn parse_stream_append(
    cfg: &ApiConfig,
    stream: &str,
    body: &[u8],
) -> Result<StreamAppend, ApiError> {
    stream_name(stream)?;
    let body: StreamAppendBody = parse_json(body)?;
    check_batch(cfg, body.events.len())?;
    let events = body
        .events
        .into_iter()
        .map(|e| new_event(cfg, e.event_type, e.payload, e.metadata, e.id, e.source))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(StreamAppend {
        stream: stream.to_owned().into(),
        expected: body.expected_version,
        events,
    })
}

/// Parses and validates the body of `POST /v1/events`: one append per event.
pub fn parse_multi_append(cfg: &ApiConfig, body: &[u8]) -> Result<Vec<StreamAppend>, ApiError> {
    let body: MultiAppendBody = parse_json(body)?;
    check_batch(cfg, body.events.len())?;
    let mut groups = Vec::with_capacity(body.events.len());
    for e in body.events {
        stream_name(&e.stream)?;
        groups.push(StreamAppend {
            stream: e.stream.into(),
            expected: e.expected_version,
            events: vec![new_event(
                cfg,
                e.event_type,
                e.payload,
                e.metadata,
                e.id,
                e.source,
            )?],
        });
    }
    Ok(groups)
}

fn new_event(
    cfg: &ApiConfig,
    event_type: EventType,
    payload: &RawValue,
    metadata: Metadata,
    id: Option<String>,
    source: Option<String>,
) -> Result<NewEvent, ApiError> {
    if event_type.as_str().starts_with("evhost.") {
        return Err(ApiError::bad_request(
            "reserved_type",
            format!(
                "event types under evhost. are the host's own ({event_type} is one); give the event a type of your own"
            ),
        ));
    }
    let text = payload.get();
    crate::event::check_payload_text(text).map_err(|e| match e {
        PayloadError::TooDeep => ApiError::bad_request(
            "too_deep",
            format!("the payload of a {event_type} event cannot be stored: {e}"),
        )
        .with("max_depth", json!(crate::event::MAX_PAYLOAD_DEPTH)),
        PayloadError::Unreadable(m) => ApiError::bad_request(
            "invalid_json",
            format!("the payload of a {event_type} event is not valid JSON: {m}"),
        ),
    })?;
    if let Some(id) = &id {
        crate::event::validate_id(id)
            .map_err(|e| ApiError::bad_request("invalid_id", e.to_string()))?;
    }
    let event = NewEvent {
        id: id.map(Into::into),
        event_type,
        source: source.unwrap_or_default(),
        payload: Payload::trusted(text),
        metadata,
    };
    let size = event.text_len();
    if size > cfg.max_event_bytes {
        return Err(ApiError::too_large(format!(
            "a {} event is {size} bytes (payload {}, metadata {}, source {}), more than the limit of {} bytes per event (--max-event-bytes); the limit counts payload, metadata, source, id and type",
            event.event_type,
            event.payload.len(),
            event.metadata.text_len(),
            event.source.len(),
            cfg.max_event_bytes
        ))
        .with("max_event_bytes", json!(cfg.max_event_bytes)));
    }
    Ok(event)
}

fn check_batch(cfg: &ApiConfig, n: usize) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::bad_request(
            "empty_append",
            "the append has no events; send at least one in \"events\"",
        ));
    }
    if n > cfg.max_batch_events {
        return Err(ApiError::too_large(format!(
            "the append has {n} events, more than the limit of {}; split it",
            cfg.max_batch_events
        )));
    }
    Ok(())
}

fn stream_name(s: &str) -> Result<(), ApiError> {
    crate::event::validate_stream(s)
        .map_err(|e| ApiError::bad_request("invalid_stream", e.to_string()))
}

async fn append_stream(
    State(st): State<AppState>,
    Path(stream): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let append = parse_stream_append(&st.config, &stream, &body)?;
    check_schemas(&st, append.events.iter())?;
    let mut done = st.log.append(vec![append]).await.map_err(ApiError::from)?;
    let appended = done.pop().expect("one group in, one result out");
    Ok((StatusCode::OK, Json(appended)).into_response())
}

async fn append_events(State(st): State<AppState>, Body(body): Body) -> Result<Response, ApiError> {
    let groups = parse_multi_append(&st.config, &body)?;
    check_schemas(&st, groups.iter().flat_map(|g| &g.events))?;
    let done = st.log.append(groups).await.map_err(ApiError::from)?;
    let positions: Vec<u64> = done.iter().map(|a| a.positions[0]).collect();
    Ok(Json(json!({"positions": positions, "streams": done})).into_response())
}

/// Checks every event of an append against the schema registry, before anything is written.
fn check_schemas<'a>(
    st: &AppState,
    events: impl Iterator<Item = &'a NewEvent>,
) -> Result<(), ApiError> {
    let Some(schemas) = &st.schemas else {
        return Ok(());
    };
    for (index, e) in events.enumerate() {
        schemas
            .check(e.event_type.as_str(), e.payload.as_str())
            .map_err(|v| failures::violation(index, v))?;
    }
    Ok(())
}

impl From<AppendError> for ApiError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Conflict {
                ref stream,
                expected,
                current,
            } => ApiError::new(StatusCode::CONFLICT, "version_conflict", e.to_string())
                .with("stream", json!(stream))
                .with("expected_version", json!(expected))
                .with("current_version", json!(current)),
            AppendError::Invalid(m) => ApiError::bad_request("invalid_append", m),
            AppendError::IdInUse {
                ref stream,
                position,
                ..
            } => ApiError::new(StatusCode::CONFLICT, "id_conflict", e.to_string())
                .with("stream", json!(stream))
                .with("position", json!(position)),
            AppendError::StreamDeleted { stream, position } => {
                stream_admin::gone(&stream, position)
            }
            AppendError::Storage(e) => ApiError::unavailable(e.to_string()),
        }
    }
}

fn patterns(p: Option<&str>) -> Result<PatternSet, ApiError> {
    match p {
        None | Some("") => Ok(PatternSet::all()),
        Some(p) => PatternSet::parse_list(p)
            .map_err(|e| ApiError::bad_request("invalid_pattern", e.to_string())),
    }
}

fn limit(l: Option<usize>) -> usize {
    l.unwrap_or(100).clamp(1, MAX_READ_LIMIT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeQuery {
    pattern: Option<String>,
    from: Option<u64>,
    stream: Option<String>,
    correlation_id: Option<String>,
    source: Option<String>,
}

/// Server-Sent Events: `id` is the event's position, `data` the event as JSON. A client that
/// reconnects with `from` (or `Last-Event-ID`) set past the last id it saw misses nothing.
/// The stream ends when the host shuts down.
async fn subscribe(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<SubscribeQuery>,
) -> Result<Sse<impl Stream<Item = Result<axum::response::sse::Event, Infallible>>>, ApiError> {
    let pats = patterns(q.pattern.as_deref())?;
    let start = match (resume_after(&headers)?, q.from) {
        (Some(id), _) => Start::Position(id + 1),
        (None, Some(from)) => Start::Position(from),
        (None, None) => Start::Head,
    };
    let filter = ReadFilter {
        types: None,
        stream: q.stream,
        correlation_id: q.correlation_id,
        source: q.source,
    };
    let sub = st.bus.subscribe(pats, filter, start);
    let stream = sub
        .into_stream()
        .take_until(st.closing.closed())
        .map(|item| {
            Ok(match item {
                Ok(e) => axum::response::sse::Event::default()
                    .id(e.position.to_string())
                    .json_data(&*e)
                    .unwrap_or_else(|_| {
                        axum::response::sse::Event::default().comment("unencodable event")
                    }),
                Err(e) => axum::response::sse::Event::default()
                    .event("error")
                    .data(e.to_string()),
            })
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The position named by a `Last-Event-ID` header, if one was sent: a position the log can
/// hold (so one past it is too), or a 400.
fn resume_after(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let bad = |why: &str| {
        ApiError::bad_request(
            "invalid_last_event_id",
            format!(
                "Last-Event-ID {value:?} {why}; send the id of the last event received (a position), or use from="
            ),
        )
    };
    let id = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| bad("is not a position (a number from 0 up)"))?;
    if id == u64::MAX {
        return Err(bad("is past every position the log can hold"));
    }
    Ok(Some(id))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    pattern: Option<String>,
    timeout_ms: Option<u64>,
    stream: Option<String>,
    correlation_id: Option<String>,
    source: Option<String>,
}

/// Waits for the next matching event; 200 with it, or 408 when `timeout_ms` (default
/// 30 s, at most 5 min) passes first, or 503 when the host shuts down first.
async fn wait(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Response, ApiError> {
    let pats = patterns(q.pattern.as_deref())?;
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(300_000));
    let filter = ReadFilter {
        types: None,
        stream: q.stream,
        correlation_id: q.correlation_id,
        source: q.source,
    };
    let waited = tokio::select! {
        w = st.bus.wait_for(pats, filter, timeout) => w,
        () = st.closing.closed() => {
            return Err(ApiError::unavailable("the host is shutting down; wait again once it is back"));
        }
    };
    match waited {
        Ok(Some(e)) => Ok(Json(&*e).into_response()),
        Ok(None) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("no matching event within {} ms", timeout.as_millis()),
        )),
        Err(e) => Err(ApiError::unavailable(e.to_string())),
    }
}

async fn stats(State(st): State<AppState>) -> Json<crate::bus::BusStats> {
    Json(st.bus.stats())
}
