//! `assetflow bench lifecycle`: the whole loop, measured. A real `assetflow run` process is
//! started (so that its CPU and memory are its own); the built-in simulators place a burst of
//! signed orders, settle them, acknowledge the deliveries and exchange a share of the
//! certificates. Latencies are taken from the simulators' publish times to the moment assetflow
//! recorded the receipt.
//!
//! With `--repeat N` there are N runs, each with a database and an AMQP prefix of its own, and the
//! limits are measured before the first and after each (`limits, run 1, limits, run 2, …,
//! limits`): the limits between two runs are the after of one and the before of the next. Each
//! run is set against the higher of each engine's two measurements around it (`report.rs`).
//!
//! This file is the sequence: the setup the runs share, the seeded database, the runs and the
//! limits between them. One run is `run.rs`; what is reported and printed, `figures.rs` (a run's
//! own) and `report.rs` (against the limits, over the runs); the seed, `seed.rs`; what is read from
//! the benchmark's database, `queries.rs`; from the assetflow process, `process.rs`.

mod figures;
mod process;
mod queries;
mod report;
mod run;
mod seed;

pub use figures::{Figures, Percentiles};
pub use queries::Stage;
pub use report::{Bound, LimitsTaken, Report, Run, Spread, Summary, print};
pub use seed::Seeded;

use std::path::PathBuf;
use std::time::Duration;

use super::limits::LimitsOptions;
use super::machine::Watch;
use crate::cli::simulate::terminals;
use crate::config::Config;
use crate::crypto::KeyRing;
use crate::domain::catalogue::{Product, upsert_product};

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
    /// The mix: the share of certificates whose holders have them refunded instead of
    /// exchanging them.
    #[arg(long, default_value_t = 0.0)]
    pub refunds: f64,
    /// The mix: the share of certificates whose holders change them for another product instead.
    #[arg(long, default_value_t = 0.0)]
    pub changes: f64,
    /// The mix: the share of the orders that are bookings of a held seat, each submitted as soon
    /// as its receipt certificate arrives.
    #[arg(long, default_value_t = 0.0)]
    pub bookings: f64,
    /// Terminals placing the orders.
    #[arg(long, default_value_t = 50)]
    pub terminals: usize,
    /// Skip measuring the limits (the ratio is then not shown).
    #[arg(long)]
    pub no_limits: bool,
    /// Runs, each with its own database and AMQP prefix, with the limits measured between them.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Completed orders, with their whole history, in each run's database before it begins.
    #[arg(long, default_value_t = 0)]
    pub seed_orders: i64,
    /// Give up waiting for completion after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub timeout: Duration,
    #[arg(long)]
    pub json: bool,
}

impl LifecycleOptions {
    /// LifecycleOptions::mixed says whether the runs have a mix besides purchases and exchanges.
    pub fn mixed(&self) -> bool {
        self.refunds > 0.0 || self.changes > 0.0 || self.bookings > 0.0
    }

    /// LifecycleOptions::is_booking says whether order `i` of a run is a booking: a stable
    /// spread of `--bookings` over the orders.
    pub fn is_booking(&self, i: usize) -> bool {
        self.bookings > 0.0 && ((i * 7_919) % 1_000) as f64 / 1_000.0 < self.bookings
    }
}

/// Shared is what the runs share: the configuration (each run changes the AMQP prefix and the
/// HTTP port), the keys, and the seeded database each run's is copied from.
pub(super) struct Shared {
    /// The configuration as given, for the limits (they work in databases and queues of their own).
    base: Config,
    /// The runs' configuration: the benchmark's database, fresh keys, the simulators' parties.
    config: Config,
    dir: PathBuf,
    terminal_keys: PathBuf,
    /// The seeded database, if any: each run's database is a copy of it.
    template: Option<String>,
}

