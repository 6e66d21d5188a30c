//! Real `assetflow run` processes sharing one database and one vhost: competing consumers, the
//! scheduler's advisory locks, a SIGKILL in the middle of a load, and a SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use assetflow::cli::audit::{Audit, audit, wire};
use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::partner::PartnerOptions;
use assetflow::cli::simulate::terminals::{SimTerminal, purchase, register};
use assetflow::crypto::KeyRing;
use diesel::prelude::*;
use serde_json::json;

use crate::chaos::assert_guarantees;
use crate::harness::{Env, ISSUER, count};
use crate::support::{DEADLINE, settle_all};

/// Node is one `assetflow run` process.
struct Node {
    child: Child,
}

/// spawn_node starts `assetflow run` with the cluster configuration in `dir`, its log in
/// `<name>.log` there.
pub fn spawn_node(dir: &Path, name: &str) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_assetflow"))
        .args(["--config", dir.join("assetflow.toml").to_str().unwrap(), "run"])
        .env("RUST_LOG", "info,lapin=off")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("assetflow starts")
}

impl Node {
    fn start(dir: &Path, name: &str) -> Node {
        Node { child: spawn_node(dir, name) }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// cluster writes a configuration file and signing keys the processes share with `env`.
pub fn cluster(env: &Env) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("assetflow-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    KeyRing::generate(&dir.join("keys"), &[ISSUER.to_string()], true).unwrap();
    let config = format!(
        r#"
[database]
url = "{db}"
pool_size = 6
[amqp]
url = "{amqp}"
reconnect_min = "50ms"
reconnect_max = "1s"
[keys]
dir = "{keys}"
[outbox]
poll_interval = "50ms"
[http]
listen = ""
[partners.card-co]
[partners.bank-a]
[gateways.gw-1]
[gateways.gw-2]
"#,
        db = env.config.database.url,
        amqp = env.config.amqp.url,
        keys = dir.join("keys").display(),
    );
    std::fs::write(dir.join("assetflow.toml"), config).unwrap();
    dir
}

fn orders(terminals: &[SimTerminal], range: std::ops::Range<usize>) -> Vec<serde_json::Value> {
    range
        .map(|i| {
            let t = &terminals[i % terminals.len()];
            let extra = match i % 5 {
                0 => json!({"delivery": {"mode": "immediate"}}),
                1 => json!({"recipient_terminal_ids": [terminals[(i + 1) % terminals.len()].id]}),
                _ => json!({}),
            };
            purchase(t, "ticket", 1 + (i % 2) as u32, extra)
        })
        .collect()
}

/// Every order and every transmission has reached a final state, the outbox is empty and every
/// exchange the gateway sent was answered: the shared audit (`assetflow audit`), once it finds
/// nothing lost.
fn all_final(c: &mut PgConnection, orders: i64, exchanges: i64) -> Option<Audit> {
    let audit = audit(c, Some(orders)).expect("the audit runs");
    (audit.orders == orders
        && audit.lost == 0
        && count(c, "SELECT count(*) FROM terminal_requests WHERE message_type = 'certificate.exchange'", &[])
            == exchanges)
        .then_some(audit)
}

/// No settlement, issue, asset delivery or acknowledgement happened twice, every status history is
/// a legal path through the status machine, and nothing was given up on.
fn assert_nothing_twice(audit: &Audit) {
    assert_guarantees(audit);
    assert_eq!(audit.dead_letters(), 0, "nothing given up on: {}", audit.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_one_killed_mid_load_lose_nothing_and_do_nothing_twice() {
    let env = Env::new().await;
    env.product("ticket", |_| {}).await;
    let dir = cluster(&env);
    let terminals = register(&env.config, 6, &dir.join("terminals")).await.unwrap();
    let mut a = Node::start(&dir, "a");
    let _b = Node::start(&dir, "b");
    env.partner(PartnerOptions { decline_rate: 0.1, latency: Duration::from_millis(5), ..PartnerOptions::default() });
    // This gateway holds the terminals' keys, so half of the holders exchange their certificates,
    // and keeps a ledger of what it received: the process killed may have published messages
    // whose publication it never recorded, which the next one publishes again.
    let ledger = dir.join("gateway-ledger.jsonl");
    tokio::spawn(assetflow::cli::simulate::gateway::run_owned(
        env.config.clone(),
        env.broker.clone(),
        GatewayOptions {
            keys: dir.join("terminals"),
            exchange_rate: 0.5,
            ledger: Some(ledger.clone()),
            ..GatewayOptions::default()
        },
        env.stats.clone(),
        tokio_util::sync::CancellationToken::new(),
    ));

    let first = orders(&terminals, 0..40);
    for order in &first {
        env.send(order).await;
    }
    // Kill one process while the first orders are in flight, and bring it back.
    env.wait_until("some orders are issued", |c| {
        (count(c, "SELECT count(*) FROM orders WHERE status = 'issued'", &[]) >= 5).then_some(())
    })
    .await;
    a.kill9();
    let second = orders(&terminals, 40..80);
    for order in &second[..20] {
        env.send(order).await;
    }
    let _a = Node::start(&dir, "a-again");
    for order in &second[20..] {
        env.send(order).await;
    }

    let stats = env.stats.clone();
    let mut audit = env
        .wait_until("every order and transmission is final", move |c| {
            all_final(c, 80, stats.exchanges.load(std::sync::atomic::Ordering::Relaxed) as i64)
        })
        .await;
    audit.wire = Some(env.db(move |c| wire::audit_ledger(c, &ledger).expect("the ledger is audited")).await);
    assert_nothing_twice(&audit);
    env.db(|c| {
        assert!(
            count(c, "SELECT count(*) FROM assets WHERE status = 'delivered'", &[]) > 0,
            "some certificates were exchanged"
        );
    })
    .await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_work_in_hand_and_exits_zero() {
    let env = Env::new().await;
    env.product("ticket", |_| {}).await;
    let dir = cluster(&env);
    // Their keys where the test's gateway finds them: it relays their signed acknowledgements.
    let terminals = register(&env.config, 3, &env.keys.join("terminals")).await.unwrap();
    let mut node = Node::start(&dir, "node");
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    for order in orders(&terminals, 0..10) {
        env.send(&order).await;
    }
    env.wait_until("the first order is settled", |c| {
        (count(c, "SELECT count(*) FROM settlements WHERE status = 'settled'", &[]) >= 1).then_some(())
    })
    .await;
    let status = tokio::task::spawn_blocking(move || node.terminate()).await.unwrap();
    assert!(status.success(), "assetflow exited with {status}");

    // What was left in the queues is taken up by the next process, and all of it completes.
    let _next = Node::start(&dir, "next");
    let audit = env.wait_until("every order and transmission is final", |c| all_final(c, 10, 0)).await;
    assert_nothing_twice(&audit);
}

/// A small run of the lifecycle benchmark, through the real binary: two runs, each over a copy of
/// a seeded database, and every order each run places completes, counted apart from the seeded
/// ones. Its figures are printed, never asserted against a speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifecycle_benchmark_completes_every_order_it_places() {
    let env = Env::new().await;
    let dir = cluster(&env);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_assetflow"))
            .args(["--config", dir.join("assetflow.toml").to_str().unwrap()])
            .args([
                "bench",
                "lifecycle",
                "--orders",
                "200",
                "--terminals",
                "10",
                "--repeat",
                "2",
                "--seed-orders",
                "300",
                "--no-limits",
                "--timeout",
                "3m",
                "--json",
            ])
            .env("RUST_LOG", "warn,lapin=off")
            .output()
            .expect("the benchmark runs")
    })
    .await
    .unwrap();
    assert!(output.status.success(), "the benchmark failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    assert_eq!(report["seeded"]["orders"], 300, "the seed is reported: {report}");
    assert_eq!(report["seeded"]["exchanged"], 90, "{report}");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{report}");
    for (n, run) in runs.iter().enumerate() {
        assert_eq!(run["run"], n + 1, "{run}");
        let figures = &run["figures"];
        assert_eq!(figures["orders"], 200, "{figures}");
        assert_eq!(figures["completed"], 200, "every order completed: {figures}");
        assert_eq!(figures["order_to_certificate"]["samples"], 200, "{figures}");
        for figure in [
            "orders_per_second",
            "messages_per_order",
            "handled_per_order",
            "commits_per_order",
            "cpu_seconds",
            "peak_rss_mb",
        ] {
            assert!(figures[figure].as_f64().is_some_and(|v| v > 0.0), "{figure} is measured: {figures}");
        }
        // Every order of the run, and none of the seeded ones, is followed through every stage.
        let stages = figures["stages"].as_array().expect("stages");
        assert_eq!(stages.len(), 5, "{figures}");
        for stage in stages {
            assert_eq!(stage["samples"], 200, "{stage}");
            let (p50, p99) = (stage["p50_ms"].as_f64().unwrap(), stage["p99_ms"].as_f64().unwrap());
            assert!(0.0 <= p50 && p50 <= p99, "{stage}");
        }
        // A message between pools is one broker message but two of assetflow's (published, consumed).
        let (broker, handled) = (figures["messages_per_order"].as_f64(), figures["handled_per_order"].as_f64());
        assert!(broker < handled, "internal messages are counted once for the broker: {figures}");
        // What else the machine did is read; without the limits there is no bound.
        assert!(run["busy"]["other_cpu_share"].as_f64().is_some(), "{run}");
        assert!(run["limits_before"].is_null() && run["bound"].is_null(), "{run}");
    }
    let summary = &report["summary"];
    assert_eq!(summary["runs"], 2, "{summary}");
    let throughput = |at: &str| summary["orders_per_second"][at].as_f64().expect("a throughput");
    assert!(throughput("min") <= throughput("median") && throughput("median") <= throughput("max"), "{summary}");
    assert!(summary["ratio_to_bound"].is_null(), "{summary}");
}

/// `bench lifecycle` with a mix (refunds, changes and bookings among the orders) completes every
/// order it places, and the whole mix: the refunds refunded, the changes done, the bookings
/// submitted and issued. Its figures are printed, never asserted against a speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifecycle_benchmark_completes_a_mix_of_refunds_changes_and_bookings() {
    let env = Env::new().await;
    let dir = cluster(&env);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_assetflow"))
            .args(["--config", dir.join("assetflow.toml").to_str().unwrap()])
            .args(["bench", "lifecycle", "--orders", "200", "--terminals", "10", "--no-limits", "--timeout", "3m"])
            .args(["--refunds", "0.2", "--changes", "0.1", "--bookings", "0.2", "--json"])
            .env("RUST_LOG", "warn,lapin=off")
            .output()
            .expect("the benchmark runs")
    })
    .await
    .unwrap();
    assert!(output.status.success(), "the benchmark failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let figures = &report["runs"][0]["figures"];
    assert_eq!(figures["orders"], 200, "{figures}");
    assert_eq!(figures["completed"], 200, "every order completed: {figures}");
    // The purchases alone are followed from order to certificate; the bookings are the rest.
    let purchases = figures["order_to_certificate"]["samples"].as_i64().expect("samples");
    assert!(purchases > 100 && purchases < 200, "{figures}");
}

/// `ops/run` starts the simulators beside a starting `assetflow run`: on a fresh database they may
/// register their terminals before the app has recorded the configured gateways and partners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulators_register_their_terminals_before_the_app_has_recorded_the_parties() {
    let env = Env::new().await;
    // Parties the database has not heard of, as on a fresh database before `assetflow run` starts.
    let mut config = env.config.clone();
    let gateway = config.gateways.values().next().expect("a gateway").clone();
    let partner = config.partners.values().next().expect("a partner").clone();
    config.gateways = [("gw-late".to_string(), gateway)].into_iter().collect();
    config.partners = [("partner-late".to_string(), partner)].into_iter().collect();
    let dir = std::env::temp_dir().join(format!("assetflow-{}", uuid::Uuid::new_v4().simple()));
    let terminals = register(&config, 3, &dir).await.expect("the terminals are registered");
    assert_eq!(terminals.len(), 3);
    let registered = env
        .db(|c| {
            count(c, "SELECT count(*) FROM terminals WHERE gateway_id = 'gw-late' AND partner_id = 'partner-late'", &[])
        })
        .await;
    assert_eq!(registered, 3);
    std::fs::remove_dir_all(&dir).ok();
}

