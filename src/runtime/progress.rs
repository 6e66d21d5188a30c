//! Progress: what the running parts report, so that readiness means "consuming and making
//! progress", not "the process is up".

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

/// Progress is what the running parts report, so that readiness means "making progress".
#[derive(Default)]
pub struct Progress {
    relay_tick_ms: AtomicI64,
    pub consumers: AtomicU32,
}

impl Progress {
    /// Progress::relay_tick notes that the outbox relay completed a round.
    pub fn relay_tick(&self) {
        self.relay_tick_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Progress::consumer_started notes that a pool consumer subscribed.
    pub fn consumer_started(&self) {
        self.consumers.fetch_add(1, Ordering::Relaxed);
    }

    /// Progress::consumer_stopped notes that a subscription ended, for whatever reason.
    pub fn consumer_stopped(&self) {
        let _ = self.consumers.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Progress::relay_age is how long ago the relay last completed a round.
    pub fn relay_age(&self) -> Duration {
        let last = self.relay_tick_ms.load(Ordering::Relaxed);
        Duration::from_millis((chrono::Utc::now().timestamp_millis() - last).max(0) as u64)
    }
}
