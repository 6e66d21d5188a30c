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
use super::{NewOrder, Placed, Settlement, Settlements};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{ChangeRequest, DeliveryKind, DeliveryModeKind, IssuanceRequested, Notice, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::contracts::topology::Pool;
use crate::domain::catalogue::{Catalogue, Product, Terminal};
use crate::domain::delivery::{self, NewDelivery};
use crate::domain::metrics;
use crate::domain::requests::{Admitted, Header, Requests};
use crate::domain::schema::{changes, orders, settlements};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received, together_unless_repeated};
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

/// ChangeHandler takes `asset.change`. Changes asked together are authenticated one by one (a
/// signature each), then read in three statements (their request ids, the assets to change with
/// what a refund of them checks, and the payments for them) and started in two.
pub struct ChangeHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
}

impl Handler for ChangeHandler {
    type Message = ChangeRequest;
    const MESSAGE_TYPE: &'static str = kinds::ASSET_CHANGE;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    /// Two requests for one asset (or with one request id) are taken one after the other, the
    /// second seeing what the first did, as it would alone.
    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, ChangeRequest>]) -> Result<(), Failure> {
        together_unless_repeated(
            cx,
            batch,
            |r| [r.request_id.clone(), r.asset_id.to_string()],
            |cx, batch| self.take(cx, batch),
        )
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::ASSET_CHANGE, detail)
    }
}

fn header(asked: &ChangeRequest) -> Header<'_> {
    Header {
        message_type: kinds::ASSET_CHANGE,
        request_id: &asked.request_id,
        terminal_id: &asked.terminal_id,
        sent_at: asked.sent_at,
    }
}

impl ChangeHandler {
    /// take starts changes of distinct assets with distinct request ids, each checked as it
    /// would be alone, in the order of the checks `requests` describes.
    fn take(&self, cx: &mut Cx<'_>, batch: &[Received<'_, ChangeRequest>]) -> Result<(), Failure> {
        let req = &*self.requests;
        let admitted = req.admit_batch(cx, batch, header)?;
        if admitted.is_empty() {
            return Ok(());
        }
        let assets: Vec<Uuid> = admitted.iter().map(|a| a.message.asset_id).collect();
        let found = refund::find(cx.conn, &assets)?;
        let mut placed = Placed::default();
        let mut started = Started::default();
        for Admitted { incoming, message: asked, terminal, content_sha256: sha } in admitted {
            let header = header(asked);
            let checked = check(cx, asked, &terminal, found.get(&asked.asset_id))?;
            let (asset, paid, product) = match checked {
                Err(refused) => {
                    req.refuse(cx, incoming, &header, Some(&terminal), Some(&sha), refused)?;
                    continue;
                }
                Ok(checked) => checked,
            };
            let order = NewOrder {
                request_id: &asked.request_id,
                orderer: &terminal.id,
                payer: &paid.payer_terminal_id,
                partner_id: &paid.partner_id,
                product: &product,
                mode: DeliveryModeKind::Certificate,
                reserved_asset_id: None,
            };
            let new_order_id = placed.push(&self.settlements, order, cx.now, cx.outgoing);
            started.push(&header, sha, asset.id, &product.id, new_order_id);
        }
        placed.write(cx.conn, cx.now)?;
        started.write(cx.conn, cx.now)?;
        Ok(())
    }
}

