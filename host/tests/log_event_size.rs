//! The log's own per-event size check, for appends that do not come through the HTTP API
//! (plugins' derived events, the host's announcements): the whole event counts, not only
//! the payload. Real sled on a temporary directory.

use evhost::{
    AppendError, EventLog, EventType, ExpectedVersion, Hub, Metadata, NewEvent, Payload, SledLog,
    SledLogConfig, StreamAppend,
};

fn append(e: NewEvent) -> Vec<StreamAppend> {
    vec![StreamAppend {
        stream: "s".into(),
        expected: ExpectedVersion::Any,
        events: vec![e],
    }]
}

fn small() -> NewEvent {
    NewEvent::new(
        EventType::new("size.test").unwrap(),
        Payload::from_json("{}").unwrap(),
    )
}

#[tokio::test]
async fn metadata_source_and_id_count_toward_the_log_event_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SledLogConfig::new(dir.path());
    config.max_event_bytes = 1000;
    let log = SledLog::open(config, Hub::new(100)).expect("open log");
    let big_metadata = small().with_metadata(Metadata::from_pairs([(
        "note".to_owned(),
        "m".repeat(2000),
    )]));
    let big_source = small().with_source("s".repeat(2000));
    let together = NewEvent::new(
        EventType::new("size.test").unwrap(),
        Payload::from_json(&format!("\"{}\"", "p".repeat(500))).unwrap(),
    )
    .with_source("s".repeat(300))
    .with_id("i".repeat(100))
    .with_metadata(Metadata::from_pairs([(
        "correlation_id".to_owned(),
        "c".repeat(100),
    )]));
    for (what, e) in [
        ("metadata", big_metadata),
        ("source", big_source),
        ("all together", together),
    ] {
        match log.append(append(e)).await {
            Err(AppendError::Invalid(m)) => assert!(m.contains("1000"), "{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(log.head(), 0);
    log.append(append(small().with_source("ok"))).await.unwrap();
    assert_eq!(log.head(), 1);
}
