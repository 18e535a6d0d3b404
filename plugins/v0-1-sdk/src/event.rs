//! Events as a plugin sees them, and the errors it returns.

use serde::de::DeserializeOwned;

/// A committed event: the envelope's fields plus the payload as JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// Unique id.
    pub id: String,
    /// `domain.action.state`.
    pub event_type: String,
    /// The aggregate or entity the event belongs to.
    pub stream: String,
    /// Global position in the log.
    pub position: u64,
    /// Version within the stream.
    pub version: u64,
    /// Microseconds since the Unix epoch (UTC), assigned at append.
    pub timestamp_micros: i64,
    /// The producing service or plugin.
    pub source: String,
    /// The payload as JSON text.
    pub payload: String,
    /// Metadata keys and values (correlation_id, causation_id, ...).
    pub metadata: Vec<(String, String)>,
}

impl Event {
    /// An event of `event_type` with `payload` (JSON text), for tests.
    pub fn new(event_type: &str, payload: &str) -> Self {
        Self {
            event_type: event_type.to_owned(),
            payload: payload.to_owned(),
            ..Self::default()
        }
    }

    /// Sets the stream.
    pub fn with_stream(mut self, stream: &str) -> Self {
        self.stream = stream.to_owned();
        self
    }

    /// Sets a metadata key.
    pub fn with_meta(mut self, key: &str, value: &str) -> Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets the position (and is how tests give events an order).
    pub fn at(mut self, position: u64) -> Self {
        self.position = position;
        self
    }

    /// Parses the payload into `T`; a payload that does not fit is the event's fault.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, Error> {
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
            .map(|(_, v)| v.as_str())
    }

    /// `metadata.correlation_id`.
    pub fn correlation_id(&self) -> Option<&str> {
        self.meta("correlation_id")
    }
}

/// Why a plugin could not handle its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The event or request cannot be handled as it is.
    InvalidInput(String),
    /// Anything else.
    Failed(String),
}

impl Error {
    /// The same error, naming the event it happened at.
    pub fn at(self, event: &Event) -> Self {
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
