//! Time travel's replay of a projection into a scratch store, as the live run folded it.

use std::sync::Arc;

use crate::event::Event;
use crate::plugin::{MemState, PluginError, ProjectionPlugin};

/// Folds `events` into `scratch` in order as the live run did: an event the plugin fails on
/// (its own fault, which the live run dead-lettered) is passed over, found by halving the
/// failing batch, and the events around it are folded. A failure of the host ends the
/// replay. Returns how many events were passed over.
pub(super) fn fold_passing_failures(
    plugin: &ProjectionPlugin,
    scratch: &Arc<MemState>,
    events: &[Arc<Event>],
) -> Result<u64, PluginError> {
    match plugin.fold(scratch.clone(), events) {
        Ok(writes) => {
            scratch.apply(writes);
            Ok(0)
        }
        Err(e @ PluginError::Host { .. }) => Err(e),
        Err(_) if events.len() == 1 => Ok(1),
        Err(_) => {
            let (first, second) = events.split_at(events.len() / 2);
            Ok(fold_passing_failures(plugin, scratch, first)?
                + fold_passing_failures(plugin, scratch, second)?)
        }
    }
}
