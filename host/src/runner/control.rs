//! The operator's channel to a running runner: the `Controller` that sends requests, and
//! how the runner's own task answers them between batches (resume a quarantine, retry or
//! delete a dead letter), so they never race its work (a retry in progress cannot bring
//! back a deleted dead letter).

use std::sync::Arc;

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::lineage::derived_appends;
use super::request::{Control, ControlError, RetryOutcome};
use super::status::RunState;
use super::task::Task;
use crate::dead_letter::{self, audit};
use crate::limits::split_appends;
use crate::log::ReadFilter;
use crate::plugin::HandlerError;

/// Sends operator requests to a runner; cheap to clone.
#[derive(Clone)]
pub struct Controller {
    pub(super) control: mpsc::Sender<Control>,
}

impl Controller {
    /// Sends the request `make` builds and waits for its answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ControlError>>) -> Control,
    ) -> Result<T, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(make(tx))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Clears a quarantine: the runner consumes again from its checkpoint. False when it
    /// was not quarantined.
    pub async fn resume(&self) -> Result<bool, ControlError> {
        self.ask(Control::Resume).await
    }

    /// Runs the dead letter at `position` through the plugin again, now; on success its
    /// effects are committed (on top of the current state) and it leaves the store.
    pub async fn retry(&self, position: u64) -> Result<RetryOutcome, ControlError> {
        self.ask(|tx| Control::Retry(position, tx)).await
    }

    /// Drops the dead letter at `position` (false when there is none), in order with the
    /// runner's own work, so a retry in progress cannot bring it back.
    pub async fn delete(&self, position: u64) -> Result<bool, ControlError> {
        self.ask(|tx| Control::Delete(position, tx)).await
    }
}

impl Task {
    /// Answers one operator request.
    pub(super) async fn control(&mut self, request: Control) {
        match request {
            Control::Resume(reply) => {
                let r = self.resume().await;
                let _ = reply.send(r);
            }
            Control::Retry(position, reply) => {
                let r = self.retry(position).await;
                let _ = reply.send(r);
            }
            Control::Delete(position, reply) => {
                let streak = self.in_streak(position);
                let r = self.store.remove_dead_letter(position).map_err(|e| {
                    ControlError::Unavailable(format!("removing the dead letter failed: {e}"))
                });
                if streak && let Ok(true) = r {
                    self.forgive_one();
                }
                let _ = reply.send(r);
            }
        }
    }

    /// True when the dead letter at `position` is one of the latest dead letters in a row
    /// (those that count toward a quarantine: a handled event ends a streak, so the
    /// streak's are the newest).
    fn in_streak(&self, position: u64) -> bool {
        let in_a_row = self.status.read(|s| s.dead_letters_in_a_row) as usize;
        if in_a_row == 0 {
            return false;
        }
        match self.store.dead_letters() {
            Ok(letters) => letters
                .iter()
                .rev()
                .take(in_a_row)
                .any(|d| d.position == position),
            Err(_) => false,
        }
    }

    /// A dead letter of the current streak that the operator deleted (or that a retry
    /// handled) no longer counts toward a quarantine.
    fn forgive_one(&self) {
        self.status.update(|s| {
            if s.quarantine.is_none() {
                s.dead_letters_in_a_row = s.dead_letters_in_a_row.saturating_sub(1);
            }
        });
    }

    async fn resume(&mut self) -> Result<bool, ControlError> {
        let Some(q) = self.status.read(|s| s.quarantine.clone()) else {
            return Ok(false);
        };
        self.store.clear_quarantine().map_err(|e| {
            ControlError::Unavailable(format!("clearing the quarantine failed: {e}"))
        })?;
        let announce = audit(
            dead_letter::RESUMED,
            &self.name,
            json!({"position": q.position, "was": self.options.limits.bound(q.reason.clone())}),
            None,
            None,
        );
        if let Err(e) = self.log.append(vec![announce]).await {
            tracing::warn!(plugin = self.plugin.id(), error = %e, "announcing the resume failed");
        }
        tracing::info!(
            plugin = self.plugin.id(),
            "quarantine cleared; consuming again"
        );
        self.status.update(|s| {
            s.quarantine = None;
            s.dead_letters_in_a_row = 0;
            s.consecutive_errors = 0;
            s.state = RunState::CatchingUp;
        });
        Ok(true)
    }

    async fn retry(&mut self, position: u64) -> Result<RetryOutcome, ControlError> {
        let unavailable = |e: String| ControlError::Unavailable(e);
        if !self.settled().await {
            return Err(ControlError::Stopped);
        }
        let not_found = || ControlError::NotFound {
            plugin: self.name.clone(),
            position,
        };
        let streak = self.in_streak(position);
        let mut entry = self
            .store
            .dead_letter(position)
            .map_err(|e| unavailable(e.to_string()))?
            .ok_or_else(not_found)?;
        let page = self
            .log
            .read(position, 1, &ReadFilter::default())
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let event = page
            .events
            .into_iter()
            .find(|e| e.position == position)
            .ok_or_else(|| {
                unavailable(format!("the event at position {position} cannot be read"))
            })?;
        let events = Arc::new(vec![Arc::new(event)]);
        let limits = self.options.limits;
        let result = match self.plugin.handle(self.view.clone(), events.clone()).await {
            Ok(output) => self.check(&events, &output).map(|()| output),
            Err(HandlerError::Plugin(e)) => Err(e),
            Err(HandlerError::Host(e)) => return Err(unavailable(limits.bound(e))),
        }
        .map_err(|e| limits.bound(e));
        let outcome = match result {
            Ok(output) => {
                let (appends, _, _) = derived_appends(&self.name, &events, output.derived);
                // Indexed: a retry that is interrupted after its append and run again
                // appends nothing twice.
                for chunk in split_appends(appends, limits.max_batch_events) {
                    self.log.append(chunk).await.map_err(|e| {
                        unavailable(limits.bound(format!("appending derived events failed: {e}")))
                    })?;
                }
                self.store
                    .commit_retried(&output.writes, position)
                    .map_err(|e| unavailable(e.to_string()))?;
                if streak {
                    self.forgive_one();
                }
                RetryOutcome {
                    handled: true,
                    error: None,
                    dead_letter: None,
                }
            }
            Err(error) => {
                entry.attempts += 1;
                entry.error = error.clone();
                entry.last_failed_at = chrono::Utc::now();
                self.store
                    .put_dead_letter(&entry)
                    .map_err(|e| unavailable(e.to_string()))?;
                RetryOutcome {
                    handled: false,
                    error: Some(error),
                    dead_letter: Some(entry),
                }
            }
        };
        let announce = audit(
            dead_letter::DEAD_LETTER_RETRIED,
            &self.name,
            json!({
                "dead_letter_id": dead_letter::DeadLetterId::new(&self.name, position),
                "position": position,
                "handled": outcome.handled,
                "error": outcome.error,
            }),
            Some(&events[0]),
            None,
        );
        if let Err(e) = self.log.append(vec![announce]).await {
            tracing::warn!(plugin = self.plugin.id(), error = %e, "announcing the retry failed");
        }
        Ok(outcome)
    }
}
