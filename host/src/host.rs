//! The front door: one place builds a host's parts (the log, the bus, the state database,
//! schemas, the wasm runtime, the registry with its plugins, the flow index) and the API's
//! state from one [`HostConfig`], with each limit set once and handed to every part that
//! enforces it. `evhost serve` starts a host through it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::api::{ApiConfig, AppState};
use crate::bus::{Bus, Hub};
use crate::lease::{Holder, Leases};
use crate::log::{EventLog, NatsLog, NatsLogConfig, SledLog, SledLogConfig};
use crate::plugin::{PluginStore, Runtime};
use crate::registry::{PluginPolicy, Precedence, Registry};
use crate::runner::Runner;
use crate::schemas::Schemas;

/// Everything a host is started with. [`HostConfig::new`] gives the defaults of
/// `evhost serve`.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The data directory (created if missing).
    pub data: PathBuf,
    /// Memory for the storage caches, in bytes (the log's index and the state database).
    pub cache_bytes: u64,
    /// Largest event, in bytes of text: the API's, the log's and plugins' outputs' limit.
    pub max_event_bytes: usize,
    /// Most events per append: the API's, the log's and plugins' outputs' limit.
    pub max_batch_events: usize,
    /// Events the bus keeps for its history.
    pub history: usize,
    /// Bytes the bus's history may hold.
    pub history_bytes: usize,
    /// Size of one segment file, when not the default.
    pub segment_bytes: Option<u64>,
    /// Bytes of chunks one round of an erasure rewrites, when not the default.
    pub erase_round_bytes: Option<usize>,
    /// The operator's plugin directory (`--plugins`).
    pub plugins: Option<PathBuf>,
    /// Which copy loads when `plugins` and the uploads both hold a name.
    pub precedence: Precedence,
    /// The operator's caps on plugin manifests.
    pub policy: PluginPolicy,
    /// Whether the flow index runs (on by default; the benchmarks leave it out to measure
    /// one plugin alone).
    pub flow_index: bool,
    /// Thresholds that raise alerts (none by default).
    pub alerts: crate::alerts::AlertRules,
    /// The log in NATS JetStream (`nats://HOST:PORT...`) instead of the embedded one.
    pub log_url: Option<String>,
    /// This host's id in a cluster (the plugin leases it holds name it); by default one
    /// made up once and kept in `DATA/host-id`.
    pub host_id: Option<String>,
    /// Where other hosts' operators reach this host's API, shown in their plugin status.
    pub advertise: Option<String>,
}

impl HostConfig {
    /// The defaults of `evhost serve`, over the data directory `data`.
    pub fn new(data: impl Into<PathBuf>) -> Self {
        Self {
            data: data.into(),
            cache_bytes: 64 << 20,
            max_event_bytes: crate::event::DEFAULT_MAX_EVENT_BYTES,
            max_batch_events: 10_000,
            history: 10_000,
            history_bytes: crate::bus::DEFAULT_HISTORY_BYTES,
            segment_bytes: None,
            erase_round_bytes: None,
            plugins: None,
            precedence: Precedence::default(),
            policy: PluginPolicy::default(),
            flow_index: true,
            alerts: crate::alerts::AlertRules::default(),
            log_url: None,
            host_id: None,
            advertise: None,
        }
    }
}

/// Why a host could not start; each names the part and what to do.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The event log did not open (the message says why: damage, permissions, disk).
    #[error("opening the event log in {dir}: {source}")]
    Log {
        /// The data directory.
        dir: String,
        /// What failed.
        source: crate::log::LogError,
    },
    /// Another part did not start.
    #[error("{what}: {message}")]
    Part {
        /// Which part.
        what: &'static str,
        /// What failed.
        message: String,
    },
}

fn part(what: &'static str) -> impl FnOnce(String) -> HostError {
    move |message| HostError::Part { what, message }
}

