//! The projection model: typed state per key, folded from events batch by batch.

use std::collections::HashMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::{Error, Event};

/// Key-value state of the plugin: the host's store inside wasm, a map in tests.
pub trait Store {
    /// The value (JSON text) under `key`.
    fn get(&mut self, key: &str) -> Option<String>;
    /// Sets `key` to `value` (JSON text).
    fn set(&mut self, key: &str, value: &str);
    /// Removes `key`.
    fn delete(&mut self, key: &str);
    /// Every key starting with `prefix`, in key order, with its value.
    fn scan_prefix(&mut self, prefix: &str) -> Vec<(String, String)>;
}

/// A projection: which state an event folds into ([`Projection::key`]), and how
/// ([`Projection::apply`]).
///
/// Within a batch each key's state is read from the store once, folded over every event of
/// the batch with that key, and written back once; if any event fails, the host discards the
/// whole batch's writes, so state never holds half a batch.
pub trait Projection {
    /// The state kept per key, stored as JSON.
    type State: Serialize + DeserializeOwned + Default;

    /// The key an event's state lives under; `None` skips the event. Defaults to its stream.
    fn key(event: &Event) -> Option<String> {
        Some(event.stream.clone())
    }

    /// Every key an event folds into, for projections where one event touches several
    /// states (an entity graph, say). Defaults to [`Projection::key`].
    fn keys(event: &Event) -> Vec<String> {
        Self::key(event).into_iter().collect()
    }

    /// Folds `event` into `state`.
    fn apply(state: &mut Self::State, event: &Event) -> Result<(), Error>;

    /// Folds `event` into the state under `key`; for projections overriding
    /// [`Projection::keys`]. Defaults to [`Projection::apply`].
    fn apply_keyed(_key: &str, state: &mut Self::State, event: &Event) -> Result<(), Error> {
        Self::apply(state, event)
    }

    /// Answers `POST /v1/projections/{name}/query`. Defaults to treating the request as a
    /// key and returning its state as JSON (`null` when absent).
    fn query(store: &mut dyn Store, request: &str) -> Result<String, Error> {
        Ok(store.get(request).unwrap_or_else(|| "null".to_owned()))
    }
}

/// Folds a batch into `store`; on error nothing has been written.
pub(crate) fn handle_batch<P: Projection>(
    store: &mut dyn Store,
    events: &[Event],
) -> Result<(), Error> {
    let mut touched: HashMap<String, P::State> = HashMap::new();
    for event in events {
        for key in P::keys(event) {
            fold_into::<P>(store, &mut touched, key, event)?;
        }
    }
    for (key, state) in touched {
        let json = serde_json::to_string(&state)
            .map_err(|e| Error::Failed(format!("state of {key:?} does not serialize: {e}")))?;
        store.set(&key, &json);
    }
    Ok(())
}

fn fold_into<P: Projection>(
    store: &mut dyn Store,
    touched: &mut HashMap<String, P::State>,
    key: String,
    event: &Event,
) -> Result<(), Error> {
    let state = state_of(store, touched, &key)?;
    P::apply_keyed(&key, state, event).map_err(|e| e.at(event))
}

/// The state under `key`: touched earlier in the batch, else read from `store` (or default).
pub(crate) fn state_of<'a, S: DeserializeOwned + Default>(
    store: &mut dyn Store,
    touched: &'a mut HashMap<String, S>,
    key: &str,
) -> Result<&'a mut S, Error> {
    if !touched.contains_key(key) {
        let loaded = match store.get(key) {
            Some(json) => serde_json::from_str(&json).map_err(|e| {
                Error::Failed(format!("stored state of {key:?} does not parse: {e}"))
            })?,
            None => S::default(),
        };
        touched.insert(key.to_owned(), loaded);
    }
    Ok(touched.get_mut(key).expect("just inserted"))
}

mod wasm {
    use super::Store;
    use crate::projection_bindings::evhost::plugin::state;

    /// The host's store, through the `state` import.
    pub(super) struct HostStore;

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
}

use crate::projection_bindings::evhost::plugin::types as wit;

fn from_wit(e: wit::Event) -> Event {
    Event {
        id: e.id,
        event_type: e.event_type,
        stream: e.stream,
        position: e.position,
        version: e.version,
        timestamp_micros: e.timestamp_micros,
        source: e.source,
        payload: e.payload,
        metadata: e.metadata,
    }
}

fn to_wit(e: Error) -> wit::Error {
    match e {
        Error::InvalidInput(m) => wit::Error::InvalidInput(m),
        Error::Failed(m) => wit::Error::Failed(m),
    }
}

#[doc(hidden)]
pub fn wasm_handle<P: Projection>(events: Vec<wit::Event>) -> Result<(), wit::Error> {
    let events: Vec<Event> = events.into_iter().map(from_wit).collect();
    handle_batch::<P>(&mut wasm::HostStore, &events).map_err(to_wit)
}

#[doc(hidden)]
pub fn wasm_query<P: Projection>(request: String) -> Result<String, wit::Error> {
    P::query(&mut wasm::HostStore, &request).map_err(to_wit)
}
