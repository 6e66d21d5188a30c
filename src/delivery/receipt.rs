//! Delivery receipts: a gateway's acknowledgement, for its terminal, of the bytes it received.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{Row, fail_attempt};
use crate::db::schema::delivery_attempts;
use crate::dead_letter::Reason;
use crate::messages::{DeliveryKind, DeliveryReceipt, kinds};
use crate::pool::{self, Cx, Failure, Handler, Incoming};
use crate::status_machine::{self, Cause, Status};
use crate::telemetry;

/// ReceiptHandler completes a delivery on a receipt with the right hash (`delivery.receipt`).
/// Receipts handled together are read in one statement and completed in one more (two when they
/// complete assets).
pub struct ReceiptHandler;

impl Handler for ReceiptHandler {
    fn message_type(&self) -> &'static str {
        kinds::DELIVERY_RECEIPT
    }

    fn handle(&self, cx: &mut Cx<'_>, message: &Incoming) -> Result<(), Failure> {
        self.handle_many(cx, &[message])
    }

    fn set_based(&self) -> bool {
        true
    }

    fn handle_many(&self, cx: &mut Cx<'_>, messages: &[&Incoming]) -> Result<(), Failure> {
        pool::together_unless_repeated(cx, messages, |r: &DeliveryReceipt| r.delivery_id, take)
    }
}

/// take carries out receipts for distinct deliveries.
fn take(cx: &mut Cx<'_>, receipts: &[DeliveryReceipt]) -> Result<(), Failure> {
    let rows = receipted(cx.conn, receipts)?;
    let mut matching = Vec::with_capacity(receipts.len());
    for receipt in receipts {
        let attempt = i32::try_from(receipt.attempt).unwrap_or(i32::MAX);
        let Some(Receipted { delivery: row, payload_sha256, attempt_outcome }) =
            rows.iter().find(|r| r.delivery.id == receipt.delivery_id)
        else {
            return Err(Failure::permanent(Reason::UnknownDelivery, format!("no delivery {}", receipt.delivery_id)));
        };
        if row.gateway_id != receipt.gateway_id || row.terminal_id != receipt.terminal_id {
            return Err(Failure::permanent(
                Reason::UnknownDelivery,
                format!(
                    "delivery {} is for {} via {}, not {} via {}",
                    row.id, row.terminal_id, row.gateway_id, receipt.terminal_id, receipt.gateway_id
                ),
            ));
        }
        let (Some(expected), Some(outcome)) = (payload_sha256, attempt_outcome) else {
            return Err(Failure::permanent(
                Reason::UnknownDelivery,
                format!("delivery {} has no attempt {}", row.id, receipt.attempt),
            ));
        };
        match row.status.as_str() {
            // A second receipt: the delivery is already complete.
            "delivered" => continue,
            // Given up on (its dead letter is the operator's) or void (the asset expired): a late
            // receipt is evidence, not a reason to change what was decided.
            "dead" | "cancelled" => {
                tracing::info!(delivery_id = %row.id, attempt, status = %row.status, "late receipt for a closed delivery; ignored");
                continue;
            }
            _ => {}
        }
        if *expected != receipt.sha256 {
            // Corrupted or tampered in transit: a failed transmission, retried like a lost one.
            if outcome == "sent" && row.status == "sent" && row.attempts == attempt {
                let error = format!("receipt hash {} does not match the {} sent", receipt.sha256, expected);
                fail_attempt(cx.conn, cx.app, row, attempt, "hash_mismatch", &error, cx.now)?;
            }
            continue;
        }
        matching.push((row, attempt));
    }
    complete(cx, &matching)
}

/// receipted reads, and locks in id order, the deliveries that receipts name, each with the
/// attempt its receipt names if that attempt was made: one round trip.
fn receipted(conn: &mut PgConnection, receipts: &[DeliveryReceipt]) -> QueryResult<Vec<Receipted>> {
    use diesel::sql_types::{Array, Int4, Uuid as SqlUuid};
    crate::db::prepared(
        "SELECT d.*, a.payload_sha256, a.outcome AS attempt_outcome
         FROM unnest($1::uuid[], $2::int4[]) AS r(delivery_id, attempt)
         JOIN deliveries d ON d.id = r.delivery_id
         LEFT JOIN delivery_attempts a ON a.delivery_id = d.id AND a.attempt = r.attempt
         ORDER BY d.id
         FOR UPDATE OF d",
    )
    .bind::<Array<SqlUuid>, _>(receipts.iter().map(|r| r.delivery_id).collect::<Vec<_>>())
    .bind::<Array<Int4>, _>(receipts.iter().map(|r| i32::try_from(r.attempt).unwrap_or(i32::MAX)).collect::<Vec<_>>())
    .load(conn)
}

