//! Reads of stored messages through JetStream's direct get API (`$JS.API.DIRECT.GET`):
//! one message by sequence, the next or last one on a subject filter, the first at a time,
//! and batches of the next matching messages, all answered by any replica of the stream.

use std::time::Duration;

use async_nats::{Client, Message, StatusCode};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::json;

use crate::log::LogError;

/// How long a read waits for the server before it fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A stored message as direct get returns it.
pub(super) struct Stored {
    pub seq: u64,
    pub subject: String,
    pub stored_at: DateTime<Utc>,
    pub body: bytes::Bytes,
}

/// One page of a batch read: the messages, and whether the server has more matching ones
/// after them.
pub(super) struct Batch {
    pub messages: Vec<Stored>,
    pub more: bool,
}

fn failed(what: &str, e: impl std::fmt::Display) -> LogError {
    LogError::Nats(format!("JetStream {what} failed: {e}"))
}

/// The direct get API of one JetStream stream.
#[derive(Clone)]
pub(super) struct Direct {
    client: Client,
    subject: String,
}

impl Direct {
    pub(super) fn new(client: Client, stream: &str) -> Self {
        Self {
            client,
            subject: format!("$JS.API.DIRECT.GET.{stream}"),
        }
    }

    async fn one(&self, request: serde_json::Value) -> Result<Option<Stored>, LogError> {
        let reply = tokio::time::timeout(
            READ_TIMEOUT,
            self.client
                .request(self.subject.clone(), request.to_string().into()),
        )
        .await
        .map_err(|_| failed("read", "no answer within 10 s"))?
        .map_err(|e| failed("read", e))?;
        stored(reply)
    }

    /// The message at `seq`, if it is stored.
    pub(super) async fn at(&self, seq: u64) -> Result<Option<Stored>, LogError> {
        self.one(json!({ "seq": seq })).await
    }

    /// The first message at or after `seq` whose subject matches `filter`.
    pub(super) async fn next(&self, seq: u64, filter: &str) -> Result<Option<Stored>, LogError> {
        self.one(json!({ "seq": seq, "next_by_subj": filter }))
            .await
    }

    /// The last message whose subject matches `filter` (wildcards allowed).
    pub(super) async fn last(&self, filter: &str) -> Result<Option<Stored>, LogError> {
        self.one(json!({ "last_by_subj": filter })).await
    }

    /// The first message stored at or after `at`.
    pub(super) async fn first_since(&self, at: DateTime<Utc>) -> Result<Option<Stored>, LogError> {
        let at = at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        self.one(json!({ "start_time": at })).await
    }

    /// Up to `limit` messages matching `filter`, from `seq` on.
    pub(super) async fn batch(
        &self,
        seq: u64,
        limit: usize,
        filter: &str,
    ) -> Result<Batch, LogError> {
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| failed("read", e))?;
        let request = json!({ "seq": seq, "batch": limit.max(1), "next_by_subj": filter });
        self.client
            .publish_with_reply(self.subject.clone(), inbox, request.to_string().into())
            .await
            .map_err(|e| failed("read", e))?;
        let mut messages = Vec::new();
        loop {
            let msg = tokio::time::timeout(READ_TIMEOUT, sub.next())
                .await
                .map_err(|_| failed("read", "a batch stopped arriving for 10 s"))?
                .ok_or_else(|| failed("read", "the connection closed"))?;
            match msg.status {
                None | Some(StatusCode::OK) => {
                    if let Some(m) = stored(msg)? {
                        messages.push(m);
                    }
                }
                Some(StatusCode::NOT_FOUND) => {
                    return Ok(Batch {
                        messages,
                        more: false,
                    });
                }
                Some(s) if s.as_u16() == 204 => {
                    // The end of the batch says how many matching messages remain.
                    let pending = header(&msg, "Nats-Num-Pending")
                        .and_then(|p| p.parse::<u64>().ok())
                        .unwrap_or(0);
                    return Ok(Batch {
                        messages,
                        more: pending > 0,
                    });
                }
                Some(other) => {
                    return Err(failed(
                        "read",
                        format!("status {other}: {}", msg.description.unwrap_or_default()),
                    ));
                }
            }
        }
    }
}

fn header<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// The stored message a direct get answered, or `None` for "not found".
fn stored(msg: Message) -> Result<Option<Stored>, LogError> {
    match msg.status {
        None | Some(StatusCode::OK) => {}
        Some(StatusCode::NOT_FOUND) => return Ok(None),
        Some(other) => {
            return Err(failed(
                "read",
                format!("status {other}: {}", msg.description.unwrap_or_default()),
            ));
        }
    }
    let missing =
        |h: &str| LogError::Corrupt(format!("a JetStream direct get lacks its {h} header"));
    let seq = header(&msg, "Nats-Sequence")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| missing("Nats-Sequence"))?;
    let subject = header(&msg, "Nats-Subject")
        .ok_or_else(|| missing("Nats-Subject"))?
        .to_owned();
    let stored_at = header(&msg, "Nats-Time-Stamp")
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .ok_or_else(|| missing("Nats-Time-Stamp"))?
        .with_timezone(&Utc);
    Ok(Some(Stored {
        seq,
        subject,
        stored_at,
        body: msg.payload,
    }))
}
