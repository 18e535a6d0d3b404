//! The loaded plugins: loading (at start-up from directories, or hot over the API),
//! replacing, unloading, status, and reads of their state (now, by query, or at a past
//! position).
//!
//! A plugin loaded over the API is kept in the data directory (`plugins/`) and loaded again
//! at the next start, so a hot-loaded projection survives a restart.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Mutex;

use crate::bus::Bus;
use crate::dead_letter::{self, DeadLetter, audit};
use crate::log::{EventLog, ReadFilter};
use crate::pattern::PatternSet;
use crate::plugin::{
    ExtractorPlugin, Kind, Manifest, MemState, PluginError, PluginStore, ProjectionPlugin, Runtime,
    StartFrom, StateView, ToolInfo, ToolPlugin, UsageReport, valid_name,
};
use crate::runner::{
    BatchHandler, Blocking, RetryError, RetryOutcome, Runner, RunnerOptions, RunnerStatus,
};
use crate::schemas::Schemas;
use crate::tools::{REQUESTED, ToolHandler, UnknownTools};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The manifest, the component, or the request is unusable; nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// No plugin by that name is loaded.
    #[error("no plugin named {0:?} is loaded; see GET /v1/plugins")]
    NotFound(String),
    /// No dead letter has that id.
    #[error("no dead letter {0:?}; see GET /v1/dlq")]
    DeadLetterNotFound(String),
    /// The plugin failed while answering.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Storage failed.
    #[error("plugin storage failed: {0}")]
    Storage(String),
}

fn storage(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

/// What `GET /v1/plugins` reports per plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    /// Unique name.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// projection, extractor or tool.
    pub kind: Kind,
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
}

/// The loaded component, by world.
#[derive(Clone)]
enum Component {
    Projection(ProjectionPlugin),
    Extractor(ExtractorPlugin),
    Tool(Arc<ToolHandler>),
}

struct Loaded {
    manifest: Manifest,
    plugin: Component,
    store: PluginStore,
    runner: Runner,
    hash: String,
    load: Duration,
    cached: bool,
}

