//! The message schemas in `schemas/` agree with themselves, with the Rust types and with the
//! AsyncAPI document.
//!
//! Every schema's `examples` must pass the same validation the pools apply to incoming messages,
//! and must deserialize into the message's Rust type; an unknown field must be rejected, as
//! `deny_unknown_fields` would; `asyncapi.yaml` must reference every schema file; and the refusal
//! reasons listed in `delivery.schema.json` must be exactly the codes of
//! [`assetflow::contracts::refusal::RefusalReason`].

use std::collections::BTreeSet;

use assetflow::contracts::messages::{
    BookingRequest, BookingsDecide, CertificateNotices, ChangeRequest, ConfirmRequest, ConfirmationRequest,
    DeadLetterMessage, DeferRequest, DeliveryKind, DeliveryReceipt, DeliveryRequested, ExchangeRequest,
    GatewayDelivery, IssuanceRequested, IssuerChangeMessage, ModificationAnswer, ModificationsDue, Notice,
    PurchaseRequest, RefundRequest, Refusal, SettlementInstruction, SettlementResult, SubmitRequest, kinds,
};
use assetflow::contracts::refusal::RefusalReason;
use assetflow::contracts::schema::{SCHEMAS, validate};
use serde_json::{Value, json};

/// The AsyncAPI document, which references every schema file.
const ASYNCAPI: &str = include_str!("../schemas/asyncapi.yaml");

