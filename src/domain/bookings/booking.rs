//! `order.booking`: a receipt certificate is issued, signed and delivered; nothing is charged.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Condition, Terms};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{BookingRequest, DeliveryKind, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::crypto::{self, KeyRing};
use crate::domain::catalogue::{Catalogue, Product, Terminal};
use crate::domain::delivery::{self, NewDelivery};
use crate::domain::metrics;
use crate::domain::requests::{Admitted, Header, Requests};
use crate::domain::schema::booking_terms;
use crate::domain::settlement::Settlements;
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received, together_unless_repeated};

/// BookingHandler takes `order.booking`. Bookings made together are authenticated and signed one
/// by one, read in three statements (their request ids, their payers, their products' terms) and
/// recorded in two, their receipt certificates handed to the delivery pool in one message. It runs
/// in the issuance pool, whose processes hold the signing keys.
pub struct BookingHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
    pub keys: Arc<KeyRing>,
    pub service_provider_id: String,
}

impl Handler for BookingHandler {
    type Message = BookingRequest;
    const MESSAGE_TYPE: &'static str = kinds::ORDER_BOOKING;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, BookingRequest>]) -> Result<(), Failure> {
        together_unless_repeated(cx, batch, |r| [r.request_id.clone()], |cx, batch| self.take(cx, batch))
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::ORDER_BOOKING, detail)
    }
}

fn header(booking: &BookingRequest) -> Header<'_> {
    Header {
        message_type: kinds::ORDER_BOOKING,
        request_id: &booking.request_id,
        terminal_id: &booking.terminal_id,
        sent_at: booking.sent_at,
    }
}

