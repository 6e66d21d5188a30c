//! Issuer changes (`docs/product.md#issuer-changes`): an issuer changes an event (a new date, a
//! correction), announced by an operator (`assetflow products change`) or by the issuer itself
//! (`issuer.change`, taken by [`IssuerChangeHandler`] only from the product's issuer).
//! [`announce`] records the change and sends every holder of an asset not yet
//! delivered a modification notice with a reply deadline, and every holder of a booking not yet
//! submitted a notice with nothing to answer; an order placed before the change and issued after
//! it gets its notice at issue ([`notify_issued_after_changes`]), and accepting that one keeps the
//! asset, which carries the change already. The holder answers with a signed
//! `modification.answer`: `accept` (a new asset, signed with the product's information as it is
//! now, replaces the old one, whose certificate is revoked) or `refund` (a refund through the
//! partner that was paid). A notice still unanswered at its deadline gets the issuer's default,
//! applied by the issuance pool (which holds the signing keys) when the `issuer_changes` job finds
//! it due (`modifications.due`). Each notice is answered once: its row is locked and its answer
//! recorded with what it did.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::json;
use uuid::Uuid;

use super::{Issue, Issued, Issuer, NewAsset, Order, asset_document, certificate_document};
use crate::config::IssuerConfig;
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{
    DeliveryKind, IssuerChangeMessage, ModificationAnswer, ModificationChoice, ModificationsDue, Notice, kinds,
};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::domain::bookings::{Receipt, receipt_notice};
use crate::domain::catalogue::{Catalogue, PartyKind, Terminal, load_terminal};
use crate::domain::delivery::{self, Deliveries, NewDelivery};
use crate::domain::requests::{Authentic, Header, Requests};
use crate::domain::schema::{
    assets, deliveries, exchange_certificates, issuer_changes, modification_notices, orders, products,
    receipt_certificates, refunds, reminder_schedule,
};
use crate::domain::settlement::Settlements;
use crate::domain::settlement::refund::{self, NewRefund, RefundCause};
use crate::domain::status::{self, Cause, Status};
use crate::domain::{metrics, parties};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received};
use crate::runtime::outbox::Outgoing;

/// IssuerChange is an issuer's change of a product's event, as it is announced.
#[derive(Debug, Clone)]
pub struct IssuerChange {
    pub announcer: Announcer,
    pub product_id: String,
    /// What changed, in words for the holders.
    pub description: String,
    /// A new title, tags (the event's date, place...) or term for the product's assets from now on.
    pub title: Option<String>,
    pub tags: Option<serde_json::Value>,
    pub asset_expires_at: Option<DateTime<Utc>>,
    pub reply_by: DateTime<Utc>,
    pub default_answer: ModificationChoice,
}

/// Announcer is who announced an issuer's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcer {
    /// An operator, on the issuer's word (`assetflow products change`).
    Operator,
    /// The issuer itself (`issuer.change`), with its own reference for the change, which makes
    /// its message idempotent.
    Issuer { issuer_id: String, reference: String },
}

impl IssuerChange {
    /// IssuerChange::check says why the change cannot be announced at `now`, if it cannot: a
    /// deadline already past, or a new expiry of the assets not after it.
    pub fn check(&self, now: DateTime<Utc>) -> Result<(), String> {
        if self.reply_by <= now {
            return Err(format!("the reply deadline {} is past", self.reply_by));
        }
        match self.asset_expires_at {
            Some(at) if at <= self.reply_by => {
                Err(format!("the assets' new expiry {at} is not after the reply deadline {}", self.reply_by))
            }
            _ => Ok(()),
        }
    }
}

impl Announcer {
    fn as_str(&self) -> &'static str {
        match self {
            Announcer::Operator => "operator",
            Announcer::Issuer { .. } => "issuer",
        }
    }
}

