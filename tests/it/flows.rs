//! The purchase, settlement, issuance, delivery and exchange flows, end to end.

use assetflow::cli::simulate::gateway::{GatewayOptions, exchange_request};
use assetflow::cli::simulate::partner::PartnerOptions;
use assetflow::cli::simulate::terminals::purchase;
use chrono::Utc;
use serde_json::json;

use crate::harness::{Env, count, text};
use crate::support::{delivered_certificate, settle_all};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_purchase_is_settled_issued_delivered_and_exchanged_once() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let order = purchase(&alice, "concert", 2, json!({}));
    let request_id = order["request_id"].as_str().unwrap().to_string();
    env.send(&order).await;

    let certificate = delivered_certificate(&env, &request_id).await;
    let rid = request_id.clone();
    env.wait_until("both certificates are delivered", move |c| {
        let delivered = "SELECT count(*) FROM deliveries d JOIN orders o ON o.id = d.order_id
                         WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'";
        (count(c, delivered, &[&rid]) == 2).then_some(())
    })
    .await;
    env.db(move |c| {
        assert_eq!(count(c, "SELECT count(*) FROM settlements WHERE status = 'settled'", &[]), 1, "one settlement");
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM assets WHERE status = 'awaiting_exchange' AND has_exchange_certificate",
                &[]
            ),
            2
        );
        assert_eq!(count(c, "SELECT count(*) FROM exchange_certificates", &[]), 2);
        // Signed twice: the issuer's signature and the provider's are both stored.
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM asset_documents WHERE issuer_signature <> '' AND provider_signature <> ''",
                &[]
            ),
            2
        );
        assert_eq!(count(c, "SELECT count(*) FROM orders WHERE status = 'issued'", &[]), 1);
    })
    .await;
    // The certificate verifies with the service provider's key, as a terminal would check it.
    assetflow::crypto::verify_document(&env.app.keys.provider().unwrap().key, &certificate)
        .expect("a genuine certificate");
    assert_eq!(certificate["settlement"], "settled");
    assert_eq!(certificate["transmission"], "not_yet_transmitted");

    let asset_id = certificate["asset_id"].as_str().unwrap().to_string();
    let exchange = exchange_request("alice", certificate.clone(), &alice.key);
    let exchange_id = exchange["request_id"].as_str().unwrap().to_string();
    env.send(&exchange).await;
    let aid = asset_id.clone();
    env.wait_until("the asset is delivered", move |c| {
        (text(c, "SELECT status AS value FROM assets WHERE id = $1::uuid", &[&aid]).as_deref() == Some("delivered"))
            .then_some(())
    })
    .await;
    // Each delivery names the request it answers: the certificates the purchase, the asset the
    // exchange that handed it over.
    let (aid, rid) = (asset_id.clone(), request_id.clone());
    env.db(move |c| {
        let answering = "SELECT request_id AS value FROM deliveries WHERE asset_id = $1::uuid AND kind = $2";
        assert_eq!(text(c, answering, &[&aid, &"certificate"]).as_deref(), Some(rid.as_str()));
        assert_eq!(text(c, answering, &[&aid, &"asset"]).as_deref(), Some(exchange_id.as_str()));
    })
    .await;

    // A second exchange of the same certificate is refused, and nothing is delivered twice.
    env.send(&exchange_request("alice", certificate, &alice.key)).await;
    env.wait_until("the second exchange is refused", |c| {
        (count(c, "SELECT count(*) FROM refusals WHERE reason = 'certificate_already_exchanged'", &[]) == 1)
            .then_some(())
    })
    .await;
    let aid = asset_id.clone();
    env.wait_until("the refusal reaches the terminal", move |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE kind = 'refusal' AND status = 'delivered' AND content->>'reason' = 'certificate_already_exchanged'", &[]) == 1
            && count(c, "SELECT count(*) FROM deliveries WHERE asset_id = $1::uuid AND kind = 'asset'", &[&aid]) == 1)
            .then_some(())
    })
    .await;

    // `assetflow status` shows the whole history with causes.
    let aid = asset_id.clone();
    let view = env.db(move |c| assetflow::cli::status::lookup(c, &aid).unwrap().expect("the asset is found")).await;
    let rendered = assetflow::cli::status::render(&view);
    assert!(rendered.contains("(new) → awaiting_exchange"), "{rendered}");
    assert!(rendered.contains("awaiting_exchange → delivered"), "{rendered}");
    assert!(rendered.contains("delivery_acknowledged"), "{rendered}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gift_is_billed_to_the_payer_and_delivered_to_the_recipients() {
    let mut env = Env::new().await;
    env.product("card", |p| {
        p.kind = "prepaid_card".into();
        p.value_minor = Some(5_000);
        p.price_minor = 5_000;
        p.uses = None;
    })
    .await;
    let orderer = env.terminal("stb", "gw-2", None).await; // A set-top box that cannot pay itself.
    env.terminal("owner-phone", "gw-1", Some("bank-a")).await;
    env.terminal("friend-1", "gw-1", None).await;
    env.terminal("friend-2", "gw-2", None).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let order = purchase(
        &orderer,
        "card",
        1,
        json!({"payer_terminal_id": "owner-phone", "recipient_terminal_ids": ["friend-1", "friend-2"]}),
    );
    env.send(&order).await;
    env.wait_until("both recipients hold their certificates", |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'delivered'", &[]) == 2)
            .then_some(())
    })
    .await;
    env.db(|c| {
        assert_eq!(count(c, "SELECT count(*) FROM settlements WHERE partner_id = 'bank-a' AND payer_terminal_id = 'owner-phone' AND amount_minor = 10000", &[]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM assets WHERE holder_terminal_id IN ('friend-1', 'friend-2') AND value_minor = 5000", &[]), 2);
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE terminal_id = 'friend-2' AND gateway_id = 'gw-2'", &[]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM assets WHERE holder_terminal_id = 'stb'", &[]), 0);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_and_designated_orders_deliver_the_asset_at_their_time() {
    let mut env = Env::new().await;
    env.product("ppv", |p| p.kind = "ppv_ticket".into()).await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let immediate = purchase(&bob, "ppv", 1, json!({"delivery": {"mode": "immediate"}}));
    env.send(&immediate).await;
    let rid = immediate["request_id"].as_str().unwrap().to_string();
    env.wait_until("the immediate asset is delivered", move |c| {
        text(
            c,
            "SELECT a.status AS value FROM assets a JOIN orders o ON o.id = a.order_id WHERE o.request_id = $1",
            &[&rid],
        )
        .filter(|s| s == "delivered")
    })
    .await;

    let at = Utc::now() + chrono::Duration::hours(3);
    let designated = purchase(&bob, "ppv", 1, json!({"delivery": {"mode": "designated", "at": at}}));
    env.send(&designated).await;
    let rid = designated["request_id"].as_str().unwrap().to_string();
    let sql = "SELECT a.id::text AS value FROM assets a JOIN orders o ON o.id = a.order_id
               WHERE o.request_id = $1 AND a.status = 'awaiting_designated_delivery'";
    let asset = env.wait_until("the designated asset is issued", move |c| text(c, sql, &[&rid])).await;

    // Before its time nothing is sent; at its time the scan sends it.
    env.sent_what_is_due().await;
    let early = env.run_job("designated_delivery", at - chrono::Duration::minutes(1)).await;
    assert_eq!(early.enqueued, 0);
    let due = env.run_job("designated_delivery", at).await;
    assert_eq!(due.enqueued, 1);
    let again = env.run_job("designated_delivery", at).await;
    assert_eq!(again.enqueued, 0, "a second run sends nothing twice");
    env.wait_until("the designated asset is delivered", move |c| {
        text(c, "SELECT status AS value FROM assets WHERE id = $1::uuid", &[&asset]).filter(|s| s == "delivered")
    })
    .await;
    env.db(|c| {
        assert_eq!(count(c, "SELECT count(*) FROM asset_status_history WHERE from_status = 'awaiting_designated_delivery' AND to_status = 'delivered'", &[]), 2);
        assert_eq!(count(c, "SELECT count(*) FROM exchange_certificates", &[]), 0, "no certificate for direct deliveries");
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_settlement_ends_the_order_and_tells_the_orderer() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let carol = env.terminal("carol", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(PartnerOptions { decline_rate: 1.0, ..settle_all() });
    env.gateway(GatewayOptions::default());

    let order = purchase(&carol, "concert", 1, json!({}));
    env.send(&order).await;
    env.wait_until("the orderer is told", |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE terminal_id = 'carol' AND kind = 'message' AND content->>'code' = 'order_declined' AND status = 'delivered'", &[]) == 1).then_some(())
    })
    .await;
    env.db(|c| {
        assert_eq!(count(c, "SELECT count(*) FROM orders WHERE status = 'declined'", &[]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM assets", &[]), 0, "nothing is issued without settlement");
    })
    .await;
    env.stop().await;
}
