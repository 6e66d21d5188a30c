//! Every metric assetflow emits, defined in one place.
//!
//! Names follow `assetflow_<name>_<unit>`; counters end in `_total`; labels are bounded (pool,
//! message type, outcome, reason, job, partner, kind), never an id or an error string.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// messages_received counts a message taken from a pool queue.
pub fn message_received(pool: &str, message_type: &str) {
    counter!("assetflow_messages_received_total", "pool" => pool.to_string(), "type" => bounded_type(message_type))
        .increment(1);
}

/// message_handled records how a message ended (acked, retried, deferred, dead_lettered, duplicate)
/// and how long its handler took.
pub fn message_handled(pool: &str, message_type: &str, outcome: &'static str, elapsed: Duration) {
    let message_type = bounded_type(message_type);
    counter!("assetflow_messages_total", "pool" => pool.to_string(), "type" => message_type.clone(), "outcome" => outcome).increment(1);
    histogram!("assetflow_handler_duration_seconds", "pool" => pool.to_string(), "type" => message_type)
        .record(elapsed.as_secs_f64());
}

/// dead_lettered counts a dead letter by pool and reason.
pub fn dead_lettered(pool: &str, reason: &str) {
    counter!("assetflow_dead_letters_total", "pool" => pool.to_string(), "reason" => reason.to_string()).increment(1);
}

/// refused counts a refused terminal request by reason.
pub fn refused(reason: crate::refusal::Reason) {
    counter!("assetflow_refusals_total", "reason" => reason.as_str()).increment(1);
}

/// settlement_answered counts a partner's answer and the time it took.
pub fn settlement_answered(partner: &str, outcome: &'static str, elapsed: Duration) {
    counter!("assetflow_settlements_total", "partner" => partner.to_string(), "outcome" => outcome).increment(1);
    histogram!("assetflow_settlement_duration_seconds", "partner" => partner.to_string()).record(elapsed.as_secs_f64());
}

/// delivery_attempted counts a delivery attempt's outcome by delivery kind.
pub fn delivery_attempt(kind: &str, outcome: &'static str) {
    counter!("assetflow_delivery_attempts_total", "kind" => kind.to_string(), "outcome" => outcome).increment(1);
}

/// order_to_certificate records the end-to-end latency from a purchase to its acknowledged delivery.
pub fn end_to_end(stage: &'static str, elapsed: Duration) {
    histogram!("assetflow_end_to_end_seconds", "stage" => stage).record(elapsed.as_secs_f64());
}

/// outbox_published counts messages the relay published, and the ones the broker refused.
pub fn outbox_published(published: u64, failed: u64) {
    counter!("assetflow_outbox_published_total").increment(published);
    if failed > 0 {
        counter!("assetflow_outbox_publish_failures_total").increment(failed);
    }
}

/// outbox_backlog sets the unsent row count and the age of the oldest.
pub fn outbox_backlog(rows: i64, oldest_age: Duration) {
    gauge!("assetflow_outbox_backlog_messages").set(rows as f64);
    gauge!("assetflow_outbox_oldest_age_seconds").set(oldest_age.as_secs_f64());
}

/// reconnected counts a reconnection to "amqp" or "postgres".
pub fn reconnected(target: &'static str) {
    counter!("assetflow_reconnects_total", "target" => target).increment(1);
}

/// job_finished records a scheduled job's run.
pub fn job_finished(job: &str, outcome: &'static str, elapsed: Duration, scanned: u64, enqueued: u64) {
    let job = job.to_string();
    counter!("assetflow_job_runs_total", "job" => job.clone(), "outcome" => outcome).increment(1);
    histogram!("assetflow_job_duration_seconds", "job" => job.clone()).record(elapsed.as_secs_f64());
    counter!("assetflow_job_rows_scanned_total", "job" => job.clone()).increment(scanned);
    counter!("assetflow_job_enqueued_total", "job" => job.clone()).increment(enqueued);
    if outcome == "succeeded" {
        gauge!("assetflow_job_last_success_timestamp_seconds", "job" => job).set(chrono::Utc::now().timestamp() as f64);
    }
}

/// due_pickup_lag records how late due work was picked up (due time to enqueue).
pub fn due_pickup_lag(job: &str, lag: Duration) {
    histogram!("assetflow_due_pickup_lag_seconds", "job" => job.to_string()).record(lag.as_secs_f64());
}

/// signature_failure counts a signature that did not verify, by what was being verified.
pub fn signature_failure(subject: &'static str) {
    counter!("assetflow_signature_failures_total", "subject" => subject).increment(1);
}

/// Message types come from outside: anything assetflow does not know is folded into "unknown" so
/// that a hostile publisher cannot blow up the label set.
fn bounded_type(message_type: &str) -> String {
    if crate::messages::schema::is_known(message_type) { message_type.to_string() } else { "unknown".to_string() }
}