/// schema parses the schema document of a message type.
fn schema(kind: &str) -> Value {
    let (_, text) =
        SCHEMAS.iter().find(|(k, _)| *k == kind).unwrap_or_else(|| panic!("no schema for message type {kind:?}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("schemas/{kind}.schema.json is not JSON: {e}"))
}

/// examples returns the `examples` of a schema document, which must be a non-empty array.
fn examples(kind: &str, schema: &Value) -> Vec<Value> {
    let examples =
        schema["examples"].as_array().unwrap_or_else(|| panic!("schemas/{kind}.schema.json has no examples array"));
    assert!(!examples.is_empty(), "schemas/{kind}.schema.json has no examples");
    examples.clone()
}

/// deserialize reads a message into the Rust type of its message type, as a handler would after
/// validation.
fn deserialize(kind: &str, message: &Value) -> Result<(), serde_json::Error> {
    let message = message.clone();
    match kind {
        kinds::ORDER_PURCHASE => serde_json::from_value::<PurchaseRequest>(message).map(drop),
        kinds::CERTIFICATE_EXCHANGE => serde_json::from_value::<ExchangeRequest>(message).map(drop),
        kinds::ORDER_CONFIRM => serde_json::from_value::<ConfirmRequest>(message).map(drop),
        kinds::SETTLEMENT_INSTRUCTION => serde_json::from_value::<SettlementInstruction>(message).map(drop),
        kinds::SETTLEMENT_RESULT => serde_json::from_value::<SettlementResult>(message).map(drop),
        kinds::ISSUANCE_REQUESTED => serde_json::from_value::<IssuanceRequested>(message).map(drop),
        kinds::DELIVERY_REQUESTED => serde_json::from_value::<DeliveryRequested>(message).map(drop),
        kinds::CERTIFICATE_NOTICES => serde_json::from_value::<CertificateNotices>(message).map(drop),
        kinds::DELIVERY => serde_json::from_value::<GatewayDelivery>(message).map(drop),
        kinds::DELIVERY_RECEIPT => serde_json::from_value::<DeliveryReceipt>(message).map(drop),
        kinds::DEAD_LETTER => serde_json::from_value::<DeadLetterMessage>(message).map(drop),
        kinds::ASSET_REFUND => serde_json::from_value::<RefundRequest>(message).map(drop),
        kinds::ASSET_DEFER => serde_json::from_value::<DeferRequest>(message).map(drop),
        kinds::ASSET_CHANGE => serde_json::from_value::<ChangeRequest>(message).map(drop),
        kinds::ORDER_BOOKING => serde_json::from_value::<BookingRequest>(message).map(drop),
        kinds::RECEIPT_SUBMIT => serde_json::from_value::<SubmitRequest>(message).map(drop),
        kinds::BOOKINGS_DECIDE => serde_json::from_value::<BookingsDecide>(message).map(drop),
        kinds::MODIFICATION_ANSWER => serde_json::from_value::<ModificationAnswer>(message).map(drop),
        kinds::ISSUER_CHANGE => serde_json::from_value::<IssuerChangeMessage>(message).map(drop),
        kinds::MODIFICATIONS_DUE => serde_json::from_value::<ModificationsDue>(message).map(drop),
        other => panic!("message type {other:?} has a schema but no Rust type in this test"),
    }
}

/// Every example in every schema passes validation and deserializes into its Rust type.
#[test]
fn every_example_is_valid_and_deserializes() {
    for (kind, _) in SCHEMAS {
        let schema = schema(kind);
        assert_eq!(schema["properties"]["type"]["const"], json!(kind), "schemas/{kind}.schema.json: type const");
        for (i, example) in examples(kind, &schema).iter().enumerate() {
            if let Err(e) = validate(kind, example) {
                panic!("schemas/{kind}.schema.json example {i} is rejected by its own schema: {e}");
            }
            if let Err(e) = deserialize(kind, example) {
                panic!("schemas/{kind}.schema.json example {i} does not deserialize: {e}");
            }
        }
    }
}

/// An example with an unknown top-level field is rejected, as `deny_unknown_fields` would reject it.
#[test]
fn an_unknown_field_is_rejected() {
    for (kind, _) in SCHEMAS {
        let schema = schema(kind);
        for (i, mut example) in examples(kind, &schema).into_iter().enumerate() {
            example
                .as_object_mut()
                .unwrap_or_else(|| panic!("schemas/{kind}.schema.json example {i} is not an object"))
                .insert("unexpected".into(), json!(1));
            assert!(
                validate(kind, &example).is_err(),
                "schemas/{kind}.schema.json example {i} with an unknown field is accepted"
            );
        }
    }
}

/// A purchase with a negative quantity, or designated without a time, is rejected.
#[test]
fn purchase_rules_are_enforced() {
    let schema = schema(kinds::ORDER_PURCHASE);
    let example = examples(kinds::ORDER_PURCHASE, &schema).remove(0);

    let mut negative = example.clone();
    negative["quantity"] = json!(-1);
    assert!(validate(kinds::ORDER_PURCHASE, &negative).is_err(), "a negative quantity is accepted");

    let mut untimed = example.clone();
    untimed["delivery"] = json!({"mode": "designated"});
    assert!(validate(kinds::ORDER_PURCHASE, &untimed).is_err(), "designated without `at` is accepted");

    let mut timed = example;
    timed["delivery"] = json!({"mode": "designated", "at": "2026-12-24T00:00:00Z"});
    validate(kinds::ORDER_PURCHASE, &timed).expect("designated with `at` is accepted");
}

/// A `date-time` that fits the pattern but is no date, or a `uuid` that is no UUID, is refused by
/// the schema, and the error names the field.
#[test]
fn formats_are_checked_and_the_error_names_the_field() {
    let purchase = examples(kinds::ORDER_PURCHASE, &schema(kinds::ORDER_PURCHASE)).remove(0);
    let mut no_date = purchase.clone();
    no_date["sent_at"] = json!("2026-02-30T00:00:00Z");
    let error = validate(kinds::ORDER_PURCHASE, &no_date).expect_err("February 30th is refused");
    assert!(error.starts_with("/sent_at: "), "{error}");

    let result = examples(kinds::SETTLEMENT_RESULT, &schema(kinds::SETTLEMENT_RESULT)).remove(0);
    let mut no_uuid = result.clone();
    no_uuid["settlement_id"] = json!("not-a-uuid");
    let error = validate(kinds::SETTLEMENT_RESULT, &no_uuid).expect_err("a settlement id that is no UUID is refused");
    assert!(error.starts_with("/settlement_id: "), "{error}");
    validate(kinds::SETTLEMENT_RESULT, &result).expect("the example itself is valid");
}

/// The delivery examples cover every delivery kind, and the content of a refusal or a notice
/// deserializes into its Rust type.
#[test]
fn delivery_examples_cover_every_kind() {
    let schema = schema(kinds::DELIVERY);
    let mut seen = BTreeSet::new();
    for example in examples(kinds::DELIVERY, &schema) {
        let kind = example["kind"].as_str().expect("a delivery example has a kind");
        let kind = DeliveryKind::parse(kind).unwrap_or_else(|| panic!("unknown delivery kind {kind:?}"));
        let content = example["content"].clone();
        match kind {
            DeliveryKind::Refusal => {
                let _: Refusal = serde_json::from_value(content).expect("a refusal's content is a Refusal");
            }
            DeliveryKind::Message | DeliveryKind::DownloadRequest | DeliveryKind::RevocationRequest => {
                let _: Notice = serde_json::from_value(content).expect("a notice's content is a Notice");
            }
            // The certificate, asset and receipt certificate documents have no Rust type: the schema
            // is their contract.
            DeliveryKind::Certificate | DeliveryKind::Asset | DeliveryKind::ReceiptCertificate => {}
            DeliveryKind::ConfirmationRequest => {
                let _: ConfirmationRequest =
                    serde_json::from_value(content).expect("a confirmation request's content is a ConfirmationRequest");
            }
        }
        seen.insert(kind.as_str());
    }
    let all: BTreeSet<&str> = DeliveryKind::ALL.map(|k| k.as_str()).into_iter().collect();
    assert_eq!(seen, all, "delivery.schema.json has no example of some delivery kinds");
}

/// The AsyncAPI document names every schema file.
#[test]
fn asyncapi_references_every_schema() {
    for (kind, _) in SCHEMAS {
        let file = format!("{kind}.schema.json");
        assert!(ASYNCAPI.contains(&file), "schemas/asyncapi.yaml does not mention {file}");
    }
}

/// The refusal reasons of `delivery.schema.json` are exactly the codes of `RefusalReason`.
#[test]
fn refusal_reasons_match_the_rust_enum() {
    let schema = schema(kinds::DELIVERY);
    let reason = &schema["$defs"]["refusal_reason"];
    let listed: Vec<&str> = reason["enum"]
        .as_array()
        .expect("$defs/refusal_reason has an enum")
        .iter()
        .map(|code| code.as_str().expect("a refusal reason is a string"))
        .collect();
    let listed_set: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(listed.len(), listed_set.len(), "$defs/refusal_reason lists a code twice");

    let codes: BTreeSet<&str> = RefusalReason::ALL.map(|r| r.as_str()).into_iter().collect();
    assert_eq!(listed_set, codes, "$defs/refusal_reason and assetflow::contracts::refusal::RefusalReason differ");

    // Each code also has its own description, in the same order as the enum.
    let described: Vec<&str> = reason["oneOf"]
        .as_array()
        .expect("$defs/refusal_reason describes each code")
        .iter()
        .map(|option| option["const"].as_str().expect("a described code is a string"))
        .collect();
    assert_eq!(described, listed, "$defs/refusal_reason: oneOf and enum differ");
}
