//! The schema registry: JSON Schemas (draft 2020-12) for the payloads of event types
//! matching a pattern. Appends that violate one are refused before anything is written;
//! events a plugin derives that violate one fail the plugin's batch (and end in its
//! dead-letter store). Schemas are kept in sled and load again at start-up.

use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde_json::Value;

use crate::pattern::Pattern;

/// The sled tree holding the schemas, keyed by pattern.
const TREE: &str = "schemas";

/// Why a schema operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The pattern or the schema is unusable; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// No schema is registered under that pattern.
    #[error("no schema is registered for {0:?}")]
    NotFound(String),
    /// Storage failed.
    #[error("schema storage failed: {0}")]
    Storage(String),
}

/// A payload that does not fit a registered schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error(
    "the payload of {event_type} does not match the schema registered for {pattern:?}: at {path:?}: {message}"
)]
pub struct Violation {
    /// The event's type.
    pub event_type: String,
    /// The pattern whose schema failed.
    pub pattern: String,
    /// JSON Pointer to the failing part of the payload (`""` for the whole payload).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// A registered schema, as listings show it.
#[derive(Debug, Clone, Serialize)]
pub struct SchemaInfo {
    /// The event-type pattern it applies to.
    pub pattern: String,
    /// The schema.
    pub schema: Value,
}

struct Entry {
    pattern: Pattern,
    schema: Value,
    validator: jsonschema::Validator,
}

/// The registered schemas; cheap to clone and share.
#[derive(Clone)]
pub struct Schemas {
    tree: sled::Tree,
    entries: Arc<RwLock<Vec<Arc<Entry>>>>,
}

fn compile(pattern: &str, schema: &Value) -> Result<Entry, SchemaError> {
    let pattern = Pattern::new(pattern).map_err(|e| SchemaError::Invalid(e.to_string()))?;
    if !schema.is_object() && !schema.is_boolean() {
        return Err(SchemaError::Invalid(
            "a schema must be a JSON object (or true/false), e.g. {\"type\": \"object\"}".into(),
        ));
    }
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(schema)
        .map_err(|e| {
            SchemaError::Invalid(format!(
                "the schema for {:?} is not a valid JSON Schema (2020-12): {e}",
                pattern.as_str()
            ))
        })?;
    Ok(Entry {
        pattern,
        schema: schema.clone(),
        validator,
    })
}

impl Schemas {
    /// Opens the registry in `db` and compiles what it holds.
    pub fn open(db: &sled::Db) -> Result<Self, SchemaError> {
        let tree = db.open_tree(TREE).map_err(storage)?;
        let mut entries = Vec::new();
        for item in tree.iter() {
            let (k, v) = item.map_err(storage)?;
            let pattern = String::from_utf8_lossy(&k).into_owned();
            let schema: Value = serde_json::from_slice(&v).map_err(storage)?;
            match compile(&pattern, &schema) {
                Ok(e) => entries.push(Arc::new(e)),
                Err(e) => {
                    tracing::error!(pattern, error = %e, "a stored schema no longer compiles; it is not enforced")
                }
            }
        }
        Ok(Self {
            tree,
            entries: Arc::new(RwLock::new(entries)),
        })
    }

    /// Registers (or replaces) the schema for `pattern`, durably.
    pub fn put(&self, pattern: &str, schema: &Value) -> Result<SchemaInfo, SchemaError> {
        let entry = Arc::new(compile(pattern, schema)?);
        let bytes = serde_json::to_vec(schema).map_err(storage)?;
        self.tree.insert(pattern, bytes).map_err(storage)?;
        self.tree.flush().map_err(storage)?;
        let mut entries = self.entries.write().expect("schemas lock");
        entries.retain(|e| e.pattern.as_str() != pattern);
        entries.push(entry);
        Ok(SchemaInfo {
            pattern: pattern.to_owned(),
            schema: schema.clone(),
        })
    }

