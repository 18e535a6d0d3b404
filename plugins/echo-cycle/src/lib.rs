//! echo-cycle (tests only): an extractor whose output matches its own subscription, so it
//! would derive forever; the host's derivation depth limit ends the chain.

use evhost_sdk::{Error, Event, Extractor, NewEvent};

/// Echoes every `echo.>` event as `echo.again`.
pub struct Echo;

impl Extractor for Echo {
    type State = ();

    fn extract(_: &mut (), event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Error> {
        out.push(NewEvent::new(
            "echo.again",
            &event.stream,
            &serde_json::json!({}),
        )?);
        Ok(())
    }
}

evhost_sdk::export_extractor!(Echo);
