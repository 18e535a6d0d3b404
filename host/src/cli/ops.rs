//! Client commands for operators: the schema registry, the metrics and a flow as people
//! read them, and a load's wait (with a progress bar) until the plugin has caught up.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::Value;

use super::{Remote, json_reply, urlencode};

#[derive(Debug, Subcommand)]
pub(super) enum SchemaCommand {
    /// Register a JSON Schema (2020-12) for the payloads of types matching PATTERN.
    Put {
        #[command(flatten)]
        remote: Remote,
        /// An event-type pattern, e.g. `order.*`.
        pattern: String,
        /// The schema's file (JSON).
        file: std::path::PathBuf,
    },
    /// List the registered schemas.
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove the schema of PATTERN.
    Delete {
        #[command(flatten)]
        remote: Remote,
        /// The pattern it was registered under.
        pattern: String,
    },
}

pub(super) async fn schema(cmd: SchemaCommand) -> Result<()> {
    match cmd {
        SchemaCommand::Put {
            remote,
            pattern,
            file,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading the schema {}", file.display()))?;
            let schema: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let resp = remote
                .client()?
                .put(format!("{}/v1/schemas/{}", remote.url, urlencode(&pattern)))
                .json(&schema)
                .send()
                .await
                .with_context(|| format!("reaching the host at {}", remote.url))?;
            println!("{}", json_reply(resp).await?);
        }
        SchemaCommand::List { remote } => {
            for s in remote.get_json("/v1/schemas").await?["schemas"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                println!("{s}");
            }
        }
        SchemaCommand::Delete { remote, pattern } => {
            let resp = remote
                .client()?
                .delete(format!("{}/v1/schemas/{}", remote.url, urlencode(&pattern)))
                .send()
                .await
                .with_context(|| format!("reaching the host at {}", remote.url))?;
            if !resp.status().is_success() {
                json_reply(resp).await?;
            }
            println!("{}", serde_json::json!({"deleted": pattern}));
        }
    }
    Ok(())
}

/// `evhost metrics`: per tool invocations and latency, and flows, as a table.
pub(super) async fn metrics(remote: &Remote, json: bool) -> Result<()> {
    let m = remote.get_json("/v1/metrics").await?;
    if json {
        println!("{m}");
        return Ok(());
    }
    let ms = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    println!(
        "{:<24} {:>11} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "TOOL", "INVOCATIONS", "COMPLETED", "FAILED", "P50 MS", "P90 MS", "P99 MS", "MAX MS"
    );
    if let Some(tools) = m["tools"].as_object() {
        for (tool, f) in tools {
            let l = &f["latency"];
            println!(
                "{:<24} {:>11} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9}",
                tool,
                f["invocations"],
                f["completed"],
                f["failed"],
                ms(&l["p50_ms"]),
                ms(&l["p90_ms"]),
                ms(&l["p99_ms"]),
                ms(&l["max_ms"])
            );
        }
    }
    let l = &m["flows"]["latency"];
    println!(
        "flows answered: {}  end to end p50 {} ms, p99 {} ms; head {}",
        m["flows"]["answered"],
        ms(&l["p50_ms"]),
        ms(&l["p99_ms"]),
        m["head"]
    );
    Ok(())
}

/// `evhost flows CID`: a flow's events in order and its tool calls.
pub(super) async fn flow(remote: &Remote, id: &str, json: bool) -> Result<()> {
    let f = remote
        .get_json(&format!("/v1/flows/{}", urlencode(id)))
        .await?;
    if json {
        println!("{f}");
        return Ok(());
    }
    println!(
        "flow {id}: {}{}",
        if f["answered"] == true {
            "answered"
        } else {
            "not answered yet"
        },
        f["latency_ms"]
            .as_f64()
            .map(|l| format!(" in {l:.1} ms"))
            .unwrap_or_default()
    );
    for e in f["events"].as_array().cloned().unwrap_or_default() {
        println!(
            "  {:>8}  {}  {:<32} {}",
            e["position"],
            e["timestamp"].as_str().unwrap_or_default(),
            e["type"].as_str().unwrap_or_default(),
            e["stream"].as_str().unwrap_or_default()
        );
    }
    for t in f["tools"].as_array().cloned().unwrap_or_default() {
        println!(
            "  tool {} {} {}: {} ms",
            t["tool"].as_str().unwrap_or_default(),
            t["invocation_id"].as_str().unwrap_or_default(),
            t["outcome"].as_str().unwrap_or_default(),
            t["latency_ms"]
        );
    }
    Ok(())
}

/// A spinner on stderr (when it is a terminal) saying what the command waits for, with
/// the time it has taken; finish or drop it when the work is done.
pub(super) fn spinner(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .expect("a valid template"),
    );
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Waits, with a progress bar on stderr, until plugin `name` has reached `target` (the
/// head when it was loaded): the live version, or a candidate that then switches; a shadow
/// or a manual candidate once it has reached it (it waits for the operator then).
pub(super) async fn wait_caught_up(remote: &Remote, name: &str, target: u64) -> Result<Value> {
    let client = remote.client()?;
    let url = format!("{}/v1/plugins/{}", remote.url, urlencode(name));
    let bar = indicatif::ProgressBar::new(target);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} events, {per_sec}, ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    loop {
        let resp = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("reaching the host at {}", remote.url))?;
        let s = json_reply(resp).await?;
        let c = &s["candidate"];
        let building = c.is_object();
        let (position, state) = if building {
            (c["position"].as_u64().unwrap_or(0), &c["state"])
        } else {
            (s["position"].as_u64().unwrap_or(0), &s["state"])
        };
        bar.set_message(if building {
            format!("{name}: building the new version")
        } else {
            format!("{name}: catching up")
        });
        bar.set_position(position.min(target));
        if state == "quarantined" {
            bar.abandon();
            let q = if building {
                &c["last_error"]
            } else {
                &s["quarantine"]["reason"]
            };
            bail!(
                "{name} is quarantined: {}",
                q.as_str().unwrap_or("(no reason given)")
            );
        }
        // The bar shows only on a terminal; the outcome is said either way.
        if !building && position >= target {
            bar.finish_and_clear();
            eprintln!("{name}: caught up at position {position}");
            return Ok(s);
        }
        if building && position >= target && c["switch"] != "auto" {
            bar.finish_and_clear();
            eprintln!(
                "{name}: the new version has caught up; compare with `evhost plugin diff {name}`, then `evhost plugin promote {name}` or `discard {name}`"
            );
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
