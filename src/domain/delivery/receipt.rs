//! Delivery receipts: a gateway's acknowledgement, for its terminal, of the bytes it received.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use std::sync::Arc;

use super::{Deliveries, Row, fail_attempt};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeliveryKind, DeliveryReceipt, kinds};
use crate::domain::metrics;
use crate::domain::schema::delivery_attempts;
use crate::domain::status::{self, Cause, Status};
use crate::runtime::consumer::{Cx, Failure, Handler, Received, together_unless_repeated};

/// ReceiptHandler completes a delivery on a receipt with the right hash (`delivery.receipt`).
/// Receipts handled together are read in one statement and completed in one more (two when they
/// complete assets).
pub struct ReceiptHandler {
    pub deliveries: Arc<Deliveries>,
}

impl Handler for ReceiptHandler {
    type Message = DeliveryReceipt;
    const MESSAGE_TYPE: &'static str = kinds::DELIVERY_RECEIPT;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, DeliveryReceipt>]) -> Result<(), Failure> {
        together_unless_repeated(
            cx,
            batch,
            |r| [r.delivery_id],
            |cx, batch| {
                let receipts: Vec<&DeliveryReceipt> = batch.iter().map(|r| &r.message).collect();
                take(cx, &self.deliveries, &receipts)
            },
        )
    }
}

/// take carries out receipts for distinct deliveries.
fn take(cx: &mut Cx<'_>, deliveries: &Deliveries, receipts: &[&DeliveryReceipt]) -> Result<(), Failure> {
    let rows = receipted(cx.conn, receipts)?;
    let mut matching = Vec::with_capacity(receipts.len());
    for receipt in receipts {
        let attempt = i32::try_from(receipt.attempt).unwrap_or(i32::MAX);
        let Some(Receipted { delivery: row, payload_sha256, attempt_outcome }) =
            rows.iter().find(|r| r.delivery.id == receipt.delivery_id)
        else {
            return Err(Failure::permanent(
                DeadLetterReason::UnknownDelivery,
                format!("no delivery {}", receipt.delivery_id),
            ));
        };
        if row.gateway_id != receipt.gateway_id || row.terminal_id != receipt.terminal_id {
            return Err(Failure::permanent(
                DeadLetterReason::UnknownDelivery,
                format!(
                    "delivery {} is for {} via {}, not {} via {}",
                    row.id, row.terminal_id, row.gateway_id, receipt.terminal_id, receipt.gateway_id
                ),
            ));
        }
        let (Some(expected), Some(outcome)) = (payload_sha256, attempt_outcome) else {
            return Err(Failure::permanent(
                DeadLetterReason::UnknownDelivery,
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
                fail_attempt(cx.conn, deliveries, row, attempt, "hash_mismatch", &error, cx.now)?;
            }
            continue;
        }
        matching.push((row, attempt));
    }
    complete(cx, &matching)
}

/// receipted reads, and locks in id order, the deliveries that receipts name, each with the
/// attempt its receipt names if that attempt was made: one round trip.
fn receipted(conn: &mut PgConnection, receipts: &[&DeliveryReceipt]) -> QueryResult<Vec<Receipted>> {
    use diesel::sql_types::{Array, Int4, Uuid as SqlUuid};
    crate::runtime::db::prepared(
        "SELECT d.*, a.payload_sha256, a.outcome AS attempt_outcome
         FROM unnest($delivery_id::uuid[], $attempts::int4[]) AS r(delivery_id, attempt)
         JOIN deliveries d ON d.id = r.delivery_id
         LEFT JOIN delivery_attempts a ON a.delivery_id = d.id AND a.attempt = r.attempt
         ORDER BY d.id
         FOR UPDATE OF d",
    )
    .bind::<Array<SqlUuid>, _>("delivery_id", receipts.iter().map(|r| r.delivery_id).collect::<Vec<_>>())
    .bind::<Array<Int4>, _>(
        "attempts",
        receipts.iter().map(|r| i32::try_from(r.attempt).unwrap_or(i32::MAX)).collect::<Vec<_>>(),
    )
    .load(conn)
}

/// complete marks deliveries delivered on their acknowledged attempts, and moves the assets they
/// carried on (`docs/product.md#the-transition-table`).
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
    let delivered: Vec<Delivered> = crate::runtime::db::prepared(
        "WITH acknowledged AS (
           UPDATE delivery_attempts a SET outcome = 'acknowledged', finished_at = $now
           FROM unnest($delivery_ids::uuid[], $attempts::int4[]) AS t(delivery_id, attempt)
           WHERE a.delivery_id = t.delivery_id AND a.attempt = t.attempt
         )
         UPDATE deliveries d SET status = 'delivered', delivered_at = $now WHERE d.id = ANY($delivery_ids)
         RETURNING d.id,
                   (SELECT o.created_at FROM orders o WHERE o.id = d.order_id) AS placed_at,
                   (SELECT c.exchanged_at FROM exchange_certificates c WHERE c.asset_id = d.asset_id) AS exchanged_at",
    )
    .bind::<Timestamptz, _>("now", now)
    .bind::<Array<SqlUuid>, _>("delivery_ids", acknowledged.iter().map(|(row, _)| row.id).collect::<Vec<_>>())
    .bind::<Array<Int4>, _>("attempts", acknowledged.iter().map(|(_, attempt)| *attempt).collect::<Vec<_>>())
    .load(cx.conn)?;
    let mut assets = Vec::new();
    for (row, _) in acknowledged {
        metrics::delivery_attempt(&row.kind, "acknowledged");
        let times = delivered.iter().find(|d| d.id == row.id);
        match (DeliveryKind::parse(&row.kind).expect("known kind"), row.asset_id) {
            (DeliveryKind::Asset, Some(asset_id)) => {
                assets.push(Handed { asset_id, exchanged_at: times.and_then(|t| t.exchanged_at), forced: row.forced })
            }
            (DeliveryKind::Certificate, _) => {
                if let Some(placed) = times.and_then(|t| t.placed_at) {
                    metrics::end_to_end("order_to_certificate", elapsed(placed, now));
                }
            }
            _ => {}
        }
    }
    hand_over(cx, &assets)
}

