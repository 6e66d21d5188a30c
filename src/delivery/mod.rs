//! The delivery pool: everything sent to a terminal goes out through its gateway's queue, and is
//! complete only when the gateway returns a receipt carrying the SHA-256 of the exact bytes sent
//! (seed 001 [0255]: "a round of processing operations is not completed unless the server receives
//! an acknowledgement").
//!
//! A delivery row is written by whoever decides to send (issuance, exchange, refusals), keyed by
//! what it is for, so the same thing is never sent twice. Each attempt is a row of its own; a
//! missing or wrong receipt fails the attempt, and the retransmission scan tries again on the
//! schedule in `workers/delivery.toml` until the attempts run out and it is dead-lettered.

pub mod notices;
pub mod receipt;
pub mod retry;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::app::App;
use crate::db::schema::{assets, deliveries, delivery_attempts};
use crate::dead_letter::{self, NewDeadLetter, Reason};
use crate::messages::{DeliveryKind, DeliveryRequested, GatewayDelivery, kinds};
use crate::outbox::Outgoing;
use crate::pool::{Cx, Failure, Handler, Incoming};
use crate::requests::Terminal;
use crate::status_machine::{self, Cause, Status};
use crate::telemetry;

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
pub fn enqueue(cx: &mut Cx<'_>, delivery: NewDelivery) -> Result<Option<Uuid>, Failure> {
    Ok(enqueue_with(cx.conn, cx.app, delivery, cx.now, cx.outgoing)?)
}

/// enqueue_with is [`enqueue`] for callers that are not handed a [`Cx`] (the settlement timeout
/// sweep): the request to send is added to `sending`, for the caller to write to the outbox in
/// its transaction.
pub fn enqueue_with(
    conn: &mut PgConnection,
    app: &App,
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
        sending.push(request_send(app, id));
    }
    Ok(Some(id))
}

