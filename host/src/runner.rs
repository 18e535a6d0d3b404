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
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub use control::Controller;
pub use lineage::{DEPTH_KEY, MAX_DERIVATION_DEPTH};
pub(crate) use lineage::{depth_of, derived_id, push_grouped, stamp};
pub use request::{ControlError, RetryOutcome};
pub use status::{RunState, RunnerOptions, RunnerStatus};

use crate::bus::Bus;
use crate::dead_letter::Quarantine;
use crate::lease::Lease;
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
    lease: Option<Lease>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// What a runner is made of, kept to start it again when its lease comes back.
#[derive(Clone)]
struct Parts {
    name: String,
    plugin: Arc<dyn Handler>,
    store: PluginStore,
    bus: Bus,
    log: Arc<dyn EventLog>,
    patterns: PatternSet,
    options: RunnerOptions,
    status: StatusCell,
}

/// One run of the task and its committer, from the checkpoint as it stands; it answers
/// with the operator's channel once stopped.
type Run = tokio::task::JoinHandle<mpsc::Receiver<Control>>;

impl Runner {
    /// Starts a runner for `plugin` over `patterns`, resuming from `store`'s checkpoint;
    /// derived events are appended to `log` in the name of `name`. With a lease in
    /// `options`, it runs only while this host holds it (standing by meanwhile). Fails only
    /// when the store cannot be read.
    pub fn spawn(
        name: &str,
        plugin: Arc<dyn Handler>,
        store: PluginStore,
        bus: Bus,
        log: Arc<dyn EventLog>,
        patterns: PatternSet,
        options: RunnerOptions,
    ) -> Result<Self, StoreError> {
        let quarantine: Option<Quarantine> = store.quarantine()?;
        let status = StatusCell::new(RunnerStatus {
            state: if quarantine.is_some() {
                RunState::Quarantined
            } else if options.lease.is_some() {
                RunState::Standby
            } else {
                RunState::CatchingUp
            },
            position: store.checkpoint()?.unwrap_or(0),
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
            placement: None,
        });
        let (stop, stopped) = watch::channel(false);
        let (control, requests) = mpsc::channel(16);
        let lease = options.lease.clone();
        let parts = Parts {
            name: name.to_owned(),
            plugin,
            store,
            bus,
            log,
            patterns,
            options,
            status: status.clone(),
        };
        let task = match lease.clone() {
            None => {
                let run = parts.start(requests, stopped).map_err(|(e, _)| e)?;
                tokio::spawn(async move {
                    let _ = run.await;
                })
            }
            Some(lease) => tokio::spawn(parts.placed(lease, requests, stopped)),
        };
        Ok(Self {
            status,
            stop,
            control,
            lease,
            task: Some(task),
        })
    }

    /// A snapshot of the runner's status.
    pub fn status(&self) -> RunnerStatus {
        let mut s = self.status.read(Clone::clone);
        s.placement = self.placement();
        s
    }

    /// On a cluster: which host runs the plugin (without copying the whole status).
    pub fn placement(&self) -> Option<crate::lease::Placement> {
        self.lease.as_ref().map(Lease::placement)
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

impl Parts {
    /// Starts the task and its committer from the store's checkpoint, until `stopped`.
    fn start(
        &self,
        requests: mpsc::Receiver<Control>,
        stopped: watch::Receiver<bool>,
    ) -> Result<Run, (StoreError, mpsc::Receiver<Control>)> {
        let store = &self.store;
        let read = || -> Result<_, StoreError> {
            Ok((
                store.checkpoint()?.unwrap_or(0),
                store.processed()?,
                store.component_hash()?.unwrap_or_default(),
                store.snapshot_checkpoints()?.last().copied().unwrap_or(0),
            ))
        };
        let (position, processed, hash, snapshotted) = match read() {
            Ok(r) => r,
            Err(e) => return Err((e, requests)),
        };
        // Appends and commits run in order on their own task, at most two batches behind.
        let (jobs, queue) = mpsc::channel::<Job>(2);
        let (committed_tx, committed) = watch::channel(position);
        let committer = Committer {
            plugin: self.plugin.id().to_owned(),
            name: self.name.clone(),
            hash: hash.clone(),
            limits: self.options.limits,
            log: self.log.clone(),
            store: store.clone(),
            bus: self.bus.clone(),
            status: self.status.clone(),
            committed: committed_tx,
            stopped: stopped.clone(),
            snapshots: self.options.snapshots,
            snapshotted,
            lease: self.options.lease.clone(),
            // A plugin that never derived anything has nothing to recover.
            recovery: Recovery::new(position, store.has_derived().unwrap_or(true)),
        };
        let committer = tokio::spawn(committer.run(queue));
        let task = Task {
            name: self.name.clone(),
            hash,
            view: Arc::new(store.clone()),
            processed,
            plugin: self.plugin.clone(),
            store: store.clone(),
            bus: self.bus.clone(),
            log: self.log.clone(),
            patterns: self.patterns.clone(),
            options: self.options.clone(),
            status: self.status.clone(),
            stopped,
            jobs,
            committed,
            handed: position,
            handed_before: position,
        };
        self.status.update(|s| {
            s.position = position;
            s.events_processed = processed;
            if s.quarantine.is_none() {
                s.state = RunState::CatchingUp;
            }
        });
        Ok(tokio::spawn(task.run(requests, committer)))
    }

    /// Runs while this host holds `lease`: stands by until it does, runs from the
    /// checkpoint, and when the lease is lost stops (appending and committing nothing
    /// more) and stands by again; until `stopped`.
    async fn placed(
        self,
        mut lease: Lease,
        mut requests: mpsc::Receiver<Control>,
        mut stopped: watch::Receiver<bool>,
    ) {
        loop {
            if self.status.read(|s| s.quarantine.is_none()) {
                self.status.update(|s| s.state = RunState::Standby);
            }
            // Standing by: requests are answered with where the plugin runs.
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => {
                        self.status.update(|s| s.state = RunState::Stopped);
                        return;
                    }
                    _ = lease.acquired() => break,
                    Some(r) = requests.recv() => r.refuse(ControlError::NotHere(lease.placement())),
                }
            }
            let (stop, run_stopped) = watch::channel(false);
            let mut task = match self.start(requests, run_stopped) {
                Ok(run) => run,
                Err((e, back)) => {
                    tracing::error!(plugin = self.plugin.id(), error = %e, "starting the runner failed; trying again");
                    let message = self.options.limits.bound(e.to_string());
                    self.status.update(|s| s.last_error = Some(message));
                    requests = back;
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let ended = tokio::select! {
                _ = stopped.wait_for(|s| *s) => None,
                _ = lease.lost() => None,
                // The run stopped by itself: its committer was fenced, or the bus closed.
                r = &mut task => Some(r),
            };
            let by_itself = ended.is_some();
            let ended = match ended {
                Some(r) => r,
                None => {
                    let _ = stop.send(true);
                    task.await
                }
            };
            requests = match ended {
                Ok(r) => r,
                Err(e) => {
                    // The run panicked and took the operator's channel with it: run again
                    // (requests answer that the runner stopped), so the lease is neither
                    // held by nothing nor kept from other hosts.
                    tracing::error!(plugin = self.plugin.id(), error = %e, "the runner failed; starting it again");
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    mpsc::channel(1).1
                }
            };
            if *stopped.borrow() {
                return;
            }
            if lease.holds() {
                if by_itself {
                    // Not for the lease's sake: start again shortly from the checkpoint.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
            tracing::warn!(
                plugin = self.plugin.id(),
                "the plugin's lease was lost: standing by"
            );
        }
    }
}
