//! Deleting and erasing streams on real sled in a temporary directory: a tombstone refuses
//! appends until a restore, the mark survives a lost index, and an erasure removes a
//! stream's bytes from the segments while every other event keeps its position.

use evhost::{
    AppendError, ERASED_TYPE, EventLog, EventType, ExpectedVersion, Hub, LogError, NewEvent,
    Payload, ReadFilter, STREAM_DELETED_TYPE, STREAM_RESTORED_TYPE, SledLog, SledLogConfig,
    StreamAppend,
};

fn open(dir: &std::path::Path) -> SledLog {
    let mut c = SledLogConfig::new(dir);
    // Small segments, so a stream spans several.
    c.segment_bytes = 64 * 1024;
    SledLog::open(c, Hub::new(100)).expect("open log")
}

fn ev(ty: &str, payload: &str, id: Option<&str>) -> NewEvent {
    let mut e = NewEvent::new(
        EventType::new(ty).unwrap(),
        Payload::from_json(payload).unwrap(),
    );
    e.id = id.map(Into::into);
    e
}

async fn append(
    log: &SledLog,
    stream: &str,
    events: Vec<NewEvent>,
) -> Result<Vec<u64>, AppendError> {
    log.append(vec![StreamAppend {
        stream: stream.into(),
        expected: ExpectedVersion::Any,
        events,
    }])
    .await
    .map(|mut a| a.pop().unwrap().positions)
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

fn segment_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("events"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_deleted_stream_refuses_appends_until_restored_even_after_its_index_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        append(&log, "acct-1", vec![ev("acct.opened", "{}", None)])
            .await
            .unwrap();
        assert!(log.deletion("acct-1").await.unwrap().is_none());
        let t = append(&log, "acct-1", vec![ev(STREAM_DELETED_TYPE, "{}", None)])
            .await
            .unwrap()[0];
        assert_eq!(log.deletion("acct-1").await.unwrap(), Some(t));
        match append(&log, "acct-1", vec![ev("acct.credited", "{}", None)]).await {
            Err(AppendError::StreamDeleted { position, .. }) => assert_eq!(position, t),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Deleting twice is refused the same way (the first deletion stands).
        assert!(matches!(
            append(&log, "acct-1", vec![ev(STREAM_DELETED_TYPE, "{}", None)]).await,
            Err(AppendError::StreamDeleted { .. })
        ));
        assert!(
            matches!(
                append(&log, "other", vec![ev(STREAM_RESTORED_TYPE, "{}", None)]).await,
                Err(AppendError::Invalid(_))
            ),
            "only a deleted stream can be restored"
        );
        // Within one append, nothing after the tombstone.
        assert!(matches!(
            append(
                &log,
                "acct-2",
                vec![ev(STREAM_DELETED_TYPE, "{}", None), ev("x.y", "1", None)]
            )
            .await,
            Err(AppendError::StreamDeleted { .. })
        ));
        assert_eq!(
            log.deletion("acct-2").await.unwrap(),
            None,
            "a refused append changes nothing"
        );
    }
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let log = open(dir.path());
    let t = log
        .deletion("acct-1")
        .await
        .unwrap()
        .expect("rebuilt from the tombstone");
    assert!(
        append(&log, "acct-1", vec![ev("acct.credited", "{}", None)])
            .await
            .is_err()
    );
    let r = append(
        &log,
        "acct-1",
        vec![
            ev(STREAM_RESTORED_TYPE, "{}", None),
            ev("acct.credited", "{}", None),
        ],
    )
    .await
    .unwrap();
    assert!(r[0] > t);
    assert_eq!(log.deletion("acct-1").await.unwrap(), None);
    assert_eq!(log.stream_version("acct-1").await.unwrap(), 4);
}

#[tokio::test]
async fn erasing_removes_a_streams_bytes_and_keeps_every_other_position() {
    let dir = tempfile::tempdir().unwrap();
    let secret = |i: usize| format!("secret-of-alice-{i:05}");
    let mut others = Vec::new();
    {
        let log = open(dir.path());
        // Alice's events interleaved with others', several per chunk, over several segments.
        for i in 0..600 {
            let p = append(
                &log,
                "alice",
                vec![ev(
                    "user.noted",
                    &format!("{{\"note\":\"{}\"}}", secret(i)),
                    Some(&format!("alice-{i}")),
                )],
            )
            .await
            .unwrap();
            assert_eq!(p.len(), 1);
            let q = append(
                &log,
                &format!("bob-{}", i % 7),
                vec![ev(
                    "user.noted",
                    &format!(
                        "{{\"note\":\"public-{i}\",\"pad\":\"{}\"}}",
                        "x".repeat(i % 50)
                    ),
                    None,
                )],
            )
            .await
            .unwrap();
            others.push(q[0]);
        }
        assert!(matches!(
            log.erase("alice").await,
            Err(LogError::NotDeleted(_))
        ));
        let t = append(&log, "alice", vec![ev(STREAM_DELETED_TYPE, "{}", None)])
            .await
            .unwrap()[0];
        let before: Vec<_> = all(&log)
            .await
            .into_iter()
            .filter(|e| e.stream != "alice")
            .collect();
        let erased = log.erase("alice").await.unwrap();
        assert_eq!((erased.events, erased.tombstone), (600, t));
        assert!(erased.segments > 1, "{erased:?}");
        let after = all(&log).await;
        assert!(
            after
                .iter()
                .all(|e| e.stream != "alice" || e.event_type.as_str() == STREAM_DELETED_TYPE)
        );
        assert!(
            after.iter().all(|e| e.event_type.as_str() != ERASED_TYPE),
            "reads skip erased events"
        );
        let kept: Vec<_> = after.into_iter().filter(|e| e.stream != "alice").collect();
        assert_eq!(
            kept, before,
            "every other event, at its position, unchanged"
        );
        assert_eq!(log.find("alice-3").await.unwrap(), None, "the ids are gone");
        assert_eq!(log.stream_version("alice").await.unwrap(), 601);
        let read = log.read_stream("alice", 0, 10).await.unwrap();
        assert_eq!(read.len(), 1, "only the tombstone is left");
        assert_eq!(read[0].position, t);
        // Erasing again finds nothing left.
        assert_eq!(log.erase("alice").await.unwrap().events, 0);
    }
    let raw = segment_bytes(dir.path());
    assert!(
        !contains(&raw, b"secret-of-alice"),
        "no byte of the payloads is left on disk"
    );
    assert!(!contains(&raw, b"alice-1"), "nor of the ids");
    assert!(contains(&raw, b"public-599"));
    // The same after a reopen, and after the index is rebuilt from the segments.
    for lose_index in [false, true] {
        if lose_index {
            std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        }
        let log = open(dir.path());
        let events = all(&log).await;
        let kept: Vec<u64> = events
            .iter()
            .filter(|e| e.stream.starts_with("bob-"))
            .map(|e| e.position)
            .collect();
        assert_eq!(kept, others, "lose_index={lose_index}");
        assert!(
            events
                .iter()
                .all(|e| e.stream != "alice" || e.event_type.as_str() == STREAM_DELETED_TYPE)
        );
        assert!(log.deletion("alice").await.unwrap().is_some());
        assert_eq!(log.stream_version("alice").await.unwrap(), 601);
        // Positions keep counting after the erased ones.
        let p = append(&log, "carol", vec![ev("user.noted", "1", Some("alice-3"))])
            .await
            .unwrap();
        assert_eq!(p[0], log.head() - 1);
        assert_eq!(
            log.find("alice-3").await.unwrap(),
            Some(p[0]),
            "a freed id can be used again"
        );
    }
}

/// A restore (and appends) while a hard delete runs in many rounds: the erasure removes only
/// what was in the stream when it began, every append acknowledged after the restore stays
/// in the stream with versions that follow the tombstone's, and the index agrees with the
/// writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_during_an_erasure_keeps_what_is_appended_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = SledLogConfig::new(dir.path());
    c.segment_bytes = 256 * 1024;
    // One chunk per round: hundreds of rounds, each synced, so the restore lands mid-way.
    c.erase_round_bytes = 1;
    let log = std::sync::Arc::new(SledLog::open(c, Hub::new(100)).unwrap());
    for i in 0..400 {
        append(
            &log,
            "big",
            vec![ev("user.noted", &format!("{{\"n\":{i}}}"), None)],
        )
        .await
        .unwrap();
        append(&log, "other", vec![ev("user.noted", "{}", None)])
            .await
            .unwrap();
    }
    let t = append(&log, "big", vec![ev(STREAM_DELETED_TYPE, "{}", None)])
        .await
        .unwrap()[0];
    let eraser = {
        let log = log.clone();
        tokio::spawn(async move { log.erase("big").await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let restored = append(&log, "big", vec![ev(STREAM_RESTORED_TYPE, "{}", None)])
        .await
        .unwrap()[0];
    let mut after = vec![restored];
    for _ in 0..5 {
        after.push(
            append(&log, "big", vec![ev("user.noted", "\"kept\"", None)])
                .await
                .unwrap()[0],
        );
    }
    let erased = eraser.await.unwrap().unwrap();
    assert_eq!(erased.events, 400);
    let read = log.read_stream("big", 0, 100).await.unwrap();
    let got: Vec<(u64, u64)> = read.iter().map(|e| (e.version, e.position)).collect();
    let mut want = vec![(400, t)];
    want.extend(after.iter().enumerate().map(|(i, p)| (401 + i as u64, *p)));
    assert_eq!(
        got, want,
        "the tombstone, the restore and every append after it"
    );
    assert_eq!(log.stream_version("big").await.unwrap(), 407);
    let p = append(&log, "big", vec![ev("user.noted", "1", None)])
        .await
        .unwrap()[0];
    assert_eq!(log.read_stream("big", 407, 1).await.unwrap()[0].position, p);
}
