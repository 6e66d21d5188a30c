//! Issued documents, as a terminal receives them, verified with the public keys assetflow
//! publishes (`assetflow keys publish`, `docs/security.md#keys`), each found by the key id the
//! document names: the issuer signs an asset's information, the service provider signs the whole
//! asset and every exchange certificate. A signature verifies with the right key only, and over
//! exactly the bytes that were signed.

use std::time::Duration;

use assetflow::cli::simulate::gateway::{GatewayOptions, exchange_request};
use assetflow::cli::simulate::terminals::purchase;
use assetflow::contracts::messages::GatewayDelivery;
use assetflow::crypto::{self, CryptoError};
use lapin::options::BasicGetOptions;
use openssl::pkey::{PKey, PKeyRef, Private, Public};
use serde_json::{Value, json};

use crate::harness::{Env, ISSUER, text};
use crate::support::{DEADLINE, bind_queue, channel, request_id, settle_all};

/// public is the public half of a signing key, as a terminal would hold it: through its PEM.
fn public(key: &PKeyRef<Private>) -> PKey<Public> {
    crypto::parse_public_key(&crypto::public_key_pem(key).expect("a PEM public key")).expect("parses")
}

/// published is the published key (JWKS) a document names by `key_id`, with its role, as a
/// terminal finds it.
fn published(jwks: &Value, key_id: &Value) -> (PKey<Public>, String) {
    let kid = key_id.as_str().unwrap_or_else(|| panic!("the document names its key: {key_id}"));
    let jwk = jwks["keys"]
        .as_array()
        .expect("a key set")
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("key {kid} is published"));
    let role = format!("{} {}", jwk["assetflow_role"].as_str().unwrap(), jwk["assetflow_status"].as_str().unwrap());
    (crypto::public_key_from_jwk(jwk).expect("a P-256 JWK"), role)
}

