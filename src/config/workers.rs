//! Pool and scheduler definitions, loaded from `workers/` at start-up.
//!
//! The files are also compiled in, so a binary run outside the repository still has them; a file
//! present in `workers.dir` wins over its built-in copy.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const BUILT_IN: &[(&str, &str)] = &[
    ("settlement.toml", include_str!("../../workers/settlement.toml")),
    ("issuance.toml", include_str!("../../workers/issuance.toml")),
    ("delivery.toml", include_str!("../../workers/delivery.toml")),
    ("scheduler.toml", include_str!("../../workers/scheduler.toml")),
];

/// PoolSettings is what every pool definition has.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    pub queues: Vec<String>,
    pub concurrency: usize,
    pub prefetch: u16,
    /// The most messages handled in one transaction. Messages that are already waiting when a
    /// handler is free are taken together, so batches grow only under load.
    #[serde(default = "one")]
    pub batch: usize,
    /// How long a handler waits for more messages before it starts a batch smaller than `batch`,
    /// when messages are arriving closer together than this. Zero never waits.
    #[serde(default, with = "humantime_serde")]
    pub linger: Duration,
    #[serde(default, deserialize_with = "durations")]
    #[serde(serialize_with = "serialize_durations")]
    pub handler_retries: Vec<Duration>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettlementPool {
    pub pool: PoolSettings,
    pub instruction: InstructionPolicy,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructionPolicy {
    #[serde(with = "humantime_serde")]
    pub answer_timeout: Duration,
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuancePool {
    pub pool: PoolSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryPool {
    pub pool: PoolSettings,
    pub transmission: TransmissionPolicy,
}

/// TransmissionPolicy is the retry policy of deliveries to terminals.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransmissionPolicy {
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    #[serde(deserialize_with = "durations", serialize_with = "serialize_durations")]
    pub schedule: Vec<Duration>,
    pub jitter: f64,
    pub max_attempts: u32,
    /// Overrides by delivery kind (certificate, asset, message, download_request,
    /// revocation_request, refusal).
    #[serde(default)]
    pub kinds: BTreeMap<String, KindPolicy>,
    /// Overrides by the kind of the receiving terminal (mobile, stationary, pos, gate), which win
    /// over the delivery kind's: a stationary terminal may be offline for days, and everything
    /// sent to it is worth waiting for.
    #[serde(default)]
    pub terminal_kinds: BTreeMap<String, KindPolicy>,
}

/// KindPolicy overrides the transmission policy for one kind of delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindPolicy {
    #[serde(default, deserialize_with = "optional_durations", serialize_with = "serialize_optional_durations")]
    pub schedule: Option<Vec<Duration>>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
}

impl TransmissionPolicy {
    /// TransmissionPolicy::overrides are the overrides that apply, the most specific first.
    fn overrides<'p>(&'p self, kind: &str, terminal_kind: Option<&str>) -> impl Iterator<Item = &'p KindPolicy> {
        terminal_kind.and_then(|t| self.terminal_kinds.get(t)).into_iter().chain(self.kinds.get(kind))
    }

    /// TransmissionPolicy::schedule_for is the retry schedule of a delivery kind to a terminal
    /// kind.
    pub fn schedule_for(&self, kind: &str, terminal_kind: Option<&str>) -> &[Duration] {
        self.overrides(kind, terminal_kind).find_map(|k| k.schedule.as_deref()).unwrap_or(&self.schedule)
    }

    /// TransmissionPolicy::max_attempts_for is the attempts allowed for a delivery kind to a
    /// terminal kind.
    pub fn max_attempts_for(&self, kind: &str, terminal_kind: Option<&str>) -> u32 {
        self.overrides(kind, terminal_kind).find_map(|k| k.max_attempts).unwrap_or(self.max_attempts)
    }

    /// TransmissionPolicy::horizon is how long a delivery kind to a terminal kind is retried at
    /// the least, from its first attempt to its last: every wait of the schedule before the last
    /// attempt, each shortened by the jitter as much as it may be.
    pub fn horizon(&self, kind: &str, terminal_kind: Option<&str>) -> Duration {
        let schedule = self.schedule_for(kind, terminal_kind);
        let waits = self.max_attempts_for(kind, terminal_kind).saturating_sub(1) as usize;
        let last = schedule.last().copied().unwrap_or_default();
        let total: Duration = (0..waits).map(|i| schedule.get(i).copied().unwrap_or(last)).sum();
        total.mul_f64((1.0 - self.jitter).max(0.0))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerDefinition {
    pub jobs: BTreeMap<String, JobDefinition>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDefinition {
    pub schedule: String,
}

/// PoolDefinitions is the content of `workers/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolDefinitions {
    pub settlement: SettlementPool,
    pub issuance: IssuancePool,
    pub delivery: DeliveryPool,
    pub scheduler: SchedulerDefinition,
}

impl PoolDefinitions {
    /// PoolDefinitions::load reads each definition from `dir`, or its built-in copy.
    pub fn load(dir: &Path) -> anyhow::Result<PoolDefinitions> {
        let read = |name: &str| -> anyhow::Result<(String, String)> {
            let path = dir.join(name);
            if path.is_file() {
                Ok((std::fs::read_to_string(&path)?, path.display().to_string()))
            } else {
                let text = BUILT_IN.iter().find(|(n, _)| *n == name).map(|(_, t)| t.to_string()).expect("built in");
                Ok((text, format!("built-in {name}")))
            }
        };
        fn parse<T: serde::de::DeserializeOwned>((text, origin): (String, String)) -> anyhow::Result<T> {
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))
        }
        let defs = PoolDefinitions {
            settlement: parse(read("settlement.toml")?)?,
            issuance: parse(read("issuance.toml")?)?,
            delivery: parse(read("delivery.toml")?)?,
            scheduler: parse(read("scheduler.toml")?)?,
        };
        defs.validate()?;
        Ok(defs)
    }

    /// PoolDefinitions::built_in is the compiled-in definitions.
    pub fn built_in() -> PoolDefinitions {
        Self::load(Path::new("/nonexistent")).expect("the built-in definitions are valid")
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (name, pool) in [
            ("settlement", &self.settlement.pool),
            ("issuance", &self.issuance.pool),
            ("delivery", &self.delivery.pool),
        ] {
            anyhow::ensure!(pool.concurrency >= 1, "workers/{name}.toml: concurrency must be at least 1");
            anyhow::ensure!(pool.prefetch >= 1, "workers/{name}.toml: prefetch must be at least 1");
            anyhow::ensure!(pool.batch >= 1, "workers/{name}.toml: batch must be at least 1");
            anyhow::ensure!(
                pool.linger <= Duration::from_millis(100),
                "workers/{name}.toml: linger must be at most 100ms (every message that waits is that much later)"
            );
            anyhow::ensure!(!pool.queues.is_empty(), "workers/{name}.toml: queues must name at least one queue");
        }
        let t = &self.delivery.transmission;
        // A zero timeout would time every attempt out at the instant it is sent, within the very
        // run of the retransmission job that sent it.
        anyhow::ensure!(
            !t.ack_timeout.is_zero(),
            "workers/delivery.toml: transmission.ack_timeout must be longer than zero"
        );
        anyhow::ensure!(!t.schedule.is_empty(), "workers/delivery.toml: transmission.schedule must not be empty");
        anyhow::ensure!((0.0..1.0).contains(&t.jitter), "workers/delivery.toml: transmission.jitter must be in [0, 1)");
        anyhow::ensure!(t.max_attempts >= 1, "workers/delivery.toml: transmission.max_attempts must be at least 1");
        anyhow::ensure!(
            self.settlement.instruction.max_attempts >= 1,
            "workers/settlement.toml: instruction.max_attempts must be at least 1"
        );
        Ok(())
    }
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let texts: Vec<String> = Vec::deserialize(d)?;
    texts
        .iter()
        .map(|t| humantime::parse_duration(t).map_err(|e| serde::de::Error::custom(format!("{t:?}: {e}"))))
        .collect()
}

