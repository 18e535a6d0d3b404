//! Blue/green upgrades of projections: a different component for a loaded projection builds
//! its state in a store of its own while the live version goes on serving; when it has
//! caught up (or when the operator promotes it) reads switch to it at once, and the
//! replaced version keeps following the log so a rollback is immediate, until it is
//! discarded. A shadow run builds beside the live version and never switches by itself.
//!
//! Which version is live survives a restart through the files in `DATA/plugins/` alone:
//! each version's store records the component that built it, and a start opens the store
//! whose component it loads. A candidate or a replaced version is not kept across a
//! restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{
    Component, Loaded, PluginInfo, PluginSource, Registry, RegistryError, Source, blocking,
    persist_files, store_error,
};
use crate::dead_letter::audit;
use crate::plugin::{Kind, Manifest, PluginStore, StartFrom, generations};
use crate::runner::{RunState, RunnerStatus};

/// How often a candidate's progress is checked for the switch.
const WATCH_EVERY: Duration = Duration::from_millis(10);

/// The state database's tree that names each plugin's live generation.
const LIVE_TREE: &str = "plugin-live";

/// Longest a switch waits at the swap for the new version to reach the live checkpoint.
const SWAP_WAIT: Duration = Duration::from_secs(2);

/// Tells staged versions apart, so a watcher never switches to a later one.
static SERIAL: AtomicU64 = AtomicU64::new(1);

/// When a candidate that has caught up takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Switch {
    /// As soon as it has caught up with the live version.
    #[default]
    Auto,
    /// When the operator promotes it (`POST /v1/plugins/{name}/promote`).
    Manual,
}

/// How a load replaces a loaded version of the same plugin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Upgrade {
    /// When a rebuilt projection takes over.
    pub switch: Switch,
    /// Build beside the live version and never switch by itself: compare with the diff,
    /// then promote or discard.
    pub shadow: bool,
    /// Keep the state as it stands: the new component goes on from the checkpoint (a
    /// compatible fix), replaced in place at a batch boundary.
    pub keep_state: bool,
}

/// What an upgrade does with a load.
pub(super) enum Plan {
    /// Start (or replace) the live version; `keep_state` keeps a different component's
    /// predecessor's state and checkpoint.
    InPlace { keep_state: bool },
    /// Build beside the live version.
    Stage(Role),
}

/// What a version kept beside the live one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Building its state; takes over as its switch says.
    Candidate(Switch),
    /// Building its state beside the live version; takes over only when promoted.
    Shadow,
    /// The version a switch replaced, still following the log for a rollback.
    Previous,
}

/// What persisting a version writes to `DATA/plugins/`.
pub(super) struct Upload {
    pub(super) manifest_text: String,
    pub(super) wasm: Vec<u8>,
    pub(super) options: super::LoadOptions,
}

/// A compiled and linked version not yet running.
pub(super) struct Built {
    pub(super) manifest: Manifest,
    pub(super) plugin: Component,
    pub(super) hash: String,
    pub(super) load: Duration,
    pub(super) cached: bool,
    pub(super) source: PluginSource,
    pub(super) upload: Option<Arc<Upload>>,
}

impl Built {
    pub(super) fn into_loaded(self, store: PluginStore, runner: crate::runner::Runner) -> Loaded {
        Loaded {
            manifest: self.manifest,
            plugin: self.plugin,
            store,
            runner: Some(runner),
            stopped: None,
            hash: self.hash,
            load: self.load,
            cached: self.cached,
            source: self.source,
            upload: self.upload,
            staged: None,
        }
    }
}

/// A version kept beside the live one.
pub(super) struct Staged {
    pub(super) role: Role,
    pub(super) version: Box<Loaded>,
    /// Unique among the versions staged in this process.
    serial: u64,
    /// When it took this role, and its checkpoint then (for its rate and ETA).
    since: Instant,
    from: u64,
}

