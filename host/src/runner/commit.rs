//! The committer: a task of its own per runner that appends each handled batch's derived
//! events and then commits its writes and checkpoint, in order, at most two batches behind
//! the handler. A storage failure is retried with backoff (nothing after it is committed
//! meanwhile); an append the log refuses is deterministic, never retried: it is split until
//! each refused event is alone, which is dropped and its source event dead-lettered.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::backoff::{Backoff, HOST_BACKOFF};
use super::lineage::{
    MAX_DERIVATION_DEPTH, Recovery, deepen, depth_of, derived_appends, derived_id,
};
use super::status::{RunState, StatusCell};
use crate::bus::Bus;
use crate::dead_letter::{self, DeadLetter, Quarantine, audit};
use crate::event::{Event, NewEvent};
use crate::limits::{OutputLimits, split_appends};
use crate::log::{AppendError, EventLog, StreamAppend};
use crate::plugin::{Derived, PluginStore, Writes};

/// One handled batch, waiting to be appended and committed.
pub(super) struct Job {
    /// Per event of `part`, what the handler derived from it: stamped (ids, causation,
    /// depth) and grouped into appends here, off the handler's path.
    pub(super) output: Vec<Vec<Derived>>,
    /// Appends made ready by the runner (a dead letter's announcements).
    pub(super) appends: Vec<StreamAppend>,
    /// True when the handler fixed the ids (tool outcomes): appended indexed.
    pub(super) fixed_ids: bool,
    pub(super) writes: Writes,
    /// The checkpoint to commit.
    pub(super) resume: u64,
    /// Events handled since the state was started, once this job commits.
    pub(super) processed: u64,
    pub(super) events: usize,
    pub(super) started: Instant,
    /// The events the batch was derived from (none for a dead letter's job): what a
    /// derived event the log refuses is dead-lettered as.
    pub(super) part: Arc<Vec<Arc<Event>>>,
    /// Dead letters committed with the checkpoint.
    pub(super) dead_letters: Vec<DeadLetter>,
    /// A quarantine committed with the checkpoint.
    pub(super) quarantine: Option<Quarantine>,
}

impl Job {
    /// A job that commits `writes` up to `resume` with nothing derived.
    pub(super) fn empty(resume: u64, processed: u64) -> Self {
        Self {
            output: Vec::new(),
            appends: Vec::new(),
            fixed_ids: false,
            writes: Writes::default(),
            resume,
            processed,
            events: 0,
            started: Instant::now(),
            part: Arc::default(),
            dead_letters: Vec::new(),
            quarantine: None,
        }
    }
}

/// Waits until the committer has committed through `position`; false when stopped.
pub(super) async fn committed_to(
    committed: &mut watch::Receiver<u64>,
    position: u64,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        r = committed.wait_for(|c| *c >= position) => r.is_ok(),
        _ = stopped.wait_for(|s| *s) => false,
    }
}

/// What the committer works with.
pub(super) struct Committer {
    /// `name@version`, for logs.
    pub(super) plugin: String,
    /// The plugin's name: dead letters and announcements are kept under it.
    pub(super) name: String,
    /// The component's hash, part of announcement ids.
    pub(super) hash: String,
    /// The log's limits: appends are split to them.
    pub(super) limits: OutputLimits,
    pub(super) log: Arc<dyn EventLog>,
    pub(super) store: PluginStore,
    pub(super) bus: Bus,
    pub(super) status: StatusCell,
    /// Where the committed checkpoint is published.
    pub(super) committed: watch::Sender<u64>,
    pub(super) stopped: watch::Receiver<bool>,
    /// Positions between snapshots of the state (0: none), and how many are kept.
    pub(super) snapshots: (u64, usize),
    /// The checkpoint of the latest snapshot.
    pub(super) snapshotted: u64,
    /// On a cluster: the plugin's lease, without which nothing is appended or committed.
    pub(super) lease: Option<crate::lease::Lease>,
    /// What this plugin appended before it last stopped, left out of what it derives again.
    pub(super) recovery: Recovery,
}

/// An append still to make.
struct Chunk {
    appends: Vec<StreamAppend>,
    /// Its ids are looked up and indexed (ids a handler fixed).
    indexed: bool,
    /// It holds events the handler derived (counted in the status), not announcements.
    derived: bool,
}

