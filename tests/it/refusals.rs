//! Bad input, end to end: requests refused with their reason, messages dead-lettered with their
//! reason and their bytes, and a worker that keeps serving afterwards (`docs/product.md#authenticity`,
//! `#exchange`, `#no-double-effect`, `#bad-input-is-answered`).

use assetflow::cli::simulate::gateway::{GatewayOptions, exchange_request};
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use assetflow::contracts::messages::{DeliveryReceipt, SettlementOutcome, SettlementResult, kinds};
use assetflow::crypto::{self, sha256_hex, sign_document};
use assetflow::domain::catalogue::PartyKind;
use chrono::{Duration, Utc};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{Env, count, execute, text};
use crate::support::{dead_letter_reason, request_id, settle_all};

/// serving_env is an Env with a product on sale, a terminal that pays through `card-co`, and the
/// partner (settling everything) and gateway simulators running.
async fn serving_env() -> (Env, SimTerminal) {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    start_simulators(&env);
    (env, alice)
}

/// start_simulators runs a partner that settles everything at once, and the gateways.
fn start_simulators(env: &Env) {
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
}

/// re_signed returns the request with `change` applied and signed again by `terminal`, so that
/// the signature is never what is wrong with it.
fn re_signed(terminal: &SimTerminal, request: &Value, change: impl FnOnce(&mut Value)) -> Value {
    let mut request = request.clone();
    change(&mut request);
    sign_document(&terminal.key, &mut request).expect("signing works");
    request
}

/// with_one_character_changed changes one byte of `text`: the character at `index` becomes another
/// of its kind, so that an id stays an id, a date a date and base64 base64.
fn with_one_character_changed(text: &str, index: usize) -> String {
    let mut bytes = text.as_bytes().to_vec();
    bytes[index] = match bytes[index] {
        b'9' => b'0',
        b'z' => b'a',
        b'Z' => b'A',
        b'+' => b'/',
        b'/' => b'+',
        b @ (b'0'..=b'8' | b'a'..=b'y' | b'A'..=b'Y') => b + 1,
        b => panic!("no rule to change {:?}", b as char),
    };
    String::from_utf8(bytes).expect("still ASCII")
}

/// rows runs a `SELECT count(*)` on the test database, with `values` bound (see `harness::query`).
async fn rows(env: &Env, sql: &'static str, values: &[&dyn ToString]) -> i64 {
    let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    env.db(move |c| count(c, sql, &values.iter().map(|v| v as &dyn ToString).collect::<Vec<_>>())).await
}

/// value runs a query returning one text column `value` on the test database, with `values`
/// bound (see `harness::query`).
async fn value(env: &Env, sql: &'static str, values: &[&dyn ToString]) -> Option<String> {
    let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    env.db(move |c| text(c, sql, &values.iter().map(|v| v as &dyn ToString).collect::<Vec<_>>())).await
}

/// refusal_reason waits for the `refusals` row of a request and returns its reason.
async fn refusal_reason(env: &Env, request_id: &str) -> String {
    let what = format!("request {request_id} is refused");
    let request_id = request_id.to_string();
    env.wait_until(&what, move |c| {
        text(c, "SELECT reason AS value FROM refusals WHERE request_id = $1", &[&request_id])
    })
    .await
}

/// delivered_refusal waits until the refusal of a request reached `terminal` through its gateway,
/// and returns the reason the terminal was given.
async fn delivered_refusal(env: &Env, terminal: &str, request_id: &str) -> String {
    let sql = "SELECT content->>'reason' AS value FROM deliveries
               WHERE kind = 'refusal' AND status = 'delivered' AND terminal_id = $1 AND content->>'request_id' = $2";
    let what = format!("{terminal} is told that request {request_id} was refused");
    let (terminal, request_id) = (terminal.to_string(), request_id.to_string());
    env.wait_until(&what, move |c| text(c, sql, &[&terminal, &request_id])).await
}

// The dead letter whose payload is exactly a body is found by the payload's hash, bound as `$1`:
// matching on it is also the proof that the original bytes were kept.

/// DEAD_LETTER_ROUTE is the pool and routing key of the dead letter whose payload hashes to `$1`.
const DEAD_LETTER_ROUTE: &str =
    "SELECT pool || ' ' || routing_key AS value FROM dead_letters WHERE sha256(payload) = decode($1, 'hex')";

