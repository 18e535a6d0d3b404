//! Time travel: a projection's past state replayed into a scratch store from the nearest
//! snapshot, as the live run folded it; read by key, prefix or query, or compared between
//! two positions.

use std::sync::Arc;

use super::{Registry, RegistryError, blocking, projection_of, storage, store_error};
use crate::event::Event;
use crate::log::{EventLog, ReadFilter};
use crate::pattern::PatternSet;
use crate::plugin::{MemState, PluginError, PluginStore, ProjectionPlugin, StateView};

/// Folds `events` into `scratch` in order as the live run did: an event the plugin fails on
/// (its own fault, which the live run dead-lettered) is passed over, found by halving the
/// failing batch, and the events around it are folded. A failure of the host ends the
/// replay. Returns how many events were passed over.
pub(super) fn fold_passing_failures(
    plugin: &ProjectionPlugin,
    scratch: &Arc<MemState>,
    events: &[Arc<Event>],
) -> Result<u64, PluginError> {
    match plugin.fold(scratch.clone(), events) {
        Ok(writes) => {
            scratch.apply(writes);
            Ok(0)
        }
        Err(e @ PluginError::Host { .. }) => Err(e),
        Err(_) if events.len() == 1 => Ok(1),
        Err(_) => {
            let (first, second) = events.split_at(events.len() / 2);
            Ok(fold_passing_failures(plugin, scratch, first)?
                + fold_passing_failures(plugin, scratch, second)?)
        }
    }
}

/// Where a replay reads from: the plugin, its subscriptions, and the log.
struct Replay {
    plugin: ProjectionPlugin,
    filter: ReadFilter,
    page_size: usize,
    log: Arc<dyn EventLog>,
    name: String,
}

impl Replay {
    /// Folds the events at positions `from..=to` into `scratch`, reading the next page while
    /// folding the current one.
    async fn fold(&self, scratch: &Arc<MemState>, from: u64, to: u64) -> Result<(), RegistryError> {
        let read = |from: u64| {
            let (log, filter, size) = (self.log.clone(), self.filter.clone(), self.page_size);
            tokio::spawn(async move { log.read(from, size, &filter).await })
        };
        let mut pending = (from <= to).then(|| (from, read(from)));
        while let Some((from, reading)) = pending.take() {
            let page = reading.await.map_err(storage)?.map_err(storage)?;
            if page.next > from && page.next <= to {
                pending = Some((page.next, read(page.next)));
            }
            let events: Vec<Arc<Event>> = page
                .events
                .into_iter()
                .filter(|e| e.position <= to)
                .map(Arc::new)
                .collect();
            if events.is_empty() {
                continue;
            }
            let (p, s) = (self.plugin.clone(), scratch.clone());
            let passed =
                tokio::task::spawn_blocking(move || fold_passing_failures(&p, &s, &events))
                    .await
                    .map_err(storage)??;
            if passed > 0 {
                tracing::debug!(
                    plugin = self.name,
                    passed,
                    "the replay passed over events the plugin fails on"
                );
            }
        }
        Ok(())
    }
}

/// A projection's state as it was right after one position, in a scratch store.
pub struct PastState {
    /// The position it is the state right after.
    pub position: u64,
    /// Where the replay started: a snapshot's checkpoint, or the state's origin.
    pub replayed_from: u64,
    plugin: ProjectionPlugin,
    state: Arc<MemState>,
}

impl PastState {
    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<String> {
        self.state
            .0
            .read()
            .expect("scratch state lock")
            .get(key)
            .cloned()
    }

    /// Up to `limit` keys starting with `prefix`, in key order.
    pub fn scan(&self, prefix: &str, limit: usize) -> Vec<(String, String)> {
        self.state
            .0
            .read()
            .expect("scratch state lock")
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The plugin's query answered over this state.
    pub async fn query(&self, request: String) -> Result<String, RegistryError> {
        let (p, view) = (
            self.plugin.clone(),
            self.state.clone() as Arc<dyn StateView>,
        );
        tokio::task::spawn_blocking(move || p.query(view, &request))
            .await
            .map_err(storage)?
            .map_err(RegistryError::from)
    }
}

/// What changed in a projection's state between two positions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Changes {
    /// The earlier position.
    pub from: u64,
    /// The later position.
    pub to: u64,
    /// Keys with a value at both, different.
    pub changed: u64,
    /// Keys with a value only at `to`.
    pub added: u64,
    /// Keys with a value only at `from`.
    pub removed: u64,
    /// Some of them, in key order.
    pub sample: Vec<super::reads::DiffSample>,
}

