//! Terminal requests and every other message on the requests exchange, from raw bytes: the body
//! check a pool makes first (`messages::parse_body`), the schema check and the typed read
//! (`schema::decode`), then the signature check of a terminal request
//! (`requests::check_signature`) against a registered key. None of it may panic, whatever the
//! bytes, and no fuzzed request may pass the signature check.
#![no_main]

use std::sync::OnceLock;

use assetflow::contracts::schema;
use assetflow::contracts::messages::{self, ExchangeRequest, PurchaseRequest, kinds};
use libfuzzer_sys::fuzz_target;

/// registered_key is a terminal's PEM public key, whose private half is thrown away.
fn registered_key() -> &'static str {
    static PEM: OnceLock<String> = OnceLock::new();
    PEM.get_or_init(|| {
        let key = assetflow::crypto::generate_key_pair().expect("a key pair");
        assetflow::crypto::public_key_pem(&key).expect("a PEM public key")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok((message_type, json)) = messages::parse_body(data) else {
        return;
    };
    let terminal_request = match message_type.as_str() {
        kinds::ORDER_PURCHASE => schema::decode::<PurchaseRequest>(&message_type, &json).is_ok(),
        kinds::CERTIFICATE_EXCHANGE => schema::decode::<ExchangeRequest>(&message_type, &json).is_ok(),
        other => {
            // Any other type: its schema when it has one, as the pool checks it.
            let _ = messages::schema::validate(other, &json);
            false
        }
    };
    if terminal_request {
        let verdict = assetflow::domain::requests::check_signature(registered_key(), &json);
        assert!(verdict.is_err(), "a fuzzed request passed the signature check");
    }
});
