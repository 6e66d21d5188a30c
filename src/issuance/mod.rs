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

use crate::catalogue::Product;
use crate::db::schema::orders;
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
    let status = if with_certificate { Status::AwaitingExchange } else { Status::AwaitingDesignatedDelivery };
    let expires_at = product.asset_expiry(now);
    let certificate_expires_at = with_certificate.then(|| product.certificate_expiry(now));
    let mut issued = Issued::default();
    let mut deliveries = Vec::new();
    for recipient_id in &order.recipient_terminal_ids {
        let recipient = cx
            .terminal(recipient_id)?
            .ok_or_else(|| Failure::permanent(Reason::Unprocessable, format!("recipient {recipient_id} vanished")))?;
        for ordinal in 0..order.quantity {
            let asset_id = Uuid::now_v7();
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
            issued.asset(asset_id, &recipient.id, ordinal, &document);

            let mut delivery = if let Some(cert_expiry) = certificate_expires_at {
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
                issued.certificate(certificate_id, asset_id, &recipient.id, &certificate);
                NewDelivery::now(
                    DeliveryKind::Certificate,
                    format!("certificate:{certificate_id}"),
                    &recipient,
                    json!({"order_id": order.id, "certificate": certificate}),
                )
            } else {
                let mut d = NewDelivery::now(
                    DeliveryKind::Asset,
                    format!("asset:{asset_id}"),
                    &recipient,
                    json!({"order_id": order.id, "forced": false, "asset": document}),
                );
                // Designated: the designated-delivery scan sends it when its time comes.
                d.due_at = order.designated_at.filter(|at| *at > now);
                d
            };
            delivery.asset_id = Some(asset_id);
            delivery.order_id = Some(order.id);
            deliveries.push(delivery);
        }
    }
    let reminder_due_at =
        certificate_expires_at.map(|expiry| expiry - chrono::Duration::seconds(product.reminder_stage1_secs));
    let terms = Terms { status, expires_at, certificate_expires_at, reminder_due_at };
    issued.write(cx.conn, order, &product, &terms, now)?;
    status_machine::record_issued(cx.conn, &issued.asset_ids, status, now)?;
    delivery::enqueue_many(cx, &deliveries)?;
    tracing::info!(order_id = %order.id, assets = issued.asset_ids.len(), "issued");
    Ok(())
}

/// Terms are what every asset of an order shares: its first status and its expiries.
struct Terms {
    status: Status,
    expires_at: DateTime<Utc>,
    certificate_expires_at: Option<DateTime<Utc>>,
    /// When the certificates' first reminder is due (seed 000 section 3.6, stage 1).
    reminder_due_at: Option<DateTime<Utc>>,
}

/// Issued gathers an order's signed assets and certificates, column by column, so that
/// [`Issued::write`] stores them all in one statement, whatever their number.
#[derive(Default)]
struct Issued {
    asset_ids: Vec<Uuid>,
    recipients: Vec<String>,
    ordinals: Vec<i32>,
    asset_documents: Vec<String>,
    issuer_signatures: Vec<String>,
    provider_signatures: Vec<String>,
    certificate_ids: Vec<Uuid>,
    certified_assets: Vec<Uuid>,
    holders: Vec<String>,
    certificate_documents: Vec<String>,
    certificate_signatures: Vec<String>,
}

impl Issued {
    fn asset(&mut self, id: Uuid, recipient: &str, ordinal: i32, document: &serde_json::Value) {
        self.asset_ids.push(id);
        self.recipients.push(recipient.to_string());
        self.ordinals.push(ordinal);
        self.asset_documents.push(crate::crypto::canonical_json(document));
        self.issuer_signatures.push(document["issuer_signature"].as_str().unwrap_or_default().to_string());
        self.provider_signatures.push(document["signature"].as_str().unwrap_or_default().to_string());
    }

    fn certificate(&mut self, id: Uuid, asset_id: Uuid, holder: &str, document: &serde_json::Value) {
        self.certificate_ids.push(id);
        self.certified_assets.push(asset_id);
        self.holders.push(holder.to_string());
        self.certificate_documents.push(crate::crypto::canonical_json(document));
        self.certificate_signatures.push(document["signature"].as_str().unwrap_or_default().to_string());
    }

