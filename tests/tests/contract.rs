//! The plugin contract (`evhost:plugin` WIT versions): the host tells a component's kind
//! and version from its exports and refuses what matches no world, more than one, or
//! another kind than its manifest says; plugins built against 0.1.0 and 0.2.0 run side by
//! side in one host; configuration reaches the plugin with secrets kept out of status; and
//! a capability takes effect only when the manifest asks for it and the operator grants it.
//! Real runtime, real `.wasm`, and the real binary over loopback HTTP.

use std::path::Path;
use std::time::{Duration, Instant};

use evhost::plugin::{
    ExtractorPlugin, Kind, Manifest, PluginError, ProjectionPlugin, Runtime, ToolPlugin, WitVersion,
};
use evhost_tests::{Host, all_events, append, caught_up, get, upload, upload_granted, upload_with};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");

use evhost_tests::plugin_wasm as wasm;

fn manifest(name: &str, kind: &str) -> String {
    let subs = if kind == "tool" {
        ""
    } else {
        "subscriptions = [\">\"]\n"
    };
    format!("name = \"{name}\"\nversion = \"1\"\nkind = \"{kind}\"\n{subs}")
}

/// Links `file` as the manifest's kind on a fresh runtime.
fn link(file: &str, kind: &str) -> Result<(Kind, WitVersion), PluginError> {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(dir.path()).unwrap();
    let compiled = runtime.compile(&wasm(file)).unwrap();
    let m = Manifest::parse(&manifest("p", kind)).unwrap();
    Ok(match kind {
        "projection" => {
            let p: ProjectionPlugin = runtime.plugin(&compiled, &m)?;
            (p.contract().kind, p.contract().wit)
        }
        "extractor" => {
            let p: ExtractorPlugin = runtime.plugin(&compiled, &m)?;
            (p.contract().kind, p.contract().wit)
        }
        _ => {
            let p: ToolPlugin = runtime.plugin(&compiled, &m)?;
            (p.contract().kind, p.contract().wit)
        }
    })
}

fn load_error(r: Result<(Kind, WitVersion), PluginError>) -> String {
    match r {
        Err(PluginError::Load { message, .. }) => message,
        Err(e) => panic!("not a load error: {e}"),
        Ok(c) => panic!("loaded as {c:?}"),
    }
}

#[test]
fn a_component_is_told_by_its_exports_at_either_version() {
    for (file, kind, want) in [
        (
            "type-counter",
            "projection",
            (Kind::Projection, WitVersion::V0_2_0),
        ),
        (
            "entity-extractor",
            "extractor",
            (Kind::Extractor, WitVersion::V0_2_0),
        ),
        ("math", "tool", (Kind::Tool, WitVersion::V0_2_0)),
        (
            "v0_1_type_counter",
            "projection",
            (Kind::Projection, WitVersion::V0_1_0),
        ),
        (
            "v0_1_tagger",
            "extractor",
            (Kind::Extractor, WitVersion::V0_1_0),
        ),
        ("v0_1_shout", "tool", (Kind::Tool, WitVersion::V0_1_0)),
    ] {
        assert_eq!(link(file, kind).unwrap(), want, "{file}");
    }
}

#[test]
fn a_manifest_whose_kind_contradicts_the_exports_is_refused_naming_both() {
    for (file, declared, is) in [
        (
            "type-counter",
            "tool",
            "projection (it implements evhost:plugin/projection@0.2.0)",
        ),
        (
            "math",
            "extractor",
            "tool (it implements evhost:plugin/tool@0.2.0)",
        ),
        (
            "v0_1_type_counter",
            "extractor",
            "projection (it implements evhost:plugin/projection@0.1.0)",
        ),
        (
            "v0_1_shout",
            "projection",
            "tool (it implements evhost:plugin/tool@0.1.0)",
        ),
    ] {
        let m = load_error(link(file, declared));
        assert!(
            m.contains(&format!(
                "its manifest says kind = \"{declared}\" but the component is a {is}"
            )),
            "{file}: {m}"
        );
    }
}

#[test]
fn a_component_of_two_worlds_or_of_none_is_refused_with_its_exports() {
    let m = load_error(link("two_worlds", "projection"));
    for part in [
        "more than one evhost plugin world",
        "evhost:plugin/projection@0.2.0",
        "evhost:plugin/tool@0.2.0",
        "it exports evhost:plugin/projection-handler@0.2.0, evhost:plugin/tool-handler@0.2.0",
    ] {
        assert!(m.contains(part), "{part:?} not in: {m}");
    }
    let m = load_error(link("wrong_world", "tool"));
    assert!(m.contains("it exports greet"), "{m}");
}

