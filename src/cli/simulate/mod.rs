//! The built-in simulators: terminals that sign and place orders and bookings, partners that settle
//! them, and gateways that acknowledge deliveries, exchange some certificates and submit receipt
//! certificates. They talk to assetflow only
//! through RabbitMQ, exactly as the real parties do; the tests and the benchmark use them too.

pub mod gateway;
pub mod issuer;
pub mod ledger;
pub mod partner;
pub mod publisher;
pub mod terminals;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use openssl::pkey::{PKey, Private};

use crate::config::Config;
use crate::crypto;
use crate::domain::catalogue::PartyKind;
use crate::runtime::broker::Broker;

#[derive(Debug, Subcommand)]
pub enum SimulateCommand {
    /// Payment partners: settle instructions from their queues.
    Partner(partner::PartnerOptions),
    /// Gateways: acknowledge deliveries, and exchange some certificates for their terminals.
    Gateway(gateway::GatewayOptions),
    /// Terminals: register, then sign and publish orders at a rate.
    Terminals(terminals::TerminalOptions),
    /// Issuers: change the events of their products now and then.
    Issuer(issuer::IssuerOptions),
    /// Everything above in one process, with a demo catalogue: what `ops/run` starts.
    All {
        #[command(flatten)]
        terminals: terminals::TerminalOptions,
        /// Share of settlement instructions the partner declines.
        #[arg(long, default_value_t = 0.1)]
        decline_rate: f64,
        /// Share of certificates their holders exchange.
        #[arg(long, default_value_t = 0.5)]
        exchange_rate: f64,
        /// Share of certificates whose holders ask for a refund instead of exchanging them.
        #[arg(long, default_value_t = 0.1)]
        refund_rate: f64,
        /// Share of certificates whose holders change them for a prepaid card instead.
        #[arg(long, default_value_t = 0.05)]
        change_rate: f64,
        /// Share of certificates whose holders defer the download instead.
        #[arg(long, default_value_t = 0.1)]
        defer_rate: f64,
        /// Share of refunds the partner refuses.
        #[arg(long, default_value_t = 0.1)]
        refund_refusal_rate: f64,
        /// Share of orders billed to another terminal that the payer declines.
        #[arg(long, default_value_t = 0.1)]
        confirm_decline_rate: f64,
        /// Share of orders billed to another terminal that the payer never answers.
        #[arg(long, default_value_t = 0.05)]
        confirm_ignore_rate: f64,
        /// Share of receipt certificates their holders submit once they may (the others expire or
        /// lapse, and are revoked).
        #[arg(long, default_value_t = 0.8)]
        submit_rate: f64,
        /// How often each configured issuer changes one of its products' events (`issuer.change`);
        /// the holders answer its notices, a share with a refund, a share not at all.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        issuer_change_every: Duration,
        /// With --orders: keep answering this long after the last order, then show the history
        /// of an exchanged asset and stop. Without it, run until interrupted.
        #[arg(long, value_parser = humantime::parse_duration)]
        linger: Option<Duration>,
        /// A JSON-lines file the gateway appends every delivery message it receives to (for
        /// `assetflow audit --gateway-ledger`).
        #[arg(long = "gateway-ledger")]
        gateway_ledger: Option<PathBuf>,
    },
}

/// Stats counts what the simulators saw, for the summary line.
#[derive(Default)]
pub struct Stats {
    pub orders: AtomicU64,
    pub settled: AtomicU64,
    pub declined: AtomicU64,
    pub certificates: AtomicU64,
    pub exchanges: AtomicU64,
    /// Exchanges a holder has decided on and not yet published (see the gateway simulator's delay).
    pub exchanges_waiting: AtomicU64,
    pub assets: AtomicU64,
    pub notices: AtomicU64,
    pub refusals: AtomicU64,
    pub receipts: AtomicU64,
    /// Refunds and deferrals the holders asked for, and the partners' answers to refunds.
    pub refunds_asked: AtomicU64,
    pub changes_asked: AtomicU64,
    pub refunded: AtomicU64,
    pub refunds_refused: AtomicU64,
    pub deferrals: AtomicU64,
    /// When on, the gateway simulator logs when it published each exchange (the benchmark's
    /// clock for exchange-to-asset latency). Off by default: a long demo would only grow it.
    pub log_exchanges: std::sync::atomic::AtomicBool,
    pub exchange_log: std::sync::Mutex<Vec<(String, chrono::DateTime<chrono::Utc>)>>,
    /// The deliveries whose certificate a holder decided to exchange: a holder exchanges a
    /// certificate once, even when it is sent again (a receipt that came too late for its timeout).
    pub exchange_decided: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// Certificates offered to their holders so far, counted only with the gateway simulator's
    /// `each_answer_first`.
    pub certificates_offered: AtomicU64,
    /// Payers' answers to orders they were asked to confirm, published.
    pub confirmations: AtomicU64,
    /// The orders whose payer decided how to answer: a payer answers once, even when the request
    /// to confirm is sent again.
    pub confirm_decided: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// Bookings the terminals published, and receipt certificates their holders submitted.
    pub bookings: AtomicU64,
    pub submissions: AtomicU64,
    /// The receipt certificates holders received and mean to submit, by id: a lottery's or a
    /// threshold sale's kept until its `lottery_won` or `threshold_met` notice; `None` once
    /// submitted, so that a holder submits once, even when the certificate or its notice is sent
    /// again.
    pub receipt_certificates: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, Option<serde_json::Value>>>,
    /// Issuers' changes sent, and holders' answers to their modification notices.
    pub issuer_changes: AtomicU64,
    pub modification_answers: AtomicU64,
    /// The modification notices whose holder decided how to answer: once, even when one is sent
    /// again.
    pub modification_decided: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
}

