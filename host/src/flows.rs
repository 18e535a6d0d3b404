//! Flows and their metrics: every event with a `correlation_id`, indexed by it, and the
//! latencies seed-style agents are judged by: per tool (requested -> completed or failed,
//! for every invocation, in a flow or not) and end to end (`user.query.received` ->
//! `answer.synthesized`).
//!
//! A built-in handler run by a [`Runner`] like any projection, so the index and the
//! aggregates commit with its checkpoint and equal a replay of the log. Latencies are
//! differences of log timestamps, so a replay computes the same figures.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bus::Bus;
use crate::event::Event;
use crate::log::{EventLog, ReadFilter};
use crate::pattern::PatternSet;
use crate::plugin::{Handler, HandlerError, Output, PluginStore, StateView, StoreError, Writes};
use crate::runner::Runner;
use crate::tools::{COMPLETED, FAILED, REQUESTED};

/// The type that starts a flow's end-to-end clock.
pub(crate) const QUERY: &str = "user.query.received";
/// The type that stops it.
pub(crate) const ANSWER: &str = "answer.synthesized";

/// Upper bounds (ms) of the latency histogram's buckets; the last catches the rest.
const BUCKETS_MS: [f64; 16] = [
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    60_000.0,
    f64::INFINITY,
];

/// A latency distribution: count, sum, max and a fixed-bucket histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Latency {
    /// Samples.
    pub count: u64,
    /// Sum of samples, ms.
    pub sum_ms: f64,
    /// Largest sample, ms.
    pub max_ms: f64,
    /// Samples per bucket of [`BUCKETS_MS`].
    pub buckets: Vec<u64>,
}

impl Latency {
    fn record(&mut self, ms: f64) {
        if self.buckets.len() != BUCKETS_MS.len() {
            self.buckets = vec![0; BUCKETS_MS.len()];
        }
        let i = BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BUCKETS_MS.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_ms += ms;
        self.max_ms = self.max_ms.max(ms);
    }

    /// The `q` quantile (0..=1), as the upper bound of its bucket (capped by the maximum).
    fn quantile(&self, q: f64) -> f64 {
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return BUCKETS_MS[i].min(self.max_ms);
            }
        }
        self.max_ms
    }

    /// The summary the API shows.
    pub(crate) fn summary(&self) -> Value {
        if self.count == 0 {
            return json!({"count": 0});
        }
        json!({
            "count": self.count,
            "mean_ms": self.sum_ms / self.count as f64,
            "p50_ms": self.quantile(0.5),
            "p90_ms": self.quantile(0.9),
            "p99_ms": self.quantile(0.99),
            "max_ms": self.max_ms,
        })
    }
}

/// A tool's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ToolFigures {
    /// Invocations with an outcome, completed or failed (stored as `completed`, the name
    /// it had when it was, wrongly, shown as the completed count).
    #[serde(rename = "completed")]
    pub outcomes: u64,
    /// Of which failed.
    pub failed: u64,
    /// Requested -> outcome.
    pub latency: Latency,
}

/// What the index remembers of a request until its outcome.
#[derive(Serialize, Deserialize)]
struct Pending {
    tool: String,
    micros: i64,
}

const FLOW: &str = "f/";
const REQUEST: &str = "r/";
const STARTED_AT: &str = "q/";
const TOOL: &str = "m/tool/";
const E2E: &str = "m/e2e";

fn flow_key(correlation: &str, position: u64) -> String {
    format!("{FLOW}{correlation}\u{0}{position:020}")
}

/// State reads beneath the batch's own writes.
struct Overlay<'a> {
    view: &'a dyn StateView,
    writes: Writes,
}

impl Overlay<'_> {
    /// The figures under `key`; a failed read is the host's failure, retried by the runner.
    fn get<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, crate::plugin::HandlerError> {
        let raw = match self.writes.get(key) {
            Some(v) => v.clone(),
            None => self
                .view
                .get(key)
                .map_err(|e| crate::plugin::HandlerError::Host(e.to_string()))?,
        };
        Ok(raw.and_then(|raw| serde_json::from_str(&raw).ok()))
    }
    fn set(&mut self, key: String, value: &impl Serialize) {
        let json = serde_json::to_string(value).expect("serializable figures");
        self.writes.insert(key, Some(json));
    }
    fn delete(&mut self, key: String) {
        self.writes.insert(key, None);
    }
}

/// Indexes flows and computes their metrics.
pub(crate) struct FlowIndex;

#[async_trait::async_trait]
impl Handler for FlowIndex {
    fn id(&self) -> &str {
        "evhost.flows"
    }

