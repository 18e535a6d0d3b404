//! Who may do what, against the real binary over loopback: tokens with roles, and the
//! requests a web page on another site can make (HTML forms, cross-origin fetches, DNS
//! rebinding), sent as raw HTTP with the headers a browser sends.

use std::process::{Command, Stdio};
use std::time::Duration;

use evhost_tests::Host;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

const READ: &str = "reader-7f3a9c1e5b2d4680";
const APPEND: &str = "writer-2b8e6d4f0a1c3957";
const ADMIN: &str = "admin-9d1f3b5a7c2e4068a";

/// Sends `head` (request line and headers, no blank line) and `body` over a fresh
/// connection; returns the status and the JSON body.
async fn raw(h: &Host, head: &str, body: &str) -> (u16, Value) {
    raw_at(host_of(h), head, body).await
}

/// [`raw`] to the host at `authority` (`ip:port`).
async fn raw_at(authority: &str, head: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(authority).await.unwrap();
    let req = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("a reply within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

async fn head_position(h: &Host) -> u64 {
    let (s, v) = raw(
        h,
        &format!("GET /health HTTP/1.1\r\nHost: {}", host_of(h)),
        "",
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["head"].as_u64().unwrap()
}

fn host_of(h: &Host) -> &str {
    h.url.trim_start_matches("http://")
}

const EVENT: &str = r#"{"events":[{"type":"csrf.test","payload":{"n":1}}]}"#;

/// With no configuration on loopback, a client appends as before, but nothing a web page
/// on another site can send gets through: form and text bodies (415), any foreign Origin
/// (403), and a rebound host name (421). Nothing refused is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_the_default_host() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let host = host_of(&h).to_owned();
    let port = host.rsplit(':').next().unwrap().to_owned();

    let (s, v) = raw(
        &h,
        &format!("POST /v1/streams/s HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"),
        EVENT,
    )
    .await;
    assert_eq!(s, 200, "a JSON append from a non-browser client works: {v}");
    assert_eq!(head_position(&h).await, 1);

    // What a plain HTML <form> can send, without any JavaScript.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain; charset=utf-8",
    ] {
        let (s, v) = raw(
            &h,
            &format!("POST /v1/streams/s HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ct}"),
            EVENT,
        )
        .await;
        assert_eq!(s, 415, "{ct}: {v}");
        assert_eq!(v["error"]["code"], "unsupported_media_type", "{v}");
    }
    let (s, _) = raw(
        &h,
        &format!("POST /v1/events HTTP/1.1\r\nHost: {host}"),
        EVENT,
    )
    .await;
    assert_eq!(s, 415, "a body without a Content-Type is refused");
    let (s, v) = raw(
        &h,
        &format!("PUT /v1/schemas/csrf.test HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain"),
        r#"{"type":"object"}"#,
    )
    .await;
    assert_eq!(s, 415, "{v}");
    let (s, v) = raw(
        &h,
        &format!("PUT /v1/plugins/p HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"),
        "{}",
    )
    .await;
    assert_eq!(s, 415, "an upload must be multipart: {v}");
    let (s, v) = raw(
        &h,
        &format!("POST /v1/plugins/nope/resume HTTP/1.1\r\nHost: {host}"),
        "",
    )
    .await;
    assert_eq!(s, 404, "a POST without a body needs no Content-Type: {v}");

    // A cross-origin fetch, even with a JSON body (the preflight is not needed to send it).
    for (method, path) in [("POST", "/v1/streams/s"), ("GET", "/v1/events?from=0")] {
        let (s, v) = raw(
            &h,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://evil.example\r\nContent-Type: application/json\r\nSec-Fetch-Site: cross-site"
            ),
            if method == "POST" { EVENT } else { "" },
        )
        .await;
        assert_eq!(s, 403, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "origin_refused", "{v}");
    }
    let (s, _) = raw(
        &h,
        &format!("POST /v1/streams/s HTTP/1.1\r\nHost: {host}\r\nOrigin: null\r\nContent-Type: application/json"),
        EVENT,
    )
    .await;
    assert_eq!(s, 403, "a sandboxed page's null origin is refused");
    let (s, v) = raw(
        &h,
        &format!("GET /v1/events?from=0 HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}"),
        "",
    )
    .await;
    assert_eq!(s, 200, "the host's own origin may call it: {v}");

    // DNS rebinding: the page's origin and Host are the attacker's name, resolved to
    // 127.0.0.1.
    for bad in [
        format!("evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
    ] {
        let (s, v) = raw(
            &h,
            &format!("GET /v1/events?from=0 HTTP/1.1\r\nHost: {bad}"),
            "",
        )
        .await;
        assert_eq!(s, 421, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "unknown_host", "{v}");
        let (s, _) = raw(
            &h,
            &format!(
                "POST /v1/streams/s HTTP/1.1\r\nHost: {bad}\r\nContent-Type: application/json"
            ),
            EVENT,
        )
        .await;
        assert_eq!(s, 421, "{bad}");
    }
    for good in [
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        host.clone(),
    ] {
        let (s, v) = raw(&h, &format!("GET /health HTTP/1.1\r\nHost: {good}"), "").await;
        assert_eq!(s, 200, "{good}: {v}");
    }
    assert_eq!(head_position(&h).await, 1, "nothing refused was appended");
}

/// `--allow-origin` and `--allow-host` open exactly what they name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_origins_and_hosts_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(
        BIN,
        dir.path(),
        &[
            "--allow-origin",
            "http://localhost:3000",
            "--allow-host",
            "evhost.internal",
        ],
    )
    .await;
    let host = host_of(&h).to_owned();
    let (s, v) = raw(
        &h,
        &format!("POST /v1/streams/s HTTP/1.1\r\nHost: {host}\r\nOrigin: http://localhost:3000\r\nContent-Type: application/json"),
        EVENT,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = raw(
        &h,
        &format!("POST /v1/streams/s HTTP/1.1\r\nHost: {host}\r\nOrigin: http://localhost:3001\r\nContent-Type: application/json"),
        EVENT,
    )
    .await;
    assert_eq!(s, 403);
    let (s, v) = raw(&h, "GET /health HTTP/1.1\r\nHost: evhost.internal", "").await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = raw(&h, "GET /health HTTP/1.1\r\nHost: other.internal", "").await;
    assert_eq!(s, 421);

    // A page of the allowed origin gets CORS: its preflight is answered, and its replies
    // carry Access-Control-Allow-Origin; another origin's preflight is refused.
    let c = reqwest::Client::new();
    let r = c
        .request(reqwest::Method::OPTIONS, format!("{}/v1/streams/s", h.url))
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, authorization",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert!(
        r.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    let r = c
        .get(format!("{}/v1/events?from=0", h.url))
        .header("origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let r = c
        .request(reqwest::Method::OPTIONS, format!("{}/v1/streams/s", h.url))
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());

    // Two Host or Origin headers: which one a proxy would use is unclear, so neither.
    let (s, v) = raw(
        &h,
        &format!("GET /health HTTP/1.1\r\nHost: {host}\r\nHost: evil.example"),
        "",
    )
    .await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (400, &json!("duplicate_header")),
        "{v}"
    );
    let (s, _) = raw(
        &h,
        &format!("GET /health HTTP/1.1\r\nHost: {host}\r\nOrigin: http://localhost:3000\r\nOrigin: http://evil.example"),
        "",
    )
    .await;
    assert_eq!(s, 400);
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// With tokens, every endpoint needs one whose role covers it: 401 without or with an
/// unknown one, 403 with one too weak; the CLI sends `--token` / `EVHOST_TOKEN`; tokens do
/// not appear in the host's logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_with_roles_guard_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("# roles\n{READ} read\n{APPEND} append\n")).unwrap();
    let log = dir.path().join("host.log");
    let listen_file = dir.path().join("listen-addr");
    let mut child = Command::new(BIN)
        .args(["serve", "--data"])
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--listen-file"])
        .arg(&listen_file)
        .arg("--tokens")
        .arg(&file)
        .env("EVHOST_TOKEN", ADMIN)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = evhost_tests::listen_url(&listen_file, &mut child).await;
    let c = reqwest::Client::new();
    let mut up = false;
    for _ in 0..300 {
        if c.get(format!("{url}/health")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the host answers");
    let host = url.trim_start_matches("http://").to_owned();
    let cli = |args: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("EVHOST_URL", &url)
            .env_remove("EVHOST_TOKEN");
        if let Some(t) = token {
            cmd.env("EVHOST_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // No token, an unknown one, a malformed header.
    for auth in [
        String::new(),
        bearer("not-a-token-of-this-host"),
        format!("Authorization: Basic {READ}"),
    ] {
        let extra = if auth.is_empty() {
            String::new()
        } else {
            format!("\r\n{auth}")
        };
        for (head, body) in [
            (
                format!("GET /v1/events?from=0 HTTP/1.1\r\nHost: {host}{extra}"),
                "",
            ),
            (format!("GET /health HTTP/1.1\r\nHost: {host}{extra}"), ""),
            (
                format!(
                    "POST /v1/streams/s HTTP/1.1\r\nHost: {host}{extra}\r\nContent-Type: application/json"
                ),
                EVENT,
            ),
        ] {
            let (s, v) = raw_at(&host, &head, body).await;
            assert_eq!(s, 401, "{head}: {v}");
            assert_eq!(v["error"]["code"], "unauthorized");
        }
    }
    let r = c.get(format!("{url}/v1/events")).send().await.unwrap();
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"evhost\"",
        "a 401 says which scheme to use"
    );

    // What each role may do.
    let schema = r#"{"type":"object"}"#;
    let cases: Vec<(&str, String, &str, &str, u16)> = vec![
        (READ, "GET /v1/events?from=0".into(), "", "", 200),
        (READ, "GET /v1/plugins".into(), "", "", 200),
        (
            READ,
            "POST /v1/streams/s".into(),
            "application/json",
            EVENT,
            403,
        ),
        (
            APPEND,
            "POST /v1/streams/s".into(),
            "application/json",
            EVENT,
            200,
        ),
        (APPEND, "GET /v1/streams/s".into(), "", "", 200),
        (
            APPEND,
            "PUT /v1/schemas/csrf.test".into(),
            "application/json",
            schema,
            403,
        ),
        (APPEND, "POST /v1/plugins/nope/resume".into(), "", "", 403),
        (APPEND, "DELETE /v1/dlq/nope.1".into(), "", "", 403),
        (
            ADMIN,
            "PUT /v1/schemas/csrf.test".into(),
            "application/json",
            schema,
            200,
        ),
        (ADMIN, "DELETE /v1/schemas/csrf.test".into(), "", "", 204),
        (ADMIN, "POST /v1/plugins/nope/resume".into(), "", "", 404),
    ];
    for (token, line, ct, body, want) in cases {
        let ct = if ct.is_empty() {
            String::new()
        } else {
            format!("\r\nContent-Type: {ct}")
        };
        let (s, v) = raw_at(
            &host,
            &format!("{line} HTTP/1.1\r\nHost: {host}\r\n{}{ct}", bearer(token)),
            body,
        )
        .await;
        assert_eq!(s, want, "{line} with the {token:.6} token: {v}");
        if want == 403 {
            assert_eq!(v["error"]["code"], "forbidden", "{v}");
        }
    }

    // A subscription needs the read role, and gets events with it.
    let r = c
        .get(format!("{url}/v1/subscribe?from=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{url}/v1/subscribe?from=0"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);

    // The CLI: without a token it says what to do; with EVHOST_TOKEN or --token it works.
    let (ok, _, err) = cli(&["events", "read", "--limit", "5"], None);
    assert!(
        !ok && err.contains("401") && err.contains("--token"),
        "{err}"
    );
    let (ok, text, err) = cli(&["events", "read", "--limit", "5"], Some(READ));
    assert!(ok, "{err}");
    assert!(text.contains("csrf.test"), "{text}");
    let (ok, _, err) = cli(
        &[
            "events", "append", "--token", READ, "--stream", "s", "--type", "cli.test",
        ],
        None,
    );
    assert!(
        !ok && err.contains("403"),
        "a read token cannot append: {err}"
    );
    let (ok, out, err) = cli(
        &[
            "events", "append", "--token", APPEND, "--stream", "s", "--type", "cli.test",
        ],
        None,
    );
    assert!(ok, "{out} {err}");

    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap();
    for t in [READ, APPEND, ADMIN] {
        assert!(!logs.contains(t), "a token appears in the host's logs");
    }
}

/// Listening beyond loopback without tokens is refused at start, with the reason; the
/// refusal comes before anything binds.
#[test]
fn a_public_listener_needs_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--data"])
        .arg(dir.path())
        .args(["--listen", "0.0.0.0:1"])
        .env_remove("EVHOST_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("without tokens") && err.contains("--insecure-no-auth"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["serve", "--data"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:1", "--token", "short"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("at least 16"),
        "{err}"
    );
}

const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(PLUGINS).join(format!("{name}.wasm"))).unwrap()
}

