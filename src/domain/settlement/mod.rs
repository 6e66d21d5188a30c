//! The settlement pool: orders in, settlement instructions out to the payer's partner, and the
//! partner's answer decides whether anything is issued (instruction, then payment, then
//! supply: `docs/product.md#payment-before-supply`). An order billed to a terminal other than its
//! orderer waits for that payer's confirmation first (`confirm.rs`).

pub mod change;
mod confirm;
mod purchase;
pub mod refund;
mod result;

pub use change::ChangeHandler;
pub use confirm::ConfirmHandler;
pub use purchase::PurchaseHandler;
pub use refund::RefundHandler;
pub use result::ResultHandler;

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::json;
use uuid::Uuid;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::PartnerConfig;
use crate::config::workers::InstructionPolicy;
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeliveryKind, Notice, SettlementInstruction, kinds};
use crate::contracts::topology::Names;
use crate::contracts::topology::Pool;
use crate::domain::catalogue::{Terminal, load_terminal};
use crate::domain::delivery::Deliveries;
use crate::domain::delivery::{self, NewDelivery};
use crate::domain::metrics;
use crate::domain::schema::{orders, settlements};
use crate::runtime::dead_letter::{self, Full, NewDeadLetter, Replayer};
use crate::runtime::outbox::{self, Outgoing};
use crate::runtime::scan::Swept;

/// Settlement is a settlement as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = settlements)]
pub struct Settlement {
    pub id: Uuid,
    pub order_id: Uuid,
    pub kind: String,
    pub partner_id: String,
    pub payer_terminal_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub attempts: i32,
    pub instructed_at: DateTime<Utc>,
    pub attempt_limit: Option<i32>,
}

impl Settlement {
    /// Settlement::instructed is a new settlement at its first instruction, sent at `now`.
    pub fn instructed(
        order_id: Uuid,
        kind: &str,
        partner_id: String,
        payer_terminal_id: String,
        amount_minor: i64,
        currency: String,
        now: DateTime<Utc>,
    ) -> Settlement {
        Settlement {
            id: Uuid::now_v7(),
            order_id,
            kind: kind.into(),
            partner_id,
            payer_terminal_id,
            amount_minor,
            currency,
            status: "instructed".into(),
            attempts: 1,
            instructed_at: now,
            attempt_limit: None,
        }
    }
}

/// Settlements is what settling needs: the names on the broker, each partner's configuration,
/// the instruction policy of `workers/settlement.toml`, and the deliveries that tell orderers.
#[derive(Debug, Clone)]
pub struct Settlements {
    pub names: Names,
    pub partners: BTreeMap<String, PartnerConfig>,
    pub instruction: InstructionPolicy,
    pub deliveries: Arc<Deliveries>,
}

/// answer_timeout is how long `partner` has to answer.
pub fn answer_timeout(settlements: &Settlements, partner: &str) -> Duration {
    settlements.partners.get(partner).and_then(|p| p.answer_timeout).unwrap_or(settlements.instruction.answer_timeout)
}

fn max_attempts(settlements: &Settlements, partner: &str) -> u32 {
    settlements.partners.get(partner).and_then(|p| p.max_attempts).unwrap_or(settlements.instruction.max_attempts)
}

/// answer_by is when an instruction sent at `now` must be answered.
pub fn answer_by(settlements: &Settlements, partner: &str, now: DateTime<Utc>) -> DateTime<Utc> {
    now + chrono::Duration::from_std(answer_timeout(settlements, partner)).expect("a sane timeout")
}

