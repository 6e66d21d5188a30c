//! The issuance pool: assets and exchange certificates are issued only for settled orders, held
//! by assetflow (`docs/product.md#retaining`), signed by the issuer and the service provider,
//! and handed to the delivery pool.

mod defer;
mod documents;
mod exchange;
pub mod modification;

pub use defer::DeferHandler;
pub use documents::{asset_document, certificate_document};
pub use exchange::ExchangeHandler;
pub use modification::{AnswerHandler, DefaultsHandler, IssuerChangeHandler, Modifications};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::json;
use uuid::Uuid;

use std::sync::Arc;

use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeliveryKind, IssuanceRequested, kinds};
use crate::crypto::KeyRing;
use crate::domain::catalogue::{Catalogue, Product};
use crate::domain::delivery::{self, Deliveries, NewDelivery};
use crate::domain::schema::orders;
use crate::domain::status::{self, Status};
use crate::runtime::consumer::{Cx, Failure, Handler, Received};

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = orders)]
struct Order {
    id: Uuid,
    request_id: String,
    product_id: String,
    quantity: i32,
    recipient_terminal_ids: Vec<String>,
    delivery_mode: String,
    designated_at: Option<DateTime<Utc>>,
    status: String,
    /// The asset a submitted receipt certificate reserved: the order's one asset has this id.
    reserved_asset_id: Option<Uuid>,
}

/// IssueHandler takes `issuance.requested`. Requests handled together are issued together: their
/// orders are read in one statement and everything they issue is written in three. A message that
/// cannot be carried out is dead-lettered with all of its orders; replayed, it issues those still
/// waiting and skips the rest.
pub struct IssueHandler {
    pub issuer: Arc<Issuer>,
}

/// Issuer is what issuing needs: the issuers' and the service provider's signing keys, the
/// provider's id that signed documents carry, and the deliveries that hand them over.
pub struct Issuer {
    pub keys: Arc<KeyRing>,
    pub service_provider_id: String,
    pub deliveries: Arc<Deliveries>,
}

impl Handler for IssueHandler {
    type Message = IssuanceRequested;
    const MESSAGE_TYPE: &'static str = kinds::ISSUANCE_REQUESTED;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, IssuanceRequested>]) -> Result<(), Failure> {
        let issuer = &*self.issuer;
        let mut ids: Vec<Uuid> = batch.iter().flat_map(|r| r.message.orders()).collect();
        // Locked in id order, so that two batches naming the same orders cannot deadlock.
        ids.sort_unstable();
        ids.dedup();
        let orders: Vec<Order> = orders::table
            .filter(orders::id.eq_any(&ids))
            .order(orders::id)
            .select(Order::as_select())
            .for_update()
            .load(cx.conn)?;
        if let Some(missing) = ids.iter().find(|id| !orders.iter().any(|o| o.id == **id)) {
            return Err(Failure::permanent(DeadLetterReason::Unprocessable, format!("no order {missing}")));
        }
        // Issues and an issuer's change of their product take turns: each asset is either issued
        // with the change and told of it here, or issued before it and found by its announcement.
        let products: std::collections::BTreeSet<&str> =
            orders.iter().filter(|o| o.status == "issuing").map(|o| o.product_id.as_str()).collect();
        let products: Vec<&str> = products.into_iter().collect();
        modification::hold_products(cx.conn, &products)?;
        let mut issue = Issue::default();
        cx.read_terminals(orders.iter().flat_map(|o| o.recipient_terminal_ids.iter().map(String::as_str)))?;
        // Issued already, or never settled: nothing to do for those.
        for order in orders.iter().filter(|o| o.status == "issuing") {
            sign(cx, issuer, order, &mut issue)?;
        }
        if issue.issued.assets.is_empty() {
            return Ok(());
        }
        issue.issued.write(cx.conn, cx.now)?;
        status::record_issued(cx.conn, &issue.issued.assets, &issue.issued.statuses, cx.now)?;
        delivery::enqueue_many(cx, &issuer.deliveries, &issue.deliveries)?;
        // An order placed before its product changed is issued with the change: its holder is
        // told, and may still take a refund.
        let issued = &issue.issued;
        modification::notify_issued_after_changes(
            cx.conn,
            &issuer.deliveries,
            &issued.assets,
            &issued.asset_orders,
            &issued.recipients,
            cx.now,
            cx.outgoing,
        )?;
        Ok(())
    }
}

