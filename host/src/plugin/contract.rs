//! The plugin contract's versions: the host's bindings of each released
//! `evhost:plugin` WIT package, one module per version, and how a component's kind and
//! version are told from its exports.
//!
//! Policy (also in README.md, "The plugin contract"): a released version is frozen (only
//! its documentation may change). A breaking change is a new version: its WIT goes in
//! `wit/vX.Y.Z/`, its bindings in a `since_vX_Y_Z` module here, a variant in
//! [`WitVersion`] and in each world's enum in `worlds.rs`, and `latest` moves to it. Old
//! versions stay loadable for at least two minor releases of evhost after the one that
//! superseded them, and their removal is announced a release ahead.

use wasmtime::component::{Component, HasSelf, InstancePre, Linker};

use super::manifest::Kind;
use super::runtime::HostState;

/// Bindings of `evhost:plugin@0.1.0`: worlds that export bare functions and take batches
/// as lists of event records.
pub(super) mod since_v0_1_0 {
    pub(crate) mod projection {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "projection",
            // A call's state writes are bounded in bytes: past the bound the call traps.
            // A read the host's store fails stops the call as the host's failure.
            imports: {
                "evhost:plugin/state.set": trappable,
                "evhost:plugin/state.delete": trappable,
                "evhost:plugin/state.get": trappable,
                "evhost:plugin/state.scan-prefix": trappable,
            },
        });
    }
    pub(crate) mod extractor {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "extractor",
            with: {
                "evhost:plugin/types": super::projection::evhost::plugin::types,
                "evhost:plugin/state": super::projection::evhost::plugin::state,
                "evhost:plugin/log": super::projection::evhost::plugin::log,
            },
        });
    }
    pub(crate) mod tool {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "tool",
            with: {
                "evhost:plugin/types": super::projection::evhost::plugin::types,
                "evhost:plugin/log": super::projection::evhost::plugin::log,
            },
        });
    }
    pub(crate) use projection::evhost::plugin::{log, state, types};
}

/// Bindings of `evhost:plugin@0.2.0`: worlds that export one interface each, batches as
/// one encoded buffer, and the `config` import.
pub(super) mod since_v0_2_0 {
    pub(crate) mod projection {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "projection",
            imports: {
                "evhost:plugin/state.set": trappable,
                "evhost:plugin/state.delete": trappable,
                "evhost:plugin/state.get": trappable,
                "evhost:plugin/state.scan-prefix": trappable,
                "evhost:plugin/state.set-many": trappable,
            },
        });
    }
    pub(crate) mod extractor {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "extractor",
            with: {
                "evhost:plugin/types": super::projection::evhost::plugin::types,
                "evhost:plugin/state": super::projection::evhost::plugin::state,
                "evhost:plugin/log": super::projection::evhost::plugin::log,
                "evhost:plugin/config": super::projection::evhost::plugin::config,
            },
        });
    }
    pub(crate) mod tool {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "tool",
            with: {
                "evhost:plugin/types": super::projection::evhost::plugin::types,
                "evhost:plugin/log": super::projection::evhost::plugin::log,
                "evhost:plugin/config": super::projection::evhost::plugin::config,
            },
        });
    }
    pub(crate) use projection::evhost::plugin::{config, log, state, types};
}

/// The newest version: what the SDK and `evhost plugin new` build against.
#[allow(unused_imports)]
pub(super) use since_v0_2_0 as latest;

/// A released version of the `evhost:plugin` WIT package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum WitVersion {
    /// `evhost:plugin@0.1.0`.
    #[serde(rename = "0.1.0")]
    V0_1_0,
    /// `evhost:plugin@0.2.0`.
    #[serde(rename = "0.2.0")]
    V0_2_0,
}

impl WitVersion {
    /// Every version the host loads, oldest first.
    pub const ALL: [WitVersion; 2] = [WitVersion::V0_1_0, WitVersion::V0_2_0];

    /// `0.2.0`, as in the package name.
    pub fn as_str(self) -> &'static str {
        match self {
            WitVersion::V0_1_0 => "0.1.0",
            WitVersion::V0_2_0 => "0.2.0",
        }
    }

    /// The export names a component of `kind` at this version has.
    fn exports(self, kind: Kind) -> &'static [&'static str] {
        match (self, kind) {
            (WitVersion::V0_1_0, Kind::Projection) => &["handle", "query"],
            (WitVersion::V0_1_0, Kind::Extractor) => &["handle"],
            (WitVersion::V0_1_0, Kind::Tool) => &["describe", "invoke"],
            (WitVersion::V0_2_0, Kind::Projection) => &["evhost:plugin/projection-handler@0.2.0"],
            (WitVersion::V0_2_0, Kind::Extractor) => &["evhost:plugin/extractor-handler@0.2.0"],
            (WitVersion::V0_2_0, Kind::Tool) => &["evhost:plugin/tool-handler@0.2.0"],
        }
    }
}

impl std::fmt::Display for WitVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The world a component implements: its kind at a version of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Contract {
    /// Projection, extractor or tool.
    pub kind: Kind,
    /// The WIT package version.
    pub wit: WitVersion,
}

impl std::fmt::Display for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "evhost:plugin/{}@{}", self.kind.as_str(), self.wit)
    }
}

const KINDS: [Kind; 3] = [Kind::Projection, Kind::Extractor, Kind::Tool];

