//! JSON Schema validation of messages, against the files in `schemas/` (compiled in).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::messages::kinds;

/// SCHEMAS maps each message type to its schema document.
pub const SCHEMAS: &[(&str, &str)] = &[
    (kinds::ORDER_PURCHASE, include_str!("../../schemas/order.purchase.schema.json")),
    (kinds::CERTIFICATE_EXCHANGE, include_str!("../../schemas/certificate.exchange.schema.json")),
    (kinds::ORDER_CONFIRM, include_str!("../../schemas/order.confirm.schema.json")),
    (kinds::SETTLEMENT_INSTRUCTION, include_str!("../../schemas/settlement.instruction.schema.json")),
    (kinds::SETTLEMENT_RESULT, include_str!("../../schemas/settlement.result.schema.json")),
    (kinds::ISSUANCE_REQUESTED, include_str!("../../schemas/issuance.requested.schema.json")),
    (kinds::DELIVERY_REQUESTED, include_str!("../../schemas/delivery.requested.schema.json")),
    (kinds::CERTIFICATE_NOTICES, include_str!("../../schemas/certificate.notices.schema.json")),
    (kinds::DELIVERY, include_str!("../../schemas/delivery.schema.json")),
    (kinds::DELIVERY_RECEIPT, include_str!("../../schemas/delivery.receipt.schema.json")),
    (kinds::DEAD_LETTER, include_str!("../../schemas/dead_letter.schema.json")),
    (kinds::ASSET_REFUND, include_str!("../../schemas/asset.refund.schema.json")),
    (kinds::ASSET_DEFER, include_str!("../../schemas/asset.defer.schema.json")),
    (kinds::ASSET_CHANGE, include_str!("../../schemas/asset.change.schema.json")),
    (kinds::ORDER_BOOKING, include_str!("../../schemas/order.booking.schema.json")),
    (kinds::RECEIPT_SUBMIT, include_str!("../../schemas/receipt.submit.schema.json")),
    (kinds::BOOKINGS_DECIDE, include_str!("../../schemas/bookings.decide.schema.json")),
    (kinds::ISSUER_CHANGE, include_str!("../../schemas/issuer.change.schema.json")),
    (kinds::MODIFICATION_ANSWER, include_str!("../../schemas/modification.answer.schema.json")),
    (kinds::MODIFICATIONS_DUE, include_str!("../../schemas/modifications.due.schema.json")),
];

fn validators() -> &'static HashMap<&'static str, jsonschema::Validator> {
    static VALIDATORS: OnceLock<HashMap<&'static str, jsonschema::Validator>> = OnceLock::new();
    VALIDATORS.get_or_init(|| {
        SCHEMAS
            .iter()
            .map(|(kind, text)| {
                let schema: Value = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("schemas/{kind}.schema.json is not JSON: {e}"));
                // Formats are checked too: a `date-time` that fits the pattern but is no date
                // (`2026-02-30T00:00:00Z`) is refused here, naming its field, and not deep in a
                // handler as a transient failure.
                let validator = jsonschema::options()
                    .should_validate_formats(true)
                    .build(&schema)
                    .unwrap_or_else(|e| panic!("schemas/{kind}.schema.json is not a valid schema: {e}"));
                (*kind, validator)
            })
            .collect()
    })
}

/// is_known says whether a message type has a schema, that is whether assetflow knows it.
pub fn is_known(message_type: &str) -> bool {
    SCHEMAS.iter().any(|(kind, _)| *kind == message_type)
}

/// validate checks a message against its type's schema. The error names the first offending
/// field, for example `/quantity: -1 is less than the minimum of 1`.
pub fn validate(message_type: &str, message: &Value) -> Result<(), String> {
    let validator =
        validators().get(message_type).ok_or_else(|| format!("no schema for message type {message_type:?}"))?;
    let errors: Vec<String> = validator
        .iter_errors(message)
        .take(3)
        .map(|e| {
            let path = e.instance_path().to_string();
            format!("{}: {}", if path.is_empty() { "/" } else { &path }, e)
        })
        .collect();
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}

/// decode checks a message against its type's schema, then deserializes it: the schema check a
/// pool makes before the handler runs, and the handler's own read. The error names the offending
/// field.
pub fn decode<T: DeserializeOwned>(message_type: &str, json: &Value) -> Result<T, String> {
    validate(message_type, json)?;
    T::deserialize(json).map_err(|e| format!("{message_type}: {e}"))
}
