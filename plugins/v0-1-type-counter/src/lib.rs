//! v0-1-type-counter (tests only): type-counter as it was built against
//! `evhost:plugin@0.1.0`, with the SDK of that version. The host must keep loading and
//! running it beside 0.2.0 plugins.

use evhost_sdk_v0_1::{Error, Event, Projection};

/// Counts events per type; the state under key `T` is the number of `T` events seen.
pub struct TypeCounter;

impl Projection for TypeCounter {
    type State = u64;

    fn key(event: &Event) -> Option<String> {
        Some(event.event_type.clone())
    }

    fn apply(count: &mut u64, _event: &Event) -> Result<(), Error> {
        *count += 1;
        Ok(())
    }
}

evhost_sdk_v0_1::export_projection!(TypeCounter);