/// announce records an issuer's change, updates the product, and sends each holder of one of its
/// assets not yet delivered (and not expired) a modification notice, and each holder of a booking
/// of it not yet submitted a `booking_modified` notice. It returns the change's id
/// and the number of notices; or None, having done nothing, when the issuer's reference for it
/// was taken already.
pub fn announce(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    change: &IssuerChange,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<Option<(Uuid, usize)>> {
    let id = Uuid::now_v7();
    // The change takes effect once no issue of the product is under way: from then on, what is
    // issued carries it.
    let at = change_product(conn, &change.product_id)?;
    let (issuer_id, reference) = match &change.announcer {
        Announcer::Operator => (None, None),
        Announcer::Issuer { issuer_id, reference } => (Some(issuer_id), Some(reference)),
    };
    // First, so that the same reference twice, even at the same instant, is recorded once.
    let recorded = diesel::insert_into(issuer_changes::table)
        .values((
            issuer_changes::id.eq(id),
            issuer_changes::product_id.eq(&change.product_id),
            issuer_changes::description.eq(&change.description),
            issuer_changes::reply_by.eq(change.reply_by),
            issuer_changes::default_answer.eq(change.default_answer.as_str()),
            issuer_changes::created_at.eq(at),
            issuer_changes::announced_by.eq(change.announcer.as_str()),
            issuer_changes::issuer_id.eq(issuer_id),
            issuer_changes::reference.eq(reference),
        ))
        .on_conflict((issuer_changes::issuer_id, issuer_changes::reference))
        .do_nothing()
        .execute(conn)?;
    if recorded == 0 {
        return Ok(None);
    }
    if let Some(title) = &change.title {
        diesel::update(products::table.find(&change.product_id)).set(products::title.eq(title)).execute(conn)?;
    }
    if let Some(tags) = &change.tags {
        diesel::update(products::table.find(&change.product_id)).set(products::tags.eq(tags)).execute(conn)?;
    }
    if let Some(at) = change.asset_expires_at {
        diesel::update(products::table.find(&change.product_id))
            .set(products::asset_expires_at.eq(Some(at)))
            .execute(conn)?;
    }
    let held: Vec<(Uuid, String, Uuid)> = assets::table
        .filter(assets::product_id.eq(&change.product_id))
        .filter(assets::status.eq_any(Status::ALL.iter().filter(|s| s.is_before_delivery()).map(|s| s.as_str())))
        .filter(assets::expires_at.gt(now))
        .order(assets::id)
        .select((assets::id, assets::holder_terminal_id, assets::order_id))
        .for_update()
        .load(conn)?;
    let open = OpenChange {
        id,
        description: &change.description,
        reply_by: change.reply_by,
        default_answer: change.default_answer.as_str(),
    };
    for (asset, holder, order_id) in &held {
        let told = Told { asset: *asset, holder, order_id: *order_id, issued_after_change: false };
        give_notice(conn, deliveries, &open, told, now, sending)?;
    }
    // Bookings not yet submitted have nothing paid and no asset to answer for: their holders are
    // told, before a submission buys the event as changed. A lottery's waiting list is told too:
    // a lapsed winner's place may still pass to it.
    let booked: Vec<Receipt> = receipt_certificates::table
        .filter(receipt_certificates::product_id.eq(&change.product_id))
        .filter(
            receipt_certificates::status
                .eq_any(["applied", "open"])
                .or(receipt_certificates::status.eq("lost").and(receipt_certificates::condition.eq("lottery"))),
        )
        .order(receipt_certificates::id)
        .select(Receipt::as_select())
        .load(conn)?;
    for receipt in &booked {
        let Some(terminal) = load_terminal(conn, &receipt.holder_terminal_id)? else { continue };
        let text = format!(
            "{} Your booking (receipt certificate {}) stands; nothing has been charged, and a submission buys \
             the event as changed.",
            change.description, receipt.id
        );
        // Once per change: the key names it.
        let key = format!("modification:{id}:booking:{}", receipt.id);
        let d = receipt_notice(receipt, &terminal, DeliveryKind::Message, key, "booking_modified", text);
        delivery::enqueue_with(conn, deliveries, d, now, sending)?;
    }
    metrics::issuer_change("announced", held.len() as u64);
    tracing::info!(change_id = %id, product = %change.product_id, by = change.announcer.as_str(), notices = held.len(), bookings = booked.len(), "issuer change announced");
    Ok(Some((id, held.len())))
}

/// hold_products keeps, until this transaction ends, an issuer's change from being announced for
/// any of `products`: an issue takes it before it reads them, so that what it signs and the changes
/// it finds are of the same moment. Issues share it, so their order does not matter.
pub fn hold_products(conn: &mut PgConnection, products: &[&str]) -> QueryResult<()> {
    if products.is_empty() {
        return Ok(());
    }
    crate::runtime::db::prepared(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended('issuer change ' || p, 0))
         FROM unnest($products::text[]) AS p",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>("products", products)
    .execute(conn)?;
    Ok(())
}

/// change_product waits until no issue holds `product` ([`hold_products`]), and keeps any from
/// taking it until this transaction ends: the assets issued before the change are all in, and
/// those issued after it will read the changed product and find the change. It returns the time
/// it got the product: any issue that began after it waited for the change.
fn change_product(conn: &mut PgConnection, product: &str) -> QueryResult<DateTime<Utc>> {
    #[derive(QueryableByName)]
    struct Held {
        #[diesel(sql_type = diesel::sql_types::Timestamptz)]
        at: DateTime<Utc>,
    }
    crate::runtime::db::prepared("SELECT pg_advisory_xact_lock(hashtextextended('issuer change ' || $product, 0))")
        .bind::<diesel::sql_types::Text, _>("product", product)
        .execute(conn)?;
    let held: Held = diesel::sql_query("SELECT clock_timestamp() AS at").get_result(conn)?;
    Ok(held.at)
}

/// OpenChange is an issuer's change as its notices tell it.
struct OpenChange<'a> {
    id: Uuid,
    description: &'a str,
    reply_by: DateTime<Utc>,
    default_answer: &'a str,
}

