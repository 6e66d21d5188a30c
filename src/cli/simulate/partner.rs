//! The payment-partner simulator: answers settlement instructions from its queue, purchases and
//! refunds alike.
//!
//! Its answer for a settlement is a pure function of the settlement id, so a repeated
//! instruction always gets the same answer, as from a real partner.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Stats;
use super::publisher::{ConfirmedSender, consume};
use crate::config::Config;
use crate::contracts::messages::{SettlementInstruction, SettlementOutcome, SettlementResult, kinds};
use crate::contracts::topology::Names;
use crate::domain::catalogue::PartyKind;
use crate::runtime::broker::Broker;

#[derive(Debug, Clone, clap::Args)]
pub struct PartnerOptions {
    /// Partners to act as (repeatable); the default is every configured partner.
    #[arg(long = "partner")]
    pub partners: Vec<String>,
    /// Share of settlements declined.
    #[arg(long, default_value_t = 0.1)]
    pub decline_rate: f64,
    /// Share of refunds refused.
    #[arg(long, default_value_t = 0.1)]
    pub refund_refusal_rate: f64,
    /// Time taken to answer.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
    pub latency: Duration,
    /// Share of instructions never answered (the partner timeout then sends them again).
    #[arg(long, default_value_t = 0.0)]
    pub silence_rate: f64,
    /// Share of answers sent twice.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_rate: f64,
    /// Where the simulated partners' signing keys are (made and registered when missing).
    #[arg(long, default_value_os_t = super::default_party_keys_dir())]
    pub party_keys: std::path::PathBuf,
}

impl Default for PartnerOptions {
    fn default() -> Self {
        PartnerOptions {
            partners: Vec::new(),
            decline_rate: 0.1,
            // The simulators' command line refuses some refunds; a test asks for it.
            refund_refusal_rate: 0.0,
            latency: Duration::from_millis(20),
            silence_rate: 0.0,
            duplicate_rate: 0.0,
            party_keys: super::default_party_keys_dir(),
        }
    }
}

/// fraction maps an id and a salt to a stable number in [0, 1).
pub fn fraction(id: &str, salt: &str) -> f64 {
    let digest = openssl::sha::sha256(format!("{salt}:{id}").as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / (u64::MAX as f64 + 1.0)
}

pub async fn run_owned(
    config: Config,
    broker: Broker,
    options: PartnerOptions,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run(&config, broker, options, stats, shutdown).await
}

pub async fn run(
    config: &Config,
    broker: Broker,
    options: PartnerOptions,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let names = Names { prefix: config.amqp.prefix.clone() };
    let partners = super::acting_as(&options.partners, &config.partners, "partners")?;
    let publisher = Arc::new(ConfirmedSender::new(broker.clone()));
    let mut tasks = Vec::new();
    for partner in partners {
        let queue = names.partner_queue(&partner);
        // Its answers are signed: assetflow takes a result only from the partner it instructed.
        let key = Arc::new(super::party_key(config, PartyKind::Partner, &partner, &options.party_keys).await?);
        let (publisher, stats, options, requests) =
            (publisher.clone(), stats.clone(), options.clone(), names.requests());
        tasks.push(tokio::spawn(consume(broker.clone(), queue, 64, shutdown.clone(), move |delivery| {
            let (publisher, stats, options, requests, key) =
                (publisher.clone(), stats.clone(), options.clone(), requests.clone(), key.clone());
            async move {
                let Ok(instruction) = serde_json::from_slice::<SettlementInstruction>(&delivery.data) else {
                    tracing::warn!("partner simulator: not a settlement instruction");
                    return true;
                };
                let id = instruction.settlement_id.to_string();
                if rand::random::<f64>() < options.silence_rate {
                    return true;
                }
                let refund = instruction.kind == "refund";
                let refused = if refund {
                    fraction(&id, "refuse") < options.refund_refusal_rate
                } else {
                    fraction(&id, "decline") < options.decline_rate
                };
                let outcome = if refused { SettlementOutcome::Declined } else { SettlementOutcome::Settled };
                let reason = match (outcome, refund) {
                    (SettlementOutcome::Settled, _) => None,
                    (SettlementOutcome::Declined, false) => Some("insufficient funds (simulated)".into()),
                    (SettlementOutcome::Declined, true) => Some("card account closed (simulated)".into()),
                };
                let result = SettlementResult {
                    message_type: kinds::SETTLEMENT_RESULT.into(),
                    settlement_id: instruction.settlement_id,
                    partner_id: instruction.partner_id.clone(),
                    outcome,
                    partner_reference: format!("SIM-{}", &id[id.len() - 12..]),
                    reason,
                    sent_at: Utc::now(),
                    signature: None,
                };
                let body = signed(&result, &key);
                let copies = if rand::random::<f64>() < options.duplicate_rate { 2 } else { 1 };
                let answer = async move {
                    for _ in 0..copies {
                        if let Err(e) = publisher
                            .publish(&requests, kinds::SETTLEMENT_RESULT, kinds::SETTLEMENT_RESULT, &body)
                            .await
                        {
                            tracing::warn!(error = %e, "partner simulator could not answer");
                            return;
                        }
                    }
                    match (outcome, refund) {
                        (SettlementOutcome::Settled, false) => stats.settled.fetch_add(1, Ordering::Relaxed),
                        (SettlementOutcome::Declined, false) => stats.declined.fetch_add(1, Ordering::Relaxed),
                        (SettlementOutcome::Settled, true) => stats.refunded.fetch_add(1, Ordering::Relaxed),
                        (SettlementOutcome::Declined, true) => stats.refunds_refused.fetch_add(1, Ordering::Relaxed),
                    };
                };
                super::answer_after(options.latency, answer).await;
                true
            }
        })));
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}

/// signed is a message as a party that signs sends it: its JSON with a `signature` by `key` over
/// the canonical JSON of the rest.
pub fn signed(message: &impl serde::Serialize, key: &openssl::pkey::PKeyRef<openssl::pkey::Private>) -> Vec<u8> {
    let mut value = serde_json::to_value(message).expect("serializes");
    crate::crypto::sign_document(key, &mut value).expect("signing works");
    serde_json::to_vec(&value).expect("serializes")
}