/// delivered_certificates waits until `n` certificates of an order are delivered, and returns
/// them as the gateway delivered them.
async fn delivered_certificates(env: &Env, request_id: &str, n: i64) -> Vec<Value> {
    let sql = "SELECT json_agg(d.content->'certificate' ORDER BY d.id)::text AS value
               FROM deliveries d JOIN orders o ON o.id = d.order_id
               WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'
               HAVING count(*) = $2::int8";
    let what = format!("{n} certificates of {request_id} are delivered");
    let request_id = request_id.to_string();
    let text = env.wait_until(&what, move |c| text(c, sql, &[&request_id, &n])).await;
    serde_json::from_str(&text).expect("a JSON array of certificates")
}

/// order_completes sends a valid order for one ticket and waits until its certificate is
/// delivered.
async fn order_completes(env: &Env, order: &Value) {
    env.send(order).await;
    delivered_certificates(env, &request_id(order), 1).await;
}

/// assert_still_serving proves that the pools kept running after whatever came before: a new,
/// valid order from `terminal` completes.
async fn assert_still_serving(env: &Env, terminal: &SimTerminal) {
    order_completes(env, &purchase(terminal, "concert", 1, json!({}))).await;
}

/// assert_no_order_for asserts that a request created nothing: no order, so no settlement and no
/// asset.
async fn assert_no_order_for(env: &Env, request_id: &str) {
    let orders = rows(env, "SELECT count(*) FROM orders WHERE request_id = $1", &[&request_id]).await;
    assert_eq!(orders, 0, "request {request_id} created an order");
}