/// Issue is what a batch of orders issues: the signed rows, and the deliveries to send.
#[derive(Default)]
struct Issue {
    issued: Issued,
    deliveries: Vec<NewDelivery>,
}

/// sign builds and signs an order's assets and certificates, and their deliveries, into `issue`.
fn sign(cx: &mut Cx<'_>, issuer: &Issuer, order: &Order, issue: &mut Issue) -> Result<(), Failure> {
    let now = cx.now;
    let product = cx.product(&order.product_id)?.ok_or_else(|| {
        Failure::permanent(DeadLetterReason::Unprocessable, format!("product {} vanished", order.product_id))
    })?;
    let issuer_key = issuer.keys.issuer(&product.issuer_id).ok_or_else(|| {
        Failure::permanent(
            DeadLetterReason::Unprocessable,
            format!("assetflow holds no signing key for issuer {:?}", product.issuer_id),
        )
    })?;
    // Only the processes that sign hold the keys (`assetflow run` loads them for the issuance
    // pool alone): another process has no business here, and the message goes back to the queue.
    let provider_key = issuer.keys.provider().ok_or_else(|| {
        Failure::Transient("this process holds no signing keys: it does not run the issuance pool".into())
    })?;
    let provider = &issuer.service_provider_id;
    let with_certificate = order.delivery_mode == "certificate";
    let status = if with_certificate { Status::AwaitingExchange } else { Status::AwaitingDesignatedDelivery };
    let expires_at = product.asset_expiry(now);
    let certificate_expires_at = with_certificate.then(|| product.certificate_expiry(now));
    let reminder_due_at =
        certificate_expires_at.map(|expiry| expiry - chrono::Duration::seconds(product.reminder_stage1_secs));
    let issued = &mut issue.issued;
    issued.orders.push(order.id);
    let mut count = 0;
    for recipient_id in &order.recipient_terminal_ids {
        let recipient = cx.terminal(recipient_id)?.ok_or_else(|| {
            Failure::permanent(DeadLetterReason::Unprocessable, format!("recipient {recipient_id} vanished"))
        })?;
        for ordinal in 0..order.quantity {
            let asset_id = order.reserved_asset_id.filter(|_| count == 0).unwrap_or_else(Uuid::now_v7);
            let document =
                asset_document(&product, asset_id, &recipient.id, now, expires_at, provider, issuer_key, provider_key)
                    .map_err(|e| Failure::permanent(DeadLetterReason::Unprocessable, format!("signing asset: {e}")))?;
            issued.asset(NewAsset {
                id: asset_id,
                order,
                recipient: &recipient.id,
                ordinal,
                product: &product,
                status,
                expires_at,
                certificate_expires_at,
                document: &document,
            });
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
                    provider_key,
                )
                .map_err(|e| {
                    Failure::permanent(DeadLetterReason::Unprocessable, format!("signing certificate: {e}"))
                })?;
                issued.certificate(certificate_id, asset_id, &recipient.id, cert_expiry, reminder_due_at, &certificate);
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
            delivery.request_id = Some(order.request_id.clone());
            issue.deliveries.push(delivery);
            count += 1;
        }
    }
    tracing::info!(order_id = %order.id, assets = count, "issued");
    Ok(())
}

/// NewAsset is one asset to store, as [`Issued::asset`] takes it.
struct NewAsset<'a> {
    id: Uuid,
    order: &'a Order,
    recipient: &'a str,
    ordinal: i32,
    product: &'a Product,
    status: Status,
    expires_at: DateTime<Utc>,
    certificate_expires_at: Option<DateTime<Utc>>,
    document: &'a serde_json::Value,
}

