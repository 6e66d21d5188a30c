//! The `amqp` section: the broker's URL, the names and arguments of what assetflow declares, the
//! reconnect backoff, and the TLS settings built into the OpenSSL connector of `amqps://`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openssl::pkey::PKey;
use openssl::ssl::{SslConnector, SslMethod, SslVersion};
use openssl::x509::X509;
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
    /// The oldest TLS version offered to the broker.
    #[serde(default)]
    pub tls_min_version: TlsVersion,
}

/// TlsVersion is `amqp.tls_min_version`: "1.2" or "1.3". A number is taken too, since the
/// environment (`ASSETFLOW_AMQP__TLS_MIN_VERSION=1.3`) and an unquoted TOML value give one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsVersion {
    #[default]
    Tls12,
    Tls13,
}

impl From<TlsVersion> for SslVersion {
    fn from(version: TlsVersion) -> SslVersion {
        match version {
            TlsVersion::Tls12 => SslVersion::TLS1_2,
            TlsVersion::Tls13 => SslVersion::TLS1_3,
        }
    }
}

impl Serialize for TlsVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        })
    }
}

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TlsVersion, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = TlsVersion;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"1.2\" or \"1.3\"")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TlsVersion, E> {
                match v {
                    "1.2" => Ok(TlsVersion::Tls12),
                    "1.3" => Ok(TlsVersion::Tls13),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<TlsVersion, E> {
                match v {
                    1.2 => Ok(TlsVersion::Tls12),
                    1.3 => Ok(TlsVersion::Tls13),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Float(v), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl AmqpConfig {
    /// AmqpConfig::uses_tls says whether the URL asks for TLS.
    pub fn uses_tls(&self) -> bool {
        self.url.trim_start().to_ascii_lowercase().starts_with("amqps://")
    }

    /// AmqpConfig::tls builds the OpenSSL connector for `amqps://`: it trusts the system's CA
    /// certificates (OpenSSL defaults) and `tls_ca_file`, presents `tls_cert_file`, and offers no
    /// TLS version older than `tls_min_version`. The files are read on every connection attempt, so
    /// a renewed certificate is picked up at the next reconnect.
    pub fn tls(&self) -> anyhow::Result<SslConnector> {
        let read = |key: &str, path: &Path| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("amqp.{key} {}: {e}", path.display()))
        };
        let mut builder = SslConnector::builder(SslMethod::tls_client())?;
        builder.set_min_proto_version(Some(self.tls_min_version.into()))?;
        if let Some(path) = &self.tls_ca_file {
            let certs = X509::stack_from_pem(&read("tls_ca_file", path)?)
                .ok()
                .filter(|certs| !certs.is_empty())
                .ok_or_else(|| anyhow::anyhow!("amqp.tls_ca_file {}: no PEM certificate in it", path.display()))?;
            for cert in certs {
                builder.cert_store_mut().add_cert(cert)?;
            }
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                let mut chain = X509::stack_from_pem(&read("tls_cert_file", cert)?)
                    .ok()
                    .filter(|certs| !certs.is_empty())
                    .ok_or_else(|| anyhow::anyhow!("amqp.tls_cert_file {}: not a PEM certificate", cert.display()))?
                    .into_iter();
                let private_key = PKey::private_key_from_pem(&read("tls_key_file", key)?).map_err(|_| {
                    anyhow::anyhow!("amqp.tls_key_file {}: not a PEM private key without a passphrase", key.display())
                })?;
                if let Some(leaf) = chain.next() {
                    builder.set_certificate(&leaf)?;
                }
                // The rest of the file is the chain up to the CA, in order.
                for intermediate in chain {
                    builder.add_extra_chain_cert(intermediate)?;
                }
                // OpenSSL refuses a key that is not the certificate's as soon as it is set.
                builder.set_private_key(&private_key).and_then(|()| builder.check_private_key()).map_err(|_| {
                    anyhow::anyhow!("amqp.tls_key_file {}: not the key of amqp.tls_cert_file", key.display())
                })?;
            }
            (None, None) => {}
            _ => anyhow::bail!("configuration: amqp.tls_cert_file and amqp.tls_key_file go together"),
        }
        Ok(builder.build())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::Config;

    fn min_version(value: serde_json::Value) -> anyhow::Result<TlsVersion> {
        Ok(Config::with_overrides(json!({"amqp": {"tls_min_version": value}}))?.amqp.tls_min_version)
    }

    #[test]
    fn tls_min_version_is_1_2_or_1_3_and_anything_else_is_refused_naming_the_key() {
        assert_eq!(Config::with_overrides(json!({})).unwrap().amqp.tls_min_version, TlsVersion::Tls12);
        assert_eq!(min_version(json!("1.2")).unwrap(), TlsVersion::Tls12);
        assert_eq!(min_version(json!("1.3")).unwrap(), TlsVersion::Tls13);
        // What the environment and an unquoted TOML value give.
        assert_eq!(min_version(json!(1.3)).unwrap(), TlsVersion::Tls13);
        let shown = Config::with_overrides(json!({"amqp": {"tls_min_version": "1.3"}})).unwrap().redacted();
        assert!(shown.contains(r#"tls_min_version = "1.3""#), "{shown}");
        for bad in [json!("1.1"), json!("1.0"), json!("TLSv1.3"), json!(""), json!(1.1), json!(13)] {
            let err = min_version(bad.clone()).unwrap_err().to_string();
            assert!(err.contains("amqp.tls_min_version") && err.contains(r#""1.2" or "1.3""#), "{bad}: {err}");
        }
    }
}
