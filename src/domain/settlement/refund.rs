//! Refunds (`docs/product.md#refunds`): `asset.refund` from a holder, and every other cause of a
//! refund (a change of product, a payment that settled after what it paid for was revoked), as
//! settlements of their own kind through the partner that was paid.
//!
//! A refund is a `refunds` row (what it is for, and its state: requested, then refunded or
//! failed) beside a `settlements` row of kind `refund`, which the partner is instructed and
//! answers like a purchase, with the same timeouts, retries and dead letters. The database keeps
//! an order's refunds within what it paid (migration 000010). Nothing changes for the asset until
//! the partner confirms: only then is it `refunded` and its certificate revoked. While a refund is
//! under way the asset is neither exchanged nor sent.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{Settlement, Settlements, answer_by, instruction};
use crate::contracts::messages::{DeliveryKind, Notice, RefundRequest, SettlementOutcome, SettlementResult, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::domain::catalogue::load_terminal;
use crate::domain::delivery::{self, NewDelivery};
use crate::domain::metrics;
use crate::domain::requests::{Authentic, Header, Requests};
use crate::domain::schema::{
    assets, changes, deliveries, exchange_certificates, orders, refunds, reminder_schedule, settlements,
};
use crate::domain::status::{self, Cause, Status};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received};
use crate::runtime::outbox::Outgoing;

/// RefundCause is why a refund is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundCause {
    /// The holder asked (`asset.refund`).
    Holder,
    /// The first half of a change of product (`asset.change`).
    Change,
    /// A payment that settled after what it paid for was revoked: it bought nothing.
    LateSettlement,
    /// The holder answered an issuer's change with a refund (or it was the default).
    IssuerChange,
}

impl RefundCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundCause::Holder => "holder",
            RefundCause::Change => "change",
            RefundCause::LateSettlement => "late_settlement",
            RefundCause::IssuerChange => "issuer_change",
        }
    }
}

/// Refund is a refund as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = refunds)]
pub struct Refund {
    pub id: Uuid,
    pub settlement_id: Uuid,
    pub order_id: Uuid,
    pub asset_id: Option<Uuid>,
    pub cause: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
}

/// NewRefund is a refund to ask of the partner that settled `paid`.
pub struct NewRefund<'a> {
    pub paid: &'a Settlement,
    pub asset_id: Option<Uuid>,
    pub cause: RefundCause,
    /// The holder's request, when one asked.
    pub request_id: Option<&'a str>,
    pub amount_minor: i64,
}

/// paid is the settled purchase of an order, if its payment settled.
pub fn paid(conn: &mut PgConnection, order_id: Uuid) -> QueryResult<Option<Settlement>> {
    settlements::table
        .filter(settlements::order_id.eq(order_id))
        .filter(settlements::kind.eq("purchase"))
        .filter(settlements::status.eq("settled"))
        .select(Settlement::as_select())
        .first(conn)
        .optional()
}

/// asset_price is what one asset of an order cost: the order's amount shared equally among its
/// assets (a quantity for each recipient, all at the product's price).
pub fn asset_price(conn: &mut PgConnection, order_id: Uuid) -> QueryResult<i64> {
    let (amount, quantity, recipients): (i64, i32, Vec<String>) = orders::table
        .find(order_id)
        .select((orders::amount_minor, orders::quantity, orders::recipient_terminal_ids))
        .first(conn)?;
    Ok(amount / (i64::from(quantity) * recipients.len() as i64).max(1))
}

