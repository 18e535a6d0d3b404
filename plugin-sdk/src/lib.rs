//! evhost-sdk: write evhost plugins in Rust, against `evhost:plugin@0.2.0`.
//!
//! A projection folds events into typed state. Implement [`Projection`], export it with
//! [`export_projection!`], and build with `cargo build --release --target wasm32-wasip2`:
//!
//! ```
//! use evhost_sdk::{Event, Error, Projection};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Counts { total: u64 }
//!
//! pub struct Counter;
//!
//! impl Projection for Counter {
//!     type State = Counts;
//!     // Fold every event of a stream into that stream's state (the default key).
//!     fn apply(_stream: &str, state: &mut Counts, _event: &Event) -> Result<(), Error> {
//!         state.total += 1;
//!         Ok(())
//!     }
//! }
//! // In the plugin crate: evhost_sdk::export_projection!(Counter);
//!
//! // Tested natively, no wasm needed:
//! let mut h = evhost_sdk::testing::Harness::<Counter>::new();
//! h.handle(vec![Event::new("a.b", "{}").with_stream("s1"), Event::new("a.c", "{}").with_stream("s1")]).unwrap();
//! assert_eq!(h.state("s1").unwrap().total, 2);
//! ```
//!
//! The host stores each key's state beside the projection's checkpoint, commits a batch's
//! state and checkpoint together, and serves it at `GET /v1/projections/{name}/state?key=`.
//! Extractors ([`Extractor`], [`export_extractor!`]) derive events; tools ([`Tool`],
//! [`export_tool!`]) run invocations. [`log`] writes to the plugin's log, [`config`] reads
//! its configuration, and [`testing::Harness`] runs all three kinds natively.
//!
//! The WIT the SDK implements is inside the crate (`wit/plugin.wit`), so the crate stands
//! alone: depend on it by path or git.

/// The plugin's allocator inside single-threaded wasm (feature `allocator`, on by default).
#[cfg(all(
    feature = "allocator",
    target_family = "wasm",
    not(target_feature = "atomics")
))]
#[global_allocator]
static ALLOCATOR: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

pub mod batch;
pub mod config;
mod event;
mod extractor;
pub mod log;
mod projection;
pub mod state;
pub mod testing;
mod tool;

pub use event::{Error, Event};
pub use extractor::{Extractor, NewEvent};
pub use projection::{Keys, KeysIter, Projection, Store};
pub use tool::Tool;

/// The generated bindings, once per world; the shared interfaces (types, state, log,
/// config) are generated with the projection world and reused by the others. Private: the
/// SDK's own types are the API.
mod bindings {
    pub mod projection {
        wit_bindgen::generate!({
            path: "wit",
            world: "projection",
            pub_export_macro: true,
            export_macro_name: "export_projection_world",
            default_bindings_module: "evhost_sdk::__private::projection",
        });
    }
    pub mod extractor {
        wit_bindgen::generate!({
            path: "wit",
            world: "extractor",
            pub_export_macro: true,
            export_macro_name: "export_extractor_world",
            default_bindings_module: "evhost_sdk::__private::extractor",
            with: {
                "evhost:plugin/types@0.2.0": crate::bindings::projection::evhost::plugin::types,
                "evhost:plugin/state@0.2.0": crate::bindings::projection::evhost::plugin::state,
                "evhost:plugin/log@0.2.0": crate::bindings::projection::evhost::plugin::log,
                "evhost:plugin/config@0.2.0": crate::bindings::projection::evhost::plugin::config,
            },
        });
    }
    pub mod tool {
        wit_bindgen::generate!({
            path: "wit",
            world: "tool",
            pub_export_macro: true,
            export_macro_name: "export_tool_world",
            default_bindings_module: "evhost_sdk::__private::tool",
            with: {
                "evhost:plugin/types@0.2.0": crate::bindings::projection::evhost::plugin::types,
                "evhost:plugin/log@0.2.0": crate::bindings::projection::evhost::plugin::log,
                "evhost:plugin/config@0.2.0": crate::bindings::projection::evhost::plugin::config,
            },
        });
    }
    #[allow(unused_imports)]
    pub(crate) use projection::evhost::plugin::{config, log, state, types};
}

