//! Issuer changes (`docs/product.md#issuer-changes`): modification notices with a deadline,
//! answered accept (a new asset replaces the old one) or refund, and the issuer's default for
//! whoever does not answer.

use assetflow::cli::admin::announce_change;
use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use assetflow::contracts::messages::{ModificationChoice, kinds};
use assetflow::domain::issuance::modification::IssuerChange;
use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};

use crate::harness::{Env, count, text};
use crate::support::{asset_status, request_id, settle_all};

fn answer(holder: &SimTerminal, notice: &str, choice: &str) -> Value {
    let mut request = json!({
        "type": kinds::MODIFICATION_ANSWER,
        "request_id": format!("m-{}", uuid::Uuid::now_v7()),
        "terminal_id": holder.id,
        "sent_at": Utc::now(),
        "notice_id": notice,
        "answer": choice,
    });
    assetflow::crypto::sign_document(&holder.key, &mut request).unwrap();
    request
}

/// notice_of is the modification notice sent about `asset`, once it was delivered.
async fn notice_of(env: &Env, asset: &str) -> String {
    let asset = asset.to_string();
    env.wait_until("the modification notice is delivered", move |c| {
        let sql = "SELECT content->>'certificate_id' AS value FROM deliveries
                   WHERE content->>'code' = 'modification_notice' AND asset_id IS NULL
                     AND content->>'asset_id' = $1 AND status = 'delivered'";
        text(c, sql, &[&asset])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_accept_or_take_a_refund_and_the_silent_get_the_issuers_default() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let order = purchase(&alice, "concert", 3, json!({}));
    env.send(&order).await;
    let rid = request_id(&order);
    env.wait_until("the three certificates are delivered", move |c| {
        let sql = "SELECT count(*) FROM deliveries d JOIN orders o ON o.id = d.order_id
                   WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'";
        (count(c, sql, &[&rid]) == 3).then_some(())
    })
    .await;
    let assets: Vec<String> = env
        .db(|c| {
            let all = text(c, "SELECT string_agg(id::text, ',' ORDER BY id) AS value FROM assets", &[]).unwrap();
            all.split(',').map(str::to_string).collect()
        })
        .await;

    let reply_by = Utc::now() + TimeDelta::hours(1);
    let change = IssuerChange {
        product_id: "concert".into(),
        description: "The concert moves to December 27.".into(),
        title: None,
        tags: Some(json!({"place": "Test Hall", "date": "2026-12-27"})),
        asset_expires_at: None,
        reply_by,
        default_answer: ModificationChoice::Refund,
    };
    let deliveries = env.app.domain.deliveries.clone();
    let (_, notices) = env.db(move |c| announce_change(c, &deliveries, &change).unwrap()).await;
    assert_eq!(notices, 3, "every holder of an asset not yet delivered is told");

    // The first holder accepts: a new asset with the new date replaces the old one.
    let accepted = notice_of(&env, &assets[0]).await;
    env.send(&answer(&alice, &accepted, "accept")).await;
    // The second takes a refund.
    let refunded = notice_of(&env, &assets[1]).await;
    env.send(&answer(&alice, &refunded, "refund")).await;
    let (first, second) = (assets[0].clone(), assets[1].clone());
    env.wait_until("the answers are carried out", move |c| {
        (asset_status(c, &first) == "replaced" && asset_status(c, &second) == "refunded").then_some(())
    })
    .await;
    let first = assets[0].clone();
    env.wait_until("the replacement's certificate is delivered", move |c| {
        let sql = "SELECT count(*) FROM deliveries d JOIN assets a ON a.id = d.asset_id
                   WHERE a.replaces_asset_id = $1::uuid AND d.kind = 'certificate' AND d.status = 'delivered'";
        (count(c, sql, &[&first]) == 1).then_some(())
    })
    .await;
    let first = assets[0].clone();
    env.db(move |c| {
        let replacement = "SELECT count(*) FROM assets a JOIN asset_documents d ON d.asset_id = a.id
                           WHERE a.replaces_asset_id = $1::uuid AND a.status = 'awaiting_exchange' AND a.generation = 1
                             AND d.document::jsonb->'information'->'tags'->>'date' = '2026-12-27'";
        assert_eq!(count(c, replacement, &[&first]), 1, "one replacement, signed with the new date");
        let revoked = "SELECT count(*) FROM exchange_certificates WHERE asset_id = $1::uuid AND revoked_at IS NOT NULL";
        assert_eq!(count(c, revoked, &[&first]), 1, "the old certificate is revoked");
        let cause =
            "SELECT count(*) FROM asset_status_history WHERE asset_id = $1::uuid AND cause = 'issuer_change_accepted'";
        assert_eq!(count(c, cause, &[&first]), 1);
        // assetflow status names the replacement, and the notice with its answer.
        let shown = assetflow::cli::status::render(&assetflow::cli::status::lookup(c, &first).unwrap().expect("known"));
        assert!(shown.contains("  replaced by  asset "), "{shown}");
        assert!(shown.contains("The concert moves to December 27."), "{shown}");
        assert!(shown.contains("answered accept by the holder (request m-"), "{shown}");
        assert!(shown.contains("outcome  replaced by asset "), "{shown}");
    })
    .await;

    // The third says nothing: at the deadline, the issuer's default (a refund) applies.
    let silent = notice_of(&env, &assets[2]).await;
    env.run_job("issuer_changes", reply_by + TimeDelta::seconds(1)).await;
    let third = assets[2].clone();
    env.wait_until("the default refund is made", move |c| (asset_status(c, &third) == "refunded").then_some(())).await;
    env.db(|c| {
        let by_default =
            "SELECT count(*) FROM modification_notices WHERE answered_by = 'default' AND answer = 'refund'";
        assert_eq!(count(c, by_default, &[]), 1);
        let refunds = "SELECT count(*) FROM refunds WHERE cause = 'issuer_change' AND status = 'refunded'";
        assert_eq!(count(c, refunds, &[]), 2);
    })
    .await;
    // An answer after the deadline, or a second answer, is refused.
    let late = answer(&alice, &silent, "accept");
    env.send(&late).await;
    let again = answer(&alice, &accepted, "refund");
    env.send(&again).await;
    let ids = [request_id(&late), request_id(&again)];
    env.wait_until("both are refused", move |c| {
        let sql = "SELECT count(*) FROM refusals WHERE reason = 'modification_not_open' AND request_id IN ($1, $2)";
        (count(c, sql, &[&ids[0], &ids[1]]) == 2).then_some(())
    })
    .await;
}
