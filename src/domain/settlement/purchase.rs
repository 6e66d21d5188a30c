//! `order.purchase`: validate the order and instruct the payer's partner. Purchases handled
//! together are authenticated one by one (a signature each), then read in three statements (their
//! parties, their request ids and the product) and placed in one. An order billed to a terminal
//! other than its orderer, unless the product or the payer waives it, is placed `confirming`
//! instead, with no settlement: its payer is asked to confirm it (`confirm.rs`), in two more
//! statements taken only by batches that hold such orders.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use std::sync::Arc;

use super::{Settlement, Settlements, answer_by, instruction};
use crate::contracts::messages::{ConfirmationRequest, DeliveryKind, DeliveryModeKind, PurchaseRequest, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::domain::catalogue::{Catalogue, Product, Terminal};
use crate::domain::delivery::{self, Deliveries, NewDelivery};
use crate::domain::requests::{Admitted, Header, Requests};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received, together_unless_repeated};

/// PurchaseHandler takes `order.purchase`.
pub struct PurchaseHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
}

impl Handler for PurchaseHandler {
    type Message = PurchaseRequest;
    const MESSAGE_TYPE: &'static str = kinds::ORDER_PURCHASE;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, PurchaseRequest>]) -> Result<(), Failure> {
        together_unless_repeated(cx, batch, |r| [r.request_id.clone()], |cx, batch| self.take(cx, batch))
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::ORDER_PURCHASE, detail)
    }
}

fn header(request: &PurchaseRequest) -> Header<'_> {
    Header {
        message_type: kinds::ORDER_PURCHASE,
        request_id: &request.request_id,
        terminal_id: &request.terminal_id,
        sent_at: request.sent_at,
    }
}

/// Plan is a validated order, ready to be placed.
struct Plan {
    product: Product,
    payer: Terminal,
    partner_id: String,
    recipients: Vec<String>,
    amount_minor: i64,
    mode: DeliveryModeKind,
    designated_at: Option<DateTime<Utc>>,
    /// When the payer must have confirmed the order, if it must confirm it.
    confirm_by: Option<DateTime<Utc>>,
}

