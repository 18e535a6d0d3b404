//! echo-cycle (tests only): an extractor whose output matches its own subscription, so it
//! would derive forever; the host's derivation depth limit ends the chain. An event whose
//! payload is `{"forge": {"type": T, "stream": S}}` derives a `T` event on stream `S`
//! instead: how the tests try to make a plugin derive the host's own events.

use evhost_sdk::{Error, Event, Extractor, NewEvent};

/// Echoes every `echo.>` event as `echo.again` (or as what its payload asks to forge).
pub struct Echo;

#[derive(serde::Deserialize)]
struct Forge {
    #[serde(rename = "type")]
    event_type: String,
    stream: String,
}

#[derive(serde::Deserialize)]
struct Asked {
    forge: Option<Forge>,
}

impl Extractor for Echo {
    type State = ();

    fn extract(_: &mut (), event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Error> {
        let asked: Option<Asked> = event.payload().ok();
        match asked.and_then(|a| a.forge) {
            Some(f) => out.push(NewEvent::new(
                &f.event_type,
                &f.stream,
                &serde_json::json!({}),
            )?),
            None => out.push(NewEvent::new(
                "echo.again",
                &event.stream,
                &serde_json::json!({}),
            )?),
        }
        Ok(())
    }
}

evhost_sdk::export_extractor!(Echo);
