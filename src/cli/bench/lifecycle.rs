//! `assetflow bench lifecycle`: the whole loop, measured. A real `assetflow run` process is
//! started (so that its CPU and memory are its own); the built-in simulators place a burst of
//! signed orders, settle them, acknowledge the deliveries and exchange a share of the
//! certificates. Latencies are taken from the simulators' publish times to the moment assetflow
//! recorded the receipt.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamptz};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::limits::{Limits, LimitsOptions};
use crate::cli::simulate::{Stats, gateway, partner, terminals};
use crate::config::Config;
use crate::contracts::messages::kinds;
use crate::crypto::KeyRing;
use crate::domain::catalogue::{Product, upsert_product};
use crate::runtime::broker::{Broker, Topology};

#[derive(Debug, Clone, clap::Args)]
pub struct LifecycleOptions {
    /// Orders to place (a burst, as fast as the broker takes them).
    #[arg(long, default_value_t = 2_000)]
    pub orders: usize,
    /// Instead of a burst: orders a second, offered steadily for --duration.
    #[arg(long)]
    pub rate: Option<f64>,
    /// With --rate: how long to offer orders.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub duration: Duration,
    /// Share of certificates their holders exchange.
    #[arg(long, default_value_t = 0.3)]
    pub exchange_rate: f64,
    /// Terminals placing the orders.
    #[arg(long, default_value_t = 50)]
    pub terminals: usize,
    /// Skip measuring the limits (the ratio is then not shown).
    #[arg(long)]
    pub no_limits: bool,
    /// Give up waiting for completion after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub timeout: Duration,
    #[arg(long)]
    pub json: bool,
}

/// Percentiles of a latency, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>) -> Percentiles {
        if ms.is_empty() {
            return Percentiles::default();
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        Percentiles {
            samples: ms.len(),
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: *ms.last().expect("not empty"),
        }
    }
}

/// Stage is one step of an order's way to its certificate, in milliseconds.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct Stage {
    #[diesel(sql_type = Text)]
    pub stage: String,
    #[diesel(sql_type = BigInt)]
    pub samples: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub mean_ms: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub p50_ms: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub p99_ms: f64,
}

/// Figures is the benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub orders: usize,
    pub completed: i64,
    pub exchanged: usize,
    pub seconds: f64,
    pub orders_per_second: f64,
    pub order_to_certificate: Percentiles,
    pub exchange_to_asset: Percentiles,
    /// Where an order's time goes, stage by stage (see [`stages`]).
    pub stages: Vec<Stage>,
    pub cpu_seconds: f64,
    pub peak_rss_mb: f64,
    /// Messages through the broker, each counted once, as the limit counts them: published (by
    /// assetflow or a simulator) and consumed (by assetflow or a simulator). See [`broker_messages`].
    pub messages_per_order: f64,
    /// Messages assetflow consumed plus messages it published: an internal message is both.
    pub handled_per_order: f64,
    /// Commits of transactions that wrote (see `commits`).
    pub commits_per_order: f64,
    pub limits: Option<Limits>,
    /// The throughput the limits allow for this many messages and commits per order, each
    /// engine's limit taken on its own: min(broker rate ÷ messages, commit rate ÷ commits).
    pub bound_orders_per_second: Option<f64>,
    pub ratio_to_bound: Option<f64>,
    /// The same bound when the two engines share the machine, as they do here: each limit was
    /// measured with the whole machine, so an order costs the sum of its two shares of it,
    /// 1 ÷ (messages ÷ broker rate + commits ÷ commit rate).
    pub shared_bound_orders_per_second: Option<f64>,
    pub ratio_to_shared_bound: Option<f64>,
}

/// broker_messages is how many messages went through the broker, from what assetflow counted: each
/// it published, and each it consumed that came from outside (an order, a partner's result, a
/// gateway's receipt). A message from one pool to another (`kinds::INTERNAL`) is both published
/// and consumed by assetflow, but is one message for the broker: one publish, one delivery, one
/// ack, the unit of the limit's messages a second.
fn broker_messages(published: f64, received: f64, received_internal: f64) -> f64 {
    published + received - received_internal
}