/// instruct records attempt `attempt` of a settlement and adds its instruction to the partner's
/// queue to `sending`, for the caller to write to the outbox in its transaction.
pub fn instruct(
    conn: &mut PgConnection,
    settlements: &Settlements,
    s: &Settlement,
    attempt: u32,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<()> {
    let answer_by = answer_by(settlements, &s.partner_id, now);
    diesel::update(settlements::table.find(s.id))
        .set((settlements::attempts.eq(attempt as i32), settlements::answer_due_at.eq(answer_by)))
        .execute(conn)?;
    sending.push(instruction(settlements, s, attempt, answer_by));
    Ok(())
}

/// instruction is attempt `attempt`'s instruction to the partner's queue; the settlement row says
/// it was made.
pub fn instruction(settlements: &Settlements, s: &Settlement, attempt: u32, answer_by: DateTime<Utc>) -> Outgoing {
    let instruction = SettlementInstruction {
        message_type: kinds::SETTLEMENT_INSTRUCTION.into(),
        settlement_id: s.id,
        order_id: s.order_id,
        kind: s.kind.clone(),
        partner_id: s.partner_id.clone(),
        payer_terminal_id: s.payer_terminal_id.clone(),
        amount_minor: s.amount_minor,
        currency: s.currency.clone(),
        attempt,
        answer_by,
    };
    Outgoing::json(settlements.names.partners(), s.partner_id.as_str(), kinds::SETTLEMENT_INSTRUCTION, &instruction)
        .correlated(s.order_id.to_string())
}

/// NewOrder is one order placed outside an `order.purchase`: a receipt certificate's submission,
/// or a change's new purchase. It buys one asset of `product` for its orderer.
pub struct NewOrder<'a> {
    /// The terminal request that placed it.
    pub request_id: &'a str,
    pub orderer: &'a str,
    pub payer: &'a str,
    pub partner_id: &'a str,
    pub product: &'a crate::domain::catalogue::Product,
    /// `certificate` or `immediate`.
    pub mode: crate::contracts::messages::DeliveryModeKind,
    /// The asset a receipt certificate reserved: the order's asset has this id.
    pub reserved_asset_id: Option<Uuid>,
}

/// Placed is orders of one asset each ([`NewOrder`]) to record together with their purchase
/// settlements, column by column, for [`Placed::write`].
#[derive(Default)]
pub struct Placed {
    ids: Vec<Uuid>,
    request_ids: Vec<String>,
    orderers: Vec<String>,
    payers: Vec<String>,
    products: Vec<String>,
    amounts: Vec<i64>,
    currencies: Vec<String>,
    modes: Vec<&'static str>,
    designated_at: Vec<Option<DateTime<Utc>>>,
    reserved: Vec<Option<Uuid>>,
    settlements: Vec<Uuid>,
    partners: Vec<String>,
    answer_by: Vec<DateTime<Utc>>,
}

impl Placed {
    /// Placed::push adds an order, and its partner's first instruction to `sending`. It returns
    /// the order's id.
    pub fn push(
        &mut self,
        settlements: &Settlements,
        order: NewOrder<'_>,
        now: DateTime<Utc>,
        sending: &mut Vec<Outgoing>,
    ) -> Uuid {
        use crate::contracts::messages::DeliveryModeKind;
        let id = Uuid::now_v7();
        let product = order.product;
        let settlement = Settlement::instructed(
            id,
            "purchase",
            order.partner_id.to_string(),
            order.payer.to_string(),
            product.price_minor,
            product.currency.clone(),
            now,
        );
        let answer_by = answer_by(settlements, &settlement.partner_id, now);
        sending.push(instruction(settlements, &settlement, 1, answer_by));
        tracing::info!(order_id = %id, request_id = order.request_id, amount_minor = product.price_minor, "order placed");
        self.ids.push(id);
        self.request_ids.push(order.request_id.to_string());
        self.orderers.push(order.orderer.to_string());
        self.payers.push(order.payer.to_string());
        self.products.push(product.id.clone());
        self.amounts.push(product.price_minor);
        self.currencies.push(product.currency.clone());
        self.modes.push(order.mode.as_str());
        self.designated_at.push((order.mode == DeliveryModeKind::Immediate).then_some(now));
        self.reserved.push(order.reserved_asset_id);
        self.settlements.push(settlement.id);
        self.partners.push(settlement.partner_id);
        self.answer_by.push(answer_by);
        id
    }

