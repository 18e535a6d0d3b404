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
//! out what is already there (`lineage`).
//!
//! A failing batch follows the plugin's [`OnFailure`] policy: it is split until the failing
//! event is found; that event is retried with exponential backoff, then parked in the
//! plugin's dead-letter store, and the runner moves on. Too many dead letters in a row
//! quarantine the plugin until an operator resumes it. Each transition is announced as an
//! `evhost.plugin.>` event ([`crate::dead_letter`]). Failures of the host's own storage are
//! not the plugin's fault: they are retried with backoff, never dead-lettered.

//! The runner is split by concept: `task` (the loop), `policy` (split, retry, backoff,
//! dead letter, quarantine), `commit` (appends and commits in order), `lineage` (derived
//! ids, depth, recovery) and `control` (the operator's requests).

mod commit;
mod control;
mod lineage;
mod policy;
mod task;

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

pub use control::{ControlError, Controller, RetryOutcome};
pub use lineage::{DEPTH_KEY, MAX_DERIVATION_DEPTH};
pub(crate) use lineage::{derived_id, push_grouped, stamp};

use crate::bus::Bus;
use crate::dead_letter::Quarantine;
use crate::limits::OutputLimits;
use crate::log::EventLog;
use crate::pattern::PatternSet;
use crate::plugin::{Handler, OnFailure, PluginStore, StoreError};
use crate::schemas::Schemas;
use commit::{Committer, Job};
use lineage::Recovery;
use task::Task;

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

/// The runner's status, shared by its task, its committer and whoever asks.
#[derive(Clone)]
struct StatusCell(Arc<Mutex<RunnerStatus>>);

impl StatusCell {
    fn update(&self, f: impl FnOnce(&mut RunnerStatus)) {
        f(&mut self.0.lock().expect("runner status lock"));
    }

    fn read<T>(&self, f: impl FnOnce(&RunnerStatus) -> T) -> T {
        f(&self.0.lock().expect("runner status lock"))
    }

    fn quarantined(&self) -> bool {
        self.read(|s| s.quarantine.is_some())
    }
}

/// A running projection or extractor; stops when dropped or when [`Runner::stop`] is
/// called.
pub struct Runner {
    status: StatusCell,
    stop: watch::Sender<bool>,
    control: mpsc::Sender<control::Control>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Runner {
    /// Starts a runner for `plugin` over `patterns`, resuming from `store`'s checkpoint;
    /// derived events are appended to `log` in the name of `name`. Fails only when the
    /// store cannot be read.
    pub fn spawn(
        name: &str,
        plugin: Arc<dyn Handler>,
        store: PluginStore,
        bus: Bus,
        log: Arc<dyn EventLog>,
        patterns: PatternSet,
        options: RunnerOptions,
    ) -> Result<Self, StoreError> {
        let position = store.checkpoint()?.unwrap_or(0);
        let quarantine: Option<Quarantine> = store.quarantine()?;
        let processed = store.processed()?;
        let hash = store.component_hash()?.unwrap_or_default();
        let status = StatusCell(Arc::new(Mutex::new(RunnerStatus {
            state: if quarantine.is_some() {
                RunState::Quarantined
            } else {
                RunState::CatchingUp
            },
            position,
            events_processed: processed,
            batches: 0,
            errors: 0,
            consecutive_errors: 0,
            last_error: None,
            derived: 0,
            dropped_by_depth: 0,
            dead_lettered: 0,
            dead_letters_in_a_row: quarantine.as_ref().map_or(0, |q| q.dead_letters_in_a_row),
            quarantine,
        })));
        let (stop, stopped) = watch::channel(false);
        let (control, requests) = mpsc::channel(16);
        // Appends and commits run in order on their own task, at most two batches behind.
        let (jobs, queue) = mpsc::channel::<Job>(2);
        let (committed_tx, committed) = watch::channel(position);
        let committer = Committer {
            plugin: plugin.id().to_owned(),
            name: name.to_owned(),
            hash: hash.clone(),
            limits: options.limits,
            log: log.clone(),
            store: store.clone(),
            bus: bus.clone(),
            status: status.clone(),
            committed: committed_tx,
            stopped: stopped.clone(),
        };
        let committer = tokio::spawn(committer.run(queue));
        let task = Task {
            name: name.to_owned(),
            hash,
            view: Arc::new(store.clone()),
            // A plugin that never derived anything has nothing to recover.
            recovery: Recovery::new(position, store.has_derived().unwrap_or(true)),
            processed,
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
        self.status.read(Clone::clone)
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

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