/// complete marks deliveries delivered on their acknowledged attempts, and moves the assets they
/// carried on (seed 000 FIG. 6 S113, 8 S309).
fn complete(cx: &mut Cx<'_>, acknowledged: &[(&Row, i32)]) -> Result<(), Failure> {
    use diesel::sql_types::{Array, Int4, Timestamptz, Uuid as SqlUuid};
    if acknowledged.is_empty() {
        return Ok(());
    }
    let now = cx.now;
    // A late receipt for an earlier attempt completes the delivery: a newer attempt still in
    // flight is closed, so that nothing waits on a receipt that no longer matters. (With one
    // attempt made there is no other.)
    for (row, attempt) in acknowledged.iter().filter(|(row, _)| row.attempts > 1) {
        diesel::update(
            delivery_attempts::table
                .filter(delivery_attempts::delivery_id.eq(row.id))
                .filter(delivery_attempts::attempt.ne(attempt))
                .filter(delivery_attempts::outcome.eq("sent")),
        )
        .set((
            delivery_attempts::outcome.eq("timed_out"),
            delivery_attempts::error.eq(format!("superseded: attempt {attempt} was acknowledged")),
            delivery_attempts::finished_at.eq(now),
        ))
        .execute(cx.conn)?;
    }
    // The attempts acknowledged and their deliveries delivered in one statement. Each order's
    // placing time and each asset's exchange time come back with them, for the end-to-end
    // latencies below.
    let delivered: Vec<Delivered> = crate::db::prepared(
        "WITH acknowledged AS (
           UPDATE delivery_attempts a SET outcome = 'acknowledged', finished_at = $1
           FROM unnest($2::uuid[], $3::int4[]) AS t(delivery_id, attempt)
           WHERE a.delivery_id = t.delivery_id AND a.attempt = t.attempt
         )
         UPDATE deliveries d SET status = 'delivered', delivered_at = $1 WHERE d.id = ANY($2)
         RETURNING d.id,
                   (SELECT o.created_at FROM orders o WHERE o.id = d.order_id) AS placed_at,
                   (SELECT c.exchanged_at FROM exchange_certificates c WHERE c.asset_id = d.asset_id) AS exchanged_at",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<Array<SqlUuid>, _>(acknowledged.iter().map(|(row, _)| row.id).collect::<Vec<_>>())
    .bind::<Array<Int4>, _>(acknowledged.iter().map(|(_, attempt)| *attempt).collect::<Vec<_>>())
    .load(cx.conn)?;
    let mut assets = Vec::new();
    for (row, _) in acknowledged {
        telemetry::delivery_attempt(&row.kind, "acknowledged");
        let times = delivered.iter().find(|d| d.id == row.id);
        match (DeliveryKind::parse(&row.kind).expect("known kind"), row.asset_id) {
            (DeliveryKind::Asset, Some(asset_id)) => assets.push((asset_id, times.and_then(|t| t.exchanged_at))),
            (DeliveryKind::Certificate, _) => {
                if let Some(placed) = times.and_then(|t| t.placed_at) {
                    telemetry::end_to_end("order_to_certificate", elapsed(placed, now));
                }
            }
            _ => {}
        }
    }
    hand_over(cx, &assets)
}

/// hand_over moves assets whose delivery was acknowledged to delivered, or to force-delivered when
/// they went out as past-due processing or a retransmission (FIG. 7, 8). An asset refunded or
/// expired meanwhile keeps its status: the receipt is recorded, and that is all. `assets` pairs
/// each with its holder's exchange time, if any.
fn hand_over(cx: &mut Cx<'_>, assets: &[(Uuid, Option<DateTime<Utc>>)]) -> Result<(), Failure> {
    if assets.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = assets.iter().map(|(id, _)| *id).collect();
    let current = status_machine::current_many_for_update(cx.conn, &ids)?;
    if let Some(missing) = ids.iter().find(|id| !current.iter().any(|(asset, _)| asset == *id)) {
        return Err(Failure::permanent(Reason::Unprocessable, format!("the delivered asset {missing} does not exist")));
    }
    let mut moves: Vec<(Status, Status, Vec<Uuid>)> = Vec::new();
    for (asset_id, status) in current {
        let next = match status {
            Status::AwaitingExchange | Status::AwaitingDesignatedDelivery => Status::Delivered,
            Status::ExpiredCertificateProcessing | Status::Retransmitting | Status::ForcedRetransmitting => {
                Status::ForceDelivered
            }
            _ => continue,
        };
        match moves.iter_mut().find(|(from, _, _)| *from == status) {
            Some((_, _, ids)) => ids.push(asset_id),
            None => moves.push((status, next, vec![asset_id])),
        }
    }
    for (from, to, ids) in moves {
        let moved = status_machine::transition_many(cx.conn, &ids, from, to, Cause::DeliveryAcknowledged, cx.now)?;
        // From the holder's exchange to the asset in hand; direct deliveries have no exchange.
        for (_, exchanged) in assets.iter().filter(|(id, _)| moved.contains(id)) {
            if let Some(exchanged) = exchanged {
                telemetry::end_to_end("exchange_to_asset", elapsed(*exchanged, cx.now));
            }
        }
    }
    Ok(())
}

/// Receipted is a delivery and the attempt a receipt names.
#[derive(QueryableByName)]
struct Receipted {
    #[diesel(embed)]
    delivery: Row,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    payload_sha256: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    attempt_outcome: Option<String>,
}

/// Delivered is a delivery just completed, with the times its latencies are measured from.
#[derive(QueryableByName)]
struct Delivered {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    placed_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    exchanged_at: Option<DateTime<Utc>>,
}

fn elapsed(from: DateTime<Utc>, to: DateTime<Utc>) -> std::time::Duration {
    (to - from).to_std().unwrap_or_default()
}
