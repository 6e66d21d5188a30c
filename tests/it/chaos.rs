//! Fault tests: a broker restart and a database restart under load, simulated by cutting a TCP
//! proxy between the app and RabbitMQ or PostgreSQL, so that the rest of the suite, running in
//! parallel against the same services, sees nothing. After each, the same audit as `ops/chaos`
//! (`assetflow audit --gateway-ledger`): nothing lost, nothing done twice, every status history
//! legal, and nothing received twice by the gateway. The workload has holders ask for refunds (some
//! refused by the partner), defer downloads, and book and submit receipt certificates too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use assetflow::cli::audit::{Audit, audit, wire};
use assetflow::cli::simulate::gateway::{GatewayOptions, booking_request};
use assetflow::cli::simulate::partner::PartnerOptions;
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use assetflow::config::workers::PoolDefinitions;
use assetflow::crypto::KeyRing;
use assetflow::domain::bookings::{Terms, save_terms};
use assetflow::service::app::{self, App, RunOptions};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::harness::{Env, ISSUER, count};

/// Proxy forwards TCP connections to a service until it is cut. A cut closes every open
/// connection and closes new ones as soon as they are accepted, as a restarting service would;
/// a restore lets connections through again.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    stop: CancellationToken,
}

struct ProxyState {
    cut: bool,
    /// Cancelled to close the connections of the current generation.
    connections: CancellationToken,
}

impl Proxy {
    /// Proxy::start listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState { cut: false, connections: CancellationToken::new() }));
        let stop = CancellationToken::new();
        let (upstream, state2, stop2) = (upstream.to_string(), state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let connections = {
                    let state = state2.lock().unwrap();
                    if state.cut {
                        continue; // dropping the stream closes it
                    }
                    state.connections.clone()
                };
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = connections.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Proxy { addr, state, stop }
    }

    /// Proxy::cut closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.cut = true;
        state.connections.cancel();
    }

    /// Proxy::restore lets connections through again.
    pub fn restore(&self) {
        let mut state = self.state.lock().unwrap();
        state.cut = false;
        state.connections = CancellationToken::new();
    }

    /// Proxy::redirect rewrites `url` to go through this proxy instead of to `upstream`.
    pub fn redirect(&self, url: &str, upstream: &str) -> String {
        assert!(url.contains(upstream), "{url} does not go to {upstream}");
        url.replacen(upstream, &self.addr.to_string(), 1)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.state.lock().unwrap().connections.cancel();
    }
}

const POSTGRES: &str = "127.0.0.1:5432";
const RABBITMQ: &str = "127.0.0.1:5672";

