//! The host's side of `evhost:plugin@0.2.0`'s `event-batch`: a batch of events encoded
//! into one buffer, copied into the guest at once and decoded there in place (the WIT's
//! `types.event-batch` documents the layout; the SDK's `batch` module is the guest's side).

use std::sync::Arc;

use crate::event::Event;

/// Bytes of an event's fixed header: position, version, timestamp, five text lengths, the
/// metadata count.
const FIXED: usize = 8 * 3 + 4 * 6;

/// Encodes `events` in order.
pub(super) fn encode(events: &[Arc<Event>]) -> Vec<u8> {
    let size = 4 + events
        .iter()
        .map(|e| {
            FIXED
                + e.id.as_str().len()
                + e.event_type.as_str().len()
                + e.stream.as_str().len()
                + e.source.len()
                + e.payload.as_str().len()
                + 64
        })
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        let texts = [
            e.id.as_str(),
            e.event_type.as_str(),
            e.stream.as_str(),
            e.source.as_str(),
            e.payload.as_str(),
        ];
        // The header is built in place and copied once.
        let mut header = [0u8; FIXED];
        header[0..8].copy_from_slice(&e.position.to_le_bytes());
        header[8..16].copy_from_slice(&e.version.to_le_bytes());
        header[16..24].copy_from_slice(&e.timestamp.timestamp_micros().to_le_bytes());
        for (i, t) in texts.iter().enumerate() {
            header[24 + 4 * i..28 + 4 * i].copy_from_slice(&len32(t).to_le_bytes());
        }
        let count_at = out.len() + 44;
        out.extend_from_slice(&header);
        for t in texts {
            out.extend_from_slice(t.as_bytes());
        }
        let mut count = 0u32;
        for (k, v) in e.metadata.to_pairs_ref() {
            out.extend_from_slice(&len32(k).to_le_bytes());
            out.extend_from_slice(&len32(v).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(v.as_bytes());
            count += 1;
        }
        out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    }
    out
}

/// A text's length as the layout stores it.
fn len32(t: &str) -> u32 {
    // An event's fields are bounded by the event size limit, far below 4 GiB.
    u32::try_from(t.len()).expect("an event field is under 4 GiB")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Metadata, Payload};

    /// The SDK decodes what the host encodes, field for field.
    #[test]
    fn the_sdk_decodes_the_hosts_batches() {
        let mut metadata = Metadata::default();
        metadata.correlation_id = Some("c-ü".into());
        metadata.user_id = Some("u1".into());
        let events: Vec<Arc<Event>> = (0..3)
            .map(|i| {
                Arc::new(Event {
                    id: format!("id-{i}").into(),
                    event_type: EventType::new("a.b.c").unwrap(),
                    stream: format!("s-{i}").into(),
                    position: 10 + i,
                    version: i,
                    timestamp: chrono::Utc::now(),
                    source: "src".into(),
                    payload: Payload::from_json(r#"{"text":"žluť"}"#).unwrap(),
                    metadata: if i == 1 {
                        metadata.clone()
                    } else {
                        Metadata::default()
                    },
                })
            })
            .collect();
        let buf = encode(&events);
        let decoded = evhost_sdk::batch::decode(&buf).unwrap();
        assert_eq!(decoded.len(), 3);
        for (d, e) in decoded.iter().zip(&events) {
            assert_eq!(&*d.id, e.id.as_str());
            assert_eq!(&*d.event_type, e.event_type.as_str());
            assert_eq!(&*d.stream, e.stream.as_str());
            assert_eq!(d.position, e.position);
            assert_eq!(d.version, e.version);
            assert_eq!(d.timestamp_micros, e.timestamp.timestamp_micros());
            assert_eq!(&*d.source, e.source);
            assert_eq!(&*d.payload, e.payload.as_str());
            let pairs: Vec<(&str, &str)> = d.metadata.iter().map(|(k, v)| (&**k, &**v)).collect();
            let want: Vec<(&str, &str)> = e.metadata.to_pairs_ref().collect();
            assert_eq!(pairs, want);
        }
        assert_eq!(decoded[1].correlation_id(), Some("c-ü"));
        // The SDK's own encoder agrees byte for byte.
        assert_eq!(evhost_sdk::batch::encode(&decoded), buf);
    }
}
