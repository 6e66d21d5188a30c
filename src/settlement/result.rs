//! `settlement.result`: a partner's answer. Settled orders go on to issuance; declined orders
//! end, and the orderer is told.

use diesel::prelude::*;

use super::{Settlement, notify_orderer};
use crate::db::schema::{orders, settlements};
use crate::dead_letter::Reason;
use crate::messages::{IssuanceRequested, SettlementOutcome, SettlementResult, kinds};
use crate::outbox::Outgoing;
use crate::pool::{Cx, Failure, Handler, Incoming};
use crate::telemetry;

/// ResultHandler takes `settlement.result`.
pub struct ResultHandler;

impl Handler for ResultHandler {
    fn message_type(&self) -> &'static str {
        kinds::SETTLEMENT_RESULT
    }

    fn handle(&self, cx: &mut Cx<'_>, message: &Incoming) -> Result<(), Failure> {
        let result: SettlementResult = serde_json::from_value(message.json.clone())
            .map_err(|e| Failure::permanent(Reason::SchemaViolation, e.to_string()))?;
        let Some(s) = settlements::table
            .find(result.settlement_id)
            .select(Settlement::as_select())
            .for_update()
            .first(cx.conn)
            .optional()?
        else {
            return Err(Failure::permanent(
                Reason::UnknownSettlement,
                format!("no settlement {}", result.settlement_id),
            ));
        };
        if s.partner_id != result.partner_id {
            return Err(Failure::permanent(
                Reason::UnknownSettlement,
                format!("settlement {} belongs to partner {}, not {}", s.id, s.partner_id, result.partner_id),
            ));
        }
        match s.status.as_str() {
            // A late answer after the instruction was abandoned still counts: the payer may have paid.
            "instructed" | "abandoned" => {}
            done if done == result.outcome.as_str() => return Ok(()), // The same answer again.
            done => {
                return Err(Failure::permanent(
                    Reason::ConflictingResult,
                    format!("settlement {} was already {done}; partner now says {}", s.id, result.outcome.as_str()),
                ));
            }
        }
        let now = cx.now;
        diesel::update(settlements::table.find(s.id))
            .set((
                settlements::status.eq(result.outcome.as_str()),
                settlements::partner_reference.eq(&result.partner_reference),
                settlements::reason.eq(&result.reason),
                settlements::answered_at.eq(now),
                settlements::answer_due_at.eq(None::<chrono::DateTime<chrono::Utc>>),
            ))
            .execute(cx.conn)?;
        let outcome: &'static str = result.outcome.as_str();
        telemetry::settlement_answered(&s.partner_id, outcome, (now - s.instructed_at).to_std().unwrap_or_default());
        match result.outcome {
            SettlementOutcome::Settled => {
                diesel::update(orders::table.find(s.order_id))
                    .set((
                        orders::status.eq("issuing"),
                        orders::status_reason.eq(None::<String>),
                        orders::updated_at.eq(now),
                    ))
                    .execute(cx.conn)?;
                let next = IssuanceRequested { message_type: kinds::ISSUANCE_REQUESTED.into(), order_id: s.order_id };
                cx.publish(
                    Outgoing::json(
                        cx.app.names.internal(),
                        kinds::ISSUANCE_REQUESTED,
                        kinds::ISSUANCE_REQUESTED,
                        &next,
                    )
                    .correlated(s.order_id.to_string()),
                );
            }
            SettlementOutcome::Declined => {
                let reason = result.reason.clone().unwrap_or_else(|| "declined by the partner".into());
                diesel::update(orders::table.find(s.order_id))
                    .set((orders::status.eq("declined"), orders::status_reason.eq(&reason), orders::updated_at.eq(now)))
                    .execute(cx.conn)?;
                notify_orderer(
                    cx.conn,
                    cx.app,
                    s.order_id,
                    "order_declined",
                    format!("your payment was declined: {reason}"),
                    now,
                    cx.outgoing,
                )?;
            }
        }
        tracing::info!(order_id = %s.order_id, settlement_id = %s.id, outcome, "settlement answered");
        Ok(())
    }
}
