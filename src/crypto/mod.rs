//! Signatures and digests: canonical JSON, ECDSA P-256 with SHA-256, and the key ring.
//!
//! What a signature covers is always the canonical JSON (RFC 8785) of a document without its
//! `signature` field, so that the signer and the verifier agree byte for byte whatever the key
//! order or white space of the JSON that travelled.

mod keys;

pub use keys::{KeyRing, Published, Signing, generate_key_pair, load_private_key, public_key_pem, write_private_key};

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
    let mut out = Vec::with_capacity(512);
    write_canonical(value, &mut out);
    String::from_utf8(out).expect("JSON text is UTF-8")
}

/// signed_bytes is what a signature over `document` covers: its canonical JSON without the
/// signature field. The document is written as it is, not copied without the field first.
pub fn signed_bytes(document: &Value) -> Result<Vec<u8>, CryptoError> {
    let object = document.as_object().ok_or(CryptoError::NotAnObject)?;
    let mut out = Vec::with_capacity(512);
    write_object(object, Some(SIGNATURE_FIELD), &mut out);
    Ok(out)
}

/// write_canonical writes `value` as RFC 8785 canonical JSON. Strings and integers are written as
/// serde_json writes them, which is what RFC 8785 asks (no white space; only `"`, `\` and control
/// characters escaped, those with lower-case hex): the documents signed here hold nothing else.
/// A number that is not an integer below 2^53 is written by serde_jcs, in ECMAScript's form.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    const EXACT: u64 = 1 << 53;
    match value {
        Value::Object(map) => write_object(map, None, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Number(n) if n.as_i64().is_none_or(|i| i.unsigned_abs() > EXACT) => {
            out.extend_from_slice(serde_jcs::to_string(n).expect("a number always serializes").as_bytes());
        }
        other => serde_json::to_writer(&mut *out, other).expect("writing JSON to memory cannot fail"),
    }
}

/// write_object writes an object's members, but `skip`, in RFC 8785's order: by the UTF-16 code
/// units of their names. A serde_json map keeps its names in byte order, which is the same unless
/// a name holds characters beyond U+FFFF; only then are they sorted again.
fn write_object(map: &serde_json::Map<String, Value>, skip: Option<&str>, out: &mut Vec<u8>) {
    let utf16 = |a: &str, b: &str| a.encode_utf16().cmp(b.encode_utf16());
    let mut members: Vec<(&String, &Value)> = map.iter().filter(|(name, _)| Some(name.as_str()) != skip).collect();
    if !members.is_sorted_by(|a, b| utf16(a.0, b.0).is_le()) {
        members.sort_by(|a, b| utf16(a.0, b.0));
    }
    out.push(b'{');
    for (i, (name, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, name).expect("writing JSON to memory cannot fail");
        out.push(b':');
        write_canonical(value, out);
    }
    out.push(b'}');
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

/// parse_public_keys reads one or more PEM public keys from one text, as registered for a partner
/// or a gateway (a key being rotated in beside the one being rotated out). A text with no key in
/// it, or with one that is not a public key, is refused.
pub fn parse_public_keys(pem: &str) -> Result<Vec<PKey<openssl::pkey::Public>>, CryptoError> {
    const END: &str = "-----END PUBLIC KEY-----";
    let mut keys = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN") {
        let block = &rest[start..];
        let end = block.find(END).ok_or_else(|| CryptoError::BadPublicKey("a PEM block is not closed".into()))?;
        keys.push(parse_public_key(&block[..end + END.len()])?);
        rest = &block[end + END.len()..];
    }
    if keys.is_empty() {
        return Err(CryptoError::BadPublicKey("no PEM public key in it".into()));
    }
    Ok(keys)
}

/// The most registered key texts kept parsed; past it the cache starts again, empty.
const REGISTERED_KEYS_MAX: usize = 10_000;

