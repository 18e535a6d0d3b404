//! `evhost stream`: list a running host's streams, read one forward or newest first, and
//! archive, delete (soft or hard) and restore one.

use anyhow::{Context, Result};
use clap::Subcommand;

use super::{Remote, json_reply, urlencode};
use crate::log::MAX_STREAM_LIST;

/// The `stream` subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum StreamCommand {
    /// List streams in name order; prints one JSON line per stream (name, version, first
    /// and last positions and timestamps).
    List {
        #[command(flatten)]
        remote: Remote,
        /// Only streams whose names start with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Most streams to print (fetched page by page).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Read a stream's events; prints one JSON event per line.
    Read {
        #[command(flatten)]
        remote: Remote,
        /// The stream.
        stream: String,
        /// Newest first.
        #[arg(long)]
        backward: bool,
        /// First version to print (default: 0, or the last with --backward).
        #[arg(long)]
        from: Option<u64>,
        /// Most events to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Write every event of a stream as JSON lines into DATA/archive/ on the host, with a
    /// manifest (counts, SHA-256); prints the manifest.
    Archive {
        #[command(flatten)]
        remote: Remote,
        /// The stream.
        stream: String,
    },
    /// Delete a stream: a tombstone (evhost.stream.deleted) is appended, reads answer 410,
    /// appends are refused until it is restored. --hard also erases its events from disk.
    Delete {
        #[command(flatten)]
        remote: Remote,
        /// The stream.
        stream: String,
        /// Erase the events from storage for good (not undone by restore).
        #[arg(long)]
        hard: bool,
    },
    /// Re-open a deleted stream for appends.
    Restore {
        #[command(flatten)]
        remote: Remote,
        /// The stream.
        stream: String,
    },
}

/// Runs a `stream` subcommand against the host at its `--url`.
pub(super) async fn stream(cmd: StreamCommand) -> Result<()> {
    match cmd {
        StreamCommand::List {
            remote,
            prefix,
            limit,
        } => list(&remote, &prefix, limit).await,
        StreamCommand::Read {
            remote,
            stream,
            backward,
            from,
            limit,
        } => read(&remote, &stream, backward, from, limit).await,
        StreamCommand::Archive { remote, stream } => {
            let url = format!("{}/v1/streams/{}/archive", remote.url, urlencode(&stream));
            let waiting = super::ops::spinner(&format!("archiving {stream}"));
            let sent = send(&remote, remote.client()?.post(url)).await;
            waiting.finish_and_clear();
            sent
        }
        StreamCommand::Delete {
            remote,
            stream,
            hard,
        } => {
            let url = format!("{}/v1/streams/{}", remote.url, urlencode(&stream));
            let req = remote.client()?.delete(url).query(&[("hard", hard)]);
            send(&remote, req).await
        }
        StreamCommand::Restore { remote, stream } => {
            let url = format!("{}/v1/streams/{}/restore", remote.url, urlencode(&stream));
            send(&remote, remote.client()?.post(url)).await
        }
    }
}

/// Sends `req` and prints the host's JSON reply.
async fn send(remote: &Remote, req: reqwest::RequestBuilder) -> Result<()> {
    let resp = req
        .send()
        .await
        .with_context(|| format!("reaching the host at {}", remote.url))?;
    println!("{}", json_reply(resp).await?);
    Ok(())
}

/// GETs `url` with `query` from the host and returns its JSON reply.
async fn get(remote: &Remote, url: String, query: &[(&str, String)]) -> Result<serde_json::Value> {
    let resp = remote
        .client()?
        .get(url)
        .query(query)
        .send()
        .await
        .with_context(|| format!("reaching the host at {}", remote.url))?;
    json_reply(resp).await
}

async fn list(remote: &Remote, prefix: &str, limit: usize) -> Result<()> {
    let mut after: Option<String> = None;
    let mut left = limit;
    while left > 0 {
        let mut q = vec![
            ("prefix", prefix.to_owned()),
            ("limit", left.min(MAX_STREAM_LIST).to_string()),
        ];
        if let Some(a) = &after {
            q.push(("after", a.clone()));
        }
        let body = get(remote, format!("{}/v1/streams", remote.url), &q).await?;
        let streams = body["streams"].as_array().cloned().unwrap_or_default();
        for s in streams.iter().take(left) {
            println!("{s}");
        }
        left -= streams.len().min(left);
        match body["next"].as_str() {
            Some(next) if !streams.is_empty() => after = Some(next.to_owned()),
            _ => break,
        }
    }
    Ok(())
}

async fn read(
    remote: &Remote,
    stream: &str,
    backward: bool,
    from: Option<u64>,
    limit: usize,
) -> Result<()> {
    let url = format!("{}/v1/streams/{}", remote.url, urlencode(stream));
    let mut from = from;
    let mut left = limit;
    while left > 0 {
        let mut q = vec![("limit", left.min(crate::api::MAX_READ_LIMIT).to_string())];
        if backward {
            q.push(("direction", "backward".into()));
        }
        if let Some(f) = from {
            q.push((
                if backward { "from" } else { "from_version" },
                f.to_string(),
            ));
        }
        let body = get(remote, url.clone(), &q).await?;
        let events = body["events"].as_array().cloned().unwrap_or_default();
        for e in events.iter().take(left) {
            println!("{e}");
        }
        left -= events.len().min(left);
        let next = if backward {
            body["next"].as_u64()
        } else {
            body["next_version"]
                .as_u64()
                .filter(|&v| v < body["version"].as_u64().unwrap_or(0))
        };
        match next {
            Some(n) if !events.is_empty() => from = Some(n),
            _ => break,
        }
    }
    Ok(())
}
