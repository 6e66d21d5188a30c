//! The gateway simulator: receives deliveries for its terminals, returns receipts with the SHA-256
//! of the bytes received, has some holders exchange their certificates and some of the others ask
//! for a refund or defer the download instead, has payers answer the orders they are asked to
//! confirm (most confirm, some decline, some never answer), and has holders submit most receipt
//! certificates once they may: a hold's at once, a lottery's or a threshold sale's once drawn or
//! produced.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use openssl::pkey::{PKey, Private};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Stats;
use super::ledger::{self, Ledger};
use super::partner::fraction;
use super::publisher::{ConfirmedSender, consume};
use crate::config::Config;
use crate::contracts::messages::{
    Acknowledgement, ConfirmAnswer, DeliveryKind, DeliveryReceipt, GatewayDelivery, ModificationChoice, kinds,
};
use crate::contracts::topology::Names;
use crate::crypto;
use crate::domain::catalogue::PartyKind;
use crate::domain::delivery::receipt::content_sha256;
use crate::runtime::broker::Broker;

#[derive(Debug, Clone, clap::Args)]
pub struct GatewayOptions {
    /// Gateways to act as (repeatable); the default is every configured gateway.
    #[arg(long = "gateway")]
    pub gateways: Vec<String>,
    /// Share of deliveries answered with a wrong hash (a corrupted transmission).
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Share of deliveries never answered (the acknowledgement timeout then fails them).
    #[arg(long, default_value_t = 0.0)]
    pub silence_rate: f64,
    /// Share of receipts sent twice.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_rate: f64,
    /// Time taken to answer each delivery (a slow gateway).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub latency: Duration,
    /// Share of certificates their holders exchange, when their keys are in --keys.
    #[arg(long, default_value_t = 0.5)]
    pub exchange_rate: f64,
    /// Share of certificates whose holders ask for a refund instead of exchanging them.
    #[arg(long, default_value_t = 0.1)]
    pub refund_rate: f64,
    /// Share of certificates whose holders change them for --change-to instead.
    #[arg(long, default_value_t = 0.0)]
    pub change_rate: f64,
    /// The product holders change their certificates for (with --change-rate).
    #[arg(long)]
    pub change_to: Option<String>,
    /// Share of certificates whose holders defer the download by a few seconds instead.
    #[arg(long, default_value_t = 0.1)]
    pub defer_rate: f64,
    /// The first certificates offered are answered one of each kind the shares above ask for (a
    /// refund, a change, a deferral, in that order) before the shares apply: a short run then sees
    /// every kind, whatever the delivery ids draw.
    #[arg(long)]
    pub each_answer_first: bool,
    /// Where the simulated terminals' private keys are: a terminal whose key is here signs an
    /// acknowledgement of what it received, which the gateway relays in its receipt.
    #[arg(long, default_value_os_t = super::default_keys_dir())]
    pub keys: PathBuf,
    /// Where the simulated gateways' signing keys are (made and registered when missing).
    #[arg(long, default_value_os_t = super::default_party_keys_dir())]
    pub party_keys: PathBuf,
    /// A JSON-lines file to append every delivery message received to (the gateway's ledger,
    /// for `assetflow audit --gateway-ledger`).
    #[arg(long = "gateway-ledger")]
    pub ledger: Option<PathBuf>,
    /// Share of deliveries returned to the queue unanswered the first time they arrive (a gateway
    /// that fails before its acknowledgement): the broker delivers them again.
    #[arg(long, default_value_t = 0.0)]
    pub requeue_rate: f64,
    /// Share of orders their payers are asked to confirm that they decline (the others confirm,
    /// when their keys are in --keys).
    #[arg(long, default_value_t = 0.0)]
    pub confirm_decline_rate: f64,
    /// Share of orders their payers are asked to confirm that they never answer (they end
    /// unconfirmed when the product's window has passed).
    #[arg(long, default_value_t = 0.0)]
    pub confirm_ignore_rate: f64,
    /// Share of receipt certificates their holders submit once they may: a hold's at once, a
    /// lottery's or a threshold sale's on its `lottery_won` or `threshold_met` notice. The others
    /// are never submitted: they expire or lapse, and are revoked.
    #[arg(long, default_value_t = 0.8)]
    pub submit_rate: f64,
    /// Share of an issuer's modification notices their holders answer with a refund (the others
    /// accept the change, but for --modification-silence-rate).
    #[arg(long, default_value_t = 0.3)]
    pub modification_refund_rate: f64,
    /// Share of modification notices never answered: the issuer's default applies at the deadline.
    #[arg(long, default_value_t = 0.2)]
    pub modification_silence_rate: f64,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            gateways: Vec::new(),
            failure_rate: 0.0,
            silence_rate: 0.0,
            duplicate_rate: 0.0,
            latency: Duration::ZERO,
            exchange_rate: 0.5,
            // The simulators' command line has holders refund and defer; a test asks for it.
            refund_rate: 0.0,
            change_rate: 0.0,
            change_to: None,
            defer_rate: 0.0,
            each_answer_first: false,
            keys: super::default_keys_dir(),
            party_keys: super::default_party_keys_dir(),
            ledger: None,
            requeue_rate: 0.0,
            confirm_decline_rate: 0.0,
            confirm_ignore_rate: 0.0,
            // The simulators' command line has holders submit; the tests submit themselves.
            submit_rate: 0.0,
            // The simulators' command line has holders answer modification notices; the tests
            // answer themselves.
            modification_refund_rate: 0.0,
            modification_silence_rate: 1.0,
        }
    }
}

