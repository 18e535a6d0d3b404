//! history: every event of a flow, grouped by `metadata.correlation_id`, in log order.

use evhost_sdk::{Error, Event, Keys, Projection};
use serde::{Deserialize, Serialize};

/// One event of a flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub position: u64,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub stream: String,
    pub timestamp_micros: i64,
    pub payload: serde_json::Value,
}

/// The events of one correlation id.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Flow {
    pub events: Vec<Entry>,
}

/// Groups events by correlation id; events without one are skipped.
pub struct History;

impl Projection for History {
    type State = Flow;

    /// One state per flow; an event outside any flow (no correlation id) is skipped.
    fn keys<'e>(event: &'e Event) -> Result<Keys<'e>, Error> {
        Ok(event.correlation_id().into())
    }

    fn apply(_flow_id: &str, flow: &mut Flow, e: &Event) -> Result<(), Error> {
        // A replayed event (same position) is not recorded twice.
        if flow
            .events
            .last()
            .is_some_and(|last| last.position >= e.position)
        {
            return Ok(());
        }
        flow.events.push(Entry {
            position: e.position,
            id: e.id.to_string(),
            event_type: e.event_type.to_string(),
            stream: e.stream.to_string(),
            timestamp_micros: e.timestamp_micros,
            payload: serde_json::from_str(&e.payload).unwrap_or(serde_json::Value::Null),
        });
        Ok(())
    }
}

evhost_sdk::export_projection!(History);

#[cfg(test)]
mod tests {
    use super::*;
    use evhost_sdk::testing::Harness;

    #[test]
    fn groups_by_correlation_in_order_and_skips_uncorrelated() {
        let mut h = Harness::<History>::new();
        h.handle(vec![
            Event::new("user.query.received", r#"{"query":"2+2"}"#)
                .with_meta("correlation_id", "c1"),
            Event::new("noise.x", "{}"),
            Event::new("answer.synthesized", r#"{"answer":"4"}"#).with_meta("correlation_id", "c1"),
        ])
        .unwrap();
        let flow = h.state("c1").unwrap();
        let types: Vec<&str> = flow.events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, vec!["user.query.received", "answer.synthesized"]);
        assert_eq!(h.store().0.len(), 1);
    }
}
