//! How `evhost plugin test` compares what a plugin gave with what a fixture expects, and
//! shows where they differ.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::plugin::MemState;

/// The state as key to JSON value (a value that is not JSON kept as a string).
pub(super) fn snapshot(state: &MemState) -> BTreeMap<String, Value> {
    state
        .0
        .read()
        .expect("fixture state lock")
        .iter()
        .map(|(k, v)| (k.clone(), parse_or_text(v)))
        .collect()
}

pub(super) fn parse_or_text(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_owned()))
}

/// JSON equality where numbers compare by value (`20` is `20.0`; integers exactly).
pub(super) fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        // Integers exactly; a float on either side by value (`20` is `20.0`).
        (Value::Number(x), Value::Number(y)) => {
            match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(x), Some(y), _, _) => x == y,
                (_, _, Some(x), Some(y)) => x == y,
                _ if x.is_f64() || y.is_f64() => x.as_f64() == y.as_f64(),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

pub(super) fn same_map(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same(v, w)))
}

/// The keys where `a` and `b` differ, `-` for `a`'s value and `+` for `b`'s.
pub(super) fn map_diff(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>) -> String {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if same(x, y) => {}
            (x, y) => {
                if let Some(x) = x {
                    out.push(format!("    - {k:?}: {x}"));
                }
                if let Some(y) = y {
                    out.push(format!("    + {k:?}: {y}"));
                }
            }
        }
    }
    out.join("\n")
}

/// Item by item, where `a` and `b` differ.
pub(super) fn list_diff(a: &[Value], b: &[Value]) -> String {
    let mut out = Vec::new();
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if same(x, y) => {}
            (x, y) => {
                if let Some(x) = x {
                    out.push(format!("    - [{i}] {x}"));
                }
                if let Some(y) = y {
                    out.push(format!("    + [{i}] {y}"));
                }
            }
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_compare_by_value_and_integers_exactly() {
        assert!(same(&json!(20), &json!(20.0)));
        assert!(same(&json!({"a": [1, 2.5]}), &json!({"a": [1.0, 2.5]})));
        assert!(!same(
            &json!(9007199254740993u64),
            &json!(9007199254740992u64)
        ));
        assert!(!same(&json!(-1), &json!(18446744073709551615u64)));
        assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    }
}
