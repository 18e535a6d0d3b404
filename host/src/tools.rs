//! Tool workers: `tool.invocation.requested` in, `tool.invocation.completed` or
//! `tool.invocation.failed` out, each invocation run at most once.
//!
//! A worker is a [`crate::runner::Runner`] whose handler, for each request naming its tool:
//! 1. skips it when the invocation already has an outcome (a duplicate request, a replay);
//! 2. fails it without running when it was started before and never finished (the host
//!    stopped mid-invocation: running it again could repeat a side effect);
//! 3. fails it without running when its input violates the tool's schema;
//! 4. otherwise appends `tool.invocation.started` (durable before the tool runs), runs it
//!    within the tool's time limit (per call, as for any plugin) and concurrency limit
//!    (blocking threads at once), and returns the outcome for the runner
//!    to append before the checkpoint.
//!
//! Outcome and start events have ids fixed by the invocation id, so whichever way a request
//! arrives (twice, after a crash, to a tool loaded twice) the log holds one of each.
//!
//! A worker handles its next batch while the last one's outcomes are still being appended
//! ([`Handler::derives_ahead_of_commits`]: never more than one batch ahead). It remembers
//! the invocations its last call answered, with the request's position, so a later request
//! for one of them whose outcome is not in the log yet is skipped as a duplicate, as it
//! would be once the outcome is there (on any stream, with any input). The same request
//! handled again (a batch re-run after a failure or a restart) is not a later one: it finds
//! its start and fails as interrupted. A repeat skipped this way has no outcome of its own
//! if the log then refuses the first one's (its stream deleted in between): that request
//! is dead-lettered instead.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::event::{Event, EventId, EventType, Metadata, NewEvent, Payload};
use crate::limits::{OutputLimits, bound, event_bytes, split_appends, stamp_room};
use crate::log::{AppendError, EventLog, StreamAppend};
use crate::plugin::{
    Derived, Handler, HandlerError, Output, PluginError, PluginLogs, StateView, ToolInfo,
    ToolPlugin,
};
use crate::runner::{MAX_DERIVATION_DEPTH, depth_of, derived_id, push_grouped, stamp};

/// Requests for tools.
pub(crate) const REQUESTED: &str = "tool.invocation.requested";
/// A tool began running an invocation.
pub(crate) const STARTED: &str = "tool.invocation.started";
/// An invocation's output.
pub(crate) const COMPLETED: &str = "tool.invocation.completed";
/// Why an invocation has no output.
pub(crate) const FAILED: &str = "tool.invocation.failed";

/// The payload of a request.
#[derive(Debug, Deserialize)]
struct Request {
    invocation_id: Option<String>,
    tool: Option<String>,
    #[serde(default)]
    input: Value,
}

/// A request for some tool, as read from an event.
struct Parsed {
    /// The invocation id (the request event's id when the payload has none).
    invocation_id: String,
    tool: String,
    input: Value,
}

fn parse(event: &Event) -> Option<Parsed> {
    let r: Request = serde_json::from_str(event.payload.as_str()).ok()?;
    Some(Parsed {
        invocation_id: r.invocation_id.unwrap_or_else(|| event.id.clone().into()),
        tool: r.tool?,
        input: r.input,
    })
}

/// Where the log holds the event with `id` (an invocation's start or outcome), if anywhere.
async fn find_id(log: &Arc<dyn EventLog>, id: EventId) -> Result<Option<u64>, HandlerError> {
    log.find(&id)
        .await
        .map_err(|e| HandlerError::Host(format!("looking up an invocation failed: {e}")))
}

/// The id of an invocation's one outcome event (completed or failed).
pub(crate) fn outcome_id(invocation_id: &str) -> EventId {
    derived_id("tool.invocation.outcome", invocation_id, 0)
}

/// The id of an invocation's start event.
pub(crate) fn started_id(invocation_id: &str) -> EventId {
    derived_id("tool.invocation.started", invocation_id, 0)
}

fn derived(stream: &str, ty: &str, id: EventId, source: &str, payload: Value) -> Derived {
    Derived {
        stream: stream.to_owned().into(),
        event: NewEvent {
            id: Some(id),
            event_type: EventType::new(ty).expect("a valid built-in type"),
            source: source.to_owned(),
            payload: Payload::from_value(&payload),
            metadata: Metadata::default(),
        },
    }
}

/// A text of the request echoed in an event the host builds (invocation id, tool name), cut
/// to the host's bound on texts: a request near the event limit must not make its outcome
/// larger than the limit.
fn echo(limits: &OutputLimits, text: &str) -> String {
    bound(text.to_owned(), limits.message_bytes())
}