impl PurchaseHandler {
    /// take carries out purchases with distinct request ids. Each is checked as it would be alone, in
    /// the order of the checks `requests` describes; what is refused or repeated is answered at once,
    /// and the orders are placed together at the end.
    fn take(&self, cx: &mut Cx<'_>, batch: &[Received<'_, PurchaseRequest>]) -> Result<(), Failure> {
        let req = &*self.requests;
        cx.read_terminals(batch.iter().map(|r| &r.message).flat_map(|p| {
            let payer = p.payer_terminal_id.iter();
            let recipients = p.recipient_terminal_ids.iter().flatten();
            std::iter::once(&p.terminal_id).chain(payer).chain(recipients).map(String::as_str)
        }))?;
        let admitted = req.admit_batch(cx, batch, header)?;
        let mut placing = Placing::default();
        let mut confirming = Confirming::default();
        for Admitted { incoming: message, message: purchase, terminal, content_sha256: sha } in admitted {
            let header = header(purchase);
            match self.plan(cx, purchase, &terminal)? {
                Err(refused) => req.refuse(cx, message, &header, Some(&terminal), Some(&sha), refused)?,
                Ok(plan) if plan.confirm_by.is_some() => confirming.push(purchase, plan, sha),
                Ok(plan) => placing.push(cx, &self.settlements, purchase, plan, sha),
            }
        }
        placing.write(cx)?;
        confirming.write(cx, &self.settlements.deliveries)
    }

    fn plan(
        &self,
        cx: &mut Cx<'_>,
        request: &PurchaseRequest,
        orderer: &Terminal,
    ) -> Result<Result<Plan, Refused>, Failure> {
        macro_rules! refuse {
        ($reason:expr, $($detail:tt)*) => { return Ok(Err(Refused::new($reason, format!($($detail)*)))) };
    }
        let Some(product) = cx.product(&request.product_id)? else {
            refuse!(RefusalReason::UnknownProduct, "product {:?} does not exist", request.product_id)
        };
        if !product.on_sale {
            refuse!(RefusalReason::NotOnSale, "product {:?} is not on sale", product.id)
        }
        let payer_id = request.payer_terminal_id.clone().unwrap_or_else(|| orderer.id.clone());
        let Some(payer) = cx.terminal(&payer_id)? else {
            refuse!(RefusalReason::UnknownParty, "payer terminal {payer_id:?} is not registered")
        };
        let Some(partner_id) = payer.partner_id.clone() else {
            refuse!(RefusalReason::NoPaymentMethod, "payer terminal {payer_id:?} has no payment method")
        };
        if !self.settlements.partners.contains_key(&partner_id) {
            refuse!(
                RefusalReason::NoPaymentMethod,
                "payer terminal {payer_id:?} pays through partner {partner_id:?}, which is not configured"
            )
        }
        let recipients = request.recipient_terminal_ids.clone().unwrap_or_else(|| vec![orderer.id.clone()]);
        for recipient in &recipients {
            if cx.terminal(recipient)?.is_none() {
                refuse!(RefusalReason::UnknownParty, "recipient terminal {recipient:?} is not registered")
            }
        }
        let Some(amount_minor) = product
            .price_minor
            .checked_mul(i64::from(request.quantity))
            .and_then(|a| a.checked_mul(recipients.len() as i64))
        else {
            refuse!(
                RefusalReason::InvalidAmount,
                "{} x {} x {} recipients overflows",
                product.price_minor,
                request.quantity,
                recipients.len()
            )
        };
        if request.quantity == 0 {
            refuse!(RefusalReason::InvalidAmount, "quantity must be at least 1")
        }
        let now = cx.now;
        let mode = request.delivery.as_ref().map(|d| d.mode).unwrap_or(DeliveryModeKind::Certificate);
        let asset_expiry = product.asset_expiry(now);
        let designated_at = match mode {
            DeliveryModeKind::Certificate => {
                if product.certificate_expiry(now) <= now {
                    refuse!(
                        RefusalReason::NotOnSale,
                        "product {:?} can no longer be exchanged: its certificates have expired",
                        product.id
                    )
                }
                None
            }
            DeliveryModeKind::Immediate => Some(now),
            DeliveryModeKind::Designated => {
                let Some(at) = request.delivery.as_ref().and_then(|d| d.at) else {
                    refuse!(RefusalReason::InvalidDeliveryTime, "a designated delivery needs a time")
                };
                if at < now - chrono::Duration::from_std(self.requests.auth.max_clock_skew).expect("sane") {
                    refuse!(RefusalReason::InvalidDeliveryTime, "the designated time {at} is in the past")
                }
                Some(at.max(now))
            }
        };
        if asset_expiry <= designated_at.unwrap_or(now) {
            refuse!(RefusalReason::InvalidDeliveryTime, "the asset would expire at {asset_expiry}, before its delivery")
        }
        let confirm_by = product.needs_confirmation(orderer, &payer).then(|| product.confirm_by(now));
        Ok(Ok(Plan { product, payer, partner_id, recipients, amount_minor, mode, designated_at, confirm_by }))
    }
}

/// Orders is the orders of a batch to place, column by column.
#[derive(Default)]
struct Orders {
    ids: Vec<Uuid>,
    request_ids: Vec<String>,
    orderers: Vec<String>,
    content_sha256s: Vec<String>,
    sent_at: Vec<DateTime<Utc>>,
    payers: Vec<String>,
    recipients: Vec<Value>,
    products: Vec<String>,
    quantities: Vec<i32>,
    amounts: Vec<i64>,
    currencies: Vec<String>,
    modes: Vec<&'static str>,
    designated_at: Vec<Option<DateTime<Utc>>>,
}

impl Orders {
    fn push(&mut self, order_id: Uuid, purchase: &PurchaseRequest, plan: Plan, content_sha256: String) {
        tracing::info!(order_id = %order_id, request_id = %purchase.request_id, amount_minor = plan.amount_minor, confirming = plan.confirm_by.is_some(), "order placed");
        self.ids.push(order_id);
        self.request_ids.push(purchase.request_id.clone());
        self.orderers.push(purchase.terminal_id.clone());
        self.content_sha256s.push(content_sha256);
        self.sent_at.push(purchase.sent_at);
        self.payers.push(plan.payer.id);
        self.recipients.push(Value::from(plan.recipients));
        self.products.push(plan.product.id);
        self.quantities.push(purchase.quantity as i32);
        self.amounts.push(plan.amount_minor);
        self.currencies.push(plan.product.currency);
        self.modes.push(plan.mode.as_str());
        self.designated_at.push(plan.designated_at);
    }
}

/// Placing is the orders of a batch that go to settlement at once, for [`Placing::write`].
#[derive(Default)]
struct Placing {
    orders: Orders,
    settlements: Vec<Uuid>,
    partners: Vec<String>,
    answer_by: Vec<DateTime<Utc>>,
}