/// next_delivery waits for the next message in `queue` (a copy of what the gateway receives) and
/// checks that it is of `kind`.
async fn next_delivery(env: &Env, queue: &str, kind: &str) -> GatewayDelivery {
    let channel = channel(env).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("basic.get");
        if let Some(message) = got {
            let delivery: GatewayDelivery = serde_json::from_slice(&message.delivery.data).expect("a delivery");
            assert_eq!(delivery.kind.as_str(), kind, "{delivery:?}");
            let _ = channel.close(200, "taken".into()).await;
            return delivery;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for a {kind} delivery in {queue}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// every_byte_changed asserts that `check` refuses `bytes` with any one of its bytes changed.
fn every_byte_changed(what: &str, bytes: &[u8], check: impl Fn(&[u8]) -> Result<(), CryptoError>) {
    check(bytes).unwrap_or_else(|e| panic!("{what} verifies unchanged: {e}"));
    for i in 0..bytes.len() {
        let mut altered = bytes.to_vec();
        altered[i] ^= 0x01;
        assert!(
            matches!(check(&altered), Err(CryptoError::BadSignature)),
            "{what} still verifies with byte {i} of {} changed",
            bytes.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_assets_and_certificates_verify_with_the_issuers_and_the_providers_keys_and_nothing_else() {
    let mut env = Env::new().await;
    let product = env
        .product("recital", |p| {
            p.title = "Spring recital".into();
            p.tags = json!({"place": "Hall B", "seat_class": "S", "date": "2030-04-01"});
        })
        .await;
    let ivy = env.terminal("ivy", "gw-1", Some("card-co")).await;
    // A copy of everything sent to gw-1, as its terminals receive it.
    let copy = bind_queue(&env, "test.gw-1.copy", &env.app.plumbing.names.gateways(), "gw-1").await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    // The keys as a terminal gets them: published, through JSON.
    let jwks = assetflow::cli::keys::jwks(&env.app.keys, "assetflow").expect("the keys publish");
    let jwks: Value = serde_json::from_str(&serde_json::to_string(&jwks).unwrap()).unwrap();
    let stranger = public(&crypto::generate_key_pair().expect("a fresh key"));

    // The exchange certificate, signed by the service provider.
    let order = purchase(&ivy, "recital", 1, json!({}));
    env.send(&order).await;
    let delivered = next_delivery(&env, &copy, "certificate").await;
    let certificate = delivered.content["certificate"].clone();
    assert_eq!(certificate["holder_terminal_id"], "ivy", "{certificate}");
    let (provider, role) = published(&jwks, &certificate["key_id"]);
    assert_eq!(role, "provider current", "a certificate names the provider's key");
    let issuer_jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["assetflow_issuer_id"] == ISSUER).unwrap();
    let issuer = crypto::public_key_from_jwk(issuer_jwk).unwrap();
    crypto::verify_document(&provider, &certificate).expect("the provider's key verifies the certificate");
    for (who, key) in [("a fresh key", &stranger), ("the issuer's key", &issuer)] {
        assert!(
            matches!(crypto::verify_document(key, &certificate), Err(CryptoError::BadSignature)),
            "{who} must not verify the certificate"
        );
    }
    let signature = certificate["signature"].as_str().expect("a signature").to_string();
    every_byte_changed("the certificate", &crypto::signed_bytes(&certificate).unwrap(), |bytes| {
        crypto::verify(&provider, bytes, &signature)
    });
    let mut forged = certificate.clone();
    forged["expires_at"] = json!("2099-01-01T00:00:00Z");
    assert!(matches!(crypto::verify_document(&provider, &forged), Err(CryptoError::BadSignature)));
    // What was stored is what was sent.
    let (cid, canonical, sig) =
        (certificate["certificate_id"].as_str().unwrap().to_string(), crypto::canonical_json(&certificate), signature);
    env.db(move |c| {
        let stored = "SELECT document AS value FROM certificate_documents WHERE certificate_id = $1::uuid";
        assert_eq!(text(c, stored, &[&cid]).as_deref(), Some(canonical.as_str()));
        let stored = "SELECT signature AS value FROM certificate_documents WHERE certificate_id = $1::uuid";
        assert_eq!(text(c, stored, &[&cid]).as_deref(), Some(sig.as_str()));
    })
    .await;

    // The asset, on exchange: the issuer signs its information, the provider the whole.
    let rid = request_id(&order);
    env.wait_until("the certificate is acknowledged", move |c| {
        text(
            c,
            "SELECT d.status AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
             WHERE o.request_id = $1 AND d.kind = 'certificate'",
            &[&rid],
        )
        .filter(|s| s == "delivered")
    })
    .await;
    env.send(&exchange_request("ivy", certificate.clone(), &ivy.key)).await;
    let delivered = next_delivery(&env, &copy, "asset").await;
    let asset: Value = delivered.content["asset"].clone();
    assert_eq!(asset["asset_id"], certificate["asset_id"], "the asset the certificate names: {asset}");
    assert_eq!(asset["holder_terminal_id"], "ivy");
    let information = &asset["information"];
    assert_eq!(information["asset_id"], asset["asset_id"], "{information}");
    assert_eq!(information["issuer_id"], ISSUER);
    assert_eq!(information["product_id"], product.id.as_str());
    assert_eq!(information["title"], "Spring recital");
    assert_eq!(information["tags"], product.tags);

    let (named_issuer, role) = published(&jwks, &asset["issuer_key_id"]);
    assert_eq!(role, "issuer current");
    assert!(named_issuer.public_eq(&issuer), "the asset names its issuer's key");
    let (named_provider, role) = published(&jwks, &asset["key_id"]);
    assert_eq!(role, "provider current");
    assert!(named_provider.public_eq(&provider), "the asset names the provider's key");
    let issuer_signature = asset["issuer_signature"].as_str().expect("the issuer's signature").to_string();
    let information_bytes = crypto::canonical_json(information).into_bytes();
    every_byte_changed("the asset information", &information_bytes, |bytes| {
        crypto::verify(&issuer, bytes, &issuer_signature)
    });
    for (who, key) in [("a fresh key", &stranger), ("the provider's key", &provider)] {
        assert!(
            matches!(crypto::verify(key, &information_bytes, &issuer_signature), Err(CryptoError::BadSignature)),
            "{who} must not verify the issuer's signature"
        );
    }

    crypto::verify_document(&provider, &asset).expect("the provider's key verifies the asset");
    for (who, key) in [("a fresh key", &stranger), ("the issuer's key", &issuer)] {
        assert!(
            matches!(crypto::verify_document(key, &asset), Err(CryptoError::BadSignature)),
            "{who} must not verify the asset"
        );
    }
    let provider_signature = asset["signature"].as_str().expect("the provider's signature").to_string();
    let whole = crypto::signed_bytes(&asset).unwrap();
    every_byte_changed("the asset", &whole, |bytes| crypto::verify(&provider, bytes, &provider_signature));

    // The provider's signature covers the issuer's: neither can be swapped or altered alone.
    let mut altered = asset.clone();
    altered["issuer_signature"] =
        json!(crypto::sign(&crypto::generate_key_pair().unwrap(), &information_bytes).unwrap());
    assert!(matches!(crypto::verify_document(&provider, &altered), Err(CryptoError::BadSignature)));
    // Another holder breaks the provider's signature, not the issuer's, which covers the
    // information only.
    let mut altered = asset.clone();
    altered["holder_terminal_id"] = json!("mallory");
    assert!(matches!(crypto::verify_document(&provider, &altered), Err(CryptoError::BadSignature)));
    crypto::verify(&issuer, &crypto::canonical_json(&altered["information"]).into_bytes(), &issuer_signature)
        .expect("the information is unchanged");
    // Another title breaks both.
    let mut altered = asset.clone();
    altered["information"]["title"] = json!("Spring recital (VIP)");
    assert!(matches!(crypto::verify_document(&provider, &altered), Err(CryptoError::BadSignature)));
    assert!(matches!(
        crypto::verify(&issuer, &crypto::canonical_json(&altered["information"]).into_bytes(), &issuer_signature),
        Err(CryptoError::BadSignature)
    ));

    // What was stored is what was sent, with both signatures in their columns.
    let (aid, canonical) = (asset["asset_id"].as_str().unwrap().to_string(), crypto::canonical_json(&asset));
    env.db(move |c| {
        let stored = "SELECT document AS value FROM asset_documents WHERE asset_id = $1::uuid";
        assert_eq!(text(c, stored, &[&aid]).as_deref(), Some(canonical.as_str()));
        let stored = "SELECT issuer_signature AS value FROM asset_documents WHERE asset_id = $1::uuid";
        assert_eq!(text(c, stored, &[&aid]).as_deref(), Some(issuer_signature.as_str()));
        let stored = "SELECT provider_signature AS value FROM asset_documents WHERE asset_id = $1::uuid";
        assert_eq!(text(c, stored, &[&aid]).as_deref(), Some(provider_signature.as_str()));
    })
    .await;
    env.stop().await;
}
