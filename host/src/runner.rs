//! A runner drives one projection or extractor: it reads batches from the plugin's
//! checkpoint (from the log while catching up, from the bus once live), calls the component,
//! appends what it derived, and commits the state writes with the new checkpoint in one
//! storage batch.
//!
//! A crash anywhere re-runs the batch from the last committed checkpoint, and since state
//! and checkpoint commit together, the state always equals a replay of the log up to the
//! checkpoint. Derived events are appended before that commit under ids fixed by (plugin,
//! source event, index), so a batch that runs again appends nothing twice: once after a
//! start the runner reads its own output between its checkpoint and the head and leaves
//! out what is already there ([`Recovery`]).
//!
//! A failing batch follows the plugin's [`OnFailure`] policy: it is split until the failing
//! event is found; that event is retried with exponential backoff, then parked in the
//! plugin's dead-letter store, and the runner moves on. Too many dead letters in a row
//! quarantine the plugin until an operator resumes it. Each transition is announced as an
//! `evhost.plugin.>` event ([`crate::dead_letter`]). Failures of the host's own storage are
//! not the plugin's fault: they are retried with backoff, never dead-lettered.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::bus::{Bus, Start, Subscription};
use crate::dead_letter::{self, DeadLetter, Quarantine, audit};
use crate::event::Event;
use crate::limits::{OutputLimits, event_bytes, split_appends, stamp_room};
use crate::log::{AppendError, EventLog, ExpectedVersion, ReadFilter, StreamAppend};
use crate::pattern::PatternSet;
use crate::plugin::{Derived, Handler, OnFailure, Output, PluginStore, StateView};
use crate::schemas::Schemas;

/// A batch handler as the runner calls it: asynchronously, so a handler can append and wait
/// (tool workers) or run its component on a blocking thread ([`Blocking`]).
#[async_trait::async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    /// `name@version`, for logs and errors.
    fn id(&self) -> &str;
    /// Handles `events` over `view`; returns what to commit, or why it failed.
    async fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, BatchError>;
}

/// Why a batch handler failed, which decides what the runner does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The plugin failed on these events: the failure policy applies (split, retry,
    /// dead-letter, quarantine).
    #[error("{0}")]
    Plugin(String),
    /// The host failed (the log or the store): retried with backoff, never dead-lettered.
    #[error("{0}")]
    Host(String),
}

/// Runs a synchronous [`Handler`] (a wasm component) on tokio's blocking threads.
pub struct Blocking(pub Arc<dyn Handler>);

#[async_trait::async_trait]
impl BatchHandler for Blocking {
    fn id(&self) -> &str {
        self.0.id()
    }
    async fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, BatchError> {
        let h = self.0.clone();
        match tokio::task::spawn_blocking(move || h.handle(view, &events)).await {
            Ok(r) => r.map_err(|e| match e {
                e @ crate::plugin::PluginError::Host { .. } => BatchError::Host(e.to_string()),
                e => BatchError::Plugin(e.to_string()),
            }),
            Err(e) => Err(BatchError::Plugin(format!("the call was lost: {e}"))),
        }
    }
}

/// Metadata key counting how many derivations separate an event from one a client appended.
pub const DEPTH_KEY: &str = "derivation_depth";

/// Deepest chain of derived events: an event that would be derived deeper is dropped (and
/// counted), so extractors feeding each other in a cycle cannot spin forever.
pub const MAX_DERIVATION_DEPTH: u32 = 16;

/// How long without a matching event before a runner counts as live at its cursor.
const IDLE: Duration = Duration::from_millis(250);

/// First and longest wait before retrying after the host's own storage failed.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));

/// Where a runner is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Reading history towards the head.
    CatchingUp,
    /// At the head, handling events as they are committed.
    Live,
    /// The last call failed; finding the failing event or retrying it with backoff.
    Failing,
    /// Stopped after too many dead letters in a row; resumes only when told to.
    Quarantined,
    /// Stopped (unloaded or shutting down).
    Stopped,
}