/// run_with runs `assetflow run` with `args` against a cluster's configuration.
fn run_with(dir: &Path, name: &str, args: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_assetflow"))
        .args(["--config", dir.join("assetflow.toml").to_str().unwrap(), "run"])
        .args(args)
        .env("RUST_LOG", "info,lapin=off")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("assetflow starts")
}

/// Private keys are loaded by the processes that sign (the issuance pool) and by no other: a
/// settlement and delivery process, or a scheduler, runs where no key exists at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_process_running_the_issuance_pool_loads_the_signing_keys() {
    let env = Env::new().await;
    let dir = cluster(&env);
    std::fs::remove_dir_all(dir.join("keys")).unwrap();

    let mut node = Node { child: run_with(&dir, "no-signing", &["--pool", "settlement", "--pool", "delivery"]) };
    let log = dir.join("no-signing.log");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // Each pool says which queue it consumes (its debug form, quoted, whatever the colours).
        if text.contains("\"assetflow.settlement\"") && text.contains("\"assetflow.delivery\"") {
            assert!(!text.contains("\"assetflow.issuance\""), "{text}");
            break;
        }
        assert!(node.child.try_wait().unwrap().is_none(), "it stopped without its keys:\n{text}");
        assert!(tokio::time::Instant::now() < deadline, "it never started:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(node.terminate().success(), "it stops cleanly");

    for (name, args) in [("issuance", &["--pool", "issuance"][..]), ("all", &[][..])] {
        let status = run_with(&dir, name, args).wait().unwrap();
        let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap();
        assert!(!status.success(), "{name}: a signing process needs its keys");
        assert!(text.contains("provider.pem") && text.contains("assetflow keys generate"), "{name}: {text}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
