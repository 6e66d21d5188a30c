//! The message contracts: every message assetflow consumes or publishes, as a type.
//!
//! Each has a JSON Schema in `schemas/` (see [`schema`]); incoming messages are validated against
//! it before they are deserialized, so that a dead letter says which field was wrong. Messages
//! name what to act on by id, and the handlers re-read the state: a stale or duplicated message
//! cannot overwrite newer state.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// MAX_BODY is the largest message body a pool accepts; anything larger is dead-lettered as
/// malformed.
pub const MAX_BODY: usize = 256 * 1024;

/// REPLAY_USER_ID is the header that carries a replayed message's original AMQP `user_id`: the
/// broker user that published it, which proves who a partner's or gateway's answer came from.
/// Trusted only on the internal exchange, where only assetflow publishes.
pub const REPLAY_USER_ID: &str = "x-assetflow-user-id";

/// REPLAY_RECEIVED_AT is the header that carries a replayed message's original receipt time.
/// Only assetflow publishes on the internal exchange, so only there is it trusted.
pub const REPLAY_RECEIVED_AT: &str = "x-assetflow-received-at";

/// parse_body reads a message body the way a pool does before anything else: at most
/// [`MAX_BODY`] bytes of UTF-8 JSON, an object with a string `type`. It returns the type and the
/// JSON, or the detail a `malformed` dead letter carries. Any bytes at all may arrive here from
/// the requests exchange: it must never panic (fuzzed by `fuzz/`, the `message_body` target).
pub fn parse_body(body: &[u8]) -> Result<(String, Value), String> {
    if body.len() > MAX_BODY {
        return Err(format!("body of {} bytes exceeds the {MAX_BODY}-byte limit", body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    let json: Value = serde_json::from_str(text).map_err(|e| format!("body is not JSON: {e}"))?;
    let message_type = json
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| "body is not a JSON object with a string \"type\"".to_string())?
        .to_string();
    Ok((message_type, json))
}

/// The `type` of every message, which is also its routing key and its AMQP `type` property.
pub mod kinds {
    pub const ORDER_PURCHASE: &str = "order.purchase";
    pub const CERTIFICATE_EXCHANGE: &str = "certificate.exchange";
    pub const ORDER_CONFIRM: &str = "order.confirm";
    pub const SETTLEMENT_INSTRUCTION: &str = "settlement.instruction";
    pub const SETTLEMENT_RESULT: &str = "settlement.result";
    pub const ISSUANCE_REQUESTED: &str = "issuance.requested";
    pub const DELIVERY_REQUESTED: &str = "delivery.requested";
    pub const CERTIFICATE_NOTICES: &str = "certificate.notices";
    pub const DELIVERY: &str = "delivery";
    pub const DELIVERY_RECEIPT: &str = "delivery.receipt";
    pub const DEAD_LETTER: &str = "dead_letter";
    pub const ASSET_REFUND: &str = "asset.refund";
    pub const ASSET_DEFER: &str = "asset.defer";
    pub const ASSET_CHANGE: &str = "asset.change";
    pub const ORDER_BOOKING: &str = "order.booking";
    pub const ISSUER_CHANGE: &str = "issuer.change";
    pub const MODIFICATION_ANSWER: &str = "modification.answer";
    pub const MODIFICATIONS_DUE: &str = "modifications.due";
    pub const RECEIPT_SUBMIT: &str = "receipt.submit";
    pub const BOOKINGS_DECIDE: &str = "bookings.decide";

    /// The messages assetflow sends itself, on its internal exchange, from one pool to another.
    pub const INTERNAL: [&str; 5] =
        [ISSUANCE_REQUESTED, DELIVERY_REQUESTED, CERTIFICATE_NOTICES, BOOKINGS_DECIDE, MODIFICATIONS_DUE];
}

/// DeliveryModeKind is how an order's assets reach their recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryModeKind {
    /// An exchange certificate now, the asset when the holder exchanges it.
    Certificate,
    /// The asset at a given time.
    Designated,
    /// The asset now: `designated` at the time of issue.
    Immediate,
}

impl DeliveryModeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::Designated => "designated",
            Self::Immediate => "immediate",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryMode {
    pub mode: DeliveryModeKind,
    /// Required for `designated`, absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

/// PurchaseRequest is `order.purchase`, published by a gateway for a terminal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    #[serde(rename = "type")]
    pub message_type: String,
    /// The idempotency key: a repeated request id gets the original outcome.
    pub request_id: String,
    /// The orderer: the terminal that signed the request.
    pub terminal_id: String,
    pub sent_at: DateTime<Utc>,
    pub product_id: String,
    /// Assets for each recipient.
    pub quantity: u32,
    /// Who is billed. Defaults to the orderer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_terminal_id: Option<String>,
    /// Who receives the assets (a gift goes to another terminal). Defaults to the orderer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_terminal_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryMode>,
    pub signature: String,
}

/// ExchangeRequest is `certificate.exchange`: the holder presents its exchange certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeRequest {
    #[serde(rename = "type")]
    pub message_type: String,
    pub request_id: String,
    pub terminal_id: String,
    pub sent_at: DateTime<Utc>,
    /// The signed certificate document exactly as it was delivered.
    pub certificate: Value,
    pub signature: String,
}

