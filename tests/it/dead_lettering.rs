//! Dead letters nothing but a real failure produces (`docs/dead-letters.md`): a handler that fails
//! with a transient error at every delivery until assetflow gives up on the message
//! (`handler_failed`), and a message the broker itself dead-letters at its delivery limit because
//! assetflow cannot record it (`broker_dead_lettered`).
//!
//! The failure is real: the test installs, in its own database, a trigger that refuses to store the
//! order of one request id (with a serialization failure, which the pools treat as transient), and
//! counts every try on a sequence, which a rollback does not undo.

use std::time::Duration;

use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use assetflow::config::workers::PoolDefinitions;
use assetflow::contracts::topology::Pool;
use diesel::connection::SimpleConnection;
use lapin::options::BasicGetOptions;
use serde_json::{Value, json};

use crate::harness::{Env, count, execute, text};
use crate::support::{
    DEADLINE, QueueCounts, bind_queue, channel, queue_counts, request_id, settle_all, wait_for_queue,
};

/// DELIVERY_LIMIT is the pools' delivery limit in these tests (`amqp.delivery_limit`).
const DELIVERY_LIMIT: u32 = 3;

/// RETRIES are the settlement pool's in-process retries of a transient failure in these tests.
const RETRIES: [Duration; 2] = [Duration::from_millis(20), Duration::from_millis(40)];

/// REFUSE_ORDERS makes the database refuse, with a serialization failure, to store the order of
/// any request id in `test_refused_requests`, and counts every refusal on a sequence.
const REFUSE_ORDERS: &str = "
    CREATE TABLE test_refused_requests (request_id TEXT PRIMARY KEY);
    CREATE SEQUENCE test_refusals;
    CREATE FUNCTION test_refuse_order() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF EXISTS (SELECT 1 FROM test_refused_requests WHERE request_id = NEW.request_id) THEN
        PERFORM nextval('test_refusals');
        RAISE EXCEPTION 'test trigger: the order of % is refused', NEW.request_id
          USING ERRCODE = 'serialization_failure';
      END IF;
      RETURN NEW;
    END $$;
    CREATE TRIGGER test_refuse_order BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION test_refuse_order();";

/// REFUSE_DEAD_LETTERS makes the database refuse assetflow's own dead letter (`handler_failed`)
/// for those request ids too, as if the dead_letters table could not be written: only the broker
/// can then give up on the message.
const REFUSE_DEAD_LETTERS: &str = "
    CREATE FUNCTION test_refuse_dead_letter() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.reason = 'handler_failed' AND EXISTS (
           SELECT 1 FROM test_refused_requests
           WHERE request_id = convert_from(NEW.payload, 'UTF8')::jsonb ->> 'request_id') THEN
        RAISE EXCEPTION 'test trigger: this dead letter cannot be recorded';
      END IF;
      RETURN NEW;
    END $$;
    CREATE TRIGGER test_refuse_dead_letter BEFORE INSERT ON dead_letters
      FOR EACH ROW EXECUTE FUNCTION test_refuse_dead_letter();";

/// failing_env is an Env with a small delivery limit and short in-process retries, whose database
/// refuses the orders of the request ids the test names.
async fn failing_env(ddl: &'static [&'static str]) -> Env {
    let mut pools = PoolDefinitions::built_in();
    pools.settlement.pool.handler_retries = RETRIES.to_vec();
    let env = Env::with_pools(json!({"amqp": {"delivery_limit": DELIVERY_LIMIT}}), pools).await;
    env.db(move |c| {
        for statements in ddl {
            c.batch_execute(statements).expect("the test's triggers are installed");
        }
    })
    .await;
    env
}

/// refuse makes the database refuse the order of `request_id`.
async fn refuse(env: &Env, request_id: &str) {
    let request_id = request_id.to_string();
    env.db(move |c| execute(c, "INSERT INTO test_refused_requests (request_id) VALUES ($1)", &[&request_id])).await;
}

