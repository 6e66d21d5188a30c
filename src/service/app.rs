//! The application: what every part shares, and `assetflow run`, which starts the pools, the
//! outbox relay, the scheduler and the HTTP listener, and stops them in order on SIGTERM.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::config::workers::PoolDefinitions;
use crate::contracts::topology::{Names, Pool, Topology};
use crate::crypto::KeyRing;
use crate::domain::bookings::{BookingHandler, DecideHandler, SubmitHandler};
use crate::domain::delivery::notices::NoticesHandler;
use crate::domain::delivery::receipt::ReceiptHandler;
use crate::domain::delivery::{Deliveries, DeliveryReplayer, RequestedHandler};
use crate::domain::issuance::{
    AnswerHandler, DefaultsHandler, DeferHandler, ExchangeHandler, IssueHandler, Issuer, IssuerChangeHandler,
    Modifications,
};
use crate::domain::requests::Requests;
use crate::domain::scans::SettlementTimeouts;
use crate::domain::scans::bookings::Bookings;
use crate::domain::scans::certificates::{AssetExpiry, NearExpiry, PastDue};
use crate::domain::scans::confirmations::ConfirmationTimeouts;
use crate::domain::scans::deliveries::{DesignatedDeliveries, Retransmissions};
use crate::domain::scans::modifications::ModificationDefaults;
use crate::domain::scans::retention::Retention;
use crate::domain::settlement::{
    ChangeHandler, ConfirmHandler, PurchaseHandler, RefundHandler, ResultHandler, SettlementReplayer, Settlements,
};
use crate::runtime::Plumbing;
use crate::runtime::broker::Broker;
use crate::runtime::consumer::{Consumer, Registry};
use crate::runtime::db::{self, Db};
use crate::runtime::dead_letter::{MessageReplayer, Replayers};
use crate::runtime::outbox::{Handoff, Publisher, Relay};
use crate::runtime::progress::Progress;
use crate::service::jobs::Scans;
use crate::service::scheduler::Scheduler;

/// App is the composition root: the configuration, the runtime's plumbing, and every handler,
/// replayer and scan built with the domain dependencies it needs. Nothing below this floor sees it.
pub struct App {
    pub config: Config,
    pub pools: PoolDefinitions,
    pub keys: Arc<KeyRing>,
    pub plumbing: Plumbing,
    pub domain: Domain,
    pub scheduler: Arc<Scheduler>,
}

/// Domain is the domain's shared dependencies, each built once from the configuration.
pub struct Domain {
    pub deliveries: Arc<Deliveries>,
    pub settlements: Arc<Settlements>,
    pub requests: Arc<Requests>,
    pub issuer: Arc<Issuer>,
}

impl Domain {
    /// Domain::new builds the domain's dependencies from the configuration and the keys.
    pub fn new(config: &Config, pools: &PoolDefinitions, names: &Names, keys: Arc<KeyRing>) -> Domain {
        let deliveries = Arc::new(Deliveries {
            names: names.clone(),
            transmission: pools.delivery.transmission.clone(),
            gateways: config.gateways.clone(),
        });
        let settlements = Arc::new(Settlements {
            names: names.clone(),
            partners: config.partners.clone(),
            instruction: pools.settlement.instruction.clone(),
            deliveries: deliveries.clone(),
        });
        let requests = Arc::new(Requests { auth: config.auth.clone(), deliveries: deliveries.clone() });
        let issuer = Arc::new(Issuer {
            keys,
            service_provider_id: config.service_provider_id.clone(),
            deliveries: deliveries.clone(),
        });
        Domain { deliveries, settlements, requests, issuer }
    }
}

impl App {
    /// App::new builds the application; it connects to nothing yet.
    pub fn new(config: Config, pools: PoolDefinitions, keys: KeyRing) -> App {
        let db = Db::new(&config.database.url, config.database.pool_size, config.database.connection_timeout);
        let names = Names { prefix: config.amqp.prefix.clone() };
        let keys = Arc::new(keys);
        let domain = Domain::new(&config, &pools, &names, keys.clone());
        let scans = Scans {
            settlement_timeout: SettlementTimeouts { settlements: domain.settlements.clone() },
            confirmation_timeout: ConfirmationTimeouts { settlements: domain.settlements.clone() },
            designated_delivery: DesignatedDeliveries { deliveries: domain.deliveries.clone() },
            near_expiry: NearExpiry { names: names.clone() },
            past_due: PastDue { names: names.clone() },
            asset_expiry: AssetExpiry,
            retention: Retention { retention: config.retention.clone() },
            retransmission: Retransmissions { deliveries: domain.deliveries.clone() },
            bookings: Bookings { names: names.clone(), deliveries: domain.deliveries.clone() },
            issuer_changes: ModificationDefaults { names: names.clone() },
        };
        let plumbing = Plumbing {
            db,
            names,
            outbox_wake: Arc::new(Notify::new()),
            handoff: Arc::new(Handoff::default()),
            progress: Arc::new(Progress::default()),
            delivery_limit: config.amqp.delivery_limit,
        };
        let schedules = crate::service::jobs::JOBS
            .iter()
            .filter_map(|job| {
                let schedule =
                    config.schedules.get(job.name).or_else(|| pools.scheduler.jobs.get(job.name).map(|d| &d.schedule));
                schedule.map(|s| (job.name.to_string(), s.clone()))
            })
            .collect();
        let scheduler = Arc::new(Scheduler {
            scans,
            db: plumbing.db.clone(),
            outbox_wake: plumbing.outbox_wake.clone(),
            schedules,
            batch: 1000,
            workers: 2,
        });
        App { config, pools, keys, plumbing, domain, scheduler }
    }

