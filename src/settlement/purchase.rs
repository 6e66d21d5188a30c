//! `order.purchase`: validate the order and instruct the payer's partner.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{Settlement, answer_by, instruction};
use crate::catalogue::Product;
use crate::messages::{DeliveryModeKind, PurchaseRequest, kinds};
use crate::pool::{Cx, Failure, Handler, Incoming};
use crate::refusal::{Reason, Refused};
use crate::requests::{self, Header, Terminal, Verified};

/// PurchaseHandler takes `order.purchase`.
pub struct PurchaseHandler;

impl Handler for PurchaseHandler {
    fn message_type(&self) -> &'static str {
        kinds::ORDER_PURCHASE
    }

    fn handle(&self, cx: &mut Cx<'_>, message: &Incoming) -> Result<(), Failure> {
        let request: PurchaseRequest = message.decode()?;
        let header = Header {
            message_type: kinds::ORDER_PURCHASE,
            request_id: &request.request_id,
            terminal_id: &request.terminal_id,
            sent_at: request.sent_at,
        };
        let (terminal, sha) = match requests::verify(cx, &header, &message.json)? {
            Err((terminal, refused)) => {
                return requests::refuse(cx, message, &header, terminal.as_ref(), None, refused);
            }
            Ok(Verified::Duplicate { terminal, original, content_sha256 }) => {
                return requests::answer_duplicate(cx, message, &header, &terminal, &original, &content_sha256);
            }
            Ok(Verified::Fresh { terminal, content_sha256 }) => (terminal, content_sha256),
        };
        match plan(cx, &request, &terminal)? {
            Err(refused) => requests::refuse(cx, message, &header, Some(&terminal), Some(&sha), refused),
            Ok(plan) => {
                let order_id = Uuid::now_v7();
                requests::accept(cx, &header, &sha, order_id)?;
                place(cx, &request, &plan, order_id)?;
                tracing::info!(order_id = %order_id, request_id = %request.request_id, amount_minor = plan.amount_minor, "order placed");
                Ok(())
            }
        }
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
}

fn plan(cx: &mut Cx<'_>, request: &PurchaseRequest, orderer: &Terminal) -> Result<Result<Plan, Refused>, Failure> {
    macro_rules! refuse {
        ($reason:expr, $($detail:tt)*) => { return Ok(Err(Refused::new($reason, format!($($detail)*)))) };
    }
    let Some(product) = cx.product(&request.product_id)? else {
        refuse!(Reason::UnknownProduct, "product {:?} does not exist", request.product_id)
    };
    if !product.on_sale {
        refuse!(Reason::NotOnSale, "product {:?} is not on sale", product.id)
    }
    let payer_id = request.payer_terminal_id.clone().unwrap_or_else(|| orderer.id.clone());
    let Some(payer) = cx.terminal(&payer_id)? else {
        refuse!(Reason::UnknownParty, "payer terminal {payer_id:?} is not registered")
    };
    let Some(partner_id) = payer.partner_id.clone() else {
        refuse!(Reason::NoPaymentMethod, "payer terminal {payer_id:?} has no payment method")
    };
    if !cx.app.config.partners.contains_key(&partner_id) {
        refuse!(
            Reason::NoPaymentMethod,
            "payer terminal {payer_id:?} pays through partner {partner_id:?}, which is not configured"
        )
    }
    let recipients = request.recipient_terminal_ids.clone().unwrap_or_else(|| vec![orderer.id.clone()]);
    for recipient in &recipients {
        if cx.terminal(recipient)?.is_none() {
            refuse!(Reason::UnknownParty, "recipient terminal {recipient:?} is not registered")
        }
    }
    let Some(amount_minor) = product
        .price_minor
        .checked_mul(i64::from(request.quantity))
        .and_then(|a| a.checked_mul(recipients.len() as i64))
    else {
        refuse!(
            Reason::InvalidAmount,
            "{} x {} x {} recipients overflows",
            product.price_minor,
            request.quantity,
            recipients.len()
        )
    };
    if request.quantity == 0 {
        refuse!(Reason::InvalidAmount, "quantity must be at least 1")
    }
    let now = cx.now;
    let mode = request.delivery.as_ref().map(|d| d.mode).unwrap_or(DeliveryModeKind::Certificate);
    let asset_expiry = product.asset_expiry(now);
    let designated_at = match mode {
        DeliveryModeKind::Certificate => {
            if product.certificate_expiry(now) <= now {
                refuse!(
                    Reason::NotOnSale,
                    "product {:?} can no longer be exchanged: its certificates have expired",
                    product.id
                )
            }
            None
        }
        DeliveryModeKind::Immediate => Some(now),
        DeliveryModeKind::Designated => {
            let Some(at) = request.delivery.as_ref().and_then(|d| d.at) else {
                refuse!(Reason::InvalidDeliveryTime, "a designated delivery needs a time")
            };
            if at < now - chrono::Duration::from_std(cx.app.config.auth.max_clock_skew).expect("sane") {
                refuse!(Reason::InvalidDeliveryTime, "the designated time {at} is in the past")
            }
            Some(at.max(now))
        }
    };
    if asset_expiry <= designated_at.unwrap_or(now) {
        refuse!(Reason::InvalidDeliveryTime, "the asset would expire at {asset_expiry}, before its delivery")
    }
    Ok(Ok(Plan { product, payer, partner_id, recipients, amount_minor, mode, designated_at }))
}

