//! Transitions of the status machine reached by real flows (`docs/product.md#the-transition-table`)
//! that no other test walks: an exchanged asset whose delivery fails, a forced stage-2
//! transmission that goes unacknowledged and is retransmitted, and the near-expiry reminders at a
//! product's own offsets (`docs/product.md#near-expiry-reminders`).
//!
//! In the first two tests the test itself is the gateway: it takes each delivery off gw-1's queue
//! and answers it (or not) as the flow needs, so every attempt's fate is chosen, not drawn.

use assetflow::cli::simulate::gateway::{GatewayOptions, acknowledge, exchange_request};
use assetflow::cli::simulate::terminals::purchase;
use assetflow::contracts::messages::{DeliveryReceipt, GatewayDelivery, kinds};
use assetflow::domain::catalogue::PartyKind;
use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use diesel::prelude::*;
use serde_json::{Value, json};

use crate::harness::{Env, count, text};
use crate::support::{Taken, asset_status, causes, delivery_state, history, request_id, settle_all, take, timestamp};

/// answer sends the gateway's receipt for a delivery, signed by gw-1 and carrying the terminal's
/// signed acknowledgement: with the SHA-256 of the bytes received, or, when `intact` is false, of
/// other bytes (a transmission corrupted on its way).
async fn answer(env: &Env, taken: &Taken, intact: bool) {
    let sha256 = if intact {
        assetflow::crypto::sha256_hex(&taken.bytes)
    } else {
        assetflow::crypto::sha256_hex(b"corrupted in transit")
    };
    let content = if intact { taken.message.content.clone() } else { json!("corrupted in transit") };
    let acknowledgement =
        acknowledge(&taken.message, taken.message_id, &content, &env.terminal_key(&taken.message.terminal_id));
    let receipt = DeliveryReceipt {
        message_type: kinds::DELIVERY_RECEIPT.into(),
        delivery_id: taken.message.delivery_id,
        attempt: taken.message.attempt,
        gateway_id: taken.message.gateway_id.clone(),
        terminal_id: taken.message.terminal_id.clone(),
        sha256,
        received_at: Utc::now(),
        acknowledgement: Some(acknowledgement),
        signature: None,
    };
    env.publish(kinds::DELIVERY_RECEIPT, &env.signed_by(PartyKind::Gateway, "gw-1", &receipt).await).await;
}

/// wait_for_delivery_status waits until a delivery has `status`.
async fn wait_for_delivery_status(env: &Env, delivery: &GatewayDelivery, status: &'static str) {
    let id = delivery.delivery_id.to_string();
    env.wait_until(&format!("delivery {id} is {status}"), move |c| {
        (delivery_state(c, &id).status == status).then_some(())
    })
    .await;
}

/// wait_for_asset_status waits until an asset has `status`.
async fn wait_for_asset_status(env: &Env, asset: &str, status: &'static str) {
    let id = asset.to_string();
    env.wait_until(&format!("asset {id} is {status}"), move |c| (asset_status(c, &id) == status).then_some(())).await;
}

/// attempt_outcomes is a delivery's attempts' outcomes, in order.
fn attempt_outcomes(conn: &mut PgConnection, delivery_id: &str) -> String {
    text(
        conn,
        "SELECT string_agg(outcome, ', ' ORDER BY attempt) AS value FROM delivery_attempts WHERE delivery_id = $1::uuid",
        &[&delivery_id],
    )
    .unwrap_or_default()
}

/// attempt_sent_at is when a delivery's attempt went out.
fn attempt_sent_at(conn: &mut PgConnection, delivery_id: &str, attempt: i32) -> DateTime<Utc> {
    timestamp(
        conn,
        "SELECT sent_at AS value FROM delivery_attempts WHERE delivery_id = $1::uuid AND attempt = $2::int4",
        &[&delivery_id, &attempt],
    )
    .expect("the attempt is recorded")
}

