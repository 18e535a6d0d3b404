//! The projection model: typed state per key, folded from events batch by batch.

use std::borrow::{Borrow, Cow};

/// The batch's states by key.
pub(crate) type HashMap<K, V> = hashbrown::HashMap<K, V, rustc_hash::FxBuildHasher>;

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
    /// Sets each key to its value, in order (the host's store takes them in one call).
    fn set_many(&mut self, entries: Vec<(String, String)>) {
        for (k, v) in entries {
            self.set(&k, &v);
        }
    }
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

    /// The key an event's state lives under. Defaults to its stream. An error (say, a
    /// payload without the field the key comes from) dead-letters the event with its
    /// reason instead of skipping it silently. A key borrowed from the event
    /// (`Cow::Borrowed(&event.event_type)`) costs no allocation; one built from its parts
    /// is `Cow::Owned(format!(..))`, or `.into()` of a `String`.
    fn key<'e>(event: &'e Event<'_>) -> Result<Cow<'e, str>, Error> {
        Ok(Cow::Borrowed(&event.stream))
    }

    /// Every key an event folds into, for projections where one event touches several
    /// states (an entity graph, say), or none to skip it ([`Keys::none`]). Defaults to
    /// [`Projection::key`].
    fn keys<'e>(event: &'e Event<'_>) -> Result<Keys<'e>, Error> {
        Self::key(event).map(Keys::from)
    }

    /// Folds `event` into `state`, the state under `key`.
    fn apply(key: &str, state: &mut Self::State, event: &Event<'_>) -> Result<(), Error>;

    /// Answers `POST /v1/projections/{name}/query`. Defaults to treating the request as a
    /// key and returning its state as JSON (`null` when absent).
    fn query(store: &mut dyn Store, request: &str) -> Result<String, Error> {
        Ok(store.get(request).unwrap_or_else(|| "null".to_owned()))
    }
}

/// The keys an event folds into: one (the common case, borrowed from the event or owned),
/// several, or none. Built with `Keys::from(key)`, `Keys::from(vec![..])` or
/// [`Keys::none`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys<'e>(KeysRepr<'e>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeysRepr<'e> {
    One(Cow<'e, str>),
    Many(Vec<String>),
}

impl Keys<'_> {
    /// No key: the event is skipped.
    pub fn none() -> Self {
        Keys(KeysRepr::Many(Vec::new()))
    }
}

impl<'e> From<Cow<'e, str>> for Keys<'e> {
    fn from(key: Cow<'e, str>) -> Self {
        Keys(KeysRepr::One(key))
    }
}

impl From<String> for Keys<'_> {
    fn from(key: String) -> Self {
        Keys(KeysRepr::One(Cow::Owned(key)))
    }
}

impl<'e> From<&'e str> for Keys<'e> {
    fn from(key: &'e str) -> Self {
        Keys(KeysRepr::One(Cow::Borrowed(key)))
    }
}

impl From<Vec<String>> for Keys<'_> {
    fn from(keys: Vec<String>) -> Self {
        Keys(KeysRepr::Many(keys))
    }
}

impl From<Option<String>> for Keys<'_> {
    fn from(key: Option<String>) -> Self {
        match key {
            Some(k) => Keys::from(k),
            None => Keys::none(),
        }
    }
}

impl<'e> From<Option<&'e str>> for Keys<'e> {
    fn from(key: Option<&'e str>) -> Self {
        match key {
            Some(k) => Keys::from(k),
            None => Keys::none(),
        }
    }
}

impl<'e> IntoIterator for Keys<'e> {
    type Item = Cow<'e, str>;
    type IntoIter = KeysIter<'e>;
    fn into_iter(self) -> KeysIter<'e> {
        KeysIter(match self.0 {
            KeysRepr::One(k) => KeysIterRepr::One(Some(k)),
            KeysRepr::Many(v) => KeysIterRepr::Many(v.into_iter()),
        })
    }
}

/// The iterator of [`Keys`].
pub struct KeysIter<'e>(KeysIterRepr<'e>);

enum KeysIterRepr<'e> {
    One(Option<Cow<'e, str>>),
    Many(std::vec::IntoIter<String>),
}

impl<'e> Iterator for KeysIter<'e> {
    type Item = Cow<'e, str>;
    fn next(&mut self) -> Option<Cow<'e, str>> {
        match &mut self.0 {
            KeysIterRepr::One(k) => k.take(),
            KeysIterRepr::Many(v) => v.next().map(Cow::Owned),
        }
    }
}