fn http_get(hosts: &[&str], limits: &str) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "name = \"http-get\"\nversion = \"0.1.0\"\nkind = \"tool\"\n[limits]\n{limits}\n[capabilities]\nhttp = [{}]\n",
        hosts.join(", ")
    )
}

/// The operator's caps hold for every manifest, whoever loads it: an upload that grants
/// itself a host outside `--plugin-http-allow`, or asks for more memory, concurrency, time
/// or fuel than the caps, is refused naming what it asked for, and a plugin in `--plugins`
/// that does is not loaded. `--no-hot-load` turns loading over the API off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_caps_bound_what_a_plugin_may_claim() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(
        BIN,
        dir.path(),
        &[
            "--plugin-http-allow",
            "127.0.0.1:8931",
            "--plugin-max-memory-mb",
            "128",
            "--plugin-max-concurrency",
            "8",
            "--plugin-max-batch-timeout-ms",
            "30000",
            "--grant",
            "http-get=http:127.0.0.1:8931",
        ],
    )
    .await;
    let (s, v) = evhost_tests::upload(
        &h,
        "http-get",
        &http_get(&["127.0.0.1:8931", "127.0.0.1:6379"], ""),
        wasm("http-get"),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["code"], "refused_by_policy");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("\"127.0.0.1:6379\"") && m.contains("--plugin-http-allow"),
        "{m}"
    );
    for (limits, named) in [
        ("memory_mb = 512", "memory_mb is 512"),
        ("concurrency = 64", "concurrency is 64"),
        ("batch_timeout_ms = 600000", "batch_timeout_ms is 600000"),
    ] {
        let (s, v) = evhost_tests::upload(
            &h,
            "http-get",
            &http_get(&["127.0.0.1:8931"], limits),
            wasm("http-get"),
        )
        .await;
        assert_eq!(s, 403, "{limits}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(named),
            "{v}"
        );
    }
    let (_, list) = evhost_tests::get(&format!("{}/v1/plugins", h.url)).await;
    assert_eq!(list["plugins"], json!([]), "nothing refused was loaded");
    let (s, v) = evhost_tests::upload(
        &h,
        "http-get",
        &http_get(&["127.0.0.1:8931"], "memory_mb = 128\nconcurrency = 8"),
        wasm("http-get"),
    )
    .await;
    assert_eq!(s, 200, "within the caps: {v}");
    assert_eq!(v["source"]["from"], "api", "{v}");
    drop(h);

    // The same caps apply to the operator's own directory.
    let ops = tempfile::tempdir().unwrap();
    std::fs::write(
        ops.path().join("http-get.toml"),
        http_get(&["127.0.0.1:6379"], ""),
    )
    .unwrap();
    std::fs::write(ops.path().join("http-get.wasm"), wasm("http-get")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plugins = ops.path().to_str().unwrap();
    let h = Host::start(
        BIN,
        dir.path(),
        &[
            "--plugins",
            plugins,
            "--plugin-http-deny-all",
            "--no-hot-load",
        ],
    )
    .await;
    let (_, list) = evhost_tests::get(&format!("{}/v1/plugins", h.url)).await;
    assert_eq!(list["plugins"], json!([]), "{list}");
    let (s, v) = evhost_tests::upload(
        &h,
        "type-counter",
        "name = \"type-counter\"\nversion = \"0.1.0\"\nkind = \"projection\"\nsubscriptions = [\">\"]\n",
        wasm("type-counter"),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--no-hot-load"),
        "{v}"
    );
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/plugins/http-get", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "unloading is refused too");
}

