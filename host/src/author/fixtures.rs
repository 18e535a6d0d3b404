//! `evhost plugin test`: runs a built component in the host's runtime, with its manifest's
//! limits and the grants given, over fixture files, and says where the result differs from
//! what each fixture expects.
//!
//! A fixture is a JSON object: `events` in (`type`, and optionally `stream`, `payload`,
//! `metadata`, `id`, `timestamp`), and what they must give out: `state` (every key a
//! projection holds afterwards, with its JSON value) and `queries` (`request` and
//! `answer`) for a projection, `derived` (the events an extractor derives, in order: `type`,
//! `stream`, `payload`, and `metadata` when given) for an extractor, `invocations` (`input`,
//! and `output` or `error`) for a tool, or `error` (a text the failure's message contains)
//! for events the plugin must refuse. A projection's or extractor's events are handled as
//! one batch and again one event per call: a plugin whose result depends on how the host
//! batches events fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::event::{Event, EventId, EventType, Metadata, Payload};
use crate::plugin::{
    ExtractorPlugin, Kind, Manifest, MemState, PluginConfig, PluginError, ProjectionPlugin,
    Runtime, ToolInfo, ToolPlugin, UsageReport,
};
use crate::registry::LoadOptions;

/// One fixture file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// What it checks, shown when it fails.
    #[serde(default)]
    pub description: Option<String>,
    /// The events handed to the plugin, in log order.
    #[serde(default)]
    pub events: Vec<FixtureEvent>,
    /// A projection's whole state afterwards (or an extractor's, when it keeps one).
    #[serde(default)]
    pub state: Option<BTreeMap<String, Value>>,
    /// A projection's answers to queries over that state.
    #[serde(default)]
    pub queries: Vec<Query>,
    /// An extractor's derived events, in order.
    #[serde(default)]
    pub derived: Option<Vec<Value>>,
    /// A tool's invocations.
    #[serde(default)]
    pub invocations: Vec<Invocation>,
    /// The events must be refused with a message that contains this.
    #[serde(default)]
    pub error: Option<String>,
}

impl Fixture {
    /// Refuses a fixture that checks nothing, or gives what does not apply to `kind` (it
    /// would pass without the check its author meant).
    fn check_fits(&self, kind: Kind) -> Result<(), String> {
        let mut given = Vec::new();
        for (field, present) in [
            ("events", !self.events.is_empty()),
            ("state", self.state.is_some()),
            ("queries", !self.queries.is_empty()),
            ("derived", self.derived.is_some()),
            ("invocations", !self.invocations.is_empty()),
            ("error", self.error.is_some()),
        ] {
            if present {
                given.push(field);
            }
        }
        let (fits, checks): (&[&str], &[&str]) = match kind {
            Kind::Projection => (
                &["events", "state", "queries", "error"],
                &["state", "queries", "error"],
            ),
            Kind::Extractor => (
                &["events", "state", "derived", "error"],
                &["state", "derived", "error"],
            ),
            Kind::Tool => (&["invocations"], &["invocations"]),
        };
        if let Some(wrong) = given.iter().find(|f| !fits.contains(f)) {
            return Err(format!(
                "`{wrong}` does not apply to a {}: its fixtures give {}",
                kind.as_str(),
                fits.join(", ")
            ));
        }
        if !given.iter().any(|f| checks.contains(f)) {
            return Err(format!(
                "it checks nothing: a {}'s fixture gives {}",
                kind.as_str(),
                checks.join(", ")
            ));
        }
        if self.error.is_some()
            && (self.state.is_some() || !self.queries.is_empty() || self.derived.is_some())
        {
            return Err("`error` expects the events refused, so `state`, `queries` and `derived` cannot be checked with it".into());
        }
        if let Some(i) = self
            .invocations
            .iter()
            .position(|inv| inv.output.is_some() == inv.error.is_some())
        {
            return Err(format!(
                "invocation {i} must give one of `output` and `error`"
            ));
        }
        Ok(())
    }
}

/// An event of a fixture; what it leaves out is filled in as the log would.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureEvent {
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Its stream (default `fixture`).
    #[serde(default)]
    pub stream: Option<String>,
    /// Its payload (default `{}`).
    #[serde(default)]
    pub payload: Option<Value>,
    /// Its metadata.
    #[serde(default)]
    pub metadata: Option<Metadata>,
    /// Its id (default one made from its position).
    #[serde(default)]
    pub id: Option<String>,
    /// When it was appended (default 2026-01-01T00:00:00Z plus its position in seconds).
    #[serde(default)]
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

