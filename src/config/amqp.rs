//! The `amqp` section: the broker's URL, the names and arguments of what assetflow declares, the
//! reconnect backoff, and the TLS files read into lapin's settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    pub url: String,
    pub prefix: String,
    pub queue_type: QueueType,
    pub delivery_limit: u32,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// A PEM file of CA certificates trusted for `amqps://`, in addition to the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// A PEM client certificate (with its chain) for mutual TLS; needs `tls_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key (PKCS#8, no passphrase) of `tls_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl AmqpConfig {
    /// AmqpConfig::uses_tls says whether the URL asks for TLS.
    pub fn uses_tls(&self) -> bool {
        self.url.trim_start().to_ascii_lowercase().starts_with("amqps://")
    }

    /// AmqpConfig::tls reads the CA and client certificate files into lapin's TLS settings. The
    /// files are read on every connection attempt, so a renewed certificate is picked up at the
    /// next reconnect. With no files set, the system trust store (OpenSSL defaults) is used.
    pub fn tls(&self) -> anyhow::Result<lapin::tcp::OwnedTLSConfig> {
        let read = |key: &str, path: &Path| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("amqp.{key} {}: {e}", path.display()))
        };
        let cert_chain = match &self.tls_ca_file {
            Some(path) => {
                let pem = read("tls_ca_file", path)?;
                openssl::x509::X509::stack_from_pem(&pem)
                    .ok()
                    .filter(|certs| !certs.is_empty())
                    .ok_or_else(|| anyhow::anyhow!("amqp.tls_ca_file {}: no PEM certificate in it", path.display()))?;
                Some(
                    String::from_utf8(pem)
                        .map_err(|_| anyhow::anyhow!("amqp.tls_ca_file {}: not a PEM text file", path.display()))?,
                )
            }
            None => None,
        };
        let identity = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                let pem = read("tls_cert_file", cert)?;
                openssl::x509::X509::from_pem(&pem)
                    .map_err(|_| anyhow::anyhow!("amqp.tls_cert_file {}: not a PEM certificate", cert.display()))?;
                let key_pem = read("tls_key_file", key)?;
                openssl::pkey::PKey::private_key_from_pem(&key_pem).map_err(|_| {
                    anyhow::anyhow!("amqp.tls_key_file {}: not a PEM private key without a passphrase", key.display())
                })?;
                Some(lapin::tcp::OwnedIdentity::PKCS8 { pem, key: key_pem })
            }
            (None, None) => None,
            _ => anyhow::bail!("configuration: amqp.tls_cert_file and amqp.tls_key_file go together"),
        };
        Ok(lapin::tcp::OwnedTLSConfig { identity, cert_chain })
    }
}
