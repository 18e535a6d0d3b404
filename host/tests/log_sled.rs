//! The sled event log against real sled on a temporary directory: appends, versions,
//! idempotency, atomicity, reads, and what survives a reopen.

use std::collections::HashSet;
use std::sync::Arc;

use evhost::{
    AppendError, EventLog, EventType, ExpectedVersion, Hub, Metadata, NewEvent, PatternSet,
    Payload, ReadFilter, SledLog, SledLogConfig, StreamAppend,
};

fn open(dir: &std::path::Path) -> SledLog {
    SledLog::open(SledLogConfig::new(dir), Hub::new(100)).expect("open log")
}

fn ev(ty: &str, payload: &str) -> NewEvent {
    NewEvent::new(
        EventType::new(ty).unwrap(),
        Payload::from_json(payload).unwrap(),
    )
}

fn one(stream: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> Vec<StreamAppend> {
    vec![StreamAppend {
        stream: stream.into(),
        expected,
        events,
    }]
}

async fn all(log: &SledLog) -> Vec<evhost::Event> {
    let mut out = Vec::new();
    let mut from = 0;
    while from < log.head() {
        let page = log.read(from, 1000, &ReadFilter::default()).await.unwrap();
        out.extend(page.events);
        from = page.next;
    }
    out
}

#[tokio::test]
async fn appends_get_gap_free_positions_and_stream_versions() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let a = log
        .append(one(
            "s1",
            ExpectedVersion::NoStream,
            vec![ev("a.created", "1"), ev("a.updated", "2")],
        ))
        .await
        .unwrap();
    assert_eq!(a[0].positions, vec![0, 1]);
    assert_eq!(a[0].next_version, 2);
    let b = log
        .append(one("s2", ExpectedVersion::Any, vec![ev("b.created", "{}")]))
        .await
        .unwrap();
    assert_eq!(b[0].positions, vec![2]);
    assert_eq!(b[0].next_version, 1);
    let c = log
        .append(one(
            "s1",
            ExpectedVersion::Exact(2),
            vec![ev("a.updated", "3")],
        ))
        .await
        .unwrap();
    assert_eq!((c[0].positions.clone(), c[0].next_version), (vec![3], 3));
    assert_eq!(log.head(), 4);
    let events = all(&log).await;
    let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![0, 1, 2, 3]);
    let s1: Vec<u64> = log
        .read_stream("s1", 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(s1, vec![0, 1, 2]);
    assert_eq!(log.stream_version("s1").await.unwrap(), 3);
    assert_eq!(log.stream_version("nope").await.unwrap(), 0);
}

#[tokio::test]
async fn version_conflict_reports_current_version_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.append(one("s", ExpectedVersion::Any, vec![ev("a.b", "1")]))
        .await
        .unwrap();
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(0),
        ExpectedVersion::Exact(5),
    ] {
        let err = log
            .append(one("s", expected, vec![ev("a.b", "2")]))
            .await
            .unwrap_err();
        match err {
            AppendError::Conflict {
                current,
                ref stream,
                ..
            } => {
                assert_eq!((current, stream.as_str()), (1, "s"));
            }
            other => panic!("expected a conflict, got {other}"),
        }
    }
    assert_eq!(log.head(), 1);
    assert_eq!(log.stream_version("s").await.unwrap(), 1);
}

#[tokio::test]
async fn a_multi_stream_append_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.append(one("taken", ExpectedVersion::Any, vec![ev("a.b", "1")]))
        .await
        .unwrap();
    let groups = vec![
        StreamAppend {
            stream: "fresh".into(),
            expected: ExpectedVersion::NoStream,
            events: vec![ev("a.b", "1")],
        },
        StreamAppend {
            stream: "taken".into(),
            expected: ExpectedVersion::NoStream,
            events: vec![ev("a.b", "2")],
        },
    ];
    assert!(matches!(
        log.append(groups).await,
        Err(AppendError::Conflict { .. })
    ));
    assert_eq!(log.head(), 1);
    assert_eq!(log.stream_version("fresh").await.unwrap(), 0);
}

