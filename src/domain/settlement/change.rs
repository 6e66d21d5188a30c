//! `asset.change` (`docs/product.md#changes`): the holder changes an asset not yet delivered for
//! another product. It is a new purchase and a refund, run as one process whose step is stored
//! in `changes`, so that it resumes wherever it stopped (every step is a transaction that also
//! writes the next message to the outbox) and is never left half done:
//!
//! 1. `purchasing`: the new product is paid for first, through the payer's partner. Declined, the
//!    change has `failed` and nothing was done.
//! 2. `refunding`: paid; the old asset is refunded through the partner that was paid for it.
//! 3. `done`: refunded; the new order is handed to issuance, and its asset is issued and delivered
//!    as a purchase's. The old asset is `refunded` and its certificate revoked, as any refund.
//!
//! If the old asset cannot be refunded (the partner refuses, or it was delivered or expired
//! meanwhile), what was done is undone: `compensating` refunds the new payment, and the change
//! ends `compensated`, the holder keeping the old asset. If the partner refuses to give the new
//! payment back, the change is `stuck` for an operator (alert `AssetflowChangesStuck`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::refund::{self, NewRefund, Refund, RefundCause};
use super::{NewOrder, Settlement, Settlements, place};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{ChangeRequest, DeliveryKind, DeliveryModeKind, IssuanceRequested, Notice, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::contracts::topology::Pool;
use crate::domain::catalogue::{Catalogue, load_terminal};
use crate::domain::delivery::{self, NewDelivery};
use crate::domain::metrics;
use crate::domain::requests::{Authentic, Header, Requests};
use crate::domain::schema::{changes, orders, settlements};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received};
use crate::runtime::dead_letter::{self, NewDeadLetter};
use crate::runtime::outbox::Outgoing;
use serde_json::json;

/// Change is a change as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = changes)]
pub struct Change {
    pub id: Uuid,
    pub asset_id: Uuid,
    pub holder_terminal_id: String,
    pub new_product_id: String,
    pub new_order_id: Uuid,
    pub refund_id: Option<Uuid>,
    pub compensation_id: Option<Uuid>,
    pub step: String,
}

/// ChangeHandler takes `asset.change`: each request checked and carried out on its own, in turn.
pub struct ChangeHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
}

impl Handler for ChangeHandler {
    type Message = ChangeRequest;
    const MESSAGE_TYPE: &'static str = kinds::ASSET_CHANGE;

    /// Requests handled together are carried out one after another in the batch's transaction,
    /// each seeing what the ones before it did, as it would alone: one commit for all of them.
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, ChangeRequest>]) -> Result<(), Failure> {
        for Received { message, incoming } in batch {
            self.take(cx, incoming, message)?;
        }
        Ok(())
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::ASSET_CHANGE, detail)
    }
}

impl ChangeHandler {
    fn take(&self, cx: &mut Cx<'_>, incoming: &Incoming, asked: &ChangeRequest) -> Result<(), Failure> {
        let header = Header {
            message_type: kinds::ASSET_CHANGE,
            request_id: &asked.request_id,
            terminal_id: &asked.terminal_id,
            sent_at: asked.sent_at,
        };
        let Some(Authentic { terminal, content_sha256 }) = self.requests.admit(cx, incoming, &header)? else {
            return Ok(());
        };
        let refuse = |cx: &mut Cx<'_>, refused: Refused| {
            self.requests.refuse(cx, incoming, &header, Some(&terminal), Some(&content_sha256), refused)
        };
        let (asset, paid, _) = match refund::refundable_asset(cx.conn, cx.now, asked.asset_id, &asked.terminal_id)? {
            Err(refused) => return refuse(cx, refused),
            Ok(refundable) => refundable,
        };
        // The new product is paid by whoever paid for the old one: a holder who did not pay for
        // its asset (a gift) cannot charge its giver for another product.
        if paid.payer_terminal_id != terminal.id {
            let detail = format!(
                "asset {} was paid for by terminal {}: only a holder who paid for its asset may change it",
                asset.id, paid.payer_terminal_id
            );
            return refuse(cx, Refused::new(RefusalReason::NotThePayer, detail));
        }
        if asset.changing {
            let detail = format!("a change of asset {} is already under way", asset.id);
            return refuse(cx, Refused::new(RefusalReason::RefundPending, detail));
        }
        let product = match cx.product(&asked.product_id)? {
            Some(p) if p.on_sale && p.id != asset.product_id => p,
            Some(p) if p.id == asset.product_id => {
                let detail = format!("asset {} already is a {:?}", asset.id, p.id);
                return refuse(cx, Refused::new(RefusalReason::NotOnSale, detail));
            }
            Some(p) => {
                return refuse(
                    cx,
                    Refused::new(RefusalReason::NotOnSale, format!("product {:?} is not on sale", p.id)),
                );
            }
            None => {
                let detail = format!("product {:?} does not exist", asked.product_id);
                return refuse(cx, Refused::new(RefusalReason::UnknownProduct, detail));
            }
        };
        if product.certificate_expiry(cx.now) <= cx.now {
            let detail = format!("product {:?} can no longer be exchanged: its certificates have expired", product.id);
            return refuse(cx, Refused::new(RefusalReason::NotOnSale, detail));
        }
        let order = NewOrder {
            request_id: &asked.request_id,
            orderer: &terminal.id,
            payer: &paid.payer_terminal_id,
            partner_id: &paid.partner_id,
            product: &product,
            mode: DeliveryModeKind::Certificate,
            reserved_asset_id: None,
        };
        let new_order_id = place(cx.conn, &self.settlements, order, cx.now, cx.outgoing)?;
        let id = Uuid::now_v7();
        self.requests.accept(cx, &header, &content_sha256, id)?;
        diesel::insert_into(changes::table)
            .values((
                changes::id.eq(id),
                changes::request_id.eq(&asked.request_id),
                changes::asset_id.eq(asset.id),
                changes::holder_terminal_id.eq(&terminal.id),
                changes::new_product_id.eq(&product.id),
                changes::new_order_id.eq(new_order_id),
                changes::step.eq("purchasing"),
                changes::created_at.eq(cx.now),
                changes::updated_at.eq(cx.now),
            ))
            .execute(cx.conn)?;
        metrics::change("purchasing");
        tracing::info!(change_id = %id, asset_id = %asset.id, new_product = %product.id, "change started");
        Ok(())
    }
}