/// is_internal says whether a `/metrics` series is labelled with an internal message type.
fn is_internal(series: &str) -> bool {
    kinds::INTERNAL.iter().any(|t| series.contains(&format!("type=\"{t}\"")))
}

/// Bounds are the throughputs that the limits allow for an order's messages and commits.
fn bounds(limits: &Limits, messages_per_order: f64, commits_per_order: f64) -> (f64, f64) {
    let broker = messages_per_order / limits.broker_messages_per_second;
    let database = commits_per_order / limits.db_commits_per_second;
    (1.0 / broker.max(database), 1.0 / (broker + database))
}

pub async fn run(config: Config, options: LifecycleOptions) -> anyhow::Result<Figures> {
    let limits = if options.no_limits {
        None
    } else {
        eprintln!("measuring the limits…");
        Some(super::limits::measure(&config, &LimitsOptions::default()).await?)
    };
    let dir = std::env::temp_dir().join(format!("assetflow-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let mut config = config;
    config.database.url = super::bench_database_url(&config.database.url, "bench_lifecycle");
    config.amqp.prefix = format!("afbench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    config.keys.dir = dir.join("keys");
    config.http.listen = format!("127.0.0.1:{port}");
    config.partners = [("bench-card".to_string(), Default::default())].into();
    config.gateways =
        [("bench-gw-1".to_string(), Default::default()), ("bench-gw-2".to_string(), Default::default())].into();
    KeyRing::generate(&config.keys.dir, &["bench-issuer".to_string()], true)?;
    std::fs::write(dir.join("assetflow.toml"), toml::to_string(&config)?)?;

    let url = config.database.url.clone();
    tokio::task::spawn_blocking({
        let url = url.clone();
        move || -> anyhow::Result<()> {
            super::drop_database(&url)?;
            crate::runtime::db::prepare(&url)?;
            let mut conn = crate::runtime::db::establish(&url)?;
            crate::domain::catalogue::sync_parties(
                &mut conn,
                &["bench-card".into()],
                &["bench-gw-1".into(), "bench-gw-2".into()],
            )?;
            let mut product = terminals::demo_catalogue().remove(0);
            product = Product { id: "bench-ticket".into(), issuer_id: "bench-issuer".into(), ..product };
            upsert_product(&mut conn, &product)?;
            Ok(())
        }
    })
    .await??;
    let terminal_keys = dir.join("terminals");
    let sims = terminals::register(&config, options.terminals, &terminal_keys).await?;

    eprintln!("starting assetflow…");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--config", dir.join("assetflow.toml").to_str().expect("UTF-8 path"), "run", "--no-scheduler"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("assetflow.log"))?)
        .spawn()?;
    let pid = child.id();
    let outcome = measure(&config, &options, &sims, &terminal_keys, pid, port).await;
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.wait();
    cleanup(&config).await;
    let mut figures = outcome?;
    if let Some(limits) = &limits {
        let (bound, shared) = bounds(limits, figures.messages_per_order, figures.commits_per_order);
        figures.bound_orders_per_second = Some(bound);
        figures.ratio_to_bound = Some(figures.orders_per_second / bound);
        figures.shared_bound_orders_per_second = Some(shared);
        figures.ratio_to_shared_bound = Some(figures.orders_per_second / shared);
    }
    figures.limits = limits;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(figures)
}

async fn measure(
    config: &Config,
    options: &LifecycleOptions,
    sims: &[terminals::SimTerminal],
    terminal_keys: &std::path::Path,
    pid: u32,
    port: u16,
) -> anyhow::Result<Figures> {
    wait_ready(port, Duration::from_secs(60)).await?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let broker = Broker::declaring(config, shutdown.clone());
    let stats = Arc::new(Stats::default());
    stats.log_exchanges.store(true, Ordering::Relaxed);
    let partner_options = partner::PartnerOptions { decline_rate: 0.0, latency: Duration::ZERO, ..Default::default() };
    tokio::spawn(partner::run_owned(config.clone(), broker.clone(), partner_options, stats.clone(), shutdown.clone()));
    let gateway_options = gateway::GatewayOptions {
        exchange_rate: options.exchange_rate,
        keys: PathBuf::from(terminal_keys),
        ..Default::default()
    };
    tokio::spawn(gateway::run_owned(config.clone(), broker.clone(), gateway_options, stats.clone(), shutdown.clone()));

    let url = config.database.url.clone();
    let commits_before = commits(&url).await?;
    let cpu_before = cpu_seconds(pid)?;
    let metrics_before = scrape(port).await?;
    let mut sent: HashMap<String, DateTime<Utc>> = HashMap::new();
    let requests = crate::contracts::topology::Names { prefix: config.amqp.prefix.clone() }.requests();
    // A burst's orders are signed before the clock starts: they are the terminals' work, done
    // before the burst arrives, and while they were signed assetflow had nothing to do.
    let burst = match options.rate {
        Some(_) => Vec::new(),
        None => {
            eprintln!("signing {} orders…", options.orders);
            (0..options.orders)
                .map(|i| terminals::purchase(&sims[i % sims.len()], "bench-ticket", 1, serde_json::json!({})))
                .collect()
        }
    };
    let started = Instant::now();
    let started_at = Utc::now();
    let orders = match options.rate {
        None => {
            eprintln!("placing {} orders…", options.orders);
            let mut bodies = Vec::with_capacity(burst.len());
            for order in &burst {
                sent.insert(order["request_id"].as_str().expect("an id").to_string(), started_at);
                bodies.push(serde_json::to_vec(order)?);
            }
            crate::cli::simulate::publisher::publish_burst(
                &broker,
                &requests,
                kinds::ORDER_PURCHASE,
                kinds::ORDER_PURCHASE,
                bodies,
                256,
            )
            .await?;
            options.orders
        }
        Some(rate) => {
            eprintln!("offering {rate} orders a second for {:?}…", options.duration);
            let publisher = crate::cli::simulate::publisher::ConfirmedSender::new(broker.clone());
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            let mut i = 0;
            while started.elapsed() < options.duration {
                tick.tick().await;
                let order = terminals::purchase(&sims[i % sims.len()], "bench-ticket", 1, serde_json::json!({}));
                sent.insert(order["request_id"].as_str().expect("an id").to_string(), Utc::now());
                publisher
                    .publish(&requests, kinds::ORDER_PURCHASE, kinds::ORDER_PURCHASE, &serde_json::to_vec(&order)?)
                    .await?;
                i += 1;
            }
            i
        }
    };

    eprintln!("waiting for every order to complete…");
    let deadline = Instant::now() + options.timeout;
    let completed = loop {
        // The database is asked only once the gateway has had every certificate and asset:
        // counting over the tables while they fill cost PostgreSQL about a twentieth of its CPU in a
        // burst, on the same cores as what is measured.
        // `waiting` before `exchanged`: an exchange is counted before it stops waiting, so none is
        // missed between the two.
        let certificates = stats.certificates.load(Ordering::SeqCst);
        let waiting = stats.exchanges_waiting.load(Ordering::SeqCst);
        let exchanged = stats.exchanges.load(Ordering::SeqCst);
        if certificates >= orders as u64 && waiting == 0 && stats.assets.load(Ordering::SeqCst) >= exchanged {
            let (done, pending) = progress(&url).await?;
            if done >= orders as i64 && pending == 0 && exchanged_done(&url).await? >= exchanged as i64 {
                break done;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {certificates} of {orders} orders' certificates reached the gateway within {:?}",
            options.timeout
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seconds = last_receipt(&url)
        .await?
        .map(|t| (t - started_at).num_milliseconds() as f64 / 1000.0)
        .unwrap_or(started.elapsed().as_secs_f64());
    let cpu = cpu_seconds(pid)? - cpu_before;
    let peak_rss_mb = peak_rss_kb(pid)? as f64 / 1024.0;
    let metrics_after = scrape(port).await?;
    let commits_after = commits(&url).await?;
    let rise = |series: fn(&str) -> bool| {
        let total = |m: &HashMap<String, f64>| m.iter().filter(|(k, _)| series(k)).map(|(_, v)| v).sum::<f64>();
        total(&metrics_after) - total(&metrics_before)
    };
    let published = rise(|k| k.starts_with("assetflow_outbox_published_total"));
    let received = rise(|k| k.starts_with("assetflow_messages_received_total"));
    let received_internal = rise(|k| k.starts_with("assetflow_messages_received_total") && is_internal(k));

    let certificate_latencies = {
        let acked = acknowledged(&url, "certificate").await?;
        acked
            .into_iter()
            .filter_map(|(request, at)| {
                sent.get(&request).map(|s| (at - *s).num_microseconds().unwrap_or(0) as f64 / 1000.0)
            })
            .collect()
    };
    let exchange_log: HashMap<String, DateTime<Utc>> =
        stats.exchange_log.lock().expect("not poisoned").iter().cloned().collect();
    let asset_latencies: Vec<f64> = {
        let acked = acknowledged(&url, "asset").await?;
        acked
            .into_iter()
            .filter_map(|(request, at)| {
                exchange_log.get(&request).map(|s| (at - *s).num_microseconds().unwrap_or(0) as f64 / 1000.0)
            })
            .collect()
    };
    Ok(Figures {
        orders,
        completed,
        exchanged: exchange_log.len(),
        seconds,
        orders_per_second: completed as f64 / seconds,
        order_to_certificate: Percentiles::of(certificate_latencies),
        exchange_to_asset: Percentiles::of(asset_latencies),
        stages: stages(&url).await?,
        cpu_seconds: cpu,
        peak_rss_mb,
        messages_per_order: broker_messages(published, received, received_internal) / orders.max(1) as f64,
        handled_per_order: (published + received) / orders.max(1) as f64,
        commits_per_order: (commits_after - commits_before) as f64 / orders.max(1) as f64,
        limits: None,
        bound_orders_per_second: None,
        ratio_to_bound: None,
        shared_bound_orders_per_second: None,
        ratio_to_shared_bound: None,
    })
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn query_count(url: &str, sql: &'static str) -> anyhow::Result<i64> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query(sql).get_result::<Count>(&mut conn)?.n)
    })
    .await?
}

/// progress is the orders whose certificate was acknowledged, and the deliveries not yet final.
async fn progress(url: &str) -> anyhow::Result<(i64, i64)> {
    let done = query_count(
        url,
        "SELECT count(DISTINCT d.order_id) AS n FROM deliveries d WHERE d.kind = 'certificate' AND d.status = 'delivered'",
    )
    .await?;
    let pending =
        query_count(url, "SELECT count(*) AS n FROM deliveries WHERE status IN ('pending', 'sent', 'failed')").await?;
    Ok((done, pending))
}

async fn exchanged_done(url: &str) -> anyhow::Result<i64> {
    query_count(url, "SELECT count(*) AS n FROM terminal_requests WHERE message_type = 'certificate.exchange'").await
}

/// commits counts the transactions that wrote, as the limit's transactions all do: the next
/// transaction id, which only a writing transaction takes. Read-only ones (the health checks, the
/// benchmark's own polling) are left out: counted as commits, they made the bound look lower
/// and the ratio higher than they are. The count is the whole cluster's, so nothing else should
/// write to this PostgreSQL during a run.
async fn commits(url: &str) -> anyhow::Result<i64> {
    query_count(url, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS n").await
}

async fn last_receipt(url: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    #[derive(QueryableByName)]
    struct Last {
        #[diesel(sql_type = diesel::sql_types::Nullable<Timestamptz>)]
        at: Option<DateTime<Utc>>,
    }
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Option<DateTime<Utc>>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query("SELECT max(finished_at) AS at FROM delivery_attempts WHERE outcome = 'acknowledged'")
            .get_result::<Last>(&mut conn)?
            .at)
    })
    .await?
}

/// acknowledged lists, per request id, when assetflow recorded the receipt of its certificate
/// (by order request) or of its asset (by exchange request).
async fn acknowledged(url: &str, kind: &'static str) -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        request_id: String,
        #[diesel(sql_type = Timestamptz)]
        at: DateTime<Utc>,
    }
    let sql = match kind {
        "certificate" => {
            "SELECT o.request_id, a.finished_at AS at FROM deliveries d
             JOIN orders o ON o.id = d.order_id
             JOIN delivery_attempts a ON a.delivery_id = d.id AND a.outcome = 'acknowledged'
             WHERE d.kind = 'certificate'"
        }
        _ => {
            "SELECT c.exchange_request_id AS request_id, a.finished_at AS at FROM exchange_certificates c
             JOIN deliveries d ON d.asset_id = c.asset_id AND d.kind = 'asset'
             JOIN delivery_attempts a ON a.delivery_id = d.id AND a.outcome = 'acknowledged'
             WHERE c.exchange_request_id IS NOT NULL"
        }
    };
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query(sql).load::<Row>(&mut conn)?.into_iter().map(|r| (r.request_id, r.at)).collect())
    })
    .await?
}

