//! Bounds on what the host itself writes to the log: the log's limits as the runners see
//! them, texts the host builds (errors, reasons, outcomes) cut to a fixed size, and derived
//! output split into appends the log accepts.
//!
//! A runner must never build an event the log refuses: a refusal is deterministic, so
//! retrying it would wedge the runner on that event forever.

use crate::event::{Event, Metadata, NewEvent};
use crate::log::StreamAppend;

/// Most bytes of one text the host builds into an event or a record (an error message, a
/// dead-letter reason, an echoed request field): 4 KiB, or an eighth of the event limit
/// when that is smaller, so several fit in one event well under the limit.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// The log's limits on appends, as a runner must respect them for what it derives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Largest event the log accepts, in bytes (`--max-event-bytes`).
    pub max_event_bytes: usize,
    /// Most events the log accepts in one append (`--max-batch-events`).
    pub max_batch_events: usize,
}

impl Default for OutputLimits {
    /// The log's defaults: 1 MiB per event, 10,000 events per append.
    fn default() -> Self {
        Self {
            max_event_bytes: crate::event::DEFAULT_MAX_EVENT_BYTES,
            max_batch_events: 10_000,
        }
    }
}

impl OutputLimits {
    /// Most bytes of one text the host builds under these limits (see [`MAX_MESSAGE_BYTES`]).
    pub fn message_bytes(&self) -> usize {
        MAX_MESSAGE_BYTES.min(self.max_event_bytes / 8).max(64)
    }

    /// `text` cut to [`OutputLimits::message_bytes`].
    pub fn bound(&self, text: String) -> String {
        bound(text, self.message_bytes())
    }
}

/// `text` unchanged when it has at most `max` bytes; otherwise its start, cut on a char
/// boundary, and a marker saying how much was left out, `max` bytes at most in all.
pub fn bound(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let marker = format!(" … [{} bytes in all, truncated]", text.len());
    let mut keep = max.saturating_sub(marker.len());
    while !text.is_char_boundary(keep) {
        keep -= 1;
    }
    let mut out = String::with_capacity(keep + marker.len());
    out.push_str(&text[..keep]);
    out.push_str(&marker);
    out
}

/// The bytes of `m`'s texts.
fn metadata_bytes(m: &Metadata) -> usize {
    let optional: usize = [
        &m.correlation_id,
        &m.causation_id,
        &m.user_id,
        &m.agent_id,
        &m.schema_version,
    ]
    .iter()
    .map(|s| s.as_ref().map_or(0, String::len))
    .sum();
    optional
        + m.extra
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// The size of `e` appended to `stream`, as the log measures an event: the payload and every
/// text of the envelope.
pub(crate) fn event_bytes(stream: &str, e: &NewEvent) -> usize {
    e.payload.len()
        + e.event_type.as_str().len()
        + e.source.len()
        + e.id.as_deref().map_or(0, str::len)
        + stream.len()
        + metadata_bytes(&e.metadata)
}

/// Room the runner's stamps (causation id, correlation id, derivation depth) may add to an
/// event derived from `from`.
pub(crate) fn stamp_room(from: &Event) -> usize {
    128 + from.metadata.correlation_id.as_ref().map_or(0, String::len)
}

/// About the memory a committed event holds, for byte budgets: its texts as
/// [`event_bytes`] counts them plus the fixed fields and allocations.
pub fn stored_bytes(e: &Event) -> usize {
    const FIXED: usize = 96;
    FIXED
        + e.payload.len()
        + e.event_type.as_str().len()
        + e.source.len()
        + e.id.len()
        + e.stream.len()
        + metadata_bytes(&e.metadata)
}

/// `appends` split, in order, into appends of at most `max_events` events each (a stream's
/// run split where needed), so none exceeds the log's limit per append.
pub(crate) fn split_appends(
    appends: Vec<StreamAppend>,
    max_events: usize,
) -> Vec<Vec<StreamAppend>> {
    let max_events = max_events.max(1);
    let mut out: Vec<Vec<StreamAppend>> = Vec::new();
    let mut current: Vec<StreamAppend> = Vec::new();
    let mut n = 0;
    for a in appends {
        let StreamAppend {
            stream,
            expected,
            events,
        } = a;
        let mut events = events.into_iter().peekable();
        while events.peek().is_some() {
            if n == max_events {
                out.push(std::mem::take(&mut current));
                n = 0;
            }
            let run: Vec<NewEvent> = events.by_ref().take(max_events - n).collect();
            n += run.len();
            current.push(StreamAppend {
                stream: stream.clone(),
                expected,
                events: run,
            });
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Payload};
    use crate::log::ExpectedVersion;

    #[test]
    fn bound_cuts_on_a_char_boundary_with_a_marker_within_the_size() {
        assert_eq!(bound("short".into(), 100), "short");
        let long = "é".repeat(10_000);
        let b = bound(long.clone(), 1000);
        assert!(b.len() <= 1000, "{}", b.len());
        assert!(b.starts_with("éé"));
        assert!(b.ends_with("[20000 bytes in all, truncated]"), "{b}");
        let limits = OutputLimits {
            max_event_bytes: 1000,
            max_batch_events: 10,
        };
        assert!(limits.bound(long).len() <= 125);
    }

    #[test]
    fn split_appends_keeps_order_and_respects_the_limit() {
        let ev = |i: usize| {
            NewEvent::new(
                EventType::new("a.b").unwrap(),
                Payload::from_json(&i.to_string()).unwrap(),
            )
        };
        let mut i = 0;
        let mut mk = |stream: &str, n: usize| StreamAppend {
            stream: stream.into(),
            expected: ExpectedVersion::Any,
            events: (0..n)
                .map(|_| {
                    i += 1;
                    ev(i)
                })
                .collect(),
        };
        let appends = vec![mk("a", 250), mk("b", 3), mk("a", 100)];
        let chunks = split_appends(appends, 100);
        assert!(chunks.iter().all(|c| {
            let n: usize = c.iter().map(|a| a.events.len()).sum();
            (1..=100).contains(&n)
        }));
        let flat: Vec<(String, String)> = chunks
            .iter()
            .flatten()
            .flat_map(|a| {
                a.events
                    .iter()
                    .map(|e| (a.stream.to_string(), e.payload.as_str().to_owned()))
            })
            .collect();
        assert_eq!(flat.len(), 353);
        for (k, (stream, p)) in flat.iter().enumerate() {
            assert_eq!(p, &(k + 1).to_string());
            let want = if !(250..253).contains(&k) { "a" } else { "b" };
            assert_eq!(stream, want);
        }
        assert_eq!(chunks.len(), 4);
    }
}
