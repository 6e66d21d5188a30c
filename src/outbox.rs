//! The transactional outbox: messages caused by a state change are rows written in the same
//! transaction, and the relay publishes them with publisher confirms.
//!
//! The relay claims a batch with `FOR UPDATE SKIP LOCKED` in a transaction that stays open while
//! the batch is published, so several processes share the work without publishing the same row at
//! once. A row is deleted, in that transaction, only after the broker confirmed it; a negative
//! confirm or a returned (unroutable) message puts it back a second later, and a lost channel, a
//! lost database connection or a killed process rolls the claim back, so the rows go out again.
//! Consumers deduplicate on the message id, so a publish repeated after a crash has no second effect.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Int8};
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{self, Broker};
use crate::db::{Db, DbError, schema::outbox};
use crate::telemetry;

/// How long a stopping relay keeps trying to publish what is due.
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);

/// How often the backlog gauges are refreshed.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);

/// How long a claim waits for its batch's confirms before it rolls back and leaves the rows to the
/// next round: a broker that stops confirming holds no row locks for longer.
const CONFIRM_DEADLINE: Duration = Duration::from_secs(10);

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
        let value = serde_json::to_value(message).expect("messages always serialize");
        #[cfg(debug_assertions)]
        if let Err(e) = crate::messages::schema::validate(message_type, &value) {
            panic!("assetflow published a {message_type} that breaks its schema: {e}\n{value}");
        }
        Outgoing {
            message_id: Uuid::now_v7(),
            exchange,
            routing_key: routing_key.into(),
            message_type: message_type.to_string(),
            correlation_id: None,
            headers: serde_json::json!({}),
            payload: serde_json::to_vec(&value).expect("a JSON value always serializes"),
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
/// transaction: a handler's messages are gathered (`Cx::publish`) and written together at its end.
pub fn enqueue_all(conn: &mut PgConnection, messages: &[Outgoing]) -> QueryResult<()> {
    use diesel::sql_types::{Bytea, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    if messages.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    let text = |f: fn(&Outgoing) -> &str| messages.iter().map(f).collect::<Vec<&str>>();
    crate::db::prepared(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, headers, payload, available_at)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::bytea[], $8::timestamptz[])",
    )
    .bind::<Array<SqlUuid>, _>(messages.iter().map(|m| m.message_id).collect::<Vec<Uuid>>())
    .bind::<Array<Text>, _>(text(|m| &m.exchange))
    .bind::<Array<Text>, _>(text(|m| &m.routing_key))
    .bind::<Array<Text>, _>(text(|m| &m.message_type))
    .bind::<Array<Nullable<Text>>, _>(messages.iter().map(|m| m.correlation_id.as_deref()).collect::<Vec<_>>())
    .bind::<Array<Jsonb>, _>(messages.iter().map(|m| &m.headers).collect::<Vec<_>>())
    .bind::<Array<Bytea>, _>(messages.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>())
    .bind::<Array<Timestamptz>, _>(messages.iter().map(|m| m.available_at.unwrap_or(now)).collect::<Vec<_>>())
    .execute(conn)?;
    Ok(())
}

#[derive(Queryable, Debug)]
struct Row {
    id: i64,
    message_id: Uuid,
    exchange: String,
    routing_key: String,
    message_type: String,
    correlation_id: Option<String>,
    headers: serde_json::Value,
    payload: Vec<u8>,
}

/// Relay publishes the outbox.
pub struct Relay {
    db: Db,
    broker: Broker,
    wake: Arc<Notify>,
    batch_size: i64,
    poll_interval: Duration,
    progress: Arc<crate::health::Progress>,
}

impl Relay {
    pub fn new(
        db: Db,
        broker: Broker,
        wake: Arc<Notify>,
        batch_size: u32,
        poll_interval: Duration,
        progress: Arc<crate::health::Progress>,
    ) -> Relay {
        Relay { db, broker, wake, batch_size: i64::from(batch_size), poll_interval, progress }
    }

