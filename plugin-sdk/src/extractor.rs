//! The extractor model: derive new events from events, optionally with state per key.

use std::borrow::Borrow;

use crate::projection::HashMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::{Error, Event};
use crate::projection::Store;

/// An event for the host to append, derived from the event being handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Its type.
    pub event_type: String,
    /// The stream to append it to.
    pub stream: String,
    /// The payload as JSON text.
    pub payload: String,
    /// Metadata; the host adds causation_id and carries correlation_id over.
    pub metadata: Vec<(String, String)>,
}

impl NewEvent {
    /// An event of `event_type` on `stream` with `payload` serialized as JSON.
    pub fn new(event_type: &str, stream: &str, payload: &impl Serialize) -> Result<Self, Error> {
        let payload = serde_json::to_string(payload).map_err(|e| {
            Error::Failed(format!("payload of {event_type} does not serialize: {e}"))
        })?;
        Ok(Self {
            event_type: event_type.to_owned(),
            stream: stream.to_owned(),
            payload,
            metadata: Vec::new(),
        })
    }

    /// Sets a metadata key.
    pub fn with_meta(mut self, key: &str, value: &str) -> Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The payload as a JSON value (for tests).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// An extractor: derives events from each event it is given, optionally with state per
/// key. The host appends what a batch derived exactly once, then commits the batch's state.
pub trait Extractor {
    /// State kept per key (use `()` for none).
    type State: Serialize + DeserializeOwned + Default;

    /// The key of the state an event reads and updates; `Ok(None)` (the default) gives it a
    /// fresh default state that is not stored. An error dead-letters the event.
    fn key(_event: &Event<'_>) -> Result<Option<String>, Error> {
        Ok(None)
    }

    /// Pushes the events derived from `event` onto `out`.
    fn extract(
        state: &mut Self::State,
        event: &Event<'_>,
        out: &mut Vec<NewEvent>,
    ) -> Result<(), Error>;
}

/// Runs `X` over a batch: one list of derived events per input event. A state that
/// serializes to `null` is deleted.
pub(crate) fn extract_batch<'e, X, E>(
    store: &mut dyn Store,
    events: impl IntoIterator<Item = Result<E, Error>>,
) -> Result<Vec<Vec<NewEvent>>, Error>
where
    X: Extractor,
    E: Borrow<Event<'e>>,
{
    let mut touched: HashMap<String, X::State> = HashMap::default();
    let mut outputs = Vec::new();
    for event in events {
        let event = event?;
        let event = event.borrow();
        let mut out = Vec::new();
        let result = match X::key(event).map_err(|e| e.at(event))? {
            None => X::extract(&mut X::State::default(), event, &mut out),
            Some(key) => {
                let state = crate::projection::state_of(store, &mut touched, &key)?;
                X::extract(state, event, &mut out)
            }
        };
        result.map_err(|e| e.at(event))?;
        outputs.push(out);
    }
    for (key, state) in touched {
        let json = serde_json::to_string(&state)
            .map_err(|e| Error::Failed(format!("state of {key:?} does not serialize: {e}")))?;
        if json == "null" {
            store.delete(&key);
        } else {
            store.set(&key, &json);
        }
    }
    Ok(outputs)
}
