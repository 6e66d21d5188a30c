//! One run of the lifecycle benchmark: its own database and AMQP prefix, the assetflow process
//! started, the orders offered, the wait for every one to complete, and the cleanup.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::figures::{Figures, Percentiles, broker_messages, is_internal};
use super::process::{cpu_seconds, free_port, peak_rss_kb, scrape, wait_ready};
use super::queries::{
    acknowledged, commits, exchanged_done, id_floor, in_flight, last_receipt, mixed_done, progress, stages,
};
use super::{LifecycleOptions, Shared};
use crate::cli::bench::machine::{Busy, Watch};
use crate::cli::simulate::{Stats, gateway, partner, terminals};
use crate::config::Config;
use crate::contracts::messages::kinds;
use crate::contracts::topology::Topology;
use crate::runtime::broker::Broker;

/// once makes run `n`: a database of its own (a copy of the seeded one, or migrated afresh), an
/// AMQP prefix of its own, `assetflow run` started as a child process and stopped after. It
/// returns the run's figures, and what else the machine did while the orders went through.
pub(super) async fn once(
    shared: &Shared,
    options: &LifecycleOptions,
    n: usize,
) -> anyhow::Result<(Figures, Option<Busy>)> {
    let port = free_port()?;
    let mut config = shared.config.clone();
    config.amqp.prefix = format!("afbench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    config.http.listen = format!("127.0.0.1:{port}");
    let config_path = shared.dir.join(format!("run-{n}.toml"));
    std::fs::write(&config_path, toml::to_string(&config)?)?;

    let url = config.database.url.clone();
    let template = shared.template.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        match template {
            // A file copy of the seeded database: every run starts from the same state, and none
            // pays for seeding or for writing the copy out (FILE_COPY checkpoints before and after).
            Some(template) => crate::cli::bench::copy_database(&template, &url),
            None => {
                crate::cli::bench::drop_database(&url)?;
                crate::runtime::db::prepare(&url)?;
                super::catalogue(&url)
            }
        }
    })
    .await??;
    // The terminals' keys are the same in every run; registering them again on a copy changes nothing.
    let sims = terminals::register(&config, options.terminals, &shared.terminal_keys).await?;

    eprintln!("starting assetflow…");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--config", config_path.to_str().expect("UTF-8 path"), "run", "--no-scheduler"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(shared.dir.join(format!("run-{n}.log")))?)
        .spawn()?;
    let pid = child.id();
    let outcome = measure(&config, options, &sims, &shared.terminal_keys, pid, port).await;
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.wait();
    cleanup(&config).await;
    outcome
}

