//! The loaded plugins: loading (at start-up from directories, or hot over the API),
//! replacing, unloading, status, and reads of their state (now, by query, or at a past
//! position).
//!
//! A plugin loaded over the API is kept in the data directory (`plugins/`) and loaded again
//! at the next start, so a hot-loaded projection survives a restart.
//!
//! Lifecycle operations on one plugin run one at a time ([`names`]), each as a task of its
//! own (a client that hangs up cannot leave one half done), from the stop of the old runner
//! to the last side effect. The map of loaded plugins is locked only briefly, never across
//! a compile, a runner's stop or a storage scan, so other plugins and status reads are never
//! held up.

mod grants;
mod names;
mod policy;
mod reads;
mod replay;
mod upgrade;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bus::Bus;
use crate::dead_letter::{self, DeadLetter, DeadLetterId, audit};
use crate::log::EventLog;
use crate::pattern::PatternSet;
use crate::plugin::{
    CompileError, ExtractorPlugin, Handler, Kind, LogPage, Manifest, PluginConfig, PluginError,
    PluginStore, ProjectionPlugin, Runtime, StartFrom, StoreError, ToolInfo, ToolPlugin,
    UsageReport, component_hash, valid_name,
};
use crate::runner::{
    ControlError, Controller, RetryOutcome, RunState, Runner, RunnerOptions, RunnerStatus,
};
use crate::schemas::Schemas;
use crate::tools::{REQUESTED, ToolHandler, UnknownTools};
pub use grants::{GrantTable, Grants, LoadOptions};
use names::NameLocks;
pub use policy::PluginPolicy;
pub use reads::{DiffSample, ReadAt, StateDiff};
pub use replay::{Changes, PastState, Verified};
use upgrade::{Role, Staged};
pub use upgrade::{StagedInfo, Switch, Upgrade};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The manifest, the component, or the request is unusable; nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// The operator's policy does not allow it (a cap on what a manifest may claim, or
    /// loading over the API turned off); nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// No plugin by that name is loaded.
    #[error("no plugin named {0:?} is loaded")]
    NotFound(String),
    /// No dead letter has that id.
    #[error("no dead letter {0:?}")]
    DeadLetterNotFound(String),
    /// The plugin failed while answering.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Storage failed (the plugin stores, the data directory, the compile cache): the
    /// host's fault, not the request's.
    #[error("plugin storage failed: {0}")]
    Storage(String),
    /// The request does not fit the plugin's state now (no candidate to promote, one that
    /// has not caught up, two versions at different checkpoints); nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// A read waited for a position the state did not reach in time.
    #[error("{0}")]
    NotReached(String),
    /// Another host of the cluster runs the plugin (it holds the plugin's lease): ask it.
    #[error("plugin {0:?}: {1}")]
    NotHere(String, String),
}

fn storage(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

fn store_error(e: StoreError) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

/// A runner's refusal of an operator's request: the host's failure (a stopped runner is
/// being replaced; storage failed), not the request's.
fn control_error(name: &str, e: ControlError) -> RegistryError {
    match e {
        e @ ControlError::NotHere(_) => RegistryError::NotHere(name.to_owned(), e.to_string()),
        e => RegistryError::Storage(e.to_string()),
    }
}

/// Runs blocking `f` off the async threads.
/// Runs an operation as a task of its own, in the span of whoever asked (a request's), so
/// its log lines say where they came from.
fn spawn_here<F>(op: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracing::Instrument::in_current_span(op))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f).await.map_err(storage)
}

/// Longest wait, when a tool is loaded, for the runner that answers unknown tools to pass
/// what it decided before the tool's name was known.
const UNKNOWN_TOOLS_SETTLE: Duration = Duration::from_secs(10);

/// What a plugin's status reports.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    /// Unique name.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// projection, extractor or tool.
    pub kind: Kind,
    /// The version of the plugin contract (`evhost:plugin` WIT package) the component
    /// implements, told from its exports.
    pub wit: crate::plugin::WitVersion,
    /// Its configuration: the manifest's `[config]` with this load's overrides; secret
    /// values show as `(secret)`.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub config: std::collections::BTreeMap<String, String>,
    /// Patterns it receives.
    pub subscriptions: Vec<String>,
    /// SHA-256 of the component.
    pub component_hash: String,
    /// Milliseconds to compile (or load from the cache) the component.
    pub load_ms: f64,
    /// True when the compiled form came from the cache.
    pub compiled_from_cache: bool,
    /// The runner's state, checkpoint, counters and last error.
    #[serde(flatten)]
    pub status: RunnerStatus,
    /// A tool's description: name, description, input schema.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<ToolInfo>,
    /// The log's head.
    pub head: u64,
    /// Events between the checkpoint and the head.
    pub lag: u64,
    /// Time, memory and fuel the plugin has used, against its limits.
    pub usage: UsageReport,
    /// Events waiting in its dead-letter store.
    pub dead_letters: usize,
    /// Which copy of the plugin runs, and why that one.
    pub source: PluginSource,
    /// A version an upgrade builds beside this one (a candidate or a shadow run), with its
    /// progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate: Option<StagedInfo>,
    /// The version the last switch replaced, kept following the log for a rollback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<StagedInfo>,
}