/// What status shows of a version kept beside the live one.
#[derive(Debug, Clone, Serialize)]
pub struct StagedInfo {
    /// `candidate` (switches when caught up, or when promoted with `switch: manual`),
    /// `shadow` (only when promoted) or `previous` (what a rollback returns to).
    pub role: &'static str,
    /// For a candidate: `auto` or `manual`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switch: Option<Switch>,
    /// The manifest's version.
    pub version: String,
    /// SHA-256 of its component.
    pub component_hash: String,
    /// The WIT version its component implements.
    pub wit: crate::plugin::WitVersion,
    /// Its runner: catching_up, live, failing, quarantined.
    pub state: RunState,
    /// Its checkpoint.
    pub position: u64,
    /// Events between its checkpoint and the head.
    pub lag: u64,
    /// Its checkpoint as a percentage of the head (100 when caught up).
    pub percent: f64,
    /// Events per second since it took this role.
    pub events_per_s: f64,
    /// Seconds until it reaches the head at that rate, while it is behind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// Events it has handled.
    pub events_processed: u64,
    /// Its last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Staged {
    pub(super) fn info(&self, head: u64) -> StagedInfo {
        let status = status_of(&self.version);
        let elapsed = self.since.elapsed().as_secs_f64().max(1e-3);
        let rate = status.position.saturating_sub(self.from) as f64 / elapsed;
        let lag = head.saturating_sub(status.position);
        StagedInfo {
            role: match self.role {
                Role::Candidate(_) => "candidate",
                Role::Shadow => "shadow",
                Role::Previous => "previous",
            },
            switch: match self.role {
                Role::Candidate(s) => Some(s),
                _ => None,
            },
            version: self.version.manifest.version.clone(),
            component_hash: self.version.hash.clone(),
            wit: self.version.plugin.wit(),
            state: status.state,
            position: status.position,
            lag,
            percent: if head == 0 {
                100.0
            } else {
                (status.position.min(head) as f64 * 1000.0 / head as f64).floor() / 10.0
            },
            events_per_s: rate.round(),
            eta_s: (lag > 0 && rate > 0.0).then(|| (lag as f64 / rate * 10.0).ceil() / 10.0),
            events_processed: status.events_processed,
            last_error: status.last_error,
        }
    }
}

/// A version's runner status (its last one while it is being stopped).
pub(super) fn status_of(l: &Loaded) -> RunnerStatus {
    match (&l.runner, &l.stopped) {
        (Some(r), _) => r.status(),
        (None, Some(s)) => s.clone(),
        (None, None) => unreachable!("a listed plugin has a runner or its last status"),
    }
}

impl Component {
    pub(super) fn wit(&self) -> crate::plugin::WitVersion {
        match self {
            Component::Projection(p) => p.contract().wit,
            Component::Extractor(p) => p.contract().wit,
            Component::Tool(t) => t.contract().wit,
        }
    }
}

/// Why a switch happens, as the audit event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    CaughtUp,
    Promoted,
    RolledBack,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::CaughtUp => "caught_up",
            Reason::Promoted => "promoted",
            Reason::RolledBack => "rolled_back",
        }
    }
}

