//! A native test harness: run a projection over events without wasm or a host.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use crate::event::{Error, Event};
use crate::projection::{Projection, Store, handle_batch};

/// An in-memory [`Store`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStore(pub BTreeMap<String, String>);

impl Store for MemStore {
    fn get(&mut self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
    fn set(&mut self, key: &str, value: &str) {
        self.0.insert(key.to_owned(), value.to_owned());
    }
    fn delete(&mut self, key: &str) {
        self.0.remove(key);
    }
    fn scan_prefix(&mut self, prefix: &str) -> Vec<(String, String)> {
        self.0
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Runs projection `P` as the host would: batches are all-or-nothing, positions are given
/// in order if the events have none.
pub struct Harness<P: Projection> {
    store: MemStore,
    next_position: u64,
    _p: PhantomData<P>,
}

impl<P: Projection> Default for Harness<P> {
    fn default() -> Self {
        Self {
            store: MemStore::default(),
            next_position: 0,
            _p: PhantomData,
        }
    }
}

impl<P: Projection> Harness<P> {
    /// A harness with empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one batch; on error the state is left as it was.
    pub fn handle(&mut self, mut events: Vec<Event>) -> Result<(), Error> {
        for e in &mut events {
            if e.position == 0 {
                e.position = self.next_position;
            }
            self.next_position = e.position + 1;
        }
        let mut scratch = self.store.clone();
        handle_batch::<P>(&mut scratch, &events)?;
        self.store = scratch;
        Ok(())
    }

    /// The state stored under `key`.
    pub fn state(&self, key: &str) -> Option<P::State> {
        self.store
            .0
            .get(key)
            .map(|json| serde_json::from_str(json).expect("the harness stores valid state"))
    }

    /// Calls the projection's `query`.
    pub fn query(&mut self, request: &str) -> Result<String, Error> {
        P::query(&mut self.store, request)
    }

    /// The raw store (JSON text per key).
    pub fn store(&self) -> &MemStore {
        &self.store
    }
}

/// Folds a batch with `P` over any [`Store`], natively, exactly as the wasm export does: for
/// hosts that run a projection's logic without wasm (benchmarks, embedding).
pub fn apply_batch<P: Projection>(store: &mut dyn Store, events: &[Event]) -> Result<(), Error> {
    handle_batch::<P>(store, events)
}

/// Runs extractor `X` over one batch as the host would: one list of derived events per
/// input event; on error `store` is left as it was.
pub fn extract<X: crate::Extractor>(
    store: &mut MemStore,
    events: &[Event],
) -> Result<Vec<Vec<crate::NewEvent>>, Error> {
    let mut scratch = store.clone();
    let out = crate::extractor::extract_batch::<X>(&mut scratch, events)?;
    *store = scratch;
    Ok(out)
}