/// RefundRequest is `asset.refund`: the holder asks for its money back for an asset not yet
/// delivered (`docs/product.md#refunds`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    #[serde(rename = "type")]
    pub message_type: String,
    pub request_id: String,
    /// The holder: the terminal that signed the request.
    pub terminal_id: String,
    pub sent_at: DateTime<Utc>,
    pub asset_id: Uuid,
    pub signature: String,
}

/// DeferRequest is `asset.defer`: the holder asks for its asset at a later time, before the
/// asset expires (`docs/product.md#deferrals`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeferRequest {
    #[serde(rename = "type")]
    pub message_type: String,
    pub request_id: String,
    /// The holder: the terminal that signed the request.
    pub terminal_id: String,
    pub sent_at: DateTime<Utc>,
    pub asset_id: Uuid,
    /// When the asset is to be delivered.
    pub deliver_at: DateTime<Utc>,
    pub signature: String,
}

/// ChangeRequest is `asset.change`: the holder changes an asset not yet delivered for another
/// product: a new purchase and a refund of the old asset, as one process
/// (`docs/product.md#changes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequest {
    #[serde(rename = "type")]
    pub message_type: String,
    pub request_id: String,
    /// The holder: the terminal that signed the request.
    pub terminal_id: String,
    pub sent_at: DateTime<Utc>,
    /// The asset given back.
    pub asset_id: Uuid,
    /// The product it is changed for.
    pub product_id: String,
    pub signature: String,
}

/// ModificationChoice is a holder's answer to an issuer's change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModificationChoice {
    /// A new asset, with the changed information, replaces the old one.
    Accept,
    /// The asset is refunded.
    Refund,
}

impl ModificationChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Refund => "refund",
        }
    }

    pub fn parse(s: &str) -> Option<ModificationChoice> {
        [Self::Accept, Self::Refund].into_iter().find(|c| c.as_str() == s)
    }
}

/// IssuerChangeMessage is `issuer.change`: an issuer changes the event of one of its products (a
/// new date, a correction) itself, as an operator does with `assetflow products change`
/// (`docs/product.md#issuer-changes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerChangeMessage {
    #[serde(rename = "type")]
    pub message_type: String,
    /// The issuer's own id for the change: the same reference again has no second effect.
    pub reference: String,
    pub issuer_id: String,
    pub sent_at: DateTime<Utc>,
    pub product_id: String,
    /// What changed, in words for the holders.
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_expires_at: Option<DateTime<Utc>>,
    pub reply_by: DateTime<Utc>,
    pub default_answer: ModificationChoice,
    /// The issuer's signature, when it signs what it sends (a key registered for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// ModificationAnswer is `modification.answer`: a holder answers the modification notice of an