impl Registry {
    /// Decides how a load of `manifest` (component `hash`) meets what is loaded as `name`.
    pub(super) fn plan(
        &self,
        name: &str,
        manifest: &Manifest,
        hash: &str,
        upgrade: &Upgrade,
    ) -> Result<Plan, RegistryError> {
        let loaded = self.loaded();
        let live = loaded.get(name);
        let projections = live.is_some_and(|l| {
            l.manifest.kind == Kind::Projection && manifest.kind == Kind::Projection
        });
        let different = live.is_some_and(|l| l.hash != hash);
        // A shadow of the very component that is live rebuilds its state from the log, to
        // verify the live state against it.
        let rebuild = projections && (different || upgrade.shadow);
        let staged_only = upgrade.shadow || upgrade.switch == Switch::Manual;
        if staged_only && !rebuild {
            let flag = if upgrade.shadow {
                "--shadow"
            } else {
                "--switch manual"
            };
            let needs = if upgrade.shadow {
                "a projection"
            } else {
                "a different component"
            };
            let why = match live {
                None => "none is loaded, so load it plainly".to_owned(),
                Some(l) if l.hash == hash => "this is the component already loaded".to_owned(),
                Some(l) => format!(
                    "the loaded one is {} {} and this is {} {}",
                    article(l.manifest.kind),
                    l.manifest.kind.as_str(),
                    article(manifest.kind),
                    manifest.kind.as_str()
                ),
            };
            return Err(RegistryError::Invalid(format!(
                "{flag} needs a loaded projection {name:?} and {needs} to build beside it; {why}"
            )));
        }
        if upgrade.keep_state && staged_only {
            return Err(RegistryError::Invalid(
                "--keep-state replaces the component in place; it cannot be combined with --shadow or --switch manual".into(),
            ));
        }
        let same_kind = live.is_some_and(|l| l.manifest.kind == manifest.kind);
        if upgrade.keep_state && live.is_some() && !same_kind {
            return Err(RegistryError::Invalid(format!(
                "--keep-state keeps the state of the same kind of plugin; {name:?} is loaded as another kind, so its state starts over: load without --keep-state"
            )));
        }
        // Extractors and tools go on from their checkpoint: deriving again from the start
        // would only find what their name already derived.
        Ok(if rebuild && !upgrade.keep_state {
            Plan::Stage(if upgrade.shadow {
                Role::Shadow
            } else {
                Role::Candidate(upgrade.switch)
            })
        } else {
            Plan::InPlace {
                keep_state: same_kind && (upgrade.keep_state || manifest.kind != Kind::Projection),
            }
        })
    }

    /// Opens the store for a plugin loaded while no version of it is: the generation last
    /// made live, when `hash`'s component built it; else one that component built; else
    /// the first (reset by the caller). The other generations (what candidates and
    /// replaced versions left before a restart) are deleted.
    pub(super) async fn open_version(
        &self,
        name: &str,
        hash: &str,
    ) -> Result<PluginStore, RegistryError> {
        let (db, name, hash) = (self.db.clone(), name.to_owned(), hash.to_owned());
        blocking(move || {
            let marked = live_generation(&db, &name)?;
            let mut stores = Vec::new();
            for g in generations(&db, &name) {
                let store = PluginStore::open_generation(&db, &name, g)?;
                let ours = store.component_hash()?.as_deref() == Some(hash.as_str());
                stores.push((ours, store));
            }
            let pick = stores
                .iter()
                .position(|(ours, s)| *ours && Some(s.generation()) == marked)
                .or_else(|| stores.iter().position(|(ours, _)| *ours));
            let chosen = match pick {
                Some(i) => stores.remove(i).1,
                None if stores.is_empty() => PluginStore::open_generation(&db, &name, 0)?,
                None => stores.remove(0).1,
            };
            // Nothing else holds these: no version of the plugin is loaded.
            for (_, store) in stores {
                store.purge(&db)?;
            }
            set_live_generation(&db, &name, chosen.generation())?;
            Ok(chosen)
        })
        .await?
        .map_err(store_error)
    }

