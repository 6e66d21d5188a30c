//! The outbox's two ways out: a handler's messages are published by its own process as soon as
//! its transaction commits, and the relay publishes everything else, including what a publisher
//! left behind once its lease has ended.

use std::time::Duration;

use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::terminals::purchase;
use assetflow::contracts::messages::{DeliveryRequested, kinds};
use assetflow::runtime::outbox::{self, Outgoing};
use serde_json::json;

use crate::harness::{Env, count};
use crate::support::{bind_queue, delivered_certificate, queued, request_id, settle_all, wait_for_queue};

/// A lease no test outlives: a row written with it is never claimed by a relay during the test.
const FOREVER: Duration = Duration::from_secs(600);

/// message is a well-formed internal message with the given routing key.
fn message(env: &Env, routing_key: &str) -> Outgoing {
    let body =
        DeliveryRequested { message_type: kinds::DELIVERY_REQUESTED.into(), delivery_ids: vec![uuid::Uuid::now_v7()] };
    Outgoing::json(env.app.plumbing.names.internal(), routing_key, kinds::DELIVERY_REQUESTED, &body)
}

/// listen binds a queue of the test's own to the internal exchange under `routing_key`, so that
/// messages sent there are routed (and confirmed) without any pool taking them.
async fn listen(env: &Env, routing_key: &str) -> String {
    bind_queue(env, &format!("test.outbox.{routing_key}"), &env.app.plumbing.names.internal(), routing_key).await
}

/// publisher_lease waits for the started app's publisher to take messages, and is its lease.
async fn publisher_lease(env: &Env) -> Duration {
    let deadline = tokio::time::Instant::now() + crate::support::DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    loop {
        poll.tick().await;
        if let Some(lease) = env.app.plumbing.handoff.lease() {
            return lease;
        }
        assert!(tokio::time::Instant::now() < deadline, "the app never opened its handoff");
    }
}

/// Row is what a test looks for in a message's outbox row.
enum Row {
    /// The row, whatever its state.
    Any,
    /// The row as it was written: never tried, no error.
    Untouched,
    /// The row given back unconfirmed, due again within a minute, and tried by the relay too.
    GivenBack,
}

/// rows_with counts the outbox rows of `message_id` that are as `row` says.
fn rows_with(conn: &mut diesel::PgConnection, message_id: uuid::Uuid, row: Row) -> i64 {
    let sql = match row {
        Row::Any => "SELECT count(*) FROM outbox WHERE message_id = $1::uuid",
        Row::Untouched => {
            "SELECT count(*) FROM outbox WHERE message_id = $1::uuid AND attempts = 0 AND last_error IS NULL"
        }
        Row::GivenBack => {
            "SELECT count(*) FROM outbox WHERE message_id = $1::uuid
               AND attempts >= 2 AND last_error LIKE 'not confirmed%' AND available_at < now() + interval '1 minute'"
        }
    };
    count(conn, sql, &[&message_id])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_of_an_order_is_published_by_the_process_that_committed_it() {
    // With a lease of ten minutes (the longest allowed), no relay may claim a handler's messages during the test: the order
    // can only complete if each one was published by the process that committed it.
    let mut env = Env::with(json!({"outbox": {"lease": "10m"}})).await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let order = purchase(&alice, "concert", 1, json!({}));
    env.send(&order).await;
    delivered_certificate(&env, &request_id(&order)).await;
    // And each row is deleted once the broker has confirmed its message.
    env.wait_until("the outbox is empty", |c| (count(c, "SELECT count(*) FROM outbox", &[]) == 0).then_some(())).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_claims_a_leased_row_only_once_its_lease_has_ended() {
    let mut env = Env::new().await;
    let queue = listen(&env, "test.leases").await;
    let held = message(&env, "test.leases"); // a live publisher still has it
    let abandoned = message(&env, "test.leases"); // its publisher was killed; the lease is ending
    let due = message(&env, "test.leases"); // written for the relay
    let (h, a, d) = (held.message_id, abandoned.message_id, due.message_id);
    env.db(move |c| {
        outbox::enqueue_leased(c, &[held], FOREVER).expect("written");
        outbox::enqueue_leased(c, &[abandoned], Duration::from_millis(300)).expect("written");
        outbox::enqueue_all(c, &[due]).expect("written");
    })
    .await;
    env.start().await;

    env.wait_until("the due and the abandoned messages are published", move |c| {
        (rows_with(c, a, Row::Any) + rows_with(c, d, Row::Any) == 0).then_some(())
    })
    .await;
    wait_for_queue(&env, &queue, "both reach the queue", |n| n >= 2).await;
    // The held row was the oldest and was due first in the claim's order, had its lease been ignored.
    env.db(move |c| assert_eq!(rows_with(c, h, Row::Untouched), 1, "the held row is untouched")).await;
    assert_eq!(queued(&env, &queue).await, 2, "only the due and the abandoned messages were published");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_message_the_broker_refuses_goes_back_to_the_relay() {
    let mut env = Env::with(json!({"outbox": {"lease": "10m"}})).await;
    env.start().await;
    // As a handler would: the row is written leased, and handed over once it has committed.
    let refused = message(&env, "nowhere"); // no queue takes it: the broker returns it
    let id = refused.message_id;
    let lease = publisher_lease(&env).await;
    assert_eq!(lease, FOREVER);
    let handed = refused.clone();
    env.db(move |c| outbox::enqueue_leased(c, &[handed], lease).expect("written")).await;
    env.app.plumbing.handoff.give(vec![refused]);

    // The publisher gives the row back, due a second later; the relay then tries it too.
    env.wait_until("the row is given back and the relay has tried it", move |c| {
        (rows_with(c, id, Row::GivenBack) == 1).then_some(())
    })
    .await;
    env.stop().await;
    env.db(move |c| assert_eq!(rows_with(c, id, Row::Any), 1, "it is never dropped")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_publishes_what_it_is_handed_but_leaves_to_the_relay_what_waited_too_long() {
    let env = Env::new().await; // no app runs: no relay, only the publishers below
    let queue = listen(&env, "test.handed").await;
    let (fresh, stale) = (message(&env, "test.handed"), message(&env, "test.handed"));
    let (f, st) = (fresh.message_id, stale.message_id);
    let rows = vec![fresh.clone(), stale.clone()];
    env.db(move |c| outbox::enqueue_leased(c, &rows, FOREVER).expect("written")).await;

    // Handed over well within its lease: published, and its row deleted once confirmed.
    let handoff = outbox::Handoff::default();
    let handed = handoff.open(FOREVER);
    handoff.give(vec![fresh]);
    handoff.close();
    outbox::Publisher::new(env.app.plumbing.db.clone(), env.broker.clone()).run(handed).await;
    wait_for_queue(&env, &queue, "the fresh message is published", |n| n >= 1).await;
    env.db(move |c| assert_eq!(rows_with(c, f, Row::Any), 0, "its row is deleted")).await;

    // Handed over more than half its lease ago (here a lease of nothing): left to the relay.
    let handed = handoff.open(Duration::ZERO);
    handoff.give(vec![stale]);
    handoff.close();
    outbox::Publisher::new(env.app.plumbing.db.clone(), env.broker.clone()).run(handed).await;
    env.db(move |c| assert_eq!(rows_with(c, st, Row::Untouched), 1, "its row is untouched")).await;
    assert_eq!(queued(&env, &queue).await, 1, "only the fresh message was published");
}
