//! Log lines to the host: kept in the plugin's bounded log buffer
//! (`GET /v1/plugins/{name}/logs`, `evhost plugin logs NAME`) and in the host's own log, with
//! the plugin's name. Natively (tests) they go to stderr.

/// How much a line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Finest detail.
    Trace,
    /// Detail for debugging.
    Debug,
    /// What happened.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something failed.
    Error,
}

/// Sends `message` at `level`.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::projection_bindings::evhost::plugin::log as wit;
        let level = match level {
            Level::Trace => wit::Level::Trace,
            Level::Debug => wit::Level::Debug,
            Level::Info => wit::Level::Info,
            Level::Warn => wit::Level::Warn,
            Level::Error => wit::Level::Error,
        };
        wit::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message}");
}

/// Sends `message` at trace level.
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Sends `message` at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Sends `message` at info level.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Sends `message` at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Sends `message` at error level.
pub fn error(message: &str) {
    log(Level::Error, message);
}