impl Placing {
    /// Placing::push adds an order, and its partner's first instruction to what the transaction
    /// publishes.
    fn push(
        &mut self,
        cx: &mut Cx<'_>,
        settlements: &Settlements,
        purchase: &PurchaseRequest,
        plan: Plan,
        content_sha256: String,
    ) {
        let order_id = Uuid::now_v7();
        let answer_by = answer_by(settlements, &plan.partner_id, cx.now);
        let settlement = Settlement::instructed(
            order_id,
            "purchase",
            plan.partner_id.clone(),
            plan.payer.id.clone(),
            plan.amount_minor,
            plan.product.currency.clone(),
            cx.now,
        );
        cx.publish(instruction(settlements, &settlement, 1, answer_by));
        self.settlements.push(settlement.id);
        self.partners.push(settlement.partner_id);
        self.answer_by.push(answer_by);
        self.orders.push(order_id, purchase, plan, content_sha256);
    }

    /// Placing::write records the requests as accepted and places their orders with their
    /// settlements, in one round trip whatever their number. The foreign keys between the three
    /// are checked at the end of the statement, when all the rows are in; a request id another
    /// transaction took meanwhile fails it as a whole (see `Failure::from` for unique violations).
    fn write(&self, cx: &mut Cx<'_>) -> Result<(), Failure> {
        use diesel::sql_types::{Array, Int4, Int8, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        let orders = &self.orders;
        if orders.ids.is_empty() {
            return Ok(());
        }
        crate::runtime::db::prepared(
            "WITH recorded AS (
               INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at,
                                              received_at, outcome, subject_id)
               SELECT request_id, orderer, $message_type, sha, sent_at, $now, 'accepted', id
               FROM unnest($orders::uuid[], $request_ids::text[], $orderers::text[], $content_sha256s::text[], $sent_at::timestamptz[])
                    AS r(id, request_id, orderer, sha, sent_at)
             ), placed AS (
               INSERT INTO orders (id, request_id, orderer_terminal_id, payer_terminal_id, recipient_terminal_ids,
                                   product_id, quantity, amount_minor, currency, delivery_mode, designated_at, status,
                                   created_at, updated_at)
               SELECT id, request_id, orderer, payer, ARRAY(SELECT jsonb_array_elements_text(recipients)),
                      product_id, quantity, amount, currency, mode, designated_at, 'settling', $now, $now
               FROM unnest($orders::uuid[], $request_ids::text[], $orderers::text[], $payers::text[], $recipients::jsonb[], $products::text[], $quantities::int4[],
                           $amounts::int8[], $currencies::text[], $modes::text[], $designated_at::timestamptz[])
                    AS o(id, request_id, orderer, payer, recipients, product_id, quantity, amount, currency, mode,
                         designated_at)
             )
             INSERT INTO settlements (id, order_id, kind, partner_id, payer_terminal_id, amount_minor, currency,
                                      status, instructed_at, attempts, answer_due_at)
             SELECT id, order_id, 'purchase', partner_id, payer, amount, currency, 'instructed', $now, 1, answer_by
             FROM unnest($settlements::uuid[], $orders::uuid[], $partners::text[], $payers::text[], $amounts::int8[], $currencies::text[],
                         $answer_by::timestamptz[])
                  AS s(id, order_id, partner_id, payer, amount, currency, answer_by)",
        )
        .bind::<Timestamptz, _>("now", cx.now)
        .bind::<Text, _>("message_type", kinds::ORDER_PURCHASE)
        .bind::<Array<SqlUuid>, _>("orders", &orders.ids)
        .bind::<Array<Text>, _>("request_ids", &orders.request_ids)
        .bind::<Array<Text>, _>("orderers", &orders.orderers)
        .bind::<Array<Text>, _>("content_sha256s", &orders.content_sha256s)
        .bind::<Array<Timestamptz>, _>("sent_at", &orders.sent_at)
        .bind::<Array<Text>, _>("payers", &orders.payers)
        .bind::<Array<Jsonb>, _>("recipients", &orders.recipients)
        .bind::<Array<Text>, _>("products", &orders.products)
        .bind::<Array<Int4>, _>("quantities", &orders.quantities)
        .bind::<Array<Int8>, _>("amounts", &orders.amounts)
        .bind::<Array<Text>, _>("currencies", &orders.currencies)
        .bind::<Array<Text>, _>("modes", &orders.modes)
        .bind::<Array<Nullable<Timestamptz>>, _>("designated_at", &orders.designated_at)
        .bind::<Array<SqlUuid>, _>("settlements", &self.settlements)
        .bind::<Array<Text>, _>("partners", &self.partners)
        .bind::<Array<Timestamptz>, _>("answer_by", &self.answer_by)
        .execute(cx.conn)?;
        Ok(())
    }
}

