//! Times: milliseconds since the epoch, written as RFC 3339. "Now" comes from a
//! [`fleetlake_model::clock::Clock`], never from here.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::error::AlertError;

/// `ms` as RFC 3339 UTC with milliseconds (`2026-11-28T15:00:00.000Z`).
pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses an RFC 3339 time into epoch milliseconds.
pub fn parse_rfc3339(text: &str) -> Result<i64, AlertError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| AlertError::Invalid(format!("{text:?} is not an RFC 3339 time: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let ms = parse_rfc3339("2026-11-28T15:00:01.250Z").unwrap();
        assert_eq!(rfc3339(ms), "2026-11-28T15:00:01.250Z");
        assert_eq!(parse_rfc3339("2026-11-28T16:00:01.250+01:00").unwrap(), ms);
        assert!(parse_rfc3339("yesterday").is_err());
    }
}
