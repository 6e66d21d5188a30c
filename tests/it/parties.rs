//! Who may answer (`docs/security.md#who-may-answer`): a settlement result is taken only from the
//! partner its settlement went to, a delivery receipt only from the gateway its delivery went
//! through, and a certificate or asset is delivered only on its terminal's own signed
//! acknowledgement where its product asks for one. A party proves who it is by its key (the
//! first tests, on a broker user they all share) or by its broker user, which RabbitMQ checks (the
//! last test, on a broker loaded with the shipped `ops/rabbitmq/definitions.json`).

use assetflow::cli::simulate::gateway::acknowledge;
use assetflow::cli::simulate::terminals::purchase;
use assetflow::contracts::messages::{Acknowledgement, DeliveryReceipt, SettlementOutcome, SettlementResult, kinds};
use assetflow::crypto;
use assetflow::domain::catalogue::PartyKind;
use chrono::Utc;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{Env, count, rabbitmqctl, text};
use crate::support::{DEAD_LETTER_REASON, Taken, dead_letter_reason, request_id, take};

/// refused publishes `body` and waits for its dead letter; it returns the reason.
async fn refused(env: &Env, what: &str, routing_key: &str, body: &[u8]) -> String {
    env.publish(routing_key, body).await;
    dead_letter_reason(env, what, body).await
}

/// instructed waits until an order's settlement is instructed, and returns its id and partner.
async fn instructed(env: &Env, request_id: &str) -> (Uuid, String) {
    let sql = "SELECT s.id::text || ' ' || s.partner_id AS value FROM settlements s JOIN orders o ON o.id = s.order_id
               WHERE o.request_id = $1 AND s.status = 'instructed'";
    let rid = request_id.to_string();
    let row = env.wait_until("the settlement is instructed", move |c| text(c, sql, &[&rid])).await;
    let (id, partner) = row.split_once(' ').expect("id and partner");
    (id.parse().expect("a UUID"), partner.to_string())
}

fn settled(settlement_id: Uuid, partner_id: &str, reference: &str) -> SettlementResult {
    SettlementResult {
        message_type: kinds::SETTLEMENT_RESULT.into(),
        settlement_id,
        partner_id: partner_id.into(),
        outcome: SettlementOutcome::Settled,
        partner_reference: reference.into(),
        reason: None,
        sent_at: Utc::now(),
        signature: None,
    }
}

fn receipt(taken: &Taken, acknowledgement: Option<Acknowledgement>) -> DeliveryReceipt {
    DeliveryReceipt {
        message_type: kinds::DELIVERY_RECEIPT.into(),
        delivery_id: taken.message.delivery_id,
        attempt: taken.message.attempt,
        gateway_id: taken.message.gateway_id.clone(),
        terminal_id: taken.message.terminal_id.clone(),
        sha256: crypto::sha256_hex(&taken.bytes),
        received_at: Utc::now(),
        acknowledgement,
        signature: None,
    }
}

/// altered is a signed message with one of its fields changed after it was signed.
fn altered(body: &[u8], field: &str, value: Value) -> Vec<u8> {
    let mut json: Value = serde_json::from_slice(body).unwrap();
    json[field] = value;
    serde_json::to_vec(&json).unwrap()
}