pub async fn run(config: Config, options: LifecycleOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(options.repeat >= 1, "--repeat must be at least 1");
    anyhow::ensure!(options.seed_orders >= 0, "--seed-orders cannot be negative");
    let url = super::bench_database_url(&config.database.url, "bench_lifecycle");
    let _exclusive = tokio::task::spawn_blocking(move || super::exclusive(&url)).await??;
    let dir = std::env::temp_dir().join(format!("assetflow-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let mut shared = Shared {
        base: config.clone(),
        config: config.clone(),
        terminal_keys: dir.join("terminals"),
        dir: dir.clone(),
        template: None,
    };
    let c = &mut shared.config;
    c.database.url = super::bench_database_url(&config.database.url, "bench_lifecycle");
    c.keys.dir = dir.join("keys");
    c.partners = [("bench-card".to_string(), Default::default())].into();
    c.gateways =
        [("bench-gw-1".to_string(), Default::default()), ("bench-gw-2".to_string(), Default::default())].into();
    KeyRing::generate(&c.keys.dir, &["bench-issuer".to_string()], true)?;

    let seeded = if options.seed_orders > 0 {
        let url = super::bench_database_url(&config.database.url, "bench_lifecycle_seed");
        shared.template = Some(url.clone());
        seed_template(&shared, &options, &url).await
    } else {
        Ok(Seeded { orders: 0, exchanged: 0, seconds: 0.0 })
    };
    let outcome = match seeded {
        Ok(seeded) => repeat(&shared, &options, seeded).await,
        Err(e) => Err(e),
    };
    if let Some(url) = shared.template.clone() {
        let _ = tokio::task::spawn_blocking(move || super::drop_database(&url)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// repeat makes the runs, with the limits measured before the first and after each.
async fn repeat(shared: &Shared, options: &LifecycleOptions, seeded: Seeded) -> anyhow::Result<Report> {
    let mut before = limits(shared, options, "before run 1").await?;
    let mut runs = Vec::with_capacity(options.repeat);
    for n in 1..=options.repeat {
        eprintln!("run {n} of {}…", options.repeat);
        let (figures, busy) = run::once(shared, options, n).await?;
        if let Some(warning) = busy.as_ref().and_then(|b| b.warning(&format!("during run {n}"))) {
            eprintln!("{warning}");
        }
        let after = limits(shared, options, &format!("after run {n}")).await?;
        runs.push(Run::new(n, figures, busy, before, after.clone()));
        before = after;
    }
    Ok(Report::new(seeded, runs))
}

/// limits measures the limits as `bench limits` does with its defaults, and what else the machine
/// did meanwhile; nothing with `--no-limits`.
async fn limits(shared: &Shared, options: &LifecycleOptions, when: &str) -> anyhow::Result<Option<LimitsTaken>> {
    if options.no_limits {
        return Ok(None);
    }
    eprintln!("measuring the limits {when}…");
    let watch = tokio::task::spawn_blocking(|| Watch::start(&[])).await?;
    let limits = super::limits::measure(&shared.base, &LimitsOptions::default()).await?;
    let busy = tokio::task::spawn_blocking(move || watch.stop()).await?;
    if let Some(warning) = busy.as_ref().and_then(|b| b.warning(&format!("while measuring the limits {when}"))) {
        eprintln!("{warning}");
    }
    Ok(Some(LimitsTaken { limits, busy }))
}

/// bench_product is the product every benchmark order buys: the demo catalogue's first.
fn bench_product() -> Product {
    let product = terminals::demo_catalogue().remove(0);
    Product { id: "bench-ticket".into(), issuer_id: "bench-issuer".into(), ..product }
}

/// catalogue records the benchmark's partner, gateways and product in a migrated database.
fn catalogue(url: &str) -> anyhow::Result<()> {
    let mut conn = crate::runtime::db::establish(url)?;
    crate::domain::catalogue::sync_parties(
        &mut conn,
        &["bench-card".into()],
        &["bench-gw-1".into(), "bench-gw-2".into()],
        &[],
    )?;
    upsert_product(&mut conn, &bench_product())?;
    // The mix's: what holders change their tickets for, and a seat sold by booking.
    let card = terminals::demo_catalogue().remove(1);
    upsert_product(&mut conn, &Product { id: CHANGE_TO.into(), issuer_id: "bench-issuer".into(), ..card })?;
    upsert_product(&mut conn, &Product { id: BOOKED.into(), ..bench_product() })?;
    let terms = crate::domain::bookings::Terms {
        product_id: BOOKED.into(),
        condition: "hold".into(),
        places: None,
        decided_at: None,
        window_secs: 86_400,
    };
    crate::domain::bookings::save_terms(&mut conn, &terms)?;
    Ok(())
}

/// CHANGE_TO is the product the mix's holders change their tickets for.
pub(super) const CHANGE_TO: &str = "bench-card";
/// BOOKED is the seat the mix's bookings are for.
pub(super) const BOOKED: &str = "bench-seat";

/// seed_template makes the seeded database the runs' databases are copied from: migrated, with
/// the catalogue and the terminals, and `--seed-orders` completed orders.
async fn seed_template(shared: &Shared, options: &LifecycleOptions, url: &str) -> anyhow::Result<Seeded> {
    let mut config = shared.config.clone();
    config.database.url = url.to_string();
    tokio::task::spawn_blocking({
        let url = url.to_string();
        move || -> anyhow::Result<()> {
            super::drop_database(&url)?;
            crate::runtime::db::prepare(&url)?;
            catalogue(&url)
        }
    })
    .await??;
    let sims = terminals::register(&config, options.terminals, &shared.terminal_keys).await?;
    let sim = sims.first().ok_or_else(|| anyhow::anyhow!("--terminals must be at least 1"))?;
    let product = bench_product();
    let templates =
        seed::Templates::new(&KeyRing::load(&config.keys.dir)?, &product, &config.service_provider_id, &sim.key)?;
    let ack_timeout = crate::config::workers::PoolDefinitions::built_in().delivery.transmission.ack_timeout;
    let (url, orders, exchange_rate) = (url.to_string(), options.seed_orders, options.exchange_rate);
    eprintln!("seeding {orders} completed orders…");
    tokio::task::spawn_blocking(move || -> anyhow::Result<Seeded> {
        let mut conn = crate::runtime::db::establish(&url)?;
        seed::seed(&mut conn, &templates, &product, orders, exchange_rate, ack_timeout, chrono::Utc::now())
    })
    .await?
}
