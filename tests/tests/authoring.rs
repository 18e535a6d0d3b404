//! The plugin author's loop, as README tells it: `plugin new`, `build`, `test` and `deploy`
//! run by the real binary from a temporary directory outside the repository, in Rust,
//! JavaScript and Python, against a real host; and the JavaScript and Python guests of
//! `plugins/guests/` folding the same events as their Rust originals into the same state.

use std::path::{Path, PathBuf};
use std::process::Command;

use evhost_tests::{Host, all_events, append, caught_up, get, load_ok};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");
const GUESTS: &str = env!("EVHOST_TEST_GUESTS");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The shell block README's "Writing a plugin" marks as the author's walk.
fn readme_walk() -> String {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let at = readme
        .find("<!-- the author's walk")
        .expect("README marks the author's walk");
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("a sh block follows the mark") + 6;
    let end = start + rest[start..].find("```").expect("the block ends");
    rest[start..end].to_owned()
}

/// The output README shows: the `# ` lines right after a command.
fn shown_output(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut after_command = false;
    for line in script.lines() {
        match line.strip_prefix("# ") {
            Some(shown) if after_command => out.push(shown.to_owned()),
            Some(_) => {}
            None => after_command = !line.trim().is_empty(),
        }
    }
    out
}

/// A PATH with `evhost` (this build of the binary) first, then (`js_tools`) the
/// componentize-js scripts/setup.sh installed.
fn author_path(dir: &Path, js_tools: bool) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("evhost");
    if !link.exists() {
        std::os::unix::fs::symlink(BIN, &link).unwrap();
    }
    let mut path = vec![bin];
    if js_tools {
        path.push(Path::new(ROOT).join("plugins/guests/node_modules/.bin"));
    }
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    // The test's own PATH may hold a componentize-js too; leave that out as well.
    path.extend(
        std::env::split_paths(&inherited)
            .filter(|p| js_tools || !p.join("componentize-js").exists()),
    );
    std::env::join_paths(path).unwrap().into_string().unwrap()
}

/// Runs `script` with bash in `dir` as an author's shell would, against `h`, for at most
/// ten minutes.
fn run_script(h: &Host, dir: &Path, script: &str) -> (bool, String, String) {
    run_script_with(h, dir, script, true)
}

/// [`run_script`]; without `js_tools`, no componentize-js is on PATH, so `plugin build`
/// installs the one the project pins, as on an author's fresh machine.
fn run_script_with(h: &Host, dir: &Path, script: &str, js_tools: bool) -> (bool, String, String) {
    let out = Command::new("timeout")
        .args(["600", "bash", "-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", author_path(dir, js_tools))
        .env("EVHOST_URL", &h.url)
        // The Rust template's dependencies, built once for every run (the SDK's standalone
        // check shares them).
        .env(
            "CARGO_TARGET_DIR",
            Path::new(ROOT).join("target/sdk-standalone"),
        )
        .output()
        .expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// README's walk in `lang`, from a temporary directory: every command succeeds, every
/// output README shows is printed, and the deployed plugin answers the query.
async fn walk(lang: &str) {
    let data = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, data.path(), &[]).await;
    let authors = tempfile::tempdir().unwrap();
    let mut script = readme_walk();
    if lang != "rust" {
        let new = "evhost plugin new order-totals --kind projection";
        assert!(script.contains(new), "the walk starts with {new}");
        script = script.replace(new, &format!("{new} --lang {lang}"));
    }
    // JavaScript from scratch: the first build runs npm install in the project.
    let (ok, stdout, stderr) = run_script_with(&h, authors.path(), &script, lang != "js");
    assert!(ok, "the {lang} walk failed:\n{stdout}\n{stderr}");
    for shown in shown_output(&script) {
        assert!(
            stdout.contains(&shown),
            "the {lang} walk did not print {shown:?}:\n{stdout}\n{stderr}"
        );
    }
    let project = authors.path().join("order-totals");
    assert!(project.join("order-totals.wasm").is_file());
    if lang == "js" {
        assert!(
            project.join("node_modules/.bin/componentize-js").is_file(),
            "plugin build installed componentize-js: {stderr}"
        );
    }
    let status = caught_up(&h, "order-totals").await;
    assert_eq!(status["dead_letters"], 0, "{status}");
    // A third order, from another customer, folds live.
    append(
        &h,
        "order-3",
        json!([{"type": "order.placed", "payload": {"customer": "c-2", "total": 3}}]),
    )
    .await;
    caught_up(&h, "order-totals").await;
    let (s, v) = get(&format!(
        "{}/v1/projections/order-totals/state?key=c-2",
        h.url
    ))
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["value"]["orders"], 1, "{v}");
}