/// check judges a change of the asset `asked` names (as [`refund::find`] found it): it must be
/// refundable, by the holder who paid for it, with no other change under way, for a product on
/// sale that it is not already. It returns the asset, its payment and the new product.
fn check(
    cx: &mut Cx<'_>,
    asked: &ChangeRequest,
    terminal: &Terminal,
    found: Option<&refund::Found>,
) -> Result<Result<(refund::Refundable, Settlement, Product), Refused>, Failure> {
    macro_rules! refuse {
        ($reason:expr, $($detail:tt)*) => { return Ok(Err(Refused::new($reason, format!($($detail)*)))) };
    }
    let (asset, paid, _) = match refund::judge(found, asked.asset_id, &asked.terminal_id, cx.now) {
        Err(refused) => return Ok(Err(refused)),
        Ok(refundable) => refundable,
    };
    // The new product is paid by whoever paid for the old one: a holder who did not pay for
    // its asset (a gift) cannot charge its giver for another product.
    if paid.payer_terminal_id != terminal.id {
        refuse!(
            RefusalReason::NotThePayer,
            "asset {} was paid for by terminal {}: only a holder who paid for its asset may change it",
            asset.id,
            paid.payer_terminal_id
        )
    }
    if asset.changing {
        refuse!(RefusalReason::RefundPending, "a change of asset {} is already under way", asset.id)
    }
    let product = match cx.product(&asked.product_id)? {
        Some(p) if p.on_sale && p.id != asset.product_id => p,
        Some(p) if p.id == asset.product_id => {
            refuse!(RefusalReason::NotOnSale, "asset {} already is a {:?}", asset.id, p.id)
        }
        Some(p) => refuse!(RefusalReason::NotOnSale, "product {:?} is not on sale", p.id),
        None => refuse!(RefusalReason::UnknownProduct, "product {:?} does not exist", asked.product_id),
    };
    if product.certificate_expiry(cx.now) <= cx.now {
        refuse!(
            RefusalReason::NotOnSale,
            "product {:?} can no longer be exchanged: its certificates have expired",
            product.id
        )
    }
    Ok(Ok((asset, paid, product)))
}

/// Started is changes to record together, with the requests that asked for them, for
/// [`Started::write`].
#[derive(Default)]
struct Started {
    ids: Vec<Uuid>,
    request_ids: Vec<String>,
    terminals: Vec<String>,
    content_sha256s: Vec<String>,
    sent_at: Vec<DateTime<Utc>>,
    assets: Vec<Uuid>,
    products: Vec<String>,
    orders: Vec<Uuid>,
}

impl Started {
    fn push(&mut self, header: &Header<'_>, content_sha256: String, asset: Uuid, product: &str, new_order: Uuid) {
        let id = Uuid::now_v7();
        metrics::change("purchasing");
        tracing::info!(change_id = %id, asset_id = %asset, new_product = %product, "change started");
        self.ids.push(id);
        self.request_ids.push(header.request_id.to_string());
        self.terminals.push(header.terminal_id.to_string());
        self.content_sha256s.push(content_sha256);
        self.sent_at.push(header.sent_at);
        self.assets.push(asset);
        self.products.push(product.to_string());
        self.orders.push(new_order);
    }

    /// Started::write records the requests as accepted, each naming its change, and the changes
    /// at their first step, `purchasing`, in one round trip whatever their number.
    fn write(&self, conn: &mut PgConnection, now: DateTime<Utc>) -> QueryResult<()> {
        use diesel::sql_types::{Array, Text, Timestamptz, Uuid as SqlUuid};
        if self.ids.is_empty() {
            return Ok(());
        }
        crate::runtime::db::prepared(
            "WITH recorded AS (
               INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at,
                                              received_at, outcome, subject_id)
               SELECT request_id, terminal_id, $message_type, sha, sent_at, $now, 'accepted', id
               FROM unnest($ids::uuid[], $request_ids::text[], $terminals::text[], $content_sha256s::text[], $sent_at::timestamptz[])
                    AS r(id, request_id, terminal_id, sha, sent_at)
             )
             INSERT INTO changes (id, request_id, asset_id, holder_terminal_id, new_product_id, new_order_id, step,
                                  created_at, updated_at)
             SELECT id, request_id, asset_id, terminal_id, product_id, order_id, 'purchasing', $now, $now
             FROM unnest($ids::uuid[], $request_ids::text[], $assets::uuid[], $terminals::text[], $products::text[], $orders::uuid[])
                  AS c(id, request_id, asset_id, terminal_id, product_id, order_id)",
        )
        .bind::<Timestamptz, _>("now", now)
        .bind::<Text, _>("message_type", kinds::ASSET_CHANGE)
        .bind::<Array<SqlUuid>, _>("ids", &self.ids)
        .bind::<Array<Text>, _>("request_ids", &self.request_ids)
        .bind::<Array<Text>, _>("terminals", &self.terminals)
        .bind::<Array<Text>, _>("content_sha256s", &self.content_sha256s)
        .bind::<Array<Timestamptz>, _>("sent_at", &self.sent_at)
        .bind::<Array<SqlUuid>, _>("assets", &self.assets)
        .bind::<Array<Text>, _>("products", &self.products)
        .bind::<Array<SqlUuid>, _>("orders", &self.orders)
        .execute(conn)?;
        Ok(())
    }
}

