//! An append to the JetStream log: each event's place (a retried id, or a new message),
//! the versions and deletion rules checked against the streams' tips, the messages with
//! their expected-sequence and id headers, and one publish (alone, or one atomic batch),
//! tried again while other writers move the streams on.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use serde::Deserialize;

use super::config::ApiError;
use super::wire::Body;
use super::{NatsLog, Tip};
use crate::log::{AppendError, Appended, LogError, StreamAppend};

/// How many times an append is tried again after another writer moved a stream on.
const RETRIES: usize = 8;

/// The server's answer to a publish.
#[derive(Debug, Deserialize)]
struct PubAck {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    count: Option<u64>,
    error: Option<ApiError>,
}

/// JetStream's error codes an append acts on.
const WRONG_LAST_SEQUENCE: u64 = 10071;
const BATCH_DUPLICATE_ID: u64 = 10201;

/// Where one event of an append stands.
enum Slot {
    /// Already in the log (a retried id) at this position.
    Known(u64),
    /// The n-th message of this append.
    New(usize),
}

/// What one try of an append came to.
enum Attempt {
    Done(Vec<Appended>),
    /// A stream moved on since this host looked: look again.
    Stale,
    /// The server holds some id already: let the index catch up and look again.
    Duplicate,
}

impl NatsLog {
    /// Appends `groups` (their client ids looked up and indexed when `index_ids`), one
    /// append of this host at a time, trying again while other writers move the streams on.
    pub(super) async fn append_with(
        &self,
        groups: Vec<StreamAppend>,
        index_ids: bool,
    ) -> Result<Vec<Appended>, AppendError> {
        let c = &self.inner.config;
        crate::log::validate(&groups, c.max_batch_events, c.max_event_bytes)?;
        let _writer = self.inner.writer.lock().await;
        let mut fresh = false;
        let mut duplicates = 0;
        for _ in 0..RETRIES {
            match self.try_append(&groups, index_ids, fresh).await? {
                Attempt::Done(done) => return Ok(done),
                Attempt::Stale => fresh = true,
                Attempt::Duplicate => {
                    duplicates += 1;
                    if duplicates > 2 {
                        return Err(AppendError::Invalid(
                            "JetStream still remembers one of the append's event ids from within its duplicate window, though no stored event has it (an erased event's id is free again only once the window has passed); retry after the window or give the events new ids".into(),
                        ));
                    }
                    self.inner.catch_up().await?;
                    fresh = true;
                }
            }
        }
        Err(AppendError::Storage(LogError::Nats(format!(
            "the append lost the race for its streams to other writers {RETRIES} times in a row; retry it"
        ))))
    }

    /// Where the log already holds client id `id` for `stream`: `None` when it does not
    /// (or held it for an event erased since); refused when another stream's event has it.
    async fn retried(&self, id: &str, stream: &str) -> Result<Option<u64>, AppendError> {
        let Some(p) = self.inner.find_id(id)? else {
            return Ok(None);
        };
        match self.inner.stream_at(p).await? {
            None => {
                self.inner.forget_id(id)?;
                Ok(None)
            }
            Some(on) if on != stream => Err(AppendError::IdInUse {
                id: id.to_owned(),
                stream: on,
                position: p,
            }),
            Some(_) => Ok(Some(p)),
        }
    }

