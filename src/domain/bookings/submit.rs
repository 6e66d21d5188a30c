//! `receipt.submit`: the holder presents its receipt certificate to buy. It is verified as an
//! exchange certificate is (genuine, not expired, not revoked, not submitted before, held by the
//! presenter) and its condition must be met; then an order for its reserved asset is placed and
//! settled through the payer's partner, and issued and delivered as a purchase.
//!
//! The certificate's row is locked first: a submission and the `bookings` scan revoking the
//! certificate at its expiry take it in turn, and the second sees what the first did.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use diesel::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use super::Receipt;
use crate::contracts::messages::{DeliveryModeKind, SubmitRequest, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::crypto::{self, KeyRing};
use crate::domain::catalogue::{Catalogue, Terminal};
use crate::domain::metrics;
use crate::domain::requests::{Admitted, Header, Requests};
use crate::domain::schema::receipt_certificates;
use crate::domain::settlement::{NewOrder, Placed, Settlements};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received, together_unless_repeated};

/// SubmitHandler takes `receipt.submit`. Submissions made together are authenticated and their
/// certificates verified one by one, then read in three statements (their request ids, their
/// certificates, locked, and their payers) and placed in two.
pub struct SubmitHandler {
    pub requests: Arc<Requests>,
    pub settlements: Arc<Settlements>,
    /// The keys that verify the certificates assetflow signed.
    pub keys: Arc<KeyRing>,
}

impl Handler for SubmitHandler {
    type Message = SubmitRequest;
    const MESSAGE_TYPE: &'static str = kinds::RECEIPT_SUBMIT;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    /// Two submissions of one certificate (or with one request id) are taken one after the
    /// other, the second seeing what the first did, as it would alone.
    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, SubmitRequest>]) -> Result<(), Failure> {
        together_unless_repeated(
            cx,
            batch,
            |r| {
                [
                    r.request_id.clone(),
                    format!("receipt:{}", certificate_id(r).map(|id| id.to_string()).unwrap_or_default()),
                ]
            },
            |cx, batch| self.take(cx, batch),
        )
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::RECEIPT_SUBMIT, detail)
    }
}

fn header(submit: &SubmitRequest) -> Header<'_> {
    Header {
        message_type: kinds::RECEIPT_SUBMIT,
        request_id: &submit.request_id,
        terminal_id: &submit.terminal_id,
        sent_at: submit.sent_at,
    }
}

/// certificate_id is the receipt certificate a submission presents, if it names one.
fn certificate_id(submit: &SubmitRequest) -> Option<Uuid> {
    submit.certificate.get("receipt_certificate_id").and_then(Value::as_str).and_then(|s| Uuid::parse_str(s).ok())
}

impl SubmitHandler {
    /// take carries out submissions of distinct certificates with distinct request ids, each
    /// checked as it would be alone, in the order of the checks `requests` describes.
    fn take(&self, cx: &mut Cx<'_>, batch: &[Received<'_, SubmitRequest>]) -> Result<(), Failure> {
        let req = &*self.requests;
        let admitted = req.admit_batch(cx, batch, header)?;
        if admitted.is_empty() {
            return Ok(());
        }
        let mut presented: Vec<Uuid> = admitted.iter().filter_map(|a| certificate_id(a.message)).collect();
        // Locked in id order, so that two transactions naming the same certificates cannot deadlock.
        presented.sort_unstable();
        let receipts: HashMap<Uuid, Receipt> = receipt_certificates::table
            .filter(receipt_certificates::id.eq_any(&presented))
            .order(receipt_certificates::id)
            .select(Receipt::as_select())
            .for_update()
            .load(cx.conn)?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        cx.read_terminals(receipts.values().map(|r| r.payer_terminal_id.as_str()))?;
        let mut placed = Placed::default();
        let mut submitted = Submitted::default();
        for Admitted { incoming, message: submit, terminal, content_sha256: sha } in admitted {
            let header = header(submit);
            let receipt = match self.submittable(cx, submit, &terminal, &receipts) {
                Err(refused) => {
                    metrics::booking(kinds::RECEIPT_SUBMIT, "refused");
                    req.refuse(cx, incoming, &header, Some(&terminal), Some(&sha), refused)?;
                    continue;
                }
                Ok(receipt) => receipt,
            };
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
                req.refuse(cx, incoming, &header, Some(&terminal), Some(&sha), refused)?;
                continue;
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
            let order_id = placed.push(&self.settlements, order, cx.now, cx.outgoing);
            submitted.push(&header, sha, receipt, order_id);
        }
        placed.write(cx.conn, cx.now)?;
        submitted.write(cx.conn, cx.now)?;
        Ok(())
    }

    /// submittable checks a presented receipt certificate (among `receipts`, as read and locked)
    /// as an exchange certificate is checked, and its condition; it returns the certificate.
    fn submittable<'r>(
        &self,
        cx: &Cx<'_>,
        submit: &SubmitRequest,
        terminal: &Terminal,
        receipts: &'r HashMap<Uuid, Receipt>,
    ) -> Result<&'r Receipt, Refused> {
        macro_rules! refuse {
            ($reason:expr, $($detail:tt)*) => { return Err(Refused::new($reason, format!($($detail)*))) };
        }
        if let Err(e) = self.keys.verify_provider(&submit.certificate) {
            metrics::signature_failure("certificate");
            refuse!(RefusalReason::CertificateForged, "the certificate's signature does not verify: {e}")
        }
        let Some(id) = certificate_id(submit) else {
            refuse!(RefusalReason::CertificateForged, "the certificate has no valid receipt_certificate_id")
        };
        let Some(receipt) = receipts.get(&id) else {
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
        Ok(receipt)
    }
}

