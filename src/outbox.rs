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

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt};
use lapin::Confirmation;
use lapin::PublisherConfirm;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
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
    .bind::<Array<Timestamptz>, _>(messages.iter().map(|m| m.available_at.unwrap_or(leased)).collect::<Vec<_>>())
    .execute(conn)?;
    Ok(())
}

/// Handoff carries a handler's committed messages to this process's [`Publisher`]. It is open
/// while a publisher runs; when it is closed, handlers write their messages for the relay.
#[derive(Default)]
pub struct Handoff {
    open: std::sync::Mutex<Option<(mpsc::Sender<Commit>, Duration)>>,
}

/// Commit is one transaction's messages, with the moment they were handed over.
type Commit = (Instant, Vec<Outgoing>);

/// Handed is the publisher's end of an open [`Handoff`]: each commit's messages with the moment
/// they were handed over, and the lease their rows were written with.
pub struct Handed {
    receiver: mpsc::Receiver<Commit>,
    lease: Duration,
}

/// How many handlers' commits may wait for the publisher; past that, messages wait for their lease.
const HANDOFF_CAPACITY: usize = 4096;

impl Handoff {
    /// Handoff::lease is how long to lease the rows being written, or None if no publisher
    /// would take them.
    pub fn lease(&self) -> Option<Duration> {
        self.open.lock().expect("never poisoned").as_ref().map(|(_, lease)| *lease)
    }

    /// Handoff::give hands over messages whose rows have committed, leased. If the publisher is
    /// gone or behind, they are not lost: a relay claims their rows when the lease ends.
    pub fn give(&self, messages: Vec<Outgoing>) {
        if messages.is_empty() {
            return;
        }
        let Some((sender, _)) = &*self.open.lock().expect("never poisoned") else { return };
        match sender.try_send((Instant::now(), messages)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("the publisher is behind; these messages wait for their lease, then a relay")
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!("the publisher has stopped; these messages wait for their lease, then a relay")
            }
        }
    }

    /// Handoff::open starts taking messages, for a publisher that reads the receiver.
    pub fn open(&self, lease: Duration) -> Handed {
        let (sender, receiver) = mpsc::channel(HANDOFF_CAPACITY);
        *self.open.lock().expect("never poisoned") = Some((sender, lease));
        Handed { receiver, lease }
    }

    /// Handoff::close stops taking messages; the publisher finishes what it was given and stops.
    pub fn close(&self) {
        self.open.lock().expect("never poisoned").take();
    }
}

/// Publisher publishes the messages handed over by this process's handlers as soon as they
/// commit, pipelining the confirms, and deletes their rows once the broker has confirmed them.
pub struct Publisher {
    db: Db,
    broker: Broker,
}

impl Publisher {
    pub fn new(db: Db, broker: Broker) -> Publisher {
        Publisher { db, broker }
    }

    /// Publisher::run publishes until the handoff is closed and what it was given is settled.
    /// Publishing and settling overlap: while one batch's rows are deleted, the next is sent.
    ///
    /// A message handed over more than half its lease ago (the broker was away, or the publisher
    /// far behind) is left to the relay, which may claim its row soon: publishing it here too
    /// would only send it twice.
    pub async fn run(self, mut handed: Handed) {
        let (sent, to_settle) = mpsc::channel::<Vec<Sent>>(64);
        let settler = tokio::spawn(settle_sent(self.db.clone(), to_settle));
        let mut channel: Option<lapin::Channel> = None;
        while let Some(first) = handed.receiver.recv().await {
            let mut commits = vec![first];
            let mut n = commits[0].1.len();
            while n < PUBLISH_BATCH
                && let Ok(more) = handed.receiver.try_recv()
            {
                n += more.1.len();
                commits.push(more);
            }
            let channel_open = open_channel(&self.broker, &mut channel).await;
            let fresh_since = Instant::now().checked_sub(handed.lease / 2);
            let (batch, stale): (Vec<_>, Vec<_>) =
                commits.into_iter().partition(|(at, _)| fresh_since.is_none_or(|since| *at > since));
            let stale: usize = stale.iter().map(|(_, messages)| messages.len()).sum();
            if stale > 0 {
                tracing::info!(messages = stale, "handed over too long ago; left to the relay");
            }
            let batch: Vec<Outgoing> = batch.into_iter().flat_map(|(_, messages)| messages).collect();
            if batch.is_empty() {
                continue;
            }
            let pending = match channel_open {
                Ok(ch) => send(&ch, &batch).await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish; the messages go back to the relay");
                    batch.iter().map(|m| (m.message_id, None)).collect()
                }
            };
            if pending.iter().any(|(_, confirm)| confirm.is_none()) {
                channel = None;
            }
            if sent.send(pending).await.is_err() {
                break; // The settler stopped; the rows wait for their lease.
            }
        }
        drop(sent);
        let _ = settler.await;
    }
}

/// Messages the publisher takes together at most.
const PUBLISH_BATCH: usize = 1024;

