//! The retransmission backoff: a schedule of waits, the last one repeated, each jittered.

use std::time::Duration;

use rand::Rng;

/// delay is the wait after failed attempt number `attempt` (1-based): the schedule's entry for
/// that attempt, or its last entry once the schedule runs out, moved by up to `jitter` either way.
pub fn delay(schedule: &[Duration], attempt: u32, jitter: f64, rng: &mut impl Rng) -> chrono::Duration {
    let base = nominal(schedule, attempt);
    let factor = if jitter > 0.0 { 1.0 + rng.random_range(-jitter..=jitter) } else { 1.0 };
    chrono::Duration::milliseconds((base.as_millis() as f64 * factor).round() as i64)
}

/// nominal is the un-jittered wait after failed attempt number `attempt`.
pub fn nominal(schedule: &[Duration], attempt: u32) -> Duration {
    let index = (attempt.max(1) as usize - 1).min(schedule.len().saturating_sub(1));
    schedule.get(index).copied().unwrap_or(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn default_schedule() -> Vec<Duration> {
        ["1m", "5m", "30m", "2h", "6h", "12h", "24h"].iter().map(|s| humantime::parse_duration(s).unwrap()).collect()
    }

    #[test]
    fn the_schedule_is_followed_then_its_last_entry_repeats() {
        let schedule = default_schedule();
        let table = [
            (0, "1m"),
            (1, "1m"),
            (2, "5m"),
            (3, "30m"),
            (4, "2h"),
            (5, "6h"),
            (6, "12h"),
            (7, "24h"),
            (8, "24h"),
            (50, "24h"),
        ];
        for (attempt, expected) in table {
            assert_eq!(nominal(&schedule, attempt), humantime::parse_duration(expected).unwrap(), "attempt {attempt}");
        }
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_varies() {
        let schedule = default_schedule();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let delays: Vec<i64> = (0..200).map(|_| delay(&schedule, 2, 0.1, &mut rng).num_milliseconds()).collect();
        assert!(delays.iter().all(|d| (270_000..=330_000).contains(d)), "{delays:?}");
        assert!(delays.iter().any(|d| *d != delays[0]), "no jitter at all");
        assert_eq!(delay(&schedule, 2, 0.0, &mut rng).num_milliseconds(), 300_000);
    }
}
