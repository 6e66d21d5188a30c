//! Times on the command line: RFC 3339, a date, or a duration ago.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

/// parse_time reads `2026-12-23T10:00:00Z`, `2026-12-23T10:00`, `2026-12-23` (midnight UTC) or
/// `now`.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if s == "now" {
        return Ok(Utc::now());
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M") {
        return Ok(t.and_utc());
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    Err(format!("{s:?} is not a time: use RFC 3339 (2026-12-23T10:00:00Z), 2026-12-23T10:00 or 2026-12-23"))
}

/// parse_since reads a time as [`parse_time`] does, or a duration ago such as `24h` or `7d`.
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(ago) = humantime::parse_duration(s) {
        return chrono::Duration::from_std(ago)
            .ok()
            .and_then(|ago| Utc::now().checked_sub_signed(ago))
            .ok_or_else(|| format!("{s:?} is too long ago"));
    }
    parse_time(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_accepted_form() {
        let expected = "2026-12-23T10:00:00Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(parse_time("2026-12-23T10:00:00Z").unwrap(), expected);
        assert_eq!(parse_time("2026-12-23T19:00:00+09:00").unwrap(), expected);
        assert_eq!(parse_time("2026-12-23T10:00").unwrap(), expected);
        assert_eq!(parse_time("2026-12-23").unwrap(), expected - chrono::Duration::hours(10));
        assert!(parse_time("tomorrow").is_err());
        let since = parse_since("24h").unwrap();
        assert!((Utc::now() - since - chrono::Duration::hours(24)).num_seconds().abs() < 5);
        assert!(parse_since("300000y").unwrap_err().contains("too long ago"));
        assert!(parse_since("99999999999999999999y").is_err());
    }
}
