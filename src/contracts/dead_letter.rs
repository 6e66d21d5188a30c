//! Dead-letter reasons: why assetflow gave up on a message, a settlement or a transmission. The
//! codes are the `reason` of `schemas/dead_letter.schema.json` and a metric label.

/// DeadLetterReason is why something was dead-lettered: a bounded set, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The body is not UTF-8 JSON, or not an object, or too large.
    Malformed,
    /// The `type` is not one this queue's handlers take.
    UnknownMessageType,
    /// The message fails its JSON Schema.
    SchemaViolation,
    /// The routing key matched no binding on the requests exchange.
    Unroutable,
    /// The handler kept failing with transient errors up to the delivery limit, or it panicked.
    HandlerFailed,
    /// The handler found the message can never be processed.
    Unprocessable,
    /// A settlement result for a settlement assetflow does not know, or from another partner.
    UnknownSettlement,
    /// A second settlement result that contradicts the first.
    ConflictingResult,
    /// A receipt for a delivery or attempt assetflow does not know, or from another gateway.
    UnknownDelivery,
    /// A settlement instruction the partner never answered, after every attempt.
    SettlementTimeout,
    /// A transmission whose retries ran out.
    RetriesExhausted,
    /// A settlement result or delivery receipt whose sender is not proven to be the partner or
    /// gateway it answers for: no or another broker user (`user_id`), or no or a bad signature by
    /// the party's registered key (`docs/security.md#who-may-answer`).
    UnauthenticatedParty,
    /// A delivery receipt without the terminal's signed acknowledgement its product requires, or
    /// with one that is not the terminal's or does not name the attempt it acknowledges.
    InvalidProof,
    /// The broker dead-lettered it itself (its delivery limit, a rejection) while assetflow could
    /// not record it; the dead-letter recorder found it in the dead-letter queue.
    BrokerDeadLettered,
    /// A change of product could not be undone: the partner refused to refund its new payment
    /// (`docs/product.md#changes`). An operator settles it with the partner.
    CompensationRefused,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 15] = [
        DeadLetterReason::Malformed,
        DeadLetterReason::UnknownMessageType,
        DeadLetterReason::SchemaViolation,
        DeadLetterReason::Unroutable,
        DeadLetterReason::HandlerFailed,
        DeadLetterReason::Unprocessable,
        DeadLetterReason::UnknownSettlement,
        DeadLetterReason::ConflictingResult,
        DeadLetterReason::UnknownDelivery,
        DeadLetterReason::SettlementTimeout,
        DeadLetterReason::RetriesExhausted,
        DeadLetterReason::UnauthenticatedParty,
        DeadLetterReason::InvalidProof,
        DeadLetterReason::BrokerDeadLettered,
        DeadLetterReason::CompensationRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Malformed => "malformed",
            DeadLetterReason::UnknownMessageType => "unknown_message_type",
            DeadLetterReason::SchemaViolation => "schema_violation",
            DeadLetterReason::Unroutable => "unroutable",
            DeadLetterReason::HandlerFailed => "handler_failed",
            DeadLetterReason::Unprocessable => "unprocessable",
            DeadLetterReason::UnknownSettlement => "unknown_settlement",
            DeadLetterReason::ConflictingResult => "conflicting_result",
            DeadLetterReason::UnknownDelivery => "unknown_delivery",
            DeadLetterReason::SettlementTimeout => "settlement_timeout",
            DeadLetterReason::RetriesExhausted => "retries_exhausted",
            DeadLetterReason::UnauthenticatedParty => "unauthenticated_party",
            DeadLetterReason::InvalidProof => "invalid_proof",
            DeadLetterReason::BrokerDeadLettered => "broker_dead_lettered",
            DeadLetterReason::CompensationRefused => "compensation_refused",
        }
    }
}