impl Committer {
    /// Appends and commits each job of `queue` in order, until the queue closes or the
    /// runner stops.
    pub(super) async fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        let mut marked = self.store.has_derived().unwrap_or(false);
        while let Some(mut job) = queue.recv().await {
            if self.fenced() {
                return;
            }
            let (derived, dropped) = self.stamp(&mut job);
            let mut backoff = Backoff::new(HOST_BACKOFF);
            // Split once what was appended before a restart is left out.
            let mut chunks: Option<VecDeque<Chunk>> = None;
            let (mut not_appended, letters) = (0u64, job.dead_letters.len());
            loop {
                let step = self
                    .try_job(&mut job, &mut chunks, &mut marked, &mut not_appended)
                    .await;
                let Err(message) = step else { break };
                let message = self.limits.bound(message);
                let wait = backoff.next();
                tracing::warn!(plugin = self.plugin, error = %message, retry_in = ?wait, "batch failed");
                self.status.update(|s| {
                    s.errors += 1;
                    s.consecutive_errors += 1;
                    s.last_error = Some(message.clone());
                    s.state = RunState::Failing;
                });
                tokio::select! {
                    _ = self.stopped.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if self.fenced() {
                    return;
                }
            }
            let live = job.resume >= self.bus.head();
            self.status.update(|s| {
                s.position = job.resume;
                s.events_processed = job.processed;
                s.batches += 1;
                s.consecutive_errors = 0;
                s.derived += derived.saturating_sub(not_appended);
                s.dropped_by_depth += dropped;
                s.dead_lettered += (job.dead_letters.len() - letters) as u64;
                s.state = if live {
                    RunState::Live
                } else {
                    RunState::CatchingUp
                };
            });
            tracing::trace!(plugin = self.plugin, events = job.events, took = ?job.started.elapsed(), "batch committed");
            metrics::histogram!(crate::telemetry::PLUGIN_BATCH_SECONDS, "plugin" => self.name.clone())
                .record(job.started.elapsed());
            let _ = self.committed.send(job.resume);
            self.recovery.passed(job.resume);
            self.snapshot_past(job.resume);
        }
    }

    /// Stamps what `job`'s handler derived (ids, causation, correlation, depth) and groups
    /// it into appends after the job's own; answers how many events were kept and how many
    /// were dropped as too deep.
    fn stamp(&self, job: &mut Job) -> (u64, u64) {
        if job.output.is_empty() {
            return (0, 0);
        }
        let (appends, kept, dropped) =
            derived_appends(&self.name, &job.part, std::mem::take(&mut job.output));
        job.appends.extend(appends);
        if dropped > 0 {
            tracing::warn!(
                plugin = self.plugin,
                dropped,
                limit = MAX_DERIVATION_DEPTH,
                "derived events dropped: deeper than the derivation depth limit (a cycle between extractors?)"
            );
        }
        (kept, dropped)
    }

    /// One try at `job`: leaves out (once) what this plugin appended before a restart,
    /// makes the appends left, and commits the writes with the checkpoint; what was left
    /// out or not appended is counted in `not_appended`.
    async fn try_job(
        &mut self,
        job: &mut Job,
        chunks: &mut Option<VecDeque<Chunk>>,
        marked: &mut bool,
        not_appended: &mut u64,
    ) -> Result<(), String> {
        let chunks = match chunks {
            Some(c) => c,
            None => {
                // Ids a handler fixed are looked up by the log itself.
                if !job.fixed_ids && !job.appends.is_empty() {
                    let count =
                        |a: &[StreamAppend]| a.iter().map(|a| a.events.len()).sum::<usize>();
                    let before = count(&job.appends);
                    self.recovery
                        .drop_appended(&self.name, &self.log, &mut job.appends)
                        .await?;
                    *not_appended += (before - count(&job.appends)) as u64;
                }
                let split = split_appends(
                    std::mem::take(&mut job.appends),
                    self.limits.max_batch_events,
                );
                // A job derives events from its part, or carries a dead letter's
                // announcements (and no part), never both.
                let derived = !job.part.is_empty();
                chunks.insert(
                    split
                        .into_iter()
                        .map(|appends| Chunk {
                            appends,
                            indexed: job.fixed_ids,
                            derived,
                        })
                        .collect(),
                )
            }
        };
        self.append(job, chunks, marked, not_appended).await?;
        self.store
            .commit_with(
                &job.writes,
                job.resume,
                job.processed,
                &job.dead_letters,
                job.quarantine.as_ref(),
            )
            .map_err(|e| format!("committing state failed: {e}"))
    }

