//! Signatures on arbitrary input (`crypto`): canonical JSON, ECDSA P-256 verification with any
//! signature text, and any text registered as a terminal's public key. Two properties are
//! checked besides "never panics":
//! - a document signed by assetflow verifies after a round trip through its JSON text, whatever
//!   it holds (numbers, escapes, key order), because both sides sign the canonical form;
//! - changing the signed document makes the signature fail.
#![no_main]

use std::sync::OnceLock;

use assetflow::crypto;
use libfuzzer_sys::fuzz_target;
use openssl::pkey::{PKey, Private};
use serde_json::Value;

/// key is the signing key of this run: any key will do, the properties hold for all of them.
fn key() -> &'static PKey<Private> {
    static KEY: OnceLock<PKey<Private>> = OnceLock::new();
    KEY.get_or_init(|| crypto::generate_key_pair().expect("a key pair"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match selector % 3 {
        // Any text as a registered public key, and any document against it.
        0 => {
            let _ = assetflow::domain::requests::check_signature(&text, &serde_json::json!({"signature": "AAAA"}));
        }
        // Any signature text over any bytes.
        1 => {
            let (signature, bytes) = rest.split_at(rest.len() / 2);
            let _ = crypto::verify(key(), bytes, &String::from_utf8_lossy(signature));
        }
        // Any JSON document: verify as received, then sign, round-trip and verify.
        _ => {
            let Ok(mut document) = serde_json::from_slice::<Value>(rest) else {
                return;
            };
            let _ = crypto::verify_document(key(), &document);
            let _ = crypto::canonical_json(&document);
            if crypto::sign_document(key(), &mut document).is_err() {
                assert!(!document.is_object(), "an object could not be signed");
                return;
            }
            let travelled: Value = serde_json::from_str(&document.to_string()).expect("a signed document re-parses");
            if let Err(e) = crypto::verify_document(key(), &travelled) {
                panic!("a signed document no longer verifies after a round trip: {e}: {}", document);
            }
            let mut altered = travelled.clone();
            altered.as_object_mut().expect("an object").insert("__fuzz".into(), Value::Bool(true));
            assert!(crypto::verify_document(key(), &altered).is_err(), "an altered document still verifies");
        }
    }
});
