//! Configuration: embedded defaults, then an optional file, then the environment.
//!
//! Every section denies unknown keys, so that a misspelt setting stops the start-up with a message
//! that names it instead of being silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

mod amqp;
mod redact;
mod transport;
pub mod workers;

pub use amqp::{AmqpConfig, QueueType};
pub use redact::redact_url;
pub use transport::warnings as transport_warnings;

use workers::PoolDefinitions;

/// The embedded defaults, also printed by `assetflow config --defaults`.
pub const DEFAULTS: &str = include_str!("default.toml");

/// Config is assetflow's effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub service_provider_id: String,
    pub database: DatabaseConfig,
    pub amqp: AmqpConfig,
    pub keys: KeysConfig,
    pub auth: AuthConfig,
    pub outbox: OutboxConfig,
    pub workers: WorkersConfig,
    pub http: HttpConfig,
    pub retention: RetentionConfig,
    #[serde(default)]
    pub partners: BTreeMap<String, PartnerConfig>,
    #[serde(default)]
    pub gateways: BTreeMap<String, GatewayConfig>,
    /// Issuers that send their changes of an event themselves (`issuer.change`).
    #[serde(default)]
    pub issuers: BTreeMap<String, IssuerConfig>,
    /// Cron schedules by job, overriding workers/scheduler.toml.
    #[serde(default)]
    pub schedules: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub pool_size: u32,
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(with = "humantime_serde")]
    pub freshness_window: Duration,
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    pub batch_size: u32,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long the rows a handler has just committed are left to this process's publisher
    /// before a relay may claim them; zero sends every message through the relay.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
}

/// RetentionConfig is how long bookkeeping rows are kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(with = "humantime_serde")]
    pub inbox: Duration,
    #[serde(with = "humantime_serde")]
    pub terminal_requests: Duration,
    #[serde(with = "humantime_serde")]
    pub job_runs: Duration,
}

/// PartnerConfig is one payment partner. Its instruction timeout and attempts come from the
/// settlement pool's definition unless set here.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub answer_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The RabbitMQ user the partner publishes as: its results must carry it as their AMQP
    /// `user_id` (`docs/security.md#who-may-answer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_user: Option<String>,
}

/// GatewayConfig is one gateway.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The RabbitMQ user the gateway publishes as: its receipts must carry it as their AMQP
    /// `user_id` (`docs/security.md#who-may-answer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_user: Option<String>,
}

/// IssuerConfig is an issuer that sends its changes of an event itself, as `issuer.change`
/// (`docs/product.md#issuer-changes`). An issuer that does not is not configured: an operator
/// announces its changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The RabbitMQ user the issuer publishes as: its changes must carry it as their AMQP
    /// `user_id` (`docs/security.md#who-may-answer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_user: Option<String>,
}