/// Confirming is the orders of a batch that wait for their payer's confirmation, with the
/// confirmation requests to their payers, for [`Confirming::write`].
#[derive(Default)]
struct Confirming {
    orders: Orders,
    confirm_by: Vec<DateTime<Utc>>,
    requests: Vec<NewDelivery>,
}

impl Confirming {
    /// Confirming::push adds an order billed to a payer that must confirm it, and the request to
    /// confirm it that goes to the payer's terminal (`docs/product.md#payer-confirmation`).
    fn push(&mut self, purchase: &PurchaseRequest, plan: Plan, content_sha256: String) {
        let order_id = Uuid::now_v7();
        let confirm_by = plan.confirm_by.expect("only orders to confirm are pushed");
        let content = ConfirmationRequest {
            order_id,
            orderer_terminal_id: purchase.terminal_id.clone(),
            product_id: plan.product.id.clone(),
            quantity: purchase.quantity,
            amount_minor: plan.amount_minor,
            currency: plan.product.currency.clone(),
            confirm_by,
        };
        let mut request = NewDelivery::now(
            DeliveryKind::ConfirmationRequest,
            format!("order:{order_id}:confirmation"),
            &plan.payer,
            serde_json::to_value(content).expect("serializes"),
        );
        request.order_id = Some(order_id);
        self.requests.push(request);
        self.confirm_by.push(confirm_by);
        self.orders.push(order_id, purchase, plan, content_sha256);
    }

    /// Confirming::write records the requests as accepted and places their orders `confirming`,
    /// due at the end of their windows, in one statement; then the confirmation requests to their
    /// payers, in one more. Nothing is settled yet.
    fn write(&self, cx: &mut Cx<'_>, deliveries: &Deliveries) -> Result<(), Failure> {
        use diesel::sql_types::{Array, Int4, Int8, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        let orders = &self.orders;
        if orders.ids.is_empty() {
            return Ok(());
        }
        crate::runtime::db::prepared(
            "WITH recorded AS (
               INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at,
                                              received_at, outcome, subject_id)
               SELECT request_id, orderer, $message_type, sha, sent_at, $now, 'accepted', id
               FROM unnest($orders::uuid[], $request_ids::text[], $orderers::text[], $content_sha256s::text[], $sent_at::timestamptz[])
                    AS r(id, request_id, orderer, sha, sent_at)
             )
             INSERT INTO orders (id, request_id, orderer_terminal_id, payer_terminal_id, recipient_terminal_ids,
                                 product_id, quantity, amount_minor, currency, delivery_mode, designated_at, status,
                                 confirm_due_at, created_at, updated_at)
             SELECT id, request_id, orderer, payer, ARRAY(SELECT jsonb_array_elements_text(recipients)),
                    product_id, quantity, amount, currency, mode, designated_at, 'confirming', confirm_by, $now, $now
             FROM unnest($orders::uuid[], $request_ids::text[], $orderers::text[], $payers::text[], $recipients::jsonb[], $products::text[], $quantities::int4[],
                         $amounts::int8[], $currencies::text[], $modes::text[], $designated_at::timestamptz[], $confirm_by::timestamptz[])
                  AS o(id, request_id, orderer, payer, recipients, product_id, quantity, amount, currency, mode,
                       designated_at, confirm_by)",
        )
        .bind::<Timestamptz, _>("now", cx.now)
        .bind::<Text, _>("message_type", kinds::ORDER_PURCHASE)
        .bind::<Array<SqlUuid>, _>("orders", &orders.ids)
        .bind::<Array<Text>, _>("request_ids", &orders.request_ids)
        .bind::<Array<Text>, _>("orderers", &orders.orderers)
        .bind::<Array<Text>, _>("content_sha256s", &orders.content_sha256s)
        .bind::<Array<Timestamptz>, _>("sent_at", &orders.sent_at)
        .bind::<Array<Text>, _>("payers", &orders.payers)
        .bind::<Array<Jsonb>, _>("recipients", &orders.recipients)
        .bind::<Array<Text>, _>("products", &orders.products)
        .bind::<Array<Int4>, _>("quantities", &orders.quantities)
        .bind::<Array<Int8>, _>("amounts", &orders.amounts)
        .bind::<Array<Text>, _>("currencies", &orders.currencies)
        .bind::<Array<Text>, _>("modes", &orders.modes)
        .bind::<Array<Nullable<Timestamptz>>, _>("designated_at", &orders.designated_at)
        .bind::<Array<Timestamptz>, _>("confirm_by", &self.confirm_by)
        .execute(cx.conn)?;
        delivery::enqueue_many(cx, deliveries, &self.requests)?;
        Ok(())
    }
}
