//! The event envelope: what every event in the log carries, and what a client sends to append one.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

mod names;

pub use names::{EventId, StreamName};

/// Longest event type accepted, in bytes; long enough for any sensible hierarchy.
pub const MAX_TYPE_LEN: usize = 255;
/// Longest stream name accepted, in bytes.
pub const MAX_STREAM_LEN: usize = 255;
/// Longest event id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Deepest nesting of arrays and objects accepted in a payload (`[[1]]` is 2 deep).
///
/// serde_json, which the host and Rust plugins use to read events, refuses values nested
/// more than 128 deep; 64 leaves room for the envelopes an event travels in (a read
/// response, a plugin's input) and for readers with smaller limits.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// The largest event the host takes by default, in bytes of text (payload, metadata keys
/// and values, source, id and type): the default of `--max-event-bytes`, and of every
/// limit derived from it (the API, the log, what plugins may derive).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Why an event type, stream name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    /// The event type is not `segment(.segment)*` with segments of `[A-Za-z0-9_-]+`.
    #[error(
        "invalid event type {0:?}: use dot-separated segments of letters, digits, '_' or '-' (e.g. \"memory.entity.extracted\"), at most {MAX_TYPE_LEN} bytes"
    )]
    Type(String),
    /// The stream name is empty, too long, or holds a control character.
    #[error(
        "invalid stream name {0:?}: use 1 to {MAX_STREAM_LEN} bytes with no control characters"
    )]
    Stream(String),
    /// The event id is empty, too long, or holds a control character.
    #[error("invalid event id {0:?}: use 1 to {MAX_ID_LEN} bytes with no control characters")]
    Id(String),
}

/// True when `segment` is a valid type segment: one or more of `[A-Za-z0-9_-]`.
pub(crate) fn is_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A validated event type such as `assistant.goal.completed`.
///
/// Types name what happened (`domain.action.state`); subscribers select them with
/// [`Pattern`](crate::Pattern)s, so they must never contain the wildcard characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(Arc<str>);

impl EventType {
    /// Validates `s` as an event type.
    pub fn new(s: &str) -> Result<Self, InvalidName> {
        if s.len() > MAX_TYPE_LEN || !s.split('.').all(is_segment) {
            return Err(InvalidName::Type(s.to_owned()));
        }
        Ok(Self(Arc::from(s)))
    }

    /// Wraps a type the log validated when it was appended.
    pub(crate) fn trusted(s: &str) -> Self {
        Self(Arc::from(s))
    }

    /// The type as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EventType {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TypeVisitor)
    }
}

/// Reads an event type from its text, with no copy of the text when it repeats the type
/// this thread read last: the events of one request or one page mostly share a type, and a
/// repeat is then neither validated nor allocated again.
struct TypeVisitor;

impl serde::de::Visitor<'_> for TypeVisitor {
    type Value = EventType;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event type (a string such as \"memory.entity.extracted\")")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<EventType, E> {
        thread_local! {
            static LAST: std::cell::RefCell<Option<EventType>> = const { std::cell::RefCell::new(None) };
        }
        let cached = LAST.with_borrow(|last| last.as_ref().filter(|t| &*t.0 == s).cloned());
        if let Some(t) = cached {
            return Ok(t);
        }
        let t = EventType::new(s).map_err(E::custom)?;
        LAST.set(Some(t.clone()));
        Ok(t)
    }
}

/// Checks a stream name: 1..=255 bytes, no control characters.
pub fn validate_stream(s: &str) -> Result<(), InvalidName> {
    if s.is_empty() || s.len() > MAX_STREAM_LEN || s.chars().any(char::is_control) {
        return Err(InvalidName::Stream(s.to_owned()));
    }
    Ok(())
}

/// Checks a client-supplied event id: 1..=128 bytes, no control characters.
pub fn validate_id(s: &str) -> Result<(), InvalidName> {
    if s.is_empty() || s.len() > MAX_ID_LEN || s.chars().any(char::is_control) {
        return Err(InvalidName::Id(s.to_owned()));
    }
    Ok(())
}

/// Why a payload's text was refused although it is syntactically JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Text no reader can turn into a value (a lone surrogate, a number beyond a double).
    #[error("{0}")]
    Unreadable(String),
    /// Arrays and objects nested deeper than [`MAX_PAYLOAD_DEPTH`].
    #[error(
        "it nests arrays and objects more than {MAX_PAYLOAD_DEPTH} levels deep (the limit); flatten it"
    )]
    TooDeep,
}

