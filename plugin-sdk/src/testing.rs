//! A native test harness: run a projection, an extractor or a tool as the host would,
//! without wasm or a host.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use crate::event::{Error, Event};
use crate::projection::{Projection, Store, handle_batch};
use crate::{Extractor, NewEvent, Tool};

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

/// Runs plugin `T` (a [`Projection`], an [`Extractor`] or a [`Tool`]) as the host would:
/// batches cross the same encoding as in wasm and are all-or-nothing, events get positions
/// in order if they have none, and [`crate::config`] reads what [`Harness::config`] set.
pub struct Harness<T> {
    store: MemStore,
    config: BTreeMap<String, String>,
    next_position: u64,
    _t: PhantomData<T>,
}

impl<T> Default for Harness<T> {
    fn default() -> Self {
        Self {
            store: MemStore::default(),
            config: BTreeMap::new(),
            next_position: 0,
            _t: PhantomData,
        }
    }
}

impl<T> Harness<T> {
    /// A harness with empty state and no configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a configuration value, as a manifest's `[config]` or a load's override would.
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.config.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The raw store (JSON text per key).
    pub fn store(&self) -> &MemStore {
        &self.store
    }

    /// Gives events without a position the next ones, and encodes and decodes the batch
    /// as the host and the guest do; runs `f` on the decoded events over a scratch copy of
    /// the store, keeping the copy only if `f` succeeds.
    fn batch<R>(
        &mut self,
        mut events: Vec<Event<'_>>,
        f: impl FnOnce(&mut MemStore, &[Event<'_>]) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut next = self.next_position;
        for e in &mut events {
            if e.position == 0 {
                e.position = next;
            }
            next = e.position + 1;
        }
        let buf = crate::batch::encode(&events);
        let decoded = crate::batch::decode(&buf)?;
        let mut scratch = self.store.clone();
        let r = self.configured(|| f(&mut scratch, &decoded))?;
        // Like the host: a failed batch changes nothing, and is handed over again with the
        // same positions.
        self.store = scratch;
        self.next_position = next;
        Ok(r)
    }

    fn configured<R>(&self, f: impl FnOnce() -> R) -> R {
        #[cfg(not(target_arch = "wasm32"))]
        {
            crate::config::native::with(&self.config, f)
        }
        #[cfg(target_arch = "wasm32")]
        {
            f()
        }
    }
}

impl<P: Projection> Harness<P> {
    /// Folds one batch; on error the state is left as it was.
    pub fn handle(&mut self, events: Vec<Event<'_>>) -> Result<(), Error> {
        self.batch(events, |store, events| {
            handle_batch::<P, _>(store, events.iter().map(Ok))
        })
    }

    /// The state stored under `key`.
    pub fn state(&self, key: &str) -> Option<P::State> {
        self.store
            .0
            .get(key)
            .map(|json| serde_json::from_str(json).expect("the harness stores valid state"))
    }

    /// Calls the projection's `query`; what it writes is dropped, as the host drops it.
    pub fn query(&mut self, request: &str) -> Result<String, Error> {
        let mut scratch = self.store.clone();
        let store = &mut scratch;
        #[cfg(not(target_arch = "wasm32"))]
        {
            crate::config::native::with(&self.config, || P::query(store, request))
        }
        #[cfg(target_arch = "wasm32")]
        {
            P::query(store, request)
        }
    }
}

impl<X: Extractor> Harness<X> {
    /// Runs the extractor over one batch: one list of derived events per input event; on
    /// error the state is left as it was.
    pub fn extract(&mut self, events: Vec<Event<'_>>) -> Result<Vec<Vec<NewEvent>>, Error> {
        self.batch(events, |store, events| {
            crate::extractor::extract_batch::<X, _>(store, events.iter().map(Ok))
        })
    }

    /// The extractor's state stored under `key`.
    pub fn extractor_state(&self, key: &str) -> Option<X::State> {
        self.store
            .0
            .get(key)
            .map(|json| serde_json::from_str(json).expect("the harness stores valid state"))
    }
}

impl<T: Tool> Harness<T> {
    /// Runs one invocation on `input` (JSON text), returning its output as JSON text: the
    /// input's parsing and the output's serialization included.
    pub fn invoke(&mut self, input: &str) -> Result<String, Error> {
        self.configured(|| crate::tool::invoke_json::<T>(input))
    }

    /// Runs one invocation on `input` as JSON values.
    pub fn invoke_json(&mut self, input: serde_json::Value) -> Result<serde_json::Value, Error> {
        let out = self.invoke(&input.to_string())?;
        serde_json::from_str(&out)
            .map_err(|e| Error::Failed(format!("the tool's output is not JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Noter;

    impl Projection for Noter {
        type State = u64;
        fn apply(_: &str, n: &mut u64, e: &Event<'_>) -> Result<(), Error> {
            if &*e.event_type == "bad" {
                return Err(Error::InvalidInput("bad".into()));
            }
            *n += 1;
            Ok(())
        }
        fn query(store: &mut dyn Store, request: &str) -> Result<String, Error> {
            store.set("written-by-query", "1");
            Ok(store.get(request).unwrap_or_else(|| "null".into()))
        }
    }

    #[test]
    fn the_harness_drops_what_fails_or_what_a_query_writes_as_the_host_does() {
        let mut h = Harness::<Noter>::new();
        h.handle(vec![Event::new("a", "{}").with_stream("s")])
            .unwrap();
        let bad = vec![
            Event::new("a", "{}").with_stream("s"),
            Event::new("bad", "{}"),
        ];
        assert!(h.handle(bad).is_err());
        assert_eq!(h.state("s"), Some(1), "a failed batch changes nothing");
        assert_eq!(h.query("s").unwrap(), "1");
        assert!(!h.store().0.contains_key("written-by-query"));
    }

    #[test]
    fn decoding_bytes_that_are_not_utf8_is_an_error() {
        let mut buf = crate::batch::encode(&[Event::new("ab", "{}")]);
        // The event type's bytes follow the count (4) and the event's header (48); the id
        // before them is empty.
        assert_eq!(&buf[52..54], b"ab");
        buf[52] = 0xff;
        let e = crate::batch::decode(&buf).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }
}

/// Folds a batch with `P` over any [`Store`], natively, exactly as the wasm export does: for
/// hosts that run a projection's logic without wasm (benchmarks, embedding).
pub fn apply_batch<P: Projection>(
    store: &mut dyn Store,
    events: &[Event<'_>],
) -> Result<(), Error> {
    handle_batch::<P, _>(store, events.iter().map(Ok))
}
