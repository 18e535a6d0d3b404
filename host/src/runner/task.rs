//! The runner's task loop: subscribe from the checkpoint, take a batch, call the handler,
//! hand what it produced to the committer, and answer operator requests between batches.
//! An idle subscription moves the checkpoint to the cursor, so a restart rescans little.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::backoff::HOST_BACKOFF;
use super::commit::{Job, committed_to};
use super::request::Control;
use super::status::{RunState, RunnerOptions, StatusCell};
use crate::bus::{Bus, Start, Subscription};
use crate::event::Event;
use crate::limits::{event_bytes, stamp_room};
use crate::log::{EventLog, ReadFilter};
use crate::pattern::PatternSet;
use crate::plugin::{Handler, HandlerError, Output, PluginStore, StateView};

/// How long without a matching event before a runner counts as live at its cursor.
const IDLE: Duration = Duration::from_millis(250);

/// What to do after a batch.
pub(super) enum Flow {
    Continue,
    Stopped,
    Quarantined,
}

/// The runner's task: everything it carries between batches.
pub(super) struct Task {
    /// The plugin's name: derived events, dead letters and announcements are its.
    pub(super) name: String,
    /// The component's hash: part of audit event ids, so a new component's dead letters
    /// are announced again.
    pub(super) hash: String,
    pub(super) plugin: Arc<dyn Handler>,
    pub(super) store: PluginStore,
    pub(super) bus: Bus,
    pub(super) log: Arc<dyn EventLog>,
    pub(super) patterns: PatternSet,
    pub(super) options: RunnerOptions,
    pub(super) status: StatusCell,
    pub(super) stopped: watch::Receiver<bool>,
    pub(super) view: Arc<dyn StateView>,
    /// Events handled since the state was started, as of the last job handed on.
    pub(super) processed: u64,
    pub(super) jobs: mpsc::Sender<Job>,
    pub(super) committed: watch::Receiver<u64>,
    /// Resume position of the last job handed to the committer.
    pub(super) handed: u64,
    /// Resume position of the job handed before that one.
    pub(super) handed_before: u64,
}

impl Task {
    /// Sleeps for `d`; false when stopped meanwhile.
    pub(super) async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stopped.wait_for(|s| *s) => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Waits until everything handed to the committer is committed; false when stopped.
    pub(super) async fn settled(&mut self) -> bool {
        committed_to(&mut self.committed, self.handed, &mut self.stopped).await
    }

    /// Hands `job` to the committer; false when the runner is stopping.
    pub(super) async fn hand(&mut self, job: Job) -> bool {
        self.handed_before = self.handed;
        self.handed = job.resume;
        self.jobs.send(job).await.is_ok()
    }

