//! Harness for the end-to-end tests: starts the real host binary on a loopback port with a
//! data directory, waits until it answers, and kills it (gracefully or with SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod nats;

/// A running host process.
pub struct Host {
    child: Child,
    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
    bin: PathBuf,
}

impl Host {
    /// Starts `bin serve --data DATA` on a free loopback port with `extra` arguments, and
    /// waits (up to 30 s) until `/health` answers.
    pub async fn start(bin: &str, data: &Path, extra: &[&str]) -> Host {
        Self::start_with_env(bin, data, extra, &[]).await
    }

    /// [`Host::start`] writing its log lines (at `info`) to the file `log`.
    pub async fn start_logging(bin: &str, data: &Path, extra: &[&str], log: &Path) -> Host {
        let file = std::fs::File::create(log).expect("create the log file");
        Self::spawn(bin, data, extra, &[("RUST_LOG", "info")], Stdio::from(file)).await
    }

    /// [`Host::start`] with extra environment variables (e.g. a fault point).
    pub async fn start_with_env(
        bin: &str,
        data: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Host {
        Self::spawn(bin, data, extra, env, Stdio::inherit()).await
    }

    async fn spawn(
        bin: &str,
        data: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Host {
        // The host picks a free port itself and says which: a port the harness picked and
        // let go could be taken meanwhile, by another test's host that would then answer
        // for this one.
        let listen_file = data.join("listen-addr");
        // Made here (as the host would) so the listen file has its directory.
        std::fs::create_dir_all(data).expect("create the data directory");
        let _ = std::fs::remove_file(&listen_file);
        let child = Command::new(bin)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--listen-file")
            .arg(&listen_file)
            .args(if extra.contains(&"--log") {
                Vec::new()
            } else {
                nats::log_args(data)
            })
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn the host binary");
        let mut host = Host {
            child,
            url: String::new(),
            bin: bin.into(),
        };
        host.wait_ready(&listen_file).await;
        host
    }

    async fn wait_ready(&mut self, listen_file: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the host") {
                panic!("the host exited before answering: {status}");
            }
            if self.url.is_empty() {
                match listened(listen_file) {
                    Some(url) => self.url = url,
                    None => {
                        assert!(
                            Instant::now() < deadline,
                            "the host did not write {} within 30 s",
                            listen_file.display()
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
            }
            // A host that needs a token answers 401: it is up all the same.
            if let Ok(r) = client.get(format!("{}/health", self.url)).send().await
                && (r.status().is_success() || r.status() == reqwest::StatusCode::UNAUTHORIZED)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the host did not answer /health within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to `limit`) for the process to exit by itself; its status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("poll the host") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The process id, to read its CPU time and memory from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL, as a crash would, and waits for it to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait for the host")
    }

    /// Asks the process to stop (SIGTERM) and waits up to `limit` for it to exit; `None`
    /// when it is still running then (dropping the `Host` kills it).
    pub fn stop_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the host") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the binary as a CLI client of this host with `args`; returns (success, stdout,
    /// stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(&self.bin)
            .args(args)
            .env("EVHOST_URL", &self.url)
            .output()
            .expect("run the CLI");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The `http://` URL a host started with `--listen 127.0.0.1:0 --listen-file FILE` wrote to
/// FILE, once it has.
fn listened(file: &Path) -> Option<String> {
    let addr = std::fs::read_to_string(file).ok()?;
    Some(format!("http://{}", addr.trim()))
}

/// Waits (up to 30 s) for the host `child`, started with `--listen 127.0.0.1:0
/// --listen-file FILE`, to write FILE; returns its `http://` URL, or fails at once if the
/// host exits first. A port the test picked and let go could be taken by another test's
/// host meanwhile, one the host picks cannot.
pub async fn listen_url(file: &Path, child: &mut std::process::Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(url) = listened(file) {
            return url;
        }
        if let Some(status) = child.try_wait().expect("poll the host") {
            panic!("the host exited before it served: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the host did not write {} within 30 s",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The benchmarks' event payload: about 200 bytes, an assistant's tool call numbered `i`.
pub fn sample_payload(i: u64) -> serde_json::Value {
    serde_json::json!({
        "tool_name": "inspect_location",
        "parameters": {"target": format!("room-{i}")},
        "reasoning": "checking surroundings before acting",
        "success": true,
        "execution_time_ms": 150.0,
        "seq": i,
    })
}

/// A cheap pseudo-random number (no crate needed for picking kill moments).
pub fn jitter(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(7);
    let mut x = nanos ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % max.max(1)
}

/// A plugin's `.wasm`: an installed example (`type-counter`, in `target/plugins/`) or a
/// test guest from the build (`v0_1_type_counter`).
pub fn plugin_wasm(name: &str) -> Vec<u8> {
    let (installed, built) = (
        env!("EVHOST_TEST_PLUGINS"),
        env!("EVHOST_TEST_PLUGIN_BUILD"),
    );
    std::fs::read(std::path::Path::new(installed).join(format!("{name}.wasm")))
        .or_else(|_| std::fs::read(std::path::Path::new(built).join(format!("{name}.wasm"))))
        .unwrap_or_else(|_| panic!("{name}.wasm is neither in {installed} nor in {built}"))
}

/// The manifest of the `sandbox_probe` test guest as projection `probe` over `probe.>`:
/// an event of type `probe.trap` makes it trap, and is dead-lettered at once (no retries);
/// `quarantine_after` dead letters in a row quarantine it (0: never).
pub fn probe_manifest(quarantine_after: u32) -> String {
    format!(
        "name = \"probe\"\nversion = \"1\"\nkind = \"projection\"\nsubscriptions = [\"probe.>\"]\n\
         [on_failure]\nretries = 0\nbackoff_ms = 1\nmax_backoff_ms = 1\nquarantine_after = {quarantine_after}\n"
    )
}

/// `GET url`, expecting a refusal with `status` whose message says `says`; returns the
/// reply.
pub async fn get_refused(url: &str, status: u16, says: &str) -> serde_json::Value {
    let (s, body) = get(url).await;
    assert_eq!(s, status, "{url}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{url}: {body}");
    body
}

/// `POST url` with a JSON body; returns the status and the JSON reply (`null` if none).
pub async fn post(url: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("the host answers");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// `GET url`; returns the status and the JSON reply (`null` if none).
pub async fn get(url: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(url).await.expect("the host answers");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Appends `events` (a JSON array, or a `Vec` of events) to `stream`, expecting success;
/// returns the reply.
pub async fn append(
    h: &Host,
    stream: &str,
    events: impl Into<serde_json::Value>,
) -> serde_json::Value {
    let body = serde_json::json!({ "events": events.into() });
    let (s, reply) = post(&format!("{}/v1/streams/{stream}", h.url), body).await;
    assert_eq!(s, 200, "{reply}");
    reply
}

/// Waits (up to 60 s) until plugin `name` has handled everything up to the log's head;
/// returns its status.
pub async fn caught_up(h: &Host, name: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, info) = get(&format!("{}/v1/plugins/{name}", h.url)).await;
        if s == 200 && info["lag"] == 0 && info["position"] == info["head"] {
            return info;
        }
        assert!(Instant::now() < deadline, "{name} did not catch up: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 30 s) until plugin `name`'s checkpoint reaches `at_least`; returns its
/// status.
pub async fn position_reaches(h: &Host, name: &str, at_least: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, info) = get(&format!("{}/v1/plugins/{name}", h.url)).await;
        if info["position"].as_u64().unwrap_or(0) >= at_least {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not reach {at_least}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every event in the log, in position order.
pub async fn all_events(h: &Host) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let (s, page) = get(&format!("{}/v1/events?from={from}&limit=10000", h.url)).await;
        assert_eq!(s, 200, "{page}");
        out.extend(page["events"].as_array().unwrap().iter().cloned());
        let next = page["next"].as_u64().unwrap();
        if next >= page["head"].as_u64().unwrap() {
            return out;
        }
        from = next;
    }
}

/// `PUT /v1/plugins/{name}` with a manifest and a component.
pub async fn upload(
    h: &Host,
    name: &str,
    manifest: &str,
    wasm: Vec<u8>,
) -> (u16, serde_json::Value) {
    upload_with(h, name, manifest, wasm, serde_json::json!({}), &[]).await
}

/// [`upload`], expecting the load to succeed; returns the plugin's status.
pub async fn load_ok(h: &Host, name: &str, manifest: &str, wasm: Vec<u8>) -> serde_json::Value {
    let (s, info) = upload(h, name, manifest, wasm).await;
    assert_eq!(s, 200, "loading {name}: {info}");
    info
}

/// The positions an append answered.
pub fn positions(reply: &serde_json::Value) -> Vec<u64> {
    reply["positions"]
        .as_array()
        .expect("an append's reply has positions")
        .iter()
        .map(|p| p.as_u64().expect("a position"))
        .collect()
}

/// [`upload`] granting the load `grants` (`http:HOST:PORT`, `clock`, `random`).
pub async fn upload_granted(
    h: &Host,
    name: &str,
    manifest: &str,
    wasm: Vec<u8>,
    grants: &[&str],
) -> (u16, serde_json::Value) {
    upload_with(h, name, manifest, wasm, serde_json::json!({}), grants).await
}

/// [`upload`] with a load's `config` overrides (a JSON object; `{}` sends no part) and
/// `grants` (none sends no part).
pub async fn upload_with(
    h: &Host,
    name: &str,
    manifest: &str,
    wasm: Vec<u8>,
    config: serde_json::Value,
    grants: &[&str],
) -> (u16, serde_json::Value) {
    let mut form = reqwest::multipart::Form::new()
        .part(
            "manifest",
            reqwest::multipart::Part::text(manifest.to_owned()),
        )
        .part("wasm", reqwest::multipart::Part::bytes(wasm));
    if config != serde_json::json!({}) {
        form = form.part("config", reqwest::multipart::Part::text(config.to_string()));
    }
    if !grants.is_empty() {
        form = form.part(
            "grants",
            reqwest::multipart::Part::text(serde_json::json!(grants).to_string()),
        );
    }
    let r = reqwest::Client::new()
        .put(format!("{}/v1/plugins/{name}", h.url))
        .multipart(form)
        .send()
        .await
        .expect("the host answers");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// A plain HTTP server on loopback that counts the requests it receives per path and
/// answers each with `ok <path>`, after an optional delay: the observable side effect of a
/// tool in tests.
pub struct CountingServer {
    /// `host:port` it listens on.
    pub authority: String,
    counts: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingServer {
    /// Starts a server answering after `delay`.
    pub async fn start(delay: Duration) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let counts: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>> =
            Default::default();
        let c = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    *c.lock().unwrap().entry(path.clone()).or_default() += 1;
                    tokio::time::sleep(delay).await;
                    let body = format!("ok {path}");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        Self {
            authority,
            counts,
            task,
        }
    }

    /// Requests received for `path`.
    pub fn count(&self, path: &str) -> u64 {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Requests received in all.
    pub fn total(&self) -> u64 {
        self.counts.lock().unwrap().values().sum()
    }
}

impl Drop for CountingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks that each of the two tool invocations of every flow in `flows` (`<flow>/1` and
/// `<flow>/2`, as the orchestrator plans them) has exactly one outcome in `events`, and
/// that http-get's side effect on `server` happened once for each completed invocation and
/// at most once for each `interrupted` one; returns (completed, interrupted) http-gets.
pub fn check_tool_outcomes(
    events: &[serde_json::Value],
    flows: &[String],
    server: &CountingServer,
) -> (usize, usize) {
    let mut outcomes: std::collections::BTreeMap<String, Vec<&serde_json::Value>> =
        std::collections::BTreeMap::new();
    for e in events.iter().filter(|e| {
        e["type"] == "tool.invocation.completed" || e["type"] == "tool.invocation.failed"
    }) {
        outcomes
            .entry(e["payload"]["invocation_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(e);
    }
    let (mut completed, mut interrupted) = (0, 0);
    for cid in flows {
        for step in ["1", "2"] {
            let id = format!("{cid}/{step}");
            let list = outcomes
                .get(&id)
                .unwrap_or_else(|| panic!("no outcome for {id}"));
            assert_eq!(list.len(), 1, "{id}: {list:?}");
            let o = list[0];
            if o["payload"]["tool"] == "http-get" {
                let seen = server.count(&format!("/{cid}"));
                if o["type"] == "tool.invocation.completed" {
                    assert_eq!(seen, 1, "{id} completed after {seen} requests");
                    completed += 1;
                } else {
                    assert_eq!(o["payload"]["error"]["code"], "interrupted", "{o}");
                    assert!(seen <= 1, "{id} was sent {seen} times");
                    interrupted += 1;
                }
            }
        }
    }
    (completed, interrupted)
}

/// Waits up to 60 s until the flow `correlation` is answered; returns the flow.
pub async fn answered(h: &Host, correlation: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, flow) = get(&format!("{}/v1/flows/{correlation}", h.url)).await;
        if s == 200 && flow["answered"] == true {
            return flow;
        }
        assert!(
            Instant::now() < deadline,
            "flow {correlation} was not answered: {flow}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The correlation ids of every user query in `events`.
pub fn logged_flows(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "user.query.received")
        .map(|e| e["metadata"]["correlation_id"].as_str().unwrap().to_owned())
        .collect()
}