fn counter(version: &str) -> String {
    format!(
        "name = \"type-counter\"\nversion = \"{version}\"\nkind = \"projection\"\nsubscriptions = [\">\"]\n"
    )
}

async fn status(h: &Host, name: &str) -> Value {
    let (s, v) = evhost_tests::get(&format!("{}/v1/plugins/{name}", h.url)).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// A plugin uploaded over the API never silently overrides the operator's `--plugins`
/// copy: status says which copy runs and why, and `--plugin-precedence` decides which one
/// loads at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_does_not_silently_override_the_operators_copy() {
    let ops = tempfile::tempdir().unwrap();
    std::fs::write(ops.path().join("type-counter.toml"), counter("1.0.0")).unwrap();
    std::fs::write(ops.path().join("type-counter.wasm"), wasm("type-counter")).unwrap();
    let plugins = ops.path().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let mut h = Host::start(BIN, dir.path(), &["--plugins", plugins]).await;
    let s = status(&h, "type-counter").await;
    assert_eq!(
        (&s["version"], &s["source"]["from"]),
        (&json!("1.0.0"), &json!("plugins_dir")),
        "{s}"
    );
    assert!(s["source"].get("note").is_none(), "{s}");
    let (code, v) =
        evhost_tests::upload(&h, "type-counter", &counter("2.0.0"), wasm("type-counter")).await;
    assert_eq!(code, 200, "{v}");
    let s = status(&h, "type-counter").await;
    assert_eq!(
        (&s["version"], &s["source"]["from"]),
        (&json!("2.0.0"), &json!("api")),
        "{s}"
    );
    let note = s["source"]["note"].as_str().unwrap();
    assert!(note.contains("until the next start"), "{note}");
    h.stop();

    // By default the operator's copy loads again, and says the upload was left out.
    let mut h = Host::start(BIN, dir.path(), &["--plugins", plugins]).await;
    let s = status(&h, "type-counter").await;
    assert_eq!(
        (&s["version"], &s["source"]["from"]),
        (&json!("1.0.0"), &json!("plugins_dir")),
        "{s}"
    );
    let note = s["source"]["note"].as_str().unwrap();
    assert!(
        note.contains("is not loaded") && note.contains("plugins-dir"),
        "{note}"
    );
    h.stop();

    // Asked for, the upload wins, and says what it overrides.
    let h = Host::start(
        BIN,
        dir.path(),
        &["--plugins", plugins, "--plugin-precedence", "uploaded"],
    )
    .await;
    let s = status(&h, "type-counter").await;
    assert_eq!(
        (&s["version"], &s["source"]["from"]),
        (&json!("2.0.0"), &json!("uploaded")),
        "{s}"
    );
    let note = s["source"]["note"].as_str().unwrap();
    assert!(note.contains("overrides"), "{note}");
    drop(h);

    // With hot loading off, uploads kept from before are not loaded at start either.
    let h = Host::start(
        BIN,
        dir.path(),
        &[
            "--plugins",
            plugins,
            "--plugin-precedence",
            "uploaded",
            "--no-hot-load",
        ],
    )
    .await;
    let s = status(&h, "type-counter").await;
    assert_eq!(
        (&s["version"], &s["source"]["from"]),
        (&json!("1.0.0"), &json!("plugins_dir")),
        "{s}"
    );
}
