//! What the plugin commands print for people: the loaded plugins as a table, and one
//! plugin's status as a short report. `--json` prints the host's reply instead.

use serde_json::Value;

/// Columns of `evhost plugin list`.
const COLUMNS: [&str; 10] = [
    "NAME", "KIND", "VERSION", "WIT", "STATE", "POSITION", "LAG", "EVENTS", "ERRORS", "DLQ",
];

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// Which host of a cluster runs a plugin: its id, and `(here)` when it is this one.
fn host_of(p: &Value) -> String {
    let placement = &p["placement"];
    match (&placement["host"], placement["here"] == true) {
        (Value::String(h), true) => format!("{h} (here)"),
        (Value::String(h), false) => h.clone(),
        _ => "(none yet)".into(),
    }
}

/// The loaded plugins, one row each, with a candidate's or shadow's progress after its
/// row; on a cluster, with the host that runs each.
pub(super) fn plugins(plugins: &[Value]) -> String {
    let cluster = plugins.iter().any(|p| p["placement"].is_object());
    let mut header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    if cluster {
        header.push("HOST".into());
    }
    let columns = header.len();
    let mut rows: Vec<Vec<String>> = vec![header];
    for p in plugins {
        let mut row = vec![
            text(&p["name"]),
            text(&p["kind"]),
            text(&p["version"]),
            text(&p["wit"]),
            text(&p["state"]),
            text(&p["position"]),
            text(&p["lag"]),
            text(&p["events_processed"]),
            text(&p["errors"]),
            text(&p["dead_letters"]),
        ];
        if cluster {
            row.push(host_of(p));
        }
        rows.push(row);
        for role in ["candidate", "previous"] {
            let c = &p[role];
            if c.is_object() {
                rows.push(vec![
                    format!("  {}", text(&c["role"])),
                    String::new(),
                    text(&c["version"]),
                    text(&c["wit"]),
                    text(&c["state"]),
                    text(&c["position"]),
                    text(&c["lag"]),
                    text(&c["events_processed"]),
                    String::new(),
                    String::new(),
                ]);
                if cluster {
                    rows.last_mut().expect("just pushed").push(String::new());
                }
            }
        }
    }
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One plugin's status as a few lines: what it is, where it stands, what failed, what it
/// uses, and the version an upgrade keeps beside it.
pub(super) fn status(p: &Value) -> String {
    let mut out = format!(
        "{}@{}  {} (contract {})\n",
        text(&p["name"]),
        text(&p["version"]),
        text(&p["kind"]),
        text(&p["wit"])
    );
    out.push_str(&format!(
        "  state      {}, at position {} of {} (lag {})\n",
        text(&p["state"]),
        text(&p["position"]),
        text(&p["head"]),
        text(&p["lag"])
    ));
    out.push_str(&format!(
        "  handled    {} events; {} errors, {} dead letters\n",
        text(&p["events_processed"]),
        text(&p["errors"]),
        text(&p["dead_letters"])
    ));
    if p["placement"].is_object() {
        let placement = &p["placement"];
        let api = match &placement["api"] {
            Value::String(a) if placement["here"] != true => format!(", API {a}"),
            _ => String::new(),
        };
        let token = match placement["token"].as_u64() {
            Some(t) => format!(", fencing token {t}"),
            None => String::new(),
        };
        out.push_str(&format!("  runs on    {}{api}{token}\n", host_of(p)));
    }
    if !p["last_error"].is_null() {
        out.push_str(&format!("  last error {}\n", text(&p["last_error"])));
    }
    if let Some(q) = p["quarantine"].as_object() {
        out.push_str(&format!(
            "  QUARANTINED since {}: {} (evhost plugin resume {})\n",
            q.get("since").map(text).unwrap_or_default(),
            q.get("reason").map(text).unwrap_or_default(),
            text(&p["name"])
        ));
    }
    let u = &p["usage"];
    out.push_str(&format!(
        "  usage      {} calls ({} failed), {} ns/event, peak memory {} of {} bytes\n",
        text(&u["calls"]),
        text(&u["failed_calls"]),
        u["ns_per_event"]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |n| format!("{n:.0}")),
        text(&u["peak_memory_bytes"]),
        text(&u["memory_limit_bytes"])
    ));
    for role in ["candidate", "previous"] {
        let c = &p[role];
        if c.is_object() {
            out.push_str(&format!(
                "  {:<10} {} {}, {} at position {} ({}% of the head, {} events/s{})\n",
                text(&c["role"]),
                text(&c["version"]),
                text(&c["component_hash"])
                    .chars()
                    .take(12)
                    .collect::<String>(),
                text(&c["state"]),
                text(&c["position"]),
                text(&c["percent"]),
                text(&c["events_per_s"]),
                c["eta_s"]
                    .as_f64()
                    .map(|s| format!(", about {s:.1} s to go"))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_lines_up_and_shows_a_candidate_under_its_plugin() {
        let t = plugins(&[json!({
            "name": "assistant-stats", "kind": "projection", "version": "0.1.0", "wit": "0.2.0",
            "state": "live", "position": 120, "lag": 0, "events_processed": 118, "errors": 0,
            "dead_letters": 1,
            "candidate": {"role": "candidate", "version": "0.2.0", "wit": "0.2.0",
                          "state": "catching_up", "position": 40, "lag": 80, "events_processed": 40}
        })]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("NAME"), "{t}");
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][col..col + 4], "live", "{t}");
        assert_eq!(&lines[2][col..col + 11], "catching_up", "{t}");
        assert!(lines[2].starts_with("  candidate"), "{t}");
    }
}