/// step moves a change to its next step.
fn step(
    conn: &mut PgConnection,
    change: Uuid,
    to: &'static str,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> QueryResult<()> {
    diesel::update(changes::table.find(change))
        .set((changes::step.eq(to), changes::reason.eq(reason), changes::updated_at.eq(now)))
        .execute(conn)?;
    metrics::change(to);
    tracing::info!(change_id = %change, step = to, reason, "change moved on");
    Ok(())
}

/// purchases_answered takes the partners' answers to the new purchases of changes, among orders
/// just settled (`settled`) or declined: a settled one is held back from issuance until the old
/// asset is refunded, which is asked for now. It returns the settled orders that are no change's
/// and go on to issuance as usual.
pub fn purchases_answered(
    conn: &mut PgConnection,
    settlements: &Settlements,
    settled: Vec<Uuid>,
    declined: &[Uuid],
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<Vec<Uuid>, Failure> {
    let answered: Vec<Uuid> = settled.iter().chain(declined).copied().collect();
    if answered.is_empty() {
        return Ok(settled);
    }
    let live: Vec<Change> = changes::table
        .filter(changes::new_order_id.eq_any(&answered))
        .filter(changes::step.eq("purchasing"))
        .order(changes::id)
        .select(Change::as_select())
        .for_update()
        .load(conn)?;
    if live.is_empty() {
        return Ok(settled);
    }
    for change in &live {
        if declined.contains(&change.new_order_id) {
            step(conn, change.id, "failed", Some("the new product's payment was declined"), now)?;
            tell(
                conn,
                settlements,
                change,
                "change_failed",
                "your change was not made: the payment for the new product was declined; you keep your asset".into(),
                now,
                sending,
            )?;
            continue;
        }
        refund_old(conn, settlements, change, now, sending)?;
    }
    Ok(settled.into_iter().filter(|o| !live.iter().any(|c| c.new_order_id == *o)).collect())
}

/// refund_old asks for the old asset's refund, now that the new product is paid; if the old asset
/// can no longer be refunded, the change is undone at once.
fn refund_old(
    conn: &mut PgConnection,
    settlements: &Settlements,
    change: &Change,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<(), Failure> {
    match refund::refundable_asset(conn, now, change.asset_id, &change.holder_terminal_id)? {
        Err(refused) => compensate(conn, settlements, change, &refused.detail, now, sending),
        Ok((_, paid, amount_minor)) => {
            let old = NewRefund {
                paid: &paid,
                asset_id: Some(change.asset_id),
                cause: RefundCause::Change,
                request_id: None,
                amount_minor,
            };
            let refund_id = refund::request(conn, settlements, old, now, sending)?;
            diesel::update(changes::table.find(change.id)).set(changes::refund_id.eq(refund_id)).execute(conn)?;
            step(conn, change.id, "refunding", None, now)?;
            Ok(())
        }
    }
}

/// compensate undoes a change whose old asset cannot be refunded: the new payment is refunded.
fn compensate(
    conn: &mut PgConnection,
    settlements: &Settlements,
    change: &Change,
    why: &str,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<(), Failure> {
    let paid: Settlement = settlements::table
        .filter(settlements::order_id.eq(change.new_order_id))
        .filter(settlements::kind.eq("purchase"))
        .select(Settlement::as_select())
        .first(conn)?;
    let back = NewRefund {
        paid: &paid,
        asset_id: None,
        cause: RefundCause::Change,
        request_id: None,
        amount_minor: paid.amount_minor,
    };
    let compensation = refund::request(conn, settlements, back, now, sending)?;
    diesel::update(changes::table.find(change.id)).set(changes::compensation_id.eq(compensation)).execute(conn)?;
    step(conn, change.id, "compensating", Some(why), now)?;
    let text = format!(
        "your change was not made ({why}); the payment for the new product is being refunded, and you keep your asset"
    );
    tell(conn, settlements, change, "change_failed", text, now, sending)
}

/// refund_answered carries a change on once one of its refunds was answered: the old asset's
/// (refunded: the new order goes to issuance; refused: the change is undone) or the new payment's
/// (refunded: compensated; refused: stuck for an operator). A refund of no change is left alone.
pub fn refund_answered(
    conn: &mut PgConnection,
    settlements: &Settlements,
    refund: &Refund,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<(), Failure> {
    if refund.cause != RefundCause::Change.as_str() {
        return Ok(());
    }
    let change: Change = changes::table
        .filter(changes::refund_id.eq(refund.id).or(changes::compensation_id.eq(refund.id)))
        .select(Change::as_select())
        .for_update()
        .first(conn)?;
    let refunded = refund.status == "refunded";
    match (change.step.as_str(), refunded) {
        ("refunding", true) => {
            diesel::update(orders::table.find(change.new_order_id))
                .set((orders::status.eq("issuing"), orders::updated_at.eq(now)))
                .execute(conn)?;
            for next in IssuanceRequested::for_orders(&[change.new_order_id]) {
                sending.push(
                    Outgoing::json(
                        settlements.names.internal(),
                        kinds::ISSUANCE_REQUESTED,
                        kinds::ISSUANCE_REQUESTED,
                        &next,
                    )
                    .correlated(change.new_order_id.to_string()),
                );
            }
            step(conn, change.id, "done", None, now)?;
            let text = format!(
                "your asset {} was refunded and {} is being issued to you",
                change.asset_id, change.new_product_id
            );
            tell(conn, settlements, &change, "change_completed", text, now, sending)
        }
        ("refunding", false) => {
            compensate(conn, settlements, &change, "the refund of your asset was refused", now, sending)
        }
        ("compensating", true) => {
            diesel::update(orders::table.find(change.new_order_id))
                .set((
                    orders::status.eq("failed"),
                    orders::status_reason.eq("change_compensated"),
                    orders::updated_at.eq(now),
                ))
                .execute(conn)?;
            step(conn, change.id, "compensated", None, now)?;
            Ok(())
        }
        ("compensating", false) => {
            tracing::error!(change_id = %change.id, refund_id = %refund.id, "the partner refused to return a change's new payment: the change is stuck");
            let why = "the partner refused to return the new payment";
            step(conn, change.id, "stuck", Some(why), now)?;
            diesel::update(orders::table.find(change.new_order_id))
                .set((
                    orders::status.eq("failed"),
                    orders::status_reason.eq("change_stuck"),
                    orders::updated_at.eq(now),
                ))
                .execute(conn)?;
            let refunded: Settlement =
                settlements::table.find(refund.settlement_id).select(Settlement::as_select()).first(conn)?;
            let evidence = json!({
                "change_id": change.id,
                "asset_id": change.asset_id,
                "new_order_id": change.new_order_id,
                "refund_id": refund.id,
                "settlement_id": refunded.id,
                "partner_id": refunded.partner_id,
                "amount_minor": refunded.amount_minor,
                "currency": refunded.currency,
            });
            let detail = format!(
                "change {}: the new payment of {} {} could not be refunded ({why}); settle it with partner {}",
                change.id, refunded.amount_minor, refunded.currency, refunded.partner_id
            );
            dead_letter::record(
                conn,
                &settlements.names,
                NewDeadLetter {
                    pool: Pool::Settlement.as_str(),
                    source: "settlement",
                    message_type: kinds::SETTLEMENT_INSTRUCTION.into(),
                    message_id: Some(format!("change:{}:stuck", change.id)),
                    exchange: Some(settlements.names.partners()),
                    routing_key: Some(refunded.partner_id.clone()),
                    payload: serde_json::to_vec(&evidence).expect("serializes"),
                    headers: json!({}),
                    reason: DeadLetterReason::CompensationRefused,
                    detail: detail.clone(),
                    attempts: json!([{"at": now, "error": detail}]),
                    subject_id: Some(refunded.id),
                },
            )?;
            Ok(())
        }
        (other, _) => {
            tracing::warn!(change_id = %change.id, step = other, refund_id = %refund.id, "a refund answered for a change not waiting for it");
            Ok(())
        }
    }
}

/// tell sends the holder of a change a message about it, once per `code`.
fn tell(
    conn: &mut PgConnection,
    settlements: &Settlements,
    change: &Change,
    code: &str,
    text: String,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<(), Failure> {
    let Some(terminal) = load_terminal(conn, &change.holder_terminal_id)? else { return Ok(()) };
    let notice = Notice {
        code: code.into(),
        text,
        order_id: Some(change.new_order_id),
        asset_id: Some(change.asset_id),
        certificate_id: None,
        request_id: None,
    };
    let d = NewDelivery::now(
        DeliveryKind::Message,
        format!("change:{}:{code}", change.id),
        &terminal,
        serde_json::to_value(notice).expect("serializes"),
    );
    delivery::enqueue_with(conn, &settlements.deliveries, d, now, sending)?;
    Ok(())
}