#[test]
fn a_0_1_0_component_cannot_be_given_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(dir.path()).unwrap();
    let compiled = runtime.compile(&wasm("v0_1_type_counter")).unwrap();
    let m = Manifest::parse(&format!(
        "{}[config]\ngreeting = \"hi\"\n",
        manifest("p", "projection")
    ))
    .unwrap();
    let r: Result<ProjectionPlugin, _> = runtime.plugin(&compiled, &m);
    match r {
        Err(PluginError::Load { message, .. }) => assert!(
            message.contains("evhost:plugin@0.1.0, which has no config import"),
            "{message}"
        ),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a 0.1.0 component was given configuration it cannot read"),
    }
}

#[test]
fn the_sdk_vendors_the_wit_it_implements() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let vendored = std::fs::read_to_string(root.join("plugin-sdk/wit/plugin.wit")).unwrap();
    let released = std::fs::read_to_string(root.join("wit/v0.2.0/plugin.wit")).unwrap();
    assert!(
        vendored == released,
        "plugin-sdk/wit/plugin.wit differs from wit/v0.2.0/plugin.wit: copy the released WIT \
         into the SDK"
    );
    assert!(released.contains("package evhost:plugin@0.2.0;"));
    let old = std::fs::read_to_string(root.join("wit/v0.1.0/plugin.wit")).unwrap();
    let frozen = std::fs::read_to_string(root.join("plugins/v0-1-sdk/wit/plugin.wit")).unwrap();
    assert!(old == frozen && old.contains("package evhost:plugin@0.1.0;"));
}

