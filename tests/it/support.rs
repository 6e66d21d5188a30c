//! Helpers shared by the integration tests: the partner that settles everything, reading requests,
//! assets and deliveries back from the database, and counting messages on the test's broker.

use std::time::Duration;

use assetflow::cli::simulate::partner::PartnerOptions;
use assetflow::contracts::messages::{GatewayDelivery, SettlementOutcome, SettlementResult, kinds};
use assetflow::domain::catalogue::PartyKind;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;

use crate::harness::{Env, failed, query, text};

/// DEADLINE is how long a wait on the broker may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// settle_all is a partner that settles every instruction at once.
pub fn settle_all() -> PartnerOptions {
    PartnerOptions { decline_rate: 0.0, latency: Duration::ZERO, ..PartnerOptions::default() }
}

/// answer_settlement answers a settlement as its partner, card-co, would: signed.
pub async fn answer_settlement(env: &Env, settlement: &str, outcome: SettlementOutcome) {
    let result = SettlementResult {
        message_type: kinds::SETTLEMENT_RESULT.into(),
        settlement_id: settlement.parse().unwrap(),
        partner_id: "card-co".into(),
        outcome,
        partner_reference: format!("T-{}", &settlement[..8]),
        reason: (outcome == SettlementOutcome::Declined).then(|| "refused by the test's partner".into()),
        sent_at: Utc::now(),
        signature: None,
    };
    let body = env.signed_by(PartyKind::Partner, "card-co", &result).await;
    env.publish(kinds::SETTLEMENT_RESULT, &body).await;
}

/// request_id is the `request_id` of a signed request.
pub fn request_id(request: &Value) -> String {
    request["request_id"].as_str().expect("a request id").to_string()
}

/// timestamp runs a query returning one timestamp column `value`, with `values` bound (see
/// `harness::query`), or None when there is no row.
pub fn timestamp(conn: &mut PgConnection, sql: &'static str, values: &[&dyn ToString]) -> Option<DateTime<Utc>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
        value: Option<DateTime<Utc>>,
    }
    query(sql, values)
        .get_result::<Row>(conn)
        .optional()
        .unwrap_or_else(|e| panic!("{}", failed(sql, values, e)))
        .and_then(|t| t.value)
}

/// asset_status is the current status of an asset, which must exist.
pub fn asset_status(conn: &mut PgConnection, asset_id: &str) -> String {
    text(conn, "SELECT status AS value FROM assets WHERE id = $1::uuid", &[&asset_id]).expect("the asset exists")
}

/// DeliveryState is a delivery row as the tests read it.
#[derive(Debug, QueryableByName)]
pub struct DeliveryState {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub status: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub due_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub last_error: Option<String>,
}

/// delivery_state reads a delivery's status, attempts, due time and last error.
pub fn delivery_state(conn: &mut PgConnection, delivery_id: &str) -> DeliveryState {
    let sql = "SELECT status, attempts, due_at, last_error FROM deliveries WHERE id = $1::uuid";
    query(sql, &[&delivery_id]).get_result(conn).unwrap_or_else(|e| panic!("{}", failed(sql, &[&delivery_id], e)))
}

/// FirstAttempt is an order's asset delivery whose first attempt went out.
pub struct FirstAttempt {
    pub delivery: String,
    pub asset: String,
    pub sent_at: DateTime<Utc>,
}

/// first_attempt waits until the asset delivery of the order placed with `request_id` has sent
/// its first attempt, and no further.
pub async fn first_attempt(env: &Env, request_id: &str) -> FirstAttempt {
    let sql = "SELECT d.id::text AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
               WHERE o.request_id = $1 AND d.kind = 'asset' AND d.status = 'sent' AND d.attempts = 1";
    let request_id = request_id.to_string();
    let delivery = env.wait_until("the asset delivery sends attempt 1", move |c| text(c, sql, &[&request_id])).await;
    let id = delivery.clone();
    let (asset, sent_at) = env
        .db(move |c| {
            let asset = text(c, "SELECT asset_id::text AS value FROM deliveries WHERE id = $1::uuid", &[&id])
                .expect("an asset delivery names its asset");
            let sent_at = timestamp(
                c,
                "SELECT sent_at AS value FROM delivery_attempts WHERE delivery_id = $1::uuid AND attempt = 1",
                &[&id],
            )
            .expect("attempt 1 is recorded");
            (asset, sent_at)
        })
        .await;
    FirstAttempt { delivery, asset, sent_at }
}

