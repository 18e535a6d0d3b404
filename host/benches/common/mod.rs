//! Set-up the plugin benchmarks share: a two-thread tokio runtime like the host's, and a
//! host in a temporary directory started through [`Host`] (log, bus, state database, wasm
//! runtime, registry, the runner that answers requests for tools that are not loaded),
//! without the HTTP API and without the flow index (a runner over every event, which would
//! share the cores with the plugin measured).

#![allow(dead_code)] // each bench uses a part

use std::sync::Arc;

use evhost::plugin::Runtime;
use evhost::registry::Registry;
use evhost::{Bus, EventLog, Host, HostConfig, SledLog};

/// A host's parts, kept alive with their directory.
pub struct BenchHost {
    pub host: Host,
    pub log: Arc<SledLog>,
    pub dyn_log: Arc<dyn EventLog>,
    pub bus: Bus,
    /// The state database plugin stores live in.
    pub db: sled::Db,
    /// Its compile cache starts empty.
    pub runtime: Arc<Runtime>,
    pub registry: Arc<Registry>,
    pub dir: tempfile::TempDir,
}

/// The tokio runtime the benchmarks run in: two workers, like the machine.
pub fn tokio() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A fresh host in a temporary directory, with `evhost serve`'s defaults.
pub async fn host() -> BenchHost {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig {
        flow_index: false,
        ..HostConfig::new(dir.path())
    };
    let host = Host::start(config).await.unwrap();
    BenchHost {
        log: host.log().clone(),
        dyn_log: host.log().clone() as Arc<dyn EventLog>,
        bus: host.bus().clone(),
        db: host.state_db().clone(),
        runtime: host.runtime().clone(),
        registry: host.registry().clone(),
        host,
        dir,
    }
}