/// delivery_of is an order's delivery of `kind`: its status and proof.
async fn delivery_of(env: &Env, request_id: &str, kind: &str) -> String {
    let sql =
        "SELECT d.status || ' ' || coalesce(d.proof, '-') AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
               WHERE o.request_id = $1 AND d.kind = $2";
    let (rid, kind) = (request_id.to_string(), kind.to_string());
    env.db(move |c| text(c, sql, &[&rid, &kind]).expect("the delivery")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_and_receipts_not_proven_to_come_from_their_party_are_refused_and_change_nothing() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let mallory = env.terminal("mallory", "gw-1", Some("card-co")).await;
    env.start().await;

    let order = purchase(&alice, "concert", 1, json!({}));
    env.send(&order).await;
    let rid = request_id(&order);
    let (settlement, partner) = instructed(&env, &rid).await;
    assert_eq!(partner, "card-co");

    // card-co's own answer, signed with its registered key; kept back until the forgeries failed.
    let genuine = env.signed_by(PartyKind::Partner, "card-co", &settled(settlement, "card-co", "CC-1")).await;
    let forgeries = [
        (
            "a result signed by another partner",
            env.signed_by(PartyKind::Partner, "bank-a", &settled(settlement, "card-co", "BA-1")).await,
        ),
        (
            "another partner answering in its own name",
            env.signed_by(PartyKind::Partner, "bank-a", &settled(settlement, "bank-a", "BA-2")).await,
        ),
        ("an unsigned result", serde_json::to_vec(&settled(settlement, "card-co", "CC-2")).unwrap()),
        ("a signed result altered after signing", altered(&genuine, "partner_reference", json!("CC-3"))),
    ];
    for (what, body) in &forgeries {
        assert_eq!(refused(&env, what, kinds::SETTLEMENT_RESULT, body).await, "unauthenticated_party", "{what}");
    }
    let status = "SELECT s.status || ' ' || o.status AS value FROM settlements s JOIN orders o ON o.id = s.order_id WHERE s.id = $1::uuid";
    let id = settlement.to_string();
    let state = env.db(move |c| text(c, status, &[&id])).await;
    assert_eq!(state.as_deref(), Some("instructed settling"), "no forgery settled anything");

    env.publish(kinds::SETTLEMENT_RESULT, &genuine).await;
    let certificate = take(&env, "gw-1", "certificate", 1).await;
    let id = settlement.to_string();
    assert_eq!(env.db(move |c| text(c, status, &[&id])).await.as_deref(), Some("settled issued"));

    // The certificate's receipt: only from gw-1, and with alice's own acknowledgement of it.
    let by_alice = acknowledge(&certificate.message, certificate.message_id, &certificate.message.content, &alice.key);
    let by_mallory =
        acknowledge(&certificate.message, certificate.message_id, &certificate.message.content, &mallory.key);
    let other_attempt = acknowledge(&certificate.message, Uuid::now_v7(), &certificate.message.content, &alice.key);
    // alice writes her acknowledgement her own way (an upper-case id, her local time): what she
    // signed is the text she sent, and that is what is checked and kept.
    let mut as_alice_wrote = serde_json::to_value(&by_alice).unwrap();
    as_alice_wrote["delivery_id"] = json!(certificate.message.delivery_id.to_string().to_uppercase());
    as_alice_wrote["verified_at"] =
        json!(Utc::now().with_timezone(&chrono::FixedOffset::east_opt(9 * 3600).unwrap()).to_rfc3339());
    crypto::sign_document(&alice.key, &mut as_alice_wrote).unwrap();
    let mut genuine = serde_json::to_value(receipt(&certificate, None)).unwrap();
    genuine["acknowledgement"] = as_alice_wrote.clone();
    let genuine = env.signed_by(PartyKind::Gateway, "gw-1", &genuine).await;
    let forgeries = [
        (
            "a receipt signed by another gateway",
            env.signed_by(PartyKind::Gateway, "gw-2", &receipt(&certificate, Some(by_alice.clone()))).await,
            "unauthenticated_party",
        ),
        (
            "an unsigned receipt",
            serde_json::to_vec(&receipt(&certificate, Some(by_alice.clone()))).unwrap(),
            "unauthenticated_party",
        ),
        (
            "a receipt without the terminal's acknowledgement",
            env.signed_by(PartyKind::Gateway, "gw-1", &receipt(&certificate, None)).await,
            "invalid_proof",
        ),
        (
            "an acknowledgement signed by another terminal",
            env.signed_by(PartyKind::Gateway, "gw-1", &receipt(&certificate, Some(by_mallory))).await,
            "invalid_proof",
        ),
        (
            "an acknowledgement of another attempt",
            env.signed_by(PartyKind::Gateway, "gw-1", &receipt(&certificate, Some(other_attempt))).await,
            "invalid_proof",
        ),
    ];
    for (what, body, reason) in &forgeries {
        assert_eq!(refused(&env, what, kinds::DELIVERY_RECEIPT, body).await, *reason, "{what}");
    }
    assert_eq!(delivery_of(&env, &rid, "certificate").await, "sent -", "no forgery completed the delivery");

    env.publish(kinds::DELIVERY_RECEIPT, &genuine).await;
    let sql = "SELECT d.acknowledgement::text AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
               WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'";
    let r = rid.clone();
    let kept = env.wait_until("the genuine receipt completes the delivery", move |c| text(c, sql, &[&r])).await;
    let kept: Value = serde_json::from_str(&kept).unwrap();
    assert_eq!(kept, as_alice_wrote, "the terminal's acknowledgement is kept as the proof of delivery, as signed");
    crypto::verify_document(&alice.key, &kept).expect("the kept proof still verifies");
    assert_eq!(delivery_of(&env, &rid, "certificate").await, "delivered terminal");
    let shown = env
        .db(move |c| {
            let view = assetflow::cli::status::lookup(c, &rid).unwrap().expect("the order is known");
            assetflow::cli::status::render(&view)
        })
        .await;
    assert!(shown.contains("proof: the terminal's signed acknowledgement"), "assetflow status shows it:\n{shown}");

    let letters = "SELECT count(*) FROM dead_letters WHERE reason = $1";
    let (unauthenticated, invalid) =
        env.db(move |c| (count(c, letters, &[&"unauthenticated_party"]), count(c, letters, &[&"invalid_proof"]))).await;
    assert_eq!((unauthenticated, invalid), (6, 3), "each refusal is recorded once, with its reason");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_may_take_the_gateways_receipt_alone_and_the_delivery_says_which_proof_it_has() {
    let mut env = Env::new().await;
    env.product("coupon", |p| p.proof_of_delivery = "gateway".into()).await;
    let bea = env.terminal("bea", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(crate::support::settle_all());

    let orders = [purchase(&bea, "coupon", 1, json!({})), purchase(&bea, "coupon", 1, json!({}))];
    for order in &orders {
        env.send(order).await;
    }
    // The first receipt comes from a till that cannot sign; the second with bea's acknowledgement.
    for (n, _) in orders.iter().enumerate() {
        let taken = take(&env, "gw-1", "certificate", 1).await;
        let ack = (n == 1).then(|| acknowledge(&taken.message, taken.message_id, &taken.message.content, &bea.key));
        env.publish(kinds::DELIVERY_RECEIPT, &env.signed_by(PartyKind::Gateway, "gw-1", &receipt(&taken, ack)).await)
            .await;
    }
    let proofs = "SELECT string_agg(coalesce(proof, '-'), ' ' ORDER BY proof) AS value FROM deliveries
                  WHERE kind = 'certificate' AND status = 'delivered' HAVING count(*) = 2";
    let both = env.wait_until("both certificates are delivered", move |c| text(c, proofs, &[])).await;
    assert_eq!(both, "gateway terminal", "each delivery records the proof it has");
    let dead = env.db(|c| count(c, "SELECT count(*) FROM dead_letters", &[])).await;
    assert_eq!(dead, 0);
    env.stop().await;
}

/// rabbit_hash is a RabbitMQ password hash (`rabbit_password_hashing_sha256`): base64 of a 4-byte
/// salt followed by SHA-256(salt ++ password).
fn rabbit_hash(password: &str) -> String {
    use base64::Engine;
    let salt: [u8; 4] = rand::random();
    let mut salted = salt.to_vec();
    salted.extend_from_slice(password.as_bytes());
    let mut hash = salt.to_vec();
    hash.extend_from_slice(&openssl::sha::sha256(&salted));
    base64::engine::general_purpose::STANDARD.encode(hash)
}

/// BrokerUsers is the shipped definitions loaded into a test's vhost, each user renamed with the
/// test's prefix and given a password of the test's: removed again when dropped.
struct BrokerUsers {
    prefix: String,
    users: Vec<String>,
}

impl BrokerUsers {
    /// BrokerUsers::named picks the users' names; nothing exists on the broker yet.
    fn named() -> BrokerUsers {
        BrokerUsers { prefix: format!("t{}", &Uuid::new_v4().simple().to_string()[..8]), users: Vec::new() }
    }

    /// BrokerUsers::load imports the shipped definitions into `vhost`, under the picked names.
    fn load(&mut self, vhost: &str) {
        let prefix = self.prefix.clone();
        let text = std::fs::read_to_string("ops/rabbitmq/definitions.json").expect("the shipped definitions");
        let mut definitions: Value = serde_json::from_str(&text).unwrap();
        let mut users = Vec::new();
        for user in definitions["users"].as_array_mut().unwrap() {
            let name = format!("{prefix}-{}", user["name"].as_str().unwrap());
            user["password_hash"] = json!(rabbit_hash(&format!("pw-{name}")));
            user["name"] = json!(name);
            users.push(name);
        }
        definitions["vhosts"][0]["name"] = json!(vhost);
        for section in ["permissions", "topic_permissions", "policies"] {
            for entry in definitions[section].as_array_mut().unwrap() {
                entry["vhost"] = json!(vhost);
                if let Some(user) = entry.get("user").and_then(Value::as_str) {
                    entry["user"] = json!(format!("{prefix}-{user}"));
                }
            }
        }
        let file = std::env::temp_dir().join(format!("{prefix}-definitions.json"));
        std::fs::write(&file, serde_json::to_vec(&definitions).unwrap()).unwrap();
        self.users = users;
        rabbitmqctl(&["import_definitions", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(file);
    }

    fn user(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn url(&self, role: &str, vhost: &str) -> String {
        let user = self.user(role);
        format!("amqp://{user}:pw-{user}@127.0.0.1:5672/{vhost}")
    }
}

impl Drop for BrokerUsers {
    fn drop(&mut self) {
        for user in &self.users {
            let _ = std::process::Command::new("rabbitmqctl").args(["-q", "delete_user", user]).output();
        }
    }
}

/// publish_as publishes one message as a broker user and waits for the broker's confirm: the
/// broker's refusal (it closes the channel) is the error.
async fn publish_as(
    url: &str,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    user_id: Option<&str>,
) -> Result<(), String> {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
    let mut properties = BasicProperties::default().with_message_id(Uuid::now_v7().to_string().into());
    if let Some(user) = user_id {
        properties = properties.with_user_id(user.into());
    }
    let outcome = async {
        let confirm = channel
            .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, properties)
            .await
            .map_err(|e| e.to_string())?;
        let confirmation = confirm.await.map_err(|e| e.to_string())?;
        if confirmation.is_nack() {
            return Err("nacked".to_string());
        }
        // A refused publish closes the channel asynchronously: a round trip after it shows it.
        channel.basic_qos(1, lapin::options::BasicQosOptions::default()).await.map_err(|e| e.to_string())
    }
    .await;
    let _ = connection.close(200, "done".into()).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_broker_definitions_keep_each_party_to_its_own_messages_and_assetflow_checks_who_published() {
    // The vhost gets the shipped users, permissions and policies; assetflow itself connects as
    // before. Its partners and gateways are known by their broker users alone: no key is registered.
    let mut users = BrokerUsers::named();
    let party = |role: &str| json!({"broker_user": users.user(role)});
    let mut env = Env::with(json!({
        "partners": {"card-co": party("partner-card-co"), "bank-a": party("partner-bank-a")},
        "gateways": {"gw-mobile": party("gateway-gw-mobile"), "gw-home": party("gateway-gw-home")},
        "issuers": {"tokyo-hall": party("issuer-tokyo-hall")},
    }))
    .await;
    let vhost = env.config.amqp.url.rsplit('/').next().unwrap().to_string();
    let loading = vhost.clone();
    let users = tokio::task::spawn_blocking(move || {
        users.load(&loading);
        users
    })
    .await
    .unwrap();
    env.product("concert", |_| {}).await;
    env.product("hall-show", |p| p.issuer_id = "tokyo-hall".into()).await;
    let alice = env.terminal("alice", "gw-mobile", Some("card-co")).await;
    env.start().await;
    let names = env.app.plumbing.names.clone();
    let (requests, internal) = (names.requests(), names.internal());
    let url = |role: &str| users.url(role, &vhost);
    let receipt_body = serde_json::to_vec(&json!({"type": "delivery.receipt"})).unwrap();
    let result_body = serde_json::to_vec(&json!({"type": "settlement.result"})).unwrap();
    let change_body = serde_json::to_vec(&json!({"type": "issuer.change"})).unwrap();

    // What the broker itself refuses.
    let gateway = url("gateway-gw-mobile");
    let refusals = [
        (
            "a gateway publishing a settlement result",
            publish_as(&gateway, &requests, kinds::SETTLEMENT_RESULT, &result_body, None).await,
            "ACCESS_REFUSED",
        ),
        (
            "a gateway publishing to the internal exchange",
            publish_as(&gateway, &internal, "replay.settlement", &result_body, None).await,
            "ACCESS_REFUSED",
        ),
        (
            "an issuer publishing a settlement result",
            publish_as(&url("issuer-tokyo-hall"), &requests, kinds::SETTLEMENT_RESULT, &result_body, None).await,
            "ACCESS_REFUSED",
        ),
        (
            "a gateway publishing an issuer's change",
            publish_as(&gateway, &requests, kinds::ISSUER_CHANGE, &change_body, None).await,
            "ACCESS_REFUSED",
        ),
        (
            "a partner publishing a delivery receipt",
            publish_as(&url("partner-card-co"), &requests, kinds::DELIVERY_RECEIPT, &receipt_body, None).await,
            "ACCESS_REFUSED",
        ),
        (
            "a gateway claiming a partner's user_id",
            publish_as(
                &gateway,
                &requests,
                kinds::DELIVERY_RECEIPT,
                &receipt_body,
                Some(&users.user("partner-card-co")),
            )
            .await,
            "PRECONDITION_FAILED",
        ),
    ];
    for (what, outcome, code) in &refusals {
        let error = outcome.as_ref().err().unwrap_or_else(|| panic!("the broker let through {what}"));
        assert!(error.contains(code), "{what}: {error}");
    }
    publish_as(
        &gateway,
        &requests,
        "order.purchase",
        &serde_json::to_vec(&purchase(&alice, "concert", 1, json!({}))).unwrap(),
        Some(&users.user("gateway-gw-mobile")),
    )
    .await
    .expect("a gateway may publish a purchase, under its own user_id");

    // What assetflow refuses: answers the broker let through, from the wrong party.
    let rid = {
        let sql = "SELECT request_id AS value FROM orders";
        env.wait_until("the order is placed", move |c| text(c, sql, &[])).await
    };
    let (settlement, _) = instructed(&env, &rid).await;
    let result = serde_json::to_vec(&settled(settlement, "card-co", "CC-1")).unwrap();
    let bank = url("partner-bank-a");
    publish_as(&bank, &requests, kinds::SETTLEMENT_RESULT, &result, Some(&users.user("partner-bank-a"))).await.unwrap();
    let card = url("partner-card-co");
    let unnamed = altered(&result, "partner_reference", json!("CC-2"));
    publish_as(&card, &requests, kinds::SETTLEMENT_RESULT, &unnamed, None).await.unwrap();
    for (what, body) in [("a result from bank-a's user", &result), ("a result without a user_id", &unnamed)] {
        let hash = crypto::sha256_hex(body);
        let reason =
            env.wait_until(&format!("{what} is dead-lettered"), move |c| text(c, DEAD_LETTER_REASON, &[&hash])).await;
        assert_eq!(reason, "unauthenticated_party", "{what}");
    }
    let genuine = altered(&result, "partner_reference", json!("CC-3"));
    publish_as(&card, &requests, kinds::SETTLEMENT_RESULT, &genuine, Some(&users.user("partner-card-co")))
        .await
        .unwrap();
    let certificate = take(&env, "gw-mobile", "certificate", 1).await;

    let ack = acknowledge(&certificate.message, certificate.message_id, &certificate.message.content, &alice.key);
    let receipt = serde_json::to_vec(&receipt(&certificate, Some(ack))).unwrap();
    let home = url("gateway-gw-home");
    publish_as(&home, &requests, kinds::DELIVERY_RECEIPT, &receipt, Some(&users.user("gateway-gw-home")))
        .await
        .unwrap();
    let hash = crypto::sha256_hex(&receipt);
    let reason = env
        .wait_until("gw-home's receipt for gw-mobile's delivery is dead-lettered", move |c| {
            text(c, DEAD_LETTER_REASON, &[&hash])
        })
        .await;
    assert_eq!(reason, "unauthenticated_party");
    assert_eq!(delivery_of(&env, &rid, "certificate").await, "sent -");
    let again = altered(&receipt, "received_at", json!(Utc::now()));
    publish_as(&gateway, &requests, kinds::DELIVERY_RECEIPT, &again, Some(&users.user("gateway-gw-mobile")))
        .await
        .unwrap();
    let r = rid.clone();
    env.wait_until("gw-mobile's own receipt completes the delivery", move |c| {
        let sql = "SELECT d.proof AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
                   WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'";
        text(c, sql, &[&r])
    })
    .await;

    // An issuer known by its broker user alone: its change is taken under its own user_id only.
    let change = json!({
        "type": kinds::ISSUER_CHANGE, "reference": "th-1", "issuer_id": "tokyo-hall", "sent_at": Utc::now(),
        "product_id": "hall-show", "description": "A new date.", "reply_by": Utc::now() + chrono::TimeDelta::hours(1),
        "default_answer": "refund",
    });
    let change = serde_json::to_vec(&change).unwrap();
    let issuer = url("issuer-tokyo-hall");
    publish_as(&issuer, &requests, kinds::ISSUER_CHANGE, &change, None).await.unwrap();
    let hash = crypto::sha256_hex(&change);
    let reason = env
        .wait_until("the change without a user_id is dead-lettered", move |c| text(c, DEAD_LETTER_REASON, &[&hash]))
        .await;
    assert_eq!(reason, "unauthenticated_party");
    let change = altered(&change, "reference", json!("th-2"));
    publish_as(&issuer, &requests, kinds::ISSUER_CHANGE, &change, Some(&users.user("issuer-tokyo-hall")))
        .await
        .unwrap();
    env.wait_until("the issuer's change under its own user_id is taken", |c| {
        let sql =
            "SELECT reference AS value FROM issuer_changes WHERE issuer_id = 'tokyo-hall' AND announced_by = 'issuer'";
        text(c, sql, &[])
    })
    .await;
    env.stop().await;
}

/// publish_with_headers publishes on the requests exchange, as an outsider, with AMQP headers of
/// its choosing.
async fn publish_with_headers(env: &Env, routing_key: &str, body: &[u8], headers: &[(&str, &str)]) {
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let mut table = FieldTable::default();
    for (key, value) in headers {
        table.insert((*key).into(), AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())));
    }
    let channel = crate::support::channel(env).await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let properties = BasicProperties::default()
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_type(routing_key.into())
        .with_headers(table);
    let requests = env.app.plumbing.names.requests();
    let confirm = channel
        .basic_publish(requests.as_str().into(), routing_key.into(), BasicPublishOptions::default(), body, properties)
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack(), "the broker took it");
    let _ = channel.close(200, "published".into()).await;
}

/// The replay headers (`x-assetflow-received-at`, `x-assetflow-user-id`) carry an operator-replayed
/// message's original arrival and sender; set by an outsider on the requests exchange they change
/// nothing: a stale request stays stale, and a result is still judged by who really published it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_headers_set_from_outside_are_ignored() {
    let mut env = Env::with(json!({"partners": {"card-co": {"broker_user": "partner-card-co-elsewhere"}}})).await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    let now = Utc::now().to_rfc3339();

    let mut stale = purchase(&alice, "concert", 1, json!({}));
    stale["sent_at"] = json!(Utc::now() - chrono::Duration::minutes(10));
    crypto::sign_document(&alice.key, &mut stale).unwrap();
    let body = serde_json::to_vec(&stale).unwrap();
    publish_with_headers(&env, kinds::ORDER_PURCHASE, &body, &[("x-assetflow-received-at", &now)]).await;
    let rid = request_id(&stale);
    let reason = env
        .wait_until("the stale request is refused", move |c| {
            text(c, "SELECT reason AS value FROM refusals WHERE request_id = $1", &[&rid])
        })
        .await;
    assert_eq!(reason, "stale_request", "its age is its real one");

    let order = purchase(&alice, "concert", 1, json!({}));
    env.send(&order).await;
    let (settlement, _) = instructed(&env, &request_id(&order)).await;
    let result = serde_json::to_vec(&settled(settlement, "card-co", "CC-1")).unwrap();
    let claimed = [("x-assetflow-user-id", "partner-card-co-elsewhere"), ("x-assetflow-received-at", now.as_str())];
    publish_with_headers(&env, kinds::SETTLEMENT_RESULT, &result, &claimed).await;
    let hash = crypto::sha256_hex(&result);
    let reason = env.wait_until("the result is dead-lettered", move |c| text(c, DEAD_LETTER_REASON, &[&hash])).await;
    assert_eq!(reason, "unauthenticated_party", "its sender is who published it");
    env.stop().await;
}
