//! Payer confirmation and the completion notice (`docs/product.md#payer-confirmation`,
//! `docs/product.md#completion-notice`): an order billed to another terminal waits for that
//! payer's signed `order.confirm` before anything is charged; and the orderer of a gift is told
//! once every recipient has acknowledged what it was sent.
//!
//! In the confirmation tests the payers never answer through the gateway simulator
//! (`confirm_ignore_rate` 1): the test signs each `order.confirm` itself, so every answer is
//! chosen, not drawn.

use assetflow::cli::simulate::gateway::{GatewayOptions, acknowledge, confirm_request};
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use assetflow::contracts::messages::{ConfirmAnswer, DeliveryReceipt, kinds};
use assetflow::domain::catalogue::PartyKind;
use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};

use crate::harness::{Env, count, text};
use crate::support::{Taken, request_id, settle_all, take, timestamp};

/// A gateway that acknowledges every delivery, but whose payers never answer a request to confirm.
fn silent_payers() -> GatewayOptions {
    GatewayOptions { confirm_ignore_rate: 1.0, ..GatewayOptions::default() }
}

/// Parties is a set-top box that orders and the phone that pays for it.
struct Parties {
    stb: SimTerminal,
    phone: SimTerminal,
}

/// parties registers the orderer (a set-top box that cannot pay) and its payer (a phone).
async fn parties(env: &Env) -> Parties {
    let stb = env.terminal("stb", "gw-2", None).await;
    let phone = env.terminal("owner-phone", "gw-1", Some("bank-a")).await;
    Parties { stb, phone }
}

/// awaiting_confirmation places an order by the set-top box billed to the phone, and waits until
/// the phone holds the request to confirm it; it returns the order's request id and id.
async fn awaiting_confirmation(env: &Env, p: &Parties, product: &str) -> (String, String) {
    let order = purchase(&p.stb, product, 1, json!({"payer_terminal_id": p.phone.id}));
    let rid = request_id(&order);
    env.send(&order).await;
    let r = rid.clone();
    let order_id = env
        .wait_until("the payer holds the request to confirm the order", move |c| {
            text(
                c,
                "SELECT o.id::text AS value FROM orders o JOIN deliveries d ON d.order_id = o.id
                 WHERE o.request_id = $1 AND o.status = 'confirming' AND d.kind = 'confirmation_request'
                   AND d.terminal_id = 'owner-phone' AND d.status = 'delivered'",
                &[&r],
            )
        })
        .await;
    (rid, order_id)
}

/// answer publishes a signed `order.confirm` from `terminal` and returns it.
async fn answer(env: &Env, terminal: &SimTerminal, order_id: &str, answer: ConfirmAnswer) -> Value {
    let request = confirm_request(&terminal.id, order_id.parse().expect("an order id"), answer, &terminal.key);
    env.send(&request).await;
    request
}

/// settlements is the number of settlements of an order.
fn settlements(c: &mut diesel::PgConnection, order_id: &str) -> i64 {
    count(c, "SELECT count(*) FROM settlements WHERE order_id = $1::uuid", &[&order_id])
}

/// order_status is an order's status and its reason.
fn order_status(c: &mut diesel::PgConnection, order_id: &str) -> String {
    text(
        c,
        "SELECT status || ' ' || coalesce(status_reason, '-') AS value FROM orders WHERE id = $1::uuid",
        &[&order_id],
    )
    .expect("the order exists")
}

