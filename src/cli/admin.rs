//! Operator commands for keys, terminals and products.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use diesel::prelude::*;

use crate::config::Config;
use crate::crypto;
use crate::domain::catalogue::{Product, upsert_product};
use crate::domain::schema::{products, terminals};

#[derive(Debug, Subcommand)]
pub enum TerminalsCommand {
    /// Register a terminal with its public key (or a new key pair).
    Register {
        #[arg(long)]
        id: String,
        /// mobile, stationary, pos or gate.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        gateway: String,
        /// The payment partner that settles what this terminal pays for.
        #[arg(long)]
        partner: Option<String>,
        /// The terminal's PEM public key.
        #[arg(long, conflicts_with = "generate_key")]
        public_key: Option<PathBuf>,
        /// Make a new key pair and write the private key here (development and simulation).
        #[arg(long)]
        generate_key: Option<PathBuf>,
        /// As a payer, it waives confirmation of the orders other terminals bill to it.
        #[arg(long)]
        waives_confirmation: bool,
    },
    /// List the registered terminals.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ProductsCommand {
    /// Add or replace a product.
    Add(Box<ProductArgs>),
    /// Sell a product by booking (receipt certificates), under a condition.
    Booking {
        #[arg(long)]
        product: String,
        /// hold (held until the certificate expires), lottery or threshold.
        #[arg(long)]
        condition: String,
        /// A lottery's winners, or a threshold sale's applicants needed.
        #[arg(long)]
        places: Option<i32>,
        /// When the lottery is drawn, or the threshold sale closes (RFC 3339).
        #[arg(long)]
        decided_at: Option<DateTime<Utc>>,
        /// How long a winner (or whoever a lapsed place passes to) has to submit.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1day")]
        window: std::time::Duration,
    },
    /// Announce an issuer's change of a product's event: every holder of an asset not yet
    /// delivered gets a modification notice, and answers accept or refund by the deadline.
    Change {
        #[arg(long)]
        product: String,
        /// What changed, in words for the holders.
        #[arg(long)]
        description: String,
        /// The product's new title, from now on.
        #[arg(long)]
        title: Option<String>,
        /// The product's new tags (a JSON object: the event's date, place...), from now on.
        #[arg(long)]
        tags: Option<String>,
        /// The event's new end: its assets' new term.
        #[arg(long)]
        asset_expires_at: Option<DateTime<Utc>>,
        /// The holders' deadline to answer (RFC 3339).
        #[arg(long)]
        reply_by: DateTime<Utc>,
        /// What an unanswered notice gets at the deadline: accept or refund.
        #[arg(long)]
        default: String,
    },
    /// List the products.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct ProductArgs {
    #[arg(long)]
    pub id: String,
    /// prepaid_card, ticket, ppv_ticket or coupon.
    #[arg(long)]
    pub kind: String,
    #[arg(long)]
    pub title: String,
    #[arg(long)]
    pub issuer: String,
    /// The price in minor units (for example 1500 for JPY 1,500 or 1500 cents).
    #[arg(long)]
    pub price_minor: i64,
    #[arg(long)]
    pub currency: String,
    /// Stored value of a prepaid card, in minor units.
    #[arg(long)]
    pub value_minor: Option<i64>,
    /// Uses of a ticket or coupon.
    #[arg(long)]
    pub uses: Option<i32>,
    /// The asset's validity from issue, such as 90d.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub asset_validity: Option<std::time::Duration>,
    /// A fixed end of the asset's term (RFC 3339), such as a concert's end.
    #[arg(long)]
    pub asset_expires_at: Option<DateTime<Utc>>,
    /// The exchange certificate's validity from issue, such as 30d.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub certificate_validity: Option<std::time::Duration>,
    /// A fixed certificate expiry (RFC 3339).
    #[arg(long)]
    pub certificate_expires_at: Option<DateTime<Utc>>,
    /// Stage-1 reminder, before the certificate expires.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2d")]
    pub reminder_stage1: std::time::Duration,
    /// Stage-2 reminder (download request or forced transmission), before the certificate expires.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1d")]
    pub reminder_stage2: std::time::Duration,
    /// download_request or forced_transmission.
    #[arg(long, default_value = "download_request")]
    pub stage2_policy: String,
    #[arg(long)]
    pub transferable: bool,
    /// Add it, but not on sale.
    #[arg(long)]
    pub off_sale: bool,
    /// Tagged information as a JSON object: title, date, place, seat class, conditions.
    #[arg(long, default_value = "{}")]
    pub tags: String,
    /// What completes a delivery of its certificates and assets: terminal (the terminal's signed
    /// acknowledgement, relayed in the receipt) or gateway (the gateway's receipt alone, for
    /// terminals that cannot sign).
    #[arg(long, default_value = "terminal")]
    pub proof_of_delivery: String,
    /// How long a payer other than the orderer has to confirm an order, such as 15m.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15m")]
    pub confirmation_window: std::time::Duration,
    /// Its orders need no confirmation by a payer other than the orderer.
    #[arg(long)]
    pub confirmation_waived: bool,
}

