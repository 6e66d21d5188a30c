//! Messages handled together: a pool's handler takes the messages already waiting for it and
//! carries them out in one transaction. Each keeps its own inbox row, so none has a second effect,
//! and one that fails takes none of the others with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use assetflow::broker::Pool;
use assetflow::dead_letter::Reason;
use assetflow::messages::{SettlementOutcome, SettlementResult, kinds};
use assetflow::outbox::Outgoing;
use assetflow::pool::definition::PoolDefinitions;
use assetflow::pool::{Cx, Failure, Handler, Incoming, Work, handle_together};
use assetflow::simulate::gateway::GatewayOptions;
use assetflow::simulate::terminals::purchase;
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
    fn message_type(&self) -> &'static str {
        "test.recorded"
    }

    fn handle(&self, cx: &mut Cx<'_>, message: &Incoming) -> Result<(), Failure> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if message.json["panic"] == json!(true) {
            panic!("told to panic");
        }
        if message.json["fail"] == json!(true) {
            return Err(Failure::permanent(Reason::Unprocessable, "told to fail"));
        }
        cx.publish(Outgoing {
            message_id: Uuid::now_v7(),
            exchange: "test".into(),
            routing_key: message.message_id.clone(),
            message_type: "test.recorded".into(),
            correlation_id: None,
            headers: json!({}),
            payload: message.body.clone(),
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
        body: serde_json::to_vec(&json).unwrap(),
        json,
        delivery_count: 0,
        received_at: Utc::now(),
        first_received_at: Utc::now(),
    }
}

async fn together(env: &Env, handler: &Arc<Recorder>, messages: &[Incoming]) -> Result<Vec<bool>, Failure> {
    let app = env.app.clone();
    let handler: Arc<dyn Handler> = handler.clone();
    let work: Vec<Work> = messages.iter().map(|m| (handler.clone(), m.clone(), tracing::Span::none())).collect();
    env.app.db.run(move |conn| handle_together(conn, &app, Pool::Issuance, &work)).await
}

async fn rows(env: &Env, sql: &'static str) -> i64 {
    env.db(move |c| count(c, sql)).await
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
        Err(Failure::Permanent { reason: Reason::HandlerFailed, detail }) => {
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
            };
            env.publish(kinds::SETTLEMENT_RESULT, &serde_json::to_vec(&unknown).unwrap()).await;
        }
    }
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let delivered = "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'delivered'";
    env.wait_until("every order's certificate is delivered", move |c| (count(c, delivered) == orders).then_some(()))
        .await;
    let dead = "SELECT count(*) FROM dead_letters WHERE reason = 'unknown_settlement'";
    env.wait_until("the three unknown answers are dead-lettered", move |c| (count(c, dead) == 3).then_some(())).await;

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
    use assetflow::delivery::receipt::ReceiptHandler;
    use diesel::RunQueryDsl;

    // No gateway: the certificates go out and wait for receipts, which the test writes.
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    for _ in 0..3 {
        env.send(&purchase(&alice, "concert", 1, json!({}))).await;
    }
    env.start().await;
    env.partner(settle_all());
    let sent = "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'sent'";
    env.wait_until("three certificates are sent", move |c| (count(c, sent) == 3).then_some(())).await;
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
    let receipt = |n: usize, message_id: &str, sha256: &str| {
        let a = &attempts[n];
        incoming(
            message_id,
            json!({
                "type": kinds::DELIVERY_RECEIPT, "delivery_id": a.delivery_id, "attempt": 1,
                "gateway_id": a.gateway_id, "terminal_id": a.terminal_id, "sha256": sha256,
                "received_at": Utc::now(),
            }),
        )
    };
    // The first right; the second right twice, by two messages (a gateway that sent it again);
    // the third with the hash of other bytes.
    let batch = vec![
        receipt(0, "r0", &attempts[0].payload_sha256),
        receipt(1, "r1", &attempts[1].payload_sha256),
        receipt(1, "r1-again", &attempts[1].payload_sha256),
        receipt(2, "r2", &"0".repeat(64)),
    ];
    let app = env.app.clone();
    let handler: Arc<dyn Handler> = Arc::new(ReceiptHandler);
    let work: Vec<Work> = batch.into_iter().map(|m| (handler.clone(), m, tracing::Span::none())).collect();
    let fresh =
        env.app.db.run(move |conn| handle_together(conn, &app, Pool::Delivery, &work)).await.expect("committed");
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
