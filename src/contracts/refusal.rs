//! Refusals: the machine-readable reasons a terminal's request is not carried out.
//!
//! A refusal is an answer, not a failure: the request is acknowledged, a `refusals` row records
//! it, and where there is a terminal to tell, it gets a `refusal` delivery with the reason code.
//! The codes are listed in `schemas/delivery.schema.json`; a test keeps the two in step.

use serde::{Deserialize, Serialize};

/// RefusalReason is why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The terminal id is not registered.
    UnknownTerminal,
    /// The signature is missing, malformed or does not verify with the terminal's key.
    BadSignature,
    /// `sent_at` is outside the freshness window: a replay, or a badly wrong clock.
    StaleRequest,
    /// The request id was used before for a request with other content.
    RequestIdReused,
    UnknownProduct,
    NotOnSale,
    /// A payer or recipient terminal is not registered.
    UnknownParty,
    /// The payer has no payment method, or its partner is not configured.
    NoPaymentMethod,
    /// The amount overflows, or the quantity is out of range.
    InvalidAmount,
    /// The designated time is missing, in the past, or after the asset expires.
    InvalidDeliveryTime,
    /// The certificate's signature does not verify, or it differs from the one issued.
    CertificateForged,
    CertificateUnknown,
    CertificateExpired,
    CertificateAlreadyExchanged,
    CertificateRevoked,
    /// The presenting terminal is not the certificate's holder.
    CertificateNotHeld,
    /// The asset can no longer be delivered (expired, refunded).
    AssetNotDeliverable,
    /// The request fails its schema: the detail names the field at fault.
    InvalidRequest,
    /// No asset with that id was issued.
    AssetUnknown,
    /// The requesting terminal does not hold the asset.
    AssetNotHeld,
    /// The asset cannot be refunded: delivered, expired, already refunded, or being delivered.
    RefundNotAllowed,
    /// A refund of the asset is already under way.
    RefundPending,
    /// The asset cannot be deferred: it is delivered, being delivered, or not awaiting a delivery.
    DeferNotAllowed,
    /// The product is not sold by booking.
    NotSoldByBooking,
    /// The product's lottery was drawn or its threshold sale closed.
    BookingClosed,
    /// The receipt certificate's condition is not met: not drawn, not produced, or not decided yet.
    ConditionNotMet,
    /// The order a confirmation names does not exist.
    UnknownOrder,
    /// The terminal confirming an order is not its payer; or a holder asks to change an asset it
    /// did not pay for (a gift): the new product would be charged to another terminal.
    NotThePayer,
    /// The order is not waiting for its payer's confirmation (it needs none, or was answered).
    OrderNotAwaitingConfirmation,
    /// The confirmation window has ended: the order is, or is about to be, `unconfirmed`.
    ConfirmationExpired,
    /// The modification notice does not exist, was answered, or its deadline passed.
    ModificationNotOpen,
    /// The payer is another terminal that confirms what it is billed for, and the request cannot
    /// wait for its confirmation (a booking, whose submission is settled at once).
    ConfirmationRequired,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 32] = [
        Self::UnknownTerminal,
        Self::BadSignature,
        Self::StaleRequest,
        Self::RequestIdReused,
        Self::UnknownProduct,
        Self::NotOnSale,
        Self::UnknownParty,
        Self::NoPaymentMethod,
        Self::InvalidAmount,
        Self::InvalidDeliveryTime,
        Self::CertificateForged,
        Self::CertificateUnknown,
        Self::CertificateExpired,
        Self::CertificateAlreadyExchanged,
        Self::CertificateRevoked,
        Self::CertificateNotHeld,
        Self::AssetNotDeliverable,
        Self::InvalidRequest,
        Self::AssetUnknown,
        Self::AssetNotHeld,
        Self::RefundNotAllowed,
        Self::RefundPending,
        Self::DeferNotAllowed,
        Self::NotSoldByBooking,
        Self::BookingClosed,
        Self::ConditionNotMet,
        Self::UnknownOrder,
        Self::NotThePayer,
        Self::OrderNotAwaitingConfirmation,
        Self::ConfirmationExpired,
        Self::ModificationNotOpen,
        Self::ConfirmationRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownTerminal => "unknown_terminal",
            Self::BadSignature => "bad_signature",
            Self::StaleRequest => "stale_request",
            Self::RequestIdReused => "request_id_reused",
            Self::UnknownProduct => "unknown_product",
            Self::NotOnSale => "not_on_sale",
            Self::UnknownParty => "unknown_party",
            Self::NoPaymentMethod => "no_payment_method",
            Self::InvalidAmount => "invalid_amount",
            Self::InvalidDeliveryTime => "invalid_delivery_time",
            Self::CertificateForged => "certificate_forged",
            Self::CertificateUnknown => "certificate_unknown",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateAlreadyExchanged => "certificate_already_exchanged",
            Self::CertificateRevoked => "certificate_revoked",
            Self::CertificateNotHeld => "certificate_not_held",
            Self::AssetNotDeliverable => "asset_not_deliverable",
            Self::InvalidRequest => "invalid_request",
            Self::AssetUnknown => "asset_unknown",
            Self::AssetNotHeld => "asset_not_held",
            Self::RefundNotAllowed => "refund_not_allowed",
            Self::RefundPending => "refund_pending",
            Self::DeferNotAllowed => "defer_not_allowed",
            Self::NotSoldByBooking => "not_sold_by_booking",
            Self::BookingClosed => "booking_closed",
            Self::ConditionNotMet => "condition_not_met",
            Self::UnknownOrder => "unknown_order",
            Self::NotThePayer => "not_the_payer",
            Self::OrderNotAwaitingConfirmation => "order_not_awaiting_confirmation",
            Self::ConfirmationExpired => "confirmation_expired",
            Self::ModificationNotOpen => "modification_not_open",
            Self::ConfirmationRequired => "confirmation_required",
        }
    }
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Refused is a refusal on its way out of a handler: the reason and a sentence for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: RefusalReason,
    pub detail: String,
}

impl Refused {
    pub fn new(reason: RefusalReason, detail: impl Into<String>) -> Refused {
        Refused { reason, detail: detail.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_their_serde_names() {
        for reason in RefusalReason::ALL {
            assert_eq!(serde_json::to_value(reason).unwrap(), reason.as_str());
        }
    }
}
