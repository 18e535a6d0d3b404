//! The component runtime: one wasmtime `Engine`, components compiled once and cached on
//! disk by content hash, and warm sandboxed instances per plugin.
//!
//! Generated WIT bindings stay in this module and [`super::worlds`]; callers see the
//! per-world plugin types, [`Writes`] and [`PluginError`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::logs::PluginLogs;
use super::manifest::{Capabilities, Kind, Limits, Manifest, PluginId};
use super::sandbox::{CallClock, HttpGrant, wasi_ctx};

use super::contract::{Contract, GuestError, WitVersion};
use super::manifest::PluginConfig;

/// A WIT world the host can instantiate.
pub trait World: Sized + Send + 'static {
    /// The manifest kind that names this world.
    const KIND: Kind;
    /// The pre-linked component.
    type Pre: Clone + Send + Sync + 'static;
    /// Checks the component's exports against the world at `wit`.
    fn pre(pre: InstancePre<HostState>, wit: WitVersion) -> wasmtime::Result<Self::Pre>;
    /// A new instance.
    fn instantiate(pre: &Self::Pre, store: &mut Store<HostState>) -> wasmtime::Result<Self>;
}

/// How often the engine's epoch advances: the granularity of batch time limits.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// State a plugin reads beneath its own writes of the current call.
pub trait StateView: Send + Sync {
    /// The value under `key`; an error when the store could not be read (never "absent").
    fn get(&self, key: &str) -> Result<Option<String>, StateError>;
    /// Every key starting with `prefix`, in key order, with its value.
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, StateError>;
}

/// A state read the host's store failed: the host's fault, not the plugin's, so the call
/// fails as [`PluginError::Host`] and is retried, never dead-lettered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("reading the plugin's state failed: {0}")]
pub struct StateError(pub String);

/// The state writes of one successful call: `Some` sets, `None` deletes.
pub type Writes = BTreeMap<String, Option<String>>;

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime refused its configuration or the WASI linker.
    #[error("the wasm engine could not be set up: {0}")]
    Engine(String),
    /// The compile cache's directory cannot be created.
    #[error("the compile cache directory {} cannot be created: {source}", path.display())]
    Cache {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The thread that ends calls past their time limit could not start.
    #[error("the epoch ticker thread could not start: {0}")]
    Ticker(std::io::Error),
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
    /// The plugin said its input is invalid (`error::invalid-input`).
    #[error("plugin {plugin} refused the input: {message}")]
    Refused {
        /// `name@version`.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin said it failed for another reason (`error::failed`): a tool whose
    /// service was unreachable, say; not the input's fault.
    #[error("plugin {plugin} failed: {message}")]
    Failed {
        /// `name@version`.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// The call ran longer than the plugin's time limit and was stopped.
    #[error("plugin {plugin} failed: {message}")]
    TimedOut {
        /// `name@version`.
        plugin: String,
        /// Which limit.
        message: String,
    },
    /// The plugin trapped or hit its memory limit.
    #[error("plugin {plugin} failed: {message}")]
    Trapped {
        /// `name@version`.
        plugin: String,
        /// What happened (names the limit when one was hit).
        message: String,
    },
    /// The host failed during the call (its state store could not be read): the call's
    /// outcome says nothing about the plugin.
    #[error("the host failed while running plugin {plugin}: {message}")]
    Host {
        /// `name@version`.
        plugin: String,
        /// What failed.
        message: String,
    },
}

/// Per-instance store data (opaque outside the runtime): the sandbox's WASI context, limits, and the current call's
/// state view and writes.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    grant: HttpGrant,
    table: ResourceTable,
    limiter: Limiter,
    pub(super) view: Arc<dyn StateView>,
    pub(super) writes: Writes,
    /// Bytes (keys and values) held in `writes`, against `budget`.
    written: u64,
    budget: StateBudget,
    plugin: Arc<str>,
    logs: PluginLogs,
    config: Arc<PluginConfig>,
    /// The panic the guest reported during this call (an error log line starting
    /// [`PANIC_PREFIX`]): the reason of the `unreachable` trap that follows it.
    panicked: Option<String>,
}

/// How a guest's error log line reporting a panic starts (the SDK's panic hook writes it).
pub(super) const PANIC_PREFIX: &str = "panicked at ";

/// Longest panic message kept for a trap's reason, in bytes.
const MAX_PANIC_BYTES: usize = 2048;

/// The bounds of one call's state writes, from the manifest's limits.
#[derive(Debug, Clone, Copy)]
struct StateBudget {
    /// Bytes of keys and values one call may buffer.
    writes: u64,
    /// Bytes of one entry (key and value).
    entry: u64,
}

/// Why a call was stopped in `state.set` or `state.delete`: the trap that carries it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StateLimitExceeded(String);

impl HostState {
    /// Buffers a write of `key` (`Some` sets, `None` deletes) if the budget allows it.
    pub(super) fn write(&mut self, key: String, value: Option<String>) -> wasmtime::Result<()> {
        let value_len = |v: &Option<String>| v.as_ref().map_or(0, |v| v.len() as u64);
        let key_len = key.len() as u64;
        let entry = key_len + value_len(&value);
        if entry > self.budget.entry {
            return Err(wasmtime::Error::new(StateLimitExceeded(format!(
                "stopped: a state write of {entry} bytes (key and value) under key {:?} is over \
                 its limit of {} bytes per entry (limits.state_value_bytes; by default a quarter \
                 of limits.memory_mb); nothing the call wrote is committed",
                truncated(&key),
                self.budget.entry
            ))));
        }
        // One lookup: what the key held is replaced (a call over budget is discarded whole,
        // so the write may land before the check).
        let replaced = self
            .writes
            .insert(key, value)
            .map_or(0, |old| key_len + value_len(&old));
        let total = self.written - replaced + entry;
        if total > self.budget.writes {
            return Err(wasmtime::Error::new(StateLimitExceeded(format!(
                "stopped: its state writes in one call reached {total} bytes, over its limit of \
                 {} (limits.state_write_bytes; by default limits.memory_mb); nothing the call \
                 wrote is committed: write less per event, or lower limits.batch_size",
                self.budget.writes
            ))));
        }
        self.written = total;
        Ok(())
    }

    /// Forgets the buffered writes (a new call starts with none).
    fn clear_writes(&mut self) -> Writes {
        self.written = 0;
        self.panicked = None;
        std::mem::take(&mut self.writes)
    }
}

/// At most 64 characters of `key`, for messages.
fn truncated(key: &str) -> String {
    match key.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &key[..i]),
        None => key.to_owned(),
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.grant,
        }
    }
}

