//! The delivery pool: everything sent to a terminal goes out through its gateway's queue, and is
//! complete only when the gateway returns a receipt carrying the SHA-256 of the exact bytes sent
//! (`docs/product.md#a-round-ends-with-an-acknowledgement`).
//!
//! A delivery row is written by whoever decides to send (issuance, exchange, refusals), keyed by
//! what it is for, so the same thing is never sent twice. Each attempt is a row of its own; a
//! missing or wrong receipt fails the attempt, and the retransmission scan tries again on the
//! schedule in `workers/delivery.toml` until the attempts run out and it is dead-lettered.
//!
//! This file holds the records and the requests to send; sending an attempt is `send.rs`, a
//! failed attempt, an expired asset and the replay of a dead delivery are `failure.rs`.

mod failure;
pub mod notices;
pub mod receipt;
pub mod retry;
mod send;

pub use failure::{DeliveryReplayer, expire_if_due, fail_attempt};
pub use send::{RequestedHandler, Sent, send_attempts};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use std::collections::BTreeMap;

use crate::config::GatewayConfig;
use crate::config::workers::TransmissionPolicy;
use crate::contracts::messages::{DeliveryKind, DeliveryRequested, Notice, kinds};
use crate::contracts::topology::Names;
use crate::domain::catalogue::Terminal;
use crate::domain::schema::deliveries;
use crate::runtime::consumer::{Cx, Failure};
use crate::runtime::outbox::Outgoing;

/// Deliveries is what sending to terminals needs: the names on the broker, and the transmission
/// policy of `workers/delivery.toml` (the receipt timeout, the retry schedule, the attempts).
#[derive(Debug, Clone)]
pub struct Deliveries {
    pub names: Names,
    pub transmission: TransmissionPolicy,
    /// The configured gateways: who may acknowledge what was sent through each.
    pub gateways: BTreeMap<String, GatewayConfig>,
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
    /// The terminal request this delivery answers, if it answers one: the gateway matches the
    /// answer to its request by it.
    pub request_id: Option<String>,
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
            request_id: None,
        }
    }

    /// NewDelivery::revocation_request asks the holder of a closed exchange certificate to delete
    /// it, saying why (`text`). Keyed per certificate ([`revocation_key`]), it is sent once, whatever
    /// closed the certificate: its expiry, a refund, a replacement.
    pub fn revocation_request(terminal: &Terminal, certificate: Uuid, asset: Uuid, text: String) -> NewDelivery {
        let notice = Notice {
            code: "certificate_revoked".into(),
            text,
            order_id: None,
            asset_id: Some(asset),
            certificate_id: Some(certificate),
            request_id: None,
        };
        let content = serde_json::to_value(notice).expect("serializes");
        let mut d = NewDelivery::now(DeliveryKind::RevocationRequest, revocation_key(certificate), terminal, content);
        d.asset_id = Some(asset);
        d
    }

    /// NewDelivery::answering marks the delivery as the answer to a terminal request.
    pub fn answering(mut self, request_id: impl Into<String>) -> NewDelivery {
        self.request_id = Some(request_id.into());
        self
    }
}

/// revocation_key is the key of the request to delete a certificate: one per certificate.
pub fn revocation_key(certificate: Uuid) -> String {
    format!("revoke:{certificate}")
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
            deliveries::request_id.eq(&delivery.request_id),
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
    let now = cx.now;
    let due: Vec<Uuid> =
        insert_many(cx.conn, batch, now)?.into_iter().filter(|d| d.due_at <= now).map(|d| d.id).collect();
    cx.outgoing.extend(request_sends(deliveries, &due));
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
        "INSERT INTO deliveries (id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, status, due_at, created_at, request_id)
         SELECT id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, 'pending', due_at, $now, request_id
         FROM unnest($ids::uuid[], $dedupe_key::text[], $kind::text[], $terminal_id::text[], $gateway_id::text[], $order_id::uuid[], $asset_id::uuid[], $forced::bool[], $content::jsonb[], $due_at::timestamptz[], $request_id::text[])
              AS t(id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, due_at, request_id)
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
    .bind::<Array<Nullable<Text>>, _>("request_id", batch.iter().map(|d| d.request_id.as_deref()).collect::<Vec<_>>())
    .bind::<Timestamptz, _>("now", now)
    .load(conn)
}

/// request_send is the message that hands a delivery to the delivery pool.
pub fn request_send(deliveries: &Deliveries, delivery_id: Uuid) -> Outgoing {
    request_sends(deliveries, &[delivery_id]).next().expect("one delivery makes one message")
}

/// request_sends is the messages that hand these deliveries to the delivery pool: as few as a
/// message's limit allows, so that a batch's deliveries cost one message and not one each.
pub fn request_sends<'a>(deliveries: &'a Deliveries, delivery_ids: &'a [Uuid]) -> impl Iterator<Item = Outgoing> + 'a {
    DeliveryRequested::for_deliveries(delivery_ids).map(|message| {
        let first = message.delivery_ids[0];
        Outgoing::json(deliveries.names.internal(), kinds::DELIVERY_REQUESTED, kinds::DELIVERY_REQUESTED, &message)
            .correlated(first.to_string())
    })
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
    pub request_id: Option<String>,
}
