//! Events as a plugin sees them, and the errors it returns.

use std::borrow::Cow;

use serde::Deserialize;

/// A committed event: the envelope's fields plus the payload as JSON text.
///
/// Inside wasm its text borrows the batch the host handed over (decoded in place, nothing
/// copied); events built in tests own theirs. Fields read as `&str` through `Cow`'s deref.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event<'a> {
    /// Unique id.
    pub id: Cow<'a, str>,
    /// `domain.action.state`.
    pub event_type: Cow<'a, str>,
    /// The aggregate or entity the event belongs to.
    pub stream: Cow<'a, str>,
    /// Global position in the log.
    pub position: u64,
    /// Version within the stream.
    pub version: u64,
    /// Microseconds since the Unix epoch (UTC), assigned at append.
    pub timestamp_micros: i64,
    /// The producing service or plugin.
    pub source: Cow<'a, str>,
    /// The payload as JSON text.
    pub payload: Cow<'a, str>,
    /// Metadata keys and values (correlation_id, causation_id, ...).
    pub metadata: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Event<'a> {
    /// An event of `event_type` with `payload` (JSON text), for tests.
    pub fn new(event_type: impl Into<Cow<'a, str>>, payload: impl Into<Cow<'a, str>>) -> Self {
        Self {
            event_type: event_type.into(),
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Sets the stream.
    pub fn with_stream(mut self, stream: impl Into<Cow<'a, str>>) -> Self {
        self.stream = stream.into();
        self
    }

    /// Sets a metadata key.
    pub fn with_meta(mut self, key: &str, value: &str) -> Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata
            .push((Cow::Owned(key.to_owned()), Cow::Owned(value.to_owned())));
        self
    }

    /// Sets the position (and is how tests give events an order).
    pub fn at(mut self, position: u64) -> Self {
        self.position = position;
        self
    }

    /// Parses the payload into `T`; a payload that does not fit is the event's fault, and
    /// the event is dead-lettered with this reason.
    ///
    /// `T` may borrow from the payload for as long as the event is borrowed: a
    /// `#[serde(borrow)] Cow<'p, str>` field borrows a text without escapes and copies one
    /// with them, so a fold that only compares or counts a text copies nothing. (A `&'p str`
    /// field refuses a text with escapes.)
    pub fn payload<'p, T: Deserialize<'p>>(&'p self) -> Result<T, Error> {
        serde_json::from_str(&self.payload).map_err(|e| {
            Error::InvalidInput(format!(
                "payload of {} at position {} does not fit: {e}",
                self.event_type, self.position
            ))
        })
    }

    /// The metadata value under `key`.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| &**v)
    }

    /// `metadata.correlation_id`.
    pub fn correlation_id(&self) -> Option<&str> {
        self.meta("correlation_id")
    }

    /// The same event owning its text, to keep beyond the batch.
    pub fn into_owned(self) -> Event<'static> {
        let own = |c: Cow<'a, str>| Cow::Owned(c.into_owned());
        Event {
            id: own(self.id),
            event_type: own(self.event_type),
            stream: own(self.stream),
            position: self.position,
            version: self.version,
            timestamp_micros: self.timestamp_micros,
            source: own(self.source),
            payload: own(self.payload),
            metadata: self
                .metadata
                .into_iter()
                .map(|(k, v)| (own(k), own(v)))
                .collect(),
        }
    }
}

/// Why a plugin could not handle its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The event or request cannot be handled as it is: the host dead-letters the event
    /// with this reason.
    InvalidInput(String),
    /// Anything else.
    Failed(String),
}

impl Error {
    /// The same error, naming the event it happened at.
    pub fn at(self, event: &Event<'_>) -> Self {
        let at = |m: String| format!("{} at position {}: {m}", event.event_type, event.position);
        match self {
            Error::InvalidInput(m) => Error::InvalidInput(at(m)),
            Error::Failed(m) => Error::Failed(at(m)),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}
