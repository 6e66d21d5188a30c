//! Refunds (`docs/product.md#refunds`) and deferrals (`docs/product.md#deferrals`): the holder's
//! answers to a download request, through the partner that was paid.

use assetflow::cli::simulate::gateway::{GatewayOptions, defer_request, exchange_request, refund_request};
use assetflow::cli::simulate::partner::PartnerOptions;
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};

use crate::harness::{Env, count, execute, text};
use crate::support::{asset_status, delivered_certificate, request_id, settle_all, timestamp};

/// bought places a certificate order of `quantity` for `holder`, waits until its certificates
/// are delivered, and returns the first certificate and its asset's id.
async fn bought(env: &Env, holder: &SimTerminal, quantity: u32) -> (Value, String) {
    let order = purchase(holder, "concert", quantity, json!({}));
    env.send(&order).await;
    let certificate = delivered_certificate(env, &request_id(&order)).await;
    let asset = certificate["asset_id"].as_str().expect("a certificate names its asset").to_string();
    (certificate, asset)
}

/// refusal waits for the refusal of a request and returns its reason.
async fn refusal(env: &Env, request: &Value) -> String {
    let id = request_id(request);
    env.wait_until("the request is refused", move |c| {
        text(c, "SELECT reason AS value FROM refusals WHERE request_id = $1", &[&id])
    })
    .await
}

