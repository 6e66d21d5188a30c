//! Changes of product (`docs/product.md#changes`): a new purchase and a refund as one process with
//! a stored step, completed, undone, or resumed after a crash at any step.

use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use assetflow::contracts::messages::{SettlementOutcome, kinds};
use chrono::Utc;
use serde_json::{Value, json};

use crate::harness::{Env, count, text};
use crate::processes::{cluster, spawn_node};
use crate::support::{answer_settlement, asset_status, delivered_certificate, request_id, settle_all};

/// change_request builds a signed `asset.change` of `asset` for `product`.
fn change_request(holder: &SimTerminal, asset: &str, product: &str) -> Value {
    let mut request = json!({
        "type": kinds::ASSET_CHANGE,
        "request_id": format!("c-{}", uuid::Uuid::now_v7()),
        "terminal_id": holder.id,
        "sent_at": Utc::now(),
        "asset_id": asset,
        "product_id": product,
    });
    assetflow::crypto::sign_document(&holder.key, &mut request).unwrap();
    request
}

/// two_products registers the product held ("concert", 1,000) and the one changed for
/// ("concert-b", 1,500), and the holder.
async fn two_products(env: &Env) -> SimTerminal {
    env.product("concert", |_| {}).await;
    env.product("concert-b", |p| p.price_minor = 1_500).await;
    env.terminal("alice", "gw-1", Some("card-co")).await
}

/// instructed waits for the settlement of `kind` the partner has not answered yet, the newest.
async fn instructed(env: &Env, kind: &'static str) -> String {
    env.wait_until("a settlement is instructed", move |c| {
        let sql = "SELECT id::text AS value FROM settlements WHERE kind = $1 AND status = 'instructed'
                   ORDER BY instructed_at DESC LIMIT 1";
        text(c, sql, &[&kind])
    })
    .await
}

async fn step_is(env: &Env, step: &'static str) {
    env.wait_until(&format!("the change is {step}"), move |c| {
        (count(c, "SELECT count(*) FROM changes WHERE step = $1", &[&step]) == 1).then_some(())
    })
    .await;
}