#[tokio::test]
async fn readme_walk_in_rust() {
    walk("rust").await;
}

#[tokio::test]
async fn readme_walk_in_javascript() {
    walk("js").await;
}

#[tokio::test]
async fn readme_walk_in_python() {
    walk("python").await;
}

/// `plugin new NAME ARGS` and `plugin build` in `dir`; the project's directory.
fn new_and_built(h: &Host, dir: &Path, name: &str, args: &str) -> PathBuf {
    let (ok, out, err) = run_script(
        h,
        dir,
        &format!("evhost plugin new {name} {args} && evhost plugin build {name}"),
    );
    assert!(ok, "{out}\n{err}");
    dir.join(name)
}

fn guest(name: &str) -> (String, Vec<u8>) {
    let dir = Path::new(GUESTS);
    let wasm = std::fs::read(dir.join(format!("{name}.wasm"))).unwrap_or_else(|_| {
        panic!(
            "{}/{name}.wasm: run scripts/build-guests.sh first",
            dir.display()
        )
    });
    let manifest = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
    (manifest, wasm)
}

/// Every key of a projection's state, with its value.
async fn state_of(h: &Host, name: &str) -> Value {
    let (s, v) = get(&format!(
        "{}/v1/projections/{name}/state?prefix=&limit=10000",
        h.url
    ))
    .await;
    assert_eq!(s, 200, "{v}");
    v["items"].clone()
}

/// type-counter in Rust, JavaScript and Python, in one host over the same events (in
/// batches of many sizes, types with non-ASCII payloads and metadata): the same state, and
/// the same answers to queries.
#[tokio::test]
async fn javascript_and_python_projections_fold_as_rust_does() {
    let data = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, data.path(), &[]).await;
    let rust_manifest =
        std::fs::read_to_string(Path::new(PLUGINS).join("type-counter.toml")).unwrap();
    let rust_wasm = std::fs::read(Path::new(PLUGINS).join("type-counter.wasm")).unwrap();
    // Half the log before the loads (catch-up), half after (live).
    let types = [
        "order.placed",
        "order.paid",
        "user.signed-up",
        "shop.opened",
    ];
    let mut sent = 0;
    for round in 0..2 {
        for batch in [1usize, 7, 64, 300] {
            let events: Vec<Value> = (0..batch)
                .map(|i| {
                    json!({"type": types[(i * 7 + round) % types.len()],
                           "payload": {"n": i, "text": "zoë ✓ \"quoted\""},
                           "metadata": {"correlation_id": format!("c-{i}"), "k": "v"}})
                })
                .collect();
            sent += batch;
            append(&h, &format!("s-{round}-{batch}"), events).await;
        }
        if round == 0 {
            load_ok(&h, "type-counter", &rust_manifest, rust_wasm.clone()).await;
            for name in ["type-counter-js", "type-counter-py"] {
                let (manifest, wasm) = guest(name);
                load_ok(&h, name, &manifest, wasm).await;
            }
        }
    }
    let mut states = Vec::new();
    for name in ["type-counter", "type-counter-js", "type-counter-py"] {
        let status = caught_up(&h, name).await;
        assert_eq!(status["dead_letters"], 0, "{name}: {status}");
        states.push((name, state_of(&h, name).await));
    }
    let total: u64 = states[0]
        .1
        .as_array()
        .unwrap()
        .iter()
        // The host's own announcements (evhost.plugin.loaded) match `>` too.
        .filter(|item| !item["key"].as_str().unwrap().starts_with("evhost."))
        .map(|item| item["value"].as_u64().unwrap())
        .sum();
    assert_eq!(total, sent as u64, "{:?}", states[0]);
    for (name, state) in &states[1..] {
        assert_eq!(state, &states[0].1, "{name} folded differently from Rust");
    }
    for name in ["type-counter", "type-counter-js", "type-counter-py"] {
        let (s, v) = evhost_tests::post(
            &format!("{}/v1/projections/{name}/query", h.url),
            json!("shop.opened"),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let want = states[0]
            .1
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["key"] == "shop.opened")
            .unwrap()["value"]
            .clone();
        assert_eq!(v["answer"], want, "{name}'s query");
    }
}

