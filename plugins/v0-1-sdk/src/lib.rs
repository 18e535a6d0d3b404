//! FROZEN: the evhost SDK as it was for `evhost:plugin@0.1.0`, kept to build the test guests
//! that check the host still runs plugins of that version. Do not change it; new work goes
//! into `plugin-sdk/`.
//!
//! evhost-sdk: write evhost plugins in Rust.
//!
//! A projection folds events into typed state. Implement [`Projection`], export it with
//! [`export_projection!`], and build with `cargo build --release --target wasm32-wasip2`:
//!
//! ```
//! use evhost_sdk_v0_1::{Event, Error, Projection};
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
//!     fn apply(state: &mut Counts, _event: &Event) -> Result<(), Error> {
//!         state.total += 1;
//!         Ok(())
//!     }
//! }
//! // In the plugin crate: evhost_sdk_v0_1::export_projection!(Counter);
//!
//! // Tested natively, no wasm needed:
//! let mut h = evhost_sdk_v0_1::testing::Harness::<Counter>::new();
//! h.handle(vec![Event::new("a.b", "{}").with_stream("s1"), Event::new("a.c", "{}").with_stream("s1")]).unwrap();
//! assert_eq!(h.state("s1").unwrap().total, 2);
//! ```
//!
//! The host stores each key's state beside the projection's checkpoint, commits a batch's
//! state and checkpoint together, and serves it at `GET /v1/projections/{name}/state?key=`.

mod event;
mod extractor;
pub mod log;
mod projection;
pub mod testing;
mod tool;

pub use event::{Error, Event};
pub use extractor::{Extractor, NewEvent};
pub use projection::{Projection, Store};
pub use tool::{Tool, invoke_json};

/// Generated bindings of the `projection` world; glue for [`export_projection!`].
#[doc(hidden)]
pub mod projection_bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "projection",
        pub_export_macro: true,
        export_macro_name: "export_projection_world",
        default_bindings_module: "evhost_sdk_v0_1::projection_bindings",
    });
}

/// Generated bindings of the `extractor` world; glue for [`export_extractor!`].
#[doc(hidden)]
pub mod extractor_bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "extractor",
        pub_export_macro: true,
        export_macro_name: "export_extractor_world",
        default_bindings_module: "evhost_sdk_v0_1::extractor_bindings",
    });
}

/// Generated bindings of the `tool` world; glue for [`export_tool!`].
#[doc(hidden)]
pub mod tool_bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "tool",
        pub_export_macro: true,
        export_macro_name: "export_tool_world",
        default_bindings_module: "evhost_sdk_v0_1::tool_bindings",
    });
}

#[doc(hidden)]
pub mod __private {
    pub use crate::extractor::wasm_extract;
    pub use crate::projection::{wasm_handle, wasm_query};
    pub use crate::tool::wasm::{wasm_describe, wasm_invoke};

    /// Reports a panic to the host before the component traps, as an error log line
    /// starting `panicked at `: the host makes it the reason of the trap, so the dead
    /// letter and the status say what panicked instead of "unreachable executed". Installed
    /// once, at the first call of any export.
    pub fn report_panics() {
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

/// Exports an [`Extractor`] implementation as the component's `extractor` world.
#[macro_export]
macro_rules! export_extractor {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __EvhostExtractorExport;
        impl $crate::extractor_bindings::Guest for __EvhostExtractorExport {
            fn handle(
                events: ::std::vec::Vec<$crate::extractor_bindings::evhost::plugin::types::Event>,
            ) -> ::std::result::Result<
                ::std::vec::Vec<
                    ::std::vec::Vec<$crate::extractor_bindings::evhost::plugin::types::NewEvent>,
                >,
                $crate::extractor_bindings::evhost::plugin::types::Error,
            > {
                $crate::__private::report_panics();
                $crate::__private::wasm_extract::<$t>(events)
            }
        }
        $crate::extractor_bindings::export_extractor_world!(__EvhostExtractorExport);
    };
}

/// Exports a [`Tool`] implementation as the component's `tool` world.
#[macro_export]
macro_rules! export_tool {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __EvhostToolExport;
        impl $crate::tool_bindings::Guest for __EvhostToolExport {
            fn describe() -> $crate::tool_bindings::evhost::plugin::types::ToolInfo {
                $crate::__private::report_panics();
                $crate::__private::wasm_describe::<$t>()
            }
            fn invoke(
                input: ::std::string::String,
            ) -> ::std::result::Result<
                ::std::string::String,
                $crate::tool_bindings::evhost::plugin::types::Error,
            > {
                $crate::__private::report_panics();
                $crate::__private::wasm_invoke::<$t>(input)
            }
        }
        $crate::tool_bindings::export_tool_world!(__EvhostToolExport);
    };
}

/// Exports a [`Projection`] implementation as the component's `projection` world.
#[macro_export]
macro_rules! export_projection {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __EvhostProjectionExport;
        impl $crate::projection_bindings::Guest for __EvhostProjectionExport {
            fn handle(
                events: ::std::vec::Vec<$crate::projection_bindings::evhost::plugin::types::Event>,
            ) -> ::std::result::Result<(), $crate::projection_bindings::evhost::plugin::types::Error> {
                $crate::__private::report_panics();
                $crate::__private::wasm_handle::<$t>(events)
            }
            fn query(
                request: ::std::string::String,
            ) -> ::std::result::Result<::std::string::String, $crate::projection_bindings::evhost::plugin::types::Error> {
                $crate::__private::report_panics();
                $crate::__private::wasm_query::<$t>(request)
            }
        }
        $crate::projection_bindings::export_projection_world!(__EvhostProjectionExport);
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