impl ProductArgs {
    /// ProductArgs::into_product checks the arguments and builds the product.
    pub fn into_product(self) -> anyhow::Result<Product> {
        anyhow::ensure!(
            ["prepaid_card", "ticket", "ppv_ticket", "coupon"].contains(&self.kind.as_str()),
            "--kind must be prepaid_card, ticket, ppv_ticket or coupon"
        );
        anyhow::ensure!(self.price_minor >= 0, "--price-minor must not be negative");
        anyhow::ensure!(self.value_minor.is_none_or(|v| v >= 0), "--value-minor must not be negative");
        anyhow::ensure!(self.uses.is_none_or(|u| u >= 1), "--uses must be at least 1");
        anyhow::ensure!(
            self.currency.len() == 3 && self.currency.bytes().all(|b| b.is_ascii_uppercase()),
            "--currency must be an ISO 4217 code of three capital letters, such as JPY"
        );
        anyhow::ensure!(
            ["download_request", "forced_transmission"].contains(&self.stage2_policy.as_str()),
            "--stage2-policy must be download_request or forced_transmission"
        );
        anyhow::ensure!(
            ["terminal", "gateway"].contains(&self.proof_of_delivery.as_str()),
            "--proof-of-delivery must be terminal or gateway"
        );
        // Terms are added to the time of issue later, in the issuance pool: bound them here, so that
        // an operator's typo is refused now instead of overflowing a date there.
        let asset_validity = self.asset_validity.map(|d| term_secs("--asset-validity", d)).transpose()?;
        let certificate_validity =
            self.certificate_validity.map(|d| term_secs("--certificate-validity", d)).transpose()?;
        let reminder_stage1 = term_secs("--reminder-stage1", self.reminder_stage1)?;
        let reminder_stage2 = term_secs("--reminder-stage2", self.reminder_stage2)?;
        let confirmation_window = term_secs("--confirmation-window", self.confirmation_window)?;
        anyhow::ensure!(reminder_stage1 > reminder_stage2, "--reminder-stage1 must be longer than --reminder-stage2");
        anyhow::ensure!(
            self.asset_validity.is_some() || self.asset_expires_at.is_some(),
            "give --asset-validity or --asset-expires-at"
        );
        anyhow::ensure!(
            self.certificate_validity.is_some() || self.certificate_expires_at.is_some(),
            "give --certificate-validity or --certificate-expires-at"
        );
        let tags: serde_json::Value =
            serde_json::from_str(&self.tags).map_err(|e| anyhow::anyhow!("--tags is not JSON: {e}"))?;
        anyhow::ensure!(tags.is_object(), "--tags must be a JSON object");
        Ok(Product {
            id: self.id,
            kind: self.kind,
            title: self.title,
            issuer_id: self.issuer,
            price_minor: self.price_minor,
            currency: self.currency,
            value_minor: self.value_minor,
            uses: self.uses,
            asset_expires_at: self.asset_expires_at,
            asset_validity_secs: asset_validity,
            certificate_expires_at: self.certificate_expires_at,
            certificate_validity_secs: certificate_validity,
            reminder_stage1_secs: reminder_stage1,
            reminder_stage2_secs: reminder_stage2,
            stage2_policy: self.stage2_policy,
            transferable: self.transferable,
            on_sale: !self.off_sale,
            tags,
            proof_of_delivery: self.proof_of_delivery,
            confirmation_window_secs: confirmation_window,
            confirmation_waived: self.confirmation_waived,
        })
    }
}

/// read_small_text reads a PEM file given on the command line, refusing anything larger than a key
/// could be (a wrong path such as /dev/zero must not fill the memory).
pub(crate) fn read_small_text(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read;
    const LIMIT: u64 = 64 * 1024;
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("--public-key {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow::anyhow!("--public-key {}: {e}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= LIMIT,
        "--public-key {}: larger than 64 KiB, not a public key",
        path.display()
    );
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("--public-key {}: not a PEM text file", path.display()))
}

/// The longest term a product may give an asset, a certificate or a reminder: 100 years.
const MAX_TERM_SECS: u64 = 100 * 366 * 86_400;