    /// Issued::write stores the assets with their documents, the certificates with their documents
    /// and reminder schedules, and marks the order issued: one round trip. The sub-statements of a
    /// `WITH` run as one statement, so the foreign keys between them are checked at its end, when
    /// every row is in (<https://www.postgresql.org/docs/15/queries-with.html#QUERIES-WITH-MODIFYING>).
    fn write(
        &self,
        conn: &mut PgConnection,
        order: &Order,
        product: &Product,
        terms: &Terms,
        now: DateTime<Utc>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Array, Bool, Int4, Int8, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        crate::db::prepared(
            "WITH new_assets AS (
               INSERT INTO assets (id, order_id, recipient_terminal_id, ordinal, product_id, kind, issuer_id,
                                   holder_terminal_id, issued_at, expires_at, has_exchange_certificate,
                                   certificate_expires_at, status, transferable, designated_at, value_minor,
                                   remaining_minor, remaining_uses, currency, status_changed_at)
               SELECT a.id, $4, a.recipient, a.ordinal, $5, $6, $7, a.recipient, $8, $9, $10 IS NOT NULL, $10, $11,
                      $12, $13, $14, $14, $15, $16, $8
               FROM unnest($1::uuid[], $2::text[], $3::int4[]) AS a(id, recipient, ordinal)
             ), new_asset_documents AS (
               INSERT INTO asset_documents (asset_id, document, issuer_signature, provider_signature)
               SELECT * FROM unnest($1::uuid[], $17::text[], $18::text[], $19::text[])
             ), new_certificates AS (
               INSERT INTO exchange_certificates (id, asset_id, holder_terminal_id, issued_at, expires_at)
               SELECT c.id, c.asset_id, c.holder, $8, $10 FROM unnest($20::uuid[], $21::uuid[], $22::text[]) AS c(id, asset_id, holder)
             ), new_certificate_documents AS (
               INSERT INTO certificate_documents (certificate_id, document, signature)
               SELECT * FROM unnest($20::uuid[], $23::text[], $24::text[])
             ), new_schedules AS (
               INSERT INTO reminder_schedule (certificate_id, asset_id, expires_at, next_stage, due_at)
               SELECT c.id, c.asset_id, $10, 1, $25
               FROM unnest($20::uuid[], $21::uuid[]) AS c(id, asset_id)
             )
             UPDATE orders SET status = 'issued', updated_at = $8 WHERE id = $4",
        )
        .bind::<Array<SqlUuid>, _>(&self.asset_ids)
        .bind::<Array<Text>, _>(&self.recipients)
        .bind::<Array<Int4>, _>(&self.ordinals)
        .bind::<SqlUuid, _>(order.id)
        .bind::<Text, _>(&product.id)
        .bind::<Text, _>(&product.kind)
        .bind::<Text, _>(&product.issuer_id)
        .bind::<Timestamptz, _>(now)
        .bind::<Timestamptz, _>(terms.expires_at)
        .bind::<Nullable<Timestamptz>, _>(terms.certificate_expires_at)
        .bind::<Text, _>(terms.status.as_str())
        .bind::<Bool, _>(product.transferable)
        .bind::<Nullable<Timestamptz>, _>(order.designated_at)
        .bind::<Nullable<Int8>, _>(product.value_minor)
        .bind::<Nullable<Int4>, _>(product.uses)
        .bind::<Text, _>(&product.currency)
        .bind::<Array<Text>, _>(&self.asset_documents)
        .bind::<Array<Text>, _>(&self.issuer_signatures)
        .bind::<Array<Text>, _>(&self.provider_signatures)
        .bind::<Array<SqlUuid>, _>(&self.certificate_ids)
        .bind::<Array<SqlUuid>, _>(&self.certified_assets)
        .bind::<Array<Text>, _>(&self.holders)
        .bind::<Array<Text>, _>(&self.certificate_documents)
        .bind::<Array<Text>, _>(&self.certificate_signatures)
        .bind::<Nullable<Timestamptz>, _>(terms.reminder_due_at)
        .execute(conn)?;
        Ok(())
    }
}
