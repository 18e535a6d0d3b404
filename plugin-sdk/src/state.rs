//! The host's store of the plugin's state, key by key, beside the typed state
//! [`crate::Projection`] and [`crate::Extractor`] manage: for plugins that lay out their
//! own keys. Writes land with the call's other writes (committed with the batch's
//! checkpoint, or not at all) and count against `limits.state_write_bytes`. Inside wasm
//! only: natively, use the harness's typed state instead.

/// The value under `key`.
pub fn get(key: &str) -> Option<String> {
    imp::get(key)
}

/// Sets `key` to `value`.
pub fn set(key: &str, value: &str) {
    imp::set(key, value)
}

/// Removes `key`.
pub fn delete(key: &str) {
    imp::delete(key)
}

/// Every key starting with `prefix`, in key order, with its value.
pub fn scan_prefix(prefix: &str) -> Vec<(String, String)> {
    imp::scan_prefix(prefix)
}

#[cfg(target_arch = "wasm32")]
mod imp {
    pub(super) use crate::bindings::state::{delete, get, scan_prefix, set};
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    const NATIVE: &str = "evhost_sdk::state reaches the host's store and runs inside wasm only";
    pub(super) fn get(_: &str) -> Option<String> {
        panic!("{NATIVE}")
    }
    pub(super) fn set(_: &str, _: &str) {
        panic!("{NATIVE}")
    }
    pub(super) fn delete(_: &str) {
        panic!("{NATIVE}")
    }
    pub(super) fn scan_prefix(_: &str) -> Vec<(String, String)> {
        panic!("{NATIVE}")
    }
}