/// A running host's parts; stop it with [`Host::stop`].
pub struct Host {
    config: HostConfig,
    log: Arc<dyn EventLog>,
    /// The embedded log, when the host runs on it.
    sled_log: Option<Arc<SledLog>>,
    bus: Bus,
    state_db: sled::Db,
    schemas: Schemas,
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    /// The flow index's runner and store, when it runs.
    flows: Option<(Runner, PluginStore)>,
    /// The alert checks, when any threshold is set, and what stops them.
    alerts: Option<(crate::alerts::Alerts, tokio::sync::watch::Sender<bool>)>,
    /// On a cluster (the NATS log): the plugin leases this host holds or waits for.
    leases: Option<Leases>,
}

impl Host {
    /// Opens the log, starts the bus, the registry (loading the plugins of
    /// `config.plugins` and the uploads kept in the data directory, as `precedence` says;
    /// a plugin that fails to load is logged, not fatal) and the flow index.
    pub async fn start(config: HostConfig) -> Result<Self, HostError> {
        // Recording starts with the host (once per process; later hosts share it).
        crate::telemetry::install();
        let hub = Hub::with_history_bytes(config.history, config.history_bytes);
        let mut config = config;
        let mut leases = None;
        let (dyn_log, sled_log): (Arc<dyn EventLog>, _) = match &config.log_url {
            Some(url) => {
                let mut nats = NatsLogConfig::parse(url, &config.data).map_err(part("--log"))?;
                // One append is one JetStream atomic batch, which holds at most 1,000.
                config.max_batch_events = config.max_batch_events.min(crate::log::MAX_ATOMIC_BATCH);
                nats.max_batch_events = config.max_batch_events;
                nats.max_event_bytes = config.max_event_bytes;
                std::fs::create_dir_all(&config.data).map_err(|e| {
                    part("creating the data directory")(format!("{}: {e}", config.data.display()))
                })?;
                let log =
                    NatsLog::open(nats, hub.clone())
                        .await
                        .map_err(|source| HostError::Log {
                            dir: url.clone(),
                            source,
                        })?;
                let me = Holder {
                    host: host_id(&config).map_err(part("choosing the host id"))?,
                    api: config.advertise.clone(),
                };
                let nats = log.config();
                leases = Some(
                    Leases::open(
                        log.jetstream(),
                        &nats.stream,
                        nats.replicas,
                        nats.lease_ttl,
                        me,
                    )
                    .await
                    .map_err(|e| part("opening the plugin leases")(e.to_string()))?,
                );
                (Arc::new(log), None)
            }
            None => {
                let mut log_config = SledLogConfig::new(&config.data);
                log_config.cache_bytes = config.cache_bytes;
                log_config.max_event_bytes = config.max_event_bytes;
                log_config.max_batch_events = config.max_batch_events;
                if let Some(b) = config.segment_bytes {
                    log_config.segment_bytes = b;
                }
                if let Some(b) = config.erase_round_bytes {
                    log_config.erase_round_bytes = b;
                }
                let log = Arc::new(SledLog::open(log_config, hub.clone()).map_err(|source| {
                    HostError::Log {
                        dir: config.data.display().to_string(),
                        source,
                    }
                })?);
                (log.clone() as Arc<dyn EventLog>, Some(log))
            }
        };
        let bus = Bus::new(dyn_log.clone(), hub);
        let runtime = Runtime::new(&config.data.join("compiled"))
            .map_err(|e| part("starting the WebAssembly runtime")(e.to_string()))?;
        // Operational state lives apart from the log's disposable index (see state_db).
        let state_db = crate::state_db::open(
            &config.data,
            config.cache_bytes,
            sled_log.as_ref().map(|l| l.db()),
        )
        .map_err(|e| part("opening the state database")(e.to_string()))?;
        let schemas = Schemas::open(&state_db)
            .map_err(|e| part("opening the schema registry")(e.to_string()))?;
        let registry = Registry::new(
            runtime.clone(),
            state_db.clone(),
            bus.clone(),
            dyn_log.clone(),
            config.data.join("plugins"),
            schemas.clone(),
        );
        registry.set_limits(crate::limits::OutputLimits {
            max_event_bytes: config.max_event_bytes,
            max_batch_events: config.max_batch_events,
        });
        registry.set_policy(config.policy.clone());
        if let Some(l) = &leases {
            registry.set_leases(l.clone());
        }
        if let Some(dir) = &config.plugins
            && !dir.is_dir()
        {
            return Err(part("loading plugins")(format!(
                "--plugins {} is not a directory",
                dir.display()
            )));
        }
        for (file, err) in registry
            .load_dirs(config.plugins.as_deref(), config.precedence)
            .await
        {
            tracing::error!(file = %file.display(), error = %err, "plugin not loaded");
        }
        registry.answer_unknown_tools().await.map_err(|e| {
            part("starting the runner for requests to unknown tools")(e.to_string())
        })?;
        let flows = if config.flow_index {
            Some(
                crate::flows::start(&state_db, bus.clone(), dyn_log.clone())
                    .map_err(|e| part("starting the flow index")(e.to_string()))?,
            )
        } else {
            None
        };
        let alerts = (!config.alerts.is_empty()).then(|| {
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let alerts = crate::alerts::start(
                config.alerts.clone(),
                registry.clone(),
                flows.as_ref().map(|(_, store)| store.clone()),
                dyn_log.clone(),
                stopped,
            );
            (alerts, stop)
        });
        Ok(Self {
            config,
            log: dyn_log,
            sled_log,
            bus,
            state_db,
            schemas,
            runtime,
            registry,
            flows,
            alerts,
            leases,
        })
    }