/// What a runner reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct RunnerStatus {
    /// Life stage.
    pub state: RunState,
    /// The checkpoint: every event before it has been handled.
    pub position: u64,
    /// Events handled since the state was started.
    pub events_processed: u64,
    /// Batches committed by this runner since it started.
    pub batches: u64,
    /// Failed calls since this runner started.
    pub errors: u64,
    /// Failed calls in a row (0 once a batch succeeds).
    pub consecutive_errors: u64,
    /// The last failure, naming the plugin and what happened.
    pub last_error: Option<String>,
    /// Events derived and appended since this runner started (extractors).
    pub derived: u64,
    /// Derived events dropped for exceeding the derivation depth limit.
    pub dropped_by_depth: u64,
    /// Events dead-lettered since this runner started.
    pub dead_lettered: u64,
    /// Dead letters since the last event handled (quarantine comes at the policy's limit).
    pub dead_letters_in_a_row: u32,
    /// Why the plugin is quarantined, while it is.
    pub quarantine: Option<Quarantine>,
}

/// How a runner reads and what it does on failure.
#[derive(Clone, Default)]
pub struct RunnerOptions {
    /// Most events per call.
    pub batch_size: usize,
    /// The failure policy.
    pub on_failure: OnFailure,
    /// Schemas derived events must satisfy.
    pub schemas: Option<Schemas>,
    /// The log's limits: derived events must fit them, appends are split to them, and
    /// the texts the runner builds are cut to a size under them.
    pub limits: OutputLimits,
}

impl RunnerOptions {
    /// Options of a runner built into the host (the flow index, unknown tools): no schemas,
    /// and never quarantined, since no operator resumes it.
    pub fn built_in(batch_size: usize) -> Self {
        Self {
            batch_size,
            on_failure: OnFailure {
                quarantine_after: 0,
                ..OnFailure::default()
            },
            schemas: None,
            limits: OutputLimits::default(),
        }
    }
}

/// What retrying a dead letter did.
#[derive(Debug, Clone, Serialize)]
pub struct RetryOutcome {
    /// True when the plugin handled the event: its effects are committed and the dead
    /// letter is gone.
    pub handled: bool,
    /// Why it failed again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The dead letter as it now stands, when it failed again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
}

/// Why a retry could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// The plugin has no dead letter at that position.
    #[error(
        "plugin {plugin:?} has no dead letter at position {position}; see GET /v1/dlq?plugin={plugin}"
    )]
    NotFound {
        /// The plugin.
        plugin: String,
        /// The position asked for.
        position: u64,
    },
    /// The runner is stopped, or storage failed.
    #[error("{0}")]
    Unavailable(String),
}

/// What an operator asks of a running runner.
enum Control {
    Resume(oneshot::Sender<Result<bool, String>>),
    Retry(u64, oneshot::Sender<Result<RetryOutcome, RetryError>>),
    Delete(u64, oneshot::Sender<Result<bool, String>>),
}

