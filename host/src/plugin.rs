//! Plugins: the manifest, the sandboxed component runtime and its worlds, and the store of
//! their state.

mod batch;
mod contract;
mod handler;
mod logs;
mod manifest;
mod runtime;
mod sandbox;
mod store;
mod worlds;

pub use contract::{Contract, WitVersion};
pub use handler::{Derived, Handler, HandlerError, Output};
pub use logs::{LOG_BUFFER_BYTES, LogLine, LogPage, MAX_LINE_BYTES, PluginLogs};
pub use manifest::{
    Capabilities, ConfigDetail, ConfigEntry, InvalidManifest, Kind, Limits, MAX_CONFIG_VALUE_BYTES,
    Manifest, OnFailure, PluginConfig, PluginId, Snapshots, StartFrom, valid_name,
};
pub use runtime::{
    CachePin, CallContext, CompileError, Compiled, Plugin, PluginError, Runtime, RuntimeError,
    StateError, StateView, UsageReport, Writes, component_hash,
};
pub use store::{Comparison, MemState, PluginStore, StoreError, StoreResult, generations};
pub use worlds::{ExtractorPlugin, ProjectionPlugin, ToolInfo, ToolPlugin};
