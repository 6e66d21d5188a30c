//! Dead letters: everything assetflow gives up on, recorded with its evidence and published to the
//! pool's dead-letter queue, until an operator replays or purges it.
//!
//! This file is the store: what is recorded, and the operator's list, show and purge. Replaying
//! is `replay.rs`; `recorder.rs` records what the broker dead-letters by itself.

mod recorder;
mod replay;

pub use recorder::{record_from_broker, run_recorder};
pub use replay::{MessageReplayer, Replayed, Replayer, Replayers};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeadLetterMessage, kinds};
use crate::contracts::topology::Names;
use crate::runtime::db::schema::{dead_letter_audit, dead_letters};
use crate::runtime::metrics;
use crate::runtime::outbox::{self, Outgoing};

/// NewDeadLetter is what is recorded.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// The pool whose work it was.
    pub pool: &'static str,
    /// "message" (a message that could not be processed), "settlement" or "delivery".
    pub source: &'static str,
    pub message_type: String,
    pub message_id: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Value,
    pub reason: DeadLetterReason,
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
            dead_letters::pool.eq(letter.pool),
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
        pool: letter.pool.into(),
        source: letter.source.into(),
        original_type: letter.message_type.clone(),
        reason: letter.reason.as_str().into(),
        detail: letter.detail.clone(),
        created_at: now,
        original: String::from_utf8(letter.payload).ok(),
    };
    outbox::enqueue(
        conn,
        &Outgoing::json(names.dlx(), letter.pool, kinds::DEAD_LETTER, &message).correlated(id.to_string()),
    )?;
    tracing::warn!(dead_letter_id = %id, pool = %letter.pool, reason = letter.reason.as_str(), detail = %letter.detail, "dead-lettered");
    metrics::dead_lettered(letter.pool, letter.reason.as_str());
    Ok(Some(id))
}

/// Filter selects dead letters for the operator commands.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ids: Vec<Uuid>,
    pub pool: Option<String>,
    pub reason: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Include dead letters that were already replayed.
    pub replayed: bool,
}

/// Summary is a dead letter as `dlq list` shows it: with the original's AMQP message id and
/// type, so that a publisher can match it to what it sent.
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = dead_letters)]
pub struct Summary {
    pub id: Uuid,
    pub pool: String,
    pub source: String,
    pub message_id: Option<String>,
    pub message_type: String,
    pub reason: String,
    pub detail: String,
    pub created_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replay_count: i32,
    pub subject_id: Option<Uuid>,
}

/// Full is a dead letter with all its evidence, as `dlq show` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Full {
    #[serde(flatten)]
    pub summary: Summary,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub headers: Value,
    pub attempts: Value,
    /// The original body: as JSON when it is JSON, as text when it is UTF-8, else as hex.
    pub payload: Value,
    pub audit: Vec<Value>,
}

fn filtered(filter: &Filter) -> dead_letters::BoxedQuery<'static, diesel::pg::Pg> {
    let mut query = dead_letters::table.into_boxed();
    if !filter.ids.is_empty() {
        query = query.filter(dead_letters::id.eq_any(filter.ids.clone()));
    }
    if let Some(pool) = &filter.pool {
        query = query.filter(dead_letters::pool.eq(pool.clone()));
    }
    if let Some(reason) = &filter.reason {
        query = query.filter(dead_letters::reason.eq(reason.clone()));
    }
    if let Some(since) = filter.since {
        query = query.filter(dead_letters::created_at.ge(since));
    }
    if !filter.replayed && filter.ids.is_empty() {
        query = query.filter(dead_letters::replayed_at.is_null());
    }
    query
}

/// list returns the dead letters a filter selects, newest first.
pub fn list(conn: &mut PgConnection, filter: &Filter, limit: i64) -> QueryResult<Vec<Summary>> {
    filtered(filter).order(dead_letters::created_at.desc()).limit(limit).select(Summary::as_select()).load(conn)
}

/// show returns one dead letter with its evidence and its audit trail.
pub fn show(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<Full>> {
    let Some(summary) = dead_letters::table.find(id).select(Summary::as_select()).first::<Summary>(conn).optional()?
    else {
        return Ok(None);
    };
    let (exchange, routing_key, headers, attempts, payload): (Option<String>, Option<String>, Value, Value, Vec<u8>) =
        dead_letters::table
            .find(id)
            .select((
                dead_letters::exchange,
                dead_letters::routing_key,
                dead_letters::headers,
                dead_letters::attempts,
                dead_letters::payload,
            ))
            .first(conn)?;
    let audit = dead_letter_audit::table
        .filter(dead_letter_audit::dead_letter_id.eq(id))
        .order(dead_letter_audit::id)
        .select((
            dead_letter_audit::action,
            dead_letter_audit::operator,
            dead_letter_audit::note,
            dead_letter_audit::at,
        ))
        .load::<(String, String, Option<String>, DateTime<Utc>)>(conn)?
        .into_iter()
        .map(|(action, operator, note, at)| json!({"action": action, "operator": operator, "note": note, "at": at}))
        .collect();
    Ok(Some(Full { summary, exchange, routing_key, headers, attempts, payload: readable(&payload), audit }))
}

fn readable(payload: &[u8]) -> Value {
    match std::str::from_utf8(payload) {
        Ok(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())),
        Err(_) => json!({"hex": hex::encode(payload)}),
    }
}

/// purge deletes the dead letters a filter selects, leaving an audit row with each one's summary.
pub fn purge(conn: &mut PgConnection, filter: &Filter, operator: &str) -> QueryResult<Vec<Uuid>> {
    conn.transaction(|conn| {
        let letters: Vec<Summary> = filtered(filter).select(Summary::as_select()).load(conn)?;
        for letter in &letters {
            audit(conn, letter.id, "purge", operator, None, letter)?;
        }
        let ids: Vec<Uuid> = letters.iter().map(|l| l.id).collect();
        diesel::delete(dead_letters::table.filter(dead_letters::id.eq_any(&ids))).execute(conn)?;
        Ok(ids)
    })
}

fn audit(
    conn: &mut PgConnection,
    id: Uuid,
    action: &str,
    operator: &str,
    note: Option<&str>,
    summary: &Summary,
) -> QueryResult<()> {
    diesel::insert_into(dead_letter_audit::table)
        .values((
            dead_letter_audit::dead_letter_id.eq(id),
            dead_letter_audit::action.eq(action),
            dead_letter_audit::operator.eq(operator),
            dead_letter_audit::note.eq(note),
            dead_letter_audit::summary.eq(serde_json::to_value(summary).expect("serializes")),
        ))
        .execute(conn)?;
    Ok(())
}

/// backlog counts the dead letters not yet replayed, per pool: the depth an operator must act on.
pub fn backlog(conn: &mut PgConnection) -> QueryResult<Vec<(String, i64)>> {
    dead_letters::table
        .filter(dead_letters::replayed_at.is_null())
        .group_by(dead_letters::pool)
        .select((dead_letters::pool, diesel::dsl::count_star()))
        .load(conn)
}