#[tokio::test]
async fn an_existing_id_returns_its_original_position_and_is_not_appended_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let first = log
        .append(one(
            "s",
            ExpectedVersion::NoStream,
            vec![ev("a.b", "1").with_id("k1"), ev("a.b", "2").with_id("k2")],
        ))
        .await
        .unwrap();
    // A client retrying the same request after a lost reply: same positions, no conflict.
    let retry = log
        .append(one(
            "s",
            ExpectedVersion::NoStream,
            vec![ev("a.b", "1").with_id("k1"), ev("a.b", "2").with_id("k2")],
        ))
        .await
        .unwrap();
    assert_eq!(retry[0].positions, first[0].positions);
    // Which events the append stored: what a tool worker asks before it runs one.
    assert_eq!(first[0].written, vec![true, true]);
    assert_eq!(retry[0].written, vec![false, false]);
    assert_eq!(log.head(), 2);
    // A repeat inside one append points at the first occurrence; only new ids are written.
    let mixed = log
        .append(one(
            "s",
            ExpectedVersion::Exact(2),
            vec![
                ev("a.b", "3").with_id("k3"),
                ev("a.b", "3").with_id("k3"),
                ev("a.b", "1").with_id("k1"),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(mixed[0].positions, vec![2, 2, 0]);
    assert!(mixed[0].written[0]);
    assert!(!mixed[0].written[2]);
    assert_eq!(mixed[0].next_version, 3);
    assert_eq!(log.head(), 3);
}

/// Waits until the log rules out new ids in memory (its scan of the index at open).
async fn filter_ready(log: &SledLog) {
    for _ in 0..1000 {
        if log.id_filter_ready() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the id filter's scan did not finish within 10 s");
}

#[tokio::test]
async fn ids_stored_before_a_reopen_or_in_a_rebuilt_index_are_still_found_once_the_filter_is_filled()
 {
    let dir = tempfile::tempdir().unwrap();
    let ids = |range: std::ops::Range<usize>| -> Vec<NewEvent> {
        range
            .map(|i| ev("a.b", &i.to_string()).with_id(format!("own-{i}")))
            .collect()
    };
    {
        let log = open(dir.path());
        filter_ready(&log).await;
        // More ids than the filter's first layer holds, in appends of 1,000.
        for b in 0..80 {
            log.append(one(
                "s",
                ExpectedVersion::Any,
                ids(b * 1000..(b + 1) * 1000),
            ))
            .await
            .unwrap();
        }
        assert_eq!(log.find("own-79999").await.unwrap(), Some(79_999));
        assert_eq!(log.find("own-80000").await.unwrap(), None);
    }
    for rebuilt in [false, true] {
        if rebuilt {
            // The index is lost: recovery indexes the ids again, then the scan reads them.
            std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        }
        let log = open(dir.path());
        filter_ready(&log).await;
        for i in [0, 1, 65_535, 65_536, 79_999] {
            assert_eq!(log.find(&format!("own-{i}")).await.unwrap(), Some(i as u64));
        }
        // Retries of stored ids, spread over the whole range: nothing is appended again.
        let retry: Vec<NewEvent> = (0..80_000)
            .step_by(97)
            .map(|i| ev("a.b", "\"again\"").with_id(format!("own-{i}")))
            .collect();
        let n = retry.len();
        let r = log
            .append(one("s", ExpectedVersion::Any, retry))
            .await
            .unwrap();
        assert_eq!(r[0].written, vec![false; n], "rebuilt index: {rebuilt}");
        assert_eq!(r[0].positions[1], 97);
        assert_eq!(log.head(), 80_000);
        // On another stream a stored id is refused, naming where it is.
        let e = log
            .append(one("t", ExpectedVersion::Any, ids(12_345..12_346)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &e,
                AppendError::IdInUse {
                    position: 12_345,
                    ..
                }
            ),
            "{e}"
        );
    }
}

/// A crash can leave sled with a group's chunk entries but not its ids: ids go into sled
/// after the group is acknowledged. Start-up indexes them again from the segments, from the
/// index's ids-indexed record on; this test takes the ids of the last 2,000 events out of
/// the index and moves the record back, as such a crash leaves them.
#[tokio::test]
async fn ids_a_crash_kept_out_of_the_index_are_indexed_again_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        for b in 0..3 {
            let events = (b * 1000..(b + 1) * 1000)
                .map(|i| ev("a.b", &i.to_string()).with_id(format!("own-{i}")))
                .collect();
            log.append(one("s", ExpectedVersion::Any, events))
                .await
                .unwrap();
        }
    }
    {
        let db = sled::open(dir.path().join("index")).unwrap();
        for i in 1000..3000 {
            let key = [&b"I"[..], format!("own-{i}").as_bytes()].concat();
            assert!(db.remove(key).unwrap().is_some(), "own-{i} was indexed");
        }
        db.insert(b"Mids-indexed-through", &1000u64.to_be_bytes()[..])
            .unwrap();
        db.flush().unwrap();
    }
    let log = open(dir.path());
    filter_ready(&log).await;
    for i in [0, 999, 1000, 2345, 2999] {
        assert_eq!(log.find(&format!("own-{i}")).await.unwrap(), Some(i));
    }
    let retry = (0..3000)
        .step_by(7)
        .map(|i| ev("a.b", "\"again\"").with_id(format!("own-{i}")))
        .collect::<Vec<_>>();
    let n = retry.len();
    let r = log
        .append(one("s", ExpectedVersion::Any, retry))
        .await
        .unwrap();
    assert_eq!(r[0].written, vec![false; n]);
    assert_eq!(r[0].positions[300], 2100);
    assert_eq!(log.head(), 3000);
    let e = log
        .append(one(
            "t",
            ExpectedVersion::Any,
            vec![ev("a.b", "1").with_id("own-2500")],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AppendError::IdInUse { position: 2500, .. }),
        "{e}"
    );
}

/// Appenders racing with the same client ids, in groups that follow each other before the
/// earlier ones' ids reach sled: each id is stored once, every appender is told the
/// position it got, and what it is told of is readable by then.
#[tokio::test]
async fn racing_retries_of_the_same_ids_store_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path()));
    let mut tasks = Vec::new();
    for client in 0..8u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut told = Vec::new();
            for round in 0..40u64 {
                // Each client walks the same 8,000 ids in its own order, 200 per append.
                let b = (round * 7 + client * 13) % 40;
                let events = (b * 200..b * 200 + 200)
                    .map(|i| ev("a.b", &i.to_string()).with_id(format!("race-{i}")))
                    .collect();
                let r = log
                    .append(one("s", ExpectedVersion::Any, events))
                    .await
                    .unwrap();
                // What an appender is told of is readable when it is told, retry or not.
                let first = log.find(&format!("race-{}", b * 200)).await.unwrap();
                assert_eq!(first, Some(r[0].positions[0]));
                let page = log
                    .read(r[0].positions[199], 1, &ReadFilter::default())
                    .await
                    .unwrap();
                assert_eq!(
                    page.events.len(),
                    1,
                    "position {} readable",
                    r[0].positions[199]
                );
                told.extend((b * 200..b * 200 + 200).zip(r[0].positions.clone()));
            }
            told
        }));
    }
    let mut at = std::collections::HashMap::new();
    for t in tasks {
        for (i, p) in t.await.unwrap() {
            assert_eq!(*at.entry(i).or_insert(p), p, "race-{i} told two positions");
        }
    }
    assert_eq!(log.head(), 8000, "every id stored once");
    let stored = all(&log).await;
    for e in &stored {
        assert_eq!(at[&e.payload.as_str().parse::<u64>().unwrap()], e.position);
        assert_eq!(e.id.as_str(), format!("race-{}", e.payload.as_str()));
    }
}