    /// App::for_operations is the application as operator commands use it: they scan and write
    /// the outbox, but never sign, so no signing key is loaded.
    pub fn for_operations(config: Config) -> anyhow::Result<App> {
        let pools = config.pools()?;
        Ok(App::new(config, pools, KeyRing::ephemeral(&[])))
    }

    /// App::registry registers every handler with what it needs: the one place that says which
    /// queue takes which message.
    pub fn registry(&self) -> anyhow::Result<Registry> {
        let (names, domain) = (&self.plumbing.names, &self.domain);
        let mut registry = Registry::default();
        let settlement = names.pool_queue(Pool::Settlement.as_str());
        let issuance = names.pool_queue(Pool::Issuance.as_str());
        let delivery = names.pool_queue(Pool::Delivery.as_str());
        let (requests, settlements) = (domain.requests.clone(), domain.settlements.clone());
        registry.register(&settlement, PurchaseHandler { requests, settlements })?;
        registry.register(&settlement, ResultHandler { settlements: domain.settlements.clone() })?;
        registry.register(
            &settlement,
            RefundHandler { requests: domain.requests.clone(), settlements: domain.settlements.clone() },
        )?;
        let (requests, settlements) = (domain.requests.clone(), domain.settlements.clone());
        registry.register(&settlement, ConfirmHandler { requests, settlements })?;
        registry.register(
            &settlement,
            ChangeHandler { requests: domain.requests.clone(), settlements: domain.settlements.clone() },
        )?;
        registry.register(&issuance, IssueHandler { issuer: domain.issuer.clone() })?;
        registry.register(&issuance, ExchangeHandler { requests: domain.requests.clone(), keys: self.keys.clone() })?;
        registry.register(&issuance, DeferHandler { requests: domain.requests.clone() })?;
        let provider = domain.issuer.service_provider_id.clone();
        registry.register(
            &issuance,
            BookingHandler {
                requests: domain.requests.clone(),
                settlements: domain.settlements.clone(),
                keys: self.keys.clone(),
                service_provider_id: provider.clone(),
            },
        )?;
        registry.register(
            &issuance,
            SubmitHandler {
                requests: domain.requests.clone(),
                settlements: domain.settlements.clone(),
                keys: self.keys.clone(),
            },
        )?;
        let modifications =
            Arc::new(Modifications { issuer: domain.issuer.clone(), settlements: domain.settlements.clone() });
        registry.register(
            &issuance,
            AnswerHandler { requests: domain.requests.clone(), modifications: modifications.clone() },
        )?;
        registry.register(&issuance, DefaultsHandler { modifications })?;
        let issuers = Arc::new(self.config.issuers.clone());
        registry.register(&issuance, IssuerChangeHandler { deliveries: domain.deliveries.clone(), issuers })?;
        registry.register(
            &issuance,
            DecideHandler {
                deliveries: domain.deliveries.clone(),
                keys: self.keys.clone(),
                service_provider_id: provider,
            },
        )?;
        registry.register(&delivery, RequestedHandler { deliveries: domain.deliveries.clone() })?;
        registry.register(&delivery, NoticesHandler { deliveries: domain.deliveries.clone() })?;
        registry.register(&delivery, ReceiptHandler { deliveries: domain.deliveries.clone() })?;
        // Everything here is dead-lettered as unroutable.
        registry.unrouted(&names.unrouted());
        Ok(registry)
    }