/// The set of loaded plugins.
pub struct Registry {
    runtime: Arc<Runtime>,
    db: sled::Db,
    bus: Bus,
    log: Arc<dyn EventLog>,
    /// Where plugins loaded over the API are kept.
    dir: PathBuf,
    loaded: Mutex<BTreeMap<String, Loaded>>,
    /// Names of loaded tools, for the runner that fails requests for unknown ones.
    tools: Arc<RwLock<HashSet<String>>>,
    unknown_tools: Mutex<Option<Runner>>,
    schemas: Schemas,
    /// The log's limits, which runners keep derived output within.
    limits: std::sync::OnceLock<crate::limits::OutputLimits>,
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
            tools: Arc::default(),
            unknown_tools: Mutex::new(None),
            schemas,
            limits: std::sync::OnceLock::new(),
        })
    }

    /// Sets the log's limits for the runners started from now on (the log's defaults
    /// unless set); call before loading plugins.
    pub fn set_limits(&self, limits: crate::limits::OutputLimits) {
        let _ = self.limits.set(limits);
    }

    fn limits(&self) -> crate::limits::OutputLimits {
        self.limits.get().copied().unwrap_or_default()
    }

    /// Starts answering requests for tools that are not loaded (after the plugins given at
    /// start-up are loaded, so their requests are not failed early).
    pub async fn answer_unknown_tools(&self) -> Result<(), RegistryError> {
        let store = PluginStore::open(&self.db, "~unknown-tools").map_err(storage)?;
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
        *self.unknown_tools.lock().await = Some(runner);
        Ok(())
    }

    /// Loads (or replaces) a plugin. `persist` keeps a copy to load at the next start.
    ///
    /// Replacing a plugin with the same component keeps its state and checkpoint; a
    /// different component starts its state over from the manifest's `start`.
    pub async fn load(
        &self,
        manifest_text: &str,
        wasm: Vec<u8>,
        persist: bool,
    ) -> Result<PluginInfo, RegistryError> {
        let manifest =
            Manifest::parse(manifest_text).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let runtime = self.runtime.clone();
        let compiled = {
            let wasm = Arc::new(wasm);
            let (w, m) = (wasm.clone(), manifest.clone());
            tokio::task::spawn_blocking(move || runtime.compile_for(&m, &w))
                .await
                .map_err(storage)?
                .map_err(|m| {
                    RegistryError::Invalid(format!(
                        "plugin {}@{}: the component {m}",
                        manifest.name, manifest.version
                    ))
                })
                .map(|c| (c, wasm))?
        };
        let (compiled, wasm) = compiled;
        let plugin = self.component(&compiled, &manifest).await?;
        let store = PluginStore::open(&self.db, &manifest.name).map_err(storage)?;

        let mut loaded = self.loaded.lock().await;
        if let Some(old) = loaded.remove(&manifest.name) {
            old.runner.stop().await;
        }
        if store.component_hash().map_err(storage)?.as_deref() != Some(compiled.hash.as_str()) {
            let origin = match manifest.start {
                StartFrom::Beginning => 0,
                StartFrom::Now => self.log.head(),
            };
            store.reset(&compiled.hash, origin).map_err(storage)?;
            tracing::info!(
                plugin = manifest.name,
                origin,
                "new component: state starts over"
            );
        }
        if persist {
            self.persist(&manifest.name, manifest_text, &wasm)
                .map_err(storage)?;
        }
        let (handler, patterns): (Arc<dyn BatchHandler>, _) = match &plugin {
            Component::Projection(p) => (
                Arc::new(Blocking(Arc::new(p.clone()))),
                manifest.subscriptions.clone(),
            ),
            Component::Extractor(p) => (
                Arc::new(Blocking(Arc::new(p.clone()))),
                manifest.subscriptions.clone(),
            ),
            Component::Tool(t) => (t.clone(), vec![REQUESTED.parse().expect("a valid pattern")]),
        };
        let options = RunnerOptions {
            batch_size: manifest.limits.batch_size,
            on_failure: manifest.on_failure.clone(),
            schemas: Some(self.schemas.clone()),
            limits: self.limits(),
        };
        let runner = Runner::spawn(
            &manifest.name,
            handler,
            store.clone(),
            self.bus.clone(),
            self.log.clone(),
            PatternSet::new(patterns),
            options,
        )
        .map_err(storage)?;
        {
            let mut tools = self.tools.write().expect("tool names lock");
            tools.remove(&manifest.name);
            if manifest.kind == Kind::Tool {
                tools.insert(manifest.name.clone());
            }
        }
        tracing::info!(
            plugin = manifest.name,
            version = manifest.version,
            kind = manifest.kind.as_str(),
            cached = compiled.cached,
            load_ms = compiled.took.as_secs_f64() * 1e3,
            "plugin loaded"
        );
        // Loads over the API are operator actions worth an audit trail; loads at start-up
        // are configuration and would add events on every restart.
        if persist {
            self.announce(audit(
                dead_letter::LOADED,
                &manifest.name,
                serde_json::json!({
                    "version": manifest.version,
                    "kind": manifest.kind.as_str(),
                    "component_hash": compiled.hash,
                }),
                None,
                None,
            ))
            .await;
        }
        let name = manifest.name.clone();
        loaded.insert(
            name.clone(),
            Loaded {
                manifest,
                plugin,
                store,
                runner,
                hash: compiled.hash,
                load: compiled.took,
                cached: compiled.cached,
            },
        );
        Ok(self.info_of(&loaded[&name]))
    }

    /// Links the compiled component as the manifest's world; a tool is also described.
    async fn component(
        &self,
        compiled: &crate::plugin::Compiled,
        manifest: &Manifest,
    ) -> Result<Component, RegistryError> {
        Ok(match manifest.kind {
            Kind::Projection => Component::Projection(self.runtime.plugin(compiled, manifest)?),
            Kind::Extractor => Component::Extractor(self.runtime.plugin(compiled, manifest)?),
            Kind::Tool => {
                let plugin: ToolPlugin = self.runtime.plugin(compiled, manifest)?;
                let p = plugin.clone();
                let info = tokio::task::spawn_blocking(move || p.describe())
                    .await
                    .map_err(storage)??;
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

    fn persist(&self, name: &str, manifest: &str, wasm: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        for (ext, bytes) in [("wasm", wasm), ("toml", manifest.as_bytes())] {
            let path = self.dir.join(format!("{name}.{ext}"));
            let tmp = self.dir.join(format!("{name}.{ext}.tmp"));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// Loads every `<name>.toml` + `<name>.wasm` pair in each directory; later directories
    /// override earlier ones. Returns what failed, by file.
    pub async fn load_dirs(&self, dirs: &[&Path]) -> Vec<(PathBuf, RegistryError)> {
        let mut found: BTreeMap<String, (PathBuf, PathBuf)> = BTreeMap::new();
        let mut failed = Vec::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
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
        }
        for (_, (manifest, wasm)) in found {
            let result = match (std::fs::read_to_string(&manifest), std::fs::read(&wasm)) {
                (Ok(m), Ok(w)) => self.load(&m, w, false).await.map(|_| ()),
                (Err(e), _) | (_, Err(e)) => Err(storage(e)),
            };
            if let Err(e) = result {
                failed.push((manifest, e));
            }
        }
        failed
    }

    /// Stops a plugin and forgets it; its state is deleted only when `purge` is set.
    pub async fn unload(&self, name: &str, purge: bool) -> Result<(), RegistryError> {
        let old = self
            .loaded
            .lock()
            .await
            .remove(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        old.runner.stop().await;
        self.tools.write().expect("tool names lock").remove(name);
        for ext in ["wasm", "toml"] {
            let _ = std::fs::remove_file(self.dir.join(format!("{name}.{ext}")));
        }
        if purge {
            PluginStore::purge(&self.db, name).map_err(storage)?;
        }
        tracing::info!(plugin = name, purge, "plugin unloaded");
        self.announce(audit(
            dead_letter::UNLOADED,
            name,
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

    /// Clears a plugin's quarantine; false when it was not quarantined.
    pub async fn resume(&self, name: &str) -> Result<bool, RegistryError> {
        let runner = self.with(name, |l| l.runner.controller()).await?;
        runner.resume().await.map_err(RegistryError::Storage)
    }

    /// Dead letters of `plugin` (every loaded plugin's when `None`), oldest position first.
    pub async fn dead_letters(
        &self,
        plugin: Option<&str>,
    ) -> Result<Vec<DeadLetter>, RegistryError> {
        let stores: Vec<PluginStore> = {
            let loaded = self.loaded.lock().await;
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
        let mut all = Vec::new();
        for store in stores {
            for (_, json) in store.dead_letters().map_err(storage)? {
                all.push(serde_json::from_str(&json).map_err(storage)?);
            }
        }
        Ok(all)
    }

    fn dead_letter_target(id: &str) -> Result<(&str, u64), RegistryError> {
        dead_letter::parse_id(id).ok_or_else(|| {
            RegistryError::Invalid(format!(
                "{id:?} is not a dead-letter id; ids look like <plugin>.<position> (see GET /v1/dlq)"
            ))
        })
    }

    /// Runs a dead letter through its plugin again.
    pub async fn retry_dead_letter(&self, id: &str) -> Result<RetryOutcome, RegistryError> {
        let (name, position) = Self::dead_letter_target(id)?;
        // The lock is not held while the plugin runs.
        let runner = self.with(name, |l| l.runner.controller()).await?;
        runner.retry(position).await.map_err(|e| match e {
            RetryError::NotFound { .. } => RegistryError::DeadLetterNotFound(id.to_owned()),
            RetryError::Unavailable(m) => RegistryError::Storage(m),
        })
    }

    /// Drops a dead letter without handling it.
    pub async fn delete_dead_letter(&self, id: &str) -> Result<(), RegistryError> {
        let (name, position) = Self::dead_letter_target(id)?;
        let runner = self.with(name, |l| l.runner.controller()).await?;
        if !runner
            .delete(position)
            .await
            .map_err(RegistryError::Storage)?
        {
            return Err(RegistryError::DeadLetterNotFound(id.to_owned()));
        }
        self.announce(audit(
            dead_letter::DEAD_LETTER_DELETED,
            name,
            serde_json::json!({"dead_letter_id": id, "position": position}),
            None,
            None,
        ))
        .await;
        Ok(())
    }

    /// Stops every runner (at shutdown).
    pub async fn stop_all(&self) {
        let mut loaded = self.loaded.lock().await;
        for (_, l) in std::mem::take(&mut *loaded) {
            l.runner.stop().await;
        }
        if let Some(r) = self.unknown_tools.lock().await.take() {
            r.stop().await;
        }
    }

    fn info_of(&self, l: &Loaded) -> PluginInfo {
        let status = l.runner.status();
        let head = self.log.head();
        PluginInfo {
            name: l.manifest.name.clone(),
            version: l.manifest.version.clone(),
            kind: l.manifest.kind,
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
            dead_letters: l.store.dead_letter_count(),
        }
    }

    /// Every loaded plugin's status.
    pub async fn list(&self) -> Vec<PluginInfo> {
        let loaded = self.loaded.lock().await;
        loaded.values().map(|l| self.info_of(l)).collect()
    }

    /// One plugin's status.
    pub async fn info(&self, name: &str) -> Result<PluginInfo, RegistryError> {
        let loaded = self.loaded.lock().await;
        let l = loaded
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        Ok(self.info_of(l))
    }

    async fn with<T>(&self, name: &str, f: impl FnOnce(&Loaded) -> T) -> Result<T, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::NotFound(name.to_owned()));
        }
        let loaded = self.loaded.lock().await;
        loaded
            .get(name)
            .map(f)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))
    }

    /// The stored state under `key`, without calling the plugin.
    pub async fn state(&self, name: &str, key: &str) -> Result<Option<String>, RegistryError> {
        let store = self.with(name, |l| l.store.clone()).await?;
        store.get(key).map_err(storage)
    }

    /// Up to `limit` stored keys starting with `prefix`, without calling the plugin.
    pub async fn state_prefix(
        &self,
        name: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>, RegistryError> {
        let store = self.with(name, |l| l.store.clone()).await?;
        store.scan(prefix, limit).map_err(storage)
    }

    /// Calls the plugin's `query` export.
    pub async fn query(&self, name: &str, request: String) -> Result<String, RegistryError> {
        let (plugin, store) = self
            .with(name, |l| (l.plugin.clone(), l.store.clone()))
            .await?;
        let plugin = projection_of(name, plugin)?;
        let view: Arc<dyn StateView> = Arc::new(store);
        tokio::task::spawn_blocking(move || plugin.query(view, &request))
            .await
            .map_err(storage)?
            .map_err(RegistryError::from)
    }

    /// The state under `key` as it was right after the event at `position`, by replaying the
    /// log into a scratch store; the plugin's real state is not touched.
    pub async fn state_at(
        &self,
        name: &str,
        key: &str,
        position: u64,
    ) -> Result<Option<String>, RegistryError> {
        let (plugin, manifest, store) = self
            .with(name, |l| {
                (l.plugin.clone(), l.manifest.clone(), l.store.clone())
            })
            .await?;
        let plugin = projection_of(name, plugin)?;
        // Where the state began: 0, or the head when a `start = "now"` plugin was loaded.
        let origin = store.origin().map_err(storage)?;
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
        let scratch = Arc::new(MemState::default());
        let filter = ReadFilter {
            types: Some(PatternSet::new(manifest.subscriptions.clone())),
            ..ReadFilter::default()
        };
        // Reading the next page overlaps with folding the current one.
        let page_size = manifest.limits.batch_size.max(4096);
        let read = |from: u64| {
            let (log, filter) = (self.log.clone(), filter.clone());
            tokio::spawn(async move { log.read(from, page_size, &filter).await })
        };
        let mut pending = (origin <= position).then(|| (origin, read(origin)));
        while let Some((from, reading)) = pending.take() {
            let page = reading.await.map_err(storage)?.map_err(storage)?;
            if page.next > from && page.next <= position {
                pending = Some((page.next, read(page.next)));
            }
            let events: Vec<Arc<crate::event::Event>> = page
                .events
                .into_iter()
                .filter(|e| e.position <= position)
                .map(Arc::new)
                .collect();
            if !events.is_empty() {
                let (p, s) = (plugin.clone(), scratch.clone());
                let writes = tokio::task::spawn_blocking(move || p.handle(s, &events))
                    .await
                    .map_err(storage)??;
                scratch.apply(writes);
            }
        }
        Ok(scratch.get(key))
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