impl Stats {
    pub fn line(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "orders {} · bookings {} · submissions {} · confirmations {} · settled {} · declined {} · certificates {} · exchanges {} · assets {} · notices {} · refusals {} · refunds asked {} (refunded {}, refused {}) · changes asked {} · deferrals {} · issuer changes {} (answered {})",
            g(&self.orders),
            g(&self.bookings),
            g(&self.submissions),
            g(&self.confirmations),
            g(&self.settled),
            g(&self.declined),
            g(&self.certificates),
            g(&self.exchanges),
            g(&self.assets),
            g(&self.notices),
            g(&self.refusals),
            g(&self.refunds_asked),
            g(&self.refunded),
            g(&self.refunds_refused),
            g(&self.changes_asked),
            g(&self.deferrals),
            g(&self.issuer_changes),
            g(&self.modification_answers)
        )
    }
}

/// show_an_exchanged_asset prints the history of the most recently exchanged asset.
async fn show_an_exchanged_asset(config: &Config) -> anyhow::Result<()> {
    use diesel::prelude::*;
    let url = config.database.url.clone();
    let view = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<crate::cli::status::View>> {
        use crate::domain::schema::exchange_certificates as x;
        let mut conn = crate::runtime::db::establish(&url)?;
        let asset: Option<uuid::Uuid> = x::table
            .filter(x::exchanged_at.is_not_null())
            .order(x::exchanged_at.desc())
            .select(x::asset_id)
            .first(&mut conn)
            .optional()?;
        Ok(match asset {
            Some(id) => crate::cli::status::lookup(&mut conn, &id.to_string())?,
            None => None,
        })
    })
    .await??;
    if let Some(view) = view {
        println!("\nThe most recently exchanged asset (assetflow status <id> shows any):\n");
        print!("{}", crate::cli::status::render(&view));
    }
    Ok(())
}

/// answer_after runs a simulator's answer once `latency` has passed. A latency long enough to
/// matter is waited out in a task of its own, so a slow partner or gateway still works on many
/// messages at once, as a real one does: the message is taken now and answered later. (Were the
/// simulator to stop meanwhile, assetflow's own timeout sends the message again.)
pub(crate) async fn answer_after(latency: Duration, answer: impl Future<Output = ()> + Send + 'static) {
    if latency > Duration::from_millis(50) {
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            answer.await;
        });
    } else {
        tokio::time::sleep(latency).await;
        answer.await;
    }
}

/// default_keys_dir is where simulated terminals keep their private keys.
pub fn default_keys_dir() -> PathBuf {
    PathBuf::from(".assetflow/sim/terminals")
}

/// default_party_keys_dir is where simulated partners and gateways keep their private keys.
pub fn default_party_keys_dir() -> PathBuf {
    PathBuf::from(".assetflow/sim/parties")
}

/// acting_as is the parties a simulator acts as: those given on its command line, or else every
/// one configured in `[section]`; an error when that leaves none.
fn acting_as<T>(
    given: &[String],
    configured: &std::collections::BTreeMap<String, T>,
    section: &str,
) -> anyhow::Result<Vec<String>> {
    let ids: Vec<String> = if given.is_empty() { configured.keys().cloned().collect() } else { given.to_vec() };
    anyhow::ensure!(!ids.is_empty(), "no {section} configured: add [{section}.<id>] to the configuration");
    Ok(ids)
}

