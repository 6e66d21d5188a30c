//! Messages handled together: a pool's handler takes the messages already waiting for it and
//! carries them out in one transaction. Each keeps its own inbox row, so none has a second effect,
//! and one that fails takes none of the others with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use assetflow::cli::simulate;
use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use assetflow::config::workers::PoolDefinitions;
use assetflow::contracts::dead_letter::DeadLetterReason;
use assetflow::contracts::messages::{SettlementOutcome, SettlementResult, kinds};
use assetflow::contracts::topology::Pool;
use assetflow::domain::catalogue::PartyKind;
use assetflow::runtime::consumer::{Cx, Dispatch, Failure, Handler, Incoming, Received, Work, handle_together};
use assetflow::runtime::outbox::Outgoing;
use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{Env, count};
use crate::support::settle_all;

/// Recorder writes one outbox row per message it carries out, and fails the ones that ask it to.
#[derive(Default)]
struct Recorder {
    calls: AtomicUsize,
}

impl Handler for Recorder {
    type Message = Value;
    const MESSAGE_TYPE: &'static str = "test.recorded";

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, Value>]) -> Result<(), Failure> {
        let [Received { message, incoming }] = batch else { panic!("a batch of one, as handlers take by default") };
        self.calls.fetch_add(1, Ordering::SeqCst);
        if message["panic"] == json!(true) {
            panic!("told to panic");
        }
        if message["fail"] == json!(true) {
            return Err(Failure::permanent(DeadLetterReason::Unprocessable, "told to fail"));
        }
        cx.publish(Outgoing {
            message_id: Uuid::now_v7(),
            exchange: "test".into(),
            routing_key: incoming.message_id.clone(),
            message_type: "test.recorded".into(),
            correlation_id: None,
            headers: json!({}),
            payload: incoming.body.clone(),
            available_at: None,
        });
        Ok(())
    }
}

fn incoming(message_id: &str, json: Value) -> Incoming {
    Incoming {
        queue: "test".into(),
        message_id: message_id.into(),
        message_type: "test.recorded".into(),
        exchange: String::new(),
        routing_key: String::new(),
        correlation_id: None,
        user_id: None,
        body: serde_json::to_vec(&json).unwrap(),
        json,
        delivery_count: 0,
        received_at: Utc::now(),
        first_received_at: Utc::now(),
    }
}

async fn together(env: &Env, handler: &Arc<Recorder>, messages: &[Incoming]) -> Result<Vec<bool>, Failure> {
    let handoff = env.app.plumbing.handoff.clone();
    let handler: Arc<dyn Dispatch> = handler.clone();
    let work: Vec<Work> = messages.iter().map(|m| (handler.clone(), m.clone(), tracing::Span::none())).collect();
    env.app.plumbing.db.run(move |conn| handle_together(conn, &handoff, Pool::Issuance.as_str(), &work)).await
}

