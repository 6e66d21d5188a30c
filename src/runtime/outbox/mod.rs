//! The transactional outbox: messages caused by a state change are rows written in the same
//! transaction, and they are published with publisher confirms, then deleted.
//!
//! A handler's messages take the short way: once its transaction commits they are handed to this
//! process's [`Publisher`], which publishes them at once and deletes their rows once the broker
//! has confirmed them. Their rows are written leased (`available_at` is `outbox.lease` ahead), so
//! no relay claims them meanwhile; a message the broker refuses is given back to the relay, and
//! what a killed process had not published yet is claimed by a relay when its lease ends.
//!
//! Everything else (scheduled scans, operator commands, deferred messages, and what the publisher
//! gave back) is published by the relay.
//!
//! The relay claims a batch with `FOR UPDATE SKIP LOCKED` in a transaction that stays open while
//! the batch is published, so several processes share the work without publishing the same row at
//! once. A row is deleted, in that transaction, only after the broker confirmed it; a negative
//! confirm or a returned (unroutable) message puts it back a second later, and a lost channel, a
//! lost database connection or a killed process rolls the claim back, so the rows go out again.
//! Consumers deduplicate on the message id, so a publish repeated after a crash has no second effect.

mod publisher;
mod relay;
mod send;

pub use publisher::{Handed, Handoff, Publisher};
pub use relay::Relay;

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt};
use serde::Serialize;
use uuid::Uuid;

use crate::runtime::db::schema::outbox;

/// Outgoing is a message to publish once the transaction that wrote it commits.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub message_type: String,
    pub correlation_id: Option<String>,
    pub headers: serde_json::Value,
    pub payload: Vec<u8>,
    pub available_at: Option<DateTime<Utc>>,
}

impl Outgoing {
    /// Outgoing::json serializes `message` as the payload. In debug builds (every test) the
    /// payload is checked against its JSON Schema: the code's messages must honour the contracts.
    pub fn json(
        exchange: String,
        routing_key: impl Into<String>,
        message_type: &str,
        message: &impl Serialize,
    ) -> Outgoing {
        let payload = serde_json::to_vec(message).expect("messages always serialize");
        #[cfg(debug_assertions)]
        {
            let value: serde_json::Value = serde_json::from_slice(&payload).expect("what was written reads back");
            if let Err(e) = crate::contracts::schema::validate(message_type, &value) {
                panic!("assetflow published a {message_type} that breaks its schema: {e}\n{value}");
            }
        }
        Outgoing {
            message_id: Uuid::now_v7(),
            exchange,
            routing_key: routing_key.into(),
            message_type: message_type.to_string(),
            correlation_id: None,
            headers: serde_json::json!({}),
            payload,
            available_at: None,
        }
    }

