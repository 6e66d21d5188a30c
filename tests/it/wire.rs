//! The wire-level audit (`assetflow audit --gateway-ledger`): what the gateway side received,
//! from the gateway simulator's ledger. A clean run with broker redeliveries has no duplicate on
//! the wire, and neither has a retransmission made before a late receipt; a real duplicate made
//! by hand after a delivery completed (an attempt published again under a new message id, an
//! attempt sent after the receipt, the asset under a new delivery id) is caught, exactly that one,
//! where the database's own checks see nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use assetflow::cli::audit::wire::{
    self, ONE_ATTEMPT_TWO_MESSAGE_IDS, ONE_SUBJECT_TWO_DELIVERIES, SENT_AFTER_RECEIPT, Wire,
};
use assetflow::cli::audit::{Audit, audit};
use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::ledger::{self, Reception};
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use assetflow::config::workers::PoolDefinitions;
use assetflow::contracts::messages::{DeliveryKind, DeliveryReceipt, GatewayDelivery, kinds};
use assetflow::domain::catalogue::PartyKind;
use assetflow::runtime::outbox::{self, Outgoing};
use chrono::{DateTime, TimeDelta, Utc};
use diesel::prelude::*;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{Env, count, execute, failed, query, text};
use crate::support::{DEADLINE, delivery_state, first_attempt, request_id, settle_all};

/// ledger_path is a fresh ledger file for one test.
fn ledger_path() -> PathBuf {
    std::env::temp_dir().join(format!("assetflow-ledger-{}.jsonl", Uuid::now_v7()))
}

/// wait_for_ledger polls the ledger at `path` until `check` accepts its receptions, or fails the
/// test after the deadline, naming what it waited for.
async fn wait_for_ledger<T>(path: &Path, what: &str, check: impl Fn(&[Reception]) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        let receptions = if path.exists() { ledger::read(path).expect("the ledger reads").receptions } else { vec![] };
        if let Some(found) = check(&receptions) {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what} ({} receptions)",
            receptions.len()
        );
    }
}

/// copies is how many times the ledger holds `attempt` of `delivery`.
fn copies(receptions: &[Reception], delivery: Uuid, attempt: u32) -> usize {
    receptions.iter().filter(|r| r.delivery_id == delivery && r.attempt == attempt).count()
}

/// wire_audit runs the wire-level audit of the ledger at `path` on the test's database.
async fn wire_audit(env: &Env, path: &Path) -> Wire {
    let path = path.to_path_buf();
    env.db(move |c| wire::audit_ledger(c, &path).expect("the wire audit runs")).await
}

/// settled waits until `orders` orders are final and nothing is open, and returns the audit of
/// the database.
async fn settled(env: &Env, orders: i64) -> Audit {
    env.wait_until("every order and transmission is final", move |c| {
        let audit = audit(c, Some(orders)).expect("the audit runs");
        (audit.orders == orders && audit.lost == 0).then_some(audit)
    })
    .await
}

/// audit_command runs `assetflow audit --gateway-ledger` as an operator would, against the test's
/// database, and returns whether it passed and what it printed.
async fn audit_command(env: &Env, ledger: &Path) -> (bool, String) {
    let dir = crate::processes::cluster(env);
    let ledger = ledger.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_assetflow"))
            .args(["--config", dir.join("assetflow.toml").to_str().unwrap(), "audit", "--no-queues"])
            .arg("--gateway-ledger")
            .arg(&ledger)
            .output()
            .expect("assetflow runs");
        let _ = std::fs::remove_dir_all(&dir);
        let printed = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code().is_some_and(|c| c <= 1), "assetflow audit crashed: {printed}");
        (out.status.success(), printed)
    })
    .await
    .unwrap()
}

/// Delivered is an immediate order's asset delivery, completed on its first attempt.
struct Delivered {
    delivery: Uuid,
    asset: Uuid,
}