/// tries is how many times the database refused an order.
async fn tries(env: &Env) -> i64 {
    env.db(|c| count(c, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS count FROM test_refusals", &[])).await
}

/// drained waits until `queue` holds no message, ready or unacknowledged.
async fn drained(env: &Env, queue: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let counts = queue_counts(env, queue).await;
        if counts == (QueueCounts { ready: 0, unacknowledged: 0 }) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{queue} is not drained: {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// orders_issued waits until the orders placed with `request_ids` are issued.
async fn orders_issued(env: &Env, request_ids: Vec<String>) {
    let n = request_ids.len() as i64;
    let ids = request_ids.join(",");
    env.wait_until("the other orders are issued", move |c| {
        let issued =
            "SELECT count(*) FROM orders WHERE status = 'issued' AND request_id = ANY(string_to_array($1, ','))";
        (count(c, issued, &[&ids]) == n).then_some(())
    })
    .await;
}

/// one_failing_order_between_two places an order the test's trigger refuses between two that go
/// through, one at a time (so that the failing message is never tried in a batch with another),
/// and waits for the failing one's dead letter and for the pool to go on with the next order. It
/// returns the failing order's request id and its dead letter's id.
async fn one_failing_order_between_two(env: &Env, terminal: &SimTerminal, dead_lettered: &str) -> (String, String) {
    let before = purchase(terminal, "concert", 1, json!({}));
    let failing = purchase(terminal, "concert", 1, json!({}));
    let after = purchase(terminal, "concert", 1, json!({}));
    let rid = request_id(&failing);
    refuse(env, &rid).await;
    env.send(&before).await;
    orders_issued(env, vec![request_id(&before)]).await;
    env.send(&failing).await;
    let r = rid.clone();
    let letter = env
        .wait_until(dead_lettered, move |c| {
            text(
                c,
                "SELECT id::text AS value FROM dead_letters
                 WHERE convert_from(payload, 'UTF8')::jsonb ->> 'request_id' = $1",
                &[&r],
            )
        })
        .await;
    env.send(&after).await;
    orders_issued(env, vec![request_id(&after)]).await;
    (rid, letter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_fails_at_every_delivery_is_dead_lettered_as_handler_failed_with_its_attempts() {
    let mut env = failing_env(&[REFUSE_ORDERS]).await;
    env.product("concert", |_| {}).await;
    let nina = env.terminal("nina", "gw-1", Some("card-co")).await;
    let notices = bind_queue(&env, "test.dead-letters.settlement", &env.app.plumbing.names.dlx(), "settlement").await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let (rid, letter) = one_failing_order_between_two(&env, &nina, "the failing order is dead-lettered").await;

    let (l, r) = (letter.clone(), rid.clone());
    let (deliveries, attempts) = env
        .db(move |c| {
            let field = |c: &mut diesel::PgConnection, sql: &'static str| text(c, sql, &[&l]).unwrap_or_default();
            assert_eq!(field(c, "SELECT reason AS value FROM dead_letters WHERE id = $1::uuid"), "handler_failed");
            assert_eq!(field(c, "SELECT pool AS value FROM dead_letters WHERE id = $1::uuid"), "settlement");
            assert_eq!(field(c, "SELECT source AS value FROM dead_letters WHERE id = $1::uuid"), "message");
            assert_eq!(
                field(c, "SELECT message_type AS value FROM dead_letters WHERE id = $1::uuid"),
                "order.purchase"
            );
            assert_eq!(field(c, "SELECT routing_key AS value FROM dead_letters WHERE id = $1::uuid"), "order.purchase");
            let detail = field(c, "SELECT detail AS value FROM dead_letters WHERE id = $1::uuid");
            assert!(detail.contains("the order of") && detail.contains("is refused"), "the error is kept: {detail}");
            let headers: Value =
                serde_json::from_str(&field(c, "SELECT headers::text AS value FROM dead_letters WHERE id = $1::uuid"))
                    .unwrap();
            let before_this = headers["delivery_count"]
                .as_u64()
                .unwrap_or_else(|| panic!("the delivery count is recorded: {headers}"));
            assert!(headers["received_at"].is_string(), "{headers}");
            let attempts: Value =
                serde_json::from_str(&field(c, "SELECT attempts::text AS value FROM dead_letters WHERE id = $1::uuid"))
                    .unwrap();
            assert!(detail.contains(&format!("after {} deliveries", before_this + 1)), "{detail}");
            // Nothing of the order was stored, and the message counts as processed: a copy of
            // it is a duplicate.
            assert_eq!(count(c, "SELECT count(*) FROM orders WHERE request_id = $1", &[&r]), 0);
            let processed = "SELECT count(*) FROM inbox i JOIN dead_letters l ON l.message_id = i.message_id
                             WHERE l.id = $1::uuid AND i.pool = 'settlement'";
            assert_eq!(count(c, processed, &[&l]), 1);
            assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 1);
            (before_this + 1, attempts)
        })
        .await;

    // It was returned to the queue after the in-process retries ran out, and given up on one
    // delivery before the broker's limit would have taken it out of assetflow's hands.
    assert!(deliveries >= 2, "the message went back to the queue at least once: {deliveries} deliveries");
    assert!(deliveries <= u64::from(DELIVERY_LIMIT), "assetflow gave up before the broker did: {deliveries}");
    let per_delivery = 1 + RETRIES.len() as i64;
    let tried = tries(&env).await;
    assert_eq!(
        tried,
        deliveries as i64 * per_delivery,
        "{deliveries} deliveries, each tried 1 + {} times",
        RETRIES.len()
    );
    // The evidence: the final delivery's tries, each with its time and error.
    let attempts = attempts.as_array().expect("the attempts are an array");
    assert_eq!(attempts.len() as i64, per_delivery, "{attempts:?}");
    for attempt in attempts {
        assert!(attempt["at"].is_string(), "{attempt}");
        let error = attempt["error"].as_str().unwrap_or_default();
        assert!(error.contains("is refused"), "{attempt}");
    }

    // The notice reached the dead-letter exchange, and the pool's dead-letter queue was drained.
    wait_for_queue(&env, &notices, "the dead-letter notice is published", |n| n >= 1).await;
    let notice = channel(&env)
        .await
        .basic_get(notices.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("a notice");
    let notice: Value = serde_json::from_slice(&notice.delivery.data).expect("a JSON notice");
    assert_eq!(notice["reason"], "handler_failed", "{notice}");
    assert_eq!(notice["dead_letter_id"].as_str(), Some(letter.as_str()), "{notice}");
    drained(&env, &env.app.plumbing.names.dead_letter_queue(Pool::Settlement.as_str())).await;
    drained(&env, &env.app.plumbing.names.pool_queue(Pool::Settlement.as_str())).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_assetflow_cannot_dead_letter_is_dead_lettered_by_the_broker_at_its_limit_and_recorded() {
    let mut env = failing_env(&[REFUSE_ORDERS, REFUSE_DEAD_LETTERS]).await;
    env.product("concert", |_| {}).await;
    let olga = env.terminal("olga", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let (rid, letter) = one_failing_order_between_two(&env, &olga, "the broker's dead letter is recorded").await;

    let queue = env.app.plumbing.names.pool_queue(Pool::Settlement.as_str());
    let (l, r, q) = (letter.clone(), rid.clone(), queue.clone());
    env.db(move |c| {
        let field = |c: &mut diesel::PgConnection, sql: &'static str| text(c, sql, &[&l]).unwrap_or_default();
        assert_eq!(field(c, "SELECT reason AS value FROM dead_letters WHERE id = $1::uuid"), "broker_dead_lettered");
        assert_eq!(field(c, "SELECT pool AS value FROM dead_letters WHERE id = $1::uuid"), "settlement");
        assert_eq!(field(c, "SELECT message_type AS value FROM dead_letters WHERE id = $1::uuid"), "order.purchase");
        assert_eq!(field(c, "SELECT routing_key AS value FROM dead_letters WHERE id = $1::uuid"), "order.purchase");
        let detail = field(c, "SELECT detail AS value FROM dead_letters WHERE id = $1::uuid");
        assert!(detail.contains("delivery_limit") && detail.contains(&q), "{detail}");
        let death = "SELECT count(*) FROM dead_letters WHERE id = $1::uuid
                     AND headers->'x-death'->>'reason' = 'delivery_limit' AND headers->'x-death'->>'queue' = $2";
        assert_eq!(count(c, death, &[&l, &q]), 1, "the broker's x-death is kept");
        let attempts = "SELECT count(*) FROM dead_letters WHERE id = $1::uuid AND jsonb_array_length(attempts) >= 1";
        assert_eq!(count(c, attempts, &[&l]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM orders WHERE request_id = $1", &[&r]), 0);
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 1, "recorded once, by the recorder alone");
    })
    .await;
    // The broker took it out of assetflow's hands only at its limit: each delivery was tried in
    // full (1 + RETRIES), and there were at least as many as the limit, past the delivery where
    // assetflow gives up on a message whose dead letter it can record.
    let tried = tries(&env).await;
    let per_delivery = 1 + RETRIES.len() as i64;
    assert_eq!(tried % per_delivery, 0, "every delivery was tried 1 + {} times: {tried} tries", RETRIES.len());
    assert!(tried / per_delivery >= i64::from(DELIVERY_LIMIT), "{} deliveries", tried / per_delivery);

    // Nothing is left behind: not in its dead-letter queue, not in the pool's queue.
    drained(&env, &env.app.plumbing.names.dead_letter_queue(Pool::Settlement.as_str())).await;
    drained(&env, &queue).await;
    env.stop().await;
}
