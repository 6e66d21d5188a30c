//! The issuance pool: assets and exchange certificates are issued only for settled orders, held
//! by assetflow (retaining, seed 000 section 107), signed by the issuer and the service provider,
//! and handed to the delivery pool.

mod documents;
mod exchange;

pub use documents::{asset_document, certificate_document};
pub use exchange::ExchangeHandler;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::json;
use uuid::Uuid;

use crate::db::schema::{
    asset_documents, assets, certificate_documents, exchange_certificates, orders, reminder_schedule,
};
use crate::dead_letter::Reason;
use crate::delivery::{self, NewDelivery};
use crate::messages::{DeliveryKind, IssuanceRequested, kinds};
use crate::pool::{Cx, Failure, Handler, Incoming};
use crate::status_machine::{self, Status};

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = orders)]
struct Order {
    id: Uuid,
    product_id: String,
    quantity: i32,
    recipient_terminal_ids: Vec<String>,
    delivery_mode: String,
    designated_at: Option<DateTime<Utc>>,
    status: String,
}

/// IssueHandler takes `issuance.requested`.
pub struct IssueHandler;

impl Handler for IssueHandler {
    fn message_type(&self) -> &'static str {
        kinds::ISSUANCE_REQUESTED
    }

    fn handle(&self, cx: &mut Cx<'_>, message: &Incoming) -> Result<(), Failure> {
        let request: IssuanceRequested = serde_json::from_value(message.json.clone())
            .map_err(|e| Failure::permanent(Reason::SchemaViolation, e.to_string()))?;
        let Some(order) =
            orders::table.find(request.order_id).select(Order::as_select()).for_update().first(cx.conn).optional()?
        else {
            return Err(Failure::permanent(Reason::Unprocessable, format!("no order {}", request.order_id)));
        };
        if order.status != "issuing" {
            return Ok(()); // Issued already, or never settled: nothing to do.
        }
        issue(cx, &order)
    }
}

