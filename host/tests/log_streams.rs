//! Finding streams in the sled log, on real sled in a temporary directory: listing streams
//! by prefix and page, reading a stream backward across its runs, and finding positions by
//! time (with a wall clock that steps back).

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, TimeDelta, Utc};
use evhost::{
    Event, EventLog, EventType, ExpectedVersion, Hub, NewEvent, Payload, ReadFilter, SledLog,
    SledLogConfig, StreamAppend, StreamListQuery,
};

fn open(dir: &std::path::Path) -> SledLog {
    SledLog::open(SledLogConfig::new(dir), Hub::new(100)).expect("open log")
}

fn ev(n: usize) -> NewEvent {
    NewEvent::new(
        EventType::new("test.happened").unwrap(),
        Payload::from_json(&n.to_string()).unwrap(),
    )
}

fn group(stream: &str, n: usize) -> StreamAppend {
    StreamAppend {
        stream: stream.into(),
        expected: ExpectedVersion::Any,
        events: (0..n).map(ev).collect(),
    }
}

/// Appends `n` events to `stream` in one append; returns their positions.
async fn put(log: &SledLog, stream: &str, n: usize) -> Vec<u64> {
    log.append(vec![group(stream, n)]).await.unwrap()[0]
        .positions
        .clone()
}

async fn all(log: &SledLog) -> Vec<Event> {
    let mut out = Vec::new();
    let mut from = 0;
    while from < log.head() {
        let page = log.read(from, 1000, &ReadFilter::default()).await.unwrap();
        out.extend(page.events);
        from = page.next;
    }
    out
}

fn query(prefix: &str, after: Option<&str>, limit: usize) -> StreamListQuery {
    StreamListQuery {
        prefix: prefix.into(),
        after: after.map(Into::into),
        limit,
    }
}

/// Every stream name under `prefix`, page by page of `limit`; checks each page's size.
async fn names(log: &SledLog, prefix: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = log
            .list_streams(&query(prefix, after.as_deref(), limit))
            .await
            .unwrap();
        assert!(
            page.streams.len() <= limit,
            "a page holds at most the limit"
        );
        out.extend(page.streams.iter().map(|s| s.stream.clone()));
        match page.next {
            Some(next) => {
                assert_eq!(page.streams.len(), limit, "only a full page has a next");
                assert_eq!(Some(&next), out.last(), "next is the page's last name");
                after = Some(next);
            }
            None => return out,
        }
    }
}

#[tokio::test]
async fn streams_are_listed_in_name_order_by_prefix_and_page() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    // Names that sort tightly around the prefix: the prefix itself without its dash, one
    // name that is a prefix of another, a longer word sharing the first letters.
    let mut users: Vec<String> = (0..23).map(|i| format!("user-{i:03}")).collect();
    users.extend([
        "user-00".to_owned(),
        "user-".to_owned(),
        "user-é".to_owned(),
    ]);
    let others = ["user", "users-x", "order-1", "a", "zz", "usea"];
    // One stream per append, and some several times, so streams have several runs.
    let every: Vec<String> = users
        .iter()
        .cloned()
        .chain(others.iter().map(|s| (*s).to_owned()))
        .collect();
    for (i, s) in every.iter().enumerate() {
        put(&log, s, 1 + i % 3).await;
    }
    for s in ["user-005", "user", "user-é"] {
        put(&log, s, 2).await;
    }

    let mut expected = users.clone();
    expected.sort();
    assert_eq!(names(&log, "user-", 7).await, expected);
    assert_eq!(names(&log, "user-", 1000).await, expected);

    let mut everything = every.clone();
    everything.sort();
    assert_eq!(names(&log, "", 4).await, everything);

    // `after` starts strictly after a name, which need not exist.
    let page = log
        .list_streams(&query("user-", Some("user-00"), 2))
        .await
        .unwrap();
    let got: Vec<&str> = page.streams.iter().map(|s| s.stream.as_str()).collect();
    assert_eq!(got, ["user-000", "user-001"]);
    assert_eq!(page.next.as_deref(), Some("user-001"));
    let page = log
        .list_streams(&query("", Some("user-0105"), 3))
        .await
        .unwrap();
    let got: Vec<&str> = page.streams.iter().map(|s| s.stream.as_str()).collect();
    assert_eq!(got, ["user-011", "user-012", "user-013"]);
    let page = log.list_streams(&query("", Some("zz"), 3)).await.unwrap();
    assert!(page.streams.is_empty() && page.next.is_none());
    let page = log.list_streams(&query("nope", None, 3)).await.unwrap();
    assert!(page.streams.is_empty() && page.next.is_none());
    // The last page is exactly full: no next, since nothing follows.
    let page = log.list_streams(&query("user-02", None, 3)).await.unwrap();
    assert_eq!(page.streams.len(), 3);
    assert_eq!(page.next, None);
}

