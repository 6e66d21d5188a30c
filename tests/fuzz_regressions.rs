//! Regression tests for the fuzz targets in `fuzz/` (run by `ops/fuzz`): the hard inputs of the
//! corpus, fed to the same entry points the targets and the pools use
//! (`messages::parse_body`, `schema::decode`, `requests::check_signature`, `crypto`), each
//! asserting a clean, specific error. An input that once crashed a target belongs here too, with
//! the target's name and what it did.

use assetflow::contracts::messages::{
    self, DeliveryReceipt, ExchangeRequest, MAX_BODY, PurchaseRequest, SettlementResult, kinds,
};
use assetflow::contracts::schema;
use assetflow::crypto;
use serde_json::{Value, json};

/// body_error is parse_body's error for `body`, which must be one.
fn body_error(body: &[u8]) -> String {
    match messages::parse_body(body) {
        Ok((t, _)) => panic!("a body of {} bytes was accepted as {t:?}", body.len()),
        Err(e) => e,
    }
}

/// purchase_error is the error for a purchase request body that parses but is not a valid request.
fn purchase_error(body: &str) -> String {
    let (message_type, json) = messages::parse_body(body.as_bytes()).expect("the body parses");
    match schema::decode::<PurchaseRequest>(&message_type, &json) {
        Ok(_) => panic!("accepted: {body}"),
        Err(e) => e,
    }
}

fn purchase(quantity: &str) -> String {
    format!(
        r#"{{"type":"order.purchase","request_id":"r-1","terminal_id":"t-1","sent_at":"2026-11-21T09:29:58Z",
            "product_id":"p-1","quantity":{quantity},"signature":"MEUCIB99h6BZF5PF"}}"#
    )
}

