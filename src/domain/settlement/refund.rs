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

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{Settlement, Settlements, answer_by, instruction};
use crate::contracts::messages::{DeliveryKind, Notice, RefundRequest, SettlementOutcome, SettlementResult, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::domain::catalogue::{Catalogue, load_terminal};
use crate::domain::delivery::{self, NewDelivery};
use crate::domain::metrics;
use crate::domain::requests::{Admitted, Header, Requests};
use crate::domain::schema::{assets, refunds, settlements};
use crate::domain::status::{self, Cause, Status};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received, together_unless_repeated};
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
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
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
    /// Why the partner refused it, if it did.
    pub reason: Option<String>,
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

/// request records a refund with its settlement and adds the partner's instruction to `sending`,
/// for the caller to write to the outbox in its transaction. It returns the refund's id.
pub fn request(
    conn: &mut PgConnection,
    settlements: &Settlements,
    refund: NewRefund<'_>,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<Uuid> {
    let mut refunding = Refunding::default();
    let id = refunding.push(settlements, refund, None, now, sending);
    refunding.write(conn, now)?;
    Ok(id)
}

/// RefundHandler takes `asset.refund`. Refunds asked together are authenticated one by one (a
/// signature each), then read in three statements (their request ids, their assets with what a
/// refund checks, and the payments they refund from) and recorded in one.
pub struct RefundHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
}

impl Handler for RefundHandler {
    type Message = RefundRequest;
    const MESSAGE_TYPE: &'static str = kinds::ASSET_REFUND;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    /// Two requests for one asset (or with one request id) are taken one after the other, the
    /// second seeing what the first did, as it would alone.
    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, RefundRequest>]) -> Result<(), Failure> {
        together_unless_repeated(
            cx,
            batch,
            |r| [r.request_id.clone(), r.asset_id.to_string()],
            |cx, batch| self.take(cx, batch),
        )
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::ASSET_REFUND, detail)
    }
}

fn header(asked: &RefundRequest) -> Header<'_> {
    Header {
        message_type: kinds::ASSET_REFUND,
        request_id: &asked.request_id,
        terminal_id: &asked.terminal_id,
        sent_at: asked.sent_at,
    }
}

impl RefundHandler {
    /// take carries out refund requests for distinct assets with distinct request ids, each checked
    /// as it would be alone, in the order of the checks `requests` describes.
    fn take(&self, cx: &mut Cx<'_>, batch: &[Received<'_, RefundRequest>]) -> Result<(), Failure> {
        let req = &*self.requests;
        let admitted = req.admit_batch(cx, batch, header)?;
        if admitted.is_empty() {
            return Ok(());
        }
        let assets: Vec<Uuid> = admitted.iter().map(|a| a.message.asset_id).collect();
        let found = find(cx.conn, &assets)?;
        let mut refunding = Refunding::default();
        for Admitted { incoming, message: asked, terminal, content_sha256: sha } in admitted {
            let header = header(asked);
            let found = found.get(&asked.asset_id);
            if found.is_some_and(|f| f.asset.changing) {
                let detail = format!("a change of asset {} is under way", asked.asset_id);
                let refused = Refused::new(RefusalReason::RefundPending, detail);
                req.refuse(cx, incoming, &header, Some(&terminal), Some(&sha), refused)?;
                continue;
            }
            match judge(found, asked.asset_id, &asked.terminal_id, cx.now) {
                Err(refused) => req.refuse(cx, incoming, &header, Some(&terminal), Some(&sha), refused)?,
                Ok((asset, paid, amount_minor)) => {
                    let refund = NewRefund {
                        paid: &paid,
                        asset_id: Some(asset.id),
                        cause: RefundCause::Holder,
                        request_id: Some(&asked.request_id),
                        amount_minor,
                    };
                    refunding.push(&self.settlements, refund, Some((&header, sha)), cx.now, cx.outgoing);
                }
            }
        }
        refunding.write(cx.conn, cx.now)?;
        Ok(())
    }
}