/// party_key is the signing key of a simulated partner, gateway or issuer: read from `dir`, or made and
/// written there by whoever comes first (a simulator and a test may both ask), then registered
/// with assetflow, as the real party's operator does with `assetflow parties key`.
pub async fn party_key(config: &Config, kind: PartyKind, id: &str, dir: &Path) -> anyhow::Result<PKey<Private>> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}-{id}.pem", kind.as_str()));
    let key = match crypto::load_private_key(&path) {
        Ok(key) => key,
        Err(_) => {
            let key = crypto::generate_key_pair()?;
            let new = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path);
            match new {
                Ok(mut file) => {
                    std::io::Write::write_all(&mut file, &key.private_key_to_pem_pkcs8()?)?;
                    key
                }
                // Someone else made it meanwhile: theirs is the key.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => crypto::load_private_key(&path)?,
                Err(e) => return Err(anyhow::anyhow!("cannot write {}: {e}", path.display())),
            }
        }
    };
    let (url, id, pem) = (config.database.url.clone(), id.to_string(), crypto::public_key_pem(&key)?);
    let partners: Vec<String> = config.partners.keys().cloned().collect();
    let gateways: Vec<String> = config.gateways.keys().cloned().collect();
    let issuers: Vec<String> = config.issuers.keys().cloned().collect();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut conn = crate::runtime::db::establish(&url)?;
        crate::domain::catalogue::sync_parties(&mut conn, &partners, &gateways, &issuers)?;
        crate::domain::catalogue::register_party_key(&mut conn, kind, &id, Some(&pem))?;
        Ok(())
    })
    .await??;
    Ok(key)
}

pub async fn run(config: Config, command: SimulateCommand) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    {
        let shutdown1 = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown1.cancel();
        });
        let shutdown2 = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                term.recv().await;
                shutdown2.cancel();
            }
        });
    }
    let broker = Broker::declaring(&config, shutdown.clone());
    let stats = Arc::new(Stats::default());
    let reporter = {
        let (stats, shutdown) = (stats.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => println!("{}", stats.line()),
                }
            }
            println!("{}", stats.line());
        })
    };
    match command {
        SimulateCommand::Partner(options) => partner::run(&config, broker, options, stats, shutdown.clone()).await?,
        SimulateCommand::Gateway(options) => gateway::run(&config, broker, options, stats, shutdown.clone()).await?,
        SimulateCommand::Terminals(options) => {
            terminals::run(&config, broker, options, stats, shutdown.clone()).await?
        }
        SimulateCommand::Issuer(options) => issuer::run(&config, broker, options, stats, shutdown.clone()).await?,
        SimulateCommand::All {
            terminals: options,
            decline_rate,
            exchange_rate,
            refund_rate,
            change_rate,
            defer_rate,
            refund_refusal_rate,
            confirm_decline_rate,
            confirm_ignore_rate,
            submit_rate,
            issuer_change_every,
            linger,
            gateway_ledger,
        } => {
            terminals::ensure_demo_catalogue(&config).await?;
            let partner_options =
                partner::PartnerOptions { decline_rate, refund_refusal_rate, ..partner::PartnerOptions::default() };
            let gateway_options = gateway::GatewayOptions {
                exchange_rate,
                refund_rate,
                change_rate,
                change_to: Some("prepaid-card-5000".into()),
                defer_rate,
                confirm_decline_rate,
                confirm_ignore_rate,
                submit_rate,
                keys: options.keys.clone(),
                ledger: gateway_ledger,
                modification_refund_rate: 0.3,
                modification_silence_rate: 0.2,
                ..gateway::GatewayOptions::default()
            };
            let p = tokio::spawn(partner::run_owned(
                config.clone(),
                broker.clone(),
                partner_options,
                stats.clone(),
                shutdown.clone(),
            ));
            let g = tokio::spawn(gateway::run_owned(
                config.clone(),
                broker.clone(),
                gateway_options,
                stats.clone(),
                shutdown.clone(),
            ));
            // Issuers change their events, when any is configured to send its changes itself.
            let i = (!config.issuers.is_empty()).then(|| {
                let options = issuer::IssuerOptions { every: issuer_change_every, ..issuer::IssuerOptions::default() };
                tokio::spawn(issuer::run_owned(
                    config.clone(),
                    broker.clone(),
                    options,
                    stats.clone(),
                    shutdown.clone(),
                ))
            });
            let t = terminals::run(&config, broker.clone(), options, stats.clone(), shutdown.clone()).await;
            // The terminals stop after --orders; the partner and gateway keep answering.
            if t.is_ok() {
                match linger {
                    Some(linger) => tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(linger) => {}
                    },
                    None => shutdown.cancelled().await,
                }
            }
            shutdown.cancel();
            p.await??;
            g.await??;
            if let Some(i) = i {
                i.await??;
            }
            t?;
            if linger.is_some() {
                show_an_exchanged_asset(&config).await?;
            }
        }
    }
    shutdown.cancel();
    let _ = reporter.await;
    Ok(())
}
