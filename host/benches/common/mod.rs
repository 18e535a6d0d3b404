//! Set-up the plugin benchmarks share: a two-thread tokio runtime like the host's, and a
//! host in a temporary directory (log, bus, wasm runtime, registry), without the HTTP API.

#![allow(dead_code)] // each bench uses a part

use std::sync::Arc;

use evhost::plugin::Runtime;
use evhost::registry::Registry;
use evhost::schemas::Schemas;
use evhost::{Bus, EventLog, Hub, SledLog, SledLogConfig};

/// A host's parts, kept alive with their directory.
pub struct BenchHost {
    pub dir: tempfile::TempDir,
    pub log: Arc<SledLog>,
    pub dyn_log: Arc<dyn EventLog>,
    pub bus: Bus,
    pub db: sled::Db,
    /// Its compile cache starts empty.
    pub runtime: Arc<Runtime>,
    pub registry: Arc<Registry>,
}

/// The tokio runtime the benchmarks run in: two workers, like the machine.
pub fn tokio() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A fresh host in a temporary directory.
pub fn host() -> BenchHost {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::new(10_000);
    let log =
        Arc::new(SledLog::open(SledLogConfig::new(dir.path().join("log")), hub.clone()).unwrap());
    let dyn_log = log.clone() as Arc<dyn EventLog>;
    let bus = Bus::new(dyn_log.clone(), hub);
    let db = log.db().clone();
    let runtime = Runtime::new(&dir.path().join("compiled")).unwrap();
    let registry = Registry::new(
        runtime.clone(),
        db.clone(),
        bus.clone(),
        dyn_log.clone(),
        dir.path().join("plugins"),
        Schemas::open(&db).unwrap(),
    );
    BenchHost {
        dir,
        log,
        dyn_log,
        bus,
        db,
        runtime,
        registry,
    }
}
