//! The command line: one binary, `assetflow`, with a subcommand per operator task.

pub mod admin;
pub mod audit;
pub mod batch;
pub mod bench;
pub mod dlq;
pub mod keys;
pub mod parties;
pub mod simulate;
pub mod status;
pub mod time;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::contracts::topology::{Pool, Topology};
use crate::crypto::KeyRing;
use crate::service::app::{self, App, RunOptions};

#[derive(Debug, Parser)]
#[command(name = "assetflow", version, about = "Sells, settles, issues, delivers and looks after electronic assets")]
pub struct Cli {
    /// A configuration file layered over the built-in defaults (also ASSETFLOW_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Log format: text on a terminal, json for machines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ASSETFLOW_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// More detail in the logs (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pools, the outbox relay, the scheduler and the HTTP listener until SIGTERM.
    Run {
        /// Run only these pools (repeatable); the default is all of them.
        #[arg(long = "pool", value_parser = parse_pool)]
        pools: Vec<Pool>,
        /// Do not run the scheduled jobs in this process.
        #[arg(long, conflicts_with = "scheduler_only")]
        no_scheduler: bool,
        /// Run only the scheduled jobs (with the outbox relay and the HTTP listener), no pool.
        #[arg(long, conflicts_with = "pools")]
        scheduler_only: bool,
    },
    /// Create the database if needed and run the migrations.
    Migrate,
    /// Print the effective configuration, passwords redacted.
    Config {
        /// Print the built-in defaults, with their comments, instead.
        #[arg(long)]
        defaults: bool,
    },
    /// Print the AMQP topology: exchanges, queues, arguments and bindings.
    Topology,
    /// Show an asset, order or request: its state and its whole history.
    Status {
        /// An asset id, an order id or a request id.
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Signing keys.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Partners and gateways: how each proves who it is.
    Parties {
        #[command(subcommand)]
        command: parties::PartiesCommand,
    },
    /// Terminals.
    Terminals {
        #[command(subcommand)]
        command: admin::TerminalsCommand,
    },
    /// The product catalogue.
    Products {
        #[command(subcommand)]
        command: admin::ProductsCommand,
    },
    /// The scheduled jobs: list them, run one now (for any time), see past runs.
    Batch {
        #[command(subcommand)]
        command: batch::BatchCommand,
    },
    /// Dead letters: list, show, replay, purge.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Check the guarantees after a run: nothing lost, nothing done twice, legal status paths,
    /// dead letters exactly what could not be processed, queues drained; with a gateway ledger,
    /// nothing received twice on the wire. Exits 1 if one broke.
    Audit {
        /// The orders the caller published: any that reached no table counts as lost.
        #[arg(long)]
        sent: Option<i64>,
        /// A gateway's ledger (`simulate … --gateway-ledger`): count what reached the gateways
        /// twice, and what they received that assetflow has no record of.
        #[arg(long)]
        gateway_ledger: Option<PathBuf>,
        /// Print the audit as JSON.
        #[arg(long)]
        json: bool,
        /// Do not read the queue depths from RabbitMQ.
        #[arg(long)]
        no_queues: bool,
    },
    /// Benchmarks: throughput measured on this machine.
    Bench {
        #[command(subcommand)]
        command: crate::cli::bench::BenchCommand,
    },
    /// The built-in simulators of terminals, partners and gateways.
    Simulate {
        #[command(subcommand)]
        command: crate::cli::simulate::SimulateCommand,
    },
}

pub(crate) fn parse_pool(s: &str) -> Result<Pool, String> {
    Pool::parse(s).ok_or_else(|| format!("unknown pool {s:?}: settlement, issuance or delivery"))
}

/// init_logging sets up tracing: human-readable or JSON, to standard error.
pub fn init_logging(format: LogFormat, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    // lapin logs a closing channel as an ERROR; the broker supervisor reports connection events
    // itself, at the level an operator needs, so lapin is quiet unless asked for with -v.
    let default = match verbose {
        0 => "info,lapin=off,tokio_cron_scheduler=warn",
        1 => "debug,lapin=info,tokio_cron_scheduler=warn",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// load_config loads and validates the configuration.
pub fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    config.validate()?;
    crate::service::jobs::check_schedules(&config)?;
    Ok(config)
}

/// execute runs a parsed command line.
pub async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Run { pools, no_scheduler, scheduler_only } => {
            // Private keys are loaded by the processes that sign, and by no other.
            let signs = !scheduler_only && (pools.is_empty() || pools.contains(&Pool::Issuance));
            let keys = if signs { KeyRing::load(&config.keys.dir)? } else { KeyRing::none() };
            let definitions = config.pools()?;
            let app = Arc::new(App::new(config, definitions, keys));
            let shutdown = CancellationToken::new();
            tokio::spawn(signal_shutdown(shutdown.clone()));
            crate::service::health::metrics_handle();
            let options =
                RunOptions { pools, consume: !scheduler_only, scheduler: !no_scheduler, ..RunOptions::default() };
            app::run(app, options, shutdown).await?;
        }
        Command::Migrate => {
            let url = config.database.url.clone();
            let applied = tokio::task::spawn_blocking(move || crate::runtime::db::prepare(&url)).await??;
            if applied.is_empty() {
                println!("the database is up to date");
            }
            for version in applied {
                println!("applied {version}");
            }
        }
        Command::Config { defaults } => {
            if defaults {
                print!("{}", crate::config::DEFAULTS);
            } else {
                print!("{}", config.redacted());
            }
        }
        Command::Topology => print!("{}", Topology::new(&config).render()),
        Command::Status { id, json } => return status::run(&config, &id, json).await,
        Command::Keys { command } => keys::run(&config, command)?,
        Command::Parties { command } => parties::run(&config, command).await?,
        Command::Terminals { command } => admin::terminals(&config, command).await?,
        Command::Products { command } => admin::products(&config, command).await?,
        Command::Audit { sent, gateway_ledger, json, no_queues } => {
            return audit::run(&config, sent, gateway_ledger, json, no_queues).await;
        }
        Command::Batch { command } => batch::execute(config, command).await?,
        Command::Dlq { command } => dlq::execute(config, command).await?,
        Command::Bench { command } => crate::cli::bench::run(config, command).await?,
        Command::Simulate { command } => crate::cli::simulate::run(config, command).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// signal_shutdown cancels `token` on SIGTERM or Ctrl-C.
async fn signal_shutdown(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received");
    token.cancel();
}