/// Told is the asset a modification notice is about, and its holder.
struct Told<'a> {
    asset: Uuid,
    holder: &'a str,
    order_id: Uuid,
    /// Issued after the change, for an order placed before it: the asset carries the change
    /// already, so accepting keeps it as it is.
    issued_after_change: bool,
}

/// give_notice records the modification notice of `change` to the holder of an asset, and sends it.
fn give_notice(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    change: &OpenChange<'_>,
    told: Told<'_>,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<()> {
    let Told { asset, holder, order_id, issued_after_change } = told;
    let notice_id = Uuid::now_v7();
    diesel::insert_into(modification_notices::table)
        .values((
            modification_notices::id.eq(notice_id),
            modification_notices::change_id.eq(change.id),
            modification_notices::asset_id.eq(asset),
            modification_notices::holder_terminal_id.eq(holder),
            modification_notices::reply_by.eq(change.reply_by),
            modification_notices::issued_after_change.eq(issued_after_change),
        ))
        .execute(conn)?;
    let Some(terminal) = load_terminal(conn, holder)? else { return Ok(()) };
    let (description, reply_by, default) = (change.description, change.reply_by, change.default_answer);
    let text = if issued_after_change {
        format!(
            "{description} Your order was placed before this change and its asset was issued after it, with the change. \
             Answer by {reply_by}: accept (keep this asset) or refund; without an answer, {default}. Notice {notice_id}."
        )
    } else {
        format!(
            "{description} Answer by {reply_by}: accept (a new asset replaces this one) or refund; without an answer, \
             {default}. Notice {notice_id}."
        )
    };
    let notice = Notice {
        code: "modification_notice".into(),
        text,
        order_id: Some(order_id),
        asset_id: Some(asset),
        certificate_id: Some(notice_id),
        request_id: None,
    };
    let d = NewDelivery::now(
        DeliveryKind::Message,
        format!("modification:{notice_id}"),
        &terminal,
        serde_json::to_value(notice).expect("serializes"),
    );
    delivery::enqueue_with(conn, deliveries, d, now, sending)?;
    Ok(())
}

