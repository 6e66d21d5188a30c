//! `receipt.submit`: the holder presents its receipt certificate to buy. It is verified as an
//! exchange certificate is (genuine, not expired, not revoked, not submitted before, held by the
//! presenter) and its condition must be met; then an order for its reserved asset is placed and
//! settled through the payer's partner, and issued and delivered as a purchase.
//!
//! The certificate's row is locked first: a submission and the `bookings` scan revoking the
//! certificate at its expiry take it in turn, and the second sees what the first did.

use std::sync::Arc;

use diesel::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use super::Receipt;
use crate::contracts::messages::{DeliveryModeKind, SubmitRequest, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::crypto::{self, KeyRing};
use crate::domain::catalogue::{Catalogue, Terminal};
use crate::domain::metrics;
use crate::domain::requests::{Authentic, Header, Requests};
use crate::domain::schema::receipt_certificates;
use crate::domain::settlement::{NewOrder, Settlements, place};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received};

/// SubmitHandler takes `receipt.submit`: each request checked and carried out on its own, in turn.
pub struct SubmitHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
    /// The keys that verify the certificates assetflow signed.
    pub keys: Arc<KeyRing>,
}

impl Handler for SubmitHandler {
    type Message = SubmitRequest;
    const MESSAGE_TYPE: &'static str = kinds::RECEIPT_SUBMIT;

    /// Requests handled together are carried out one after another in the batch's transaction,
    /// each seeing what the ones before it did, as it would alone: one commit for all of them.
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, SubmitRequest>]) -> Result<(), Failure> {
        for Received { message, incoming } in batch {
            self.take(cx, incoming, message)?;
        }
        Ok(())
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::RECEIPT_SUBMIT, detail)
    }
}

impl SubmitHandler {
    fn take(&self, cx: &mut Cx<'_>, incoming: &Incoming, submit: &SubmitRequest) -> Result<(), Failure> {
        let header = Header {
            message_type: kinds::RECEIPT_SUBMIT,
            request_id: &submit.request_id,
            terminal_id: &submit.terminal_id,
            sent_at: submit.sent_at,
        };
        let Some(Authentic { terminal, content_sha256 }) = self.requests.admit(cx, incoming, &header)? else {
            return Ok(());
        };
        let receipt = match self.submittable(cx, submit, &terminal)? {
            Err(refused) => {
                metrics::booking(kinds::RECEIPT_SUBMIT, "refused");
                return self.requests.refuse(cx, incoming, &header, Some(&terminal), Some(&content_sha256), refused);
            }
            Ok(receipt) => receipt,
        };
        let now = cx.now;
        let product = cx.product(&receipt.product_id)?.ok_or_else(|| {
            Failure::permanent(
                crate::contracts::dead_letter::DeadLetterReason::Unprocessable,
                format!("product {} vanished", receipt.product_id),
            )
        })?;
        let Some(partner_id) = cx.terminal(&receipt.payer_terminal_id)?.and_then(|payer| payer.partner_id) else {
            let refused = Refused::new(
                RefusalReason::NoPaymentMethod,
                format!("payer terminal {:?} has no payment method", receipt.payer_terminal_id),
            );
            return self.requests.refuse(cx, incoming, &header, Some(&terminal), Some(&content_sha256), refused);
        };
        let order = NewOrder {
            request_id: &submit.request_id,
            orderer: &terminal.id,
            payer: &receipt.payer_terminal_id,
            partner_id: &partner_id,
            product: &product,
            // The asset now, as for an immediate purchase.
            mode: DeliveryModeKind::Immediate,
            reserved_asset_id: Some(receipt.asset_id),
        };
        let order_id = place(cx.conn, &self.settlements, order, now, cx.outgoing)?;
        self.requests.accept(cx, &header, &content_sha256, order_id)?;
        diesel::update(receipt_certificates::table.find(receipt.id))
            .set((
                receipt_certificates::status.eq("submitted"),
                receipt_certificates::order_id.eq(order_id),
                receipt_certificates::submit_request_id.eq(&submit.request_id),
                receipt_certificates::reminder_due_at.eq(None::<chrono::DateTime<chrono::Utc>>),
                receipt_certificates::updated_at.eq(now),
            ))
            .execute(cx.conn)?;
        metrics::booking(receipt.condition.as_str(), "submitted");
        tracing::info!(receipt_certificate_id = %receipt.id, %order_id, "receipt certificate submitted");
        Ok(())
    }

    /// submittable checks a presented receipt certificate as an exchange certificate is checked,
    /// and its condition; it returns the certificate, locked.
    fn submittable(
        &self,
        cx: &mut Cx<'_>,
        submit: &SubmitRequest,
        terminal: &Terminal,
    ) -> Result<Result<Receipt, Refused>, Failure> {
        macro_rules! refuse {
            ($reason:expr, $($detail:tt)*) => { return Ok(Err(Refused::new($reason, format!($($detail)*)))) };
        }
        if let Err(e) = self.keys.verify_provider(&submit.certificate) {
            metrics::signature_failure("certificate");
            refuse!(RefusalReason::CertificateForged, "the certificate's signature does not verify: {e}")
        }
        let Some(id) = submit
            .certificate
            .get("receipt_certificate_id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
        else {
            refuse!(RefusalReason::CertificateForged, "the certificate has no valid receipt_certificate_id")
        };
        let receipt: Option<Receipt> =
            receipt_certificates::table.find(id).select(Receipt::as_select()).for_update().first(cx.conn).optional()?;
        let Some(receipt) = receipt else {
            refuse!(RefusalReason::CertificateUnknown, "no receipt certificate {id} was issued")
        };
        if crypto::canonical_json(&submit.certificate) != receipt.document {
            metrics::signature_failure("certificate");
            refuse!(RefusalReason::CertificateForged, "the certificate differs from the one issued")
        }
        if receipt.holder_terminal_id != terminal.id {
            refuse!(
                RefusalReason::CertificateNotHeld,
                "receipt certificate {id} is not held by terminal {}",
                terminal.id
            )
        }
        match receipt.status.as_str() {
            "revoked" => refuse!(RefusalReason::CertificateRevoked, "receipt certificate {id} was revoked"),
            "submitted" | "issued" => {
                refuse!(RefusalReason::CertificateAlreadyExchanged, "receipt certificate {id} was submitted before")
            }
            "applied" => {
                refuse!(RefusalReason::ConditionNotMet, "receipt certificate {id} awaits its {}", receipt.condition)
            }
            "lost" => refuse!(
                RefusalReason::ConditionNotMet,
                "receipt certificate {id} did not win its {}: the right to buy was not granted",
                receipt.condition
            ),
            _ => {}
        }
        if receipt.expires_at <= cx.now {
            refuse!(RefusalReason::CertificateExpired, "receipt certificate {id} expired at {}", receipt.expires_at)
        }
        if let Some(by) = receipt.submit_by.filter(|by| *by <= cx.now) {
            refuse!(RefusalReason::CertificateExpired, "receipt certificate {id} had to be submitted by {by}")
        }
        Ok(Ok(receipt))
    }
}
