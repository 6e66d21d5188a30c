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
//! This file is the sequence: the setup the runs share, the runs and the limits between them. One
//! run is `run.rs`; what is reported and printed, `figures.rs` (a run's own) and `report.rs`
//! (against the limits, over the runs); what is read from the benchmark's database, `queries.rs`;
//! from the assetflow process, `process.rs`.

mod figures;
mod process;
mod queries;
mod report;
mod run;

pub use figures::{Figures, Percentiles};
pub use queries::Stage;
pub use report::{Bound, LimitsTaken, Report, Run, Spread, Summary, print};

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
    /// Terminals placing the orders.
    #[arg(long, default_value_t = 50)]
    pub terminals: usize,
    /// Skip measuring the limits (the ratio is then not shown).
    #[arg(long)]
    pub no_limits: bool,
    /// Runs, each with its own database and AMQP prefix, with the limits measured between them.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Give up waiting for completion after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub timeout: Duration,
    #[arg(long)]
    pub json: bool,
}

/// Shared is what the runs share: the configuration (each run changes the AMQP prefix and the
/// HTTP port) and the keys.
pub(super) struct Shared {
    /// The configuration as given, for the limits (they work in databases and queues of their own).
    base: Config,
    /// The runs' configuration: the benchmark's database, fresh keys, the simulators' parties.
    config: Config,
    dir: PathBuf,
    terminal_keys: PathBuf,
}

pub async fn run(config: Config, options: LifecycleOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(options.repeat >= 1, "--repeat must be at least 1");
    let dir = std::env::temp_dir().join(format!("assetflow-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let mut shared =
        Shared { base: config.clone(), config: config.clone(), terminal_keys: dir.join("terminals"), dir: dir.clone() };
    let c = &mut shared.config;
    c.database.url = super::bench_database_url(&config.database.url, "bench_lifecycle");
    c.keys.dir = dir.join("keys");
    c.partners = [("bench-card".to_string(), Default::default())].into();
    c.gateways =
        [("bench-gw-1".to_string(), Default::default()), ("bench-gw-2".to_string(), Default::default())].into();
    KeyRing::generate(&c.keys.dir, &["bench-issuer".to_string()], true)?;

    let outcome = repeat(&shared, &options).await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// repeat makes the runs, with the limits measured before the first and after each.
async fn repeat(shared: &Shared, options: &LifecycleOptions) -> anyhow::Result<Report> {
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
    Ok(Report::new(runs))
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
    )?;
    upsert_product(&mut conn, &bench_product())?;
    Ok(())
}