/// TerminalKeys loads simulated terminals' private keys on demand.
#[derive(Clone)]
pub struct TerminalKeys {
    dir: PathBuf,
    cache: Arc<Mutex<HashMap<String, Option<PKey<Private>>>>>,
}

impl TerminalKeys {
    pub fn new(dir: PathBuf) -> TerminalKeys {
        TerminalKeys { dir, cache: Arc::default() }
    }

    pub async fn get(&self, terminal: &str) -> Option<PKey<Private>> {
        let mut cache = self.cache.lock().await;
        if let Some(Some(key)) = cache.get(terminal) {
            return Some(key.clone());
        }
        let key = crypto::load_private_key(&self.dir.join(format!("{terminal}.pem"))).ok();
        cache.insert(terminal.to_string(), key.clone());
        key
    }
}

pub async fn run_owned(
    config: Config,
    broker: Broker,
    options: GatewayOptions,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run(&config, broker, options, stats, shutdown).await
}

pub async fn run(
    config: &Config,
    broker: Broker,
    options: GatewayOptions,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let names = Names { prefix: config.amqp.prefix.clone() };
    let gateways = super::acting_as(&options.gateways, &config.gateways, "gateways")?;
    let publisher = Arc::new(ConfirmedSender::new(broker.clone()));
    let keys = TerminalKeys::new(options.keys.clone());
    let ledger = options.ledger.as_deref().map(Ledger::open).transpose()?;
    let mut tasks = Vec::new();
    for gateway in gateways {
        let queue = names.gateway_queue(&gateway);
        // Its receipts are signed: assetflow takes a receipt only from the gateway it sent through.
        let own = Arc::new(super::party_key(config, PartyKind::Gateway, &gateway, &options.party_keys).await?);
        let ledger = ledger.clone();
        let (publisher, stats, options, requests, keys) =
            (publisher.clone(), stats.clone(), options.clone(), names.requests(), keys.clone());
        tasks.push(tokio::spawn(consume(broker.clone(), queue, 128, shutdown.clone(), move |delivery| {
            let ledger = ledger.clone();
            let (publisher, stats, options, requests, keys, own) =
                (publisher.clone(), stats.clone(), options.clone(), requests.clone(), keys.clone(), own.clone());
            async move {
                let bytes = delivery.data.clone();
                let Ok(message) = serde_json::from_slice::<GatewayDelivery>(&bytes) else {
                    tracing::warn!("gateway simulator: not a delivery");
                    return true;
                };
                if !ledger::received(ledger.as_ref(), &delivery, &message, options.requeue_rate).await {
                    return false;
                }
                let counter = match message.kind {
                    DeliveryKind::Certificate => &stats.certificates,
                    DeliveryKind::Asset => &stats.assets,
                    DeliveryKind::Refusal => &stats.refusals,
                    _ => &stats.notices,
                };
                if message.attempt == 1 {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                if rand::random::<f64>() < options.silence_rate {
                    return true;
                }
                let corrupted = rand::random::<f64>() < options.failure_rate;
                let sha256 = crypto::sha256_hex(if corrupted { b"corrupted in transit" } else { &bytes });
                // The terminal checks what it holds and signs its acknowledgement, when it can.
                let message_id = delivery.properties.message_id().as_ref().and_then(|id| id.as_str().parse().ok());
                let acknowledgement = match (keys.get(&message.terminal_id).await, message_id) {
                    (Some(key), Some(message_id)) => {
                        let content =
                            if corrupted { serde_json::json!("corrupted in transit") } else { message.content.clone() };
                        Some(acknowledge(&message, message_id, &content, &key))
                    }
                    _ => None,
                };
                let receipt = DeliveryReceipt {
                    message_type: kinds::DELIVERY_RECEIPT.into(),
                    delivery_id: message.delivery_id,
                    attempt: message.attempt,
                    gateway_id: message.gateway_id.clone(),
                    terminal_id: message.terminal_id.clone(),
                    sha256,
                    received_at: Utc::now(),
                    acknowledgement,
                    signature: None,
                };
                let body = super::partner::signed(&receipt, &own);
                let copies = if rand::random::<f64>() < options.duplicate_rate { 2 } else { 1 };
                // What the holder does with a certificate is decided once, before the receipt goes,
                // so that whoever waits for it (the benchmark) never sees neither: a refund, a
                // change or "later" instead of an exchange, or an exchange.
                let offered = message
                    .content
                    .get("certificate")
                    .filter(|_| message.kind == DeliveryKind::Certificate)
                    .filter(|_| stats.exchange_decided.lock().expect("not poisoned").insert(message.delivery_id));
                let answer_otherwise = offered.and_then(|c| {
                    let ordinal =
                        options.each_answer_first.then(|| stats.certificates_offered.fetch_add(1, Ordering::Relaxed));
                    holder_answer(&options, &message.delivery_id.to_string(), c, ordinal)
                });
                let certificate = offered
                    .filter(|_| answer_otherwise.is_none())
                    .filter(|_| fraction(&message.delivery_id.to_string(), "exchange") < options.exchange_rate)
                    .cloned();
                // The payer answers an order it is asked to confirm once, even when the request
                // is sent again.
                let confirmation = (message.kind == DeliveryKind::ConfirmationRequest)
                    .then(|| message.content.get("order_id").and_then(|id| id.as_str()).and_then(|id| id.parse().ok()))
                    .flatten()
                    .filter(|order: &Uuid| stats.confirm_decided.lock().expect("not poisoned").insert(*order))
                    .and_then(|order| {
                        let roll = fraction(&order.to_string(), "confirm");
                        let answer = if roll < options.confirm_ignore_rate {
                            return None;
                        } else if roll < options.confirm_ignore_rate + options.confirm_decline_rate {
                            ConfirmAnswer::Decline
                        } else {
                            ConfirmAnswer::Confirm
                        };
                        Some((order, answer))
                    });
                // A holder submits a receipt certificate once it may.
                let submission = submission(&options, &stats, &message);
                let modification = modification_answer(&options, &stats, &message);
                let answer = async move {
                    let _waiting = certificate.as_ref().map(|_| Waiting::on(&stats));
                    for _ in 0..copies {
                        if let Err(e) =
                            publisher.publish(&requests, kinds::DELIVERY_RECEIPT, kinds::DELIVERY_RECEIPT, &body).await
                        {
                            tracing::warn!(error = %e, "gateway simulator could not send a receipt");
                            return;
                        }
                    }
                    stats.receipts.fetch_add(1, Ordering::Relaxed);
                    if let Some((kind, asset_id)) = &answer_otherwise
                        && let Some(key) = keys.get(&message.terminal_id).await
                    {
                        let request = match kind {
                            HolderAnswer::Refund => refund_request(&message.terminal_id, *asset_id, &key),
                            HolderAnswer::Change(product) => {
                                change_request(&message.terminal_id, *asset_id, product, &key)
                            }
                            HolderAnswer::Defer => defer_request(
                                &message.terminal_id,
                                *asset_id,
                                Utc::now() + chrono::Duration::seconds(5),
                                &key,
                            ),
                        };
                        let routing_key = request["type"].as_str().unwrap_or_default().to_string();
                        let body = serde_json::to_vec(&request).expect("serializes");
                        if publisher.publish(&requests, &routing_key, &routing_key, &body).await.is_ok() {
                            let counter = match kind {
                                HolderAnswer::Refund => &stats.refunds_asked,
                                HolderAnswer::Change(_) => &stats.changes_asked,
                                HolderAnswer::Defer => &stats.deferrals,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if let Some((order, answer)) = confirmation
                        && let Some(key) = keys.get(&message.terminal_id).await
                    {
                        let request = confirm_request(&message.terminal_id, order, answer, &key);
                        let body = serde_json::to_vec(&request).expect("serializes");
                        match publisher.publish(&requests, kinds::ORDER_CONFIRM, kinds::ORDER_CONFIRM, &body).await {
                            Ok(()) => {
                                stats.confirmations.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!(error = %e, "gateway simulator could not send a confirmation"),
                        }
                    }
                    if let Some((notice, choice)) = modification
                        && let Some(key) = keys.get(&message.terminal_id).await
                    {
                        let request = modification_request(&message.terminal_id, notice, choice, &key);
                        let body = serde_json::to_vec(&request).expect("serializes");
                        let kind = kinds::MODIFICATION_ANSWER;
                        match publisher.publish(&requests, kind, kind, &body).await {
                            Ok(()) => {
                                stats.modification_answers.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!(error = %e, "gateway simulator could not answer a notice"),
                        }
                    }
                    if let Some(certificate) = submission
                        && let Some(key) = keys.get(&message.terminal_id).await
                    {
                        let request = submit_request(&message.terminal_id, certificate, &key);
                        let (publisher, stats, requests) = (publisher.clone(), stats.clone(), requests.clone());
                        // A little later, as a person would.
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let body = serde_json::to_vec(&request).expect("serializes");
                            match publisher
                                .publish(&requests, kinds::RECEIPT_SUBMIT, kinds::RECEIPT_SUBMIT, &body)
                                .await
                            {
                                Ok(()) => {
                                    stats.submissions.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => tracing::warn!(error = %e, "gateway simulator could not submit"),
                            }
                        });
                    }
                    if let Some(certificate) = certificate
                        && let Some(key) = keys.get(&message.terminal_id).await
                    {
                        let request = exchange_request(&message.terminal_id, certificate, &key);
                        let (publisher, stats) = (publisher.clone(), stats.clone());
                        let waiting = Waiting::on(&stats);
                        // The holder exchanges a little later, as a person would.
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let body = serde_json::to_vec(&request).expect("serializes");
                            let sent_at = Utc::now();
                            if publisher
                                .publish(&requests, kinds::CERTIFICATE_EXCHANGE, kinds::CERTIFICATE_EXCHANGE, &body)
                                .await
                                .is_ok()
                            {
                                stats.exchanges.fetch_add(1, Ordering::SeqCst);
                                if stats.log_exchanges.load(Ordering::Relaxed) {
                                    let request_id = request["request_id"].as_str().unwrap_or_default().to_string();
                                    stats.exchange_log.lock().expect("not poisoned").push((request_id, sent_at));
                                }
                            }
                            drop(waiting);
                        });
                    }
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

/// Waiting counts an exchange decided on and not yet published, for as long as it lives.
struct Waiting(Arc<Stats>);

impl Waiting {
    fn on(stats: &Arc<Stats>) -> Waiting {
        stats.exchanges_waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(stats.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.exchanges_waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// acknowledge is a terminal's signed acknowledgement of a delivery: the attempt it received (its
/// AMQP message id) and the SHA-256 of the content it holds.
pub fn acknowledge(
    message: &GatewayDelivery,
    message_id: Uuid,
    content: &serde_json::Value,
    key: &PKey<Private>,
) -> Acknowledgement {
    let mut ack = serde_json::json!({
        "terminal_id": message.terminal_id,
        "delivery_id": message.delivery_id,
        "message_id": message_id,
        "content_sha256": content_sha256(content),
        "verified_at": Utc::now(),
    });
    crypto::sign_document(key, &mut ack).expect("signing works");
    serde_json::from_value(ack).expect("an acknowledgement")
}

/// confirm_request builds a payer's signed `order.confirm`.
pub fn confirm_request(
    terminal_id: &str,
    order_id: Uuid,
    answer: ConfirmAnswer,
    key: &PKey<Private>,
) -> serde_json::Value {
    let mut request = serde_json::json!({
        "type": kinds::ORDER_CONFIRM,
        "request_id": format!("c-{}", Uuid::now_v7()),
        "terminal_id": terminal_id,
        "sent_at": Utc::now(),
        "order_id": order_id,
        "answer": answer,
    });
    crypto::sign_document(key, &mut request).expect("signing works");
    request
}

/// exchange_request builds a signed `certificate.exchange`.
pub fn exchange_request(terminal_id: &str, certificate: serde_json::Value, key: &PKey<Private>) -> serde_json::Value {
    let mut request = serde_json::json!({
        "type": kinds::CERTIFICATE_EXCHANGE,
        "request_id": format!("x-{}", Uuid::now_v7()),
        "terminal_id": terminal_id,
        "sent_at": Utc::now(),
        "certificate": certificate,
    });
    crypto::sign_document(key, &mut request).expect("signing works");
    request
}

/// HolderAnswer is how a holder who does not exchange its certificate answers instead.
#[derive(Debug, Clone)]
enum HolderAnswer {
    Refund,
    /// A change for this product.
    Change(String),
    Defer,
}

/// holder_answer decides, as a pure function of the delivery, whether the holder of a certificate
/// it does not exchange asks for a refund, changes it or defers the download, and of which asset.
/// With [`GatewayOptions::each_answer_first`], the certificate offered `ordinal`-th takes the
/// `ordinal`-th kind the shares ask for, until each was taken once.
fn holder_answer(
    options: &GatewayOptions,
    delivery: &str,
    certificate: &serde_json::Value,
    ordinal: Option<u64>,
) -> Option<(HolderAnswer, Uuid)> {
    let asset: Uuid = certificate.get("asset_id")?.as_str()?.parse().ok()?;
    let product = certificate.get("product_id").and_then(serde_json::Value::as_str);
    let change_to = options.change_to.as_deref().filter(|to| product != Some(*to));
    let first = ordinal.and_then(|n| {
        let kinds = [
            (options.refund_rate > 0.0).then_some(HolderAnswer::Refund),
            options.change_to.clone().filter(|_| options.change_rate > 0.0).map(HolderAnswer::Change),
            (options.defer_rate > 0.0).then_some(HolderAnswer::Defer),
        ];
        kinds.into_iter().flatten().nth(usize::try_from(n).ok()?)
    });
    // A certificate of the product changed to cannot be changed for it: the shares decide instead.
    if let Some(first) = first.filter(|k| !matches!(k, HolderAnswer::Change(_)) || change_to.is_some()) {
        return Some((first, asset));
    }
    if fraction(delivery, "refund") < options.refund_rate {
        Some((HolderAnswer::Refund, asset))
    } else if let Some(to) = change_to.filter(|_| fraction(delivery, "change") < options.change_rate) {
        Some((HolderAnswer::Change(to.to_string()), asset))
    } else if fraction(delivery, "defer") < options.defer_rate {
        Some((HolderAnswer::Defer, asset))
    } else {
        None
    }
}

/// submission is the receipt certificate a holder submits on receiving `message`, if any: the
/// certificate itself when it is a hold's, or the one a `lottery_won` or `threshold_met` notice
/// names, kept in `Stats::receipt_certificates` since it arrived. Whether a certificate is ever
/// submitted is a pure function of its id (`submit_rate`); each is submitted once.
fn submission(options: &GatewayOptions, stats: &Stats, message: &GatewayDelivery) -> Option<serde_json::Value> {
    if options.submit_rate <= 0.0 {
        return None;
    }
    let mut held = stats.receipt_certificates.lock().expect("not poisoned");
    match message.kind {
        DeliveryKind::ReceiptCertificate => {
            let certificate = message.content.get("receipt_certificate")?;
            let id: Uuid = certificate.get("receipt_certificate_id")?.as_str()?.parse().ok()?;
            if fraction(&id.to_string(), "submit") >= options.submit_rate || held.contains_key(&id) {
                return None;
            }
            if certificate.pointer("/condition/kind").and_then(serde_json::Value::as_str) == Some("hold") {
                held.insert(id, None);
                Some(certificate.clone())
            } else {
                held.insert(id, Some(certificate.clone()));
                None
            }
        }
        DeliveryKind::Message => {
            let code = message.content.get("code")?.as_str()?;
            if !matches!(code, "lottery_won" | "threshold_met") {
                return None;
            }
            let id: Uuid = message.content.get("certificate_id")?.as_str()?.parse().ok()?;
            held.get_mut(&id)?.take()
        }
        _ => None,
    }
}

/// modification_answer is how a holder answers the modification notice `message` carries, if it
/// is one and the holder answers: a pure function of the notice's id, decided once, even when the
/// notice is sent again.
fn modification_answer(
    options: &GatewayOptions,
    stats: &Stats,
    message: &GatewayDelivery,
) -> Option<(Uuid, ModificationChoice)> {
    if message.kind != DeliveryKind::Message
        || message.content.get("code").and_then(serde_json::Value::as_str) != Some("modification_notice")
    {
        return None;
    }
    let notice: Uuid = message.content.get("certificate_id")?.as_str()?.parse().ok()?;
    if !stats.modification_decided.lock().expect("not poisoned").insert(notice) {
        return None;
    }
    let roll = fraction(&notice.to_string(), "modification");
    if roll < options.modification_silence_rate {
        None
    } else if roll < options.modification_silence_rate + options.modification_refund_rate {
        Some((notice, ModificationChoice::Refund))
    } else {
        Some((notice, ModificationChoice::Accept))
    }
}

/// modification_request builds a holder's signed `modification.answer` to the notice `notice_id`.
pub fn modification_request(
    terminal_id: &str,
    notice_id: Uuid,
    answer: ModificationChoice,
    key: &PKey<Private>,
) -> serde_json::Value {
    let mut request = serde_json::json!({
        "type": kinds::MODIFICATION_ANSWER,
        "request_id": format!("m-{}", Uuid::now_v7()),
        "terminal_id": terminal_id,
        "sent_at": Utc::now(),
        "notice_id": notice_id,
        "answer": answer,
    });
    crypto::sign_document(key, &mut request).expect("signing works");
    request
}

/// change_request builds a signed `asset.change` of `asset_id` for `product_id`.
pub fn change_request(terminal_id: &str, asset_id: Uuid, product_id: &str, key: &PKey<Private>) -> serde_json::Value {
    let mut request = serde_json::json!({
        "type": kinds::ASSET_CHANGE,
        "request_id": format!("c-{}", Uuid::now_v7()),
        "terminal_id": terminal_id,
        "sent_at": Utc::now(),
        "asset_id": asset_id,
        "product_id": product_id,
    });
    crypto::sign_document(key, &mut request).expect("signing works");
    request
}

/// refund_request builds a signed `asset.refund`.
pub fn refund_request(terminal_id: &str, asset_id: Uuid, key: &PKey<Private>) -> serde_json::Value {
    let mut request = serde_json::json!({
        "type": kinds::ASSET_REFUND,
        "request_id": format!("r-{}", Uuid::now_v7()),
        "terminal_id": terminal_id,
        "sent_at": Utc::now(),
        "asset_id": asset_id,
    });
    crypto::sign_document(key, &mut request).expect("signing works");
    request
}

/// defer_request builds a signed `asset.defer` to `deliver_at`.
pub fn defer_request(
    terminal_id: &str,
    asset_id: Uuid,
    deliver_at: chrono::DateTime<Utc>,
    key: &PKey<Private>,
) -> serde_json::Value {
    let mut request = serde_json::json!({
        "type": kinds::ASSET_DEFER,
        "request_id": format!("d-{}", Uuid::now_v7()),
        "terminal_id": terminal_id,
        "sent_at": Utc::now(),
        "asset_id": asset_id,
        "deliver_at": deliver_at,
    });
    crypto::sign_document(key, &mut request).expect("signing works");
    request
}

/// booking_request builds a signed `order.booking` of `product_id`.
pub fn booking_request(terminal_id: &str, product_id: &str, key: &PKey<Private>) -> serde_json::Value {
    let mut request = serde_json::json!({
        "type": kinds::ORDER_BOOKING,
        "request_id": format!("b-{}", Uuid::now_v7()),
        "terminal_id": terminal_id,
        "sent_at": Utc::now(),
        "product_id": product_id,
    });
    crypto::sign_document(key, &mut request).expect("signing works");
    request
}

/// submit_request builds a signed `receipt.submit` presenting `certificate`.
pub fn submit_request(terminal_id: &str, certificate: serde_json::Value, key: &PKey<Private>) -> serde_json::Value {
    let mut request = serde_json::json!({
        "type": kinds::RECEIPT_SUBMIT,
        "request_id": format!("s-{}", Uuid::now_v7()),
        "terminal_id": terminal_id,
        "sent_at": Utc::now(),
        "certificate": certificate,
    });
    crypto::sign_document(key, &mut request).expect("signing works");
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(product: &str) -> serde_json::Value {
        serde_json::json!({"asset_id": Uuid::now_v7().to_string(), "product_id": product})
    }

    fn kind(answer: Option<(HolderAnswer, Uuid)>) -> &'static str {
        match answer.map(|(a, _)| a) {
            Some(HolderAnswer::Refund) => "refund",
            Some(HolderAnswer::Change(_)) => "change",
            Some(HolderAnswer::Defer) => "defer",
            None => "none",
        }
    }

    #[test]
    fn each_answer_first_gives_the_first_certificates_one_answer_of_each_kind_asked_for() {
        let options = GatewayOptions {
            refund_rate: 0.01,
            change_rate: 0.01,
            change_to: Some("coupon".into()),
            defer_rate: 0.0,
            each_answer_first: true,
            ..GatewayOptions::default()
        };
        let ticket = certificate("ticket");
        assert_eq!(kind(holder_answer(&options, "d0", &ticket, Some(0))), "refund");
        assert_eq!(kind(holder_answer(&options, "d1", &ticket, Some(1))), "change");
        // No deferral was asked for: from here on the shares decide, as without the option.
        for (n, delivery) in ["d2", "d3", "d4"].into_iter().enumerate() {
            assert_eq!(
                kind(holder_answer(&options, delivery, &ticket, Some(2 + n as u64))),
                kind(holder_answer(&options, delivery, &ticket, None)),
            );
        }
        // A certificate of the product changed to is never changed for it.
        let coupon = certificate("coupon");
        assert_ne!(kind(holder_answer(&options, "d5", &coupon, Some(1))), "change");
    }
}