fn place(cx: &mut Cx<'_>, request: &PurchaseRequest, plan: &Plan, order_id: Uuid) -> Result<(), Failure> {
    use diesel::sql_types::{Array, Int4, Int8, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    let now = cx.now;
    let answer_by = answer_by(cx.app, &plan.partner_id, now);
    let settlement = Settlement {
        id: Uuid::now_v7(),
        order_id,
        kind: "purchase".into(),
        partner_id: plan.partner_id.clone(),
        payer_terminal_id: plan.payer.id.clone(),
        amount_minor: plan.amount_minor,
        currency: plan.product.currency.clone(),
        status: "instructed".into(),
        attempts: 1,
        instructed_at: now,
        attempt_limit: None,
    };
    // The order and its settlement, in one round trip: the settlement's foreign key on the order
    // is checked at the end of the statement, when both rows are in.
    crate::db::prepared(
        "WITH placed AS (
           INSERT INTO orders (id, request_id, orderer_terminal_id, payer_terminal_id, recipient_terminal_ids,
                               product_id, quantity, amount_minor, currency, delivery_mode, designated_at, status,
                               created_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'settling', $12, $12)
         )
         INSERT INTO settlements (id, order_id, kind, partner_id, payer_terminal_id, amount_minor, currency, status,
                                  instructed_at, attempts, answer_due_at)
         VALUES ($13, $1, $14, $15, $4, $8, $9, 'instructed', $12, 1, $16)",
    )
    .bind::<SqlUuid, _>(order_id)
    .bind::<Text, _>(&request.request_id)
    .bind::<Text, _>(&request.terminal_id)
    .bind::<Text, _>(&plan.payer.id)
    .bind::<Array<Text>, _>(&plan.recipients)
    .bind::<Text, _>(&plan.product.id)
    .bind::<Int4, _>(request.quantity as i32)
    .bind::<Int8, _>(plan.amount_minor)
    .bind::<Text, _>(&plan.product.currency)
    .bind::<Text, _>(plan.mode.as_str())
    .bind::<Nullable<Timestamptz>, _>(plan.designated_at)
    .bind::<Timestamptz, _>(now)
    .bind::<SqlUuid, _>(settlement.id)
    .bind::<Text, _>(&settlement.kind)
    .bind::<Text, _>(&settlement.partner_id)
    .bind::<Timestamptz, _>(answer_by)
    .execute(cx.conn)?;
    cx.publish(instruction(cx.app, &settlement, 1, answer_by));
    Ok(())
}