/// The Python extractor beside the Rust one `plugin new --kind extractor` writes: the same
/// events derived, each once, caused by its order.
#[tokio::test]
async fn a_python_extractor_derives_what_the_rust_one_does() {
    let authors = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, data.path(), &[]).await;
    let project = new_and_built(&h, authors.path(), "big-orders", "--kind extractor");
    let (ok, out, err) = run_script(&h, &project, "evhost plugin test");
    assert!(ok, "{out}{err}");
    assert!(out.contains("ok    fixtures/extractor.json"), "{out}");
    let rust_manifest = std::fs::read_to_string(project.join("big-orders.toml")).unwrap();
    let rust_wasm = std::fs::read(project.join("big-orders.wasm")).unwrap();
    load_ok(&h, "big-orders", &rust_manifest, rust_wasm).await;
    let (manifest, wasm) = guest("big-orders-py");
    load_ok(&h, "big-orders-py", &manifest, wasm).await;
    let orders: Vec<Value> = (0..40)
        .map(|i| json!({"type": "order.placed", "payload": {"customer": format!("c-{}", i % 3), "total": i * 7}}))
        .collect();
    append(&h, "orders", orders).await;
    caught_up(&h, "big-orders").await;
    caught_up(&h, "big-orders-py").await;
    let events = all_events(&h).await;
    let derived_by = |source: &str| -> Vec<(Value, Value)> {
        events
            .iter()
            .filter(|e| e["type"] == "order.flagged" && e["source"] == source)
            .map(|e| (e["payload"].clone(), e["metadata"]["causation_id"].clone()))
            .collect()
    };
    let rust = derived_by("big-orders");
    let python = derived_by("big-orders-py");
    // Totals 0, 7, ..., 273: those of 100 or more are 15..40, 25 orders.
    assert_eq!(rust.len(), 25, "{rust:?}");
    assert_eq!(python.len(), rust.len());
    for ((rp, rc), (pp, pc)) in rust.iter().zip(&python) {
        assert_eq!(rc, pc, "each flag is caused by the same order");
        for field in ["order_stream", "customer"] {
            assert_eq!(rp[field], pp[field]);
        }
        assert_eq!(rp["total"].as_f64(), pp["total"].as_f64());
    }
}

/// What `plugin test` says when a fixture does not match, when the manifest asks for a
/// capability the run does not grant, and when a plugin folds differently in one batch
/// than one event at a time.
#[tokio::test]
async fn plugin_test_shows_what_differs_and_refuses_what_is_not_granted() {
    let authors = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, data.path(), &[]).await;
    let project = new_and_built(
        &h,
        authors.path(),
        "totals",
        "--kind projection --lang python",
    );
    let fixture = project.join("fixtures/projection.json");
    let text = std::fs::read_to_string(&fixture).unwrap();
    std::fs::write(&fixture, text.replace("\"orders\": 1", "\"orders\": 5")).unwrap();
    let (ok, out, _) = run_script(&h, &project, "evhost plugin test");
    assert!(!ok, "a fixture that does not match fails the run:\n{out}");
    assert!(out.contains("FAIL  fixtures/projection.json"), "{out}");
    assert!(
        out.contains("- \"c-2\": {\"orders\":5,\"spent\":40}"),
        "{out}"
    );
    assert!(
        out.contains("+ \"c-2\": {\"orders\":1,\"spent\":40}"),
        "{out}"
    );
    assert!(out.contains("ok    fixtures/refused.json"), "{out}");
    std::fs::write(&fixture, text).unwrap();

    // Only subscribed events reach the plugin, as on the host; a check that does not apply
    // to a projection is refused rather than passed.
    let extra = project.join("fixtures/other.json");
    std::fs::write(
        &extra,
        json!({"events": [{"type": "other.thing", "payload": {"no": "customer"}}], "state": {}})
            .to_string(),
    )
    .unwrap();
    let (ok, out, err) = run_script(&h, &project, "evhost plugin test");
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("1 of its events match no subscription"),
        "{out}"
    );
    std::fs::write(
        &extra,
        json!({"events": [{"type": "order.placed", "payload": {"customer": "c"}}], "derived": []})
            .to_string(),
    )
    .unwrap();
    let (ok, out, err) = run_script(&h, &project, "evhost plugin test");
    assert!(!ok);
    assert!(
        err.contains("`derived` does not apply to a projection"),
        "{out}{err}"
    );
    std::fs::remove_file(&extra).unwrap();

    // The manifest asks for randomness: refused until granted.
    let manifest = project.join("totals.toml");
    let m = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, format!("{m}\n[capabilities]\nrandom = true\n")).unwrap();
    let (ok, out, err) = run_script(&h, &project, "evhost plugin test");
    assert!(!ok);
    assert!(
        err.contains("asks for random, which this run does not grant"),
        "{out}{err}"
    );
    let (ok, out, err) = run_script(&h, &project, "evhost plugin test --grant random");
    assert!(ok, "{out}{err}");
    std::fs::write(&manifest, m).unwrap();

    // A projection that keeps the size of the last batch depends on batching.
    let app = project.join("app.py");
    let source = std::fs::read_to_string(&app).unwrap();
    std::fs::write(
        &app,
        source.replace(
            "        state.set_many([(k, json.dumps(v)) for k, v in changed.items()])",
            "        state.set_many([(k, json.dumps(v)) for k, v in changed.items()])\n        state.set(\"last-batch\", str(sum(1 for _ in events(batch))))",
        ),
    )
    .unwrap();
    let (ok, out, err) = run_script(&h, &project, "evhost plugin test --build");
    assert!(!ok, "{out}{err}");
    assert!(
        out.contains("the state depends on how events are batched"),
        "{out}"
    );
    assert!(out.contains("- \"last-batch\": 3"), "{out}");
    assert!(out.contains("+ \"last-batch\": 1"), "{out}");
}