/// A query and the answer it must get.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// The request, as `POST /v1/projections/{name}/query` takes it: a string is passed as
    /// its text, any other value as its JSON text.
    pub request: Value,
    /// The answer, as JSON.
    pub answer: Value,
}

/// A tool invocation and what it must give.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invocation {
    /// The invocation's `input`.
    pub input: Value,
    /// Its output.
    #[serde(default)]
    pub output: Option<Value>,
    /// Or: it must fail with a message that contains this.
    #[serde(default)]
    pub error: Option<String>,
}

/// How `plugin test` runs.
#[derive(Debug, Default)]
pub struct TestOptions {
    /// Config overrides and grants, as a load would give them.
    pub load: LoadOptions,
    /// Where compiled components are cached between runs.
    pub cache_dir: PathBuf,
}

/// What a run found.
#[derive(Debug)]
pub struct TestReport {
    /// Fixtures that matched.
    pub passed: usize,
    /// Fixtures that did not, each with what differed.
    pub failed: Vec<(PathBuf, String)>,
    /// Time per event of the passing fixtures' events folded warm as one batch.
    pub ns_per_event: Option<f64>,
    /// What the plugin used, from the runtime's own accounting.
    pub usage: UsageReport,
    /// Time to compile the component (or load it from the cache).
    pub compile: Duration,
}

/// The fixtures in `dir`: every `*.json`, in name order.
pub fn fixture_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the fixtures in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} has no fixtures (*.json)", dir.display());
    }
    Ok(files)
}

/// The plugin, linked as its manifest's kind.
enum Loaded {
    Projection(ProjectionPlugin),
    Extractor(ExtractorPlugin),
    Tool(ToolPlugin),
}

impl Loaded {
    fn logs(&self) -> &crate::plugin::PluginLogs {
        match self {
            Loaded::Projection(p) => p.logs(),
            Loaded::Extractor(p) => p.logs(),
            Loaded::Tool(p) => p.logs(),
        }
    }

    fn usage(&self) -> UsageReport {
        match self {
            Loaded::Projection(p) => p.usage(),
            Loaded::Extractor(p) => p.usage(),
            Loaded::Tool(p) => p.usage(),
        }
    }
}