#[tokio::test]
async fn bad_appends_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SledLogConfig::new(dir.path());
    config.max_event_bytes = 10;
    config.max_batch_events = 2;
    let log = SledLog::open(config, Hub::new(0)).unwrap();
    let too_big = log
        .append(one(
            "s",
            ExpectedVersion::Any,
            vec![ev("a.b", "\"0123456789\"")],
        ))
        .await;
    assert!(
        matches!(too_big, Err(AppendError::Invalid(ref m)) if m.contains("limit of 10 bytes")),
        "{too_big:?}"
    );
    let too_many = log
        .append(one(
            "s",
            ExpectedVersion::Any,
            vec![ev("a.b", "1"), ev("a.b", "2"), ev("a.b", "3")],
        ))
        .await;
    assert!(matches!(too_many, Err(AppendError::Invalid(_))));
    let empty = log.append(one("s", ExpectedVersion::Any, vec![])).await;
    assert!(matches!(empty, Err(AppendError::Invalid(_))));
    let bad_stream = log
        .append(one("", ExpectedVersion::Any, vec![ev("a.b", "1")]))
        .await;
    assert!(matches!(bad_stream, Err(AppendError::Invalid(_))));
    assert_eq!(log.head(), 0);
}

#[tokio::test]
async fn concurrent_appenders_share_commits_and_get_unique_gap_free_positions() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path()));
    let mut tasks = Vec::new();
    for client in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for i in 0..50u64 {
                let stream = format!("client-{client}");
                let r = log
                    .append(one(
                        &stream,
                        ExpectedVersion::Exact(i),
                        vec![ev("load.tick", &i.to_string())],
                    ))
                    .await
                    .unwrap();
                assert_eq!(r[0].next_version, i + 1);
                positions.push(r[0].positions[0]);
            }
            positions
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        for p in t.await.unwrap() {
            assert!(seen.insert(p), "position {p} given twice");
        }
    }
    assert_eq!(seen.len(), 800);
    assert_eq!(log.head(), 800);
    assert_eq!((0..800).collect::<HashSet<u64>>(), seen);
    for client in 0..16 {
        let events = log
            .read_stream(&format!("client-{client}"), 0, 1000)
            .await
            .unwrap();
        let payloads: Vec<String> = events
            .iter()
            .map(|e| e.payload.as_str().to_owned())
            .collect();
        assert_eq!(
            payloads,
            (0..50).map(|i: u64| i.to_string()).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn reads_filter_by_pattern_stream_and_correlation_and_page_with_next() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let meta = |c: &str| Metadata {
        correlation_id: Some(c.into()),
        ..Metadata::default()
    };
    log.append(vec![
        StreamAppend {
            stream: "m".into(),
            expected: ExpectedVersion::Any,
            events: vec![
                ev("memory.created", "1").with_metadata(meta("c1")),
                ev("memory.entity.extracted", "2").with_metadata(meta("c1")),
                ev("tool.invocation.failed", "3").with_metadata(meta("c2")),
            ],
        },
        StreamAppend {
            stream: "n".into(),
            expected: ExpectedVersion::Any,
            events: vec![ev("memory.created", "4")],
        },
    ])
    .await
    .unwrap();
    let types = |f: ReadFilter| {
        let log = &log;
        async move {
            log.read(0, 100, &f)
                .await
                .unwrap()
                .events
                .into_iter()
                .map(|e| e.position)
                .collect::<Vec<_>>()
        }
    };
    let pat = |p: &str| Some(PatternSet::parse_list(p).unwrap());
    assert_eq!(
        types(ReadFilter {
            types: pat("memory.*"),
            ..Default::default()
        })
        .await,
        vec![0, 3]
    );
    assert_eq!(
        types(ReadFilter {
            types: pat("memory.>"),
            ..Default::default()
        })
        .await,
        vec![0, 1, 3]
    );
    assert_eq!(
        types(ReadFilter {
            types: pat("*.*.failed"),
            ..Default::default()
        })
        .await,
        vec![2]
    );
    assert_eq!(
        types(ReadFilter {
            stream: Some("n".into()),
            ..Default::default()
        })
        .await,
        vec![3]
    );
    assert_eq!(
        types(ReadFilter {
            correlation_id: Some("c1".into()),
            ..Default::default()
        })
        .await,
        vec![0, 1]
    );
    let page = log.read(1, 2, &ReadFilter::default()).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(page.next, 3);
    let past = log.read(10, 5, &ReadFilter::default()).await.unwrap();
    assert!(past.events.is_empty());
}

#[tokio::test]
async fn everything_survives_a_reopen_including_large_events_and_long_batches() {
    let dir = tempfile::tempdir().unwrap();
    let big = format!("\"{}\"", "x".repeat(300 * 1024));
    {
        let log = open(dir.path());
        // A batch spanning many chunks.
        let batch: Vec<NewEvent> = (0..3000)
            .map(|i| ev("bulk.added", &format!("{{\"i\":{i}}}")).with_id(format!("b{i}")))
            .collect();
        log.append(one("bulk", ExpectedVersion::NoStream, batch))
            .await
            .unwrap();
        // Events large enough to leave sled's inline pages.
        for _ in 0..5 {
            log.append(one(
                "big",
                ExpectedVersion::Any,
                vec![ev("big.added", &big)],
            ))
            .await
            .unwrap();
        }
        assert_eq!(log.head(), 3005);
    }
    let log = open(dir.path());
    assert_eq!(log.head(), 3005);
    assert_eq!(log.stream_version("bulk").await.unwrap(), 3000);
    assert_eq!(log.stream_version("big").await.unwrap(), 5);
    let events = all(&log).await;
    assert_eq!(events.len(), 3005);
    assert_eq!(events[2999].payload.as_str(), "{\"i\":2999}");
    assert_eq!(events[3004].payload.as_str(), big);
    let mid = log.read_stream("bulk", 1234, 2).await.unwrap();
    assert_eq!(
        mid.iter()
            .map(|e| (e.version, e.position))
            .collect::<Vec<_>>(),
        vec![(1234, 1234), (1235, 1235)]
    );
    // Versions and ids carry over: the next append continues the stream, a replayed id dedupes.
    let r = log
        .append(one(
            "bulk",
            ExpectedVersion::Exact(3000),
            vec![ev("bulk.added", "1").with_id("b7")],
        ))
        .await
        .unwrap();
    assert_eq!(r[0].positions, vec![7]);
    let r = log
        .append(one(
            "bulk",
            ExpectedVersion::Exact(3000),
            vec![ev("bulk.added", "1")],
        ))
        .await
        .unwrap();
    assert_eq!(
        (r[0].positions.clone(), r[0].next_version),
        (vec![3005], 3001)
    );
}

#[tokio::test]
async fn a_lost_index_is_rebuilt_from_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        log.append(one(
            "s",
            ExpectedVersion::NoStream,
            (0..700)
                .map(|i| ev("a.b", &i.to_string()).with_id(format!("id{i}")))
                .collect(),
        ))
        .await
        .unwrap();
        log.append(one("t", ExpectedVersion::NoStream, vec![ev("c.d", "1")]))
            .await
            .unwrap();
    }
    // Everything sled knew is gone; the segments are the record.
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let log = open(dir.path());
    assert_eq!(log.head(), 701);
    assert_eq!(all(&log).await.len(), 701);
    assert_eq!(log.stream_version("s").await.unwrap(), 700);
    assert_eq!(
        log.read_stream("s", 699, 5).await.unwrap()[0]
            .payload
            .as_str(),
        "699"
    );
    // Client ids were indexed again: a retry is still deduplicated.
    let r = log
        .append(one(
            "s",
            ExpectedVersion::Exact(0),
            vec![ev("a.b", "\"x\"").with_id("id5")],
        ))
        .await
        .unwrap();
    assert_eq!(r[0].positions, vec![5]);
    assert_eq!(log.head(), 701);
}

