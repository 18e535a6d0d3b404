//! The local index of client ids (`DATA/nats-index`): every id an appender chose, with
//! its position, fed by the tail and brought up to the stream's end at start. Disposable:
//! a lost index, or one kept for a stream created anew since, is rebuilt from the stream.

use super::{Inner, storage};
use crate::event::Event;
use crate::log::LogError;

/// The last sequence the index has seen.
const CURSOR: &[u8] = b"cursor";
/// The creation time of the stream the index was built from.
const CREATED: &[u8] = b"stream-created";

impl Inner {
    /// Indexes the client ids of every message up to `last_seq` that the index has not
    /// seen; a stream that was created anew since (another `created` time) starts it over.
    pub(super) async fn catch_up_index(
        &self,
        created: &str,
        last_seq: u64,
    ) -> Result<(), LogError> {
        let err = |e| storage("the NATS log's id index", e);
        if self.index.get(CREATED).map_err(err)?.as_deref() != Some(created.as_bytes()) {
            self.ids.clear().map_err(err)?;
            self.index
                .insert(CURSOR, &0u64.to_be_bytes())
                .map_err(err)?;
            self.index
                .insert(CREATED, created.as_bytes())
                .map_err(err)?;
        }
        let mut cursor = self.cursor()?;
        let all = self.subjects.all();
        while cursor < last_seq {
            let batch = self.direct.batch(cursor + 1, 1000, &all).await?;
            let mut upto = cursor;
            for m in &batch.messages {
                if m.seq > last_seq {
                    break;
                }
                let d = self.decode(m)?;
                if d.client_id {
                    self.index_id(&d.event)?;
                }
                upto = m.seq;
            }
            if upto == cursor || !batch.more {
                upto = last_seq;
            }
            cursor = upto;
            self.index
                .insert(CURSOR, &cursor.to_be_bytes())
                .map_err(err)?;
        }
        Ok(())
    }

    pub(super) fn cursor(&self) -> Result<u64, LogError> {
        Ok(self
            .index
            .get(CURSOR)
            .map_err(|e| storage("the NATS log's id index", e))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    pub(super) fn index_id(&self, event: &Event) -> Result<(), LogError> {
        self.ids
            .insert(event.id.as_bytes(), &event.position.to_be_bytes())
            .map_err(|e| storage("the NATS log's id index", e))?;
        Ok(())
    }

    /// The position of the event appended with client id `id`, as far as the tail got.
    pub(super) fn find_id(&self, id: &str) -> Result<Option<u64>, LogError> {
        Ok(self
            .ids
            .get(id.as_bytes())
            .map_err(|e| storage("the NATS log's id index", e))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Records that the index holds every id up to sequence `seq`.
    pub(super) fn index_seen(&self, seq: u64) -> Result<(), LogError> {
        self.index
            .insert(CURSOR, &seq.to_be_bytes())
            .map_err(|e| storage("the NATS log's id index", e))?;
        Ok(())
    }

    /// Forgets `id` (its event was erased).
    pub(super) fn forget_id(&self, id: &str) -> Result<(), LogError> {
        self.ids
            .remove(id.as_bytes())
            .map_err(|e| storage("the NATS log's id index", e))?;
        Ok(())
    }
}
