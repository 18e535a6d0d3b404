//! The `event-batch` encoding of `evhost:plugin@0.2.0` (see `types.event-batch` in
//! `wit/plugin.wit`): how a batch of events crosses into the guest as one buffer. The
//! decoder borrows the buffer, so a batch costs one copy into wasm and no allocation per
//! field. `encode` is the host's side, for tests and for other implementations to check
//! theirs against.

use std::borrow::Cow;

use crate::event::{Error, Event};

/// Decodes a batch; the events borrow `buf`. Every text field is checked to be UTF-8.
pub fn decode(buf: &[u8]) -> Result<Vec<Event<'_>>, Error> {
    iter(buf)?.collect()
}

/// The events of a batch one by one, each decoded when it is reached (a batch is folded
/// without holding all its events at once); the events borrow `buf`. An error ends it.
/// Every text field is checked to be UTF-8.
pub fn iter(buf: &[u8]) -> Result<Events<'_>, Error> {
    Events::new(buf, false)
}

/// [`iter`] over a batch the host handed to an export: inside wasm in release builds its
/// text is not checked again (see `Reader::text`).
pub(crate) fn iter_from_host(buf: &[u8]) -> Result<Events<'_>, Error> {
    Events::new(buf, true)
}

/// The iterator of [`iter`].
pub struct Events<'a> {
    reader: Reader<'a>,
    left: u32,
}

impl<'a> Events<'a> {
    fn new(buf: &'a [u8], from_host: bool) -> Result<Self, Error> {
        let mut reader = Reader {
            buf,
            at: 0,
            from_host,
        };
        let left = reader.u32()?;
        Ok(Events { reader, left })
    }
}

impl<'a> Iterator for Events<'a> {
    type Item = Result<Event<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            let r = &self.reader;
            if r.at != r.buf.len() {
                // Once: the reader is moved to the end so the error is not repeated.
                let e = r.malformed("bytes after the last event");
                self.reader.at = self.reader.buf.len();
                return Some(Err(e));
            }
            return None;
        }
        self.left -= 1;
        let e = self.reader.event();
        if e.is_err() {
            self.left = 0;
            self.reader.at = self.reader.buf.len();
        }
        Some(e)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left as usize + 1))
    }
}

impl<'a> Reader<'a> {
    fn event(&mut self) -> Result<Event<'a>, Error> {
        let r = self;
        let position = r.u64()?;
        let version = r.u64()?;
        let timestamp_micros = r.u64()? as i64;
        let id = r.text()?;
        let event_type = r.text()?;
        let stream = r.text()?;
        let source = r.text()?;
        let payload = r.text()?;
        let pairs = r.u32()? as usize;
        let mut metadata = Vec::with_capacity(pairs.min(64));
        for _ in 0..pairs {
            let key = r.text()?;
            metadata.push((key, r.text()?));
        }
        Ok(Event {
            id,
            event_type,
            stream,
            position,
            version,
            timestamp_micros,
            source,
            payload,
            metadata,
        })
    }
}

/// Encodes `events` as the host does.
pub fn encode(events: &[Event<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        out.extend_from_slice(&e.position.to_le_bytes());
        out.extend_from_slice(&e.version.to_le_bytes());
        out.extend_from_slice(&e.timestamp_micros.to_le_bytes());
        for t in [&e.id, &e.event_type, &e.stream, &e.source, &e.payload] {
            text(&mut out, t);
        }
        out.extend_from_slice(&(e.metadata.len() as u32).to_le_bytes());
        for (k, v) in &e.metadata {
            text(&mut out, k);
            text(&mut out, v);
        }
    }
    out
}

fn text(out: &mut Vec<u8>, t: &str) {
    out.extend_from_slice(&(t.len() as u32).to_le_bytes());
    out.extend_from_slice(t.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    /// The buffer is a batch the host handed to an export (encoded from Rust strings).
    from_host: bool,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| self.malformed("it ends inside a field"))?;
        let b = &self.buf[self.at..end];
        self.at = end;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn text(&mut self) -> Result<Cow<'a, str>, Error> {
        let n = self.u32()? as usize;
        let b = self.bytes(n)?;
        if !self.from_host || cfg!(debug_assertions) || !cfg!(target_arch = "wasm32") {
            return std::str::from_utf8(b)
                .map(Cow::Borrowed)
                .map_err(|_| self.malformed("a text field is not UTF-8"));
        }
        // SAFETY: `from_host` is set only for the batch an export was handed, which the
        // host encodes from Rust strings (UTF-8 by construction), as the canonical ABI's
        // own string lowering does, and wit-bindgen's release builds lift strings
        // unchecked on the same ground. Any other buffer, debug builds and native callers
        // are checked.
        Ok(Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(b) }))
    }

    fn malformed(&self, what: &str) -> Error {
        Error::Failed(format!(
            "the event batch from the host is malformed at byte {} of {}: {what}; the host and \
             the SDK disagree on evhost:plugin@0.2.0's event-batch encoding",
            self.at,
            self.buf.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_round_trips_with_every_field() {
        let events = vec![
            Event::new("a.b", r#"{"x":1}"#)
                .with_stream("s-1")
                .with_meta("correlation_id", "c-1")
                .with_meta("user_id", "ü")
                .at(7),
            Event {
                id: "id-2".into(),
                version: 3,
                timestamp_micros: -5,
                source: "src".into(),
                ..Event::new("c.d", "null")
            },
        ];
        let buf = encode(&events);
        assert_eq!(decode(&buf).unwrap(), events);
        assert_eq!(decode(&encode(&[])).unwrap(), Vec::<Event>::new());
    }

    #[test]
    fn a_truncated_or_padded_batch_is_refused_with_the_byte() {
        let buf = encode(&[Event::new("a.b", "1")]);
        for cut in 0..buf.len() {
            let e = decode(&buf[..cut]).unwrap_err();
            assert!(e.to_string().contains("malformed at byte"), "{e}");
        }
        let mut padded = buf.clone();
        padded.push(0);
        assert!(decode(&padded).is_err());
        // A count far past the buffer does not allocate for it.
        assert!(decode(&u32::MAX.to_le_bytes()).is_err());
    }
}