fn optional_durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Duration>>, D::Error> {
    durations(d).map(Some)
}

fn serialize_optional_durations<S: serde::Serializer>(v: &Option<Vec<Duration>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => serialize_durations(v, s),
        None => s.serialize_none(),
    }
}

fn serialize_durations<S: serde::Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_definitions_load() {
        let defs = PoolDefinitions::built_in();
        assert_eq!(defs.delivery.transmission.schedule[0], Duration::from_secs(60));
        assert_eq!(defs.delivery.transmission.schedule.len(), 7);
        assert!(defs.scheduler.jobs.contains_key("retransmission"));
    }

    #[test]
    fn a_linger_is_read_defaults_to_none_and_is_bounded() {
        assert_eq!(PoolDefinitions::built_in().settlement.pool.linger, Duration::from_millis(20));
        let dir = std::env::temp_dir().join(format!("assetflow-linger-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let built_in = BUILT_IN.iter().find(|(n, _)| *n == "settlement.toml").unwrap().1;
        let without: String = built_in.lines().filter(|l| !l.starts_with("linger")).collect::<Vec<_>>().join("\n");
        std::fs::write(dir.join("settlement.toml"), &without).unwrap();
        assert_eq!(PoolDefinitions::load(&dir).unwrap().settlement.pool.linger, Duration::ZERO);
        std::fs::write(dir.join("settlement.toml"), without.replace("batch = 64", "batch = 64\nlinger = \"1s\""))
            .unwrap();
        let err = PoolDefinitions::load(&dir).unwrap_err().to_string();
        assert!(err.contains("workers/settlement.toml: linger must be at most 100ms"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_zero_acknowledgement_timeout_is_refused() {
        let dir = std::env::temp_dir().join(format!("assetflow-ack-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let built_in = BUILT_IN.iter().find(|(n, _)| *n == "delivery.toml").unwrap().1;
        let line = built_in.lines().find(|l| l.starts_with("ack_timeout")).expect("the built-in sets ack_timeout");
        std::fs::write(dir.join("delivery.toml"), built_in.replace(line, "ack_timeout = \"0s\"")).unwrap();
        let err = PoolDefinitions::load(&dir).unwrap_err().to_string();
        assert!(err.contains("workers/delivery.toml: transmission.ack_timeout must be longer than zero"), "{err}");
        std::fs::write(dir.join("delivery.toml"), built_in.replace(line, "ack_timeout = \"1ms\"")).unwrap();
        assert_eq!(PoolDefinitions::load(&dir).unwrap().delivery.transmission.ack_timeout, Duration::from_millis(1));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn kinds_override_the_transmission_policy() {
        let mut policy = PoolDefinitions::built_in().delivery.transmission;
        policy.kinds.insert(
            "refusal".into(),
            KindPolicy { schedule: Some(vec![Duration::from_secs(5)]), max_attempts: Some(2) },
        );
        assert_eq!(policy.schedule_for("refusal", None), &[Duration::from_secs(5)]);
        assert_eq!(policy.max_attempts_for("refusal", Some("mobile")), 2);
        assert_eq!(policy.schedule_for("asset", None).len(), 7);
        // A terminal kind's override wins over the delivery kind's.
        policy.terminal_kinds.insert("gate".into(), KindPolicy { schedule: None, max_attempts: Some(3) });
        assert_eq!(policy.max_attempts_for("refusal", Some("gate")), 3);
        assert_eq!(
            policy.schedule_for("refusal", Some("gate")),
            &[Duration::from_secs(5)],
            "its own schedule is unset"
        );
    }

    /// A terminal may be offline for a week (`docs/product.md#parties-and-terminals`): what it
    /// paid for is retried for longer than that, whatever its kind, at the shortest jitter.
    #[test]
    fn the_built_in_retry_horizon_outlasts_a_week_long_absence_for_assets_and_certificates() {
        let policy = PoolDefinitions::built_in().delivery.transmission;
        let week = Duration::from_secs(7 * 86_400);
        for kind in ["asset", "certificate"] {
            for terminal in [None, Some("mobile"), Some("stationary"), Some("pos"), Some("gate")] {
                let horizon = policy.horizon(kind, terminal);
                assert!(horizon > week, "{kind} to {terminal:?}: retried for {horizon:?} only");
            }
        }
        assert!(policy.horizon("asset", Some("stationary")) >= policy.horizon("asset", Some("mobile")));
    }
}