/// settle_sent waits for the confirms of what was sent, and settles the rows: a batch's confirmed
/// rows are deleted, the others given back to the relay. What was sent meanwhile is settled with
/// it, in the same transaction.
async fn settle_sent(db: Db, mut to_settle: mpsc::Receiver<Vec<Sent>>) {
    while let Some(first) = to_settle.recv().await {
        let mut published = confirmations(first).await;
        while let Ok(more) = to_settle.try_recv() {
            published.extend(confirmations(more).await);
        }
        telemetry::outbox_published(published.confirmed.len() as u64, published.failed.len() as u64);
        let settled = db
            .run(move |conn| {
                conn.transaction::<_, DbError, _>(|conn| Ok(settle(conn, &published.confirmed, &published.failed)?))
            })
            .await;
        if let Err(e) = settled {
            // The rows stay leased: a relay publishes them again when the lease ends, and the
            // consumers' inboxes take the second copy as a duplicate.
            tracing::warn!(error = %e, "could not settle published outbox rows");
        }
    }
}

/// Relay publishes the outbox rows no publisher has in hand: those written for it, and those whose
/// lease has ended or that a publisher gave back.
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
        let (claimed_tx, claimed) = tokio::sync::oneshot::channel::<Vec<Outgoing>>();
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
    async fn publish(&self, channel: &mut Option<lapin::Channel>, rows: &[Outgoing]) -> anyhow::Result<Published> {
        let ch = open_channel(&self.broker, channel).await?;
        Ok(confirmations(send(&ch, rows).await).await)
    }

    async fn report_backlog(&self) {
        if let Ok((rows, age)) = self.db.run(|conn| backlog(conn).map_err(DbError::from)).await {
            telemetry::outbox_backlog(rows, age);
        }
    }
}

/// Published is what the broker said of a batch, by message id.
#[derive(Debug, Default)]
struct Published {
    confirmed: Vec<Uuid>,
    failed: Vec<Uuid>,
}

impl Published {
    fn extend(&mut self, other: Published) {
        self.confirmed.extend(other.confirmed);
        self.failed.extend(other.failed);
    }
}

/// Sent is a message published and its confirm to come; None if the publish itself failed.
type Sent = (Uuid, Option<PublisherConfirm>);

/// open_channel is the channel in hand if it is still open, or a new one in confirm mode.
async fn open_channel(broker: &Broker, channel: &mut Option<lapin::Channel>) -> anyhow::Result<lapin::Channel> {
    if let Some(ch) = channel
        && ch.status().connected()
    {
        return Ok(ch.clone());
    }
    let conn = broker.connection().await.ok_or_else(|| anyhow::anyhow!("shutting down"))?;
    let ch = broker::bounded("channel.open", conn.create_channel()).await?;
    broker::bounded("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await?;
    *channel = Some(ch.clone());
    Ok(ch)
}

/// send publishes messages without waiting for their confirms.
async fn send(ch: &lapin::Channel, messages: &[Outgoing]) -> Vec<Sent> {
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let props = broker::properties(
            &m.message_id.to_string(),
            &m.message_type,
            m.correlation_id.as_deref(),
            broker::headers_from_json(&m.headers),
        );
        // mandatory: a message no queue would take comes back instead of vanishing.
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let published = ch
            .basic_publish(m.exchange.as_str().into(), m.routing_key.as_str().into(), options, &m.payload, props)
            .await;
        match published {
            Ok(confirm) => pending.push((m.message_id, Some(confirm))),
            Err(e) => {
                tracing::warn!(error = %e, "publish failed");
                pending.push((m.message_id, None));
            }
        }
    }
    pending
}

/// confirmations waits for the broker's word on each message sent, for at most
/// [`CONFIRM_DEADLINE`] in all: one it has not confirmed by then counts as refused.
async fn confirmations(pending: Vec<Sent>) -> Published {
    let deadline = tokio::time::Instant::now() + CONFIRM_DEADLINE;
    let mut published = Published::default();
    for (id, confirm) in pending {
        let ok = match confirm {
            Some(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => true,
                Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                    tracing::error!(reply = %returned.reply_text, "the broker returned an outbox message as unroutable");
                    false
                }
                Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => false,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "publisher confirm lost");
                    false
                }
                Err(_) => {
                    tracing::warn!("the broker did not confirm within {CONFIRM_DEADLINE:?}");
                    false
                }
            },
            None => false,
        };
        if ok { published.confirmed.push(id) } else { published.failed.push(id) }
    }
    published
}

/// claim locks the next due rows for the caller's transaction; rows another relay holds are
/// skipped, not waited for.
fn claim(conn: &mut PgConnection, batch: i64) -> QueryResult<Vec<Outgoing>> {
    crate::db::prepared(
        "SELECT message_id, exchange, routing_key, message_type, correlation_id, headers, payload
         FROM outbox WHERE available_at <= now()
         ORDER BY available_at, id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind::<BigInt, _>(batch)
    .load::<RawRow>(conn)
    .map(|rows| rows.into_iter().map(Outgoing::from).collect())
}

/// settle deletes the confirmed rows and gives the others back to the relay, a second later.
fn settle(conn: &mut PgConnection, confirmed: &[Uuid], failed: &[Uuid]) -> QueryResult<()> {
    use diesel::sql_types::Uuid as SqlUuid;
    if !confirmed.is_empty() {
        crate::db::prepared("DELETE FROM outbox WHERE message_id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(confirmed)
            .execute(conn)?;
    }
    if !failed.is_empty() {
        // Try again soon, not at once: a message the broker refuses is refused again.
        crate::db::prepared("UPDATE outbox SET available_at = now() + interval '1 second', attempts = attempts + 1, last_error = 'not confirmed by the broker' WHERE message_id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(failed)
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
