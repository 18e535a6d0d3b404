//! entity-extractor: turns `memory.created` into `memory.entity.extracted`.
//!
//! The rule is deliberately simple: runs of capitalised words are entities ("Ada Lovelace",
//! "London"). A run of two or more words is a `name`; a single word is a `term`, with less
//! confidence when it opens a sentence (it may be capitalised only for that).

use evhost_sdk::{Error, Event, Extractor, NewEvent};
use serde::{Deserialize, Serialize};

/// The payload of `memory.created`.
#[derive(Deserialize)]
pub struct MemoryCreated {
    /// The text to extract from.
    pub content: String,
}

/// One extracted entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    /// As written in the text.
    pub name: String,
    /// `name` (several words) or `term` (one word).
    #[serde(rename = "type")]
    pub kind: String,
    /// 0..1: how likely this is a real entity.
    pub confidence: f32,
}

/// The payload of `memory.entity.extracted`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Extracted {
    /// The id of the `memory.created` event.
    pub memory_event_id: String,
    /// The entities, in order of first appearance, without repeats.
    pub entities: Vec<Entity>,
}

/// Finds capitalised runs in `text`.
pub fn entities(text: &str) -> Vec<Entity> {
    let mut found: Vec<Entity> = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    let mut run_opens_sentence = false;
    let mut sentence_start = true;
    let flush = |run: &mut Vec<&str>, opens: bool, found: &mut Vec<Entity>| {
        if run.is_empty() {
            return;
        }
        let name = run.join(" ");
        let (kind, confidence) = match (run.len(), opens) {
            (1, true) => ("term", 0.4),
            (1, false) => ("term", 0.7),
            _ => ("name", 0.9),
        };
        if !found.iter().any(|e| e.name == name) {
            found.push(Entity {
                name,
                kind: kind.into(),
                confidence,
            });
        }
        run.clear();
    };
    for raw in text.split_whitespace() {
        let word = raw.trim_matches(|c: char| !c.is_alphanumeric());
        let capitalised = word.chars().next().is_some_and(char::is_uppercase)
            && word
                .chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '\'');
        if capitalised {
            if run.is_empty() {
                run_opens_sentence = sentence_start;
            }
            run.push(word);
        } else {
            flush(&mut run, run_opens_sentence, &mut found);
        }
        sentence_start = raw.ends_with(['.', '!', '?']);
        if sentence_start || raw.ends_with([',', ';', ':']) {
            flush(&mut run, run_opens_sentence, &mut found);
        }
    }
    flush(&mut run, run_opens_sentence, &mut found);
    found
}

/// Emits one `memory.entity.extracted` per memory that names at least one entity.
pub struct EntityExtractor;

impl Extractor for EntityExtractor {
    type State = ();

    fn extract(_: &mut (), event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Error> {
        let memory: MemoryCreated = event.payload()?;
        let entities = entities(&memory.content);
        if entities.is_empty() {
            return Ok(());
        }
        out.push(NewEvent::new(
            "memory.entity.extracted",
            &event.stream,
            &Extracted {
                memory_event_id: event.id.to_string(),
                entities,
            },
        )?);
        Ok(())
    }
}

evhost_sdk::export_extractor!(EntityExtractor);

#[cfg(test)]
mod tests {
    use super::*;
    use evhost_sdk::testing::Harness;

    fn names(text: &str) -> Vec<(String, String)> {
        entities(text)
            .into_iter()
            .map(|e| (e.name, e.kind))
            .collect()
    }

    #[test]
    fn capitalised_runs_are_entities() {
        assert_eq!(
            names("I met Ada Lovelace in London, then Paris."),
            vec![
                ("I".into(), "term".into()),
                ("Ada Lovelace".into(), "name".into()),
                ("London".into(), "term".into()),
                ("Paris".into(), "term".into()),
            ]
        );
        assert!(names("nothing here at all").is_empty());
    }

    #[test]
    fn one_event_per_memory_with_entities() {
        let events = vec![
            Event::new(
                "memory.created",
                r#"{"content": "Grace Hopper wrote COBOL"}"#,
            )
            .with_stream("m1"),
            Event::new("memory.created", r#"{"content": "no names"}"#).with_stream("m2"),
        ];
        let out = Harness::<EntityExtractor>::new()
            .extract(events.clone())
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), 1);
        assert_eq!(out[0][0].event_type, "memory.entity.extracted");
        assert_eq!(out[0][0].json()["entities"][0]["name"], "Grace Hopper");
        assert!(out[1].is_empty());
        let bad = vec![Event::new("memory.created", r#"{"text": 1}"#)];
        assert!(
            Harness::<EntityExtractor>::new()
                .extract(bad.clone())
                .is_err()
        );
    }
}
