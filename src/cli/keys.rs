//! `assetflow keys`: the service provider's and the issuers' signing keys, and the public keys
//! terminals verify what assetflow signs with (`docs/security.md#keys`).

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::config::Config;
use crate::crypto::{self, KeyRing};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write development keys: the service provider's and one per issuer, under keys.dir.
    Generate {
        /// An issuer to make a key for (repeatable).
        #[arg(long = "issuer")]
        issuers: Vec<String>,
        /// Replace keys that already exist.
        #[arg(long)]
        force: bool,
    },
    /// Replace the service provider key. Its public half is kept in retired/, so certificates it
    /// signed still verify. Restart assetflow to use the new key.
    Rotate,
    /// Write the public keys terminals verify issued documents with: the service provider's,
    /// current and retired, and each issuer's, each with the key id documents name it by.
    Publish {
        /// jwks (a JSON Web Key Set) or pem (a bundle, each key after a comment line naming it).
        #[arg(long, value_enum, default_value_t = Format::Jwks)]
        format: Format,
        /// Write here instead of to standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

/// Format is how `keys publish` writes the keys.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Jwks,
    Pem,
}

pub fn run(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Generate { issuers, force } => {
            let written = KeyRing::generate(&config.keys.dir, &issuers, force)?;
            if written.is_empty() {
                println!("the keys already exist in {} (use --force to replace them)", config.keys.dir.display());
            }
            for path in written {
                println!("wrote {}", path.display());
            }
        }
        KeysCommand::Rotate => {
            let retired = KeyRing::rotate_provider(&config.keys.dir)?;
            println!(
                "retired the provider key to {}; wrote a new provider.pem; restart assetflow to sign with it",
                retired.display()
            );
        }
        KeysCommand::Publish { format, output } => {
            let ring = KeyRing::load(&config.keys.dir)?;
            let text = match format {
                Format::Jwks => serde_json::to_string_pretty(&jwks(&ring, &config.service_provider_id)?)? + "\n",
                Format::Pem => pem_bundle(&ring)?,
            };
            match output {
                Some(path) => {
                    std::fs::write(&path, text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{text}"),
            }
        }
    }
    Ok(())
}

/// jwks is the ring's public keys as a JSON Web Key Set (RFC 7517): each key with its `kid` (the
/// key id signed documents carry), `use` "sig", `alg` "ES256", and assetflow's own members saying
/// whose it is (`assetflow_role`: provider or issuer; `assetflow_issuer_id`) and whether it signs
/// now (`assetflow_status`: current, or retired: what it signed still verifies).
pub fn jwks(ring: &KeyRing, service_provider_id: &str) -> anyhow::Result<Value> {
    let mut keys = Vec::new();
    for published in ring.published()? {
        let mut jwk = crypto::public_jwk(&published.key)?;
        jwk["kid"] = json!(published.key_id);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!("ES256");
        jwk["assetflow_role"] = json!(published.role);
        jwk["assetflow_status"] = json!(published.status);
        if let Some(issuer) = published.issuer_id {
            jwk["assetflow_issuer_id"] = json!(issuer);
        }
        keys.push(jwk);
    }
    Ok(json!({"service_provider_id": service_provider_id, "keys": keys}))
}

/// pem_bundle is the ring's public keys as PEM, each after a comment line with its key id, role
/// and status (PEM readers skip text outside the markers).
fn pem_bundle(ring: &KeyRing) -> anyhow::Result<String> {
    let mut text = String::new();
    for published in ring.published()? {
        let issuer = published.issuer_id.map(|id| format!(" issuer={id}")).unwrap_or_default();
        text.push_str(&format!(
            "# kid={} role={}{issuer} status={}\n",
            published.key_id, published.role, published.status
        ));
        text.push_str(std::str::from_utf8(&published.key.public_key_to_pem()?)?);
    }
    Ok(text)
}