#[tokio::test]
async fn a_torn_write_at_the_end_of_a_segment_is_truncated_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        log.append(one(
            "s",
            ExpectedVersion::Any,
            vec![ev("a.b", "1"), ev("a.b", "2")],
        ))
        .await
        .unwrap();
    }
    let segment = dir.path().join("events").join("00000000.seg");
    let good_len = std::fs::metadata(&segment).unwrap().len();
    // Half a chunk header plus garbage, as a crash mid-write would leave.
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap()
        .write_all(&[7u8; 37])
        .unwrap();
    let log = open(dir.path());
    assert_eq!(log.head(), 2);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), good_len);
    log.append(one("s", ExpectedVersion::Exact(2), vec![ev("a.b", "3")]))
        .await
        .unwrap();
    drop(log);
    let log = open(dir.path());
    let payloads: Vec<String> = all(&log)
        .await
        .iter()
        .map(|e| e.payload.as_str().to_owned())
        .collect();
    assert_eq!(payloads, vec!["1", "2", "3"]);
}

#[tokio::test]
async fn a_multi_chunk_append_cut_short_by_a_crash_is_dropped_whole() {
    let dir = tempfile::tempdir().unwrap();
    let segment = dir.path().join("events").join("00000000.seg");
    {
        let log = open(dir.path());
        log.append(one("s", ExpectedVersion::NoStream, vec![ev("a.b", "0")]))
            .await
            .unwrap();
    }
    // Closed, the segment holds its data and nothing after it.
    let first_group_end = std::fs::metadata(&segment).unwrap().len();
    {
        let log = open(dir.path());
        // Many chunks in one group.
        let big: Vec<NewEvent> = (0..1000)
            .map(|i| {
                ev(
                    "a.b",
                    &format!("{{\"pad\":\"{}\",\"i\":{i}}}", "x".repeat(200)),
                )
                .with_id(format!("k{i}"))
            })
            .collect();
        log.append(one("s", ExpectedVersion::Exact(1), big))
            .await
            .unwrap();
        std::fs::remove_dir_all(dir.path().join("index")).ok();
    }
    // As if only the first part of the group's write reached the disk before a crash.
    let full = std::fs::metadata(&segment).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    f.set_len(first_group_end + (full - first_group_end) / 2)
        .unwrap();
    drop(f);
    std::fs::remove_dir_all(dir.path().join("index")).ok();
    let log = open(dir.path());
    assert_eq!(log.head(), 1, "no part of the cut group survives");
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), first_group_end);
    // The client's retry (same ids, same expected version) now succeeds exactly once.
    let retry: Vec<NewEvent> = (0..1000)
        .map(|i| ev("a.b", &format!("{{\"i\":{i}}}")).with_id(format!("k{i}")))
        .collect();
    let r = log
        .append(one("s", ExpectedVersion::Exact(1), retry))
        .await
        .unwrap();
    assert_eq!(r[0].next_version, 1001);
    assert_eq!(log.head(), 1001);
}

