//! The plugin manifest (`<name>.toml` beside `<name>.wasm`): what a plugin is, what it
//! subscribes to, its limits and its capabilities.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pattern::Pattern;

/// What kind of handler a plugin is; each is a WIT world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Folds events into state (`projection` world).
    Projection,
    /// Derives new events from events (`extractor` world).
    Extractor,
    /// Carries out requested work (`tool` world).
    Tool,
}

/// Where a plugin that has no checkpoint yet starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// From position 0: the whole log.
    #[default]
    Beginning,
    /// From the head at first load: only events appended afterwards.
    Now,
}

/// Resource limits of one plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Linear memory the plugin may grow to, in MiB.
    pub memory_mb: u64,
    /// Wall-clock time one call (a batch, a query, a tool invocation) may take, in
    /// milliseconds; also bounds each wait of a tool's outgoing HTTP.
    pub batch_timeout_ms: u64,
    /// Most events handed to the plugin in one call.
    pub batch_size: usize,
    /// Tools: most invocations running at once.
    pub concurrency: usize,
    /// Optional deterministic budget: wasm fuel (roughly one unit per instruction) a call
    /// may burn per event it handles (per invocation for tools): a call of n events gets n
    /// times this, shared among them. Unlike the time limit it fails the same way on every
    /// machine. Unset: no fuel accounting, no cost.
    pub fuel_per_event: Option<u64>,
    /// Bytes of state writes (keys and values) one call may buffer before it is stopped;
    /// nothing it wrote is committed. Unset: the memory limit (`memory_mb`), since what a
    /// call writes is held in the host's memory until its commit.
    pub state_write_bytes: Option<u64>,
    /// Bytes of one state entry (its key and value). Unset: a quarter of the memory
    /// limit, so a value fits in the plugin's memory when it reads it back.
    pub state_value_bytes: Option<u64>,
}

impl Limits {
    /// The write budget of one call, in bytes (see [`Limits::state_write_bytes`]).
    pub fn write_budget(&self) -> u64 {
        self.state_write_bytes.unwrap_or(self.memory_mb << 20)
    }

    /// The largest state entry, in bytes (see [`Limits::state_value_bytes`]).
    pub fn value_budget(&self) -> u64 {
        self.state_value_bytes.unwrap_or((self.memory_mb << 20) / 4)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mb: 64,
            batch_timeout_ms: 5_000,
            batch_size: 512,
            concurrency: 4,
            fuel_per_event: None,
            state_write_bytes: None,
            state_value_bytes: None,
        }
    }
}

/// What the runner does when a batch fails (`[on_failure]`).
///
/// A failing batch is split until the failing event is found; that event is retried
/// `retries` times with exponential backoff, then parked in the dead-letter store and
/// passed over. After `quarantine_after` dead letters in a row, with no event handled
/// in between, the plugin is quarantined until resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnFailure {
    /// Retries of one failing event before it is dead-lettered.
    pub retries: u32,
    /// Wait before the first retry, in milliseconds; doubled for each next one.
    pub backoff_ms: u64,
    /// Longest wait between retries, in milliseconds.
    pub max_backoff_ms: u64,
    /// Dead letters in a row that quarantine the plugin; 0 never quarantines.
    pub quarantine_after: u32,
}

impl Default for OnFailure {
    fn default() -> Self {
        Self {
            retries: 3,
            backoff_ms: 100,
            max_backoff_ms: 30_000,
            quarantine_after: 5,
        }
    }
}

/// How often a projection keeps a copy of its state, so that reading a past state
/// (`at=`) replays at most `every` positions of the log from the nearest copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Snapshots {
    /// Log positions between two copies (0: none, and `at=` replays from the start).
    pub every: u64,
    /// Copies kept; the oldest goes when one more is taken.
    pub keep: usize,
}

impl Default for Snapshots {
    fn default() -> Self {
        Self {
            every: 100_000,
            keep: 128,
        }
    }
}

