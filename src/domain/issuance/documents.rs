//! The signed documents: the asset (`docs/product.md#issued-documents`, signed twice) and
//! the exchange certificate (`docs/product.md#exchange-certificates`: settlement information
//! "settled", status "not yet transmitted").

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::crypto::{self, CryptoError, Signing};
use crate::domain::catalogue::Product;

/// asset_document builds and signs an asset: the issuer signs the asset information, and the
/// service provider signs the whole, the issuer's signature included. Each signature's key is
/// named by its key id (`issuer_key_id`, `key_id`), as `assetflow keys publish` lists it.
#[allow(clippy::too_many_arguments)]
pub fn asset_document(
    product: &Product,
    asset_id: Uuid,
    holder: &str,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    provider_id: &str,
    issuer_key: &Signing,
    provider_key: &Signing,
) -> Result<Value, CryptoError> {
    let mut information = json!({
        "asset_id": asset_id,
        "issuer_id": product.issuer_id,
        "product_id": product.id,
        "kind": product.kind,
        "title": product.title,
        "tags": product.tags,
        "currency": product.currency,
    });
    if let Some(value) = product.value_minor {
        information["value_minor"] = json!(value);
    }
    if let Some(uses) = product.uses {
        information["uses"] = json!(uses);
    }
    let issuer_signature = crypto::sign(&issuer_key.key, crypto::canonical_json(&information).as_bytes())?;
    let mut document = json!({
        "asset_id": asset_id,
        "holder_terminal_id": holder,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "service_provider_id": provider_id,
        "information": information,
        "issuer_signature": issuer_signature,
        "issuer_key_id": issuer_key.key_id,
        "key_id": provider_key.key_id,
    });
    crypto::sign_document(&provider_key.key, &mut document)?;
    Ok(document)
}

/// certificate_document builds and signs an exchange certificate.
#[allow(clippy::too_many_arguments)]
pub fn certificate_document(
    certificate_id: Uuid,
    asset_id: Uuid,
    holder: &str,
    product_id: &str,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    provider_id: &str,
    provider_key: &Signing,
) -> Result<Value, CryptoError> {
    let mut document = json!({
        "certificate_id": certificate_id,
        "asset_id": asset_id,
        "holder_terminal_id": holder,
        "product_id": product_id,
        "issued_at": issued_at,
        "expires_at": expires_at,
        "settlement": "settled",
        "transmission": "not_yet_transmitted",
        "service_provider_id": provider_id,
        "key_id": provider_key.key_id,
    });
    crypto::sign_document(&provider_key.key, &mut document)?;
    Ok(document)
}