/// request records a refund with its settlement and adds the partner's instruction to `sending`,
/// for the caller to write to the outbox in its transaction. It returns the refund's id.
pub fn request(
    conn: &mut PgConnection,
    settlements: &Settlements,
    refund: NewRefund<'_>,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<Uuid> {
    let paid = refund.paid;
    let settlement = Settlement {
        id: Uuid::now_v7(),
        order_id: paid.order_id,
        kind: "refund".into(),
        partner_id: paid.partner_id.clone(),
        payer_terminal_id: paid.payer_terminal_id.clone(),
        amount_minor: refund.amount_minor,
        currency: paid.currency.clone(),
        status: "instructed".into(),
        attempts: 1,
        instructed_at: now,
        attempt_limit: None,
    };
    let answer_by = answer_by(settlements, &settlement.partner_id, now);
    diesel::insert_into(settlements::table)
        .values((
            settlements::id.eq(settlement.id),
            settlements::order_id.eq(settlement.order_id),
            settlements::kind.eq("refund"),
            settlements::partner_id.eq(&settlement.partner_id),
            settlements::payer_terminal_id.eq(&settlement.payer_terminal_id),
            settlements::amount_minor.eq(settlement.amount_minor),
            settlements::currency.eq(&settlement.currency),
            settlements::status.eq("instructed"),
            settlements::attempts.eq(1),
            settlements::answer_due_at.eq(answer_by),
            settlements::instructed_at.eq(now),
        ))
        .execute(conn)?;
    let id = Uuid::now_v7();
    diesel::insert_into(refunds::table)
        .values((
            refunds::id.eq(id),
            refunds::settlement_id.eq(settlement.id),
            refunds::order_id.eq(settlement.order_id),
            refunds::asset_id.eq(refund.asset_id),
            refunds::cause.eq(refund.cause.as_str()),
            refunds::request_id.eq(refund.request_id),
            refunds::amount_minor.eq(refund.amount_minor),
            refunds::currency.eq(&settlement.currency),
            refunds::status.eq("requested"),
            refunds::requested_at.eq(now),
        ))
        .execute(conn)?;
    sending.push(instruction(settlements, &settlement, 1, answer_by));
    metrics::refund(&settlement.partner_id, "requested");
    tracing::info!(refund_id = %id, order_id = %settlement.order_id, asset_id = ?refund.asset_id, cause = refund.cause.as_str(), amount_minor = refund.amount_minor, "refund requested");
    Ok(id)
}

/// RefundHandler takes `asset.refund`: each request checked and carried out on its own,
/// in turn.
pub struct RefundHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
}

impl Handler for RefundHandler {
    type Message = RefundRequest;
    const MESSAGE_TYPE: &'static str = kinds::ASSET_REFUND;

    /// Requests handled together are carried out one after another in the batch's transaction,
    /// each seeing what the ones before it did, as it would alone: one commit for all of them.
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, RefundRequest>]) -> Result<(), Failure> {
        for Received { message, incoming } in batch {
            self.take(cx, incoming, message)?;
        }
        Ok(())
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::ASSET_REFUND, detail)
    }
}

/// Refundable is an asset as a refund checks it, locked.
#[derive(Debug, Queryable)]
pub struct Refundable {
    pub id: Uuid,
    pub order_id: Uuid,
    pub product_id: String,
    pub holder_terminal_id: String,
    pub status: String,
    pub expires_at: DateTime<Utc>,
}

impl RefundHandler {
    fn take(&self, cx: &mut Cx<'_>, incoming: &Incoming, asked: &RefundRequest) -> Result<(), Failure> {
        let header = Header {
            message_type: kinds::ASSET_REFUND,
            request_id: &asked.request_id,
            terminal_id: &asked.terminal_id,
            sent_at: asked.sent_at,
        };
        let Some(Authentic { terminal, content_sha256 }) = self.requests.admit(cx, incoming, &header)? else {
            return Ok(());
        };
        let changing: i64 = changes::table
            .filter(changes::asset_id.eq(asked.asset_id))
            .filter(changes::step.eq_any(["purchasing", "refunding", "compensating"]))
            .count()
            .get_result(cx.conn)?;
        if changing > 0 {
            let detail = format!("a change of asset {} is under way", asked.asset_id);
            let refused = Refused::new(RefusalReason::RefundPending, detail);
            return self.requests.refuse(cx, incoming, &header, Some(&terminal), Some(&content_sha256), refused);
        }
        match refundable(cx, asked.asset_id, &asked.terminal_id)? {
            Err(refused) => {
                self.requests.refuse(cx, incoming, &header, Some(&terminal), Some(&content_sha256), refused)
            }
            Ok((asset, paid, amount_minor)) => {
                self.requests.accept(cx, &header, &content_sha256, asset.id)?;
                let refund = NewRefund {
                    paid: &paid,
                    asset_id: Some(asset.id),
                    cause: RefundCause::Holder,
                    request_id: Some(&asked.request_id),
                    amount_minor,
                };
                request(cx.conn, &self.settlements, refund, cx.now, cx.outgoing)?;
                Ok(())
            }
        }
    }
}

/// refundable checks that `holder` may have its money back for the asset, and returns the asset
/// (locked), the payment to refund from, and how much.
pub fn refundable(
    cx: &mut Cx<'_>,
    id: Uuid,
    holder: &str,
) -> Result<Result<(Refundable, Settlement, i64), Refused>, Failure> {
    refundable_asset(cx.conn, cx.now, id, holder)
}