impl Config {
    /// Config::load layers the defaults, the file (if any) and the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        Self::figment(file).extract().map_err(|e| anyhow::anyhow!("configuration: {e}"))
    }

    /// Config::with_overrides loads the defaults and applies `overrides` on top, ignoring the
    /// environment. Tests and the simulators build their configuration this way.
    pub fn with_overrides(overrides: impl Serialize) -> anyhow::Result<Config> {
        Figment::from(Toml::string(DEFAULTS))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| anyhow::anyhow!("configuration: {e}"))
    }

    fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        let file = file.map(Path::to_path_buf).or_else(|| std::env::var_os("ASSETFLOW_CONFIG").map(PathBuf::from));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            .merge(Env::prefixed("ASSETFLOW_").ignore(&["CONFIG", "LOG", "LOG_FORMAT"]).split("__"))
            .merge(Env::raw().only(&["DATABASE_URL"]).map(|_| "database.url".into()))
            .merge(Env::raw().only(&["AMQP_URL"]).map(|_| "amqp.url".into()))
    }

    /// Config::validate checks what the types cannot: ids that become queue names, and limits.
    pub fn validate(&self) -> anyhow::Result<()> {
        for id in self.partners.keys().chain(self.gateways.keys()).chain(self.issuers.keys()) {
            anyhow::ensure!(
                is_name(id),
                "configuration: partner, gateway or issuer id {id:?} must be 1-64 characters of [A-Za-z0-9._-]"
            );
        }
        anyhow::ensure!(
            is_name(&self.amqp.prefix),
            "configuration: amqp.prefix {:?} is not a valid name",
            self.amqp.prefix
        );
        let amqp = &self.amqp;
        if amqp.tls_ca_file.is_some() || amqp.tls_cert_file.is_some() || amqp.tls_key_file.is_some() {
            anyhow::ensure!(
                amqp.uses_tls(),
                "configuration: amqp.tls_* is set but amqp.url is not amqps:// (the TLS settings would be ignored)"
            );
            amqp.tls().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        }
        anyhow::ensure!(self.amqp.delivery_limit >= 2, "configuration: amqp.delivery_limit must be at least 2");
        anyhow::ensure!(self.database.pool_size >= 2, "configuration: database.pool_size must be at least 2");
        anyhow::ensure!(self.outbox.batch_size >= 1, "configuration: outbox.batch_size must be at least 1");
        // A longer lease only delays what a killed process left behind.
        anyhow::ensure!(
            self.outbox.lease <= Duration::from_secs(600),
            "configuration: outbox.lease must be at most 10 minutes"
        );
        // Periods are added to and taken from dates: bound them so that a typo ("5000000y") is
        // refused here rather than overflowing a date in a handler or a scan.
        const CENTURY: Duration = Duration::from_secs(100 * 366 * 86_400);
        for (key, period) in [
            ("auth.freshness_window", self.auth.freshness_window),
            ("auth.max_clock_skew", self.auth.max_clock_skew),
            ("retention.inbox", self.retention.inbox),
            ("retention.terminal_requests", self.retention.terminal_requests),
            ("retention.job_runs", self.retention.job_runs),
            ("database.connection_timeout", self.database.connection_timeout),
            ("amqp.reconnect_min", self.amqp.reconnect_min),
            ("amqp.reconnect_max", self.amqp.reconnect_max),
            ("outbox.poll_interval", self.outbox.poll_interval),
            ("http.sample_interval", self.http.sample_interval),
        ] {
            anyhow::ensure!(period <= CENTURY, "configuration: {key} must be at most 100 years");
        }
        for partner in self.partners.values() {
            if let Some(timeout) = partner.answer_timeout {
                anyhow::ensure!(
                    timeout <= CENTURY,
                    "configuration: partners.*.answer_timeout must be at most 100 years"
                );
            }
        }
        self.check_broker_users()?;
        anyhow::ensure!(
            self.retention.terminal_requests > self.auth.freshness_window,
            "configuration: retention.terminal_requests must be longer than auth.freshness_window"
        );
        Ok(())
    }

    /// Config::check_broker_users refuses broker users that would prove nothing: one shared by two
    /// parties (either could answer for the other) or assetflow's own (which may publish anywhere).
    fn check_broker_users(&self) -> anyhow::Result<()> {
        let own = amqp_user(&self.amqp.url);
        let mut seen: BTreeMap<&str, String> = BTreeMap::new();
        let parties = self.partners.iter().map(|(id, p)| (format!("partners.{id}"), p.broker_user.as_deref()));
        let parties =
            parties.chain(self.gateways.iter().map(|(id, g)| (format!("gateways.{id}"), g.broker_user.as_deref())));
        let parties =
            parties.chain(self.issuers.iter().map(|(id, i)| (format!("issuers.{id}"), i.broker_user.as_deref())));
        for (party, user) in parties {
            let Some(user) = user else { continue };
            anyhow::ensure!(!user.is_empty(), "configuration: {party}.broker_user is empty");
            anyhow::ensure!(
                own.as_deref() != Some(user),
                "configuration: {party}.broker_user {user:?} is assetflow's own broker user: give the party a user of its own"
            );
            if let Some(other) = seen.insert(user, party.clone()) {
                anyhow::bail!(
                    "configuration: {other} and {party} share broker_user {user:?}: either could answer for the other; give each its own user"
                );
            }
        }
        Ok(())
    }

    /// Config::pools loads the pool and scheduler definitions from `workers.dir`.
    pub fn pools(&self) -> anyhow::Result<PoolDefinitions> {
        PoolDefinitions::load(&self.workers.dir)
    }

    /// Config::redacted renders the configuration as TOML with every password replaced.
    pub fn redacted(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = redact_url(&shown.database.url);
        shown.amqp.url = redact_url(&shown.amqp.url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// amqp_user is the user an AMQP URL connects as (`guest` when it names none, as the broker's
/// default), or None when the URL does not parse.
fn amqp_user(url: &str) -> Option<String> {
    url.parse::<lapin::uri::AMQPUri>().ok().map(|uri| uri.authority.userinfo.username)
}

/// is_name accepts ids that are safe as AMQP names, routing keys and log fields.
pub fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let config = Config::with_overrides(serde_json::json!({})).unwrap();
        config.validate().unwrap();
        assert_eq!(config.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(config.database.url, "postgres://postgres@127.0.0.1:5432/assetflow");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = Config::with_overrides(serde_json::json!({"amqp": {"prefx": "x"}})).unwrap_err();
        assert!(err.to_string().contains("prefx"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("postgres://postgres@127.0.0.1/x"), "postgres://postgres@127.0.0.1/x");
        assert_eq!(redact_url("postgres://u:p%40ss@h:1/db?sslmode=require"), "postgres://u:***@h:1/db?sslmode=require");
        let config =
            Config::with_overrides(serde_json::json!({"database": {"url": "postgres://a:secret@h/db"}})).unwrap();
        assert!(!config.redacted().contains("secret"));
    }

    #[test]
    fn tls_settings_need_amqps_and_readable_files() {
        let err = Config::with_overrides(serde_json::json!({"amqp": {"tls_ca_file": "/nonexistent/ca.pem"}}))
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("not amqps://"), "{err}");
        let config = Config::with_overrides(serde_json::json!({"amqp": {
            "url": "amqps://u:p@h:5671/%2f", "tls_ca_file": "/nonexistent/ca.pem"
        }}))
        .unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("amqp.tls_ca_file /nonexistent/ca.pem"), "{err}");
        let config = Config::with_overrides(serde_json::json!({"amqp": {
            "url": "amqps://u:p@h:5671/%2f", "tls_cert_file": "/etc/hostname"
        }}))
        .unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("go together"));
    }

    #[test]
    fn a_broker_user_proves_one_party_only() {
        let with = |parties: serde_json::Value| Config::with_overrides(parties).unwrap().validate();
        with(serde_json::json!({
            "partners": {"card-co": {"broker_user": "partner-card-co"}},
            "gateways": {"gw-1": {"broker_user": "gateway-gw-1"}, "gw-2": {}},
        }))
        .unwrap();
        let shared = with(serde_json::json!({
            "partners": {"card-co": {"broker_user": "shared"}},
            "gateways": {"gw-1": {"broker_user": "shared"}},
        }))
        .unwrap_err();
        assert!(
            shared.to_string().contains("partners.card-co and gateways.gw-1 share broker_user \"shared\""),
            "{shared}"
        );
        let own = with(serde_json::json!({"gateways": {"gw-1": {"broker_user": "guest"}}})).unwrap_err();
        assert!(own.to_string().contains("assetflow's own broker user"), "{own}");
    }
}