/// What a plugin may do beyond handling its input. Nothing by default: no files,
/// environment, sockets or hosts, a clock that reads 1970 and a fixed random seed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capabilities {
    /// Hosts (`host:port`) a tool may call over HTTP (wasi:http); any other is denied.
    pub http: Vec<String>,
    /// A clock: the real one for tools; for projections and extractors the time of the
    /// batch's last event, so a replay sees what the first run saw.
    pub clock: bool,
    /// Randomness: real for tools; for projections and extractors seeded from the batch.
    pub random: bool,
}

/// A parsed, validated manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Unique name: lower-case letters, digits and `-`, at most 64 bytes.
    pub name: String,
    /// The plugin's own version, reported in status and errors.
    pub version: String,
    /// Which world the component implements.
    pub kind: Kind,
    /// Event-type patterns the plugin receives.
    #[serde(default)]
    pub subscriptions: Vec<Pattern>,
    /// Where a new plugin starts reading.
    #[serde(default)]
    pub start: StartFrom,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// Granted capabilities.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// The failure policy.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Projections: copies of the state kept for time travel.
    #[serde(default)]
    pub snapshots: Snapshots,
    /// Configuration the plugin reads through the `config` import (contract 0.2.0 and
    /// later); the operator may override any value at load time.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigEntry>,
}

/// One value of a manifest's `[config]`: `key = "value"`, or
/// `key = { value = "...", secret = true }`. A secret may leave its value to the load
/// (`--config key=value`); its value is never logged or shown.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConfigEntry {
    /// A plain value.
    Value(String),
    /// A value with options.
    Detailed(ConfigDetail),
}

/// `key = { value = "...", secret = true }`; unknown fields are refused.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDetail {
    /// The default value, if any (a secret without one must be given at load).
    #[serde(default)]
    pub value: Option<String>,
    /// Never logged or shown in status.
    #[serde(default)]
    pub secret: bool,
}

impl std::fmt::Debug for ConfigEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigEntry::Detailed(ConfigDetail { secret: true, .. }) => f.write_str("(secret)"),
            ConfigEntry::Value(v) | ConfigEntry::Detailed(ConfigDetail { value: Some(v), .. }) => {
                write!(f, "{v:?}")
            }
            ConfigEntry::Detailed(ConfigDetail { value: None, .. }) => f.write_str("(unset)"),
        }
    }
}

impl ConfigEntry {
    fn secret(&self) -> bool {
        matches!(
            self,
            ConfigEntry::Detailed(ConfigDetail { secret: true, .. })
        )
    }
    fn value(&self) -> Option<&str> {
        match self {
            ConfigEntry::Value(v) | ConfigEntry::Detailed(ConfigDetail { value: Some(v), .. }) => {
                Some(v)
            }
            ConfigEntry::Detailed(ConfigDetail { value: None, .. }) => None,
        }
    }
}

/// Longest configuration value, in bytes.
pub const MAX_CONFIG_VALUE_BYTES: usize = 16 * 1024;

/// A plugin's configuration as loaded: the manifest's `[config]` with the load's
/// overrides. Secret values are readable by the plugin and nowhere else: `Debug` and
/// [`PluginConfig::shown`] redact them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PluginConfig {
    values: BTreeMap<String, String>,
    secret: std::collections::BTreeSet<String>,
}

impl std::fmt::Debug for PluginConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.shown()).finish()
    }
}