/// Appends `groups` appends of `per` events with client ids `g<i>-<j>` to stream `s`.
async fn fill(log: &SledLog, groups: usize, per: usize) {
    for g in 0..groups {
        let events = (0..per)
            .map(|j| ev("a.b", &format!("{{\"g\":{g},\"j\":{j}}}")).with_id(format!("g{g}-{j}")))
            .collect();
        log.append(one("s", ExpectedVersion::Any, events))
            .await
            .unwrap();
    }
}

/// XORs one bit of `path` at `at`.
fn flip_bit(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

fn open_err(dir: &std::path::Path) -> evhost::LogError {
    match SledLog::open(SledLogConfig::new(dir), Hub::new(100)) {
        Ok(_) => panic!("the log opened over damaged segments"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_flipped_bit_with_events_after_it_refuses_to_open_and_repair_keeps_every_valid_event() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        fill(&log, 60, 100).await;
    }
    let segment = dir.path().join("events").join("00000000.seg");
    let len = std::fs::metadata(&segment).unwrap().len();
    flip_bit(&segment, len / 2);
    // As if sled's background flush had not reached the disk: the segments are all there is.
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let err = open_err(dir.path()).to_string();
    assert!(
        err.contains("00000000.seg")
            && err.contains("positions ")
            && err.contains("evhost log repair"),
        "{err}"
    );
    // Nothing was cut or deleted by the refused start, and a second start refuses again.
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), len);
    open_err(dir.path());

    let report = evhost::log::repair(dir.path()).unwrap();
    assert_eq!(report.repaired.len(), 1, "{report:?}");
    assert_eq!(report.head, 6000);
    assert!(report.moved[0].starts_with(dir.path().join("damaged")));
    let log = open(dir.path());
    assert_eq!(log.head(), 6000, "every position is kept");
    let events = all(&log).await;
    assert_eq!(events.len(), 6000);
    let damaged: Vec<u64> = events
        .iter()
        .filter(|e| e.event_type.as_str() == evhost::log::DAMAGED_TYPE)
        .map(|e| e.position)
        .collect();
    assert!(
        !damaged.is_empty() && damaged.len() <= 256,
        "{}",
        damaged.len()
    );
    for e in &events {
        if e.event_type.as_str() == "a.b" {
            let v: serde_json::Value = serde_json::from_str(e.payload.as_str()).unwrap();
            assert_eq!(e.id, format!("g{}-{}", v["g"], v["j"]));
            assert_eq!(
                e.position,
                v["g"].as_u64().unwrap() * 100 + v["j"].as_u64().unwrap()
            );
        }
    }
    // Ids after the damage are indexed again: a retry still returns the original position.
    let r = log
        .append(one(
            "s",
            ExpectedVersion::Any,
            vec![ev("a.b", "0").with_id("g59-99")],
        ))
        .await
        .unwrap();
    assert_eq!(r[0].positions, vec![5999]);
    let r = log
        .append(one("s", ExpectedVersion::Any, vec![ev("a.b", "0")]))
        .await
        .unwrap();
    assert_eq!(
        r[0].positions,
        vec![6000],
        "new events never reuse a position"
    );
    drop(log);
    // A second repair finds nothing to do.
    let again = evhost::log::repair(dir.path()).unwrap();
    assert!(
        again.repaired.is_empty() && again.reindex_from.is_none(),
        "{again:?}"
    );
}

