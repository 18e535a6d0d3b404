//! How a host reaches its JetStream log: the `--log` address and its options, the
//! JetStream API requests the log makes, and the stream it creates (or checks) at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::Client;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{MAX_ATOMIC_BATCH, storage};
use crate::log::LogError;

/// How a host reaches its JetStream log.
#[derive(Debug, Clone)]
pub struct NatsLogConfig {
    /// The servers, `nats://HOST:PORT`, comma-separated.
    pub servers: String,
    /// The JetStream stream (and the first token of its subjects).
    pub stream: String,
    /// Replicas of the stream when this host creates it.
    pub replicas: usize,
    /// How long the server remembers message ids to drop a retried append.
    pub duplicate_window: Duration,
    /// Largest event, in bytes of text.
    pub max_event_bytes: usize,
    /// Most events per append (at most [`MAX_ATOMIC_BATCH`]).
    pub max_batch_events: usize,
    /// Where the local index of client ids lives (`DATA/nats-index`).
    pub index_dir: PathBuf,
    /// Time to live of the plugin leases a cluster of hosts shares (`lease_ttl=SECS`): a
    /// dead host's plugins are taken over within 1.25 times it.
    pub lease_ttl: Duration,
}

impl NatsLogConfig {
    /// Reads `nats://HOST:PORT[,nats://HOST:PORT...][?stream=NAME&replicas=N&duplicate_window=SECS&lease_ttl=SECS]`,
    /// keeping the local index under `data`.
    pub fn parse(url: &str, data: &Path) -> Result<Self, String> {
        let (servers, query) = url.split_once('?').unwrap_or((url, ""));
        if servers.is_empty()
            || !servers
                .split(',')
                .all(|s| s.starts_with("nats://") && s.len() > "nats://".len())
        {
            return Err(format!(
                "--log {url:?} is not a NATS address: give nats://HOST:PORT (comma-separated for several servers)"
            ));
        }
        let mut config = Self {
            servers: servers.to_owned(),
            stream: "EVHOST".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_event_bytes: crate::event::DEFAULT_MAX_EVENT_BYTES,
            max_batch_events: MAX_ATOMIC_BATCH,
            index_dir: data.join("nats-index"),
            lease_ttl: crate::lease::DEFAULT_LEASE_TTL,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("--log: {key}={value:?} is not a whole number"))
            };
            match key {
                "stream" => {
                    let ok = !value.is_empty()
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !ok {
                        return Err(format!(
                            "--log: stream={value:?} is not a JetStream stream name: use letters, digits, - and _"
                        ));
                    }
                    config.stream = value.to_owned();
                }
                "replicas" => match number()? {
                    r @ 1..=5 => config.replicas = r as usize,
                    r => return Err(format!("--log: replicas={r}: JetStream keeps 1 to 5")),
                },
                "duplicate_window" => config.duplicate_window = Duration::from_secs(number()?),
                "lease_ttl" => match number()? {
                    t @ 1..=3600 => config.lease_ttl = Duration::from_secs(t),
                    t => {
                        return Err(format!(
                            "--log: lease_ttl={t}: give 1 to 3600 seconds (a dead host's plugins wait that long for another host)"
                        ));
                    }
                },
                other => {
                    return Err(format!(
                        "--log: unknown option {other:?}; the options are stream, replicas, duplicate_window and lease_ttl"
                    ));
                }
            }
        }
        Ok(config)
    }
}

/// An error the JetStream API answered with.
#[derive(Debug, Deserialize)]
pub(super) struct ApiError {
    #[serde(default)]
    pub err_code: u64,
    #[serde(default)]
    pub description: String,
}

/// The error JetStream answers for a stream it does not have.
const STREAM_NOT_FOUND: u64 = 10059;

pub(super) async fn api(client: &Client, subject: String, body: Value) -> Result<Value, LogError> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.clone(), body.to_string().into()),
    )
    .await
    .map_err(|_| storage(&subject, "no answer within 10 s"))?
    .map_err(|e| storage(&subject, e))?;
    serde_json::from_slice(&reply.payload).map_err(|e| storage(&subject, e))
}

pub(super) fn api_error(v: &Value) -> Option<ApiError> {
    serde_json::from_value(v.get("error")?.clone()).ok()
}

/// Finds or creates the JetStream stream, with direct gets and atomic batches allowed, and
/// returns its state.
pub(super) async fn ensure_stream(
    client: &Client,
    config: &NatsLogConfig,
) -> Result<Value, LogError> {
    let name = &config.stream;
    let info = api(client, format!("$JS.API.STREAM.INFO.{name}"), json!({})).await?;
    match api_error(&info) {
        None => {
            let c = &info["config"];
            if c["allow_atomic"] == json!(true) && c["allow_direct"] == json!(true) {
                return Ok(info);
            }
            let mut updated = c.clone();
            updated["allow_atomic"] = json!(true);
            updated["allow_direct"] = json!(true);
            let answer = api(client, format!("$JS.API.STREAM.UPDATE.{name}"), updated).await?;
            if let Some(e) = api_error(&answer) {
                return Err(LogError::Nats(format!(
                    "JetStream stream {name} does not allow atomic batches and direct gets, and enabling them failed: {}",
                    e.description
                )));
            }
            Ok(answer)
        }
        Some(e) if e.err_code == STREAM_NOT_FOUND => {
            let create = json!({
                "name": name,
                "subjects": [format!("{name}.>")],
                "storage": "file",
                "retention": "limits",
                "discard": "old",
                "num_replicas": config.replicas,
                "duplicate_window": config.duplicate_window.as_nanos() as u64,
                "allow_direct": true,
                "allow_atomic": true,
            });
            let answer = api(client, format!("$JS.API.STREAM.CREATE.{name}"), create).await?;
            match api_error(&answer) {
                None => Ok(answer),
                Some(e) => Err(LogError::Nats(format!(
                    "creating JetStream stream {name} failed: {} (atomic batches need nats-server 2.12 or later with JetStream enabled)",
                    e.description
                ))),
            }
        }
        Some(e) => Err(LogError::Nats(format!(
            "JetStream stream {name}: {} (is JetStream enabled on the server?)",
            e.description
        ))),
    }
}
