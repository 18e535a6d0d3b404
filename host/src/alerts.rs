//! Alerts: thresholds from the host's configuration, checked every second against the
//! plugins' status and the flow index's figures. Crossing one appends
//! `evhost.alert.raised` (and `evhost.alert.cleared` when it clears) to the stream
//! `evhost-alerts`, so the log says when each began and ended; the ones active now are in
//! [`Alerts::active`] and in `/metrics` as `evhost_alert_active`. Calls `registry`,
//! `flows`, `log`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::event::{EventType, NewEvent, Payload};
use crate::log::{EventLog, ExpectedVersion, StreamAppend};
use crate::plugin::PluginStore;
use crate::registry::Registry;

/// The stream alert events go to.
pub const STREAM: &str = "evhost-alerts";
/// A threshold was crossed.
pub const RAISED: &str = "evhost.alert.raised";
/// A threshold crossed before is no longer.
pub const CLEARED: &str = "evhost.alert.cleared";

/// How often the thresholds are checked.
const EVERY: Duration = Duration::from_secs(1);
/// The window of the rates (dead letters per minute, failure rates, flow latency).
const WINDOW: Duration = Duration::from_secs(60);

/// The thresholds of the host's configuration; each is off unless set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertRules {
    /// A plugin more than this many events behind the head.
    pub lag: Option<u64>,
    /// A plugin dead-lettering more than this many events in the last minute.
    pub dead_letters_per_minute: Option<u64>,
    /// Flows answered in the last minute taking longer than this on average, in ms.
    pub flow_ms: Option<f64>,
    /// A tool whose invocations in the last minute failed at more than this rate (0..1),
    /// over at least [`MIN_INVOCATIONS`] of them.
    pub tool_failure_rate: Option<f64>,
}

/// A raised alert clears when its value falls to this share of its threshold.
const CLEAR_AT: f64 = 0.9;

/// Fewest invocations in the window for a tool's failure rate to count.
pub const MIN_INVOCATIONS: u64 = 5;

impl AlertRules {
    /// True when no threshold is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One alert that is raised now.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Active {
    /// `lag`, `dead_letters_per_minute`, `flow_ms` or `tool_failure_rate`.
    pub alert: &'static str,
    /// The plugin or tool it is about (`flows` for the flow latency).
    pub subject: String,
    /// The value when it was last checked.
    pub value: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// When it was raised (RFC 3339).
    pub since: String,
}

