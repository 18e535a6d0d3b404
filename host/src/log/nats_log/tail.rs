//! The tail: an ordered consumer from the head that hands every stored event, whichever
//! host appended it, to the sink in position order, feeds the id index and the remembered
//! stream tips, and moves the head; and the waits on it (an append returns once the tail
//! has passed it).

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};

use super::{Inner, Tip, storage, wire};
use crate::event::Event;
use crate::log::LogError;

impl Inner {
    /// Hands every message from `start` on to the sink, in order, for as long as the log
    /// is open; a consumer that fails is made again from where it stopped.
    pub(super) async fn tail(self: Arc<Self>, start: u64) {
        let mut next = start;
        loop {
            match self.follow(next).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, from = next, "the NATS log's tail stopped; starting it again");
                }
            }
            next = self.head() + 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(super) async fn follow(&self, start: u64) -> Result<(), LogError> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let stream = self
            .js
            .get_stream_no_info(&self.config.stream)
            .await
            .map_err(|e| storage("opening the tail", e))?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: self.subjects.all(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| storage("opening the tail", e))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| storage("opening the tail", e))?;
        let mut events: Vec<Arc<Event>> = Vec::new();
        let mut idle = 0u32;
        loop {
            // A consumer whose node died stalls silently until its heartbeats time out
            // (tens of seconds): when idle, check that nothing stored is waiting, and make
            // the consumer again when something is.
            let first = match tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
                Ok(Some(first)) => first,
                Ok(None) => return Ok(()),
                Err(_) => {
                    idle += 1;
                    let behind = self.acked.load(std::sync::atomic::Ordering::Acquire)
                        > self.head()
                        || (idle % 5 == 0 && self.stored_end().await? > self.head());
                    if behind {
                        return Err(LogError::Nats(format!(
                            "the tail's consumer stopped delivering at position {}; making it again",
                            self.head()
                        )));
                    }
                    continue;
                }
            };
            idle = 0;
            let mut batch = vec![first];
            while batch.len() < 512 {
                match messages.next().now_or_never() {
                    Some(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            events.clear();
            let mut last = 0;
            for m in batch {
                let m = m.map_err(|e| storage("the tail", e))?;
                let info = m.info().map_err(|e| storage("the tail", e))?;
                let seq = info.stream_sequence;
                let stored_at = info.published;
                let d = wire::decode(&self.subjects, &m.subject, seq, stored_at, &m.payload)?;
                if d.client_id {
                    self.index_id(&d.event)?;
                }
                self.saw(&d.event, seq);
                last = seq;
                events.push(Arc::new(d.event));
            }
            self.index_seen(last)?;
            self.sink.committed(&events);
            self.head.send_replace(last);
        }
    }

    /// Keeps a remembered stream's tip current with an event the tail saw.
    pub(super) fn saw(&self, event: &Event, seq: u64) {
        let mut tips = self.tips.lock().unwrap();
        if let Some(tip) = tips.get_mut(event.stream.as_str())
            && seq > tip.last_seq
        {
            *tip = Tip::after(event, seq);
        }
    }

    /// Waits until the tail has handed position `position` to the sink, for at most 10 s.
    pub(super) async fn reach(&self, head: u64) {
        let mut rx = self.head.subscribe();
        let waited =
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|h| *h >= head)).await;
        if waited.is_err() {
            tracing::warn!(
                head,
                "the NATS log's tail is more than 10 s behind an acknowledged append"
            );
        }
    }

    /// The sequence of the last message stored.
    pub(super) async fn stored_end(&self) -> Result<u64, LogError> {
        Ok(self
            .direct
            .last(&self.subjects.all())
            .await?
            .map_or(0, |m| m.seq))
    }

    /// Lets the tail reach the stream's current end, so the id index knows every id stored.
    pub(super) async fn catch_up(&self) -> Result<(), LogError> {
        let last = self.stored_end().await?;
        self.reach(last).await;
        Ok(())
    }
}