/// registered_keys parses a registered PEM text (a terminal's, a partner's or a gateway's key, or
/// several) once per process: OpenSSL 3 looks its decoders up at every parse, which costs more than
/// checking the signature. The cache is keyed by the text itself, so a key that is rotated or
/// revoked is never checked against again.
pub fn registered_keys(pem: &str) -> Result<Vec<PKey<openssl::pkey::Public>>, CryptoError> {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};
    type Parsed = HashMap<String, Vec<PKey<openssl::pkey::Public>>>;
    static KEYS: LazyLock<Mutex<Parsed>> = LazyLock::new(Mutex::default);
    if let Some(keys) = KEYS.lock().expect("never poisoned").get(pem) {
        return Ok(keys.clone());
    }
    let keys = parse_public_keys(pem)?;
    let mut cache = KEYS.lock().expect("never poisoned");
    if cache.len() >= REGISTERED_KEYS_MAX {
        cache.clear();
    }
    cache.insert(pem.to_string(), keys.clone());
    Ok(keys)
}

/// verify_registered checks a document's `signature` with a registered PEM text: any of the keys
/// in it may have signed.
pub fn verify_registered(pem: &str, document: &Value) -> Result<(), CryptoError> {
    let mut verdict = Err(CryptoError::BadSignature);
    for key in registered_keys(pem)? {
        verdict = verify_document(&key, document);
        if verdict.is_ok() {
            break;
        }
    }
    verdict
}

/// key_id names a P-256 public key: its JWK thumbprint (RFC 7638), the base64url SHA-256 of the
/// canonical JWK `{"crv","kty","x","y"}`. Signed documents carry it, so that a verifier picks the
/// right key from the published ones (`assetflow keys publish`).
pub fn key_id<T: HasPublic>(key: &PKeyRef<T>) -> Result<String, CryptoError> {
    let jwk = public_jwk(key)?;
    let members = serde_json::json!({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]});
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(openssl::sha::sha256(canonical_json(&members).as_bytes())))
}

/// public_jwk is a P-256 public key as a JSON Web Key (RFC 7517, 7518): `kty`, `crv`, `x`, `y`.
pub fn public_jwk<T: HasPublic>(key: &PKeyRef<T>) -> Result<Value, CryptoError> {
    use openssl::bn::{BigNum, BigNumContext};
    let ec = key.ec_key().map_err(|_| CryptoError::BadPublicKey("not an EC key".into()))?;
    let group = ec.group();
    if group.curve_name() != Some(openssl::nid::Nid::X9_62_PRIME256V1) {
        return Err(CryptoError::BadPublicKey("not a P-256 key".into()));
    }
    let (mut x, mut y) = (BigNum::new()?, BigNum::new()?);
    let mut context = BigNumContext::new()?;
    ec.public_key().affine_coordinates(group, &mut x, &mut y, &mut context)?;
    let b64 = |n: &BigNum| -> Result<String, CryptoError> {
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n.to_vec_padded(32)?))
    };
    Ok(serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(&x)?, "y": b64(&y)?}))
}

