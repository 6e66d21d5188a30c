//! `assetflow parties`: the partners, gateways and issuers that send assetflow what they must
//! prove they sent, and how each proves who it is (`docs/security.md#who-may-answer`): by its
//! broker user (`broker_user` in the configuration), by the key it signs with (registered here),
//! or both.

use std::path::PathBuf;

use clap::Subcommand;
use diesel::prelude::*;

use super::admin::{read_small_text, with_db};
use crate::config::Config;
use crate::crypto;
use crate::domain::catalogue::{PartyKind, register_party_key};
use crate::domain::schema::{gateways, issuers, partners};

#[derive(Debug, Subcommand)]
pub enum PartiesCommand {
    /// Register the public key a partner, a gateway or an issuer signs what it sends with: a PEM
    /// file, which may hold two keys while one replaces the other. What it sends must then be
    /// signed.
    #[command(group = clap::ArgGroup::new("party").required(true))]
    Key {
        /// The partner, as configured in [partners].
        #[arg(long, group = "party")]
        partner: Option<String>,
        /// The gateway, as configured in [gateways].
        #[arg(long, group = "party")]
        gateway: Option<String>,
        /// The issuer, as configured in [issuers].
        #[arg(long, group = "party")]
        issuer: Option<String>,
        /// The PEM public key (or keys).
        #[arg(long, required_unless_present = "remove")]
        public_key: Option<PathBuf>,
        /// Remove the registered key: the party is then known by its broker user alone.
        #[arg(long, conflicts_with = "public_key")]
        remove: bool,
    },
    /// List the partners, gateways and issuers and what proves each of them.
    List,
}

pub async fn run(config: &Config, command: PartiesCommand) -> anyhow::Result<()> {
    match command {
        PartiesCommand::Key { partner, gateway, issuer, public_key, remove } => {
            let (kind, id) = match (partner, gateway, issuer) {
                (Some(id), None, None) => (PartyKind::Partner, id),
                (None, Some(id), None) => (PartyKind::Gateway, id),
                (None, None, Some(id)) => (PartyKind::Issuer, id),
                _ => anyhow::bail!("give one of --partner, --gateway or --issuer"),
            };
            let configured = match kind {
                PartyKind::Partner => config.partners.contains_key(&id),
                PartyKind::Gateway => config.gateways.contains_key(&id),
                PartyKind::Issuer => config.issuers.contains_key(&id),
            };
            anyhow::ensure!(configured, "{} {id:?} is not configured (see [{}s])", kind.as_str(), kind.as_str());
            let pem = match public_key {
                Some(path) if !remove => {
                    let pem = read_small_text(&path)?;
                    let keys = crypto::parse_public_keys(&pem)
                        .map_err(|e| anyhow::anyhow!("--public-key {}: {e}", path.display()))?;
                    let ids = keys.iter().map(|k| crypto::key_id(k)).collect::<Result<Vec<_>, _>>()?;
                    println!("{} {id}: registered key {}", kind.as_str(), ids.join(", "));
                    Some(pem)
                }
                _ => {
                    println!("{} {id}: its key is removed; it is known by its broker user alone", kind.as_str());
                    None
                }
            };
            with_db(config, move |conn| Ok(register_party_key(conn, kind, &id, pem.as_deref())?)).await?;
        }
        PartiesCommand::List => {
            let (partner_keys, gateway_keys, issuer_keys) = with_db(config, |conn| {
                let partner_keys: Vec<(String, Option<String>)> =
                    partners::table.select((partners::id, partners::public_key_pem)).load(conn)?;
                let gateway_keys: Vec<(String, Option<String>)> =
                    gateways::table.select((gateways::id, gateways::public_key_pem)).load(conn)?;
                let issuer_keys: Vec<(String, Option<String>)> =
                    issuers::table.select((issuers::id, issuers::public_key_pem)).load(conn)?;
                Ok((partner_keys, gateway_keys, issuer_keys))
            })
            .await?;
            let key = |keys: &[(String, Option<String>)], id: &str| {
                keys.iter().find(|(k, _)| k == id).and_then(|(_, pem)| pem.clone())
            };
            println!("{:<8} {:<24} {:<28} key ids", "party", "id", "broker user");
            let partners =
                config.partners.iter().map(|(id, p)| ("partner", id, p.broker_user.as_deref(), key(&partner_keys, id)));
            let gateways =
                config.gateways.iter().map(|(id, g)| ("gateway", id, g.broker_user.as_deref(), key(&gateway_keys, id)));
            let issuers =
                config.issuers.iter().map(|(id, i)| ("issuer", id, i.broker_user.as_deref(), key(&issuer_keys, id)));
            for (kind, id, user, pem) in partners.chain(gateways).chain(issuers) {
                let ids = match pem.as_deref().map(crypto::parse_public_keys) {
                    Some(Ok(keys)) => keys.iter().filter_map(|k| crypto::key_id(k).ok()).collect::<Vec<_>>().join(", "),
                    Some(Err(e)) => format!("(unusable: {e})"),
                    None => "-".into(),
                };
                let user = user.unwrap_or("-");
                let warning =
                    if user == "-" && ids == "-" { "   <- proves nothing: its answers are refused" } else { "" };
                println!("{kind:<8} {id:<24} {user:<28} {ids}{warning}");
            }
        }
    }
    Ok(())
}
