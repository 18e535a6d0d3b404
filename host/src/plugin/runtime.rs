//! The component runtime: one wasmtime `Engine`, components compiled once and cached on
//! disk by content hash, and a fresh sandboxed `Store` for every call.
//!
//! Generated WIT bindings stay in this module; callers see [`ProjectionPlugin`],
//! [`Writes`] and [`PluginError`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::manifest::{Limits, Manifest};
use crate::event::Event;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "projection",
    });
}

use bindings::evhost::plugin::{log as wit_log, state as wit_state, types as wit};

/// How often the engine's epoch advances: the granularity of batch time limits.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// State a plugin reads beneath its own writes of the current call.
pub trait StateView: Send + Sync {
    /// The value under `key`.
    fn get(&self, key: &str) -> Option<String>;
    /// Every key starting with `prefix`, in key order, with its value.
    fn scan_prefix(&self, prefix: &str) -> Vec<(String, String)>;
}

/// The state writes of one successful call: `Some` sets, `None` deletes.
pub type Writes = BTreeMap<String, Option<String>>;

/// Something that folds a batch of events into state writes: a wasm projection, or native
/// code run by the same runner (as the benchmarks compare).
pub trait Projector: Send + Sync + 'static {
    /// `name@version`, for logs and errors.
    fn id(&self) -> &str;
    /// Folds `events` into state over `view`; returns the writes to commit.
    fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: &[Arc<Event>],
    ) -> Result<Writes, PluginError>;
}

impl Projector for ProjectionPlugin {
    fn id(&self) -> &str {
        ProjectionPlugin::id(self)
    }
    fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: &[Arc<Event>],
    ) -> Result<Writes, PluginError> {
        ProjectionPlugin::handle(self, view, events)
    }
}

/// Why a plugin call failed. The host is never affected; the call's writes are dropped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    /// The component could not be compiled or does not implement the declared world.
    #[error("plugin {plugin} cannot be loaded: {message}")]
    Load {
        /// `name@version`.
        plugin: String,
        /// What is wrong.
        message: String,
    },
    /// The plugin returned an error for its input.
    #[error("plugin {plugin} refused the input: {message}")]
    Refused {
        /// `name@version`.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin trapped, ran out of time or hit its memory limit.
    #[error("plugin {plugin} failed: {message}")]
    Trapped {
        /// `name@version`.
        plugin: String,
        /// What happened (names the limit when one was hit).
        message: String,
    },
}

/// Per-call store data: the sandbox's WASI context (granting nothing), limits, state.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    view: Arc<dyn StateView>,
    writes: Writes,
    plugin: Arc<str>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Memory limiter that remembers whether it refused growth, to name the limit in errors.
struct Limiter {
    memory_bytes: usize,
    refused: Arc<AtomicBool>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_bytes;
        if !ok {
            self.refused.store(true, Ordering::Relaxed);
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl wit::Host for HostState {}

impl wit_state::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        match self.writes.get(&key) {
            Some(v) => v.clone(),
            None => self.view.get(&key),
        }
    }

    fn set(&mut self, key: String, value: String) {
        self.writes.insert(key, Some(value));
    }

    fn delete(&mut self, key: String) {
        self.writes.insert(key, None);
    }

    fn scan_prefix(&mut self, prefix: String) -> Vec<(String, String)> {
        let mut merged: BTreeMap<String, String> =
            self.view.scan_prefix(&prefix).into_iter().collect();
        for (k, v) in self.writes.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        merged.into_iter().collect()
    }
}

