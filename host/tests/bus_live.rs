//! The live bus over a real sled log: ordering, catch-up, slow consumers, filters, waits.

use std::sync::Arc;
use std::time::Duration;

use evhost::{
    Bus, EventLog, EventType, ExpectedVersion, Hub, Metadata, NewEvent, PatternSet, Payload,
    ReadFilter, SledLog, SledLogConfig, Start, StreamAppend,
};

struct Fixture {
    _dir: tempfile::TempDir,
    log: Arc<SledLog>,
    bus: Bus,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::new(50);
    let log = Arc::new(SledLog::open(SledLogConfig::new(dir.path()), hub.clone()).unwrap());
    let bus = Bus::new(log.clone() as Arc<dyn EventLog>, hub);
    Fixture {
        _dir: dir,
        log,
        bus,
    }
}

fn ev(ty: &str, i: u64) -> NewEvent {
    NewEvent::new(
        EventType::new(ty).unwrap(),
        Payload::from_json(&i.to_string()).unwrap(),
    )
}

async fn append(log: &SledLog, stream: &str, events: Vec<NewEvent>) {
    log.append(vec![StreamAppend {
        stream: stream.into(),
        expected: ExpectedVersion::Any,
        events,
    }])
    .await
    .unwrap();
}

fn pats(p: &str) -> PatternSet {
    PatternSet::parse_list(p).unwrap()
}

async fn take(sub: &mut evhost::Subscription, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for _ in 0..n {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("event within 10 s")
            .expect("subscription open")
            .expect("no log error");
        out.push(e.position);
    }
    out
}

