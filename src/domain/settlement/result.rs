//! `settlement.result`: a partner's answer. Settled orders go on to issuance; declined orders
//! end, and the orderer is told. An answer to a refund goes to [`refund::answered`].

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use std::sync::Arc;

use super::{Settlement, Settlements, change, notify_orderer, refund};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{IssuanceRequested, SettlementOutcome, SettlementResult, kinds};
use crate::domain::catalogue::PartyKind;
use crate::domain::schema::settlements;
use crate::domain::{metrics, parties};
use crate::runtime::consumer::{Cx, Failure, Handler, Received, together_unless_repeated};
use crate::runtime::outbox::Outgoing;

/// ResultHandler takes `settlement.result`. Answers handled together are read in one statement and
/// recorded in one more.
pub struct ResultHandler {
    pub settlements: Arc<Settlements>,
}

impl Handler for ResultHandler {
    type Message = SettlementResult;
    const MESSAGE_TYPE: &'static str = kinds::SETTLEMENT_RESULT;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, SettlementResult>]) -> Result<(), Failure> {
        together_unless_repeated(cx, batch, |r| [r.settlement_id], |cx, batch| take(cx, &self.settlements, batch))
    }
}

/// take carries out answers for distinct settlements, each only from the partner its settlement
/// went to (`docs/security.md#who-may-answer`).
fn take(cx: &mut Cx<'_>, settled: &Settlements, batch: &[Received<'_, SettlementResult>]) -> Result<(), Failure> {
    let mut ids: Vec<Uuid> = batch.iter().map(|r| r.message.settlement_id).collect();
    // Locked in id order, so that two transactions naming the same settlements cannot deadlock.
    ids.sort_unstable();
    let settlements: Vec<Settlement> = settlements::table
        .filter(settlements::id.eq_any(&ids))
        .order(settlements::id)
        .select(Settlement::as_select())
        .for_update()
        .load(cx.conn)?;
    let now = cx.now;
    let mut answers = Answers::default();
    let mut declined = Vec::new();
    let mut issuing = Vec::new();
    let mut refunds = Vec::new();
    for Received { message: result, incoming } in batch {
        let Some(s) = settlements.iter().find(|s| s.id == result.settlement_id) else {
            return Err(Failure::permanent(
                DeadLetterReason::UnknownSettlement,
                format!("no settlement {}", result.settlement_id),
            ));
        };
        let broker_user = settled.partners.get(&s.partner_id).and_then(|p| p.broker_user.as_deref());
        parties::prove(cx, PartyKind::Partner, &s.partner_id, broker_user, incoming)?;
        if s.partner_id != result.partner_id {
            return Err(Failure::permanent(
                DeadLetterReason::UnknownSettlement,
                format!("settlement {} belongs to partner {}, not {}", s.id, s.partner_id, result.partner_id),
            ));
        }
        match s.status.as_str() {
            // A late answer after the instruction was abandoned still counts: the payer may have paid.
            "instructed" | "abandoned" => {}
            done if done == result.outcome.as_str() => continue, // The same answer again.
            done => {
                return Err(Failure::permanent(
                    DeadLetterReason::ConflictingResult,
                    format!("settlement {} was already {done}; partner now says {}", s.id, result.outcome.as_str()),
                ));
            }
        }
        let outcome: &'static str = result.outcome.as_str();
        if s.kind == "refund" {
            refunds.push(refund::Answered { settlement: s, result });
            continue;
        }
        match result.outcome {
            SettlementOutcome::Settled => {
                answers.push(s, result, "issuing", None);
                issuing.push(s.order_id);
            }
            SettlementOutcome::Declined => {
                let reason = result.reason.clone().unwrap_or_else(|| "declined by the partner".into());
                answers.push(s, result, "declined", Some(reason.clone()));
                declined.push((s.order_id, reason));
            }
        }
        metrics::settlement_answered(&s.partner_id, outcome, (now - s.instructed_at).to_std().unwrap_or_default());
        tracing::info!(order_id = %s.order_id, settlement_id = %s.id, outcome, "settlement answered");
    }
    answers.write(cx.conn, now)?;
    let issuing = not_revoked(cx, settled, &settlements, issuing)?;
    let declined_orders: Vec<Uuid> = declined.iter().map(|(order, _)| *order).collect();
    reopen_declined(cx, &declined_orders)?;
    let issuing = change::purchases_answered(cx, settled, issuing, &declined_orders)?;
    for refund::Answered { settlement: s, result } in &refunds {
        metrics::settlement_answered(
            &s.partner_id,
            result.outcome.as_str(),
            (now - s.instructed_at).to_std().unwrap_or_default(),
        );
    }
    let refunds = refund::answered(cx, settled, &refunds)?;
    change::refunds_answered(cx, settled, &refunds)?;
    // The orders settled together are issued together: one message for all of them.
    for next in IssuanceRequested::for_orders(&issuing) {
        let first = next.order_ids[0];
        cx.publish(
            Outgoing::json(settled.names.internal(), kinds::ISSUANCE_REQUESTED, kinds::ISSUANCE_REQUESTED, &next)
                .correlated(first.to_string()),
        );
    }
    for (order_id, reason) in declined {
        let text = format!("your payment was declined: {reason}");
        notify_orderer(cx.conn, settled, order_id, "order_declined", text, now, cx.outgoing)?;
    }
    Ok(())
}