/// refundable_asset is [`refundable`] as of `now`, for callers that are not handed a [`Cx`].
pub fn refundable_asset(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    id: Uuid,
    holder: &str,
) -> Result<Result<(Refundable, Settlement, i64), Refused>, Failure> {
    macro_rules! refuse {
        ($reason:expr, $($detail:tt)*) => { return Ok(Err(Refused::new($reason, format!($($detail)*)))) };
    }
    let asset: Option<Refundable> = assets::table
        .find(id)
        .select((
            assets::id,
            assets::order_id,
            assets::product_id,
            assets::holder_terminal_id,
            assets::status,
            assets::expires_at,
        ))
        .for_update()
        .first(conn)
        .optional()?;
    let Some(asset) = asset else { refuse!(RefusalReason::AssetUnknown, "no asset {id} was issued") };
    if asset.holder_terminal_id != holder {
        refuse!(RefusalReason::AssetNotHeld, "asset {id} is not held by terminal {holder}")
    }
    let status = Status::parse(&asset.status).expect("the CHECK constraint admits only known statuses");
    if status == Status::Expired || asset.expires_at <= now {
        refuse!(RefusalReason::RefundNotAllowed, "asset {id} has expired: no refund is due for an expired asset")
    }
    if status == Status::Refunded {
        refuse!(RefusalReason::RefundNotAllowed, "asset {id} was already refunded")
    }
    if !status.is_before_delivery() {
        refuse!(RefusalReason::RefundNotAllowed, "asset {id} was already delivered ({status})")
    }
    let under_way: Option<String> = refunds::table
        .filter(refunds::asset_id.eq(id))
        .filter(refunds::status.eq("requested"))
        .select(refunds::cause)
        .first(conn)
        .optional()?;
    if let Some(cause) = under_way {
        refuse!(RefusalReason::RefundPending, "a refund of asset {id} is already under way ({cause})")
    }
    let in_transit: i64 = deliveries::table
        .filter(deliveries::asset_id.eq(id))
        .filter(deliveries::kind.eq(DeliveryKind::Asset.as_str()))
        .filter(deliveries::status.eq("sent"))
        .count()
        .get_result(conn)?;
    if in_transit > 0 {
        refuse!(
            RefusalReason::RefundNotAllowed,
            "asset {id} is being delivered; ask again if its delivery does not complete"
        )
    }
    let Some(paid) = paid(conn, asset.order_id)? else {
        refuse!(RefusalReason::RefundNotAllowed, "the payment for asset {id} has not settled")
    };
    let amount = asset_price(conn, asset.order_id)?;
    if amount <= 0 {
        refuse!(RefusalReason::RefundNotAllowed, "asset {id} was free: there is nothing to refund")
    }
    Ok(Ok((asset, paid, amount)))
}