/// Proxied is a test's app, reaching PostgreSQL and RabbitMQ only through proxies, with the
/// simulators and the test's own queries going to the services directly.
struct Proxied {
    env: Env,
    postgres: Proxy,
    rabbitmq: Proxy,
    terminals: Vec<SimTerminal>,
    /// The gateway's ledger: every delivery message it received.
    ledger: PathBuf,
    stop: CancellationToken,
    run: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Proxied {
    async fn start(overrides: serde_json::Value) -> Proxied {
        let env = Env::with(overrides).await;
        env.product("ticket", |_| {}).await;
        // A seat sold by booking: held until its receipt certificate expires.
        env.product("seat", |_| {}).await;
        // What holders change their tickets for.
        env.product("coupon", |p| p.kind = "coupon".into()).await;
        let terms = Terms {
            product_id: "seat".into(),
            condition: "hold".into(),
            places: None,
            decided_at: None,
            window_secs: 3_600,
        };
        env.db(move |c| save_terms(c, &terms).unwrap()).await;
        let (postgres, rabbitmq) = (Proxy::start(POSTGRES).await, Proxy::start(RABBITMQ).await);
        let mut config = env.config.clone();
        config.database.url = postgres.redirect(&config.database.url, POSTGRES);
        config.amqp.url = rabbitmq.redirect(&config.amqp.url, RABBITMQ);
        let app = Arc::new(App::new(config, PoolDefinitions::built_in(), KeyRing::ephemeral(&[ISSUER])));
        let stop = CancellationToken::new();
        // Pools, relay and scheduler: everything a process runs but the HTTP listener.
        let options = RunOptions { http: false, ..RunOptions::default() };
        let run = Some(tokio::spawn(app::run(app, options, stop.clone())));
        let mut terminals = Vec::new();
        for (i, gateway) in ["gw-1", "gw-2", "gw-1", "gw-2"].iter().enumerate() {
            let partner = if i % 2 == 0 { "card-co" } else { "bank-a" };
            terminals.push(env.terminal(&format!("term-{i}"), gateway, Some(partner)).await);
        }
        // A partner and a gateway that send some answers twice, as real ones do after a timeout;
        // the gateway also fails before acknowledging a tenth of what it receives, which the
        // broker delivers again, and keeps a ledger of everything it received. The partner refuses
        // some refunds; the holders ask for refunds, change and defer downloads of some of the
        // certificates they receive, and submit most receipt certificates.
        env.partner(PartnerOptions {
            decline_rate: 0.1,
            refund_refusal_rate: 0.25,
            duplicate_rate: 0.2,
            latency: Duration::from_millis(2),
            ..PartnerOptions::default()
        });
        let ledger = std::env::temp_dir().join(format!("assetflow-ledger-{}.jsonl", uuid::Uuid::now_v7()));
        env.gateway(GatewayOptions {
            duplicate_rate: 0.2,
            requeue_rate: 0.1,
            refund_rate: 0.25,
            change_rate: 0.15,
            change_to: Some("coupon".into()),
            defer_rate: 0.2,
            // A run this short can draw no change at all, and restart_under_load's "holders changed
            // tickets" would fail by chance.
            each_answer_first: true,
            submit_rate: 0.8,
            ledger: Some(ledger.clone()),
            ..GatewayOptions::default()
        });
        Proxied { env, postgres, rabbitmq, terminals, ledger, stop, run }
    }

    /// Proxied::order places `n` orders, a fifth of them immediate and a fifth gifts, and books a
    /// seat for every fifth.
    async fn order(&self, n: usize) {
        let terminals = &self.terminals;
        for i in 0..n {
            let t = &terminals[i % terminals.len()];
            let extra = match i % 5 {
                0 => json!({"delivery": {"mode": "immediate"}}),
                1 => json!({"recipient_terminal_ids": [terminals[(i + 1) % terminals.len()].id]}),
                _ => json!({}),
            };
            self.env.send(&purchase(t, "ticket", 1, extra)).await;
            if i % 5 == 2 {
                self.env.send(&booking_request(&t.id, "seat", &t.key)).await;
            }
        }
    }

    /// Proxied::wait_for_issued waits until at least `n` orders are issued: processing goes on.
    async fn wait_for_issued(&self, n: i64) {
        let what = format!("{n} orders are issued");
        self.env
            .wait_until(&what, move |c| {
                (count(c, "SELECT count(*) FROM orders WHERE status = 'issued'", &[]) >= n).then_some(())
            })
            .await;
    }

    /// Proxied::settled waits until every one of `orders` orders reached a final state and every
    /// transmission is closed, then audits, the gateway's ledger too.
    /// Each new state of the audit is printed, so that a failed wait shows where it stalled.
    async fn settled(&self, orders: i64) -> Audit {
        let last = Mutex::new(String::new());
        let mut audit = self
            .env
            .wait_until("every order and transmission is final", move |c| {
                let audit = audit(c, Some(orders)).expect("the audit runs");
                let summary = format!("{}open: {:?}", audit.summary(), audit.open);
                if *last.lock().unwrap() != summary {
                    eprintln!("{summary}");
                    *last.lock().unwrap() = summary;
                }
                (audit.orders == orders && audit.lost == 0).then_some(audit)
            })
            .await;
        let ledger = self.ledger.clone();
        audit.wire = Some(self.env.db(move |c| wire::audit_ledger(c, &ledger).expect("the ledger is audited")).await);
        audit
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(run) = self.run.take() {
            run.await.expect("the app did not panic").expect("the app stopped cleanly");
        }
        let _ = std::fs::remove_file(&self.ledger);
    }
}

/// assert_guarantees fails the test on any broken guarantee: lost, duplicated, an illegal path,
/// a dead letter without its reason or caused by the outage, and, when the audit read a gateway
/// ledger, anything received twice or unaccounted for on the wire.
pub fn assert_guarantees(audit: &Audit) {
    assert_eq!(audit.lost, 0, "nothing lost: {audit:#?}");
    assert_eq!(audit.duplicated, 0, "nothing done twice: {audit:#?}");
    if let Some(wire) = &audit.wire {
        assert_eq!((wire.duplicated, wire.unaccounted), (0, 0), "nothing twice on the wire: {}", audit.summary());
        assert!(wire.messages > 0, "the gateway's ledger holds what it received: {}", audit.summary());
    }
    assert!(audit.problems().is_empty(), "{}", audit.summary());
}

/// dead_lettered_by_faults counts the dead letters but those of changes the partner would not
/// undo: it refuses a share of refunds, compensations among them, and such a change is an
/// operator's by design, whatever the faults.
fn dead_lettered_by_faults(audit: &Audit) -> i64 {
    audit.dead_letters() - audit.dead_lettered.get("compensation_refused").copied().unwrap_or(0)
}

/// restart_under_load cuts one of the app's connections mid-load, while orders keep arriving,
/// restores it, and checks that processing resumed with no help and every guarantee held.
async fn restart_under_load(service: fn(&Proxied) -> &Proxy) {
    let run = Proxied::start(json!({})).await;
    run.order(20).await;
    run.wait_for_issued(5).await;

    // Cut mid-load: transactions and publishes in flight lose their connections, the relay and the
    // scheduler lose theirs, and orders keep arriving at the broker meanwhile.
    run.order(10).await;
    service(&run).cut();
    run.order(10).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // the outage lasts a while
    service(&run).restore();

    // Processing resumes with no help, and the orders placed during the outage complete.
    run.wait_for_issued(25).await;
    run.order(10).await;
    let audit = run.settled(50).await;
    assert_guarantees(&audit);
    assert!(audit.bookings > 0 && audit.submitted > 0, "seats were booked and submitted: {}", audit.summary());
    assert!(audit.refunds > 0, "holders asked for refunds: {}", audit.summary());
    assert!(audit.changes > 0, "holders changed tickets: {}", audit.summary());
    assert_eq!(dead_lettered_by_faults(&audit), 0, "nothing dead-lettered by the faults: {}", audit.summary());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_broker_restart_under_load_loses_nothing_and_processing_resumes_by_itself() {
    restart_under_load(|run| &run.rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_database_restart_under_load_loses_nothing_and_processing_resumes_by_itself() {
    restart_under_load(|run| &run.postgres).await;
}

/// PURCHASES counts the orders placed by purchase requests, as the audit does: the seats'
/// submissions and the holders' changes place orders of their own, and a change may be asked for
/// at any moment, the instant before an outage too.
const PURCHASES: &str = "SELECT count(*) FROM orders o WHERE o.reserved_asset_id IS NULL
      AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.new_order_id = o.id)";
/// PURCHASES_FINAL counts those of PURCHASES that are issued or declined.
const PURCHASES_FINAL: &str = "SELECT count(*) FROM orders o WHERE o.reserved_asset_id IS NULL
      AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.new_order_id = o.id)
      AND o.status IN ('issued', 'declined')";

/// A database outage far longer than the handlers' retry budget (in-process retries times the
/// deliveries before the delivery limit) dead-letters nothing: the pools hold their messages and
/// wait for the database, and everything completes once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_database_outage_longer_than_the_retry_budget_holds_messages_instead_of_dead_lettering() {
    // Budget with these settings: each delivery fails after 4 tries of up to 200 ms and 1.3 s of
    // backoff, about 2 s, and the broker dead-letters a message returned more than 3 times: about
    // 8 s in all for a message in hand. The outage lasts 20 s, with fewer messages than the pool
    // handles at once, so that before the fix each of them would have gone round until the broker
    // dead-lettered it.
    let run = Proxied::start(json!({
        "database": {"connection_timeout": "200ms"},
        "amqp": {"delivery_limit": 3},
    }))
    .await;
    run.order(10).await;
    run.wait_for_issued(5).await;
    run.env
        .wait_until("the first orders are all issued or declined", |c| {
            (count(c, PURCHASES_FINAL, &[]) == 10).then_some(())
        })
        .await;

    run.postgres.cut();
    run.order(4).await;
    tokio::time::sleep(Duration::from_secs(20)).await; // the outage lasts
    let during = run.env.db(|c| count(c, PURCHASES, &[])).await;
    assert_eq!(during, 10, "nothing was processed while the database was unreachable");
    run.postgres.restore();

    let audit = run.settled(14).await;
    assert_guarantees(&audit);
    assert_eq!(dead_lettered_by_faults(&audit), 0, "no message dead-lettered by the outage: {}", audit.summary());
    run.stop().await;
}