/// bought buys one concert certificate for `holder`, settling it by hand, and returns its asset.
async fn bought(env: &Env, holder: &SimTerminal) -> String {
    let order = purchase(holder, "concert", 1, json!({}));
    env.send(&order).await;
    answer_settlement(env, &instructed(env, "purchase").await, SettlementOutcome::Settled).await;
    let certificate = delivered_certificate(env, &request_id(&order)).await;
    certificate["asset_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_pays_for_the_new_product_then_refunds_the_old_asset_then_issues_the_new_one() {
    let mut env = Env::new().await;
    let alice = two_products(&env).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let order = purchase(&alice, "concert", 1, json!({}));
    env.send(&order).await;
    let old = delivered_certificate(&env, &request_id(&order)).await["asset_id"].as_str().unwrap().to_string();

    env.send(&change_request(&alice, &old, "concert-b")).await;
    step_is(&env, "done").await;
    env.wait_until("the new certificate is delivered", |c| {
        let sql = "SELECT count(*) FROM deliveries d JOIN changes ch ON ch.new_order_id = d.order_id
                   WHERE d.kind = 'certificate' AND d.status = 'delivered'";
        (count(c, sql, &[]) == 1).then_some(())
    })
    .await;
    let o = old.clone();
    env.db(move |c| {
        assert_eq!(asset_status(c, &o), "refunded");
        let paid = "SELECT count(*) FROM settlements s JOIN changes ch ON ch.new_order_id = s.order_id
                    WHERE s.kind = 'purchase' AND s.status = 'settled' AND s.amount_minor = 1500";
        assert_eq!(count(c, paid, &[]), 1, "the new product paid once, at its price");
        let refunded = "SELECT count(*) FROM refunds WHERE asset_id = $1::uuid AND cause = 'change' AND status = 'refunded' AND amount_minor = 1000";
        assert_eq!(count(c, refunded, &[&o]), 1, "the old asset refunded once, in full");
        assert_eq!(count(c, "SELECT count(*) FROM orders WHERE status = 'issued'", &[]), 2);
        let told = "SELECT count(*) FROM deliveries WHERE content->>'code' = 'change_completed'";
        assert_eq!(count(c, told, &[]), 1);
        // assetflow status shows the change with the old asset, and the change with its new order.
        let shown = assetflow::cli::status::render(&assetflow::cli::status::lookup(c, &o).unwrap().expect("known"));
        assert!(shown.contains("  changes\n"), "{shown}");
        assert!(shown.contains(" done, since "), "{shown}");
        assert!(shown.contains("for concert-b: new order "), "{shown}");
        let new_order = text(c, "SELECT new_order_id::text AS value FROM changes", &[]).unwrap();
        let shown =
            assetflow::cli::status::render(&assetflow::cli::status::lookup(c, &new_order).unwrap().expect("known"));
        assert!(shown.contains("placed by   change ") && shown.contains(&format!("of asset {o} (done")), "{shown}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_refund_is_refused_is_undone_and_one_whose_undoing_is_refused_is_stuck() {
    let mut env = Env::new().await;
    let alice = two_products(&env).await;
    env.start().await;
    env.gateway(GatewayOptions::default());
    let first = bought(&env, &alice).await;
    let second = bought(&env, &alice).await;

    // The first: paid, the refund of the old asset refused, the new payment given back.
    env.send(&change_request(&alice, &first, "concert-b")).await;
    answer_settlement(&env, &instructed(&env, "purchase").await, SettlementOutcome::Settled).await;
    step_is(&env, "refunding").await;
    answer_settlement(&env, &instructed(&env, "refund").await, SettlementOutcome::Declined).await;
    step_is(&env, "compensating").await;
    answer_settlement(&env, &instructed(&env, "refund").await, SettlementOutcome::Settled).await;
    step_is(&env, "compensated").await;
    let f = first.clone();
    env.db(move |c| {
        assert_eq!(asset_status(c, &f), "awaiting_exchange", "the holder keeps the old asset");
        let back = "SELECT count(*) FROM refunds r JOIN changes ch ON ch.compensation_id = r.id
                    WHERE r.status = 'refunded' AND r.amount_minor = 1500 AND r.asset_id IS NULL";
        assert_eq!(count(c, back, &[]), 1, "the new payment came back in full");
        let failed = "SELECT count(*) FROM orders o JOIN changes ch ON ch.new_order_id = o.id
                      WHERE o.status = 'failed' AND o.status_reason = 'change_compensated'";
        assert_eq!(count(c, failed, &[]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM assets", &[]), 2, "nothing new was issued");
        let told = "SELECT count(*) FROM deliveries WHERE content->>'code' = 'change_failed'";
        assert_eq!(count(c, told, &[]), 1);
    })
    .await;

    // The second: the partner will not give the new payment back either: stuck, for an operator.
    env.send(&change_request(&alice, &second, "concert-b")).await;
    answer_settlement(&env, &instructed(&env, "purchase").await, SettlementOutcome::Settled).await;
    env.wait_until("the second change is refunding", |c| {
        (count(c, "SELECT count(*) FROM changes WHERE step = 'refunding'", &[]) == 1).then_some(())
    })
    .await;
    answer_settlement(&env, &instructed(&env, "refund").await, SettlementOutcome::Declined).await;
    env.wait_until("the second change is compensating", |c| {
        (count(c, "SELECT count(*) FROM changes WHERE step = 'compensating'", &[]) == 1).then_some(())
    })
    .await;
    answer_settlement(&env, &instructed(&env, "refund").await, SettlementOutcome::Declined).await;
    step_is(&env, "stuck").await;
    env.wait_until("the outbox is empty", |c| (count(c, "SELECT count(*) FROM outbox", &[]) == 0).then_some(())).await;
    let s = second.clone();
    env.db(move |c| {
        assert_eq!(asset_status(c, &s), "awaiting_exchange");
        // Handed to an operator with its evidence.
        let letter =
            "SELECT count(*) FROM dead_letters d JOIN changes ch ON d.message_id = 'change:' || ch.id || ':stuck'
                      WHERE d.reason = 'compensation_refused' AND ch.step = 'stuck'
                        AND convert_from(d.payload, 'UTF8')::jsonb->>'amount_minor' = '1500'";
        assert_eq!(count(c, letter, &[]), 1);
        let audit = assetflow::cli::audit::audit(c, None).unwrap();
        assert_eq!((audit.lost, audit.duplicated), (0, 0), "{}", audit.summary());
        assert_eq!((audit.changes, audit.changes_undone), (2, 1), "{}", audit.summary());
    })
    .await;
}

/// A real `assetflow run` process is killed with SIGKILL at each step of a change, and started
/// again: the change resumes where it stopped, and ends done with everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_resumes_after_a_crash_at_each_step_and_does_nothing_twice() {
    let env = Env::new().await;
    let alice = two_products(&env).await;
    let dir = cluster(&env);
    let mut node = spawn_node(&dir, "a");
    env.gateway(GatewayOptions::default());
    let crash = |node: &mut std::process::Child, name: &str| {
        node.kill().unwrap(); // SIGKILL
        node.wait().unwrap();
        spawn_node(&dir, name)
    };
    let old = bought(&env, &alice).await;

    // Crash 1: right after the change is asked for, before or while it is taken in.
    env.send(&change_request(&alice, &old, "concert-b")).await;
    node = crash(&mut node, "b");
    let purchase = instructed(&env, "purchase").await;
    step_is(&env, "purchasing").await;
    // Crash 2: with the new purchase instructed and its answer on its way.
    answer_settlement(&env, &purchase, SettlementOutcome::Settled).await;
    node = crash(&mut node, "c");
    step_is(&env, "refunding").await;
    let refund = instructed(&env, "refund").await;
    // Crash 3: with the old asset's refund instructed and its answer on its way.
    answer_settlement(&env, &refund, SettlementOutcome::Settled).await;
    node = crash(&mut node, "d");
    step_is(&env, "done").await;
    // Crash 4: while the new order is issued and its certificate delivered.
    node = crash(&mut node, "e");
    env.wait_until("the new certificate is delivered", |c| {
        let sql = "SELECT count(*) FROM deliveries d JOIN changes ch ON ch.new_order_id = d.order_id
                   WHERE d.kind = 'certificate' AND d.status = 'delivered'";
        (count(c, sql, &[]) == 1).then_some(())
    })
    .await;
    let o = old.clone();
    env.db(move |c| {
        assert_eq!(asset_status(c, &o), "refunded");
        assert_eq!(count(c, "SELECT count(*) FROM changes", &[]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM settlements WHERE kind = 'purchase'", &[]), 2, "one new purchase");
        assert_eq!(count(c, "SELECT count(*) FROM refunds", &[]), 1, "one refund");
        assert_eq!(count(c, "SELECT count(*) FROM assets", &[]), 2, "one new asset");
        let certificates = "SELECT count(*) FROM deliveries WHERE kind = 'certificate'";
        assert_eq!(count(c, certificates, &[]), 2, "each certificate sent as one delivery");
    })
    .await;
    node.kill().unwrap();
    node.wait().unwrap();
}