/// A running projection; stops when dropped or when [`Runner::stop`] is called.
pub struct Runner {
    status: Arc<Mutex<RunnerStatus>>,
    stop: watch::Sender<bool>,
    control: mpsc::Sender<Control>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Runner {
    /// Starts a runner for `plugin` over `patterns`, resuming from `store`'s checkpoint;
    /// derived events are appended to `log` in the name of `name`.
    pub fn spawn(
        name: &str,
        plugin: Arc<dyn BatchHandler>,
        store: PluginStore,
        bus: Bus,
        log: Arc<dyn EventLog>,
        patterns: PatternSet,
        options: RunnerOptions,
    ) -> anyhow::Result<Self> {
        let position = store.checkpoint()?.unwrap_or(0);
        let quarantine: Option<Quarantine> = store
            .quarantine()?
            .map(|q| serde_json::from_str(&q))
            .transpose()?;
        let status = Arc::new(Mutex::new(RunnerStatus {
            state: if quarantine.is_some() {
                RunState::Quarantined
            } else {
                RunState::CatchingUp
            },
            position,
            events_processed: store.processed()?,
            batches: 0,
            errors: 0,
            consecutive_errors: 0,
            last_error: None,
            derived: 0,
            dropped_by_depth: 0,
            dead_lettered: 0,
            dead_letters_in_a_row: quarantine.as_ref().map_or(0, |q| q.dead_letters_in_a_row),
            quarantine,
        }));
        let (stop, stopped) = watch::channel(false);
        let (control, requests) = mpsc::channel(16);
        // Appends and commits run in order on their own task, at most two batches behind.
        let (jobs, queue) = mpsc::channel::<Job>(2);
        let (committed_tx, committed) = watch::channel(position);
        let committer = tokio::spawn(commit_jobs(
            queue,
            Committer {
                plugin: plugin.id().to_owned(),
                name: name.to_owned(),
                hash: store.component_hash()?.unwrap_or_default(),
                limits: options.limits,
            },
            log.clone(),
            store.clone(),
            bus.clone(),
            status.clone(),
            committed_tx,
            stopped.clone(),
        ));
        let task = Task {
            name: name.to_owned(),
            hash: store.component_hash()?.unwrap_or_default(),
            view: Arc::new(store.clone()),
            // A plugin that never derived anything has nothing to recover.
            recovery: Recovery::new(position, store.has_derived().unwrap_or(true)),
            processed: store.processed()?,
            plugin,
            store,
            bus,
            log,
            patterns,
            options,
            status: status.clone(),
            stopped,
            jobs,
            committed,
            handed: position,
        };
        let task = tokio::spawn(task.run(requests, committer));
        Ok(Self {
            status,
            stop,
            control,
            task: Some(task),
        })
    }

    /// A snapshot of the runner's status.
    pub fn status(&self) -> RunnerStatus {
        self.status.lock().expect("runner status lock").clone()
    }

    /// What operators use to reach the runner, without holding on to it.
    pub fn controller(&self) -> Controller {
        Controller {
            control: self.control.clone(),
        }
    }

    /// Stops the runner after the call in progress, if any, and waits for it.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Sends operator requests to a runner; cheap to clone.
#[derive(Clone)]
pub struct Controller {
    control: mpsc::Sender<Control>,
}

impl Controller {
    /// Sends the request `make` builds and waits for its answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Control) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(make(tx))
            .await
            .map_err(|_| stopped_error())?;
        rx.await.map_err(|_| stopped_error())
    }

    /// Clears a quarantine: the runner consumes again from its checkpoint. False when it
    /// was not quarantined.
    pub async fn resume(&self) -> Result<bool, String> {
        self.ask(Control::Resume).await?
    }

    /// Runs the dead letter at `position` through the plugin again, now; on success its
    /// effects are committed (on top of the current state) and it leaves the store.
    pub async fn retry(&self, position: u64) -> Result<RetryOutcome, RetryError> {
        self.ask(|tx| Control::Retry(position, tx))
            .await
            .map_err(RetryError::Unavailable)?
    }

    /// Drops the dead letter at `position` (false when there is none), in order with the
    /// runner's own work, so a retry in progress cannot bring it back.
    pub async fn delete(&self, position: u64) -> Result<bool, String> {
        self.ask(|tx| Control::Delete(position, tx)).await?
    }
}

fn stopped_error() -> String {
    "the plugin's runner is stopped (being replaced or unloaded); try again".into()
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// What to do after a batch.
enum Flow {
    Continue,
    Stopped,
    Quarantined,
}

/// The runner's task: everything it carries between batches.
struct Task {
    name: String,
    /// The component's hash: part of audit event ids, so a new component's dead letters
    /// are announced again.
    hash: String,
    plugin: Arc<dyn BatchHandler>,
    store: PluginStore,
    bus: Bus,
    log: Arc<dyn EventLog>,
    patterns: PatternSet,
    options: RunnerOptions,
    status: Arc<Mutex<RunnerStatus>>,
    stopped: watch::Receiver<bool>,
    view: Arc<dyn StateView>,
    recovery: Recovery,
    processed: u64,
    jobs: mpsc::Sender<Job>,
    committed: watch::Receiver<u64>,
    /// Resume position of the last job handed to the committer.
    handed: u64,
}

impl Task {
    fn update(&self, f: impl FnOnce(&mut RunnerStatus)) {
        f(&mut self.status.lock().expect("runner status lock"));
    }

    fn quarantined(&self) -> bool {
        self.status
            .lock()
            .expect("runner status lock")
            .quarantine
            .is_some()
    }

    /// Sleeps for `d`; false when stopped meanwhile.
    async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stopped.wait_for(|s| *s) => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Waits until everything handed to the committer is committed; false when stopped.
    async fn settled(&mut self) -> bool {
        committed_to(&mut self.committed, self.handed, &mut self.stopped).await
    }

    async fn run(
        mut self,
        mut control: mpsc::Receiver<Control>,
        committer: tokio::task::JoinHandle<()>,
    ) {
        let mut stopped = self.stopped.clone();
        let mut sub: Option<Subscription> = None;
        loop {
            if self.quarantined() {
                sub = None;
                self.update(|s| s.state = RunState::Quarantined);
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
                    self.update(|s| s.last_error = Some(message));
                    if !self.sleep(BACKOFF.1).await {
                        break;
                    }
                    continue;
                }
            };
            match self.batch(events, resume).await {
                Flow::Continue => {}
                Flow::Stopped => break,
                Flow::Quarantined => sub = None,
            }
        }
        drop(self.jobs);
        let _ = committer.await;
        let mut s = self.status.lock().expect("runner status lock");
        s.state = RunState::Stopped;
    }

    /// Moves an idle checkpoint to `cursor`.
    fn settle_at(&self, cursor: u64) {
        let (position, processed) = {
            let s = self.status.lock().expect("runner status lock");
            (s.position, s.events_processed)
        };
        if cursor > position
            && let Err(e) = self.store.commit(&Default::default(), cursor, processed)
        {
            tracing::warn!(plugin = self.plugin.id(), error = %e, "could not advance the idle checkpoint");
            return;
        }
        self.update(|s| {
            s.position = s.position.max(cursor);
            if s.state == RunState::CatchingUp {
                s.state = RunState::Live;
            }
        });
    }

    /// Handles a batch under the failure policy: a failing part is halved until the
    /// failing event is alone, which is retried with backoff and then dead-lettered.
    async fn batch(&mut self, events: Vec<Arc<Event>>, resume: u64) -> Flow {
        let policy = self.options.on_failure.clone();
        let mut parts = VecDeque::from([events]);
        while let Some(part) = parts.pop_front() {
            let Some(last) = part.last() else { continue };
            let part_resume = if parts.is_empty() {
                resume
            } else {
                last.position + 1
            };
            let part = Arc::new(part);
            let (mut attempts, mut backoff, mut host_backoff) =
                (0u32, Duration::from_millis(policy.backoff_ms), BACKOFF.0);
            let job = loop {
                let called = Instant::now();
                let limits = self.options.limits;
                let message = match self.attempt(&part, part_resume).await {
                    Ok(job) => break Some(job),
                    Err(BatchError::Host(message)) => {
                        let message = limits.bound(message);
                        tracing::warn!(plugin = self.plugin.id(), error = %message, retry_in = ?host_backoff, "batch failed");
                        self.update(|s| s.last_error = Some(message));
                        if !self.sleep(host_backoff).await {
                            return Flow::Stopped;
                        }
                        host_backoff = (host_backoff * 2).min(BACKOFF.1);
                        continue;
                    }
                    // A plugin's error text can be anything it chose: what is kept, shown and
                    // announced is cut to a bounded size.
                    Err(BatchError::Plugin(message)) => limits.bound(message),
                };
                self.update(|s| {
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
                    let mut first = Arc::unwrap_or_clone(part);
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
                tracing::warn!(plugin = self.plugin.id(), position = part[0].position, attempt = attempts, error = %message, retry_in = ?backoff, "event failed; retrying");
                if !self.sleep(backoff.max(burnt)).await {
                    return Flow::Stopped;
                }
                backoff = (backoff * 2).min(Duration::from_millis(policy.max_backoff_ms));
            };
            let Some(job) = job else { continue };
            self.update(|s| s.dead_letters_in_a_row = 0);
            self.processed = job.processed;
            self.recovery.passed(part_resume);
            // The next part may run while this one is appended and committed only when it
            // cannot depend on them: no state writes to read back, and no fixed ids (tool
            // outcomes) that the next part looks up.
            let wait = job.fixed_ids || !job.writes.is_empty();
            self.handed = part_resume;
            if self.jobs.send(job).await.is_err() {
                return Flow::Stopped;
            }
            if wait && !self.settled().await {
                return Flow::Stopped;
            }
        }
        Flow::Continue
    }

    /// One call over `part`, checked: derived events must satisfy the schemas; what the
    /// plugin already appended before a restart is left out.
    async fn attempt(
        &mut self,
        part: &Arc<Vec<Arc<Event>>>,
        resume: u64,
    ) -> Result<Job, BatchError> {
        let started = Instant::now();
        let output = self.plugin.handle(self.view.clone(), part.clone()).await?;
        self.check_output(part, &output)
            .map_err(BatchError::Plugin)?;
        self.check_schemas(part, &output)
            .map_err(BatchError::Plugin)?;
        let fixed_ids = output
            .derived
            .iter()
            .flatten()
            .any(|d| d.event.id.is_some());
        let (mut appends, derived, dropped) = derived_appends(&self.name, part, output.derived);
        if !appends.is_empty() && !fixed_ids {
            self.recovery
                .drop_appended(&self.name, &self.log, &mut appends)
                .await
                .map_err(BatchError::Host)?;
        }
        if dropped > 0 {
            tracing::warn!(
                plugin = self.plugin.id(),
                dropped,
                limit = MAX_DERIVATION_DEPTH,
                "derived events dropped: deeper than the derivation depth limit (a cycle between extractors?)"
            );
        }
        Ok(Job {
            appends,
            fixed_ids,
            writes: output.writes,
            resume,
            processed: self.processed + part.len() as u64,
            derived,
            dropped,
            events: part.len(),
            started,
            part: part.clone(),
            dead_letters: Vec::new(),
            quarantine: None,
        })
    }

    /// What the log would refuse of the derived events, as a failure message: an event
    /// larger than the log's event limit, or more events from one input event than one
    /// append may hold. The log's refusal is deterministic, so the batch fails as the
    /// plugin's failure (split, retried, dead-lettered) rather than wedging the committer.
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

    /// The first derived event that violates a registered schema, as a failure message.
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
        let in_a_row = self
            .status
            .lock()
            .expect("runner status lock")
            .dead_letters_in_a_row
            + 1;
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
        for e in appends.iter_mut().flat_map(|a| &mut a.events) {
            e.metadata
                .extra
                .insert(DEPTH_KEY.to_owned(), (depth_of(event) + 1).to_string());
        }
        let job = Job {
            appends,
            fixed_ids: true,
            writes: Default::default(),
            resume,
            processed: self.processed,
            derived: 0,
            dropped: 0,
            events: 0,
            started: Instant::now(),
            part: Arc::default(),
            dead_letters: vec![(
                event.position,
                serde_json::to_string(&entry).expect("a dead letter serializes"),
            )],
            quarantine: quarantine
                .as_ref()
                .map(|q| serde_json::to_string(q).expect("a quarantine serializes")),
        };
        self.handed = resume;
        if self.jobs.send(job).await.is_err() || !self.settled().await {
            return Flow::Stopped;
        }
        self.update(|s| {
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

    async fn control(&mut self, request: Control) {
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
                let r = self
                    .store
                    .remove_dead_letter(position)
                    .map_err(|e| format!("removing the dead letter failed: {e}"));
                let _ = reply.send(r);
            }
        }
    }

    async fn resume(&mut self) -> Result<bool, String> {
        let Some(q) = self
            .status
            .lock()
            .expect("runner status lock")
            .quarantine
            .clone()
        else {
            return Ok(false);
        };
        self.store
            .clear_quarantine()
            .map_err(|e| format!("clearing the quarantine failed: {e}"))?;
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
        self.update(|s| {
            s.quarantine = None;
            s.dead_letters_in_a_row = 0;
            s.consecutive_errors = 0;
            s.state = RunState::CatchingUp;
        });
        Ok(true)
    }

    async fn retry(&mut self, position: u64) -> Result<RetryOutcome, RetryError> {
        let unavailable = |e: String| RetryError::Unavailable(e);
        if !self.settled().await {
            return Err(unavailable(stopped_error()));
        }
        let not_found = || RetryError::NotFound {
            plugin: self.name.clone(),
            position,
        };
        let stored = self
            .store
            .dead_letter(position)
            .map_err(|e| unavailable(e.to_string()))?
            .ok_or_else(not_found)?;
        let mut entry: DeadLetter =
            serde_json::from_str(&stored).map_err(|e| unavailable(e.to_string()))?;
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
            Ok(output) => self
                .check_output(&events, &output)
                .and_then(|()| self.check_schemas(&events, &output))
                .map(|()| output),
            Err(BatchError::Plugin(e)) => Err(e),
            Err(BatchError::Host(e)) => return Err(unavailable(limits.bound(e))),
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
                    .put_dead_letter(
                        position,
                        &serde_json::to_string(&entry).expect("a dead letter serializes"),
                    )
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
                "dead_letter_id": dead_letter::id_of(&self.name, position),
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

/// The id of the `index`-th event `plugin` derived from the event with `source_id`: the
/// same on every run, so the log appends it once.
pub fn derived_id(plugin: &str, source_id: &str, index: usize) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [
        plugin.as_bytes(),
        source_id.as_bytes(),
        &(index as u64).to_be_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let bytes: [u8; 16] = h.finalize()[..16].try_into().expect("16 bytes");
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// How many derivations separate `event` from a client's append.
pub fn depth_of(event: &Event) -> u32 {
    event
        .metadata
        .extra
        .get(DEPTH_KEY)
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// Stamps `d`, derived from `from`, with its id (unless the handler fixed one), causation,
/// correlation and depth.
pub fn stamp(plugin: &str, from: &Event, index: usize, d: &mut Derived) {
    let m = &mut d.event.metadata;
    m.causation_id = Some(from.id.clone());
    if m.correlation_id.is_none() {
        m.correlation_id.clone_from(&from.metadata.correlation_id);
    }
    m.extra
        .insert(DEPTH_KEY.to_owned(), (depth_of(from) + 1).to_string());
    if d.event.id.is_none() {
        d.event.id = Some(derived_id(plugin, &from.id, index));
    }
}

/// The appends of a batch's derived events, in derivation order (consecutive events of one
/// stream share an append); also how many were kept and how many were too deep.
fn derived_appends(
    plugin: &str,
    events: &[Arc<Event>],
    derived: Vec<Vec<Derived>>,
) -> (Vec<StreamAppend>, u64, u64) {
    let mut appends: Vec<StreamAppend> = Vec::new();
    let (mut kept, mut dropped) = (0, 0);
    for (from, list) in events.iter().zip(derived) {
        if depth_of(from) >= MAX_DERIVATION_DEPTH {
            dropped += list.len() as u64;
            continue;
        }
        for (index, mut d) in list.into_iter().enumerate() {
            stamp(plugin, from, index, &mut d);
            kept += 1;
            push_grouped(&mut appends, d);
        }
    }
    (appends, kept, dropped)
}

/// Derived events a runner may have appended before it last stopped, for batches whose
/// checkpoint was not committed (a crash between the append and the commit, or storage that
/// lost recent commits). They are found once, by reading this plugin's events from the
/// checkpoint it started at to the head, and not appended again; past that head everything
/// it derives is new, so derived events need no per-event index. A plugin whose store
/// records no derived append ([`PluginStore::mark_derived`], durable before the first) has
/// nothing to find.
struct Recovery {
    from: u64,
    /// The head when the log was read, and the ids found below it; `None` until needed.
    seen: Option<(u64, std::collections::HashSet<String>)>,
    done: bool,
}

impl Recovery {
    fn new(from: u64, needed: bool) -> Self {
        Self {
            from,
            seen: None,
            done: !needed,
        }
    }

    /// Removes from `appends` the events already in the log.
    async fn drop_appended(
        &mut self,
        plugin: &str,
        log: &Arc<dyn EventLog>,
        appends: &mut Vec<StreamAppend>,
    ) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        if self.seen.is_none() {
            let until = log.head();
            let filter = ReadFilter {
                source: Some(plugin.to_owned()),
                ..ReadFilter::default()
            };
            let mut ids = std::collections::HashSet::new();
            let mut from = self.from;
            while from < until {
                let page = log
                    .read(from, 10_000, &filter)
                    .await
                    .map_err(|e| format!("reading this plugin's earlier output failed: {e}"))?;
                ids.extend(
                    page.events
                        .into_iter()
                        .filter(|e| e.position < until)
                        .map(|e| e.id),
                );
                if page.next <= from {
                    break;
                }
                from = page.next;
            }
            if !ids.is_empty() {
                tracing::info!(
                    plugin,
                    found = ids.len(),
                    "derived events from before the restart are not appended again"
                );
            }
            self.seen = Some((until, ids));
        }
        let (_, ids) = self.seen.as_ref().expect("just read");
        if !ids.is_empty() {
            for a in appends.iter_mut() {
                a.events
                    .retain(|e| e.id.as_ref().is_none_or(|id| !ids.contains(id)));
            }
            appends.retain(|a| !a.events.is_empty());
        }
        Ok(())
    }

    /// Notes that the checkpoint reached `position`.
    fn passed(&mut self, position: u64) {
        if let Some((until, _)) = &self.seen
            && position >= *until
        {
            self.seen = None;
            self.done = true;
        }
    }
}

/// One handled batch, waiting to be appended and committed.
struct Job {
    appends: Vec<StreamAppend>,
    fixed_ids: bool,
    writes: crate::plugin::Writes,
    resume: u64,
    processed: u64,
    derived: u64,
    dropped: u64,
    events: usize,
    started: Instant,
    /// The events the batch was derived from (none for a dead letter's job): what a
    /// derived event the log refuses is dead-lettered as.
    part: Arc<Vec<Arc<Event>>>,
    /// Dead letters (position, JSON) committed with the checkpoint.
    dead_letters: Vec<(u64, String)>,
    /// A quarantine record (JSON) committed with the checkpoint.
    quarantine: Option<String>,
}

/// Waits until the committer has committed through `position`; false when stopped.
async fn committed_to(
    committed: &mut watch::Receiver<u64>,
    position: u64,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        r = committed.wait_for(|c| *c >= position) => r.is_ok(),
        _ = stopped.wait_for(|s| *s) => false,
    }
}

/// Who the committer commits for.
struct Committer {
    /// `name@version`, for logs.
    plugin: String,
    /// The plugin's name: dead letters and announcements are kept under it.
    name: String,
    /// The component's hash, part of announcement ids.
    hash: String,
    /// The log's limits: appends are split to them.
    limits: OutputLimits,
}

impl Committer {
    /// Handles a derived event the log refused on its own (deterministically: too large,
    /// invalid): the event it was derived from is dead-lettered with the checkpoint, and
    /// the dead letter announced; returns the announcement to append, if any.
    fn refused(
        &self,
        job: &mut Job,
        event: &crate::event::NewEvent,
        error: &AppendError,
    ) -> Option<StreamAppend> {
        let message = self.limits.bound(format!(
            "the log refused the {} event plugin {} derived: {error}",
            event.event_type, self.plugin
        ));
        tracing::error!(plugin = self.plugin, error = %message, "derived event refused by the log; its source is dead-lettered");
        let source = job
            .part
            .iter()
            .find(|s| event.metadata.causation_id.as_deref() == Some(s.id.as_str()))?
            .clone();
        if job.dead_letters.iter().any(|(p, _)| *p == source.position) {
            return None;
        }
        let entry = DeadLetter::new(&self.name, &source, message.clone(), 1);
        job.dead_letters.push((
            source.position,
            serde_json::to_string(&entry).expect("a dead letter serializes"),
        ));
        if depth_of(&source) >= MAX_DERIVATION_DEPTH {
            return None;
        }
        let mut announce = audit(
            dead_letter::DEAD_LETTERED,
            &self.name,
            json!({
                "dead_letter_id": entry.id,
                "position": source.position,
                "event_id": source.id,
                "event_type": source.event_type.as_str(),
                "error": message,
                "attempts": 1,
            }),
            Some(&source),
            Some(derived_id(
                &format!("{}/refused/{}", self.name, self.hash),
                &source.id,
                0,
            )),
        );
        for e in &mut announce.events {
            e.metadata
                .extra
                .insert(DEPTH_KEY.to_owned(), (depth_of(&source) + 1).to_string());
        }
        Some(announce)
    }
}

/// Appends each job's derived events, then commits its writes and checkpoint, in order.
/// The appends are split to the log's limit per append. A failing storage step is retried
/// with backoff (nothing after it is committed meanwhile); an append the log refuses is
/// deterministic, never retried: it is split until each refused event is alone, which is
/// dropped and its source event dead-lettered.
#[allow(clippy::too_many_arguments)]
async fn commit_jobs(
    mut queue: tokio::sync::mpsc::Receiver<Job>,
    who: Committer,
    log: Arc<dyn EventLog>,
    store: PluginStore,
    bus: Bus,
    status: Arc<Mutex<RunnerStatus>>,
    committed: watch::Sender<u64>,
    mut stopped: watch::Receiver<bool>,
) {
    let plugin = who.plugin.as_str();
    let update =
        |f: &mut dyn FnMut(&mut RunnerStatus)| f(&mut status.lock().expect("runner status lock"));
    let mut marked = store.has_derived().unwrap_or(false);
    while let Some(mut job) = queue.recv().await {
        let mut backoff = BACKOFF.0;
        // Each append with whether its ids are indexed.
        let mut chunks: VecDeque<(Vec<StreamAppend>, bool)> = split_appends(
            std::mem::take(&mut job.appends),
            who.limits.max_batch_events,
        )
        .into_iter()
        .map(|c| (c, job.fixed_ids))
        .collect();
        let (mut refused, letters) = (0u64, job.dead_letters.len());
        loop {
            let step: Result<(), String> = 'step: {
                while let Some((chunk, indexed)) = chunks.pop_front() {
                    // Durable before the first derived event of this plugin name, so a later
                    // start knows to look for what it appended (see `Recovery`).
                    if !marked {
                        if let Err(e) = store.mark_derived() {
                            chunks.push_front((chunk, indexed));
                            break 'step Err(format!(
                                "recording that derived events follow failed: {e}"
                            ));
                        }
                        marked = true;
                    }
                    let r = if indexed {
                        // Ids a handler fixed are looked up later (tool outcomes): indexed.
                        log.append(chunk.clone()).await
                    } else {
                        log.append_unindexed(chunk.clone()).await
                    };
                    match r {
                        Ok(_) => {}
                        Err(e @ AppendError::Storage(_)) => {
                            chunks.push_front((chunk, indexed));
                            break 'step Err(format!("appending derived events failed: {e}"));
                        }
                        Err(e) => {
                            let n: usize = chunk.iter().map(|a| a.events.len()).sum();
                            if n > 1 {
                                // Find what was refused: each event alone, in order.
                                for a in chunk.into_iter().rev() {
                                    for ev in a.events.into_iter().rev() {
                                        let alone = StreamAppend {
                                            stream: a.stream.clone(),
                                            expected: a.expected,
                                            events: vec![ev],
                                        };
                                        chunks.push_front((vec![alone], indexed));
                                    }
                                }
                                continue;
                            }
                            refused += 1;
                            let event = &chunk[0].events[0];
                            if let Some(announce) = who.refused(&mut job, event, &e) {
                                // Indexed: a batch that runs again announces once.
                                chunks.push_back((vec![announce], true));
                            }
                            let message = who.limits.bound(format!(
                                "the log refused a derived {} event: {e}",
                                event.event_type
                            ));
                            update(&mut |s| {
                                s.errors += 1;
                                s.last_error = Some(message.clone());
                            });
                        }
                    }
                }
                store
                    .commit_with(
                        &job.writes,
                        job.resume,
                        job.processed,
                        &job.dead_letters,
                        job.quarantine.as_deref(),
                    )
                    .map_err(|e| format!("committing state failed: {e}"))
            };
            match step {
                Ok(()) => break,
                Err(message) => {
                    let message = who.limits.bound(message);
                    tracing::warn!(plugin, error = %message, retry_in = ?backoff, "batch failed");
                    update(&mut |s| {
                        s.errors += 1;
                        s.consecutive_errors += 1;
                        s.last_error = Some(message.clone());
                        s.state = RunState::Failing;
                    });
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
        let live = job.resume >= bus.head();
        update(&mut |s| {
            s.position = job.resume;
            s.events_processed = job.processed;
            s.batches += 1;
            s.consecutive_errors = 0;
            s.derived += job.derived.saturating_sub(refused);
            s.dropped_by_depth += job.dropped;
            s.dead_lettered += (job.dead_letters.len() - letters) as u64;
            s.state = if live {
                RunState::Live
            } else {
                RunState::CatchingUp
            };
        });
        tracing::trace!(plugin, events = job.events, took = ?job.started.elapsed(), "batch committed");
        let _ = committed.send(job.resume);
    }
}

/// Adds `d` to `appends`, in order: to the last append when it is for the same stream.
pub fn push_grouped(appends: &mut Vec<StreamAppend>, d: Derived) {
    match appends.last_mut() {
        Some(a) if a.stream == d.stream => a.events.push(d.event),
        _ => appends.push(StreamAppend {
            stream: d.stream,
            expected: ExpectedVersion::Any,
            events: vec![d.event],
        }),
    }
}
