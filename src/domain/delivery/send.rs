//! Sending: the next attempt of a delivery, checked against its asset's validity, recorded with
//! the hash of the bytes it sends, and the handler of `delivery.requested` that makes it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{Deliveries, Row, expire_if_due};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeliveryKind, DeliveryRequested, GatewayDelivery, kinds};
use crate::domain::metrics;
use crate::domain::schema::deliveries;
use crate::domain::status::Status;
use crate::runtime::consumer::{Cx, Failure, Handler, Received};
use crate::runtime::outbox::Outgoing;

/// Sent is what [`send_attempts`] did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Attempt(u32),
    /// Already sent, delivered, dead or cancelled: nothing to do.
    Skipped,
    /// Not sent yet: a refund of its asset awaits the partner's answer. It comes due again later,
    /// and is sent then if the refund failed, or cancelled if it was refunded.
    Held,
    /// No longer owed (`docs/product.md#validity-is-checked-first`): the asset is no longer valid,
    /// or the certificate the delivery is about was closed. Cancelled, never sent.
    Cancelled,
}

/// Due is a delivery locked for its next attempt, with the state of the asset it is about and of
/// that asset's certificate.
#[derive(QueryableByName)]
struct Due {
    #[diesel(embed)]
    delivery: Row,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    asset_status: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    asset_expires_at: Option<DateTime<Utc>>,
    /// Whether the asset's certificate was exchanged, revoked or has expired.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bool>)]
    certificate_closed: Option<bool>,
    /// Whether a refund of the asset awaits its partner's answer.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    refund_requested: bool,
    /// For a receipt certificate: whether it was revoked or has expired.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bool>)]
    receipt_closed: Option<bool>,
}

/// REFUND_HOLD is how long an asset's delivery waits, each time it comes due, while a refund of
/// the asset awaits its partner: sent meanwhile, the asset could be both delivered and refunded.
const REFUND_HOLD: chrono::Duration = chrono::Duration::minutes(1);

/// owed_to_the_certificate_holder says whether a delivery only makes sense while the certificate
/// is open: the certificate itself, a stage-1 reminder, a download request. Once the asset was
/// exchanged, delivered, expired or refunded, or the certificate revoked, it is not sent again.
fn owed_to_the_certificate_holder(row: &Row, kind: DeliveryKind) -> bool {
    match kind {
        DeliveryKind::Certificate | DeliveryKind::DownloadRequest => true,
        DeliveryKind::Message => {
            row.content.get("code").and_then(serde_json::Value::as_str) == Some("certificate_expiring")
        }
        _ => false,
    }
}