/// Runs the component `wasm` of `manifest` over each fixture file; prints a line per
/// fixture as it goes.
pub fn run(
    manifest: &Manifest,
    wasm: &[u8],
    files: &[PathBuf],
    options: &TestOptions,
) -> Result<TestReport> {
    let missing = options.load.grants.missing(&manifest.capabilities);
    if !missing.is_empty() {
        bail!(
            "plugin {} asks for {}, which this run does not grant: a capability takes effect \
             only when the manifest asks for it and the operator grants it; grant it here \
             with --grant {} (and on the host with evhost plugin load --grant)",
            manifest.id(),
            missing.join(", "),
            missing[0]
        );
    }
    let config = PluginConfig::resolve(manifest, &options.load.config)
        .map_err(|e| anyhow::anyhow!("plugin {}: {e}", manifest.id()))?;
    let runtime = Runtime::new(&options.cache_dir)?;
    let compiled = runtime.compile_for(manifest, wasm)?;
    let config = Arc::new(config);
    let loaded = match manifest.kind {
        Kind::Projection => {
            Loaded::Projection(runtime.plugin_configured(&compiled, manifest, config)?)
        }
        Kind::Extractor => {
            Loaded::Extractor(runtime.plugin_configured(&compiled, manifest, config)?)
        }
        Kind::Tool => Loaded::Tool(runtime.plugin_configured(&compiled, manifest, config)?),
    };
    let mut report = TestReport {
        passed: 0,
        failed: Vec::new(),
        ns_per_event: None,
        usage: loaded.usage(),
        compile: compiled.took,
    };
    let mut measured: Vec<Arc<Event>> = Vec::new();
    let batch_size = manifest.limits.batch_size.max(1);
    let subscribed = crate::pattern::PatternSet::new(manifest.subscriptions.clone());
    let tool = match &loaded {
        Loaded::Tool(p) => Some(ToolCheck::new(p, manifest)?),
        _ => None,
    };
    for file in files {
        let shown = file.strip_prefix(".").unwrap_or(file).display();
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        if !value.is_object() {
            bail!(
                "{} is not a fixture: it must be a JSON object",
                file.display()
            );
        }
        let fixture: Fixture = serde_json::from_value(value)
            .with_context(|| format!("{} is not a fixture", file.display()))?;
        fixture
            .check_fits(manifest.kind)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let events = fixture_events(&fixture.events)
            .with_context(|| format!("in the events of {}", file.display()))?;
        // As the host does: only the events the manifest subscribes to reach the plugin.
        let (events, passed_over): (Vec<_>, Vec<_>) = events
            .into_iter()
            .partition(|e| subscribed.matches(e.event_type.as_str()));
        if !passed_over.is_empty() && manifest.kind != Kind::Tool {
            println!(
                "note  {shown}: {} of its events match no subscription of the manifest and are \
                 not handed to the plugin (as on the host)",
                passed_over.len()
            );
        }
        if fixture.error.is_none() {
            measured.extend(events.iter().cloned());
        }
        let seen_logs = loaded.logs().read(0, 0).next;
        let outcome = match (&loaded, &tool) {
            (Loaded::Projection(p), _) => check_projection(p, &fixture, &events, batch_size),
            (Loaded::Extractor(p), _) => check_extractor(p, &fixture, &events, batch_size),
            (Loaded::Tool(_), Some(t)) => t.check(&fixture),
            (Loaded::Tool(_), None) => unreachable!("a tool has its check"),
        };
        // What the plugin printed or logged meanwhile: a JavaScript or Python exception's
        // message and traceback go there.
        let outcome = outcome.map_err(|why| {
            let page = loaded.logs().read(seen_logs, 20);
            if page.lines.is_empty() {
                return why;
            }
            let lines: Vec<String> = page
                .lines
                .iter()
                .map(|l| format!("    | {} {}", l.source, l.line))
                .collect();
            format!(
                "{why}\n  what the plugin printed and logged:\n{}",
                lines.join("\n")
            )
        });
        match outcome {
            Ok(()) => {
                println!("ok    {shown}");
                report.passed += 1;
            }
            Err(why) => {
                let about = fixture
                    .description
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                println!("FAIL  {shown}{about}\n{why}");
                report.failed.push((file.clone(), why));
            }
        }
    }
    report.ns_per_event = cost_per_event(&loaded, &measured, COST_BATCH.min(batch_size));
    report.usage = loaded.usage();
    Ok(report)
}

/// Events in the batch [`cost_per_event`] folds: about what the host hands a caught-up
/// plugin under load.
const COST_BATCH: usize = 1024;

/// Time per event of folding the fixtures' events warm, repeated into batches of
/// [`COST_BATCH`] (or the manifest's `batch_size`, if smaller; positions renumbered), for
/// about a tenth of a second: a fixture's few events in one cold call would mostly measure
/// the call.
fn cost_per_event(loaded: &Loaded, events: &[Arc<Event>], size: usize) -> Option<f64> {
    if events.is_empty() {
        return None;
    }
    let batch: Vec<Arc<Event>> = events
        .iter()
        .cycle()
        .take(size)
        .enumerate()
        .map(|(i, e)| {
            let mut e = Event::clone(e);
            e.position = i as u64;
            Arc::new(e)
        })
        .collect();
    let pass = || {
        let state = Arc::new(MemState::default());
        match loaded {
            Loaded::Projection(p) => p.fold(state, &batch).is_ok(),
            Loaded::Extractor(p) => p.extract(state, &batch).is_ok(),
            Loaded::Tool(_) => false,
        }
    };
    if !pass() {
        return None;
    }
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_millis(100) {
        pass();
        n += batch.len() as u64;
    }
    Some(started.elapsed().as_nanos() as f64 / n as f64)
}

