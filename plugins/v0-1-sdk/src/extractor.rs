//! The extractor model: events in, derived events out, with optional typed state per key.

use std::collections::HashMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::{Error, Event};
use crate::projection::Store;

/// An event an extractor derives, to be appended by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// `domain.action.state` (see [`crate::is_valid_event_type`]).
    pub event_type: String,
    /// The stream to append it to.
    pub stream: String,
    /// The payload as JSON text.
    pub payload: String,
    /// Extra metadata; the host sets causation_id and carries correlation_id over.
    pub metadata: Vec<(String, String)>,
}

impl NewEvent {
    /// An event of `event_type` on `stream` whose payload is `payload` serialized as JSON.
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

    /// The payload parsed as JSON (for tests).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// An extractor: derives events from each event it receives.
///
/// Stateless by default. An extractor that remembers (an orchestrator waiting for the
/// results of its steps, say) names a key per event with [`Extractor::key`]; that key's
/// state is read once per batch, folded over the batch and written back with the checkpoint,
/// all-or-nothing as in a projection.
///
/// Replays and crash recovery call an extractor again on events it has seen; the host
/// appends each derived event once, identified by (extractor, source event, index), so what
/// an extractor emits for an event must depend only on that event and its state.
pub trait Extractor {
    /// The state kept per key, stored as JSON; `()` for a stateless extractor.
    type State: Serialize + DeserializeOwned + Default;

    /// The key an event's state lives under; `None` (the default) gives the event a fresh
    /// default state that is not stored.
    fn key(_event: &Event) -> Option<String> {
        None
    }

    /// Derives events from `event`, pushing them onto `out`.
    fn extract(
        state: &mut Self::State,
        event: &Event,
        out: &mut Vec<NewEvent>,
    ) -> Result<(), Error>;
}

/// Runs `X` over a batch: one list of derived events per input event. On error nothing has
/// been written to `store`.
pub(crate) fn extract_batch<X: Extractor>(
    store: &mut dyn Store,
    events: &[Event],
) -> Result<Vec<Vec<NewEvent>>, Error> {
    let mut touched: HashMap<String, X::State> = HashMap::new();
    let mut outputs = Vec::with_capacity(events.len());
    for event in events {
        let mut out = Vec::new();
        let result = match X::key(event) {
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

mod wasm {
    use super::{Extractor, NewEvent, extract_batch};
    use crate::extractor_bindings::evhost::plugin::{state, types as wit};
    use crate::projection::Store;

    struct HostStore;

    impl Store for HostStore {
        fn get(&mut self, key: &str) -> Option<String> {
            state::get(key)
        }
        fn set(&mut self, key: &str, value: &str) {
            state::set(key, value)
        }
        fn delete(&mut self, key: &str) {
            state::delete(key)
        }
        fn scan_prefix(&mut self, prefix: &str) -> Vec<(String, String)> {
            state::scan_prefix(prefix)
        }
    }

    fn to_wit(e: NewEvent) -> wit::NewEvent {
        wit::NewEvent {
            event_type: e.event_type,
            stream: e.stream,
            payload: e.payload,
            metadata: e.metadata,
        }
    }

    #[doc(hidden)]
    pub fn wasm_extract<X: Extractor>(
        events: Vec<wit::Event>,
    ) -> Result<Vec<Vec<wit::NewEvent>>, wit::Error> {
        let events: Vec<crate::Event> = events
            .into_iter()
            .map(|e| crate::Event {
                id: e.id,
                event_type: e.event_type,
                stream: e.stream,
                position: e.position,
                version: e.version,
                timestamp_micros: e.timestamp_micros,
                source: e.source,
                payload: e.payload,
                metadata: e.metadata,
            })
            .collect();
        match extract_batch::<X>(&mut HostStore, &events) {
            Ok(out) => Ok(out
                .into_iter()
                .map(|list| list.into_iter().map(to_wit).collect())
                .collect()),
            Err(crate::Error::InvalidInput(m)) => Err(wit::Error::InvalidInput(m)),
            Err(crate::Error::Failed(m)) => Err(wit::Error::Failed(m)),
        }
    }
}

#[doc(hidden)]
pub use wasm::wasm_extract;
