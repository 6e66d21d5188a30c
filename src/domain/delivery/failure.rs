//! A delivery's failures: a failed attempt retried on the schedule or dead-lettered, an asset past
//! its term expired, and the replay of a delivery whose retries ran out.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Deliveries, Row, request_send, retry};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeliveryKind, kinds};
use crate::contracts::topology::Pool;
use crate::domain::metrics;
use crate::domain::schema::{assets, deliveries, delivery_attempts, terminals};
use crate::domain::status::{self, Cause, Status};
use crate::runtime::consumer::Failure;
use crate::runtime::dead_letter::{self, Full, NewDeadLetter, Replayer};

/// expire_if_due moves an asset past its term to `expired`. An asset still awaiting its
/// delivery is first handed to past-due processing, as every flow does with an invalid one;
/// retrying stops there (`docs/product.md#validity-is-checked-first`).
pub fn expire_if_due(conn: &mut PgConnection, asset_id: Uuid, now: DateTime<Utc>) -> Result<bool, Failure> {
    let expires_at: DateTime<Utc> = assets::table.find(asset_id).select(assets::expires_at).first(conn)?;
    let mut status = status::current_for_update(conn, asset_id)?;
    if expires_at > now {
        return Ok(false);
    }
    if matches!(status, Status::AwaitingExchange | Status::AwaitingDesignatedDelivery) {
        status::transition(
            conn,
            asset_id,
            status,
            Status::ExpiredCertificateProcessing,
            Cause::AssetExpired,
            None,
            now,
        )?;
        status = Status::ExpiredCertificateProcessing;
    }
    if !status::allowed(status, Status::Expired) {
        return Ok(false);
    }
    status::transition(conn, asset_id, status, Status::Expired, Cause::AssetExpired, None, now)?;
    Ok(true)
}

/// fail_attempt records a failed attempt (no receipt in time, or a wrong hash) and schedules the
/// retransmission, or dead-letters the delivery when its attempts have run out.
pub fn fail_attempt(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    row: &Row,
    attempt: i32,
    outcome: &'static str,
    error: &str,
    now: DateTime<Utc>,
) -> Result<(), Failure> {
    diesel::update(delivery_attempts::table.find((row.id, attempt)))
        .set((
            delivery_attempts::outcome.eq(outcome),
            delivery_attempts::error.eq(error),
            delivery_attempts::finished_at.eq(now),
        ))
        .execute(conn)?;
    metrics::delivery_attempt(&row.kind, outcome);
    let policy = &deliveries.transmission;
    if let Some(asset_id) = row.asset_id.filter(|_| row.kind == DeliveryKind::Asset.as_str()) {
        let status = status::current_for_update(conn, asset_id)?;
        let next = match status {
            // A stage-2 forced transmission that failed is retried as a forced one.
            Status::AwaitingExchange if row.forced => Some(Status::ForcedRetransmitting),
            Status::AwaitingExchange | Status::AwaitingDesignatedDelivery => Some(Status::Retransmitting),
            Status::ExpiredCertificateProcessing => Some(Status::ForcedRetransmitting),
            _ => None,
        };
        if let Some(next) = next {
            status::transition(conn, asset_id, status, next, Cause::DeliveryFailed, Some(error), now)?;
        }
    }
    let terminal_kind: Option<String> =
        terminals::table.find(&row.terminal_id).select(terminals::kind).first(conn).optional()?;
    let terminal_kind = terminal_kind.as_deref();
    let limit =
        row.attempt_limit.map(|l| l as u32).unwrap_or_else(|| policy.max_attempts_for(&row.kind, terminal_kind));
    if attempt as u32 >= limit {
        diesel::update(deliveries::table.find(row.id))
            .set((deliveries::status.eq("dead"), deliveries::last_error.eq(error)))
            .execute(conn)?;
        let attempts: Vec<(i32, DateTime<Utc>, String, Option<String>)> = delivery_attempts::table
            .filter(delivery_attempts::delivery_id.eq(row.id))
            .order(delivery_attempts::attempt)
            .select((
                delivery_attempts::attempt,
                delivery_attempts::sent_at,
                delivery_attempts::outcome,
                delivery_attempts::error,
            ))
            .load(conn)?;
        let evidence: Vec<Value> = attempts
            .into_iter()
            .map(|(n, at, outcome, error)| json!({"attempt": n, "at": at, "outcome": outcome, "error": error}))
            .collect();
        dead_letter::record(
            conn,
            &deliveries.names,
            NewDeadLetter {
                pool: Pool::Delivery.as_str(),
                source: "delivery",
                message_type: kinds::DELIVERY.into(),
                // Keyed by the attempt too: a replayed delivery that runs out again is a new letter.
                message_id: Some(format!("delivery:{}:{attempt}", row.id)),
                exchange: Some(deliveries.names.gateways()),
                routing_key: Some(row.gateway_id.clone()),
                payload: serde_json::to_vec(&json!({"delivery_id": row.id, "kind": row.kind, "terminal_id": row.terminal_id, "content": row.content})).expect("serializes"),
                headers: json!({}),
                reason: DeadLetterReason::RetriesExhausted,
                detail: format!("{} delivery to {} failed {attempt} times; last: {error}", row.kind, row.terminal_id),
                attempts: Value::Array(evidence),
                subject_id: Some(row.id),
            },
        )?;
    } else {
        let schedule = policy.schedule_for(&row.kind, terminal_kind);
        let wait = retry::delay(schedule, attempt as u32, policy.jitter, &mut rand::rng());
        diesel::update(deliveries::table.find(row.id))
            .set((deliveries::status.eq("failed"), deliveries::due_at.eq(now + wait), deliveries::last_error.eq(error)))
            .execute(conn)?;
    }
    Ok(())
}

/// DeliveryReplayer replays a delivery whose retries ran out: it is sent again, with a fresh
/// budget of attempts.
pub struct DeliveryReplayer {
    pub deliveries: Arc<Deliveries>,
}

impl Replayer for DeliveryReplayer {
    const SOURCE: &'static str = "delivery";

    fn replay(&self, conn: &mut PgConnection, letter: &Full, now: DateTime<Utc>) -> anyhow::Result<String> {
        let id = letter.summary.id;
        let delivery =
            letter.summary.subject_id.ok_or_else(|| anyhow::anyhow!("dead letter {id} names no delivery"))?;
        let (kind, attempts, status, terminal_kind): (String, i32, String, Option<String>) = deliveries::table
            .left_join(terminals::table.on(terminals::id.eq(deliveries::terminal_id)))
            .filter(deliveries::id.eq(delivery))
            .select((deliveries::kind, deliveries::attempts, deliveries::status, terminals::kind.nullable()))
            .first(conn)?;
        anyhow::ensure!(status == "dead", "delivery {delivery} is {status}, not dead: nothing to replay");
        let budget = self.deliveries.transmission.max_attempts_for(&kind, terminal_kind.as_deref()) as i32;
        diesel::update(deliveries::table.find(delivery))
            .set((
                deliveries::status.eq("failed"),
                deliveries::due_at.eq(now),
                deliveries::attempt_limit.eq(attempts + budget),
            ))
            .execute(conn)?;
        crate::runtime::outbox::enqueue(conn, &request_send(&self.deliveries, delivery))?;
        Ok(format!("delivery {delivery} sent again, with {budget} more attempts"))
    }
}
