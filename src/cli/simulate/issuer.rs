//! The issuer simulator: issuers that change the events of their products themselves, now and
//! then, with a signed `issuer.change` (`docs/product.md#issuer-changes`). Each change moves the
//! event a day further and gives the holders a short deadline; its default alternates between
//! accept and refund.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use diesel::prelude::*;
use tokio_util::sync::CancellationToken;

use super::Stats;
use super::publisher::ConfirmedSender;
use crate::config::Config;
use crate::contracts::messages::{IssuerChangeMessage, ModificationChoice, kinds};
use crate::contracts::topology::Names;
use crate::domain::catalogue::PartyKind;
use crate::domain::schema::products;
use crate::runtime::broker::Broker;

#[derive(Debug, Clone, clap::Args)]
pub struct IssuerOptions {
    /// Issuers to act as (repeatable); the default is every configured issuer.
    #[arg(long = "issuer")]
    pub issuers: Vec<String>,
    /// How often each issuer changes one of its products' events.
    #[arg(long = "issuer-change-every", value_parser = humantime::parse_duration, default_value = "30s")]
    pub every: Duration,
    /// When the first change comes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub first_change_after: Duration,
    /// How long the holders have to answer a change.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub reply_within: Duration,
    /// Where the simulated issuers' signing keys are (made and registered when missing).
    #[arg(long, default_value_os_t = super::default_party_keys_dir())]
    pub party_keys: std::path::PathBuf,
}

impl Default for IssuerOptions {
    fn default() -> Self {
        IssuerOptions {
            issuers: Vec::new(),
            every: Duration::from_secs(30),
            first_change_after: Duration::from_secs(5),
            reply_within: Duration::from_secs(20),
            party_keys: super::default_party_keys_dir(),
        }
    }
}

/// Event is a product of an issuer, as a change of its event reads it.
#[derive(Debug, Queryable)]
struct Event {
    id: String,
    title: String,
    tags: serde_json::Value,
}

/// change is an issuer's `n`th change, of `event`: the event moves `n` days later.
fn change(issuer: &str, n: u64, event: &Event, reply_within: Duration) -> IssuerChangeMessage {
    let Event { id, title, tags } = event;
    let mut tags = tags.clone();
    let date = format!("moved {n} day(s) later");
    if let Some(map) = tags.as_object_mut() {
        map.insert("date".into(), serde_json::json!(date));
    }
    let now = Utc::now();
    IssuerChangeMessage {
        message_type: kinds::ISSUER_CHANGE.into(),
        reference: format!("sim-{}", uuid::Uuid::now_v7()),
        issuer_id: issuer.into(),
        sent_at: now,
        product_id: id.clone(),
        description: format!("{title}: the event is {date}."),
        title: None,
        tags: Some(tags),
        asset_expires_at: None,
        reply_by: now + chrono::Duration::from_std(reply_within).unwrap_or(chrono::Duration::seconds(20)),
        default_answer: if n.is_multiple_of(2) { ModificationChoice::Refund } else { ModificationChoice::Accept },
        signature: None,
    }
}

/// send sends `issuer`'s `n`th change, of one of its products in turn; false when it has none.
async fn send(
    config: &Config,
    publisher: &ConfirmedSender,
    names: &Names,
    issuer: &str,
    key: &openssl::pkey::PKey<openssl::pkey::Private>,
    n: u64,
    reply_within: Duration,
) -> anyhow::Result<bool> {
    let (url, who) = (config.database.url.clone(), issuer.to_string());
    let events: Vec<Event> = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Event>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(products::table
            .filter(products::issuer_id.eq(&who))
            .filter(products::on_sale.eq(true))
            .order(products::id)
            .select((products::id, products::title, products::tags))
            .load(&mut conn)?)
    })
    .await??;
    let Some(event) = events.get((n as usize) % events.len().max(1)) else { return Ok(false) };
    let body = super::partner::signed(&change(issuer, n, event, reply_within), key);
    publisher.publish(&names.requests(), kinds::ISSUER_CHANGE, kinds::ISSUER_CHANGE, &body).await?;
    Ok(true)
}

pub async fn run_owned(
    config: Config,
    broker: Broker,
    options: IssuerOptions,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run(&config, broker, options, stats, shutdown).await
}

/// run sends, every `options.every`, one change from each issuer, of its products in turn.
pub async fn run(
    config: &Config,
    broker: Broker,
    options: IssuerOptions,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let names = Names { prefix: config.amqp.prefix.clone() };
    let issuers = super::acting_as(&options.issuers, &config.issuers, "issuers")?;
    let mut keys = Vec::new();
    for issuer in &issuers {
        // Its changes are signed: assetflow takes a change only from the product's issuer.
        keys.push(super::party_key(config, PartyKind::Issuer, issuer, &options.party_keys).await?);
    }
    let publisher = ConfirmedSender::new(broker);
    let mut wait = options.first_change_after;
    for n in 1.. {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = options.every;
        for (issuer, key) in issuers.iter().zip(&keys) {
            // A database or broker that is away (a restart) costs this round's change, not the
            // simulator: the next round tries again.
            match send(config, &publisher, &names, issuer, key, n, options.reply_within).await {
                Ok(true) => {
                    stats.issuer_changes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, issuer, "issuer simulator could not send a change"),
            }
        }
    }
    Ok(())
}