    pub fn correlated(mut self, correlation_id: impl Into<String>) -> Outgoing {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    pub fn with_message_id(mut self, id: Uuid) -> Outgoing {
        self.message_id = id;
        self
    }
}

/// enqueue writes a message to the outbox inside the caller's transaction.
pub fn enqueue(conn: &mut PgConnection, message: &Outgoing) -> QueryResult<()> {
    let now = Utc::now();
    diesel::insert_into(outbox::table)
        .values((
            outbox::message_id.eq(message.message_id),
            outbox::exchange.eq(&message.exchange),
            outbox::routing_key.eq(&message.routing_key),
            outbox::message_type.eq(&message.message_type),
            outbox::correlation_id.eq(&message.correlation_id),
            outbox::headers.eq(&message.headers),
            outbox::payload.eq(&message.payload),
            outbox::available_at.eq(message.available_at.unwrap_or(now)),
        ))
        .execute(conn)?;
    Ok(())
}

/// enqueue_all writes several messages to the outbox in one statement, inside the caller's
/// transaction, for the relay.
pub fn enqueue_all(conn: &mut PgConnection, messages: &[Outgoing]) -> QueryResult<()> {
    enqueue_leased(conn, messages, Duration::ZERO)
}

/// enqueue_leased is [`enqueue_all`] for messages that this process hands to its [`Publisher`]
/// once the transaction commits: a message without its own `available_at` is not claimed by a
/// relay for `lease`. A handler's messages are gathered (`Cx::publish`) and written this way.
pub fn enqueue_leased(conn: &mut PgConnection, messages: &[Outgoing], lease: Duration) -> QueryResult<()> {
    use diesel::sql_types::{Bytea, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    if messages.is_empty() {
        return Ok(());
    }
    let leased = Utc::now() + lease;
    let text = |f: fn(&Outgoing) -> &str| messages.iter().map(f).collect::<Vec<&str>>();
    crate::runtime::db::prepared(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, headers, payload, available_at)
         SELECT * FROM unnest($message_id::uuid[], $exchange::text[], $routing_key::text[], $message_type::text[], $correlation_id::text[], $headers::jsonb[], $payload::bytea[], $available_at::timestamptz[])",
    )
    .bind::<Array<SqlUuid>, _>("message_id", messages.iter().map(|m| m.message_id).collect::<Vec<Uuid>>())
    .bind::<Array<Text>, _>("exchange", text(|m| &m.exchange))
    .bind::<Array<Text>, _>("routing_key", text(|m| &m.routing_key))
    .bind::<Array<Text>, _>("message_type", text(|m| &m.message_type))
    .bind::<Array<Nullable<Text>>, _>("correlation_id", messages.iter().map(|m| m.correlation_id.as_deref()).collect::<Vec<_>>())
    .bind::<Array<Jsonb>, _>("headers", messages.iter().map(|m| &m.headers).collect::<Vec<_>>())
    .bind::<Array<Bytea>, _>("payload", messages.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>())
    .bind::<Array<Timestamptz>, _>("available_at", messages.iter().map(|m| m.available_at.unwrap_or(leased)).collect::<Vec<_>>())
    .execute(conn)?;
    Ok(())
}

/// claim locks the next due rows for the caller's transaction; rows another relay holds are
/// skipped, not waited for.
pub(super) fn claim(conn: &mut PgConnection, batch: i64) -> QueryResult<Vec<Outgoing>> {
    crate::runtime::db::prepared(
        "SELECT message_id, exchange, routing_key, message_type, correlation_id, headers, payload
         FROM outbox WHERE available_at <= now()
         ORDER BY available_at, id LIMIT $batch FOR UPDATE SKIP LOCKED",
    )
    .bind::<BigInt, _>("batch", batch)
    .load::<RawRow>(conn)
    .map(|rows| rows.into_iter().map(Outgoing::from).collect())
}

/// resolve deletes the confirmed rows and gives the others back to the relay, a second later.
pub(super) fn resolve(conn: &mut PgConnection, confirmed: &[Uuid], failed: &[Uuid]) -> QueryResult<()> {
    use diesel::sql_types::Uuid as SqlUuid;
    if !confirmed.is_empty() {
        crate::runtime::db::prepared("DELETE FROM outbox WHERE message_id = ANY($confirmed)")
            .bind::<Array<SqlUuid>, _>("confirmed", confirmed)
            .execute(conn)?;
    }
    if !failed.is_empty() {
        // Try again soon, not at once: a message the broker refuses is refused again.
        crate::runtime::db::prepared("UPDATE outbox SET available_at = now() + interval '1 second', attempts = attempts + 1, last_error = 'not confirmed by the broker' WHERE message_id = ANY($failed)")
            .bind::<Array<SqlUuid>, _>("failed", failed)
            .execute(conn)?;
    }
    Ok(())
}

/// backlog is the number of unsent rows and the age of the oldest one.
pub fn backlog(conn: &mut PgConnection) -> QueryResult<(i64, Duration)> {
    #[derive(QueryableByName)]
    struct Backlog {
        #[diesel(sql_type = BigInt)]
        rows: i64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        age: f64,
    }
    let b: Backlog = crate::runtime::db::prepared(
        "SELECT count(*) AS rows, COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS age FROM outbox",
    )
    .get_result(conn)?;
    Ok((b.rows, Duration::from_secs_f64(b.age.max(0.0))))
}

#[derive(QueryableByName)]
struct RawRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    message_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Text)]
    exchange: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    routing_key: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    message_type: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    correlation_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    headers: serde_json::Value,
    #[diesel(sql_type = diesel::sql_types::Bytea)]
    payload: Vec<u8>,
}

impl From<RawRow> for Outgoing {
    fn from(r: RawRow) -> Outgoing {
        Outgoing {
            message_id: r.message_id,
            exchange: r.exchange,
            routing_key: r.routing_key,
            message_type: r.message_type,
            correlation_id: r.correlation_id,
            headers: r.headers,
            payload: r.payload,
            available_at: None,
        }
    }
}