impl wit_log::Host for HostState {
    fn log(&mut self, level: wit_log::Level, message: String) {
        let plugin = &*self.plugin;
        match level {
            wit_log::Level::Trace => tracing::trace!(plugin, "{message}"),
            wit_log::Level::Debug => tracing::debug!(plugin, "{message}"),
            wit_log::Level::Info => tracing::info!(plugin, "{message}"),
            wit_log::Level::Warn => tracing::warn!(plugin, "{message}"),
            wit_log::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

/// The shared engine, linker and compile cache.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
}

/// A compiled component and how it was obtained.
#[derive(Clone)]
pub struct Compiled {
    component: Component,
    /// SHA-256 of the `.wasm`, hex.
    pub hash: String,
    /// True when the compiled form came from the on-disk cache.
    pub cached: bool,
    /// Time to compile or load it.
    pub took: Duration,
}

impl Runtime {
    /// A runtime caching compiled components in `cache_dir`; starts the epoch ticker.
    pub fn new(cache_dir: &Path) -> anyhow::Result<Arc<Self>> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Component-model async is not used; without it a call costs less.
        config.concurrency_support(false);
        let engine = Engine::new(&config)?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::Projection::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        std::fs::create_dir_all(cache_dir)?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("evhost-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Arc::new(Self {
            engine,
            linker,
            cache_dir: cache_dir.to_owned(),
        }))
    }

    /// Compiles `wasm`, or loads its compiled form from the cache.
    pub fn compile(&self, wasm: &[u8]) -> Result<Compiled, String> {
        let start = Instant::now();
        let hash = format!("{:x}", Sha256::digest(wasm));
        let path = self.cache_dir.join(format!("{hash}.cwasm"));
        if path.exists() {
            // SAFETY: the file was written by `precompile_component` of this host into its own
            // cache directory; wasmtime checks its version and configuration when loading.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => {
                    return Ok(Compiled {
                        component,
                        hash,
                        cached: true,
                        took: start.elapsed(),
                    });
                }
                Err(e) => {
                    tracing::info!(error = %e, "recompiling a stale cached component");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if wasm.get(..4) != Some(b"\0asm") {
            return Err("is not WebAssembly".into());
        }
        // Bytes 6..8 are the layer: 0 for a core module, 1 for a component.
        if wasm.get(6..8) == Some(&[0, 0]) {
            return Err(
                "is a core WebAssembly module, not a component; build plugins with \
                        --target wasm32-wasip2 (or wrap the module with wasm-tools component new)"
                    .into(),
            );
        }
        let bytes = self
            .engine
            .precompile_component(wasm)
            .map_err(|e| format!("does not compile: {e:#}"))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot write the compile cache {}: {e}", path.display()))?;
        // SAFETY: as above; just written by this engine.
        let component = unsafe { Component::deserialize_file(&self.engine, &path) }
            .map_err(|e| format!("cannot load the compiled component: {e:#}"))?;
        Ok(Compiled {
            component,
            hash,
            cached: false,
            took: start.elapsed(),
        })
    }

    /// Links a compiled component as a projection, checking it implements the world.
    pub fn projection(
        self: &Arc<Self>,
        compiled: &Compiled,
        manifest: &Manifest,
    ) -> Result<ProjectionPlugin, PluginError> {
        let plugin: Arc<str> = format!("{}@{}", manifest.name, manifest.version).into();
        let load_err = |e: wasmtime::Error| PluginError::Load {
            plugin: plugin.to_string(),
            message: format!("it does not implement the evhost:plugin/projection world: {e:#}"),
        };
        let pre = self
            .linker
            .instantiate_pre(&compiled.component)
            .map_err(load_err)?;
        let pre = bindings::ProjectionPre::new(pre).map_err(load_err)?;
        Ok(ProjectionPlugin {
            runtime: self.clone(),
            pre,
            limits: manifest.limits.clone(),
            plugin,
            warm: Arc::default(),
        })
    }
}

/// Instances kept between calls, per plugin.
const WARM_INSTANCES: usize = 4;

/// An instance with its store, ready for another call.
struct Warm {
    store: Store<HostState>,
    bindings: bindings::Projection,
    refused: Arc<AtomicBool>,
}

/// Reads nothing: what an idle warm instance holds instead of a real view.
struct NoState;

impl StateView for NoState {
    fn get(&self, _key: &str) -> Option<String> {
        None
    }
    fn scan_prefix(&self, _prefix: &str) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// A projection ready to be called; cheap to clone and share between threads.
///
/// Instances are reused across calls (instantiating costs fresh linear memory, page faults
/// and unmapping on every batch); an instance whose call failed in any way is dropped, never
/// reused, so a trap or a refused batch cannot leave state behind for the next call.
#[derive(Clone)]
pub struct ProjectionPlugin {
    runtime: Arc<Runtime>,
    pre: bindings::ProjectionPre<HostState>,
    limits: Limits,
    plugin: Arc<str>,
    warm: Arc<std::sync::Mutex<Vec<Warm>>>,
}

impl ProjectionPlugin {
    /// `name@version`.
    pub fn id(&self) -> &str {
        &self.plugin
    }

