//! The application: what every part shares, and `assetflow run`, which starts the pools, the
//! outbox relay, the scheduler and the HTTP listener, and stops them in order on SIGTERM.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Names, Pool, Topology};
use crate::config::Config;
use crate::crypto::KeyRing;
use crate::db::{self, Db};
use crate::health::Progress;
use crate::outbox::{Handoff, Publisher, Relay};
use crate::pool::definition::PoolDefinitions;
use crate::pool::{Handler, PoolRunner, Registry};
use crate::{delivery, issuance, settlement};

/// App is shared by every part of a running assetflow.
pub struct App {
    pub config: Config,
    pub pools: PoolDefinitions,
    pub keys: KeyRing,
    pub db: Db,
    pub names: Names,
    /// Signalled after every commit that wrote to the outbox.
    pub outbox_wake: Arc<Notify>,
    /// Where handlers' committed messages go to be published at once, while a publisher runs.
    pub handoff: Handoff,
    pub progress: Arc<Progress>,
    /// Rows per scheduled-scan transaction.
    pub scan_batch: i64,
    /// Connections a scan works on at once.
    pub scan_workers: usize,
}

impl App {
    /// App::new builds the application; it connects to nothing yet.
    pub fn new(config: Config, pools: PoolDefinitions, keys: KeyRing) -> App {
        let db = Db::new(&config.database.url, config.database.pool_size, config.database.connection_timeout);
        let names = Names { prefix: config.amqp.prefix.clone() };
        App {
            config,
            pools,
            keys,
            db,
            names,
            outbox_wake: Arc::new(Notify::new()),
            handoff: Handoff::default(),
            progress: Arc::new(Progress::default()),
            scan_batch: 1000,
            scan_workers: 2,
        }
    }
}

impl App {
    /// App::for_operations is the application as operator commands use it: they scan and write
    /// the outbox, but never sign, so no signing key is loaded.
    pub fn for_operations(config: Config) -> anyhow::Result<App> {
        let pools = config.pools()?;
        Ok(App::new(config, pools, KeyRing::ephemeral(&[])))
    }
}

/// registry registers every handler: the one place that says which queue takes which message.
pub fn registry(names: &Names) -> anyhow::Result<Registry> {
    let mut registry = Registry::default();
    let settlement_queue = names.pool_queue(Pool::Settlement);
    let issuance_queue = names.pool_queue(Pool::Issuance);
    let delivery_queue = names.pool_queue(Pool::Delivery);
    let handlers: Vec<(&str, Arc<dyn Handler>)> = vec![
        (&settlement_queue, Arc::new(settlement::PurchaseHandler)),
        (&settlement_queue, Arc::new(settlement::ResultHandler)),
        (&issuance_queue, Arc::new(issuance::IssueHandler)),
        (&issuance_queue, Arc::new(issuance::ExchangeHandler)),
        (&delivery_queue, Arc::new(delivery::RequestedHandler)),
        (&delivery_queue, Arc::new(delivery::notices::NoticesHandler)),
        (&delivery_queue, Arc::new(delivery::receipt::ReceiptHandler)),
    ];
    for (queue, handler) in handlers {
        registry.register(queue, handler)?;
    }
    // Everything here is dead-lettered as unroutable.
    registry.queue(&names.unrouted());
    Ok(registry)
}

/// RunOptions selects what `assetflow run` runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Pools to run; empty runs them all.
    pub pools: Vec<Pool>,
    /// Whether to consume at all: false runs only the scheduler, the relay and the listener.
    pub consume: bool,
    pub scheduler: bool,
    pub relay: bool,
    pub http: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { pools: Vec::new(), consume: true, scheduler: true, relay: true, http: true }
    }
}