/// refund_ended waits until the refund asked for by `request` is answered, and returns its status.
async fn refund_ended(env: &Env, request: &Value) -> String {
    let id = request_id(request);
    env.wait_until("the refund is answered", move |c| {
        text(c, "SELECT status AS value FROM refunds WHERE request_id = $1 AND status <> 'requested'", &[&id])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_the_partner_confirms_refunds_the_asset_and_revokes_its_certificate() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let (certificate, asset) = bought(&env, &alice, 2).await;

    let refund = refund_request("alice", asset.parse().unwrap(), &alice.key);
    env.send(&refund).await;
    assert_eq!(refund_ended(&env, &refund).await, "refunded");

    let a = asset.clone();
    env.db(move |c| {
        assert_eq!(asset_status(c, &a), "refunded");
        let cause =
            "SELECT cause AS value FROM asset_status_history WHERE asset_id = $1::uuid AND to_status = 'refunded'";
        assert_eq!(text(c, cause, &[&a]).as_deref(), Some("refund_settled"));
        // One asset of two: half of what was paid, through the partner that was paid.
        let refund_settlement = "SELECT count(*) FROM settlements s JOIN refunds r ON r.settlement_id = s.id
                                 WHERE s.kind = 'refund' AND s.status = 'settled' AND s.partner_id = 'card-co'
                                   AND s.amount_minor = 1000 AND r.amount_minor = 1000 AND r.asset_id = $1::uuid";
        assert_eq!(count(c, refund_settlement, &[&a]), 1);
        let revoked = "SELECT count(*) FROM exchange_certificates WHERE asset_id = $1::uuid AND revoked_at IS NOT NULL";
        assert_eq!(count(c, revoked, &[&a]), 1, "the certificate is revoked once the partner confirms");
        let asked = "SELECT count(*) FROM deliveries WHERE asset_id = $1::uuid AND kind = 'revocation_request'";
        assert_eq!(count(c, asked, &[&a]), 1, "the holder is asked to delete the certificate");
        let told = "SELECT count(*) FROM deliveries WHERE kind = 'message' AND content->>'code' = 'refund_completed'
                    AND content->>'asset_id' = $1";
        assert_eq!(count(c, told, &[&a]), 1, "the holder is told");
        let other = "SELECT count(*) FROM assets WHERE id <> $1::uuid AND status = 'awaiting_exchange'";
        assert_eq!(count(c, other, &[&a]), 1, "the order's other asset is untouched");
    })
    .await;

    // `assetflow status` shows the refund with the asset, with its order, and by its settlement
    // (what a refund's dead letter names).
    let a = asset.clone();
    let (by_asset, by_order, by_settlement) = env
        .db(move |c| {
            let show = |c: &mut diesel::PgConnection, id: &str| {
                assetflow::cli::status::render(&assetflow::cli::status::lookup(c, id).unwrap().expect("known"))
            };
            let order = text(c, "SELECT order_id::text AS value FROM assets WHERE id = $1::uuid", &[&a]).unwrap();
            let settlement = text(c, "SELECT settlement_id::text AS value FROM refunds", &[]).unwrap();
            (show(c, &a), show(c, &order), show(c, &settlement))
        })
        .await;
    let shown = "refunded 1000 JPY (minor units, cause holder) via card-co, ref ";
    assert!(by_asset.contains("  refunds\n") && by_asset.contains(shown), "{by_asset}");
    assert!(by_asset.contains("awaiting_exchange → refunded"), "{by_asset}");
    assert!(by_order.contains(&format!("  refund      {shown}")) && by_order.contains(&format!("of asset {asset}")));
    assert!(by_settlement.starts_with(&format!("asset {asset}")), "{by_settlement}");

    // The refunded asset is neither refunded again nor exchanged.
    let again = refund_request("alice", asset.parse().unwrap(), &alice.key);
    env.send(&again).await;
    assert_eq!(refusal(&env, &again).await, "refund_not_allowed");
    let exchange = exchange_request("alice", certificate, &alice.key);
    env.send(&exchange).await;
    assert_eq!(refusal(&env, &exchange).await, "certificate_revoked");
    // The same request again is a duplicate: one refund, whatever the redeliveries.
    env.send(&refund).await;
    let id = request_id(&refund);
    env.wait_until("the repeated request is answered as a duplicate", move |c| {
        let duplicate =
            "SELECT count(*) FROM deliveries WHERE request_id = $1 AND content->>'code' = 'duplicate_request'";
        (count(c, duplicate, &[&id]) == 1).then_some(())
    })
    .await;
    env.db(|c| assert_eq!(count(c, "SELECT count(*) FROM refunds", &[]), 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_the_partner_refuses_leaves_the_asset_as_it_was_and_tells_the_holder() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(PartnerOptions { refund_refusal_rate: 1.0, ..settle_all() });
    env.gateway(GatewayOptions::default());
    let (certificate, asset) = bought(&env, &alice, 1).await;

    let refund = refund_request("alice", asset.parse().unwrap(), &alice.key);
    env.send(&refund).await;
    assert_eq!(refund_ended(&env, &refund).await, "failed");
    let a = asset.clone();
    env.db(move |c| {
        assert_eq!(asset_status(c, &a), "awaiting_exchange", "the asset is as it was");
        let open = "SELECT count(*) FROM exchange_certificates WHERE asset_id = $1::uuid AND revoked_at IS NULL";
        assert_eq!(count(c, open, &[&a]), 1, "the certificate still stands");
        let told = "SELECT content->>'text' AS value FROM deliveries WHERE kind = 'message'
                    AND content->>'code' = 'refund_refused' AND content->>'asset_id' = $1";
        let text = text(c, told, &[&a]).expect("the holder is told");
        assert!(text.contains("card account closed"), "the partner's reason is passed on: {text}");
        let reason = "SELECT reason AS value FROM refunds WHERE asset_id = $1::uuid";
        assert!(crate::harness::text(c, reason, &[&a]).is_some_and(|r| r.contains("card account closed")));
    })
    .await;
    // The holder may still exchange the certificate, and gets the asset.
    env.send(&exchange_request("alice", certificate, &alice.key)).await;
    let a = asset.clone();
    env.wait_until("the asset is delivered", move |c| (asset_status(c, &a) == "delivered").then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_are_refused_for_an_expired_asset_another_holders_asset_and_an_unknown_one() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let (_, asset) = bought(&env, &alice, 1).await;

    let by_bob = refund_request("bob", asset.parse().unwrap(), &bob.key);
    env.send(&by_bob).await;
    assert_eq!(refusal(&env, &by_bob).await, "asset_not_held");
    let unknown = refund_request("alice", uuid::Uuid::now_v7(), &alice.key);
    env.send(&unknown).await;
    assert_eq!(refusal(&env, &unknown).await, "asset_unknown");

    // The asset's term ends: no refund is due for an expired asset.
    let a = asset.clone();
    env.db(move |c| {
        execute(c, "UPDATE assets SET expires_at = now() - interval '1 second' WHERE id = $1::uuid", &[&a]);
    })
    .await;
    let expired = refund_request("alice", asset.parse().unwrap(), &alice.key);
    env.send(&expired).await;
    assert_eq!(refusal(&env, &expired).await, "refund_not_allowed");
    env.db(|c| assert_eq!(count(c, "SELECT count(*) FROM refunds", &[]), 0, "nothing was refunded")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_refunds_beyond_what_was_paid() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let (_, asset) = bought(&env, &alice, 2).await;
    let refund = refund_request("alice", asset.parse().unwrap(), &alice.key);
    env.send(&refund).await;
    assert_eq!(refund_ended(&env, &refund).await, "refunded");

    // 1,000 of 2,000 refunded: another 1,001 would be more than was paid, whatever asks for it.
    env.db(|c| {
        let order = text(c, "SELECT order_id::text AS value FROM refunds", &[]).unwrap();
        let insert = |c: &mut diesel::PgConnection, amount: i64| {
            use diesel::connection::Connection;
            c.transaction(|c| {
                let settlement = uuid::Uuid::now_v7().to_string();
                crate::harness::query(
                    "INSERT INTO settlements (id, order_id, kind, partner_id, payer_terminal_id, amount_minor, currency, status)
                     VALUES ($1::uuid, $2::uuid, 'refund', 'card-co', 'alice', $3::int8, 'JPY', 'instructed')",
                    &[&settlement, &order, &amount],
                )
                .execute(c)?;
                crate::harness::query(
                    "INSERT INTO refunds (id, settlement_id, order_id, cause, amount_minor, currency, status, requested_at)
                     VALUES (gen_random_uuid(), $1::uuid, $2::uuid, 'holder', $3::int8, 'JPY', 'requested', now())",
                    &[&settlement, &order, &amount],
                )
                .execute(c)
            })
        };
        use diesel::RunQueryDsl;
        let error = insert(c, 1_001).expect_err("a refund beyond the payment is refused");
        assert!(error.to_string().contains("would exceed"), "{error}");
        insert(c, 1_000).expect("the rest of the payment may be refunded");
        assert!(insert(c, 1).is_err(), "and then nothing more");

        // Nor by the back door: a refund that grows, or one that failed and is made to count again.
        let grow = crate::harness::query(
            "UPDATE refunds SET amount_minor = amount_minor + 1 WHERE order_id = $1::uuid AND status = 'refunded'",
            &[&order],
        )
        .execute(c);
        assert!(grow.expect_err("a refund may not grow past the payment").to_string().contains("would exceed"));
        let failed = uuid::Uuid::now_v7().to_string();
        crate::harness::query(
            "WITH s AS (INSERT INTO settlements (id, order_id, kind, partner_id, payer_terminal_id, amount_minor, currency, status)
                        VALUES ($1::uuid, $2::uuid, 'refund', 'card-co', 'alice', 5, 'JPY', 'declined'))
             INSERT INTO refunds (id, settlement_id, order_id, cause, amount_minor, currency, status, requested_at, answered_at)
             VALUES (gen_random_uuid(), $1::uuid, $2::uuid, 'holder', 5, 'JPY', 'failed', now(), now())",
            &[&failed, &order],
        )
        .execute(c)
        .expect("a failed refund counts for nothing");
        let revived = crate::harness::query(
            "UPDATE refunds SET status = 'requested', answered_at = NULL WHERE settlement_id = $1::uuid",
            &[&failed],
        )
        .execute(c);
        assert!(revived.expect_err("a failed refund may not count again past the payment").to_string().contains("would exceed"));
        let answered = crate::harness::query(
            "UPDATE refunds SET status = status, reason = NULL WHERE order_id = $1::uuid AND status <> 'failed'",
            &[&order],
        )
        .execute(c);
        assert_eq!(answered.expect("what leaves the sum as it was is not refused"), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_certificate_becomes_one_designated_delivery_and_a_second_defer_replaces_the_first() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let (certificate, asset) = bought(&env, &alice, 1).await;

    let first = Utc::now() + TimeDelta::hours(1);
    let defer = defer_request("alice", asset.parse().unwrap(), first, &alice.key);
    env.send(&defer).await;
    let a = asset.clone();
    env.wait_until("the asset awaits its designated delivery", move |c| {
        (asset_status(c, &a) == "awaiting_designated_delivery").then_some(())
    })
    .await;
    let second = Utc::now() + TimeDelta::hours(2);
    let again = defer_request("alice", asset.parse().unwrap(), second, &alice.key);
    env.send(&again).await;
    let id = request_id(&again);
    env.wait_until("the second deferral is accepted", move |c| {
        let accepted = "SELECT count(*) FROM terminal_requests WHERE request_id = $1 AND outcome = 'accepted'";
        (count(c, accepted, &[&id]) == 1).then_some(())
    })
    .await;

    let a = asset.clone();
    env.db(move |c| {
        let pending =
            "SELECT count(*) FROM deliveries WHERE asset_id = $1::uuid AND kind = 'asset' AND status = 'pending'";
        assert_eq!(count(c, pending, &[&a]), 1, "one designated delivery, never two");
        let due =
            timestamp(c, "SELECT due_at AS value FROM deliveries WHERE asset_id = $1::uuid AND kind = 'asset'", &[&a]);
        assert_eq!(
            due.map(|t| t.timestamp_millis()),
            Some(second.timestamp_millis()),
            "the second time replaced the first"
        );
        let designated = timestamp(c, "SELECT designated_at AS value FROM assets WHERE id = $1::uuid", &[&a]);
        assert_eq!(designated.map(|t| t.timestamp_millis()), Some(second.timestamp_millis()));
        let deferred = "SELECT count(*) FROM asset_status_history WHERE asset_id = $1::uuid AND cause = 'deferred'";
        assert_eq!(count(c, deferred, &[&a]), 1);
        let told = "SELECT count(*) FROM deliveries WHERE kind = 'message' AND content->>'code' = 'delivery_deferred'";
        assert_eq!(count(c, told, &[]), 2, "each deferral is confirmed to the holder");
    })
    .await;
    // The certificate was given up for the designated delivery: it cannot be exchanged too.
    let exchange = exchange_request("alice", certificate, &alice.key);
    env.send(&exchange).await;
    assert_eq!(refusal(&env, &exchange).await, "certificate_already_exchanged");
    // Not at the first time, but at the second, the asset is delivered.
    env.sent_what_is_due().await;
    let early = env.run_job("designated_delivery", first + TimeDelta::seconds(1)).await;
    assert_eq!(early.enqueued, 0, "{early:?}");
    let due = env.run_job("designated_delivery", second + TimeDelta::seconds(1)).await;
    assert_eq!(due.enqueued, 1, "{due:?}");
    let a = asset.clone();
    env.wait_until("the asset is delivered", move |c| (asset_status(c, &a) == "delivered").then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_defer_past_the_assets_expiry_is_refused_and_changes_nothing() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let (_, asset) = bought(&env, &alice, 1).await;
    let a = asset.clone();
    let expires_at = env
        .db(move |c| timestamp(c, "SELECT expires_at AS value FROM assets WHERE id = $1::uuid", &[&a]).unwrap())
        .await;

    let late = defer_request("alice", asset.parse().unwrap(), expires_at + TimeDelta::minutes(1), &alice.key);
    env.send(&late).await;
    assert_eq!(refusal(&env, &late).await, "invalid_delivery_time");
    let a = asset.clone();
    env.db(move |c| {
        assert_eq!(asset_status(c, &a), "awaiting_exchange");
        let closed =
            "SELECT count(*) FROM exchange_certificates WHERE asset_id = $1::uuid AND exchanged_at IS NOT NULL";
        assert_eq!(count(c, closed, &[&a]), 0, "the certificate still stands");
        let scheduled = "SELECT count(*) FROM deliveries WHERE asset_id = $1::uuid AND kind = 'asset'";
        assert_eq!(count(c, scheduled, &[&a]), 0, "no delivery was scheduled");
    })
    .await;
}