/// Memory limiter that remembers whether it refused growth, to name the limit in errors,
/// and the largest memory it allowed, for the plugin's usage report.
struct Limiter {
    memory_bytes: usize,
    refused: Arc<AtomicBool>,
    usage: Arc<Usage>,
}

/// What a plugin has used since it was loaded, across all its instances: shown in its
/// status so an operator can see which plugin costs what and how close it runs to its
/// limits.
#[derive(Debug, Default)]
pub(super) struct Usage {
    calls: AtomicU64,
    failed_calls: AtomicU64,
    busy_micros: AtomicU64,
    max_call_micros: AtomicU64,
    peak_memory_bytes: AtomicU64,
    fuel_consumed: AtomicU64,
    max_call_fuel: AtomicU64,
    /// Events (or invocations) handed to calls, and the time and fuel of those calls.
    events: AtomicU64,
    event_call_nanos: AtomicU64,
    event_call_fuel: AtomicU64,
}

/// A snapshot of [`Usage`] with the limits it is measured against.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UsageReport {
    /// Calls into the component (batches, queries, invocations).
    pub calls: u64,
    /// Calls that trapped, timed out, ran out of fuel or memory, or returned an error.
    pub failed_calls: u64,
    /// Wall-clock time spent in calls, in milliseconds.
    pub busy_ms: f64,
    /// The longest call, in milliseconds, against `time_limit_ms`.
    pub max_call_ms: f64,
    /// The plugin's time limit per call.
    pub time_limit_ms: u64,
    /// The largest linear memory an instance grew to, against `memory_limit_bytes`.
    pub peak_memory_bytes: u64,
    /// The plugin's memory limit.
    pub memory_limit_bytes: u64,
    /// Fuel burnt in all calls (only with `limits.fuel_per_event`).
    pub fuel_consumed: u64,
    /// The most fuel one call burnt.
    pub max_call_fuel: u64,
    /// The plugin's fuel budget per event, if it has one.
    pub fuel_per_event: Option<u64>,
    /// Events (and tool invocations) handed to the component.
    pub events: u64,
    /// Time per event of the calls that handled events (queries and `describe` left out),
    /// in nanoseconds: what crossing the boundary and the plugin's own work cost.
    pub ns_per_event: Option<f64>,
    /// Fuel burnt per event, against `fuel_per_event` (only with a fuel budget).
    pub fuel_used_per_event: Option<f64>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_bytes;
        if ok {
            self.usage
                .peak_memory_bytes
                .fetch_max(desired as u64, Ordering::Relaxed);
        } else {
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

/// What the imports of every contract version do (`contract.rs` binds them per version).
impl HostState {
    /// `state.get`: the call's own write of `key`, else the stored value.
    pub(super) fn state_get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        match self.writes.get(&key) {
            Some(v) => Ok(v.clone()),
            None => self.view.get(&key).map_err(wasmtime::Error::new),
        }
    }

    /// `state.scan-prefix`: the stored entries under `prefix` with the call's writes over them.
    pub(super) fn state_scan(&mut self, prefix: String) -> wasmtime::Result<Vec<(String, String)>> {
        let mut merged: BTreeMap<String, String> = self
            .view
            .scan_prefix(&prefix)
            .map_err(wasmtime::Error::new)?
            .into_iter()
            .collect();
        for (k, v) in self.writes.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    /// `log.log`: into the plugin's log buffer and the host's log; a panic report becomes
    /// the reason of the trap that follows it.
    pub(super) fn log_line(&mut self, level: tracing::Level, message: String) {
        let plugin = &*self.plugin;
        if level == tracing::Level::ERROR && message.starts_with(PANIC_PREFIX) {
            self.panicked = Some(crate::limits::bound(message.clone(), MAX_PANIC_BYTES));
        }
        let source = match level {
            tracing::Level::TRACE => "trace",
            tracing::Level::DEBUG => "debug",
            tracing::Level::INFO => "info",
            tracing::Level::WARN => "warn",
            tracing::Level::ERROR => "error",
        };
        self.logs.push(source, &message);
        match level {
            tracing::Level::TRACE => tracing::trace!(plugin, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(plugin, "{message}"),
            tracing::Level::INFO => tracing::info!(plugin, "{message}"),
            tracing::Level::WARN => tracing::warn!(plugin, "{message}"),
            tracing::Level::ERROR => tracing::error!(plugin, "{message}"),
        }
    }

    /// `config.get`.
    pub(super) fn config_value(&self, key: &str) -> Option<String> {
        self.config.get(key).map(str::to_owned)
    }

    /// `config.entries`.
    pub(super) fn config_entries(&self) -> Vec<(String, String)> {
        self.config
            .entries()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// An engine with its linker.
struct Machine {
    engine: Engine,
    linker: Linker<HostState>,
}

impl Machine {
    fn new(fuel: bool) -> wasmtime::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.consume_fuel(fuel);
        // Component-model async is not used; without it a call costs less.
        config.concurrency_support(false);
        // `EVHOST_WASM_PROFILE=perfmap` writes /tmp/perf-PID.map so that `perf` names the
        // plugins' compiled functions: for profiling plugins, off by default.
        if profiling() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)?;
        super::contract::add_to_linker(&mut linker)?;
        Ok(Self { engine, linker })
    }
}

/// The shared engines, linkers and compile cache.
///
/// Two engines: fuel accounting instruments the compiled code and slows every call, so
/// only plugins that ask for a fuel budget (`limits.fuel_per_event`) run on the engine
/// that counts it.
pub struct Runtime {
    plain: Machine,
    fueled: Machine,
    cache_dir: PathBuf,
    /// Hashes being loaded, with how many loads of each: never collected.
    pins: std::sync::Mutex<HashMap<String, usize>>,
}

/// Why a component could not be compiled.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CompileError {
    /// The bytes are not a usable component (the uploader's fault); the message completes
    /// "the component ...".
    #[error("{0}")]
    Invalid(String),
    /// The compile cache could not be written or read back (the host's fault).
    #[error("{0}")]
    Cache(String),
}

/// Keeps the compile cache's files of one component hash from being collected while a load
/// of it is under way (from before its compile until it is registered as loaded).
pub struct CachePin {
    runtime: Arc<Runtime>,
    hash: String,
}

impl Drop for CachePin {
    fn drop(&mut self) {
        let mut pins = self.runtime.pins.lock().expect("cache pins lock");
        if let Some(n) = pins.get_mut(&self.hash) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.hash);
            }
        }
    }
}