/// term_secs checks a term given on the command line: at least a second, at most 100 years.
fn term_secs(flag: &str, term: std::time::Duration) -> anyhow::Result<i64> {
    let secs = term.as_secs();
    anyhow::ensure!(secs >= 1, "{flag} must be at least 1s");
    anyhow::ensure!(secs <= MAX_TERM_SECS, "{flag} must be at most 100 years");
    Ok(secs as i64)
}

pub(crate) async fn with_db<T: Send + 'static>(
    config: &Config,
    f: impl FnOnce(&mut PgConnection) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let url = config.database.url.clone();
    let partners: Vec<String> = config.partners.keys().cloned().collect();
    let gateways: Vec<String> = config.gateways.keys().cloned().collect();
    let issuers: Vec<String> = config.issuers.keys().cloned().collect();
    tokio::task::spawn_blocking(move || {
        crate::runtime::db::prepare(&url)?;
        let mut conn = crate::runtime::db::establish(&url)?;
        crate::domain::catalogue::sync_parties(&mut conn, &partners, &gateways, &issuers)?;
        f(&mut conn)
    })
    .await?
}

/// register_terminal records a terminal; used by the CLI and the simulators.
pub fn register_terminal(
    conn: &mut PgConnection,
    id: &str,
    kind: &str,
    gateway: &str,
    partner: Option<&str>,
    public_key_pem: &str,
) -> anyhow::Result<()> {
    crypto::parse_public_key(public_key_pem)?;
    diesel::insert_into(terminals::table)
        .values((
            terminals::id.eq(id),
            terminals::kind.eq(kind),
            terminals::gateway_id.eq(gateway),
            terminals::partner_id.eq(partner),
            terminals::public_key_pem.eq(public_key_pem),
        ))
        .on_conflict(terminals::id)
        .do_update()
        .set((
            terminals::kind.eq(kind),
            terminals::gateway_id.eq(gateway),
            terminals::partner_id.eq(partner),
            terminals::public_key_pem.eq(public_key_pem),
        ))
        .execute(conn)
        .map_err(|e| anyhow::anyhow!("cannot register terminal {id}: {e}"))?;
    Ok(())
}

/// waive_confirmation records whether a registered terminal, as a payer, waives confirmation of
/// the orders other terminals bill to it (`docs/product.md#payer-confirmation`).
pub fn waive_confirmation(conn: &mut PgConnection, id: &str, waives: bool) -> anyhow::Result<()> {
    let changed = diesel::update(terminals::table.find(id))
        .set(terminals::waives_confirmation.eq(waives))
        .execute(conn)
        .map_err(|e| anyhow::anyhow!("cannot change terminal {id}: {e}"))?;
    anyhow::ensure!(changed == 1, "terminal {id} is not registered");
    Ok(())
}

pub async fn terminals(config: &Config, command: TerminalsCommand) -> anyhow::Result<()> {
    match command {
        TerminalsCommand::Register { id, kind, gateway, partner, public_key, generate_key, waives_confirmation } => {
            anyhow::ensure!(crate::config::is_name(&id), "--id must be 1-64 characters of [A-Za-z0-9._-]");
            anyhow::ensure!(
                ["mobile", "stationary", "pos", "gate"].contains(&kind.as_str()),
                "--kind must be mobile, stationary, pos or gate"
            );
            anyhow::ensure!(
                config.gateways.contains_key(&gateway),
                "gateway {gateway:?} is not configured (see [gateways] in the configuration)"
            );
            if let Some(p) = &partner {
                anyhow::ensure!(
                    config.partners.contains_key(p),
                    "partner {p:?} is not configured (see [partners] in the configuration)"
                );
            }
            let pem = match (public_key, generate_key) {
                (Some(path), None) => {
                    let pem = read_small_text(&path)?;
                    crypto::parse_public_key(&pem)
                        .map_err(|e| anyhow::anyhow!("--public-key {}: {e}", path.display()))?;
                    pem
                }
                (None, Some(out)) => {
                    let key = crypto::generate_key_pair()?;
                    crypto::write_private_key(&out, &key.private_key_to_pem_pkcs8()?)?;
                    println!("wrote the private key to {}", out.display());
                    crypto::public_key_pem(&key)?
                }
                _ => anyhow::bail!("give --public-key FILE or --generate-key FILE"),
            };
            let id2 = id.clone();
            with_db(config, move |conn| {
                register_terminal(conn, &id2, &kind, &gateway, partner.as_deref(), &pem)?;
                waive_confirmation(conn, &id2, waives_confirmation)
            })
            .await?;
            println!("registered terminal {id}");
        }
        TerminalsCommand::List => {
            let rows: Vec<(String, String, String, Option<String>)> = with_db(config, |conn| {
                Ok(terminals::table
                    .order(terminals::id)
                    .select((terminals::id, terminals::kind, terminals::gateway_id, terminals::partner_id))
                    .load(conn)?)
            })
            .await?;
            println!("{:<24} {:<11} {:<16} PARTNER", "ID", "KIND", "GATEWAY");
            for (id, kind, gateway, partner) in rows {
                println!("{id:<24} {kind:<11} {gateway:<16} {}", partner.unwrap_or_else(|| "-".into()));
            }
        }
    }
    Ok(())
}