async fn rows(env: &Env, sql: &'static str) -> i64 {
    env.db(move |c| count(c, sql, &[])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_handled_together_commit_together_and_one_failure_undoes_them_all() {
    let env = Env::new().await;
    let handler = Arc::new(Recorder::default());
    let inbox = "SELECT count(*) FROM inbox WHERE pool = 'issuance'";
    let outbox = "SELECT count(*) FROM outbox WHERE message_type = 'test.recorded'";
    let (a, b) = (incoming("a", json!({"n": 1})), incoming("b", json!({"n": 2})));

    // One fails: nothing of the others stays, not even their inbox rows, so each can be handled
    // again on its own.
    let failing = incoming("c", json!({"fail": true}));
    let outcome = together(&env, &handler, &[a.clone(), failing, b.clone()]).await;
    assert!(matches!(outcome, Err(Failure::Permanent { .. })), "the failure is returned: {outcome:?}");
    assert_eq!(rows(&env, inbox).await, 0, "the inbox rows were rolled back");
    assert_eq!(rows(&env, outbox).await, 0, "the effects were rolled back");

    // One panics: the same, and the panic is the failure, as a dead letter's reason and detail.
    let panicking = incoming("e", json!({"panic": true}));
    match together(&env, &handler, &[a.clone(), panicking, b.clone()]).await {
        Err(Failure::Permanent { reason: DeadLetterReason::HandlerFailed, detail }) => {
            assert!(detail.contains("told to panic"), "{detail}")
        }
        other => panic!("a panic is a permanent failure, not {other:?}"),
    }
    assert_eq!(rows(&env, inbox).await, 0, "the inbox rows were rolled back");
    assert_eq!(rows(&env, outbox).await, 0, "the effects were rolled back");

    // All succeed: all commit. A message id twice in one batch is carried out once.
    let calls = handler.calls.load(Ordering::SeqCst);
    let outcome = together(&env, &handler, &[a.clone(), b.clone(), a.clone()]).await.expect("committed");
    assert_eq!(outcome, vec![true, true, false]);
    assert_eq!(handler.calls.load(Ordering::SeqCst) - calls, 2, "the repeated id was not handled again");
    assert_eq!(rows(&env, inbox).await, 2);
    assert_eq!(rows(&env, outbox).await, 2);

    // Again, with one new message among them: only that one is carried out.
    let c = incoming("d", json!({"n": 3}));
    let outcome = together(&env, &handler, &[b, c, a]).await.expect("committed");
    assert_eq!(outcome, vec![false, true, false]);
    assert_eq!(rows(&env, inbox).await, 3);
    assert_eq!(rows(&env, outbox).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_waiting_together_all_complete_and_a_bad_message_among_them_is_dead_lettered_alone() {
    // One handler: while it carries out the first message, the others arrive and wait for it.
    let mut pools = PoolDefinitions::built_in();
    pools.settlement.pool.concurrency = 1;
    let mut env = Env::with_pools(json!({}), pools).await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;

    // Everything is on the settlement queue before a handler runs, so the handlers find it
    // waiting: good orders and answers for settlements that do not exist, mixed.
    let orders = 24;
    for n in 0..orders {
        env.send(&purchase(&alice, "concert", 1, json!({}))).await;
        if n % 8 == 0 {
            let unknown = SettlementResult {
                message_type: kinds::SETTLEMENT_RESULT.into(),
                settlement_id: Uuid::now_v7(),
                partner_id: "card-co".into(),
                outcome: SettlementOutcome::Settled,
                partner_reference: format!("UNKNOWN-{n}"),
                reason: None,
                sent_at: Utc::now(),
                signature: None,
            };
            env.publish(kinds::SETTLEMENT_RESULT, &serde_json::to_vec(&unknown).unwrap()).await;
        }
    }
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let delivered = "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'delivered'";
    env.wait_until("every order's certificate is delivered", move |c| {
        (count(c, delivered, &[]) == orders).then_some(())
    })
    .await;
    let dead = "SELECT count(*) FROM dead_letters WHERE reason = 'unknown_settlement'";
    env.wait_until("the three unknown answers are dead-lettered", move |c| (count(c, dead, &[]) == 3).then_some(()))
        .await;

    assert_eq!(rows(&env, "SELECT count(*) FROM orders").await, orders, "one order per request");
    assert_eq!(rows(&env, "SELECT count(*) FROM settlements").await, orders, "one settlement per order");
    assert_eq!(rows(&env, "SELECT count(*) FROM assets").await, orders, "one asset per order");
    assert_eq!(rows(&env, "SELECT count(*) FROM deliveries").await, orders, "one delivery per asset");
    assert_eq!(rows(&env, "SELECT count(*) FROM dead_letters").await, 3, "nothing else was dead-lettered");
    // Messages carried out together share their transaction's start, `now()`, as `processed_at`.
    let shared = "SELECT count(*) FROM (SELECT processed_at FROM inbox WHERE pool = 'settlement'
                  GROUP BY processed_at HAVING count(*) > 1) AS together";
    assert!(rows(&env, shared).await > 0, "some messages were carried out together");
    env.stop().await;
}

/// Sent is a delivery attempt that went out and has no receipt yet.
#[derive(diesel::QueryableByName)]
struct Sent {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    delivery_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Text)]
    terminal_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    gateway_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    payload_sha256: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_handled_together_each_have_the_effect_they_have_alone() {
    use assetflow::domain::delivery::receipt::ReceiptHandler;
    use diesel::RunQueryDsl;

    // No gateway: the certificates go out and wait for receipts, which the test writes.
    let (mut env, _) = three_certificates_sent().await;
    let attempts: Vec<Sent> = env
        .db(|c| {
            diesel::sql_query(
                "SELECT d.id AS delivery_id, d.terminal_id, d.gateway_id, a.payload_sha256
                 FROM deliveries d JOIN delivery_attempts a ON a.delivery_id = d.id ORDER BY d.id",
            )
            .load(c)
            .unwrap()
        })
        .await;
    let gateway =
        simulate::party_key(&env.config, PartyKind::Gateway, "gw-1", &env.keys.join("parties")).await.unwrap();
    let receipt = |n: usize, message_id: &str, sha256: &str| {
        let a = &attempts[n];
        let mut receipt = json!({
            "type": kinds::DELIVERY_RECEIPT, "delivery_id": a.delivery_id, "attempt": 1,
            "gateway_id": a.gateway_id, "terminal_id": a.terminal_id, "sha256": sha256,
            "received_at": Utc::now(),
        });
        assetflow::crypto::sign_document(&gateway, &mut receipt).unwrap();
        incoming(message_id, receipt)
    };
    // The first right; the second right twice, by two messages (a gateway that sent it again);
    // the third with the hash of other bytes.
    let batch = vec![
        receipt(0, "r0", &attempts[0].payload_sha256),
        receipt(1, "r1", &attempts[1].payload_sha256),
        receipt(1, "r1-again", &attempts[1].payload_sha256),
        receipt(2, "r2", &"0".repeat(64)),
    ];
    let fresh = handled(
        &env,
        Pool::Delivery,
        Arc::new(ReceiptHandler { deliveries: env.app.domain.deliveries.clone() }),
        batch,
    )
    .await;
    assert_eq!(fresh, vec![true; 4], "four new messages");

    let statuses: Vec<(String, String)> = env
        .db(|c| {
            #[derive(diesel::QueryableByName)]
            struct Outcome {
                #[diesel(sql_type = diesel::sql_types::Text)]
                status: String,
                #[diesel(sql_type = diesel::sql_types::Text)]
                outcome: String,
            }
            diesel::sql_query(
                "SELECT d.status, a.outcome FROM deliveries d JOIN delivery_attempts a ON a.delivery_id = d.id ORDER BY d.id",
            )
            .load::<Outcome>(c)
            .unwrap()
            .into_iter()
            .map(|o| (o.status, o.outcome))
            .collect()
        })
        .await;
    assert_eq!(statuses[0], ("delivered".into(), "acknowledged".into()), "the right receipt completes its delivery");
    assert_eq!(statuses[1], ("delivered".into(), "acknowledged".into()), "a second receipt changes nothing");
    assert_eq!(statuses[2], ("failed".into(), "hash_mismatch".into()), "a wrong hash fails the attempt");
    assert_eq!(rows(&env, "SELECT count(*) FROM orders WHERE status = 'issued'").await, 3, "the orders stay issued");
    env.stop().await;
}

/// three_certificates_sent starts a service with a partner that settles everything and no
/// gateway, and waits until three orders' certificates are sent to their terminal, alice, which
/// acknowledges nothing: what happens to them next is the test's.
async fn three_certificates_sent() -> (Env, SimTerminal) {
    let mut env = Env::new().await;
    // The gateway's receipt alone completes them: these tests are about receipts, not proofs.
    env.product("concert", |p| p.proof_of_delivery = "gateway".into()).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    for _ in 0..3 {
        env.send(&purchase(&alice, "concert", 1, json!({}))).await;
    }
    env.start().await;
    env.partner(settle_all());
    let sent = "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'sent'";
    env.wait_until("three certificates are sent", move |c| (count(c, sent, &[]) == 3).then_some(())).await;
    (env, alice)
}

/// request is a terminal request as a pool receives it, under its own type.
fn request(message_id: &str, json: &Value) -> Incoming {
    Incoming { message_type: json["type"].as_str().unwrap().into(), ..incoming(message_id, json.clone()) }
}

/// handled carries out requests together, with the handler of their type, as a pool's batch.
async fn handled(env: &Env, pool: Pool, handler: Arc<dyn Dispatch>, batch: Vec<Incoming>) -> Vec<bool> {
    let handoff = env.app.plumbing.handoff.clone();
    let work: Vec<Work> = batch.into_iter().map(|m| (handler.clone(), m, tracing::Span::none())).collect();
    env.app.plumbing.db.run(move |conn| handle_together(conn, &handoff, pool.as_str(), &work)).await.expect("committed")
}

fn outcome_of(conn: &mut diesel::PgConnection, request: &Value) -> Option<String> {
    let rid = crate::support::request_id(request);
    crate::harness::text(
        conn,
        "SELECT outcome || coalesce(':' || reason, '') AS value FROM terminal_requests WHERE request_id = $1",
        &[&rid],
    )
}

/// assets_delivered places `orders` on a started service whose partner settles everything, waits
/// until every certificate they bought is delivered, then stops it: nothing but the test handles
/// what comes next, and the outbox keeps what it sends. It returns each order's assets, awaiting
/// their exchange, in id order.
async fn assets_delivered(env: &mut Env, orders: &[Value]) -> Vec<Vec<Uuid>> {
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    for order in orders {
        env.send(order).await;
    }
    let certificates: i64 = orders.iter().map(|o| o["quantity"].as_i64().expect("a quantity")).sum();
    let delivered = "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'delivered'";
    env.wait_until("every certificate is delivered", move |c| (count(c, delivered, &[]) == certificates).then_some(()))
        .await;
    env.stop().await;
    let placed: Vec<String> = orders.iter().map(crate::support::request_id).collect();
    env.db(move |c| {
        let sql = "SELECT string_agg(a.id::text, ',' ORDER BY a.id) AS value
                   FROM assets a JOIN orders o ON o.id = a.order_id
                   WHERE o.request_id = $1 AND a.status = 'awaiting_exchange'";
        placed
            .iter()
            .map(|order| {
                let ids = crate::harness::text(c, sql, &[order]).expect("the order's assets await their exchange");
                ids.split(',').map(|id| id.parse().unwrap()).collect()
            })
            .collect()
    })
    .await
}

/// partner_answer is card-co's signed answer to `settlement`, as a pool takes it.
async fn partner_answer(env: &Env, message_id: &str, settlement: &str, outcome: SettlementOutcome) -> Incoming {
    let result = SettlementResult {
        message_type: kinds::SETTLEMENT_RESULT.into(),
        settlement_id: settlement.parse().unwrap(),
        partner_id: "card-co".into(),
        outcome,
        partner_reference: format!("REF-{message_id}"),
        reason: (outcome == SettlementOutcome::Declined).then(|| "card account closed".into()),
        sent_at: Utc::now(),
        signature: None,
    };
    let signed = env.signed_by(PartyKind::Partner, "card-co", &result).await;
    request(message_id, &serde_json::from_slice(&signed).unwrap())
}

/// outbox_payloads is the payloads of the messages of `message_type` waiting in the outbox.
async fn outbox_payloads(env: &Env, message_type: &'static str) -> Vec<Value> {
    env.db(move |c| {
        #[derive(diesel::QueryableByName)]
        struct Payload {
            #[diesel(sql_type = diesel::sql_types::Jsonb)]
            payload: Value,
        }
        use diesel::RunQueryDsl;
        diesel::sql_query("SELECT convert_from(payload, 'UTF8')::jsonb AS payload FROM outbox WHERE message_type = $1")
            .bind::<diesel::sql_types::Text, _>(message_type)
            .load::<Payload>(c)
            .unwrap()
            .into_iter()
            .map(|p| p.payload)
            .collect()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_handled_together_each_have_the_effect_they_have_alone() {
    use assetflow::domain::settlement::PurchaseHandler;

    // Not started: nothing but the test handles the requests, and the outbox keeps what they send.
    let env = Env::new().await;
    let concert = env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let bob = env.terminal("bob", "gw-1", None).await;
    let stranger = SimTerminal { id: "stranger".into(), key: assetflow::crypto::generate_key_pair().unwrap() };
    let domain = &env.app.domain;
    let handler: Arc<dyn Dispatch> =
        Arc::new(PurchaseHandler { requests: domain.requests.clone(), settlements: domain.settlements.clone() });
    let seen = purchase(&alice, "concert", 1, json!({}));
    handled(&env, Pool::Settlement, handler.clone(), vec![request("seen", &seen)]).await;

    let two = purchase(&alice, "concert", 2, json!({}));
    let for_both = purchase(&alice, "concert", 1, json!({"recipient_terminal_ids": ["alice", "bob"]}));
    let mut forged = purchase(&alice, "concert", 1, json!({}));
    forged["quantity"] = json!(5);
    let nothing = purchase(&alice, "nothing", 1, json!({}));
    let unpaid = purchase(&bob, "concert", 1, json!({}));
    let unknown = purchase(&stranger, "concert", 1, json!({}));
    let batch = vec![
        request("two", &two),
        request("seen-again", &seen),
        request("forged", &forged),
        request("nothing", &nothing),
        request("unpaid", &unpaid),
        request("unknown", &unknown),
        request("for-both", &for_both),
    ];
    assert_eq!(handled(&env, Pool::Settlement, handler, batch).await, vec![true; 7], "seven new messages");

    let price = concert.price_minor;
    let (two_id, both_id) = (crate::support::request_id(&two), crate::support::request_id(&for_both));
    env.db(move |c| {
        assert_eq!(count(c, "SELECT count(*) FROM orders WHERE status = 'settling'", &[]), 3, "the two new orders and the first");
        assert_eq!(
            count(c, "SELECT amount_minor AS count FROM orders WHERE request_id = $1", &[&two_id]),
            2 * price,
            "quantity times price"
        );
        assert_eq!(
            count(
                c,
                "SELECT amount_minor AS count FROM orders
                 WHERE request_id = $1 AND recipient_terminal_ids = ARRAY['alice', 'bob']",
                &[&both_id]
            ),
            2 * price,
            "one each for two recipients"
        );
        assert_eq!(
            count(c, "SELECT count(*) FROM settlements s JOIN orders o ON o.id = s.order_id WHERE s.status = 'instructed' AND s.amount_minor = o.amount_minor AND s.answer_due_at > s.instructed_at", &[]),
            3,
            "each order has its settlement, due to be answered"
        );
        assert_eq!(
            count(c, "SELECT count(*) FROM terminal_requests r JOIN orders o ON o.request_id = r.request_id AND o.id = r.subject_id WHERE r.outcome = 'accepted'", &[]),
            3,
            "each accepted request names its order"
        );
        assert_eq!(outcome_of(c, &nothing).as_deref(), Some("refused:unknown_product"));
        assert_eq!(outcome_of(c, &unpaid).as_deref(), Some("refused:no_payment_method"));
        assert_eq!(outcome_of(c, &forged), None, "a forgery's request id is not recorded, so not burnt");
        assert_eq!(outcome_of(c, &unknown), None, "a stranger's request id is not recorded");
        for reason in ["bad_signature", "unknown_product", "no_payment_method", "unknown_terminal"] {
            let refused = count(c, "SELECT count(*) FROM refusals WHERE reason = $1", &[&reason]);
            assert_eq!(refused, 1, "refused once as {reason}");
        }
        assert_eq!(
            count(c, "SELECT count(*) FROM deliveries WHERE kind = 'refusal'", &[]),
            3,
            "the known terminals are told; the stranger is not"
        );
        assert_eq!(
            count(c, "SELECT count(*) FROM deliveries WHERE kind = 'message' AND dedupe_key = 'duplicate:seen-again' AND terminal_id = 'alice'", &[]),
            1,
            "the repeated request is answered with the first one's outcome"
        );
        assert_eq!(
            count(c, "SELECT count(*) FROM outbox WHERE message_type = 'settlement.instruction'", &[]),
            3,
            "one instruction per order, the repeated request's included once"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_handled_together_each_have_the_effect_they_have_alone() {
    use assetflow::cli::simulate::gateway::exchange_request;
    use assetflow::domain::issuance::ExchangeHandler;

    // No gateway: the certificates go out, and the test presents them.
    let (mut env, alice) = three_certificates_sent().await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    let certificates: Vec<Value> = env
        .db(|c| {
            #[derive(diesel::QueryableByName)]
            struct Content {
                #[diesel(sql_type = diesel::sql_types::Jsonb)]
                certificate: Value,
            }
            use diesel::RunQueryDsl;
            diesel::sql_query(
                "SELECT content->'certificate' AS certificate FROM deliveries WHERE kind = 'certificate' ORDER BY id",
            )
            .load::<Content>(c)
            .unwrap()
            .into_iter()
            .map(|c| c.certificate)
            .collect()
        })
        .await;
    let (a, b, c) = (&certificates[0], &certificates[1], &certificates[2]);
    let mut tampered = c.clone();
    tampered["holder_terminal_id"] = json!("bob");
    let mut never_issued = c.clone();
    never_issued["certificate_id"] = json!(Uuid::now_v7());
    assetflow::crypto::sign_document(&env.app.keys.provider().unwrap().key, &mut never_issued).unwrap();
    let handler: Arc<dyn Dispatch> =
        Arc::new(ExchangeHandler { requests: env.app.domain.requests.clone(), keys: env.app.keys.clone() });

    // All distinct: handled as a set.
    let a_by_alice = exchange_request("alice", a.clone(), &alice.key);
    let b_by_bob = exchange_request("bob", b.clone(), &bob.key);
    let forged = exchange_request("alice", tampered, &alice.key);
    let unknown = exchange_request("alice", never_issued, &alice.key);
    let batch = vec![
        request("a", &a_by_alice),
        request("b", &b_by_bob),
        request("forged", &forged),
        request("unknown", &unknown),
    ];
    assert_eq!(handled(&env, Pool::Issuance, handler.clone(), batch).await, vec![true; 4]);
    let (a_id, a_asset) =
        (a["certificate_id"].as_str().unwrap().to_string(), a["asset_id"].as_str().unwrap().to_string());
    let a_rid = crate::support::request_id(&a_by_alice);
    env.db(move |conn| {
        assert_eq!(count(conn, "SELECT count(*) FROM exchange_certificates WHERE exchanged_at IS NOT NULL", &[]), 1);
        assert_eq!(
            count(
                conn,
                "SELECT count(*) FROM exchange_certificates c JOIN reminder_schedule r ON r.certificate_id = c.id
                 WHERE c.id = $1::uuid AND c.exchange_request_id = $2 AND r.due_at IS NULL AND r.next_stage IS NULL",
                &[&a_id, &a_rid]
            ),
            1,
            "the certificate names its exchange, and its reminders end"
        );
        assert_eq!(
            count(
                conn,
                "SELECT count(*) FROM terminal_requests WHERE request_id = $1 AND outcome = 'accepted' AND subject_id = $2::uuid",
                &[&a_rid, &a_asset]
            ),
            1
        );
        assert_eq!(
            count(
                conn,
                "SELECT count(*) FROM deliveries WHERE kind = 'asset' AND asset_id = $1::uuid AND terminal_id = 'alice'",
                &[&a_asset]
            ),
            1,
            "the asset goes to its holder"
        );
        assert_eq!(count(conn, "SELECT count(*) FROM deliveries WHERE kind = 'asset'", &[]), 1);
        for reason in ["certificate_not_held", "certificate_forged", "certificate_unknown"] {
            let refused = count(conn, "SELECT count(*) FROM refusals WHERE reason = $1", &[&reason]);
            assert_eq!(refused, 1, "refused once as {reason}");
        }
        assert_eq!(count(conn, "SELECT count(*) FROM terminal_requests WHERE message_type = 'certificate.exchange' AND outcome = 'refused'", &[]), 3);
    })
    .await;

    // One certificate presented twice, and one already exchanged: handled one at a time, each
    // finding what the one before it did.
    let c_by_alice = exchange_request("alice", c.clone(), &alice.key);
    let batch = vec![
        request("a-again", &exchange_request("alice", a.clone(), &alice.key)),
        request("c", &c_by_alice),
        request("c-again", &exchange_request("alice", c.clone(), &alice.key)),
    ];
    assert_eq!(handled(&env, Pool::Issuance, handler, batch).await, vec![true; 3]);
    let c_rid = crate::support::request_id(&c_by_alice);
    env.db(move |conn| {
        assert_eq!(count(conn, "SELECT count(*) FROM refusals WHERE reason = 'certificate_already_exchanged'", &[]), 2);
        assert_eq!(
            count(conn, "SELECT count(*) FROM exchange_certificates WHERE exchange_request_id = $1", &[&c_rid]),
            1
        );
        assert_eq!(
            count(conn, "SELECT count(*) FROM deliveries WHERE kind = 'asset'", &[]),
            2,
            "each asset delivered once"
        );
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_settled_together_are_handed_on_in_one_message_at_each_hop() {
    use assetflow::contracts::messages::{DeliveryRequested, IssuanceRequested};
    use assetflow::domain::delivery::RequestedHandler;
    use assetflow::domain::issuance::IssueHandler;
    use assetflow::domain::settlement::{PurchaseHandler, ResultHandler};

    // Not started: the test hands each hop's outbox message to the next pool's handler.
    let env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let domain = &env.app.domain;
    let purchases: Vec<Incoming> =
        (0..3).map(|n| request(&format!("order-{n}"), &purchase(&alice, "concert", 1, json!({})))).collect();
    let handler =
        Arc::new(PurchaseHandler { requests: domain.requests.clone(), settlements: domain.settlements.clone() });
    handled(&env, Pool::Settlement, handler, purchases).await;

    let settlements: Vec<String> = env
        .db(|c| {
            crate::harness::text(c, "SELECT string_agg(id::text, ',' ORDER BY id) AS value FROM settlements", &[])
                .unwrap()
                .split(',')
                .map(str::to_string)
                .collect()
        })
        .await;
    assert_eq!(settlements.len(), 3, "three settlements instructed");
    let mut results = Vec::new();
    for (n, settlement) in settlements.iter().enumerate() {
        let result = SettlementResult {
            message_type: kinds::SETTLEMENT_RESULT.into(),
            settlement_id: settlement.parse().unwrap(),
            partner_id: "card-co".into(),
            outcome: SettlementOutcome::Settled,
            partner_reference: format!("ref-{n}"),
            reason: None,
            sent_at: Utc::now(),
            signature: None,
        };
        let signed = env.signed_by(PartyKind::Partner, "card-co", &result).await;
        results.push(request(&format!("result-{n}"), &serde_json::from_slice(&signed).unwrap()));
    }
    let handler = Arc::new(ResultHandler { settlements: domain.settlements.clone() });
    handled(&env, Pool::Settlement, handler, results).await;

    // next takes the one message of `message_type` waiting in the outbox, as its pool would.
    async fn next<T: serde::de::DeserializeOwned>(env: &Env, message_type: &'static str) -> (Incoming, T) {
        let payloads = outbox_payloads(env, message_type).await;
        let [payload] = payloads.as_slice() else { panic!("one {message_type} for the whole batch, not {payloads:?}") };
        (request(message_type, payload), serde_json::from_value(payload.clone()).unwrap())
    }

    let (issuance, asked): (_, IssuanceRequested) = next(&env, kinds::ISSUANCE_REQUESTED).await;
    assert_eq!(asked.order_ids.len(), 3, "the three orders settled together are named by one message");
    let handler = Arc::new(IssueHandler { issuer: domain.issuer.clone() });
    handled(&env, Pool::Issuance, handler, vec![issuance]).await;

    let (sending, asked): (_, DeliveryRequested) = next(&env, kinds::DELIVERY_REQUESTED).await;
    assert_eq!(asked.delivery_ids.len(), 3, "the three certificates issued together are sent for by one message");
    let handler = Arc::new(RequestedHandler { deliveries: domain.deliveries.clone() });
    handled(&env, Pool::Delivery, handler, vec![sending]).await;
    env.db(|c| {
        assert_eq!(count(c, "SELECT count(*) FROM orders WHERE status = 'issued'", &[]), 3, "every order issued");
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'sent'", &[]), 3);
        assert_eq!(
            count(c, "SELECT count(*) FROM outbox WHERE message_type = 'delivery'", &[]),
            3,
            "one to each terminal"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuance_request_in_the_one_order_form_is_still_issued() {
    // A message queued by a build that named one order (`order_id`) before an upgrade.
    let mut env = Env::new().await;
    env.product("concert", |p| p.proof_of_delivery = "gateway".into()).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.send(&purchase(&alice, "concert", 1, json!({}))).await;
    env.start().await;
    // The partner never answers: the test settles the order and asks for its issuance itself.
    let settling = "SELECT count(*) FROM orders WHERE status = 'settling'";
    env.wait_until("the order waits for its payment", move |c| (count(c, settling, &[]) == 1).then_some(())).await;
    let order_id = env
        .db(|c| {
            use diesel::RunQueryDsl;
            diesel::sql_query("UPDATE orders SET status = 'issuing'").execute(c).unwrap();
            crate::harness::text(c, "SELECT id::text AS value FROM orders", &[]).unwrap()
        })
        .await;
    let old = json!({"type": kinds::ISSUANCE_REQUESTED, "order_id": order_id});
    env.publisher
        .publish(
            &env.app.plumbing.names.internal(),
            kinds::ISSUANCE_REQUESTED,
            kinds::ISSUANCE_REQUESTED,
            &serde_json::to_vec(&old).unwrap(),
        )
        .await
        .unwrap();
    let issued = "SELECT count(*) FROM orders WHERE status = 'issued'";
    env.wait_until("the order is issued", move |c| (count(c, issued, &[]) == 1).then_some(())).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_asked_and_answered_together_each_have_the_effect_they_have_alone() {
    use assetflow::cli::simulate::gateway::refund_request;
    use assetflow::domain::settlement::{RefundHandler, ResultHandler};

    use crate::harness::text;
    use crate::support::{asset_status, request_id};

    // Started until every certificate is delivered, then stopped: nothing but the test handles the
    // refunds and the partner's answers, and the outbox keeps what they send.
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    let orders = [
        purchase(&alice, "concert", 2, json!({})),
        purchase(&alice, "concert", 1, json!({})),
        purchase(&alice, "concert", 1, json!({})),
        purchase(&bob, "concert", 1, json!({})),
    ];
    let held = assets_delivered(&mut env, &orders).await;
    assert_eq!(held.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1, 1, 1]);
    // Alice holds both assets of one order (`pair`), one of another (`single`) and one she asks
    // a refund of first (`earlier`); bob holds one.
    let (pair, single, earlier, bobs) = ((held[0][0], held[0][1]), held[1][0], held[2][0], held[3][0]);

    let domain = &env.app.domain;
    let refunds: Arc<dyn Dispatch> =
        Arc::new(RefundHandler { requests: domain.requests.clone(), settlements: domain.settlements.clone() });
    let seen = refund_request("alice", earlier, &alice.key);
    assert_eq!(handled(&env, Pool::Settlement, refunds.clone(), vec![request("seen", &seen)]).await, vec![true]);

    // All distinct: handled as a set, the two refunds of one order written by one statement, which
    // keeps the order's refunds within its payment seeing both.
    let first = refund_request("alice", pair.0, &alice.key);
    let second = refund_request("alice", pair.1, &alice.key);
    let not_held = refund_request("alice", bobs, &alice.key);
    let unknown = refund_request("alice", Uuid::now_v7(), &alice.key);
    let mut forged = refund_request("bob", bobs, &bob.key);
    forged["asset_id"] = json!(Uuid::now_v7());
    let batch = vec![
        request("first", &first),
        request("seen-again", &seen),
        request("not-held", &not_held),
        request("second", &second),
        request("unknown", &unknown),
        request("forged", &forged),
    ];
    assert_eq!(handled(&env, Pool::Settlement, refunds.clone(), batch).await, vec![true; 6], "six new messages");

    // One asset asked for twice: handled one at a time, the second finding the first under way.
    let single_first = refund_request("alice", single, &alice.key);
    let single_again = refund_request("alice", single, &alice.key);
    let batch = vec![request("single", &single_first), request("single-again", &single_again)];
    assert_eq!(handled(&env, Pool::Settlement, refunds, batch).await, vec![true; 2]);

    let (first_id, single_id) = (request_id(&first), request_id(&single_first));
    let (seen_id, together) = (request_id(&seen), [first_id.clone(), request_id(&second)]);
    let pair_order = request_id(&orders[0]);
    env.db(move |c| {
        for accepted in [&seen, &first, &second, &single_first] {
            assert_eq!(outcome_of(c, accepted).as_deref(), Some("accepted"), "{accepted}");
        }
        assert_eq!(outcome_of(c, &not_held).as_deref(), Some("refused:asset_not_held"));
        assert_eq!(outcome_of(c, &unknown).as_deref(), Some("refused:asset_unknown"));
        assert_eq!(outcome_of(c, &single_again).as_deref(), Some("refused:refund_pending"));
        assert_eq!(outcome_of(c, &forged), None, "a forgery's request id is not recorded");
        for reason in ["asset_not_held", "asset_unknown", "refund_pending", "bad_signature"] {
            let refused = count(c, "SELECT count(*) FROM refusals WHERE reason = $1", &[&reason]);
            assert_eq!(refused, 1, "refused once as {reason}");
        }
        assert_eq!(count(c, "SELECT count(*) FROM refusals", &[]), 4, "nothing else was refused");
        assert_eq!(
            count(c, "SELECT count(*) FROM deliveries WHERE kind = 'message' AND dedupe_key = 'duplicate:seen-again' AND terminal_id = 'alice'", &[]),
            1,
            "the repeated request is answered with the first one's outcome"
        );
        assert_eq!(count(c, "SELECT count(*) FROM refunds WHERE request_id = $1", &[&seen_id]), 1, "and has no second effect");

        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id
                 WHERE r.status = 'requested' AND r.cause = 'holder' AND r.answered_at IS NULL
                   AND r.amount_minor = o.amount_minor / o.quantity",
                &[]
            ),
            4,
            "one refund per accepted request, each of its asset's share of the order"
        );
        assert_eq!(count(c, "SELECT count(*) FROM refunds", &[]), 4);
        assert_eq!(
            count(
                c,
                "SELECT sum(r.amount_minor)::int8 - min(o.amount_minor) AS count FROM refunds r
                 JOIN orders o ON o.id = r.order_id WHERE o.request_id = $1",
                &[&pair_order]
            ),
            0,
            "both assets of the order: all it paid"
        );
        assert_eq!(
            count(c, "SELECT count(DISTINCT requested_at) FROM refunds WHERE request_id IN ($1, $2)", &[&together[0], &together[1]]),
            1,
            "the two were recorded together"
        );
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM refunds r JOIN settlements s ON s.id = r.settlement_id
                 WHERE s.kind = 'refund' AND s.status = 'instructed' AND s.order_id = r.order_id
                   AND s.amount_minor = r.amount_minor AND s.partner_id = 'card-co' AND s.payer_terminal_id = 'alice'
                   AND s.answer_due_at > s.instructed_at",
                &[]
            ),
            4,
            "each refund has its settlement through the partner that was paid, due to be answered"
        );
        assert_eq!(count(c, "SELECT count(*) FROM settlements WHERE kind = 'refund'", &[]), 4);
        let instructions = "SELECT count(*) FROM outbox o JOIN refunds r
                            ON convert_from(o.payload, 'UTF8')::jsonb->>'settlement_id' = r.settlement_id::text
                            WHERE o.message_type = 'settlement.instruction'
                              AND convert_from(o.payload, 'UTF8')::jsonb->>'kind' = 'refund'";
        assert_eq!(count(c, instructions, &[]), 4, "one instruction per refund");
        let refunding = "SELECT count(*) FROM outbox WHERE message_type = 'settlement.instruction'
                         AND convert_from(payload, 'UTF8')::jsonb->>'kind' = 'refund'";
        assert_eq!(count(c, refunding, &[]), 4, "and no other");
        let untouched = "SELECT count(*) FROM assets WHERE status = 'awaiting_exchange'";
        assert_eq!(count(c, untouched, &[]), 5, "nothing changes for an asset until the partner confirms");
    })
    .await;

    // answer is the partner's signed answer to the refund asked for by request `id`, as a pool
    // takes it.
    async fn answer(env: &Env, message_id: &str, id: &str, outcome: SettlementOutcome) -> Incoming {
        let id = id.to_string();
        let settlement = env
            .db(move |c| {
                crate::harness::text(
                    c,
                    "SELECT settlement_id::text AS value FROM refunds WHERE request_id = $1",
                    &[&id],
                )
            })
            .await
            .expect("the request's refund");
        partner_answer(env, message_id, &settlement, outcome).await
    }
    let settled = answer(&env, "settled", &first_id, SettlementOutcome::Settled).await;
    let declined = answer(&env, "declined", &single_id, SettlementOutcome::Declined).await;
    let results: Arc<dyn Dispatch> = Arc::new(ResultHandler { settlements: env.app.domain.settlements.clone() });
    let batch = vec![settled.clone(), declined.clone()];
    assert_eq!(handled(&env, Pool::Settlement, results.clone(), batch).await, vec![true; 2]);

    let (refunded, kept, untouched) = (pair.0.to_string(), single.to_string(), pair.1.to_string());
    // answered is what the partners' answers changed: the refunds and settlements answered, and
    // what was sent for them.
    let answered = "SELECT string_agg(r.id || r.status || coalesce(r.reason, '') || r.answered_at || s.status
                                      || s.partner_reference || s.answered_at, ',' ORDER BY r.id) AS value
                    FROM refunds r JOIN settlements s ON s.id = r.settlement_id WHERE r.answered_at IS NOT NULL";
    let sent = "SELECT count(*) FROM deliveries";
    let before = env
        .db(move |c| {
            assert_eq!(asset_status(c, &refunded), "refunded");
            let cause = "SELECT count(*) FROM asset_status_history
                         WHERE asset_id = $1::uuid AND to_status = 'refunded' AND cause = 'refund_settled'";
            assert_eq!(count(c, cause, &[&refunded]), 1);
            let revoked =
                "SELECT count(*) FROM exchange_certificates WHERE asset_id = $1::uuid AND revoked_at IS NOT NULL";
            assert_eq!(count(c, revoked, &[&refunded]), 1, "the certificate is revoked once the partner confirms");
            let asked = "SELECT count(*) FROM deliveries
                         WHERE asset_id = $1::uuid AND kind = 'revocation_request' AND terminal_id = 'alice'";
            assert_eq!(count(c, asked, &[&refunded]), 1, "the holder is asked to delete the certificate");
            let told = "SELECT count(*) FROM deliveries WHERE kind = 'message' AND terminal_id = 'alice'
                        AND content->>'code' = $2 AND content->>'asset_id' = $1";
            assert_eq!(count(c, told, &[&refunded, &"refund_completed"]), 1, "the holder is told");

            assert_eq!(asset_status(c, &kept), "awaiting_exchange", "a refused refund leaves the asset as it was");
            let open = "SELECT count(*) FROM exchange_certificates
                        WHERE asset_id = $1::uuid AND revoked_at IS NULL AND exchanged_at IS NULL";
            assert_eq!(count(c, open, &[&kept]), 1, "its certificate still stands");
            assert_eq!(count(c, told, &[&kept, &"refund_refused"]), 1, "its holder is told");
            let why = "SELECT content->>'text' AS value FROM deliveries WHERE content->>'code' = 'refund_refused'";
            let why = text(c, why, &[]).unwrap();
            assert!(why.contains("card account closed"), "the partner's reason is passed on: {why}");
            let revocations = "SELECT count(*) FROM deliveries WHERE kind = 'revocation_request'";
            assert_eq!(count(c, revocations, &[]), 1, "only the refunded asset's certificate is revoked");

            let refund = "SELECT r.status || ':' || coalesce(r.reason, '') || ':' || s.status AS value
                          FROM refunds r JOIN settlements s ON s.id = r.settlement_id WHERE r.request_id = $1";
            assert_eq!(text(c, refund, &[&first_id]).as_deref(), Some("refunded::settled"));
            assert_eq!(text(c, refund, &[&single_id]).as_deref(), Some("failed:card account closed:declined"));
            let together = "SELECT count(DISTINCT answered_at) FROM refunds WHERE answered_at IS NOT NULL";
            assert_eq!(count(c, together, &[]), 1, "the two answers were recorded together");
            let waiting = "SELECT count(*) FROM refunds r JOIN settlements s ON s.id = r.settlement_id
                           WHERE r.status = 'requested' AND s.status = 'instructed'";
            assert_eq!(count(c, waiting, &[]), 2, "the unanswered refunds still wait");
            assert_eq!(asset_status(c, &untouched), "awaiting_exchange", "the order's other asset is untouched");
            assert_eq!(count(c, open, &[&untouched]), 1);
            (text(c, answered, &[]).expect("answered"), count(c, sent, &[]))
        })
        .await;

    // The partner sends its settled answer again, and the declined one is delivered again: neither
    // changes anything.
    let again = Incoming { message_id: "settled-again".into(), ..settled };
    assert_eq!(handled(&env, Pool::Settlement, results, vec![again, declined]).await, vec![true, false]);
    let after = env.db(move |c| (text(c, answered, &[]).expect("answered"), count(c, sent, &[]))).await;
    assert_eq!(after, before, "a repeated answer changes nothing");
    env.db(|c| assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_handled_together_each_have_the_effect_they_have_alone() {
    use assetflow::cli::simulate::gateway::change_request;
    use assetflow::domain::settlement::{ChangeHandler, ResultHandler};

    use crate::harness::text;
    use crate::support::{asset_status, request_id};

    // Started until every certificate is delivered, then stopped: nothing but the test handles the
    // changes and the partner's answers, and the outbox keeps what they send.
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    env.product("concert-b", |p| p.price_minor = 1_500).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    let orders = [
        purchase(&alice, "concert", 2, json!({})),
        purchase(&alice, "concert", 1, json!({})),
        purchase(&alice, "concert", 1, json!({})),
        purchase(&alice, "concert", 1, json!({})),
        purchase(&bob, "concert", 1, json!({})),
    ];
    let held = assets_delivered(&mut env, &orders).await;
    assert_eq!(held.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1, 1, 1, 1]);
    // Alice holds both assets of one order (`pair`), one she changes first (`earlier`), one she
    // asks twice to change (`twice`) and one more (`spare`); bob holds one.
    let (pair, earlier, twice, spare, bobs) =
        ((held[0][0], held[0][1]), held[1][0], held[2][0], held[3][0], held[4][0]);

    let domain = &env.app.domain;
    let changes: Arc<dyn Dispatch> =
        Arc::new(ChangeHandler { requests: domain.requests.clone(), settlements: domain.settlements.clone() });
    let seen = change_request("alice", earlier, "concert-b", &alice.key);
    assert_eq!(handled(&env, Pool::Settlement, changes.clone(), vec![request("seen", &seen)]).await, vec![true]);

    // All distinct: handled as a set, the two changes of one order's assets started by one
    // statement.
    let first = change_request("alice", pair.0, "concert-b", &alice.key);
    let second = change_request("alice", pair.1, "concert-b", &alice.key);
    let same = change_request("alice", twice, "concert", &alice.key);
    let not_held = change_request("alice", bobs, "concert-b", &alice.key);
    let nothing = change_request("alice", spare, "nothing", &alice.key);
    let batch = vec![
        request("first", &first),
        request("seen-again", &seen),
        request("same", &same),
        request("not-held", &not_held),
        request("second", &second),
        request("nothing", &nothing),
    ];
    assert_eq!(handled(&env, Pool::Settlement, changes.clone(), batch).await, vec![true; 6], "six new messages");

    // One asset asked for twice: handled one at a time, the second finding the first under way.
    let twice_first = change_request("alice", twice, "concert-b", &alice.key);
    let twice_again = change_request("alice", twice, "concert-b", &alice.key);
    let batch = vec![request("twice", &twice_first), request("twice-again", &twice_again)];
    assert_eq!(handled(&env, Pool::Settlement, changes, batch).await, vec![true; 2]);

    let (first_id, second_id) = (request_id(&first), request_id(&second));
    let started = [
        (request_id(&seen), earlier),
        (first_id.clone(), pair.0),
        (second_id.clone(), pair.1),
        (request_id(&twice_first), twice),
    ];
    let together = [first_id.clone(), second_id.clone()];
    env.db(move |c| {
        for accepted in [&seen, &first, &second, &twice_first] {
            assert_eq!(outcome_of(c, accepted).as_deref(), Some("accepted"), "{accepted}");
        }
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM terminal_requests r JOIN changes ch ON ch.request_id = r.request_id AND ch.id = r.subject_id
                 WHERE r.outcome = 'accepted' AND r.message_type = 'asset.change' AND r.terminal_id = 'alice'",
                &[]
            ),
            4,
            "each accepted request names its change"
        );
        for (rid, asset) in &started {
            let named = "SELECT count(*) FROM changes WHERE request_id = $1 AND asset_id = $2::uuid";
            assert_eq!(count(c, named, &[rid, asset]), 1, "the change of {asset} names it");
        }
        assert_eq!(outcome_of(c, &same).as_deref(), Some("refused:not_on_sale"));
        assert_eq!(outcome_of(c, &not_held).as_deref(), Some("refused:asset_not_held"));
        assert_eq!(outcome_of(c, &nothing).as_deref(), Some("refused:unknown_product"));
        assert_eq!(outcome_of(c, &twice_again).as_deref(), Some("refused:refund_pending"));
        for reason in ["not_on_sale", "asset_not_held", "unknown_product", "refund_pending"] {
            let refused = count(c, "SELECT count(*) FROM refusals WHERE reason = $1", &[&reason]);
            assert_eq!(refused, 1, "refused once as {reason}");
        }
        assert_eq!(count(c, "SELECT count(*) FROM refusals", &[]), 4, "nothing else was refused");
        assert_eq!(
            count(c, "SELECT count(*) FROM deliveries WHERE kind = 'refusal' AND terminal_id = 'alice'", &[]),
            4,
            "each refusal is told"
        );
        assert_eq!(
            count(c, "SELECT count(*) FROM deliveries WHERE kind = 'message' AND dedupe_key = 'duplicate:seen-again' AND terminal_id = 'alice'", &[]),
            1,
            "the repeated request is answered with the first one's outcome"
        );
        let seen_id = request_id(&seen);
        assert_eq!(count(c, "SELECT count(*) FROM changes WHERE request_id = $1", &[&seen_id]), 1, "and has no second effect");

        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM changes ch JOIN orders o ON o.id = ch.new_order_id JOIN settlements s ON s.order_id = o.id
                 WHERE ch.step = 'purchasing' AND ch.holder_terminal_id = 'alice' AND ch.new_product_id = 'concert-b'
                   AND ch.refund_id IS NULL
                   AND o.status = 'settling' AND o.request_id = ch.request_id AND o.product_id = 'concert-b'
                   AND o.quantity = 1 AND o.amount_minor = 1500 AND o.payer_terminal_id = 'alice'
                   AND o.delivery_mode = 'certificate'
                   AND s.kind = 'purchase' AND s.status = 'instructed' AND s.amount_minor = 1500
                   AND s.partner_id = 'card-co' AND s.payer_terminal_id = 'alice' AND s.answer_due_at > s.instructed_at",
                &[]
            ),
            4,
            "each change is purchasing its new product, its order settling at the new price"
        );
        assert_eq!(count(c, "SELECT count(*) FROM changes", &[]), 4);
        assert_eq!(count(c, "SELECT count(*) FROM settlements WHERE status = 'instructed'", &[]), 4, "and no other");
        assert_eq!(
            count(c, "SELECT count(DISTINCT created_at) FROM changes WHERE request_id IN ($1, $2)", &[&together[0], &together[1]]),
            1,
            "the two were started together"
        );
        let instructions = "SELECT count(*) FROM outbox ob JOIN settlements s
                            ON convert_from(ob.payload, 'UTF8')::jsonb->>'settlement_id' = s.id::text
                            JOIN changes ch ON ch.new_order_id = s.order_id
                            WHERE ob.message_type = 'settlement.instruction'
                              AND convert_from(ob.payload, 'UTF8')::jsonb->>'kind' = 'purchase'
                              AND convert_from(ob.payload, 'UTF8')::jsonb->>'amount_minor' = '1500'";
        assert_eq!(count(c, instructions, &[]), 4, "one instruction per new order");
        let all = "SELECT count(*) FROM outbox WHERE message_type = 'settlement.instruction'";
        assert_eq!(count(c, all, &[]), 4, "and no other");
        assert_eq!(count(c, "SELECT count(*) FROM refunds", &[]), 0, "nothing is refunded before the new product is paid");
        let untouched = "SELECT count(*) FROM assets WHERE status = 'awaiting_exchange'";
        assert_eq!(count(c, untouched, &[]), 6);
    })
    .await;

    // settlement_of is the settlement `sql` finds for the change asked for by request `id`.
    async fn settlement_of(env: &Env, sql: &'static str, id: &str) -> String {
        let id = id.to_string();
        env.db(move |c| text(c, sql, &[&id])).await.expect("the change's settlement")
    }
    let purchase_of = "SELECT s.id::text AS value FROM settlements s JOIN changes ch ON ch.new_order_id = s.order_id
                       WHERE ch.request_id = $1 AND s.kind = 'purchase'";
    let refund_of = "SELECT r.settlement_id::text AS value FROM refunds r JOIN changes ch ON ch.refund_id = r.id
                     WHERE ch.request_id = $1";
    let new_orders = "SELECT string_agg(new_order_id::text, ',' ORDER BY new_order_id) AS value FROM changes
                      WHERE request_id IN ($1, $2)";
    let (f, s) = (first_id.clone(), second_id.clone());
    let mut expected: Vec<Uuid> = env
        .db(move |c| text(c, new_orders, &[&f, &s]).unwrap().split(',').map(|id| id.parse().unwrap()).collect())
        .await;
    expected.sort_unstable();

    // The partner settles both new purchases, and its answers are handled together: the old
    // assets, two of one order, are refunded by one statement, and the new orders wait for it.
    let results: Arc<dyn Dispatch> = Arc::new(ResultHandler { settlements: env.app.domain.settlements.clone() });
    let batch = vec![
        partner_answer(
            &env,
            "paid-first",
            &settlement_of(&env, purchase_of, &first_id).await,
            SettlementOutcome::Settled,
        )
        .await,
        partner_answer(
            &env,
            "paid-second",
            &settlement_of(&env, purchase_of, &second_id).await,
            SettlementOutcome::Settled,
        )
        .await,
    ];
    assert_eq!(handled(&env, Pool::Settlement, results.clone(), batch).await, vec![true; 2]);
    let (f, s) = (first_id.clone(), second_id.clone());
    let pair_order = request_id(&orders[0]);
    env.db(move |c| {
        let paid = "SELECT count(*) FROM settlements s JOIN changes ch ON ch.new_order_id = s.order_id
                    WHERE ch.request_id IN ($1, $2) AND s.kind = 'purchase' AND s.status = 'settled'";
        assert_eq!(count(c, paid, &[&f, &s]), 2, "both new purchases are settled");
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM changes ch JOIN refunds r ON r.id = ch.refund_id
                 JOIN assets a ON a.id = ch.asset_id JOIN orders o ON o.id = a.order_id
                 JOIN settlements s ON s.id = r.settlement_id
                 WHERE ch.request_id IN ($1, $2) AND ch.step = 'refunding'
                   AND r.status = 'requested' AND r.cause = 'change' AND r.asset_id = ch.asset_id AND r.order_id = o.id
                   AND r.amount_minor = o.amount_minor / o.quantity AND r.answered_at IS NULL
                   AND s.kind = 'refund' AND s.status = 'instructed' AND s.order_id = o.id
                   AND s.amount_minor = r.amount_minor AND s.partner_id = 'card-co' AND s.payer_terminal_id = 'alice'",
                &[&f, &s]
            ),
            2,
            "each paid change is refunding its old asset's share of its order"
        );
        assert_eq!(count(c, "SELECT count(*) FROM refunds", &[]), 2, "no other refund");
        assert_eq!(
            count(
                c,
                "SELECT sum(r.amount_minor)::int8 - min(o.amount_minor) AS count FROM refunds r
                 JOIN orders o ON o.id = r.order_id WHERE o.request_id = $1",
                &[&pair_order]
            ),
            0,
            "both assets of the order: all it paid"
        );
        assert_eq!(
            count(c, "SELECT count(DISTINCT requested_at) FROM refunds", &[]),
            1,
            "the two refunds were recorded together"
        );
        let waiting = "SELECT count(*) FROM changes WHERE step = 'purchasing' AND refund_id IS NULL";
        assert_eq!(count(c, waiting, &[]), 2, "the changes whose purchase is unanswered still wait");
        let refunding = "SELECT count(*) FROM outbox ob JOIN refunds r
                         ON convert_from(ob.payload, 'UTF8')::jsonb->>'settlement_id' = r.settlement_id::text
                         WHERE ob.message_type = 'settlement.instruction'
                           AND convert_from(ob.payload, 'UTF8')::jsonb->>'kind' = 'refund'";
        assert_eq!(count(c, refunding, &[]), 2, "one refund instruction each");
        let all = "SELECT count(*) FROM outbox WHERE message_type = 'settlement.instruction'
                   AND convert_from(payload, 'UTF8')::jsonb->>'kind' = 'refund'";
        assert_eq!(count(c, all, &[]), 2, "and no other");
        let issuance = "SELECT count(*) FROM outbox WHERE message_type = 'issuance.requested'";
        assert_eq!(count(c, issuance, &[]), 0, "the new orders are not issued before the old assets are refunded");
        let untouched = "SELECT count(*) FROM assets WHERE status = 'awaiting_exchange'";
        assert_eq!(count(c, untouched, &[]), 6, "nothing changes for an asset until the partner confirms");
    })
    .await;

    // The partner refunds both old assets, and its answers are handled together: the changes are
    // done, and their new orders handed to issuance in one message.
    let batch = vec![
        partner_answer(
            &env,
            "refunded-first",
            &settlement_of(&env, refund_of, &first_id).await,
            SettlementOutcome::Settled,
        )
        .await,
        partner_answer(
            &env,
            "refunded-second",
            &settlement_of(&env, refund_of, &second_id).await,
            SettlementOutcome::Settled,
        )
        .await,
    ];
    assert_eq!(handled(&env, Pool::Settlement, results, batch).await, vec![true; 2]);
    let (f, s) = (first_id.clone(), second_id.clone());
    env.db(move |c| {
        let done = "SELECT count(*) FROM changes ch JOIN refunds r ON r.id = ch.refund_id
                    JOIN orders o ON o.id = ch.new_order_id
                    WHERE ch.request_id IN ($1, $2) AND ch.step = 'done' AND r.status = 'refunded'
                      AND o.status = 'issuing'";
        assert_eq!(count(c, done, &[&f, &s]), 2, "both changes are done, their new orders issuing");
        for old in [pair.0.to_string(), pair.1.to_string()] {
            assert_eq!(asset_status(c, &old), "refunded");
            let cause = "SELECT count(*) FROM asset_status_history
                         WHERE asset_id = $1::uuid AND to_status = 'refunded' AND cause = 'refund_settled'";
            assert_eq!(count(c, cause, &[&old]), 1);
            let revoked =
                "SELECT count(*) FROM exchange_certificates WHERE asset_id = $1::uuid AND revoked_at IS NOT NULL";
            assert_eq!(count(c, revoked, &[&old]), 1, "its certificate is revoked");
            let asked = "SELECT count(*) FROM deliveries
                         WHERE asset_id = $1::uuid AND kind = 'revocation_request' AND terminal_id = 'alice'";
            assert_eq!(count(c, asked, &[&old]), 1, "the holder is asked to delete the certificate");
        }
        assert_eq!(count(c, "SELECT count(*) FROM assets WHERE status = 'refunded'", &[]), 2, "and no other asset");
        let told = "SELECT count(*) FROM changes ch JOIN deliveries d ON d.dedupe_key = 'change:' || ch.id || ':change_completed'
                    WHERE ch.request_id IN ($1, $2) AND d.kind = 'message' AND d.terminal_id = 'alice'
                      AND d.content->>'code' = 'change_completed' AND d.content->>'asset_id' = ch.asset_id::text
                      AND d.content->>'order_id' = ch.new_order_id::text";
        assert_eq!(count(c, told, &[&f, &s]), 2, "the holder is told of each change");
        let completed = "SELECT count(*) FROM deliveries WHERE content->>'code' = 'change_completed'";
        assert_eq!(count(c, completed, &[]), 2);
        let waiting = "SELECT count(*) FROM changes WHERE step = 'purchasing' AND refund_id IS NULL";
        assert_eq!(count(c, waiting, &[]), 2, "the changes whose purchase is unanswered still wait");
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0);
    })
    .await;
    let asked = outbox_payloads(&env, kinds::ISSUANCE_REQUESTED).await;
    let [asked] = asked.as_slice() else { panic!("one issuance.requested for both new orders, not {asked:?}") };
    let mut named: Vec<Uuid> = serde_json::from_value(asked["order_ids"].clone()).expect("order ids");
    named.sort_unstable();
    assert_eq!(named, expected, "the message names both new orders, and no other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookings_and_submissions_handled_together_each_have_the_effect_they_have_alone() {
    use assetflow::cli::simulate::gateway::{booking_request, submit_request};
    use assetflow::contracts::messages::DeliveryRequested;
    use assetflow::domain::bookings::{BookingHandler, SubmitHandler, Terms, save_terms};

    use crate::harness::text;
    use crate::support::request_id;

    // Not started: nothing but the test handles the requests, and the outbox keeps what they send.
    let env = Env::new().await;
    env.product("seat", |_| {}).await;
    let terms = Terms {
        product_id: "seat".into(),
        condition: "hold".into(),
        places: None,
        decided_at: None,
        window_secs: 3_600,
    };
    env.db(move |c| save_terms(c, &terms).unwrap()).await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    let domain = &env.app.domain;
    // As the app registers it: in the issuance pool, with the app's own keys.
    let bookings: Arc<dyn Dispatch> = Arc::new(BookingHandler {
        requests: domain.requests.clone(),
        settlements: domain.settlements.clone(),
        keys: env.app.keys.clone(),
        service_provider_id: domain.issuer.service_provider_id.clone(),
    });
    let seen = booking_request("alice", "seat", &alice.key);
    assert_eq!(handled(&env, Pool::Issuance, bookings.clone(), vec![request("seen", &seen)]).await, vec![true]);

    // All distinct: handled as a set, the two certificates recorded by one statement and sent for
    // by one message.
    let alices = booking_request("alice", "seat", &alice.key);
    let bobs = booking_request("bob", "seat", &bob.key);
    let purchased = booking_request("alice", "concert", &alice.key);
    let nothing = booking_request("alice", "nothing", &alice.key);
    let batch = vec![
        request("alice", &alices),
        request("seen-again", &seen),
        request("purchased", &purchased),
        request("bob", &bobs),
        request("nothing", &nothing),
    ];
    assert_eq!(handled(&env, Pool::Issuance, bookings, batch).await, vec![true; 5], "five new messages");

    let (seen_id, alices_id, bobs_id) = (request_id(&seen), request_id(&alices), request_id(&bobs));
    let (a, b, s0) = (alices_id.clone(), bobs_id.clone(), seen_id.clone());
    let together: Vec<Uuid> = env
        .db(move |c| {
            for accepted in [&seen, &alices, &bobs] {
                assert_eq!(outcome_of(c, accepted).as_deref(), Some("accepted"), "{accepted}");
            }
            assert_eq!(
                count(
                    c,
                    "SELECT count(*) FROM receipt_certificates rc
                     JOIN terminal_requests r ON r.request_id = rc.request_id
                     JOIN deliveries d ON d.request_id = rc.request_id AND d.kind = 'receipt_certificate'
                     WHERE rc.status = 'open' AND rc.condition = 'hold' AND rc.product_id = 'seat'
                       AND rc.payer_terminal_id = rc.holder_terminal_id AND rc.submit_by = rc.expires_at
                       AND rc.expires_at > rc.issued_at AND rc.order_id IS NULL
                       AND r.outcome = 'accepted' AND r.subject_id = rc.id AND r.terminal_id = rc.holder_terminal_id
                       AND r.message_type = 'order.booking'
                       AND d.terminal_id = rc.holder_terminal_id AND d.dedupe_key = 'receipt:' || rc.id
                       AND d.status = 'pending' AND rc.document::jsonb = d.content->'receipt_certificate'
                       AND rc.document::jsonb->>'receipt_certificate_id' = rc.id::text
                       AND rc.document::jsonb->'asset'->>'asset_id' = rc.asset_id::text",
                    &[]
                ),
                3,
                "each accepted booking names its open certificate, stored as it is sent to its holder"
            );
            assert_eq!(count(c, "SELECT count(*) FROM receipt_certificates", &[]), 3);
            assert_eq!(
                count(c, "SELECT count(DISTINCT asset_id) FROM receipt_certificates", &[]),
                3,
                "each reserves an asset of its own"
            );
            assert_eq!(
                count(c, "SELECT count(*) FROM receipt_certificates rc JOIN assets a ON a.id = rc.asset_id", &[]),
                0,
                "reserved, not issued"
            );
            let held = "SELECT count(*) FROM receipt_certificates WHERE request_id = $1 AND holder_terminal_id = $2";
            assert_eq!(count(c, held, &[&a, &"alice"]), 1);
            assert_eq!(count(c, held, &[&b, &"bob"]), 1);
            assert_eq!(
                count(c, "SELECT count(DISTINCT issued_at) FROM receipt_certificates WHERE request_id IN ($1, $2)", &[&a, &b]),
                1,
                "the two were recorded together"
            );
            assert_eq!(count(c, "SELECT count(*) FROM settlements", &[]), 0, "booking charges nothing");
            assert_eq!(count(c, "SELECT count(*) FROM orders", &[]), 0);

            assert_eq!(outcome_of(c, &purchased).as_deref(), Some("refused:not_sold_by_booking"));
            assert_eq!(outcome_of(c, &nothing).as_deref(), Some("refused:unknown_product"));
            for reason in ["not_sold_by_booking", "unknown_product"] {
                let refused = count(c, "SELECT count(*) FROM refusals WHERE reason = $1", &[&reason]);
                assert_eq!(refused, 1, "refused once as {reason}");
            }
            assert_eq!(count(c, "SELECT count(*) FROM refusals", &[]), 2, "nothing else was refused");
            assert_eq!(
                count(c, "SELECT count(*) FROM deliveries WHERE kind = 'refusal' AND terminal_id = 'alice'", &[]),
                2,
                "each refusal is told"
            );
            assert_eq!(
                count(c, "SELECT count(*) FROM deliveries WHERE kind = 'message' AND dedupe_key = 'duplicate:seen-again' AND terminal_id = 'alice'", &[]),
                1,
                "the repeated request is answered with the first one's outcome"
            );
            assert_eq!(
                count(c, "SELECT count(*) FROM receipt_certificates WHERE request_id = $1", &[&s0]),
                1,
                "and has no second effect"
            );
            let sent = "SELECT string_agg(id::text, ',' ORDER BY id) AS value FROM deliveries
                        WHERE kind = 'receipt_certificate' AND request_id IN ($1, $2)";
            text(c, sent, &[&a, &b]).unwrap().split(',').map(|id| id.parse().unwrap()).collect()
        })
        .await;
    assert_eq!(together.len(), 2);
    // The batch's certificates are sent for by one message, which names nothing else.
    let sending: Vec<DeliveryRequested> = outbox_payloads(&env, kinds::DELIVERY_REQUESTED)
        .await
        .into_iter()
        .map(|p| serde_json::from_value(p).unwrap())
        .filter(|m: &DeliveryRequested| m.delivery_ids.iter().any(|id| together.contains(id)))
        .collect();
    let [sending] = sending.as_slice() else {
        panic!("one delivery.requested for the batch's certificates, not {sending:?}")
    };
    let mut named = sending.delivery_ids.clone();
    named.sort_unstable();
    assert_eq!(named, together);

    // certificate is the receipt certificate its holder was sent for the booking `id`.
    async fn certificate(env: &Env, id: &str) -> Value {
        let id = id.to_string();
        let sql = "SELECT content->>'receipt_certificate' AS value FROM deliveries
                   WHERE request_id = $1 AND kind = 'receipt_certificate'";
        let text = env.db(move |c| text(c, sql, &[&id])).await.expect("the booking's certificate");
        let certificate: Value = serde_json::from_str(&text).expect("a JSON receipt certificate");
        env.app.keys.verify_provider(&certificate).expect("signed by the service provider");
        certificate
    }
    let (seens, alices, bobs) =
        (certificate(&env, &seen_id).await, certificate(&env, &alices_id).await, certificate(&env, &bobs_id).await);
    let submits: Arc<dyn Dispatch> = Arc::new(SubmitHandler {
        requests: env.app.domain.requests.clone(),
        settlements: env.app.domain.settlements.clone(),
        keys: env.app.keys.clone(),
    });

    // All distinct: handled as a set, the two orders placed with their settlements by one
    // statement. The forgery is alice's certificate copied under another id, as if to buy twice.
    let by_alice = submit_request("alice", alices.clone(), &alice.key);
    let by_bob = submit_request("bob", bobs.clone(), &bob.key);
    let mut copied = seens.clone();
    copied["receipt_certificate_id"] = json!(Uuid::now_v7());
    let forged = submit_request("alice", copied, &alice.key);
    let not_held = submit_request("bob", seens.clone(), &bob.key);
    let batch = vec![
        request("by-alice", &by_alice),
        request("forged", &forged),
        request("by-bob", &by_bob),
        request("not-held", &not_held),
    ];
    assert_eq!(handled(&env, Pool::Issuance, submits.clone(), batch).await, vec![true; 4], "four new messages");

    // submitted counts the certificates submitted by their holder, each naming its order and its
    // submission, the order for its reserved asset, settling, with its settlement instructed.
    let submitted = "SELECT count(*) FROM receipt_certificates rc
                     JOIN orders o ON o.id = rc.order_id JOIN settlements s ON s.order_id = o.id
                     JOIN terminal_requests r ON r.request_id = rc.submit_request_id
                     WHERE rc.status = 'submitted' AND rc.reminder_due_at IS NULL
                       AND o.status = 'settling' AND o.reserved_asset_id = rc.asset_id
                       AND o.request_id = rc.submit_request_id AND o.product_id = rc.product_id
                       AND o.orderer_terminal_id = rc.holder_terminal_id AND o.payer_terminal_id = rc.payer_terminal_id
                       AND o.quantity = 1 AND o.amount_minor = 1000 AND o.delivery_mode = 'immediate'
                       AND s.kind = 'purchase' AND s.status = 'instructed' AND s.amount_minor = o.amount_minor
                       AND s.partner_id = 'card-co' AND s.payer_terminal_id = o.payer_terminal_id
                       AND s.answer_due_at > s.instructed_at
                       AND r.outcome = 'accepted' AND r.subject_id = o.id AND r.message_type = 'receipt.submit'
                       AND r.terminal_id = rc.holder_terminal_id";
    let one = "SELECT count(*) FROM receipt_certificates WHERE id = $1::uuid AND submit_request_id = $2";
    let instructions = "SELECT count(*) FROM outbox ob JOIN settlements s
                        ON convert_from(ob.payload, 'UTF8')::jsonb->>'settlement_id' = s.id::text
                        JOIN receipt_certificates rc ON rc.order_id = s.order_id
                        WHERE ob.message_type = 'settlement.instruction'
                          AND convert_from(ob.payload, 'UTF8')::jsonb->>'kind' = 'purchase'";
    let all = "SELECT count(*) FROM outbox WHERE message_type = 'settlement.instruction'";
    let id_of = |certificate: &Value| certificate["receipt_certificate_id"].as_str().unwrap().to_string();
    let (alices_rc, bobs_rc, seens_rc) = (id_of(&alices), id_of(&bobs), id_of(&seens));
    let (alices_submit, bobs_submit) = (request_id(&by_alice), request_id(&by_bob));
    let s = seens_rc.clone();
    env.db(move |c| {
        for accepted in [&by_alice, &by_bob] {
            assert_eq!(outcome_of(c, accepted).as_deref(), Some("accepted"), "{accepted}");
        }
        assert_eq!(count(c, submitted, &[]), 2, "each submission placed an order for its certificate's asset");
        assert_eq!(count(c, one, &[&alices_rc, &alices_submit]), 1, "alice's certificate names her submission");
        assert_eq!(count(c, one, &[&bobs_rc, &bobs_submit]), 1, "bob's certificate names his");
        assert_eq!(count(c, "SELECT count(*) FROM orders", &[]), 2);
        assert_eq!(count(c, "SELECT count(*) FROM settlements", &[]), 2);
        assert_eq!(count(c, "SELECT count(DISTINCT created_at) FROM orders", &[]), 1, "the two were placed together");
        assert_eq!(count(c, instructions, &[]), 2, "one instruction per order");
        assert_eq!(count(c, all, &[]), 2, "and no other");

        assert_eq!(outcome_of(c, &forged).as_deref(), Some("refused:certificate_forged"));
        assert_eq!(outcome_of(c, &not_held).as_deref(), Some("refused:certificate_not_held"));
        for reason in ["certificate_forged", "certificate_not_held"] {
            let refused = count(c, "SELECT count(*) FROM refusals WHERE reason = $1", &[&reason]);
            assert_eq!(refused, 1, "refused once as {reason}");
        }
        assert_eq!(count(c, "SELECT count(*) FROM refusals WHERE message_type = 'receipt.submit'", &[]), 2);
        let open = "SELECT count(*) FROM receipt_certificates
                    WHERE id = $1::uuid AND status = 'open' AND order_id IS NULL AND submit_request_id IS NULL";
        assert_eq!(count(c, open, &[&s]), 1, "the certificate presented by another stays open");
    })
    .await;

    // One certificate submitted twice: handled one at a time, the second finding it submitted.
    let by_holder = submit_request("alice", seens.clone(), &alice.key);
    let again = submit_request("alice", seens, &alice.key);
    let batch = vec![request("seen-by-alice", &by_holder), request("seen-again-by-alice", &again)];
    assert_eq!(handled(&env, Pool::Issuance, submits, batch).await, vec![true; 2]);
    let holders_submit = request_id(&by_holder);
    env.db(move |c| {
        assert_eq!(outcome_of(c, &by_holder).as_deref(), Some("accepted"));
        assert_eq!(outcome_of(c, &again).as_deref(), Some("refused:certificate_already_exchanged"));
        assert_eq!(count(c, submitted, &[]), 3);
        assert_eq!(count(c, one, &[&seens_rc, &holders_submit]), 1, "the certificate names the first submission");
        assert_eq!(count(c, "SELECT count(*) FROM orders", &[]), 3, "one order for it");
        assert_eq!(count(c, instructions, &[]), 3);
        assert_eq!(count(c, all, &[]), 3);
        let refused = "SELECT count(*) FROM refusals WHERE reason = 'certificate_already_exchanged'";
        assert_eq!(count(c, refused, &[]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0);
    })
    .await;
}