/// The fixture's events as the log would hand them out: positions from 0, versions per
/// stream, ids and timestamps made up where not given.
fn fixture_events(events: &[FixtureEvent]) -> Result<Vec<Arc<Event>>> {
    let base = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .expect("a valid timestamp")
        .to_utc();
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let mut last = base;
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let position = i as u64;
            let stream = e.stream.clone().unwrap_or_else(|| "fixture".to_owned());
            let version = versions.entry(stream.clone()).or_default();
            let this_version = *version;
            *version += 1;
            let id =
                e.id.clone()
                    .unwrap_or_else(|| format!("00000000-0000-7000-8000-{position:012x}"));
            let timestamp = e
                .timestamp
                .unwrap_or(base + chrono::Duration::seconds(position as i64))
                .max(last);
            last = timestamp;
            let payload = e
                .payload
                .clone()
                .unwrap_or_else(|| Value::Object(Default::default()));
            Ok(Arc::new(Event {
                id: EventId::new(&id)
                    .map_err(|err| anyhow::anyhow!("event {i}: id {id:?}: {err}"))?,
                event_type: EventType::new(&e.event_type)
                    .map_err(|err| anyhow::anyhow!("event {i}: {err}"))?,
                stream: crate::event::StreamName::new(&stream)
                    .map_err(|err| anyhow::anyhow!("event {i}: stream {stream:?}: {err}"))?,
                position,
                version: this_version,
                timestamp,
                source: "fixture".to_owned(),
                payload: Payload::from_value(&payload),
                metadata: e.metadata.clone().unwrap_or_default(),
            }))
        })
        .collect()
}