    async fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, HandlerError> {
        let mut o = Overlay {
            view: &*view,
            writes: Writes::new(),
        };
        for e in events.iter() {
            // Flows need a correlation id; a tool's figures count every invocation.
            let correlation = e.metadata.correlation_id.as_deref();
            if let Some(correlation) = correlation {
                o.writes.insert(
                    flow_key(correlation, e.position),
                    Some(e.event_type.as_str().to_owned()),
                );
            }
            let micros = e.timestamp.timestamp_micros();
            let payload = || e.payload.to_value();
            match e.event_type.as_str() {
                REQUESTED => {
                    let p = payload();
                    if let (Some(id), Some(tool)) =
                        (p["invocation_id"].as_str(), p["tool"].as_str())
                    {
                        let pending = Pending {
                            tool: tool.to_owned(),
                            micros,
                        };
                        o.set(format!("{REQUEST}{id}"), &pending);
                    }
                }
                t @ (COMPLETED | FAILED) => {
                    let p = payload();
                    let Some(id) = p["invocation_id"].as_str() else {
                        continue;
                    };
                    let Some(pending) = o.get::<Pending>(&format!("{REQUEST}{id}"))? else {
                        continue;
                    };
                    o.delete(format!("{REQUEST}{id}"));
                    let key = format!("{TOOL}{}", pending.tool);
                    let mut f: ToolFigures = o.get(&key)?.unwrap_or_default();
                    f.outcomes += 1;
                    f.failed += u64::from(t == FAILED);
                    let ms = (micros - pending.micros) as f64 / 1e3;
                    f.latency.record(ms);
                    // Not for names no tool answers to: any request may name any tool.
                    if p["error"]["code"] != "unknown_tool" {
                        metrics::histogram!(crate::telemetry::TOOL_LATENCY, "tool" => pending.tool.clone())
                            .record(ms / 1e3);
                    }
                    o.set(key, &f);
                }
                QUERY => {
                    let Some(correlation) = correlation else {
                        continue;
                    };
                    let key = format!("{STARTED_AT}{correlation}");
                    if o.get::<i64>(&key)?.is_none() {
                        o.set(key, &micros);
                    }
                }
                ANSWER => {
                    let Some(correlation) = correlation else {
                        continue;
                    };
                    if let Some(began) = o.get::<i64>(&format!("{STARTED_AT}{correlation}"))? {
                        let mut l: Latency = o.get(E2E)?.unwrap_or_default();
                        let ms = (micros - began) as f64 / 1e3;
                        l.record(ms);
                        metrics::histogram!(crate::telemetry::FLOW_LATENCY).record(ms / 1e3);
                        o.set(E2E.to_owned(), &l);
                    }
                }
                _ => {}
            }
        }
        Ok(Output {
            writes: o.writes,
            derived: Vec::new(),
        })
    }
}

/// Starts the flow index over the whole log.
pub(crate) fn start(
    db: &sled::Db,
    bus: Bus,
    log: Arc<dyn EventLog>,
) -> Result<(Runner, PluginStore), StoreError> {
    let store = PluginStore::open(db, "~flows")?;
    let runner = Runner::spawn(
        "evhost",
        Arc::new(FlowIndex),
        store.clone(),
        bus,
        log,
        PatternSet::parse_list(">").expect("a valid pattern"),
        crate::runner::RunnerOptions::built_in(2048),
    )?;
    Ok((runner, store))
}

/// Why a flow could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FlowError {
    /// No event carries that correlation id (yet).
    #[error("no events with correlation_id {0:?} (yet); flows are indexed moments after append")]
    NotFound(String),
    /// Storage failed.
    #[error("reading the flow failed: {0}")]
    Storage(String),
}

