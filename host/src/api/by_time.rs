//! The `since` and `until` of a read by time: parsing them, and turning them into the
//! position span the log reads.

use chrono::{DateTime, Utc};

use super::ApiError;
use crate::log::EventLog;

/// Parses the time query parameter `name`: an RFC 3339 timestamp (`2025-01-31T12:00:00Z`,
/// `2025-01-31T14:00:00.5+02:00`) or an integer of microseconds since the Unix epoch (the
/// precision the log stores). A `+` sent unencoded arrives as a space and is taken back.
pub(super) fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    let value = value.trim();
    let micros = value
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros);
    let parsed = micros.or_else(|| {
        DateTime::parse_from_rfc3339(value)
            .or_else(|_| DateTime::parse_from_rfc3339(&value.replace(' ', "+")))
            .ok()
            .map(|t| t.with_timezone(&Utc))
    });
    parsed.ok_or_else(|| {
        ApiError::bad_request(
            "invalid_query",
            format!(
                "{name}={value:?} is not a time: send an RFC 3339 timestamp such as 2025-01-31T12:00:00Z (percent-encode a + in an offset as %2B) or an integer of microseconds since the Unix epoch"
            ),
        )
    })
}

/// The positions `since..until` covers, as far as the log is written: where a read
/// starts (at least `from`) and the position it stops at (`None`: no event at or after
/// `until` yet, so the read goes to the head).
pub(super) struct Span {
    /// The first position to read.
    pub from: u64,
    /// The first position at or after `until`, when there is one.
    pub end: Option<u64>,
}

/// Finds the span of `since` (inclusive) and `until` (exclusive), starting no earlier than
/// `from`: two binary searches over the log.
pub(super) async fn span(
    log: &dyn EventLog,
    from: u64,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<Span, ApiError> {
    let unavailable = |e: crate::log::LogError| ApiError::unavailable(e.to_string());
    let from = match since {
        Some(t) => {
            let start = log.position_at(t).await.map_err(unavailable)?;
            from.max(start.unwrap_or_else(|| log.head()))
        }
        None => from,
    };
    let end = match until {
        Some(t) => log.position_at(t).await.map_err(unavailable)?,
        None => None,
    };
    Ok(Span { from, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_microseconds() {
        let t = parse_time("since", "2025-01-31T12:00:00Z").unwrap();
        assert_eq!(t.timestamp(), 1_738_324_800);
        assert_eq!(parse_time("since", "1738324800000000").unwrap(), t);
        assert_eq!(parse_time("until", "2025-01-31T14:00:00+02:00").unwrap(), t);
        assert_eq!(
            parse_time("until", "2025-01-31T14:00:00 02:00").unwrap(),
            t,
            "an unencoded + arrives as a space"
        );
        let e = parse_time("until", "yesterday").unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(
            format!("{e:?}").contains("until=\\\"yesterday\\\""),
            "{e:?}"
        );
        assert!(parse_time("since", "").is_err());
    }
}