/// issuer's change (`docs/product.md#issuer-changes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModificationAnswer {
    #[serde(rename = "type")]
    pub message_type: String,
    pub request_id: String,
    /// The holder: the terminal that signed the request.
    pub terminal_id: String,
    pub sent_at: DateTime<Utc>,
    /// The notice answered (the `certificate_id` of its `modification_notice` message).
    pub notice_id: Uuid,
    pub answer: ModificationChoice,
    pub signature: String,
}

/// ModificationsDue is internal: the `issuer_changes` scan found these notices unanswered at their
/// deadline; the issuance pool gives each its change's default answer, once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModificationsDue {
    #[serde(rename = "type")]
    pub message_type: String,
    pub as_of: DateTime<Utc>,
    pub notice_ids: Vec<Uuid>,
}

/// BookingRequest is `order.booking`: a terminal books a product sold by booking, and gets a
/// receipt certificate, the right to buy it later (`docs/product.md#receipt-certificates`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookingRequest {
    #[serde(rename = "type")]
    pub message_type: String,
    pub request_id: String,
    /// The booking terminal, which holds the certificate.
    pub terminal_id: String,
    pub sent_at: DateTime<Utc>,
    pub product_id: String,
    /// Who will be billed on submission. Defaults to the booking terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_terminal_id: Option<String>,
    pub signature: String,
}

/// SubmitRequest is `receipt.submit`: the holder presents its receipt certificate to buy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    #[serde(rename = "type")]
    pub message_type: String,
    pub request_id: String,
    pub terminal_id: String,
    pub sent_at: DateTime<Utc>,
    /// The signed receipt certificate exactly as it was delivered.
    pub certificate: Value,
    pub signature: String,
}

/// BookingsDecide is internal: the `bookings` scan found these products' lotteries or threshold
/// sales due at `as_of`; the issuance pool decides each once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookingsDecide {
    #[serde(rename = "type")]
    pub message_type: String,
    pub as_of: DateTime<Utc>,
    pub product_ids: Vec<String>,
}

/// ConfirmAnswer is a payer's answer to an order it was asked to confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmAnswer {
    /// Charge the payer: the order goes on to settlement.
    Confirm,
    /// Charge nothing: the order ends declined.
    Decline,
}

impl ConfirmAnswer {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Confirm => "confirm",
            Self::Decline => "decline",
        }
    }
}

/// ConfirmRequest is `order.confirm`: the payer's terminal confirms or declines an order billed
/// to it by another terminal (`docs/product.md#payer-confirmation`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmRequest {
    #[serde(rename = "type")]
    pub message_type: String,
    pub request_id: String,
    /// The payer: the terminal that signed the request.
    pub terminal_id: String,
    pub sent_at: DateTime<Utc>,
    /// The order named in the `confirmation_request` delivery.
    pub order_id: Uuid,
    pub answer: ConfirmAnswer,
    pub signature: String,
}

/// SettlementInstruction is published to the payer's partner queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettlementInstruction {
    #[serde(rename = "type")]
    pub message_type: String,
    pub settlement_id: Uuid,
    pub order_id: Uuid,
    /// `purchase`: charge the payer. `refund`: pay back (part of) a purchase this partner settled.
    pub kind: String,
    pub partner_id: String,
    pub payer_terminal_id: String,
    pub amount_minor: i64,
    pub currency: String,
    /// 1 for the first instruction; a partner that sees a higher attempt for a settlement it has
    /// already answered answers again with the same result.
    pub attempt: u32,
    /// The partner's answer is expected by this time.
    pub answer_by: DateTime<Utc>,
}

/// SettlementOutcome is a partner's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettlementOutcome {
    Settled,
    Declined,
}

impl SettlementOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Settled => "settled",
            Self::Declined => "declined",
        }
    }
}

/// SettlementResult is `settlement.result`, published by a partner on the requests exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettlementResult {
    #[serde(rename = "type")]
    pub message_type: String,
    pub settlement_id: Uuid,
    pub partner_id: String,
    pub outcome: SettlementOutcome,
    pub partner_reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub sent_at: DateTime<Utc>,
    /// The partner's signature, when it signs: base64 DER ECDSA P-256/SHA-256 over the canonical
    /// JSON (RFC 8785) of this message without this field, by its registered key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// IssuanceRequested is internal: settled orders are ready to be issued. The settlement pool
