//! The fixture file `evhost plugin test` reads: a JSON object of `events` in, and what
//! they must give out: `state` (every key a projection holds afterwards, with its JSON
//! value) and `queries` (`request` and `answer`) for a projection, `derived` (the events an
//! extractor derives, in order: `type`, `stream`, `payload`, and `metadata` when given) for
//! an extractor, `invocations` (`input`, and `output` or `error`) for a tool, or `error` (a
//! text the failure's message contains) for events the plugin must refuse. An event gives
//! `type`, and optionally `stream`, `payload`, `metadata`, `id` and `timestamp`; the rest is
//! filled in as the log would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::event::{Event, EventId, EventType, Metadata, Payload};
use crate::plugin::Kind;

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
    /// Reads the fixture in `file`, refusing one that is not a JSON object, checks nothing,
    /// or gives what does not apply to a plugin of `kind`.
    pub fn read(file: &Path, kind: Kind) -> Result<Fixture> {
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
            .check_fits(kind)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        Ok(fixture)
    }

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

/// The fixture's events as the log would hand them out: positions from 0, versions per
/// stream, ids and timestamps made up where not given.
pub(super) fn fixture_events(events: &[FixtureEvent]) -> Result<Vec<Arc<Event>>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(v: Value) -> Fixture {
        serde_json::from_value(v).unwrap()
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