/// delivered places an immediate order and waits until its asset delivery is delivered and
/// nothing is open.
async fn delivered(env: &Env, terminal: &SimTerminal) -> Delivered {
    let order = purchase(terminal, "ppv", 1, json!({"delivery": {"mode": "immediate"}}));
    env.send(&order).await;
    let sql =
        "SELECT d.id::text || ' ' || d.asset_id::text AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
               WHERE o.request_id = $1 AND d.kind = 'asset' AND d.status = 'delivered'";
    let request = request_id(&order);
    let ids = env.wait_until("the asset is delivered", move |c| text(c, sql, &[&request])).await;
    settled(env, 1).await;
    let (delivery, asset) = ids.split_once(' ').expect("two ids");
    Delivered { delivery: delivery.parse().unwrap(), asset: asset.parse().unwrap() }
}

/// Attempt is what assetflow recorded of one attempt of a delivery.
#[derive(QueryableByName)]
struct Attempt {
    #[diesel(sql_type = diesel::sql_types::Text)]
    kind: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    terminal_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    gateway_id: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    request_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Text)]
    content: String,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    sent_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Text)]
    payload_sha256: String,
}

/// attempt reads attempt `number` of `delivery` as assetflow recorded it.
fn attempt(c: &mut PgConnection, delivery: Uuid, number: i32) -> Attempt {
    let sql = "SELECT d.kind, d.terminal_id, d.gateway_id, d.request_id, d.content::text AS content, a.sent_at, a.payload_sha256
               FROM deliveries d JOIN delivery_attempts a ON a.delivery_id = d.id
               WHERE d.id = $1::uuid AND a.attempt = $2::int4";
    let values: [&dyn ToString; 2] = [&delivery, &number];
    query(sql, &values).get_result(c).unwrap_or_else(|e| panic!("{}", failed(sql, &values, e)))
}

/// message is the `delivery` message of a recorded attempt, with `delivery_id`, `attempt` and
/// `sent_at` as given.
fn message(recorded: &Attempt, delivery_id: Uuid, attempt: u32, sent_at: DateTime<Utc>) -> GatewayDelivery {
    GatewayDelivery {
        message_type: kinds::DELIVERY.into(),
        delivery_id,
        attempt,
        kind: DeliveryKind::parse(&recorded.kind).expect("a known kind"),
        terminal_id: recorded.terminal_id.clone(),
        gateway_id: recorded.gateway_id.clone(),
        sent_at,
        request_id: recorded.request_id.clone(),
        content: serde_json::from_str(&recorded.content).expect("JSON content"),
    }
}

/// assert_only asserts that the wire audit found exactly one duplicate, by `check`, and nothing
/// else that fails it but what `unaccounted` says.
fn assert_only(wire: &Wire, check: &str, unaccounted: i64) {
    for (name, n) in &wire.duplicates {
        assert_eq!(*n, i64::from(name == check), "{name}: {wire:#?}");
    }
    assert_eq!(wire.duplicated, 1, "{wire:#?}");
    assert_eq!(wire.unaccounted, unaccounted, "{wire:#?}");
    assert!(wire.unreadable.is_empty(), "{wire:#?}");
}