/// An invocation's `failed` outcome; every text in it is bounded, so it always fits in an
/// event.
fn failed(
    limits: &OutputLimits,
    event: &Event,
    p: &Parsed,
    source: &str,
    code: &str,
    message: String,
    ms: f64,
) -> Derived {
    derived(
        &event.stream,
        FAILED,
        outcome_id(&p.invocation_id),
        source,
        json!({
            "invocation_id": echo(limits, &p.invocation_id),
            "tool": echo(limits, &p.tool),
            "error": {"code": code, "message": limits.bound(message)},
            "duration_ms": ms,
        }),
    )
}

/// An invocation's output, or (error code, message); and how long it ran, in ms.
type Ran = (Result<Value, (&'static str, String)>, f64);

/// Runs the invocations of one tool.
pub(crate) struct ToolHandler {
    name: String,
    plugin: ToolPlugin,
    info: ToolInfo,
    schema: Arc<jsonschema::Validator>,
    log: Arc<dyn EventLog>,
    concurrency: usize,
    limits: OutputLimits,
    /// The invocations the last call answered (ran, or failed without running), each with
    /// the position of the request it answered: their outcomes may not be in the log yet
    /// while the next call runs.
    answered: std::sync::Mutex<Arc<HashMap<String, u64>>>,
}

impl ToolHandler {
    /// A handler for the tool `name`, described by `info`; refuses a schema that does not
    /// compile.
    pub(crate) fn new(
        name: &str,
        plugin: ToolPlugin,
        info: ToolInfo,
        log: Arc<dyn EventLog>,
        concurrency: usize,
    ) -> Result<Self, String> {
        let schema = jsonschema::validator_for(&info.input_schema)
            .map_err(|e| format!("its input schema does not compile: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            plugin,
            info,
            schema: Arc::new(schema),
            log,
            concurrency,
            limits: OutputLimits::default(),
            answered: Default::default(),
        })
    }

    /// The log's limits, which outcomes and start appends must fit (the log's defaults
    /// unless set).
    pub(crate) fn with_limits(mut self, limits: OutputLimits) -> Self {
        self.limits = limits;
        self
    }

    /// What the tool says of itself.
    pub(crate) fn info(&self) -> &ToolInfo {
        &self.info
    }

    /// What the tool's component has used.
    pub(crate) fn usage(&self) -> crate::plugin::UsageReport {
        self.plugin.usage()
    }

    /// What the tool printed and logged recently.
    pub(crate) fn logs(&self) -> &PluginLogs {
        self.plugin.logs()
    }

    /// The world and contract version its component implements.
    pub(crate) fn contract(&self) -> crate::plugin::Contract {
        self.plugin.contract()
    }

    /// Its configuration.
    pub(crate) fn config(&self) -> &crate::plugin::PluginConfig {
        self.plugin.config()
    }

    /// Why `input` does not fit the schema, naming where; `None` when it fits. Each error is
    /// cut short (they quote the offending input, which may be as large as the request).
    fn schema_error(&self, input: &Value) -> Option<String> {
        let each = self.limits.message_bytes() / 5;
        let errors: Vec<String> = self
            .schema
            .iter_errors(input)
            .take(5)
            .map(|e| {
                let at = bound(e.instance_path().as_str().to_owned(), each / 4);
                let at = if at.is_empty() { "/".to_owned() } else { at };
                bound(format!("at {at:?}: {e}"), each)
            })
            .collect();
        (!errors.is_empty()).then(|| {
            format!(
                "input does not match the schema of tool {}: {}",
                self.name,
                errors.join("; ")
            )
        })
    }

    /// Runs `inputs` on up to `concurrency` blocking threads at once (each thread takes a
    /// share, so quick tools pay one thread hand-off per share, not per invocation): per
    /// input, its output or (error code, message), and how long it ran.
    async fn run_all(&self, inputs: Vec<String>) -> Vec<Ran> {
        let n = inputs.len();
        let threads = self.concurrency.min(n).max(1);
        let mut shares: Vec<Vec<(usize, String)>> = vec![Vec::new(); threads];
        for (i, input) in inputs.into_iter().enumerate() {
            shares[i % threads].push((i, input));
        }
        let calls = shares.into_iter().map(|share| {
            let plugin = self.plugin.clone();
            let name = self.name.clone();
            tokio::task::spawn_blocking(move || {
                share
                    .into_iter()
                    .map(|(i, input)| {
                        let began = Instant::now();
                        let r = run_one(&plugin, &name, &input);
                        (i, r, began.elapsed().as_secs_f64() * 1e3)
                    })
                    .collect::<Vec<_>>()
            })
        });
        let mut out: Vec<Option<Ran>> = (0..n).map(|_| None).collect();
        for done in futures::future::join_all(calls).await {
            // A share whose thread panicked leaves its slots empty.
            for (i, r, ms) in done.unwrap_or_default() {
                out[i] = Some((r, ms));
            }
        }
        out.into_iter()
            .map(|slot| {
                slot.unwrap_or_else(|| {
                    (Err(("lost", "the invocation's thread failed".into())), 0.0)
                })
            })
            .collect()
    }
}

/// One invocation: its output, or (error code, message).
fn run_one(plugin: &ToolPlugin, name: &str, input: &str) -> Result<Value, (&'static str, String)> {
    match plugin.invoke(input) {
        Ok(out) => serde_json::from_str(&out).map_err(|e| {
            (
                "invalid_output",
                format!("tool {name} returned output that is not JSON: {e}"),
            )
        }),
        Err(e @ PluginError::Refused { .. }) => Err(("refused", e.to_string())),
        Err(e @ PluginError::Failed { .. }) => Err(("failed", e.to_string())),
        Err(e @ PluginError::TimedOut { .. }) => Err(("timeout", e.to_string())),
        Err(e) => Err(("trapped", e.to_string())),
    }
}

#[async_trait::async_trait]
impl Handler for ToolHandler {
    fn id(&self) -> &str {
        self.plugin.id()
    }

    fn derives_ahead_of_commits(&self) -> bool {
        true
    }

    async fn handle(
        &self,
        _view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, HandlerError> {
        let mut out: Vec<Vec<Derived>> = vec![Vec::new(); events.len()];
        let mut seen = HashSet::new();
        let mut to_run: Vec<(usize, Parsed)> = Vec::new();
        let lookup = |id: EventId| find_id(&self.log, id);
        let before = self.answered.lock().expect("answered lock").clone();
        let mut answered: HashMap<String, u64> = HashMap::new();
        for (i, event) in events.iter().enumerate() {
            let Some(p) = parse(event) else { continue };
            if p.tool != self.name || !seen.insert(p.invocation_id.clone()) {
                continue;
            }
            if lookup(outcome_id(&p.invocation_id)).await?.is_some() {
                continue;
            }
            if before
                .get(&p.invocation_id)
                .is_some_and(|at| *at < event.position)
            {
                // Answered by the last call: its outcome is on its way to the log.
                continue;
            }
            // An outcome deeper than the derivation limit is dropped, never appended: a
            // repeat of this request must not wait for it.
            if depth_of(event) < MAX_DERIVATION_DEPTH {
                answered.insert(p.invocation_id.clone(), event.position);
            }
            if lookup(started_id(&p.invocation_id)).await?.is_some() {
                out[i].push(failed(
                    &self.limits,
                    event,
                    &p,
                    &self.name,
                    "interrupted",
                    format!(
                        "the host stopped while tool {} ran invocation {}; it is not run again, \
                         since it may have taken effect (at most once): request a new invocation",
                        self.name,
                        echo(&self.limits, &p.invocation_id)
                    ),
                    0.0,
                ));
                continue;
            }
            if let Some(message) = self.schema_error(&p.input) {
                out[i].push(failed(
                    &self.limits,
                    event,
                    &p,
                    &self.name,
                    "invalid_input",
                    message,
                    0.0,
                ));
                continue;
            }
            to_run.push((i, p));
        }
        if to_run.is_empty() {
            *self.answered.lock().expect("answered lock") = Arc::new(answered);
            return Ok(Output {
                derived: out,
                ..Output::default()
            });
        }
        // Durable before any tool runs: a crash from here on finds the start and never runs
        // the invocation again.
        let mut starts: Vec<StreamAppend> = Vec::new();
        for (i, p) in &to_run {
            let from = &events[*i];
            let mut d = derived(
                &from.stream,
                STARTED,
                started_id(&p.invocation_id),
                &self.name,
                json!({"invocation_id": echo(&self.limits, &p.invocation_id), "tool": p.tool}),
            );
            stamp(&self.name, from, 0, &mut d);
            push_grouped(&mut starts, d);
        }
        // The starts this append stored: an id the log held already is another host's
        // start (a lease handed over under it), and that host runs the invocation.
        let mut stored: HashSet<EventId> = HashSet::new();
        for chunk in split_appends(starts, self.limits.max_batch_events) {
            let ids: Vec<Vec<Option<EventId>>> = chunk
                .iter()
                .map(|a| a.events.iter().map(|e| e.id.clone()).collect())
                .collect();
            let done = self.log.append(chunk).await.map_err(|e| match e {
                AppendError::Storage(_) => {
                    HandlerError::Host(format!("recording invocation starts failed: {e}"))
                }
                // A refusal is deterministic: retrying it would wedge the worker, so the
                // failure policy finds the request and dead-letters it.
                _ => HandlerError::Plugin(format!("the log refused an invocation start: {e}")),
            })?;
            for (a, ids) in done.iter().zip(ids) {
                stored.extend(
                    a.written
                        .iter()
                        .zip(ids)
                        .filter_map(|(w, id)| id.filter(|_| *w)),
                );
            }
        }
        to_run.retain(|(_, p)| {
            let ours = stored.contains(&started_id(&p.invocation_id));
            if !ours {
                tracing::warn!(
                    tool = self.name,
                    invocation = p.invocation_id,
                    "another host started this invocation first: it runs there, not here"
                );
            }
            if !ours {
                answered.remove(&p.invocation_id);
            }
            ours
        });
        *self.answered.lock().expect("answered lock") = Arc::new(answered);
        let results = self
            .run_all(to_run.iter().map(|(_, p)| p.input.to_string()).collect())
            .await;
        for ((i, p), (result, ms)) in to_run.iter().zip(results) {
            let event = &events[*i];
            let fail = |code: &str, message: String| {
                failed(&self.limits, event, p, &self.name, code, message, ms)
            };
            out[*i].push(match result {
                Ok(output) => {
                    let d = derived(
                        &event.stream,
                        COMPLETED,
                        outcome_id(&p.invocation_id),
                        &self.name,
                        json!({
                            "invocation_id": echo(&self.limits, &p.invocation_id),
                            "tool": p.tool,
                            "output": output,
                            "duration_ms": ms,
                        }),
                    );
                    let bytes = event_bytes(&d.stream, &d.event) + stamp_room(event);
                    if bytes > self.limits.max_event_bytes {
                        fail(
                            "output_too_large",
                            format!(
                                "tool {} returned an outcome of {bytes} bytes, more than the log's \
                                 limit of {} bytes per event (--max-event-bytes): return less",
                                self.name, self.limits.max_event_bytes
                            ),
                        )
                    } else {
                        d
                    }
                }
                Err((code, message)) => fail(code, message),
            });
        }
        Ok(Output {
            derived: out,
            ..Output::default()
        })
    }
}

/// Answers requests naming a tool that is not loaded, so a caller is not left waiting.
pub(crate) struct UnknownTools {
    loaded: Arc<RwLock<HashSet<String>>>,
    log: Arc<dyn EventLog>,
    limits: OutputLimits,
}

impl UnknownTools {
    /// Fails requests for tools not in `loaded` (kept current by the registry).
    pub(crate) fn new(loaded: Arc<RwLock<HashSet<String>>>, log: Arc<dyn EventLog>) -> Self {
        Self {
            loaded,
            log,
            limits: OutputLimits::default(),
        }
    }

    /// The log's limits, which its `failed` outcomes must fit (the log's defaults unless
    /// set).
    pub(crate) fn with_limits(mut self, limits: OutputLimits) -> Self {
        self.limits = limits;
        self
    }
}

#[async_trait::async_trait]
impl Handler for UnknownTools {
    fn id(&self) -> &str {
        "evhost.tools"
    }

    async fn handle(
        &self,
        _view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, HandlerError> {
        let mut out: Vec<Vec<Derived>> = vec![Vec::new(); events.len()];
        for (i, event) in events.iter().enumerate() {
            let known = |t: &str| self.loaded.read().expect("tool names lock").contains(t);
            let (p, message) = match parse(event) {
                Some(p) if known(&p.tool) => continue,
                Some(p) => {
                    let m = format!(
                        "no tool named {:?} is loaded; load it, then request a new invocation",
                        echo(&self.limits, &p.tool)
                    );
                    (p, m)
                }
                None => {
                    let p = Parsed {
                        invocation_id: event.id.clone().into(),
                        tool: String::new(),
                        input: Value::Null,
                    };
                    let m = "the request's payload must be {\"invocation_id\": ..., \"tool\": ..., \"input\": ...}".to_owned();
                    (p, m)
                }
            };
            let seen = |id: EventId| find_id(&self.log, id);
            if seen(outcome_id(&p.invocation_id)).await?.is_some()
                || seen(started_id(&p.invocation_id)).await?.is_some()
            {
                continue;
            }
            out[i].push(failed(
                &self.limits,
                event,
                &p,
                "evhost",
                "unknown_tool",
                message,
                0.0,
            ));
        }
        Ok(Output {
            derived: out,
            ..Output::default()
        })
    }
}
