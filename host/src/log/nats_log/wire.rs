//! How an event is laid out in JetStream: its subject (`PREFIX.STREAM.TYPE`, so that type
//! patterns and stream reads filter on the server) and its message body (a JSON envelope
//! any NATS client can read).

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::event::{Event, EventId, EventType, Metadata, Payload, StreamName};
use crate::log::LogError;

/// The subjects of one evhost log inside its JetStream stream.
#[derive(Debug, Clone)]
pub(super) struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix` (the JetStream stream's name).
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Every event of the log.
    pub(super) fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// The subject of one event.
    pub(super) fn event(&self, stream: &str, event_type: &str) -> String {
        format!("{}.{}.{event_type}", self.prefix, token(stream))
    }

    /// Every event of `stream`.
    pub(super) fn stream(&self, stream: &str) -> String {
        format!("{}.{}.>", self.prefix, token(stream))
    }

    /// The events of `stream` (or of every stream) whose type matches `pattern` (NATS
    /// wildcards, as evhost's patterns are).
    pub(super) fn filter(&self, stream: Option<&str>, pattern: Option<&str>) -> String {
        let stream = stream.map_or_else(|| "*".to_owned(), token);
        format!("{}.{stream}.{}", self.prefix, pattern.unwrap_or(">"))
    }

    /// The stream and the type a subject names, or `None` for a subject that is not an
    /// event's.
    pub(super) fn parse<'a>(&self, subject: &'a str) -> Option<(String, &'a str)> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let (token, event_type) = rest.split_once('.')?;
        Some((untoken(token)?, event_type))
    }
}

/// A stream name as one subject token: itself when it holds only letters, digits, `-` and
/// `_`; otherwise `~` and the hex of its bytes (a name never holds `~` unencoded, so the
/// two cannot meet).
pub(super) fn token(stream: &str) -> String {
    let plain = stream
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain && !stream.is_empty() {
        return stream.to_owned();
    }
    let mut out = String::with_capacity(1 + 2 * stream.len());
    out.push('~');
    for b in stream.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn untoken(token: &str) -> Option<String> {
    let Some(hex) = token.strip_prefix('~') else {
        return Some(token.to_owned());
    };
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// The message body: everything of an event but what the subject and the stream's sequence
/// and timestamp already say.
pub(super) struct Body<'a> {
    pub id: &'a str,
    pub stream: &'a str,
    pub version: u64,
    pub source: &'a str,
    pub metadata: &'a Metadata,
    /// True when the appender chose the id (an idempotency key the log looks up).
    pub client_id: bool,
    pub payload: &'a Payload,
}

impl Body<'_> {
    /// The body as JSON. The payload's text was validated at append and goes in as it is
    /// (serializing it through serde would parse it again).
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 160);
        let string = |out: &mut Vec<u8>, s: &str| {
            serde_json::to_writer(&mut *out, s).expect("a string serializes");
        };
        out.extend_from_slice(b"{\"id\":");
        string(&mut out, self.id);
        out.extend_from_slice(b",\"stream\":");
        string(&mut out, self.stream);
        out.extend_from_slice(format!(",\"version\":{}", self.version).as_bytes());
        if !self.source.is_empty() {
            out.extend_from_slice(b",\"source\":");
            string(&mut out, self.source);
        }
        if !self.metadata.is_empty() {
            out.extend_from_slice(b",\"metadata\":");
            serde_json::to_writer(&mut out, self.metadata).expect("metadata serializes");
        }
        if self.client_id {
            out.extend_from_slice(b",\"client_id\":true");
        }
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(self.payload.as_str().as_bytes());
        out.push(b'}');
        out
    }
}

#[derive(Deserialize)]
struct Stored {
    id: EventId,
    stream: StreamName,
    version: u64,
    #[serde(default)]
    source: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    client_id: bool,
    payload: Payload,
}

/// An event read back from a message, and whether its id was the appender's.
pub(super) struct Decoded {
    pub event: Event,
    pub client_id: bool,
}

/// Builds the event stored at `seq` (position `seq - 1`) from its subject's type, its body
/// and the time the server stored it.
pub(super) fn decode(
    subjects: &Subjects,
    subject: &str,
    seq: u64,
    stored_at: DateTime<Utc>,
    body: &[u8],
) -> Result<Decoded, LogError> {
    let corrupt = |why: String| LogError::Corrupt(format!("JetStream message {seq}: {why}"));
    let (_, ty) = subjects
        .parse(subject)
        .ok_or_else(|| corrupt(format!("subject {subject:?} is not an evhost event's")))?;
    let event_type = EventType::new(ty).map_err(|e| corrupt(e.to_string()))?;
    let s: Stored = serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
    Ok(Decoded {
        event: Event {
            id: s.id,
            event_type,
            stream: s.stream,
            position: seq - 1,
            version: s.version,
            // The log's timestamps are kept to the microsecond.
            timestamp: DateTime::from_timestamp_micros(stored_at.timestamp_micros())
                .unwrap_or(stored_at),
            source: s.source,
            payload: s.payload,
            metadata: s.metadata,
        },
        client_id: s.client_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_tokens_round_trip_and_never_collide() {
        let s = Subjects::new("EVHOST");
        for name in ["orders-1", "a.b", "x*y", "~x", "wörd", "sp ace", ">", "A_b"] {
            let subject = s.event(name, "order.placed");
            assert_eq!(subject.split('.').count(), 4, "{subject}");
            assert_eq!(
                s.parse(&subject),
                Some((name.to_owned(), "order.placed")),
                "{name}"
            );
        }
        assert_ne!(token("~61"), token("a"));
        let metadata = Metadata {
            correlation_id: Some("c\"1".into()),
            ..Metadata::default()
        };
        let payload = Payload::from_json(r#"{"a": [1, "\u00e9"]}"#).unwrap();
        let body = Body {
            id: "id\n",
            stream: "a.b",
            version: 7,
            source: "src",
            metadata: &metadata,
            client_id: true,
            payload: &payload,
        }
        .encode();
        let at = chrono::Utc::now();
        let d = decode(&s, &s.event("a.b", "x.y"), 9, at, &body).unwrap();
        assert!(d.client_id);
        assert_eq!(d.event.id.as_str(), "id\n");
        assert_eq!(
            (d.event.stream.as_str(), d.event.version, d.event.position),
            ("a.b", 7, 8)
        );
        assert_eq!(d.event.payload.as_str(), payload.as_str());
        assert_eq!(d.event.metadata, metadata);
        assert_eq!(d.event.source, "src");
        assert_eq!(s.filter(None, Some("order.>")), "EVHOST.*.order.>");
        assert_eq!(s.filter(Some("a.b"), None), "EVHOST.~612e62.>");
    }
}