    /// App::replayers registers every dead-letter replayer: the one place that says how the dead
    /// letters of each source are replayed.
    pub fn replayers(&self) -> anyhow::Result<Replayers> {
        let mut replayers = Replayers::default();
        let pools = Pool::ALL.iter().map(|p| p.as_str()).collect();
        replayers.register(MessageReplayer { names: self.plumbing.names.clone(), pools })?;
        replayers.register(DeliveryReplayer { deliveries: self.domain.deliveries.clone() })?;
        replayers.register(SettlementReplayer { settlements: self.domain.settlements.clone() })?;
        Ok(replayers)
    }
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

/// Patience is how long [`prepare`] waits for a database that does not answer.
#[derive(Debug, Clone, Copy)]
pub enum Patience {
    /// The service starting: the database may be starting too, so wait about 50 s.
    Service,
    /// An operator command: say at once (within a few seconds) that the database is not there.
    Operator,
}

/// prepare creates and migrates the database and records the configured partners, gateways and
/// issuers, retrying with a backoff from 200 ms for as long as `patience` allows.
pub async fn prepare(app: &App, patience: Patience) -> anyhow::Result<()> {
    let url = app.config.database.url.clone();
    let partners: Vec<String> = app.config.partners.keys().cloned().collect();
    let gateways: Vec<String> = app.config.gateways.keys().cloned().collect();
    let issuers: Vec<String> = app.config.issuers.keys().cloned().collect();
    let mut delay = std::time::Duration::from_millis(200);
    let last_delay = match patience {
        Patience::Service => std::time::Duration::from_secs(30),
        Patience::Operator => std::time::Duration::from_secs(1),
    };
    loop {
        let (url, partners, gateways, issuers) = (url.clone(), partners.clone(), gateways.clone(), issuers.clone());
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            db::prepare(&url)?;
            let mut conn = crate::runtime::db::establish(&url)?;
            crate::domain::catalogue::sync_parties(&mut conn, &partners, &gateways, &issuers)?;
            Ok(())
        })
        .await?;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if delay < last_delay => {
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
    crate::service::metrics::register();
    for warning in crate::config::transport_warnings(&app.config) {
        tracing::warn!(warning, "a connection crosses the network without verified TLS");
    }
    if options.scheduler {
        crate::service::scheduler::validate(&app.scheduler)?;
    }
    prepare(&app, Patience::Service).await?;
    let topology = Topology::new(&app.config);
    let broker_stop = CancellationToken::new();
    let broker = Broker::start(&app.config, topology.clone(), broker_stop.clone());
    let registry = Arc::new(app.registry()?);

    let background = TaskTracker::new();
    // Open before the first message is consumed, so that every handler's messages take the short way.
    if options.relay && !app.config.outbox.lease.is_zero() {
        let handed = app.plumbing.handoff.open(app.config.outbox.lease);
        background.spawn(Publisher::new(app.plumbing.db.clone(), broker.clone()).run(handed));
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
        let queues: Vec<String> =
            settings.queues.iter().map(|q| format!("{}.{q}", app.plumbing.names.prefix)).collect();
        for queue in &queues {
            anyhow::ensure!(registry.handles(queue), "workers/{pool}.toml names queue {queue}, which no handler takes");
        }
        let runner = Consumer {
            pool: pool.as_str(),
            queues,
            concurrency: settings.concurrency,
            prefetch: settings.prefetch,
            batch: settings.batch,
            linger: settings.linger,
            retries: settings.handler_retries.clone(),
            plumbing: app.plumbing.clone(),
            registry: registry.clone(),
            broker: broker.clone(),
        };
        consumers.spawn(runner.run(shutdown.clone()));
        // What the broker dead-letters by itself reaches the dead_letters table too.
        consumers.spawn(crate::runtime::dead_letter::run_recorder(
            app.plumbing.clone(),
            broker.clone(),
            pool.as_str(),
            shutdown.clone(),
        ));
    }
    consumers.close();

    let relay_stop = CancellationToken::new();
    if options.relay {
        let relay = Relay::new(
            app.plumbing.db.clone(),
            broker.clone(),
            app.plumbing.outbox_wake.clone(),
            app.config.outbox.batch_size,
            app.config.outbox.poll_interval,
            app.plumbing.progress.clone(),
        );
        background.spawn(relay.run(relay_stop.clone()));
    } else {
        app.plumbing.progress.relay_tick();
    }
    let scheduler_stop = CancellationToken::new();
    if options.scheduler {
        let (scheduler, stop) = (app.scheduler.clone(), scheduler_stop.clone());
        background.spawn(async move {
            if let Err(e) = crate::service::scheduler::start(scheduler, stop).await {
                tracing::error!(error = %e, "the scheduler stopped");
            }
        });
    }
    let http_stop = CancellationToken::new();
    if options.http && !app.config.http.listen.is_empty() {
        let queues = topology.queues.iter().map(|q| q.name.clone()).collect();
        background.spawn(crate::service::health::sample(
            app.plumbing.clone(),
            broker.clone(),
            queues,
            app.config.http.sample_interval,
            http_stop.clone(),
        ));
        let (listen, progress, broker, stop) =
            (app.config.http.listen.clone(), app.plumbing.progress.clone(), broker.clone(), http_stop.clone());
        let stall = app.config.outbox.poll_interval * 40 + std::time::Duration::from_secs(10);
        let expect_consumers = options.consume;
        background.spawn(async move {
            if let Err(e) =
                crate::service::health::serve(&listen, progress, broker, stall, expect_consumers, stop).await
            {
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
    app.plumbing.handoff.close();
    relay_stop.cancel();
    http_stop.cancel();
    background.close();
    background.wait().await;
    broker_stop.cancel();
    tracing::info!("stopped");
    Ok(())
}