/// stages splits the order-to-certificate time at the moments the database recorded: the terminal's
/// `sent_at`, then the start of each transaction that handled the order (`now()` in it): the
/// purchase, the partner's answer, the issuance, the certificate's first transmission and its
/// receipt. Each stage therefore holds the previous transaction, the relay's publish and confirm
/// (none for the first stage and the answer's, which a terminal and a partner publish themselves),
/// the broker, and the wait in the next pool's queue.
async fn stages(url: &str) -> anyhow::Result<Vec<Stage>> {
    const SQL: &str = "
        WITH o AS (
          SELECT r.sent_at AS t0, r.received_at AS t1, s.answered_at AS t2,
                 (SELECT min(h.at) FROM asset_status_history h JOIN assets a ON a.id = h.asset_id
                  WHERE a.order_id = o.id) AS t3,
                 first.sent_at AS t4, done.finished_at AS t5
          FROM orders o
          JOIN terminal_requests r ON r.request_id = o.request_id
          JOIN settlements s ON s.order_id = o.id AND s.kind = 'purchase'
          JOIN deliveries d ON d.order_id = o.id AND d.kind = 'certificate'
          JOIN delivery_attempts first ON first.delivery_id = d.id AND first.attempt = 1
          JOIN delivery_attempts done ON done.delivery_id = d.id AND done.outcome = 'acknowledged'
        ), stage AS (
          SELECT n, stage, 1000 * extract(epoch FROM until - since)::float8 AS ms
          FROM o, LATERAL (VALUES
            (1, 'order sent → purchase handled', t0, t1),
            (2, 'purchase → partner''s answer handled', t1, t2),
            (3, 'answer → certificate issued', t2, t3),
            (4, 'issued → certificate sent to the gateway', t3, t4),
            (5, 'sent → gateway''s receipt handled', t4, t5)
          ) AS v(n, stage, since, until)
        )
        SELECT stage, count(*) AS samples, avg(ms) AS mean_ms,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50_ms,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99_ms
        FROM stage GROUP BY n, stage ORDER BY n";
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Stage>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query(SQL).load::<Stage>(&mut conn)?)
    })
    .await?
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