impl BookingHandler {
    /// take carries out bookings with distinct request ids, each checked as it would be alone, in
    /// the order of the checks `requests` describes.
    fn take(&self, cx: &mut Cx<'_>, batch: &[Received<'_, BookingRequest>]) -> Result<(), Failure> {
        let req = &*self.requests;
        cx.read_terminals(batch.iter().flat_map(|r| {
            std::iter::once(r.message.terminal_id.as_str()).chain(r.message.payer_terminal_id.as_deref())
        }))?;
        let admitted = req.admit_batch(cx, batch, header)?;
        if admitted.is_empty() {
            return Ok(());
        }
        let products: Vec<&str> = admitted.iter().map(|a| a.message.product_id.as_str()).collect();
        let terms: HashMap<String, Terms> = booking_terms::table
            .filter(booking_terms::product_id.eq_any(&products))
            .select(Terms::as_select())
            .load(cx.conn)?
            .into_iter()
            .map(|t| (t.product_id.clone(), t))
            .collect();
        let mut booked = Booked::default();
        for Admitted { incoming, message: booking, terminal, content_sha256: sha } in admitted {
            let header = header(booking);
            match self.plan(cx, booking, &terminal, &terms)? {
                Err(refused) => req.refuse(cx, incoming, &header, Some(&terminal), Some(&sha), refused)?,
                Ok((product, terms, payer)) => {
                    self.book(cx, &mut booked, &header, sha, &terminal, &product, terms, &payer)?
                }
            }
        }
        booked.write(cx.conn, cx.now)?;
        delivery::enqueue_many(cx, &self.requests.deliveries, &booked.deliveries)?;
        Ok(())
    }

    /// book signs a booking's receipt certificate and adds it, with its delivery, to `booked`.
    #[allow(clippy::too_many_arguments)]
    fn book(
        &self,
        cx: &mut Cx<'_>,
        booked: &mut Booked,
        header: &Header<'_>,
        content_sha256: String,
        terminal: &Terminal,
        product: &Product,
        terms: &Terms,
        payer: &Terminal,
    ) -> Result<(), Failure> {
        let now = cx.now;
        let condition = terms.condition();
        let id = Uuid::now_v7();
        let asset_id = Uuid::now_v7();
        let expires_at = product.certificate_expiry(now);
        let document = self.document(id, asset_id, &terminal.id, product, terms, now, expires_at)?;
        let (status, submit_by) = match condition {
            Condition::Hold => ("open", Some(expires_at)),
            Condition::Lottery | Condition::Threshold => ("applied", None),
        };
        let reminder_due_at =
            Some(expires_at - chrono::Duration::seconds(product.reminder_stage1_secs)).filter(|at| *at > now);
        booked.deliveries.push(
            NewDelivery::now(
                DeliveryKind::ReceiptCertificate,
                format!("receipt:{id}"),
                terminal,
                json!({"receipt_certificate": document}),
            )
            .answering(header.request_id),
        );
        booked.ids.push(id);
        booked.request_ids.push(header.request_id.to_string());
        booked.holders.push(terminal.id.clone());
        booked.content_sha256s.push(content_sha256);
        booked.sent_at.push(header.sent_at);
        booked.products.push(product.id.clone());
        booked.payers.push(payer.id.clone());
        booked.assets.push(asset_id);
        booked.conditions.push(condition.as_str());
        booked.statuses.push(status);
        booked.expires_at.push(expires_at);
        booked.submit_by.push(submit_by);
        booked.reminder_due_at.push(reminder_due_at);
        booked.documents.push(crypto::canonical_json(&document));
        metrics::booking(condition.as_str(), "booked");
        tracing::info!(receipt_certificate_id = %id, product_id = %product.id, condition = condition.as_str(), "booked");
        Ok(())
    }

    /// plan checks the booking: a product sold by booking and still open to it, and a payer who
    /// can pay when the certificate is submitted.
    fn plan<'t>(
        &self,
        cx: &mut Cx<'_>,
        booking: &BookingRequest,
        holder: &Terminal,
        terms: &'t HashMap<String, Terms>,
    ) -> Result<Result<(Product, &'t Terms, Terminal), Refused>, Failure> {
        macro_rules! refuse {
            ($reason:expr, $($detail:tt)*) => { return Ok(Err(Refused::new($reason, format!($($detail)*)))) };
        }
        let Some(product) = cx.product(&booking.product_id)? else {
            refuse!(RefusalReason::UnknownProduct, "product {:?} does not exist", booking.product_id)
        };
        if !product.on_sale {
            refuse!(RefusalReason::NotOnSale, "product {:?} is not on sale", product.id)
        }
        let Some(terms) = terms.get(&product.id) else {
            refuse!(RefusalReason::NotSoldByBooking, "product {:?} is sold by purchase, not by booking", product.id)
        };
        let now = cx.now;
        if let Some(decided_at) = terms.decided_at.filter(|_| terms.condition() != Condition::Hold) {
            if decided_at <= now {
                refuse!(RefusalReason::BookingClosed, "bookings for {:?} closed at {decided_at}", product.id)
            }
            if product.certificate_expiry(now) <= decided_at {
                refuse!(
                    RefusalReason::BookingClosed,
                    "a certificate booked now would expire before the {} at {decided_at}",
                    terms.condition
                )
            }
        }
        let payer_id = booking.payer_terminal_id.clone().unwrap_or_else(|| holder.id.clone());
        let Some(payer) = cx.terminal(&payer_id)? else {
            refuse!(RefusalReason::UnknownParty, "payer terminal {payer_id:?} is not registered")
        };
        match &payer.partner_id {
            Some(partner) if self.settlements.partners.contains_key(partner) => {}
            _ => refuse!(RefusalReason::NoPaymentMethod, "payer terminal {payer_id:?} has no usable payment method"),
        }
        // A submission is settled at once: it cannot wait for another payer's confirmation, so
        // only a payer (or a product) that waives it may be billed for someone else's booking.
        if product.needs_confirmation(holder, &payer) {
            refuse!(
                RefusalReason::ConfirmationRequired,
                "payer terminal {payer_id:?} confirms what others bill to it, and a submission cannot wait for that"
            )
        }
        Ok(Ok((product, terms, payer)))
    }

    /// document builds and signs a receipt certificate (`docs/product.md#receipt-certificates`):
    /// the issuer signs its asset part, and the service provider the whole.
    #[allow(clippy::too_many_arguments)]
    fn document(
        &self,
        id: Uuid,
        asset_id: Uuid,
        holder: &str,
        product: &Product,
        terms: &Terms,
        issued_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Value, Failure> {
        let unsigned = |e: crypto::CryptoError| {
            Failure::permanent(DeadLetterReason::Unprocessable, format!("signing a receipt certificate: {e}"))
        };
        let issuer = self.keys.issuer(&product.issuer_id).ok_or_else(|| {
            Failure::permanent(
                DeadLetterReason::Unprocessable,
                format!("assetflow holds no signing key for issuer {:?}", product.issuer_id),
            )
        })?;
        let provider = self.keys.provider().ok_or_else(|| {
            Failure::Transient("this process holds no signing keys: it does not run the issuance pool".into())
        })?;
        let mut asset = json!({
            "asset_id": asset_id,
            "issuer_id": product.issuer_id,
            "information": {
                "product_id": product.id,
                "kind": product.kind,
                "title": product.title,
                "tags": product.tags,
                "price_minor": product.price_minor,
                "currency": product.currency,
            },
        });
        asset["issuer_signature"] =
            json!(crypto::sign(&issuer.key, crypto::canonical_json(&asset).as_bytes()).map_err(unsigned)?);
        asset["issuer_key_id"] = json!(issuer.key_id);
        let mut condition = json!({"kind": terms.condition});
        if terms.condition() != Condition::Hold {
            condition["places"] = json!(terms.places);
            condition["decided_at"] = json!(terms.decided_at);
        }
        let mut document = json!({
            "receipt_certificate_id": id,
            "service_provider_id": self.service_provider_id,
            "holder_terminal_id": holder,
            "issued_at": issued_at,
            "expires_at": expires_at,
            "condition": condition,
            "asset": asset,
            "key_id": provider.key_id,
        });
        crypto::sign_document(&provider.key, &mut document).map_err(unsigned)?;
        Ok(document)
    }
}

