//! `order.booking`: a receipt certificate is issued, signed and delivered; nothing is charged.

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
use crate::domain::requests::{Authentic, Header, Requests};
use crate::domain::schema::{booking_terms, receipt_certificates};
use crate::domain::settlement::Settlements;
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received};

/// BookingHandler takes `order.booking`: each request checked and carried out on its own, in
/// turn. It runs in the issuance pool, whose processes hold the signing keys.
pub struct BookingHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
    pub keys: Arc<KeyRing>,
    pub service_provider_id: String,
}

impl Handler for BookingHandler {
    type Message = BookingRequest;
    const MESSAGE_TYPE: &'static str = kinds::ORDER_BOOKING;

    /// Requests handled together are carried out one after another in the batch's transaction,
    /// each seeing what the ones before it did, as it would alone: one commit for all of them.
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, BookingRequest>]) -> Result<(), Failure> {
        for Received { message, incoming } in batch {
            self.take(cx, incoming, message)?;
        }
        Ok(())
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::ORDER_BOOKING, detail)
    }
}

impl BookingHandler {
    fn take(&self, cx: &mut Cx<'_>, incoming: &Incoming, booking: &BookingRequest) -> Result<(), Failure> {
        let header = Header {
            message_type: kinds::ORDER_BOOKING,
            request_id: &booking.request_id,
            terminal_id: &booking.terminal_id,
            sent_at: booking.sent_at,
        };
        let Some(Authentic { terminal, content_sha256 }) = self.requests.admit(cx, incoming, &header)? else {
            return Ok(());
        };
        let (product, terms, payer) = match self.plan(cx, booking, &terminal)? {
            Err(refused) => {
                return self.requests.refuse(cx, incoming, &header, Some(&terminal), Some(&content_sha256), refused);
            }
            Ok(plan) => plan,
        };
        let now = cx.now;
        let condition = terms.condition();
        let id = Uuid::now_v7();
        let asset_id = Uuid::now_v7();
        let expires_at = product.certificate_expiry(now);
        let document = self.document(id, asset_id, &terminal.id, &product, &terms, now, expires_at)?;
        let (status, submit_by) = match condition {
            Condition::Hold => ("open", Some(expires_at)),
            Condition::Lottery | Condition::Threshold => ("applied", None),
        };
        let reminder_due_at =
            Some(expires_at - chrono::Duration::seconds(product.reminder_stage1_secs)).filter(|at| *at > now);
        self.requests.accept(cx, &header, &content_sha256, id)?;
        diesel::insert_into(receipt_certificates::table)
            .values((
                receipt_certificates::id.eq(id),
                receipt_certificates::request_id.eq(&booking.request_id),
                receipt_certificates::product_id.eq(&product.id),
                receipt_certificates::holder_terminal_id.eq(&terminal.id),
                receipt_certificates::payer_terminal_id.eq(&payer.id),
                receipt_certificates::asset_id.eq(asset_id),
                receipt_certificates::condition.eq(condition.as_str()),
                receipt_certificates::status.eq(status),
                receipt_certificates::issued_at.eq(now),
                receipt_certificates::expires_at.eq(expires_at),
                receipt_certificates::submit_by.eq(submit_by),
                receipt_certificates::reminder_due_at.eq(reminder_due_at),
                receipt_certificates::document.eq(crypto::canonical_json(&document)),
                receipt_certificates::updated_at.eq(now),
            ))
            .execute(cx.conn)?;
        let delivery = NewDelivery::now(
            DeliveryKind::ReceiptCertificate,
            format!("receipt:{id}"),
            &terminal,
            json!({"receipt_certificate": document}),
        )
        .answering(booking.request_id.clone());
        delivery::enqueue(cx, &self.requests.deliveries, delivery)?;
        metrics::booking(condition.as_str(), "booked");
        tracing::info!(receipt_certificate_id = %id, product_id = %product.id, condition = condition.as_str(), "booked");
        Ok(())
    }

    /// plan checks the booking: a product sold by booking and still open to it, and a payer who
    /// can pay when the certificate is submitted.
    fn plan(
        &self,
        cx: &mut Cx<'_>,
        booking: &BookingRequest,
        holder: &Terminal,
    ) -> Result<Result<(Product, Terms, Terminal), Refused>, Failure> {
        macro_rules! refuse {
            ($reason:expr, $($detail:tt)*) => { return Ok(Err(Refused::new($reason, format!($($detail)*)))) };
        }
        let Some(product) = cx.product(&booking.product_id)? else {
            refuse!(RefusalReason::UnknownProduct, "product {:?} does not exist", booking.product_id)
        };
        if !product.on_sale {
            refuse!(RefusalReason::NotOnSale, "product {:?} is not on sale", product.id)
        }
        let terms: Option<Terms> =
            booking_terms::table.find(&product.id).select(Terms::as_select()).first(cx.conn).optional()?;
        let Some(terms) = terms else {
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
