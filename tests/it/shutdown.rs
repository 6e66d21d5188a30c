//! SIGTERM to a real `assetflow run` in the middle of a burst (`docs/product.md#graceful-shutdown`):
//! it stops consuming, finishes what it has in hand, flushes the outbox and exits 0. What it took
//! from the broker was either processed, with its inbox row, and acknowledged, or returned to its
//! queue untouched; never both, and never lost.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use assetflow::cli::audit::audit;
use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::publisher::publish_burst;
use assetflow::cli::simulate::terminals::{purchase, register};
use assetflow::contracts::messages::kinds;
use assetflow::contracts::topology::Pool;
use diesel::connection::SimpleConnection;
use lapin::options::BasicGetOptions;
use serde_json::json;

use crate::chaos::assert_guarantees;
use crate::harness::{Env, count, text};
use crate::processes::{cluster, spawn_node};
use crate::support::{DEADLINE, QueueCounts, channel, queue_counts, settle_all};

/// BURST is how many orders arrive at once, ten times a second.
const BURST: usize = 20;

/// SLOW_ORDERS makes each statement that stores orders take 300 ms more.
const SLOW_ORDERS: &str = "
    CREATE FUNCTION test_slow_orders() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_sleep(0.3);
      RETURN NULL;
    END $$;
    CREATE TRIGGER test_slow_orders AFTER INSERT ON orders FOR EACH STATEMENT EXECUTE FUNCTION test_slow_orders();";

/// How long a drain may take before the test fails.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Node is one `assetflow run` process, killed if the test ends without stopping it.
struct Node {
    child: Option<Child>,
}

impl Node {
    fn start(dir: &Path, name: &str) -> Node {
        Node { child: Some(spawn_node(dir, name)) }
    }

