//! `evhost plugin test`: runs a built component in the host's runtime, with its manifest's
//! limits and the grants given, over fixture files (`fixture.rs`), and says where the result
//! differs from what each fixture expects (`compare.rs`). As on the host, only subscribed
//! events reach the plugin, in batches of at most its `batch_size`; a projection's or
//! extractor's events are also handed over one per call, and a plugin whose result depends
//! on how the host batches events fails.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::compare::{list_diff, map_diff, parse_or_text, same, same_map, snapshot};
use super::fixture::{Fixture, fixture_events};
use crate::event::Event;
use crate::plugin::{
    ExtractorPlugin, Kind, Manifest, MemState, Output, PluginConfig, PluginError, ProjectionPlugin,
    Runtime, ToolInfo, ToolPlugin, UsageReport,
};
use crate::registry::LoadOptions;

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
    /// Time per event of the fixtures' events (those not expected to be refused), folded
    /// warm in batches of `cost_batch`.
    pub ns_per_event: Option<f64>,
    /// The batch size that time was measured at: 1,024, or the manifest's `batch_size` if
    /// smaller.
    pub cost_batch: usize,
    /// What the plugin used, from the runtime's own accounting.
    pub usage: UsageReport,
    /// Time to compile the component (or load it from the cache).
    pub compile: Duration,
}

/// The plugin, linked as its manifest's kind.
enum Loaded {
    Projection(ProjectionPlugin),
    Extractor(ExtractorPlugin),
    Tool(ToolCheck),
}

impl Loaded {
    fn logs(&self) -> &crate::plugin::PluginLogs {
        match self {
            Loaded::Projection(p) => p.logs(),
            Loaded::Extractor(p) => p.logs(),
            Loaded::Tool(t) => t.plugin.logs(),
        }
    }