impl PluginConfig {
    /// The manifest's configuration with `overrides` over it. Refuses an override of a key
    /// the manifest does not declare (a typo would otherwise pass unnoticed) and a secret
    /// left without a value.
    pub fn resolve(
        manifest: &Manifest,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut c = PluginConfig::default();
        for (key, value) in overrides {
            if !manifest.config.contains_key(key) {
                let declared: Vec<&str> = manifest.config.keys().map(String::as_str).collect();
                return Err(format!(
                    "config key {key:?} is not declared in the manifest's [config] (it declares {}); \
                     add it there to make it configurable",
                    if declared.is_empty() {
                        "none".to_owned()
                    } else {
                        declared.join(", ")
                    }
                ));
            }
            if value.len() > MAX_CONFIG_VALUE_BYTES {
                return Err(format!(
                    "config key {key:?} has a value of {} bytes, over the limit of {MAX_CONFIG_VALUE_BYTES}",
                    value.len()
                ));
            }
        }
        for (key, entry) in &manifest.config {
            if entry.secret() {
                c.secret.insert(key.clone());
            }
            match overrides.get(key).map(String::as_str).or(entry.value()) {
                Some(v) => {
                    c.values.insert(key.clone(), v.to_owned());
                }
                None => {
                    let what = if entry.secret() {
                        "is secret and has"
                    } else {
                        "has"
                    };
                    return Err(format!(
                        "config key {key:?} {what} no value: give it at load \
                         (evhost plugin load --config {key}=VALUE, or a config part in the upload)"
                    ));
                }
            }
        }
        Ok(c)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Every key with its value, secrets included: for the plugin only.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// True when nothing is configured.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Every key with its value as status shows it: secrets as `(secret)`.
    pub fn shown(&self) -> BTreeMap<String, String> {
        self.values
            .iter()
            .map(|(k, v)| {
                let v = if self.secret.contains(k) {
                    "(secret)".to_owned()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid plugin manifest: {0}")]
pub struct InvalidManifest(pub String);

/// True when `name` is a valid plugin name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// Who a plugin is: its manifest's name and version, shown as `name@version` in logs,
/// errors and status. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PluginId {
    text: std::sync::Arc<str>,
    name_len: usize,
}

impl PluginId {
    /// The plugin `name` at `version`.
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            text: format!("{name}@{version}").into(),
            name_len: name.len(),
        }
    }

    /// The plugin's name: what its state, dead letters and derived events are kept under.
    pub fn name(&self) -> &str {
        &self.text[..self.name_len]
    }

    /// `name@version`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `name@version`, shared.
    pub fn shared(&self) -> std::sync::Arc<str> {
        self.text.clone()
    }
}

impl std::fmt::Display for PluginId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Manifest {
    /// The plugin's identity: name and version.
    pub fn id(&self) -> PluginId {
        PluginId::new(&self.name, &self.version)
    }

    /// Parses and validates manifest TOML; unknown keys are refused.
    pub fn parse(text: &str) -> Result<Self, InvalidManifest> {
        let m: Manifest = toml::from_str(text).map_err(|e| InvalidManifest(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), InvalidManifest> {
        let bad = |m: String| Err(InvalidManifest(m));
        if !valid_name(&self.name) {
            return bad(format!(
                "name {:?} must be 1 to 64 lower-case letters, digits or '-'",
                self.name
            ));
        }
        if self.version.trim().is_empty() {
            return bad("version must not be empty".into());
        }
        for (key, entry) in &self.config {
            let ok = !key.is_empty()
                && key.len() <= 128
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !ok {
                return bad(format!(
                    "config key {key:?} must be 1 to 128 letters, digits, '_', '-' or '.'"
                ));
            }
            if entry
                .value()
                .is_some_and(|v| v.len() > MAX_CONFIG_VALUE_BYTES)
            {
                return bad(format!(
                    "config key {key:?} has a value over the limit of {MAX_CONFIG_VALUE_BYTES} bytes"
                ));
            }
        }
        if self.kind == Kind::Tool && !self.subscriptions.is_empty() {
            return bad(
                "a tool has no subscriptions: it receives the tool.invocation.requested events \
                 that name it"
                    .into(),
            );
        }
        if self.kind != Kind::Tool && self.subscriptions.is_empty() {
            return bad(format!(
                "a {} needs at least one pattern in subscriptions (e.g. [\"assistant.>\"])",
                self.kind.as_str()
            ));
        }
        let l = &self.limits;
        if !(1..=4096).contains(&l.memory_mb) {
            return bad(format!(
                "limits.memory_mb {} is outside 1..=4096",
                l.memory_mb
            ));
        }
        if !(1..=600_000).contains(&l.batch_timeout_ms) {
            return bad(format!(
                "limits.batch_timeout_ms {} is outside 1..=600000",
                l.batch_timeout_ms
            ));
        }
        if !(1..=10_000).contains(&l.batch_size) {
            return bad(format!(
                "limits.batch_size {} is outside 1..=10000",
                l.batch_size
            ));
        }
        if !(1..=256).contains(&l.concurrency) {
            return bad(format!(
                "limits.concurrency {} is outside 1..=256",
                l.concurrency
            ));
        }
        if l.fuel_per_event == Some(0) {
            return bad(
                "limits.fuel_per_event must be at least 1 (or left out for no fuel budget)".into(),
            );
        }
        for (field, v) in [
            ("state_write_bytes", l.state_write_bytes),
            ("state_value_bytes", l.state_value_bytes),
        ] {
            if v.is_some_and(|v| !(1..=1 << 32).contains(&v)) {
                return bad(format!(
                    "limits.{field} {} is outside 1..=4294967296 (4 GiB); leave it out for the default",
                    v.unwrap_or_default()
                ));
            }
        }
        if self.snapshots.every > 0 && self.snapshots.every < 1_000 {
            return bad(format!(
                "snapshots.every {} is below 1000 positions (each copy costs a pass over the state); give 0 for none",
                self.snapshots.every
            ));
        }
        if !(1..=100_000).contains(&self.snapshots.keep) {
            return bad(format!(
                "snapshots.keep {} is outside 1..=100000",
                self.snapshots.keep
            ));
        }
        let f = &self.on_failure;
        if f.retries > 100 {
            return bad(format!(
                "on_failure.retries {} is outside 0..=100",
                f.retries
            ));
        }
        if !(1..=3_600_000).contains(&f.backoff_ms) || f.max_backoff_ms < f.backoff_ms {
            return bad(format!(
                "on_failure.backoff_ms {} must be in 1..=3600000 and at most on_failure.max_backoff_ms {}",
                f.backoff_ms, f.max_backoff_ms
            ));
        }
        if f.max_backoff_ms > 3_600_000 {
            return bad(format!(
                "on_failure.max_backoff_ms {} is more than an hour (3600000)",
                f.max_backoff_ms
            ));
        }
        for host in &self.capabilities.http {
            let ok = host
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return bad(format!(
                    "capabilities.http entry {host:?} must be host:port (e.g. \"api.example.com:443\")"
                ));
            }
        }
        if self.kind != Kind::Tool && !self.capabilities.http.is_empty() {
            return bad(format!(
                "a {} cannot be granted http: what it computes must be a function of the log; \
                 put network calls in a tool",
                self.kind.as_str()
            ));
        }
        Ok(())
    }
}

impl Kind {
    /// The kind's name as in manifests and WIT worlds.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Projection => "projection",
            Kind::Extractor => "extractor",
            Kind::Tool => "tool",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_entries_refuse_unknown_fields_and_bad_keys() {
        let base = "name = \"p\"\nversion = \"1\"\nkind = \"tool\"\n[config]\n";
        let ok = Manifest::parse(&format!(
            "{base}a = \"x\"\nb = {{ value = \"y\" }}\nc = {{ secret = true }}\n"
        ))
        .unwrap();
        assert_eq!(ok.config.len(), 3);
        assert!(
            Manifest::parse(&format!("{base}a = {{ secret = true, valeu = \"x\" }}\n")).is_err()
        );
        assert!(Manifest::parse(&format!("{base}\"a b\" = \"x\"\n")).is_err());
        // A secret's value never shows in Debug.
        let m = Manifest::parse(&format!(
            "{base}k = {{ value = \"hunter2\", secret = true }}\n"
        ))
        .unwrap();
        assert!(!format!("{m:?}").contains("hunter2"));
        let c = PluginConfig::resolve(&m, &Default::default()).unwrap();
        assert_eq!(c.get("k"), Some("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.shown()["k"], "(secret)");
        let e = PluginConfig::resolve(&ok, &Default::default()).unwrap_err();
        assert!(e.contains("\"c\" is secret and has no value"), "{e}");
    }

    const GOOD: &str = r#"
name = "assistant-stats"
version = "0.1.0"
kind = "projection"
subscriptions = ["assistant.>"]
start = "now"
[limits]
memory_mb = 32
"#;

    #[test]
    fn a_good_manifest_parses_with_defaults_for_what_it_omits() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.name, "assistant-stats");
        assert_eq!(m.kind, Kind::Projection);
        assert_eq!(m.start, StartFrom::Now);
        assert_eq!(m.limits.memory_mb, 32);
        assert_eq!(m.limits.batch_timeout_ms, 5_000);
        assert_eq!(m.capabilities, Capabilities::default());
    }

    #[test]
    fn a_tool_may_be_granted_http_clock_and_random() {
        let m = Manifest::parse(
            "name = \"http-get\"\nversion = \"1\"\nkind = \"tool\"\n\
             [capabilities]\nhttp = [\"127.0.0.1:8080\"]\nclock = true\nrandom = true\n",
        )
        .unwrap();
        assert_eq!(m.capabilities.http, ["127.0.0.1:8080"]);
        assert!(m.capabilities.clock && m.capabilities.random);
        assert_eq!(m.limits.concurrency, 4);
    }

    #[test]
    fn bad_manifests_are_refused_with_what_is_wrong() {
        let cases = [
            ("name = \"x\"", "missing field"),
            (
                &GOOD.replace("assistant-stats", "Bad_Name"),
                "name \"Bad_Name\"",
            ),
            (&GOOD.replace("projection", "daemon"), "unknown variant"),
            (
                &GOOD.replace("assistant.>", "assistant.>.x"),
                "invalid pattern",
            ),
            (
                &GOOD.replace("[\"assistant.>\"]", "[]"),
                "at least one pattern",
            ),
            (
                &GOOD.replace("memory_mb = 32", "memory_mb = 0"),
                "memory_mb 0",
            ),
            (
                &GOOD.replace("memory_mb = 32", "memroy_mb = 32"),
                "unknown field `memroy_mb`",
            ),
            (&format!("{GOOD}\nextra = 1"), "unknown field"),
            (
                &format!("{GOOD}\n[capabilities]\nhttp = [\"example.com\"]"),
                "host:port",
            ),
            (
                &format!("{GOOD}\n[capabilities]\nhttp = [\"example.com:443\"]"),
                "projection cannot be granted http",
            ),
            (
                &format!("{GOOD}\n[capabilities]\nhttp = [\"example.com:443\"]")
                    .replace("projection", "extractor"),
                "extractor cannot be granted http",
            ),
            (
                &GOOD.replace("projection", "tool"),
                "a tool has no subscriptions",
            ),
            (
                &GOOD.replace("memory_mb = 32", "concurrency = 0"),
                "limits.concurrency 0",
            ),
            (
                &GOOD.replace("memory_mb = 32", "fuel_per_event = 0"),
                "fuel_per_event must be at least 1",
            ),
            (
                &format!("{GOOD}\n[on_failure]\nbackoff_ms = 500\nmax_backoff_ms = 100"),
                "on_failure.backoff_ms 500",
            ),
            (
                &format!("{GOOD}\n[on_failure]\nretrys = 1"),
                "unknown field `retrys`",
            ),
            ("not toml at all [", "invalid plugin manifest"),
        ];
        for (text, want) in cases {
            let err = Manifest::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