/// notify_issued_after_changes gives the holders of `assets`, just issued, the notices of the
/// changes of their products announced after their orders were placed and still open: each asset
/// carries the change, but its holder bought before it and may take a refund instead. `assets`,
/// `orders` and `holders` run in step. It returns the number of notices.
pub fn notify_issued_after_changes(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    assets: &[Uuid],
    orders: &[Uuid],
    holders: &[String],
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<usize> {
    use diesel::sql_types::{Array, Text, Timestamptz, Uuid as SqlUuid};
    #[derive(QueryableByName)]
    struct Due {
        #[diesel(sql_type = SqlUuid)]
        change_id: Uuid,
        #[diesel(sql_type = Text)]
        description: String,
        #[diesel(sql_type = Timestamptz)]
        reply_by: DateTime<Utc>,
        #[diesel(sql_type = Text)]
        default_answer: String,
        #[diesel(sql_type = SqlUuid)]
        asset_id: Uuid,
        #[diesel(sql_type = SqlUuid)]
        order_id: Uuid,
        #[diesel(sql_type = Text)]
        holder: String,
    }
    let due: Vec<Due> = crate::runtime::db::prepared(
        "SELECT c.id AS change_id, c.description, c.reply_by, c.default_answer, a.asset_id, a.order_id, a.holder
         FROM unnest($assets::uuid[], $orders::uuid[], $holders::text[]) AS a(asset_id, order_id, holder)
         JOIN orders o ON o.id = a.order_id
         JOIN issuer_changes c ON c.product_id = o.product_id AND c.reply_by > $now AND c.created_at > o.created_at
         ORDER BY a.asset_id, c.created_at",
    )
    .bind::<Array<SqlUuid>, _>("assets", assets)
    .bind::<Array<SqlUuid>, _>("orders", orders)
    .bind::<Array<Text>, _>("holders", holders)
    .bind::<Timestamptz, _>("now", now)
    .load(conn)?;
    for d in &due {
        let change = OpenChange {
            id: d.change_id,
            description: &d.description,
            reply_by: d.reply_by,
            default_answer: &d.default_answer,
        };
        let told = Told { asset: d.asset_id, holder: &d.holder, order_id: d.order_id, issued_after_change: true };
        give_notice(conn, deliveries, &change, told, now, sending)?;
    }
    if !due.is_empty() {
        metrics::issuer_change("announced", due.len() as u64);
        tracing::info!(notices = due.len(), "modification notices for assets issued after their product's change");
    }
    Ok(due.len())
}

/// IssuerChangeHandler takes `issuer.change`: an issuer's change of one of its products, sent by
/// the issuer itself, taken only when it proves it comes from the product's issuer
/// (`docs/security.md#who-may-answer`) and announced as an operator's is. The same reference from
/// the same issuer again has no second effect.
pub struct IssuerChangeHandler {
    pub deliveries: Arc<Deliveries>,
    /// The configured issuers: those that may send their changes.
    pub issuers: Arc<BTreeMap<String, IssuerConfig>>,
}

impl Handler for IssuerChangeHandler {
    type Message = IssuerChangeMessage;
    const MESSAGE_TYPE: &'static str = kinds::ISSUER_CHANGE;

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, IssuerChangeMessage>]) -> Result<(), Failure> {
        for Received { message, incoming } in batch {
            self.take(cx, incoming, message)?;
        }
        Ok(())
    }
}

impl IssuerChangeHandler {
    fn take(&self, cx: &mut Cx<'_>, incoming: &Incoming, m: &IssuerChangeMessage) -> Result<(), Failure> {
        let Some(issuer) = self.issuers.get(&m.issuer_id) else {
            return Err(Failure::permanent(
                DeadLetterReason::UnauthenticatedParty,
                format!("issuer {} is not configured in [issuers]: it can announce nothing", m.issuer_id),
            ));
        };
        parties::prove(cx, PartyKind::Issuer, &m.issuer_id, issuer.broker_user.as_deref(), incoming)?;
        // A change taken before is not judged again: sent again after its deadline, it is still
        // the change already announced, not an unprocessable one.
        let taken: Option<Uuid> = issuer_changes::table
            .filter(issuer_changes::issuer_id.eq(&m.issuer_id))
            .filter(issuer_changes::reference.eq(&m.reference))
            .select(issuer_changes::id)
            .first(cx.conn)
            .optional()?;
        if taken.is_some() {
            taken_before(m);
            return Ok(());
        }
        let change = IssuerChange {
            announcer: Announcer::Issuer { issuer_id: m.issuer_id.clone(), reference: m.reference.clone() },
            product_id: m.product_id.clone(),
            description: m.description.clone(),
            title: m.title.clone(),
            tags: m.tags.clone(),
            asset_expires_at: m.asset_expires_at,
            reply_by: m.reply_by,
            default_answer: m.default_answer,
        };
        let unprocessable = |detail: String| Err(Failure::permanent(DeadLetterReason::Unprocessable, detail));
        match cx.product(&m.product_id)? {
            None => return unprocessable(format!("no product {}", m.product_id)),
            Some(p) if p.issuer_id != m.issuer_id => {
                return unprocessable(format!("product {} is issuer {}'s, not {}'s", p.id, p.issuer_id, m.issuer_id));
            }
            Some(_) => {}
        }
        if let Err(detail) = change.check(cx.now) {
            return unprocessable(format!("issuer {}'s change {}: {detail}", m.issuer_id, m.reference));
        }
        match announce(cx.conn, &self.deliveries, &change, cx.now, cx.outgoing)? {
            Some((id, notices)) => {
                tracing::info!(change_id = %id, issuer = %m.issuer_id, reference = %m.reference, notices, "an issuer's own change taken");
            }
            None => taken_before(m),
        }
        Ok(())
    }
}

