//! The receipt certificates `assetflow status` shows (`docs/product.md#receipt-certificates`): on
//! its own, by its id, and beside the asset it reserved and the order its submission placed.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use super::DeliveryView;
use crate::domain::schema::{deliveries, receipt_certificates};

/// ReceiptView is a receipt certificate as `assetflow status` shows it.
#[derive(Debug, Serialize)]
pub struct ReceiptView {
    pub receipt_certificate_id: Uuid,
    pub request_id: String,
    pub product_id: String,
    pub holder_terminal_id: String,
    pub payer_terminal_id: String,
    /// `hold`, `lottery` or `threshold`.
    pub condition: String,
    /// `applied`, `open`, `lost`, `submitted`, `issued` or `revoked`.
    pub status: String,
    /// Why it was revoked (`expired`, `lapsed`) or lost (`threshold_not_met`).
    pub status_reason: Option<String>,
    /// Its place in its lottery's draw (1 = first drawn).
    pub rank: Option<i32>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub submit_by: Option<DateTime<Utc>>,
    /// The asset it reserved: issued with this id once its payment settles.
    pub asset_id: Uuid,
    /// The order its submission placed.
    pub order_id: Option<Uuid>,
    pub submit_request_id: Option<String>,
    /// The certificate itself, the notices about it and its revocation request.
    pub deliveries: Vec<DeliveryView>,
}

type Row = (
    Uuid,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<i32>,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Uuid,
    Option<Uuid>,
    Option<String>,
);

/// Which receipt certificate to read: by its own id, by the asset it reserved, or by the order
/// its submission placed.
pub enum By {
    Id(Uuid),
    Asset(Uuid),
    Order(Uuid),
}

/// receipt_view reads a receipt certificate and its deliveries.
pub fn receipt_view(conn: &mut PgConnection, by: By) -> QueryResult<Option<ReceiptView>> {
    let mut query = receipt_certificates::table.into_boxed();
    query = match by {
        By::Id(id) => query.filter(receipt_certificates::id.eq(id)),
        By::Asset(id) => query.filter(receipt_certificates::asset_id.eq(id)),
        By::Order(id) => query.filter(receipt_certificates::order_id.eq(id)),
    };
    let Some(r) = query
        .select((
            receipt_certificates::id,
            receipt_certificates::request_id,
            receipt_certificates::product_id,
            receipt_certificates::holder_terminal_id,
            receipt_certificates::payer_terminal_id,
            receipt_certificates::condition,
            receipt_certificates::status,
            receipt_certificates::status_reason,
            receipt_certificates::rank,
            receipt_certificates::issued_at,
            receipt_certificates::expires_at,
            receipt_certificates::submit_by,
            receipt_certificates::asset_id,
            receipt_certificates::order_id,
            receipt_certificates::submit_request_id,
        ))
        .first::<Row>(conn)
        .optional()?
    else {
        return Ok(None);
    };
    // A receipt certificate's deliveries are keyed by it: the certificate `receipt:<id>`, each
    // notice `receipt:<id>:<code>`, its revocation request `revoke:<id>`.
    let id = r.0;
    let deliveries = deliveries::table
        .filter(
            deliveries::dedupe_key
                .eq(format!("receipt:{id}"))
                .or(deliveries::dedupe_key.like(format!("receipt:{id}:%")))
                .or(deliveries::dedupe_key.eq(format!("revoke:{id}"))),
        )
        .order(deliveries::created_at)
        .select((
            deliveries::id,
            deliveries::kind,
            deliveries::terminal_id,
            deliveries::status,
            deliveries::attempts,
            deliveries::last_error,
            deliveries::delivered_at,
            deliveries::proof,
        ))
        .load(conn)?;
    Ok(Some(ReceiptView {
        receipt_certificate_id: id,
        request_id: r.1,
        product_id: r.2,
        holder_terminal_id: r.3,
        payer_terminal_id: r.4,
        condition: r.5,
        status: r.6,
        status_reason: r.7,
        rank: r.8,
        issued_at: r.9,
        expires_at: r.10,
        submit_by: r.11,
        asset_id: r.12,
        order_id: r.13,
        submit_request_id: r.14,
        deliveries,
    }))
}
