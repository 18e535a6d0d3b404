//! Fuzzing the parsers that take untrusted input: append bodies (JSON), event-type
//! patterns and plugin manifests (TOML). Inputs are arbitrary bytes and mutations of valid
//! seeds (bytes flipped, inserted, deleted, interesting tokens spliced in, truncation). A
//! parser must never panic; what it accepts must hold its invariants (and round-trip).
//!
//! `EVHOST_FUZZ_CASES` sets executions per target: 5,000 by default so the test run stays
//! quick; RELIABILITY.md records the 1,000,000-execution runs:
//!
//! ```text
//! EVHOST_FUZZ_CASES=1000000 cargo test --release -p evhost --test fuzz -- --nocapture
//! ```
//!
//! Why proptest and not cargo-fuzz: libFuzzer needs a nightly toolchain and its sanitizer
//! runtime; the project pins stable 1.95, and these targets run in every CI run this way.

use evhost::api::{ApiConfig, parse_multi_append, parse_stream_append};
use evhost::plugin::Manifest;
use evhost::{EventType, Pattern};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u32 {
    std::env::var("EVHOST_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(5_000)
}

/// Tokens that tend to reach interesting parser states.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "\\",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "1e999",
    "-0",
    "99999999999999999999",
    ">",
    "*",
    ".",
    "..",
    " ",
    "\n",
    "=",
    "#",
    "'''",
    "\u{feff}",
    "é",
    "\u{10ffff}",
    "\"type\"",
    "\"payload\"",
    "\"events\"",
    "\"metadata\"",
    "\"id\"",
    "[limits]",
    "[on_failure]",
    "[capabilities]",
    "memory_mb = ",
    "kind = \"tool\"",
];

/// A mutation applied to a seed.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Token(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Edit::Token(p, t)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(seed: &str, edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.as_bytes().to_vec();
    for e in edits {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
        match *e {
            Edit::Flip(p, x) if !b.is_empty() => {
                let i = p % b.len();
                b[i] ^= x;
            }
            Edit::Insert(p, x) => b.insert(at(p, b.len()), x),
            Edit::Delete(p) if !b.is_empty() => {
                let i = p % b.len();
                b.remove(i);
            }
            Edit::Token(p, t) => {
                let i = at(p, b.len());
                let tok = TOKENS[t % TOKENS.len()].as_bytes();
                b.splice(i..i, tok.iter().copied());
            }
            Edit::Truncate(p) => b.truncate(at(p, b.len())),
            _ => {}
        }
    }
    b
}

/// Arbitrary bytes, or one of `seeds` mutated.
fn input(seeds: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..256),
        1 => ".{0,64}".prop_map(String::into_bytes),
        6 => (0..seeds.len(), proptest::collection::vec(edit(), 1..6))
            .prop_map(move |(s, edits)| apply(seeds[s], &edits)),
    ]
}

fn run(name: &str, strategy: impl Strategy<Value = Vec<u8>>, check: impl Fn(&[u8])) {
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let started = std::time::Instant::now();
    runner
        .run(&strategy, |bytes| {
            check(&bytes);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "fuzz {name}: {n} executions, no failure, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

const APPEND_SEEDS: &[&str] = &[
    r#"{"events":[{"type":"user.created","payload":{"name":"ada"}}]}"#,
    r#"{"expected_version":3,"events":[{"type":"a.b","payload":[1,2,{"x":null}],"id":"k1","source":"s","metadata":{"correlation_id":"c","causation_id":"d","extra":"e"}}]}"#,
    r#"{"expected_version":"no_stream","events":[{"type":"a","payload":"x"},{"type":"b.c-d_e","payload":1.5e3}]}"#,
    r#"{"events":[{"stream":"s","type":"a.b","payload":{}},{"stream":"t","expected_version":"any","type":"c","payload":true}]}"#,
];

/// Nesting of arrays and objects: 0 for a scalar, 1 for `[]`.
fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[test]
fn fuzz_append_bodies() {
    let cfg = ApiConfig {
        max_event_bytes: 512,
        max_batch_events: 8,
        ..ApiConfig::default()
    };
    run("append JSON", input(APPEND_SEEDS), |bytes| {
        let appends: Vec<_> = match (
            parse_stream_append(&cfg, "s", bytes),
            parse_multi_append(&cfg, bytes),
        ) {
            (Ok(a), Ok(m)) => std::iter::once(a).chain(m).collect(),
            (Ok(a), Err(_)) => vec![a],
            (Err(_), Ok(m)) => m,
            (Err(e), Err(f)) => {
                assert!(e.status().is_client_error() && f.status().is_client_error());
                return;
            }
        };
        let total: usize = appends.iter().map(|a| a.events.len()).sum();
        assert!(total >= 1);
        for a in appends {
            assert!(!a.stream.is_empty());
            for e in a.events {
                assert!(EventType::new(e.event_type.as_str()).is_ok());
                assert!(e.text_len() <= cfg.max_event_bytes);
                let value = serde_json::from_str::<serde_json::Value>(e.payload.as_str())
                    .expect("an accepted payload is JSON");
                // Within the depth limit, so the envelopes it travels in are readable too.
                assert!(depth(&value) <= evhost::event::MAX_PAYLOAD_DEPTH);
            }
        }
    });
}

const PATTERN_SEEDS: &[&str] = &[
    "user.created",
    "user.*",
    "user.>",
    ">",
    "*",
    "*.*.done",
    "a.*.c.>",
    "tool.invocation.requested",
];

#[test]
fn fuzz_patterns() {
    run("pattern", input(PATTERN_SEEDS), |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        let Ok(p) = Pattern::new(text) else { return };
        let again = Pattern::new(p.as_str()).expect("an accepted pattern parses again");
        assert_eq!(again.as_str(), p.as_str());
        if p.is_literal() {
            assert!(p.matches(text), "a literal pattern matches itself");
        }
        // Matching any type must not panic, valid or not.
        for t in ["user.created", "a", "a.b.c.d", text, ""] {
            let _ = p.matches(t);
        }
    });
}

const MANIFEST_SEEDS: &[&str] = &[
    "name = \"stats\"\nversion = \"0.1.0\"\nkind = \"projection\"\nsubscriptions = [\"assistant.>\"]\nstart = \"now\"\n[limits]\nmemory_mb = 32\nbatch_size = 100\n",
    "name = \"x\"\nversion = \"1\"\nkind = \"extractor\"\nsubscriptions = [\"a.*\", \"b\"]\n[limits]\nfuel_per_event = 1000\n[on_failure]\nretries = 2\nbackoff_ms = 10\nmax_backoff_ms = 100\nquarantine_after = 3\n",
    "name = \"http-get\"\nversion = \"1\"\nkind = \"tool\"\n[limits]\nconcurrency = 8\nbatch_timeout_ms = 400\n[capabilities]\nhttp = [\"127.0.0.1:8080\"]\nclock = true\nrandom = true\n",
];

#[test]
fn fuzz_manifests() {
    run("manifest TOML", input(MANIFEST_SEEDS), |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        let Ok(m) = Manifest::parse(text) else { return };
        assert!(evhost::plugin::valid_name(&m.name));
        assert!((1..=4096).contains(&m.limits.memory_mb));
        assert!((1..=10_000).contains(&m.limits.batch_size));
        assert!(m.on_failure.backoff_ms <= m.on_failure.max_backoff_ms);
        let again = Manifest::parse(&toml::to_string(&m).expect("a manifest serializes"))
            .expect("an accepted manifest round-trips");
        assert_eq!(again, m);
    });
}
