//! assistant-stats: an assistant aggregate folded from `assistant.*` events, one per stream.
//!
//! The state is what `get_assistant_stats` returns for an event-sourced assistant
//! (assistant_key, created_at, tool_count, tool_stats, active_goals, completed_goals,
//! reflection_count, tick_count, is_stopped, version) plus the goals themselves, the last
//! tool, the stop reason, configuration and the archive tombstone.

use std::borrow::Cow;
use std::collections::BTreeMap;

use evhost_sdk::{Error, Event, Projection};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One goal of the assistant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    pub description: String,
    pub priority: Option<i64>,
    pub parent_id: Option<String>,
    /// `active`, `completed`, or whatever status an update set (e.g. `blocked`).
    pub status: String,
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Value>,
}

/// The aggregate of one assistant stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AssistantStats {
    pub assistant_key: String,
    pub created_at: Option<String>,
    pub tool_count: u64,
    pub last_tool: Option<String>,
    pub tool_stats: BTreeMap<String, u64>,
    pub active_goals: u64,
    pub completed_goals: u64,
    pub goals: BTreeMap<String, Goal>,
    pub reflection_count: u64,
    pub tick_count: u64,
    pub is_stopped: bool,
    pub stop_reason: Option<String>,
    pub config: BTreeMap<String, Value>,
    pub is_archived: bool,
    /// Number of events applied (the stream's version after the last one).
    pub version: u64,
}

#[derive(Deserialize)]
struct Created {
    assistant_key: String,
    #[serde(default)]
    config: BTreeMap<String, Value>,
}
/// A payload text borrowed from the event where it can be (a text with escapes is owned).
/// serde borrows a `Cow<str>` field marked `#[serde(borrow)]`, but not one inside an
/// `Option`: `Option<Text>` does.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

// The payloads below borrow their texts from the event, so folding into a state that
// already holds the value copies nothing.
#[derive(Deserialize)]
struct ToolExecuted<'a> {
    #[serde(borrow)]
    tool_name: Cow<'a, str>,
}
#[derive(Deserialize)]
struct GoalCreated<'a> {
    #[serde(borrow)]
    goal_id: Cow<'a, str>,
    #[serde(default, borrow)]
    description: Cow<'a, str>,
    priority: Option<i64>,
    #[serde(borrow)]
    parent_id: Option<Text<'a>>,
}
#[derive(Deserialize)]
struct GoalUpdated {
    goal_id: String,
    status: Option<String>,
    priority: Option<i64>,
    #[serde(default)]
    metadata: BTreeMap<String, Value>,
}
#[derive(Deserialize)]
struct GoalCompleted<'a> {
    #[serde(borrow)]
    goal_id: Cow<'a, str>,
    #[serde(borrow)]
    outcome: Option<Text<'a>>,
}
#[derive(Deserialize)]
struct StopTriggered {
    reason: Option<String>,
}
#[derive(Deserialize)]
struct ConfigChanged {
    key: String,
    new_value: Value,
}

/// Projection of `assistant.>` events into [`AssistantStats`] per stream.
pub struct AssistantStatsProjection;

impl AssistantStats {
    fn count_active(&mut self) {
        self.active_goals = self
            .goals
            .values()
            .filter(|g| g.status != "completed")
            .count() as u64;
    }

