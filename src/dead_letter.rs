//! Dead letters: everything assetflow gives up on, recorded with its evidence and published to the
//! pool's dead-letter queue, until an operator replays or purges it.

use chrono::Utc;
use diesel::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use crate::broker::{Names, Pool};
use crate::db::schema::dead_letters;
use crate::messages::{DeadLetterMessage, kinds};
use crate::outbox::{self, Outgoing};
use crate::telemetry;

/// Reason is why something was dead-lettered: a bounded set, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The body is not UTF-8 JSON, or not an object, or too large.
    Malformed,
    /// The `type` is not one this queue's handlers take.
    UnknownMessageType,
    /// The message fails its JSON Schema.
    SchemaViolation,
    /// The routing key matched no binding on the requests exchange.
    Unroutable,
    /// The handler kept failing with transient errors up to the delivery limit.
    HandlerFailed,
    /// The handler found the message can never be processed.
    Unprocessable,
    /// A settlement result for a settlement assetflow does not know, or from another partner.
    UnknownSettlement,
    /// A second settlement result that contradicts the first.
    ConflictingResult,
    /// A receipt for a delivery or attempt assetflow does not know, or from another gateway.
    UnknownDelivery,
    /// A settlement instruction the partner never answered, after every attempt.
    SettlementTimeout,
    /// A transmission whose retries ran out.
    RetriesExhausted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnknownMessageType => "unknown_message_type",
            Reason::SchemaViolation => "schema_violation",
            Reason::Unroutable => "unroutable",
            Reason::HandlerFailed => "handler_failed",
            Reason::Unprocessable => "unprocessable",
            Reason::UnknownSettlement => "unknown_settlement",
            Reason::ConflictingResult => "conflicting_result",
            Reason::UnknownDelivery => "unknown_delivery",
            Reason::SettlementTimeout => "settlement_timeout",
            Reason::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// NewDeadLetter is what is recorded.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub pool: Pool,
    /// "message" (a message that could not be processed), "settlement" or "delivery".
    pub source: &'static str,
    pub message_type: String,
    pub message_id: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Value,
    pub reason: Reason,
    pub detail: String,
    /// Each attempt's time and error.
    pub attempts: Value,
    pub subject_id: Option<Uuid>,
}

/// record writes the dead letter and, through the outbox, publishes it to the pool's dead-letter
/// queue, inside the caller's transaction. A message dead-lettered twice (a redelivery racing
/// the first) is recorded once. It returns the id, or None when it was already recorded.
pub fn record(conn: &mut PgConnection, names: &Names, letter: NewDeadLetter) -> QueryResult<Option<Uuid>> {
    let id = Uuid::now_v7();
    let now = Utc::now();
    let inserted = diesel::insert_into(dead_letters::table)
        .values((
            dead_letters::id.eq(id),
            dead_letters::pool.eq(letter.pool.as_str()),
            dead_letters::source.eq(letter.source),
            dead_letters::message_type.eq(&letter.message_type),
            dead_letters::message_id.eq(&letter.message_id),
            dead_letters::exchange.eq(&letter.exchange),
            dead_letters::routing_key.eq(&letter.routing_key),
            dead_letters::payload.eq(&letter.payload),
            dead_letters::headers.eq(&letter.headers),
            dead_letters::reason.eq(letter.reason.as_str()),
            dead_letters::detail.eq(&letter.detail),
            dead_letters::attempts.eq(&letter.attempts),
            dead_letters::subject_id.eq(letter.subject_id),
            dead_letters::created_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?;
    if inserted == 0 {
        return Ok(None);
    }
    let message = DeadLetterMessage {
        message_type: kinds::DEAD_LETTER.into(),
        dead_letter_id: id,
        pool: letter.pool.as_str().into(),
        source: letter.source.into(),
        original_type: letter.message_type.clone(),
        reason: letter.reason.as_str().into(),
        detail: letter.detail.clone(),
        created_at: now,
        original: String::from_utf8(letter.payload).ok(),
    };
    outbox::enqueue(
        conn,
        &Outgoing::json(names.dlx(), letter.pool.as_str(), kinds::DEAD_LETTER, &message).correlated(id.to_string()),
    )?;
    tracing::warn!(dead_letter_id = %id, pool = %letter.pool, reason = letter.reason.as_str(), detail = %letter.detail, "dead-lettered");
    telemetry::dead_lettered(letter.pool.as_str(), letter.reason.as_str());
    Ok(Some(id))
}