/// send_attempts makes the next attempt of each pending or failed delivery among `ids`: it
/// re-checks that the delivery is still owed (`docs/product.md#validity-is-checked-first`: an asset
/// still valid, a certificate, reminder or download request still open), records the
/// attempt with the hash of the bytes, and adds them to `sending`, for the caller to write to the
/// outbox in its transaction. The deliveries are read in one statement and their attempts recorded
/// in another, whatever their number. It returns what it did with each delivery that exists; an id
/// named twice is attempted once.
pub fn send_attempts(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    ids: &[Uuid],
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<Vec<(Uuid, Sent)>, Failure> {
    let mut ids = ids.to_vec();
    // Locked in id order, so that two transactions naming the same deliveries cannot deadlock.
    ids.sort_unstable();
    ids.dedup();
    let due: Vec<Due> = crate::runtime::db::prepared(
        "SELECT d.*, a.status AS asset_status, a.expires_at AS asset_expires_at,
                (c.exchanged_at IS NOT NULL OR c.revoked_at IS NOT NULL OR c.expires_at <= $now) AS certificate_closed,
                (d.kind = 'asset' AND EXISTS (SELECT 1 FROM refunds r WHERE r.asset_id = d.asset_id AND r.status = 'requested'))
                  AS refund_requested,
                CASE WHEN d.kind = 'receipt_certificate' THEN
                  (SELECT rc.status = 'revoked' OR rc.expires_at <= $now FROM receipt_certificates rc
                   WHERE rc.id = substr(d.dedupe_key, 9)::uuid)
                END AS receipt_closed
         FROM deliveries d
         LEFT JOIN assets a ON a.id = d.asset_id
         LEFT JOIN exchange_certificates c ON c.asset_id = d.asset_id
         WHERE d.id = ANY($ids)
         ORDER BY d.id
         FOR UPDATE OF d",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>("ids", &ids)
    .bind::<diesel::sql_types::Timestamptz, _>("now", now)
    .load(conn)?;
    let mut done = Vec::with_capacity(due.len());
    let mut attempts = Vec::with_capacity(due.len());
    for Due { delivery: row, asset_status, asset_expires_at, certificate_closed, refund_requested, receipt_closed } in
        &due
    {
        if !matches!(row.status.as_str(), "pending" | "failed") {
            done.push((row.id, Sent::Skipped));
            continue;
        }
        let kind = DeliveryKind::parse(&row.kind).expect("the CHECK constraint admits only known kinds");
        if let (DeliveryKind::Asset, Some(asset_id)) = (kind, row.asset_id) {
            let (Some(status), Some(expires_at)) = (asset_status, asset_expires_at) else {
                return Err(Failure::permanent(
                    DeadLetterReason::Unprocessable,
                    format!("delivery {} carries asset {asset_id}, which does not exist", row.id),
                ));
            };
            let status = Status::parse(status).expect("the CHECK constraint admits only known statuses");
            if *expires_at <= now || !status.is_before_delivery() {
                cancel(conn, row, asset_id, now)?;
                done.push((row.id, Sent::Cancelled));
                continue;
            }
            if *refund_requested {
                diesel::update(deliveries::table.find(row.id))
                    .set(deliveries::due_at.eq(now + REFUND_HOLD))
                    .execute(conn)?;
                done.push((row.id, Sent::Held));
                continue;
            }
        }
        if *receipt_closed == Some(true) {
            void(conn, row, "the receipt certificate was revoked or has expired")?;
            done.push((row.id, Sent::Cancelled));
            continue;
        }
        if owed_to_the_certificate_holder(row, kind) {
            let awaiting = asset_status.as_deref() == Some(Status::AwaitingExchange.as_str());
            let valid = asset_expires_at.is_some_and(|at| at > now);
            if !awaiting || !valid || *certificate_closed == Some(true) {
                void(
                    conn,
                    row,
                    "the certificate is closed: exchanged, revoked or expired, or its asset went another way",
                )?;
                done.push((row.id, Sent::Cancelled));
                continue;
            }
        }
        let (attempt, outgoing) = next_attempt(deliveries, row, kind, now);
        done.push((row.id, Sent::Attempt(attempt.number as u32)));
        attempts.push(attempt);
        sending.push(outgoing);
        metrics::delivery_attempt(kind.as_str(), "sent");
    }
    let ack_timeout = chrono::Duration::from_std(deliveries.transmission.ack_timeout).expect("a sane timeout");
    record_attempts(conn, &attempts, now, now + ack_timeout)?;
    Ok(done)
}

/// cancel voids a delivery whose asset is no longer valid (`docs/product.md#validity-is-checked-first`): it is never sent, and
/// the asset expires if its term is over.
fn cancel(conn: &mut PgConnection, row: &Row, asset_id: Uuid, now: DateTime<Utc>) -> Result<(), Failure> {
    diesel::update(deliveries::table.find(row.id))
        .set((deliveries::status.eq("cancelled"), deliveries::last_error.eq("the asset is no longer valid")))
        .execute(conn)?;
    expire_if_due(conn, asset_id, now)?;
    metrics::delivery_attempt(&row.kind, "cancelled");
    Ok(())
}

/// void cancels a delivery that is owed no more, and sends nothing.
fn void(conn: &mut PgConnection, row: &Row, why: &str) -> Result<(), Failure> {
    diesel::update(deliveries::table.find(row.id))
        .set((deliveries::status.eq("cancelled"), deliveries::last_error.eq(why)))
        .execute(conn)?;
    metrics::delivery_attempt(&row.kind, "cancelled");
    Ok(())
}

/// Attempt is a delivery's next attempt, as [`record_attempts`] stores it.
struct Attempt {
    delivery_id: Uuid,
    number: i32,
    message_id: Uuid,
    payload_sha256: String,
}

/// next_attempt builds a delivery's next attempt: the message to its gateway, and the record of
/// the bytes it sends.
fn next_attempt(deliveries: &Deliveries, row: &Row, kind: DeliveryKind, now: DateTime<Utc>) -> (Attempt, Outgoing) {
    let number = row.attempts + 1;
    let message_id = Uuid::now_v7();
    let message = GatewayDelivery {
        message_type: kinds::DELIVERY.into(),
        delivery_id: row.id,
        attempt: u32::try_from(number).expect("attempts are positive"),
        kind,
        terminal_id: row.terminal_id.clone(),
        gateway_id: row.gateway_id.clone(),
        sent_at: now,
        request_id: row.request_id.clone(),
        content: row.content.clone(),
    };
    // A gateway matches an answer to its request by the correlation id: the request id when the
    // delivery answers one, else the order (or the delivery itself).
    let correlation = row.request_id.clone().unwrap_or_else(|| row.order_id.unwrap_or(row.id).to_string());
    let outgoing = Outgoing::json(deliveries.names.gateways(), row.gateway_id.as_str(), kinds::DELIVERY, &message)
        .with_message_id(message_id)
        .correlated(correlation);
    let payload_sha256 = crate::crypto::sha256_hex(&outgoing.payload);
    (Attempt { delivery_id: row.id, number, message_id, payload_sha256 }, outgoing)
}

/// record_attempts records attempts with the hashes of the bytes they send, and marks their
/// deliveries sent until `receipt_due_at`: one round trip, whatever their number.
fn record_attempts(
    conn: &mut PgConnection,
    attempts: &[Attempt],
    now: DateTime<Utc>,
    receipt_due_at: DateTime<Utc>,
) -> QueryResult<()> {
    use diesel::sql_types::{Array, Int4, Text, Timestamptz, Uuid as SqlUuid};
    if attempts.is_empty() {
        return Ok(());
    }
    crate::runtime::db::prepared(
        "WITH attempt AS (
           INSERT INTO delivery_attempts (delivery_id, attempt, message_id, payload_sha256, sent_at, outcome)
           SELECT delivery_id, attempt, message_id, payload_sha256, $now, 'sent'
           FROM unnest($delivery_id::uuid[], $number::int4[], $message_id::uuid[], $payload_sha256::text[]) AS t(delivery_id, attempt, message_id, payload_sha256)
         )
         UPDATE deliveries d SET status = 'sent', attempts = t.attempt, due_at = $receipt_due_at
         FROM unnest($delivery_id::uuid[], $number::int4[]) AS t(id, attempt)
         WHERE d.id = t.id",
    )
    .bind::<Array<SqlUuid>, _>("delivery_id", attempts.iter().map(|a| a.delivery_id).collect::<Vec<_>>())
    .bind::<Array<Int4>, _>("number", attempts.iter().map(|a| a.number).collect::<Vec<_>>())
    .bind::<Array<SqlUuid>, _>("message_id", attempts.iter().map(|a| a.message_id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>("payload_sha256", attempts.iter().map(|a| a.payload_sha256.as_str()).collect::<Vec<_>>())
    .bind::<Timestamptz, _>("now", now)
    .bind::<Timestamptz, _>("receipt_due_at", receipt_due_at)
    .execute(conn)?;
    Ok(())
}

/// RequestedHandler sends the next attempt of each delivery a `delivery.requested` names. Requests
/// handled together are sent together: their deliveries are read in one statement and their
/// attempts recorded in another.
pub struct RequestedHandler {
    pub deliveries: Arc<Deliveries>,
}

impl Handler for RequestedHandler {
    type Message = DeliveryRequested;
    const MESSAGE_TYPE: &'static str = kinds::DELIVERY_REQUESTED;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, DeliveryRequested>]) -> Result<(), Failure> {
        let ids: Vec<Uuid> = batch.iter().flat_map(|r| r.message.delivery_ids.iter().copied()).collect();
        let done = send_attempts(cx.conn, &self.deliveries, &ids, cx.now, cx.outgoing)?;
        for delivery_id in ids {
            match done.iter().find(|(id, _)| *id == delivery_id) {
                Some((_, sent)) => tracing::debug!(%delivery_id, ?sent, "delivery requested"),
                // One unknown id does not hold up the others; the rest of the message stands.
                None => tracing::warn!(%delivery_id, "skipped: no such delivery"),
            }
        }
        Ok(())
    }
}