/// Retransmitting is an asset whose first delivery attempt went unanswered: the asset is
/// `retransmitting` and its delivery `failed`, waiting for a retry, before the asset's term ends.
pub struct Retransmitting {
    pub first: FirstAttempt,
    pub expires_at: DateTime<Utc>,
}

/// retransmitting places an immediate order for an asset valid one hour (the partner settles, no
/// gateway answers) and times its first attempt out with the retransmission scan.
pub async fn retransmitting(env: &mut Env) -> Retransmitting {
    env.product("ppv", |p| {
        p.kind = "ppv_ticket".into();
        p.asset_validity_secs = Some(3_600);
    })
    .await;
    let dave = env.terminal("dave", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    // No gateway simulator: attempt 1 goes unanswered.
    let order = assetflow::cli::simulate::terminals::purchase(
        &dave,
        "ppv",
        1,
        serde_json::json!({"delivery": {"mode": "immediate"}}),
    );
    env.send(&order).await;
    let first = first_attempt(env, &request_id(&order)).await;
    let timed_out = env.run_job("retransmission", first.sent_at + chrono::TimeDelta::seconds(61)).await;
    assert_eq!(timed_out.rows_scanned, 1, "{timed_out:?}");
    let (delivery, asset) = (first.delivery.clone(), first.asset.clone());
    let expires_at = env
        .db(move |c| {
            assert_eq!(asset_status(c, &asset), "retransmitting");
            assert_eq!(delivery_state(c, &delivery).status, "failed");
            timestamp(c, "SELECT expires_at AS value FROM assets WHERE id = $1::uuid", &[&asset]).expect("an asset")
        })
        .await;
    Retransmitting { first, expires_at }
}

/// delivered_certificate waits until the certificate of the order placed with `request_id` is
/// delivered, and returns it as the terminal received it.
pub async fn delivered_certificate(env: &Env, request_id: &str) -> Value {
    let sql = "SELECT d.content->>'certificate' AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
               WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'";
    let request_id = request_id.to_string();
    let text = env.wait_until("the certificate is delivered", move |c| text(c, sql, &[&request_id])).await;
    serde_json::from_str(&text).expect("a JSON certificate")
}

/// channel opens a fresh channel on the test's own broker connection.
pub async fn channel(env: &Env) -> lapin::Channel {
    let connection = env.broker.connection().await.expect("connected to RabbitMQ");
    connection.create_channel().await.expect("a channel")
}

/// bind_queue declares a queue of the test's own and binds it to `exchange` under `routing_key`,
/// as an external subscriber would; it returns the queue's name.
pub async fn bind_queue(env: &Env, queue: &str, exchange: &str, routing_key: &str) -> String {
    let channel = channel(env).await;
    channel.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declared");
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bound");
    let _ = channel.close(200, "bound".into()).await;
    queue.to_string()
}

/// queued is the number of messages ready in `queue`, read with a passive declare.
pub async fn queued(env: &Env, queue: &str) -> u32 {
    let channel = channel(env).await;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue} exists: {e}"));
    let _ = channel.close(200, "counted".into()).await;
    declared.message_count()
}

/// wait_for_queue polls `queue` until `done` accepts its message count, or fails the test after
/// the deadline, naming what it waited for.
pub async fn wait_for_queue(env: &Env, queue: &str, what: &str, done: impl Fn(u32) -> bool) -> u32 {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        let messages = queued(env, queue).await;
        if done(messages) {
            return messages;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what} ({queue} holds {messages})");
    }
}

/// QueueCounts is what `rabbitmqctl list_queues` reports of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: u64,
    pub unacknowledged: u64,
}

