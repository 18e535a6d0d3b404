//! knowledge-graph: entities and how often they appear together, from
//! `memory.entity.extracted`.
//!
//! State is one key per entity (`entity/<name>`): its type, how many memories mention it,
//! and, for every entity mentioned in the same memory, how many times that happened.

use std::collections::BTreeMap;

use evhost_sdk::{Error, Event, Keys, Projection};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Extracted {
    entities: Vec<Mention>,
}

#[derive(Deserialize)]
struct Mention {
    name: String,
    #[serde(rename = "type")]
    kind: String,
}

/// One entity of the graph.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The type given at its latest mention.
    #[serde(rename = "type")]
    pub kind: String,
    /// Memories mentioning it.
    pub mentions: u64,
    /// Co-occurring entities and how many memories they share with this one.
    pub related: BTreeMap<String, u64>,
}

/// The entity graph.
pub struct KnowledgeGraph;

const PREFIX: &str = "entity/";

impl Projection for KnowledgeGraph {
    type State = Node;

    /// One node per entity mentioned; a payload that does not fit dead-letters the event.
    fn keys(event: &Event) -> Result<Keys<'static>, Error> {
        let x: Extracted = event.payload()?;
        let mut keys: Vec<String> = x
            .entities
            .iter()
            .map(|m| format!("{PREFIX}{}", m.name))
            .collect();
        keys.dedup();
        Ok(keys.into())
    }

    fn apply(key: &str, node: &mut Node, event: &Event) -> Result<(), Error> {
        let x: Extracted = event.payload()?;
        let name = key.strip_prefix(PREFIX).unwrap_or(key);
        node.mentions += 1;
        for m in &x.entities {
            if m.name == name {
                node.kind.clone_from(&m.kind);
            } else {
                *node.related.entry(m.name.clone()).or_default() += 1;
            }
        }
        Ok(())
    }

    /// `entity/<name>` or `<name>` returns that node; `""` lists every node (its state).
    fn query(store: &mut dyn evhost_sdk::Store, request: &str) -> Result<String, Error> {
        let request = request.trim();
        if request.is_empty() {
            let nodes: BTreeMap<String, serde_json::Value> = store
                .scan_prefix(PREFIX)
                .into_iter()
                .map(|(k, v)| {
                    let v = serde_json::from_str(&v).unwrap_or(serde_json::Value::Null);
                    (k[PREFIX.len()..].to_owned(), v)
                })
                .collect();
            return serde_json::to_string(&nodes).map_err(|e| Error::Failed(e.to_string()));
        }
        let key = if request.starts_with(PREFIX) {
            request.to_owned()
        } else {
            format!("{PREFIX}{request}")
        };
        Ok(store.get(&key).unwrap_or_else(|| "null".into()))
    }
}

evhost_sdk::export_projection!(KnowledgeGraph);

#[cfg(test)]
mod tests {
    use super::*;
    use evhost_sdk::testing::Harness;

    fn extracted(names: &[&str]) -> Event<'static> {
        let entities: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({"name": n, "type": "name", "confidence": 0.9}))
            .collect();
        Event::new(
            "memory.entity.extracted",
            serde_json::json!({ "entities": entities }).to_string(),
        )
    }

    #[test]
    fn co_occurrences_are_counted_both_ways() {
        let mut h = Harness::<KnowledgeGraph>::new();
        h.handle(vec![
            extracted(&["Ada", "London"]),
            extracted(&["Ada", "Babbage"]),
        ])
        .unwrap();
        let ada = h.state("entity/Ada").unwrap();
        assert_eq!(ada.mentions, 2);
        assert_eq!(ada.related["London"], 1);
        assert_eq!(ada.related["Babbage"], 1);
        assert_eq!(h.state("entity/London").unwrap().related["Ada"], 1);
        let all: serde_json::Value = serde_json::from_str(&h.query("").unwrap()).unwrap();
        assert_eq!(all.as_object().unwrap().len(), 3);
        assert!(
            h.handle(vec![Event::new("memory.entity.extracted", "{}")])
                .is_err()
        );
    }
}