/// What verifying a projection found: its live state against a replay of the log from
/// the start up to the same checkpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verified {
    /// The checkpoint both states reflect.
    pub position: u64,
    /// True when the live state is the replay's, key for key.
    pub equal: bool,
    /// SHA-256 of the live state's keys and values, in key order.
    pub live_hash: String,
    /// The same of the replayed state.
    pub replayed_hash: String,
    /// Keys equal in both.
    pub same: u64,
    /// Keys in both with different values.
    pub differ: u64,
    /// Keys only the live state has.
    pub only_live: u64,
    /// Keys only the replay has.
    pub only_replayed: u64,
    /// The first keys that differ, in key order (`old` is the live value, `new` the
    /// replayed one).
    pub sample: Vec<super::reads::DiffSample>,
    /// Milliseconds the replay and comparison took.
    pub took_ms: u64,
}

impl Registry {
    /// Replays projection `name` from the start of its state into a scratch store up to its
    /// live checkpoint and compares the two (following the checkpoint while it moves, a
    /// few times at most).
    pub async fn verify(&self, name: &str, sample: usize) -> Result<Verified, RegistryError> {
        let started = std::time::Instant::now();
        let (replay, store, origin) = self.replay_of(name).await?;
        let scratch = Arc::new(MemState::default());
        let mut pos = origin;
        for _ in 0..20 {
            let target = store.checkpoint().map_err(store_error)?.unwrap_or(origin);
            if target > pos {
                replay.fold(&scratch, pos, target - 1).await?;
                pos = target;
            }
            let (s, m) = (store.clone(), scratch.clone());
            let (at, c) = blocking(move || s.optimistic(|s| s.compare_with(&m, sample)))
                .await?
                .map_err(store_error)?;
            if at != pos {
                continue;
            }
            let json = |v: String| serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
            return Ok(Verified {
                position: at,
                equal: c.differ == 0 && c.only_in_first == 0 && c.only_in_second == 0,
                live_hash: c.hashes.0,
                replayed_hash: c.hashes.1,
                same: c.same,
                differ: c.differ,
                only_live: c.only_in_first,
                only_replayed: c.only_in_second,
                sample: c
                    .sample
                    .into_iter()
                    .map(|(key, old, new)| super::reads::DiffSample {
                        key,
                        old: old.map(json),
                        new: new.map(json),
                    })
                    .collect(),
                took_ms: started.elapsed().as_millis() as u64,
            });
        }
        Err(RegistryError::Conflict(format!(
            "projection {name:?} kept moving past the replay; verify again when appends pause"
        )))
    }

    /// What replaying `name` needs: the plugin and its filter, its live store, its origin.
    async fn replay_of(&self, name: &str) -> Result<(Replay, PluginStore, u64), RegistryError> {
        let (plugin, manifest, store) = self.with(name, |l| {
            (l.plugin.clone(), l.manifest.clone(), l.store.clone())
        })?;
        let plugin = projection_of(name, plugin)?;
        // Where the state began: 0, or the head when a `start = "now"` plugin was loaded.
        let origin = store.origin().map_err(store_error)?;
        let replay = Replay {
            plugin,
            filter: ReadFilter {
                types: Some(PatternSet::new(manifest.subscriptions.clone())),
                ..ReadFilter::default()
            },
            page_size: manifest.limits.batch_size.max(4096),
            log: self.log.clone(),
            name: name.to_owned(),
        };
        Ok((replay, store, origin))
    }

