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
    /// One event: its fixed header (one bounds check), then its five texts back to back
    /// (one more), then its metadata pairs.
    fn event(&mut self) -> Result<Event<'a>, Error> {
        let h = self.bytes(HEADER)?;
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let position = u64_at(0);
        let version = u64_at(8);
        let timestamp_micros = u64_at(16) as i64;
        let lens = [u32_at(24), u32_at(28), u32_at(32), u32_at(36), u32_at(40)];
        let pairs = u32_at(44) as usize;
        let total = lens
            .iter()
            .try_fold(0usize, |sum, &n| sum.checked_add(n as usize));
        let total = total.ok_or_else(|| self.malformed("its texts are longer than memory"))?;
        let mut body = self.bytes(total)?;
        let mut texts = [
            Cow::Borrowed(""),
            Cow::Borrowed(""),
            Cow::Borrowed(""),
            Cow::Borrowed(""),
            Cow::Borrowed(""),
        ];
        for (t, &n) in texts.iter_mut().zip(&lens) {
            let (this, rest) = body.split_at(n as usize);
            *t = self.utf8(this)?;
            body = rest;
        }
        let [id, event_type, stream, source, payload] = texts;
        let mut metadata = Vec::with_capacity(pairs.min(64));
        for _ in 0..pairs {
            let lens = self.bytes(8)?;
            let k = u32::from_le_bytes(lens[..4].try_into().expect("4 bytes")) as usize;
            let v = u32::from_le_bytes(lens[4..].try_into().expect("4 bytes")) as usize;
            let total = k
                .checked_add(v)
                .ok_or_else(|| self.malformed("a metadata pair is longer than memory"))?;
            let (key, value) = self.bytes(total)?.split_at(k);
            metadata.push((self.utf8(key)?, self.utf8(value)?));
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

/// Bytes of an event's fixed header: position, version, timestamp, five text lengths, the
/// metadata count.
const HEADER: usize = 8 * 3 + 4 * 6;

/// Encodes `events` as the host does.
pub fn encode(events: &[Event<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        out.extend_from_slice(&e.position.to_le_bytes());
        out.extend_from_slice(&e.version.to_le_bytes());
        out.extend_from_slice(&e.timestamp_micros.to_le_bytes());
        let texts = [&e.id, &e.event_type, &e.stream, &e.source, &e.payload];
        for t in texts {
            out.extend_from_slice(&len32(t).to_le_bytes());
        }
        out.extend_from_slice(&(e.metadata.len() as u32).to_le_bytes());
        for t in texts {
            out.extend_from_slice(t.as_bytes());
        }
        for (k, v) in &e.metadata {
            out.extend_from_slice(&len32(k).to_le_bytes());
            out.extend_from_slice(&len32(v).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
    out
}

fn len32(t: &str) -> u32 {
    u32::try_from(t.len()).expect("a text of an event is under 4 GiB")
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

    /// `b` as text, checked to be UTF-8 unless it is the host's (see below).
    fn utf8(&self, b: &'a [u8]) -> Result<Cow<'a, str>, Error> {
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
