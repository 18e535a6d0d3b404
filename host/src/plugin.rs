//! Plugins: the manifest, the sandboxed component runtime and its worlds, and the store of
//! their state.

mod manifest;
mod runtime;
mod sandbox;
mod store;
mod worlds;

pub use manifest::{
    Capabilities, InvalidManifest, Kind, Limits, Manifest, OnFailure, StartFrom, valid_name,
};
pub use runtime::{
    CachePin, CallContext, CompileError, Compiled, Plugin, PluginError, Runtime, StateError,
    StateView, UsageReport, Writes, component_hash,
};
pub use store::{MemState, PluginStore, describe_error};
pub use worlds::{
    Derived, ExtractorPlugin, Handler, Output, ProjectionPlugin, ToolInfo, ToolPlugin,
    batch_context,
};