/// Refunding is refunds to record together, column by column, for [`Refunding::write`]: each a
/// refund settlement and its `refunds` row, and for a holder's request its idempotency record.
#[derive(Default)]
pub(super) struct Refunding {
    refunds: Vec<Uuid>,
    settlements: Vec<Uuid>,
    orders: Vec<Uuid>,
    assets: Vec<Option<Uuid>>,
    causes: Vec<&'static str>,
    partners: Vec<String>,
    payers: Vec<String>,
    amounts: Vec<i64>,
    currencies: Vec<String>,
    answer_by: Vec<DateTime<Utc>>,
    request_ids: Vec<Option<String>>,
    /// The holders' requests, recorded as accepted: their ids, terminals, content hashes and times.
    accepted: Vec<String>,
    terminals: Vec<String>,
    content_sha256s: Vec<String>,
    sent_at: Vec<DateTime<Utc>>,
    subjects: Vec<Uuid>,
}

impl Refunding {
    /// Refunding::push adds a refund, and the partner's first instruction to `sending`. It returns
    /// the refund's id.
    pub(super) fn push(
        &mut self,
        settlements: &Settlements,
        refund: NewRefund<'_>,
        asked: Option<(&Header<'_>, String)>,
        now: DateTime<Utc>,
        sending: &mut Vec<Outgoing>,
    ) -> Uuid {
        let paid = refund.paid;
        let settlement = Settlement::instructed(
            paid.order_id,
            "refund",
            paid.partner_id.clone(),
            paid.payer_terminal_id.clone(),
            refund.amount_minor,
            paid.currency.clone(),
            now,
        );
        let answer_by = answer_by(settlements, &settlement.partner_id, now);
        sending.push(instruction(settlements, &settlement, 1, answer_by));
        let id = Uuid::now_v7();
        metrics::refund(&settlement.partner_id, "requested");
        tracing::info!(refund_id = %id, order_id = %settlement.order_id, asset_id = ?refund.asset_id, cause = refund.cause.as_str(), amount_minor = refund.amount_minor, "refund requested");
        if let Some((header, sha)) = asked {
            self.accepted.push(header.request_id.to_string());
            self.terminals.push(header.terminal_id.to_string());
            self.content_sha256s.push(sha);
            self.sent_at.push(header.sent_at);
            self.subjects.push(refund.asset_id.expect("a holder's request names its asset"));
        }
        self.refunds.push(id);
        self.settlements.push(settlement.id);
        self.orders.push(settlement.order_id);
        self.assets.push(refund.asset_id);
        self.causes.push(refund.cause.as_str());
        self.partners.push(settlement.partner_id);
        self.payers.push(settlement.payer_terminal_id);
        self.amounts.push(settlement.amount_minor);
        self.currencies.push(settlement.currency);
        self.answer_by.push(answer_by);
        self.request_ids.push(refund.request_id.map(str::to_string));
        id
    }

    /// Refunding::write records the holders' requests as accepted and the refunds with their
    /// settlements, in one round trip whatever their number. The foreign keys between them are
    /// checked once all the rows are in, and the database keeps each order's refunds within what
    /// it paid, refund by refund (migration 000010).
    pub(super) fn write(&self, conn: &mut PgConnection, now: DateTime<Utc>) -> QueryResult<()> {
        use diesel::sql_types::{Array, Int8, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        if self.refunds.is_empty() {
            return Ok(());
        }
        crate::runtime::db::prepared(
            "WITH recorded AS (
               INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at,
                                              received_at, outcome, subject_id)
               SELECT request_id, terminal_id, $message_type, sha, sent_at, $now, 'accepted', subject
               FROM unnest($accepted::text[], $terminals::text[], $content_sha256s::text[], $sent_at::timestamptz[], $subjects::uuid[])
                    AS r(request_id, terminal_id, sha, sent_at, subject)
             ), instructed AS (
               INSERT INTO settlements (id, order_id, kind, partner_id, payer_terminal_id, amount_minor, currency,
                                        status, attempts, answer_due_at, instructed_at)
               SELECT id, order_id, 'refund', partner_id, payer, amount, currency, 'instructed', 1, answer_by, $now
               FROM unnest($settlements::uuid[], $orders::uuid[], $partners::text[], $payers::text[], $amounts::int8[],
                           $currencies::text[], $answer_by::timestamptz[])
                    AS s(id, order_id, partner_id, payer, amount, currency, answer_by)
             )
             INSERT INTO refunds (id, settlement_id, order_id, asset_id, cause, request_id, amount_minor, currency,
                                  status, requested_at)
             SELECT id, settlement_id, order_id, asset_id, cause, request_id, amount, currency, 'requested', $now
             FROM unnest($refunds::uuid[], $settlements::uuid[], $orders::uuid[], $assets::uuid[], $causes::text[],
                         $request_ids::text[], $amounts::int8[], $currencies::text[])
                  AS f(id, settlement_id, order_id, asset_id, cause, request_id, amount, currency)",
        )
        .bind::<Timestamptz, _>("now", now)
        .bind::<Text, _>("message_type", kinds::ASSET_REFUND)
        .bind::<Array<Text>, _>("accepted", &self.accepted)
        .bind::<Array<Text>, _>("terminals", &self.terminals)
        .bind::<Array<Text>, _>("content_sha256s", &self.content_sha256s)
        .bind::<Array<Timestamptz>, _>("sent_at", &self.sent_at)
        .bind::<Array<SqlUuid>, _>("subjects", &self.subjects)
        .bind::<Array<SqlUuid>, _>("refunds", &self.refunds)
        .bind::<Array<SqlUuid>, _>("settlements", &self.settlements)
        .bind::<Array<SqlUuid>, _>("orders", &self.orders)
        .bind::<Array<Nullable<SqlUuid>>, _>("assets", &self.assets)
        .bind::<Array<Text>, _>("causes", &self.causes)
        .bind::<Array<Text>, _>("partners", &self.partners)
        .bind::<Array<Text>, _>("payers", &self.payers)
        .bind::<Array<Int8>, _>("amounts", &self.amounts)
        .bind::<Array<Text>, _>("currencies", &self.currencies)
        .bind::<Array<Timestamptz>, _>("answer_by", &self.answer_by)
        .bind::<Array<Nullable<Text>>, _>("request_ids", &self.request_ids)
        .execute(conn)?;
        Ok(())
    }
}

