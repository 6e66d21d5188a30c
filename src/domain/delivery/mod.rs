//! The delivery pool: everything sent to a terminal goes out through its gateway's queue, and is
//! complete only when the gateway returns a receipt carrying the SHA-256 of the exact bytes sent
//! (`docs/product.md#a-round-ends-with-an-acknowledgement`).
//!
//! A delivery row is written by whoever decides to send (issuance, exchange, refusals), keyed by
//! what it is for, so the same thing is never sent twice. Each attempt is a row of its own; a
//! missing or wrong receipt fails the attempt, and the retransmission scan tries again on the
//! schedule in `workers/delivery.toml` until the attempts run out and it is dead-lettered.

pub mod notices;
pub mod receipt;
pub mod retry;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::workers::TransmissionPolicy;
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeliveryKind, DeliveryRequested, GatewayDelivery, kinds};
use crate::contracts::topology::{Names, Pool};
use crate::domain::catalogue::Terminal;
use crate::domain::metrics;
use crate::domain::status::{self, Cause, Status};
use crate::runtime::consumer::{Cx, Failure, Handler, Received};
use crate::runtime::db::schema::{assets, deliveries, delivery_attempts};
use crate::runtime::dead_letter::{self, Full, NewDeadLetter, Replayer};
use crate::runtime::outbox::Outgoing;

/// Deliveries is what sending to terminals needs: the names on the broker, and the transmission
/// policy of `workers/delivery.toml` (the receipt timeout, the retry schedule, the attempts).
#[derive(Debug, Clone)]
pub struct Deliveries {
    pub names: Names,
    pub transmission: TransmissionPolicy,
}

/// NewDelivery is something to send to a terminal.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub kind: DeliveryKind,
    /// What this delivery is for; the same key is never sent twice.
    pub dedupe_key: String,
    pub terminal_id: String,
    pub gateway_id: String,
    pub order_id: Option<Uuid>,
    pub asset_id: Option<Uuid>,
    pub forced: bool,
    pub content: Value,
    /// None: now. A time: the designated-delivery scan sends it then.
    pub due_at: Option<DateTime<Utc>>,
}

impl NewDelivery {
    /// NewDelivery::now is a delivery to send at once.
    pub fn now(kind: DeliveryKind, dedupe_key: String, terminal: &Terminal, content: Value) -> NewDelivery {
        NewDelivery {
            kind,
            dedupe_key,
            terminal_id: terminal.id.clone(),
            gateway_id: terminal.gateway_id.clone(),
            order_id: None,
            asset_id: None,
            forced: false,
            content,
            due_at: None,
        }
    }
}

/// enqueue records a delivery and, if it is due now, asks the delivery pool to send it. It
/// returns the new delivery's id, or None if one with the same key already exists.
pub fn enqueue(cx: &mut Cx<'_>, deliveries: &Deliveries, delivery: NewDelivery) -> Result<Option<Uuid>, Failure> {
    Ok(enqueue_with(cx.conn, deliveries, delivery, cx.now, cx.outgoing)?)
}

