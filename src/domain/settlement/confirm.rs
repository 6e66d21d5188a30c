//! `order.confirm` (`docs/product.md#payer-confirmation`): the payer's terminal answers an order
//! another terminal billed to it. Confirmed, the order is settled like any other: its settlement
//! is made and the payer's partner instructed. Declined, it ends with nothing charged, and the
//! orderer is told. Confirmations are taken one at a time: each locks its order.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{Settlement, Settlements, answer_by, instruction, notify_orderer};
use crate::contracts::messages::{ConfirmAnswer, ConfirmRequest, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::domain::catalogue::Terminal;
use crate::domain::metrics;
use crate::domain::requests::{Authentic, Header, Requests};
use crate::domain::schema::{orders, settlements};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received};

/// ConfirmHandler takes `order.confirm`.
pub struct ConfirmHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
}

impl Handler for ConfirmHandler {
    type Message = ConfirmRequest;
    const MESSAGE_TYPE: &'static str = kinds::ORDER_CONFIRM;

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, ConfirmRequest>]) -> Result<(), Failure> {
        for Received { message, incoming } in batch {
            self.take(cx, incoming, message)?;
        }
        Ok(())
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::ORDER_CONFIRM, detail)
    }
}

fn header(request: &ConfirmRequest) -> Header<'_> {
    Header {
        message_type: kinds::ORDER_CONFIRM,
        request_id: &request.request_id,
        terminal_id: &request.terminal_id,
        sent_at: request.sent_at,
    }
}

/// Awaiting is an order as a confirmation reads it.
#[derive(Debug, Queryable)]
struct Awaiting {
    id: Uuid,
    payer_terminal_id: String,
    status: String,
    confirm_due_at: Option<DateTime<Utc>>,
    amount_minor: i64,
    currency: String,
}

impl ConfirmHandler {
    /// take answers one confirmation: authenticated, then matched against its request id, then
    /// checked against its order, locked.
    fn take(&self, cx: &mut Cx<'_>, message: &Incoming, request: &ConfirmRequest) -> Result<(), Failure> {
        let req = &*self.requests;
        let header = header(request);
        let Some(Authentic { terminal, content_sha256: sha }) = req.admit(cx, message, &header)? else {
            return Ok(());
        };
        let order: Option<Awaiting> = orders::table
            .find(request.order_id)
            .select((
                orders::id,
                orders::payer_terminal_id,
                orders::status,
                orders::confirm_due_at,
                orders::amount_minor,
                orders::currency,
            ))
            .for_update()
            .first(cx.conn)
            .optional()?;
        let order = match answerable(order, request, &terminal, message.first_received_at) {
            Ok(order) => order,
            Err(refused) => return req.refuse(cx, message, &header, Some(&terminal), Some(&sha), refused),
        };
        match request.answer {
            ConfirmAnswer::Confirm => {
                let Some(partner_id) =
                    terminal.partner_id.clone().filter(|p| self.settlements.partners.contains_key(p))
                else {
                    let detail = format!("payer terminal {:?} has no configured payment method", terminal.id);
                    let refused = Refused::new(RefusalReason::NoPaymentMethod, detail);
                    return req.refuse(cx, message, &header, Some(&terminal), Some(&sha), refused);
                };
                req.accept(cx, &header, &sha, order.id)?;
                self.confirm(cx, &order, partner_id, &request.request_id)
            }
            ConfirmAnswer::Decline => {
                req.accept(cx, &header, &sha, order.id)?;
                self.decline(cx, &order, &request.request_id)
            }
        }
    }

    /// confirm makes the order's settlement and instructs the payer's partner, as a purchase that
    /// needed no confirmation does at once.
    fn confirm(&self, cx: &mut Cx<'_>, order: &Awaiting, partner_id: String, request_id: &str) -> Result<(), Failure> {
        let now = cx.now;
        let settlement = Settlement::instructed(
            order.id,
            "purchase",
            partner_id,
            order.payer_terminal_id.clone(),
            order.amount_minor,
            order.currency.clone(),
            now,
        );
        let answer_by = answer_by(&self.settlements, &settlement.partner_id, now);
        diesel::insert_into(settlements::table)
            .values((
                settlements::id.eq(settlement.id),
                settlements::order_id.eq(settlement.order_id),
                settlements::kind.eq(&settlement.kind),
                settlements::partner_id.eq(&settlement.partner_id),
                settlements::payer_terminal_id.eq(&settlement.payer_terminal_id),
                settlements::amount_minor.eq(settlement.amount_minor),
                settlements::currency.eq(&settlement.currency),
                settlements::status.eq(&settlement.status),
                settlements::attempts.eq(settlement.attempts),
                settlements::answer_due_at.eq(answer_by),
                settlements::instructed_at.eq(now),
            ))
            .execute(cx.conn)?;
        diesel::update(orders::table.find(order.id))
            .set((
                orders::status.eq("settling"),
                orders::confirmed_at.eq(now),
                orders::confirmation_request_id.eq(request_id),
                orders::updated_at.eq(now),
            ))
            .execute(cx.conn)?;
        cx.publish(instruction(&self.settlements, &settlement, 1, answer_by));
        metrics::confirmation("confirmed");
        tracing::info!(order_id = %order.id, request_id, "order confirmed by its payer");
        Ok(())
    }

    /// decline ends the order with nothing charged, and tells the orderer.
    fn decline(&self, cx: &mut Cx<'_>, order: &Awaiting, request_id: &str) -> Result<(), Failure> {
        let now = cx.now;
        diesel::update(orders::table.find(order.id))
            .set((
                orders::status.eq("declined"),
                orders::status_reason.eq("payer_declined"),
                orders::confirmation_request_id.eq(request_id),
                orders::updated_at.eq(now),
            ))
            .execute(cx.conn)?;
        let text = format!("the payer {} declined your order: nothing was charged", order.payer_terminal_id);
        notify_orderer(cx.conn, &self.settlements, order.id, "order_declined", text, now, cx.outgoing)?;
        metrics::confirmation("declined");
        tracing::info!(order_id = %order.id, request_id, "order declined by its payer");
        Ok(())
    }
}

/// answerable checks that the order exists, that the terminal is its payer, and that it is still
/// waiting for the payer's answer at `received_at` (when the answer first reached the pool).
fn answerable(
    order: Option<Awaiting>,
    request: &ConfirmRequest,
    terminal: &Terminal,
    received_at: DateTime<Utc>,
) -> Result<Awaiting, Refused> {
    let id = request.order_id;
    let Some(order) = order else {
        return Err(Refused::new(RefusalReason::UnknownOrder, format!("no order {id}")));
    };
    // Checked before the order's state, which is none of another terminal's business.
    if order.payer_terminal_id != terminal.id {
        let detail = format!("terminal {} is not the payer of order {id}", terminal.id);
        return Err(Refused::new(RefusalReason::NotThePayer, detail));
    }
    let expired = |due: DateTime<Utc>| {
        Refused::new(RefusalReason::ConfirmationExpired, format!("order {id} had to be confirmed by {due}"))
    };
    match (order.status.as_str(), order.confirm_due_at) {
        ("confirming", Some(due)) if received_at > due => Err(expired(due)),
        ("confirming", _) => Ok(order),
        ("unconfirmed", Some(due)) => Err(expired(due)),
        (status, _) => Err(Refused::new(
            RefusalReason::OrderNotAwaitingConfirmation,
            format!("order {id} is {status}: it is not waiting for its payer's confirmation"),
        )),
    }
}
