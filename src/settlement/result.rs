//! `settlement.result`: a partner's answer. Settled orders go on to issuance; declined orders
//! end, and the orderer is told.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::{Settlement, notify_orderer};
use crate::db::schema::settlements;
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
        let outcome: &'static str = result.outcome.as_str();
        match result.outcome {
            SettlementOutcome::Settled => {
                answer(cx.conn, &s, &result, "issuing", None, now)?;
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
                answer(cx.conn, &s, &result, "declined", Some(&reason), now)?;
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
        telemetry::settlement_answered(&s.partner_id, outcome, (now - s.instructed_at).to_std().unwrap_or_default());
        tracing::info!(order_id = %s.order_id, settlement_id = %s.id, outcome, "settlement answered");
        Ok(())
    }
}

/// answer records the partner's answer on the settlement and moves its order on: one round trip.
fn answer(
    conn: &mut PgConnection,
    s: &Settlement,
    result: &SettlementResult,
    order_status: &str,
    order_reason: Option<&str>,
    now: DateTime<Utc>,
) -> QueryResult<()> {
    use diesel::sql_types::{Nullable, Text, Timestamptz, Uuid as SqlUuid};
    crate::db::prepared(
        "WITH answered AS (
           UPDATE settlements SET status = $2, partner_reference = $3, reason = $4, answered_at = $5,
                                  answer_due_at = NULL
           WHERE id = $1
         )
         UPDATE orders SET status = $7, status_reason = $8, updated_at = $5 WHERE id = $6",
    )
    .bind::<SqlUuid, _>(s.id)
    .bind::<Text, _>(result.outcome.as_str())
    .bind::<Nullable<Text>, _>(&result.partner_reference)
    .bind::<Nullable<Text>, _>(&result.reason)
    .bind::<Timestamptz, _>(now)
    .bind::<SqlUuid, _>(s.order_id)
    .bind::<Text, _>(order_status)
    .bind::<Nullable<Text>, _>(order_reason)
    .execute(conn)?;
    Ok(())
}