    /// Runs until stopped, then waits for the committer to finish what it was handed.
    pub(super) async fn run(
        mut self,
        mut control: mpsc::Receiver<Control>,
        committer: tokio::task::JoinHandle<()>,
    ) -> mpsc::Receiver<Control> {
        let mut stopped = self.stopped.clone();
        let mut sub: Option<Subscription> = None;
        loop {
            if self.status.quarantined() {
                sub = None;
                self.status.update(|s| s.state = RunState::Quarantined);
                let request = tokio::select! {
                    _ = stopped.wait_for(|s| *s) => None,
                    r = control.recv() => r,
                };
                match request {
                    Some(r) => self.control(r).await,
                    None => break,
                }
                continue;
            }
            let s = sub.get_or_insert_with(|| {
                self.bus.subscribe(
                    self.patterns.clone(),
                    ReadFilter::default(),
                    Start::Position(self.handed),
                )
            });
            let next = tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                Some(r) = control.recv() => Err(r),
                next = tokio::time::timeout(IDLE, s.next_batch(self.options.batch_size.max(1))) => Ok(next),
            };
            let next = match next {
                Ok(next) => next,
                Err(request) => {
                    self.control(request).await;
                    continue;
                }
            };
            let Ok(next) = next else {
                // Nothing matching arrived for a while: everything up to the subscription's
                // cursor was examined, so the checkpoint can move there (and restarts
                // rescan less).
                let Some(cursor) = s.settle() else { continue };
                if !self.settled().await {
                    break;
                }
                self.settle_at(cursor);
                continue;
            };
            let (events, resume) = match next {
                None => break,
                Some(Ok(batch)) => batch,
                Some(Err(e)) => {
                    tracing::error!(plugin = self.plugin.id(), error = %e, "reading the log failed");
                    let message = self.options.limits.bound(e.to_string());
                    self.status.update(|s| s.last_error = Some(message));
                    if !self.sleep(HOST_BACKOFF.1).await {
                        break;
                    }
                    continue;
                }
            };
            if self.options.lease.as_ref().is_some_and(|l| !l.holds()) {
                // Fenced: another host may have the plugin now.
                break;
            }
            let span = batch_span(self.plugin.id(), &events);
            match tracing::Instrument::instrument(self.batch(events, resume), span).await {
                Flow::Continue => {}
                Flow::Stopped => break,
                Flow::Quarantined => sub = None,
            }
        }
        drop(self.jobs);
        let _ = committer.await;
        self.status.update(|s| s.state = RunState::Stopped);
        control
    }

    /// Moves an idle checkpoint to `cursor`.
    fn settle_at(&self, cursor: u64) {
        let (position, processed) = self.status.read(|s| (s.position, s.events_processed));
        if cursor > position
            && let Err(e) = self.store.commit(&Default::default(), cursor, processed)
        {
            tracing::warn!(plugin = self.plugin.id(), error = %e, "could not advance the idle checkpoint");
            return;
        }
        self.status.update(|s| {
            s.position = s.position.max(cursor);
            if s.state == RunState::CatchingUp {
                s.state = RunState::Live;
            }
        });
    }

    /// One call over `part`, checked: derived events must fit the log and satisfy the
    /// schemas.
    pub(super) async fn attempt(
        &mut self,
        part: &Arc<Vec<Arc<Event>>>,
        resume: u64,
    ) -> Result<Job, HandlerError> {
        let started = Instant::now();
        let output = self.plugin.handle(self.view.clone(), part.clone()).await?;
        self.check(part, &output).map_err(HandlerError::Plugin)?;
        let fixed_ids = output
            .derived
            .iter()
            .flatten()
            .any(|d| d.event.id.is_some());
        Ok(Job {
            output: output.derived,
            fixed_ids,
            writes: output.writes,
            events: part.len(),
            started,
            part: part.clone(),
            ..Job::empty(resume, self.processed + part.len() as u64)
        })
    }

    /// What the log would refuse of the derived events, or a derived event that violates a
    /// registered schema, as a failure message. The log's refusal is deterministic, so the
    /// batch fails as the plugin's failure (split, retried, dead-lettered) rather than
    /// wedging the committer.
    pub(super) fn check(&self, part: &[Arc<Event>], output: &Output) -> Result<(), String> {
        self.check_output(part, output)?;
        self.check_schemas(part, output)
    }

    fn check_output(&self, part: &[Arc<Event>], output: &Output) -> Result<(), String> {
        let limits = &self.options.limits;
        for (from, list) in part.iter().zip(&output.derived) {
            if list.len() > limits.max_batch_events {
                return Err(format!(
                    "plugin {} derived {} events from the {} event at position {}; the most is {} \
                     (the log's --max-batch-events)",
                    self.plugin.id(),
                    list.len(),
                    from.event_type,
                    from.position,
                    limits.max_batch_events
                ));
            }
            for d in list {
                let bytes = event_bytes(&d.stream, &d.event) + stamp_room(from);
                if bytes > limits.max_event_bytes {
                    return Err(format!(
                        "plugin {} derived a {} event of {bytes} bytes from the {} event at position {}, \
                         more than the limit of {} bytes (the log's --max-event-bytes)",
                        self.plugin.id(),
                        d.event.event_type,
                        from.event_type,
                        from.position,
                        limits.max_event_bytes
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_schemas(&self, part: &[Arc<Event>], output: &Output) -> Result<(), String> {
        let Some(schemas) = &self.options.schemas else {
            return Ok(());
        };
        for (from, list) in part.iter().zip(&output.derived) {
            // Events with ids the handler fixed are a tool worker's outcomes: the tool has
            // already run (at most once), so failing the batch would lose its result.
            for d in list.iter().filter(|d| d.event.id.is_none()) {
                schemas
                    .check(d.event.event_type.as_str(), d.event.payload.as_str())
                    .map_err(|v| {
                        format!(
                            "plugin {} derived an invalid event from the {} event at position {}: {v}",
                            self.plugin.id(),
                            from.event_type,
                            from.position
                        )
                    })?;
            }
        }
        Ok(())
    }
}

/// The span a batch runs in: the plugin, its first and last positions, and the
/// correlation id of its first event that has one.
fn batch_span(plugin: &str, events: &[Arc<Event>]) -> tracing::Span {
    let (from, to) = (
        events.first().map(|e| e.position),
        events.last().map(|e| e.position),
    );
    let correlation = events
        .iter()
        .find_map(|e| e.metadata.correlation_id.as_deref());
    tracing::info_span!("batch", plugin, from, to, correlation_id = correlation)
}
