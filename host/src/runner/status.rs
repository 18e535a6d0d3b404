//! What a runner reports about itself and how it is configured; the status is shared by
//! its task, its committer and whoever asks.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::dead_letter::Quarantine;
use crate::limits::OutputLimits;
use crate::plugin::OnFailure;
use crate::schemas::Schemas;

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
    /// Loaded, but another host of the cluster runs it (it holds the plugin's lease); this
    /// host takes over when that lease lapses.
    Standby,
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
    /// On a cluster of hosts: which host runs it, under which fencing token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<crate::lease::Placement>,
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
    /// Projections: log positions between copies of the state kept for time travel (0:
    /// none), and how many copies are kept.
    pub snapshots: (u64, usize),
    /// On a cluster of hosts: the plugin's lease. The runner runs only while this host
    /// holds it, and appends and commits nothing once it is lost.
    pub lease: Option<crate::lease::Lease>,
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
            snapshots: (0, 0),
            lease: None,
        }
    }
}

/// The runner's status, shared by its task, its committer and whoever asks.
#[derive(Clone)]
pub(super) struct StatusCell(Arc<Mutex<RunnerStatus>>);

impl StatusCell {
    pub(super) fn new(status: RunnerStatus) -> Self {
        Self(Arc::new(Mutex::new(status)))
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut RunnerStatus)) {
        f(&mut self.0.lock().expect("runner status lock"));
    }

    pub(super) fn read<T>(&self, f: impl FnOnce(&RunnerStatus) -> T) -> T {
        f(&self.0.lock().expect("runner status lock"))
    }

    pub(super) fn quarantined(&self) -> bool {
        self.read(|s| s.quarantine.is_some())
    }
}