/// prepare creates and migrates the database and records the configured partners and gateways.
pub async fn prepare(app: &App) -> anyhow::Result<()> {
    let url = app.config.database.url.clone();
    let partners: Vec<String> = app.config.partners.keys().cloned().collect();
    let gateways: Vec<String> = app.config.gateways.keys().cloned().collect();
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        let (url, partners, gateways) = (url.clone(), partners.clone(), gateways.clone());
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            db::prepare(&url)?;
            let mut conn = crate::db::establish(&url)?;
            crate::catalogue::sync_parties(&mut conn, &partners, &gateways)?;
            Ok(())
        })
        .await?;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if delay < std::time::Duration::from_secs(30) => {
                tracing::warn!(error = %e, retry_in = ?delay, "database not ready");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

/// run runs assetflow until `shutdown`: stop consuming, finish what is in hand, flush the
/// outbox, stop.
pub async fn run(app: Arc<App>, options: RunOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::telemetry::register();
    if options.scheduler {
        crate::scheduler::validate(&app)?;
    }
    prepare(&app).await?;
    let topology = Topology::new(&app.config);
    let broker_stop = CancellationToken::new();
    let broker = Broker::start(&app.config, topology.clone(), broker_stop.clone());
    let registry = Arc::new(registry(&app.names)?);

    let background = TaskTracker::new();
    // Open before the first message is consumed, so that every handler's messages take the short way.
    if options.relay && !app.config.outbox.lease.is_zero() {
        let handed = app.handoff.open(app.config.outbox.lease);
        background.spawn(Publisher::new(app.db.clone(), broker.clone()).run(handed));
    }

    let consumers = TaskTracker::new();
    let pools = match (options.consume, options.pools.is_empty()) {
        (false, _) => Vec::new(),
        (true, true) => Pool::ALL.to_vec(),
        (true, false) => options.pools.clone(),
    };
    for pool in pools {
        let settings = match pool {
            Pool::Settlement => &app.pools.settlement.pool,
            Pool::Issuance => &app.pools.issuance.pool,
            Pool::Delivery => &app.pools.delivery.pool,
        };
        let queues: Vec<String> = settings.queues.iter().map(|q| format!("{}.{q}", app.names.prefix)).collect();
        for queue in &queues {
            anyhow::ensure!(registry.handles(queue), "workers/{pool}.toml names queue {queue}, which no handler takes");
        }
        let runner = PoolRunner {
            pool,
            queues,
            concurrency: settings.concurrency,
            prefetch: settings.prefetch,
            batch: settings.batch,
            linger: settings.linger,
            retries: settings.handler_retries.clone(),
            app: app.clone(),
            registry: registry.clone(),
            broker: broker.clone(),
        };
        consumers.spawn(runner.run(shutdown.clone()));
        // What the broker dead-letters by itself reaches the dead_letters table too.
        consumers.spawn(crate::dead_letter::run_recorder(app.clone(), broker.clone(), pool, shutdown.clone()));
    }
    consumers.close();

    let relay_stop = CancellationToken::new();
    if options.relay {
        let relay = Relay::new(
            app.db.clone(),
            broker.clone(),
            app.outbox_wake.clone(),
            app.config.outbox.batch_size,
            app.config.outbox.poll_interval,
            app.progress.clone(),
        );
        background.spawn(relay.run(relay_stop.clone()));
    } else {
        app.progress.relay_tick();
    }
    let scheduler_stop = CancellationToken::new();
    if options.scheduler {
        let (app, stop) = (app.clone(), scheduler_stop.clone());
        background.spawn(async move {
            if let Err(e) = crate::scheduler::start(app, stop).await {
                tracing::error!(error = %e, "the scheduler stopped");
            }
        });
    }
    let http_stop = CancellationToken::new();
    if options.http && !app.config.http.listen.is_empty() {
        let queues = topology.queues.iter().map(|q| q.name.clone()).collect();
        background.spawn(crate::health::sample(app.clone(), broker.clone(), queues, http_stop.clone()));
        let (listen, progress, broker, stop) =
            (app.config.http.listen.clone(), app.progress.clone(), broker.clone(), http_stop.clone());
        let stall = app.config.outbox.poll_interval * 40 + std::time::Duration::from_secs(10);
        let expect_consumers = options.consume;
        background.spawn(async move {
            if let Err(e) = crate::health::serve(&listen, progress, broker, stall, expect_consumers, stop).await {
                tracing::error!(error = %e, "the HTTP listener stopped");
            }
        });
    }
    tracing::info!("assetflow is running");

    shutdown.cancelled().await;
    tracing::info!("shutting down: finishing the messages in hand");
    scheduler_stop.cancel();
    consumers.wait().await;
    tracing::info!("flushing the outbox");
    app.handoff.close();
    relay_stop.cancel();
    http_stop.cancel();
    background.close();
    background.wait().await;
    broker_stop.cancel();
    tracing::info!("stopped");
    Ok(())
}