/// Where a loaded plugin's copy came from.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum Source {
    /// Uploaded over the API, kept in `DATA/plugins/` to load at the next start.
    Api,
    /// A file in the operator's `--plugins` directory.
    PluginsDir {
        /// The manifest's path.
        path: PathBuf,
    },
    /// The copy in `DATA/plugins/` that an earlier upload left, loaded at start.
    Uploaded {
        /// The manifest's path.
        path: PathBuf,
    },
    /// Loaded by the embedding program.
    Embedded,
}

/// [`Source`] with a note when another copy of the same plugin exists and lost.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PluginSource {
    /// Where the running copy came from.
    #[serde(flatten)]
    pub source: Source,
    /// Why this copy runs rather than another one, when there is another one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Which copy loads at start when `--plugins` and `DATA/plugins/` (uploads) both hold a
/// plugin of one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precedence {
    /// The operator's `--plugins` copy; an uploaded copy of the same name is not loaded.
    #[default]
    PluginsDir,
    /// The uploaded copy, so a hot-loaded replacement survives restarts.
    Uploaded,
}

/// The loaded component, by world.
#[derive(Clone)]
enum Component {
    Projection(ProjectionPlugin),
    Extractor(ExtractorPlugin),
    Tool(Arc<ToolHandler>),
}

/// One version of a plugin: the live one, or one an upgrade keeps beside it.
struct Loaded {
    manifest: Manifest,
    plugin: Component,
    store: PluginStore,
    /// `None` only while a lifecycle operation (holding the plugin's name) stops it; the
    /// plugin stays listed meanwhile, with `stopped`.
    runner: Option<Runner>,
    /// The runner's last status, shown while it is being stopped.
    stopped: Option<RunnerStatus>,
    hash: String,
    load: Duration,
    cached: bool,
    source: PluginSource,
    /// What persisting this version writes to `DATA/plugins/` when it becomes live (none
    /// for an embedded one).
    upload: Option<Arc<upgrade::Upload>>,
    /// The version an upgrade builds beside this live one, or the one it replaced.
    staged: Option<Staged>,
}

/// The set of loaded plugins.
pub struct Registry {
    runtime: Arc<Runtime>,
    db: sled::Db,
    bus: Bus,
    log: Arc<dyn EventLog>,
    /// Where plugins loaded over the API are kept.
    dir: PathBuf,
    /// Locked only for short, non-blocking work.
    loaded: Mutex<BTreeMap<String, Loaded>>,
    /// Serializes lifecycle operations per plugin name.
    names: NameLocks,
    /// Names of loaded tools, for the runner that fails requests for unknown ones.
    tools: Arc<RwLock<HashSet<String>>>,
    unknown_tools: Mutex<Option<Runner>>,
    schemas: Schemas,
    /// Set by `stop_all`: no runner starts afterwards.
    closed: AtomicBool,
    /// The log's limits, which runners keep derived output within.
    limits: std::sync::OnceLock<crate::limits::OutputLimits>,
    /// The operator's caps on manifests.
    policy: std::sync::OnceLock<PluginPolicy>,
    /// Plugins found in `--plugins` at start (name -> manifest path), and which copy wins.
    operator: Mutex<(BTreeMap<String, PathBuf>, Precedence)>,
    /// On a cluster of hosts: the leases under which plugins run (each on one host).
    leases: std::sync::OnceLock<crate::lease::Leases>,
}

