//! Poison outputs end to end, on the real binary with the real `.wasm` plugins: an input
//! whose outcome, error or derived output the log would refuse (too large, too many events
//! for one append) costs only itself. It gets a bounded `failed` outcome or a dead letter,
//! and the runner goes on to the next input, before and after a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use evhost_tests::{Host, all_events, append, get, upload};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");
const BUILD: &str = env!("EVHOST_TEST_PLUGIN_BUILD");

/// Bytes any text the host builds may have (`limits::MAX_MESSAGE_BYTES`).
const MESSAGE_BYTES: usize = 4096;

fn request(invocation: &str, tool: &str, input: Value) -> Value {
    json!({"type": "tool.invocation.requested",
           "payload": {"invocation_id": invocation, "tool": tool, "input": input}})
}

/// Waits (up to 60 s) until the invocation has an outcome; returns it.
async fn outcome(h: &Host, invocation: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, page) = get(&format!(
            "{}/v1/events?type=tool.invocation.*&limit=10000",
            h.url
        ))
        .await;
        assert_eq!(s, 200, "{page}");
        let found = page["events"].as_array().unwrap().iter().find(|e| {
            e["type"] != "tool.invocation.started"
                && e["type"] != "tool.invocation.requested"
                && e["payload"]["invocation_id"] == invocation
        });
        if let Some(e) = found {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "invocation {:.80} has no outcome after 60 s",
            invocation
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn size(v: &Value) -> usize {
    v.to_string().len()
}

/// The schema error for this input quotes the input, escaped twice: 1.8 MB, more than the
/// log takes. The outcome is a bounded `failed`, and math answers the next request, also
/// after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_input_whose_schema_error_is_huge_gets_a_bounded_failure_and_the_tool_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
    let poison = "\"".repeat(450_000);
    append(
        &h,
        "tools",
        json!([request("poison", "math", json!({"expression": poison}))]),
    )
    .await;
    append(
        &h,
        "tools",
        json!([request("after", "math", json!({"expression": "2+3"}))]),
    )
    .await;
    let failed = outcome(&h, "poison").await;
    assert_eq!(failed["type"], "tool.invocation.failed", "{:.2000}", failed);
    assert_eq!(failed["payload"]["error"]["code"], "invalid_input");
    let message = failed["payload"]["error"]["message"].as_str().unwrap();
    assert!(message.len() <= MESSAGE_BYTES, "{} bytes", message.len());
    assert!(message.contains("truncated"), "{message:.300}");
    assert!(size(&failed["payload"]) < 4 * MESSAGE_BYTES);
    let done = outcome(&h, "after").await;
    assert_eq!(done["type"], "tool.invocation.completed", "{done}");
    assert_eq!(done["payload"]["output"]["value"], 5);

    h.kill9();
    let h = Host::start(BIN, dir.path(), &["--plugins", PLUGINS]).await;
    append(
        &h,
        "tools",
        json!([request("restarted", "math", json!({"expression": "6*7"}))]),
    )
    .await;
    let done = outcome(&h, "restarted").await;
    assert_eq!(done["payload"]["output"]["value"], 42, "{done}");
    let outcomes = all_events(&h)
        .await
        .into_iter()
        .filter(|e| {
            e["payload"]["invocation_id"] == "poison" && e["type"] != "tool.invocation.requested"
        })
        .count();
    assert_eq!(outcomes, 1, "one outcome for the poison request");
}

/// A request naming a 600 KB tool: the unknown-tools runner answers it with a bounded
/// `failed` (the name is echoed twice, which would be 1.2 MB), then answers the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_a_huge_tool_is_answered_bounded_and_the_next_one_too() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let name = "t".repeat(600_000);
    append(&h, "tools", json!([request("huge-name", &name, json!({}))])).await;
    append(
        &h,
        "tools",
        json!([request("small-name", "nope", json!({}))]),
    )
    .await;
    let failed = outcome(&h, "huge-name").await;
    assert_eq!(failed["type"], "tool.invocation.failed");
    assert_eq!(failed["payload"]["error"]["code"], "unknown_tool");
    assert!(
        size(&failed["payload"]) < 4 * MESSAGE_BYTES,
        "{} bytes",
        size(&failed)
    );
    let next = outcome(&h, "small-name").await;
    assert_eq!(next["payload"]["error"]["code"], "unknown_tool", "{next}");
    assert!(
        next["payload"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"nope\"")
    );
}