/// sends one for each transaction that records `settled` answers, naming all of their orders (up
/// to [`IssuanceRequested::MAX`]), so that an order costs a fraction of a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuanceRequested {
    #[serde(rename = "type")]
    pub message_type: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub order_ids: Vec<Uuid>,
    /// One order, as the builds before `order_ids` named it: a message still queued across an
    /// upgrade is issued, not refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
}

impl IssuanceRequested {
    /// The most orders one message may name (its schema's `maxItems`).
    pub const MAX: usize = 1000;

    /// IssuanceRequested::for_orders is the messages that ask for these orders: as few as
    /// [`IssuanceRequested::MAX`] allows.
    pub fn for_orders(order_ids: &[Uuid]) -> impl Iterator<Item = IssuanceRequested> + '_ {
        order_ids.chunks(Self::MAX).map(|chunk| IssuanceRequested {
            message_type: kinds::ISSUANCE_REQUESTED.into(),
            order_ids: chunk.to_vec(),
            order_id: None,
        })
    }

    /// IssuanceRequested::orders is every order the message names, in either form.
    pub fn orders(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.order_ids.iter().copied().chain(self.order_id)
    }
}

/// DeliveryRequested is internal: delivery rows are ready for their next attempt. A transaction
/// that makes several deliveries asks for all of them in one message, up to
/// [`DeliveryRequested::MAX`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryRequested {
    #[serde(rename = "type")]
    pub message_type: String,
    pub delivery_ids: Vec<Uuid>,
}

impl DeliveryRequested {
    /// The most deliveries one message may name (its schema's `maxItems`).
    pub const MAX: usize = 1000;

    /// DeliveryRequested::for_deliveries is the messages that ask for these deliveries: as few as
    /// [`DeliveryRequested::MAX`] allows.
    pub fn for_deliveries(delivery_ids: &[Uuid]) -> impl Iterator<Item = DeliveryRequested> + '_ {
        delivery_ids.chunks(Self::MAX).map(|chunk| DeliveryRequested {
            message_type: kinds::DELIVERY_REQUESTED.into(),
            delivery_ids: chunk.to_vec(),
        })
    }
}

/// CertificateNotices is internal: the certificate scans decided that these holders are owed a
/// reminder or past-due processing. The delivery pool moves past-due assets out of
/// awaiting_exchange and makes and sends the deliveries, keyed per (certificate, notice), so a
/// message handled twice sends nothing twice.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateNotices {
    #[serde(rename = "type")]
    pub message_type: String,
    /// The time the scan ran as.
    pub as_of: DateTime<Utc>,
    pub notices: Vec<CertificateNotice>,
}

impl CertificateNotices {
    /// The most notices one message may carry (its schema's `maxItems`).
    pub const MAX: usize = 1000;
}

/// CertificateNotice is one certificate and what its holder is owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateNotice {
    pub certificate_id: Uuid,
    pub notice: NoticeKind,
}

/// NoticeKind is what the scans decided (`docs/product.md#near-expiry-reminders`, `#past-due-processing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// Stage 1: the expiry is close at hand (a message).
    ExpiryMessage,
    /// Stage 2: very close at hand, please download (a download request).
    DownloadRequest,
    /// Stage 2 for products that say so: the asset itself, forced.
    ForcedTransmission,
    /// Expired unexchanged (revoked): its holder gets a revocation request. An asset that still
    /// awaited exchange goes to past-due processing, and if still valid at `as_of` its holder also
    /// gets a past-due message and a forced transmission of the asset; if not, it expires.
    PastDue,
}

impl NoticeKind {
    /// deliveries is how many deliveries the notice makes at most (a past-due notice for an asset
    /// that went another way, or is no longer valid, makes one: the revocation request).
    pub fn deliveries(self) -> u64 {
        match self {
            NoticeKind::PastDue => 3,
            _ => 1,
        }
    }
}