/// Refundable is an asset as a refund checks it, locked.
#[derive(Debug, Clone)]
pub struct Refundable {
    pub id: Uuid,
    pub order_id: Uuid,
    pub product_id: String,
    pub holder_terminal_id: String,
    pub status: String,
    pub expires_at: DateTime<Utc>,
    /// Whether a change of the asset is under way.
    pub changing: bool,
}

/// Found is an asset with everything a refund of it is judged on.
#[derive(Debug)]
pub struct Found {
    asset: Refundable,
    /// The cause of a refund of the asset under way, if one is.
    under_way: Option<String>,
    /// Whether the asset itself is on its way to its holder.
    in_transit: bool,
    /// What the asset cost: the order's amount shared equally among its assets (a quantity for
    /// each recipient, all at the product's price).
    price_minor: i64,
    /// The order's settled payment, if it settled.
    paid: Option<Settlement>,
}

/// find reads the assets `ids` (locked, in id order) with what a refund of each is judged on, in
/// two statements whatever their number. An asset that does not exist is left out.
pub fn find(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<HashMap<Uuid, Found>> {
    use diesel::sql_types::{Array, Bool, Int8, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = SqlUuid)]
        order_id: Uuid,
        #[diesel(sql_type = Text)]
        product_id: String,
        #[diesel(sql_type = Text)]
        holder_terminal_id: String,
        #[diesel(sql_type = Text)]
        status: String,
        #[diesel(sql_type = Timestamptz)]
        expires_at: DateTime<Utc>,
        #[diesel(sql_type = Nullable<Text>)]
        under_way: Option<String>,
        #[diesel(sql_type = Bool)]
        changing: bool,
        #[diesel(sql_type = Bool)]
        in_transit: bool,
        #[diesel(sql_type = Int8)]
        price_minor: i64,
    }
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    // The asset's deliveries are read by asset and judged in the select list: a condition on
    // their status in the WHERE clause would let a planner without statistics (a new database)
    // walk every open delivery through the index of due deliveries instead.
    let rows: Vec<Row> = crate::runtime::db::prepared(
        "SELECT a.id, a.order_id, a.product_id, a.holder_terminal_id, a.status, a.expires_at,
                (SELECT r.cause FROM refunds r WHERE r.asset_id = a.id AND r.status = 'requested') AS under_way,
                EXISTS (SELECT 1 FROM changes c
                        WHERE c.asset_id = a.id AND c.step IN ('purchasing', 'refunding', 'compensating')) AS changing,
                coalesce((SELECT bool_or(d.kind = 'asset' AND d.status = 'sent') FROM deliveries d
                          WHERE d.asset_id = a.id), false) AS in_transit,
                o.amount_minor / greatest(o.quantity::bigint * cardinality(o.recipient_terminal_ids), 1) AS price_minor
         FROM assets a JOIN orders o ON o.id = a.order_id
         WHERE a.id = ANY($ids::uuid[])
         ORDER BY a.id
         FOR UPDATE OF a",
    )
    .bind::<Array<SqlUuid>, _>("ids", ids)
    .load(conn)?;
    let orders: Vec<Uuid> = rows.iter().map(|r| r.order_id).collect();
    let paid: HashMap<Uuid, Settlement> = settlements::table
        .filter(settlements::order_id.eq_any(&orders))
        .filter(settlements::kind.eq("purchase"))
        .filter(settlements::status.eq("settled"))
        .select(Settlement::as_select())
        .load(conn)?
        .into_iter()
        .map(|s| (s.order_id, s))
        .collect();
    Ok(rows
        .into_iter()
        .map(|r| {
            let found = Found {
                paid: paid.get(&r.order_id).cloned(),
                under_way: r.under_way,
                in_transit: r.in_transit,
                price_minor: r.price_minor,
                asset: Refundable {
                    id: r.id,
                    order_id: r.order_id,
                    product_id: r.product_id,
                    holder_terminal_id: r.holder_terminal_id,
                    status: r.status,
                    expires_at: r.expires_at,
                    changing: r.changing,
                },
            };
            (r.id, found)
        })
        .collect())
}