/// `plugin new` refuses a bad name and a directory that already has files, and `plugin
/// build` names a project with no manifest.
#[test]
fn plugin_new_and_build_refuse_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], cwd: &Path| {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(cwd)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["plugin", "new", "Bad_Name", "--kind", "tool"], dir.path());
    assert!(!ok);
    assert!(err.contains("cannot name a plugin"), "{err}");
    let (ok, err) = run(
        &["plugin", "new", "t", "--kind", "tool", "--lang", "js"],
        dir.path(),
    );
    assert!(ok, "{err}");
    let (ok, err) = run(&["plugin", "new", "t", "--kind", "tool"], dir.path());
    assert!(!ok);
    assert!(err.contains("already exists and is not empty"), "{err}");
    let empty: PathBuf = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, err) = run(&["plugin", "build"], &empty);
    assert!(!ok);
    assert!(err.contains("has no plugin manifest"), "{err}");
    let (ok, err) = run(&["plugin", "test"], &dir.path().join("t"));
    assert!(!ok);
    assert!(err.contains("build it first"), "{err}");
}

/// `plugin test` runs a tool's real HTTP calls only to the hosts the manifest asks for and
/// the run grants, in a directory holding nothing but a manifest, its `.wasm` and fixtures.
// Two threads: the server answers while the test waits for the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_test_runs_a_granted_tool_with_real_http() {
    let server = evhost_tests::CountingServer::start(std::time::Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!(
        "name = \"http-get\"\nversion = \"0.1.0\"\nkind = \"tool\"\n[capabilities]\nhttp = [\"{}\"]\n",
        server.authority
    );
    std::fs::write(dir.path().join("http-get.toml"), manifest).unwrap();
    std::fs::copy(
        Path::new(PLUGINS).join("http-get.wasm"),
        dir.path().join("http-get.wasm"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("fixtures")).unwrap();
    let url = format!("http://{}/checked", server.authority);
    let fixture = json!({"invocations": [
        {"input": {"url": url}, "output": {"url": url, "status": 200, "bytes": 11, "body": "ok /checked"}},
        {"input": {"url": "http://127.0.0.1:9/"}, "error": "denied"},
    ]});
    std::fs::write(dir.path().join("fixtures/get.json"), fixture.to_string()).unwrap();
    let test = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["plugin", "test"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = test(&[]);
    assert!(!ok);
    assert!(
        err.contains(&format!("asks for http:{}", server.authority)),
        "{err}"
    );
    assert_eq!(server.total(), 0, "nothing ran before the grant");
    let grant = format!("http:{}", server.authority);
    let (ok, out, err) = test(&["--grant", &grant]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("ok    fixtures/get.json"), "{out}");
    assert!(out.contains("µs/invocation"), "{out}");
    assert_eq!(server.count("/checked"), 1, "one real request");
}