    /// Applies one event; other types are ignored so new event types never break the fold.
    pub fn apply(&mut self, e: &Event) -> Result<(), Error> {
        match &*e.event_type {
            "assistant.created" => {
                let p: Created = e.payload()?;
                self.assistant_key = p.assistant_key;
                self.config = p.config;
                self.created_at = Some(rfc3339(e.timestamp_micros));
            }
            "assistant.tool.executed" => {
                let p: ToolExecuted = e.payload()?;
                self.tool_count += 1;
                match self.tool_stats.get_mut(&*p.tool_name) {
                    Some(n) => *n += 1,
                    None => {
                        self.tool_stats.insert(p.tool_name.to_string(), 1);
                    }
                }
                set_opt(&mut self.last_tool, Some(&p.tool_name));
            }
            "assistant.goal.created" => {
                let p: GoalCreated = e.payload()?;
                // A goal created again starts over, as a new one would.
                let goal = goal_mut(&mut self.goals, &p.goal_id);
                set(&mut goal.description, &p.description);
                goal.priority = p.priority;
                set_opt(&mut goal.parent_id, p.parent_id.as_deref());
                set(&mut goal.status, "active");
                goal.outcome = None;
                goal.metadata.clear();
            }
            "assistant.goal.updated" => {
                let p: GoalUpdated = e.payload()?;
                let goal = self.goals.entry(p.goal_id).or_insert_with(|| Goal {
                    status: "active".into(),
                    ..Goal::default()
                });
                if let Some(s) = p.status {
                    goal.status = s;
                }
                if p.priority.is_some() {
                    goal.priority = p.priority;
                }
                goal.metadata.extend(p.metadata);
            }
            "assistant.goal.completed" => {
                let p: GoalCompleted = e.payload()?;
                let goal = goal_mut(&mut self.goals, &p.goal_id);
                if goal.status != "completed" {
                    self.completed_goals += 1;
                    set(&mut goal.status, "completed");
                }
                set_opt(&mut goal.outcome, p.outcome.as_deref());
            }
            "assistant.reflection.recorded" => self.reflection_count += 1,
            "assistant.emergency_stop.triggered" => {
                let p: StopTriggered = e.payload()?;
                self.is_stopped = true;
                self.stop_reason = p.reason;
            }
            "assistant.emergency_stop.cleared" => {
                self.is_stopped = false;
                self.stop_reason = None;
            }
            "assistant.tick.completed" => self.tick_count += 1,
            "assistant.configuration.changed" => {
                let p: ConfigChanged = e.payload()?;
                self.config.insert(p.key, p.new_value);
            }
            "assistant.archived" => self.is_archived = true,
            _ => {}
        }
        self.count_active();
        self.version = e.version + 1;
        Ok(())
    }
}

impl Projection for AssistantStatsProjection {
    type State = AssistantStats;

    fn apply(_stream: &str, state: &mut AssistantStats, e: &Event) -> Result<(), Error> {
        state.apply(e)
    }
}

/// The goal under `id`, a default one inserted if there is none (the id copied only then).
fn goal_mut<'g>(goals: &'g mut BTreeMap<String, Goal>, id: &str) -> &'g mut Goal {
    if !goals.contains_key(id) {
        goals.insert(id.to_owned(), Goal::default());
    }
    goals.get_mut(id).expect("inserted above")
}

/// Sets `slot` to `value`, reusing its allocation.
fn set(slot: &mut String, value: &str) {
    if slot != value {
        slot.clear();
        slot.push_str(value);
    }
}

/// Sets `slot` to `value` (or clears it), reusing its allocation.
fn set_opt(slot: &mut Option<String>, value: Option<&str>) {
    match (slot.as_mut(), value) {
        (Some(s), Some(v)) => set(s, v),
        (_, v) => *slot = v.map(str::to_owned),
    }
}