/// One flow: its events in log order with its tool and end-to-end latencies. A typed struct
/// so that the events' payloads are written out as their text, never built into a
/// `Value` (which refuses values nested more than 128 deep).
#[derive(Debug, Serialize)]
pub(crate) struct Flow {
    /// The flow's correlation id.
    pub correlation_id: String,
    /// True once an answer event is in the flow.
    pub answered: bool,
    /// Query to answer, ms; `null` until both are in the flow.
    pub latency_ms: Option<f64>,
    /// Each tool invocation with an outcome: id, tool, outcome, when requested, latency,
    /// duration.
    pub tools: Vec<Value>,
    /// Invocations requested without an outcome yet.
    pub pending_invocations: Vec<String>,
    /// The flow's events, in log order, as many as fit in the byte bound.
    pub events: Vec<Event>,
    /// Events of the flow left out of `events` to keep the response within its bound (the
    /// figures above count them); read them by correlation id.
    #[serde(skip_serializing_if = "is_zero")]
    pub events_left_out: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Every event of the flow `correlation`, in log order, with its tool and end-to-end
/// latencies; the events kept total at most `max_bytes` of text (at least one is kept).
pub(crate) async fn flow(
    store: &PluginStore,
    log: &dyn EventLog,
    correlation: &str,
    max_bytes: usize,
) -> Result<Flow, FlowError> {
    let prefix = format!("{FLOW}{correlation}\u{0}");
    let keys = store
        .scan(&prefix, 10_000)
        .map_err(|e| FlowError::Storage(e.to_string()))?;
    if keys.is_empty() {
        return Err(FlowError::NotFound(correlation.to_owned()));
    }
    let micros = |e: &Event| e.timestamp.timestamp_micros();
    let mut requested: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut tools = Vec::new();
    let (mut began, mut answered) = (None, None);
    let mut events: Vec<Event> = Vec::new();
    let (mut kept_bytes, mut events_left_out) = (0usize, 0usize);
    for (k, _) in keys {
        let Ok(position) = k[prefix.len()..].parse::<u64>() else {
            continue;
        };
        let page = log
            .read(position, 1, &ReadFilter::default())
            .await
            .map_err(|e| FlowError::Storage(e.to_string()))?;
        let Some(e) = page.events.into_iter().find(|e| e.position == position) else {
            continue;
        };
        let p = e.payload.to_value();
        let id = p["invocation_id"].as_str().map(str::to_owned);
        match (e.event_type.as_str(), id) {
            (REQUESTED, Some(id)) => {
                let tool = p["tool"].as_str().unwrap_or_default().to_owned();
                requested.insert(id, (tool, micros(&e)));
            }
            (t @ (COMPLETED | FAILED), Some(id)) => {
                if let Some((tool, at)) = requested.remove(&id) {
                    tools.push(json!({
                        "invocation_id": id,
                        "tool": tool,
                        "outcome": if t == COMPLETED { "completed" } else { "failed" },
                        "latency_ms": (micros(&e) - at) as f64 / 1e3,
                        "duration_ms": p["duration_ms"],
                        "requested_at": chrono::DateTime::from_timestamp_micros(at)
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
                    }));
                }
            }
            (QUERY, _) => began = began.or(Some(micros(&e))),
            (ANSWER, _) => answered = answered.or(Some(micros(&e))),
            _ => {}
        }
        let size = e.text_len();
        if events.is_empty() || kept_bytes.saturating_add(size) <= max_bytes {
            kept_bytes += size;
            events.push(e);
        } else {
            events_left_out += 1;
        }
    }
    let latency_ms = match (began, answered) {
        (Some(b), Some(a)) => Some((a - b) as f64 / 1e3),
        _ => None,
    };
    Ok(Flow {
        correlation_id: correlation.to_owned(),
        answered: answered.is_some(),
        latency_ms,
        tools,
        pending_invocations: requested.into_keys().collect(),
        events,
        events_left_out,
    })
}

/// Per-tool and end-to-end latency figures.
pub(crate) fn metrics(store: &PluginStore) -> Result<Value, FlowError> {
    let storage = |e: StoreError| FlowError::Storage(e.to_string());
    let mut tools = serde_json::Map::new();
    for (k, v) in store.scan(TOOL, 100_000).map_err(storage)? {
        let f: ToolFigures = serde_json::from_str(&v).unwrap_or_default();
        tools.insert(
            k[TOOL.len()..].to_owned(),
            json!({
                "invocations": f.outcomes,
                "completed": f.outcomes.saturating_sub(f.failed),
                "failed": f.failed,
                "latency": f.latency.summary(),
            }),
        );
    }
    let e2e: Latency = store
        .get(E2E)
        .map_err(storage)?
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default();
    Ok(json!({
        "tools": tools,
        "flows": {"answered": e2e.count, "latency": e2e.summary()},
        "indexed_to": store.checkpoint().map_err(storage)?.unwrap_or(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_buckets_capped_by_the_maximum() {
        let mut l = Latency::default();
        for ms in [0.2, 0.3, 3.0, 7.0, 400.0] {
            l.record(ms);
        }
        assert_eq!(l.count, 5);
        assert_eq!(l.quantile(0.5), 5.0);
        assert_eq!(l.quantile(0.99), 400.0);
        assert_eq!(l.quantile(0.2), 0.5);
        assert_eq!(Latency::default().summary(), json!({"count": 0}));
    }
}