#[tokio::test]
async fn a_listing_reports_versions_positions_and_timestamps_of_each_stream() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let mut a = put(&log, "a", 3).await;
    put(&log, "b", 1).await;
    a.extend(put(&log, "a", 2).await);
    // One append holding two groups of `a` around one of `c`: consecutive versions at
    // positions that are not, so `a` gets one more run.
    let mixed = log
        .append(vec![group("a", 2), group("c", 1), group("a", 1)])
        .await
        .unwrap();
    a.extend(&mixed[0].positions);
    a.extend(&mixed[2].positions);
    // Many appends of one event: a stream of many runs is listed the same way.
    for _ in 0..300 {
        put(&log, "many", 1).await;
    }
    let events = all(&log).await;
    let page = log.list_streams(&query("", None, 100)).await.unwrap();
    let got: Vec<&str> = page.streams.iter().map(|s| s.stream.as_str()).collect();
    assert_eq!(got, ["a", "b", "c", "many"]);
    for info in &page.streams {
        let of: Vec<&Event> = events.iter().filter(|e| e.stream == info.stream).collect();
        let (first, last) = (of[0], of[of.len() - 1]);
        assert_eq!(info.version, of.len() as u64, "{}", info.stream);
        assert_eq!(info.first_position, first.position, "{}", info.stream);
        assert_eq!(info.last_position, last.position, "{}", info.stream);
        assert_eq!(info.first_timestamp, first.timestamp, "{}", info.stream);
        assert_eq!(info.last_timestamp, last.timestamp, "{}", info.stream);
    }
    assert_eq!(page.streams[0].version, 8);
    assert_eq!(page.streams[0].last_position, *a.last().unwrap());
    assert_eq!(page.streams[3].version, 300);

    // The same after a reopen, from the index on disk.
    drop(log);
    let log = open(dir.path());
    let again = log.list_streams(&query("", None, 100)).await.unwrap();
    assert_eq!(again, page);
}