    /// What replaying `name` up to right after `position` needs, refusing a position
    /// outside its state (before its origin, or not in the log yet).
    async fn replay_to(
        &self,
        name: &str,
        position: u64,
    ) -> Result<(Replay, PluginStore, u64), RegistryError> {
        let (replay, store, origin) = self.replay_of(name).await?;
        if position < origin {
            return Err(RegistryError::Invalid(format!(
                "projection {name:?} starts at position {origin} (start = \"now\"); it has no state at {position}"
            )));
        }
        let head = self.log.head();
        if position >= head {
            return Err(RegistryError::Invalid(format!(
                "position {position} is not in the log yet (the head is {head})"
            )));
        }
        Ok((replay, store, origin))
    }

    /// A scratch store at the latest snapshot at or before checkpoint `by` (or empty at
    /// `origin`), and that checkpoint.
    async fn start_at(
        store: &PluginStore,
        by: u64,
        origin: u64,
    ) -> Result<(u64, Arc<MemState>), RegistryError> {
        let s = store.clone();
        let snapshot = blocking(move || s.snapshot_before(by))
            .await?
            .map_err(store_error)?;
        Ok(match snapshot {
            Some((at, state)) if at >= origin => (at, Arc::new(state)),
            _ => (origin, Arc::new(MemState::default())),
        })
    }

    /// `name`'s state as it was right after the event at `position`, replayed into a
    /// scratch store from the nearest snapshot; the plugin's real state is not touched.
    pub async fn state_at(&self, name: &str, position: u64) -> Result<PastState, RegistryError> {
        let (replay, store, origin) = self.replay_to(name, position).await?;
        let (from, scratch) = Self::start_at(&store, position + 1, origin).await?;
        replay.fold(&scratch, from, position).await?;
        Ok(PastState {
            position,
            replayed_from: from,
            plugin: replay.plugin,
            state: scratch,
        })
    }

    /// What changed in `name`'s state between right after `from` and right after `to`, in
    /// one replay.
    pub async fn changes(
        &self,
        name: &str,
        from: u64,
        to: u64,
        sample: usize,
    ) -> Result<Changes, RegistryError> {
        if from >= to {
            return Err(RegistryError::Invalid(format!(
                "from ({from}) must be before to ({to})"
            )));
        }
        let (replay, store, origin) = self.replay_to(name, to).await?;
        if from < origin {
            return Err(RegistryError::Invalid(format!(
                "projection {name:?} starts at position {origin} (start = \"now\"); it has no state at {from}"
            )));
        }
        let (start, scratch) = Self::start_at(&store, from + 1, origin).await?;
        replay.fold(&scratch, start, from).await?;
        let before = scratch.0.read().expect("scratch state lock").clone();
        replay.fold(&scratch, from + 1, to).await?;
        let after = scratch.0.read().expect("scratch state lock");
        let mut c = Changes {
            from,
            to,
            changed: 0,
            added: 0,
            removed: 0,
            sample: Vec::new(),
        };
        let json =
            |v: &String| serde_json::from_str(v).unwrap_or(serde_json::Value::String(v.clone()));
        let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let (old, new) = (before.get(key), after.get(key));
            match (old, new) {
                (Some(a), Some(b)) if a == b => continue,
                (Some(_), Some(_)) => c.changed += 1,
                (None, Some(_)) => c.added += 1,
                (Some(_), None) => c.removed += 1,
                (None, None) => continue,
            }
            if c.sample.len() < sample {
                c.sample.push(super::reads::DiffSample {
                    key: key.clone(),
                    old: old.map(json),
                    new: new.map(json),
                });
            }
        }
        Ok(c)
    }

    /// The position of `stream`'s event at `version` (its order in the stream, from 0).
    pub async fn position_of_version(
        &self,
        stream: &str,
        version: u64,
    ) -> Result<u64, RegistryError> {
        let events = self
            .log
            .read_stream(stream, version, 1)
            .await
            .map_err(|e| RegistryError::Invalid(format!("reading stream {stream:?}: {e}")))?;
        match events.first() {
            Some(e) if e.version == version => Ok(e.position),
            _ => Err(RegistryError::Invalid(format!(
                "stream {stream:?} has no event at version {version} (versions count from 0)"
            ))),
        }
    }
}