/// taken_before notes an issuer's change whose reference was taken already: no second effect.
fn taken_before(m: &IssuerChangeMessage) {
    tracing::info!(issuer = %m.issuer_id, reference = %m.reference, "an issuer's change taken before: no second effect");
}

/// Notice is a modification notice as an answer reads it, locked.
#[derive(Debug, Queryable)]
struct Pending {
    id: Uuid,
    asset_id: Uuid,
    holder_terminal_id: String,
    reply_by: DateTime<Utc>,
    answer: Option<String>,
    /// Its asset was issued after the change, and carries it: accepting keeps it.
    issued_after_change: bool,
}

fn pending(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<Pending>> {
    modification_notices::table
        .find(id)
        .select((
            modification_notices::id,
            modification_notices::asset_id,
            modification_notices::holder_terminal_id,
            modification_notices::reply_by,
            modification_notices::answer,
            modification_notices::issued_after_change,
        ))
        .for_update()
        .first(conn)
        .optional()
}

/// Modifications is what answering a modification notice needs.
pub struct Modifications {
    pub issuer: Arc<Issuer>,
    pub settlements: Arc<Settlements>,
}

/// AnswerHandler takes `modification.answer`: each request checked and carried out on its own, in turn.
pub struct AnswerHandler {
    pub requests: Arc<Requests>,
    pub modifications: Arc<Modifications>,
}

impl Handler for AnswerHandler {
    type Message = ModificationAnswer;
    const MESSAGE_TYPE: &'static str = kinds::MODIFICATION_ANSWER;

    /// Requests handled together are carried out one after another in the batch's transaction,
    /// each seeing what the ones before it did, as it would alone: one commit for all of them.
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, ModificationAnswer>]) -> Result<(), Failure> {
        for Received { message, incoming } in batch {
            self.take(cx, incoming, message)?;
        }
        Ok(())
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::MODIFICATION_ANSWER, detail)
    }
}

impl AnswerHandler {
    fn take(&self, cx: &mut Cx<'_>, incoming: &Incoming, answer: &ModificationAnswer) -> Result<(), Failure> {
        let header = Header {
            message_type: kinds::MODIFICATION_ANSWER,
            request_id: &answer.request_id,
            terminal_id: &answer.terminal_id,
            sent_at: answer.sent_at,
        };
        let Some(Authentic { terminal, content_sha256 }) = self.requests.admit(cx, incoming, &header)? else {
            return Ok(());
        };
        let refused = |reason, detail: String| Some(Refused::new(reason, detail));
        let notice = pending(cx.conn, answer.notice_id)?;
        let why_not = match &notice {
            None => refused(RefusalReason::ModificationNotOpen, format!("no modification notice {}", answer.notice_id)),
            Some(n) if n.holder_terminal_id != terminal.id => {
                refused(RefusalReason::AssetNotHeld, format!("notice {} is not for terminal {}", n.id, terminal.id))
            }
            Some(n) if n.answer.is_some() => {
                refused(RefusalReason::ModificationNotOpen, format!("notice {} was already answered", n.id))
            }
            Some(n) if n.reply_by <= cx.now => refused(
                RefusalReason::ModificationNotOpen,
                format!("notice {} had to be answered by {}: the issuer's default applies", n.id, n.reply_by),
            ),
            Some(_) => None,
        };
        if let Some(refused) = why_not {
            return self.requests.refuse(cx, incoming, &header, Some(&terminal), Some(&content_sha256), refused);
        }
        let notice = notice.expect("checked above");
        match apply(cx, &self.modifications, &notice, answer.answer)? {
            Ok(outcome) => {
                record(cx, &notice, answer.answer, "holder", Some(&answer.request_id), &outcome)?;
                self.requests.accept(cx, &header, &content_sha256, notice.id)
            }
            // Nothing was done: the notice stays open for another answer until its deadline.
            Err(refused) => {
                self.requests.refuse(cx, incoming, &header, Some(&terminal), Some(&content_sha256), refused)
            }
        }
    }
}