/// Handed is an asset whose delivery was acknowledged.
struct Handed {
    asset_id: Uuid,
    /// When its holder exchanged the certificate, if it was exchanged.
    exchanged_at: Option<DateTime<Utc>>,
    /// Whether it went out as a forced transmission (stage 2, or past-due processing).
    forced: bool,
}

/// hand_over moves assets whose delivery was acknowledged to delivered, or to force-delivered when
/// they went out as a forced transmission, past-due processing or a retransmission
/// (`docs/product.md#the-transition-table`). An asset refunded or expired meanwhile keeps its
/// status: the receipt is recorded, and that is all.
fn hand_over(cx: &mut Cx<'_>, assets: &[Handed]) -> Result<(), Failure> {
    if assets.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = assets.iter().map(|a| a.asset_id).collect();
    let current = status::current_many_for_update(cx.conn, &ids)?;
    if let Some(missing) = ids.iter().find(|id| !current.iter().any(|(asset, _)| asset == *id)) {
        return Err(Failure::permanent(
            DeadLetterReason::Unprocessable,
            format!("the delivered asset {missing} does not exist"),
        ));
    }
    let mut moves: Vec<(Status, Status, Vec<Uuid>)> = Vec::new();
    for (asset_id, status) in current {
        let forced = assets.iter().any(|a| a.asset_id == asset_id && a.forced);
        let next = match status {
            Status::AwaitingExchange if forced => Status::ForceDelivered,
            Status::AwaitingExchange | Status::AwaitingDesignatedDelivery => Status::Delivered,
            Status::ExpiredCertificateProcessing | Status::Retransmitting | Status::ForcedRetransmitting => {
                Status::ForceDelivered
            }
            _ => continue,
        };
        match moves.iter_mut().find(|(from, to, _)| *from == status && *to == next) {
            Some((_, _, ids)) => ids.push(asset_id),
            None => moves.push((status, next, vec![asset_id])),
        }
    }
    for (from, to, ids) in moves {
        let moved = status::transition_many(cx.conn, &ids, from, to, Cause::DeliveryAcknowledged, cx.now)?;
        // From the holder's exchange to the asset in hand; direct deliveries have no exchange.
        for handed in assets.iter().filter(|a| moved.contains(&a.asset_id)) {
            if let Some(exchanged) = handed.exchanged_at {
                metrics::end_to_end("exchange_to_asset", elapsed(exchanged, cx.now));
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
