//! What an operator may ask of a running runner, and the answers.

use serde::Serialize;
use tokio::sync::oneshot;

use crate::dead_letter::DeadLetter;

/// What retrying a dead letter did.
#[derive(Debug, Clone, Serialize)]
pub struct RetryOutcome {
    /// True when the plugin handled the event: its effects are committed and the dead
    /// letter is gone.
    pub handled: bool,
    /// Why it failed again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The dead letter as it now stands, when it failed again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
}

/// Why an operator's request could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The plugin has no dead letter at that position.
    #[error("plugin {plugin:?} has no dead letter at position {position}")]
    NotFound {
        /// The plugin.
        plugin: String,
        /// The position asked for.
        position: u64,
    },
    /// The runner is stopped (being replaced or unloaded): try again.
    #[error("the plugin's runner is stopped (being replaced or unloaded); try again")]
    Stopped,
    /// Storage failed, or the event cannot be read.
    #[error("{0}")]
    Unavailable(String),
    /// Another host of the cluster runs the plugin (it holds the plugin's lease): its dead
    /// letters and quarantine are that host's to handle.
    #[error("{}", not_here(.0))]
    NotHere(crate::lease::Placement),
}

fn not_here(p: &crate::lease::Placement) -> String {
    match (&p.host, &p.api) {
        (Some(host), Some(api)) => {
            format!("the plugin runs on host {host:?} ({api}), which holds its lease: ask there")
        }
        (Some(host), None) => {
            format!("the plugin runs on host {host:?}, which holds its lease: ask there")
        }
        _ => "no host of the cluster holds the plugin's lease yet; try again shortly".into(),
    }
}

/// An operator's request, as the runner's loop receives it between batches.
pub(super) enum Control {
    Resume(oneshot::Sender<Result<bool, ControlError>>),
    Retry(u64, oneshot::Sender<Result<RetryOutcome, ControlError>>),
    Delete(u64, oneshot::Sender<Result<bool, ControlError>>),
}

impl Control {
    /// Answers the request with `error`, without carrying it out.
    pub(super) fn refuse(self, error: ControlError) {
        match self {
            Control::Resume(reply) | Control::Delete(_, reply) => {
                let _ = reply.send(Err(error));
            }
            Control::Retry(_, reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}
