//! v0-1-tagger (tests only): an extractor built against `evhost:plugin@0.1.0`. Every
//! `note.added` event derives a `note.tagged` event on the same stream whose payload names
//! the note's first word.

use evhost_sdk_v0_1::{Error, Event, Extractor, NewEvent};

/// Tags notes by their first word.
pub struct Tagger;

#[derive(serde::Deserialize)]
struct Note {
    text: String,
}

impl Extractor for Tagger {
    type State = ();

    fn extract(_: &mut (), event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Error> {
        let note: Note = event.payload()?;
        let tag = note
            .text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_lowercase();
        out.push(NewEvent::new(
            "note.tagged",
            &event.stream,
            &serde_json::json!({ "tag": tag }),
        )?);
        Ok(())
    }
}

evhost_sdk_v0_1::export_extractor!(Tagger);