/// Refuses what serde_json's raw-value parsing (which keeps a payload's text without
/// building it) lets through but no reader can turn into a value: a `\u` escape of a lone
/// UTF-16 surrogate, a number beyond the range of a double (`1e999`), and nesting deeper
/// than [`MAX_PAYLOAD_DEPTH`]. `text` is syntactically valid JSON; one pass over its bytes.
pub fn check_payload_text(text: &str) -> Result<(), PayloadError> {
    let b = text.as_bytes();
    let hex = |i: usize| -> Option<u16> {
        let h = b.get(i..i + 4)?;
        if !h.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    let lone = |cp: u16| {
        PayloadError::Unreadable(format!(
            "\\u{cp:04x} is a lone UTF-16 surrogate, which is not a character; pair it or send the character itself"
        ))
    };
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_PAYLOAD_DEPTH {
                    return Err(PayloadError::TooDeep);
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] != b'\\' {
                        // The rest of the string up to its end or its next escape.
                        i += memchr::memchr2(b'"', b'\\', &b[i..]).unwrap_or(b.len() - i);
                        continue;
                    }
                    if b.get(i + 1) != Some(&b'u') {
                        i += 2;
                        continue;
                    }
                    let cp = hex(i + 2).ok_or_else(|| {
                        PayloadError::Unreadable("a \\u escape needs four hex digits".into())
                    })?;
                    i += 6;
                    if (0xDC00..0xE000).contains(&cp) {
                        return Err(lone(cp));
                    }
                    if (0xD800..0xDC00).contains(&cp) {
                        let low = (b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u'))
                            .then(|| hex(i + 2))
                            .flatten();
                        match low {
                            Some(l) if (0xDC00..0xE000).contains(&l) => i += 6,
                            _ => return Err(lone(cp)),
                        }
                    }
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                let number = &text[start..i];
                let big = number.len() > 300 || number.bytes().any(|c| c == b'e' || c == b'E');
                if big && !number.parse::<f64>().is_ok_and(f64::is_finite) {
                    return Err(PayloadError::Unreadable(format!(
                        "the number {} is out of range (beyond a double)",
                        &number[..number.len().min(40)]
                    )));
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// A JSON payload kept as its validated text.
///
/// The log stores and replays payloads without parsing them: decoding an envelope costs a
/// copy, not a JSON parse, and plugins receive the text as it was appended.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Arc<str>);

impl Payload {
    /// Parses `json` to check it is one JSON value, and keeps that value's text as sent.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        let raw: &RawValue = serde_json::from_str(json)?;
        check_payload_text(raw.get()).map_err(<serde_json::Error as serde::de::Error>::custom)?;
        Ok(Self(Arc::from(raw.get())))
    }

    /// Wraps a value already known to be JSON.
    pub fn from_value(value: &serde_json::Value) -> Self {
        Self(Arc::from(value.to_string()))
    }

    /// Wraps text that the log itself validated when it was appended.
    pub(crate) fn trusted(text: &str) -> Self {
        Self(Arc::from(text))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Size of the JSON text in bytes (what the per-event limit is measured on).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty text, which a validated payload never is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the payload into a value.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

impl Default for Payload {
    fn default() -> Self {
        Self(Arc::from("null"))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Ok(Self(Arc::from(raw.get())))
    }
}

/// Context that travels with an event: who caused it and which flow it belongs to.
///
/// The named fields are the ones evhost itself reads (flows group by `correlation_id`,
/// derived events point at their source with `causation_id`); any other string keys are
/// kept as given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Groups every event of one flow (a conversation, a request, a saga).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The id of the event that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The user on whose behalf the event was produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The agent that produced the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Version of the payload's schema, for consumers that handle several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<String>,
    /// Any other keys, kept as given.
    #[serde(flatten)]
    pub extra: BTreeMap<String, String>,
}

impl Metadata {
    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self == &Metadata::default()
    }

    /// Metadata from key-value pairs (as plugins send it); a later key overrides an earlier.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut m = Metadata::default();
        for (k, v) in pairs {
            match k.as_str() {
                "correlation_id" => m.correlation_id = Some(v),
                "causation_id" => m.causation_id = Some(v),
                "user_id" => m.user_id = Some(v),
                "agent_id" => m.agent_id = Some(v),
                "schema_version" => m.schema_version = Some(v),
                _ => {
                    m.extra.insert(k, v);
                }
            }
        }
        m
    }

    /// Bytes of every key and value, counted toward an event's size limit.
    pub fn text_len(&self) -> usize {
        // Counted on every append: summed directly, with no iterator chain.
        let named: usize = self
            .named()
            .iter()
            .map(|(k, v)| v.as_ref().map_or(0, |v| k.len() + v.len()))
            .sum();
        named
            + self
                .extra
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// The named fields with their keys, in the order plugins receive them.
    fn named(&self) -> [(&'static str, &Option<String>); 5] {
        [
            ("correlation_id", &self.correlation_id),
            ("causation_id", &self.causation_id),
            ("user_id", &self.user_id),
            ("agent_id", &self.agent_id),
            ("schema_version", &self.schema_version),
        ]
    }

    /// The pairs without copying them.
    pub(crate) fn to_pairs_ref(&self) -> impl Iterator<Item = (&str, &str)> {
        self.named()
            .into_iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
            .chain(self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// Every set key with its value, named fields first (as plugins receive it).
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        self.to_pairs_ref()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// An event as stored in the log: the envelope the host assigned plus what the client sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id: a UUIDv7 chosen by the host, or the client's own idempotency key.
    pub id: EventId,
    /// What happened, e.g. `assistant.tool.executed`.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// The aggregate or entity the event belongs to.
    pub stream: StreamName,
    /// Global order in the log, gap-free, starting at 0.
    pub position: u64,
    /// Order within the stream, starting at 0.
    pub version: u64,
    /// When the host appended the event (UTC, stored to the microsecond).
    ///
    /// Never decreasing along the log: the writer gives each append the later of the wall
    /// clock and the previous event's timestamp, so a clock stepped back (NTP, a VM
    /// migration) repeats the last timestamp until it catches up rather than going back.
    /// That is what lets a read by time (`since`, `until`) find its start by a binary search
    /// over positions. (The placeholders `evhost log repair` writes carry the time of the
    /// repair, and a log written by an older host may step back where its clock did; a time
    /// search is approximate around such events.)
    pub timestamp: DateTime<Utc>,
    /// The producing service or plugin.
    #[serde(default)]
    pub source: String,
    /// The event's data as JSON.
    pub payload: Payload,
    /// Correlation, causation and free keys.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
}

impl Event {
    /// Bytes of the event's text: payload, metadata keys and values, source, id, type and
    /// stream. What a read response's byte bound is measured on (plus the fixed envelope).
    pub fn text_len(&self) -> usize {
        self.payload.len()
            + self.metadata.text_len()
            + self.source.len()
            + self.id.len()
            + self.event_type.as_str().len()
            + self.stream.len()
    }
}

/// An event a client asks to append; the log assigns the rest of the envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Idempotency key; `None` lets the host assign a UUIDv7.
    pub id: Option<EventId>,
    /// What happened.
    pub event_type: EventType,
    /// The producing service or plugin.
    pub source: String,
    /// The event's data.
    pub payload: Payload,
    /// Correlation, causation and free keys.
    pub metadata: Metadata,
}

impl NewEvent {
    /// A new event of `event_type` with `payload` and nothing else set.
    pub fn new(event_type: EventType, payload: Payload) -> Self {
        Self {
            id: None,
            event_type,
            source: String::new(),
            payload,
            metadata: Metadata::default(),
        }
    }

    /// Bytes of what the appender gave: payload, metadata keys and values, source, id and
    /// type. The per-event limit (`--max-event-bytes`) is measured on this.
    pub fn text_len(&self) -> usize {
        self.payload.len()
            + self.metadata.text_len()
            + self.source.len()
            + self.id.as_deref().map_or(0, str::len)
            + self.event_type.as_str().len()
    }

    /// Sets the idempotency key.
    pub fn with_id(mut self, id: impl Into<EventId>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the producing service.
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_accept_dotted_segments_and_refuse_everything_else() {
        for ok in ["a", "memory.created", "assistant.goal.completed", "A-b_9.x"] {
            assert!(EventType::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", ".", "a.", ".a", "a..b", "a.*", "a.>", "a b", "é.x", "a/b",
        ] {
            assert_eq!(
                EventType::new(bad),
                Err(InvalidName::Type(bad.into())),
                "{bad}"
            );
        }
        assert!(EventType::new(&"a".repeat(MAX_TYPE_LEN + 1)).is_err());
    }

    /// A repeated type read from JSON is the one read before it (shared, not copied again),
    /// and a bad type after a good one is still refused.
    #[test]
    fn event_types_read_from_json_are_validated_and_repeats_shared() {
        let types: Vec<EventType> =
            serde_json::from_str(r#"["a.b", "a.b", "c.d", "a.b"]"#).unwrap();
        assert!(Arc::ptr_eq(&types[0].0, &types[1].0));
        assert_eq!(types[2].as_str(), "c.d");
        assert_eq!(types[3].as_str(), "a.b");
        let bad: Result<Vec<EventType>, _> = serde_json::from_str(r#"["a.b", "a..b"]"#);
        assert!(bad.unwrap_err().to_string().contains("invalid event type"));
        let bad: Result<Vec<EventType>, _> = serde_json::from_str(r#"["a.*", "a.*"]"#);
        assert!(bad.is_err());
    }

    /// The size counted toward the per-event limit is every set key and value.
    #[test]
    fn metadata_text_len_counts_every_pair() {
        let mut m = Metadata {
            correlation_id: Some("c1".into()),
            causation_id: Some("cause".into()),
            user_id: Some("u".into()),
            agent_id: Some("agent-7".into()),
            schema_version: Some("2".into()),
            ..Metadata::default()
        };
        m.extra.insert("tenant".into(), "acme".into());
        let pairs: usize = m.to_pairs().iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_eq!(m.text_len(), pairs);
        assert_eq!(Metadata::default().text_len(), 0);
    }

    #[test]
    fn lone_surrogates_and_numbers_out_of_range_are_refused() {
        for bad in [
            r#""\ud800x""#,
            r#""\udc00""#,
            r#"["\ud800\u0041"]"#,
            r#""\ud800""#,
            "[1e9991,2]",
            r#"{"a":-1E400}"#,
        ] {
            assert!(Payload::from_json(bad).is_err(), "{bad}");
        }
        for good in [
            r#""\ud83d\ude00""#,
            r#""\\ud800""#,
            r#""\u00e9""#,
            r#"{"e1e999":1e308,"b":-0.5e-9999,"c":"1e999"}"#,
            r#"{"a":"\\\u0041"}"#,
        ] {
            let p = Payload::from_json(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert!(serde_json::from_str::<serde_json::Value>(p.as_str()).is_ok());
        }
    }

    #[test]
    fn payloads_nested_past_the_limit_are_refused() {
        let nest = |d: usize| format!("{}1{}", "[".repeat(d), "]".repeat(d));
        assert!(Payload::from_json(&nest(MAX_PAYLOAD_DEPTH)).is_ok());
        assert_eq!(
            check_payload_text(&nest(MAX_PAYLOAD_DEPTH + 1)),
            Err(PayloadError::TooDeep)
        );
        let objects = format!(
            "{}1{}",
            "{\"a\":".repeat(MAX_PAYLOAD_DEPTH + 1),
            "}".repeat(MAX_PAYLOAD_DEPTH + 1)
        );
        assert_eq!(check_payload_text(&objects), Err(PayloadError::TooDeep));
        // Brackets inside strings do not nest; siblings do not add up.
        let text = format!("[\"{}\", {}]", "[".repeat(500), "[[]],".repeat(100) + "[]");
        assert!(check_payload_text(&text).is_ok());
    }

    #[test]
    fn payload_keeps_the_json_value_and_refuses_non_json() {
        let p = Payload::from_json(" {\"a\": [1, 2]} ").unwrap();
        assert_eq!(p.to_value(), serde_json::json!({"a": [1, 2]}));
        assert!(Payload::from_json("{\"a\":").is_err());
        assert!(Payload::from_json("1 2").is_err());
    }

    #[test]
    fn event_serializes_payload_inline_and_round_trips() {
        let e = Event {
            id: "e1".into(),
            event_type: EventType::new("memory.created").unwrap(),
            stream: "s".into(),
            position: 3,
            version: 0,
            timestamp: DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap(),
            source: "api".into(),
            payload: Payload::from_json(r#"{"content":"hi"}"#).unwrap(),
            metadata: Metadata {
                correlation_id: Some("c1".into()),
                ..Metadata::default()
            },
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["payload"]["content"], "hi");
        assert_eq!(json["type"], "memory.created");
        assert_eq!(json["metadata"]["correlation_id"], "c1");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }
}