    async fn try_append(
        &self,
        groups: &[StreamAppend],
        index_ids: bool,
        fresh: bool,
    ) -> Result<Attempt, AppendError> {
        let inner = &self.inner;
        let mut slots: Vec<Vec<Slot>> = Vec::with_capacity(groups.len());
        let mut messages: Vec<(String, HeaderMap, bytes::Bytes)> = Vec::new();
        // Client ids new in this append, with the message that carries each.
        let mut pending: HashMap<&str, usize> = HashMap::new();
        // Each stream's tip as this append leaves it, and its last message here.
        let mut tips: HashMap<&str, Tip> = HashMap::new();
        let mut last_message: HashMap<&str, usize> = HashMap::new();
        let mut next_versions = Vec::with_capacity(groups.len());
        for g in groups {
            let stream = g.stream.as_str();
            let mut checked = false;
            let mut tip = match tips.get(stream) {
                Some(t) => *t,
                None => inner.tip(stream, fresh).await?,
            };
            let expected_seq = tip.last_seq;
            let mut group_slots = Vec::with_capacity(g.events.len());
            for e in &g.events {
                let client = e.id.as_deref().filter(|_| index_ids);
                if let Some(id) = client {
                    if let Some(&n) = pending.get(id) {
                        group_slots.push(Slot::New(n));
                        continue;
                    }
                    if let Some(p) = self.retried(id, stream).await? {
                        group_slots.push(Slot::Known(p));
                        continue;
                    }
                }
                // The group's first new event checks its expected version here; the
                // stream's first message in the append has the server check it again.
                if !checked && !g.expected.admits(tip.version) {
                    if !fresh {
                        return Ok(Attempt::Stale);
                    }
                    return Err(AppendError::Conflict {
                        stream: stream.to_owned(),
                        expected: g.expected,
                        current: tip.version,
                    });
                }
                checked = true;
                let server_checks = !last_message.contains_key(stream);
                // A tombstone's position is known only once stored; until then any
                // placeholder marks the stream deleted (the tip takes the real one below).
                tip.deleted = crate::log::deletion_after(
                    stream,
                    e.event_type.as_str(),
                    tip.deleted,
                    u64::MAX,
                )
                .map_err(|err| match err {
                    AppendError::StreamDeleted { position: u64::MAX, .. } => {
                        AppendError::Invalid(format!(
                            "the append deletes stream {stream:?} and then appends to it; send those events in an append of their own after a restore"
                        ))
                    }
                    other => other,
                })?;
                let id = match &e.id {
                    Some(id) => id.to_string(),
                    None => uuid::Uuid::now_v7().to_string(),
                };
                let body = Body {
                    id: &id,
                    stream,
                    version: tip.version,
                    source: &e.source,
                    metadata: &e.metadata,
                    client_id: e.id.is_some() && index_ids,
                    payload: &e.payload,
                }
                .encode();
                let subject = inner.subjects.event(stream, e.event_type.as_str());
                if body.len() + subject.len() + 512 > inner.max_payload {
                    return Err(AppendError::Invalid(format!(
                        "a {} event takes {} bytes as a NATS message, more than the server's max_payload of {} bytes; raise max_payload in the NATS server's configuration or send a smaller event",
                        e.event_type,
                        body.len(),
                        inner.max_payload
                    )));
                }
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.as_str());
                if server_checks {
                    headers.insert(
                        "Nats-Expected-Last-Subject-Sequence",
                        expected_seq.to_string().as_str(),
                    );
                    headers.insert(
                        "Nats-Expected-Last-Subject-Sequence-Subject",
                        inner.subjects.stream(stream).as_str(),
                    );
                }
                let n = messages.len();
                if let Some(id) = client {
                    pending.insert(id, n);
                }
                messages.push((subject, headers, body.into()));
                last_message.insert(stream, n);
                group_slots.push(Slot::New(n));
                tip.version += 1;
            }
            tips.insert(stream, tip);
            next_versions.push(tip.version);
            slots.push(group_slots);
        }
        let first_seq = if messages.is_empty() {
            None
        } else {
            match self.publish(messages).await? {
                Ok(first) => Some(first),
                Err(again) => return Ok(again),
            }
        };
        let position = |n: usize| first_seq.unwrap_or(1) - 1 + n as u64;
        let out = groups
            .iter()
            .zip(slots)
            .zip(next_versions)
            .map(|((g, group_slots), next_version)| Appended {
                stream: g.stream.clone(),
                positions: group_slots
                    .iter()
                    .map(|s| match s {
                        Slot::Known(p) => *p,
                        Slot::New(n) => position(*n),
                    })
                    .collect(),
                written: group_slots
                    .iter()
                    .map(|s| matches!(s, Slot::New(_)))
                    .collect(),
                next_version,
            })
            .collect();
        if first_seq.is_some() {
            for (stream, &n) in &last_message {
                let tip = tips[stream];
                // A deleted stream takes nothing after its tombstone: it is the last event.
                let last_seq = position(n) + 1;
                inner.remember(
                    stream,
                    Tip {
                        deleted: tip.deleted.map(|_| position(n)),
                        last_seq,
                        ..tip
                    },
                );
            }
            let last = last_message.values().max().map_or(0, |&n| position(n) + 1);
            inner
                .acked
                .fetch_max(last, std::sync::atomic::Ordering::Release);
            inner.reach(last).await;
        }
        Ok(Attempt::Done(out))
    }

    /// Publishes the messages, one alone or as one atomic batch, and answers the first
    /// one's sequence, or what to do when the server refused them.
    async fn publish(
        &self,
        mut messages: Vec<(String, HeaderMap, bytes::Bytes)>,
    ) -> Result<Result<u64, Attempt>, AppendError> {
        let client = &self.inner.client;
        let count = messages.len();
        let unknown = |e: &dyn std::fmt::Display| {
            AppendError::Storage(LogError::Nats(format!(
                "publishing to JetStream failed: {e}; the append's outcome is unknown, so retry it with the same event ids (retries within the duplicate window are not appended twice)"
            )))
        };
        if count > 1 {
            let batch = uuid::Uuid::now_v7().simple().to_string();
            for (i, (_, headers, _)) in messages.iter_mut().enumerate() {
                headers.insert("Nats-Batch-Id", batch.as_str());
                headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
                if i + 1 == count {
                    headers.insert("Nats-Batch-Commit", "1");
                }
            }
        }
        let (subject, headers, body) = messages.pop().expect("at least one message");
        for (subject, headers, body) in messages {
            client
                .publish_with_headers(subject, headers, body)
                .await
                .map_err(|e| unknown(&e))?;
        }
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request_with_headers(subject, headers, body),
        )
        .await
        .map_err(|_| unknown(&"no acknowledgement within 10 s"))?
        .map_err(|e| unknown(&e))?;
        let ack: PubAck = serde_json::from_slice(&reply.payload).map_err(|e| unknown(&e))?;
        if let Some(e) = ack.error {
            return match e.err_code {
                WRONG_LAST_SEQUENCE => Ok(Err(Attempt::Stale)),
                BATCH_DUPLICATE_ID => Ok(Err(Attempt::Duplicate)),
                _ => Err(AppendError::Storage(LogError::Nats(format!(
                    "JetStream refused the append: {} (error {}); nothing was appended",
                    e.description, e.err_code
                )))),
            };
        }
        if ack.duplicate {
            return Ok(Err(Attempt::Duplicate));
        }
        let stored = ack.count.unwrap_or(1) as usize;
        if stored != count {
            return Err(unknown(&format!(
                "the server stored {stored} of {count} messages"
            )));
        }
        Ok(Ok(ack.seq + 1 - count as u64))
    }

    /// Keeps the last failure of the servers for `/health`, until an append succeeds.
    pub(super) fn noted(
        &self,
        result: Result<Vec<Appended>, AppendError>,
    ) -> Result<Vec<Appended>, AppendError> {
        let mut last = self.inner.last_error.lock().unwrap();
        match &result {
            Ok(_) => *last = None,
            Err(AppendError::Storage(e)) => {
                self.inner
                    .write_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *last = Some(e.to_string());
            }
            Err(_) => {}
        }
        result
    }
}
