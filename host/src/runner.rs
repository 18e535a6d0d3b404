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
//! out what is already there ([`Recovery`]). A failing batch is retried with exponential
//! backoff and never advances the checkpoint; the host keeps running.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::bus::{Bus, Start};
use crate::event::Event;
use crate::log::{EventLog, ExpectedVersion, ReadFilter, StreamAppend};
use crate::pattern::PatternSet;
use crate::plugin::{Derived, Handler, Output, PluginStore, StateView};

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
    ) -> Result<Output, String>;
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
    ) -> Result<Output, String> {
        let h = self.0.clone();
        match tokio::task::spawn_blocking(move || h.handle(view, &events)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the call was lost: {e}")),
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
    /// Events derived and appended since this runner started (extractors).
    pub derived: u64,
    /// Derived events dropped for exceeding the derivation depth limit.
    pub dropped_by_depth: u64,
}

/// A running projection; stops when dropped or when [`Runner::stop`] is called.
pub struct Runner {
    status: Arc<Mutex<RunnerStatus>>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Runner {
    /// Starts a runner for `plugin` over `patterns`, resuming from `store`'s checkpoint;
    /// derived events are appended to `log` in the name of `name`.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        name: &str,
        plugin: Arc<dyn BatchHandler>,
        store: PluginStore,
        bus: Bus,
        log: Arc<dyn EventLog>,
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
            derived: 0,
            dropped_by_depth: 0,
        }));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(
            name.to_owned(),
            plugin,
            store,
            bus,
            log,
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

#[allow(clippy::too_many_arguments)]
async fn run(
    name: String,
    plugin: Arc<dyn BatchHandler>,
    store: PluginStore,
    bus: Bus,
    log: Arc<dyn EventLog>,
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
    // A plugin that never derived anything has nothing to recover.
    let mut recovery = Recovery::new(start, store.has_derived().unwrap_or(true));
    let mut processed = status.lock().expect("runner status lock").events_processed;
    // Appends and commits run in order on their own task, at most two batches behind.
    let (jobs, queue) = tokio::sync::mpsc::channel::<Job>(2);
    let (committed_tx, mut committed) = watch::channel(start);
    let mut handed = start;
    let committer = tokio::spawn(commit_jobs(
        queue,
        plugin.id().to_owned(),
        log.clone(),
        store.clone(),
        bus.clone(),
        status.clone(),
        committed_tx,
        stopped.clone(),
    ));
    loop {
        let next = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            next = tokio::time::timeout(IDLE, sub.next_batch(batch_size)) => next,
        };
        let Ok(next) = next else {
            // Nothing matching arrived for a while: everything up to the subscription's cursor
            // was examined, so the checkpoint can move there (and restarts rescan less).
            let Some(cursor) = sub.settle() else { continue };
            if !committed_to(&mut committed, handed, &mut stopped).await {
                break;
            }
            let (position, processed) = {
                let s = status.lock().expect("runner status lock");
                (s.position, s.events_processed)
            };
            if cursor > position
                && let Err(e) = store.commit(&Default::default(), cursor, processed)
            {
                tracing::warn!(plugin = plugin.id(), error = %e, "could not advance the idle checkpoint");
                continue;
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
            let started = Instant::now();
            let result = plugin.handle(view.clone(), events.clone()).await;
            let job = match result {
                Ok(output) => {
                    let fixed_ids = output
                        .derived
                        .iter()
                        .flatten()
                        .any(|d| d.event.id.is_some());
                    let (mut appends, derived, dropped) =
                        derived_appends(&name, &events, output.derived);
                    if !appends.is_empty()
                        && !fixed_ids
                        && let Err(e) = recovery.drop_appended(&name, &log, &mut appends).await
                    {
                        update(&mut |s| s.last_error = Some(e.clone()));
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                    if dropped > 0 {
                        tracing::warn!(
                            plugin = plugin.id(),
                            dropped,
                            limit = MAX_DERIVATION_DEPTH,
                            "derived events dropped: deeper than the derivation depth limit (a cycle between extractors?)"
                        );
                    }
                    processed += events.len() as u64;
                    Ok(Job {
                        appends,
                        fixed_ids,
                        writes: output.writes,
                        resume,
                        processed,
                        derived,
                        dropped,
                        events: events.len(),
                        started,
                    })
                }
                Err(e) => Err(e),
            };
            match job {
                Ok(job) => {
                    recovery.passed(resume);
                    // The next batch may run while this one is appended and committed only
                    // when it cannot depend on them: no state writes to read back, and no
                    // fixed ids (tool outcomes) that the next batch looks up.
                    let wait = job.fixed_ids || !job.writes.is_empty();
                    handed = resume;
                    if jobs.send(job).await.is_err() {
                        break;
                    }
                    if wait {
                        // Returns early when stopped; the loop's top then ends the runner.
                        committed_to(&mut committed, handed, &mut stopped).await;
                    }
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
                    let stop = tokio::select! {
                        _ = stopped.wait_for(|s| *s) => true,
                        _ = tokio::time::sleep(backoff) => false,
                    };
                    if stop {
                        drop(jobs);
                        let _ = committer.await;
                        update(&mut |s| s.state = RunState::Stopped);
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }
    drop(jobs);
    let _ = committer.await;
    update(&mut |s| s.state = RunState::Stopped);
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

/// Appends each job's derived events, then commits its writes and checkpoint, in order;
/// retries a failing step with backoff (nothing after it is committed meanwhile).
#[allow(clippy::too_many_arguments)]
async fn commit_jobs(
    mut queue: tokio::sync::mpsc::Receiver<Job>,
    plugin: String,
    log: Arc<dyn EventLog>,
    store: PluginStore,
    bus: Bus,
    status: Arc<Mutex<RunnerStatus>>,
    committed: watch::Sender<u64>,
    mut stopped: watch::Receiver<bool>,
) {
    let update =
        |f: &mut dyn FnMut(&mut RunnerStatus)| f(&mut status.lock().expect("runner status lock"));
    let mut marked = store.has_derived().unwrap_or(false);
    while let Some(job) = queue.recv().await {
        let mut backoff = BACKOFF.0;
        let mut appends = Some(job.appends).filter(|a| !a.is_empty());
        loop {
            let step: Result<(), String> = 'step: {
                if let Some(a) = &appends {
                    // Durable before the first derived event of this plugin name, so a later
                    // start knows to look for what it appended (see `Recovery`).
                    if !marked {
                        if let Err(e) = store.mark_derived() {
                            break 'step Err(format!(
                                "recording that derived events follow failed: {e}"
                            ));
                        }
                        marked = true;
                    }
                    let r = if job.fixed_ids {
                        // Ids a handler fixed are looked up later (tool outcomes): indexed.
                        log.append(a.clone()).await
                    } else {
                        log.append_unindexed(a.clone()).await
                    };
                    if let Err(e) = r {
                        break 'step Err(format!("appending derived events failed: {e}"));
                    }
                    appends = None;
                }
                store
                    .commit(&job.writes, job.resume, job.processed)
                    .map_err(|e| format!("committing state failed: {e}"))
            };
            match step {
                Ok(()) => break,
                Err(message) => {
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
            s.derived += job.derived;
            s.dropped_by_depth += job.dropped;
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