/// Folds a batch into `store`; on error nothing has been written. The events come one by
/// one (decoded from the host's buffer as they are folded, or borrowed from a slice).
pub(crate) fn handle_batch<'e, P, E>(
    store: &mut dyn Store,
    events: impl IntoIterator<Item = Result<E, Error>>,
) -> Result<(), Error>
where
    P: Projection,
    E: Borrow<Event<'e>>,
{
    // One lookup per event; a key's state is read at its first event, and every state the
    // batch touched is written back in one call.
    let mut touched: HashMap<String, P::State> = HashMap::default();
    for event in events {
        let event = event?;
        let event = event.borrow();
        for key in P::keys(event).map_err(|e| e.at(event))? {
            let state = state_of(store, &mut touched, &key)?;
            P::apply(&key, state, event).map_err(|e| e.at(event))?;
        }
    }
    let mut writes = Vec::with_capacity(touched.len());
    for (key, state) in touched {
        let json = serde_json::to_string(&state)
            .map_err(|e| Error::Failed(format!("state of {key:?} does not serialize: {e}")))?;
        writes.push((key, json));
    }
    store.set_many(writes);
    Ok(())
}

/// The state under `key`: touched earlier in the batch, else read from `store` (or default).
pub(crate) fn state_of<'a, S: DeserializeOwned + Default>(
    store: &mut dyn Store,
    touched: &'a mut HashMap<String, S>,
    key: &str,
) -> Result<&'a mut S, Error> {
    // One lookup; the key is copied only the first time the batch touches it.
    match touched.entry_ref(key) {
        hashbrown::hash_map::EntryRef::Occupied(o) => Ok(o.into_mut()),
        hashbrown::hash_map::EntryRef::Vacant(v) => {
            let loaded = match store.get(key) {
                Some(json) => serde_json::from_str(&json).map_err(|e| {
                    Error::Failed(format!("stored state of {key:?} does not parse: {e}"))
                })?,
                None => S::default(),
            };
            Ok(v.insert(loaded))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Harness;

    fn collect(keys: Keys<'_>) -> Vec<(String, bool)> {
        keys.into_iter()
            .map(|k| (k.to_string(), matches!(k, Cow::Borrowed(_))))
            .collect()
    }

    #[test]
    fn keys_convert_and_iterate_borrowed_or_owned() {
        let text = String::from("a");
        assert_eq!(collect(Keys::from(&*text)), [("a".into(), true)]);
        assert_eq!(collect(Keys::from(Some(&*text))), [("a".into(), true)]);
        assert_eq!(
            collect(Keys::from(Cow::Borrowed("b"))),
            [("b".into(), true)]
        );
        assert_eq!(collect(Keys::from("c".to_string())), [("c".into(), false)]);
        assert_eq!(
            collect(Keys::from(Some("d".to_string()))),
            [("d".into(), false)]
        );
        assert_eq!(
            collect(Keys::from(vec!["e".to_string(), "f".to_string()])),
            [("e".into(), false), ("f".into(), false)]
        );
        assert!(collect(Keys::none()).is_empty());
        assert!(collect(Keys::from(None::<&str>)).is_empty());
        assert!(collect(Keys::from(None::<String>)).is_empty());
    }

    /// Counts events per type, keyed by the type borrowed from the event; an event of type
    /// `bad.key` has no key.
    struct ByType;

    impl Projection for ByType {
        type State = u64;
        fn key<'e>(event: &'e Event<'_>) -> Result<Cow<'e, str>, Error> {
            if event.event_type == "bad.key" {
                return Err(Error::InvalidInput("no key".into()));
            }
            Ok(Cow::Borrowed(&event.event_type))
        }
        fn apply(key: &str, n: &mut u64, event: &Event<'_>) -> Result<(), Error> {
            assert_eq!(key, &*event.event_type);
            *n += 1;
            Ok(())
        }
    }

    #[test]
    fn a_borrowed_key_folds_and_a_failed_key_fails_the_whole_batch() {
        let mut h = Harness::<ByType>::new();
        h.handle(vec![
            Event::new("a.b", "1"),
            Event::new("a.c", "1"),
            Event::new("a.b", "1"),
        ])
        .unwrap();
        assert_eq!((h.state("a.b"), h.state("a.c")), (Some(2), Some(1)));
        let err = h
            .handle(vec![
                Event::new("a.b", "1"),
                Event::new("bad.key", "1").at(9),
            ])
            .unwrap_err();
        assert_eq!(
            err,
            Error::InvalidInput("bad.key at position 9: no key".into())
        );
        assert_eq!(
            h.state("a.b"),
            Some(2),
            "nothing of the failed batch is kept"
        );
        // The default key is the stream, borrowed.
        assert_eq!(
            collect(ByStream::keys(&Event::new("a.b", "1").with_stream("s-1")).unwrap()),
            [("s-1".into(), true)]
        );
    }

    struct ByStream;

    impl Projection for ByStream {
        type State = u64;
        fn apply(_: &str, _: &mut u64, _: &Event<'_>) -> Result<(), Error> {
            Ok(())
        }
    }
}