/// Formats microseconds since the epoch as RFC 3339 UTC (`2025-12-06T10:00:00+00:00`).
fn rfc3339(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

evhost_sdk::export_projection!(AssistantStatsProjection);

#[cfg(test)]
mod tests {
    use super::*;
    use evhost_sdk::testing::Harness;

    fn ev<'a>(ty: &'a str, payload: &'a str, version: u64) -> Event<'a> {
        let mut e = Event::new(ty, payload).with_stream("assistant-1");
        e.version = version;
        e.timestamp_micros = 1_765_015_200_000_000; // 2025-12-06T10:00:00Z
        e
    }

    #[test]
    fn folds_the_assistant_lifecycle_into_stats() {
        let mut h = Harness::<AssistantStatsProjection>::new();
        h.handle(vec![
            ev(
                "assistant.created",
                r#"{"assistant_key":"my_assistant","config":{"model":"x"}}"#,
                0,
            ),
            ev(
                "assistant.tool.executed",
                r#"{"tool_name":"say","parameters":{},"reasoning":"r","success":true}"#,
                1,
            ),
            ev(
                "assistant.tool.executed",
                r#"{"tool_name":"inspect_location"}"#,
                2,
            ),
            ev("assistant.tool.executed", r#"{"tool_name":"say"}"#, 3),
            ev(
                "assistant.goal.created",
                r#"{"goal_id":"g1","description":"Build tavern","priority":1}"#,
                4,
            ),
            ev(
                "assistant.goal.created",
                r#"{"goal_id":"g2","description":"Sweep"}"#,
                5,
            ),
        ])
        .unwrap();
        h.handle(vec![
            ev(
                "assistant.goal.updated",
                r#"{"goal_id":"g1","status":"blocked"}"#,
                6,
            ),
            ev(
                "assistant.goal.completed",
                r#"{"goal_id":"g2","outcome":"done"}"#,
                7,
            ),
            ev(
                "assistant.reflection.recorded",
                r#"{"content":"c","tags":[]}"#,
                8,
            ),
            ev(
                "assistant.emergency_stop.triggered",
                r#"{"reason":"Too many errors","consecutive_errors":5}"#,
                9,
            ),
            ev(
                "assistant.tick.completed",
                r#"{"tick_number":42,"duration_ms":250.0,"action_taken":"say"}"#,
                10,
            ),
            ev(
                "assistant.configuration.changed",
                r#"{"key":"model","old_value":"x","new_value":"y"}"#,
                11,
            ),
        ])
        .unwrap();
        let s = h.state("assistant-1").unwrap();
        assert_eq!(s.assistant_key, "my_assistant");
        assert_eq!(s.created_at.as_deref(), Some("2025-12-06T10:00:00+00:00"));
        assert_eq!(
            (
                s.tool_count,
                s.tool_stats["say"],
                s.tool_stats["inspect_location"]
            ),
            (3, 2, 1)
        );
        assert_eq!((s.active_goals, s.completed_goals), (1, 1));
        assert_eq!(s.goals["g1"].status, "blocked");
        assert_eq!(s.goals["g2"].outcome.as_deref(), Some("done"));
        assert_eq!(
            (s.reflection_count, s.tick_count, s.is_stopped),
            (1, 1, true)
        );
        assert_eq!(s.stop_reason.as_deref(), Some("Too many errors"));
        assert_eq!(s.config["model"], "y");
        assert_eq!(s.version, 12);
        h.handle(vec![ev(
            "assistant.emergency_stop.cleared",
            r#"{"cleared_by":"admin"}"#,
            12,
        )])
        .unwrap();
        assert!(!h.state("assistant-1").unwrap().is_stopped);
    }

    #[test]
    fn a_goal_created_again_starts_over_and_escaped_texts_fold_as_their_value() {
        let mut h = Harness::<AssistantStatsProjection>::new();
        h.handle(vec![
            ev(
                "assistant.goal.created",
                r#"{"goal_id":"g1","description":"Build tavern","priority":1,"parent_id":"p"}"#,
                0,
            ),
            ev(
                "assistant.goal.updated",
                r#"{"goal_id":"g1","metadata":{"k":1}}"#,
                1,
            ),
            ev(
                "assistant.goal.completed",
                r#"{"goal_id":"g1","outcome":"built"}"#,
                2,
            ),
            ev("assistant.tool.executed", r#"{"tool_name":"say"}"#, 3),
            ev("assistant.tool.executed", r#"{"tool_name":"s\u0061y"}"#, 4),
        ])
        .unwrap();
        h.handle(vec![ev(
            "assistant.goal.created",
            r#"{"goal_id":"g\u0031","description":"Sweep"}"#,
            5,
        )])
        .unwrap();
        let s = h.state("assistant-1").unwrap();
        let want = Goal {
            description: "Sweep".into(),
            status: "active".into(),
            ..Goal::default()
        };
        assert_eq!(s.goals.len(), 1);
        assert_eq!(s.goals["g1"], want);
        assert_eq!((s.active_goals, s.completed_goals), (1, 1));
        assert_eq!(s.tool_stats["say"], 2);
        assert_eq!(s.last_tool.as_deref(), Some("say"));
    }

    #[test]
    fn payload_texts_are_borrowed_unless_they_have_escapes() {
        let p: GoalCompleted =
            serde_json::from_str(r#"{"goal_id":"g1","outcome":"built"}"#).unwrap();
        assert!(matches!(p.goal_id, Cow::Borrowed("g1")));
        assert!(matches!(p.outcome, Some(Text(Cow::Borrowed("built")))));
        let p: GoalCompleted =
            serde_json::from_str(r#"{"goal_id":"g1","outcome":"b\u00fcilt"}"#).unwrap();
        assert!(matches!(p.outcome, Some(Text(Cow::Owned(ref o))) if o == "büilt"));
        let p: GoalCreated = serde_json::from_str(r#"{"goal_id":"g1"}"#).unwrap();
        assert!(p.parent_id.is_none() && p.description.is_empty());
    }

    #[test]
    fn a_payload_that_does_not_fit_fails_the_batch_and_changes_nothing() {
        let mut h = Harness::<AssistantStatsProjection>::new();
        h.handle(vec![ev("assistant.created", r#"{"assistant_key":"a"}"#, 0)])
            .unwrap();
        let err = h
            .handle(vec![
                ev("assistant.tick.completed", "{}", 1),
                ev(
                    "assistant.tool.executed",
                    r#"{"tool":"missing tool_name"}"#,
                    2,
                ),
            ])
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput(ref m) if m.contains("tool_name")),
            "{err:?}"
        );
        assert_eq!(h.state("assistant-1").unwrap().tick_count, 0);
    }
}