/// answered records a partner's answer to a refund settlement `s` (not yet answered, or
/// abandoned): refunded, the asset becomes `refunded`, its certificate is revoked, and the holder
/// is told; refused, the asset stays as it was and the holder is told why. It returns the refund.
pub fn answered(
    conn: &mut PgConnection,
    settlements: &Settlements,
    s: &Settlement,
    result: &SettlementResult,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<Refund, Failure> {
    let outcome = result.outcome.as_str();
    diesel::update(settlements::table.find(s.id))
        .set((
            settlements::status.eq(outcome),
            settlements::partner_reference.eq(&result.partner_reference),
            settlements::reason.eq(&result.reason),
            settlements::answered_at.eq(now),
            settlements::answer_due_at.eq(None::<DateTime<Utc>>),
        ))
        .execute(conn)?;
    let refund: Refund =
        refunds::table.filter(refunds::settlement_id.eq(s.id)).select(Refund::as_select()).for_update().first(conn)?;
    let (status, reason) = match result.outcome {
        SettlementOutcome::Settled => ("refunded", None),
        SettlementOutcome::Declined => {
            ("failed", Some(result.reason.clone().unwrap_or_else(|| "refused by the partner".into())))
        }
    };
    diesel::update(refunds::table.find(refund.id))
        .set((refunds::status.eq(status), refunds::reason.eq(&reason), refunds::answered_at.eq(now)))
        .execute(conn)?;
    metrics::refund(&s.partner_id, status);
    tracing::info!(refund_id = %refund.id, order_id = %refund.order_id, outcome = status, "refund answered");
    if let Some(asset) = refund.asset_id {
        let deliveries = &settlements.deliveries;
        let (holder, order_id): (String, Uuid) =
            assets::table.find(asset).select((assets::holder_terminal_id, assets::order_id)).first(conn)?;
        let (code, text) = match &reason {
            None => {
                refund_asset(conn, settlements, asset, now, sending)?;
                ("refund_completed", format!("asset {asset} was refunded: {} {}", refund.amount_minor, refund.currency))
            }
            Some(reason) => ("refund_refused", format!("the refund of asset {asset} was refused: {reason}")),
        };
        if [RefundCause::Holder.as_str(), RefundCause::IssuerChange.as_str()].contains(&refund.cause.as_str())
            && let Some(terminal) = load_terminal(conn, &holder)?
        {
            let notice = Notice {
                code: code.into(),
                text,
                order_id: Some(order_id),
                asset_id: Some(asset),
                certificate_id: None,
                request_id: None,
            };
            let d = NewDelivery::now(
                DeliveryKind::Message,
                format!("refund:{}:{code}", refund.id),
                &terminal,
                serde_json::to_value(notice).expect("serializes"),
            );
            delivery::enqueue_with(conn, deliveries, d, now, sending)?;
        }
    }
    Ok(Refund { status: status.into(), ..refund })
}

/// refund_asset makes a refunded asset `refunded` and revokes its certificate, if it has one still
/// open: its holder is sent a revocation request. An asset that went another way meanwhile (its
/// term ended) keeps its status: the money has gone back all the same.
fn refund_asset(
    conn: &mut PgConnection,
    settlements: &Settlements,
    asset: Uuid,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<(), Failure> {
    let current = status::current_for_update(conn, asset)?;
    if current.is_before_delivery() {
        status::transition(conn, asset, current, Status::Refunded, Cause::RefundSettled, None, now)?;
    } else {
        tracing::warn!(%asset, status = %current, "a refund settled for an asset that is no longer before delivery");
    }
    let revoked: Option<(Uuid, String, Uuid)> = diesel::update(exchange_certificates::table)
        .filter(exchange_certificates::asset_id.eq(asset))
        .filter(exchange_certificates::exchanged_at.is_null())
        .filter(exchange_certificates::revoked_at.is_null())
        .set(exchange_certificates::revoked_at.eq(now))
        .returning((
            exchange_certificates::id,
            exchange_certificates::holder_terminal_id,
            exchange_certificates::asset_id,
        ))
        .get_result(conn)
        .optional()?;
    let Some((certificate, holder, asset)) = revoked else { return Ok(()) };
    diesel::update(reminder_schedule::table.find(certificate))
        .set((reminder_schedule::next_stage.eq(None::<i16>), reminder_schedule::due_at.eq(None::<DateTime<Utc>>)))
        .execute(conn)?;
    let Some(terminal) = load_terminal(conn, &holder)? else { return Ok(()) };
    let notice = Notice {
        code: "certificate_revoked".into(),
        text: format!("Exchange certificate {certificate} was revoked: its asset was refunded. Please delete it."),
        order_id: None,
        asset_id: Some(asset),
        certificate_id: Some(certificate),
        request_id: None,
    };
    // The same key as past-due processing's revocation request: a certificate is asked to be
    // deleted once, whatever closed it.
    let mut d = NewDelivery::now(
        DeliveryKind::RevocationRequest,
        format!("revoke:{certificate}"),
        &terminal,
        serde_json::to_value(notice).expect("serializes"),
    );
    d.asset_id = Some(asset);
    delivery::enqueue_with(conn, &settlements.deliveries, d, now, sending)?;
    Ok(())
}

/// abandoned handles a refund whose partner did not answer any of its instructions: the refund
/// stays requested (the partner may still pay it, and its late answer counts), and a holder who
/// asked is told it is delayed.
pub fn abandoned(
    conn: &mut PgConnection,
    settlements: &Settlements,
    s: &Settlement,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<()> {
    let refund: Refund =
        refunds::table.filter(refunds::settlement_id.eq(s.id)).select(Refund::as_select()).first(conn)?;
    let told = [RefundCause::Holder.as_str(), RefundCause::IssuerChange.as_str()].contains(&refund.cause.as_str());
    let (Some(asset), true) = (refund.asset_id, told) else {
        return Ok(());
    };
    let holder: String = assets::table.find(asset).select(assets::holder_terminal_id).first(conn)?;
    let Some(terminal) = load_terminal(conn, &holder)? else { return Ok(()) };
    let notice = Notice {
        code: "refund_delayed".into(),
        text: format!("the payment partner has not confirmed the refund of asset {asset} yet; it is being followed up"),
        order_id: Some(refund.order_id),
        asset_id: Some(asset),
        certificate_id: None,
        request_id: None,
    };
    let d = NewDelivery::now(
        DeliveryKind::Message,
        format!("refund:{}:refund_delayed", refund.id),
        &terminal,
        serde_json::to_value(notice).expect("serializes"),
    );
    delivery::enqueue_with(conn, &settlements.deliveries, d, now, sending)?;
    Ok(())
}