/// judge checks that `holder` may have its money back for asset `id` (as `find` found it, if it
/// did), and returns the asset, the payment to refund from, and how much.
pub fn judge(
    found: Option<&Found>,
    id: Uuid,
    holder: &str,
    now: DateTime<Utc>,
) -> Result<(Refundable, Settlement, i64), Refused> {
    macro_rules! refuse {
        ($reason:expr, $($detail:tt)*) => { return Err(Refused::new($reason, format!($($detail)*))) };
    }
    let Some(found) = found else { refuse!(RefusalReason::AssetUnknown, "no asset {id} was issued") };
    let asset = &found.asset;
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
    if let Some(cause) = &found.under_way {
        refuse!(RefusalReason::RefundPending, "a refund of asset {id} is already under way ({cause})")
    }
    if found.in_transit {
        refuse!(
            RefusalReason::RefundNotAllowed,
            "asset {id} is being delivered; ask again if its delivery does not complete"
        )
    }
    let Some(paid) = &found.paid else {
        refuse!(RefusalReason::RefundNotAllowed, "the payment for asset {id} has not settled")
    };
    if found.price_minor <= 0 {
        refuse!(RefusalReason::RefundNotAllowed, "asset {id} was free: there is nothing to refund")
    }
    Ok((asset.clone(), paid.clone(), found.price_minor))
}

/// refundable_asset checks that `holder` may have its money back for asset `id` as of `now`, and
/// returns the asset (locked), the payment to refund from, and how much.
pub fn refundable_asset(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    id: Uuid,
    holder: &str,
) -> Result<Result<(Refundable, Settlement, i64), Refused>, Failure> {
    let found = find(conn, &[id])?;
    Ok(judge(found.get(&id), id, holder, now))
}