/// wait_for_refusal waits until the request `request_id` is refused, and returns the reason its
/// terminal was sent.
async fn wait_for_refusal(env: &Env, request: &Value) -> String {
    let rid = request_id(request);
    env.wait_until("the confirmation is refused and the terminal told", move |c| {
        text(
            c,
            "SELECT d.content->>'reason' AS value FROM refusals r
             JOIN deliveries d ON d.kind = 'refusal' AND d.request_id = r.request_id
             WHERE r.request_id = $1 AND d.status = 'delivered'",
            &[&rid],
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payer_that_confirms_is_charged_once_and_the_order_is_issued() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let p = parties(&env).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(silent_payers());

    let (_, order_id) = awaiting_confirmation(&env, &p, "concert").await;
    let id = order_id.clone();
    env.db(move |c| {
        assert_eq!(settlements(c, &id), 0, "nothing is charged before the payer confirms");
        let content = "SELECT (content->>'amount_minor') || ' ' || (content->>'currency') || ' ' || (content->>'orderer_terminal_id')
                       AS value FROM deliveries WHERE order_id = $1::uuid AND kind = 'confirmation_request'";
        assert_eq!(text(c, content, &[&id]).as_deref(), Some("1000 JPY stb"));
    })
    .await;

    let confirm = answer(&env, &p.phone, &order_id, ConfirmAnswer::Confirm).await;
    let id = order_id.clone();
    env.wait_until("the order is issued and the recipient holds its certificate", move |c| {
        let delivered = "SELECT count(*) FROM deliveries WHERE order_id = $1::uuid AND kind = 'certificate'
                         AND terminal_id = 'stb' AND status = 'delivered'";
        (order_status(c, &id) == "issued -" && count(c, delivered, &[&id]) == 1).then_some(())
    })
    .await;

    // The same confirmation again is a duplicate: its payer is told, and nothing is charged twice.
    env.send(&confirm).await;
    env.wait_until("the repeated confirmation is answered as a duplicate", |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE terminal_id = 'owner-phone' AND kind = 'message' AND content->>'code' = 'duplicate_request' AND status = 'delivered'", &[]) == 1)
            .then_some(())
    })
    .await;
    let (id, rid) = (order_id.clone(), request_id(&confirm));
    env.db(move |c| {
        assert_eq!(settlements(c, &id), 1, "one settlement");
        let charged = "SELECT count(*) FROM settlements WHERE order_id = $1::uuid AND status = 'settled'
                       AND payer_terminal_id = 'owner-phone' AND partner_id = 'bank-a' AND amount_minor = 1000";
        assert_eq!(count(c, charged, &[&id]), 1, "the payer is charged through its own partner");
        let answered =
            "SELECT confirmation_request_id AS value FROM orders WHERE id = $1::uuid AND confirmed_at IS NOT NULL";
        assert_eq!(text(c, answered, &[&id]).as_deref(), Some(rid.as_str()));
        assert_eq!(count(c, "SELECT count(*) FROM refusals", &[]), 0);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payer_that_declines_is_charged_nothing_and_the_orderer_is_told() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let p = parties(&env).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(silent_payers());

    let (rid, order_id) = awaiting_confirmation(&env, &p, "concert").await;
    answer(&env, &p.phone, &order_id, ConfirmAnswer::Decline).await;
    let id = order_id.clone();
    env.wait_until("the orderer is told its order was declined", move |c| {
        let told =
            "SELECT count(*) FROM deliveries WHERE order_id = $1::uuid AND terminal_id = 'stb' AND kind = 'message'
                    AND content->>'code' = 'order_declined' AND request_id = $2 AND status = 'delivered'";
        (count(c, told, &[&id, &rid]) == 1).then_some(())
    })
    .await;
    let id = order_id.clone();
    env.db(move |c| {
        assert_eq!(order_status(c, &id), "declined payer_declined");
        assert_eq!(settlements(c, &id), 0, "nothing is charged");
        assert_eq!(count(c, "SELECT count(*) FROM assets", &[]), 0, "nothing is issued");
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payer_that_never_answers_leaves_the_order_unconfirmed_with_nothing_charged() {
    let mut env = Env::new().await;
    env.product("ppv", |p| {
        p.kind = "ppv_ticket".into();
        p.confirmation_window_secs = 60;
    })
    .await;
    let p = parties(&env).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(silent_payers());

    let (rid, order_id) = awaiting_confirmation(&env, &p, "ppv").await;
    let id = order_id.clone();
    let (due, placed) = env
        .db(move |c| {
            let due = timestamp(c, "SELECT confirm_due_at AS value FROM orders WHERE id = $1::uuid", &[&id]);
            let placed = timestamp(c, "SELECT created_at AS value FROM orders WHERE id = $1::uuid", &[&id]);
            (due.expect("a confirming order is due"), placed.expect("the order exists"))
        })
        .await;
    assert_eq!(due - placed, TimeDelta::seconds(60), "the product's window");

    // Within the window the job leaves the order alone.
    let early = env.run_job("confirmation_timeout", due - TimeDelta::seconds(1)).await;
    assert_eq!(early.rows_scanned, 0, "{early:?}");
    let id = order_id.clone();
    env.db(move |c| assert_eq!(order_status(c, &id), "confirming -")).await;

    // At the end of the window it ends the order, and tells the orderer and the payer.
    let due_run = env.run_job("confirmation_timeout", due).await;
    assert_eq!((due_run.rows_scanned, due_run.enqueued), (1, 2), "{due_run:?}");
    let again = env.run_job("confirmation_timeout", due + TimeDelta::minutes(1)).await;
    assert_eq!(again.rows_scanned, 0, "a second run finds nothing: {again:?}");
    let id = order_id.clone();
    env.wait_until("the orderer and the payer are told", move |c| {
        let told = "SELECT count(*) FROM deliveries WHERE order_id = $1::uuid AND kind = 'message'
                    AND content->>'code' = 'order_unconfirmed' AND status = 'delivered' AND terminal_id = $2";
        (count(c, told, &[&id, &"stb"]) == 1 && count(c, told, &[&id, &"owner-phone"]) == 1).then_some(())
    })
    .await;
    let id = order_id.clone();
    env.db(move |c| {
        assert_eq!(order_status(c, &id), "unconfirmed payer_did_not_confirm");
        assert_eq!(settlements(c, &id), 0, "no settlement exists");
        assert_eq!(count(c, "SELECT count(*) FROM outbox WHERE message_type = 'settlement.instruction'", &[]), 0);
        let orderer_notice =
            "SELECT request_id AS value FROM deliveries WHERE order_id = $1::uuid AND terminal_id = 'stb'";
        assert_eq!(text(c, orderer_notice, &[&id]).as_deref(), Some(rid.as_str()), "the notice answers the purchase");
    })
    .await;

    // A confirmation that comes too late is refused, and still charges nothing.
    let late = answer(&env, &p.phone, &order_id, ConfirmAnswer::Confirm).await;
    assert_eq!(wait_for_refusal(&env, &late).await, "confirmation_expired");
    let id = order_id.clone();
    env.db(move |c| {
        assert_eq!(order_status(c, &id), "unconfirmed payer_did_not_confirm");
        assert_eq!(settlements(c, &id), 0);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_by_a_terminal_that_is_not_the_payer_is_refused() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let p = parties(&env).await;
    let stranger = env.terminal("stranger", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(silent_payers());

    let (_, order_id) = awaiting_confirmation(&env, &p, "concert").await;
    // Neither a stranger nor the orderer itself may confirm what the payer pays for.
    let by_stranger = answer(&env, &stranger, &order_id, ConfirmAnswer::Confirm).await;
    assert_eq!(wait_for_refusal(&env, &by_stranger).await, "not_the_payer");
    let by_orderer = answer(&env, &p.stb, &order_id, ConfirmAnswer::Confirm).await;
    assert_eq!(wait_for_refusal(&env, &by_orderer).await, "not_the_payer");
    // An order that needs no confirmation cannot be confirmed.
    let own = purchase(&stranger, "concert", 1, json!({}));
    env.send(&own).await;
    let own_rid = request_id(&own);
    let own_order = env
        .wait_until("the stranger's own order is placed", move |c| {
            text(c, "SELECT id::text AS value FROM orders WHERE request_id = $1", &[&own_rid])
        })
        .await;
    let needless = answer(&env, &stranger, &own_order, ConfirmAnswer::Confirm).await;
    assert_eq!(wait_for_refusal(&env, &needless).await, "order_not_awaiting_confirmation");

    let id = order_id.clone();
    env.db(move |c| {
        assert_eq!(order_status(c, &id), "confirming -", "the order still waits for its payer");
        assert_eq!(settlements(c, &id), 0);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waived_product_and_a_waiving_payer_go_straight_to_settlement() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    env.product("coffee", |p| {
        p.kind = "coupon".into();
        p.confirmation_waived = true;
    })
    .await;
    let p = parties(&env).await;
    let parent = env.terminal("parent-phone", "gw-1", Some("card-co")).await;
    env.db(|c| assetflow::cli::admin::waive_confirmation(c, "parent-phone", true).unwrap()).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(silent_payers());

    let waived_product = purchase(&p.stb, "coffee", 1, json!({"payer_terminal_id": p.phone.id}));
    let waiving_payer = purchase(&p.stb, "concert", 1, json!({"payer_terminal_id": parent.id}));
    for order in [&waived_product, &waiving_payer] {
        env.send(order).await;
    }
    let rids = [request_id(&waived_product), request_id(&waiving_payer)];
    env.wait_until("both orders are issued", move |c| {
        let issued = "SELECT count(*) FROM orders WHERE request_id IN ($1, $2) AND status = 'issued'";
        (count(c, issued, &[&rids[0], &rids[1]]) == 2).then_some(())
    })
    .await;
    env.db(|c| {
        let settled = "SELECT count(*) FROM settlements WHERE status = 'settled' AND payer_terminal_id IN ('owner-phone', 'parent-phone')";
        assert_eq!(count(c, settled, &[]), 2, "each payer is charged at once");
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE kind = 'confirmation_request'", &[]), 0);
        assert_eq!(count(c, "SELECT count(*) FROM orders WHERE confirm_due_at IS NOT NULL", &[]), 0);
    })
    .await;
    env.stop().await;
}

/// acknowledge_certificate takes the next certificate off `gateway`'s queue and answers it with
/// the terminal's signed acknowledgement, as that gateway.
async fn acknowledge_certificate(env: &Env, gateway: &str) -> Taken {
    let taken = take(env, gateway, "certificate", 1).await;
    let acknowledgement = acknowledge(
        &taken.message,
        taken.message_id,
        &taken.message.content,
        &env.terminal_key(&taken.message.terminal_id),
    );
    let receipt = DeliveryReceipt {
        message_type: kinds::DELIVERY_RECEIPT.into(),
        delivery_id: taken.message.delivery_id,
        attempt: taken.message.attempt,
        gateway_id: gateway.to_string(),
        terminal_id: taken.message.terminal_id.clone(),
        sha256: assetflow::crypto::sha256_hex(&taken.bytes),
        received_at: Utc::now(),
        acknowledgement: Some(acknowledgement),
        signature: None,
    };
    env.publish(kinds::DELIVERY_RECEIPT, &env.signed_by(PartyKind::Gateway, gateway, &receipt).await).await;
    let id = taken.message.delivery_id.to_string();
    env.wait_until("the certificate is acknowledged", move |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE id = $1::uuid AND status = 'delivered'", &[&id]) == 1)
            .then_some(())
    })
    .await;
    taken
}

/// COMPLETED counts the completion notices of the order placed with request `$1`.
const COMPLETED: &str = "SELECT count(*) FROM deliveries d JOIN orders o ON o.id = d.order_id
                         WHERE o.request_id = $1 AND d.kind = 'message' AND d.content->>'code' = 'order_completed'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orderer_of_a_gift_is_told_once_every_recipient_has_acknowledged_it() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.terminal("friend-1", "gw-1", None).await;
    env.terminal("friend-2", "gw-2", None).await;
    env.start().await;
    env.partner(settle_all());
    // No gateway simulator: the test acknowledges each certificate itself, one after the other.

    let gift = purchase(&alice, "concert", 1, json!({"recipient_terminal_ids": ["friend-1", "friend-2"]}));
    let rid = request_id(&gift);
    env.send(&gift).await;
    let first = acknowledge_certificate(&env, "gw-1").await;
    assert_eq!(first.message.terminal_id, "friend-1");
    let r = rid.clone();
    env.db(move |c| assert_eq!(count(c, COMPLETED, &[&r]), 0, "one recipient still waits")).await;

    let second = acknowledge_certificate(&env, "gw-2").await;
    assert_eq!(second.message.terminal_id, "friend-2");
    let r = rid.clone();
    env.wait_until("the orderer is sent the completion notice", move |c| {
        (count(c, COMPLETED, &[&r]) == 1).then_some(())
    })
    .await;
    let notice = take(&env, "gw-1", "message", 1).await;
    assert_eq!(notice.message.terminal_id, "alice");
    assert_eq!(notice.message.content["code"], "order_completed");
    assert_eq!(notice.message.request_id.as_deref(), Some(rid.as_str()), "it answers the purchase");

    // A receipt for a certificate already acknowledged completes nothing twice.
    let r = rid.clone();
    env.db(move |c| {
        assert_eq!(count(c, COMPLETED, &[&r]), 1);
        let dedupe = "SELECT count(*) FROM deliveries d JOIN orders o ON o.id = d.order_id
                      WHERE o.request_id = $1 AND d.dedupe_key = 'order:' || o.id || ':order_completed' AND d.terminal_id = 'alice'";
        assert_eq!(count(c, dedupe, &[&r]), 1);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_for_oneself_sends_no_completion_notice() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions { exchange_rate: 0.0, ..GatewayOptions::default() });

    let own = purchase(&bob, "concert", 2, json!({}));
    let rid = request_id(&own);
    env.send(&own).await;
    // A gift placed after it is a witness: once its notice is out, the own order's would be too.
    env.terminal("friend", "gw-2", None).await;
    let gift = purchase(&bob, "concert", 1, json!({"recipient_terminal_ids": ["friend"]}));
    let gift_rid = request_id(&gift);
    let r = rid.clone();
    env.wait_until("both of bob's certificates are delivered", move |c| {
        let delivered = "SELECT count(*) FROM deliveries d JOIN orders o ON o.id = d.order_id
                         WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'";
        (count(c, delivered, &[&r]) == 2).then_some(())
    })
    .await;
    env.send(&gift).await;
    let g = gift_rid.clone();
    env.wait_until("the gift's completion notice is delivered", move |c| {
        (count(c, COMPLETED, &[&g]) == 1).then_some(())
    })
    .await;
    env.db(move |c| assert_eq!(count(c, COMPLETED, &[&rid]), 0, "the orderer acknowledged its own delivery")).await;
    env.stop().await;
}