#[tokio::test]
async fn damage_in_an_earlier_segment_keeps_the_later_segments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = SledLogConfig::new(dir.path());
        c.segment_bytes = 64 * 1024;
        c
    };
    {
        let log = SledLog::open(cfg(), Hub::new(10)).unwrap();
        fill(&log, 40, 50).await;
    }
    let events_dir = dir.path().join("events");
    let second = events_dir.join("00000001.seg");
    let second_len = std::fs::metadata(&second).unwrap().len();
    assert!(second_len > 0);
    flip_bit(&events_dir.join("00000000.seg"), 1000);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let err = SledLog::open(cfg(), Hub::new(10))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("00000000.seg"), "{err}");
    assert_eq!(
        std::fs::metadata(&second).unwrap().len(),
        second_len,
        "later segment kept"
    );
    evhost::log::repair(dir.path()).unwrap();
    let log = SledLog::open(cfg(), Hub::new(10)).unwrap();
    assert_eq!(log.head(), 2000);
    assert_eq!(all(&log).await.len(), 2000);
}

#[tokio::test]
async fn a_damaged_indexed_chunk_serves_the_events_around_it_and_shows_in_health() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        fill(&log, 30, 100).await;
    }
    let segment = dir.path().join("events").join("00000000.seg");
    let len = std::fs::metadata(&segment).unwrap().len();
    flip_bit(&segment, len / 2);
    // The index is intact: the log opens, and the background check finds the chunk.
    let log = open(dir.path());
    assert_eq!(log.head(), 3000);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while log.health().damaged.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the check never reported the damage"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let health = log.health();
    assert!(health.damaged[0].contains("00000000.seg"), "{health:?}");
    // A read from before the damage gets the events before it, and says where to go on.
    let page = log.read(0, 10_000, &ReadFilter::default()).await.unwrap();
    assert!(!page.events.is_empty() && page.events.len() < 3000);
    assert_eq!(page.next, page.events.len() as u64);
    let bad = page.next;
    let err = log.read(bad, 10, &ReadFilter::default()).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!("positions {bad}..=")),
        "{err}"
    );
    // The events after the damaged chunk are readable too.
    let mut after = bad + 1;
    let page = loop {
        match log.read(after, 10, &ReadFilter::default()).await {
            Ok(p) => break p,
            Err(_) => after += 1,
        }
    };
    assert_eq!(page.events[0].position, after);
    assert!(after - bad <= 256);
    drop(log);
    evhost::log::repair(dir.path()).unwrap();
    let log = open(dir.path());
    assert_eq!(all(&log).await.len(), 3000);
    assert!(log.health().damaged.is_empty());
}