#[test]
fn huge_bodies_are_refused_by_their_size_before_they_are_parsed() {
    let filler = "a".repeat(MAX_BODY);
    let huge = format!(r#"{{"type":"order.purchase","x":"{filler}"}}"#);
    assert!(body_error(huge.as_bytes()).contains(&format!("exceeds the {MAX_BODY}-byte limit")));
    // Exactly at the limit it is read, and then refused by the schema (an unknown field).
    let padding = MAX_BODY - r#"{"type":"order.purchase","x":""}"#.len();
    let at_limit = format!(r#"{{"type":"order.purchase","x":"{}"}}"#, "a".repeat(padding));
    assert_eq!(at_limit.len(), MAX_BODY);
    let (message_type, json) = messages::parse_body(at_limit.as_bytes()).unwrap();
    let err = schema::decode::<PurchaseRequest>(&message_type, &json).unwrap_err();
    assert!(err.contains("\"request_id\" is a required property"), "{err}");
    // A huge signature inside the limit is refused by the schema's maxLength, not verified.
    let signature = "A".repeat(200_000);
    let err = purchase_error(&purchase("1").replace("MEUCIB99h6BZF5PF", &signature));
    assert!(err.contains("/signature"), "{err}");
}

#[test]
fn bodies_that_are_not_utf8_are_refused() {
    for body in [
        &b"{\"type\":\"order.purchase\",\"request_id\":\"\xff\"}"[..],
        b"\xc0\xaf",                                  // an overlong encoding of '/'
        b"{\"type\":\"\xed\xa0\x80\"}",               // a UTF-16 surrogate encoded as UTF-8
        b"\xef\xbb\xbf{\"type\":\"order.purchase\"}", // a byte-order mark, then JSON
        b"\x00\x00\x00{",
    ] {
        let err = body_error(body);
        assert!(err.starts_with("body is not UTF-8") || err.starts_with("body is not JSON"), "{err}");
    }
    assert!(body_error(b"{\"type\":\"\xed\xa0\x80\"}").starts_with("body is not UTF-8"));
    // An escaped lone surrogate is valid UTF-8 but not a valid JSON string.
    assert!(body_error(br#"{"type":"order.purchase","request_id":"\ud800"}"#).starts_with("body is not JSON"));
}

#[test]
fn deep_nesting_is_refused_or_handled_without_exhausting_the_stack() {
    // serde_json stops at 128 levels; a body nested deeper is malformed.
    for depth in [129, 10_000, 40_000] {
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(body_error(body.as_bytes()).contains("recursion limit exceeded"), "depth {depth}");
        let body = format!(
            r#"{{"type":"certificate.exchange","certificate":{}1{}}}"#,
            "{\"a\":".repeat(depth),
            "}".repeat(depth)
        );
        assert!(body_error(body.as_bytes()).contains("recursion limit exceeded"), "depth {depth}");
    }
    // Just inside the limit: a certificate nested 120 deep fits the schema's "object", and the
    // signature check canonicalises it and refuses it.
    let nested = format!("{}1{}", "{\"a\":".repeat(120), "}".repeat(120));
    let body = format!(
        r#"{{"type":"certificate.exchange","request_id":"r-1","terminal_id":"t-1","sent_at":"2026-11-21T09:29:58Z",
            "certificate":{nested},"signature":"MEUCIB99h6BZF5PF"}}"#
    );
    let (message_type, json) = messages::parse_body(body.as_bytes()).unwrap();
    schema::decode::<ExchangeRequest>(&message_type, &json).expect("a deep certificate fits the schema");
    let key = crypto::generate_key_pair().unwrap();
    let pem = crypto::public_key_pem(&key).unwrap();
    let err = assetflow::domain::requests::check_signature(&pem, &json).unwrap_err();
    assert!(matches!(err, crypto::CryptoError::BadSignature), "{err}");
}

#[test]
fn overflowing_negative_zero_and_fractional_quantities_are_refused() {
    // Too large for a 64-bit float: the JSON parser refuses it.
    assert!(body_error(purchase("1e400").as_bytes()).contains("number out of range"));
    for (quantity, expected) in [
        ("0", "/quantity: 0 is less than the minimum of 1"),
        ("-1", "/quantity: -1 is less than the minimum of 1"),
        ("-9223372036854775809", "is less than the minimum of 1"),
        ("10001", "/quantity: 10001 is greater than the maximum of 10000"),
        ("4294967296", "is greater than the maximum of 10000"),
        ("18446744073709551616", "is greater than the maximum of 10000"),
        ("1.5", "/quantity: 1.5 is not of type \"integer\""),
        ("\"1\"", "/quantity: \"1\" is not of type \"integer\""),
        ("null", "/quantity: null is not of type \"integer\""),
        ("true", "is not of type \"integer\""),
    ] {
        let err = purchase_error(&purchase(quantity));
        assert!(err.contains(expected), "quantity {quantity}: {err}");
    }
    // In range, it is read.
    let (t, json) = messages::parse_body(purchase("10000").as_bytes()).unwrap();
    assert_eq!(schema::decode::<PurchaseRequest>(&t, &json).unwrap().quantity, 10_000);
}

#[test]
fn bodies_without_a_string_type_are_refused() {
    for body in [
        &b""[..],
        b"null",
        b"[]",
        b"\"order.purchase\"",
        b"{}",
        b"{\"type\":1}",
        b"{\"type\":null}",
        b"{\"Type\":\"order.purchase\"}",
    ] {
        let err = body_error(body);
        assert!(
            err.starts_with("body is not JSON") || err.contains("not a JSON object with a string \"type\""),
            "{:?}: {err}",
            String::from_utf8_lossy(body)
        );
    }
    // An unknown type has no schema, and says so.
    let (t, json) = messages::parse_body(br#"{"type":"order.refund"}"#).unwrap();
    assert!(schema::decode::<Value>(&t, &json).unwrap_err().contains("no schema for message type \"order.refund\""));
    // A duplicated key keeps its last value, the one the schema then checks.
    let (t, _) = messages::parse_body(br#"{"type":"order.purchase","type":"delivery.receipt"}"#).unwrap();
    assert_eq!(t, kinds::DELIVERY_RECEIPT);
}

#[test]
fn signatures_of_every_bad_shape_are_refused_cleanly() {
    let key = crypto::generate_key_pair().unwrap();
    let pem = crypto::public_key_pem(&key).unwrap();
    let mut signed = json!({"type": "order.purchase", "request_id": "r-1", "quantity": 1});
    crypto::sign_document(&key, &mut signed).unwrap();
    assetflow::domain::requests::check_signature(&pem, &signed).expect("the control verifies");

    let with_signature = |signature: Value| {
        let mut doc = signed.clone();
        doc["signature"] = signature;
        assetflow::domain::requests::check_signature(&pem, &doc).unwrap_err()
    };
    use crypto::CryptoError::*;
    assert!(matches!(with_signature(json!("")), BadSignature));
    assert!(matches!(with_signature(json!("not base64!")), MalformedSignature));
    assert!(matches!(with_signature(json!("AAAA")), BadSignature));
    assert!(matches!(with_signature(json!("MAYCAQACAQA=")), BadSignature)); // DER of r = s = 0
    assert!(matches!(with_signature(json!("A".repeat(1 << 20))), BadSignature));
    assert!(matches!(with_signature(json!(12)), MissingSignature));
    assert!(matches!(with_signature(json!(null)), MissingSignature));
    assert!(matches!(assetflow::domain::requests::check_signature(&pem, &json!([1, 2])), Err(MissingSignature)));
    assert!(matches!(assetflow::domain::requests::check_signature(&pem, &json!("x")), Err(MissingSignature)));

    // Anything registered as a key: garbage, a private key, a certificate, an RSA key.
    let rsa = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let rsa_pem = String::from_utf8(rsa.public_key_to_pem().unwrap()).unwrap();
    let private_pem = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    for registered in ["", "garbage", "-----BEGIN PUBLIC KEY-----\n\n-----END PUBLIC KEY-----\n", &private_pem] {
        let err = assetflow::domain::requests::check_signature(registered, &signed).unwrap_err();
        assert!(matches!(err, BadPublicKey(_)), "{registered:?}: {err}");
    }
    assert!(matches!(assetflow::domain::requests::check_signature(&rsa_pem, &signed).unwrap_err(), BadSignature));
}

#[test]
fn signed_documents_verify_after_a_round_trip_whatever_their_numbers_and_strings() {
    // The signature target's property: what assetflow signs verifies on the other side, because
    // both sides sign the canonical JSON. Numbers and escapes are where canonical forms differ.
    let key = crypto::generate_key_pair().unwrap();
    for value in [
        json!(1e21),
        json!(1e-7),
        json!(5e-324),
        json!(0.1),
        json!(-0.0),
        json!(1.7976931348623157e308),
        json!(u64::MAX),
        json!(i64::MIN),
        json!("\u{0}\u{1f}\u{7f}\u{2028}\u{fffd}é😀\"\\/"),
        json!({"\u{10000}": 1, "\u{e000}": 2, "": 3}),
    ] {
        let mut doc = json!({"value": value});
        crypto::sign_document(&key, &mut doc).unwrap();
        let travelled: Value = serde_json::from_str(&doc.to_string()).unwrap();
        crypto::verify_document(&key, &travelled).unwrap_or_else(|e| panic!("{value}: {e}"));
        let mut altered = travelled.clone();
        altered["extra"] = json!(true);
        assert!(crypto::verify_document(&key, &altered).is_err());
    }
}

#[test]
fn bad_partner_results_and_gateway_receipts_are_refused_naming_the_field() {
    let result = |change: &str| {
        let body = format!(
            r#"{{"type":"settlement.result","settlement_id":"018f3b2e-8a4c-7d11-9c2e-5b1f0e6a7c3d",
                "partner_id":"card-co","outcome":"settled","partner_reference":"x","sent_at":"2026-11-21T09:30:01Z"{change}}}"#
        );
        let (_, json) = messages::parse_body(body.as_bytes()).unwrap();
        schema::decode::<SettlementResult>(kinds::SETTLEMENT_RESULT, &json)
    };
    result("").expect("the control is a valid result");
    for (change, expected) in [
        (r#","settlement_id":"not-a-uuid""#, "/settlement_id"),
        (r#","outcome":"maybe""#, "/outcome"),
        (r#","partner_id":"""#, "/partner_id"),
        (r#","partner_id":"../other""#, "/partner_id"),
        (r#","sent_at":"yesterday""#, "/sent_at"),
        // It fits the schema's pattern, but it is no date: the schema's format check names it.
        (r#","sent_at":"2026-02-30T00:00:00Z""#, "/sent_at"),
        (r#","amount_minor":-1"#, "Additional properties are not allowed"),
    ] {
        let err = result(change).unwrap_err();
        assert!(err.contains(expected), "{change}: {err}");
    }

    let receipt = |change: &str| {
        let body = format!(
            r#"{{"type":"delivery.receipt","delivery_id":"018f3b2e-8a4c-7d11-9c2e-5b1f0e6a7c3d","attempt":1,
                "gateway_id":"gw-1","terminal_id":"t-1","sha256":"{}","received_at":"2026-11-21T09:30:01Z"{change}}}"#,
            "ab".repeat(32)
        );
        let (_, json) = messages::parse_body(body.as_bytes()).unwrap();
        schema::decode::<DeliveryReceipt>(kinds::DELIVERY_RECEIPT, &json)
    };
    receipt("").expect("the control is a valid receipt");
    for (change, expected) in [
        (r#","sha256":"AB""#, "/sha256"),
        (r#","sha256":"zz""#, "/sha256"),
        (r#","attempt":0"#, "/attempt: 0 is less than the minimum of 1"),
        (r#","attempt":-1"#, "/attempt"),
        // Within the schema (no maximum) but not a 32-bit attempt number: refused when read.
        (r#","attempt":4294967296"#, "delivery.receipt: invalid value: integer `4294967296`"),
        // 1e3 is an integer to JSON Schema, but a float to the reader.
        (r#","attempt":1e3"#, "expected u32"),
        (r#","delivery_id":"018F3B2E8A4C7D119C2E5B1F0E6A7C3D0""#, "/delivery_id"),
    ] {
        let err = receipt(change).unwrap_err();
        assert!(err.contains(expected), "{change}: {err}");
    }
}
