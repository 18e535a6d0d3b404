//! The one contract a runner drives: a handler takes a batch of events over a view of its
//! state and returns the writes to commit and the events it derived. Wasm projections and
//! extractors, tool workers, the flow index and native code (the benchmarks, the runner's
//! own tests) all implement it, so the runner has one caller's view of them.

use std::sync::Arc;

use super::runtime::{PluginError, StateView, Writes};
use crate::event::{Event, NewEvent, StreamName};

/// An event a handler derived, ready to append (the runner adds ids and causation).
#[derive(Debug, Clone)]
pub struct Derived {
    /// The stream to append to.
    pub stream: StreamName,
    /// The event.
    pub event: NewEvent,
}

/// What handling a batch produced.
#[derive(Debug, Default)]
pub struct Output {
    /// State writes to commit with the checkpoint.
    pub writes: Writes,
    /// Per input event, the events derived from it (empty for projections).
    pub derived: Vec<Vec<Derived>>,
}

/// Something that handles a batch of events. Called asynchronously, so a handler can
/// append and wait (tool workers) or run a component on a blocking thread (wasm).
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// `name@version`, for logs and errors.
    fn id(&self) -> &str;
    /// Handles `events` over `view`; returns what to commit, or why it failed.
    async fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, HandlerError>;

    /// True when the next batch may be handled before this one's derived events with fixed
    /// ids are committed. By default a runner waits for them, since a handler may look
    /// those ids up to decide what to derive next. When true, the runner handles at most
    /// one batch ahead: when it calls [`Handler::handle`], everything derived before the
    /// last call whose output it took is committed, and the handler must itself answer for
    /// what that call derived (tool workers remember the invocations it answered).
    fn derives_ahead_of_commits(&self) -> bool {
        false
    }
}

/// Why a handler failed, which decides what the runner does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The plugin failed on these events: the failure policy applies (split, retry,
    /// dead-letter, quarantine).
    #[error("{0}")]
    Plugin(String),
    /// The host failed (the log or the store): retried with backoff, never dead-lettered.
    #[error("{0}")]
    Host(String),
}

impl From<PluginError> for HandlerError {
    fn from(e: PluginError) -> Self {
        match e {
            e @ PluginError::Host { .. } => Self::Host(e.to_string()),
            e => Self::Plugin(e.to_string()),
        }
    }
}

/// Runs `call` on tokio's blocking threads (a component call is synchronous and may run
/// for its whole time limit); a call lost to a panic is the plugin's failure.
pub(crate) async fn on_blocking_thread<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, PluginError> + Send + 'static,
) -> Result<T, HandlerError> {
    match tokio::task::spawn_blocking(call).await {
        Ok(r) => r.map_err(HandlerError::from),
        Err(e) => Err(HandlerError::Plugin(format!("the call was lost: {e}"))),
    }
}
