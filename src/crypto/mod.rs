//! Signatures and digests: canonical JSON, ECDSA P-256 with SHA-256, and the key ring.
//!
//! What a signature covers is always the canonical JSON (RFC 8785) of a document without its
//! `signature` field, so that the signer and the verifier agree byte for byte whatever the key
//! order or white space of the JSON that travelled.

mod keys;

pub use keys::{KeyRing, generate_key_pair, load_private_key, public_key_pem, write_private_key};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use openssl::hash::MessageDigest;
use openssl::pkey::{HasPublic, PKey, PKeyRef, Private};
use openssl::sign::{Signer, Verifier};
use serde_json::Value;

/// The field that carries a document's signature.
pub const SIGNATURE_FIELD: &str = "signature";

/// CryptoError is why a document could not be signed or verified.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the document is not a JSON object")]
    NotAnObject,
    #[error("the document has no signature")]
    MissingSignature,
    #[error("the signature is not base64")]
    MalformedSignature,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the public key is not a PEM public key: {0}")]
    BadPublicKey(String),
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// canonical_json renders a JSON value as RFC 8785 canonical JSON.
pub fn canonical_json(value: &Value) -> String {
    serde_jcs::to_string(value).expect("a serde_json::Value always serializes")
}

/// signed_bytes is what a signature over `document` covers: its canonical JSON without the
/// signature field.
pub fn signed_bytes(document: &Value) -> Result<Vec<u8>, CryptoError> {
    let mut object = document.as_object().ok_or(CryptoError::NotAnObject)?.clone();
    object.remove(SIGNATURE_FIELD);
    Ok(canonical_json(&Value::Object(object)).into_bytes())
}

/// sign returns the base64 DER ECDSA signature of `bytes` with SHA-256.
pub fn sign(key: &PKeyRef<Private>, bytes: &[u8]) -> Result<String, CryptoError> {
    let mut signer = Signer::new(MessageDigest::sha256(), key)?;
    signer.update(bytes)?;
    Ok(BASE64.encode(signer.sign_to_vec()?))
}

/// verify checks a base64 signature of `bytes` against a public key.
pub fn verify<T: HasPublic>(key: &PKeyRef<T>, bytes: &[u8], signature: &str) -> Result<(), CryptoError> {
    let der = BASE64.decode(signature).map_err(|_| CryptoError::MalformedSignature)?;
    let mut verifier = Verifier::new(MessageDigest::sha256(), key)?;
    verifier.update(bytes)?;
    // openssl reports a DER signature it cannot parse as an error, not as `false`: both are forgeries.
    match verifier.verify(&der) {
        Ok(true) => Ok(()),
        Ok(false) | Err(_) => Err(CryptoError::BadSignature),
    }
}

/// sign_document adds a `signature` field over the document's canonical JSON.
pub fn sign_document(key: &PKeyRef<Private>, document: &mut Value) -> Result<(), CryptoError> {
    let signature = sign(key, &signed_bytes(document)?)?;
    document.as_object_mut().ok_or(CryptoError::NotAnObject)?.insert(SIGNATURE_FIELD.into(), Value::String(signature));
    Ok(())
}

/// verify_document checks a document's own `signature` field.
pub fn verify_document<T: HasPublic>(key: &PKeyRef<T>, document: &Value) -> Result<(), CryptoError> {
    let signature = document.get(SIGNATURE_FIELD).and_then(Value::as_str).ok_or(CryptoError::MissingSignature)?;
    verify(key, &signed_bytes(document)?, signature)
}

/// parse_public_key reads a PEM public key, as registered for a terminal.
pub fn parse_public_key(pem: &str) -> Result<PKey<openssl::pkey::Public>, CryptoError> {
    PKey::public_key_from_pem(pem.as_bytes()).map_err(|e| CryptoError::BadPublicKey(e.to_string()))
}

/// sha256_hex is the lowercase hex SHA-256 of `bytes`: the digest a delivery receipt carries.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(openssl::sha::sha256(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_and_drops_white_space() {
        let value: Value = serde_json::from_str(r#"{ "b": 1, "a": {"d": [1, 2], "c": "x"} }"#).unwrap();
        assert_eq!(canonical_json(&value), r#"{"a":{"c":"x","d":[1,2]},"b":1}"#);
    }

    #[test]
    fn canonical_json_escapes_as_rfc_8785() {
        assert_eq!(canonical_json(&json!({"k": "é\u{1}\""})), "{\"k\":\"é\\u0001\\\"\"}");
    }

    #[test]
    fn a_signed_document_verifies_whatever_its_key_order() {
        let key = generate_key_pair().unwrap();
        let mut doc = json!({"type": "order.purchase", "quantity": 2, "request_id": "r-1"});
        sign_document(&key, &mut doc).unwrap();
        let reordered: Value = serde_json::from_str(&format!(
            r#"{{"signature":{},"request_id":"r-1","quantity":2,"type":"order.purchase"}}"#,
            doc["signature"]
        ))
        .unwrap();
        verify_document(&key, &reordered).unwrap();
    }

    #[test]
    fn tampering_and_other_keys_are_detected() {
        let key = generate_key_pair().unwrap();
        let other = generate_key_pair().unwrap();
        let mut doc = json!({"amount_minor": 1000, "holder": "t-1"});
        sign_document(&key, &mut doc).unwrap();

        let mut altered = doc.clone();
        altered["amount_minor"] = json!(1001);
        assert!(matches!(verify_document(&key, &altered), Err(CryptoError::BadSignature)));
        assert!(matches!(verify_document(&other, &doc), Err(CryptoError::BadSignature)));

        let mut garbled = doc.clone();
        garbled["signature"] = json!("not base64!");
        assert!(matches!(verify_document(&key, &garbled), Err(CryptoError::MalformedSignature)));
        garbled["signature"] = json!("AAAA");
        assert!(matches!(verify_document(&key, &garbled), Err(CryptoError::BadSignature)));

        let mut unsigned = doc.clone();
        unsigned.as_object_mut().unwrap().remove("signature");
        assert!(matches!(verify_document(&key, &unsigned), Err(CryptoError::MissingSignature)));
    }

    #[test]
    fn public_keys_round_trip_through_pem() {
        let key = generate_key_pair().unwrap();
        let pem = public_key_pem(&key).unwrap();
        let public = parse_public_key(&pem).unwrap();
        let signature = sign(&key, b"bytes").unwrap();
        verify(&public, b"bytes", &signature).unwrap();
        assert!(parse_public_key("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----").is_err());
    }

    #[test]
    fn sha256_matches_the_known_vector() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