impl Registry {
    /// A registry storing state in `db` and hot-loaded plugins in `dir`; the events its
    /// plugins derive must satisfy `schemas`.
    pub fn new(
        runtime: Arc<Runtime>,
        db: sled::Db,
        bus: Bus,
        log: Arc<dyn EventLog>,
        dir: PathBuf,
        schemas: Schemas,
    ) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            db,
            bus,
            log,
            dir,
            loaded: Mutex::new(BTreeMap::new()),
            names: NameLocks::default(),
            tools: Arc::default(),
            unknown_tools: Mutex::new(None),
            schemas,
            closed: AtomicBool::new(false),
            limits: std::sync::OnceLock::new(),
            policy: std::sync::OnceLock::new(),
            operator: Mutex::new((BTreeMap::new(), Precedence::default())),
            leases: std::sync::OnceLock::new(),
        })
    }

    /// Runs each plugin started from now on under its lease in `leases`, so one host of
    /// the cluster runs it at a time; call before loading plugins.
    pub fn set_leases(&self, leases: crate::lease::Leases) {
        let _ = self.leases.set(leases);
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Loaded>> {
        self.loaded.lock().expect("loaded plugins lock")
    }

    /// Sets the log's limits for the runners started from now on (the log's defaults
    /// unless set); call before loading plugins.
    pub fn set_limits(&self, limits: crate::limits::OutputLimits) {
        let _ = self.limits.set(limits);
    }

    /// Sets the operator's caps on what manifests may claim; call before loading plugins.
    pub fn set_policy(&self, policy: PluginPolicy) {
        let _ = self.policy.set(policy);
    }

    fn policy(&self) -> &PluginPolicy {
        static OPEN: std::sync::OnceLock<PluginPolicy> = std::sync::OnceLock::new();
        self.policy
            .get()
            .unwrap_or_else(|| OPEN.get_or_init(PluginPolicy::default))
    }

    /// Refuses a load, replace or unload over the API when the operator turned it off.
    pub fn check_hot_load(&self) -> Result<(), RegistryError> {
        if self.policy().hot_load {
            Ok(())
        } else {
            Err(RegistryError::Refused(
                "loading, replacing and unloading plugins over the API is turned off on this host (--no-hot-load); change the --plugins directory and restart instead".into(),
            ))
        }
    }

    fn limits(&self) -> crate::limits::OutputLimits {
        self.limits.get().copied().unwrap_or_default()
    }

    /// Starts answering requests for tools that are not loaded (after the plugins given at
    /// start-up are loaded, so their requests are not failed early).
    pub async fn answer_unknown_tools(&self) -> Result<(), RegistryError> {
        let db = self.db.clone();
        let store = blocking(move || PluginStore::open(&db, "~unknown-tools"))
            .await?
            .map_err(store_error)?;
        let handler =
            UnknownTools::new(self.tools.clone(), self.log.clone()).with_limits(self.limits());
        let runner = Runner::spawn(
            "evhost",
            Arc::new(handler),
            store,
            self.bus.clone(),
            self.log.clone(),
            PatternSet::new(vec![REQUESTED.parse().expect("a valid pattern")]),
            RunnerOptions {
                limits: self.limits(),
                ..RunnerOptions::built_in(512)
            },
        )
        .map_err(storage)?;
        *self.unknown_tools.lock().expect("unknown tools lock") = Some(runner);
        Ok(())
    }

    /// Loads (or replaces) a plugin. `persist` keeps a copy to load at the next start.
    ///
    /// Replacing a plugin with the same component keeps its state and checkpoint. A
    /// different component for a loaded projection is built beside the live version, which
    /// goes on serving, and takes over as `upgrade` says (see [`Upgrade`]); an extractor or
    /// a tool is replaced at a batch boundary and goes on from its checkpoint. When a
    /// replace stops the old runner, that happens before anything of the new one; a storage
    /// failure after that leaves the plugin unloaded.
    ///
    /// `options` are the operator's config overrides and grants for this load: a
    /// capability the manifest asks for must be granted by the host's `--grant` or by them.
    pub async fn load(
        self: &Arc<Self>,
        manifest_text: &str,
        wasm: Vec<u8>,
        persist: bool,
        options: LoadOptions,
        upgrade: Upgrade,
    ) -> Result<PluginInfo, RegistryError> {
        let source = if persist {
            Source::Api
        } else {
            Source::Embedded
        };
        let (this, text) = (self.clone(), manifest_text.to_owned());
        spawn_here(async move {
            this.load_task(text, wasm, source, None, options, upgrade)
                .await
        })
        .await
        .map_err(storage)?
    }

    /// [`Registry::load`] of a copy from `source` (`Source::Api` keeps it for the next
    /// start); `note` says why this copy runs when another exists.
    pub async fn load_from(
        self: &Arc<Self>,
        manifest_text: &str,
        wasm: Vec<u8>,
        source: Source,
        note: Option<String>,
        options: LoadOptions,
    ) -> Result<PluginInfo, RegistryError> {
        let (this, text) = (self.clone(), manifest_text.to_owned());
        spawn_here(async move {
            this.load_task(text, wasm, source, note, options, Upgrade::default())
                .await
        })
        .await
        .map_err(storage)?
    }

    async fn load_task(
        self: Arc<Self>,
        manifest_text: String,
        wasm: Vec<u8>,
        source: Source,
        note: Option<String>,
        options: LoadOptions,
        upgrade: Upgrade,
    ) -> Result<PluginInfo, RegistryError> {
        let persist = source == Source::Api;
        let manifest =
            Manifest::parse(&manifest_text).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let policy = self.policy();
        policy.admits(&manifest).map_err(RegistryError::Refused)?;
        policy
            .admits_grants(&manifest, &options)
            .map_err(RegistryError::Refused)?;
        let config = Arc::new(options.config(&manifest).map_err(RegistryError::Invalid)?);
        let note = note.or_else(|| self.api_note(&manifest.name, &source));
        // Compiling (or loading from the cache) and linking need no lock; the hash stays
        // pinned in the compile cache until the plugin is registered as loaded.
        let runtime = self.runtime.clone();
        let m = manifest.clone();
        let (pin, compiled, wasm) = blocking(move || {
            let pin = runtime.pin(&component_hash(&wasm));
            let compiled = runtime.compile_for(&m, &wasm);
            (pin, compiled, wasm)
        })
        .await?;
        let compiled = compiled.map_err(|e| match e {
            CompileError::Invalid(m) => {
                RegistryError::Invalid(format!("plugin {}: the component {m}", manifest.id()))
            }
            CompileError::Cache(m) => RegistryError::Storage(m),
        })?;
        let plugin = self.component(&compiled, &manifest, config).await?;

        let name = manifest.name.clone();
        let _held = self.names.lock(&name).await;
        let upload = (source != Source::Embedded).then(|| {
            Arc::new(upgrade::Upload {
                manifest_text: manifest_text.clone(),
                wasm: wasm.clone(),
                options: options.clone(),
            })
        });
        let built = upgrade::Built {
            manifest: manifest.clone(),
            plugin: plugin.clone(),
            hash: compiled.hash.clone(),
            load: compiled.took,
            cached: compiled.cached,
            source: PluginSource {
                source: source.clone(),
                note: note.clone(),
            },
            upload,
        };
        let result = match self.plan(&name, &manifest, &compiled.hash, &upgrade)? {
            upgrade::Plan::Stage(role) => self.stage(built, role).await,
            upgrade::Plan::InPlace { keep_state } => {
                self.discard_staged(&name).await?;
                let old_store = self.stop_runner(&name).await;
                let started = self
                    .start(
                        &manifest,
                        &manifest_text,
                        wasm,
                        &plugin,
                        &compiled.hash,
                        old_store,
                        keep_state,
                        persist.then_some(&options),
                    )
                    .await;
                self.finish_load(built, started, persist).await
            }
        };
        drop(pin);
        result
    }

    /// Registers a version started in place as the live one, and announces a load over
    /// the API.
    async fn finish_load(
        &self,
        built: upgrade::Built,
        started: Result<(Runner, PluginStore), RegistryError>,
        persist: bool,
    ) -> Result<PluginInfo, RegistryError> {
        let name = built.manifest.name.clone();
        let manifest = built.manifest.clone();
        let (hash, cached, took) = (built.hash.clone(), built.cached, built.load);
        let (runner, store) = match started {
            Ok(started) => started,
            Err(e) => {
                self.forget(&name);
                return Err(e);
            }
        };
        tracing::info!(
            plugin = manifest.name,
            version = manifest.version,
            kind = manifest.kind.as_str(),
            cached,
            load_ms = took.as_secs_f64() * 1e3,
            "plugin loaded"
        );
        let announcement = persist.then(|| {
            audit(
                dead_letter::LOADED,
                &manifest.name,
                serde_json::json!({
                    "version": manifest.version,
                    "kind": manifest.kind.as_str(),
                    "component_hash": hash,
                }),
                None,
                None,
            )
        });
        let entry = built.into_loaded(store, runner);
        let inserted = {
            let mut loaded = self.loaded();
            if self.closed.load(Ordering::Acquire) {
                Err(entry)
            } else {
                let info = self.info_of(&entry);
                loaded.insert(name.clone(), entry);
                Ok(info)
            }
        };
        let info = match inserted {
            Ok(info) => info,
            Err(entry) => {
                if let Some(r) = entry.runner {
                    r.stop().await;
                }
                self.forget(&name);
                return Err(RegistryError::Storage(
                    "the host is shutting down; load the plugin again after the restart".into(),
                ));
            }
        };
        // Loads over the API are operator actions worth an audit trail; loads at start-up
        // are configuration and would add events on every restart.
        if let Some(a) = announcement {
            self.announce(a).await;
        }
        Ok(info)
    }

    /// Stops the runner of `name` if one runs, keeping the plugin listed (as stopped) until
    /// the caller, who holds the name, replaces or removes it; returns its store.
    async fn stop_runner(&self, name: &str) -> Option<PluginStore> {
        let (runner, store) = {
            let mut loaded = self.loaded();
            let l = loaded.get_mut(name)?;
            let runner = l.runner.take();
            if let Some(r) = &runner {
                let mut s = r.status();
                s.state = RunState::Stopped;
                l.stopped = Some(s);
            }
            (runner, l.store.clone())
        };
        if let Some(r) = runner {
            r.stop().await;
        }
        Some(store)
    }

    /// Forgets `name` after a failed replace: unlisted, not a tool.
    fn forget(&self, name: &str) {
        self.loaded().remove(name);
        self.tools.write().expect("tool names lock").remove(name);
    }

    /// Everything of a load after the old runner stopped, under the plugin's name: the
    /// store (reset for a new component unless `keep_state`), the persisted copy, the
    /// tool's name, the runner.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        manifest: &Manifest,
        manifest_text: &str,
        wasm: Vec<u8>,
        plugin: &Component,
        hash: &str,
        store: Option<PluginStore>,
        keep_state: bool,
        persist: Option<&LoadOptions>,
    ) -> Result<(Runner, PluginStore), RegistryError> {
        let store = match store {
            Some(s) => s,
            None => self.open_version(&manifest.name, hash).await?,
        };
        let known = store.component_hash().map_err(store_error)?;
        if known.is_none() && manifest.kind == Kind::Extractor {
            // A store with no record at all is new, or its state was lost: the log may hold
            // events this extractor derived before, which its runner must find first.
            store.mark_derived().map_err(store_error)?;
        }
        // The files first: a crash before the store records the new component leaves a
        // store no loaded component claims, which the next start rebuilds, never a store
        // claimed by a component that did not build it.
        if let Some(options) = persist {
            let (dir, name, text, options) = (
                self.dir.clone(),
                manifest.name.clone(),
                manifest_text.to_owned(),
                options.clone(),
            );
            blocking(move || persist_files(&dir, &name, &text, &wasm, &options))
                .await?
                .map_err(|e| {
                    storage(format!(
                        "keeping plugin {} in {} failed: {e}",
                        manifest.name,
                        self.dir.display()
                    ))
                })?;
        }
        if known.is_some() && known.as_deref() != Some(hash) && keep_state {
            let (s, h) = (store.clone(), hash.to_owned());
            blocking(move || s.adopt(&h)).await?.map_err(store_error)?;
            tracing::info!(
                plugin = manifest.name,
                "new component: it goes on from the state and checkpoint as they stand"
            );
        } else if known.as_deref() != Some(hash) {
            let origin = match manifest.start {
                StartFrom::Beginning => 0,
                StartFrom::Now => self.log.head(),
            };
            let (s, h) = (store.clone(), hash.to_owned());
            blocking(move || s.reset(&h, origin))
                .await?
                .map_err(store_error)?;
            tracing::info!(
                plugin = manifest.name,
                origin,
                "new component: state starts over"
            );
        }
        if manifest.kind == Kind::Tool {
            self.know_tool(&manifest.name).await;
        } else {
            self.tools
                .write()
                .expect("tool names lock")
                .remove(&manifest.name);
        }
        let runner = self.spawn_runner(manifest, plugin, &store)?;
        Ok((runner, store))
    }

    /// Starts the runner of one version of a plugin over its store.
    fn spawn_runner(
        &self,
        manifest: &Manifest,
        plugin: &Component,
        store: &PluginStore,
    ) -> Result<Runner, RegistryError> {
        let (handler, patterns): (Arc<dyn Handler>, _) = match plugin {
            Component::Projection(p) => (Arc::new(p.clone()), manifest.subscriptions.clone()),
            Component::Extractor(p) => (Arc::new(p.clone()), manifest.subscriptions.clone()),
            Component::Tool(t) => (t.clone(), vec![REQUESTED.parse().expect("a valid pattern")]),
        };
        let options = RunnerOptions {
            batch_size: manifest.limits.batch_size,
            on_failure: manifest.on_failure.clone(),
            schemas: Some(self.schemas.clone()),
            limits: self.limits(),
            snapshots: match plugin {
                Component::Projection(_) => (manifest.snapshots.every, manifest.snapshots.keep),
                _ => (0, 0),
            },
            lease: self.leases.get().map(|l| l.claim(&manifest.name)),
        };
        Runner::spawn(
            &manifest.name,
            handler,
            store.clone(),
            self.bus.clone(),
            self.log.clone(),
            PatternSet::new(patterns),
            options,
        )
        .map_err(storage)
    }

    /// Adds `name` to the loaded tools before its runner starts; when it was not there,
    /// waits until the runner that answers unknown tools has committed what it decided
    /// without it (every request below the head now), so a request is never both failed
    /// as `unknown_tool` and run.
    async fn know_tool(&self, name: &str) {
        if !self
            .tools
            .write()
            .expect("tool names lock")
            .insert(name.to_owned())
        {
            return;
        }
        let head = self.log.head();
        let deadline = Instant::now() + UNKNOWN_TOOLS_SETTLE;
        loop {
            let position = match &*self.unknown_tools.lock().expect("unknown tools lock") {
                Some(r) => r.status().position,
                None => return,
            };
            if position >= head {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    plugin = name,
                    position,
                    head,
                    "the runner answering unknown tools is behind; loading the tool without waiting for it"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Links the compiled component as the manifest's world; a tool is also described.
    async fn component(
        &self,
        compiled: &crate::plugin::Compiled,
        manifest: &Manifest,
        config: Arc<PluginConfig>,
    ) -> Result<Component, RegistryError> {
        let rt = &self.runtime;
        Ok(match manifest.kind {
            Kind::Projection => {
                Component::Projection(rt.plugin_configured(compiled, manifest, config)?)
            }
            Kind::Extractor => {
                Component::Extractor(rt.plugin_configured(compiled, manifest, config)?)
            }
            Kind::Tool => {
                let plugin: ToolPlugin = rt.plugin_configured(compiled, manifest, config)?;
                let p = plugin.clone();
                let info = blocking(move || p.describe()).await??;
                let id = plugin.id().to_owned();
                if info.name != manifest.name {
                    return Err(RegistryError::Invalid(format!(
                        "plugin {id}: the tool describes itself as {:?} but its manifest names it {:?}; requests name tools by the manifest's name, so make them agree",
                        info.name, manifest.name
                    )));
                }
                let handler = ToolHandler::new(
                    &manifest.name,
                    plugin,
                    info,
                    self.log.clone(),
                    manifest.limits.concurrency,
                )
                .map_err(|m| RegistryError::Invalid(format!("plugin {id}: {m}")))?
                .with_limits(self.limits());
                Component::Tool(Arc::new(handler))
            }
        })
    }

    /// Loads every plugin (`<name>.toml` beside `<name>.wasm`) of the operator's
    /// `operator` directory (`--plugins`) and of the uploads kept in the data directory.
    /// When both hold a plugin of one name, `precedence` picks the copy, and its status
    /// says which one runs and why. Returns the files that failed, with why.
    pub async fn load_dirs(
        self: &Arc<Self>,
        operator: Option<&Path>,
        precedence: Precedence,
    ) -> Vec<(PathBuf, RegistryError)> {
        let mut failed = Vec::new();
        let from_operator = operator
            .map(|d| plugin_files(d, &mut failed))
            .unwrap_or_default();
        let uploaded = if self.policy().hot_load {
            plugin_files(&self.dir.clone(), &mut failed)
        } else {
            // With hot loading off, only the operator's directory loads.
            let skipped = plugin_files(&self.dir.clone(), &mut failed);
            if !skipped.is_empty() {
                tracing::warn!(
                    plugins = ?skipped.keys().collect::<Vec<_>>(),
                    dir = %self.dir.display(),
                    "plugins uploaded earlier are not loaded: hot loading is off (--no-hot-load)"
                );
            }
            BTreeMap::new()
        };
        {
            let mut op = self.operator.lock().expect("operator plugins lock");
            op.0 = from_operator
                .iter()
                .map(|(n, (m, _))| (n.clone(), m.clone()))
                .collect();
            op.1 = precedence;
        }
        let mut chosen: BTreeMap<String, (PathBuf, PathBuf, Source, Option<String>)> =
            BTreeMap::new();
        for (name, (m, w)) in &from_operator {
            let source = Source::PluginsDir { path: m.clone() };
            chosen.insert(name.clone(), (m.clone(), w.clone(), source, None));
        }
        for (name, (m, w)) in uploaded {
            let source = Source::Uploaded { path: m.clone() };
            match (chosen.get_mut(&name), precedence) {
                (None, _) => {
                    chosen.insert(name, (m, w, source, None));
                }
                (Some(op), Precedence::PluginsDir) => {
                    let note = format!(
                        "an uploaded copy in {} is not loaded: the --plugins copy wins (--plugin-precedence plugins-dir)",
                        m.display()
                    );
                    tracing::warn!(plugin = name, uploaded = %m.display(), "an uploaded plugin of the same name as one in --plugins is not loaded (--plugin-precedence plugins-dir)");
                    op.3 = Some(note);
                }
                (Some(op), Precedence::Uploaded) => {
                    let note = format!(
                        "overrides the copy in {} (--plugin-precedence uploaded)",
                        op.0.display()
                    );
                    tracing::info!(plugin = name, uploaded = %m.display(), "an uploaded plugin overrides the one of the same name in --plugins (--plugin-precedence uploaded)");
                    *op = (m, w, source, Some(note));
                }
            }
        }
        for (_, (manifest, wasm, source, note)) in chosen {
            // An upload loads again with the options it was loaded with; the operator's
            // directory with the host's grants alone.
            let options = match &source {
                Source::Uploaded { .. } => read_options(&manifest),
                _ => Ok(LoadOptions::default()),
            };
            let result = match (
                std::fs::read_to_string(&manifest),
                std::fs::read(&wasm),
                options,
            ) {
                (Ok(m), Ok(w), Ok(o)) => self.load_from(&m, w, source, note, o).await.map(|_| ()),
                (Err(e), _, _) | (_, Err(e), _) => Err(storage(e)),
                (_, _, Err(e)) => Err(storage(e)),
            };
            if let Err(e) = result {
                failed.push((manifest, e));
            }
        }
        self.collect_cache().await;
        failed
    }

    /// What the status of a plugin uploaded over the API says when `--plugins` has one of
    /// the same name.
    fn api_note(&self, name: &str, source: &Source) -> Option<String> {
        if *source != Source::Api {
            return None;
        }
        let op = self.operator.lock().expect("operator plugins lock");
        let path = op.0.get(name)?;
        Some(match op.1 {
            Precedence::PluginsDir => format!(
                "replaces the copy in {} until the next start, when that copy loads again (--plugin-precedence plugins-dir)",
                path.display()
            ),
            Precedence::Uploaded => format!(
                "replaces the copy in {}, also at the next start (--plugin-precedence uploaded)",
                path.display()
            ),
        })
    }

    /// Deletes the compile cache's files that no loaded plugin (and no load under way) uses;
    /// a failure is logged: the cache is only an optimization.
    async fn collect_cache(self: &Arc<Self>) {
        let this = self.clone();
        let collected = blocking(move || {
            this.runtime.collect_cache(|| {
                this.loaded()
                    .values()
                    .flat_map(|l| {
                        let staged = l.staged.as_ref().map(|s| s.version.hash.clone());
                        std::iter::once(l.hash.clone()).chain(staged)
                    })
                    .collect::<HashSet<_>>()
            })
        })
        .await;
        match collected {
            Ok(Ok((0, _))) => {}
            Ok(Ok((files, bytes))) => {
                tracing::info!(files, bytes, "collected unused compiled components")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "collecting the compile cache failed"),
            Err(e) => tracing::warn!(error = %e, "collecting the compile cache failed"),
        }
    }

    /// Stops a plugin and forgets it; its state is deleted only when `purge` is set (and
    /// then the compile cache's files no loaded plugin uses go too).
    pub async fn unload(self: &Arc<Self>, name: &str, purge: bool) -> Result<(), RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::NotFound(name.to_owned()));
        }
        let (this, name) = (self.clone(), name.to_owned());
        spawn_here(async move { this.unload_task(name, purge).await })
            .await
            .map_err(storage)?
    }

    async fn unload_task(self: Arc<Self>, name: String, purge: bool) -> Result<(), RegistryError> {
        let _held = self.names.lock(&name).await;
        let staged = self.loaded().get_mut(&name).and_then(|l| l.staged.take());
        let Some(store) = self.stop_runner(&name).await else {
            return Err(RegistryError::NotFound(name));
        };
        let staged_store = match staged {
            Some(s) => {
                let upgrade::Staged { version, .. } = s;
                if let Some(r) = version.runner {
                    r.stop().await;
                }
                Some(version.store)
            }
            None => None,
        };
        self.tools.write().expect("tool names lock").remove(&name);
        self.loaded().remove(&name);
        let dir = self.dir.clone();
        let n = name.clone();
        blocking(move || {
            for ext in [
                "wasm",
                "toml",
                "load.json",
                "wasm.tmp",
                "toml.tmp",
                "load.json.tmp",
            ] {
                let _ = std::fs::remove_file(dir.join(format!("{n}.{ext}")));
            }
        })
        .await?;
        if purge {
            let (db, n) = (self.db.clone(), name.clone());
            blocking(move || {
                let mut held = vec![store.generation()];
                held.extend(staged_store.as_ref().map(PluginStore::generation));
                store.purge(&db)?;
                if let Some(s) = staged_store {
                    s.purge(&db)?;
                }
                // Stores earlier upgrades left (before a restart).
                for g in crate::plugin::generations(&db, &n) {
                    if !held.contains(&g) {
                        PluginStore::open_generation(&db, &n, g)?.purge(&db)?;
                    }
                }
                upgrade::forget_live_generation(&db, &n)
            })
            .await?
            .map_err(store_error)?;
            self.collect_cache().await;
        }
        tracing::info!(plugin = name, purge, "plugin unloaded");
        self.announce(audit(
            dead_letter::UNLOADED,
            &name,
            serde_json::json!({"purged": purge}),
            None,
            None,
        ))
        .await;
        Ok(())
    }

    /// Appends an `evhost.plugin.>` audit event; a failure is logged, not returned: the
    /// change it announces has happened.
    async fn announce(&self, event: crate::log::StreamAppend) {
        if let Err(e) = self.log.append(vec![event]).await {
            tracing::warn!(error = %e, "appending an audit event failed");
        }
    }

    /// The controller of `name`'s runner; the caller holds the name.
    fn controller(&self, name: &str) -> Result<Controller, RegistryError> {
        self.loaded()
            .get(name)
            .and_then(|l| l.runner.as_ref())
            .map(Runner::controller)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))
    }

    /// Clears a plugin's quarantine; false when it was not quarantined.
    pub async fn resume(self: &Arc<Self>, name: &str) -> Result<bool, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::NotFound(name.to_owned()));
        }
        let (this, name) = (self.clone(), name.to_owned());
        spawn_here(async move {
            let _held = this.names.lock(&name).await;
            let runner = this.controller(&name)?;
            runner.resume().await.map_err(|e| control_error(&name, e))
        })
        .await
        .map_err(storage)?
    }

    /// Dead letters of `plugin` (every loaded plugin's when `None`), oldest position first.
    pub async fn dead_letters(
        &self,
        plugin: Option<&str>,
    ) -> Result<Vec<DeadLetter>, RegistryError> {
        let stores: Vec<PluginStore> = {
            let loaded = self.loaded();
            match plugin {
                Some(name) => vec![
                    loaded
                        .get(name)
                        .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?
                        .store
                        .clone(),
                ],
                None => loaded.values().map(|l| l.store.clone()).collect(),
            }
        };
        let lists = blocking(move || {
            stores
                .iter()
                .map(|s| s.dead_letters())
                .collect::<Result<Vec<_>, _>>()
        })
        .await?
        .map_err(store_error)?;
        Ok(lists.into_iter().flatten().collect())
    }

    /// Runs a dead letter through its plugin again.
    pub async fn retry_dead_letter(
        self: &Arc<Self>,
        id: &DeadLetterId,
    ) -> Result<RetryOutcome, RegistryError> {
        let (this, id) = (self.clone(), id.clone());
        let (name, position) = (id.plugin.clone(), id.position);
        spawn_here(async move {
            let _held = this.names.lock(&name).await;
            let runner = this.controller(&name)?;
            runner.retry(position).await.map_err(|e| match e {
                ControlError::NotFound { .. } => RegistryError::DeadLetterNotFound(id.to_string()),
                e => control_error(&name, e),
            })
        })
        .await
        .map_err(storage)?
    }

    /// Drops a dead letter without handling it.
    pub async fn delete_dead_letter(
        self: &Arc<Self>,
        id: &DeadLetterId,
    ) -> Result<(), RegistryError> {
        let (this, id) = (self.clone(), id.clone());
        let (name, position) = (id.plugin.clone(), id.position);
        spawn_here(async move {
            let _held = this.names.lock(&name).await;
            let runner = this.controller(&name)?;
            if !runner
                .delete(position)
                .await
                .map_err(|e| control_error(&name, e))?
            {
                return Err(RegistryError::DeadLetterNotFound(id.to_string()));
            }
            this.announce(audit(
                dead_letter::DEAD_LETTER_DELETED,
                &name,
                serde_json::json!({"dead_letter_id": id, "position": position}),
                None,
                None,
            ))
            .await;
            Ok(())
        })
        .await
        .map_err(storage)?
    }

    /// Stops every runner (at shutdown); no runner starts afterwards.
    pub async fn stop_all(&self) {
        self.closed.store(true, Ordering::Release);
        let runners: Vec<Runner> = {
            let mut loaded = self.loaded();
            std::mem::take(&mut *loaded)
                .into_values()
                .flat_map(|l| {
                    let staged = l.staged.and_then(|s| s.version.runner);
                    l.runner.into_iter().chain(staged)
                })
                .collect()
        };
        for r in runners {
            r.stop().await;
        }
        let unknown = self
            .unknown_tools
            .lock()
            .expect("unknown tools lock")
            .take();
        if let Some(r) = unknown {
            r.stop().await;
        }
    }

    fn info_of(&self, l: &Loaded) -> PluginInfo {
        let status = upgrade::status_of(l);
        let head = self.log.head();
        let staged = l.staged.as_ref().map(|s| (s.role, s.info(head)));
        let (candidate, previous) = match staged {
            Some((Role::Previous, info)) => (None, Some(info)),
            Some((_, info)) => (Some(info), None),
            None => (None, None),
        };
        PluginInfo {
            name: l.manifest.name.clone(),
            version: l.manifest.version.clone(),
            kind: l.manifest.kind,
            wit: l.plugin.wit(),
            config: match &l.plugin {
                Component::Projection(p) => p.config().shown(),
                Component::Extractor(p) => p.config().shown(),
                Component::Tool(t) => t.config().shown(),
            },
            subscriptions: l
                .manifest
                .subscriptions
                .iter()
                .map(|p| p.to_string())
                .collect(),
            component_hash: l.hash.clone(),
            load_ms: l.load.as_secs_f64() * 1e3,
            compiled_from_cache: l.cached,
            tool: match &l.plugin {
                Component::Tool(t) => Some(t.info().clone()),
                _ => None,
            },
            lag: head.saturating_sub(status.position),
            head,
            status,
            usage: match &l.plugin {
                Component::Projection(p) => p.usage(),
                Component::Extractor(p) => p.usage(),
                Component::Tool(t) => t.usage(),
            },
            source: l.source.clone(),
            dead_letters: l.store.dead_letter_count(),
            candidate,
            previous,
        }
    }

    /// Every loaded plugin's status.
    pub async fn list(&self) -> Vec<PluginInfo> {
        let loaded = self.loaded();
        loaded.values().map(|l| self.info_of(l)).collect()
    }

    /// One plugin's status.
    pub async fn info(&self, name: &str) -> Result<PluginInfo, RegistryError> {
        let loaded = self.loaded();
        let l = loaded
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        Ok(self.info_of(l))
    }

    /// Up to `limit` of the lines plugin `name` printed or logged after line `after`.
    pub async fn logs(
        &self,
        name: &str,
        after: u64,
        limit: usize,
    ) -> Result<LogPage, RegistryError> {
        let logs = self.with(name, |l| match &l.plugin {
            Component::Projection(p) => p.logs().clone(),
            Component::Extractor(p) => p.logs().clone(),
            Component::Tool(t) => t.logs().clone(),
        })?;
        Ok(logs.read(after, limit))
    }
}