    /// Relay::run publishes until shutdown, then flushes what is already due and returns. The
    /// flush gives up after [`FLUSH_DEADLINE`] (a broker that is down): the rows stay in the
    /// outbox, and the next process to start publishes them.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut channel: Option<lapin::Channel> = None;
        let mut flush_deadline: Option<tokio::time::Instant> = None;
        let mut backlog_reported: Option<tokio::time::Instant> = None;
        loop {
            let stopping = shutdown.is_cancelled();
            if stopping && flush_deadline.is_none() {
                flush_deadline = Some(tokio::time::Instant::now() + FLUSH_DEADLINE);
            }
            if backlog_reported.is_none_or(|at| at.elapsed() >= BACKLOG_INTERVAL) {
                self.report_backlog().await;
                backlog_reported = Some(tokio::time::Instant::now());
            }
            let round = match flush_deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, self.round(&mut channel))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the flush deadline passed"))),
                None => self.round(&mut channel).await,
            };
            match round {
                Ok(n) if n as i64 >= self.batch_size => continue,
                Ok(0) if stopping => return,
                Ok(_) if stopping => continue,
                Ok(_) => {}
                Err(e) => {
                    channel = None;
                    if stopping {
                        tracing::warn!(error = %e, "could not flush the outbox before stopping; the next process publishes it");
                        return;
                    }
                    tracing::warn!(error = %e, "outbox relay round failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    /// One round: claim a batch, publish it with pipelined confirms, delete what was confirmed.
    ///
    /// The claim is a transaction held open while the batch is published: its row locks keep
    /// every other relay off these rows (`SKIP LOCKED`), and it deletes the confirmed ones before
    /// it commits. A round costs one writing commit, and the rows are never rewritten before their
    /// delete. If this process dies or loses the database meanwhile, the transaction rolls back and
    /// the rows are published again at once, by whichever relay is next.
    async fn round(&self, channel: &mut Option<lapin::Channel>) -> anyhow::Result<usize> {
        let batch = self.batch_size;
        let (claimed_tx, claimed) = tokio::sync::oneshot::channel::<Vec<Row>>();
        let (outcome, outcome_rx) = std::sync::mpsc::sync_channel::<Published>(1);
        let claim = self.db.run(move |conn| {
            conn.transaction::<_, DbError, _>(|conn| {
                let rows = claim(conn, batch)?;
                let n = rows.len();
                if n == 0 || claimed_tx.send(rows).is_err() {
                    return Ok(n);
                }
                // The publishing side answers within its own deadlines; one that is dropped
                // (shutdown's flush deadline, a lost channel) rolls the claim back.
                match outcome_rx.recv_timeout(CONFIRM_DEADLINE) {
                    Ok(published) => settle(conn, &published.confirmed, &published.failed)?,
                    Err(_) => return Err(DbError::Query(diesel::result::Error::RollbackTransaction)),
                }
                Ok(n)
            })
        });
        let publish = async {
            let Ok(rows) = claimed.await else {
                return Ok(None); // Nothing was due, or the claim failed (its error is returned).
            };
            // Bounded like the claim: a publish on a connection that died meanwhile may never end.
            let published = tokio::time::timeout(CONFIRM_DEADLINE, self.publish(channel, &rows))
                .await
                .map_err(|_| anyhow::anyhow!("the broker did not confirm within {CONFIRM_DEADLINE:?}"))??;
            let failed = published.failed.len();
            telemetry::outbox_published(published.confirmed.len() as u64, failed as u64);
            // The claim is waiting for this answer; it can only be gone if it failed.
            let _ = outcome.send(published);
            Ok::<_, anyhow::Error>(Some(failed))
        };
        let (claimed, published) = tokio::join!(claim, publish);
        self.progress.relay_tick();
        // A batch the broker refused in part starts again on a fresh channel.
        if published?.is_some_and(|failed| failed > 0) {
            *channel = None;
        }
        Ok(claimed?)
    }

    /// publish sends a batch with pipelined confirms, then waits for them: one round trip, not
    /// one per message. It says which rows the broker confirmed and which it did not.
    async fn publish(&self, channel: &mut Option<lapin::Channel>, rows: &[Row]) -> anyhow::Result<Published> {
        let ch = match channel {
            Some(ch) if ch.status().connected() => ch.clone(),
            _ => {
                let conn = self.broker.connection().await.ok_or_else(|| anyhow::anyhow!("shutting down"))?;
                let ch = broker::bounded("channel.open", conn.create_channel()).await?;
                broker::bounded("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await?;
                *channel = Some(ch.clone());
                ch
            }
        };
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let props = broker::properties(
                &row.message_id.to_string(),
                &row.message_type,
                row.correlation_id.as_deref(),
                broker::headers_from_json(&row.headers),
            );
            // mandatory: a message no queue would take comes back instead of vanishing.
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            match ch
                .basic_publish(
                    row.exchange.as_str().into(),
                    row.routing_key.as_str().into(),
                    options,
                    &row.payload,
                    props,
                )
                .await
            {
                Ok(confirm) => pending.push((row.id, Some(confirm))),
                Err(e) => {
                    tracing::warn!(error = %e, "publish failed");
                    pending.push((row.id, None));
                }
            }
        }
        let mut published = Published::default();
        for (id, confirm) in pending {
            let ok = match confirm {
                Some(confirm) => match confirm.await {
                    Ok(Confirmation::Ack(None)) => true,
                    Ok(Confirmation::Ack(Some(returned))) => {
                        tracing::error!(reply = %returned.reply_text, "the broker returned an outbox message as unroutable");
                        false
                    }
                    Ok(Confirmation::Nack(_)) => false,
                    Ok(Confirmation::NotRequested) => false,
                    Err(e) => {
                        tracing::warn!(error = %e, "publisher confirm lost");
                        false
                    }
                },
                None => false,
            };
            if ok { published.confirmed.push(id) } else { published.failed.push(id) }
        }
        Ok(published)
    }

    async fn report_backlog(&self) {
        if let Ok((rows, age)) = self.db.run(|conn| backlog(conn).map_err(DbError::from)).await {
            telemetry::outbox_backlog(rows, age);
        }
    }
}

/// Published is what the broker said of a claimed batch.
#[derive(Debug, Default)]
struct Published {
    confirmed: Vec<i64>,
    failed: Vec<i64>,
}

/// claim locks the next due rows for the caller's transaction; rows another relay holds are
/// skipped, not waited for.
fn claim(conn: &mut PgConnection, batch: i64) -> QueryResult<Vec<Row>> {
    crate::db::prepared(
        "SELECT id, message_id, exchange, routing_key, message_type, correlation_id, headers, payload
         FROM outbox WHERE available_at <= now()
         ORDER BY available_at, id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind::<BigInt, _>(batch)
    .load::<RawRow>(conn)
    .map(|rows| rows.into_iter().map(Row::from).collect())
}

fn settle(conn: &mut PgConnection, confirmed: &[i64], failed: &[i64]) -> QueryResult<()> {
    if !confirmed.is_empty() {
        crate::db::prepared("DELETE FROM outbox WHERE id = ANY($1)").bind::<Array<Int8>, _>(confirmed).execute(conn)?;
    }
    if !failed.is_empty() {
        // Try again soon, not at once: a message the broker refuses is refused again.
        crate::db::prepared("UPDATE outbox SET available_at = now() + interval '1 second', attempts = attempts + 1, last_error = 'not confirmed by the broker' WHERE id = ANY($1)")
            .bind::<Array<Int8>, _>(failed)
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
    let b: Backlog = crate::db::prepared(
        "SELECT count(*) AS rows, COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS age FROM outbox",
    )
    .get_result(conn)?;
    Ok((b.rows, Duration::from_secs_f64(b.age.max(0.0))))
}

#[derive(QueryableByName)]
struct RawRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
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

impl From<RawRow> for Row {
    fn from(r: RawRow) -> Row {
        Row {
            id: r.id,
            message_id: r.message_id,
            exchange: r.exchange,
            routing_key: r.routing_key,
            message_type: r.message_type,
            correlation_id: r.correlation_id,
            headers: r.headers,
            payload: r.payload,
        }
    }
}
