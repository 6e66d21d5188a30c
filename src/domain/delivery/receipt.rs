//! Delivery receipts: a gateway's acknowledgement, for its terminal, of the bytes it received.
//! When the receipts complete what an order delivered to recipients other than its orderer, the
//! orderer is told the order is complete (`docs/product.md#completion-notice`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use std::collections::HashMap;
use std::sync::Arc;

use super::{Deliveries, Inserted, Row, fail_attempt};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{Acknowledgement, DeliveryKind, DeliveryReceipt, kinds};
use crate::crypto;
use crate::domain::catalogue::{Catalogue, PartyKind};
use crate::domain::schema::delivery_attempts;
use crate::domain::status::{self, Cause, Status};
use crate::domain::{metrics, parties};
use crate::runtime::consumer::{Cx, Failure, Handler, Received, together_unless_repeated};

/// ReceiptHandler completes a delivery on a receipt with the right hash (`delivery.receipt`).
/// Receipts handled together are read in one statement and completed in one more (two when they
/// complete assets, two more when they deliver what an order bought for another terminal).
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
        together_unless_repeated(cx, batch, |r| [r.delivery_id], |cx, batch| take(cx, &self.deliveries, batch))
    }
}

/// take carries out receipts for distinct deliveries, each only from the gateway its delivery went
/// to (`docs/security.md#who-may-answer`) and with the proof its product asks for.
fn take(cx: &mut Cx<'_>, deliveries: &Deliveries, batch: &[Received<'_, DeliveryReceipt>]) -> Result<(), Failure> {
    let receipts: Vec<&DeliveryReceipt> = batch.iter().map(|r| &r.message).collect();
    let rows = receipted(cx.conn, &receipts)?;
    let by_id: HashMap<Uuid, &Receipted> = rows.iter().map(|r| (r.delivery.id, r)).collect();
    // The terminals whose signed acknowledgements are checked below, read in one statement.
    cx.read_terminals(
        receipts
            .iter()
            .filter(|m| m.acknowledgement.is_some())
            .filter_map(|m| by_id.get(&m.delivery_id))
            .map(|r| r.delivery.terminal_id.as_str()),
    )?;
    let mut matching = Vec::with_capacity(receipts.len());
    for Received { message: receipt, incoming } in batch {
        let attempt = i32::try_from(receipt.attempt).unwrap_or(i32::MAX);
        let Some(Receipted { delivery: row, payload_sha256, attempt_outcome, message_id, proof_required }) =
            by_id.get(&receipt.delivery_id).copied()
        else {
            return Err(Failure::permanent(
                DeadLetterReason::UnknownDelivery,
                format!("no delivery {}", receipt.delivery_id),
            ));
        };
        let broker_user = deliveries.gateways.get(&row.gateway_id).and_then(|g| g.broker_user.as_deref());
        parties::prove(cx, PartyKind::Gateway, &row.gateway_id, broker_user, incoming)?;
        if row.gateway_id != receipt.gateway_id || row.terminal_id != receipt.terminal_id {
            return Err(Failure::permanent(
                DeadLetterReason::UnknownDelivery,
                format!(
                    "delivery {} is for {} via {}, not {} via {}",
                    row.id, row.terminal_id, row.gateway_id, receipt.terminal_id, receipt.gateway_id
                ),
            ));
        }
        let (Some(expected), Some(outcome), Some(message_id)) = (payload_sha256, attempt_outcome, message_id) else {
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
        // The acknowledgement as it arrived is what its signature covers (a re-serialised copy may
        // spell a UUID or a time otherwise), and what is kept as the proof.
        let acknowledgement = receipt.acknowledgement.as_ref().zip(incoming.json.get("acknowledgement"));
        let proof = proof(cx, row, *message_id, proof_required == "terminal", acknowledgement)?;
        if *expected != receipt.sha256 || matches!(proof, Proof::OtherContent) {
            // Corrupted or tampered in transit: a failed transmission, retried like a lost one.
            if outcome == "sent" && row.status == "sent" && row.attempts == attempt {
                let error = if *expected != receipt.sha256 {
                    format!("receipt hash {} does not match the {} sent", receipt.sha256, expected)
                } else {
                    "the terminal acknowledged content whose hash is not that of the content sent".to_string()
                };
                fail_attempt(cx.conn, deliveries, row, attempt, "hash_mismatch", &error, cx.now)?;
            }
            continue;
        }
        let acknowledgement = match proof {
            Proof::Terminal(signed) => Some(signed),
            _ => None,
        };
        matching.push((row, attempt, acknowledgement));
    }
    complete(cx, deliveries, &matching)
}

/// Proof is the proof of delivery a receipt carries.
enum Proof<'r> {
    /// The terminal's signed acknowledgement of this attempt and the content sent, as it arrived.
    Terminal(&'r serde_json::Value),
    /// The gateway's receipt alone, where that is enough.
    Gateway,
    /// The terminal acknowledged other content: a corrupted transmission.
    OtherContent,
}

/// proof checks the proof of delivery a receipt carries. An acknowledgement that is not the
/// terminal's, or names another delivery or attempt, or is missing where the product requires
/// one, is refused as an `invalid_proof` dead letter (which is what counts it: a refused
/// transaction leaves no metric of its own).
fn proof<'r>(
    cx: &mut Cx<'_>,
    row: &Row,
    message_id: Uuid,
    required: bool,
    acknowledgement: Option<(&Acknowledgement, &'r serde_json::Value)>,
) -> Result<Proof<'r>, Failure> {
    let invalid = |detail: String| Err(Failure::permanent(DeadLetterReason::InvalidProof, detail));
    let Some((ack, signed)) = acknowledgement else {
        if required {
            return invalid(format!(
                "delivery {} needs the terminal's signed acknowledgement (its product's proof_of_delivery is \"terminal\"); the receipt has none",
                row.id
            ));
        }
        return Ok(Proof::Gateway);
    };
    if ack.terminal_id != row.terminal_id || ack.delivery_id != row.id || ack.message_id != message_id {
        return invalid(format!(
            "the acknowledgement names {} / delivery {} / message {}, not {} / delivery {} / message {message_id}",
            ack.terminal_id, ack.delivery_id, ack.message_id, row.terminal_id, row.id
        ));
    }
    let Some(terminal) = cx.terminal(&row.terminal_id)? else {
        return invalid(format!("terminal {} is no longer registered", row.terminal_id));
    };
    if crypto::verify_registered(&terminal.public_key_pem, signed).is_err() {
        return invalid(format!(
            "the acknowledgement of delivery {} is not signed by terminal {}",
            row.id, terminal.id
        ));
    }
    if ack.content_sha256 != content_sha256(&row.content) {
        return Ok(Proof::OtherContent);
    }
    Ok(Proof::Terminal(signed))
}