    fn store(&self, view: Arc<dyn StateView>) -> (Store<HostState>, Arc<AtomicBool>) {
        let refused = Arc::new(AtomicBool::new(false));
        let data = HostState {
            // Grants nothing: no arguments, environment, preopened directories or sockets.
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: (self.limits.memory_mb as usize) << 20,
                refused: refused.clone(),
            },
            view,
            writes: Writes::new(),
            plugin: self.plugin.clone(),
        };
        let mut store = Store::new(&self.runtime.engine, data);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(self.deadline());
        store.epoch_deadline_trap();
        (store, refused)
    }

    fn deadline(&self) -> u64 {
        self.limits
            .batch_timeout_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            + 1
    }

    /// A warm instance, or a new one, reading `view` with no writes and a fresh deadline.
    fn checkout(&self, view: Arc<dyn StateView>) -> Result<Warm, PluginError> {
        let reused = self.warm.lock().expect("warm instances lock").pop();
        let mut w = match reused {
            Some(w) => w,
            None => {
                let (mut store, refused) = self.store(view.clone());
                let bindings = self
                    .pre
                    .instantiate(&mut store)
                    .map_err(|e| self.trapped(e, refused.load(Ordering::Relaxed)))?;
                Warm {
                    store,
                    bindings,
                    refused,
                }
            }
        };
        let data = w.store.data_mut();
        data.view = view;
        data.writes.clear();
        w.store.set_epoch_deadline(self.deadline());
        Ok(w)
    }

    /// Keeps an instance whose call succeeded for the next call.
    fn checkin(&self, mut w: Warm) {
        w.store.data_mut().view = Arc::new(NoState);
        let mut warm = self.warm.lock().expect("warm instances lock");
        if warm.len() < WARM_INSTANCES {
            warm.push(w);
        }
    }

    fn trapped(&self, e: wasmtime::Error, memory_refused: bool) -> PluginError {
        let message = if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
            format!(
                "ran longer than its limit of {} ms per batch",
                self.limits.batch_timeout_ms
            )
        } else if memory_refused {
            format!(
                "hit its memory limit of {} MiB ({e})",
                self.limits.memory_mb
            )
        } else {
            format!("trapped: {e:#}")
        };
        PluginError::Trapped {
            plugin: self.plugin.to_string(),
            message,
        }
    }

    /// Folds `events` into state over `view`; returns the writes to commit.
    pub fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: &[Arc<Event>],
    ) -> Result<Writes, PluginError> {
        let batch: Vec<wit::Event> = events.iter().map(|e| to_wit(e)).collect();
        let mut w = self.checkout(view)?;
        match w.bindings.call_handle(&mut w.store, &batch) {
            Ok(Ok(())) => {
                let writes = std::mem::take(&mut w.store.data_mut().writes);
                self.checkin(w);
                Ok(writes)
            }
            Ok(Err(e)) => Err(self.refused(e)),
            Err(e) => Err(self.trapped(e, w.refused.load(Ordering::Relaxed))),
        }
    }

    /// Calls the projection's `query` export over `view` (its writes are discarded).
    pub fn query(&self, view: Arc<dyn StateView>, request: &str) -> Result<String, PluginError> {
        let mut w = self.checkout(view)?;
        match w.bindings.call_query(&mut w.store, request) {
            Ok(Ok(answer)) => {
                self.checkin(w);
                Ok(answer)
            }
            Ok(Err(e)) => Err(self.refused(e)),
            Err(e) => Err(self.trapped(e, w.refused.load(Ordering::Relaxed))),
        }
    }

    fn refused(&self, e: wit::Error) -> PluginError {
        let message = match e {
            wit::Error::InvalidInput(m) => format!("invalid input: {m}"),
            wit::Error::Failed(m) => m,
        };
        PluginError::Refused {
            plugin: self.plugin.to_string(),
            message,
        }
    }
}

fn to_wit(e: &Event) -> wit::Event {
    let m = &e.metadata;
    let mut metadata = Vec::new();
    for (k, v) in [
        ("correlation_id", &m.correlation_id),
        ("causation_id", &m.causation_id),
        ("user_id", &m.user_id),
        ("agent_id", &m.agent_id),
        ("schema_version", &m.schema_version),
    ] {
        if let Some(v) = v {
            metadata.push((k.to_owned(), v.clone()));
        }
    }
    metadata.extend(m.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    wit::Event {
        id: e.id.clone(),
        event_type: e.event_type.as_str().to_owned(),
        stream: e.stream.clone(),
        position: e.position,
        version: e.version,
        timestamp_micros: e.timestamp.timestamp_micros(),
        source: e.source.clone(),
        payload: e.payload.as_str().to_owned(),
        metadata,
    }
}
