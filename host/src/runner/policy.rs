//! The failure policy ([`crate::plugin::OnFailure`]): a failing batch is halved until the
//! failing event is alone; that event is retried with exponential backoff, then parked as a
//! dead letter and the runner moves on; `quarantine_after` dead letters in a row quarantine
//! the plugin until an operator resumes it. A host failure (the store or the log) is not the
//! plugin's: it is retried with its own backoff, never dead-lettered.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::backoff::{Backoff, HOST_BACKOFF};
use super::commit::{Job, committed_to};
use super::lineage::{MAX_DERIVATION_DEPTH, deepen, depth_of, derived_id};
use super::status::RunState;
use super::task::{Flow, Task};
use crate::dead_letter::{self, DeadLetter, Quarantine, audit};
use crate::event::Event;
use crate::plugin::HandlerError;

impl Task {
    /// Handles a batch under the failure policy: a failing part is halved until the
    /// failing event is alone, which is retried with backoff and then dead-lettered.
    pub(super) async fn batch(&mut self, events: Vec<Arc<Event>>, resume: u64) -> Flow {
        let policy = self.options.on_failure.clone();
        let mut parts = VecDeque::from([events]);
        while let Some(part) = parts.pop_front() {
            let Some(last) = part.last() else { continue };
            let part_resume = if parts.is_empty() {
                resume
            } else {
                last.position + 1
            };
            let mut part = Arc::new(part);
            let mut attempts = 0u32;
            let mut backoff = Backoff::new((
                Duration::from_millis(policy.backoff_ms),
                Duration::from_millis(policy.max_backoff_ms),
            ));
            let mut host_backoff = Backoff::new(HOST_BACKOFF);
            let job = loop {
                let called = Instant::now();
                let limits = self.options.limits;
                let message = match self.attempt(&part, part_resume).await {
                    Ok(job) => break Some(job),
                    Err(HandlerError::Host(message)) => {
                        let message = limits.bound(message);
                        let wait = host_backoff.next();
                        tracing::warn!(plugin = self.plugin.id(), error = %message, retry_in = ?wait, "batch failed");
                        self.status.update(|s| s.last_error = Some(message));
                        if !self.sleep(wait).await {
                            return Flow::Stopped;
                        }
                        continue;
                    }
                    // A plugin's error text can be anything it chose: what is kept, shown and
                    // announced is cut to a bounded size.
                    Err(HandlerError::Plugin(message)) => limits.bound(message),
                };
                self.status.update(|s| {
                    s.errors += 1;
                    s.consecutive_errors += 1;
                    s.last_error = Some(message.clone());
                    s.state = RunState::Failing;
                });
                // A failing plugin waits at least as long as its failed call ran before it
                // runs again, so one that spins to its time limit on every call uses at most
                // half a core while the others keep theirs.
                let burnt = called.elapsed();
                if part.len() > 1 {
                    if !self.sleep(burnt).await {
                        return Flow::Stopped;
                    }
                    tracing::debug!(plugin = self.plugin.id(), events = part.len(), error = %message, "batch failed; splitting it to find the failing event");
                    let mut first = Arc::unwrap_or_clone(std::mem::take(&mut part));
                    let second = first.split_off(first.len() / 2);
                    parts.push_front(second);
                    parts.push_front(first);
                    break None;
                }
                attempts += 1;
                if attempts > policy.retries {
                    match self
                        .dead_letter(&part[0], message, attempts, part_resume)
                        .await
                    {
                        Flow::Continue => break None,
                        other => return other,
                    }
                }
                let wait = backoff.next();
                tracing::warn!(plugin = self.plugin.id(), position = part[0].position, attempt = attempts, error = %message, retry_in = ?wait, "event failed; retrying");
                if !self.sleep(wait.max(burnt)).await {
                    return Flow::Stopped;
                }
            };
            let Some(job) = job else { continue };
            // The job holds the events now: the committer frees them after its commit,
            // off this task's way to the next batch.
            drop(part);
            self.status.update(|s| s.dead_letters_in_a_row = 0);
            self.processed = job.processed;
            // The next part may run while this one is appended and committed only when it
            // cannot depend on them: no state writes to read back, and no fixed ids that the
            // next part looks up, unless the handler answers for those itself; then it runs
            // at most one part ahead of the committed ones, whatever each part derived.
            let ahead = self.plugin.derives_ahead_of_commits();
            let wait = !job.writes.is_empty() || (job.fixed_ids && !ahead);
            if !self.hand(job).await {
                return Flow::Stopped;
            }
            if wait && !self.settled().await {
                return Flow::Stopped;
            }
            if ahead
                && !committed_to(&mut self.committed, self.handed_before, &mut self.stopped).await
            {
                return Flow::Stopped;
            }
        }
        Flow::Continue
    }