/// Issued gathers signed assets and certificates, column by column, so that [`Issued::write`]
/// stores them all in one statement, whatever their number and their orders.
#[derive(Default)]
struct Issued {
    orders: Vec<Uuid>,
    assets: Vec<Uuid>,
    asset_orders: Vec<Uuid>,
    recipients: Vec<String>,
    ordinals: Vec<i32>,
    products: Vec<String>,
    kinds: Vec<String>,
    issuers: Vec<String>,
    expires_at: Vec<DateTime<Utc>>,
    certificate_expires_at: Vec<Option<DateTime<Utc>>>,
    statuses: Vec<Status>,
    transferable: Vec<bool>,
    designated_at: Vec<Option<DateTime<Utc>>>,
    values: Vec<Option<i64>>,
    uses: Vec<Option<i32>>,
    currencies: Vec<String>,
    asset_documents: Vec<String>,
    issuer_signatures: Vec<String>,
    provider_signatures: Vec<String>,
    certificates: Vec<Uuid>,
    certified_assets: Vec<Uuid>,
    holders: Vec<String>,
    certificate_expiries: Vec<DateTime<Utc>>,
    reminders_due_at: Vec<Option<DateTime<Utc>>>,
    certificate_documents: Vec<String>,
    certificate_signatures: Vec<String>,
    /// For each asset, the asset it replaces (an issuer's change accepted), and its generation.
    replaces: Vec<Option<Uuid>>,
    generations: Vec<i32>,
}

impl Issued {
    fn asset(&mut self, a: NewAsset<'_>) {
        self.assets.push(a.id);
        self.asset_orders.push(a.order.id);
        self.recipients.push(a.recipient.to_string());
        self.ordinals.push(a.ordinal);
        self.products.push(a.product.id.clone());
        self.kinds.push(a.product.kind.clone());
        self.issuers.push(a.product.issuer_id.clone());
        self.expires_at.push(a.expires_at);
        self.certificate_expires_at.push(a.certificate_expires_at);
        self.statuses.push(a.status);
        self.transferable.push(a.product.transferable);
        self.designated_at.push(a.order.designated_at);
        self.values.push(a.product.value_minor);
        self.uses.push(a.product.uses);
        self.currencies.push(a.product.currency.clone());
        self.asset_documents.push(crate::crypto::canonical_json(a.document));
        self.issuer_signatures.push(a.document["issuer_signature"].as_str().unwrap_or_default().to_string());
        self.provider_signatures.push(a.document["signature"].as_str().unwrap_or_default().to_string());
        self.replaces.push(None);
        self.generations.push(0);
    }

    fn certificate(
        &mut self,
        id: Uuid,
        asset_id: Uuid,
        holder: &str,
        expires_at: DateTime<Utc>,
        reminder_due_at: Option<DateTime<Utc>>,
        document: &serde_json::Value,
    ) {
        self.certificates.push(id);
        self.certified_assets.push(asset_id);
        self.holders.push(holder.to_string());
        self.certificate_expiries.push(expires_at);
        self.reminders_due_at.push(reminder_due_at);
        self.certificate_documents.push(crate::crypto::canonical_json(document));
        self.certificate_signatures.push(document["signature"].as_str().unwrap_or_default().to_string());
    }

