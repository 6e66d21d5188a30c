//! Delivery receipts: a gateway's acknowledgement, for its terminal, of the bytes it received.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::{Row, fail_attempt};
use crate::db::schema::{delivery_attempts, exchange_certificates};
use crate::dead_letter::Reason;
use crate::messages::{DeliveryKind, DeliveryReceipt, kinds};
use crate::pool::{Cx, Failure, Handler, Incoming};
use crate::status_machine::{self, Cause, Status};
use crate::telemetry;

/// ReceiptHandler completes a delivery on a receipt with the right hash (`delivery.receipt`).
pub struct ReceiptHandler;

impl Handler for ReceiptHandler {
    fn message_type(&self) -> &'static str {
        kinds::DELIVERY_RECEIPT
    }

    fn handle(&self, cx: &mut Cx<'_>, message: &Incoming) -> Result<(), Failure> {
        let receipt: DeliveryReceipt = serde_json::from_value(message.json.clone())
            .map_err(|e| Failure::permanent(Reason::SchemaViolation, e.to_string()))?;
        let attempt = i32::try_from(receipt.attempt).unwrap_or(i32::MAX);
        // The delivery, locked, with the attempt the receipt names, if it was made: one round trip.
        let Some(Receipted { delivery: row, payload_sha256, attempt_outcome }) = crate::db::prepared(
            "SELECT d.*, a.payload_sha256, a.outcome AS attempt_outcome
             FROM deliveries d LEFT JOIN delivery_attempts a ON a.delivery_id = d.id AND a.attempt = $2
             WHERE d.id = $1
             FOR UPDATE OF d",
        )
        .bind::<diesel::sql_types::Uuid, _>(receipt.delivery_id)
        .bind::<diesel::sql_types::Integer, _>(attempt)
        .get_result(cx.conn)
        .optional()?
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
            "delivered" => return Ok(()),
            // Given up on (its dead letter is the operator's) or void (the asset expired): a late
            // receipt is evidence, not a reason to change what was decided.
            "dead" | "cancelled" => {
                tracing::info!(delivery_id = %row.id, attempt, status = %row.status, "late receipt for a closed delivery; ignored");
                return Ok(());
            }
            _ => {}
        }
        if expected != receipt.sha256 {
            // Corrupted or tampered in transit: a failed transmission, retried like a lost one.
            if outcome == "sent" && row.status == "sent" && row.attempts == attempt {
                let error = format!("receipt hash {} does not match the {} sent", receipt.sha256, expected);
                fail_attempt(cx.conn, cx.app, &row, attempt, "hash_mismatch", &error, cx.now)?;
            }
            return Ok(());
        }
        complete(cx, &row, attempt)
    }
}

/// complete marks a delivery delivered and moves its asset on (seed 000 FIG. 6 S113, 8 S309).
fn complete(cx: &mut Cx<'_>, row: &Row, attempt: i32) -> Result<(), Failure> {
    let now = cx.now;
    // A late receipt for an earlier attempt completes the delivery: a newer attempt still in
    // flight is closed, so that nothing waits on a receipt that no longer matters. (With one
    // attempt made there is no other.)
    if row.attempts > 1 {
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
    // The attempt acknowledged and the delivery delivered in one statement; the order's placing
    // time comes back with it, for the end-to-end latency below.
    let Delivered { placed_at } = crate::db::prepared(
        "WITH acknowledged AS (
           UPDATE delivery_attempts SET outcome = 'acknowledged', finished_at = $2
           WHERE delivery_id = $1 AND attempt = $3
         )
         UPDATE deliveries SET status = 'delivered', delivered_at = $2 WHERE id = $1
         RETURNING (SELECT created_at FROM orders WHERE orders.id = deliveries.order_id) AS placed_at",
    )
    .bind::<diesel::sql_types::Uuid, _>(row.id)
    .bind::<diesel::sql_types::Timestamptz, _>(now)
    .bind::<diesel::sql_types::Integer, _>(attempt)
    .get_result(cx.conn)?;
    telemetry::delivery_attempt(&row.kind, "acknowledged");
    let kind = DeliveryKind::parse(&row.kind).expect("known kind");
    match (kind, row.asset_id) {
        (DeliveryKind::Asset, Some(asset_id)) => {
            let status = status_machine::current_for_update(cx.conn, asset_id)?;
            let next = match status {
                Status::AwaitingExchange | Status::AwaitingDesignatedDelivery => Status::Delivered,
                // Past-due processing and retransmissions complete as forced downloads (FIG. 7, 8).
                Status::ExpiredCertificateProcessing | Status::Retransmitting | Status::ForcedRetransmitting => {
                    Status::ForceDelivered
                }
                // Refunded or expired meanwhile: the receipt is recorded, the status stands.
                _ => return Ok(()),
            };
            status_machine::transition(cx.conn, asset_id, status, next, Cause::DeliveryAcknowledged, None, now)?;
            // From the holder's exchange to the asset in hand; direct deliveries have no exchange.
            let exchanged: Option<DateTime<Utc>> = exchange_certificates::table
                .filter(exchange_certificates::asset_id.eq(asset_id))
                .select(exchange_certificates::exchanged_at)
                .first::<Option<DateTime<Utc>>>(cx.conn)
                .optional()?
                .flatten();
            if let Some(exchanged) = exchanged {
                telemetry::end_to_end("exchange_to_asset", elapsed(exchanged, now));
            }
        }
        (DeliveryKind::Certificate, _) => {
            if let Some(placed) = placed_at {
                telemetry::end_to_end("order_to_certificate", elapsed(placed, now));
            }
        }
        _ => {}
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

#[derive(QueryableByName)]
struct Delivered {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    placed_at: Option<DateTime<Utc>>,
}

fn elapsed(from: DateTime<Utc>, to: DateTime<Utc>) -> std::time::Duration {
    (to - from).to_std().unwrap_or_default()
}
