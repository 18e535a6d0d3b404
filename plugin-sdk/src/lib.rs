//! evhost-sdk: what a plugin author needs to write an evhost plugin in Rust.
//!
//! Plugins are WebAssembly components built for `wasm32-wasip2` against the WIT package in
//! `wit/`. This crate will carry the typed events, the plugin traits, the export macro and a
//! native test harness; for now it only names the event-type rules plugins share with the
//! host.

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
