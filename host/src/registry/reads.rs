//! Reads of a projection's state: now (a key, a prefix, a query), each answered wholly by
//! one version and saying where it stands; after a position (`min_position`, so a client
//! reads its own writes); at a past position (time travel); and two versions compared.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::upgrade::{Role, status_of};
use super::{Loaded, Registry, RegistryError, blocking, projection_of, storage, store_error};
use crate::plugin::{PluginStore, StateView, valid_name};

/// How often a read waiting for a position looks again.
const WAIT_STEP: Duration = Duration::from_millis(2);

/// Where a read's answer stands: the position the state reflects and the version that
/// built it.
#[derive(Debug, Clone, Serialize)]
pub struct ReadAt {
    /// The state reflects every event before this position (the projection's checkpoint).
    pub position: u64,
    /// The manifest's version of the plugin version that built the state.
    pub version: String,
    /// SHA-256 of the component that built it.
    pub component_hash: String,
}

/// One side of a [`StateDiff`].
#[derive(Debug, Clone, Serialize)]
pub struct DiffSide {
    /// `live`, `candidate`, `shadow` or `previous`.
    pub role: &'static str,
    /// The manifest's version.
    pub version: String,
    /// SHA-256 of its component.
    pub component_hash: String,
}

/// A key whose value differs between the two versions.
#[derive(Debug, Clone, Serialize)]
pub struct DiffSample {
    /// The key.
    pub key: String,
    /// The old version's value, absent when only the new one has the key.
    pub old: Option<serde_json::Value>,
    /// The new version's value, absent when only the old one has the key.
    pub new: Option<serde_json::Value>,
}

/// Two versions of a projection compared at one checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct StateDiff {
    /// The checkpoint both states reflect.
    pub position: u64,
    /// The older version: the live one against a candidate or shadow, the previous one
    /// against the live one.
    pub old: DiffSide,
    /// The newer version.
    pub new: DiffSide,
    /// Keys with equal values.
    pub same: u64,
    /// Keys in both with different values.
    pub differ: u64,
    /// Keys only the old version has.
    pub only_in_old: u64,
    /// Keys only the new version has.
    pub only_in_new: u64,
    /// Some of the keys that are not the same, in key order.
    pub sample: Vec<DiffSample>,
}