    /// Placed::write records the orders with their settlements, in one round trip whatever their
    /// number.
    pub fn write(&self, conn: &mut PgConnection, now: DateTime<Utc>) -> QueryResult<()> {
        use diesel::sql_types::{Array, Int8, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        if self.ids.is_empty() {
            return Ok(());
        }
        crate::runtime::db::prepared(
            "WITH placed AS (
               INSERT INTO orders (id, request_id, orderer_terminal_id, payer_terminal_id, recipient_terminal_ids,
                                   product_id, quantity, amount_minor, currency, delivery_mode, designated_at, status,
                                   created_at, updated_at, reserved_asset_id)
               SELECT id, request_id, orderer, payer, ARRAY[orderer], product_id, 1, amount, currency, mode,
                      designated_at, 'settling', $now, $now, reserved
               FROM unnest($orders::uuid[], $request_ids::text[], $orderers::text[], $payers::text[], $products::text[],
                           $amounts::int8[], $currencies::text[], $modes::text[], $designated_at::timestamptz[],
                           $reserved::uuid[])
                    AS o(id, request_id, orderer, payer, product_id, amount, currency, mode, designated_at, reserved)
             )
             INSERT INTO settlements (id, order_id, kind, partner_id, payer_terminal_id, amount_minor, currency,
                                      status, instructed_at, attempts, answer_due_at)
             SELECT id, order_id, 'purchase', partner_id, payer, amount, currency, 'instructed', $now, 1, answer_by
             FROM unnest($settlements::uuid[], $orders::uuid[], $partners::text[], $payers::text[], $amounts::int8[],
                         $currencies::text[], $answer_by::timestamptz[])
                  AS s(id, order_id, partner_id, payer, amount, currency, answer_by)",
        )
        .bind::<Timestamptz, _>("now", now)
        .bind::<Array<SqlUuid>, _>("orders", &self.ids)
        .bind::<Array<Text>, _>("request_ids", &self.request_ids)
        .bind::<Array<Text>, _>("orderers", &self.orderers)
        .bind::<Array<Text>, _>("payers", &self.payers)
        .bind::<Array<Text>, _>("products", &self.products)
        .bind::<Array<Int8>, _>("amounts", &self.amounts)
        .bind::<Array<Text>, _>("currencies", &self.currencies)
        .bind::<Array<Text>, _>("modes", &self.modes)
        .bind::<Array<Nullable<Timestamptz>>, _>("designated_at", &self.designated_at)
        .bind::<Array<Nullable<SqlUuid>>, _>("reserved", &self.reserved)
        .bind::<Array<SqlUuid>, _>("settlements", &self.settlements)
        .bind::<Array<Text>, _>("partners", &self.partners)
        .bind::<Array<Timestamptz>, _>("answer_by", &self.answer_by)
        .execute(conn)?;
        Ok(())
    }
}