async fn wait_ready(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok((200, _)) = http_get(port, "/readyz").await {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "assetflow did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// scrape reads /metrics into series → value (histogram buckets included).
async fn scrape(port: u16) -> anyhow::Result<HashMap<String, f64>> {
    let (_, body) = http_get(port, "/metrics").await?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v))))
        .collect())
}

/// cpu_seconds is a process's user and system time, from /proc.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux reports in clock ticks of 1/100 s (USER_HZ).
    Ok(ticks / 100.0)
}

/// peak_rss_kb is a process's peak resident set (VmHWM), from /proc.
fn peak_rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// cleanup drops the benchmark's database and the broker objects it declared.
async fn cleanup(config: &Config) {
    let shutdown = CancellationToken::new();
    let declared = Topology::new(config);
    let queues: Vec<String> = declared.queues.iter().map(|q| q.name.clone()).collect();
    let exchanges: Vec<String> = declared.exchanges.iter().map(|e| e.name.clone()).collect();
    let broker = Broker::undeclared(config, shutdown.clone());
    if let Ok(Some(conn)) = tokio::time::timeout(Duration::from_secs(10), broker.connection()).await
        && let Ok(channel) = conn.create_channel().await
    {
        for queue in queues {
            let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
        }
        for exchange in exchanges {
            let _ = channel.exchange_delete(exchange.as_str().into(), Default::default()).await;
        }
    }
    shutdown.cancel();
    let url = config.database.url.clone();
    let _ = tokio::task::spawn_blocking(move || super::drop_database(&url)).await;
}