// Authenticity.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_signed_by_another_terminals_key_is_refused() {
    let (mut env, alice) = serving_env().await;
    let mallory = env.terminal("mallory", "gw-2", Some("card-co")).await;

    // Mallory signs an order in Alice's name with her own registered key.
    let genuine = purchase(&alice, "concert", 1, json!({}));
    let forged = re_signed(&mallory, &genuine, |_| {});
    let rid = request_id(&forged);
    env.send(&forged).await;

    assert_eq!(refusal_reason(&env, &rid).await, "bad_signature");
    assert_eq!(delivered_refusal(&env, "alice", &rid).await, "bad_signature");
    assert_no_order_for(&env, &rid).await;
    let others = "SELECT count(*) FROM deliveries WHERE content->>'request_id' = $1 AND terminal_id <> 'alice'";
    assert_eq!(rows(&env, others, &[&rid]).await, 0, "only the claimed terminal is told");

    // The forgery did not burn Alice's request id: her own order with it still goes through.
    order_completes(&env, &genuine).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_signature_that_fits_the_schema_is_refused() {
    let (mut env, alice) = serving_env().await;

    let mut garbled = purchase(&alice, "concert", 1, json!({}));
    let signature = garbled["signature"].as_str().unwrap();
    // Still base64 of the same length, so the schema accepts it; the DER inside no longer verifies.
    garbled["signature"] = json!(with_one_character_changed(signature, 12));
    let fits = assetflow::contracts::schema::validate(kinds::ORDER_PURCHASE, &garbled);
    assert_eq!(fits, Ok(()), "the garbled request fits the schema");
    let rid = request_id(&garbled);
    env.send(&garbled).await;

    assert_eq!(refusal_reason(&env, &rid).await, "bad_signature");
    assert_eq!(delivered_refusal(&env, "alice", &rid).await, "bad_signature");
    assert_no_order_for(&env, &rid).await;
    assert_still_serving(&env, &alice).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_an_unknown_terminal_is_refused_and_nobody_is_told() {
    let (mut env, alice) = serving_env().await;

    let key = crypto::generate_key_pair().unwrap();
    let stranger = SimTerminal { id: "stranger".into(), key };
    let order = purchase(&stranger, "concert", 1, json!({}));
    let rid = request_id(&order);
    env.send(&order).await;

    assert_eq!(refusal_reason(&env, &rid).await, "unknown_terminal");
    let named = "SELECT terminal_id AS value FROM refusals WHERE request_id = $1";
    assert_eq!(value(&env, named, &[&rid]).await.as_deref(), Some("stranger"));
    // A refusal commits with its delivery, so a delivery that is not there now never will be.
    let told = "SELECT count(*) FROM deliveries WHERE content->>'request_id' = $1";
    assert_eq!(rows(&env, told, &[&rid]).await, 0, "there is no terminal to tell");
    let recorded = "SELECT count(*) FROM terminal_requests WHERE request_id = $1";
    assert_eq!(rows(&env, recorded, &[&rid]).await, 0, "a stranger cannot use up a request id");
    assert_no_order_for(&env, &rid).await;
    // `assetflow status <request id>` shows the refusal, though the request was never recorded.
    let id = rid.clone();
    let view = env.db(move |c| assetflow::cli::status::lookup(c, &id).unwrap().expect("the refusal is known")).await;
    let shown = assetflow::cli::status::render(&view);
    assert!(shown.contains("refused before it was recorded"), "{shown}");
    assert!(shown.contains("order.purchase from stranger: unknown_terminal"), "{shown}");
    assert_still_serving(&env, &alice).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_dated_outside_the_freshness_window_are_refused_as_stale() {
    let (mut env, alice) = serving_env().await;

    // Both are properly signed: only their dates are wrong.
    let template = purchase(&alice, "concert", 1, json!({}));
    let replayed = re_signed(&alice, &template, |r| {
        r["sent_at"] = json!(Utc::now() - Duration::minutes(10));
    });
    let ahead = re_signed(&alice, &template, |r| {
        r["request_id"] = json!(format!("o-{}", Uuid::now_v7()));
        r["sent_at"] = json!(Utc::now() + Duration::minutes(10));
    });
    env.send(&replayed).await;
    env.send(&ahead).await;

    for request in [&replayed, &ahead] {
        let (rid, sent_at) = (request_id(request), &request["sent_at"]);
        assert_eq!(refusal_reason(&env, &rid).await, "stale_request", "sent at {sent_at}");
        assert_eq!(delivered_refusal(&env, "alice", &rid).await, "stale_request");
        assert_no_order_for(&env, &rid).await;
    }
    assert_still_serving(&env, &alice).await;
    env.stop().await;
}

// Idempotency.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_published_twice_has_one_effect_and_the_copy_is_answered_as_a_duplicate() {
    let (mut env, alice) = serving_env().await;

    let order = purchase(&alice, "concert", 1, json!({}));
    let rid = request_id(&order);
    order_completes(&env, &order).await;
    env.send(&order).await;

    let sql = "SELECT count(*) FROM deliveries
               WHERE terminal_id = 'alice' AND kind = 'message' AND status = 'delivered'
                 AND content->>'code' = 'duplicate_request' AND content->>'request_id' = $1";
    let r = rid.clone();
    let answered = move |c: &mut PgConnection| (count(c, sql, &[&r]) == 1).then_some(());
    env.wait_until("the copy is answered as a duplicate", answered).await;

    // Whatever the copy had done would show by now: its effects commit with its answer.
    let orders = "SELECT count(*) FROM orders WHERE request_id = $1";
    assert_eq!(rows(&env, orders, &[&rid]).await, 1, "one order");
    assert_eq!(rows(&env, "SELECT count(*) FROM settlements", &[]).await, 1, "one settlement");
    assert_eq!(rows(&env, "SELECT count(*) FROM assets", &[]).await, 1, "one asset");
    let certificates = "SELECT count(*) FROM deliveries WHERE kind = 'certificate'";
    assert_eq!(rows(&env, certificates, &[]).await, 1, "one certificate delivered");
    assert_eq!(rows(&env, "SELECT count(*) FROM refusals", &[]).await, 0, "answered, not refused");

    assert_still_serving(&env, &alice).await;
    assert_eq!(rows(&env, "SELECT count(*) FROM assets", &[]).await, 2, "the copy issued nothing");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reused_for_other_content_is_refused() {
    let (mut env, alice) = serving_env().await;

    let order = purchase(&alice, "concert", 1, json!({}));
    let rid = request_id(&order);
    env.send(&order).await;
    let r = rid.clone();
    let placed = move |c: &mut PgConnection| {
        (count(c, "SELECT count(*) FROM orders WHERE request_id = $1", &[&r]) == 1).then_some(())
    };
    env.wait_until("the first order is placed", placed).await;

    // The same request id, now for two tickets, properly signed by the same terminal.
    let reused = re_signed(&alice, &order, |r| r["quantity"] = json!(2));
    env.send(&reused).await;

    assert_eq!(refusal_reason(&env, &rid).await, "request_id_reused");
    assert_eq!(delivered_refusal(&env, "alice", &rid).await, "request_id_reused");
    let first = "SELECT count(*) FROM orders WHERE request_id = $1 AND quantity = 1";
    assert_eq!(rows(&env, first, &[&rid]).await, 1, "the first order stands");
    assert_eq!(rows(&env, "SELECT count(*) FROM orders", &[]).await, 1, "still one order");
    let billed = "SELECT sum(amount_minor)::bigint AS count FROM settlements";
    assert_eq!(rows(&env, billed, &[]).await, 1_000, "billed for one ticket");

    delivered_certificates(&env, &rid, 1).await;
    assert_still_serving(&env, &alice).await;
    env.stop().await;
}

// Purchase validation.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_that_cannot_be_carried_out_are_refused_with_their_reason() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    env.product("retired", |p| p.on_sale = false).await;
    env.product("pricey", |p| p.price_minor = i64::MAX / 2).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.terminal("stb", "gw-2", None).await; // A set-top box with no payment method.
    env.start().await;
    start_simulators(&env);

    let an_hour_ago = Utc::now() - Duration::hours(1);
    let order = |product: &str, quantity: u32, extra: Value| purchase(&alice, product, quantity, extra);
    let cases = [
        ("unknown_product", order("no-such-product", 1, json!({}))),
        ("not_on_sale", order("retired", 1, json!({}))),
        ("unknown_party", order("concert", 1, json!({"recipient_terminal_ids": ["nobody"]}))),
        ("unknown_party", order("concert", 1, json!({"payer_terminal_id": "nobody"}))),
        ("no_payment_method", order("concert", 1, json!({"payer_terminal_id": "stb"}))),
        // i64::MAX / 2 three times over does not fit in an i64.
        ("invalid_amount", order("pricey", 3, json!({}))),
        ("invalid_delivery_time", order("concert", 1, json!({"delivery": {"mode": "designated", "at": an_hour_ago}}))),
    ];
    for (_, request) in &cases {
        env.send(request).await;
    }
    for (reason, request) in &cases {
        let rid = request_id(request);
        assert_eq!(refusal_reason(&env, &rid).await, *reason, "{request}");
        assert_eq!(delivered_refusal(&env, "alice", &rid).await, *reason, "{request}");
        assert_no_order_for(&env, &rid).await;
    }
    assert_eq!(rows(&env, "SELECT count(*) FROM settlements", &[]).await, 0, "nothing is billed");
    assert_eq!(rows(&env, "SELECT count(*) FROM assets", &[]).await, 0, "nothing is issued");
    assert_still_serving(&env, &alice).await;
    env.stop().await;
}

// Exchange.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_foreign_and_expired_certificates_are_refused_and_the_holder_still_exchanges() {
    let (mut env, alice) = serving_env().await;
    let bob = env.terminal("bob", "gw-2", Some("card-co")).await;

    let order = purchase(&alice, "concert", 2, json!({}));
    env.send(&order).await;
    let certificates = delivered_certificates(&env, &request_id(&order), 2).await;
    let (held, to_expire) = (certificates[0].clone(), certificates[1].clone());

    // One byte changed in the holder: "alice" becomes "alicf".
    let mut other_holder = held.clone();
    let holder = held["holder_terminal_id"].as_str().unwrap();
    other_holder["holder_terminal_id"] = json!(with_one_character_changed(holder, 4));
    // One byte changed in the expiry: a year later.
    let mut later = held.clone();
    let expires_at = held["expires_at"].as_str().unwrap();
    later["expires_at"] = json!(with_one_character_changed(expires_at, 3));
    // The same document, signed by a key that is not the service provider's.
    let mut self_signed = held.clone();
    sign_document(&crypto::generate_key_pair().unwrap(), &mut self_signed).unwrap();
    // The holder's other certificate, once its time is up: the test plays the clock.
    let expired = to_expire["certificate_id"].as_str().unwrap().to_string();
    env.db(move |c| {
        let sql = "UPDATE exchange_certificates SET expires_at = now() - interval '1 hour' WHERE id = $1::uuid";
        execute(c, sql, &[&expired])
    })
    .await;

    let cases = [
        ("an altered holder", &alice, other_holder, "certificate_forged"),
        ("an altered expiry", &alice, later, "certificate_forged"),
        ("a self-signed certificate", &alice, self_signed, "certificate_forged"),
        // The genuine certificate, presented by a registered terminal that does not hold it.
        ("someone else's certificate", &bob, held.clone(), "certificate_not_held"),
        ("an expired certificate", &alice, to_expire, "certificate_expired"),
    ];
    let mut sent = Vec::new();
    for (what, terminal, certificate, reason) in cases {
        let request = exchange_request(&terminal.id, certificate, &terminal.key);
        env.send(&request).await;
        sent.push((what, terminal.id.clone(), request_id(&request), reason));
    }
    for (what, terminal, rid, reason) in &sent {
        assert_eq!(refusal_reason(&env, rid).await, *reason, "{what}");
        assert_eq!(delivered_refusal(&env, terminal, rid).await, *reason, "{what}");
    }
    let assets = "SELECT count(*) FROM deliveries WHERE kind = 'asset'";
    assert_eq!(rows(&env, assets, &[]).await, 0, "no asset for a refused exchange");
    let exchanged = "SELECT count(*) FROM exchange_certificates WHERE exchanged_at IS NOT NULL";
    assert_eq!(rows(&env, exchanged, &[]).await, 0, "no certificate counts as exchanged");

    // The genuine holder's exchange still goes through, once.
    let asset_id = held["asset_id"].as_str().unwrap().to_string();
    env.send(&exchange_request("alice", held, &alice.key)).await;
    let id = asset_id.clone();
    let delivered = move |c: &mut PgConnection| {
        text(c, "SELECT status AS value FROM assets WHERE id = $1::uuid", &[&id]).filter(|s| s == "delivered")
    };
    env.wait_until("the holder's asset is delivered", delivered).await;
    assert_eq!(rows(&env, assets, &[]).await, 1, "exactly one asset delivery");
    let for_asset = "SELECT count(*) FROM deliveries WHERE kind = 'asset' AND asset_id = $1::uuid";
    assert_eq!(rows(&env, for_asset, &[&asset_id]).await, 1, "for the exchanged asset");
    env.stop().await;
}