#[tokio::test]
async fn a_subscriber_from_a_position_gets_history_then_live_events_in_order() {
    let f = fixture();
    append(&f.log, "s", (0..10).map(|i| ev("a.b", i)).collect()).await;
    let mut sub = f
        .bus
        .subscribe(pats(">"), ReadFilter::default(), Start::Position(3));
    assert_eq!(take(&mut sub, 7).await, (3..10).collect::<Vec<_>>());
    append(&f.log, "s", (10..15).map(|i| ev("a.b", i)).collect()).await;
    assert_eq!(take(&mut sub, 5).await, (10..15).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_subscriber_from_the_head_sees_only_new_events() {
    let f = fixture();
    append(&f.log, "s", vec![ev("a.b", 0)]).await;
    let mut sub = f
        .bus
        .subscribe(pats(">"), ReadFilter::default(), Start::Head);
    append(&f.log, "s", vec![ev("a.b", 1)]).await;
    assert_eq!(take(&mut sub, 1).await, vec![1]);
}

#[tokio::test]
async fn a_stalled_subscriber_never_blocks_appends_and_loses_nothing() {
    let f = fixture();
    let mut sub = f
        .bus
        .subscribe(pats("load.*"), ReadFilter::default(), Start::Head);
    // Far more than the live buffer, while the subscriber reads nothing.
    for chunk in 0..40u64 {
        let events = (0..250)
            .map(|i| {
                ev(
                    if i % 5 == 0 { "other.x" } else { "load.tick" },
                    chunk * 250 + i,
                )
            })
            .collect();
        tokio::time::timeout(Duration::from_secs(20), append(&f.log, "s", events))
            .await
            .expect("appends finish while a subscriber is stalled");
    }
    let want: Vec<u64> = (0..10_000).filter(|p| p % 5 != 0).collect();
    assert_eq!(take(&mut sub, want.len()).await, want);
    assert!(
        f.bus.stats().resyncs >= 1,
        "the stalled subscriber was switched to the log"
    );
    // And it is live again afterwards.
    append(&f.log, "s", vec![ev("load.tick", 0)]).await;
    assert_eq!(take(&mut sub, 1).await, vec![10_000]);
}

#[tokio::test]
async fn filters_on_pattern_stream_correlation_and_source_apply_live_and_in_catch_up() {
    let f = fixture();
    let corr = |c: &str| Metadata {
        correlation_id: Some(c.into()),
        ..Metadata::default()
    };
    let filter = ReadFilter {
        stream: Some("s1".into()),
        correlation_id: Some("c1".into()),
        source: Some("svc".into()),
        ..Default::default()
    };
    let mut early = f
        .bus
        .subscribe(pats("tool.*.completed"), filter.clone(), Start::Position(0));
    let mut live = f
        .bus
        .subscribe(pats("tool.*.completed"), filter, Start::Head);
    let mk = |ty: &str, c: &str, src: &str| NewEvent {
        source: src.into(),
        ..ev(ty, 0).with_metadata(corr(c))
    };
    append(
        &f.log,
        "s1",
        vec![
            mk("tool.invocation.completed", "c1", "svc"), // 0: matches
            mk("tool.invocation.completed", "c2", "svc"), // 1: other correlation
            mk("tool.invocation.failed", "c1", "svc"),    // 2: other type
            mk("tool.invocation.completed", "c1", "x"),   // 3: other source
        ],
    )
    .await;
    append(
        &f.log,
        "s2",
        vec![mk("tool.invocation.completed", "c1", "svc")],
    )
    .await; // 4: other stream
    append(&f.log, "s1", vec![mk("tool.x.completed", "c1", "svc")]).await; // 5: matches
    assert_eq!(take(&mut early, 2).await, vec![0, 5]);
    assert_eq!(take(&mut live, 2).await, vec![0, 5]);
}

#[tokio::test]
async fn wait_for_returns_the_next_match_or_none_after_the_timeout() {
    let f = fixture();
    let bus = f.bus.clone();
    let waiter = tokio::spawn(async move {
        bus.wait_for(
            pats("goal.*"),
            ReadFilter::default(),
            Duration::from_secs(10),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    append(
        &f.log,
        "s",
        vec![ev("tick.done", 0), ev("goal.completed", 1)],
    )
    .await;
    let got = waiter.await.unwrap().unwrap().expect("matching event");
    assert_eq!(got.event_type.as_str(), "goal.completed");
    let none = f
        .bus
        .wait_for(
            pats("never.*"),
            ReadFilter::default(),
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    assert!(none.is_none());
}

#[tokio::test]
async fn unsubscribe_ends_the_stream_and_stats_and_history_describe_the_bus() {
    let f = fixture();
    let mut sub = f
        .bus
        .subscribe(pats(">"), ReadFilter::default(), Start::Head);
    assert_eq!(f.bus.stats().subscriptions, 1);
    assert!(f.bus.unsubscribe(sub.id()));
    assert!(!f.bus.unsubscribe(sub.id()));
    assert!(
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .is_none()
    );
    append(
        &f.log,
        "s",
        (0..60)
            .map(|i| ev(if i % 2 == 0 { "a.even" } else { "a.odd" }, i))
            .collect(),
    )
    .await;
    let stats = f.bus.stats();
    assert_eq!(
        (stats.head, stats.published, stats.subscriptions),
        (60, 60, 0)
    );
    assert_eq!(stats.events_by_type["a.even"], 30);
    // History keeps the last 50, newest first, filtered.
    let hist = f.bus.history(
        &ReadFilter {
            types: Some(pats("a.odd")),
            ..Default::default()
        },
        3,
    );
    assert_eq!(
        hist.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![59, 57, 55]
    );
    assert_eq!(f.bus.history(&ReadFilter::default(), 1000).len(), 50);
}

/// A runner waits for batches with a timeout; a timeout that drops `next_batch` in the
/// middle of catching up must lose nothing: every matching event arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_cut_short_by_timeouts_lose_no_event() {
    let f = fixture();
    // More matches than one catch-up page, with non-matching stretches between them, so a
    // batch takes several reads.
    for chunk in 0..150u64 {
        let mut events: Vec<NewEvent> = (0..100).map(|i| ev("noise.made", i)).collect();
        events.extend((0..10).map(|i| ev("signal.sent", chunk * 10 + i)));
        append(&f.log, "s", events).await;
    }
    let signals = ReadFilter {
        types: Some(pats("signal.>")),
        ..ReadFilter::default()
    };
    let mut want = Vec::new();
    let mut from = 0;
    while from < f.log.head() {
        let page = f.log.read(from, 10_000, &signals).await.unwrap();
        want.extend(page.events.iter().map(|e| e.position));
        from = page.next;
    }
    assert_eq!(want.len(), 1500);

    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut cut = 0;
    for round in 0..20 {
        let mut sub = f
            .bus
            .subscribe(pats("signal.>"), ReadFilter::default(), Start::Position(0));
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while got.len() < want.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: got {} of {}",
                got.len(),
                want.len()
            );
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Most waits end in the middle of a read (a read started ahead while the last
            // batch was taken, or one of the batch's own), some after matching events were
            // already taken; the rest are long enough for reading to make progress. A
            // zero wait polls once: it is cut unless the batch is ready at once.
            let wait = match seed % 6 {
                0 | 3 => Duration::from_millis(200),
                1 => Duration::ZERO,
                _ => Duration::from_micros(20 + seed % 40_000),
            };
            // Batches that take several reads, and batches a read started ahead can fill.
            let max = if seed % 4 < 2 { 4096 } else { 200 };
            match tokio::time::timeout(wait, sub.next_batch(max)).await {
                Ok(batch) => got.extend(batch.unwrap().unwrap().0.iter().map(|e| e.position)),
                Err(_) => cut += 1,
            }
        }
        assert_eq!(got, want, "round {round}");
    }
    assert!(cut > 0, "no batch was cut short; the test proves nothing");
}

/// Many live subscribers, each with several patterns that all match: every one gets every
/// matching event once, in order, across appends of mixed types and sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_subscribers_with_overlapping_patterns_get_each_event_once_in_order() {
    let f = fixture();
    let mut subs: Vec<_> = (0..200)
        .map(|i| {
            let patterns = if i % 2 == 0 {
                ">, order.>, order.*, order.placed"
            } else {
                "order.*, *.placed, order.>"
            };
            f.bus
                .subscribe(pats(patterns), ReadFilter::default(), Start::Head)
        })
        .collect();
    let mut want_all = Vec::new();
    let mut want_orders = Vec::new();
    let mut position = 0;
    for round in 0..6u64 {
        let n = [1, 7, 300, 2, 50, 400][round as usize];
        let events: Vec<NewEvent> = (0..n)
            .map(|i| {
                ev(
                    match i % 3 {
                        0 => "order.placed",
                        1 => "order.paid",
                        _ => "other.thing",
                    },
                    i,
                )
            })
            .collect();
        for i in 0..n {
            want_all.push(position);
            if i % 3 != 2 {
                want_orders.push(position);
            }
            position += 1;
        }
        append(&f.log, "s", events).await;
    }
    // Fewer events than one live buffer holds: nobody fell behind.
    assert_eq!(f.bus.stats().resyncs, 0);
    for (i, sub) in subs.iter_mut().enumerate() {
        let want = if i % 2 == 0 { &want_all } else { &want_orders };
        assert_eq!(&take(sub, want.len()).await, want, "subscriber {i}");
    }
    // And nothing more: the next event each gets is a new one.
    append(&f.log, "s", vec![ev("order.placed", 0)]).await;
    for (i, sub) in subs.iter_mut().enumerate() {
        assert_eq!(
            take(sub, 1).await,
            vec![position],
            "subscriber {i} saw an event twice"
        );
    }
}

/// Stalled subscribers with overlapping patterns fall behind, are switched to the log, and
/// resync from it: each still gets every matching event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_subscribers_with_several_patterns_resync_from_the_log() {
    let f = fixture();
    let mut subs: Vec<_> = (0..50)
        .map(|_| {
            f.bus.subscribe(
                pats("load.*, load.tick, >"),
                ReadFilter::default(),
                Start::Head,
            )
        })
        .collect();
    for chunk in 0..20u64 {
        let events = (0..250).map(|i| ev("load.tick", chunk * 250 + i)).collect();
        append(&f.log, "s", events).await;
    }
    assert!(
        f.bus.stats().resyncs >= 50,
        "every stalled subscriber fell behind: {:?}",
        f.bus.stats().resyncs
    );
    let want: Vec<u64> = (0..5000).collect();
    for (i, sub) in subs.iter_mut().enumerate() {
        assert_eq!(take(sub, want.len()).await, want, "subscriber {i}");
    }
    append(&f.log, "s", vec![ev("load.tick", 0)]).await;
    for sub in &mut subs {
        assert_eq!(take(sub, 1).await, vec![5000]);
    }
}

/// A consumer that is slow with each batch while appends go on: the subscription reads its
/// next page during each batch, and hands over from the log to the live channel with such a
/// read in flight; every event arrives once, in order, and the last ones live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_catching_up_while_appends_go_on_gets_each_event_once_in_order() {
    let f = fixture();
    for chunk in 0..20u64 {
        let events = (0..1000)
            .map(|i| ev("load.tick", chunk * 1000 + i))
            .collect();
        append(&f.log, "s", events).await;
    }
    let writer = {
        let log = f.log.clone();
        tokio::spawn(async move {
            for chunk in 0..60u64 {
                let events = (0..100).map(|i| ev("load.tick", chunk * 100 + i)).collect();
                append(&log, "s", events).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let total = 20_000 + 6_000;
    let mut sub = f
        .bus
        .subscribe(pats("load.*"), ReadFilter::default(), Start::Position(0));
    let mut got: Vec<u64> = Vec::new();
    let mut resumes = Vec::new();
    while got.len() < total {
        let (batch, resume) = tokio::time::timeout(Duration::from_secs(10), sub.next_batch(700))
            .await
            .expect("a batch within 10 s")
            .expect("subscription open")
            .expect("no log error");
        assert!(batch.len() <= 700, "a batch of {} events", batch.len());
        got.extend(batch.iter().map(|e| e.position));
        resumes.push(resume);
        // The consumer's work on the batch, while the next page is read.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    writer.await.unwrap();
    assert_eq!(got, (0..total as u64).collect::<Vec<_>>());
    assert!(
        resumes.windows(2).all(|w| w[0] <= w[1]),
        "resume positions go back: {resumes:?}"
    );
    assert_eq!(*resumes.last().unwrap(), total as u64);
}

/// The history keeps the newest events within its byte budget as well as its count.
#[tokio::test]
async fn history_drops_the_oldest_events_past_its_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::with_history_bytes(10_000, 1 << 20);
    let log = Arc::new(SledLog::open(SledLogConfig::new(dir.path()), hub.clone()).unwrap());
    let bus = Bus::new(log.clone() as Arc<dyn EventLog>, hub);
    let big = format!("\"{}\"", "x".repeat(100 << 10));
    for _ in 0..30 {
        let e = NewEvent::new(
            EventType::new("big.one").unwrap(),
            Payload::from_json(&big).unwrap(),
        );
        append(&log, "s", vec![e]).await;
    }
    let kept = bus.history(&ReadFilter::default(), 10_000);
    assert!(
        (8..=10).contains(&kept.len()),
        "1 MiB holds about ten 100 KiB events: {}",
        kept.len()
    );
    // The newest, newest first.
    let positions: Vec<u64> = kept.iter().map(|e| e.position).collect();
    let want: Vec<u64> = (30 - kept.len() as u64..30).rev().collect();
    assert_eq!(positions, want);
    // Small events fill it by count again.
    append(&log, "s", (0..100).map(|i| ev("small.one", i)).collect()).await;
    let kept = bus.history(&ReadFilter::default(), 10_000);
    assert!(kept.len() > 100, "{}", kept.len());
}

/// A subscription catching up over large events reads ahead a bounded number of bytes:
/// a batch of 512 KiB events holds about 16 MiB of them, not a page of 512 or 4096.
#[tokio::test]
async fn catching_up_over_large_events_reads_ahead_a_bounded_number_of_bytes() {
    let f = fixture();
    let big = format!("\"{}\"", "y".repeat(512 << 10));
    for chunk in 0..10 {
        let events = (0..10)
            .map(|_| {
                NewEvent::new(
                    EventType::new("big.one").unwrap(),
                    Payload::from_json(&big).unwrap(),
                )
            })
            .collect();
        let _ = chunk;
        append(&f.log, "s", events).await;
    }
    let mut sub = f
        .bus
        .subscribe(pats(">"), ReadFilter::default(), Start::Position(0));
    let mut got = Vec::new();
    while got.len() < 100 {
        let (batch, _) = tokio::time::timeout(Duration::from_secs(10), sub.next_batch(4096))
            .await
            .expect("a batch within 10 s")
            .unwrap()
            .unwrap();
        assert!(
            batch.len() <= 40,
            "a batch of {} events of 512 KiB was read ahead",
            batch.len()
        );
        got.extend(batch.iter().map(|e| e.position));
    }
    assert_eq!(got, (0..100).collect::<Vec<_>>());
}

/// How long one append of 5,000 events takes with 0, 1,000 and 2,000 live subscribers
/// matching everything (printed, not asserted: `cargo test --release -p evhost --test
/// bus_live -- --ignored --nocapture fan_out`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn fan_out_timing() {
    for subscribers in [0usize, 1000, 2000] {
        let f = fixture();
        let mut took = Vec::new();
        for round in 0..3u64 {
            // Fresh subscribers each round: stalled ones fall behind and leave the router.
            let subs: Vec<_> = (0..subscribers)
                .map(|_| {
                    f.bus
                        .subscribe(pats(">"), ReadFilter::default(), Start::Head)
                })
                .collect();
            let events = (0..5000).map(|i| ev("fan.out", round * 5000 + i)).collect();
            let began = std::time::Instant::now();
            append(&f.log, "s", events).await;
            took.push(began.elapsed());
            drop(subs);
        }
        println!("{subscribers} subscribers: 5,000-event appends took {took:?}");
    }
}

/// Events that leave the history are freed, whether the publisher frees them itself (a few
/// at a time) or hands them to the reaper thread (a large append's worth), and the history
/// keeps the newest either way.
#[tokio::test]
async fn events_leaving_the_history_are_freed() {
    let f = fixture(); // a history of 50 events
    let held = |bus: &Bus| -> Vec<std::sync::Weak<evhost::Event>> {
        bus.history(&ReadFilter::default(), 1000)
            .iter()
            .map(Arc::downgrade)
            .collect()
    };
    append(&f.log, "s", (0..100).map(|i| ev("a.b", i)).collect()).await;
    let first = held(&f.bus);
    assert_eq!(first.len(), 50);
    // One-event appends: each evicts one event, freed by the publisher.
    for i in 0..50 {
        append(&f.log, "s", vec![ev("a.b", 100 + i)]).await;
    }
    assert!(first.iter().all(|w| w.upgrade().is_none()));
    // A large append evicts all 50 at once: the reaper frees them, moments later.
    let second = held(&f.bus);
    append(&f.log, "s", (0..200).map(|i| ev("a.b", 150 + i)).collect()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while second.iter().any(|w| w.upgrade().is_some()) {
        assert!(
            std::time::Instant::now() < deadline,
            "evicted events still alive after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kept: Vec<u64> = f
        .bus
        .history(&ReadFilter::default(), 1000)
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(kept, (300..350).rev().collect::<Vec<u64>>());
}
