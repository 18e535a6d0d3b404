//! Long sequential reads (a subscription or a projection catching up) through ordered
//! consumers kept between pages: the server streams the messages instead of answering one
//! direct get per page, at about twice the rate. A page that does not continue where a
//! kept consumer stands goes to direct gets instead.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::direct::Stored;
use crate::log::LogError;

/// Pages at least this long go through a consumer.
pub(super) const MIN_PAGE: usize = 512;

/// Consumers kept at once; the least recently used goes first.
const KEPT: usize = 4;

/// A consumer idle longer than this is dropped (its pull requests lapse on the server).
const IDLE: Duration = Duration::from_secs(2);

/// How long a page waits for a message the server says is there.
const WAIT: Duration = Duration::from_secs(2);

struct Reader {
    subject: String,
    /// The sequence the next message must be at least.
    next_seq: u64,
    messages: Ordered,
    /// A message past the head, held for a later page, with the pending count it came with.
    peeked: Option<(Stored, u64)>,
    /// Matching messages the server had after the last one delivered: with none, the next
    /// one may never come, and a page would wait for it.
    pending: u64,
    used: Instant,
}

/// What a page read through a consumer came to.
pub(super) struct Page {
    pub messages: Vec<Stored>,
    /// True when the page stopped at the head (nothing more to read below it).
    pub at_head: bool,
}

/// The kept consumers of one log.
#[derive(Default)]
pub(super) struct Readers {
    kept: tokio::sync::Mutex<Vec<Reader>>,
}

fn stored(m: &async_nats::jetstream::Message) -> Result<(Stored, u64), LogError> {
    let info = m
        .info()
        .map_err(|e| LogError::Nats(format!("a consumer's message: {e}")))?;
    let stored_at: DateTime<Utc> = info.published;
    Ok((
        Stored {
            seq: info.stream_sequence,
            subject: m.subject.to_string(),
            stored_at,
            body: m.payload.clone(),
        },
        info.pending,
    ))
}

async fn open(
    js: &async_nats::jetstream::Context,
    stream: &str,
    subject: &str,
    seq: u64,
) -> Result<Reader, LogError> {
    let err = |e: &dyn std::fmt::Display| LogError::Nats(format!("a reader: {e}"));
    let consumer = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| err(&e))?
        .create_consumer(OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: seq,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
    let pending = consumer.cached_info().num_pending;
    Ok(Reader {
        subject: subject.to_owned(),
        next_seq: seq,
        messages: consumer.messages().await.map_err(|e| err(&e))?,
        peeked: None,
        pending,
        used: Instant::now(),
    })
}

impl Readers {
    /// Up to `limit` messages on `subject` from `seq` to `head` (a sequence), through the
    /// consumer that stands at `seq` or a new one.
    pub(super) async fn page(
        &self,
        js: &async_nats::jetstream::Context,
        stream: &str,
        subject: &str,
        seq: u64,
        head: u64,
        limit: usize,
    ) -> Result<Page, LogError> {
        let mut kept = self.kept.lock().await;
        kept.retain(|r| r.used.elapsed() < IDLE);
        let found = kept.iter().position(|r| {
            r.subject == subject && r.next_seq == seq && (r.peeked.is_some() || r.pending > 0)
        });
        let found = found.map(|i| kept.swap_remove(i));
        drop(kept);
        let mut reader = match found {
            Some(r) => r,
            None => tokio::time::timeout(WAIT, open(js, stream, subject, seq))
                .await
                .map_err(|_| LogError::Nats("opening a reader took over 2 s".into()))??,
        };
        if reader.peeked.is_none() && reader.pending == 0 {
            // Nothing matches from here on: nothing to wait for.
            return Ok(Page {
                messages: Vec::new(),
                at_head: true,
            });
        }
        let mut out = Vec::with_capacity(limit.min(4096));
        let mut at_head = false;
        while out.len() < limit {
            let (m, pending) = match reader.peeked.take() {
                Some(peeked) => peeked,
                None => {
                    let next = tokio::time::timeout(WAIT, reader.messages.next())
                        .await
                        .map_err(|_| LogError::Nats("a reader stopped delivering".into()))?
                        .ok_or_else(|| LogError::Nats("a reader's consumer ended".into()))?
                        .map_err(|e| LogError::Nats(format!("a reader: {e}")))?;
                    stored(&next)?
                }
            };
            if m.seq > head {
                reader.peeked = Some((m, pending));
                at_head = true;
                break;
            }
            reader.next_seq = m.seq + 1;
            reader.pending = pending;
            let last = m.seq;
            out.push(m);
            if last >= head {
                at_head = true;
                break;
            }
            if pending == 0 {
                // The count is as of when the server sent the message, which may have
                // waited in the client's buffer while more were stored: not proof that
                // nothing matches up to the head. The page ends here; the next goes on
                // from this message (by direct gets, this reader having nothing pending).
                break;
            }
        }
        if at_head {
            // Every matching message up to the head was delivered: the next page, which
            // starts at the head, continues here.
            reader.next_seq = reader.next_seq.max(head + 1);
        }
        reader.used = Instant::now();
        let mut kept = self.kept.lock().await;
        if kept.len() >= KEPT {
            // The least recently used makes room.
            if let Some(i) = (0..kept.len()).min_by_key(|&i| kept[i].used) {
                kept.swap_remove(i);
            }
        }
        kept.push(reader);
        Ok(Page {
            messages: out,
            at_head,
        })
    }
}