/// announce_change records an issuer's change and its modification notices, and writes the
/// notices' deliveries to the outbox, in one transaction: a running `assetflow run` sends them.
/// It returns the change's id and the number of notices.
pub fn announce_change(
    conn: &mut PgConnection,
    deliveries: &crate::domain::delivery::Deliveries,
    change: &crate::domain::issuance::modification::IssuerChange,
) -> anyhow::Result<(uuid::Uuid, usize)> {
    let now = Utc::now();
    Ok(conn.transaction(|conn| {
        let mut sending = Vec::new();
        let announced = crate::domain::issuance::modification::announce(conn, deliveries, change, now, &mut sending)?
            .expect("an operator's change has no reference to be taken already");
        crate::runtime::outbox::enqueue_all(conn, &sending)?;
        Ok::<_, diesel::result::Error>(announced)
    })?)
}

pub async fn products(config: &Config, command: ProductsCommand) -> anyhow::Result<()> {
    match command {
        ProductsCommand::Booking { product, condition, places, decided_at, window } => {
            use crate::domain::bookings::{Condition, Terms, save_terms};
            let parsed = Condition::parse(&condition)
                .ok_or_else(|| anyhow::anyhow!("--condition must be hold, lottery or threshold, not {condition:?}"))?;
            anyhow::ensure!(
                parsed == Condition::Hold || (places.is_some() && decided_at.is_some()),
                "a {condition} needs --places and --decided-at"
            );
            let terms = Terms {
                product_id: product.clone(),
                condition,
                places,
                decided_at,
                window_secs: i64::try_from(window.as_secs()).unwrap_or(i64::MAX).max(1),
            };
            with_db(config, move |conn| Ok(save_terms(conn, &terms)?)).await?;
            println!("product {product} is sold by booking");
        }
        ProductsCommand::Change { product, description, title, tags, asset_expires_at, reply_by, default } => {
            use crate::contracts::messages::ModificationChoice;
            use crate::domain::issuance::modification::{Announcer, IssuerChange};
            let default_answer = ModificationChoice::parse(&default)
                .ok_or_else(|| anyhow::anyhow!("--default must be accept or refund, not {default:?}"))?;
            let tags =
                tags.map(|t| serde_json::from_str(&t)).transpose().map_err(|e| anyhow::anyhow!("--tags: {e}"))?;
            let change = IssuerChange {
                announcer: Announcer::Operator,
                product_id: product,
                description,
                title,
                tags,
                asset_expires_at,
                reply_by,
                default_answer,
            };
            change.check(Utc::now()).map_err(|e| anyhow::anyhow!("--reply-by, --asset-expires-at: {e}"))?;
            let app = crate::service::app::App::for_operations(config.clone())?;
            let deliveries = app.domain.deliveries.clone();
            let (id, notices) = with_db(config, move |conn| announce_change(conn, &deliveries, &change)).await?;
            println!("issuer change {id}: {notices} holders notified (sent by a running assetflow)");
        }
        ProductsCommand::Add(args) => {
            let product = args.into_product()?;
            let id = product.id.clone();
            with_db(config, move |conn| Ok(upsert_product(conn, &product)?)).await?;
            println!("product {id} saved");
        }
        ProductsCommand::List { json } => {
            let rows: Vec<Product> = with_db(config, |conn| {
                Ok(products::table.order(products::id).select(Product::as_select()).load(conn)?)
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<20} {:<12} {:>12} {:<4} {:<8} TITLE", "ID", "KIND", "PRICE", "CUR", "ON SALE");
                for p in rows {
                    println!(
                        "{:<20} {:<12} {:>12} {:<4} {:<8} {}",
                        p.id,
                        p.kind,
                        p.price_minor,
                        p.currency,
                        if p.on_sale { "yes" } else { "no" },
                        p.title
                    );
                }
            }
        }
    }
    Ok(())
}