    /// The API's state over this host, with its limits and the archive directory; the
    /// caller adds the access policy of its listener.
    pub fn api_state(&self) -> AppState {
        let state = AppState::new(
            self.log.clone(),
            self.bus.clone(),
            ApiConfig {
                max_event_bytes: self.config.max_event_bytes,
                max_batch_events: self.config.max_batch_events,
                ..ApiConfig::default()
            },
        )
        .with_archive_dir(self.config.data.join("archive"))
        .with_registry(self.registry.clone())
        .with_schemas(self.schemas.clone());
        let state = match &self.alerts {
            Some((alerts, _)) => state.with_alerts(alerts.clone()),
            None => state,
        };
        match &self.flows {
            Some((_, store)) => state.with_flows(store.clone()),
            None => state,
        }
    }

    /// The event log.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// The embedded log, when the host runs on it (not on NATS).
    pub fn sled_log(&self) -> Option<&Arc<SledLog>> {
        self.sled_log.as_ref()
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The loaded plugins.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The state database (plugin stores, schemas, the flow index).
    pub fn state_db(&self) -> &sled::Db {
        &self.state_db
    }

    /// The wasm runtime and its compile cache.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Stops the plugins and the flow index, and flushes the state database.
    pub async fn stop(self) {
        if let Some((_, stop)) = &self.alerts {
            let _ = stop.send(true);
        }
        self.registry.stop_all().await;
        if let Some(l) = &self.leases {
            l.release_all().await;
        }
        if let Some((runner, _)) = self.flows {
            runner.stop().await;
        }
        if let Err(e) = self.state_db.flush_async().await {
            tracing::warn!(error = %e, "flushing the state database at shutdown failed");
        }
    }
}

/// This host's id: the configured one, else the one kept in `DATA/host-id` (made up at the
/// first start from the machine's name and a random part, so restarts keep it and take
/// their own leases back at once).
fn host_id(config: &HostConfig) -> Result<String, String> {
    if let Some(id) = &config.host_id {
        return Ok(id.clone());
    }
    let path = config.data.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    }
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let random = uuid::Uuid::now_v7().simple().to_string();
    let id = format!("{machine}-{}", &random[random.len() - 8..]);
    std::fs::write(&path, format!("{id}\n"))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(id)
}