/// The running checks and what they found.
#[derive(Clone, Default)]
pub struct Alerts {
    active: Arc<Mutex<BTreeMap<(&'static str, String), Active>>>,
    /// Every (alert, subject) ever raised, so a cleared one reads 0 in `/metrics`.
    seen: Arc<Mutex<std::collections::BTreeSet<(&'static str, String)>>>,
}

impl Alerts {
    /// The alerts raised now, by alert and subject.
    pub fn active(&self) -> Vec<Active> {
        self.active
            .lock()
            .expect("alerts lock")
            .values()
            .cloned()
            .collect()
    }

    /// Every (alert, subject) raised since the host started, and whether it is raised now.
    pub fn states(&self) -> Vec<(&'static str, String, bool)> {
        let active = self.active.lock().expect("alerts lock");
        self.seen
            .lock()
            .expect("alerts lock")
            .iter()
            .map(|(a, s)| (*a, s.clone(), active.contains_key(&(*a, s.clone()))))
            .collect()
    }
}

/// Counters sampled over the window: (when, value) pairs, oldest first.
#[derive(Default)]
struct Window(VecDeque<(Instant, f64)>);

impl Window {
    /// Adds `value` now and answers how much it grew over the window.
    fn grew(&mut self, now: Instant, value: f64) -> f64 {
        self.0.push_back((now, value));
        while self.0.len() > 1 && now.duration_since(self.0[0].0) > WINDOW {
            self.0.pop_front();
        }
        (value - self.0[0].1).max(0.0)
    }
}

/// Starts checking `rules` every second; the task ends when `stop` fires.
pub(crate) fn start(
    rules: AlertRules,
    registry: Arc<Registry>,
    flows: Option<PluginStore>,
    log: Arc<dyn EventLog>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Alerts {
    let alerts = Alerts::default();
    let checks = Checks {
        rules,
        registry,
        flows,
        log,
        alerts: alerts.clone(),
        windows: HashMap::new(),
        rounds: 0,
    };
    tokio::spawn(checks.run(stop));
    alerts
}

struct Checks {
    rules: AlertRules,
    registry: Arc<Registry>,
    flows: Option<PluginStore>,
    log: Arc<dyn EventLog>,
    alerts: Alerts,
    windows: HashMap<(&'static str, String), Window>,
    /// Checks done so far.
    rounds: u64,
}

impl Checks {
    async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            let values = self.values().await;
            self.apply(values).await;
            self.rounds += 1;
        }
    }

    /// Each checked (alert, subject) with its value now and its threshold.
    async fn values(&mut self) -> Vec<((&'static str, String), f64, f64)> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut tools = std::collections::HashSet::new();
        for p in self.registry.list().await {
            if p.tool.is_some() {
                tools.insert(p.name.clone());
            }
            if let Some(t) = self.rules.lag {
                out.push((("lag", p.name.clone()), p.lag as f64, t as f64));
            }
            if let Some(t) = self.rules.dead_letters_per_minute {
                let key = ("dead_letters_per_minute", p.name.clone());
                // A runner counts its dead letters from its start: from 0.
                let grew = self
                    .windows
                    .entry(key.clone())
                    .or_insert_with(|| Window(VecDeque::from([(now, 0.0)])))
                    .grew(now, p.status.dead_lettered as f64);
                out.push((key, grew, t as f64));
            }
        }
        let figures = match &self.flows {
            Some(store)
                if self.rules.flow_ms.is_some() || self.rules.tool_failure_rate.is_some() =>
            {
                let store = store.clone();
                tokio::task::spawn_blocking(move || crate::flows::metrics(&store))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            _ => None,
        };
        let Some(m) = figures else { return out };
        if let Some(t) = self.rules.flow_ms {
            let latency = &m["flows"]["latency"];
            let count = latency["count"].as_f64().unwrap_or(0.0);
            let sum = latency["mean_ms"].as_f64().unwrap_or(0.0) * count;
            let n = self.grown(("flow_count", "flows".into()), now, count);
            let ms = self.grown(("flow_sum", "flows".into()), now, sum);
            let mean = if n > 0.0 { ms / n } else { 0.0 };
            out.push((("flow_ms", "flows".into()), mean, t));
        }
        if let (Some(t), Some(figures)) = (self.rules.tool_failure_rate, m["tools"].as_object()) {
            // Only loaded tools: a request may name any tool.
            for (tool, f) in figures.iter().filter(|(name, _)| tools.contains(*name)) {
                let all = self.grown(
                    ("tool_all", tool.clone()),
                    now,
                    f["invocations"].as_f64().unwrap_or(0.0),
                );
                let failed = self.grown(
                    ("tool_failed", tool.clone()),
                    now,
                    f["failed"].as_f64().unwrap_or(0.0),
                );
                let rate = if all >= MIN_INVOCATIONS as f64 {
                    failed / all
                } else {
                    0.0
                };
                out.push((("tool_failure_rate", tool.clone()), rate, t));
            }
        }
        out
    }

    /// How much a figure of the flow index (kept across restarts) grew in the window. Read
    /// at the first check, its value is the baseline, so a start does not count history as
    /// new; a figure that appears later (a tool's first outcome) starts from 0.
    fn grown(&mut self, key: (&'static str, String), now: Instant, value: f64) -> f64 {
        let first = self.rounds == 0;
        self.windows
            .entry(key)
            .or_insert_with(|| {
                let base = if first { value } else { 0.0 };
                Window(VecDeque::from([(now, base)]))
            })
            .grew(now, value)
    }

    /// Raises what crossed its threshold and clears what no longer does, announcing each
    /// change.
    async fn apply(&mut self, values: Vec<((&'static str, String), f64, f64)>) {
        let mut changes = Vec::new();
        {
            let mut active = self.alerts.active.lock().expect("alerts lock");
            let checked: Vec<_> = values.iter().map(|(k, _, _)| k.clone()).collect();
            for (key, value, threshold) in values {
                // Raised above the threshold, cleared only below 90% of it, so a value
                // hovering at the threshold does not raise and clear every second.
                let raised = active.contains_key(&key);
                let over = if raised {
                    value > threshold * CLEAR_AT
                } else {
                    value > threshold
                };
                match (over, active.get_mut(&key)) {
                    (true, Some(a)) => a.value = value,
                    (true, None) => {
                        let a = Active {
                            alert: key.0,
                            subject: key.1.clone(),
                            value,
                            threshold,
                            since: chrono::Utc::now().to_rfc3339(),
                        };
                        changes.push((RAISED, a.clone()));
                        self.alerts
                            .seen
                            .lock()
                            .expect("alerts lock")
                            .insert(key.clone());
                        active.insert(key, a);
                    }
                    (false, Some(_)) => {
                        let mut a = active.remove(&key).expect("present");
                        a.value = value;
                        changes.push((CLEARED, a));
                    }
                    (false, None) => {}
                }
            }
            // A plugin that was unloaded takes its alerts with it.
            let gone: Vec<_> = active
                .keys()
                .filter(|k| {
                    matches!(k.0, "lag" | "dead_letters_per_minute") && !checked.contains(k)
                })
                .cloned()
                .collect();
            for key in gone {
                if let Some(a) = active.remove(&key) {
                    changes.push((CLEARED, a));
                }
            }
        }
        for (ty, a) in changes {
            tracing::warn!(
                alert = a.alert,
                subject = a.subject,
                value = a.value,
                threshold = a.threshold,
                "{}",
                if ty == RAISED {
                    "alert raised"
                } else {
                    "alert cleared"
                }
            );
            let event = NewEvent::new(
                EventType::new(ty).expect("a valid type"),
                Payload::from_json(&serde_json::to_string(&a).expect("serializes")).expect("JSON"),
            );
            let append = StreamAppend {
                stream: STREAM.into(),
                expected: ExpectedVersion::Any,
                events: vec![event],
            };
            if let Err(e) = self.log.append(vec![append]).await {
                tracing::warn!(error = %e, "appending an alert event failed");
            }
        }
    }
}
