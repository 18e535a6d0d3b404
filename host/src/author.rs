//! The plugin author's loop, offline: `evhost plugin new` writes a project that builds as it
//! is, `plugin build` turns it into the component named after its manifest, and `plugin test`
//! runs that component in the host's own runtime over fixture files, with the manifest's
//! limits and the grants given. Calls `plugin` (runtime, manifest) and `registry` (grants);
//! never the log, bus or runner: nothing here needs a running host.

mod compare;
pub mod fixture;
pub mod fixtures;
pub mod project;
pub mod scaffold;

pub use fixture::{Fixture, fixture_files};
pub use fixtures::{TestOptions, TestReport};
pub use project::{Lang, Project};
pub use scaffold::{NewProject, SdkSource};