#[tokio::test]
async fn a_segment_cut_short_under_an_intact_index_refuses_to_open_instead_of_filling_zeros() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        fill(&log, 20, 100).await;
    }
    let segment = dir.path().join("events").join("00000000.seg");
    let len = std::fs::metadata(&segment).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = open_err(dir.path()).to_string();
    assert!(err.contains("cut short"), "{err}");
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        len / 2,
        "not extended"
    );
    let report = evhost::log::repair(dir.path()).unwrap();
    // The index knew 2,000 positions were acknowledged: the lost ones get placeholders, so
    // no new event takes an acknowledged position.
    assert_eq!(report.head, 2000, "{report:?}");
    let log = open(dir.path());
    assert_eq!(log.head(), 2000);
    let events = all(&log).await;
    assert_eq!(events.len(), 2000);
    let lost = events
        .iter()
        .filter(|e| e.event_type.as_str() == evhost::log::DAMAGED_TYPE)
        .count();
    assert!(lost > 0 && lost < 2000, "{lost}");
    assert!(
        events[..2000 - lost]
            .iter()
            .all(|e| e.event_type.as_str() == "a.b")
    );
    let r = log
        .append(one("s", ExpectedVersion::Any, vec![ev("a.b", "1")]))
        .await
        .unwrap();
    assert_eq!(r[0].positions, vec![2000]);
}

#[tokio::test]
async fn an_id_already_on_another_stream_is_refused_and_names_that_stream() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.append(one(
        "a",
        ExpectedVersion::Any,
        vec![ev("x.y", "1").with_id("same")],
    ))
    .await
    .unwrap();
    let err = log
        .append(one(
            "b",
            ExpectedVersion::Any,
            vec![ev("x.y", "2").with_id("same")],
        ))
        .await
        .unwrap_err();
    match &err {
        AppendError::IdInUse {
            stream, position, ..
        } => {
            assert_eq!((stream.as_str(), *position), ("a", 0));
        }
        other => panic!("expected IdInUse, got {other:?}"),
    }
    assert_eq!(log.head(), 1, "nothing written");
    // Within one multi-stream append too.
    let err = log
        .append(vec![
            StreamAppend {
                stream: "c".into(),
                expected: ExpectedVersion::Any,
                events: vec![ev("x.y", "3").with_id("fresh")],
            },
            StreamAppend {
                stream: "d".into(),
                expected: ExpectedVersion::Any,
                events: vec![ev("x.y", "4").with_id("fresh")],
            },
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(err, AppendError::IdInUse { ref stream, .. } if stream == "c"),
        "{err:?}"
    );
    // The same stream is a retry: the original position, nothing new.
    let r = log
        .append(one(
            "a",
            ExpectedVersion::Any,
            vec![ev("x.y", "1").with_id("same")],
        ))
        .await
        .unwrap();
    assert_eq!(r[0].positions, vec![0]);
    assert_eq!(log.head(), 1);
}

#[tokio::test]
async fn a_missing_middle_segment_is_refused_without_deleting_the_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut c = SledLogConfig::new(dir.path());
        c.segment_bytes = 64 * 1024;
        c
    };
    {
        let log = SledLog::open(cfg(), Hub::new(10)).unwrap();
        fill(&log, 60, 50).await;
    }
    let events_dir = dir.path().join("events");
    let segs = |d: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let before = segs(&events_dir);
    assert!(before.len() >= 4, "{before:?}");
    std::fs::remove_file(events_dir.join("00000001.seg")).unwrap();
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let err = SledLog::open(cfg(), Hub::new(10))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("00000002.seg"), "{err}");
    assert_eq!(
        segs(&events_dir).len(),
        before.len() - 1,
        "nothing else removed"
    );
    let report = evhost::log::repair(dir.path()).unwrap();
    assert_eq!(report.head, 3000, "{report:?}");
    let log = SledLog::open(cfg(), Hub::new(10)).unwrap();
    assert_eq!(log.head(), 3000);
    let events = all(&log).await;
    let kept = events
        .iter()
        .filter(|e| e.event_type.as_str() == "a.b")
        .count();
    assert!(kept >= 1000 && kept < 3000, "{kept}");
}

