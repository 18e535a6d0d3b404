//! Finding a time in the log: timestamps never decrease along positions (the writer keeps
//! them so), so the first event at or after a time is found by binary search over the
//! chunk index, reading one chunk per step.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};

use super::{EventReader, LogError, Shared, chunk_at};

/// The first durable position whose event's timestamp is at or after `at`; `None` when
/// every durable event is older.
pub(super) fn position_at(shared: &Shared, at: DateTime<Utc>) -> Result<Option<u64>, LogError> {
    let head = shared.durable.load(Ordering::Acquire);
    let mut reader = EventReader::default();
    let mut ts = |p: u64| reader.event(shared, p).map(|e| e.timestamp);
    // Every position below `lo` is older than `at`; every one from `hi` on is not. Both
    // stay on chunk boundaries, so the chunk holding `mid` starts at or after `lo`.
    let (mut lo, mut hi) = (0u64, head);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let (first, entry) = chunk_at(&shared.db, mid)?
            .ok_or_else(|| LogError::Corrupt(format!("no chunk holds position {mid}")))?;
        let end = (first + u64::from(entry.count)).min(head);
        if ts(first)? >= at {
            hi = first;
        } else if ts(end - 1)? < at {
            lo = end;
        } else {
            // Inside this chunk: `first` is older, `end - 1` is not.
            let (mut a, mut b) = (first + 1, end - 1);
            while a < b {
                let m = a + (b - a) / 2;
                if ts(m)? >= at {
                    b = m;
                } else {
                    a = m + 1;
                }
            }
            return Ok(Some(a));
        }
    }
    Ok((lo < head).then_some(lo))
}

/// The timestamp of the last event below `head`, which the writer's next append may not
/// go below; the epoch for an empty log (or one whose last chunk cannot be read: a read of
/// it reports the damage).
pub(super) fn last_timestamp(shared: &Shared, head: u64) -> DateTime<Utc> {
    let Some(last) = head.checked_sub(1) else {
        return DateTime::UNIX_EPOCH;
    };
    match EventReader::default().event(shared, last) {
        Ok(e) => e.timestamp,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the last event's timestamp; new timestamps follow the clock alone");
            DateTime::UNIX_EPOCH
        }
    }
}