#[tokio::test]
async fn a_backward_read_walks_every_run_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    // `s` in several runs interleaved with other streams, some in one append.
    for i in 0..5 {
        put(&log, "s", 3).await;
        put(&log, &format!("other-{i}"), 2).await;
        log.append(vec![group("s", 1), group("t", 1), group("s", 2)])
            .await
            .unwrap();
    }
    put(&log, "s-longer", 4).await;
    let forward = log.read_stream("s", 0, 1000).await.unwrap();
    assert_eq!(forward.len(), 30);
    let mut reversed = forward.clone();
    reversed.reverse();

    let back = log.read_stream_backward("s", u64::MAX, 1000).await.unwrap();
    assert_eq!(back, reversed, "past the last version starts at the last");
    let back = log.read_stream_backward("s", 29, 1000).await.unwrap();
    assert_eq!(back, reversed);

    // From inside a run, across run boundaries, in steps.
    let back = log.read_stream_backward("s", 17, 5).await.unwrap();
    let versions: Vec<u64> = back.iter().map(|e| e.version).collect();
    assert_eq!(versions, [17, 16, 15, 14, 13]);
    assert!(back.iter().all(|e| e.stream == "s"));
    let mut paged = Vec::new();
    let mut from = Some(29u64);
    while let Some(v) = from {
        let page = log.read_stream_backward("s", v, 4).await.unwrap();
        from = page.last().and_then(|e| e.version.checked_sub(1));
        paged.extend(page);
    }
    assert_eq!(paged, reversed);

    assert_eq!(
        log.read_stream_backward("s", 0, 10).await.unwrap(),
        vec![forward[0].clone()]
    );
    assert!(
        log.read_stream_backward("s", 5, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        log.read_stream_backward("nope", 5, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A stream whose name extends another's is its own.
    let longer = log.read_stream_backward("s-longer", 100, 10).await.unwrap();
    let versions: Vec<u64> = longer.iter().map(|e| e.version).collect();
    assert_eq!(versions, [3, 2, 1, 0]);
}

#[tokio::test]
async fn positions_are_found_by_time_across_appends_and_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let empty = log.position_at(Utc::now()).await.unwrap();
    assert_eq!(empty, None, "an empty log has nothing at any time");
    // Appends in separate groups, some larger than a chunk (256 events), with time between.
    let mut firsts = Vec::new();
    for i in 0..24 {
        let n = if i % 5 == 0 { 600 } else { 1 + i * 7 };
        firsts.push(put(&log, &format!("s{}", i % 3), n).await[0]);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let events = all(&log).await;
    for w in events.windows(2) {
        assert!(
            w[0].timestamp <= w[1].timestamp,
            "timestamps never decrease"
        );
    }
    let ts = |p: u64| events[p as usize].timestamp;
    let micro = TimeDelta::microseconds(1);
    for (i, &first) in firsts.iter().enumerate() {
        // Every event of an append shares its timestamp: the first position at or after it
        // is the append's first, and just past it the next append's.
        assert_eq!(
            log.position_at(ts(first)).await.unwrap(),
            Some(first),
            "append {i}"
        );
        assert_eq!(
            log.position_at(ts(first) + micro).await.unwrap(),
            firsts.get(i + 1).copied(),
            "append {i}"
        );
        assert_eq!(
            log.position_at(ts(first) - micro).await.unwrap(),
            Some(if i == 0 { 0 } else { first }),
        );
    }
    assert_eq!(
        log.position_at(DateTime::UNIX_EPOCH).await.unwrap(),
        Some(0)
    );

    // A span of time is a span of positions: read_to stops at its end.
    let (from, end) = (firsts[3], firsts[7]);
    let mut got = Vec::new();
    let mut next = from;
    while next < end {
        let page = log
            .read_to(next, end, 50, &ReadFilter::default())
            .await
            .unwrap();
        assert!(page.next <= end);
        got.extend(page.events);
        next = page.next;
    }
    let positions: Vec<u64> = got.iter().map(|e| e.position).collect();
    assert_eq!(positions, (from..end).collect::<Vec<_>>());
    let page = log
        .read_to(end, end, 50, &ReadFilter::default())
        .await
        .unwrap();
    assert!(page.events.is_empty());
    assert_eq!(page.next, end);
}

/// How far the test clock below runs behind the real one, in microseconds.
static CLOCK_BEHIND: AtomicI64 = AtomicI64::new(0);

fn stepped_clock() -> DateTime<Utc> {
    Utc::now() - TimeDelta::microseconds(CLOCK_BEHIND.load(Ordering::SeqCst))
}

#[tokio::test]
async fn timestamps_never_go_back_when_the_clock_does_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = SledLogConfig::new(dir.path());
        c.clock = stepped_clock;
        c
    };
    let log = SledLog::open(config(), Hub::new(100)).unwrap();
    put(&log, "a", 2).await;
    let before = log
        .read(0, 10, &ReadFilter::default())
        .await
        .unwrap()
        .events[1]
        .timestamp;
    // The clock steps back an hour.
    CLOCK_BEHIND.store(3_600_000_000, Ordering::SeqCst);
    let p = put(&log, "a", 1).await[0];
    put(&log, "b", 1).await;
    drop(log);
    let log = SledLog::open(config(), Hub::new(100)).unwrap();
    let q = put(&log, "c", 1).await[0];
    let events = all(&log).await;
    assert!(events[p as usize].timestamp >= before, "no step back");
    assert!(
        events[q as usize].timestamp >= before,
        "none after a restart either"
    );
    for w in events.windows(2) {
        assert!(w[0].timestamp <= w[1].timestamp);
    }
    // So a search by time still finds the first event at or after the time.
    assert_eq!(log.position_at(before).await.unwrap(), Some(0));
    let after = before + TimeDelta::microseconds(1);
    assert_eq!(log.position_at(after).await.unwrap(), None);
    // Once the clock is back, timestamps follow it again.
    CLOCK_BEHIND.store(0, Ordering::SeqCst);
    let r = put(&log, "c", 1).await[0];
    let last = log.read(r, 1, &ReadFilter::default()).await.unwrap().events[0].timestamp;
    assert!(last > before);
    assert_eq!(log.position_at(after).await.unwrap(), Some(r));
}