fn issue(cx: &mut Cx<'_>, order: &Order) -> Result<(), Failure> {
    let now = cx.now;
    let product = cx
        .product(&order.product_id)?
        .ok_or_else(|| Failure::permanent(Reason::Unprocessable, format!("product {} vanished", order.product_id)))?;
    let issuer_key = cx.app.keys.issuer(&product.issuer_id).ok_or_else(|| {
        Failure::permanent(
            Reason::Unprocessable,
            format!("assetflow holds no signing key for issuer {:?}", product.issuer_id),
        )
    })?;
    let provider = &cx.app.config.service_provider_id;
    let with_certificate = order.delivery_mode == "certificate";
    let mut issued = 0;
    for recipient_id in &order.recipient_terminal_ids {
        let recipient = cx
            .terminal(recipient_id)?
            .ok_or_else(|| Failure::permanent(Reason::Unprocessable, format!("recipient {recipient_id} vanished")))?;
        for ordinal in 0..order.quantity {
            let asset_id = Uuid::now_v7();
            let expires_at = product.asset_expiry(now);
            let certificate_expires_at = with_certificate.then(|| product.certificate_expiry(now));
            let document = asset_document(
                &product,
                asset_id,
                &recipient.id,
                now,
                expires_at,
                provider,
                issuer_key,
                &cx.app.keys.provider,
            )
            .map_err(|e| Failure::permanent(Reason::Unprocessable, format!("signing asset: {e}")))?;
            let status = if with_certificate { Status::AwaitingExchange } else { Status::AwaitingDesignatedDelivery };
            diesel::insert_into(assets::table)
                .values((
                    assets::id.eq(asset_id),
                    assets::order_id.eq(order.id),
                    assets::recipient_terminal_id.eq(&recipient.id),
                    assets::ordinal.eq(ordinal),
                    assets::product_id.eq(&product.id),
                    assets::kind.eq(&product.kind),
                    assets::issuer_id.eq(&product.issuer_id),
                    assets::holder_terminal_id.eq(&recipient.id),
                    assets::issued_at.eq(now),
                    assets::expires_at.eq(expires_at),
                    assets::has_exchange_certificate.eq(with_certificate),
                    assets::certificate_expires_at.eq(certificate_expires_at),
                    assets::status.eq(status.as_str()),
                    assets::transferable.eq(product.transferable),
                    assets::designated_at.eq(order.designated_at),
                    assets::value_minor.eq(product.value_minor),
                    assets::remaining_minor.eq(product.value_minor),
                    assets::remaining_uses.eq(product.uses),
                    assets::currency.eq(&product.currency),
                    assets::status_changed_at.eq(now),
                ))
                .execute(cx.conn)?;
            diesel::insert_into(asset_documents::table)
                .values((
                    asset_documents::asset_id.eq(asset_id),
                    asset_documents::document.eq(crate::crypto::canonical_json(&document)),
                    asset_documents::issuer_signature.eq(document["issuer_signature"].as_str().unwrap_or_default()),
                    asset_documents::provider_signature.eq(document["signature"].as_str().unwrap_or_default()),
                ))
                .execute(cx.conn)?;
            status_machine::record_issued(cx.conn, asset_id, status, now)?;

            let delivery = if let Some(cert_expiry) = certificate_expires_at {
                let certificate_id = Uuid::now_v7();
                let certificate = certificate_document(
                    certificate_id,
                    asset_id,
                    &recipient.id,
                    &product.id,
                    now,
                    cert_expiry,
                    provider,
                    &cx.app.keys.provider,
                )
                .map_err(|e| Failure::permanent(Reason::Unprocessable, format!("signing certificate: {e}")))?;
                diesel::insert_into(exchange_certificates::table)
                    .values((
                        exchange_certificates::id.eq(certificate_id),
                        exchange_certificates::asset_id.eq(asset_id),
                        exchange_certificates::holder_terminal_id.eq(&recipient.id),
                        exchange_certificates::issued_at.eq(now),
                        exchange_certificates::expires_at.eq(cert_expiry),
                    ))
                    .execute(cx.conn)?;
                diesel::insert_into(certificate_documents::table)
                    .values((
                        certificate_documents::certificate_id.eq(certificate_id),
                        certificate_documents::document.eq(crate::crypto::canonical_json(&certificate)),
                        certificate_documents::signature.eq(certificate["signature"].as_str().unwrap_or_default()),
                    ))
                    .execute(cx.conn)?;
                diesel::insert_into(reminder_schedule::table)
                    .values((
                        reminder_schedule::certificate_id.eq(certificate_id),
                        reminder_schedule::asset_id.eq(asset_id),
                        reminder_schedule::expires_at.eq(cert_expiry),
                        reminder_schedule::next_stage.eq(Some(1i16)),
                        reminder_schedule::due_at
                            .eq(Some(cert_expiry - chrono::Duration::seconds(product.reminder_stage1_secs))),
                    ))
                    .execute(cx.conn)?;
                let mut d = NewDelivery::now(
                    DeliveryKind::Certificate,
                    format!("certificate:{certificate_id}"),
                    &recipient,
                    json!({"order_id": order.id, "certificate": certificate}),
                );
                d.asset_id = Some(asset_id);
                d
            } else {
                let mut d = NewDelivery::now(
                    DeliveryKind::Asset,
                    format!("asset:{asset_id}"),
                    &recipient,
                    json!({"order_id": order.id, "forced": false, "asset": document}),
                );
                d.asset_id = Some(asset_id);
                // Designated: the designated-delivery scan sends it when its time comes.
                d.due_at = order.designated_at.filter(|at| *at > now);
                d
            };
            let mut delivery = delivery;
            delivery.order_id = Some(order.id);
            delivery::enqueue(cx, delivery)?;
            issued += 1;
        }
    }
    diesel::update(orders::table.find(order.id))
        .set((orders::status.eq("issued"), orders::updated_at.eq(now)))
        .execute(cx.conn)?;
    tracing::info!(order_id = %order.id, assets = issued, "issued");
    Ok(())
}
