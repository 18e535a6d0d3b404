//! What the failure policy records: dead letters (events a plugin could not handle,
//! parked so the plugin moves on), quarantine (a plugin stopped after too many in a row),
//! and the `evhost.plugin.>` events that announce each transition, so operators can audit
//! and project them like any other event.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::event::{Event, EventId, EventType, Metadata, NewEvent, Payload};
use crate::log::{ExpectedVersion, StreamAppend};

/// An event a plugin failed on, parked after its retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// `<plugin>.<position>`: how operators name it.
    pub id: DeadLetterId,
    /// The plugin that failed.
    pub plugin: String,
    /// The event's position in the log.
    pub position: u64,
    /// The event's id.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// The last failure, naming the plugin and what happened.
    pub error: String,
    /// Calls that failed on this event alone (first try, retries and operator retries).
    pub attempts: u32,
    /// When it was parked.
    pub dead_lettered_at: DateTime<Utc>,
    /// When it last failed.
    pub last_failed_at: DateTime<Utc>,
}

impl DeadLetter {
    /// A dead letter of `plugin` for `event`, after `attempts` failed calls.
    pub fn new(plugin: &str, event: &Event, error: String, attempts: u32) -> Self {
        let now = Utc::now();
        Self {
            id: DeadLetterId::new(plugin, event.position),
            plugin: plugin.to_owned(),
            position: event.position,
            event_id: event.id.clone().into(),
            event_type: event.event_type.as_str().to_owned(),
            error,
            attempts,
            dead_lettered_at: now,
            last_failed_at: now,
        }
    }
}

/// A dead letter's id: the plugin and the position of the event it failed on, written
/// `<plugin>.<position>` (plugin names have no `.`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeadLetterId {
    /// The plugin's name.
    pub plugin: String,
    /// The event's position.
    pub position: u64,
}

impl DeadLetterId {
    /// The id of `plugin`'s dead letter at `position`.
    pub fn new(plugin: &str, position: u64) -> Self {
        Self {
            plugin: plugin.to_owned(),
            position,
        }
    }
}

impl std::fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.plugin, self.position)
    }
}

/// Text that is not a dead-letter id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a dead-letter id; ids look like <plugin>.<position>")]
pub struct InvalidDeadLetterId(pub String);

impl std::str::FromStr for DeadLetterId {
    type Err = InvalidDeadLetterId;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidDeadLetterId(id.to_owned());
        let (plugin, position) = id.rsplit_once('.').ok_or_else(invalid)?;
        let position = position.parse().map_err(|_| invalid())?;
        Ok(Self::new(plugin, position))
    }
}

impl Serialize for DeadLetterId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeadLetterId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why and since when a plugin is quarantined: it consumes nothing until resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantine {
    /// What happened, with the last failure.
    pub reason: String,
    /// Dead letters in a row that tripped it.
    pub dead_letters_in_a_row: u32,
    /// The checkpoint it stopped at.
    pub position: u64,
    /// When.
    pub since: DateTime<Utc>,
}

/// The stream audit events of `plugin` are appended to.
pub fn audit_stream(plugin: &str) -> String {
    format!("evhost-plugin-{plugin}")
}

/// `evhost.plugin.dead_lettered`: an event was parked.
pub const DEAD_LETTERED: &str = "evhost.plugin.dead_lettered";
/// `evhost.plugin.quarantined`: a plugin stopped consuming.
pub const QUARANTINED: &str = "evhost.plugin.quarantined";
/// `evhost.plugin.resumed`: an operator cleared a quarantine.
pub const RESUMED: &str = "evhost.plugin.resumed";
/// `evhost.plugin.dead_letter_retried`: an operator retried a dead letter (and how it went).
pub const DEAD_LETTER_RETRIED: &str = "evhost.plugin.dead_letter_retried";
/// `evhost.plugin.dead_letter_deleted`: an operator dropped a dead letter.
pub const DEAD_LETTER_DELETED: &str = "evhost.plugin.dead_letter_deleted";
/// `evhost.plugin.loaded`: a plugin was loaded or replaced.
pub const LOADED: &str = "evhost.plugin.loaded";
/// `evhost.plugin.unloaded`: a plugin was unloaded.
pub const UNLOADED: &str = "evhost.plugin.unloaded";
/// `evhost.plugin.switched`: a plugin's live version changed (a candidate caught up or was
/// promoted, or the operator rolled back).
pub const SWITCHED: &str = "evhost.plugin.switched";

/// An audit event of `event_type` about `plugin`, caused by `cause` when there is one. A
/// fixed `id` makes the append idempotent (a batch that runs again after a crash announces
/// its dead letter once).
pub(crate) fn audit(
    event_type: &'static str,
    plugin: &str,
    mut payload: Value,
    cause: Option<&Event>,
    id: Option<EventId>,
) -> StreamAppend {
    if let Value::Object(m) = &mut payload {
        m.insert("plugin".into(), json!(plugin));
    }
    let mut metadata = Metadata::default();
    if let Some(c) = cause {
        metadata.causation_id = Some(c.id.clone().into());
        metadata
            .correlation_id
            .clone_from(&c.metadata.correlation_id);
    }
    StreamAppend {
        stream: audit_stream(plugin).into(),
        expected: ExpectedVersion::Any,
        events: vec![NewEvent {
            id,
            event_type: EventType::new(event_type).expect("audit types are valid"),
            source: "evhost".into(),
            payload: Payload::from_value(&payload),
            metadata,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_plugin_and_position_and_audit_types_are_valid() {
        let id = DeadLetterId::new("my-plugin", 42);
        assert_eq!(id.to_string(), "my-plugin.42");
        assert_eq!("my-plugin.42".parse(), Ok(id.clone()));
        assert!("my-plugin".parse::<DeadLetterId>().is_err());
        assert!("my-plugin.x".parse::<DeadLetterId>().is_err());
        assert_eq!(serde_json::to_value(&id).unwrap(), json!("my-plugin.42"));
        for t in [
            DEAD_LETTERED,
            QUARANTINED,
            RESUMED,
            DEAD_LETTER_RETRIED,
            DEAD_LETTER_DELETED,
            LOADED,
            UNLOADED,
            SWITCHED,
        ] {
            let a = audit(t, "p", json!({}), None, None);
            assert!(
                crate::pattern::Pattern::new("evhost.plugin.>")
                    .unwrap()
                    .matches(a.events[0].event_type.as_str())
            );
            assert_eq!(a.events[0].payload.to_value()["plugin"], "p");
        }
    }
}
