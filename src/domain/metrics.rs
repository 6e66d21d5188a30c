//! The domain's metrics: refusals, signatures, settlements, delivery attempts, end-to-end
//! latency. Each is recorded through [`record`], so that it counts only once its transaction
//! commits.

use std::time::Duration;

use metrics::{counter, histogram};

use crate::runtime::metrics::{Metric, m, record};

/// refused counts a refused terminal request by reason.
pub fn refused(reason: crate::contracts::refusal::RefusalReason) {
    record(move || counter!("assetflow_refusals_total", "reason" => reason.as_str()).increment(1));
}

/// settlement_answered counts a partner's answer and the time it took.
pub fn settlement_answered(partner: &str, outcome: &'static str, elapsed: Duration) {
    let partner = partner.to_string();
    record(move || {
        counter!("assetflow_settlements_total", "partner" => partner.clone(), "outcome" => outcome).increment(1);
        histogram!("assetflow_settlement_duration_seconds", "partner" => partner).record(elapsed.as_secs_f64());
    });
}

/// delivery_attempt counts a delivery attempt's outcome by delivery kind.
pub fn delivery_attempt(kind: &str, outcome: &'static str) {
    let kind = kind.to_string();
    record(move || counter!("assetflow_delivery_attempts_total", "kind" => kind, "outcome" => outcome).increment(1));
}

/// end_to_end records an end-to-end latency: `order_to_certificate` (an order placed to its
/// certificate acknowledged) or `exchange_to_asset` (an exchange to its asset acknowledged).
pub fn end_to_end(stage: &'static str, elapsed: Duration) {
    record(move || histogram!("assetflow_end_to_end_seconds", "stage" => stage).record(elapsed.as_secs_f64()));
}

/// settlement_timed_out counts an instruction a partner did not answer in time: sent again
/// ("retried") or given up on ("abandoned").
pub fn settlement_timed_out(partner: &str, outcome: &'static str) {
    let partner = partner.to_string();
    record(move || {
        counter!("assetflow_settlement_timeouts_total", "partner" => partner, "outcome" => outcome).increment(1)
    });
}

/// confirmation counts how a payer's confirmation of an order ended: "confirmed", "declined" or
/// "unconfirmed" (no answer in the product's window).
pub fn confirmation(outcome: &'static str) {
    record(move || counter!("assetflow_confirmations_total", "outcome" => outcome).increment(1));
}

/// signature_failure counts a signature that did not verify, by what was being verified.
pub fn signature_failure(subject: &'static str) {
    record(move || counter!("assetflow_signature_failures_total", "subject" => subject).increment(1));
}

/// delivery_proof counts completed deliveries by the proof they have: "terminal" (the terminal's
/// signed acknowledgement) or "gateway" (the gateway's receipt alone).
pub fn delivery_proof(proof: &'static str) {
    record(move || counter!("assetflow_delivery_proofs_total", "proof" => proof).increment(1));
}

/// due_pickup_lag records how late due work was picked up (due time to enqueue).
pub fn due_pickup_lag(job: &str, lag: Duration) {
    let job = job.to_string();
    record(move || histogram!("assetflow_due_pickup_lag_seconds", "job" => job).record(lag.as_secs_f64()));
}

/// refund counts refunds by partner and what became of them: `requested` of the partner,
/// `refunded` or `failed` (refused by the partner).
pub fn refund(partner: &str, outcome: &'static str) {
    let partner = partner.to_string();
    record(move || counter!("assetflow_refunds_total", "partner" => partner, "outcome" => outcome).increment(1));
}

/// booking counts what happened to receipt certificates, by condition (or request): `booked`,
/// `submitted`, `refused`, `drawn`, `produced`, `failed`, `passed_on`, `lapsed`, `expired`.
pub fn booking(condition: &str, outcome: &'static str) {
    let condition = condition.to_string();
    record(move || counter!("assetflow_bookings_total", "condition" => condition, "outcome" => outcome).increment(1));
}

/// change counts changes of product reaching each step: `purchasing`, `refunding`, `done`,
/// `failed`, `compensating`, `compensated`, `stuck`.
pub fn change(step: &'static str) {
    record(move || counter!("assetflow_changes_total", "step" => step).increment(1));
}