    /// Node::terminate sends SIGTERM and waits for the process to exit, at most `DRAIN_DEADLINE`.
    async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        tokio::task::spawn_blocking(move || {
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success(), "SIGTERM sent");
            let deadline = std::time::Instant::now() + DRAIN_DEADLINE;
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    return status;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("assetflow did not exit within {DRAIN_DEADLINE:?} of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Ready is what waits, ready, in a pool's queue: each message's id and type.
struct Ready {
    messages: Vec<(String, String)>,
}

/// ready_in takes every ready message of `queue` without acknowledging it, and returns them all
/// to the queue when it is done.
async fn ready_in(env: &Env, queue: &str) -> Ready {
    let channel = channel(env).await;
    let mut messages = Vec::new();
    while let Some(got) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await.expect("basic.get") {
        let props = &got.delivery.properties;
        let id = props.message_id().as_ref().map(|id| id.to_string()).expect("every message has an id");
        let kind = props.kind().as_ref().map(|k| k.to_string()).unwrap_or_default();
        messages.push((id, kind));
    }
    // Closing the channel returns them, unacknowledged, to the queue.
    let _ = channel.close(200, "counted".into()).await;
    Ready { messages }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_burst_acknowledges_or_returns_every_message_in_hand_and_flushes_the_outbox() {
    let env = Env::new().await;
    env.product("ticket", |_| {}).await;
    let dir = cluster(&env);
    // Their keys where the test's gateway finds them: it relays their signed acknowledgements.
    let terminals = register(&env.config, 6, &env.keys.join("terminals")).await.unwrap();
    // Every batch of orders takes a while to store, so that whenever the SIGTERM comes the
    // settlement pool has a batch in its hands, and more prefetched behind it.
    env.db(|c| c.batch_execute(SLOW_ORDERS).expect("the test's trigger is installed")).await;
    let mut node = Node::start(&dir, "node");
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    // Orders keep arriving, faster than the process takes them, before, during and after the
    // SIGTERM: it has messages in hand when it comes, and more wait.
    let stop_orders = tokio_util::sync::CancellationToken::new();
    let (broker, requests, stop) = (env.broker.clone(), env.app.plumbing.names.requests(), stop_orders.clone());
    let orders = tokio::spawn(async move {
        let mut sent = 0;
        while !stop.is_cancelled() {
            let bodies: Vec<Vec<u8>> = (sent..sent + BURST)
                .map(|i| {
                    let t = &terminals[i % terminals.len()];
                    let extra = match i % 5 {
                        0 => json!({"delivery": {"mode": "immediate"}}),
                        1 => json!({"recipient_terminal_ids": [terminals[(i + 1) % terminals.len()].id]}),
                        _ => json!({}),
                    };
                    serde_json::to_vec(&purchase(t, "ticket", 1, extra)).unwrap()
                })
                .collect();
            publish_burst(&broker, &requests, kinds::ORDER_PURCHASE, kinds::ORDER_PURCHASE, bodies, 8)
                .await
                .expect("the burst is published");
            sent += BURST;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    });

    // Work is flowing through every pool: orders issued, certificates delivered.
    env.wait_until("certificates are being delivered", |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'delivered'", &[]) >= 20)
            .then_some(())
    })
    .await;
    let status = node.terminate().await;
    assert!(status.success(), "assetflow exited with {status}");
    stop_orders.cancel();
    let sent = orders.await.unwrap();
    let processed = env
        .db(|c| {
            count(c, "SELECT count(*) FROM inbox WHERE pool = 'settlement' AND message_type = 'order.purchase'", &[])
        })
        .await as usize;
    assert!(processed < sent, "it stopped with orders left to take: {processed} of {sent} processed");

    // Flushed: nothing it committed waits in the outbox, due or leased.
    env.db(|c| {
        let left = text(
            c,
            "SELECT count(*) || ' rows: ' || string_agg(message_type || ' available ' || available_at::text || ' attempts ' || attempts, '; ')
             AS value FROM outbox",
            &[],
        );
        assert_eq!(count(c, "SELECT count(*) FROM outbox", &[]), 0, "the outbox is flushed: {left:?}");
    })
    .await;

    // Nothing is left unacknowledged on its behalf, and every message waiting in a pool's queue is
    // one it never processed: what it processed it acknowledged before it exited. (Internal
    // messages may be published twice by design, the inbox making that harmless, so the check
    // is on the messages published once: the orders, the partner's results, the gateway's receipts.)
    let once = [kinds::ORDER_PURCHASE, kinds::SETTLEMENT_RESULT, kinds::DELIVERY_RECEIPT];
    let mut waiting_orders = 0;
    for pool in Pool::ALL {
        let queue = env.app.plumbing.names.pool_queue(pool.as_str());
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let QueueCounts { unacknowledged, .. } = queue_counts(&env, &queue).await;
            if unacknowledged == 0 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{queue} still has {unacknowledged} unacknowledged");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ready = ready_in(&env, &queue).await;
        let ids: Vec<String> =
            ready.messages.iter().filter(|(_, kind)| once.contains(&kind.as_str())).map(|(id, _)| id.clone()).collect();
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "no message waits twice in {queue}");
        waiting_orders += ready.messages.iter().filter(|(_, kind)| kind == kinds::ORDER_PURCHASE).count();
        let (pool_name, ids) = (pool.as_str(), ids.join(","));
        let both = env
            .db(move |c| {
                count(
                    c,
                    "SELECT count(*) FROM inbox WHERE pool = $1 AND message_id = ANY(string_to_array($2, ','))",
                    &[&pool_name, &ids],
                )
            })
            .await;
        assert_eq!(
            both, 0,
            "messages the stopped process processed (they have inbox rows) wait again in {queue}: their \
             acknowledgements never reached the broker"
        );
    }
    assert_eq!(
        processed + waiting_orders,
        sent,
        "every order was processed ({processed}) or waits in its queue ({waiting_orders}): none lost"
    );

    // The next process takes up what was returned, at full speed, and everything completes, once.
    env.db(|c| c.batch_execute("DROP TRIGGER test_slow_orders ON orders").expect("dropped")).await;
    let _next = Node::start(&dir, "next");
    let audit = env
        .wait_until("every order and transmission is final", move |c| {
            let audit = audit(c, Some(sent as i64)).expect("the audit runs");
            (audit.orders == sent as i64 && audit.lost == 0).then_some(audit)
        })
        .await;
    assert_guarantees(&audit);
    assert_eq!(audit.dead_letters(), 0, "nothing given up on: {}", audit.summary());
    let _ = std::fs::remove_dir_all(&dir);
}