    /// Parks `event` in the dead-letter store, announces it, and moves the checkpoint past
    /// it; quarantines the plugin when this makes too many in a row.
    async fn dead_letter(
        &mut self,
        event: &Arc<Event>,
        error: String,
        attempts: u32,
        resume: u64,
    ) -> Flow {
        let policy = &self.options.on_failure;
        let in_a_row = self.status.read(|s| s.dead_letters_in_a_row) + 1;
        tracing::error!(plugin = self.plugin.id(), position = event.position, attempts, error = %error, "event dead-lettered");
        let error = self.options.limits.bound(error);
        let entry = DeadLetter::new(&self.name, event, error.clone(), attempts);
        let fixed = |what: &str| {
            Some(derived_id(
                &format!("{}/{what}/{}", self.name, self.hash),
                &event.id,
                0,
            ))
        };
        let mut appends = vec![audit(
            dead_letter::DEAD_LETTERED,
            &self.name,
            json!({
                "dead_letter_id": entry.id,
                "position": event.position,
                "event_id": event.id,
                "event_type": event.event_type.as_str(),
                "error": error,
                "attempts": attempts,
            }),
            Some(event),
            fixed("dead-letter"),
        )];
        let quarantine = (policy.quarantine_after > 0 && in_a_row >= policy.quarantine_after)
            .then(|| Quarantine {
                reason: self.options.limits.bound(format!(
                    "{in_a_row} events in a row were dead-lettered (on_failure.quarantine_after = {}); the last: {error}",
                    policy.quarantine_after
                )),
                dead_letters_in_a_row: in_a_row,
                position: resume,
                since: chrono::Utc::now(),
            });
        if let Some(q) = &quarantine {
            tracing::error!(plugin = self.plugin.id(), reason = %q.reason, "plugin quarantined: it consumes nothing until resumed");
            appends.push(audit(
                dead_letter::QUARANTINED,
                &self.name,
                json!({"reason": q.reason, "dead_letters_in_a_row": in_a_row, "position": resume}),
                Some(event),
                fixed("quarantine"),
            ));
        }
        // Announcements are derived from the failing event: a plugin that fails on them
        // cannot feed itself (or another) announcements past the derivation depth limit.
        if depth_of(event) >= MAX_DERIVATION_DEPTH {
            appends.clear();
        }
        for a in &mut appends {
            deepen(a, event);
        }
        let job = Job {
            appends,
            fixed_ids: true,
            dead_letters: vec![entry],
            quarantine: quarantine.clone(),
            ..Job::empty(resume, self.processed)
        };
        if !self.hand(job).await || !self.settled().await {
            return Flow::Stopped;
        }
        self.status.update(|s| {
            s.dead_lettered += 1;
            s.dead_letters_in_a_row = in_a_row;
            s.consecutive_errors = 0;
            if quarantine.is_some() {
                s.state = RunState::Quarantined;
            }
            s.quarantine = quarantine.clone();
        });
        if quarantine.is_some() {
            Flow::Quarantined
        } else {
            Flow::Continue
        }
    }
}