/// enqueue_with is [`enqueue`] for callers that are not handed a [`Cx`] (the settlement timeout
/// sweep): the request to send is added to `sending`, for the caller to write to the outbox in
/// its transaction.
pub fn enqueue_with(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    delivery: NewDelivery,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<Option<Uuid>> {
    let id = Uuid::now_v7();
    let due_at = delivery.due_at.unwrap_or(now);
    let inserted = diesel::insert_into(deliveries::table)
        .values((
            deliveries::id.eq(id),
            deliveries::dedupe_key.eq(&delivery.dedupe_key),
            deliveries::kind.eq(delivery.kind.as_str()),
            deliveries::terminal_id.eq(&delivery.terminal_id),
            deliveries::gateway_id.eq(&delivery.gateway_id),
            deliveries::order_id.eq(delivery.order_id),
            deliveries::asset_id.eq(delivery.asset_id),
            deliveries::forced.eq(delivery.forced),
            deliveries::content.eq(&delivery.content),
            deliveries::status.eq("pending"),
            deliveries::due_at.eq(due_at),
            deliveries::created_at.eq(now),
        ))
        .on_conflict(deliveries::dedupe_key)
        .do_nothing()
        .execute(conn)?;
    if inserted == 0 {
        return Ok(None);
    }
    if due_at <= now {
        sending.push(request_send(deliveries, id));
    }
    Ok(Some(id))
}

/// enqueue_many is [`enqueue`] for several deliveries, recorded in one statement: each whose key
/// is new and that is due now is handed to the delivery pool.
pub fn enqueue_many(cx: &mut Cx<'_>, deliveries: &Deliveries, batch: &[NewDelivery]) -> QueryResult<()> {
    for inserted in insert_many(cx.conn, batch, cx.now)? {
        if inserted.due_at <= cx.now {
            cx.publish(request_send(deliveries, inserted.id));
        }
    }
    Ok(())
}

/// Inserted is a delivery [`insert_many`] created (one whose key was new).
#[derive(Debug, QueryableByName)]
pub struct Inserted {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub due_at: DateTime<Utc>,
}

/// insert_many records many deliveries in one statement, skipping keys already used, and returns
/// the new ones. Nothing is sent: the caller sends or asks for sending.
pub fn insert_many(conn: &mut PgConnection, batch: &[NewDelivery], now: DateTime<Utc>) -> QueryResult<Vec<Inserted>> {
    use diesel::sql_types::{Array, Bool, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = batch.iter().map(|_| Uuid::now_v7()).collect();
    let column = |f: fn(&NewDelivery) -> String| batch.iter().map(f).collect::<Vec<String>>();
    crate::runtime::db::prepared(
        "INSERT INTO deliveries (id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, status, due_at, created_at)
         SELECT id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, 'pending', due_at, $now
         FROM unnest($ids::uuid[], $dedupe_key::text[], $kind::text[], $terminal_id::text[], $gateway_id::text[], $order_id::uuid[], $asset_id::uuid[], $forced::bool[], $content::jsonb[], $due_at::timestamptz[])
              AS t(id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, due_at)
         ON CONFLICT (dedupe_key) DO NOTHING
         RETURNING id, due_at",
    )
    .bind::<Array<SqlUuid>, _>("ids", &ids)
    .bind::<Array<Text>, _>("dedupe_key", column(|d| d.dedupe_key.clone()))
    .bind::<Array<Text>, _>("kind", column(|d| d.kind.as_str().to_string()))
    .bind::<Array<Text>, _>("terminal_id", column(|d| d.terminal_id.clone()))
    .bind::<Array<Text>, _>("gateway_id", column(|d| d.gateway_id.clone()))
    .bind::<Array<Nullable<SqlUuid>>, _>("order_id", batch.iter().map(|d| d.order_id).collect::<Vec<_>>())
    .bind::<Array<Nullable<SqlUuid>>, _>("asset_id", batch.iter().map(|d| d.asset_id).collect::<Vec<_>>())
    .bind::<Array<Bool>, _>("forced", batch.iter().map(|d| d.forced).collect::<Vec<_>>())
    .bind::<Array<Jsonb>, _>("content", batch.iter().map(|d| d.content.clone()).collect::<Vec<_>>())
    .bind::<Array<Timestamptz>, _>("due_at", batch.iter().map(|d| d.due_at.unwrap_or(now)).collect::<Vec<_>>())
    .bind::<Timestamptz, _>("now", now)
    .load(conn)
}

/// request_send is the message that hands a delivery to the delivery pool.
pub fn request_send(deliveries: &Deliveries, delivery_id: Uuid) -> Outgoing {
    let message = DeliveryRequested { message_type: kinds::DELIVERY_REQUESTED.into(), delivery_ids: vec![delivery_id] };
    Outgoing::json(deliveries.names.internal(), kinds::DELIVERY_REQUESTED, kinds::DELIVERY_REQUESTED, &message)
        .correlated(delivery_id.to_string())
}

/// Row is a delivery as stored.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = deliveries)]
pub struct Row {
    pub id: Uuid,
    pub kind: String,
    pub terminal_id: String,
    pub gateway_id: String,
    pub order_id: Option<Uuid>,
    pub asset_id: Option<Uuid>,
    pub forced: bool,
    pub content: Value,
    pub status: String,
    pub attempts: i32,
    pub due_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub attempt_limit: Option<i32>,
}

/// Sent is what [`send_attempt`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Attempt(u32),
    /// Already sent, delivered, dead or cancelled: nothing to do.
    Skipped,
    /// The asset is no longer valid (`docs/product.md#validity-is-checked-first`): cancelled, never delivered.
    Cancelled,
}

/// send_attempt makes the next attempt of a pending or failed delivery, as [`send_attempts`] does
/// for several; a delivery that does not exist is a permanent failure.
pub fn send_attempt(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    delivery_id: Uuid,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<Sent, Failure> {
    match send_attempts(conn, deliveries, &[delivery_id], now, sending)?.pop() {
        Some((_, sent)) => Ok(sent),
        None => {
            Err(Failure::permanent(DeadLetterReason::UnknownDelivery, format!("delivery {delivery_id} does not exist")))
        }
    }
}

/// Due is a delivery locked for its next attempt, with the state of the asset it carries.
#[derive(QueryableByName)]
struct Due {
    #[diesel(embed)]
    delivery: Row,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    asset_status: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    asset_expires_at: Option<DateTime<Utc>>,
}

/// send_attempts makes the next attempt of each pending or failed delivery among `ids`: it
/// re-checks the validity of the asset it carries (`docs/product.md#validity-is-checked-first`), records the
/// attempt with the hash of the bytes, and adds them to `sending`, for the caller to write to the
/// outbox in its transaction. The deliveries are read in one statement and their attempts recorded
/// in another, whatever their number. It returns what it did with each delivery that exists; an id
/// named twice is attempted once.
pub fn send_attempts(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    ids: &[Uuid],
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<Vec<(Uuid, Sent)>, Failure> {
    let mut ids = ids.to_vec();
    // Locked in id order, so that two transactions naming the same deliveries cannot deadlock.
    ids.sort_unstable();
    ids.dedup();
    let due: Vec<Due> = crate::runtime::db::prepared(
        "SELECT d.*, a.status AS asset_status, a.expires_at AS asset_expires_at
         FROM deliveries d LEFT JOIN assets a ON a.id = d.asset_id AND d.kind = 'asset'
         WHERE d.id = ANY($ids)
         ORDER BY d.id
         FOR UPDATE OF d",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>("ids", &ids)
    .load(conn)?;
    let mut done = Vec::with_capacity(due.len());
    let mut attempts = Vec::with_capacity(due.len());
    for Due { delivery: row, asset_status, asset_expires_at } in &due {
        if !matches!(row.status.as_str(), "pending" | "failed") {
            done.push((row.id, Sent::Skipped));
            continue;
        }
        let kind = DeliveryKind::parse(&row.kind).expect("the CHECK constraint admits only known kinds");
        if let (DeliveryKind::Asset, Some(asset_id)) = (kind, row.asset_id) {
            let (Some(status), Some(expires_at)) = (asset_status, asset_expires_at) else {
                return Err(Failure::permanent(
                    DeadLetterReason::Unprocessable,
                    format!("delivery {} carries asset {asset_id}, which does not exist", row.id),
                ));
            };
            let status = Status::parse(status).expect("the CHECK constraint admits only known statuses");
            if *expires_at <= now || !status.is_before_delivery() {
                cancel(conn, row, asset_id, now)?;
                done.push((row.id, Sent::Cancelled));
                continue;
            }
        }
        let (attempt, outgoing) = next_attempt(deliveries, row, kind, now);
        done.push((row.id, Sent::Attempt(attempt.number as u32)));
        attempts.push(attempt);
        sending.push(outgoing);
        metrics::delivery_attempt(kind.as_str(), "sent");
    }
    let ack_timeout = chrono::Duration::from_std(deliveries.transmission.ack_timeout).expect("a sane timeout");
    record_attempts(conn, &attempts, now, now + ack_timeout)?;
    Ok(done)
}

/// cancel voids a delivery whose asset is no longer valid (`docs/product.md#validity-is-checked-first`): it is never sent, and
/// the asset expires if its term is over.
fn cancel(conn: &mut PgConnection, row: &Row, asset_id: Uuid, now: DateTime<Utc>) -> Result<(), Failure> {
    diesel::update(deliveries::table.find(row.id))
        .set((deliveries::status.eq("cancelled"), deliveries::last_error.eq("the asset is no longer valid")))
        .execute(conn)?;
    expire_if_due(conn, asset_id, now)?;
    metrics::delivery_attempt(&row.kind, "cancelled");
    Ok(())
}

/// Attempt is a delivery's next attempt, as [`record_attempts`] stores it.
struct Attempt {
    delivery_id: Uuid,
    number: i32,
    message_id: Uuid,
    payload_sha256: String,
}

/// next_attempt builds a delivery's next attempt: the message to its gateway, and the record of
/// the bytes it sends.
fn next_attempt(deliveries: &Deliveries, row: &Row, kind: DeliveryKind, now: DateTime<Utc>) -> (Attempt, Outgoing) {
    let number = row.attempts + 1;
    let message_id = Uuid::now_v7();
    let message = GatewayDelivery {
        message_type: kinds::DELIVERY.into(),
        delivery_id: row.id,
        attempt: u32::try_from(number).expect("attempts are positive"),
        kind,
        terminal_id: row.terminal_id.clone(),
        gateway_id: row.gateway_id.clone(),
        sent_at: now,
        content: row.content.clone(),
    };
    let outgoing = Outgoing::json(deliveries.names.gateways(), row.gateway_id.as_str(), kinds::DELIVERY, &message)
        .with_message_id(message_id)
        .correlated(row.order_id.unwrap_or(row.id).to_string());
    let payload_sha256 = crate::crypto::sha256_hex(&outgoing.payload);
    (Attempt { delivery_id: row.id, number, message_id, payload_sha256 }, outgoing)
}

/// record_attempts records attempts with the hashes of the bytes they send, and marks their
/// deliveries sent until `receipt_due_at`: one round trip, whatever their number.
fn record_attempts(
    conn: &mut PgConnection,
    attempts: &[Attempt],
    now: DateTime<Utc>,
    receipt_due_at: DateTime<Utc>,
) -> QueryResult<()> {
    use diesel::sql_types::{Array, Int4, Text, Timestamptz, Uuid as SqlUuid};
    if attempts.is_empty() {
        return Ok(());
    }
    crate::runtime::db::prepared(
        "WITH attempt AS (
           INSERT INTO delivery_attempts (delivery_id, attempt, message_id, payload_sha256, sent_at, outcome)
           SELECT delivery_id, attempt, message_id, payload_sha256, $now, 'sent'
           FROM unnest($delivery_id::uuid[], $number::int4[], $message_id::uuid[], $payload_sha256::text[]) AS t(delivery_id, attempt, message_id, payload_sha256)
         )
         UPDATE deliveries d SET status = 'sent', attempts = t.attempt, due_at = $receipt_due_at
         FROM unnest($delivery_id::uuid[], $number::int4[]) AS t(id, attempt)
         WHERE d.id = t.id",
    )
    .bind::<Array<SqlUuid>, _>("delivery_id", attempts.iter().map(|a| a.delivery_id).collect::<Vec<_>>())
    .bind::<Array<Int4>, _>("number", attempts.iter().map(|a| a.number).collect::<Vec<_>>())
    .bind::<Array<SqlUuid>, _>("message_id", attempts.iter().map(|a| a.message_id).collect::<Vec<_>>())
    .bind::<Array<Text>, _>("payload_sha256", attempts.iter().map(|a| a.payload_sha256.as_str()).collect::<Vec<_>>())
    .bind::<Timestamptz, _>("now", now)
    .bind::<Timestamptz, _>("receipt_due_at", receipt_due_at)
    .execute(conn)?;
    Ok(())
}

/// expire_if_due moves an asset past its term to `expired`. An asset still awaiting its
/// delivery is first handed to past-due processing, as every flow does with an invalid one;
/// retrying stops there (`docs/product.md#validity-is-checked-first`).
pub fn expire_if_due(conn: &mut PgConnection, asset_id: Uuid, now: DateTime<Utc>) -> Result<bool, Failure> {
    let expires_at: DateTime<Utc> = assets::table.find(asset_id).select(assets::expires_at).first(conn)?;
    let mut status = status::current_for_update(conn, asset_id)?;
    if expires_at > now {
        return Ok(false);
    }
    if matches!(status, Status::AwaitingExchange | Status::AwaitingDesignatedDelivery) {
        status::transition(
            conn,
            asset_id,
            status,
            Status::ExpiredCertificateProcessing,
            Cause::AssetExpired,
            None,
            now,
        )?;
        status = Status::ExpiredCertificateProcessing;
    }
    if !status::allowed(status, Status::Expired) {
        return Ok(false);
    }
    status::transition(conn, asset_id, status, Status::Expired, Cause::AssetExpired, None, now)?;
    Ok(true)
}

/// fail_attempt records a failed attempt (no receipt in time, or a wrong hash) and schedules the
/// retransmission, or dead-letters the delivery when its attempts have run out.
pub fn fail_attempt(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    row: &Row,
    attempt: i32,
    outcome: &'static str,
    error: &str,
    now: DateTime<Utc>,
) -> Result<(), Failure> {
    diesel::update(delivery_attempts::table.find((row.id, attempt)))
        .set((
            delivery_attempts::outcome.eq(outcome),
            delivery_attempts::error.eq(error),
            delivery_attempts::finished_at.eq(now),
        ))
        .execute(conn)?;
    metrics::delivery_attempt(&row.kind, outcome);
    let policy = &deliveries.transmission;
    if let Some(asset_id) = row.asset_id.filter(|_| row.kind == DeliveryKind::Asset.as_str()) {
        let status = status::current_for_update(conn, asset_id)?;
        let next = match status {
            Status::AwaitingExchange | Status::AwaitingDesignatedDelivery => Some(Status::Retransmitting),
            Status::ExpiredCertificateProcessing => Some(Status::ForcedRetransmitting),
            _ => None,
        };
        if let Some(next) = next {
            status::transition(conn, asset_id, status, next, Cause::DeliveryFailed, Some(error), now)?;
        }
    }
    let limit = row.attempt_limit.map(|l| l as u32).unwrap_or_else(|| policy.max_attempts_for(&row.kind));
    if attempt as u32 >= limit {
        diesel::update(deliveries::table.find(row.id))
            .set((deliveries::status.eq("dead"), deliveries::last_error.eq(error)))
            .execute(conn)?;
        let attempts: Vec<(i32, DateTime<Utc>, String, Option<String>)> = delivery_attempts::table
            .filter(delivery_attempts::delivery_id.eq(row.id))
            .order(delivery_attempts::attempt)
            .select((
                delivery_attempts::attempt,
                delivery_attempts::sent_at,
                delivery_attempts::outcome,
                delivery_attempts::error,
            ))
            .load(conn)?;
        let evidence: Vec<Value> = attempts
            .into_iter()
            .map(|(n, at, outcome, error)| json!({"attempt": n, "at": at, "outcome": outcome, "error": error}))
            .collect();
        dead_letter::record(
            conn,
            &deliveries.names,
            NewDeadLetter {
                pool: Pool::Delivery.as_str(),
                source: "delivery",
                message_type: kinds::DELIVERY.into(),
                // Keyed by the attempt too: a replayed delivery that runs out again is a new letter.
                message_id: Some(format!("delivery:{}:{attempt}", row.id)),
                exchange: Some(deliveries.names.gateways()),
                routing_key: Some(row.gateway_id.clone()),
                payload: serde_json::to_vec(&json!({"delivery_id": row.id, "kind": row.kind, "terminal_id": row.terminal_id, "content": row.content})).expect("serializes"),
                headers: json!({}),
                reason: DeadLetterReason::RetriesExhausted,
                detail: format!("{} delivery to {} failed {attempt} times; last: {error}", row.kind, row.terminal_id),
                attempts: Value::Array(evidence),
                subject_id: Some(row.id),
            },
        )?;
    } else {
        let wait = retry::delay(&policy.schedule, attempt as u32, policy.jitter, &mut rand::rng());
        diesel::update(deliveries::table.find(row.id))
            .set((deliveries::status.eq("failed"), deliveries::due_at.eq(now + wait), deliveries::last_error.eq(error)))
            .execute(conn)?;
    }
    Ok(())
}

/// RequestedHandler sends the next attempt of each delivery a `delivery.requested` names. Requests
/// handled together are sent together: their deliveries are read in one statement and their
/// attempts recorded in another.
pub struct RequestedHandler {
    pub deliveries: Arc<Deliveries>,
}

impl Handler for RequestedHandler {
    type Message = DeliveryRequested;
    const MESSAGE_TYPE: &'static str = kinds::DELIVERY_REQUESTED;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, DeliveryRequested>]) -> Result<(), Failure> {
        let ids: Vec<Uuid> = batch.iter().flat_map(|r| r.message.delivery_ids.iter().copied()).collect();
        let done = send_attempts(cx.conn, &self.deliveries, &ids, cx.now, cx.outgoing)?;
        for delivery_id in ids {
            match done.iter().find(|(id, _)| *id == delivery_id) {
                Some((_, sent)) => tracing::debug!(%delivery_id, ?sent, "delivery requested"),
                // One unknown id does not hold up the others; the rest of the message stands.
                None => tracing::warn!(%delivery_id, "skipped: no such delivery"),
            }
        }
        Ok(())
    }
}

/// DeliveryReplayer replays a delivery whose retries ran out: it is sent again, with a fresh
/// budget of attempts.
pub struct DeliveryReplayer {
    pub deliveries: Arc<Deliveries>,
}

impl Replayer for DeliveryReplayer {
    const SOURCE: &'static str = "delivery";

    fn replay(&self, conn: &mut PgConnection, letter: &Full, now: DateTime<Utc>) -> anyhow::Result<String> {
        let id = letter.summary.id;
        let delivery =
            letter.summary.subject_id.ok_or_else(|| anyhow::anyhow!("dead letter {id} names no delivery"))?;
        let (kind, attempts, status): (String, i32, String) = deliveries::table
            .find(delivery)
            .select((deliveries::kind, deliveries::attempts, deliveries::status))
            .first(conn)?;
        anyhow::ensure!(status == "dead", "delivery {delivery} is {status}, not dead: nothing to replay");
        let budget = self.deliveries.transmission.max_attempts_for(&kind) as i32;
        diesel::update(deliveries::table.find(delivery))
            .set((
                deliveries::status.eq("failed"),
                deliveries::due_at.eq(now),
                deliveries::attempt_limit.eq(attempts + budget),
            ))
            .execute(conn)?;
        crate::runtime::outbox::enqueue(conn, &request_send(&self.deliveries, delivery))?;
        Ok(format!("delivery {delivery} sent again, with {budget} more attempts"))
    }
}