    /// Builds `built` beside the live version of its name, in `role`; the caller holds the
    /// name. A version already kept beside it is replaced (its state reused when the same
    /// component built it, except by a shadow of the live component, which rebuilds).
    pub(super) async fn stage(
        self: &Arc<Self>,
        built: Built,
        role: Role,
    ) -> Result<PluginInfo, RegistryError> {
        let name = built.manifest.name.clone();
        let old = self.loaded().get_mut(&name).and_then(|l| l.staged.take());
        let old_store = match old {
            Some(old) => {
                let Loaded { runner, store, .. } = *old.version;
                if let Some(r) = runner {
                    r.stop().await;
                }
                Some(store)
            }
            None => None,
        };
        let (live_gen, live_hash) = self
            .loaded()
            .get(&name)
            .map(|l| (l.store.generation(), l.hash.clone()))
            .ok_or_else(|| RegistryError::NotFound(name.clone()))?;
        let reuse = built.hash != live_hash;
        let origin = match built.manifest.start {
            StartFrom::Beginning => 0,
            StartFrom::Now => self.log.head(),
        };
        let (db, n, hash) = (self.db.clone(), name.clone(), built.hash.clone());
        let store = blocking(move || {
            let gens = generations(&db, &n);
            let mut old_store = old_store;
            let mut chosen = None;
            for &g in gens.iter().filter(|&&g| g != live_gen) {
                // The version staged until now is purged through its own handle, so a read
                // still holding it sees an empty store, never a dropped tree.
                let store = match old_store.take_if(|s| s.generation() == g) {
                    Some(s) => s,
                    None => PluginStore::open_generation(&db, &n, g)?,
                };
                if reuse
                    && chosen.is_none()
                    && store.component_hash()?.as_deref() == Some(hash.as_str())
                {
                    chosen = Some(store);
                } else {
                    // What an earlier candidate or replaced version left.
                    store.purge(&db)?;
                }
            }
            let store = match chosen {
                Some(s) => s,
                None => {
                    let next = gens.iter().max().map_or(1, |g| g + 1).max(live_gen + 1);
                    let s = PluginStore::open_generation(&db, &n, next)?;
                    s.reset(&hash, origin)?;
                    s
                }
            };
            Ok::<_, crate::plugin::StoreError>(store)
        })
        .await?
        .map_err(store_error)?;
        let runner = self.spawn_runner(&built.manifest, &built.plugin, &store)?;
        let from = runner.status().position;
        tracing::info!(
            plugin = name,
            version = built.manifest.version,
            generation = store.generation(),
            from,
            role = ?role,
            "building a new version beside the live one"
        );
        let version = Box::new(built.into_loaded(store, runner));
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let staged = {
            let mut loaded = self.loaded();
            match loaded.get_mut(&name) {
                Some(l) if !self.closed.load(Ordering::Acquire) => {
                    l.staged = Some(Staged {
                        role,
                        version,
                        serial,
                        since: Instant::now(),
                        from,
                    });
                    Ok(self.info_of(l))
                }
                _ => Err(version),
            }
        };
        let info = match staged {
            Ok(info) => info,
            Err(version) => {
                if let Some(r) = version.runner {
                    r.stop().await;
                }
                return Err(RegistryError::Storage(
                    "the host is shutting down; load the new version again after the restart"
                        .into(),
                ));
            }
        };
        if role == Role::Candidate(Switch::Auto) {
            let this = self.clone();
            tokio::spawn(async move { this.watch(name, serial).await });
        }
        Ok(info)
    }