/// Answers are partners' answers to record, column by column, for [`Answers::write`].
#[derive(Default)]
struct Answers {
    settlements: Vec<Uuid>,
    outcomes: Vec<&'static str>,
    references: Vec<String>,
    reasons: Vec<Option<String>>,
    orders: Vec<Uuid>,
    order_statuses: Vec<&'static str>,
    order_reasons: Vec<Option<String>>,
}

impl Answers {
    fn push(
        &mut self,
        s: &Settlement,
        result: &SettlementResult,
        order_status: &'static str,
        order_reason: Option<String>,
    ) {
        self.settlements.push(s.id);
        self.outcomes.push(result.outcome.as_str());
        self.references.push(result.partner_reference.clone());
        self.reasons.push(result.reason.clone());
        self.orders.push(s.order_id);
        self.order_statuses.push(order_status);
        self.order_reasons.push(order_reason);
    }

    /// Answers::write records the answers on their settlements and moves their orders on: one
    /// round trip, whatever their number.
    fn write(&self, conn: &mut PgConnection, now: DateTime<Utc>) -> QueryResult<()> {
        use diesel::sql_types::{Array, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        if self.settlements.is_empty() {
            return Ok(());
        }
        crate::runtime::db::prepared(
            "WITH answered AS (
               UPDATE settlements s SET status = t.outcome, partner_reference = t.reference, reason = t.reason,
                                        answered_at = $now, answer_due_at = NULL
               FROM unnest($settlements::uuid[], $outcomes::text[], $references::text[], $reasons::text[]) AS t(id, outcome, reference, reason)
               WHERE s.id = t.id
             )
             UPDATE orders o SET status = t.status, status_reason = t.reason, updated_at = $now
             FROM unnest($orders::uuid[], $order_statuses::text[], $order_reasons::text[]) AS t(id, status, reason)
             WHERE o.id = t.id",
        )
        .bind::<Timestamptz, _>("now", now)
        .bind::<Array<SqlUuid>, _>("settlements", &self.settlements)
        .bind::<Array<Text>, _>("outcomes", &self.outcomes)
        .bind::<Array<Text>, _>("references", &self.references)
        .bind::<Array<Nullable<Text>>, _>("reasons", &self.reasons)
        .bind::<Array<SqlUuid>, _>("orders", &self.orders)
        .bind::<Array<Text>, _>("order_statuses", &self.order_statuses)
        .bind::<Array<Nullable<Text>>, _>("order_reasons", &self.order_reasons)
        .execute(conn)?;
        Ok(())
    }
}