fn check_projection(
    p: &ProjectionPlugin,
    fixture: &Fixture,
    events: &[Arc<Event>],
    batch_size: usize,
) -> Result<(), String> {
    // In batches as large as the manifest lets the host make them.
    let whole = Arc::new(MemState::default());
    let mut folded = Ok(());
    for chunk in events.chunks(batch_size) {
        match p.fold(whole.clone(), chunk) {
            Ok(writes) => whole.apply(writes),
            Err(e) => {
                folded = Err(e);
                break;
            }
        }
    }
    if let Some(want) = &fixture.error {
        return expect_refusal(folded, want);
    }
    folded.map_err(|e| failed("the batch", &e))?;
    let one_by_one = Arc::new(MemState::default());
    for e in events {
        let writes = p
            .fold(one_by_one.clone(), std::slice::from_ref(e))
            .map_err(|err| failed(&format!("event {} alone", e.position), &err))?;
        one_by_one.apply(writes);
    }
    let state = snapshot(&whole);
    let alone = snapshot(&one_by_one);
    if state != alone {
        return Err(format!(
            "  the state depends on how events are batched: as one batch (-) and one event per \
             call (+) it differs:\n{}",
            map_diff(&state, &alone)
        ));
    }
    let mut problems = Vec::new();
    if let Some(want) = &fixture.state {
        let want: BTreeMap<String, Value> = want.clone();
        if !same_map(&want, &state) {
            problems.push(format!(
                "  the state differs (- expected, + got):\n{}",
                map_diff(&want, &state)
            ));
        }
    }
    for q in &fixture.queries {
        let request = match &q.request {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        match p.query(whole.clone(), &request) {
            Ok(answer) => {
                let got = parse_or_text(&answer);
                if !same(&q.answer, &got) {
                    problems.push(format!(
                        "  query {:?}:\n    - {}\n    + {}",
                        q.request, q.answer, got
                    ));
                }
            }
            Err(e) => problems.push(format!("  query {:?} failed: {e}", q.request)),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn check_extractor(
    p: &ExtractorPlugin,
    fixture: &Fixture,
    events: &[Arc<Event>],
    batch_size: usize,
) -> Result<(), String> {
    // In batches as large as the manifest lets the host make them.
    let whole = Arc::new(MemState::default());
    let mut derived: Vec<Value> = Vec::new();
    let mut extracted = Ok(());
    for chunk in events.chunks(batch_size) {
        match p.extract(whole.clone(), chunk) {
            Ok(out) => {
                whole.apply(out.writes);
                derived.extend(out.derived.iter().flatten().map(derived_json));
            }
            Err(e) => {
                extracted = Err(e);
                break;
            }
        }
    }
    if let Some(want) = &fixture.error {
        return expect_refusal(extracted, want);
    }
    extracted.map_err(|e| failed("the batch", &e))?;
    let one_by_one = Arc::new(MemState::default());
    let mut alone = Vec::new();
    for e in events {
        let o = p
            .extract(one_by_one.clone(), std::slice::from_ref(e))
            .map_err(|err| failed(&format!("event {} alone", e.position), &err))?;
        one_by_one.apply(o.writes);
        alone.extend(o.derived.iter().flatten().map(derived_json));
    }
    if derived != alone {
        return Err(format!(
            "  what is derived depends on how events are batched: as one batch (-) and one \
             event per call (+):\n{}",
            list_diff(&derived, &alone)
        ));
    }
    let mut problems = Vec::new();
    if let Some(want) = &fixture.derived {
        // Metadata is compared only where the fixture gives it.
        let got: Vec<Value> = derived
            .iter()
            .zip(want.iter().chain(std::iter::repeat(&Value::Null)))
            .map(|(g, w)| {
                let mut g = g.clone();
                if let Some(o) = g.as_object_mut() {
                    match w.get("metadata") {
                        None => {
                            o.remove("metadata");
                        }
                        // No metadata is `{}`.
                        Some(_) if !o.contains_key("metadata") => {
                            o.insert("metadata".into(), Value::Object(Default::default()));
                        }
                        Some(_) => {}
                    }
                }
                g
            })
            .collect();
        if want.len() != got.len() || want.iter().zip(&got).any(|(w, g)| !same(w, g)) {
            problems.push(format!(
                "  the derived events differ (- expected, + got):\n{}",
                list_diff(want, &got)
            ));
        }
    }
    if let Some(want) = &fixture.state {
        let state = snapshot(&whole);
        if !same_map(want, &state) {
            problems.push(format!(
                "  the state differs (- expected, + got):\n{}",
                map_diff(want, &state)
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// A tool as the host loads it: its description checked against its manifest, its input
/// schema compiled, so that an invocation the host would refuse unrun is refused here too.
struct ToolCheck<'a> {
    plugin: &'a ToolPlugin,
    info: ToolInfo,
    schema: jsonschema::Validator,
}

impl<'a> ToolCheck<'a> {
    fn new(plugin: &'a ToolPlugin, manifest: &Manifest) -> Result<Self> {
        let info = plugin.describe()?;
        if info.name != manifest.name {
            bail!(
                "the tool describes itself as {:?} but its manifest names it {:?}; the host \
                 refuses that at load (requests name tools by the manifest's name)",
                info.name,
                manifest.name
            );
        }
        let schema = jsonschema::validator_for(&info.input_schema).map_err(|e| {
            anyhow::anyhow!(
                "the tool's input schema (from describe()) is not a valid JSON Schema: {e}"
            )
        })?;
        Ok(Self {
            plugin,
            info,
            schema,
        })
    }

    fn check(&self, fixture: &Fixture) -> Result<(), String> {
        let mut problems = Vec::new();
        for (i, inv) in fixture.invocations.iter().enumerate() {
            // The host answers `invalid_input` without running the tool.
            let invalid: Vec<String> = self
                .schema
                .iter_errors(&inv.input)
                .take(3)
                .map(|e| format!("{e} at {}", e.instance_path()))
                .collect();
            let got = if invalid.is_empty() {
                self.plugin
                    .invoke(&inv.input.to_string())
                    .map_err(|e| e.to_string())
            } else {
                Err(format!(
                    "invalid_input: the input breaks the tool's schema: {}",
                    invalid.join("; ")
                ))
            };
            match (&inv.error, got) {
                (Some(want), Ok(out)) => problems.push(format!(
                    "  invocation {i} ({}): expected a refusal containing {want:?}, got {out}",
                    inv.input
                )),
                (Some(want), Err(e)) => {
                    if !e.contains(want.as_str()) {
                        problems.push(format!(
                            "  invocation {i} ({}): expected a refusal containing {want:?}, got: {e}",
                            inv.input
                        ));
                    }
                }
                (None, Ok(out)) => {
                    let got = parse_or_text(&out);
                    if let Some(want) = &inv.output
                        && !same(want, &got)
                    {
                        problems.push(format!(
                            "  invocation {i} of {} with {}:\n    - {want}\n    + {got}",
                            self.info.name, inv.input
                        ));
                    }
                }
                (None, Err(e)) => {
                    problems.push(format!("  invocation {i} ({}) failed: {e}", inv.input))
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

fn failed(what: &str, e: &PluginError) -> String {
    format!("  {what} failed: {e}")
}

/// Passes when `got` failed with a message containing `want`.
fn expect_refusal(got: Result<(), PluginError>, want: &str) -> Result<(), String> {
    match got {
        Ok(()) => Err(format!(
            "  expected a refusal containing {want:?}, but the plugin accepted the events"
        )),
        // (tools' refusals are checked in ToolCheck::check)
        Err(e) if e.to_string().contains(want) => Ok(()),
        Err(e) => Err(format!(
            "  expected a refusal containing {want:?}, got: {e}"
        )),
    }
}

/// A derived event as a fixture writes it.
fn derived_json(d: &crate::plugin::Derived) -> Value {
    let mut v = serde_json::json!({
        "type": d.event.event_type.as_str(),
        "stream": d.stream.as_str(),
        "payload": parse_or_text(d.event.payload.as_str()),
    });
    if !d.event.metadata.is_empty() {
        v["metadata"] = serde_json::to_value(&d.event.metadata).unwrap_or(Value::Null);
    }
    v
}

/// The state as key to JSON value (a value that is not JSON kept as a string).
fn snapshot(state: &MemState) -> BTreeMap<String, Value> {
    state
        .0
        .read()
        .expect("fixture state lock")
        .iter()
        .map(|(k, v)| (k.clone(), parse_or_text(v)))
        .collect()
}

fn parse_or_text(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_owned()))
}

/// JSON equality where numbers compare by value (`20` is `20.0`; integers exactly).
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        // Integers exactly; a float on either side by value (`20` is `20.0`).
        (Value::Number(x), Value::Number(y)) => {
            match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(x), Some(y), _, _) => x == y,
                (_, _, Some(x), Some(y)) => x == y,
                _ if x.is_f64() || y.is_f64() => x.as_f64() == y.as_f64(),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn same_map(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same(v, w)))
}

/// The keys where `a` and `b` differ, `-` for `a`'s value and `+` for `b`'s.
fn map_diff(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>) -> String {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if same(x, y) => {}
            (x, y) => {
                if let Some(x) = x {
                    out.push(format!("    - {k:?}: {x}"));
                }
                if let Some(y) = y {
                    out.push(format!("    + {k:?}: {y}"));
                }
            }
        }
    }
    out.join("\n")
}

/// Item by item, where `a` and `b` differ.
fn list_diff(a: &[Value], b: &[Value]) -> String {
    let mut out = Vec::new();
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if same(x, y) => {}
            (x, y) => {
                if let Some(x) = x {
                    out.push(format!("    - [{i}] {x}"));
                }
                if let Some(y) = y {
                    out.push(format!("    + [{i}] {y}"));
                }
            }
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(v: Value) -> Fixture {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn numbers_compare_by_value_and_integers_exactly() {
        assert!(same(&json!(20), &json!(20.0)));
        assert!(same(&json!({"a": [1, 2.5]}), &json!({"a": [1.0, 2.5]})));
        assert!(!same(
            &json!(9007199254740993u64),
            &json!(9007199254740992u64)
        ));
        assert!(!same(&json!(-1), &json!(18446744073709551615u64)));
        assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    }

    #[test]
    fn a_fixture_must_check_something_that_applies_to_its_kind() {
        let events = json!([{"type": "a.b"}]);
        assert!(
            fixture(json!({"events": events, "state": {}}))
                .check_fits(Kind::Projection)
                .is_ok()
        );
        let nothing = fixture(json!({"events": events})).check_fits(Kind::Projection);
        assert!(nothing.unwrap_err().contains("checks nothing"));
        let wrong = fixture(json!({"events": events, "derived": []})).check_fits(Kind::Projection);
        assert!(
            wrong
                .unwrap_err()
                .contains("`derived` does not apply to a projection")
        );
        let tool_state = fixture(json!({"state": {}})).check_fits(Kind::Tool);
        assert!(
            tool_state
                .unwrap_err()
                .contains("`state` does not apply to a tool")
        );
        let both = fixture(json!({"events": events, "error": "x", "state": {}}));
        assert!(both.check_fits(Kind::Extractor).is_err());
        let neither = fixture(json!({"invocations": [{"input": {}}]})).check_fits(Kind::Tool);
        assert!(neither.unwrap_err().contains("one of `output` and `error`"));
    }
}
