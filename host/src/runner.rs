//! A runner drives one projection: it reads batches from the plugin's checkpoint (from the
//! log while catching up, from the bus once live), calls the component, and commits the
//! state writes with the new checkpoint in one storage batch.
//!
//! A crash anywhere re-runs the batch from the last committed checkpoint, and since state
//! and checkpoint commit together, the state always equals a replay of the log up to the
//! checkpoint. A failing batch is retried with exponential backoff and never advances the
//! checkpoint; the host keeps running.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::bus::{Bus, Start};
use crate::log::ReadFilter;
use crate::pattern::PatternSet;
use crate::plugin::{PluginStore, Projector, StateView};

/// How long without a matching event before a runner counts as live at its cursor.
const IDLE: Duration = Duration::from_millis(250);

/// First and longest wait before retrying a failed batch.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));

/// Where a runner is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Reading history towards the head.
    CatchingUp,
    /// At the head, handling events as they are committed.
    Live,
    /// The last batch failed; retrying with backoff.
    Failing,
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
}

/// A running projection; stops when dropped or when [`Runner::stop`] is called.
pub struct Runner {
    status: Arc<Mutex<RunnerStatus>>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Runner {
    /// Starts a runner for `plugin` over `patterns`, resuming from `store`'s checkpoint.
    pub fn spawn(
        plugin: Arc<dyn Projector>,
        store: PluginStore,
        bus: Bus,
        patterns: PatternSet,
        batch_size: usize,
    ) -> anyhow::Result<Self> {
        let position = store.checkpoint()?.unwrap_or(0);
        let status = Arc::new(Mutex::new(RunnerStatus {
            state: RunState::CatchingUp,
            position,
            events_processed: store.processed()?,
            batches: 0,
            errors: 0,
            consecutive_errors: 0,
            last_error: None,
        }));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(
            plugin,
            store,
            bus,
            patterns,
            batch_size,
            status.clone(),
            stopped,
        ));
        Ok(Self {
            status,
            stop,
            task: Some(task),
        })
    }

    /// A snapshot of the runner's status.
    pub fn status(&self) -> RunnerStatus {
        self.status.lock().expect("runner status lock").clone()
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

async fn run(
    plugin: Arc<dyn Projector>,
    store: PluginStore,
    bus: Bus,
    patterns: PatternSet,
    batch_size: usize,
    status: Arc<Mutex<RunnerStatus>>,
    mut stopped: watch::Receiver<bool>,
) {
    let update =
        |f: &mut dyn FnMut(&mut RunnerStatus)| f(&mut status.lock().expect("runner status lock"));
    let start = status.lock().expect("runner status lock").position;
    let mut sub = bus.subscribe(patterns, ReadFilter::default(), Start::Position(start));
    let view: Arc<dyn StateView> = Arc::new(store.clone());
    loop {
        let next = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            next = tokio::time::timeout(IDLE, sub.next_batch(batch_size)) => next,
        };
        let Ok(next) = next else {
            // Nothing matching arrived for a while: everything up to the subscription's cursor
            // was examined, so the checkpoint can move there (and restarts rescan less).
            let Some(cursor) = sub.settle() else { continue };
            let (position, processed) = {
                let s = status.lock().expect("runner status lock");
                (s.position, s.events_processed)
            };
            if cursor > position {
                if let Err(e) = store.commit(&Default::default(), cursor, processed) {
                    tracing::warn!(plugin = plugin.id(), error = %e, "could not advance the idle checkpoint");
                    continue;
                }
            }
            update(&mut |s| {
                s.position = s.position.max(cursor);
                if s.state == RunState::CatchingUp {
                    s.state = RunState::Live;
                }
            });
            continue;
        };
        let (events, resume) = match next {
            None => break,
            Some(Ok(batch)) => batch,
            Some(Err(e)) => {
                tracing::error!(plugin = plugin.id(), error = %e, "reading the log failed");
                update(&mut |s| s.last_error = Some(e.to_string()));
                tokio::time::sleep(BACKOFF.1).await;
                continue;
            }
        };
        let events = Arc::new(events);
        let mut backoff = BACKOFF.0;
        loop {
            let (p, v, evs) = (plugin.clone(), view.clone(), events.clone());
            let started = Instant::now();
            let result = tokio::task::spawn_blocking(move || p.handle(v, &evs)).await;
            let outcome = match result {
                Ok(Ok(writes)) => {
                    let processed = status.lock().expect("runner status lock").events_processed
                        + events.len() as u64;
                    store
                        .commit(&writes, resume, processed)
                        .map(|_| processed)
                        .map_err(|e| format!("committing state failed: {e}"))
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the call was lost: {e}")),
            };
            match outcome {
                Ok(processed) => {
                    let live = resume >= bus.head();
                    update(&mut |s| {
                        s.position = resume;
                        s.events_processed = processed;
                        s.batches += 1;
                        s.consecutive_errors = 0;
                        s.state = if live {
                            RunState::Live
                        } else {
                            RunState::CatchingUp
                        };
                    });
                    tracing::trace!(plugin = plugin.id(), events = events.len(), took = ?started.elapsed(), "batch committed");
                    break;
                }
                Err(message) => {
                    tracing::warn!(plugin = plugin.id(), error = %message, retry_in = ?backoff, "batch failed");
                    update(&mut |s| {
                        s.errors += 1;
                        s.consecutive_errors += 1;
                        s.last_error = Some(message.clone());
                        s.state = RunState::Failing;
                    });
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => {
                            update(&mut |s| s.state = RunState::Stopped);
                            return;
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }
    update(&mut |s| s.state = RunState::Stopped);
}