/// Submitted is submissions to record together, for [`Submitted::write`].
#[derive(Default)]
struct Submitted {
    receipts: Vec<Uuid>,
    orders: Vec<Uuid>,
    request_ids: Vec<String>,
    terminals: Vec<String>,
    content_sha256s: Vec<String>,
    sent_at: Vec<DateTime<Utc>>,
}

impl Submitted {
    fn push(&mut self, header: &Header<'_>, content_sha256: String, receipt: &Receipt, order_id: Uuid) {
        metrics::booking(receipt.condition.as_str(), "submitted");
        tracing::info!(receipt_certificate_id = %receipt.id, %order_id, "receipt certificate submitted");
        self.receipts.push(receipt.id);
        self.orders.push(order_id);
        self.request_ids.push(header.request_id.to_string());
        self.terminals.push(header.terminal_id.to_string());
        self.content_sha256s.push(content_sha256);
        self.sent_at.push(header.sent_at);
    }

    /// Submitted::write records the submissions as accepted, each naming its order, and their
    /// certificates as submitted, in one round trip whatever their number.
    fn write(&self, conn: &mut PgConnection, now: DateTime<Utc>) -> QueryResult<()> {
        use diesel::sql_types::{Array, Text, Timestamptz, Uuid as SqlUuid};
        if self.receipts.is_empty() {
            return Ok(());
        }
        crate::runtime::db::prepared(
            "WITH recorded AS (
               INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at,
                                              received_at, outcome, subject_id)
               SELECT request_id, terminal_id, $message_type, sha, sent_at, $now, 'accepted', order_id
               FROM unnest($orders::uuid[], $request_ids::text[], $terminals::text[], $content_sha256s::text[], $sent_at::timestamptz[])
                    AS r(order_id, request_id, terminal_id, sha, sent_at)
             )
             UPDATE receipt_certificates c SET status = 'submitted', order_id = t.order_id, submit_request_id = t.request_id,
                                               reminder_due_at = NULL, updated_at = $now
             FROM unnest($receipts::uuid[], $orders::uuid[], $request_ids::text[]) AS t(id, order_id, request_id)
             WHERE c.id = t.id",
        )
        .bind::<Timestamptz, _>("now", now)
        .bind::<Text, _>("message_type", kinds::RECEIPT_SUBMIT)
        .bind::<Array<SqlUuid>, _>("receipts", &self.receipts)
        .bind::<Array<SqlUuid>, _>("orders", &self.orders)
        .bind::<Array<Text>, _>("request_ids", &self.request_ids)
        .bind::<Array<Text>, _>("terminals", &self.terminals)
        .bind::<Array<Text>, _>("content_sha256s", &self.content_sha256s)
        .bind::<Array<Timestamptz>, _>("sent_at", &self.sent_at)
        .execute(conn)?;
        Ok(())
    }
}
