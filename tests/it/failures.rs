//! Failures, end to end: gateways and partners that never answer, corrupted transmissions,
//! retries that run out, assets that expire before their retransmission, duplicated answers, and
//! what the outbox relay does with messages the broker has not taken yet.
//!
//! The scheduler does not run in tests: each test plays the clock by running the scans itself at
//! the `as_of` it chooses, usually read from the due times in the database.

use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::partner::PartnerOptions;
use assetflow::cli::simulate::terminals::purchase;
use assetflow::contracts::messages::{DeliveryRequested, SettlementOutcome, SettlementResult, kinds};
use assetflow::domain::catalogue::PartyKind;
use assetflow::runtime::outbox::{self, Outgoing};
use chrono::{TimeDelta, Utc};
use diesel::prelude::*;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::harness::{Env, count, text};
use crate::support::{
    DEADLINE, Retransmitting, asset_status, bind_queue, channel, delivery_state, first_attempt, queued, request_id,
    retransmitting, settle_all, timestamp, wait_for_queue,
};

/// SCHEDULE_SECS is the retransmission schedule (`docs/product.md#retransmission-and-dead-letters`), in seconds: the wait after failed
/// attempt n is entry n, the last entry repeated.
const SCHEDULE_SECS: [i64; 7] = [60, 300, 1_800, 7_200, 21_600, 43_200, 86_400];

