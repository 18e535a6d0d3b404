//! The `evhost` command line: `serve` runs the host; `events` talks to a running host.

mod author;
mod ops;
mod streams;
mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::api;
use streams::StreamCommand;

/// evhost: an event log and live bus that runs sandboxed WebAssembly event handlers.
#[derive(Debug, Parser)]
#[command(name = "evhost", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to stderr: `text` for people, `json` (one object per
    /// line, with the spans of the request or batch it belongs to) for machines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EVHOST_LOG_FORMAT")]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`, `span` and
    /// `spans` (each with its fields: a request's method and route, a batch's plugin,
    /// positions and correlation id).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the host: the event log under --data and the HTTP API on --listen.
    Serve(ServeArgs),
    /// Append, read and follow events on a running host.
    #[command(subcommand)]
    Events(EventsCommand),
    /// List a running host's streams, and read one forward or newest first.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Load, list and unload plugins on a running host.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Read a projection's state on a running host, now or at a past position.
    #[command(subcommand)]
    State(StateCommand),
    /// List, retry and drop the events plugins failed on (the dead-letter store).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Register, list and remove the JSON Schemas event payloads must satisfy.
    #[command(subcommand)]
    Schema(ops::SchemaCommand),
    /// Per tool invocations and latency, and flows' end-to-end latency, as a table.
    Metrics {
        #[command(flatten)]
        remote: Remote,
        /// Print the host's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// A flow's events in order and its tool calls, by correlation id.
    Flows {
        #[command(flatten)]
        remote: Remote,
        /// The correlation id.
        id: String,
        /// Print the host's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Work on the stored event log of a stopped host.
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Move damaged segment bytes aside (into DATA/damaged/) and keep every valid event:
    /// each unreadable position gets an evhost.log.damaged event. Stop the host first.
    Repair {
        /// The host's data directory.
        #[arg(long, env = "EVHOST_DATA", default_value = "evhost-data")]
        data: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters, of one plugin or of all.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Only this plugin's.
        #[arg(long)]
        plugin: Option<String>,
    },
    /// Run a dead letter through its plugin again (ids look like `<plugin>.<position>`).
    Retry {
        #[command(flatten)]
        remote: Remote,
        /// The dead letter's id.
        id: String,
    },
    /// Drop a dead letter without handling it.
    Delete {
        #[command(flatten)]
        remote: Remote,
        /// The dead letter's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Load or replace a plugin from its manifest (the .wasm is taken from beside it).
    Load {
        #[command(flatten)]
        remote: Remote,
        /// The manifest, `<name>.toml`, with `<name>.wasm` beside it.
        manifest: PathBuf,
        /// The component, if not beside the manifest.
        #[arg(long)]
        wasm: Option<PathBuf>,
        #[command(flatten)]
        flags: LoadFlags,
    },
    /// Start a plugin project (outside this repository): manifest, source with a worked
    /// example, fixtures, a native test (Rust) and a README, ready to build.
    New(author::NewArgs),
    /// Build a plugin project into `<name>.wasm` beside its manifest.
    Build {
        /// The project's directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Run a project's built `.wasm` in the host's runtime over its fixtures, with the
    /// manifest's limits: shows a diff where a result differs, and the cost per event.
    Test(author::TestArgs),
    /// Build a plugin project and load it into a running host.
    Deploy {
        #[command(flatten)]
        remote: Remote,
        /// The project's directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[command(flatten)]
        flags: LoadFlags,
    },
    /// Make a projection's candidate (or shadow run) live, once it has caught up.
    Promote {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
    },
    /// Make the version the last switch replaced live again, at once.
    Rollback {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
    },
    /// Drop the version kept beside the live one (candidate, shadow or previous) and its
    /// state.
    Discard {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
    },
    /// Rebuild a projection from the start beside its live state, switching as an
    /// upgrade does.
    Reset {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
        /// Switch when caught up (`auto`) or when promoted (`manual`).
        #[arg(long, value_enum, default_value_t = crate::registry::Switch::Auto)]
        switch: crate::registry::Switch,
    },
    /// Replay a projection up to its checkpoint and compare the replay with its live state.
    Verify {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
    },
    /// Compare the live state with the version kept beside it, at one checkpoint.
    Diff {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
        /// How many differing keys to show.
        #[arg(long, default_value_t = 10)]
        sample: usize,
    },
    /// List loaded plugins as a table: kind, version, state, position, lag, counts.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Print the host's JSON (one plugin per line) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One plugin's status: where it stands, what failed, what it uses, and a candidate's
    /// progress.
    Status {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
        /// Print the host's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Unload a plugin; its state is kept unless --purge.
    Unload {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
        /// Delete its state too.
        #[arg(long)]
        purge: bool,
    },
    /// Clear a plugin's quarantine: it consumes again from where it stopped.
    Resume {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
    },
    /// What a plugin printed (stdout, stderr) and logged, from its bounded buffer.
    Logs {
        #[command(flatten)]
        remote: Remote,
        /// The plugin's name.
        name: String,
        /// Keep printing new lines as they come (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// Only lines after this one (their `seq`).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

/// How a plugin is loaded: the operator's config and grants for this load, and how a new
/// version of a loaded projection switches over.
#[derive(Debug, Clone, clap::Args)]
struct LoadFlags {
    /// A value over the manifest's `[config]` (KEY=VALUE, or KEY=@FILE to read it from
    /// a file, which keeps a secret out of the shell's history); repeat for more. Secret
    /// values are never shown or logged.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Grant this load a capability its manifest asks for: `http:HOST:PORT`, `clock` or
    /// `random`; repeat for more.
    #[arg(long = "grant", value_name = "CAP")]
    grant: Vec<String>,
    /// For a different component of a loaded projection, built beside the live one:
    /// switch when it has caught up (`auto`) or when promoted (`manual`).
    #[arg(long, value_enum, default_value_t = crate::registry::Switch::Auto)]
    switch: crate::registry::Switch,
    /// Build beside the live projection and never switch by itself: compare with
    /// `plugin diff`, then `plugin promote` or `plugin discard`.
    #[arg(long)]
    shadow: bool,
    /// Keep the state as it stands (a compatible fix): the new component goes on from
    /// the checkpoint.
    #[arg(long)]
    keep_state: bool,
    /// Wait, with a progress bar, until the plugin has caught up (or its new version
    /// has, and switched).
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// The stored state of a projection under a key (or every key with --prefix).
    Get {
        #[command(flatten)]
        remote: Remote,
        /// The projection.
        name: String,
        /// The key (e.g. a stream name for assistant-stats).
        key: String,
        /// Treat KEY as a prefix and list every matching key.
        #[arg(long)]
        prefix: bool,
    },
    /// The state under a key as it was right after the event at POSITION.
    At {
        #[command(flatten)]
        remote: Remote,
        /// The projection.
        name: String,
        /// The key.
        key: String,
        /// The position.
        position: u64,
    },
    /// Calls the projection's query export with REQUEST.
    Query {
        #[command(flatten)]
        remote: Remote,
        /// The projection.
        name: String,
        /// The request text.
        request: String,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Directory holding the event log (created if missing).
    #[arg(long, env = "EVHOST_DATA", default_value = "evhost-data")]
    data: PathBuf,
    /// Address of the HTTP API. Keep it on loopback unless a proxy guards it.
    #[arg(long, env = "EVHOST_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Write the address the API listens on (e.g. `127.0.0.1:40123`) to FILE once it
    /// answers, so a supervisor or script can start it with `--listen 127.0.0.1:0` (any
    /// free port) and find it. Removed again when the host stops.
    #[arg(long, value_name = "FILE")]
    listen_file: Option<PathBuf>,
    /// Keep the event log in NATS JetStream instead of the data directory:
    /// `nats://HOST:PORT[,nats://HOST:PORT...][?stream=NAME&replicas=N&duplicate_window=SECS&lease_ttl=SECS]`.
    /// Plugin state stays in the data directory. Appends then hold at most 1,000 events.
    /// Hosts on one log form a cluster: each plugin runs on the one host holding its lease.
    #[arg(long, env = "EVHOST_LOG", value_name = "nats://HOST:PORT")]
    log: Option<String>,
    /// This host's id in a cluster (default: made up once and kept in DATA/host-id). Give
    /// each host its own.
    #[arg(long, env = "EVHOST_HOST_ID")]
    host_id: Option<String>,
    /// Largest event accepted, in bytes: payload, metadata, source, id and type together.
    #[arg(long, default_value_t = crate::event::DEFAULT_MAX_EVENT_BYTES)]
    max_event_bytes: usize,
    /// Most events accepted in one append request.
    #[arg(long, default_value_t = 10_000)]
    max_batch_events: usize,
    /// Memory for the storage cache, in MiB (bounds the host's memory use).
    #[arg(long, default_value_t = 64)]
    cache_mb: u64,
    /// Events the bus keeps in memory for history and fast fan-out.
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Memory for the bus's history, in MiB: the oldest events leave it past this.
    #[arg(long, default_value_t = 64)]
    history_mb: usize,
    /// Raise an alert when a plugin is more than this many events behind the head.
    #[arg(long, value_name = "EVENTS")]
    alert_lag: Option<u64>,
    /// Raise an alert when a plugin dead-letters more than this many events in a minute.
    #[arg(long, value_name = "N")]
    alert_dead_letters_per_minute: Option<u64>,
    /// Raise an alert when flows answered in the last minute took longer than this on
    /// average.
    #[arg(long, value_name = "MS")]
    alert_flow_ms: Option<f64>,
    /// Raise an alert when more than this share (0 to 1) of a tool's invocations in the
    /// last minute failed (over at least 5).
    #[arg(long, value_name = "RATE")]
    alert_tool_failure_rate: Option<f64>,
    /// Load every plugin (`<name>.toml` + `<name>.wasm`) in this directory at start.
    #[arg(long, env = "EVHOST_PLUGINS")]
    plugins: Option<PathBuf>,
    /// Size of one segment file of the log, in MiB (default 256); small ones exercise
    /// segment changes in tests.
    #[arg(long, hide = true)]
    segment_mb: Option<u64>,
    /// Bytes of chunks one round of a hard delete rewrites, in KiB (default 32 MiB); small
    /// ones exercise multi-round erasures in tests.
    #[arg(long, hide = true)]
    erase_round_kb: Option<usize>,
    /// Milliseconds a connection has to send a complete request head (a new connection,
    /// or an idle keep-alive one between requests) before it is closed.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_ms: u64,
    /// Most HTTP connections open at once; one more is answered 503 and closed. Keep it
    /// well under the open-file limit (`ulimit -n`).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Milliseconds open connections get to finish at shutdown before they are closed.
    #[arg(long, default_value_t = 5_000)]
    shutdown_timeout_ms: u64,
    /// An admin token: every request must then send `Authorization: Bearer TOKEN` (at
    /// least 16 characters).
    #[arg(long, env = "EVHOST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file of tokens, one `TOKEN ROLE` per line (roles: read, append, admin).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// A page origin (e.g. `http://localhost:3000`) allowed to call the API from a browser;
    /// repeat for more. Requests carrying any other Origin are refused (403).
    #[arg(long)]
    allow_origin: Vec<String>,
    /// A host name (with or without port) requests may address besides the listen
    /// address, e.g. the name a proxy forwards; repeat for more. Others get 421.
    #[arg(long)]
    allow_host: Vec<String>,
    /// Listen beyond loopback with no tokens: anyone who reaches the port may do anything.
    #[arg(long)]
    insecure_no_auth: bool,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// The operator's caps on what any plugin may claim, whoever loads it.
#[derive(Debug, Args)]
struct PolicyArgs {
    /// A host (`host:port`) plugins may be granted HTTP access to; repeat for more. With
    /// none given, any manifest's grant is honoured; with some, a manifest granting itself
    /// another host is refused.
    #[arg(long, value_name = "HOST:PORT")]
    plugin_http_allow: Vec<String>,
    /// Grant HTTP access to no host at all, whatever a manifest asks.
    #[arg(long, conflicts_with = "plugin_http_allow")]
    plugin_http_deny_all: bool,
    /// Largest `limits.memory_mb` a manifest may ask for.
    #[arg(long, value_name = "MB")]
    plugin_max_memory_mb: Option<u64>,
    /// Largest `limits.concurrency` a manifest may ask for.
    #[arg(long, value_name = "N")]
    plugin_max_concurrency: Option<usize>,
    /// Largest `limits.batch_timeout_ms` a manifest may ask for.
    #[arg(long, value_name = "MS")]
    plugin_max_batch_timeout_ms: Option<u64>,
    /// Largest `limits.fuel_per_event`; manifests must then set one.
    #[arg(long, value_name = "FUEL")]
    plugin_max_fuel_per_event: Option<u64>,
    /// Grant a capability a manifest may ask for: `http:HOST:PORT`, `clock` or `random` for
    /// every plugin, `PLUGIN=CAP` for one; repeat for more. A capability takes effect only
    /// when the manifest asks for it and it is granted here or with the load.
    #[arg(long, value_name = "[PLUGIN=]CAP")]
    grant: Vec<String>,
    /// Refuse grants carried by a load (`evhost plugin load --grant`, an upload's grants
    /// part): only --grant grants capabilities.
    #[arg(long)]
    no_load_grants: bool,
    /// Refuse loading, replacing and unloading plugins over the API: only --plugins loads.
    #[arg(long)]
    no_hot_load: bool,
    /// Which copy loads at start when --plugins and the uploads kept in DATA/plugins both
    /// hold a plugin of one name.
    #[arg(long, value_enum, default_value = "plugins-dir")]
    plugin_precedence: crate::registry::Precedence,
}

impl PolicyArgs {
    fn policy(&self) -> Result<crate::registry::PluginPolicy, String> {
        let http_hosts = if self.plugin_http_deny_all {
            Some(Default::default())
        } else if self.plugin_http_allow.is_empty() {
            None
        } else {
            Some(
                self.plugin_http_allow
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
            )
        };
        Ok(crate::registry::PluginPolicy {
            grants: crate::registry::GrantTable::parse(&self.grant)?,
            load_grants: !self.no_load_grants,
            http_hosts,
            max_memory_mb: self.plugin_max_memory_mb,
            max_concurrency: self.plugin_max_concurrency,
            max_batch_timeout_ms: self.plugin_max_batch_timeout_ms,
            max_fuel_per_event: self.plugin_max_fuel_per_event,
            hot_load: !self.no_hot_load,
        })
    }
}

#[derive(Debug, Args)]
struct Remote {
    /// URL of the running host.
    #[arg(long, env = "EVHOST_URL", default_value = "http://127.0.0.1:7700")]
    url: String,
    /// Token to send (`Authorization: Bearer`), when the host requires one.
    #[arg(long, env = "EVHOST_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Append one event to a stream; prints the positions and the stream's next version.
    Append {
        #[command(flatten)]
        remote: Remote,
        /// Stream to append to.
        #[arg(long)]
        stream: String,
        /// Event type, e.g. assistant.tool.executed.
        #[arg(long = "type")]
        event_type: String,
        /// Payload as JSON; `-` reads it from standard input.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Expected stream version: a number, `any` or `no_stream`.
        #[arg(long, default_value = "any")]
        expected_version: String,
        /// Idempotency key: an event with an id already in the log is not appended again.
        #[arg(long)]
        id: Option<String>,
        /// Correlation id (metadata.correlation_id).
        #[arg(long)]
        correlation_id: Option<String>,
        /// Producing service.
        #[arg(long)]
        source: Option<String>,
    },
    /// Read events by position; prints one JSON event per line.
    Read {
        #[command(flatten)]
        remote: Remote,
        /// First position to read.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Most events to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only types matching this pattern (e.g. `memory.*`, `assistant.>`).
        #[arg(long = "type")]
        pattern: Option<String>,
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Follow events as they are committed; prints one JSON event per line.
    Tail {
        #[command(flatten)]
        remote: Remote,
        /// Patterns to follow, comma-separated.
        #[arg(long, default_value = ">")]
        pattern: String,
        /// Start at this position instead of at the head.
        #[arg(long)]
        from: Option<u64>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// `--url` and `--token` given before the subcommand (`evhost --url U plugin list`) moved
/// after it, where each client command takes them.
fn client_options_last(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut moved = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy().into_owned();
        if !a.starts_with("--") {
            break;
        }
        let takes_value = a == "--url" || a == "--token";
        if takes_value && i + 1 < args.len() {
            moved.extend(args.drain(i..i + 2));
        } else if a.starts_with("--url=") || a.starts_with("--token=") {
            moved.push(args.remove(i));
        } else if a == "--log-format" {
            i += 2;
        } else {
            i += 1;
        }
    }
    args.extend(moved);
    args
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse_from(client_options_last(std::env::args_os().collect()));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Events(cmd) => events(cmd).await,
        Command::Stream(cmd) => streams::stream(cmd).await,
        Command::Plugin(cmd) => plugin(cmd).await,
        Command::State(cmd) => state(cmd).await,
        Command::Dlq(cmd) => dlq(cmd).await,
        Command::Schema(cmd) => ops::schema(cmd).await,
        Command::Metrics { remote, json } => ops::metrics(&remote, json).await,
        Command::Flows { remote, id, json } => ops::flow(&remote, &id, json).await,
        Command::Log(LogCommand::Repair { data }) => repair_log(&data),
    }
}

fn repair_log(data: &std::path::Path) -> Result<()> {
    let report = crate::log::repair(data)
        .with_context(|| format!("repairing the event log in {}", data.display()))?;
    if report.repaired.is_empty() && report.reindex_from.is_none() {
        println!(
            "the event log in {} has no damage; nothing changed ({} events)",
            data.display(),
            report.head
        );
        return Ok(());
    }
    for r in &report.repaired {
        println!("repaired: {r}");
    }
    for m in &report.moved {
        println!("original kept as {}", m.display());
    }
    if let Some(p) = report.reindex_from {
        println!("the index is rebuilt from position {p} at the next start");
    }
    println!(
        "the log now holds {} positions; start the host again",
        report.head
    );
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    let tokens = serve_tokens(&args)?;
    if !args.listen.ip().is_loopback() {
        if tokens.is_empty() && !args.insecure_no_auth {
            bail!(
                "refusing to listen on {} without tokens: anyone who can reach a non-loopback address could append, read, load plugins and delete data. Give --token or --tokens FILE, listen on 127.0.0.1, or pass --insecure-no-auth if something in front of the host authenticates every request",
                args.listen
            );
        }
        if tokens.is_empty() {
            tracing::warn!(listen = %args.listen, "listening beyond loopback with no tokens (--insecure-no-auth): anyone who can reach this address can do anything");
        }
    }
    if let Some(rate) = args.alert_tool_failure_rate
        && !(0.0..=1.0).contains(&rate)
    {
        bail!(
            "--alert-tool-failure-rate {rate} is not a share between 0 and 1 (0.2 is one in five)"
        );
    }
    if let Some(file) = &args.listen_file {
        check_listen_file(file)?;
    }
    // Bound before the host starts: a taken port is reported at once, not after recovery
    // and plugin loading, and the address advertised to a cluster is the one bound.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "binding {}: is another host (or program) listening there? Give --listen another address",
                args.listen
            )
        })?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let config = crate::host::HostConfig {
        data: args.data.clone(),
        cache_bytes: args.cache_mb * 1024 * 1024,
        max_event_bytes: args.max_event_bytes,
        max_batch_events: args.max_batch_events,
        history: args.history,
        history_bytes: args.history_mb << 20,
        segment_bytes: args.segment_mb.map(|mb| mb * 1024 * 1024),
        erase_round_bytes: args.erase_round_kb.map(|kb| kb * 1024),
        plugins: args.plugins.clone(),
        precedence: args.policy.plugin_precedence,
        policy: args.policy.policy().map_err(anyhow::Error::msg)?,
        flow_index: true,
        alerts: crate::alerts::AlertRules {
            lag: args.alert_lag,
            dead_letters_per_minute: args.alert_dead_letters_per_minute,
            flow_ms: args.alert_flow_ms,
            tool_failure_rate: args.alert_tool_failure_rate,
        },
        log_url: args.log.clone(),
        host_id: args.host_id.clone(),
        advertise: Some(format!("http://{bound}")),
    };
    let host = crate::host::Host::start(config).await?;
    let state = host.api_state();
    let state = state.with_access(api::Access::for_listener(
        bound,
        tokens,
        args.allow_host.clone(),
        args.allow_origin.clone(),
    ));
    let serve_config = api::ServeConfig {
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
    };
    // From here a SIGTERM stops the host cleanly, also one sent as soon as the listen file
    // appears.
    let signal = shutdown_signal();
    if let Some(file) = &args.listen_file
        && let Err(e) = write_listen_file(file, bound)
    {
        host.stop().await;
        return Err(e);
    }
    let served = api::serve(listener, state, serve_config, signal).await;
    host.stop().await;
    if let Some(file) = &args.listen_file {
        let _ = std::fs::remove_file(file);
    }
    served.context("serving the HTTP API")?;
    tracing::info!("shut down");
    Ok(())
}

/// Writes `bound` to `file` whole or not at all (a reader never sees half an address).
fn write_listen_file(file: &Path, bound: SocketAddr) -> Result<()> {
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written =
        std::fs::write(&tmp, format!("{bound}\n")).and_then(|()| std::fs::rename(&tmp, file));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| {
        format!(
            "writing the listen address to {} (--listen-file)",
            file.display()
        )
    })
}

/// Checks before the host starts that `--listen-file`'s directory exists, so a mistyped path
/// is reported at once rather than after recovery and plugin loading.
fn check_listen_file(file: &Path) -> Result<()> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => bail!(
            "--listen-file {}: the directory {} does not exist",
            file.display(),
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// The tokens `serve` accepts: `--token` (admin) and the lines of `--tokens FILE`.
fn serve_tokens(args: &ServeArgs) -> Result<api::Tokens> {
    let mut tokens = match &args.tokens {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the tokens file {}", path.display()))?;
            warn_if_readable_by_others(path);
            api::Tokens::parse_file(&text, path)?
        }
        None => api::Tokens::none(),
    };
    if let Some(token) = &args.token {
        tokens
            .add(token, api::Role::Admin)
            .context("--token (or EVHOST_TOKEN)")?;
    }
    if !tokens.is_empty() {
        tracing::info!("requests need a bearer token");
    }
    Ok(tokens)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), "the tokens file can be read by other users; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &std::path::Path) {}

/// Waits for SIGTERM or Ctrl-C, with both handlers installed when this is called.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    // Installed now, not when first awaited: a signal from here on is a clean stop.
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).expect("installing the SIGTERM handler"),
            signal(SignalKind::interrupt()).expect("installing the SIGINT handler"),
        )
    };
    async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

impl Remote {
    /// An HTTP client for the host, sending the token when one is given.
    fn client(&self) -> Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &self.token {
            let mut value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .context("--token holds characters an HTTP header cannot carry")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .context("building the HTTP client")
    }

    /// `GET` of `path` (from `/v1/...`) on the host: the JSON of a successful reply, or the
    /// server's error message.
    async fn get_json(&self, path: &str) -> Result<Value> {
        let resp = self
            .client()?
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .with_context(|| format!("reaching the host at {}", self.url))?;
        json_reply(resp).await
    }
}

/// Returns the JSON body of a successful reply, or the server's error message.
async fn json_reply(resp: reqwest::Response) -> Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.context("reading the host's reply")?;
    if !status.is_success() {
        let msg = body["error"]["message"].as_str().unwrap_or("(no message)");
        bail!("host answered {status}: {msg}");
    }
    Ok(body)
}

async fn events(cmd: EventsCommand) -> Result<()> {
    match cmd {
        EventsCommand::Append {
            remote,
            stream,
            event_type,
            payload,
            expected_version,
            id,
            correlation_id,
            source,
        } => {
            let payload = if payload == "-" {
                std::io::read_to_string(std::io::stdin())
                    .context("reading the payload from stdin")?
            } else {
                payload
            };
            let payload: Value = serde_json::from_str(&payload)
                .with_context(|| format!("--payload is not valid JSON: {payload}"))?;
            let expected: Value = match expected_version.parse::<u64>() {
                Ok(n) => json!(n),
                Err(_) => json!(expected_version),
            };
            let mut event = json!({"type": event_type, "payload": payload});
            if let Some(id) = id {
                event["id"] = json!(id);
            }
            if let Some(c) = correlation_id {
                event["metadata"] = json!({"correlation_id": c});
            }
            if let Some(s) = source {
                event["source"] = json!(s);
            }
            let url = format!("{}/v1/streams/{}", remote.url, urlencode(&stream));
            let resp = remote
                .client()?
                .post(url)
                .json(&json!({"expected_version": expected, "events": [event]}))
                .send()
                .await
                .with_context(|| format!("reaching the host at {}", remote.url))?;
            println!("{}", json_reply(resp).await?);
        }
        EventsCommand::Read {
            remote,
            from,
            limit,
            pattern,
            stream,
        } => {
            let mut from = from;
            let mut left = limit;
            while left > 0 {
                let mut q = vec![
                    ("from", from.to_string()),
                    ("limit", left.min(api::MAX_READ_LIMIT).to_string()),
                ];
                if let Some(p) = &pattern {
                    q.push(("type", p.clone()));
                }
                if let Some(s) = &stream {
                    q.push(("stream", s.clone()));
                }
                let resp = remote
                    .client()?
                    .get(format!("{}/v1/events", remote.url))
                    .query(&q)
                    .send()
                    .await
                    .with_context(|| format!("reaching the host at {}", remote.url))?;
                let body = json_reply(resp).await?;
                let events = body["events"].as_array().cloned().unwrap_or_default();
                for e in &events {
                    println!("{e}");
                }
                left -= events.len().min(left);
                let next = body["next"].as_u64().unwrap_or(from);
                if next >= body["head"].as_u64().unwrap_or(0) || next == from {
                    break;
                }
                from = next;
            }
        }
        EventsCommand::Tail {
            remote,
            pattern,
            from,
            count,
        } => {
            let mut q = vec![("pattern", pattern)];
            if let Some(f) = from {
                q.push(("from", f.to_string()));
            }
            let resp = remote
                .client()?
                .get(format!("{}/v1/subscribe", remote.url))
                .query(&q)
                .send()
                .await
                .with_context(|| format!("reaching the host at {}", remote.url))?;
            if !resp.status().is_success() {
                json_reply(resp).await?;
                return Ok(());
            }
            let mut seen = 0u64;
            let mut buf = String::new();
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(
                    &chunk.context("reading the event stream")?,
                ));
                while let Some(end) = buf.find('\n') {
                    let line: String = buf.drain(..=end).collect();
                    if let Some(data) = line.trim_end().strip_prefix("data:") {
                        println!("{}", data.trim_start());
                        seen += 1;
                        if count.is_some_and(|c| seen >= c) {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

async fn plugin(cmd: PluginCommand) -> Result<()> {
    let cmd_name = match &cmd {
        PluginCommand::Resume { .. } => Some("resume"),
        PluginCommand::Verify { .. } => Some("verify"),
        PluginCommand::Promote { .. } => Some("promote"),
        PluginCommand::Rollback { .. } => Some("rollback"),
        PluginCommand::Discard { .. } => Some("discard"),
        _ => None,
    };
    match cmd {
        PluginCommand::Load {
            remote,
            manifest,
            wasm,
            flags,
        } => {
            let wasm = wasm.unwrap_or_else(|| manifest.with_extension("wasm"));
            load_plugin(&remote, &manifest, &wasm, &flags).await?;
        }
        PluginCommand::New(args) => author::new(args)?,
        PluginCommand::Build { dir } => {
            author::build(&dir)?;
        }
        PluginCommand::Test(args) => author::test(args).await?,
        PluginCommand::Deploy { remote, dir, flags } => {
            let project = author::build_for_deploy(&dir)?;
            load_plugin(
                &remote,
                &project.manifest_path,
                &project.wasm_path(),
                &flags,
            )
            .await?;
        }
        PluginCommand::List { remote, json } => {
            let body = remote.get_json("/v1/plugins").await?;
            let plugins = body["plugins"].as_array().cloned().unwrap_or_default();
            if json {
                for p in plugins {
                    println!("{p}");
                }
            } else {
                print!("{}", table::plugins(&plugins));
            }
        }
        PluginCommand::Status { remote, name, json } => {
            let body = remote
                .get_json(&format!("/v1/plugins/{}", urlencode(&name)))
                .await?;
            if json {
                println!("{body}");
            } else {
                print!("{}", table::status(&body));
            }
        }
        PluginCommand::Unload {
            remote,
            name,
            purge,
        } => {
            let resp = remote
                .client()?
                .delete(format!("{}/v1/plugins/{}", remote.url, urlencode(&name)))
                .query(&[("purge", purge.to_string())])
                .send()
                .await
                .with_context(|| format!("reaching the host at {}", remote.url))?;
            println!("{}", json_reply(resp).await?);
        }
        PluginCommand::Logs {
            remote,
            name,
            follow,
            after,
        } => plugin_logs(&remote, &name, follow, after).await?,
        PluginCommand::Diff {
            remote,
            name,
            sample,
        } => {
            let resp = remote
                .client()?
                .get(format!(
                    "{}/v1/plugins/{}/diff",
                    remote.url,
                    urlencode(&name)
                ))
                .query(&[("sample", sample)])
                .send()
                .await
                .with_context(|| format!("reaching the host at {}", remote.url))?;
            println!("{}", json_reply(resp).await?);
        }
        PluginCommand::Reset {
            remote,
            name,
            switch,
        } => {
            let switch = if switch == crate::registry::Switch::Manual {
                "manual"
            } else {
                "auto"
            };
            let resp = remote
                .client()?
                .post(format!(
                    "{}/v1/plugins/{}/reset",
                    remote.url,
                    urlencode(&name)
                ))
                .query(&[("switch", switch)])
                .send()
                .await
                .with_context(|| format!("reaching the host at {}", remote.url))?;
            println!("{}", json_reply(resp).await?);
        }
        PluginCommand::Resume { remote, name }
        | PluginCommand::Verify { remote, name }
        | PluginCommand::Promote { remote, name }
        | PluginCommand::Rollback { remote, name }
        | PluginCommand::Discard { remote, name } => {
            let action = cmd_name.expect("each of these posts to its action");
            let resp = remote
                .client()?
                .post(format!(
                    "{}/v1/plugins/{}/{action}",
                    remote.url,
                    urlencode(&name)
                ))
                .send()
                .await
                .with_context(|| format!("reaching the host at {}", remote.url))?;
            println!("{}", json_reply(resp).await?);
        }
    }
    Ok(())
}

/// The config overrides and grants given on the command line, checked.
fn load_options(config: &[String], grant: &[String]) -> Result<crate::registry::LoadOptions> {
    let mut options = crate::registry::LoadOptions::default();
    for kv in config {
        // Named by its key only: the value may be a secret.
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--config {kv:.0}...: give KEY=VALUE or KEY=@FILE"))?;
        let v = match v.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("--config {k}=@{file}: reading the value"))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            None => v.to_owned(),
        };
        options.config.insert(k.to_owned(), v);
    }
    for cap in grant {
        options
            .grants
            .add(cap)
            .map_err(|e| anyhow::anyhow!("--grant {cap}: {e}"))?;
    }
    Ok(options)
}

/// Uploads `manifest` and `wasm` to the host (`PUT /v1/plugins/{name}`) and prints what it
/// answered; with `--wait`, first shows a progress bar until the plugin has caught up.
async fn load_plugin(
    remote: &Remote,
    manifest: &std::path::Path,
    wasm: &std::path::Path,
    flags: &LoadFlags,
) -> Result<()> {
    let options = load_options(&flags.config, &flags.grant)?;
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("reading the manifest {}", manifest.display()))?;
    let bytes =
        std::fs::read(wasm).with_context(|| format!("reading the component {}", wasm.display()))?;
    let parsed = crate::plugin::Manifest::parse(&text)?;
    let mut form = reqwest::multipart::Form::new()
        .part("manifest", reqwest::multipart::Part::text(text))
        .part("wasm", reqwest::multipart::Part::bytes(bytes));
    if !options.config.is_empty() {
        form = form.part(
            "config",
            reqwest::multipart::Part::text(serde_json::to_string(&options.config)?),
        );
    }
    if options.grants != Default::default() {
        form = form.part(
            "grants",
            reqwest::multipart::Part::text(serde_json::to_string(&options.grants.to_caps())?),
        );
    }
    let switch = if flags.switch == crate::registry::Switch::Manual {
        "manual"
    } else {
        "auto"
    };
    let resp = remote
        .client()?
        .put(format!("{}/v1/plugins/{}", remote.url, parsed.name))
        .query(&[
            ("switch", switch),
            ("shadow", if flags.shadow { "true" } else { "false" }),
            (
                "keep_state",
                if flags.keep_state { "true" } else { "false" },
            ),
        ])
        .multipart(form)
        .send()
        .await
        .with_context(|| format!("reaching the host at {}", remote.url))?;
    let loaded = json_reply(resp).await?;
    if flags.wait {
        let target = loaded["head"].as_u64().unwrap_or(0);
        ops::wait_caught_up(remote, &parsed.name, target).await?;
    }
    println!("{loaded}");
    Ok(())
}

/// Prints a plugin's log lines after `after` (`seq  source  line`), then, with `follow`,
/// asks again every half second for what came since.
async fn plugin_logs(remote: &Remote, name: &str, follow: bool, mut after: u64) -> Result<()> {
    let client = remote.client()?;
    let mut dropped_seen = None;
    loop {
        let resp = client
            .get(format!(
                "{}/v1/plugins/{}/logs",
                remote.url,
                urlencode(name)
            ))
            .query(&[("after", after)])
            .send()
            .await
            .with_context(|| format!("reaching the host at {}", remote.url))?;
        let page = json_reply(resp).await?;
        let dropped = page["dropped"].as_u64().unwrap_or(0);
        if dropped_seen.is_some_and(|d| dropped > d) || (dropped_seen.is_none() && dropped > 0) {
            eprintln!(
                "({dropped} older lines were dropped from the plugin's buffer to keep it bounded)"
            );
        }
        dropped_seen = Some(dropped);
        let lines = page["lines"].as_array().cloned().unwrap_or_default();
        for l in &lines {
            println!(
                "{:>6}  {:<6}  {}",
                l["seq"],
                l["source"].as_str().unwrap_or(""),
                l["line"].as_str().unwrap_or("")
            );
        }
        after = page["next"].as_u64().unwrap_or(after);
        if !follow {
            return Ok(());
        }
        if lines.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}

async fn dlq(cmd: DlqCommand) -> Result<()> {
    let request = match &cmd {
        DlqCommand::List { remote, plugin } => {
            let mut r = remote.client()?.get(format!("{}/v1/dlq", remote.url));
            if let Some(p) = plugin {
                r = r.query(&[("plugin", p)]);
            }
            r
        }
        DlqCommand::Retry { remote, id } => {
            remote
                .client()?
                .post(format!("{}/v1/dlq/{}/retry", remote.url, urlencode(id)))
        }
        DlqCommand::Delete { remote, id } => {
            remote
                .client()?
                .delete(format!("{}/v1/dlq/{}", remote.url, urlencode(id)))
        }
    };
    let resp = request
        .send()
        .await
        .context("reaching the host (is `evhost serve` running?)")?;
    if resp.status() == reqwest::StatusCode::NO_CONTENT {
        if let DlqCommand::Delete { id, .. } = &cmd {
            println!("{}", json!({"deleted": id}));
        }
        return Ok(());
    }
    let body = json_reply(resp).await?;
    match cmd {
        DlqCommand::List { .. } => {
            for d in body["dead_letters"].as_array().cloned().unwrap_or_default() {
                println!("{d}");
            }
        }
        DlqCommand::Retry { id, .. } => {
            println!("{body}");
            if body["handled"] != true {
                bail!(
                    "the retry of {id} failed again: {}",
                    body["error"].as_str().unwrap_or("(no reason given)")
                );
            }
        }
        _ => println!("{body}"),
    }
    Ok(())
}

async fn state(cmd: StateCommand) -> Result<()> {
    let (remote, url, query): (&Remote, String, Vec<(&str, String)>) = match &cmd {
        StateCommand::Get {
            remote,
            name,
            key,
            prefix,
        } => (
            remote,
            format!("{}/v1/projections/{}/state", remote.url, urlencode(name)),
            vec![(if *prefix { "prefix" } else { "key" }, key.clone())],
        ),
        StateCommand::At {
            remote,
            name,
            key,
            position,
        } => (
            remote,
            format!("{}/v1/projections/{}/state", remote.url, urlencode(name)),
            vec![("key", key.clone()), ("at", position.to_string())],
        ),
        StateCommand::Query {
            remote,
            name,
            request,
        } => {
            let resp = remote
                .client()?
                .post(format!(
                    "{}/v1/projections/{}/query",
                    remote.url,
                    urlencode(name)
                ))
                .json(&json!(request))
                .send()
                .await
                .with_context(|| format!("reaching the host at {}", remote.url))?;
            println!("{}", json_reply(resp).await?["answer"]);
            return Ok(());
        }
    };
    let waiting = matches!(cmd, StateCommand::At { .. })
        .then(|| ops::spinner("replaying the log to that position"));
    let resp = remote
        .client()?
        .get(url)
        .query(&query)
        .send()
        .await
        .context("reaching the host")?;
    let body = json_reply(resp).await?;
    if let Some(s) = waiting {
        s.finish_and_clear();
    }
    match &cmd {
        StateCommand::Get { prefix: true, .. } => {
            for item in body["items"].as_array().cloned().unwrap_or_default() {
                println!("{item}");
            }
        }
        _ => println!("{}", body["value"]),
    }
    Ok(())
}

/// Percent-encodes a path segment.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
