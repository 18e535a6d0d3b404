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
//! A failing batch follows the plugin's [`crate::plugin::OnFailure`] policy: it is split until the failing
//! event is found; that event is retried with exponential backoff, then parked in the
//! plugin's dead-letter store, and the runner moves on. Too many dead letters in a row
//! quarantine the plugin until an operator resumes it. Each transition is announced as an
//! `evhost.plugin.>` event ([`crate::dead_letter`]). Failures of the host's own storage are
//! not the plugin's fault: they are retried with backoff, never dead-lettered.
//!
//! The runner is split by concept: `task` (the loop), `policy` (split, retry, dead letter,
//! quarantine), `backoff`, `commit` (appends and commits in order), `lineage` (derived ids,
//! depth, recovery), `request` and `control` (the operator's requests) and `status`.
//! Imports go one way: `policy` and `control` add to the `Task` that `task` defines; `task`
//! uses `commit` and `request`; `request`, `lineage`, `backoff` and `status` use nothing of
//! the runner.

mod backoff;
mod commit;
mod control;
mod lineage;
mod policy;
mod request;
mod status;
mod task;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

pub use control::Controller;
pub use lineage::{DEPTH_KEY, MAX_DERIVATION_DEPTH};
pub(crate) use lineage::{derived_id, push_grouped, stamp};
pub use request::{ControlError, RetryOutcome};
pub use status::{RunState, RunnerOptions, RunnerStatus};

use crate::bus::Bus;
use crate::dead_letter::Quarantine;
use crate::log::EventLog;
use crate::pattern::PatternSet;
use crate::plugin::{Handler, PluginStore, StoreError};
use commit::{Committer, Job};
use lineage::Recovery;
use request::Control;
use status::StatusCell;
use task::Task;

/// A running projection or extractor; stops when dropped or when [`Runner::stop`] is
/// called.
pub struct Runner {
    status: StatusCell,
    stop: watch::Sender<bool>,
    control: mpsc::Sender<Control>,
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
        let status = StatusCell::new(RunnerStatus {
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
        });
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
            snapshots: options.snapshots,
            snapshotted: store.snapshot_checkpoints()?.last().copied().unwrap_or(0),
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