/// Stored state is JSON text by convention; anything else is a string.
fn as_json(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

impl Registry {
    pub(super) fn with<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Loaded) -> T,
    ) -> Result<T, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::NotFound(name.to_owned()));
        }
        let loaded = self.loaded();
        loaded
            .get(name)
            .map(f)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))
    }

    /// Waits up to `wait` until `name`'s live state reflects the event at `min` (its
    /// checkpoint is past it).
    async fn reached(
        &self,
        name: &str,
        min: Option<u64>,
        wait: Duration,
    ) -> Result<(), RegistryError> {
        let Some(min) = min else {
            return self.with(name, |_| ());
        };
        let head = self.log.head();
        if min >= head {
            return Err(RegistryError::Invalid(format!(
                "min_position {min} is not in the log yet (the head is {head}); give a position an append answered"
            )));
        }
        let deadline = Instant::now() + wait;
        loop {
            let status = self.with(name, status_of)?;
            if status.position > min {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RegistryError::NotReached(format!(
                    "projection {name:?} has not reached position {min} within {} ms: it is at {} ({:?}{})",
                    wait.as_millis(),
                    status.position,
                    status.state,
                    status
                        .last_error
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default()
                )));
            }
            tokio::time::sleep(WAIT_STEP).await;
        }
    }

    /// The live version's store and what a read of it says about where it stands.
    fn live_store(&self, name: &str) -> Result<(PluginStore, String, String), RegistryError> {
        self.with(name, |l| {
            (l.store.clone(), l.manifest.version.clone(), l.hash.clone())
        })
    }

    /// [`Registry::live_store`], and for an unloaded plugin its kept state, read while
    /// holding its name (so no purge or load runs meanwhile).
    async fn read_store<T>(
        &self,
        name: &str,
        read: impl FnOnce(&PluginStore) -> crate::plugin::StoreResult<T>,
    ) -> Result<(u64, T, String, String), RegistryError> {
        match self.live_store(name) {
            Ok((store, version, hash)) => {
                let (p, v) = store.consistent(read).map_err(store_error)?;
                Ok((p, v, version, hash))
            }
            Err(RegistryError::NotFound(n)) if valid_name(&n) => {
                let _held = self.names.lock(&n).await;
                if let Ok((store, version, hash)) = self.live_store(&n) {
                    // Loaded meanwhile.
                    let (p, v) = store.consistent(read).map_err(store_error)?;
                    return Ok((p, v, version, hash));
                }
                let (store, version, hash) = self.kept_store(&n)?;
                let (p, v) = store.consistent(read).map_err(store_error)?;
                Ok((p, v, version, hash))
            }
            Err(e) => Err(e),
        }
    }

    /// The state an unloaded plugin left, when there is one (never creating a store). The
    /// caller holds the name, so no load or purge runs meanwhile.
    fn kept_store(&self, name: &str) -> Result<(PluginStore, String, String), RegistryError> {
        let not_found = || RegistryError::NotFound(name.to_owned());
        let generations = crate::plugin::generations(&self.db, name);
        let Some(&last) = generations.last() else {
            return Err(not_found());
        };
        let marked = super::upgrade::live_generation(&self.db, name).map_err(store_error)?;
        let g = marked.filter(|m| generations.contains(m)).unwrap_or(last);
        let store = PluginStore::open_generation(&self.db, name, g).map_err(store_error)?;
        match store.component_hash().map_err(store_error)? {
            Some(hash) => Ok((store, "(unloaded)".to_owned(), hash)),
            None => Err(not_found()),
        }
    }

    /// Refuses a read of `name`'s state on a host of a cluster that does not run it: its
    /// state here is as old as the last time it ran here.
    fn runs_here(&self, name: &str) -> Result<(), RegistryError> {
        let placement = self
            .with(name, |l| l.runner.as_ref().and_then(|r| r.placement()))
            .ok()
            .flatten();
        match placement {
            Some(p) if !p.here && p.host.is_some() => Err(RegistryError::NotHere(
                name.to_owned(),
                crate::runner::ControlError::NotHere(p).to_string(),
            )),
            _ => Ok(()),
        }
    }

    /// The stored state under `key`, without calling the plugin, once the state reflects
    /// `min_position` (waiting up to `wait`).
    pub async fn state(
        &self,
        name: &str,
        key: &str,
        min_position: Option<u64>,
        wait: Duration,
    ) -> Result<(Option<String>, ReadAt), RegistryError> {
        self.runs_here(name)?;
        if min_position.is_some() {
            self.reached(name, min_position, wait).await?;
        }
        let (position, value, version, component_hash) =
            self.read_store(name, |s| s.get(key)).await?;
        Ok((
            value,
            ReadAt {
                position,
                version,
                component_hash,
            },
        ))
    }

    /// Up to `limit` stored keys starting with `prefix`, without calling the plugin, once
    /// the state reflects `min_position`.
    pub async fn state_prefix(
        &self,
        name: &str,
        prefix: &str,
        limit: usize,
        min_position: Option<u64>,
        wait: Duration,
    ) -> Result<(Vec<(String, String)>, ReadAt), RegistryError> {
        self.runs_here(name)?;
        if min_position.is_some() {
            self.reached(name, min_position, wait).await?;
        }
        let (position, items, version, component_hash) =
            self.read_store(name, |s| s.scan(prefix, limit)).await?;
        Ok((
            items,
            ReadAt {
                position,
                version,
                component_hash,
            },
        ))
    }

    /// Calls the plugin's `query` export, once the state reflects `min_position`; the
    /// answer comes from one version over state no commit changed meanwhile.
    pub async fn query(
        &self,
        name: &str,
        request: String,
        min_position: Option<u64>,
        wait: Duration,
    ) -> Result<(String, ReadAt), RegistryError> {
        self.runs_here(name)?;
        self.reached(name, min_position, wait).await?;
        let (plugin, store, version, component_hash) = self.with(name, |l| {
            (
                l.plugin.clone(),
                l.store.clone(),
                l.manifest.version.clone(),
                l.hash.clone(),
            )
        })?;
        let plugin = projection_of(name, plugin)?;
        let view: Arc<dyn StateView> = Arc::new(store.clone());
        let (position, answer) = tokio::task::spawn_blocking(move || {
            let mut answer = None;
            let read = store.optimistic(|_| {
                answer = Some(plugin.query(view.clone(), &request));
                Ok(())
            });
            read.map(|(p, ())| (p, answer.expect("the query ran")))
        })
        .await
        .map_err(storage)?
        .map_err(store_error)?;
        Ok((
            answer?,
            ReadAt {
                position,
                version,
                component_hash,
            },
        ))
    }

    /// Compares `name`'s live state with the version kept beside it, at one checkpoint:
    /// waits up to `wait` for both to reach the same one.
    pub async fn diff(
        &self,
        name: &str,
        sample: usize,
        wait: Duration,
    ) -> Result<StateDiff, RegistryError> {
        let side = |l: &Loaded, role| DiffSide {
            role,
            version: l.manifest.version.clone(),
            component_hash: l.hash.clone(),
        };
        let (live, other, live_first) = self.with(name, |l| {
            l.staged.as_ref().map(|s| {
                let (role, live_first) = match s.role {
                    Role::Candidate(_) => ("candidate", true),
                    Role::Shadow => ("shadow", true),
                    Role::Previous => ("previous", false),
                };
                ((l.store.clone(), side(l, "live")), (s.version.store.clone(), side(&s.version, role)), live_first)
            })
        })?
        .ok_or_else(|| RegistryError::Conflict(format!(
            "plugin {name:?} has no other version to compare with; load a different component with --shadow (or as an upgrade) first"
        )))?;
        let ((old, old_side), (new, new_side)) = if live_first {
            (live, other)
        } else {
            (other, live)
        };
        let deadline = Instant::now() + wait;
        loop {
            let (o, n) = (old.clone(), new.clone());
            let compared = blocking(move || {
                let (co, cn) = (o.checkpoint()?, n.checkpoint()?);
                if co != cn {
                    return Ok(Err((co.unwrap_or(0), cn.unwrap_or(0))));
                }
                let (co, (cn, c)) = o.optimistic(|o| n.optimistic(|n| o.compare(n, sample)))?;
                Ok::<_, crate::plugin::StoreError>(if co == cn {
                    Ok((co, c))
                } else {
                    Err((co, cn))
                })
            })
            .await?
            .map_err(store_error)?;
            match compared {
                Ok((position, c)) => {
                    return Ok(StateDiff {
                        position,
                        old: old_side,
                        new: new_side,
                        same: c.same,
                        differ: c.differ,
                        only_in_old: c.only_in_first,
                        only_in_new: c.only_in_second,
                        sample: c
                            .sample
                            .into_iter()
                            .map(|(key, old, new)| DiffSample {
                                key,
                                old: old.map(as_json),
                                new: new.map(as_json),
                            })
                            .collect(),
                    });
                }
                Err((co, cn)) if Instant::now() >= deadline => {
                    return Err(RegistryError::Conflict(format!(
                        "the two versions of {name:?} did not reach the same checkpoint within {} ms (the {} is at {co}, the {} at {cn}); they compare once both have caught up, so try again when appends pause",
                        wait.as_millis(),
                        old_side.role,
                        new_side.role
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}