    /// Issued::write stores the assets with their documents, the certificates with their documents
    /// and reminder schedules, and marks their orders issued: one round trip. The sub-statements
    /// of a `WITH` run as one statement, so the foreign keys between them are checked at its end,
    /// when every row is in (<https://www.postgresql.org/docs/15/queries-with.html#QUERIES-WITH-MODIFYING>).
    fn write(&self, conn: &mut PgConnection, now: DateTime<Utc>) -> QueryResult<()> {
        use diesel::sql_types::{Array, Bool, Int4, Int8, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        let statuses: Vec<&str> = self.statuses.iter().map(|s| s.as_str()).collect();
        crate::runtime::db::prepared(
            "WITH new_assets AS (
               INSERT INTO assets (id, order_id, recipient_terminal_id, ordinal, product_id, kind, issuer_id,
                                   holder_terminal_id, issued_at, expires_at, has_exchange_certificate,
                                   certificate_expires_at, status, transferable, designated_at, value_minor,
                                   remaining_minor, remaining_uses, currency, status_changed_at, replaces_asset_id,
                                   generation)
               SELECT id, order_id, recipient, ordinal, product_id, kind, issuer_id, recipient, $now, expires_at,
                      certificate_expires_at IS NOT NULL, certificate_expires_at, status, transferable,
                      designated_at, value_minor, value_minor, uses, currency, $now, replaces, generation
               FROM unnest($assets::uuid[], $asset_orders::uuid[], $recipients::text[], $ordinals::int4[], $products::text[], $kinds::text[], $issuers::text[],
                           $expires_at::timestamptz[], $certificate_expires_at::timestamptz[], $statuses::text[], $transferable::bool[], $designated_at::timestamptz[],
                           $values::int8[], $uses::int4[], $currencies::text[], $replaces::uuid[], $generations::int4[])
                    AS a(id, order_id, recipient, ordinal, product_id, kind, issuer_id, expires_at,
                         certificate_expires_at, status, transferable, designated_at, value_minor, uses, currency,
                         replaces, generation)
             ), new_asset_documents AS (
               INSERT INTO asset_documents (asset_id, document, issuer_signature, provider_signature)
               SELECT * FROM unnest($assets::uuid[], $asset_documents::text[], $issuer_signatures::text[], $provider_signatures::text[])
             ), new_certificates AS (
               INSERT INTO exchange_certificates (id, asset_id, holder_terminal_id, issued_at, expires_at)
               SELECT id, asset_id, holder, $now, expires_at
               FROM unnest($certificates::uuid[], $certified_assets::uuid[], $holders::text[], $certificate_expiries::timestamptz[]) AS c(id, asset_id, holder, expires_at)
             ), new_certificate_documents AS (
               INSERT INTO certificate_documents (certificate_id, document, signature)
               SELECT * FROM unnest($certificates::uuid[], $certificate_documents::text[], $certificate_signatures::text[])
             ), new_schedules AS (
               INSERT INTO reminder_schedule (certificate_id, asset_id, expires_at, next_stage, due_at)
               SELECT id, asset_id, expires_at, 1, due_at
               FROM unnest($certificates::uuid[], $certified_assets::uuid[], $certificate_expiries::timestamptz[], $reminders_due_at::timestamptz[]) AS c(id, asset_id, expires_at, due_at)
             )
             UPDATE orders SET status = 'issued', updated_at = $now WHERE id = ANY($orders)",
        )
        .bind::<Timestamptz, _>("now", now)
        .bind::<Array<SqlUuid>, _>("assets", &self.assets)
        .bind::<Array<SqlUuid>, _>("asset_orders", &self.asset_orders)
        .bind::<Array<Text>, _>("recipients", &self.recipients)
        .bind::<Array<Int4>, _>("ordinals", &self.ordinals)
        .bind::<Array<Text>, _>("products", &self.products)
        .bind::<Array<Text>, _>("kinds", &self.kinds)
        .bind::<Array<Text>, _>("issuers", &self.issuers)
        .bind::<Array<Timestamptz>, _>("expires_at", &self.expires_at)
        .bind::<Array<Nullable<Timestamptz>>, _>("certificate_expires_at", &self.certificate_expires_at)
        .bind::<Array<Text>, _>("statuses", statuses)
        .bind::<Array<Bool>, _>("transferable", &self.transferable)
        .bind::<Array<Nullable<Timestamptz>>, _>("designated_at", &self.designated_at)
        .bind::<Array<Nullable<Int8>>, _>("values", &self.values)
        .bind::<Array<Nullable<Int4>>, _>("uses", &self.uses)
        .bind::<Array<Text>, _>("currencies", &self.currencies)
        .bind::<Array<Text>, _>("asset_documents", &self.asset_documents)
        .bind::<Array<Text>, _>("issuer_signatures", &self.issuer_signatures)
        .bind::<Array<Text>, _>("provider_signatures", &self.provider_signatures)
        .bind::<Array<SqlUuid>, _>("certificates", &self.certificates)
        .bind::<Array<SqlUuid>, _>("certified_assets", &self.certified_assets)
        .bind::<Array<Text>, _>("holders", &self.holders)
        .bind::<Array<Timestamptz>, _>("certificate_expiries", &self.certificate_expiries)
        .bind::<Array<Text>, _>("certificate_documents", &self.certificate_documents)
        .bind::<Array<Text>, _>("certificate_signatures", &self.certificate_signatures)
        .bind::<Array<Nullable<Timestamptz>>, _>("reminders_due_at", &self.reminders_due_at)
        .bind::<Array<SqlUuid>, _>("orders", &self.orders)
        .bind::<Array<Nullable<SqlUuid>>, _>("replaces", &self.replaces)
        .bind::<Array<Int4>, _>("generations", &self.generations)
        .execute(conn)?;
        Ok(())
    }
}