/// Writes the manifest and component of a hot-loaded plugin into `dir`, each by rename.
/// The plugins of `dir` by name (manifest, component); a manifest without its component
/// goes to `failed`.
fn plugin_files(
    dir: &Path,
    failed: &mut Vec<(PathBuf, RegistryError)>,
) -> BTreeMap<String, (PathBuf, PathBuf)> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let wasm = path.with_extension("wasm");
        if !wasm.exists() {
            failed.push((
                path.clone(),
                RegistryError::Invalid(format!("no {stem}.wasm beside {stem}.toml")),
            ));
            continue;
        }
        found.insert(stem.to_owned(), (path, wasm));
    }
    found
}

/// Keeps an upload for the next start: `NAME.wasm`, `NAME.toml` and, when the load had
/// any, its options in `NAME.load.json` (readable by the host's user only: config values
/// may be secrets).
fn persist_files(
    dir: &Path,
    name: &str,
    manifest: &str,
    wasm: &[u8],
    options: &LoadOptions,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let options_json = serde_json::to_vec(options).map_err(std::io::Error::other)?;
    // The previous load's options go first and the new ones come last, so a crash in
    // between leaves the new component with no options (refused or unconfigured at the
    // next start), never with another load's grants and secrets.
    match std::fs::remove_file(dir.join(format!("{name}.load.json"))) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut files = vec![("wasm", wasm), ("toml", manifest.as_bytes())];
    if *options != LoadOptions::default() {
        files.push(("load.json", &options_json));
    }
    for (ext, bytes) in files {
        let path = dir.join(format!("{name}.{ext}"));
        let tmp = dir.join(format!("{name}.{ext}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// The options an upload was loaded with, kept beside its manifest (none when absent).
fn read_options(manifest: &Path) -> Result<LoadOptions, String> {
    let path = manifest.with_extension("load.json");
    match std::fs::read(&path) {
        // The error names where, never what: the file holds secrets.
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e: serde_json::Error| {
            format!(
                "{} does not parse at line {} column {}; fix or remove it",
                path.display(),
                e.line(),
                e.column()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LoadOptions::default()),
        Err(e) => Err(format!("{} cannot be read: {e}", path.display())),
    }
}

fn projection_of(name: &str, c: Component) -> Result<ProjectionPlugin, RegistryError> {
    match c {
        Component::Projection(p) => Ok(p),
        Component::Extractor(_) => Err(RegistryError::Invalid(format!(
            "plugin {name:?} is an extractor: it has no query export and its past state is not replayed; read its stored state with ?key= or ?prefix="
        ))),
        Component::Tool(_) => Err(RegistryError::Invalid(format!(
            "plugin {name:?} is a tool: it keeps no state; request invocations with tool.invocation.requested events"
        ))),
    }
}