    fn usage(&self) -> UsageReport {
        match self {
            Loaded::Projection(p) => p.usage(),
            Loaded::Extractor(p) => p.usage(),
            Loaded::Tool(t) => t.plugin.usage(),
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
        Kind::Tool => Loaded::Tool(ToolCheck::new(
            runtime.plugin_configured(&compiled, manifest, config)?,
            manifest,
        )?),
    };
    let (mut passed, mut failed) = (0, Vec::new());
    let mut measured: Vec<Arc<Event>> = Vec::new();
    let batch_size = manifest.limits.batch_size.max(1);
    let subscribed = crate::pattern::PatternSet::new(manifest.subscriptions.clone());
    for file in files {
        let shown = file.strip_prefix(".").unwrap_or(file).display();
        let fixture = Fixture::read(file, manifest.kind)?;
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
        let outcome = match &loaded {
            Loaded::Projection(p) => check_projection(p, &fixture, &events, batch_size),
            Loaded::Extractor(p) => check_extractor(p, &fixture, &events, batch_size),
            Loaded::Tool(t) => t.check(&fixture),
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
                passed += 1;
            }
            Err(why) => {
                let about = fixture
                    .description
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                println!("FAIL  {shown}{about}\n{why}");
                failed.push((file.clone(), why));
            }
        }
    }
    let cost_batch = COST_BATCH.min(batch_size);
    Ok(TestReport {
        passed,
        failed,
        ns_per_event: cost_per_event(&loaded, &measured, cost_batch),
        cost_batch,
        usage: loaded.usage(),
        compile: compiled.took,
    })
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

/// What handing a fixture's events to a plugin gave: the state, the derived events (as a
/// fixture writes them), and the failure that ended it, if one did.
struct Folded {
    state: Arc<MemState>,
    derived: Vec<Value>,
    result: Result<(), PluginError>,
}

/// Hands `events` to `call` in batches of at most `size` over one state, as the host would,
/// stopping at the first failure.
fn fold_in(
    events: &[Arc<Event>],
    size: usize,
    call: &dyn Fn(Arc<MemState>, &[Arc<Event>]) -> Result<Output, PluginError>,
) -> Folded {
    let state = Arc::new(MemState::default());
    let mut derived = Vec::new();
    for chunk in events.chunks(size) {
        match call(state.clone(), chunk) {
            Ok(out) => {
                state.apply(out.writes);
                derived.extend(out.derived.iter().flatten().map(derived_json));
            }
            Err(e) => {
                return Folded {
                    state,
                    derived,
                    result: Err(e),
                };
            }
        }
    }
    Folded {
        state,
        derived,
        result: Ok(()),
    }
}

/// Checks a projection or an extractor (`call` folds a batch) against `fixture`: handed
/// its events in batches of at most `batch_size`, and again one event per call.
fn check_fold(
    fixture: &Fixture,
    events: &[Arc<Event>],
    batch_size: usize,
    call: &dyn Fn(Arc<MemState>, &[Arc<Event>]) -> Result<Output, PluginError>,
) -> Result<Folded, String> {
    let batched = fold_in(events, batch_size, call);
    if let Some(want) = &fixture.error {
        expect_refusal(batched.result, want)?;
        return Ok(Folded {
            result: Ok(()),
            ..batched
        });
    }
    if let Err(e) = &batched.result {
        return Err(failed("the batch", e));
    }
    let alone = fold_in(events, 1, call);
    if let Err(e) = &alone.result {
        return Err(failed("an event alone", e));
    }
    let (state, state_alone) = (snapshot(&batched.state), snapshot(&alone.state));
    if state != state_alone {
        return Err(format!(
            "  the state depends on how events are batched: in batches (-) and one event per \
             call (+) it differs:\n{}",
            map_diff(&state, &state_alone)
        ));
    }
    if batched.derived != alone.derived {
        return Err(format!(
            "  what is derived depends on how events are batched: in batches (-) and one \
             event per call (+):\n{}",
            list_diff(&batched.derived, &alone.derived)
        ));
    }
    let mut problems = Vec::new();
    if let Some(want) = &fixture.state
        && !same_map(want, &state)
    {
        problems.push(format!(
            "  the state differs (- expected, + got):\n{}",
            map_diff(want, &state)
        ));
    }
    if let Some(want) = &fixture.derived {
        let got = as_expected(&batched.derived, want);
        if want.len() != got.len() || want.iter().zip(&got).any(|(w, g)| !same(w, g)) {
            problems.push(format!(
                "  the derived events differ (- expected, + got):\n{}",
                list_diff(want, &got)
            ));
        }
    }
    if problems.is_empty() {
        Ok(batched)
    } else {
        Err(problems.join("\n"))
    }
}

/// `derived` with each event's metadata left out where the expected one gives none, and
/// an absent metadata written `{}` where it does.
fn as_expected(derived: &[Value], want: &[Value]) -> Vec<Value> {
    derived
        .iter()
        .zip(want.iter().chain(std::iter::repeat(&Value::Null)))
        .map(|(g, w)| {
            let mut g = g.clone();
            if let Some(o) = g.as_object_mut() {
                match w.get("metadata") {
                    None => {
                        o.remove("metadata");
                    }
                    Some(_) if !o.contains_key("metadata") => {
                        o.insert("metadata".into(), Value::Object(Default::default()));
                    }
                    Some(_) => {}
                }
            }
            g
        })
        .collect()
}

fn check_projection(
    p: &ProjectionPlugin,
    fixture: &Fixture,
    events: &[Arc<Event>],
    batch_size: usize,
) -> Result<(), String> {
    let fold = |state: Arc<MemState>, batch: &[Arc<Event>]| {
        p.fold(state, batch).map(|writes| Output {
            writes,
            derived: Vec::new(),
        })
    };
    let folded = check_fold(fixture, events, batch_size, &fold)?;
    let mut problems = Vec::new();
    for q in &fixture.queries {
        let request = match &q.request {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        match p.query(folded.state.clone(), &request) {
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
    let extract = |state: Arc<MemState>, batch: &[Arc<Event>]| p.extract(state, batch);
    check_fold(fixture, events, batch_size, &extract).map(|_| ())
}

/// A tool as the host loads it: its description checked against its manifest, its input
/// schema compiled, so that an invocation the host would refuse unrun is refused here too.
struct ToolCheck {
    plugin: ToolPlugin,
    info: ToolInfo,
    schema: jsonschema::Validator,
}

impl ToolCheck {
    fn new(plugin: ToolPlugin, manifest: &Manifest) -> Result<Self> {
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