    /// True when the plugin's lease is lost: another host may run it now, so this one
    /// appends and commits nothing more (the next holder re-runs from the checkpoint).
    fn fenced(&self) -> bool {
        let fenced = self.lease.as_ref().is_some_and(|l| !l.holds());
        if fenced {
            tracing::warn!(
                plugin = self.plugin,
                "lease lost: the batches not yet committed are left to the next holder"
            );
        }
        fenced
    }

    /// Keeps a copy of the state when `checkpoint` has passed the next snapshot interval;
    /// a failure is logged (time travel replays from an older copy).
    fn snapshot_past(&mut self, checkpoint: u64) {
        let (every, keep) = self.snapshots;
        if every == 0 || checkpoint / every <= self.snapshotted / every {
            return;
        }
        let started = std::time::Instant::now();
        match self.store.snapshot(checkpoint, keep) {
            Ok(()) => {
                self.snapshotted = checkpoint;
                tracing::debug!(plugin = self.plugin, checkpoint, took = ?started.elapsed(), "state snapshot kept");
            }
            Err(e) => {
                tracing::warn!(plugin = self.plugin, checkpoint, error = %e, "keeping a state snapshot failed")
            }
        }
    }

    /// Makes the appends left in `chunks`, counting in `not_appended` the derived events the
    /// log refused or held already; a storage failure puts the failed one back and answers
    /// why.
    async fn append(
        &self,
        job: &mut Job,
        chunks: &mut VecDeque<Chunk>,
        marked: &mut bool,
        not_appended: &mut u64,
    ) -> Result<(), String> {
        while let Some(c) = chunks.pop_front() {
            if self.fenced() {
                chunks.push_front(c);
                return Err("the plugin's lease was lost".into());
            }
            // Durable before the first derived event of this plugin name, so a later start
            // knows to look for what it appended (see `Recovery`).
            if !*marked {
                if let Err(e) = self.store.mark_derived() {
                    chunks.push_front(c);
                    return Err(format!("recording that derived events follow failed: {e}"));
                }
                *marked = true;
            }
            let r = if c.indexed {
                // Ids a handler fixed are looked up later (tool outcomes): indexed.
                self.log.append(c.appends.clone()).await
            } else {
                self.log.append_unindexed(c.appends.clone()).await
            };
            let Chunk {
                appends: chunk,
                indexed,
                derived,
            } = c;
            match r {
                // An id the log held already (a batch run again) is not counted as derived.
                Ok(done) if derived => {
                    *not_appended += done
                        .iter()
                        .flat_map(|a| &a.written)
                        .filter(|w| !**w)
                        .count() as u64
                }
                Ok(_) => {}
                Err(e @ AppendError::Storage(_)) => {
                    chunks.push_front(Chunk {
                        appends: chunk,
                        indexed,
                        derived,
                    });
                    return Err(format!("appending derived events failed: {e}"));
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
                                chunks.push_front(Chunk {
                                    appends: vec![alone],
                                    indexed,
                                    derived,
                                });
                            }
                        }
                        continue;
                    }
                    if derived {
                        *not_appended += 1;
                    }
                    let event = &chunk[0].events[0];
                    if let Some(announce) = self.refused(job, event, &e) {
                        // Indexed: a batch that runs again announces once.
                        chunks.push_back(Chunk {
                            appends: vec![announce],
                            indexed: true,
                            derived: false,
                        });
                    }
                    let message = self.limits.bound(format!(
                        "the log refused a derived {} event: {e}",
                        event.event_type
                    ));
                    self.status.update(|s| {
                        s.errors += 1;
                        s.last_error = Some(message.clone());
                    });
                }
            }
        }
        Ok(())
    }

    /// Handles a derived event the log refused on its own (deterministically: too large,
    /// invalid): the event it was derived from is dead-lettered with the checkpoint, and
    /// the dead letter announced; returns the announcement to append, if any.
    fn refused(
        &self,
        job: &mut Job,
        event: &NewEvent,
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
        if job
            .dead_letters
            .iter()
            .any(|d| d.position == source.position)
        {
            return None;
        }
        let entry = DeadLetter::new(&self.name, &source, message.clone(), 1);
        let id = entry.id.clone();
        job.dead_letters.push(entry);
        if depth_of(&source) >= MAX_DERIVATION_DEPTH {
            return None;
        }
        let mut announce = audit(
            dead_letter::DEAD_LETTERED,
            &self.name,
            json!({
                "dead_letter_id": id,
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
        deepen(&mut announce, &source);
        Some(announce)
    }
}