/// DeliveryKind is what a delivery carries to a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryKind {
    Certificate,
    Asset,
    Message,
    DownloadRequest,
    RevocationRequest,
    Refusal,
    ReceiptCertificate,
    ConfirmationRequest,
}

impl DeliveryKind {
    pub const ALL: [DeliveryKind; 8] = [
        Self::Certificate,
        Self::Asset,
        Self::Message,
        Self::DownloadRequest,
        Self::RevocationRequest,
        Self::Refusal,
        Self::ReceiptCertificate,
        Self::ConfirmationRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::Asset => "asset",
            Self::Message => "message",
            Self::DownloadRequest => "download_request",
            Self::RevocationRequest => "revocation_request",
            Self::Refusal => "refusal",
            Self::ReceiptCertificate => "receipt_certificate",
            Self::ConfirmationRequest => "confirmation_request",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// GatewayDelivery is `delivery`, published to the recipient's gateway queue. Its receipt must
/// carry the SHA-256 of these exact bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayDelivery {
    #[serde(rename = "type")]
    pub message_type: String,
    pub delivery_id: Uuid,
    pub attempt: u32,
    pub kind: DeliveryKind,
    pub terminal_id: String,
    pub gateway_id: String,
    pub sent_at: DateTime<Utc>,
    /// The terminal request this delivery answers, if it answers one (a purchase for an order's
    /// certificates, assets and notices; an exchange for its asset; a refused or repeated request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub content: Value,
}

/// DeliveryReceipt is `delivery.receipt`, a gateway's acknowledgement for its terminal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryReceipt {
    #[serde(rename = "type")]
    pub message_type: String,
    pub delivery_id: Uuid,
    pub attempt: u32,
    pub gateway_id: String,
    pub terminal_id: String,
    /// Lowercase hex SHA-256 of the delivery message body as received.
    pub sha256: String,
    pub received_at: DateTime<Utc>,
    /// The terminal's own signed acknowledgement, relayed by the gateway: the proof of delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledgement: Option<Acknowledgement>,
    /// The gateway's signature, when it signs: as [`SettlementResult::signature`], by the
    /// gateway's registered key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Acknowledgement is a terminal's signed statement that it received and verified a delivery
/// (`docs/product.md#a-round-ends-with-an-acknowledgement`): which attempt (its AMQP message id),
/// and the SHA-256 of the document it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acknowledgement {
    pub terminal_id: String,
    pub delivery_id: Uuid,
    /// The AMQP `message_id` of the attempt the terminal received.
    pub message_id: Uuid,
    /// Lowercase hex SHA-256 of the canonical JSON (RFC 8785) of the delivery's `content`.
    pub content_sha256: String,
    pub verified_at: DateTime<Utc>,
    /// The terminal's signature over the canonical JSON of this object without this field, by the
    /// key it signs its requests with.
    pub signature: String,
}

/// Refusal is the content of a `refusal` delivery: why a terminal's request was not carried out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub request_id: String,
    pub request_type: String,
    pub reason: crate::contracts::refusal::RefusalReason,
    pub detail: String,
}

/// Notice is the content of a `message` delivery: something the terminal's user should read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notice {
    pub code: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// ConfirmationRequest is the content of a `confirmation_request` delivery: an order billed to
/// the terminal by another, which it confirms or declines with `order.confirm` by `confirm_by`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmationRequest {
    pub order_id: Uuid,
    /// The terminal that placed the order.
    pub orderer_terminal_id: String,
    pub product_id: String,
    /// Assets for each recipient.
    pub quantity: u32,
    /// What the payer is charged if it confirms, in minor units.
    pub amount_minor: i64,
    pub currency: String,
    /// An answer after this time is refused, and the order ends `unconfirmed`.
    pub confirm_by: DateTime<Utc>,
}

/// DeadLetterMessage is what is published to a pool's dead-letter queue when assetflow gives up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterMessage {
    #[serde(rename = "type")]
    pub message_type: String,
    pub dead_letter_id: Uuid,
    pub pool: String,
    pub source: String,
    pub original_type: String,
    pub reason: String,
    pub detail: String,
    pub created_at: DateTime<Utc>,
    /// The original message body, when it was valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
}