    /// Switches `name` to its automatic candidate `serial` once it has caught up with the
    /// live version; ends when that candidate is gone or has switched.
    async fn watch(self: Arc<Self>, name: String, serial: u64) {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let ready = {
                let loaded = self.loaded();
                let Some(l) = loaded.get(&name) else { return };
                match &l.staged {
                    Some(s) if s.serial == serial && s.role == Role::Candidate(Switch::Auto) => {
                        caught_up(l, s)
                    }
                    _ => return,
                }
            };
            if !ready {
                continue;
            }
            let _held = self.names.lock(&name).await;
            match self
                .switch_held(&name, Some(serial), Reason::CaughtUp)
                .await
            {
                Ok(()) => return,
                // Changed meanwhile (promoted, discarded, replaced, unloaded: the loop
                // ends), or fell behind again (it goes on).
                Err(RegistryError::Conflict(_) | RegistryError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(plugin = name, error = %e, "switching to the new version failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Rebuilds projection `name` from the start of the log, blue/green: the live
    /// component builds a new state beside the live one, which it replaces as `switch`
    /// says.
    pub async fn reset(
        self: &Arc<Self>,
        name: &str,
        switch: Switch,
    ) -> Result<PluginInfo, RegistryError> {
        self.lifecycle(name, move |this, name| async move {
            let built = {
                let loaded = this.loaded();
                let l = loaded
                    .get(&name)
                    .ok_or_else(|| RegistryError::NotFound(name.clone()))?;
                if l.manifest.kind != Kind::Projection {
                    return Err(RegistryError::Invalid(format!(
                        "reset rebuilds a projection's state; {name:?} is {} {}, which keeps no state to rebuild",
                        article(l.manifest.kind),
                        l.manifest.kind.as_str()
                    )));
                }
                Built {
                    manifest: l.manifest.clone(),
                    plugin: l.plugin.clone(),
                    hash: l.hash.clone(),
                    load: l.load,
                    cached: l.cached,
                    source: l.source.clone(),
                    upload: l.upload.clone(),
                }
            };
            this.stage(built, Role::Candidate(switch)).await
        })
        .await
    }

    /// Makes the candidate (or shadow) of `name` live, once it has caught up.
    pub async fn promote(self: &Arc<Self>, name: &str) -> Result<PluginInfo, RegistryError> {
        self.lifecycle(name, |this, name| async move {
            this.switch_held(&name, None, Reason::Promoted).await?;
            this.info(&name).await
        })
        .await
    }

    /// Makes the version the last switch replaced live again, at once.
    pub async fn rollback(self: &Arc<Self>, name: &str) -> Result<PluginInfo, RegistryError> {
        self.lifecycle(name, |this, name| async move {
            this.switch_held(&name, None, Reason::RolledBack).await?;
            this.info(&name).await
        })
        .await
    }

    /// Drops the version kept beside the live one (a candidate, a shadow or the previous
    /// version), with its state.
    pub async fn discard(self: &Arc<Self>, name: &str) -> Result<PluginInfo, RegistryError> {
        self.lifecycle(name, |this, name| async move {
            if !this.loaded().get(&name).is_some_and(|l| l.staged.is_some()) {
                return Err(RegistryError::Conflict(format!(
                    "plugin {name:?} has no candidate, shadow or previous version to discard"
                )));
            }
            this.discard_staged(&name).await?;
            this.info(&name).await
        })
        .await
    }

    /// Runs `op` as a task holding `name` (a client that hangs up cannot leave it half
    /// done).
    async fn lifecycle<F, Fut, T>(self: &Arc<Self>, name: &str, op: F) -> Result<T, RegistryError>
    where
        F: FnOnce(Arc<Self>, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, RegistryError>> + Send,
        T: Send + 'static,
    {
        if !crate::plugin::valid_name(name) {
            return Err(RegistryError::NotFound(name.to_owned()));
        }
        self.check_hot_load()?;
        let (this, name) = (self.clone(), name.to_owned());
        super::spawn_here(async move {
            let _held = this.names.lock(&name).await;
            op(this.clone(), name).await
        })
        .await
        .map_err(super::storage)?
    }

    /// Stops the version kept beside `name`'s live one and deletes its state; the caller
    /// holds the name.
    pub(super) async fn discard_staged(&self, name: &str) -> Result<(), RegistryError> {
        let staged = self.loaded().get_mut(name).and_then(|l| l.staged.take());
        let Some(staged) = staged else { return Ok(()) };
        let Loaded { runner, store, .. } = *staged.version;
        if let Some(r) = runner {
            r.stop().await;
        }
        let db = self.db.clone();
        blocking(move || store.purge(&db))
            .await?
            .map_err(store_error)?;
        tracing::info!(
            plugin = name,
            "discarded the version kept beside the live one"
        );
        Ok(())
    }

    /// Swaps `name`'s live version with the one kept beside it; the caller holds the name.
    /// `CaughtUp` needs the automatic candidate `serial`, `Promoted` a candidate or
    /// shadow, `RolledBack` the previous version; each only once it has reached the live
    /// checkpoint, so no reader goes back. The new live version's store and files are made
    /// durable first; the swap itself is one step under the map's lock, so every read is
    /// answered wholly by one version.
    async fn switch_held(
        &self,
        name: &str,
        serial: Option<u64>,
        reason: Reason,
    ) -> Result<(), RegistryError> {
        let (upload, source, generation) = {
            let loaded = self.loaded();
            let l = loaded
                .get(name)
                .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
            let s = check_switch(name, l, serial, reason)?;
            (
                s.version.upload.clone(),
                s.version.source.source.clone(),
                s.version.store.generation(),
            )
        };
        let (live_upload, live_source, live_generation_now) = {
            let loaded = self.loaded();
            let l = loaded
                .get(name)
                .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
            (
                l.upload.clone(),
                l.source.source.clone(),
                l.store.generation(),
            )
        };
        self.mark_live(name, generation).await?;
        if let Err(e) = self.persist_live(name, &source, upload.as_deref()).await {
            let _ = self.mark_live(name, live_generation_now).await;
            return Err(e);
        }
        // The name is held, so the version beside the live one stays; only the positions
        // move. The swap waits (briefly) until the new version's store has reached the
        // live one's checkpoint, so that no reader goes back.
        let started = Instant::now();
        let deadline = started + SWAP_WAIT;
        let swapped = loop {
            let done = {
                let mut loaded = self.loaded();
                let l = loaded
                    .get_mut(name)
                    .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
                let s = l.staged.as_ref().expect("the name is held");
                let behind = match (s.version.store.checkpoint(), l.store.checkpoint()) {
                    (Ok(c), Ok(live)) => c < live,
                    _ => true,
                };
                (!behind).then(|| {
                    let mut staged = l.staged.take().expect("the name is held");
                    std::mem::swap(l, &mut *staged.version);
                    staged.role = Role::Previous;
                    staged.since = Instant::now();
                    staged.from = status_of(&staged.version).position;
                    let from = (
                        staged.version.manifest.version.clone(),
                        staged.version.hash.clone(),
                    );
                    l.staged = Some(staged);
                    (from, (l.manifest.version.clone(), l.hash.clone()))
                })
            };
            if done.is_some() || Instant::now() >= deadline {
                break done;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let Some((from, to)) = swapped else {
            let _ = self.mark_live(name, live_generation_now).await;
            let _ = self
                .persist_live(name, &live_source, live_upload.as_deref())
                .await;
            return Err(RegistryError::Conflict(format!(
                "the other version of {name:?} did not keep up with the live one for {} ms while switching; nothing was switched, try again",
                SWAP_WAIT.as_millis()
            )));
        };
        let took = started.elapsed();
        tracing::info!(
            plugin = name,
            from = from.0,
            to = to.0,
            reason = reason.as_str(),
            switch_us = took.as_micros() as u64,
            "switched the live version"
        );
        self.announce(audit(
            crate::dead_letter::SWITCHED,
            name,
            serde_json::json!({
                "reason": reason.as_str(),
                "from": {"version": from.0, "component_hash": from.1},
                "to": {"version": to.0, "component_hash": to.1},
                "switch_us": took.as_micros() as u64,
            }),
            None,
            None,
        ))
        .await;
        Ok(())
    }

    /// Records `generation` as `name`'s live store, durably with every store's commits
    /// so far (the new live version's state is on disk before its files are).
    async fn mark_live(&self, name: &str, generation: u32) -> Result<(), RegistryError> {
        let (db, n) = (self.db.clone(), name.to_owned());
        blocking(move || {
            set_live_generation(&db, &n, generation)?;
            db.flush()?;
            Ok::<_, crate::plugin::StoreError>(())
        })
        .await?
        .map_err(store_error)
    }

    /// Keeps what the next start loads as `name` in step with the version becoming live:
    /// an upload's files, or none (so the operator's `--plugins` copy, or the embedding
    /// program's, loads).
    async fn persist_live(
        &self,
        name: &str,
        source: &Source,
        upload: Option<&Upload>,
    ) -> Result<(), RegistryError> {
        let dir = self.dir.clone();
        let name_owned = name.to_owned();
        let work: Box<dyn FnOnce() -> std::io::Result<()> + Send> = match (source, upload) {
            (Source::Api | Source::Uploaded { .. }, Some(u)) => {
                let (text, wasm, options) =
                    (u.manifest_text.clone(), u.wasm.clone(), u.options.clone());
                Box::new(move || persist_files(&dir, &name_owned, &text, &wasm, &options))
            }
            _ => Box::new(move || {
                for ext in ["wasm", "toml", "load.json"] {
                    match std::fs::remove_file(dir.join(format!("{name_owned}.{ext}"))) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                Ok(())
            }),
        };
        blocking(work).await?.map_err(|e| {
            super::storage(format!(
                "keeping plugin {name}'s new live version in {} failed, so nothing was switched; until a switch succeeds, what the next start loads from there may be either version: {e}",
                self.dir.display()
            ))
        })
    }
}

/// The version beside `l` that a switch for `reason` goes to, if it may.
fn check_switch<'a>(
    name: &str,
    l: &'a Loaded,
    serial: Option<u64>,
    reason: Reason,
) -> Result<&'a Staged, RegistryError> {
    let s = l.staged.as_ref().ok_or_else(|| {
        RegistryError::Conflict(format!(
            "plugin {name:?} has no {} version; {}",
            if reason == Reason::RolledBack {
                "previous"
            } else {
                "candidate or shadow"
            },
            if reason == Reason::RolledBack {
                "a switch to a new version keeps the one it replaced until it is discarded"
            } else {
                "load a different component (or --shadow) to build one"
            }
        ))
    })?;
    match (reason, s.role) {
        (Reason::RolledBack, Role::Previous) => {}
        (Reason::RolledBack, _) => {
            return Err(RegistryError::Conflict(format!(
                "plugin {name:?} has no previous version to roll back to: the version beside it is a {} not yet live; discard it to stay on the live one",
                role_name(s.role)
            )));
        }
        (_, Role::Previous) => {
            return Err(RegistryError::Conflict(format!(
                "plugin {name:?} has no candidate to promote: its other version is the previous one; roll back to return to it"
            )));
        }
        (Reason::CaughtUp, role) if role != Role::Candidate(Switch::Auto) => {
            return Err(RegistryError::Conflict("the candidate changed".into()));
        }
        _ => {}
    }
    if serial.is_some_and(|id| id != s.serial) {
        return Err(RegistryError::Conflict("the candidate changed".into()));
    }
    if !caught_up(l, s) {
        let (c, live) = (status_of(&s.version), status_of(l));
        return Err(RegistryError::Conflict(format!(
            "the {} of {name:?} is at position {} and the live version at {}; it can take over once it has caught up, so that no reader gets a partial or older state (see its progress in GET /v1/plugins/{name})",
            role_name(s.role),
            c.position,
            live.position
        )));
    }
    Ok(s)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Candidate(_) => "candidate",
        Role::Shadow => "shadow",
        Role::Previous => "previous version",
    }
}

fn article(kind: Kind) -> &'static str {
    if kind == Kind::Extractor { "an" } else { "a" }
}

/// The generation last made live for `name`, if recorded.
pub(super) fn live_generation(
    db: &sled::Db,
    name: &str,
) -> Result<Option<u32>, crate::plugin::StoreError> {
    Ok(db
        .open_tree(LIVE_TREE)?
        .get(name)?
        .and_then(|v| v.as_ref().try_into().ok())
        .map(u32::from_be_bytes))
}

/// Records `generation` as `name`'s live one.
fn set_live_generation(
    db: &sled::Db,
    name: &str,
    generation: u32,
) -> Result<(), crate::plugin::StoreError> {
    db.open_tree(LIVE_TREE)?
        .insert(name, &generation.to_be_bytes()[..])?;
    Ok(())
}

/// Forgets which generation of `name` is live (its stores were purged).
pub(super) fn forget_live_generation(
    db: &sled::Db,
    name: &str,
) -> Result<(), crate::plugin::StoreError> {
    db.open_tree(LIVE_TREE)?.remove(name)?;
    Ok(())
}

/// True when the staged version has reached the live version's checkpoint (and is not
/// quarantined), so switching to it never moves a reader back.
fn caught_up(live: &Loaded, staged: &Staged) -> bool {
    let (s, l) = (status_of(&staged.version), status_of(live));
    s.position >= l.position && s.state != RunState::Quarantined
}