    /// Removes the schema for `pattern`.
    pub fn delete(&self, pattern: &str) -> Result<(), SchemaError> {
        if self.tree.remove(pattern).map_err(storage)?.is_none() {
            return Err(SchemaError::NotFound(pattern.to_owned()));
        }
        self.tree.flush().map_err(storage)?;
        self.entries
            .write()
            .expect("schemas lock")
            .retain(|e| e.pattern.as_str() != pattern);
        Ok(())
    }

    /// Every registered schema, by pattern.
    pub fn list(&self) -> Vec<SchemaInfo> {
        let mut list: Vec<SchemaInfo> = self
            .entries
            .read()
            .expect("schemas lock")
            .iter()
            .map(|e| SchemaInfo {
                pattern: e.pattern.as_str().to_owned(),
                schema: e.schema.clone(),
            })
            .collect();
        list.sort_by(|a, b| a.pattern.cmp(&b.pattern));
        list
    }

    /// Checks a payload (JSON text) of `event_type` against every schema whose pattern
    /// matches; the first violation found.
    pub fn check(&self, event_type: &str, payload: &str) -> Result<(), Violation> {
        let matching: Vec<Arc<Entry>> = {
            let entries = self.entries.read().expect("schemas lock");
            if entries.is_empty() {
                return Ok(());
            }
            entries
                .iter()
                .filter(|e| e.pattern.matches(event_type))
                .cloned()
                .collect()
        };
        if matching.is_empty() {
            return Ok(());
        }
        let value: Value = serde_json::from_str(payload).map_err(|e| Violation {
            event_type: event_type.to_owned(),
            pattern: matching[0].pattern.as_str().to_owned(),
            path: String::new(),
            message: format!("not JSON: {e}"),
        })?;
        for e in matching {
            if let Some(err) = e.validator.iter_errors(&value).next() {
                return Err(Violation {
                    event_type: event_type.to_owned(),
                    pattern: e.pattern.as_str().to_owned(),
                    path: err.instance_path().as_str().to_owned(),
                    message: err.to_string(),
                });
            }
        }
        Ok(())
    }
}

fn storage(e: impl std::fmt::Display) -> SchemaError {
    SchemaError::Storage(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_are_checked_against_every_matching_schema_and_schemas_persist() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let s = Schemas::open(&db).unwrap();
        s.put(
            "user.*",
            &json!({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}),
        )
        .unwrap();
        s.put(
            "user.created",
            &json!({"properties": {"age": {"minimum": 0}}}),
        )
        .unwrap();
        assert!(s.check("user.created", r#"{"name":"a","age":3}"#).is_ok());
        assert!(
            s.check("order.created", r#"{}"#).is_ok(),
            "no schema matches"
        );
        let v = s.check("user.created", r#"{"name":7}"#).unwrap_err();
        assert_eq!((v.pattern.as_str(), v.path.as_str()), ("user.*", "/name"));
        let v = s
            .check("user.created", r#"{"name":"a","age":-1}"#)
            .unwrap_err();
        assert_eq!(
            (v.pattern.as_str(), v.path.as_str()),
            ("user.created", "/age")
        );
        drop(s);
        let again = Schemas::open(&db).unwrap();
        assert_eq!(again.list().len(), 2);
        assert!(again.check("user.renamed", "{}").is_err());
        again.delete("user.*").unwrap();
        assert!(again.check("user.renamed", "{}").is_ok());
        assert!(matches!(
            again.delete("user.*"),
            Err(SchemaError::NotFound(_))
        ));
    }

    #[test]
    fn bad_patterns_and_schemas_are_refused_and_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let s = Schemas::open(&db).unwrap();
        for (pattern, schema, want) in [
            ("user.>.x", json!({}), "invalid pattern"),
            (
                "user.*",
                json!({"type": "no-such-type"}),
                "not a valid JSON Schema",
            ),
            ("user.*", json!([1]), "must be a JSON object"),
        ] {
            let err = s.put(pattern, &schema).unwrap_err().to_string();
            assert!(err.contains(want), "{pattern} {schema}: {err}");
        }
        assert!(s.list().is_empty());
    }
}