/// step moves a change to its next step.
fn step(cx: &mut Cx<'_>, change: Uuid, to: &'static str, reason: Option<&str>) -> QueryResult<()> {
    diesel::update(changes::table.find(change))
        .set((changes::step.eq(to), changes::reason.eq(reason), changes::updated_at.eq(cx.now)))
        .execute(cx.conn)?;
    metrics::change(to);
    tracing::info!(change_id = %change, step = to, reason, "change moved on");
    Ok(())
}

/// stepped moves changes on together to their next step, `to`, each naming a refund under way
/// (`refunds`, one for each, or none): one statement whatever their number.
fn stepped(cx: &mut Cx<'_>, changes: &[Uuid], to: &'static str, refunds: Option<&[Uuid]>) -> QueryResult<()> {
    use diesel::sql_types::{Array, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    if changes.is_empty() {
        return Ok(());
    }
    let refunds: Vec<Option<Uuid>> = match refunds {
        Some(refunds) => refunds.iter().copied().map(Some).collect(),
        None => vec![None; changes.len()],
    };
    crate::runtime::db::prepared(
        "UPDATE changes c SET step = $to, reason = NULL, updated_at = $now, refund_id = coalesce(t.refund_id, c.refund_id)
         FROM unnest($changes::uuid[], $refunds::uuid[]) AS t(id, refund_id)
         WHERE c.id = t.id",
    )
    .bind::<Text, _>("to", to)
    .bind::<Timestamptz, _>("now", cx.now)
    .bind::<Array<SqlUuid>, _>("changes", changes)
    .bind::<Array<Nullable<SqlUuid>>, _>("refunds", &refunds)
    .execute(cx.conn)?;
    for change in changes {
        metrics::change(to);
        tracing::info!(change_id = %change, step = to, "change moved on");
    }
    Ok(())
}

/// purchases_answered takes the partners' answers to the new purchases of changes, among orders
/// just settled (`settled`) or declined: a settled one is held back from issuance until the old
/// asset is refunded, which is asked for now. It returns the settled orders that are no change's
/// and go on to issuance as usual.
pub fn purchases_answered(
    cx: &mut Cx<'_>,
    settlements: &Settlements,
    settled: Vec<Uuid>,
    declined: &[Uuid],
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
        .load(cx.conn)?;
    if live.is_empty() {
        return Ok(settled);
    }
    let (failed, paid): (Vec<&Change>, Vec<&Change>) = live.iter().partition(|c| declined.contains(&c.new_order_id));
    for change in failed {
        step(cx, change.id, "failed", Some("the new product's payment was declined"))?;
        let text = "your change was not made: the payment for the new product was declined; you keep your asset";
        tell(cx, settlements, change, "change_failed", text.into())?;
    }
    refund_old(cx, settlements, &paid)?;
    Ok(settled.into_iter().filter(|o| !live.iter().any(|c| c.new_order_id == *o)).collect())
}

/// refund_old asks for the old assets' refunds, now that the new products are paid, in a fixed
/// number of statements whatever their number; a change whose old asset can no longer be refunded
/// is undone at once.
fn refund_old(cx: &mut Cx<'_>, settlements: &Settlements, paid: &[&Change]) -> Result<(), Failure> {
    if paid.is_empty() {
        return Ok(());
    }
    let assets: Vec<Uuid> = paid.iter().map(|c| c.asset_id).collect();
    let found = refund::find(cx.conn, &assets)?;
    let mut refunding = refund::Refunding::default();
    let (mut moving, mut refunds) = (Vec::with_capacity(paid.len()), Vec::with_capacity(paid.len()));
    for change in paid {
        match refund::judge(found.get(&change.asset_id), change.asset_id, &change.holder_terminal_id, cx.now) {
            Err(refused) => compensate(cx, settlements, change, &refused.detail)?,
            Ok((_, paid, amount_minor)) => {
                let old = NewRefund {
                    paid: &paid,
                    asset_id: Some(change.asset_id),
                    cause: RefundCause::Change,
                    request_id: None,
                    amount_minor,
                };
                refunds.push(refunding.push(settlements, old, None, cx.now, cx.outgoing));
                moving.push(change.id);
            }
        }
    }
    refunding.write(cx.conn, cx.now)?;
    stepped(cx, &moving, "refunding", Some(&refunds))?;
    Ok(())
}

/// compensate undoes a change whose old asset cannot be refunded: the new payment is refunded.
fn compensate(cx: &mut Cx<'_>, settlements: &Settlements, change: &Change, why: &str) -> Result<(), Failure> {
    let paid: Settlement = settlements::table
        .filter(settlements::order_id.eq(change.new_order_id))
        .filter(settlements::kind.eq("purchase"))
        .select(Settlement::as_select())
        .first(cx.conn)?;
    let back = NewRefund {
        paid: &paid,
        asset_id: None,
        cause: RefundCause::Change,
        request_id: None,
        amount_minor: paid.amount_minor,
    };
    let compensation = refund::request(cx.conn, settlements, back, cx.now, cx.outgoing)?;
    diesel::update(changes::table.find(change.id)).set(changes::compensation_id.eq(compensation)).execute(cx.conn)?;
    step(cx, change.id, "compensating", Some(why))?;
    let text = format!(
        "your change was not made ({why}); the payment for the new product is being refunded, and you keep your asset"
    );
    tell(cx, settlements, change, "change_failed", text)
}

/// refunds_answered carries changes on once their refunds were answered: the old asset's
/// (refunded: the new order goes to issuance; refused: the change is undone) or the new payment's
/// (refunded: compensated; refused: stuck for an operator). Refunds of no change are left alone.
/// The changes that are done, the usual way, are moved on together, their new orders handed to
/// issuance in one message.
pub fn refunds_answered(cx: &mut Cx<'_>, settlements: &Settlements, refunds: &[Refund]) -> Result<(), Failure> {
    let ours: Vec<Uuid> = refunds.iter().filter(|r| r.cause == RefundCause::Change.as_str()).map(|r| r.id).collect();
    if ours.is_empty() {
        return Ok(());
    }
    let live: Vec<Change> = changes::table
        .filter(changes::refund_id.eq_any(&ours).or(changes::compensation_id.eq_any(&ours)))
        .order(changes::id)
        .select(Change::as_select())
        .for_update()
        .load(cx.conn)?;
    let mut done = Vec::new();
    for refund in refunds.iter().filter(|r| ours.contains(&r.id)) {
        let Some(change) = live.iter().find(|c| c.refund_id == Some(refund.id) || c.compensation_id == Some(refund.id))
        else {
            tracing::warn!(refund_id = %refund.id, "a change's refund answered, but no change names it");
            continue;
        };
        match (change.step.as_str(), refund.status == "refunded") {
            ("refunding", true) => done.push(change),
            _ => refund_answered(cx, settlements, change, refund)?,
        }
    }
    if done.is_empty() {
        return Ok(());
    }
    let orders: Vec<Uuid> = done.iter().map(|c| c.new_order_id).collect();
    diesel::update(orders::table)
        .filter(orders::id.eq_any(&orders))
        .set((orders::status.eq("issuing"), orders::updated_at.eq(cx.now)))
        .execute(cx.conn)?;
    for next in IssuanceRequested::for_orders(&orders) {
        let first = next.order_ids[0];
        cx.publish(
            Outgoing::json(settlements.names.internal(), kinds::ISSUANCE_REQUESTED, kinds::ISSUANCE_REQUESTED, &next)
                .correlated(first.to_string()),
        );
    }
    let ids: Vec<Uuid> = done.iter().map(|c| c.id).collect();
    stepped(cx, &ids, "done", None)?;
    cx.read_terminals(done.iter().map(|c| c.holder_terminal_id.as_str()))?;
    let mut told = Vec::with_capacity(done.len());
    for change in done {
        let text =
            format!("your asset {} was refunded and {} is being issued to you", change.asset_id, change.new_product_id);
        told.extend(notice(cx, change, "change_completed", text)?);
    }
    delivery::enqueue_many(cx, &settlements.deliveries, &told)?;
    Ok(())
}

/// refund_answered carries a change on, the unusual way, once one of its refunds was answered:
/// the old asset's refund refused, or the new payment's answered.
fn refund_answered(
    cx: &mut Cx<'_>,
    settlements: &Settlements,
    change: &Change,
    refund: &Refund,
) -> Result<(), Failure> {
    let refunded = refund.status == "refunded";
    match (change.step.as_str(), refunded) {
        ("refunding", false) => compensate(cx, settlements, change, "the refund of your asset was refused"),
        ("compensating", true) => {
            diesel::update(orders::table.find(change.new_order_id))
                .set((
                    orders::status.eq("failed"),
                    orders::status_reason.eq("change_compensated"),
                    orders::updated_at.eq(cx.now),
                ))
                .execute(cx.conn)?;
            step(cx, change.id, "compensated", None)?;
            Ok(())
        }
        ("compensating", false) => {
            tracing::error!(change_id = %change.id, refund_id = %refund.id, "the partner refused to return a change's new payment: the change is stuck");
            let why = "the partner refused to return the new payment";
            step(cx, change.id, "stuck", Some(why))?;
            diesel::update(orders::table.find(change.new_order_id))
                .set((
                    orders::status.eq("failed"),
                    orders::status_reason.eq("change_stuck"),
                    orders::updated_at.eq(cx.now),
                ))
                .execute(cx.conn)?;
            let refunded: Settlement =
                settlements::table.find(refund.settlement_id).select(Settlement::as_select()).first(cx.conn)?;
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
            let now = cx.now;
            dead_letter::record(
                cx.conn,
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
fn tell(cx: &mut Cx<'_>, settlements: &Settlements, change: &Change, code: &str, text: String) -> Result<(), Failure> {
    if let Some(d) = notice(cx, change, code, text)? {
        delivery::enqueue(cx, &settlements.deliveries, d)?;
    }
    Ok(())
}

/// notice is a message to the holder of a change about it, keyed so that it goes once per `code`;
/// None if the holder is no longer registered.
fn notice(cx: &mut Cx<'_>, change: &Change, code: &str, text: String) -> Result<Option<NewDelivery>, Failure> {
    let Some(terminal) = cx.terminal(&change.holder_terminal_id)? else { return Ok(None) };
    let notice = Notice {
        code: code.into(),
        text,
        order_id: Some(change.new_order_id),
        asset_id: Some(change.asset_id),
        certificate_id: None,
        request_id: None,
    };
    Ok(Some(NewDelivery::now(
        DeliveryKind::Message,
        format!("change:{}:{code}", change.id),
        &terminal,
        serde_json::to_value(notice).expect("serializes"),
    )))
}