/// queue_counts is the number of messages in `queue`, ready and delivered but not yet
/// acknowledged, as `rabbitmqctl list_queues` reports them (a passive declare counts only the
/// ready ones).
pub async fn queue_counts(env: &Env, queue: &str) -> QueueCounts {
    let vhost = env.config.amqp.url.rsplit('/').next().expect("the test URL names its vhost").to_string();
    let queue = queue.to_string();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "-p", &vhost, "--quiet", "--no-table-headers"])
            .args(["name", "messages_ready", "messages_unacknowledged"])
            .output()
            .expect("rabbitmqctl runs");
        assert!(out.status.success(), "rabbitmqctl list_queues: {}", String::from_utf8_lossy(&out.stderr));
        let listed = String::from_utf8_lossy(&out.stdout).to_string();
        let row = listed
            .lines()
            .map(|line| line.split('\t').map(str::trim).collect::<Vec<_>>())
            .find(|fields| fields.first() == Some(&queue.as_str()))
            .unwrap_or_else(|| panic!("rabbitmqctl lists no queue {queue}: {listed}"));
        let number = |i: usize| row.get(i).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{row:?}"));
        QueueCounts { ready: number(1), unacknowledged: number(2) }
    })
    .await
    .unwrap()
}

/// history is an asset's status history, oldest first, as "from→to" steps with "(new)" for the
/// first.
pub fn history(conn: &mut PgConnection, asset_id: &str) -> String {
    text(
        conn,
        "SELECT string_agg(coalesce(from_status, '(new)') || '→' || to_status, ', ' ORDER BY id) AS value
         FROM asset_status_history WHERE asset_id = $1::uuid",
        &[&asset_id],
    )
    .unwrap_or_default()
}

/// causes is the causes of an asset's status changes, oldest first.
pub fn causes(conn: &mut PgConnection, asset_id: &str) -> String {
    text(
        conn,
        "SELECT string_agg(cause, ', ' ORDER BY id) AS value FROM asset_status_history WHERE asset_id = $1::uuid",
        &[&asset_id],
    )
    .unwrap_or_default()
}

/// Taken is a delivery as the gateway took it off its queue: the message and its exact bytes.
pub struct Taken {
    pub message: GatewayDelivery,
    pub bytes: Vec<u8>,
    /// The AMQP message id of the attempt, which the terminal's acknowledgement names.
    pub message_id: uuid::Uuid,
}

/// take waits for the next delivery in a gateway's queue, takes it, and checks its kind and attempt.
pub async fn take(env: &Env, gateway: &str, kind: &str, attempt: u32) -> Taken {
    let queue = env.app.plumbing.names.gateway_queue(gateway);
    let channel = channel(env).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got = channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("basic.get");
        if let Some(message) = got {
            let _ = channel.close(200, "taken".into()).await;
            let bytes = message.delivery.data.clone();
            let message_id = message.delivery.properties.message_id().as_ref().expect("a message id");
            let message_id = message_id.as_str().parse().expect("a UUID message id");
            let message: GatewayDelivery = serde_json::from_slice(&bytes).expect("a delivery");
            assert_eq!((message.kind.as_str(), message.attempt), (kind, attempt), "{message:?}");
            return Taken { message, bytes, message_id };
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for a {kind} delivery (attempt {attempt})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// DEAD_LETTER_REASON is the reason of the dead letter whose payload hashes to `$1`: matching on
/// it is also the proof that the original bytes were kept.
pub const DEAD_LETTER_REASON: &str =
    "SELECT reason AS value FROM dead_letters WHERE sha256(payload) = decode($1, 'hex')";

/// dead_letter_reason waits for the dead letter of `body` and returns its reason.
pub async fn dead_letter_reason(env: &Env, what: &str, body: &[u8]) -> String {
    let hash = assetflow::crypto::sha256_hex(body);
    let what = format!("{what} is dead-lettered with its bytes");
    env.wait_until(&what, move |c| text(c, DEAD_LETTER_REASON, &[&hash])).await
}
