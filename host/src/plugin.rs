//! Plugins: the manifest, the sandboxed component runtime, and the store of their state.

mod manifest;
mod runtime;
mod store;

pub use manifest::{Capabilities, InvalidManifest, Kind, Limits, Manifest, StartFrom, valid_name};
pub use runtime::{Compiled, PluginError, ProjectionPlugin, Projector, Runtime, StateView, Writes};
pub use store::{MemState, PluginStore};