/// Tells which world `component` implements from its exports: the one world whose exports
/// it has with the right types. `pre` is the component linked against every version's
/// imports. The error says which exports it has and what each world wants.
pub(super) fn detect(
    engine: &wasmtime::Engine,
    component: &Component,
    pre: &InstancePre<HostState>,
) -> Result<Contract, String> {
    let has: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    let mut matched = Vec::new();
    let mut mistyped = Vec::new();
    for wit in WitVersion::ALL {
        for kind in KINDS {
            let wants = wit.exports(kind);
            if !wants.iter().all(|w| has.iter().any(|h| h == w)) {
                continue;
            }
            let contract = Contract { kind, wit };
            match typecheck(contract, pre) {
                Ok(()) => matched.push(contract),
                Err(e) => mistyped.push(format!("{contract}: {e:#}")),
            }
        }
    }
    let listed = if has.is_empty() {
        "nothing".to_owned()
    } else {
        has.join(", ")
    };
    match matched.as_slice() {
        [one] => Ok(*one),
        [] => {
            let wanted: Vec<String> = WitVersion::ALL
                .iter()
                .rev()
                .flat_map(|&wit| {
                    KINDS.iter().map(move |&kind| {
                        format!(
                            "{} ({})",
                            Contract { kind, wit },
                            wit.exports(kind).join(", ")
                        )
                    })
                })
                .collect();
            let mut m = format!(
                "it implements no evhost plugin world: it exports {listed}, and a plugin exports \
                 what one of these worlds does: {}",
                wanted.join("; ")
            );
            if !mistyped.is_empty() {
                m.push_str(&format!(
                    ". It has the exports of {} with other types",
                    mistyped.join("; ")
                ));
            }
            m.push_str(
                ". Build it against wit/v0.2.0 (the SDK does) or an older version the host lists",
            );
            Err(m)
        }
        many => Err(format!(
            "it implements more than one evhost plugin world ({}): it exports {listed}; a plugin \
             implements exactly one",
            many.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Checks the types of the exports `contract` wants.
fn typecheck(contract: Contract, pre: &InstancePre<HostState>) -> wasmtime::Result<()> {
    let pre = pre.clone();
    match (contract.wit, contract.kind) {
        (WitVersion::V0_1_0, Kind::Projection) => {
            since_v0_1_0::projection::ProjectionPre::new(pre).map(drop)
        }
        (WitVersion::V0_1_0, Kind::Extractor) => {
            since_v0_1_0::extractor::ExtractorPre::new(pre).map(drop)
        }
        (WitVersion::V0_1_0, Kind::Tool) => since_v0_1_0::tool::ToolPre::new(pre).map(drop),
        (WitVersion::V0_2_0, Kind::Projection) => {
            since_v0_2_0::projection::ProjectionPre::new(pre).map(drop)
        }
        (WitVersion::V0_2_0, Kind::Extractor) => {
            since_v0_2_0::extractor::ExtractorPre::new(pre).map(drop)
        }
        (WitVersion::V0_2_0, Kind::Tool) => since_v0_2_0::tool::ToolPre::new(pre).map(drop),
    }
}

/// Adds every version's evhost imports to `linker` (the projection world of each imports
/// every interface of its version).
pub(super) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    since_v0_1_0::projection::Projection::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    since_v0_2_0::projection::Projection::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

/// A plugin's error result, whatever the version it came through.
#[derive(Debug)]
pub(super) enum GuestError {
    /// The input cannot be handled as it is.
    InvalidInput(String),
    /// Anything else.
    Failed(String),
}

impl From<since_v0_1_0::types::Error> for GuestError {
    fn from(e: since_v0_1_0::types::Error) -> Self {
        match e {
            since_v0_1_0::types::Error::InvalidInput(m) => GuestError::InvalidInput(m),
            since_v0_1_0::types::Error::Failed(m) => GuestError::Failed(m),
        }
    }
}

impl From<since_v0_2_0::types::Error> for GuestError {
    fn from(e: since_v0_2_0::types::Error) -> Self {
        match e {
            since_v0_2_0::types::Error::InvalidInput(m) => GuestError::InvalidInput(m),
            since_v0_2_0::types::Error::Failed(m) => GuestError::Failed(m),
        }
    }
}

/// The imports of each version, answered by the same host functions.
macro_rules! host_imports {
    ($v:ident $(, $more:item)*) => {
        impl $v::types::Host for HostState {}

        impl $v::state::Host for HostState {
            fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
                self.state_get(key)
            }
            fn set(&mut self, key: String, value: String) -> wasmtime::Result<()> {
                self.write(key, Some(value))
            }
            fn delete(&mut self, key: String) -> wasmtime::Result<()> {
                self.write(key, None)
            }
            fn scan_prefix(&mut self, prefix: String) -> wasmtime::Result<Vec<(String, String)>> {
                self.state_scan(prefix)
            }
            $($more)*
        }

        impl $v::log::Host for HostState {
            fn log(&mut self, level: $v::log::Level, message: String) {
                use $v::log::Level as L;
                let level = match level {
                    L::Trace => tracing::Level::TRACE,
                    L::Debug => tracing::Level::DEBUG,
                    L::Info => tracing::Level::INFO,
                    L::Warn => tracing::Level::WARN,
                    L::Error => tracing::Level::ERROR,
                };
                self.log_line(level, message)
            }
        }
    };
}

host_imports!(since_v0_1_0);
host_imports!(
    since_v0_2_0,
    fn set_many(&mut self, entries: Vec<(String, String)>) -> wasmtime::Result<()> {
        for (k, v) in entries {
            self.write(k, Some(v))?;
        }
        Ok(())
    }
);

impl since_v0_2_0::config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config_value(&key)
    }
    fn entries(&mut self) -> Vec<(String, String)> {
        self.config_entries()
    }
}