// Dead letters: bad input with no terminal to tell.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_a_json_object_are_dead_lettered_as_malformed() {
    let (mut env, alice) = serving_env().await;

    let mut oversized = br#"{"type": "order.purchase", "padding": ""#.to_vec();
    oversized.extend(std::iter::repeat_n(b'x', 256 * 1024));
    oversized.extend(br#""}"#);
    let cases: [(&str, Vec<u8>); 4] = [
        ("broken JSON", br#"{"type": "order.purchase", "quantity": "#.to_vec()),
        ("invalid UTF-8", b"{\"type\": \"order.purchase\", \"product_id\": \"\xe9\xff\"}".to_vec()),
        ("a JSON array", br#"[{"type": "order.purchase"}]"#.to_vec()),
        ("a body over 256 KiB", oversized),
    ];
    for (_, body) in &cases {
        env.publish(kinds::ORDER_PURCHASE, body).await;
    }
    for (what, body) in &cases {
        assert_eq!(dead_letter_reason(&env, what, body).await, "malformed", "{what}");
        let pool = value(&env, DEAD_LETTER_ROUTE, &[&sha256_hex(body)]).await;
        assert_eq!(pool.as_deref(), Some("settlement order.purchase"), "{what}");
    }
    assert_eq!(rows(&env, "SELECT count(*) FROM orders", &[]).await, 0);
    assert_eq!(rows(&env, "SELECT count(*) FROM refusals", &[]).await, 0, "no request was read");
    assert_still_serving(&env, &alice).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_that_fail_their_schema_are_dead_lettered_and_their_signed_senders_told_why() {
    let (mut env, alice) = serving_env().await;

    // Each but the unsigned one is properly signed: the schema is the only thing wrong with it.
    let variant = |change: fn(&mut Value)| {
        let request = re_signed(&alice, &purchase(&alice, "concert", 1, json!({})), change);
        (Some(request_id(&request)), serde_json::to_vec(&request).unwrap())
    };
    let mut unsigned = purchase(&alice, "concert", 1, json!({}));
    unsigned.as_object_mut().unwrap().remove("signature");
    // What each signed sender is told: the reason, and the field the detail names.
    let cases = [
        ("a quantity that is a string", variant(|r| r["quantity"] = json!("1")), "invalid_request", "/quantity"),
        ("a product id that is a number", variant(|r| r["product_id"] = json!(42)), "invalid_request", "/product_id"),
        (
            "a missing product id",
            variant(|r| _ = r.as_object_mut().unwrap().remove("product_id")),
            "invalid_request",
            "product_id",
        ),
        ("a missing signature", (None, serde_json::to_vec(&unsigned).unwrap()), "", ""),
        ("an extra field", variant(|r| r["discount_minor"] = json!(500)), "invalid_request", "discount_minor"),
        ("a negative quantity", variant(|r| r["quantity"] = json!(-1)), "invalid_amount", "/quantity"),
        ("a zero quantity", variant(|r| r["quantity"] = json!(0)), "invalid_amount", "/quantity"),
    ];
    for (_, (_, body), _, _) in &cases {
        env.publish(kinds::ORDER_PURCHASE, body).await;
    }
    for (what, (request, body), reason, field) in &cases {
        // The operator's record, whatever the sender is told.
        assert_eq!(dead_letter_reason(&env, what, body).await, "schema_violation", "{what}");
        let Some(request) = request else { continue };
        assert_eq!(delivered_refusal(&env, "alice", request).await, *reason, "{what}");
        let detail =
            "SELECT content->>'detail' AS value FROM deliveries WHERE kind = 'refusal' AND content->>'request_id' = $1";
        let told = value(&env, detail, &[request]).await.unwrap_or_default();
        assert!(told.contains(field), "{what}: the detail {told:?} names {field}");
    }
    assert_eq!(rows(&env, "SELECT count(*) FROM orders", &[]).await, 0);
    assert_eq!(rows(&env, "SELECT count(*) FROM refusals", &[]).await, 6, "all but the unsigned one are answered");
    let recorded = "SELECT count(*) FROM terminal_requests";
    assert_eq!(rows(&env, recorded, &[]).await, 0, "no request id is used up");
    assert_still_serving(&env, &alice).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_nothing_can_take_are_dead_lettered_with_their_reason() {
    let (mut env, alice) = serving_env().await;

    let cancel = |n: u32| {
        let request = json!({
            "type": "order.cancel",
            "request_id": format!("c-{n}"),
            "terminal_id": "alice",
            "sent_at": Utc::now(),
        });
        serde_json::to_vec(&request).unwrap()
    };
    let unknown_settlement = SettlementResult {
        message_type: kinds::SETTLEMENT_RESULT.into(),
        settlement_id: Uuid::now_v7(),
        partner_id: "card-co".into(),
        outcome: SettlementOutcome::Settled,
        partner_reference: "CC-1".into(),
        reason: None,
        sent_at: Utc::now(),
        signature: None,
    };
    let unknown_delivery = DeliveryReceipt {
        message_type: kinds::DELIVERY_RECEIPT.into(),
        delivery_id: Uuid::now_v7(),
        attempt: 1,
        gateway_id: "gw-1".into(),
        terminal_id: "alice".into(),
        sha256: sha256_hex(b"a delivery that never was"),
        received_at: Utc::now(),
        acknowledgement: None,
        signature: None,
    };
    let cases = [
        ("unknown_message_type", "settlement", kinds::ORDER_PURCHASE, cancel(1)),
        // No binding takes it: it travels through the alternate exchange.
        ("unroutable", "settlement", "order.cancel", cancel(2)),
        (
            "unknown_settlement",
            "settlement",
            kinds::SETTLEMENT_RESULT,
            serde_json::to_vec(&unknown_settlement).unwrap(),
        ),
        ("unknown_delivery", "delivery", kinds::DELIVERY_RECEIPT, serde_json::to_vec(&unknown_delivery).unwrap()),
    ];
    for (_, _, routing_key, body) in &cases {
        env.publish(routing_key, body).await;
    }
    for (reason, pool, routing_key, body) in &cases {
        let what = format!("a message on {routing_key}");
        assert_eq!(dead_letter_reason(&env, &what, body).await, *reason);
        let recorded = value(&env, DEAD_LETTER_ROUTE, &[&sha256_hex(body)]).await;
        assert_eq!(recorded, Some(format!("{pool} {routing_key}")), "{reason}");
    }
    assert_eq!(rows(&env, "SELECT count(*) FROM orders", &[]).await, 0);
    assert_eq!(rows(&env, "SELECT count(*) FROM settlements", &[]).await, 0);
    assert_eq!(rows(&env, "SELECT count(*) FROM deliveries", &[]).await, 0);
    assert_still_serving(&env, &alice).await;
    env.stop().await;
}

// Settlement results in conflict.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_result_has_no_effect_and_a_contradicting_one_is_dead_lettered() {
    let (mut env, alice) = serving_env().await;

    let order = purchase(&alice, "concert", 1, json!({}));
    let rid = request_id(&order);
    order_completes(&env, &order).await;
    let settlement_id = "SELECT s.id::text AS value FROM settlements s JOIN orders o ON o.id = s.order_id
                         WHERE o.request_id = $1";
    let settlement_id = value(&env, settlement_id, &[&rid]).await.expect("the order's settlement");
    let partner_id = "SELECT s.partner_id::text AS value FROM settlements s JOIN orders o ON o.id = s.order_id
                      WHERE o.request_id = $1";
    let partner_id = value(&env, partner_id, &[&rid]).await.expect("its partner");
    let result = |outcome| SettlementResult {
        message_type: kinds::SETTLEMENT_RESULT.into(),
        settlement_id: Uuid::parse_str(&settlement_id).unwrap(),
        partner_id: partner_id.clone(),
        outcome,
        partner_reference: "REPEATED-1".into(),
        reason: None,
        sent_at: Utc::now(),
        signature: None,
    };
    let results = "SELECT count(*) FROM inbox WHERE message_type = 'settlement.result'";
    assert_eq!(rows(&env, results, &[]).await, 1, "the partner answered once");

    // The same answer again: processed (the inbox records it), with no effect and no dead letter.
    let repeated = env.signed_by(PartyKind::Partner, &partner_id, &result(SettlementOutcome::Settled)).await;
    env.publish(kinds::SETTLEMENT_RESULT, &repeated).await;
    let processed = move |c: &mut PgConnection| (count(c, results, &[]) == 2).then_some(());
    env.wait_until("the repeated result is processed", processed).await;
    assert_eq!(rows(&env, "SELECT count(*) FROM dead_letters", &[]).await, 0, "it is no error");
    let first = "SELECT partner_reference AS value FROM settlements WHERE status = 'settled'";
    let reference = value(&env, first, &[]).await.expect("the settlement is settled");
    assert_ne!(reference, "REPEATED-1", "the first answer stands");

    // The opposite answer: dead-lettered, and the order stays issued.
    let declined = SettlementResult { reason: Some("changed its mind".into()), ..result(SettlementOutcome::Declined) };
    let declined = env.signed_by(PartyKind::Partner, &partner_id, &declined).await;
    env.publish(kinds::SETTLEMENT_RESULT, &declined).await;
    let reason = dead_letter_reason(&env, "the contradicting result", &declined).await;
    assert_eq!(reason, "conflicting_result");
    let status = "SELECT status AS value FROM orders WHERE request_id = $1";
    assert_eq!(value(&env, status, &[&rid]).await.as_deref(), Some("issued"), "the order stays issued");
    let settled = "SELECT count(*) FROM settlements WHERE status = 'settled'";
    assert_eq!(rows(&env, settled, &[]).await, 1, "the settlement stays settled");
    let told = "SELECT count(*) FROM deliveries WHERE content->>'code' = 'order_declined'";
    assert_eq!(rows(&env, told, &[]).await, 0, "the orderer is not told it was declined");

    assert_still_serving(&env, &alice).await;
    let issued = "SELECT count(*) FROM assets a JOIN orders o ON o.id = a.order_id WHERE o.request_id = $1";
    assert_eq!(rows(&env, issued, &[&rid]).await, 1, "no second issuance");
    env.stop().await;
}