/// notify_orderer sends a notice about an order to its orderer, once per `code`.
pub fn notify_orderer(
    conn: &mut PgConnection,
    settlements: &Settlements,
    order_id: Uuid,
    code: &str,
    text: String,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<()> {
    let (orderer, request_id): (String, String) =
        orders::table.find(order_id).select((orders::orderer_terminal_id, orders::request_id)).first(conn)?;
    let Some(terminal) = load_terminal(conn, &orderer)? else {
        return Ok(());
    };
    let d = order_notice(&terminal, order_id, Some(&request_id), format!("order:{order_id}:{code}"), code, text);
    delivery::enqueue_with(conn, &settlements.deliveries, d, now, sending)?;
    Ok(())
}

/// order_notice is a `message` delivery to `terminal` about an order, keyed by `dedupe_key`; a
/// notice to the orderer answers its purchase (`request_id`).
pub fn order_notice(
    terminal: &Terminal,
    order_id: Uuid,
    request_id: Option<&str>,
    dedupe_key: String,
    code: &str,
    text: String,
) -> NewDelivery {
    let notice = Notice {
        code: code.into(),
        text,
        order_id: Some(order_id),
        asset_id: None,
        certificate_id: None,
        request_id: request_id.map(str::to_string),
    };
    let mut d = NewDelivery::now(
        DeliveryKind::Message,
        dedupe_key,
        terminal,
        serde_json::to_value(notice).expect("serializes"),
    );
    d.request_id = request_id.map(str::to_string);
    d.order_id = Some(order_id);
    d
}

/// sweep_timeouts handles settlement instructions whose answer is overdue at `as_of`: each is sent
/// again, or, once its attempts are spent, abandoned and dead-lettered, and its order fails.
pub fn sweep_timeouts(
    conn: &mut PgConnection,
    settlements: &Settlements,
    as_of: DateTime<Utc>,
    batch: i64,
) -> QueryResult<Swept> {
    crate::runtime::metrics::held(|| conn.transaction(|conn| sweep_batch(conn, settlements, as_of, batch)))
}

/// sweep_batch is one transaction of [`sweep_timeouts`].
fn sweep_batch(
    conn: &mut PgConnection,
    settlements: &Settlements,
    as_of: DateTime<Utc>,
    batch: i64,
) -> QueryResult<Swept> {
    let mut sending = Vec::new();
    let due: Vec<Settlement> = settlements::table
        .filter(settlements::status.eq("instructed"))
        .filter(settlements::answer_due_at.le(as_of))
        .order(settlements::answer_due_at)
        .limit(batch)
        .for_update()
        .skip_locked()
        .select(Settlement::as_select())
        .load(conn)?;
    let mut swept = Swept { scanned: due.len() as u64, enqueued: 0 };
    for s in due {
        let attempts = s.attempts as u32;
        let limit = s.attempt_limit.map(|l| l as u32).unwrap_or_else(|| max_attempts(settlements, &s.partner_id));
        if attempts < limit {
            metrics::settlement_timed_out(&s.partner_id, "retried");
            instruct(conn, settlements, &s, attempts + 1, as_of, &mut sending)?;
            swept.enqueued += 1;
            continue;
        }
        metrics::settlement_timed_out(&s.partner_id, "abandoned");
        let detail = format!(
            "partner {} did not answer {} settlement {} after {attempts} instructions",
            s.partner_id, s.kind, s.id
        );
        diesel::update(settlements::table.find(s.id))
            .set((
                settlements::status.eq("abandoned"),
                settlements::reason.eq(&detail),
                settlements::answer_due_at.eq(None::<DateTime<Utc>>),
            ))
            .execute(conn)?;
        let refunding = s.kind == "refund";
        dead_letter::record(
            conn,
            &settlements.names,
            NewDeadLetter {
                pool: Pool::Settlement.as_str(),
                source: "settlement",
                message_type: kinds::SETTLEMENT_INSTRUCTION.into(),
                message_id: Some(format!("settlement:{}:{attempts}", s.id)),
                exchange: Some(settlements.names.partners()),
                routing_key: Some(s.partner_id.clone()),
                payload: serde_json::to_vec(&json!({"settlement_id": s.id, "order_id": s.order_id, "kind": s.kind, "partner_id": s.partner_id, "amount_minor": s.amount_minor, "currency": s.currency})).expect("serializes"),
                headers: json!({}),
                reason: DeadLetterReason::SettlementTimeout,
                detail: detail.clone(),
                attempts: json!([{"at": as_of, "error": detail}]),
                // A purchase is known by its order, a refund by its own settlement.
                subject_id: Some(if refunding { s.id } else { s.order_id }),
            },
        )?;
        swept.enqueued += 1;
        if refunding {
            // The refund stays requested: the partner may still pay it, and its answer counts.
            refund::abandoned(conn, settlements, &s, as_of, &mut sending)?;
            continue;
        }
        diesel::update(orders::table.find(s.order_id))
            .set((
                orders::status.eq("failed"),
                orders::status_reason.eq("settlement_timeout"),
                orders::updated_at.eq(as_of),
            ))
            .execute(conn)?;
        notify_orderer(conn, settlements, s.order_id, "order_failed", "your payment partner did not answer, so your order is on hold; if the partner confirms the payment later, the order is completed then".into(), as_of, &mut sending)?;
    }
    outbox::enqueue_all(conn, &sending)?;
    Ok(swept)
}

/// SettlementReplayer replays a settlement its partner never answered: it is instructed again,
/// with a fresh budget of attempts, and a purchase's order is settling again.
pub struct SettlementReplayer {
    pub settlements: Arc<Settlements>,
}

impl Replayer for SettlementReplayer {
    const SOURCE: &'static str = "settlement";

    fn replay(&self, conn: &mut PgConnection, letter: &Full, now: DateTime<Utc>) -> anyhow::Result<String> {
        let id = letter.summary.id;
        let subject =
            letter.summary.subject_id.ok_or_else(|| anyhow::anyhow!("dead letter {id} names no settlement"))?;
        // A refund's dead letter names its settlement; a purchase's, its order.
        let settlement: Settlement = settlements::table
            .filter(
                settlements::id.eq(subject).or(settlements::order_id.eq(subject).and(settlements::kind.eq("purchase"))),
            )
            .select(Settlement::as_select())
            .first(conn)?;
        anyhow::ensure!(
            settlement.status == "abandoned",
            "settlement {} is {}, not abandoned: nothing to replay",
            settlement.id,
            settlement.status
        );
        let budget = self.settlements.instruction.max_attempts as i32;
        diesel::update(settlements::table.find(settlement.id))
            .set((settlements::status.eq("instructed"), settlements::attempt_limit.eq(settlement.attempts + budget)))
            .execute(conn)?;
        if settlement.kind == "purchase" {
            diesel::update(orders::table.find(settlement.order_id))
                .set((
                    orders::status.eq("settling"),
                    orders::status_reason.eq(None::<String>),
                    orders::updated_at.eq(now),
                ))
                .execute(conn)?;
        }
        let mut sending = Vec::new();
        instruct(conn, &self.settlements, &settlement, settlement.attempts as u32 + 1, now, &mut sending)?;
        outbox::enqueue_all(conn, &sending)?;
        Ok(format!("settlement {} instructed again, with {budget} more attempts", settlement.id))
    }
}