/// print shows the figures as a table.
pub fn print(f: &Figures) {
    println!(
        "{} orders placed, {} completed, {} certificates exchanged, in {:.2}s",
        f.orders, f.completed, f.exchanged, f.seconds
    );
    println!("{:<44} {:>12}", "FIGURE", "VALUE");
    println!("{:<44} {:>12.0}", "orders completed per second", f.orders_per_second);
    for (name, p) in [
        ("order published → certificate acknowledged", &f.order_to_certificate),
        ("exchange published → asset acknowledged", &f.exchange_to_asset),
    ] {
        println!("{name} ({} samples)", p.samples);
        println!("{:<44} {:>9.1} ms", "  p50", p.p50_ms);
        println!("{:<44} {:>9.1} ms", "  p95", p.p95_ms);
        println!("{:<44} {:>9.1} ms", "  p99", p.p99_ms);
        println!("{:<44} {:>9.1} ms", "  max", p.max_ms);
    }
    if !f.stages.is_empty() {
        println!("where an order's time goes (mean, p50, p99, ms)");
        for s in &f.stages {
            println!("  {:<44} {:>7.1} {:>7.1} {:>7.1}", s.stage, s.mean_ms, s.p50_ms, s.p99_ms);
        }
    }
    println!("{:<44} {:>12.2}", "assetflow CPU seconds", f.cpu_seconds);
    println!("{:<44} {:>9.1} MB", "assetflow peak RSS", f.peak_rss_mb);
    println!("{:<44} {:>12.2}", "broker messages per order (each once)", f.messages_per_order);
    println!("{:<44} {:>12.2}", "  assetflow's share (consumed + published)", f.handled_per_order);
    println!("{:<44} {:>12.2}", "writing database commits per order", f.commits_per_order);
    if let (Some(limits), Some(bound), Some(ratio)) = (&f.limits, f.bound_orders_per_second, f.ratio_to_bound) {
        println!();
        super::limits::print(limits);
        println!("{:<44} {:>12.0}", "bound these imply, orders per second", bound);
        println!("{:<44} {:>11.0}%", "lifecycle throughput / bound", ratio * 100.0);
        if let (Some(shared), Some(ratio)) = (f.shared_bound_orders_per_second, f.ratio_to_shared_bound) {
            println!("{:<44} {:>12.0}", "the same, the engines sharing the machine", shared);
            println!("{:<44} {:>11.0}%", "lifecycle throughput / shared bound", ratio * 100.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(broker: f64, database: f64) -> Limits {
        Limits {
            broker_messages_per_second: broker,
            queue_type: "quorum".into(),
            message_size: 600,
            db_commits_per_second: database,
            db_connections: 8,
        }
    }

    #[test]
    fn a_message_between_pools_is_one_broker_message_and_one_from_outside_is_one_too() {
        // An order consumed (from a terminal), an instruction published (to a partner), and an
        // issuance request published and consumed (pool to pool): three broker messages.
        assert_eq!(broker_messages(2.0, 2.0, 1.0), 3.0);
        assert!(is_internal(r#"assetflow_messages_received_total{pool="issuance",type="issuance.requested"}"#));
        assert!(!is_internal(r#"assetflow_messages_received_total{pool="settlement",type="order.purchase"}"#));
    }

    #[test]
    fn the_bound_is_the_busier_engine_alone_and_the_sum_of_both_when_they_share_the_machine() {
        // 10 messages at 10,000/s is 1 ms of the broker; 2.5 commits at 5,000/s, 0.5 ms of the database.
        let (alone, shared) = bounds(&limits(10_000.0, 5_000.0), 10.0, 2.5);
        assert!((alone - 1_000.0).abs() < 1e-6, "{alone}");
        assert!((shared - 1_000.0 / 1.5).abs() < 1e-6, "{shared}");
    }

    #[test]
    fn fewer_than_one_commit_an_order_counts_as_what_it_is() {
        // Batched handlers can commit several orders at once: 0.5 commits at 1,000/s is 0.5 ms.
        let (alone, shared) = bounds(&limits(100_000.0, 1_000.0), 10.0, 0.5);
        assert!((alone - 2_000.0).abs() < 1e-6, "{alone}");
        assert!((shared - 1.0 / 0.0006).abs() < 1e-6, "{shared}");
    }
}