/// content_sha256 is what a terminal's acknowledgement carries for a delivery's content: the
/// SHA-256 of its canonical JSON (RFC 8785), whatever white space or key order reached the terminal.
pub fn content_sha256(content: &serde_json::Value) -> String {
    crypto::sha256_hex(crypto::canonical_json(content).as_bytes())
}

/// receipted reads, and locks in id order, the deliveries that receipts name, each with the
/// attempt its receipt names if that attempt was made, and the proof of delivery its product
/// asks for: one round trip.
fn receipted(conn: &mut PgConnection, receipts: &[&DeliveryReceipt]) -> QueryResult<Vec<Receipted>> {
    use diesel::sql_types::{Array, Int4, Uuid as SqlUuid};
    crate::runtime::db::prepared(
        "SELECT d.*, a.payload_sha256, a.outcome AS attempt_outcome, a.message_id,
                CASE WHEN d.kind IN ('certificate', 'asset')
                     THEN COALESCE((SELECT p.proof_of_delivery FROM assets x JOIN products p ON p.id = x.product_id
                                    WHERE x.id = d.asset_id), 'gateway')
                     ELSE 'gateway' END AS proof_required
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
fn complete(
    cx: &mut Cx<'_>,
    deliveries: &Deliveries,
    acknowledged: &[(&Row, i32, Option<&serde_json::Value>)],
) -> Result<(), Failure> {
    use diesel::sql_types::{Array, Int4, Jsonb, Nullable, Timestamptz, Uuid as SqlUuid};
    if acknowledged.is_empty() {
        return Ok(());
    }
    let now = cx.now;
    // A late receipt for an earlier attempt completes the delivery: a newer attempt still in
    // flight is closed, so that nothing waits on a receipt that no longer matters. (With one
    // attempt made there is no other.)
    for (row, attempt, _) in acknowledged.iter().filter(|(row, _, _)| row.attempts > 1) {
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
    // latencies below, and for a certificate or an asset whether its order has a recipient other
    // than its orderer (who is then told when the order is complete).
    let delivered: Vec<Delivered> = crate::runtime::db::prepared(
        "WITH acknowledged AS (
           UPDATE delivery_attempts a SET outcome = 'acknowledged', finished_at = $now
           FROM unnest($delivery_ids::uuid[], $attempts::int4[]) AS t(delivery_id, attempt)
           WHERE a.delivery_id = t.delivery_id AND a.attempt = t.attempt
         )
         UPDATE deliveries d SET status = 'delivered', delivered_at = $now,
                proof = CASE WHEN t.acknowledgement IS NULL THEN 'gateway' ELSE 'terminal' END,
                acknowledgement = t.acknowledgement
         FROM unnest($delivery_ids::uuid[], $acknowledgements::jsonb[]) AS t(id, acknowledgement)
         WHERE d.id = t.id
         RETURNING d.id, d.order_id,
                   (SELECT o.created_at FROM orders o WHERE o.id = d.order_id) AS placed_at,
                   (SELECT c.exchanged_at FROM exchange_certificates c WHERE c.asset_id = d.asset_id) AS exchanged_at,
                   d.kind IN ('certificate', 'asset')
                     AND (SELECT NOT (o.recipient_terminal_ids <@ ARRAY[o.orderer_terminal_id])
                          FROM orders o WHERE o.id = d.order_id) AS for_another",
    )
    .bind::<Timestamptz, _>("now", now)
    .bind::<Array<SqlUuid>, _>("delivery_ids", acknowledged.iter().map(|(row, _, _)| row.id).collect::<Vec<_>>())
    .bind::<Array<Int4>, _>("attempts", acknowledged.iter().map(|(_, attempt, _)| *attempt).collect::<Vec<_>>())
    .bind::<Array<Nullable<Jsonb>>, _>(
        "acknowledgements",
        acknowledged.iter().map(|(_, _, ack)| ack.cloned()).collect::<Vec<_>>(),
    )
    .load(cx.conn)?;
    let mut assets = Vec::new();
    for (row, _, ack) in acknowledged {
        metrics::delivery_proof(if ack.is_some() { "terminal" } else { "gateway" });
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
    hand_over(cx, &assets)?;
    let mut for_others: Vec<Uuid> =
        delivered.iter().filter(|d| d.for_another == Some(true)).filter_map(|d| d.order_id).collect();
    completed(cx, deliveries, &mut for_others)
}

/// completed tells the orderer of each of these orders, once, that the order is complete when
/// every certificate and asset it delivered has been acknowledged. Only orders with a recipient
/// other than the orderer are named: the orderer that is the only recipient acknowledged what it
/// received itself (`docs/product.md#completion-notice`).
///
/// The orders are locked first, in id order, by a statement of their own: two transactions that
/// complete the last two deliveries of one order then take turns, and the second, reading with a
/// snapshot taken after the first committed, sees both delivered. (A single statement that waited
/// for the lock would still read the deliveries as they were when it started.)
fn completed(cx: &mut Cx<'_>, deliveries: &Deliveries, orders: &mut Vec<Uuid>) -> Result<(), Failure> {
    use diesel::sql_types::{Array, Text, Timestamptz, Uuid as SqlUuid};
    if orders.is_empty() {
        return Ok(());
    }
    orders.sort_unstable();
    orders.dedup();
    crate::runtime::db::prepared("SELECT id FROM orders WHERE id = ANY($orders) ORDER BY id FOR UPDATE")
        .bind::<Array<SqlUuid>, _>("orders", &*orders)
        .execute(cx.conn)?;
    let ids: Vec<Uuid> = orders.iter().map(|_| Uuid::now_v7()).collect();
    let noticed: Vec<Inserted> = crate::runtime::db::prepared(
        "INSERT INTO deliveries (id, dedupe_key, kind, terminal_id, gateway_id, order_id, content, status, due_at,
                                 created_at, request_id)
         SELECT n.id, 'order:' || o.id || ':order_completed', 'message', t.id, t.gateway_id, o.id,
                jsonb_build_object('code', 'order_completed', 'text', $text, 'order_id', o.id, 'request_id', o.request_id),
                'pending', $now, $now, o.request_id
         FROM unnest($orders::uuid[], $ids::uuid[]) AS n(order_id, id)
         JOIN orders o ON o.id = n.order_id
         JOIN terminals t ON t.id = o.orderer_terminal_id
         WHERE NOT EXISTS (SELECT 1 FROM deliveries d
                           WHERE d.order_id = o.id AND d.kind IN ('certificate', 'asset') AND d.status <> 'delivered')
         ON CONFLICT (dedupe_key) DO NOTHING
         RETURNING id, due_at",
    )
    .bind::<Array<SqlUuid>, _>("orders", &*orders)
    .bind::<Array<SqlUuid>, _>("ids", &ids)
    .bind::<Text, _>("text", "Your order is complete: every recipient has received what you ordered.")
    .bind::<Timestamptz, _>("now", cx.now)
    .load(cx.conn)?;
    let due: Vec<Uuid> = noticed.iter().map(|n| n.id).collect();
    cx.outgoing.extend(super::request_sends(deliveries, &due));
    Ok(())
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
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Uuid>)]
    message_id: Option<Uuid>,
    /// "terminal" or "gateway": the proof of delivery the delivery's product asks for.
    #[diesel(sql_type = diesel::sql_types::Text)]
    proof_required: String,
}

/// Delivered is a delivery just completed, with the times its latencies are measured from.
#[derive(QueryableByName)]
struct Delivered {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Uuid>)]
    order_id: Option<Uuid>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    placed_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    exchanged_at: Option<DateTime<Utc>>,
    /// For a certificate or an asset: whether its order has a recipient other than its orderer.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bool>)]
    for_another: Option<bool>,
}

fn elapsed(from: DateTime<Utc>, to: DateTime<Utc>) -> std::time::Duration {
    (to - from).to_std().unwrap_or_default()
}