#[tokio::test]
async fn a_lost_index_over_many_events_is_rebuilt_in_bounded_batches() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        for b in 0..250u64 {
            let events = (0..1000u64)
                .map(|j| {
                    let e = ev("a.b", &j.to_string());
                    if j == 0 {
                        e.with_id(format!("first-of-{b}"))
                    } else {
                        e
                    }
                })
                .collect();
            log.append(one("s", ExpectedVersion::Any, events))
                .await
                .unwrap();
        }
    }
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let log = open(dir.path());
    assert_eq!(log.head(), 250_000);
    assert_eq!(log.stream_version("s").await.unwrap(), 250_000);
    // Across the boundary between two recovery batches, the stream reads on without a gap.
    let around = log.read_stream("s", 99_998, 5).await.unwrap();
    let versions: Vec<u64> = around.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![99_998, 99_999, 100_000, 100_001, 100_002]);
    for b in [0u64, 99, 100, 249] {
        let r = log
            .append(one(
                "s",
                ExpectedVersion::Any,
                vec![ev("a.b", "0").with_id(format!("first-of-{b}"))],
            ))
            .await
            .unwrap();
        assert_eq!(
            r[0].positions,
            vec![b * 1000],
            "id of batch {b} indexed again"
        );
    }
    assert_eq!(log.head(), 250_000);
}

/// A copy of a log directory taken while the log is open: what a `kill -9` leaves on disk
/// (every acknowledged write is in the files).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_crash_leaves_preallocated_zeros_that_the_next_start_keeps_writing_into() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    fill(&log, 5, 10).await;
    let segment = |d: &std::path::Path| d.join("events").join("00000000.seg");
    copy_dir(dir.path(), crashed.path());
    drop(log);
    let data_len = std::fs::metadata(segment(dir.path())).unwrap().len();
    let crashed_len = std::fs::metadata(segment(crashed.path())).unwrap().len();
    assert!(
        crashed_len > data_len,
        "the open segment is preallocated past its data ({crashed_len} vs {data_len} bytes)"
    );

    let log = open(crashed.path());
    assert_eq!(log.head(), 50);
    assert_eq!(
        std::fs::metadata(segment(crashed.path())).unwrap().len(),
        crashed_len,
        "zeros past the data are kept, not taken for a torn write"
    );
    log.append(one("s", ExpectedVersion::Exact(50), vec![ev("a.b", "51")]))
        .await
        .unwrap();
    assert_eq!(all(&log).await.len(), 51);
    drop(log);
    assert!(std::fs::metadata(segment(crashed.path())).unwrap().len() < crashed_len);
    let log = open(crashed.path());
    assert_eq!(all(&log).await.len(), 51);
}

#[tokio::test]
async fn a_torn_write_into_preallocated_space_is_cut_and_writing_goes_on_after_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    fill(&log, 3, 10).await;
    copy_dir(dir.path(), crashed.path());
    drop(log);
    let data_len = std::fs::metadata(dir.path().join("events").join("00000000.seg"))
        .unwrap()
        .len();
    // Half a chunk written over the zeros past the data, then the crash.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(crashed.path().join("events").join("00000000.seg"))
            .unwrap();
        f.write_all_at(&[7u8; 37], data_len + 4096).unwrap();
    }
    let log = open(crashed.path());
    assert_eq!(log.head(), 30);
    log.append(one("s", ExpectedVersion::Exact(30), vec![ev("a.b", "31")]))
        .await
        .unwrap();
    drop(log);
    let log = open(crashed.path());
    let events = all(&log).await;
    assert_eq!(events.len(), 31);
    assert_eq!(events[30].payload.as_str(), "31");
}

#[tokio::test]
async fn a_next_segment_preallocated_but_never_written_is_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        fill(&log, 2, 10).await;
    }
    let next = dir.path().join("events").join("00000001.seg");
    std::fs::File::create(&next)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let log = open(dir.path());
    assert_eq!(log.head(), 20);
    log.append(one("s", ExpectedVersion::Exact(20), vec![ev("a.b", "21")]))
        .await
        .unwrap();
    assert_eq!(all(&log).await.len(), 21);
}

#[tokio::test]
async fn damage_before_the_last_chunk_of_a_preallocated_segment_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    fill(&log, 1, 10).await;
    let first_end = {
        // The first group's bytes end where the second group's begin.
        let mut copy = tempfile::tempdir().unwrap().keep();
        copy.push("c");
        copy_dir(dir.path(), &copy);
        let f = std::fs::read(copy.join("events").join("00000000.seg")).unwrap();
        f.iter().rposition(|b| *b != 0).unwrap() as u64
    };
    log.append(one("t", ExpectedVersion::Any, vec![ev("a.b", "2")]))
        .await
        .unwrap();
    copy_dir(dir.path(), crashed.path());
    drop(log);
    // The index is lost with the crash, and a bit of the first group is flipped: the second
    // group, acknowledged, is valid after it, followed only by preallocated zeros.
    std::fs::remove_dir_all(crashed.path().join("index")).unwrap();
    let segment = crashed.path().join("events").join("00000000.seg");
    let len = std::fs::metadata(&segment).unwrap().len();
    flip_bit(&segment, first_end / 2);
    let err = open_err(crashed.path()).to_string();
    assert!(err.contains("00000000.seg"), "{err}");
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        len,
        "nothing is cut while damage is reported"
    );
}