/// Glue for the export macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::extractor;
    pub use crate::bindings::projection;
    pub use crate::bindings::tool;
    pub use crate::bindings::types::{Error as WitError, NewEvent as WitNewEvent, ToolInfo};

    use crate::bindings::{state, types as wit};
    use crate::{Error, Extractor, NewEvent, Projection, Store, Tool};

    /// The host's store, through the `state` import.
    struct HostStore;

    impl Store for HostStore {
        fn get(&mut self, key: &str) -> Option<String> {
            state::get(key)
        }
        fn set(&mut self, key: &str, value: &str) {
            state::set(key, value)
        }
        fn delete(&mut self, key: &str) {
            state::delete(key)
        }
        fn scan_prefix(&mut self, prefix: &str) -> Vec<(String, String)> {
            state::scan_prefix(prefix)
        }
        fn set_many(&mut self, entries: Vec<(String, String)>) {
            state::set_many(&entries)
        }
    }

    fn to_wit(e: Error) -> wit::Error {
        match e {
            Error::InvalidInput(m) => wit::Error::InvalidInput(m),
            Error::Failed(m) => wit::Error::Failed(m),
        }
    }

    pub fn handle<P: Projection>(batch: Vec<u8>) -> Result<(), WitError> {
        report_panics();
        let events = crate::batch::iter_from_host(&batch).map_err(to_wit)?;
        crate::projection::handle_batch::<P, _>(&mut HostStore, events).map_err(to_wit)
    }

    pub fn query<P: Projection>(request: String) -> Result<String, WitError> {
        report_panics();
        P::query(&mut HostStore, &request).map_err(to_wit)
    }

    pub fn extract<X: Extractor>(batch: Vec<u8>) -> Result<Vec<Vec<WitNewEvent>>, WitError> {
        report_panics();
        let events = crate::batch::iter_from_host(&batch).map_err(to_wit)?;
        let out =
            crate::extractor::extract_batch::<X, _>(&mut HostStore, events).map_err(to_wit)?;
        Ok(out
            .into_iter()
            .map(|list| {
                list.into_iter()
                    .map(|e: NewEvent| WitNewEvent {
                        event_type: e.event_type,
                        stream: e.stream,
                        payload: e.payload,
                        metadata: e.metadata,
                    })
                    .collect()
            })
            .collect())
    }

    pub fn describe<T: Tool>() -> ToolInfo {
        report_panics();
        ToolInfo {
            name: T::NAME.to_owned(),
            description: T::DESCRIPTION.to_owned(),
            input_schema: T::input_schema().to_string(),
        }
    }

    pub fn invoke<T: Tool>(input: String) -> Result<String, WitError> {
        report_panics();
        crate::tool::invoke_json::<T>(&input).map_err(to_wit)
    }

    /// Reports a panic to the host before the component traps, as an error log line
    /// starting `panicked at `: the host makes it the reason of the trap, so the dead
    /// letter and the status say what panicked instead of "unreachable executed". Installed
    /// once, at the first call of any export.
    fn report_panics() {
        #[cfg(target_arch = "wasm32")]
        {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                std::panic::set_hook(Box::new(|info| {
                    let payload = info
                        .payload()
                        .downcast_ref::<&str>()
                        .copied()
                        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
                        .unwrap_or("(a panic payload that is not text)");
                    let at = info
                        .location()
                        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                        .unwrap_or_else(|| "an unknown place".into());
                    crate::log::error(&format!("panicked at {at}: {payload}"));
                }));
            });
        }
    }
}

/// Exports a [`Projection`] implementation as the component's `projection` world.
#[macro_export]
macro_rules! export_projection {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __EvhostProjectionExport;
        impl $crate::__private::projection::exports::evhost::plugin::projection_handler::Guest
            for __EvhostProjectionExport
        {
            fn handle(
                batch: ::std::vec::Vec<u8>,
            ) -> ::std::result::Result<(), $crate::__private::WitError> {
                $crate::__private::handle::<$t>(batch)
            }
            fn query(
                request: ::std::string::String,
            ) -> ::std::result::Result<::std::string::String, $crate::__private::WitError> {
                $crate::__private::query::<$t>(request)
            }
        }
        // Inside wasm only: a native build (the plugin's tests) exports no symbols, whose
        // interface-qualified names native linkers refuse.
        #[cfg(target_arch = "wasm32")]
        $crate::__private::projection::export_projection_world!(__EvhostProjectionExport);
    };
}

/// Exports an [`Extractor`] implementation as the component's `extractor` world.
#[macro_export]
macro_rules! export_extractor {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __EvhostExtractorExport;
        impl $crate::__private::extractor::exports::evhost::plugin::extractor_handler::Guest
            for __EvhostExtractorExport
        {
            fn handle(
                batch: ::std::vec::Vec<u8>,
            ) -> ::std::result::Result<
                ::std::vec::Vec<::std::vec::Vec<$crate::__private::WitNewEvent>>,
                $crate::__private::WitError,
            > {
                $crate::__private::extract::<$t>(batch)
            }
        }
        // Inside wasm only: a native build (the plugin's tests) exports no symbols, whose
        // interface-qualified names native linkers refuse.
        #[cfg(target_arch = "wasm32")]
        $crate::__private::extractor::export_extractor_world!(__EvhostExtractorExport);
    };
}

/// Exports a [`Tool`] implementation as the component's `tool` world.
#[macro_export]
macro_rules! export_tool {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __EvhostToolExport;
        impl $crate::__private::tool::exports::evhost::plugin::tool_handler::Guest
            for __EvhostToolExport
        {
            fn describe() -> $crate::__private::ToolInfo {
                $crate::__private::describe::<$t>()
            }
            fn invoke(
                input: ::std::string::String,
            ) -> ::std::result::Result<::std::string::String, $crate::__private::WitError> {
                $crate::__private::invoke::<$t>(input)
            }
        }
        // Inside wasm only: a native build (the plugin's tests) exports no symbols, whose
        // interface-qualified names native linkers refuse.
        #[cfg(target_arch = "wasm32")]
        $crate::__private::tool::export_tool_world!(__EvhostToolExport);
    };
}

/// True when `s` is a valid event type: dot-separated segments of `[A-Za-z0-9_-]+`.
///
/// The host refuses any other type, so plugins can check what they emit before emitting it.
pub fn is_valid_event_type(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_type_rules_match_the_host() {
        assert!(super::is_valid_event_type("memory.entity.extracted"));
        assert!(!super::is_valid_event_type("memory..x"));
        assert!(!super::is_valid_event_type("memory.*"));
    }
}