async fn measure(
    config: &Config,
    options: &LifecycleOptions,
    sims: &[terminals::SimTerminal],
    terminal_keys: &std::path::Path,
    pid: u32,
    port: u16,
) -> anyhow::Result<(Figures, Option<Busy>)> {
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
        refund_rate: options.refunds,
        change_rate: options.changes,
        change_to: Some(super::CHANGE_TO.into()),
        submit_rate: if options.bookings > 0.0 { 1.0 } else { 0.0 },
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
            (0..options.orders).map(|i| offer(options, sims, i)).collect()
        }
    };
    // What else the machine does is watched from here to the last order's completion.
    let watch = tokio::task::spawn_blocking(move || Watch::start(&[pid])).await?;
    let started = Instant::now();
    let started_at = Utc::now();
    // The run's rows are those with ids from here on (see queries.rs).
    let since = id_floor(started_at);
    let orders = match options.rate {
        None => {
            eprintln!("placing {} orders…", options.orders);
            let mut bodies = Vec::with_capacity(burst.len());
            let mut bookings = Vec::new();
            for order in &burst {
                if order["type"] == kinds::ORDER_BOOKING {
                    bookings.push(serde_json::to_vec(order)?);
                    continue;
                }
                sent.insert(order["request_id"].as_str().expect("an id").to_string(), started_at);
                bodies.push(serde_json::to_vec(order)?);
            }
            for (kind, bodies) in [(kinds::ORDER_PURCHASE, bodies), (kinds::ORDER_BOOKING, bookings)] {
                crate::cli::simulate::publisher::publish_burst(&broker, &requests, kind, kind, bodies, 256).await?;
            }
            options.orders
        }
        Some(rate) => {
            eprintln!("offering {rate} orders a second for {:?}…", options.duration);
            let publisher = crate::cli::simulate::publisher::ConfirmedSender::new(broker.clone());
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            let mut i = 0;
            while started.elapsed() < options.duration {
                tick.tick().await;
                let order = offer(options, sims, i);
                let kind = order["type"].as_str().expect("a type").to_string();
                if kind == kinds::ORDER_PURCHASE {
                    sent.insert(order["request_id"].as_str().expect("an id").to_string(), Utc::now());
                }
                publisher.publish(&requests, &kind, &kind, &serde_json::to_vec(&order)?).await?;
                i += 1;
            }
            i
        }
    };

    eprintln!("waiting for every order to complete…");
    let deadline = Instant::now() + options.timeout;
    let booked = (0..orders).filter(|i| options.is_booking(*i)).count();
    let completed = loop {
        if options.mixed() {
            // With a mix, an order is done when what it bought was delivered, and the run is done
            // when nothing it started is still in flight: no delivery, settlement, change or
            // submission under way.
            let purchases = (orders - booked) as u64;
            let certificates = stats.certificates.load(Ordering::SeqCst);
            let submitted = stats.submissions.load(Ordering::SeqCst);
            if certificates >= purchases
                && submitted >= booked as u64
                && stats.exchanges_waiting.load(Ordering::SeqCst) == 0
            {
                let exchanged = stats.exchanges.load(Ordering::SeqCst);
                if !in_flight(&url).await? && exchanged_done(&url, since).await? >= exchanged as i64 {
                    break mixed_done(&url, since).await?;
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {certificates} of {purchases} certificates and {submitted} of {booked} submissions within {:?}",
                options.timeout
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        // The database is asked only once the gateway has had every certificate and asset:
        // counting over the tables while they fill cost PostgreSQL about a twentieth of its CPU in a
        // burst, on the same cores as what is measured.
        // `waiting` before `exchanged`: an exchange is counted before it stops waiting, so none is
        // missed between the two.
        let certificates = stats.certificates.load(Ordering::SeqCst);
        let waiting = stats.exchanges_waiting.load(Ordering::SeqCst);
        let exchanged = stats.exchanges.load(Ordering::SeqCst);
        if certificates >= orders as u64 && waiting == 0 && stats.assets.load(Ordering::SeqCst) >= exchanged {
            let (done, pending) = progress(&url, since).await?;
            if done >= orders as i64 && pending == 0 && exchanged_done(&url, since).await? >= exchanged as i64 {
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
    let busy = tokio::task::spawn_blocking(move || watch.stop()).await?;
    let seconds = last_receipt(&url, since)
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
        let acked = acknowledged(&url, "certificate", since).await?;
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
        let acked = acknowledged(&url, "asset", since).await?;
        acked
            .into_iter()
            .filter_map(|(request, at)| {
                exchange_log.get(&request).map(|s| (at - *s).num_microseconds().unwrap_or(0) as f64 / 1000.0)
            })
            .collect()
    };
    let figures = Figures {
        orders,
        completed,
        exchanged: exchange_log.len(),
        seconds,
        orders_per_second: completed as f64 / seconds,
        order_to_certificate: Percentiles::of(certificate_latencies),
        exchange_to_asset: Percentiles::of(asset_latencies),
        stages: stages(&url, since).await?,
        cpu_seconds: cpu,
        peak_rss_mb,
        messages_per_order: broker_messages(published, received, received_internal) / orders.max(1) as f64,
        handled_per_order: (published + received) / orders.max(1) as f64,
        commits_per_order: (commits_after - commits_before) as f64 / orders.max(1) as f64,
    };
    Ok((figures, busy))
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
    let _ = tokio::task::spawn_blocking(move || crate::cli::bench::drop_database(&url)).await;
}

/// offer is order `i` of a run: a purchase of the benchmark's ticket, or, for the mix's share, a
/// booking of its seat.
fn offer(options: &LifecycleOptions, sims: &[terminals::SimTerminal], i: usize) -> serde_json::Value {
    let sim = &sims[i % sims.len()];
    if options.is_booking(i) {
        gateway::booking_request(&sim.id, super::BOOKED, &sim.key)
    } else {
        terminals::purchase(sim, "bench-ticket", 1, serde_json::json!({}))
    }
}