/// A ppv product, a terminal on gw-1, the app, a partner that settles everything and a gateway
/// keeping its ledger at `ledger`.
async fn running(ledger: &Path, gateway: GatewayOptions) -> (Env, SimTerminal) {
    let mut env = Env::new().await;
    env.product("ppv", |p| p.kind = "ppv_ticket".into()).await;
    let terminal = env.terminal("wire-1", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions { ledger: Some(ledger.to_path_buf()), ..gateway });
    (env, terminal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_a_clean_run_with_broker_redeliveries_has_no_duplicate_on_the_wire() {
    let ledger = ledger_path();
    let mut env = Env::new().await;
    env.product("ticket", |_| {}).await;
    let mut terminals = Vec::new();
    for (i, gateway) in ["gw-1", "gw-2", "gw-1"].iter().enumerate() {
        terminals.push(env.terminal(&format!("clean-{i}"), gateway, Some("card-co")).await);
    }
    env.start().await;
    env.partner(settle_all());
    // Every delivery goes back to the queue unanswered the first time it arrives, as from a
    // gateway that fails before its acknowledgement: the broker delivers each again.
    env.gateway(GatewayOptions { ledger: Some(ledger.clone()), requeue_rate: 1.0, ..GatewayOptions::default() });
    for i in 0..6 {
        let extra = match i % 3 {
            0 => json!({"delivery": {"mode": "immediate"}}),
            1 => json!({"recipient_terminal_ids": [terminals[(i + 1) % 3].id]}),
            _ => json!({}),
        };
        env.send(&purchase(&terminals[i % 3], "ticket", 1, extra)).await;
    }
    let audit = settled(&env, 6).await;
    assert_eq!(audit.duplicated, 0, "{}", audit.summary());
    let attempts = env.db(|c| count(c, "SELECT count(*) FROM delivery_attempts", &[])).await;
    assert!(attempts >= 6, "certificates and assets went out: {attempts}");

    let wire = wire_audit(&env, &ledger).await;
    assert_eq!((wire.duplicated, wire.unaccounted, wire.retransmissions), (0, 0, 0), "{wire:#?}");
    assert!(wire.problems().is_empty(), "{:?}", wire.problems());
    // Each attempt reached the gateway as one message, twice: the second time a redelivery.
    assert_eq!(wire.messages, attempts, "{wire:#?}");
    assert_eq!((wire.received, wire.redeliveries), (2 * attempts, attempts), "{wire:#?}");
    let receptions = ledger::read(&ledger).unwrap().receptions;
    for (i, r) in receptions.iter().enumerate() {
        let before = receptions[..i].iter().any(|e| e.message_id == r.message_id);
        assert_eq!(r.redelivery, before, "the ledger flags exactly the copies seen before: {r:?}");
    }
    let (passed, printed) = audit_command(&env, &ledger).await;
    assert!(passed, "assetflow audit --gateway-ledger passes a clean run: {printed}");
    assert!(printed.contains(&format!("redeliveries {attempts} · retransmissions 0 · duplicated 0")), "{printed}");
    env.stop().await;
    std::fs::remove_file(&ledger).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_a_retransmission_made_before_a_late_receipt_is_counted_and_is_no_duplicate() {
    // Receipts are due within a millisecond and retried at once, so that the test's own run of
    // the retransmission job, at the real time, times attempt 1 out and sends attempt 2. Not
    // zero: attempt 2, sent at the run's time, must not be due within the same run (the run's
    // second connection would time it out and send attempt 3).
    let mut pools = PoolDefinitions::built_in();
    pools.delivery.transmission.ack_timeout = Duration::from_millis(1);
    pools.delivery.transmission.schedule = vec![Duration::ZERO];
    pools.delivery.transmission.jitter = 0.0;
    let ledger = ledger_path();
    let mut env = Env::with_pools(json!({}), pools).await;
    // The late receipt is written by hand, as the gateway's alone: the product takes that.
    env.product("ppv", |p| {
        p.kind = "ppv_ticket".into();
        p.proof_of_delivery = "gateway".into();
    })
    .await;
    let terminal = env.terminal("late-1", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    // The gateway records and never answers: the receipt is sent by hand, late, below.
    env.gateway(GatewayOptions { ledger: Some(ledger.clone()), silence_rate: 1.0, ..GatewayOptions::default() });
    let order = purchase(&terminal, "ppv", 1, json!({"delivery": {"mode": "immediate"}}));
    env.send(&order).await;
    let first = first_attempt(&env, &request_id(&order)).await;
    let delivery: Uuid = first.delivery.parse().unwrap();
    wait_for_ledger(&ledger, "attempt 1 reaches the gateway", |r| (copies(r, delivery, 1) == 1).then_some(())).await;

    // At the real time, and never before attempt 1's deadline.
    let as_of = Utc::now().max(first.sent_at + TimeDelta::milliseconds(1));
    let retry = env.run_job("retransmission", as_of).await;
    assert_eq!((retry.rows_scanned, retry.enqueued), (2, 1), "attempt 1 timed out and attempt 2 sent: {retry:?}");
    wait_for_ledger(&ledger, "attempt 2 reaches the gateway", |r| (copies(r, delivery, 2) == 1).then_some(())).await;

    // Attempt 1's receipt, late: it arrives after attempt 2 went out, and completes the delivery.
    let recorded = env.db(move |c| attempt(c, delivery, 1)).await;
    let receipt = DeliveryReceipt {
        message_type: kinds::DELIVERY_RECEIPT.into(),
        delivery_id: delivery,
        attempt: 1,
        gateway_id: recorded.gateway_id.clone(),
        terminal_id: recorded.terminal_id.clone(),
        sha256: recorded.payload_sha256.clone(),
        received_at: Utc::now(),
        acknowledgement: None,
        signature: None,
    };
    env.publish(kinds::DELIVERY_RECEIPT, &env.signed_by(PartyKind::Gateway, "gw-1", &receipt).await).await;
    let id = first.delivery.clone();
    env.wait_until("the late receipt completes the delivery", move |c| {
        (delivery_state(c, &id).status == "delivered").then_some(())
    })
    .await;
    let id = first.delivery.clone();
    env.db(move |c| {
        let outcomes = "SELECT string_agg(outcome, ',' ORDER BY attempt) AS value FROM delivery_attempts WHERE delivery_id = $1::uuid";
        assert_eq!(text(c, outcomes, &[&id]).as_deref(), Some("acknowledged,timed_out"));
        let late = "SELECT count(*) FROM deliveries d JOIN delivery_attempts a ON a.delivery_id = d.id
                    WHERE d.id = $1::uuid AND a.attempt = 2 AND a.sent_at < d.delivered_at";
        assert_eq!(count(c, late, &[&id]), 1, "attempt 2 was made before the receipt was taken in");
    })
    .await;

    let wire = wire_audit(&env, &ledger).await;
    assert_eq!((wire.retransmissions, wire.duplicated, wire.unaccounted, wire.redeliveries), (1, 0, 0, 0), "{wire:#?}");
    assert!(wire.problems().is_empty(), "{:?}", wire.problems());
    env.stop().await;
    std::fs::remove_file(&ledger).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_an_attempt_published_again_under_a_new_message_id_is_a_duplicate_on_the_wire() {
    let ledger = ledger_path();
    let (mut env, terminal) = running(&ledger, GatewayOptions::default()).await;
    let done = delivered(&env, &terminal).await;
    let (passed, printed) = audit_command(&env, &ledger).await;
    assert!(passed, "nothing twice yet: {printed}");

    // Attempt 1 written to the outbox again, as a new message: the relay publishes it.
    let delivery = done.delivery;
    let gateways = env.app.plumbing.names.gateways();
    env.db(move |c| {
        let recorded = attempt(c, delivery, 1);
        let again = message(&recorded, delivery, 1, recorded.sent_at);
        outbox::enqueue(c, &Outgoing::json(gateways, recorded.gateway_id.as_str(), kinds::DELIVERY, &again)).unwrap();
    })
    .await;
    wait_for_ledger(&ledger, "the copy reaches the gateway", |r| (copies(r, delivery, 1) == 2).then_some(())).await;
    let audit = settled(&env, 1).await;
    assert_eq!(audit.duplicated, 0, "the database sees nothing twice: {}", audit.summary());

    let wire = wire_audit(&env, &ledger).await;
    assert_only(&wire, ONE_ATTEMPT_TWO_MESSAGE_IDS, 0);
    assert_eq!((wire.redeliveries, wire.retransmissions), (0, 0), "{wire:#?}");
    assert!(
        wire.findings[0].starts_with(&format!("delivery {delivery} attempt 1 received as 2 messages")),
        "{wire:#?}"
    );
    let (passed, printed) = audit_command(&env, &ledger).await;
    assert!(!passed, "assetflow audit fails on a duplicate on the wire: {printed}");
    assert!(
        printed.contains(&format!("PROBLEM duplicate on the wire: {ONE_ATTEMPT_TWO_MESSAGE_IDS} = 1")),
        "{printed}"
    );
    env.stop().await;
    std::fs::remove_file(&ledger).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_an_attempt_sent_after_the_receipt_was_taken_in_is_a_duplicate_on_the_wire() {
    let ledger = ledger_path();
    let (mut env, terminal) = running(&ledger, GatewayOptions::default()).await;
    let done = delivered(&env, &terminal).await;

    // Attempt 2 of the delivered delivery, recorded and sent as the retransmission scan would,
    // had it not seen the receipt.
    let delivery = done.delivery;
    let gateways = env.app.plumbing.names.gateways();
    env.db(move |c| {
        let recorded = attempt(c, delivery, 1);
        let again = message(&recorded, delivery, 2, Utc::now());
        let outgoing = Outgoing::json(gateways, recorded.gateway_id.as_str(), kinds::DELIVERY, &again);
        let record =
            "INSERT INTO delivery_attempts (delivery_id, attempt, message_id, payload_sha256, sent_at, outcome)
                      VALUES ($1::uuid, 2, $2::uuid, $3, $4::timestamptz, 'sent')";
        let sha256 = assetflow::crypto::sha256_hex(&outgoing.payload);
        assert_eq!(execute(c, record, &[&delivery, &outgoing.message_id, &sha256, &again.sent_at.to_rfc3339()]), 1);
        outbox::enqueue(c, &outgoing).unwrap();
    })
    .await;
    wait_for_ledger(&ledger, "attempt 2 reaches the gateway", |r| (copies(r, delivery, 2) == 1).then_some(())).await;
    let audit = settled(&env, 1).await;
    assert_eq!(audit.duplicated, 0, "the database sees nothing twice: {}", audit.summary());

    let wire = wire_audit(&env, &ledger).await;
    assert_only(&wire, SENT_AFTER_RECEIPT, 0);
    assert_eq!((wire.redeliveries, wire.retransmissions), (0, 0), "not a retransmission: {wire:#?}");
    assert!(wire.findings[0].starts_with(&format!("delivery {delivery} attempt 2 was sent at")), "{wire:#?}");
    env.stop().await;
    std::fs::remove_file(&ledger).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_the_asset_published_again_under_a_new_delivery_id_is_a_duplicate_on_the_wire() {
    let ledger = ledger_path();
    let (mut env, terminal) = running(&ledger, GatewayOptions::default()).await;
    let done = delivered(&env, &terminal).await;

    // The same asset, to the same gateway, under a delivery id assetflow never made.
    let (delivery, again) = (done.delivery, Uuid::now_v7());
    let recorded = env.db(move |c| attempt(c, delivery, 1)).await;
    let body = serde_json::to_vec(&message(&recorded, again, 1, Utc::now())).unwrap();
    env.publisher
        .publish(&env.app.plumbing.names.gateways(), &recorded.gateway_id, kinds::DELIVERY, &body)
        .await
        .expect("published");
    wait_for_ledger(&ledger, "the copy reaches the gateway", |r| (copies(r, again, 1) == 1).then_some(())).await;

    let wire = wire_audit(&env, &ledger).await;
    // The duplicate, and the message assetflow has no record of.
    assert_only(&wire, ONE_SUBJECT_TWO_DELIVERIES, 1);
    let asset = done.asset;
    assert!(
        wire.findings.iter().any(|f| f.starts_with(&format!("asset {asset} received under 2 deliveries"))),
        "{wire:#?}"
    );
    assert!(wire.findings.iter().any(|f| f.starts_with(&format!("delivery {again} attempt 1"))), "{wire:#?}");
    env.stop().await;
    std::fs::remove_file(&ledger).unwrap();
}