/// public_key_from_jwk reads a P-256 public key from a JSON Web Key, as `assetflow keys publish`
/// writes them: what a terminal does with the published keys.
pub fn public_key_from_jwk(jwk: &Value) -> Result<PKey<openssl::pkey::Public>, CryptoError> {
    use openssl::bn::BigNum;
    let bad = |why: &str| CryptoError::BadPublicKey(why.to_string());
    if jwk.get("kty").and_then(Value::as_str) != Some("EC") || jwk.get("crv").and_then(Value::as_str) != Some("P-256") {
        return Err(bad("not a P-256 EC key"));
    }
    let coordinate = |name: &str| -> Result<BigNum, CryptoError> {
        let text = jwk.get(name).and_then(Value::as_str).ok_or_else(|| bad("a coordinate is missing"))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).map_err(|_| bad("not base64url"))?;
        Ok(BigNum::from_slice(&bytes)?)
    };
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)?;
    let (x, y) = (coordinate("x")?, coordinate("y")?);
    let ec = openssl::ec::EcKey::from_public_key_affine_coordinates(&group, &x, &y)
        .map_err(|_| bad("the point is not on the curve"))?;
    Ok(PKey::from_ec_key(ec)?)
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
    fn canonical_json_is_what_serde_jcs_writes() {
        let documents = [
            json!({"b": 1, "a": {"d": [1, 2.5, -0.0, 1e21, 1e-7], "c": null}, "e": [true, false, []], "f": {}}),
            json!({"big": 9_007_199_254_740_993_u64, "edge": 9_007_199_254_740_992_u64, "neg": -9_007_199_254_740_993_i64}),
            json!({"\u{1F600}": 1, "\u{FB01}": 2, "a": 3, "é": 4, "A": 5, "": 6}),
            json!({"s": "\u{0}\u{8}\t\n\u{b}\u{c}\r\u{1f}\u{7f}\"\\/é\u{2028}\u{1F600}"}),
            json!([{"z": {"y": {"x": [0.1, 100, 1.5e300]}}}]),
            json!("text"),
            json!(42),
        ];
        for document in documents {
            assert_eq!(canonical_json(&document), serde_jcs::to_string(&document).unwrap(), "{document}");
        }
    }

    #[test]
    fn signed_bytes_are_the_canonical_json_without_the_signature() {
        let document = json!({"signature": "x", "b": {"signature": "kept"}, "a": 1});
        assert_eq!(signed_bytes(&document).unwrap(), br#"{"a":1,"b":{"signature":"kept"}}"#);
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
    fn key_ids_are_rfc_7638_thumbprints() {
        // RFC 7517 appendix A.1's P-256 key; its thumbprint was computed apart from this code
        // (Python's hashlib over the sorted, compact members, as RFC 7638 section 3 says).
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode("MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4")
            .unwrap();
        let y = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode("4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM")
            .unwrap();
        let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let ec = openssl::ec::EcKey::from_public_key_affine_coordinates(
            &group,
            &openssl::bn::BigNum::from_slice(&x).unwrap(),
            &openssl::bn::BigNum::from_slice(&y).unwrap(),
        )
        .unwrap();
        let key = PKey::from_ec_key(ec).unwrap();
        assert_eq!(key_id(&key).unwrap(), "cn-I_WNMClehiVp51i_0VpOENW1upEerA8sEam5hn-s");
        let other = generate_key_pair().unwrap();
        assert_ne!(key_id(&other).unwrap(), key_id(&key).unwrap());
        let public = parse_public_key(&public_key_pem(&other).unwrap()).unwrap();
        assert_eq!(key_id(&public).unwrap(), key_id(&other).unwrap(), "the same id from either half");
        let round_trip = public_key_from_jwk(&public_jwk(&other).unwrap()).unwrap();
        assert!(round_trip.public_eq(&other), "a published key reads back as itself");
        let mut off_curve = public_jwk(&other).unwrap();
        off_curve["y"] = off_curve["x"].clone();
        assert!(public_key_from_jwk(&off_curve).is_err());
    }

    #[test]
    fn a_pem_bundle_holds_several_keys() {
        let (a, b) = (generate_key_pair().unwrap(), generate_key_pair().unwrap());
        let bundle = format!("# rotating in\n{}\n{}", public_key_pem(&a).unwrap(), public_key_pem(&b).unwrap());
        let keys = parse_public_keys(&bundle).unwrap();
        assert_eq!(keys.len(), 2);
        let signature = sign(&b, b"bytes").unwrap();
        assert!(verify(&keys[1], b"bytes", &signature).is_ok());
        assert!(parse_public_keys("no key here").is_err());
        assert!(parse_public_keys("-----BEGIN PUBLIC KEY-----\nAAAA").is_err());
    }

    #[test]
    fn sha256_matches_the_known_vector() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