/// not_revoked keeps the settled orders that may be issued. An order placed by submitting a
/// receipt certificate is issued only if the certificate was not revoked meanwhile (it expired
/// while its payment was on its way): then the payment bought nothing, is refunded at once, and
/// the order fails (`docs/product.md#receipt-certificates`). The certificates are locked, so the
/// `bookings` scan revoking one waits for this transaction, or this one sees the revocation.
fn not_revoked(
    cx: &mut Cx<'_>,
    settled: &Settlements,
    settlements: &[Settlement],
    issuing: Vec<Uuid>,
) -> Result<Vec<Uuid>, Failure> {
    use crate::domain::schema::{orders, receipt_certificates};
    if issuing.is_empty() {
        return Ok(issuing);
    }
    let receipts: Vec<(Uuid, Uuid, String)> = receipt_certificates::table
        .filter(receipt_certificates::order_id.eq_any(&issuing))
        .order(receipt_certificates::id)
        .select((
            receipt_certificates::id,
            receipt_certificates::order_id.assume_not_null(),
            receipt_certificates::status,
        ))
        .for_update()
        .load(cx.conn)?;
    if receipts.is_empty() {
        return Ok(issuing);
    }
    let issued: Vec<Uuid> =
        receipts.iter().filter(|(_, _, status)| status != "revoked").map(|(id, _, _)| *id).collect();
    if !issued.is_empty() {
        diesel::update(receipt_certificates::table)
            .filter(receipt_certificates::id.eq_any(&issued))
            .set((receipt_certificates::status.eq("issued"), receipt_certificates::updated_at.eq(cx.now)))
            .execute(cx.conn)?;
    }
    let mut revoked = Vec::new();
    for (id, order_id, _) in receipts.iter().filter(|(_, _, status)| status == "revoked") {
        let paid = settlements
            .iter()
            .find(|s| s.order_id == *order_id && s.kind == "purchase")
            .expect("the order's purchase was settled here");
        diesel::update(orders::table.find(order_id))
            .set((
                orders::status.eq("failed"),
                orders::status_reason.eq("receipt_certificate_revoked"),
                orders::updated_at.eq(cx.now),
            ))
            .execute(cx.conn)?;
        let late = refund::NewRefund {
            paid,
            asset_id: None,
            cause: refund::RefundCause::LateSettlement,
            request_id: None,
            amount_minor: paid.amount_minor,
        };
        refund::request(cx.conn, settled, late, cx.now, cx.outgoing)?;
        let text = format!(
            "receipt certificate {id} was revoked before your payment settled: nothing is issued, and the payment is refunded"
        );
        notify_orderer(cx.conn, settled, *order_id, "payment_refunded", text, cx.now, cx.outgoing)?;
        tracing::info!(receipt_certificate_id = %id, %order_id, "a payment settled after its receipt certificate was revoked: refunded");
        revoked.push(*order_id);
    }
    Ok(issuing.into_iter().filter(|o| !revoked.contains(o)).collect())
}

/// reopen_declined gives back the receipt certificates whose submission's payment was declined:
/// the right to buy still stands, until the certificate expires, and may be submitted again.
fn reopen_declined(cx: &mut Cx<'_>, declined: &[Uuid]) -> Result<(), Failure> {
    use crate::domain::schema::receipt_certificates;
    if declined.is_empty() {
        return Ok(());
    }
    diesel::update(receipt_certificates::table)
        .filter(receipt_certificates::order_id.eq_any(declined))
        .filter(receipt_certificates::status.eq("submitted"))
        .set((
            receipt_certificates::status.eq("open"),
            receipt_certificates::order_id.eq(None::<Uuid>),
            receipt_certificates::submit_request_id.eq(None::<String>),
            receipt_certificates::status_reason.eq("payment_declined"),
            receipt_certificates::updated_at.eq(cx.now),
        ))
        .execute(cx.conn)?;
    Ok(())
}