/// DefaultsHandler takes `modifications.due`: the notices unanswered at their deadline get their
/// change's default answer.
pub struct DefaultsHandler {
    pub modifications: Arc<Modifications>,
}

impl Handler for DefaultsHandler {
    type Message = ModificationsDue;
    const MESSAGE_TYPE: &'static str = kinds::MODIFICATIONS_DUE;

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, ModificationsDue>]) -> Result<(), Failure> {
        for Received { message, .. } in batch {
            let mut ids = message.notice_ids.clone();
            ids.sort_unstable();
            for id in ids {
                let Some(notice) = pending(cx.conn, id)? else { continue };
                if notice.answer.is_some() || notice.reply_by > message.as_of {
                    continue; // answered meanwhile, or not due
                }
                let default: String = modification_notices::table
                    .inner_join(issuer_changes::table)
                    .filter(modification_notices::id.eq(id))
                    .select(issuer_changes::default_answer)
                    .first(cx.conn)?;
                let choice =
                    ModificationChoice::parse(&default).expect("the CHECK constraint admits only known answers");
                match apply(cx, &self.modifications, &notice, choice)? {
                    Ok(outcome) => record(cx, &notice, choice, "default", None, &outcome)?,
                    Err(refused) => {
                        // An asset that went its own way (delivered, expired, refunded) ends the
                        // notice with nothing done; otherwise (being delivered, a refund under
                        // way) the job's next run tries the default again.
                        let (status, expires_at): (String, DateTime<Utc>) = assets::table
                            .find(notice.asset_id)
                            .select((assets::status, assets::expires_at))
                            .first(cx.conn)?;
                        let settled = Status::parse(&status).is_some_and(Status::is_final) || expires_at <= cx.now;
                        if settled {
                            let outcome = format!("nothing done: {}", refused.detail);
                            record(cx, &notice, choice, "default", None, &outcome)?;
                        } else {
                            tracing::info!(notice_id = %notice.id, detail = %refused.detail, "an issuer's default could not be applied yet");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// apply carries out an answer to a notice and returns what it did, for [`record`]; or, when it
/// can do nothing (the asset was delivered or is being delivered, a refund of it awaits its
/// partner), why, having done nothing.
fn apply(
    cx: &mut Cx<'_>,
    modifications: &Modifications,
    notice: &Pending,
    choice: ModificationChoice,
) -> Result<Result<String, Refused>, Failure> {
    let outcome = match choice {
        ModificationChoice::Refund => {
            match refund::refundable_asset(cx.conn, cx.now, notice.asset_id, &notice.holder_terminal_id)? {
                Err(refused) => return Ok(Err(refused)),
                Ok((_, paid, amount_minor)) => {
                    let back = NewRefund {
                        paid: &paid,
                        asset_id: Some(notice.asset_id),
                        cause: RefundCause::IssuerChange,
                        request_id: None,
                        amount_minor,
                    };
                    let refund = refund::request(cx.conn, &modifications.settlements, back, cx.now, cx.outgoing)?;
                    format!("refund {refund} requested")
                }
            }
        }
        ModificationChoice::Accept if notice.issued_after_change => {
            "kept: the asset was issued after the change and carries it".to_string()
        }
        ModificationChoice::Accept => match replace(cx, &modifications.issuer, notice)? {
            Ok(new) => format!("replaced by asset {new}"),
            Err(why) => return Ok(Err(Refused::new(RefusalReason::AssetNotDeliverable, why))),
        },
    };
    Ok(Ok(outcome))
}

/// record answers a notice, once: the answer, by whom, and what it did.
fn record(
    cx: &mut Cx<'_>,
    notice: &Pending,
    choice: ModificationChoice,
    by: &'static str,
    request_id: Option<&str>,
    outcome: &str,
) -> Result<(), Failure> {
    diesel::update(modification_notices::table.find(notice.id))
        .set((
            modification_notices::answer.eq(choice.as_str()),
            modification_notices::answered_by.eq(by),
            modification_notices::request_id.eq(request_id),
            modification_notices::answered_at.eq(cx.now),
            modification_notices::outcome.eq(outcome),
        ))
        .execute(cx.conn)?;
    metrics::issuer_change(if by == "default" { "defaulted" } else { "answered" }, 1);
    tracing::info!(notice_id = %notice.id, answer = choice.as_str(), by, outcome, "modification notice answered");
    Ok(())
}

/// Old is the asset an accepted change replaces, locked.
#[derive(Debug, Queryable)]
struct Old {
    id: Uuid,
    order_id: Uuid,
    recipient_terminal_id: String,
    ordinal: i32,
    product_id: String,
    status: String,
    expires_at: DateTime<Utc>,
    designated_at: Option<DateTime<Utc>>,
    generation: i32,
}

/// replace issues a new asset for the old one's holder, signed with the product's information as
/// it is now, and replaces the old one: its status becomes `replaced` and its certificate, if
/// still open, is revoked (with a revocation request). An old asset that was delivered, expired,
/// refunded or is being refunded meanwhile is left as it is; the reason is returned instead.
fn replace(cx: &mut Cx<'_>, issuer: &Issuer, notice: &Pending) -> Result<Result<Uuid, String>, Failure> {
    let old: Old = assets::table
        .find(notice.asset_id)
        .select((
            assets::id,
            assets::order_id,
            assets::recipient_terminal_id,
            assets::ordinal,
            assets::product_id,
            assets::status,
            assets::expires_at,
            assets::designated_at,
            assets::generation,
        ))
        .for_update()
        .first(cx.conn)?;
    let current = Status::parse(&old.status).expect("the CHECK constraint admits only known statuses");
    if !current.is_before_delivery() || old.expires_at <= cx.now {
        return Ok(Err(format!("asset {} is {current}", old.id)));
    }
    let refunding: i64 = refunds::table
        .filter(refunds::asset_id.eq(old.id))
        .filter(refunds::status.eq("requested"))
        .count()
        .get_result(cx.conn)?;
    if refunding > 0 {
        return Ok(Err(format!("a refund of asset {} awaits its partner", old.id)));
    }
    let in_transit: i64 = deliveries::table
        .filter(deliveries::asset_id.eq(old.id))
        .filter(deliveries::kind.eq(DeliveryKind::Asset.as_str()))
        .filter(deliveries::status.eq("sent"))
        .count()
        .get_result(cx.conn)?;
    if in_transit > 0 {
        return Ok(Err(format!("asset {} is being delivered; answer again if its delivery does not complete", old.id)));
    }
    let product = cx.product(&old.product_id)?.ok_or_else(|| {
        Failure::permanent(DeadLetterReason::Unprocessable, format!("product {} vanished", old.product_id))
    })?;
    let holder: Terminal = cx.terminal(&notice.holder_terminal_id)?.ok_or_else(|| {
        Failure::permanent(DeadLetterReason::Unprocessable, format!("holder {} vanished", notice.holder_terminal_id))
    })?;
    let issuer_key = issuer.keys.issuer(&product.issuer_id).ok_or_else(|| {
        Failure::permanent(
            DeadLetterReason::Unprocessable,
            format!("assetflow holds no signing key for issuer {:?}", product.issuer_id),
        )
    })?;
    let provider_key = issuer.keys.provider().ok_or_else(|| {
        Failure::Transient("this process holds no signing keys: it does not run the issuance pool".into())
    })?;
    let now = cx.now;
    // The event's new term, if the issuer moved it; else the old asset's.
    let expires_at = product.asset_expires_at.unwrap_or(old.expires_at);
    if expires_at <= now {
        return Ok(Err(format!("the changed event ends at {expires_at}")));
    }
    let open_certificate: Option<(Uuid, DateTime<Utc>)> = exchange_certificates::table
        .filter(exchange_certificates::asset_id.eq(old.id))
        .filter(exchange_certificates::exchanged_at.is_null())
        .filter(exchange_certificates::revoked_at.is_null())
        .select((exchange_certificates::id, exchange_certificates::expires_at))
        .for_update()
        .first(cx.conn)
        .optional()?;
    let certificate_expires_at =
        open_certificate.filter(|_| current == Status::AwaitingExchange).map(|(_, at)| at.min(expires_at));
    let id = Uuid::now_v7();
    let provider = &issuer.service_provider_id;
    let unsigned = |e: crate::crypto::CryptoError| {
        Failure::permanent(DeadLetterReason::Unprocessable, format!("signing a replacement: {e}"))
    };
    let document = asset_document(&product, id, &holder.id, now, expires_at, provider, issuer_key, provider_key)
        .map_err(unsigned)?;
    let order: Order = orders::table.find(old.order_id).select(Order::as_select()).first(cx.conn)?;
    let order = Order {
        designated_at: certificate_expires_at.is_none().then(|| old.designated_at.unwrap_or(now).max(now)),
        ..order
    };
    let status =
        if certificate_expires_at.is_some() { Status::AwaitingExchange } else { Status::AwaitingDesignatedDelivery };
    let mut issue = Issue { issued: Issued::default(), deliveries: Vec::new() };
    issue.issued.asset(NewAsset {
        id,
        order: &order,
        recipient: &old.recipient_terminal_id,
        ordinal: old.ordinal,
        product: &product,
        status,
        expires_at,
        certificate_expires_at,
        document: &document,
    });
    *issue.issued.replaces.last_mut().expect("just pushed") = Some(old.id);
    *issue.issued.generations.last_mut().expect("just pushed") = old.generation + 1;
    let mut delivery = match certificate_expires_at {
        Some(cert_expiry) => {
            let certificate_id = Uuid::now_v7();
            let certificate = certificate_document(
                certificate_id,
                id,
                &holder.id,
                &product.id,
                now,
                cert_expiry,
                provider,
                provider_key,
            )
            .map_err(unsigned)?;
            let reminder_due_at = Some(cert_expiry - chrono::Duration::seconds(product.reminder_stage1_secs));
            issue.issued.certificate(certificate_id, id, &holder.id, cert_expiry, reminder_due_at, &certificate);
            NewDelivery::now(
                DeliveryKind::Certificate,
                format!("certificate:{certificate_id}"),
                &holder,
                json!({"order_id": old.order_id, "certificate": certificate}),
            )
        }
        None => {
            let mut d = NewDelivery::now(
                DeliveryKind::Asset,
                format!("asset:{id}"),
                &holder,
                json!({"order_id": old.order_id, "forced": false, "asset": document}),
            );
            d.due_at = order.designated_at.filter(|at| *at > now);
            d
        }
    };
    delivery.asset_id = Some(id);
    delivery.order_id = Some(old.order_id);
    issue.issued.write(cx.conn, now)?;
    status::record_issued(cx.conn, &[id], &[status], now)?;
    status::transition(
        cx.conn,
        old.id,
        current,
        Status::Replaced,
        Cause::IssuerChangeAccepted,
        Some(&format!("replaced by {id}")),
        now,
    )?;
    if let Some((certificate, _)) = open_certificate {
        revoke(cx, &issuer.deliveries, certificate, old.id, &holder)?;
    }
    delivery::enqueue_many(cx, &issuer.deliveries, &[delivery])?;
    tracing::info!(old = %old.id, new = %id, "asset replaced after an issuer's change");
    Ok(Ok(id))
}

/// revoke closes the replaced asset's certificate and asks its holder to delete it.
fn revoke(
    cx: &mut Cx<'_>,
    deliveries: &Deliveries,
    certificate: Uuid,
    asset: Uuid,
    holder: &Terminal,
) -> Result<(), Failure> {
    diesel::update(exchange_certificates::table.find(certificate))
        .set(exchange_certificates::revoked_at.eq(cx.now))
        .execute(cx.conn)?;
    diesel::update(reminder_schedule::table.find(certificate))
        .set((reminder_schedule::next_stage.eq(None::<i16>), reminder_schedule::due_at.eq(None::<DateTime<Utc>>)))
        .execute(cx.conn)?;
    let text = format!("Exchange certificate {certificate} was replaced after the issuer's change: please delete it.");
    delivery::enqueue(cx, deliveries, NewDelivery::revocation_request(holder, certificate, asset, text))?;
    Ok(())
}