/// certificate_taken places a certificate order for `product`, takes its certificate off gw-1's
/// queue and acknowledges it; it returns the certificate as the holder received it.
async fn certificate_taken(
    env: &Env,
    terminal: &assetflow::cli::simulate::terminals::SimTerminal,
    product: &str,
) -> Value {
    let order = purchase(terminal, product, 1, json!({}));
    env.send(&order).await;
    let certificate = take(env, "gw-1", "certificate", 1).await;
    assert_eq!(certificate.message.request_id.as_deref(), Some(request_id(&order).as_str()));
    answer(env, &certificate, true).await;
    wait_for_delivery_status(env, &certificate.message, "delivered").await;
    certificate.message.content["certificate"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchanged_asset_whose_delivery_fails_is_retransmitted_and_then_force_delivered() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let jack = env.terminal("jack", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    // No gateway simulator: the test answers gw-1's deliveries itself.

    let certificate = certificate_taken(&env, &jack, "concert").await;
    let asset = certificate["asset_id"].as_str().expect("an asset id").to_string();
    assert_eq!(
        env.db({
            let a = asset.clone();
            move |c| asset_status(c, &a)
        })
        .await,
        "awaiting_exchange"
    );

    // The holder exchanges; the asset's delivery reaches the gateway corrupted.
    env.send(&exchange_request("jack", certificate.clone(), &jack.key)).await;
    let first = take(&env, "gw-1", "asset", 1).await;
    assert_eq!(first.message.content["asset"]["asset_id"].as_str(), Some(asset.as_str()));
    assert_eq!(first.message.content["forced"], false, "an exchange is not a forced transmission");
    answer(&env, &first, false).await;
    wait_for_asset_status(&env, &asset, "retransmitting").await;
    let (a, d, cid) = (
        asset.clone(),
        first.message.delivery_id.to_string(),
        certificate["certificate_id"].as_str().unwrap().to_string(),
    );
    let due = env
        .db(move |c| {
            assert_eq!(history(c, &a), "(new)→awaiting_exchange, awaiting_exchange→retransmitting");
            assert_eq!(causes(c, &a), "issued, delivery_failed");
            let detail = text(
                c,
                "SELECT detail AS value FROM asset_status_history WHERE asset_id = $1::uuid AND to_status = 'retransmitting'",
                &[&a],
            )
            .unwrap_or_default();
            assert!(detail.contains("hash"), "the history says why: {detail}");
            let state = delivery_state(c, &d);
            assert_eq!((state.status.as_str(), state.attempts), ("failed", 1));
            assert_eq!(attempt_outcomes(c, &d), "hash_mismatch");
            let exchanged = "SELECT count(*) FROM exchange_certificates WHERE id = $1::uuid AND exchanged_at IS NOT NULL";
            assert_eq!(count(c, exchanged, &[&cid]), 1, "the certificate stays exchanged");
            state.due_at
        })
        .await;

    // Retransmitted at its due time, and acknowledged this time: force_delivered.
    let retry = env.run_job("retransmission", due).await;
    assert_eq!(retry.enqueued, 1, "{retry:?}");
    let second = take(&env, "gw-1", "asset", 2).await;
    assert_eq!(second.message.delivery_id, first.message.delivery_id);
    answer(&env, &second, true).await;
    wait_for_asset_status(&env, &asset, "force_delivered").await;
    let (a, d) = (asset.clone(), first.message.delivery_id.to_string());
    env.db(move |c| {
        assert_eq!(
            history(c, &a),
            "(new)→awaiting_exchange, awaiting_exchange→retransmitting, retransmitting→force_delivered"
        );
        assert_eq!(causes(c, &a), "issued, delivery_failed, delivery_acknowledged");
        let state = delivery_state(c, &d);
        assert_eq!((state.status.as_str(), state.attempts), ("delivered", 2));
        assert_eq!(attempt_outcomes(c, &d), "hash_mismatch, acknowledged");
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE asset_id = $1::uuid AND kind = 'asset'", &[&a]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_forced_stage_2_transmission_is_force_retransmitted_and_then_force_delivered() {
    let mut env = Env::new().await;
    let product = env.product("forced", |p| p.stage2_policy = "forced_transmission".into()).await;
    let kim = env.terminal("kim", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    // No gateway simulator: the test answers gw-1's deliveries itself.

    let certificate = certificate_taken(&env, &kim, "forced").await;
    let asset = certificate["asset_id"].as_str().expect("an asset id").to_string();
    let cert = certificate["certificate_id"].as_str().expect("a certificate id").to_string();
    let c2 = cert.clone();
    let expires_at = env
        .db(move |c| {
            timestamp(c, "SELECT expires_at AS value FROM exchange_certificates WHERE id = $1::uuid", &[&c2])
                .expect("the certificate exists")
        })
        .await;
    let stage1_at = expires_at - TimeDelta::seconds(product.reminder_stage1_secs);
    let stage2_at = expires_at - TimeDelta::seconds(product.reminder_stage2_secs);

    // Stage 1: the reminder message, acknowledged.
    let stage1 = env.run_job("near_expiry", stage1_at + TimeDelta::minutes(1)).await;
    assert_eq!((stage1.rows_scanned, stage1.enqueued), (1, 1), "{stage1:?}");
    let reminder = take(&env, "gw-1", "message", 1).await;
    assert_eq!(reminder.message.content["code"], "certificate_expiring", "{:?}", reminder.message);
    answer(&env, &reminder, true).await;
    wait_for_delivery_status(&env, &reminder.message, "delivered").await;

    // Stage 2, by the product's policy: the asset itself, forced. Nobody answers it.
    let stage2 = env.run_job("near_expiry", stage2_at + TimeDelta::minutes(1)).await;
    assert_eq!((stage2.rows_scanned, stage2.enqueued), (1, 1), "{stage2:?}");
    let first = take(&env, "gw-1", "asset", 1).await;
    assert_eq!(first.message.content["forced"], true, "{:?}", first.message);
    assert_eq!(first.message.content["asset"]["asset_id"].as_str(), Some(asset.as_str()));
    let delivery = first.message.delivery_id.to_string();
    let d = delivery.clone();
    let sent_at = env.db(move |c| attempt_sent_at(c, &d, 1)).await;

    // Within the acknowledgement timeout nothing changes; past it the attempt has failed, and the
    // asset is being retransmitted as a forced transmission.
    let early = env.run_job("retransmission", sent_at + TimeDelta::seconds(30)).await;
    assert_eq!((early.rows_scanned, early.enqueued), (0, 0), "{early:?}");
    let a = asset.clone();
    assert_eq!(env.db(move |c| asset_status(c, &a)).await, "awaiting_exchange");
    let late = env.run_job("retransmission", sent_at + TimeDelta::seconds(61)).await;
    assert_eq!((late.rows_scanned, late.enqueued), (1, 0), "{late:?}");
    let (a, d) = (asset.clone(), delivery.clone());
    let due = env
        .db(move |c| {
            assert_eq!(asset_status(c, &a), "forced_retransmitting");
            assert_eq!(history(c, &a), "(new)→awaiting_exchange, awaiting_exchange→forced_retransmitting");
            assert_eq!(causes(c, &a), "issued, delivery_failed");
            let state = delivery_state(c, &d);
            assert_eq!((state.status.as_str(), state.attempts), ("failed", 1));
            assert_eq!(attempt_outcomes(c, &d), "timed_out");
            state.due_at
        })
        .await;

    // The retransmission is acknowledged: force_delivered.
    let retry = env.run_job("retransmission", due).await;
    assert_eq!(retry.enqueued, 1, "{retry:?}");
    let second = take(&env, "gw-1", "asset", 2).await;
    assert_eq!(second.message.delivery_id, first.message.delivery_id);
    assert_eq!(second.message.content["forced"], true, "a forced transmission is retried as one");
    answer(&env, &second, true).await;
    wait_for_asset_status(&env, &asset, "force_delivered").await;
    let (a, d, c2) = (asset.clone(), delivery.clone(), cert.clone());
    env.db(move |c| {
        assert_eq!(
            history(c, &a),
            "(new)→awaiting_exchange, awaiting_exchange→forced_retransmitting, forced_retransmitting→force_delivered"
        );
        assert_eq!(causes(c, &a), "issued, delivery_failed, delivery_acknowledged");
        let state = delivery_state(c, &d);
        assert_eq!((state.status.as_str(), state.attempts), ("delivered", 2));
        assert_eq!(attempt_outcomes(c, &d), "timed_out, acknowledged");
        let ledger =
            "SELECT '1:' || stage1 || ', 2:' || stage2 AS value FROM reminder_schedule WHERE certificate_id = $1::uuid";
        assert_eq!(text(c, ledger, &[&c2]).as_deref(), Some("1:message, 2:forced_transmission"));
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE asset_id = $1::uuid AND kind = 'asset'", &[&a]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0);
    })
    .await;
    env.stop().await;
}

/// reminders counts a terminal's reminders: stage-1 messages and stage-2 download requests.
fn reminders(conn: &mut PgConnection, terminal: &str) -> (i64, i64) {
    let stage1 = "SELECT count(*) FROM deliveries
                  WHERE terminal_id = $1 AND kind = 'message' AND content->>'code' = 'certificate_expiring'";
    let stage2 = "SELECT count(*) FROM deliveries WHERE terminal_id = $1 AND kind = 'download_request'";
    (count(conn, stage1, &[&terminal]), count(conn, stage2, &[&terminal]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_expiry_reminders_follow_each_products_own_offsets_and_not_the_defaults() {
    // Whole seconds: the offsets are whole seconds, and the runs are a minute either side.
    let expiry = Utc::now().trunc_subsecs(0) + TimeDelta::days(10);
    let (day, hour) = (86_400, 3_600);
    let mut env = Env::new().await;
    // Further ahead than the defaults (2 days, 1 day) for stage 1, closer for stage 2 …
    let early = env
        .product("early", |p| {
            p.certificate_expires_at = Some(expiry);
            p.certificate_validity_secs = None;
            p.reminder_stage1_secs = 4 * day;
            p.reminder_stage2_secs = 6 * hour;
        })
        .await;
    // … and both closer than the defaults.
    let late = env
        .product("late", |p| {
            p.certificate_expires_at = Some(expiry);
            p.certificate_validity_secs = None;
            p.reminder_stage1_secs = 36 * hour;
            p.reminder_stage2_secs = hour / 2;
        })
        .await;
    let lea = env.terminal("lea", "gw-1", Some("card-co")).await;
    let max = env.terminal("max", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    for (terminal, product) in [(&lea, "early"), (&max, "late")] {
        let order = purchase(terminal, product, 1, json!({}));
        env.send(&order).await;
        crate::support::delivered_certificate(&env, &request_id(&order)).await;
    }

    let at = |offset: i64, minutes: i64| expiry - TimeDelta::seconds(offset) + TimeDelta::minutes(minutes);
    let defaults = (2 * day, day);
    // (when, what the run sends: lea's stage 1 and 2, max's stage 1 and 2, cumulated).
    let steps: Vec<(&str, DateTime<Utc>, [i64; 4])> = vec![
        ("just before lea's stage 1", at(early.reminder_stage1_secs, -1), [0, 0, 0, 0]),
        ("just after lea's stage 1", at(early.reminder_stage1_secs, 1), [1, 0, 0, 0]),
        ("just after the default stage 1", at(defaults.0, 1), [1, 0, 0, 0]),
        ("just before max's stage 1", at(late.reminder_stage1_secs, -1), [1, 0, 0, 0]),
        ("just after max's stage 1", at(late.reminder_stage1_secs, 1), [1, 0, 1, 0]),
        ("just after the default stage 2", at(defaults.1, 1), [1, 0, 1, 0]),
        ("just before lea's stage 2", at(early.reminder_stage2_secs, -1), [1, 0, 1, 0]),
        ("just after lea's stage 2", at(early.reminder_stage2_secs, 1), [1, 1, 1, 0]),
        ("just before max's stage 2", at(late.reminder_stage2_secs, -1), [1, 1, 1, 0]),
        ("just after max's stage 2", at(late.reminder_stage2_secs, 1), [1, 1, 1, 1]),
    ];
    let mut sent = 0;
    for (when, as_of, expected) in steps {
        let report = env.run_job("near_expiry", as_of).await;
        let total: i64 = expected.iter().sum();
        assert_eq!(report.enqueued as i64, total - sent, "{when} ({as_of}): {report:?}");
        sent = total;
        env.wait_until(&format!("what the run {when} sent is delivered"), move |c| {
            let delivered = count(
                c,
                "SELECT count(*) FROM deliveries WHERE kind IN ('message', 'download_request') AND status = 'delivered'",
                &[],
            );
            let (l, m) = (reminders(c, "lea"), reminders(c, "max"));
            (delivered == total && [l.0, l.1, m.0, m.1] == expected).then_some(())
        })
        .await;
    }
    env.db(|c| {
        let ledger = "SELECT string_agg(t.id || ' 1:' || r.stage1 || ', 2:' || r.stage2, '; ' ORDER BY t.id) AS value
                      FROM reminder_schedule r JOIN exchange_certificates e ON e.id = r.certificate_id
                      JOIN terminals t ON t.id = e.holder_terminal_id";
        assert_eq!(
            text(c, ledger, &[]).as_deref(),
            Some("lea 1:message, 2:download_request; max 1:message, 2:download_request")
        );
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE kind = 'asset'", &[]), 0);
    })
    .await;
    env.stop().await;
}

/// An asset with no certificate (designated or immediate) that expires before it was delivered
/// goes through past-due processing to `expired` when the next attempt finds it past its term: it
/// is never sent (`docs/product.md#the-transition-table`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_designated_asset_that_expires_undelivered_goes_through_past_due_processing_to_expired() {
    let mut env = Env::new().await;
    env.product("ppv", |p| {
        p.kind = "ppv_ticket".into();
        p.asset_validity_secs = Some(3_600);
    })
    .await;
    let dora = env.terminal("dora", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());

    let at = Utc::now() + TimeDelta::minutes(30);
    let order = purchase(&dora, "ppv", 1, json!({"delivery": {"mode": "designated", "at": at}}));
    let rid = request_id(&order);
    env.send(&order).await;
    let sql = "SELECT a.id::text AS value FROM assets a JOIN orders o ON o.id = a.order_id
               WHERE o.request_id = $1 AND a.status = 'awaiting_designated_delivery'";
    let asset = env.wait_until("the designated asset is issued", move |c| text(c, sql, &[&rid])).await;
    let id = asset.clone();
    let expires_at = env
        .db(move |c| {
            timestamp(c, "SELECT expires_at AS value FROM assets WHERE id = $1::uuid", &[&id]).expect("an asset")
        })
        .await;

    // Nothing ran at the designated time; the first run comes after the asset's term.
    env.sent_what_is_due().await;
    let late = env.run_job("designated_delivery", expires_at + TimeDelta::minutes(1)).await;
    assert_eq!((late.rows_scanned, late.enqueued), (1, 0), "found, and not sent: {late:?}");
    env.db(move |c| {
        assert_eq!(
            history(c, &asset),
            "(new)→awaiting_designated_delivery, awaiting_designated_delivery→expired_certificate_processing, \
             expired_certificate_processing→expired"
        );
        let delivery = "SELECT id::text AS value FROM deliveries WHERE asset_id = $1::uuid AND kind = 'asset'";
        let delivery = text(c, delivery, &[&asset]).expect("the asset's delivery");
        let state = delivery_state(c, &delivery);
        assert_eq!((state.status.as_str(), state.attempts), ("cancelled", 0), "{state:?}");
    })
    .await;
    env.stop().await;
}