/// enqueue_many is [`enqueue`] for several deliveries, recorded in one statement: each whose key
/// is new and that is due now is handed to the delivery pool.
pub fn enqueue_many(cx: &mut Cx<'_>, batch: &[NewDelivery]) -> QueryResult<()> {
    for inserted in insert_many(cx.conn, batch, cx.now)? {
        if inserted.due_at <= cx.now {
            cx.publish(request_send(cx.app, inserted.id));
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
    crate::db::prepared(
        "INSERT INTO deliveries (id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, status, due_at, created_at)
         SELECT id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, 'pending', due_at, $11
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[], $7::uuid[], $8::bool[], $9::jsonb[], $10::timestamptz[])
              AS t(id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, due_at)
         ON CONFLICT (dedupe_key) DO NOTHING
         RETURNING id, due_at",
    )
    .bind::<Array<SqlUuid>, _>(&ids)
    .bind::<Array<Text>, _>(column(|d| d.dedupe_key.clone()))
    .bind::<Array<Text>, _>(column(|d| d.kind.as_str().to_string()))
    .bind::<Array<Text>, _>(column(|d| d.terminal_id.clone()))
    .bind::<Array<Text>, _>(column(|d| d.gateway_id.clone()))
    .bind::<Array<Nullable<SqlUuid>>, _>(batch.iter().map(|d| d.order_id).collect::<Vec<_>>())
    .bind::<Array<Nullable<SqlUuid>>, _>(batch.iter().map(|d| d.asset_id).collect::<Vec<_>>())
    .bind::<Array<Bool>, _>(batch.iter().map(|d| d.forced).collect::<Vec<_>>())
    .bind::<Array<Jsonb>, _>(batch.iter().map(|d| d.content.clone()).collect::<Vec<_>>())
    .bind::<Array<Timestamptz>, _>(batch.iter().map(|d| d.due_at.unwrap_or(now)).collect::<Vec<_>>())
    .bind::<Timestamptz, _>(now)
    .load(conn)
}

/// request_send is the message that hands a delivery to the delivery pool.
pub fn request_send(app: &App, delivery_id: Uuid) -> Outgoing {
    let message = DeliveryRequested { message_type: kinds::DELIVERY_REQUESTED.into(), delivery_ids: vec![delivery_id] };
    Outgoing::json(app.names.internal(), kinds::DELIVERY_REQUESTED, kinds::DELIVERY_REQUESTED, &message)
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
    /// The asset is no longer valid (FIG. 8 S301): cancelled, never delivered.
    Cancelled,
}

/// send_attempt makes the next attempt of a pending or failed delivery: it re-checks the asset's
/// validity, records the attempt with the hash of the bytes, and adds them to `sending`, for the
/// caller to write to the outbox in its transaction.
pub fn send_attempt(
    conn: &mut PgConnection,
    app: &App,
    delivery_id: Uuid,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> Result<Sent, Failure> {
    let Some(row) = deliveries::table.find(delivery_id).select(Row::as_select()).for_update().first(conn).optional()?
    else {
        return Err(Failure::permanent(Reason::UnknownDelivery, format!("delivery {delivery_id} does not exist")));
    };
    if !matches!(row.status.as_str(), "pending" | "failed") {
        return Ok(Sent::Skipped);
    }
    let kind = DeliveryKind::parse(&row.kind).expect("the CHECK constraint admits only known kinds");
    if kind == DeliveryKind::Asset
        && let Some(asset_id) = row.asset_id
        && !asset_deliverable(conn, asset_id, now)?
    {
        diesel::update(deliveries::table.find(row.id))
            .set((deliveries::status.eq("cancelled"), deliveries::last_error.eq("the asset is no longer valid")))
            .execute(conn)?;
        expire_if_due(conn, asset_id, now)?;
        telemetry::delivery_attempt(kind.as_str(), "cancelled");
        return Ok(Sent::Cancelled);
    }

    let attempt = u32::try_from(row.attempts + 1).expect("attempts are positive");
    let message_id = Uuid::now_v7();
    let message = GatewayDelivery {
        message_type: kinds::DELIVERY.into(),
        delivery_id: row.id,
        attempt,
        kind,
        terminal_id: row.terminal_id.clone(),
        gateway_id: row.gateway_id.clone(),
        sent_at: now,
        content: row.content.clone(),
    };
    let outgoing = Outgoing::json(app.names.gateways(), row.gateway_id.as_str(), kinds::DELIVERY, &message)
        .with_message_id(message_id)
        .correlated(row.order_id.unwrap_or(row.id).to_string());
    let ack_timeout = chrono::Duration::from_std(app.pools.delivery.transmission.ack_timeout).expect("a sane timeout");
    record_attempt(
        conn,
        row.id,
        attempt as i32,
        message_id,
        &crate::crypto::sha256_hex(&outgoing.payload),
        now,
        now + ack_timeout,
    )?;
    sending.push(outgoing);
    telemetry::delivery_attempt(kind.as_str(), "sent");
    Ok(Sent::Attempt(attempt))
}

/// record_attempt records an attempt with the hash of the bytes it sends, and marks the delivery
/// sent until `receipt_due_at`: one round trip.
fn record_attempt(
    conn: &mut PgConnection,
    delivery_id: Uuid,
    attempt: i32,
    message_id: Uuid,
    payload_sha256: &str,
    now: DateTime<Utc>,
    receipt_due_at: DateTime<Utc>,
) -> QueryResult<()> {
    use diesel::sql_types::{Int4, Text, Timestamptz, Uuid as SqlUuid};
    crate::db::prepared(
        "WITH attempt AS (
           INSERT INTO delivery_attempts (delivery_id, attempt, message_id, payload_sha256, sent_at, outcome)
           VALUES ($1, $2, $3, $4, $5, 'sent')
         )
         UPDATE deliveries SET status = 'sent', attempts = $2, due_at = $6 WHERE id = $1",
    )
    .bind::<SqlUuid, _>(delivery_id)
    .bind::<Int4, _>(attempt)
    .bind::<SqlUuid, _>(message_id)
    .bind::<Text, _>(payload_sha256)
    .bind::<Timestamptz, _>(now)
    .bind::<Timestamptz, _>(receipt_due_at)
    .execute(conn)?;
    Ok(())
}

/// expire_if_due moves an asset past its term to `expired`. An asset still awaiting its
/// delivery is first handed to past-due processing, as FIG. 6 S101/S103 does with an invalid one;
/// retrying stops there (FIG. 8 S301).
pub fn expire_if_due(conn: &mut PgConnection, asset_id: Uuid, now: DateTime<Utc>) -> Result<bool, Failure> {
    let expires_at: DateTime<Utc> = assets::table.find(asset_id).select(assets::expires_at).first(conn)?;
    let mut status = status_machine::current_for_update(conn, asset_id)?;
    if expires_at > now {
        return Ok(false);
    }
    if matches!(status, Status::AwaitingExchange | Status::AwaitingDesignatedDelivery) {
        status_machine::transition(
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
    if !status_machine::allowed(status, Status::Expired) {
        return Ok(false);
    }
    status_machine::transition(conn, asset_id, status, Status::Expired, Cause::AssetExpired, None, now)?;
    Ok(true)
}

/// asset_deliverable re-checks validity before any transmission (FIG. 6 S101, 7 S201, 8 S301).
fn asset_deliverable(conn: &mut PgConnection, asset_id: Uuid, now: DateTime<Utc>) -> QueryResult<bool> {
    let (status, expires_at): (String, DateTime<Utc>) =
        assets::table.find(asset_id).select((assets::status, assets::expires_at)).first(conn)?;
    let status = Status::parse(&status).expect("known status");
    Ok(expires_at > now && status.is_before_delivery())
}

/// fail_attempt records a failed attempt (no receipt in time, or a wrong hash) and schedules the
/// retransmission, or dead-letters the delivery when its attempts have run out.
pub fn fail_attempt(
    conn: &mut PgConnection,
    app: &App,
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
    telemetry::delivery_attempt(&row.kind, outcome);
    let policy = &app.pools.delivery.transmission;
    if let Some(asset_id) = row.asset_id.filter(|_| row.kind == DeliveryKind::Asset.as_str()) {
        let status = status_machine::current_for_update(conn, asset_id)?;
        let next = match status {
            Status::AwaitingExchange | Status::AwaitingDesignatedDelivery => Some(Status::Retransmitting),
            Status::ExpiredCertificateProcessing => Some(Status::ForcedRetransmitting),
            _ => None,
        };
        if let Some(next) = next {
            status_machine::transition(conn, asset_id, status, next, Cause::DeliveryFailed, Some(error), now)?;
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
            &app.names,
            NewDeadLetter {
                pool: crate::broker::Pool::Delivery,
                source: "delivery",
                message_type: kinds::DELIVERY.into(),
                // Keyed by the attempt too: a replayed delivery that runs out again is a new letter.
                message_id: Some(format!("delivery:{}:{attempt}", row.id)),
                exchange: Some(app.names.gateways()),
                routing_key: Some(row.gateway_id.clone()),
                payload: serde_json::to_vec(&json!({"delivery_id": row.id, "kind": row.kind, "terminal_id": row.terminal_id, "content": row.content})).expect("serializes"),
                headers: json!({}),
                reason: Reason::RetriesExhausted,
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

/// RequestedHandler sends the next attempt of each delivery a `delivery.requested` names.
pub struct RequestedHandler;

impl Handler for RequestedHandler {
    fn message_type(&self) -> &'static str {
        kinds::DELIVERY_REQUESTED
    }

    fn handle(&self, cx: &mut Cx<'_>, message: &Incoming) -> Result<(), Failure> {
        let request: DeliveryRequested = serde_json::from_value(message.json.clone())
            .map_err(|e| Failure::permanent(Reason::SchemaViolation, e.to_string()))?;
        for delivery_id in request.delivery_ids {
            match send_attempt(cx.conn, cx.app, delivery_id, cx.now, cx.outgoing) {
                Ok(sent) => tracing::debug!(%delivery_id, ?sent, "delivery requested"),
                // One unknown id does not hold up the others; the rest of the message stands.
                Err(Failure::Permanent { reason: Reason::UnknownDelivery, detail }) => {
                    tracing::warn!(%delivery_id, detail, "skipped")
                }
                Err(other) => return Err(other),
            }
        }
        Ok(())
    }
}