/// A 300-event backlog for entity-extractor (batch size 8192) under `--max-batch-events
/// 100`: one batch derives 300 events, which the runner appends in pieces the log takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractor_deriving_more_than_one_append_holds_derives_everything() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &["--max-batch-events", "100"]).await;
    for chunk in 0..3 {
        let events: Vec<Value> = (0..100)
            .map(|i| {
                json!({"type": "memory.created",
                       "payload": {"content": format!("Ada Lovelace met Charles Babbage ({chunk}/{i})")}})
            })
            .collect();
        append(&h, "memories", json!(events)).await;
    }
    let manifest =
        std::fs::read_to_string(Path::new(PLUGINS).join("entity-extractor.toml")).unwrap();
    let wasm = std::fs::read(Path::new(PLUGINS).join("entity-extractor.wasm")).unwrap();
    let (s, body) = upload(&h, "entity-extractor", &manifest, wasm).await;
    assert_eq!(s, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, page) = get(&format!(
            "{}/v1/events?type=memory.entity.extracted&limit=10000",
            h.url
        ))
        .await;
        assert_eq!(s, 200, "{page}");
        let n = page["events"].as_array().unwrap().len();
        if n == 300 {
            break;
        }
        assert!(n < 300, "{n} extracted");
        let (_, info) = get(&format!("{}/v1/plugins/entity-extractor", h.url)).await;
        assert!(
            Instant::now() < deadline,
            "{n} of 300 extracted after 60 s: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, info) = get(&format!("{}/v1/plugins/entity-extractor", h.url)).await;
    assert_eq!(info["dead_letters"], 0, "{info}");
    assert_eq!(info["derived"], 300, "{info}");
}

/// An extractor failing with a 2 MiB error message: the dead letter, its announcement and
/// the status carry a bounded text, and the plugin handles the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractor_error_of_two_mib_is_dead_lettered_bounded_and_the_plugin_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let h = Host::start(BIN, dir.path(), &[]).await;
    let manifest = "name = \"hostile\"\nversion = \"1\"\nkind = \"extractor\"\nsubscriptions = [\"hostile.>\"]\n\
         [limits]\nmemory_mb = 64\nbatch_timeout_ms = 2000\nbatch_size = 64\n\
         [on_failure]\nretries = 0\nbackoff_ms = 10\nmax_backoff_ms = 40\nquarantine_after = 0\n";
    let wasm = std::fs::read(Path::new(BUILD).join("hostile.wasm")).unwrap();
    let (s, body) = upload(&h, "hostile", manifest, wasm).await;
    assert_eq!(s, 200, "{body}");
    append(
        &h,
        "h",
        json!([{"type": "hostile.long-error", "payload": {}}]),
    )
    .await;
    append(&h, "h", json!([{"type": "hostile.next", "payload": {}}])).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ok = loop {
        let (_, page) = get(&format!("{}/v1/events?type=hostile.ok&limit=100", h.url)).await;
        if let Some(e) = page["events"].as_array().and_then(|a| a.first()) {
            break e.clone();
        }
        let (_, info) = get(&format!("{}/v1/plugins/hostile", h.url)).await;
        assert!(
            Instant::now() < deadline,
            "the event after the poison was not handled: {:.2000}",
            info
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        ok["payload"].is_u64(),
        "derived from the event after the poison: {ok}"
    );
    let (s, body) = get(&format!("{}/v1/dlq?plugin=hostile", h.url)).await;
    assert_eq!(s, 200);
    let letters = body["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{body:.2000}");
    let error = letters[0]["error"].as_str().unwrap();
    assert!(error.len() <= MESSAGE_BYTES, "{} bytes", error.len());
    assert!(error.contains("truncated"), "{error:.300}");
    let (_, page) = get(&format!(
        "{}/v1/events?type=evhost.plugin.dead_lettered&limit=100",
        h.url
    ))
    .await;
    let announced = page["events"].as_array().unwrap();
    assert_eq!(announced.len(), 1, "{page:.2000}");
    assert!(size(&announced[0]["payload"]) < 2 * MESSAGE_BYTES);
    let (_, info) = get(&format!("{}/v1/plugins/hostile", h.url)).await;
    assert!(info["last_error"].as_str().unwrap().len() <= MESSAGE_BYTES);
}