/// Booked is receipt certificates to record together, with the bookings that asked for them, for
/// [`Booked::write`], and their deliveries.
#[derive(Default)]
struct Booked {
    ids: Vec<Uuid>,
    request_ids: Vec<String>,
    holders: Vec<String>,
    content_sha256s: Vec<String>,
    sent_at: Vec<DateTime<Utc>>,
    products: Vec<String>,
    payers: Vec<String>,
    assets: Vec<Uuid>,
    conditions: Vec<&'static str>,
    statuses: Vec<&'static str>,
    expires_at: Vec<DateTime<Utc>>,
    submit_by: Vec<Option<DateTime<Utc>>>,
    reminder_due_at: Vec<Option<DateTime<Utc>>>,
    documents: Vec<String>,
    deliveries: Vec<NewDelivery>,
}

impl Booked {
    /// Booked::write records the bookings as accepted, each naming its receipt certificate, and
    /// the certificates, in one round trip whatever their number.
    fn write(&self, conn: &mut PgConnection, now: DateTime<Utc>) -> QueryResult<()> {
        use diesel::sql_types::{Array, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        if self.ids.is_empty() {
            return Ok(());
        }
        crate::runtime::db::prepared(
            "WITH recorded AS (
               INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at,
                                              received_at, outcome, subject_id)
               SELECT request_id, holder, $message_type, sha, sent_at, $now, 'accepted', id
               FROM unnest($ids::uuid[], $request_ids::text[], $holders::text[], $content_sha256s::text[], $sent_at::timestamptz[])
                    AS r(id, request_id, holder, sha, sent_at)
             )
             INSERT INTO receipt_certificates (id, request_id, product_id, holder_terminal_id, payer_terminal_id, asset_id,
                                               condition, status, issued_at, expires_at, submit_by, reminder_due_at,
                                               document, updated_at)
             SELECT id, request_id, product_id, holder, payer, asset_id, condition, status, $now, expires_at, submit_by,
                    reminder_due_at, document, $now
             FROM unnest($ids::uuid[], $request_ids::text[], $products::text[], $holders::text[], $payers::text[],
                         $assets::uuid[], $conditions::text[], $statuses::text[], $expires_at::timestamptz[],
                         $submit_by::timestamptz[], $reminder_due_at::timestamptz[], $documents::text[])
                  AS c(id, request_id, product_id, holder, payer, asset_id, condition, status, expires_at, submit_by,
                       reminder_due_at, document)",
        )
        .bind::<Timestamptz, _>("now", now)
        .bind::<Text, _>("message_type", kinds::ORDER_BOOKING)
        .bind::<Array<SqlUuid>, _>("ids", &self.ids)
        .bind::<Array<Text>, _>("request_ids", &self.request_ids)
        .bind::<Array<Text>, _>("holders", &self.holders)
        .bind::<Array<Text>, _>("content_sha256s", &self.content_sha256s)
        .bind::<Array<Timestamptz>, _>("sent_at", &self.sent_at)
        .bind::<Array<Text>, _>("products", &self.products)
        .bind::<Array<Text>, _>("payers", &self.payers)
        .bind::<Array<SqlUuid>, _>("assets", &self.assets)
        .bind::<Array<Text>, _>("conditions", &self.conditions)
        .bind::<Array<Text>, _>("statuses", &self.statuses)
        .bind::<Array<Timestamptz>, _>("expires_at", &self.expires_at)
        .bind::<Array<Nullable<Timestamptz>>, _>("submit_by", &self.submit_by)
        .bind::<Array<Nullable<Timestamptz>>, _>("reminder_due_at", &self.reminder_due_at)
        .bind::<Array<Text>, _>("documents", &self.documents)
        .execute(conn)?;
        Ok(())
    }
}