/// The SHA-256 of `wasm`, hex: the component's identity and its compile cache's file name.
pub fn component_hash(wasm: &[u8]) -> String {
    format!("{:x}", Sha256::digest(wasm))
}

/// A compiled component and how it was obtained.
#[derive(Clone)]
pub struct Compiled {
    component: Component,
    /// Compiled for the engine that counts fuel.
    fuel: bool,
    /// SHA-256 of the `.wasm`, hex.
    pub hash: String,
    /// True when the compiled form came from the on-disk cache.
    pub cached: bool,
    /// Time to compile or load it.
    pub took: Duration,
}

impl Runtime {
    /// A runtime caching compiled components in `cache_dir`; starts the epoch ticker.
    pub fn new(cache_dir: &Path) -> Result<Arc<Self>, RuntimeError> {
        let machine = |fuel| Machine::new(fuel).map_err(|e| RuntimeError::Engine(format!("{e:#}")));
        let (plain, fueled) = (machine(false)?, machine(true)?);
        std::fs::create_dir_all(cache_dir).map_err(|source| RuntimeError::Cache {
            path: cache_dir.to_owned(),
            source,
        })?;
        let tickers = [plain.engine.weak(), fueled.engine.weak()];
        std::thread::Builder::new()
            .name("evhost-epoch".into())
            .spawn(move || {
                loop {
                    let mut alive = false;
                    for t in &tickers {
                        if let Some(engine) = t.upgrade() {
                            engine.increment_epoch();
                            alive = true;
                        }
                    }
                    if !alive {
                        break;
                    }
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(RuntimeError::Ticker)?;
        Ok(Arc::new(Self {
            plain,
            fueled,
            cache_dir: cache_dir.to_owned(),
            pins: Default::default(),
        }))
    }

    /// Pins `hash` in the compile cache until the returned guard is dropped.
    pub fn pin(self: &Arc<Self>, hash: &str) -> CachePin {
        *self
            .pins
            .lock()
            .expect("cache pins lock")
            .entry(hash.to_owned())
            .or_default() += 1;
        CachePin {
            runtime: self.clone(),
            hash: hash.to_owned(),
        }
    }

    /// Deletes the compile cache's files of every component hash that is neither pinned nor
    /// in what `in_use` returns (called while pins are held off, so a load that pins a hash
    /// after the collection began finds its file intact or writes it again). Returns the
    /// files and bytes removed. Blocking: call it off the async threads.
    pub fn collect_cache(
        &self,
        in_use: impl FnOnce() -> HashSet<String>,
    ) -> std::io::Result<(usize, u64)> {
        let pins = self.pins.lock().expect("cache pins lock");
        let keep = in_use();
        let (mut files, mut bytes) = (0, 0);
        for entry in std::fs::read_dir(&self.cache_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(hash) = name.to_str().and_then(|n| n.split('.').next()) else {
                continue;
            };
            // Only the cache's own files: a SHA-256 in hex, then `.cwasm`, `.fuel.cwasm` or
            // `.tmp`.
            let ours = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
            if !ours || keep.contains(hash) || pins.contains_key(hash) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    files += 1;
                    bytes += size;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok((files, bytes))
    }

    /// Compiles `wasm` for a plugin without a fuel budget, or loads it from the cache.
    pub fn compile(&self, wasm: &[u8]) -> Result<Compiled, CompileError> {
        self.compile_on(wasm, false)
    }

    /// Compiles `wasm` for the engine `manifest` needs (fuel accounting or not).
    pub fn compile_for(&self, manifest: &Manifest, wasm: &[u8]) -> Result<Compiled, CompileError> {
        self.compile_on(wasm, manifest.limits.fuel_per_event.is_some())
    }

    fn compile_on(&self, wasm: &[u8], fuel: bool) -> Result<Compiled, CompileError> {
        let start = Instant::now();
        let machine = if fuel { &self.fueled } else { &self.plain };
        let hash = component_hash(wasm);
        let file = if fuel {
            format!("{hash}.fuel.cwasm")
        } else {
            format!("{hash}.cwasm")
        };
        let path = self.cache_dir.join(file);
        if path.exists() {
            // SAFETY: the file was written by `precompile_component` of this host into its own
            // cache directory; wasmtime checks its version and configuration when loading.
            match unsafe { load_compiled(&machine.engine, &path) } {
                Ok(component) => {
                    return Ok(Compiled {
                        component,
                        fuel,
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
            return Err(CompileError::Invalid("is not WebAssembly".into()));
        }
        // Bytes 6..8 are the layer: 0 for a core module, 1 for a component.
        if wasm.get(6..8) == Some(&[0, 0]) {
            return Err(CompileError::Invalid(
                "is a core WebAssembly module, not a component; build plugins with \
                        --target wasm32-wasip2 (or wrap the module with wasm-tools component new)"
                    .into(),
            ));
        }
        let bytes = machine
            .engine
            .precompile_component(wasm)
            .map_err(|e| CompileError::Invalid(format!("does not compile: {e:#}")))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                CompileError::Cache(format!(
                    "cannot write the compile cache {}: {e}; check that the data directory's compiled/ is a writable directory with free space",
                    path.display()
                ))
            })?;
        // SAFETY: as above; just written by this engine.
        let component = unsafe { load_compiled(&machine.engine, &path) }.map_err(|e| {
            CompileError::Cache(format!(
                "cannot load the compiled component back from the compile cache {}: {e:#}",
                path.display()
            ))
        })?;
        Ok(Compiled {
            component,
            fuel,
            hash,
            cached: false,
            took: start.elapsed(),
        })
    }

    /// Links a compiled component as a plugin of world `W`, configured as its manifest
    /// says (no load-time overrides), checking it implements the world.
    pub fn plugin<W: World>(
        self: &Arc<Self>,
        compiled: &Compiled,
        manifest: &Manifest,
    ) -> Result<Plugin<W>, PluginError> {
        let config = PluginConfig::resolve(manifest, &Default::default()).map_err(|message| {
            PluginError::Load {
                plugin: manifest.id().to_string(),
                message,
            }
        })?;
        self.plugin_configured(compiled, manifest, Arc::new(config))
    }

    /// Links a compiled component as a plugin of world `W` with `config`: tells the world
    /// and contract version it implements from its exports, and refuses it when that is not
    /// the manifest's kind.
    pub fn plugin_configured<W: World>(
        self: &Arc<Self>,
        compiled: &Compiled,
        manifest: &Manifest,
        config: Arc<PluginConfig>,
    ) -> Result<Plugin<W>, PluginError> {
        let plugin = manifest.id();
        let load_err = |e: wasmtime::Error| PluginError::Load {
            plugin: plugin.to_string(),
            message: format!(
                "it does not implement the evhost:plugin/{} world: {e:#}",
                W::KIND.as_str()
            ),
        };
        if compiled.fuel != manifest.limits.fuel_per_event.is_some() {
            return Err(PluginError::Load {
                plugin: plugin.to_string(),
                message: "the component was compiled for the other engine: compile it with \
                          Runtime::compile_for and this manifest"
                    .into(),
            });
        }
        let machine = if compiled.fuel {
            &self.fueled
        } else {
            &self.plain
        };
        let pre = machine
            .linker
            .instantiate_pre(&compiled.component)
            .map_err(|e| PluginError::Load {
                plugin: plugin.to_string(),
                message: format!(
                    "its imports cannot be satisfied: {e:#}; a plugin may import only the \
                     evhost:plugin interfaces of a version this host loads ({}) and WASI 0.2",
                    WitVersion::ALL.map(|v| v.as_str()).join(", ")
                ),
            })?;
        let contract = super::contract::detect(&machine.engine, &compiled.component, &pre)
            .map_err(|message| PluginError::Load {
                plugin: plugin.to_string(),
                message,
            })?;
        if contract.kind != W::KIND {
            return Err(PluginError::Load {
                plugin: plugin.to_string(),
                message: format!(
                    "its manifest says kind = \"{}\" but the component is a {} (it implements \
                     {contract}); make the manifest's kind agree with what the component exports",
                    W::KIND.as_str(),
                    contract.kind.as_str()
                ),
            });
        }
        if contract.wit == WitVersion::V0_1_0 && !config.is_empty() {
            return Err(PluginError::Load {
                plugin: plugin.to_string(),
                message: "its manifest has a [config] table, but the component is built against \
                          evhost:plugin@0.1.0, which has no config import to read it: rebuild it \
                          against 0.2.0 or drop the table"
                    .into(),
            });
        }
        let pre = W::pre(pre, contract.wit).map_err(load_err)?;
        Ok(Plugin {
            contract,
            config,
            engine: machine.engine.clone(),
            usage: Arc::default(),
            pre,
            limits: Arc::new(manifest.limits.clone()),
            caps: Arc::new(manifest.capabilities.clone()),
            plugin,
            logs: PluginLogs::default(),
            warm: Arc::default(),
        })
    }
}

/// Whether plugins are being profiled (`EVHOST_WASM_PROFILE=perfmap`).
fn profiling() -> bool {
    std::env::var("EVHOST_WASM_PROFILE").as_deref() == Ok("perfmap")
}

/// Loads a compiled component from the cache: mapped from its file, or read into memory
/// when profiling (`EVHOST_WASM_PROFILE=perfmap`), since `perf` names code in anonymous
/// memory from the perf map but code mapped from a file only from the file's symbols.
///
/// # Safety
/// As [`Component::deserialize_file`]: `path` holds what `precompile_component` of an
/// engine with this configuration wrote.
unsafe fn load_compiled(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    if profiling() {
        let bytes = std::fs::read(path)?;
        // SAFETY: as the caller promises for the file.
        return unsafe { Component::deserialize(engine, bytes) };
    }
    // SAFETY: as the caller promises.
    unsafe { Component::deserialize_file(engine, path) }
}

/// Instances kept between calls, per plugin.
const WARM_INSTANCES: usize = 4;

/// An instance with its store, ready for another call.
pub(super) struct Warm<W> {
    pub(super) store: Store<HostState>,
    pub(super) bindings: W,
    refused: Arc<AtomicBool>,
    clock: Arc<CallClock>,
}

/// Reads nothing: what an idle warm instance (and a tool) holds instead of a real view.
pub(super) struct NoState;

impl StateView for NoState {
    fn get(&self, _key: &str) -> Result<Option<String>, StateError> {
        Ok(None)
    }
    fn scan_prefix(&self, _prefix: &str) -> Result<Vec<(String, String)>, StateError> {
        Ok(Vec::new())
    }
}

/// A loaded plugin of world `W`, ready to be called; cheap to clone and share.
///
/// Instances are reused across calls (instantiating costs fresh linear memory, page faults
/// and unmapping on every batch); an instance whose call failed in any way is dropped, never
/// reused, so a trap or a refused batch cannot leave state behind for the next call.
pub struct Plugin<W: World> {
    contract: Contract,
    config: Arc<PluginConfig>,
    engine: Engine,
    usage: Arc<Usage>,
    pre: W::Pre,
    pub(super) limits: Arc<Limits>,
    pub(super) caps: Arc<Capabilities>,
    pub(super) plugin: PluginId,
    logs: PluginLogs,
    warm: Arc<std::sync::Mutex<Vec<Warm<W>>>>,
}

impl<W: World> Clone for Plugin<W> {
    fn clone(&self) -> Self {
        Self {
            contract: self.contract,
            config: self.config.clone(),
            engine: self.engine.clone(),
            usage: self.usage.clone(),
            pre: self.pre.clone(),
            limits: self.limits.clone(),
            caps: self.caps.clone(),
            plugin: self.plugin.clone(),
            logs: self.logs.clone(),
            warm: self.warm.clone(),
        }
    }
}

/// What the sandbox shows during one call: the time and the random seed.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallContext {
    /// Microseconds since the Unix epoch the clock reads (unless a real clock is granted).
    pub micros: i64,
    /// The seed of the call's random numbers (unless real randomness is granted).
    pub seed: u64,
}

impl<W: World> Plugin<W> {
    /// `name@version`.
    pub fn id(&self) -> &str {
        self.plugin.as_str()
    }

    /// The world and contract version the component implements.
    pub fn contract(&self) -> Contract {
        self.contract
    }

    /// Its configuration (secret values redacted when shown).
    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    /// What the plugin printed and logged recently.
    pub fn logs(&self) -> &PluginLogs {
        &self.logs
    }

    fn store(
        &self,
        view: Arc<dyn StateView>,
    ) -> (Store<HostState>, Arc<AtomicBool>, Arc<CallClock>) {
        let refused = Arc::new(AtomicBool::new(false));
        let clock = Arc::new(CallClock::default());
        let timeout = Duration::from_millis(self.limits.batch_timeout_ms);
        let data = HostState {
            wasi: wasi_ctx(W::KIND, &self.caps, &clock, &self.logs),
            http: WasiHttpCtx::new(),
            grant: HttpGrant::new(&self.caps.http, timeout, self.plugin.shared()),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: (self.limits.memory_mb as usize) << 20,
                refused: refused.clone(),
                usage: self.usage.clone(),
            },
            view,
            writes: Writes::new(),
            written: 0,
            budget: StateBudget {
                writes: self.limits.write_budget(),
                entry: self.limits.value_budget(),
            },
            plugin: self.plugin.shared(),
            logs: self.logs.clone(),
            config: self.config.clone(),
            panicked: None,
        };
        let mut store = Store::new(&self.engine, data);
        store.limiter(|s| &mut s.limiter);
        if self.limits.fuel_per_event.is_some() {
            // Instantiation (the component's start-up code) is bounded by time only; each
            // call sets its own budget.
            let _ = store.set_fuel(u64::MAX / 2);
        }
        store.set_epoch_deadline(self.deadline());
        store.epoch_deadline_trap();
        (store, refused, clock)
    }

    fn deadline(&self) -> u64 {
        self.limits
            .batch_timeout_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            + 1
    }

    /// A warm instance, or a new one, reading `view` with no writes and a fresh deadline.
    fn checkout(&self, view: Arc<dyn StateView>, ctx: CallContext) -> Result<Warm<W>, PluginError> {
        let reused = self.warm.lock().expect("warm instances lock").pop();
        let mut w = match reused {
            Some(w) => w,
            None => {
                let (mut store, refused, clock) = self.store(view.clone());
                clock.set(ctx.micros, ctx.seed);
                let bindings = W::instantiate(&self.pre, &mut store)
                    .map_err(|e| self.trapped(e, refused.load(Ordering::Relaxed), None))?;
                Warm {
                    store,
                    bindings,
                    refused,
                    clock,
                }
            }
        };
        w.clock.set(ctx.micros, ctx.seed);
        let data = w.store.data_mut();
        data.view = view;
        data.clear_writes();
        w.store.set_epoch_deadline(self.deadline());
        Ok(w)
    }

    /// Keeps an instance whose call succeeded for the next call.
    fn checkin(&self, mut w: Warm<W>) {
        w.store.data_mut().view = Arc::new(NoState);
        let mut warm = self.warm.lock().expect("warm instances lock");
        if warm.len() < WARM_INSTANCES {
            warm.push(w);
        }
    }

    /// What the plugin has used since it was loaded.
    pub fn usage(&self) -> UsageReport {
        let u = &*self.usage;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let events = get(&u.events);
        UsageReport {
            calls: get(&u.calls),
            failed_calls: get(&u.failed_calls),
            busy_ms: get(&u.busy_micros) as f64 / 1e3,
            max_call_ms: get(&u.max_call_micros) as f64 / 1e3,
            time_limit_ms: self.limits.batch_timeout_ms,
            peak_memory_bytes: get(&u.peak_memory_bytes),
            memory_limit_bytes: self.limits.memory_mb << 20,
            fuel_consumed: get(&u.fuel_consumed),
            max_call_fuel: get(&u.max_call_fuel),
            fuel_per_event: self.limits.fuel_per_event,
            events,
            ns_per_event: (events > 0).then(|| get(&u.event_call_nanos) as f64 / events as f64),
            fuel_used_per_event: (events > 0 && self.limits.fuel_per_event.is_some())
                .then(|| get(&u.event_call_fuel) as f64 / events as f64),
        }
    }

    /// Runs `f` on an instance over `view`: its result and the state writes it made. With a
    /// fuel budget, the call may burn `fuel_per_event` per unit of `units` (events, or one
    /// invocation); `units == 0` gives no fuel bound (queries, `describe`), leaving the
    /// time limit. An instance is reused only after a call that succeeded.
    pub(super) fn call<R>(
        &self,
        view: Arc<dyn StateView>,
        ctx: CallContext,
        units: u64,
        f: impl FnOnce(&W, &mut Store<HostState>) -> wasmtime::Result<Result<R, GuestError>>,
    ) -> Result<(R, Writes), PluginError> {
        let started = Instant::now();
        let mut w = self.checkout(view, ctx)?;
        let budget = self.limits.fuel_per_event.map(|per| {
            if units == 0 {
                u64::MAX / 2
            } else {
                per.saturating_mul(units)
            }
        });
        if let Some(budget) = budget {
            // Cannot fail: the plugin has a budget only on the engine that counts fuel.
            let _ = w.store.set_fuel(budget);
        }
        let result = f(&w.bindings, &mut w.store);
        let u = &*self.usage;
        let elapsed = started.elapsed();
        let took = elapsed.as_micros() as u64;
        u.calls.fetch_add(1, Ordering::Relaxed);
        u.busy_micros.fetch_add(took, Ordering::Relaxed);
        u.max_call_micros.fetch_max(took, Ordering::Relaxed);
        if units > 0 {
            u.events.fetch_add(units, Ordering::Relaxed);
            u.event_call_nanos
                .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        }
        if let Some(budget) = budget {
            let burnt = budget - w.store.get_fuel().unwrap_or(0);
            u.fuel_consumed.fetch_add(burnt, Ordering::Relaxed);
            if units > 0 {
                u.max_call_fuel.fetch_max(burnt, Ordering::Relaxed);
                u.event_call_fuel.fetch_add(burnt, Ordering::Relaxed);
            }
        }
        match result {
            Ok(Ok(r)) => {
                let writes = w.store.data_mut().clear_writes();
                self.checkin(w);
                Ok((r, writes))
            }
            Ok(Err(e)) => {
                u.failed_calls.fetch_add(1, Ordering::Relaxed);
                Err(self.refused(e))
            }
            Err(e) => {
                u.failed_calls.fetch_add(1, Ordering::Relaxed);
                let out_of_fuel =
                    e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::OutOfFuel);
                if let (true, Some(budget)) = (out_of_fuel, budget) {
                    return Err(PluginError::Trapped {
                        plugin: self.plugin.to_string(),
                        message: format!(
                            "ran out of fuel: its budget is {} per event (limits.fuel_per_event), {budget} for this call of {units}",
                            self.limits.fuel_per_event.unwrap_or_default()
                        ),
                    });
                }
                let panicked = w.store.data_mut().panicked.take();
                Err(self.trapped(e, w.refused.load(Ordering::Relaxed), panicked))
            }
        }
    }

    fn trapped(
        &self,
        e: wasmtime::Error,
        memory_refused: bool,
        panicked: Option<String>,
    ) -> PluginError {
        if let Some(failed) = e.chain().find_map(|c| c.downcast_ref::<StateError>()) {
            return PluginError::Host {
                plugin: self.plugin.to_string(),
                message: failed.to_string(),
            };
        }
        if let Some(limit) = e
            .chain()
            .find_map(|c| c.downcast_ref::<StateLimitExceeded>())
        {
            return PluginError::Trapped {
                plugin: self.plugin.to_string(),
                message: limit.to_string(),
            };
        }
        if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
            return PluginError::TimedOut {
                plugin: self.plugin.to_string(),
                message: format!(
                    "ran longer than its limit of {} ms per call",
                    self.limits.batch_timeout_ms
                ),
            };
        }
        let message = if memory_refused {
            format!(
                "hit its memory limit of {} MiB ({})",
                self.limits.memory_mb,
                e.root_cause()
            )
        } else {
            // The trap, not the wasm backtrace: operators read this in status and dead letters.
            match e.downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::StackOverflow) => {
                    "trapped: stack overflow (call stack exhausted; unbounded recursion?)".into()
                }
                Some(wasmtime::Trap::UnreachableCodeReached) => match panicked {
                    Some(panic) => {
                        format!("trapped: wasm `unreachable` executed: the plugin {panic}")
                    }
                    None => {
                        "trapped: wasm `unreachable` executed (a panic in Rust, or an uncaught \
                             exception in JavaScript or Python: see the plugin's logs)"
                            .into()
                    }
                },
                Some(wasmtime::Trap::MemoryOutOfBounds) => {
                    "trapped: out-of-bounds memory access (deep recursion overflowing the \
                     plugin's stack, or a memory bug)"
                        .into()
                }
                Some(trap) => format!("trapped: {trap}"),
                None => format!("trapped: {}", e.root_cause()),
            }
        };
        PluginError::Trapped {
            plugin: self.plugin.to_string(),
            message,
        }
    }

    pub(super) fn refused(&self, e: GuestError) -> PluginError {
        let plugin = self.plugin.to_string();
        match e {
            GuestError::InvalidInput(m) => PluginError::Refused {
                plugin,
                message: format!("invalid input: {m}"),
            },
            GuestError::Failed(message) => PluginError::Failed { plugin, message },
        }
    }
}
