//! The plugin's configuration: its manifest's `[config]` table with the operator's
//! overrides of that load (`evhost plugin load --config KEY=VALUE`). Values marked secret
//! in the manifest are readable here and nowhere else: the host never logs or shows them.
//! Natively (tests) the values are those given to the harness.

/// The value of `key`, if configured.
pub fn get(key: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    {
        crate::bindings::config::get(key)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        native::VALUES.with(|v| v.borrow().get(key).cloned())
    }
}

/// Every configured key with its value, in key order.
pub fn entries() -> Vec<(String, String)> {
    #[cfg(target_arch = "wasm32")]
    {
        crate::bindings::config::entries()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        native::VALUES.with(|v| {
            v.borrow()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        /// What the harness configured for the calls it makes on this thread.
        pub(crate) static VALUES: RefCell<BTreeMap<String, String>> = RefCell::default();
    }

    /// Runs `f` with `values` as the configuration.
    pub(crate) fn with<R>(values: &BTreeMap<String, String>, f: impl FnOnce() -> R) -> R {
        let before = VALUES.with(|v| v.replace(values.clone()));
        let r = f();
        VALUES.with(|v| *v.borrow_mut() = before);
        r
    }
}