fn secs(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

fn attempt_outcome(conn: &mut PgConnection, delivery_id: &str, attempt: i32) -> Option<String> {
    text(
        conn,
        "SELECT outcome AS value FROM delivery_attempts WHERE delivery_id = $1::uuid AND attempt = $2::int4",
        &[&delivery_id, &attempt],
    )
}

/// settlement_attempts is how many instructions a settlement has had.
async fn settlement_attempts(env: &Env, settlement: &str) -> i64 {
    let settlement = settlement.to_string();
    env.db(move |c| count(c, "SELECT attempts::bigint AS count FROM settlements WHERE id = $1::uuid", &[&settlement]))
        .await
}

/// subscribe_to_dead_letters binds a queue of the test's own to the dead-letter exchange, as an
/// external subscriber would: the pool's own dead-letter queue is drained into the dead_letters
/// table by the recorder, so the exchange is where the notices can be watched.
async fn subscribe_to_dead_letters(env: &Env, pool: assetflow::contracts::topology::Pool) -> String {
    bind_queue(env, &format!("test.dead-letters.{pool}"), &env.app.plumbing.names.dlx(), pool.as_str()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_never_answers_gets_the_asset_again_and_it_ends_force_delivered() {
    let mut env = Env::new().await;
    env.product("ppv", |p| p.kind = "ppv_ticket".into()).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    // No gateway simulator: nothing answers the first attempt.

    let order = purchase(&alice, "ppv", 1, json!({"delivery": {"mode": "immediate"}}));
    env.send(&order).await;
    let first = first_attempt(&env, &request_id(&order)).await;

    // Within the acknowledgement timeout nothing happens.
    let early = env.run_job("retransmission", first.sent_at + secs(30)).await;
    assert_eq!((early.rows_scanned, early.enqueued), (0, 0), "{early:?}");
    let (delivery, asset) = (first.delivery.clone(), first.asset.clone());
    env.db(move |c| {
        assert_eq!(delivery_state(c, &delivery).status, "sent");
        assert_eq!(attempt_outcome(c, &delivery, 1).as_deref(), Some("sent"));
        assert_eq!(asset_status(c, &asset), "awaiting_designated_delivery");
    })
    .await;

    // Past it, the attempt has failed and the asset is being retransmitted (`docs/product.md#retransmission-and-dead-letters`).
    let late = env.run_job("retransmission", first.sent_at + secs(61)).await;
    assert_eq!((late.rows_scanned, late.enqueued), (1, 0), "{late:?}");
    let (delivery, asset) = (first.delivery.clone(), first.asset.clone());
    let due = env
        .db(move |c| {
            let state = delivery_state(c, &delivery);
            assert_eq!((state.status.as_str(), state.attempts), ("failed", 1));
            assert_eq!(attempt_outcome(c, &delivery, 1).as_deref(), Some("timed_out"));
            assert_eq!(asset_status(c, &asset), "retransmitting");
            let history = "SELECT count(*) FROM asset_status_history WHERE asset_id = $1::uuid
                           AND from_status = 'awaiting_designated_delivery' AND to_status = 'retransmitting'
                           AND cause = 'delivery_failed'";
            assert_eq!(count(c, history, &[&asset]), 1);
            state.due_at
        })
        .await;
    assert!(due > first.sent_at + secs(61), "the retransmission is due after the failure, not at once: {due}");

    // The first attempt was lost on its way: the gateway, answering now, sees only the retransmission.
    let gateway_queue = env.app.plumbing.names.gateway_queue("gw-1");
    wait_for_queue(&env, &gateway_queue, "the first attempt reaches the gateway's queue", |n| n >= 1).await;
    channel(&env).await.queue_purge(gateway_queue.as_str().into(), QueuePurgeOptions::default()).await.expect("purged");
    env.gateway(GatewayOptions::default());

    let retry = env.run_job("retransmission", due).await;
    assert_eq!(retry.enqueued, 1, "{retry:?}");
    let asset = first.asset.clone();
    env.wait_until("the retransmitted asset is force-delivered", move |c| {
        (asset_status(c, &asset) == "force_delivered").then_some(())
    })
    .await;
    let (delivery, asset) = (first.delivery.clone(), first.asset.clone());
    env.db(move |c| {
        let state = delivery_state(c, &delivery);
        assert_eq!((state.status.as_str(), state.attempts), ("delivered", 2));
        assert_eq!(attempt_outcome(c, &delivery, 1).as_deref(), Some("timed_out"));
        assert_eq!(attempt_outcome(c, &delivery, 2).as_deref(), Some("acknowledged"));
        let acknowledged =
            "SELECT count(*) FROM delivery_attempts WHERE delivery_id = $1::uuid AND outcome = 'acknowledged'";
        assert_eq!(count(c, acknowledged, &[&delivery]), 1);
        let history = "SELECT count(*) FROM asset_status_history WHERE asset_id = $1::uuid
                       AND from_status = 'retransmitting' AND to_status = 'force_delivered' AND cause = 'delivery_acknowledged'";
        assert_eq!(count(c, history, &[&asset]), 1);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_with_the_wrong_hash_fails_the_attempt_and_never_completes_the_delivery() {
    let mut env = Env::new().await;
    env.product("ppv", |p| p.kind = "ppv_ticket".into()).await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    // Every receipt carries the hash of bytes other than those sent: a corrupted transmission.
    env.gateway(GatewayOptions { failure_rate: 1.0, ..GatewayOptions::default() });

    let order = purchase(&bob, "ppv", 1, json!({"delivery": {"mode": "immediate"}}));
    env.send(&order).await;
    let rid = request_id(&order);
    let sql = "SELECT d.id::text AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
                 JOIN delivery_attempts a ON a.delivery_id = d.id
               WHERE o.request_id = $1 AND d.kind = 'asset' AND a.attempt = 1 AND a.outcome = 'hash_mismatch'";
    let delivery = env.wait_until("attempt 1 fails on its hash", move |c| text(c, sql, &[&rid])).await;
    let id = delivery.clone();
    let (asset, due) = env
        .db(move |c| {
            let state = delivery_state(c, &id);
            assert_eq!((state.status.as_str(), state.attempts), ("failed", 1));
            let error = state.last_error.unwrap_or_default();
            assert!(error.contains("hash"), "the error says what was wrong: {error}");
            let asset = text(c, "SELECT asset_id::text AS value FROM deliveries WHERE id = $1::uuid", &[&id]).unwrap();
            assert_eq!(asset_status(c, &asset), "retransmitting");
            (asset, state.due_at)
        })
        .await;

    // The retransmission is corrupted too: it fails the same way, and nothing is ever delivered.
    let retry = env.run_job("retransmission", due).await;
    assert_eq!(retry.enqueued, 1, "{retry:?}");
    let id = delivery.clone();
    env.wait_until("attempt 2 fails on its hash", move |c| {
        (attempt_outcome(c, &id, 2).as_deref() == Some("hash_mismatch")).then_some(())
    })
    .await;
    let id = delivery.clone();
    env.db(move |c| {
        let state = delivery_state(c, &id);
        assert_eq!((state.status.as_str(), state.attempts), ("failed", 2));
        assert!(state.last_error.unwrap_or_default().contains("hash"));
        let acknowledged =
            "SELECT count(*) FROM delivery_attempts WHERE delivery_id = $1::uuid AND outcome = 'acknowledged'";
        assert_eq!(count(c, acknowledged, &[&id]), 0);
        let delivered = "SELECT count(*) FROM deliveries WHERE id = $1::uuid AND delivered_at IS NOT NULL";
        assert_eq!(count(c, delivered, &[&id]), 0);
        assert_eq!(asset_status(c, &asset), "retransmitting");
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM asset_status_history
                 WHERE asset_id = $1::uuid AND to_status IN ('delivered', 'force_delivered')",
                &[&asset]
            ),
            0
        );
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_retries_run_out_is_dead_lettered_with_every_attempt() {
    let mut env = Env::new().await;
    env.product("ppv", |p| p.kind = "ppv_ticket".into()).await;
    let carol = env.terminal("carol", "gw-1", Some("card-co")).await;
    // An asset to a mobile terminal: workers/delivery.toml gives it 15 attempts.
    let limit = env.app.pools.delivery.transmission.max_attempts_for("asset", Some("mobile")) as i32;
    assert_eq!(limit, 15);
    env.start().await;
    env.partner(settle_all());
    let dead_letters = subscribe_to_dead_letters(&env, assetflow::contracts::topology::Pool::Delivery).await;
    // No gateway simulator: no attempt is ever acknowledged.

    let order = purchase(&carol, "ppv", 1, json!({"delivery": {"mode": "immediate"}}));
    env.send(&order).await;
    let first = first_attempt(&env, &request_id(&order)).await;

    // Play the clock: each run at the delivery's due time either times out the attempt in flight
    // or sends the next one. After each time-out, the wait until the next attempt must follow the
    // schedule within its jitter.
    let mut waits: Vec<(i32, TimeDelta)> = Vec::new();
    let mut runs = 0;
    loop {
        let id = first.delivery.clone();
        let before = env.db(move |c| delivery_state(c, &id)).await;
        if before.status == "dead" {
            break;
        }
        assert!(matches!(before.status.as_str(), "sent" | "failed"), "unexpected delivery status {before:?}");
        runs += 1;
        assert!(runs <= 2 * limit, "still not dead after {runs} runs: {before:?}");
        let report = env.run_job("retransmission", before.due_at).await;
        assert_eq!(report.rows_scanned, 1, "{before:?}: {report:?}");
        if before.status == "failed" {
            assert_eq!(report.enqueued, 1, "the next attempt is sent: {report:?}");
            continue;
        }
        let (id, attempt) = (first.delivery.clone(), before.attempts);
        let (after, failed_at) = env
            .db(move |c| {
                let sql = "SELECT finished_at AS value FROM delivery_attempts
                           WHERE delivery_id = $1::uuid AND attempt = $2::int4";
                let failed_at = timestamp(c, sql, &[&id, &attempt]);
                (delivery_state(c, &id), failed_at.expect("a timed-out attempt has finished"))
            })
            .await;
        assert_eq!(after.attempts, attempt);
        if after.status == "failed" {
            waits.push((attempt, after.due_at - failed_at));
        }
    }

    assert_eq!(waits.len(), limit as usize - 1, "every attempt but the last was followed by a wait: {waits:?}");
    for (attempt, wait) in &waits {
        let nominal = SCHEDULE_SECS[(*attempt as usize - 1).min(SCHEDULE_SECS.len() - 1)] * 1_000;
        let slack = nominal / 10 + 1;
        let wait = wait.num_milliseconds();
        assert!(
            (nominal - slack..=nominal + slack).contains(&wait),
            "attempt {attempt}: waited {wait} ms, the schedule says {nominal} ms ± 10%"
        );
    }

    let (delivery, asset) = (first.delivery.clone(), first.asset.clone());
    env.db(move |c| {
        let state = delivery_state(c, &delivery);
        assert_eq!((state.status.as_str(), state.attempts), ("dead", limit));
        let timed_out = "SELECT count(*) FROM delivery_attempts WHERE delivery_id = $1::uuid AND outcome = 'timed_out'";
        assert_eq!(count(c, timed_out, &[&delivery]), i64::from(limit));
        let letter = "SELECT count(*) FROM dead_letters WHERE source = 'delivery' AND reason = 'retries_exhausted'
                      AND subject_id = $1::uuid AND jsonb_typeof(attempts) = 'array' AND jsonb_array_length(attempts) = $2::int4";
        assert_eq!(count(c, letter, &[&delivery, &limit]), 1, "one dead letter, with the evidence of every attempt");
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 1);
        // Retries exhausted: the asset stays where it is, for an operator (`docs/product.md#the-transition-table`).
        assert_eq!(asset_status(c, &asset), "retransmitting");
        let moved = "SELECT count(*) FROM asset_status_history WHERE asset_id = $1::uuid AND from_status = 'retransmitting'";
        assert_eq!(count(c, moved, &[&asset]), 0);
    })
    .await;

    // The dead letter is published to the dead-letter exchange, under the delivery pool's key.
    let dlq = dead_letters;
    wait_for_queue(&env, &dlq, "the dead letter is published", |n| n >= 1).await;
    let message = channel(&env)
        .await
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("a message in the dead-letter queue");
    let body: Value = serde_json::from_slice(&message.delivery.data).expect("a JSON dead letter");
    assert_eq!(body["reason"], "retries_exhausted", "{body}");
    assert_eq!(body["source"], "delivery", "{body}");
    assert!(body["original"].as_str().unwrap_or_default().contains(&first.delivery), "{body}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asset_that_expires_while_its_retransmission_is_pending_is_never_delivered() {
    let mut env = Env::new().await;
    let Retransmitting { first, expires_at } = retransmitting(&mut env).await;
    let as_of = first.sent_at + TimeDelta::hours(2);
    assert!(as_of > expires_at, "the scan runs after the asset's term: {as_of} vs {expires_at}");

    // `docs/product.md#validity-is-checked-first`: the retransmission re-checks validity first, and retrying stops.
    let report = env.run_job("retransmission", as_of).await;
    assert_eq!(report.enqueued, 0, "nothing is sent: {report:?}");
    let (delivery, asset) = (first.delivery.clone(), first.asset.clone());
    env.db(move |c| {
        let state = delivery_state(c, &delivery);
        assert_eq!((state.status.as_str(), state.attempts), ("cancelled", 1));
        assert!(attempt_outcome(c, &delivery, 2).is_none(), "no attempt 2");
        assert_eq!(
            asset_status(c, &asset),
            "expired",
            "the transition table: retransmitting + asset no longer valid → expired"
        );
        let history = "SELECT count(*) FROM asset_status_history WHERE asset_id = $1::uuid
                       AND from_status = 'retransmitting' AND to_status = 'expired' AND cause = 'asset_expired'";
        assert_eq!(count(c, history, &[&asset]), 1);
    })
    .await;

    // A later run finds nothing more to do.
    let again = env.run_job("retransmission", as_of + TimeDelta::days(1)).await;
    assert_eq!((again.rows_scanned, again.enqueued), (0, 0), "{again:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_never_answers_fails_the_order_and_a_late_answer_still_issues_it() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let erin = env.terminal("erin", "gw-1", Some("card-co")).await;
    env.start().await;
    // No partner simulator: the instructions wait in the partner's queue, unanswered.
    env.gateway(GatewayOptions::default());
    let dead_letters = subscribe_to_dead_letters(&env, assetflow::contracts::topology::Pool::Settlement).await;

    let order = purchase(&erin, "concert", 1, json!({}));
    let rid = request_id(&order);
    env.send(&order).await;
    let sql = "SELECT s.id::text AS value FROM settlements s JOIN orders o ON o.id = s.order_id
               WHERE o.request_id = $1 AND s.status = 'instructed' AND s.attempts = 1";
    let r = rid.clone();
    let settlement = env.wait_until("the settlement is instructed", move |c| text(c, sql, &[&r])).await;
    let now = Utc::now();
    let partner_queue = env.app.plumbing.names.partner_queue("card-co");
    assert_eq!(wait_for_queue(&env, &partner_queue, "the first instruction is published", |n| n >= 1).await, 1);

    let second = env.run_job("settlement_timeout", now + secs(31)).await;
    assert_eq!(second.enqueued, 1, "{second:?}");
    assert_eq!(settlement_attempts(&env, &settlement).await, 2);
    assert_eq!(
        wait_for_queue(&env, &partner_queue, "a second instruction is published", |n| n >= 2).await,
        2,
        "a second instruction was published"
    );
    // Running again at the same time is not a third instruction: the new one has its own timeout.
    let repeat = env.run_job("settlement_timeout", now + secs(31)).await;
    assert_eq!((repeat.rows_scanned, repeat.enqueued), (0, 0), "{repeat:?}");

    let third = env.run_job("settlement_timeout", now + secs(62)).await;
    assert_eq!(third.enqueued, 1, "{third:?}");
    assert_eq!(settlement_attempts(&env, &settlement).await, 3);
    assert_eq!(
        wait_for_queue(&env, &partner_queue, "a third instruction is published", |n| n >= 3).await,
        3,
        "a third instruction was published"
    );

    let abandon = env.run_job("settlement_timeout", now + secs(93)).await;
    assert_eq!(abandon.enqueued, 1, "{abandon:?}");
    assert_eq!(queued(&env, &partner_queue).await, 3, "no fourth instruction");
    let (id, rid2) = (settlement.clone(), rid.clone());
    let order_id = env
        .db(move |c| {
            let status = "SELECT status AS value FROM settlements WHERE id = $1::uuid";
            assert_eq!(text(c, status, &[&id]).as_deref(), Some("abandoned"));
            let order_id = text(c, "SELECT id::text AS value FROM orders WHERE request_id = $1", &[&rid2]).unwrap();
            let status = "SELECT status || ':' || status_reason AS value FROM orders WHERE id = $1::uuid";
            assert_eq!(text(c, status, &[&order_id]).as_deref(), Some("failed:settlement_timeout"));
            let letter = "SELECT count(*) FROM dead_letters
                          WHERE source = 'settlement' AND reason = 'settlement_timeout' AND subject_id = $1::uuid";
            assert_eq!(count(c, letter, &[&order_id]), 1);
            assert_eq!(count(c, "SELECT count(*) FROM assets", &[]), 0, "nothing is issued without settlement");
            order_id
        })
        .await;
    env.wait_until("the orderer is told the order failed", |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE terminal_id = 'erin' AND kind = 'message' AND content->>'code' = 'order_failed' AND status = 'delivered'", &[]) == 1)
            .then_some(())
    })
    .await;
    wait_for_queue(&env, &dead_letters, "the dead letter is published", |n| n >= 1).await;

    // The partner answers at last: the payer paid, so the order is issued after all.
    let late = SettlementResult {
        message_type: kinds::SETTLEMENT_RESULT.into(),
        settlement_id: settlement.parse().unwrap(),
        partner_id: "card-co".into(),
        outcome: SettlementOutcome::Settled,
        partner_reference: "LATE-1".into(),
        reason: None,
        sent_at: Utc::now(),
        signature: None,
    };
    env.publish(kinds::SETTLEMENT_RESULT, &env.signed_by(PartyKind::Partner, "card-co", &late).await).await;
    let oid = order_id.clone();
    env.wait_until("the late answer issues the order and its certificate is delivered", move |c| {
        (text(c, "SELECT status AS value FROM orders WHERE id = $1::uuid", &[&oid]).as_deref() == Some("issued")
            && count(
                c,
                "SELECT count(*) FROM deliveries WHERE order_id = $1::uuid AND kind = 'certificate' AND status = 'delivered'",
                &[&oid],
            ) == 1)
            .then_some(())
    })
    .await;
    let id = settlement.clone();
    env.db(move |c| {
        assert_eq!(
            text(c, "SELECT status || ':' || partner_reference AS value FROM settlements WHERE id = $1::uuid", &[&id])
                .as_deref(),
            Some("settled:LATE-1")
        );
        assert_eq!(count(c, "SELECT count(*) FROM assets WHERE order_id = $1::uuid", &[&order_id]), 1);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_partner_answers_and_gateway_receipts_have_no_second_effect() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let frank = env.terminal("frank", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(PartnerOptions { duplicate_rate: 1.0, ..settle_all() });
    env.gateway(GatewayOptions { duplicate_rate: 1.0, ..GatewayOptions::default() });

    for _ in 0..5 {
        env.send(&purchase(&frank, "concert", 1, json!({}))).await;
    }
    env.wait_until("every certificate is delivered", |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'delivered'", &[]) == 5)
            .then_some(())
    })
    .await;
    // Every copy was consumed and processed (the inbox records each message id, whatever its
    // effect), so anything a duplicate did is visible now.
    env.wait_until("both copies of every answer and receipt are processed", |c| {
        (count(c, "SELECT count(*) FROM inbox WHERE pool = 'settlement' AND message_type = 'settlement.result'", &[])
            == 10
            && count(
                c,
                "SELECT count(*) FROM inbox WHERE pool = 'delivery' AND message_type = 'delivery.receipt'",
                &[],
            ) == 10)
            .then_some(())
    })
    .await;
    env.db(|c| {
        assert_eq!(count(c, "SELECT count(*) FROM settlements", &[]), 5);
        assert_eq!(count(c, "SELECT count(*) FROM settlements WHERE status = 'settled'", &[]), 5);
        assert_eq!(count(c, "SELECT count(*) FROM orders WHERE status = 'issued'", &[]), 5);
        assert_eq!(count(c, "SELECT count(*) FROM assets", &[]), 5);
        assert_eq!(count(c, "SELECT count(*) FROM exchange_certificates", &[]), 5);
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE kind = 'certificate'", &[]), 5);
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND attempts = 1", &[]), 5);
        assert_eq!(count(c, "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id WHERE d.kind = 'certificate'", &[]), 5);
        assert_eq!(count(c, "SELECT count(*) FROM delivery_attempts WHERE outcome = 'acknowledged'", &[]), 5);
        assert_eq!(count(c, "SELECT count(*) FROM asset_status_history", &[]), 5, "only the issue of each asset");
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_carries_the_amqp_properties_and_a_valid_body() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let grace = env.terminal("grace", "gw-1", Some("card-co")).await;

    // A queue of our own, bound like gw-1's queue, sees what the gateway would receive.
    let gateways = env.app.plumbing.names.gateways();
    let channel = channel(&env).await;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .expect("a temporary queue");
    channel
        .queue_bind(
            queue.name().as_str().into(),
            gateways.as_str().into(),
            "gw-1".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bound to the gateways exchange");
    let mut consumer = channel
        .basic_consume(
            queue.name().as_str().into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
            FieldTable::default(),
        )
        .await
        .expect("consuming");

    env.start().await;
    env.partner(settle_all());
    // No gateway simulator: the delivery stays where we can read it.
    let order = purchase(&grace, "concert", 1, json!({}));
    let rid = request_id(&order);
    env.send(&order).await;

    let message = tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .expect("a delivery is published in time")
        .expect("the consumer is open")
        .expect("a message");
    assert_eq!(message.exchange.as_str(), gateways);
    assert_eq!(message.routing_key.as_str(), "gw-1");
    let props = &message.properties;
    let message_id = props.message_id().as_ref().map(|v| v.to_string()).expect("message_id is set");
    let correlation_id = props.correlation_id().as_ref().map(|v| v.to_string()).expect("correlation_id is set");
    assert_eq!(props.kind().as_ref().map(|v| v.to_string()).as_deref(), Some("delivery"));
    assert_eq!(props.content_type().as_ref().map(|v| v.to_string()).as_deref(), Some("application/json"));
    assert_eq!(*props.delivery_mode(), Some(2), "persistent");
    let sent = (*props.timestamp()).expect("timestamp is set") as i64;
    assert!((Utc::now().timestamp() - sent).abs() < 300, "a timestamp of now, in seconds: {sent}");

    let body: Value = serde_json::from_slice(&message.data).expect("a JSON body");
    assetflow::contracts::schema::validate("delivery", &body).expect("the body honours the delivery schema");
    assert_eq!(body["kind"], "certificate", "{body}");
    // The certificate answers the purchase: the gateway matches it to its request by the
    // correlation id and the body's request_id.
    assert_eq!(correlation_id, rid, "the correlation id is the purchase's request id");
    assert_eq!(body["request_id"], rid.as_str(), "{body}");
    // The ids name what the database recorded: the attempt's message id, and the order.
    let (mid, did) = (message_id.clone(), body["delivery_id"].as_str().expect("a delivery id").to_string());
    env.db(move |c| {
        let recorded = text(
            c,
            "SELECT message_id::text AS value FROM delivery_attempts WHERE delivery_id = $1::uuid AND attempt = 1",
            &[&did],
        );
        assert_eq!(recorded.as_deref(), Some(mid.as_str()));
        let order = text(c, "SELECT id::text AS value FROM orders WHERE request_id = $1", &[&rid]);
        assert_eq!(order.as_deref(), body["content"]["order_id"].as_str(), "the content names the order");
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_holds_messages_while_the_app_is_stopped_and_empties_once_it_runs() {
    let mut env = Env::new().await;
    env.product("ppv", |p| p.kind = "ppv_ticket".into()).await;
    env.product("concert", |_| {}).await;
    let heidi = env.terminal("heidi", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    // A designated order is issued, and everything it caused is published: the outbox empties.
    let at = Utc::now() + TimeDelta::hours(3);
    let designated = purchase(&heidi, "ppv", 1, json!({"delivery": {"mode": "designated", "at": at}}));
    let rid = request_id(&designated);
    env.send(&designated).await;
    let sql = "SELECT a.id::text AS value FROM assets a JOIN orders o ON o.id = a.order_id
               WHERE o.request_id = $1 AND a.status = 'awaiting_designated_delivery'";
    let asset = env.wait_until("the designated asset is issued", move |c| text(c, sql, &[&rid])).await;
    env.wait_until("the outbox is empty", |c| (count(c, "SELECT count(*) FROM outbox", &[]) == 0).then_some(())).await;

    env.stop().await;
    // With the app stopped, an order waits in its queue: nothing consumes it, nothing is lost.
    let later = purchase(&heidi, "concert", 1, json!({}));
    let later_rid = request_id(&later);
    env.send(&later).await;
    wait_for_queue(
        &env,
        &env.app.plumbing.names.pool_queue(assetflow::contracts::topology::Pool::Settlement.as_str()),
        "the order waits in its queue",
        |n| n >= 1,
    )
    .await;
    // And a state change made meanwhile (here, a scan run by another process) stays in the
    // outbox: no relay runs, so nothing claims or deletes it.
    let due = env.run_job("designated_delivery", at).await;
    assert_eq!(due.enqueued, 1, "{due:?}");
    let a = asset.clone();
    env.db(move |c| {
        assert_eq!(
            count(c, "SELECT count(*) FROM outbox WHERE message_type = 'delivery' AND attempts = 0", &[]),
            1,
            "the delivery waits, unclaimed"
        );
        assert_eq!(count(c, "SELECT count(*) FROM outbox", &[]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE asset_id = $1::uuid AND status = 'sent'", &[&a]), 1);
        assert_eq!(
            count(c, "SELECT count(*) FROM orders WHERE request_id = $1", &[&later_rid]),
            0,
            "the later order is not taken yet"
        );
    })
    .await;

    // Started again, the app publishes what waited and takes the order that waited.
    env.start().await;
    let (a, later_rid) = (asset.clone(), request_id(&later));
    env.wait_until("both complete and the outbox is empty", move |c| {
        (asset_status(c, &a) == "delivered"
            && count(
                c,
                "SELECT count(*) FROM deliveries d JOIN orders o ON o.id = d.order_id
                 WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'",
                &[&later_rid],
            ) == 1
            && count(c, "SELECT count(*) FROM outbox", &[]) == 0)
            .then_some(())
    })
    .await;
    env.db(|c| {
        assert_eq!(count(c, "SELECT count(*) FROM orders WHERE status = 'issued'", &[]), 2);
        assert_eq!(count(c, "SELECT count(*) FROM delivery_attempts", &[]), 2, "each delivery went out once");
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_does_not_confirm_stays_in_the_outbox() {
    let mut env = Env::new().await;
    env.start().await;

    // A message no queue takes: the broker returns it (mandatory) instead of confirming a delivery.
    let message =
        DeliveryRequested { message_type: kinds::DELIVERY_REQUESTED.into(), delivery_ids: vec![uuid::Uuid::now_v7()] };
    let outgoing = Outgoing::json(env.app.plumbing.names.internal(), "nowhere", kinds::DELIVERY_REQUESTED, &message);
    let message_id = outgoing.message_id;
    env.db(move |c| outbox::enqueue(c, &outgoing).expect("written to the outbox")).await;
    env.app.plumbing.outbox_wake.notify_one();

    // The relay tries it, again and again, and never deletes it.
    env.wait_until("the relay has tried the message twice", move |c| {
        let tried =
            "SELECT count(*) FROM outbox WHERE message_id = $1::uuid AND attempts >= 2 AND last_error IS NOT NULL";
        (count(c, tried, &[&message_id]) == 1).then_some(())
    })
    .await;
    env.db(move |c| {
        assert_eq!(count(c, "SELECT count(*) FROM outbox", &[]), 1);
        let error = text(c, "SELECT last_error AS value FROM outbox WHERE message_id = $1::uuid", &[&message_id])
            .unwrap_or_default();
        assert!(error.contains("not confirmed"), "{error}");
    })
    .await;
    env.stop().await;
    env.db(|c| assert_eq!(count(c, "SELECT count(*) FROM outbox", &[]), 1, "shutting down does not drop it either"))
        .await;
}