/// issuer_change counts issuer's changes' modification notices: `announced`, then `answered` by
/// the holder or `defaulted` at the deadline.
pub fn issuer_change(outcome: &'static str, notices: u64) {
    record(move || counter!("assetflow_modification_notices_total", "outcome" => outcome).increment(notices));
}

/// register describes the domain's metrics and creates its counters whose label sets are known in
/// advance at zero.
pub fn register() {
    crate::runtime::metrics::describe(CATALOGUE);
    for subject in ["terminal_request", "certificate"] {
        counter!("assetflow_signature_failures_total", "subject" => subject).absolute(0);
    }
    for outcome in CONFIRMATION_OUTCOMES {
        counter!("assetflow_confirmations_total", "outcome" => outcome).absolute(0);
    }
    for reason in crate::contracts::refusal::RefusalReason::ALL {
        counter!("assetflow_refusals_total", "reason" => reason.as_str()).absolute(0);
    }
}

/// CONFIRMATION_OUTCOMES are the outcomes [`confirmation`] counts.
pub const CONFIRMATION_OUTCOMES: [&str; 3] = ["confirmed", "declined", "unconfirmed"];

/// CATALOGUE is every metric the domain emits.
pub const CATALOGUE: &[Metric] = &[
    m("assetflow_refusals_total", "counter", &["reason"], "Terminal requests refused."),
    m(
        "assetflow_signature_failures_total",
        "counter",
        &["subject"],
        "Signatures that did not verify: terminal_request or certificate.",
    ),
    m(
        "assetflow_delivery_proofs_total",
        "counter",
        &["proof"],
        "Deliveries completed, by their proof: terminal (its signed acknowledgement) or gateway (its receipt alone).",
    ),
    m("assetflow_settlements_total", "counter", &["partner", "outcome"], "Partner answers: settled or declined."),
    m(
        "assetflow_confirmations_total",
        "counter",
        &["outcome"],
        "Payer confirmations of orders billed by another terminal: confirmed, declined or unconfirmed (no answer in time).",
    ),
    m(
        "assetflow_settlement_duration_seconds",
        "histogram",
        &["partner"],
        "Time from the first instruction to the partner's answer.",
    ),
    m(
        "assetflow_settlement_timeouts_total",
        "counter",
        &["partner", "outcome"],
        "Instructions not answered in time: retried or abandoned.",
    ),
    m(
        "assetflow_delivery_attempts_total",
        "counter",
        &["kind", "outcome"],
        "Delivery attempts: sent, acknowledged, timed_out, hash_mismatch, cancelled.",
    ),
    m(
        "assetflow_end_to_end_seconds",
        "histogram",
        &["stage"],
        "order_to_certificate: order placed to certificate receipt; exchange_to_asset: exchange to asset receipt.",
    ),
    m("assetflow_due_pickup_lag_seconds", "histogram", &["job"], "Delay from a delivery's due time to its sending."),
    m(
        "assetflow_refunds_total",
        "counter",
        &["partner", "outcome"],
        "Refunds: requested of the partner, then refunded or failed (refused by the partner).",
    ),
    m(
        "assetflow_bookings_total",
        "counter",
        &["condition", "outcome"],
        "Receipt certificates: booked, submitted, refused; lotteries drawn and places passed_on; threshold sales produced or failed; certificates lapsed or expired.",
    ),
    m(
        "assetflow_changes_total",
        "counter",
        &["step"],
        "Changes of product reaching each step: purchasing, refunding, done; failed; compensating, compensated, stuck.",
    ),
    m(
        "assetflow_modification_notices_total",
        "counter",
        &["outcome"],
        "Modification notices of issuers' changes: announced, then answered by the holder or defaulted at the deadline.",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric this file emits is in its catalogue, and every catalogued one is emitted.
    #[test]
    fn the_catalogue_lists_exactly_the_emitted_metrics() {
        crate::runtime::metrics::check_catalogue(include_str!("metrics.rs"), CATALOGUE);
    }
}