/// Asserts an API reply is the refusal `status` whose message holds every one of `parts`;
/// returns the message.
fn refused(s: u16, v: &Value, status: u16, parts: &[&str]) -> String {
    assert_eq!(s, status, "{v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for part in parts {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }
    msg
}

async fn state(h: &Host, plugin: &str, key: &str) -> Value {
    let (s, v) = get(&format!(
        "{}/v1/projections/{plugin}/state?key={key}",
        h.url
    ))
    .await;
    assert_eq!(s, 200, "{v}");
    v["value"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_of_both_contract_versions_run_side_by_side_in_one_host() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    for (name, file, kind) in [
        ("counter-new", "type-counter", "projection"),
        ("counter-old", "v0_1_type_counter", "projection"),
        ("tagger-old", "v0_1_tagger", "extractor"),
        ("v0-1-shout", "v0_1_shout", "tool"),
    ] {
        let m = match kind {
            "extractor" => format!(
                "name = \"{name}\"\nversion = \"1\"\nkind = \"extractor\"\nsubscriptions = [\"note.added\"]\n"
            ),
            _ => manifest(name, kind),
        };
        let (s, body) = upload(&h, name, &m, wasm(file)).await;
        assert_eq!(s, 200, "{name}: {body}");
    }
    let mut events = Vec::new();
    for i in 0..30 {
        let (ty, payload) = match i % 3 {
            0 => ("a.x", json!({"i": i})),
            1 => ("b.y", json!({"i": i})),
            _ => ("note.added", json!({"text": format!("Idea number {i}")})),
        };
        events.push(json!({"type": ty, "payload": payload, "metadata": {"correlation_id": format!("c{i}")}}));
    }
    append(&h, "mixed", json!(events)).await;
    let shout = json!([{"type": "tool.invocation.requested",
        "payload": {"invocation_id": "s1", "tool": "v0-1-shout", "input": {"text": "hello"}}}]);
    append(&h, "calls", shout).await;

    // The extractor derives 10 note.tagged events and the tool one outcome; both counters
    // see them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        let found = all_events(&h)
            .await
            .into_iter()
            .find(|e| e["type"] == "tool.invocation.completed");
        if let Some(e) = found {
            break e;
        }
        assert!(Instant::now() < deadline, "the 0.1.0 tool did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        outcome["payload"]["output"],
        json!({"text": "HELLO"}),
        "{outcome}"
    );
    let tagged: Vec<Value> = loop {
        let t: Vec<Value> = all_events(&h)
            .await
            .into_iter()
            .filter(|e| e["type"] == "note.tagged")
            .collect();
        if t.len() == 10 {
            break t;
        }
        assert!(Instant::now() < deadline, "{} of 10 notes tagged", t.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        tagged.iter().all(|e| e["payload"]["tag"] == "idea"),
        "{tagged:?}"
    );

    let new = caught_up(&h, "counter-new").await;
    let old = caught_up(&h, "counter-old").await;
    assert_eq!(new["wit"], "0.2.0", "{new}");
    assert_eq!(old["wit"], "0.1.0", "{old}");
    for (key, want) in [
        ("a.x", 10),
        ("b.y", 10),
        ("note.added", 10),
        ("note.tagged", 10),
    ] {
        assert_eq!(
            state(&h, "counter-new", key).await,
            json!(want),
            "0.2.0 {key}"
        );
        assert_eq!(
            state(&h, "counter-old", key).await,
            json!(want),
            "0.1.0 {key}"
        );
    }
    let (_, shout) = get(&format!("{}/v1/plugins/v0-1-shout", h.url)).await;
    assert_eq!(shout["wit"], "0.1.0", "{shout}");
}

const PROBE: &str = "name = \"probe\"\nversion = \"1\"\nkind = \"projection\"\n\
    subscriptions = [\"probe.>\"]\n";

const CONFIGURED: &str = "[config]\ngreeting = \"hello\"\nregion = { value = \"eu\" }\n\
    api_key = { secret = true }\n";

const SECRET: &str = "s3cr3t-v4lue-never-shown";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_reaches_the_plugin_and_secrets_stay_out_of_sight() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--plugin-precedence", "uploaded"]).await;
    let m = format!("{PROBE}{CONFIGURED}");
    let probe = wasm("sandbox_probe");

    let (s, v) = upload(&h, "probe", &m, probe.clone()).await;
    refused(
        s,
        &v,
        400,
        &[
            "\"api_key\" is secret and has no value",
            "--config api_key=",
        ],
    );
    let (s, v) = upload_with(
        &h,
        "probe",
        &m,
        probe.clone(),
        json!({"api_key": "x", "regoin": "us"}),
        &[],
    )
    .await;
    refused(
        s,
        &v,
        400,
        &["\"regoin\" is not declared", "api_key, greeting, region"],
    );

    let (s, v) = upload_with(
        &h,
        "probe",
        &m,
        probe.clone(),
        json!({"api_key": SECRET, "region": "us"}),
        &[],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["config"],
        json!({"api_key": "(secret)", "greeting": "hello", "region": "us"}),
        "{v}"
    );
    append(&h, "p", json!([{"type": "probe.config", "payload": {}}])).await;
    caught_up(&h, "probe").await;
    let seen = state(&h, "probe", "probe").await;
    assert_eq!(
        seen["config.api_key"], SECRET,
        "the plugin reads the secret: {seen}"
    );
    assert_eq!(seen["config.greeting"], "hello");
    assert_eq!(
        seen["config.region"], "us",
        "the load's override wins: {seen}"
    );
    for url in ["/v1/plugins", "/v1/plugins/probe"] {
        let (_, v) = get(&format!("{}{url}", h.url)).await;
        assert!(
            !v.to_string().contains(SECRET),
            "{url} shows the secret: {v}"
        );
    }
    let (ok, out, err) = h.cli(&["plugin", "list", "--json"]);
    assert!(ok, "{err}");
    assert!(!out.contains(SECRET) && out.contains("(secret)"), "{out}");

    // The upload's options are kept, readable by the host's user only, and load again.
    let kept = dir.path().join("plugins/probe.load.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", kept.display());
    drop(h);
    let h = Host::start(BIN, dir.path(), &["--plugin-precedence", "uploaded"]).await;
    let (_, v) = get(&format!("{}/v1/plugins/probe", h.url)).await;
    assert_eq!(v["config"]["region"], "us", "{v}");
    append(&h, "p", json!([{"type": "probe.config", "payload": {}}])).await;
    caught_up(&h, "probe").await;
    assert_eq!(state(&h, "probe", "probe").await["config.api_key"], SECRET);

    // The CLI loads with --config too, a secret read from a file (KEY=@FILE).
    let file = dir.path().join("probe.toml");
    std::fs::write(&file, &m).unwrap();
    std::fs::write(dir.path().join("probe.wasm"), &probe).unwrap();
    let secret_file = dir.path().join("api_key.txt");
    std::fs::write(&secret_file, format!("{SECRET}-from-a-file\n")).unwrap();
    let (ok, out, err) = h.cli(&[
        "plugin",
        "load",
        file.to_str().unwrap(),
        "--config",
        &format!("api_key=@{}", secret_file.display()),
        "--config",
        "greeting=hi",
    ]);
    assert!(ok, "{err}");
    assert!(!out.contains(SECRET), "{out}");
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["config"]["greeting"], "hi", "{reply}");
    append(&h, "p", json!([{"type": "probe.config", "payload": {}}])).await;
    caught_up(&h, "probe").await;
    assert_eq!(
        state(&h, "probe", "probe").await["config.api_key"],
        format!("{SECRET}-from-a-file"),
        "the file's value, without its newline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capability_takes_effect_only_when_asked_for_and_granted() {
    let dir = tempfile::tempdir().unwrap();
    // The host grants every plugin the clock, and http-get one loopback host.
    let h = Host::start(
        BIN,
        dir.path(),
        &[
            "--grant",
            "clock",
            "--grant",
            "http-get=http:127.0.0.1:8931",
        ],
    )
    .await;
    let asks = |caps: &str| format!("{PROBE}[capabilities]\n{caps}");

    // Random is asked for and not granted: refused, naming it.
    let (s, v) = upload(
        &h,
        "probe",
        &asks("clock = true\nrandom = true\n"),
        wasm("sandbox_probe"),
    )
    .await;
    refused(
        s,
        &v,
        403,
        &["asks for random, which the operator has not granted"],
    );
    assert_eq!(v["error"]["code"], "refused_by_policy");
    // Granted with the load: it runs, with a clock and randomness.
    let (s, v) = upload_granted(
        &h,
        "probe",
        &asks("clock = true\nrandom = true\n"),
        wasm("sandbox_probe"),
        &["random"],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    append(
        &h,
        "p",
        json!([{"type": "probe.clock", "payload": {}}, {"type": "probe.random", "payload": {}}]),
    )
    .await;
    caught_up(&h, "probe").await;
    let seen = state(&h, "probe", "probe").await;
    assert_ne!(
        seen["clock"], "0",
        "the clock is asked for and granted: {seen}"
    );
    let random = seen["random"].clone();

    // Granted but not asked for: no effect (the clock reads the epoch, the seed is fixed).
    let (s, v) = upload(
        &h,
        "bare",
        &asks("").replace("\"probe\"", "\"bare\""),
        wasm("sandbox_probe"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    append(
        &h,
        "p",
        json!([{"type": "probe.clock", "payload": {}}, {"type": "probe.random", "payload": {}}]),
    )
    .await;
    caught_up(&h, "bare").await;
    let bare = state(&h, "bare", "probe").await;
    assert_eq!(bare["clock"], "0", "granted but not asked for: {bare}");
    assert_ne!(bare["random"], random);

    // HTTP: a host the manifest asks for but nobody granted is refused, naming it; the one
    // the host grants http-get loads.
    let http_get = |hosts: &str| {
        format!(
            "name = \"http-get\"\nversion = \"1\"\nkind = \"tool\"\n[capabilities]\nhttp = [{hosts}]\n"
        )
    };
    let (s, v) = upload(
        &h,
        "http-get",
        &http_get("\"127.0.0.1:8931\", \"127.0.0.1:6379\""),
        wasm("http-get"),
    )
    .await;
    let msg = refused(s, &v, 403, &["asks for http:127.0.0.1:6379,"]);
    assert!(
        !msg.contains("http:127.0.0.1:8931,"),
        "a granted host is not named: {msg}"
    );
    let (s, v) = upload(
        &h,
        "http-get",
        &http_get("\"127.0.0.1:8931\""),
        wasm("http-get"),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // A grant to http-get is not another plugin's.
    let (s, v) = upload(
        &h,
        "fetcher",
        &http_get("\"127.0.0.1:8931\"").replace("\"http-get\"", "\"fetcher\""),
        wasm("http-get"),
    )
    .await;
    refused(s, &v, 403, &["fetcher@1 asks for http:127.0.0.1:8931"]);
    // A bad grant is refused with the forms it may take.
    let (s, v) = upload_granted(
        &h,
        "fetcher",
        &http_get("\"127.0.0.1:8931\"").replace("\"http-get\"", "\"fetcher\""),
        wasm("http-get"),
        &["files"],
    )
    .await;
    refused(s, &v, 400, &["http:HOST:PORT, clock or random"]);
    drop(h);

    // An operator can take grants from the host's configuration alone.
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(
        BIN,
        dir.path(),
        &["--no-load-grants", "--grant", "probe=clock"],
    )
    .await;
    let (s, v) = upload_granted(
        &h,
        "probe",
        &asks("clock = true\nrandom = true\n"),
        wasm("sandbox_probe"),
        &["random"],
    )
    .await;
    refused(s, &v, 403, &["--no-load-grants"]);
    let (s, v) = upload(&h, "probe", &asks("clock = true\n"), wasm("sandbox_probe")).await;
    assert_eq!(s, 200, "the host's own grant still holds: {v}");
}