/// Answered is a partner's answer to a refund settlement not yet answered (or abandoned).
pub struct Answered<'a> {
    pub settlement: &'a Settlement,
    pub result: &'a SettlementResult,
}

/// answered records partners' answers to refund settlements, in a fixed number of statements
/// whatever their number. Refunded, an asset becomes `refunded`, its certificate is revoked and
/// its holder sent a revocation request; refused, the asset stays as it was. A holder who asked
/// (or answered an issuer's change) is told either way. It returns the refunds, answered.
pub fn answered(cx: &mut Cx<'_>, settlements: &Settlements, answers: &[Answered<'_>]) -> Result<Vec<Refund>, Failure> {
    use diesel::sql_types::{Array, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(embed)]
        refund: Refund,
        #[diesel(sql_type = Nullable<Text>)]
        holder: Option<String>,
    }
    if answers.is_empty() {
        return Ok(Vec::new());
    }
    let now = cx.now;
    let column = |f: fn(&Answered<'_>) -> Option<String>| answers.iter().map(f).collect::<Vec<_>>();
    let statuses: Vec<&'static str> = answers
        .iter()
        .map(|a| match a.result.outcome {
            SettlementOutcome::Settled => "refunded",
            SettlementOutcome::Declined => "failed",
        })
        .collect();
    let refusals = column(|a| match a.result.outcome {
        SettlementOutcome::Settled => None,
        SettlementOutcome::Declined => Some(a.result.reason.clone().unwrap_or_else(|| "refused by the partner".into())),
    });
    let rows: Vec<Row> = crate::runtime::db::prepared(
        "WITH answered AS (
           UPDATE settlements s SET status = t.outcome, partner_reference = t.reference, reason = t.reason,
                                    answered_at = $now, answer_due_at = NULL
           FROM unnest($settlements::uuid[], $outcomes::text[], $references::text[], $reasons::text[])
                AS t(id, outcome, reference, reason)
           WHERE s.id = t.id
         )
         UPDATE refunds r SET status = t.status, reason = t.reason, answered_at = $now
         FROM unnest($settlements::uuid[], $statuses::text[], $refusals::text[]) AS t(settlement_id, status, reason)
         WHERE r.settlement_id = t.settlement_id
         RETURNING r.id, r.settlement_id, r.order_id, r.asset_id, r.cause, r.amount_minor, r.currency, r.status, r.reason,
                   (SELECT a.holder_terminal_id FROM assets a WHERE a.id = r.asset_id) AS holder",
    )
    .bind::<Timestamptz, _>("now", now)
    .bind::<Array<SqlUuid>, _>("settlements", answers.iter().map(|a| a.settlement.id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>("outcomes", answers.iter().map(|a| a.result.outcome.as_str()).collect::<Vec<_>>())
    .bind::<Array<Text>, _>("references", answers.iter().map(|a| a.result.partner_reference.as_str()).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>("reasons", column(|a| a.result.reason.clone()))
    .bind::<Array<Text>, _>("statuses", &statuses)
    .bind::<Array<Nullable<Text>>, _>("refusals", &refusals)
    .load(cx.conn)?;
    let mut refunds = Vec::with_capacity(rows.len());
    let mut refunded_assets = Vec::new();
    let mut telling = Vec::new();
    for Row { refund, holder } in rows {
        let partner =
            &answers.iter().find(|a| a.settlement.id == refund.settlement_id).expect("answered").settlement.partner_id;
        metrics::refund(partner, if refund.status == "refunded" { "refunded" } else { "failed" });
        tracing::info!(refund_id = %refund.id, order_id = %refund.order_id, outcome = refund.status, "refund answered");
        if let (Some(asset), Some(holder)) = (refund.asset_id, holder) {
            if refund.status == "refunded" {
                refunded_assets.push(asset);
            }
            if [RefundCause::Holder.as_str(), RefundCause::IssuerChange.as_str()].contains(&refund.cause.as_str()) {
                telling.push((refund.clone(), asset, holder));
            }
        }
        refunds.push(refund);
    }
    let mut deliveries = refund_assets(cx, &refunded_assets)?;
    cx.read_terminals(telling.iter().map(|(_, _, holder)| holder.as_str()))?;
    for (refund, asset, holder) in telling {
        let Some(terminal) = cx.terminal(&holder)? else { continue };
        let (code, text) = match &refund.reason {
            None => {
                ("refund_completed", format!("asset {asset} was refunded: {} {}", refund.amount_minor, refund.currency))
            }
            Some(reason) => ("refund_refused", format!("the refund of asset {asset} was refused: {reason}")),
        };
        let notice = Notice {
            code: code.into(),
            text,
            order_id: Some(refund.order_id),
            asset_id: Some(asset),
            certificate_id: None,
            request_id: None,
        };
        deliveries.push(NewDelivery::now(
            DeliveryKind::Message,
            format!("refund:{}:{code}", refund.id),
            &terminal,
            serde_json::to_value(notice).expect("serializes"),
        ));
    }
    delivery::enqueue_many(cx, &settlements.deliveries, &deliveries)?;
    Ok(refunds)
}

/// refund_assets makes refunded assets `refunded` and revokes their certificates still open, and
/// returns the revocation requests to send their holders. An asset that went another way meanwhile
/// (its term ended) keeps its status: the money has gone back all the same.
fn refund_assets(cx: &mut Cx<'_>, assets: &[Uuid]) -> Result<Vec<NewDelivery>, Failure> {
    use diesel::sql_types::{Array, Text, Timestamptz, Uuid as SqlUuid};
    #[derive(QueryableByName)]
    struct Revoked {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = Text)]
        holder_terminal_id: String,
        #[diesel(sql_type = SqlUuid)]
        asset_id: Uuid,
    }
    if assets.is_empty() {
        return Ok(Vec::new());
    }
    let mut moving: HashMap<Status, Vec<Uuid>> = HashMap::new();
    for (asset, current) in status::current_many_for_update(cx.conn, assets)? {
        if current.is_before_delivery() {
            moving.entry(current).or_default().push(asset);
        } else {
            tracing::warn!(%asset, status = %current, "a refund settled for an asset that is no longer before delivery");
        }
    }
    for (from, assets) in moving {
        status::transition_many(cx.conn, &assets, from, Status::Refunded, Cause::RefundSettled, cx.now)?;
    }
    // `coalesce(...) IS NULL` rather than two conditions: the certificates are reached by their
    // assets (one each), never through the index of open certificates, which a planner without
    // statistics (a new database) takes for nearly empty and walks whole.
    let revoked: Vec<Revoked> = crate::runtime::db::prepared(
        "WITH revoked AS (
           UPDATE exchange_certificates SET revoked_at = $now
           WHERE asset_id = ANY($assets::uuid[]) AND coalesce(exchanged_at, revoked_at) IS NULL
           RETURNING id, holder_terminal_id, asset_id
         ), unscheduled AS (
           UPDATE reminder_schedule SET next_stage = NULL, due_at = NULL
           WHERE certificate_id IN (SELECT id FROM revoked)
         )
         SELECT id, holder_terminal_id, asset_id FROM revoked",
    )
    .bind::<Timestamptz, _>("now", cx.now)
    .bind::<Array<SqlUuid>, _>("assets", assets)
    .load(cx.conn)?;
    cx.read_terminals(revoked.iter().map(|r| r.holder_terminal_id.as_str()))?;
    let mut requests = Vec::with_capacity(revoked.len());
    for Revoked { id: certificate, holder_terminal_id, asset_id: asset } in revoked {
        let Some(terminal) = cx.terminal(&holder_terminal_id)? else { continue };
        let text = format!("Exchange certificate {certificate} was revoked: its asset was refunded. Please delete it.");
        requests.push(NewDelivery::revocation_request(&terminal, certificate, asset, text));
    }
    Ok(requests)
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
