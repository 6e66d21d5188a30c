//! `bookings.decide`: a lottery's draw or a threshold sale's closing, once its decision time has
//! come (`docs/product.md#lotteries`, `#threshold-sales`). Each product is decided once: its
//! `booking_decisions` row is the record, and a message handled twice finds it.
//!
//! The draw is reproducible by anyone: the published draw names the applicants (their receipt
//! certificate ids, in id order), the seed and the number of places, and is signed by the service
//! provider. Each applicant's place is the rank of the lowercase hex SHA-256 of `"<seed>:<id>"`
//! among them, smallest first ([`rank`]); the first `places` win, and the rest are the waiting
//! list, in that order.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::json;
use uuid::Uuid;

use super::{Condition, Receipt, Terms, tell};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{BookingsDecide, DeliveryKind, kinds};
use crate::crypto::{self, KeyRing};
use crate::domain::delivery::Deliveries;
use crate::domain::metrics;
use crate::domain::schema::{booking_decisions, booking_terms, receipt_certificates};
use crate::runtime::consumer::{Cx, Failure, Handler, Received};

/// rank orders a lottery's applicants by the draw's seed: the first drawn first.
pub fn rank(seed: &str, applicants: &[Uuid]) -> Vec<Uuid> {
    let mut ranked: Vec<(String, Uuid)> =
        applicants.iter().map(|id| (crypto::sha256_hex(format!("{seed}:{id}").as_bytes()), *id)).collect();
    ranked.sort();
    ranked.into_iter().map(|(_, id)| id).collect()
}

/// DecideHandler takes `bookings.decide`. It runs in the issuance pool, whose processes hold the
/// key that signs a draw.
pub struct DecideHandler {
    pub deliveries: Arc<Deliveries>,
    pub keys: Arc<KeyRing>,
    pub service_provider_id: String,
}

impl Handler for DecideHandler {
    type Message = BookingsDecide;
    const MESSAGE_TYPE: &'static str = kinds::BOOKINGS_DECIDE;

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, BookingsDecide>]) -> Result<(), Failure> {
        for Received { message, .. } in batch {
            for product in &message.product_ids {
                self.decide(cx, product, message.as_of)?;
            }
        }
        Ok(())
    }
}

impl DecideHandler {
    fn decide(&self, cx: &mut Cx<'_>, product: &str, as_of: DateTime<Utc>) -> Result<(), Failure> {
        let terms: Option<Terms> =
            booking_terms::table.find(product).select(Terms::as_select()).for_update().first(cx.conn).optional()?;
        let Some(terms) = terms else { return Ok(()) };
        let decided: i64 =
            booking_decisions::table.filter(booking_decisions::product_id.eq(product)).count().get_result(cx.conn)?;
        let (Some(places), Some(decided_at)) = (terms.places, terms.decided_at) else { return Ok(()) };
        if decided > 0 || decided_at > as_of || terms.condition() == Condition::Hold {
            return Ok(());
        }
        let applicants: Vec<Receipt> = receipt_certificates::table
            .filter(receipt_certificates::product_id.eq(product))
            .filter(receipt_certificates::status.eq("applied"))
            .order(receipt_certificates::id)
            .select(Receipt::as_select())
            .for_update()
            .load(cx.conn)?;
        let places = places as usize;
        let window = chrono::Duration::seconds(terms.window_secs);
        let mut sending = Vec::new();
        let (outcome, draw) = match terms.condition() {
            Condition::Lottery => {
                let provider = self.keys.provider().ok_or_else(|| {
                    Failure::Transient("this process holds no signing keys: it does not run the issuance pool".into())
                })?;
                let mut bytes = [0u8; 32];
                openssl::rand::rand_bytes(&mut bytes).map_err(|e| Failure::Transient(format!("no randomness: {e}")))?;
                let seed = hex(&bytes);
                let ids: Vec<Uuid> = applicants.iter().map(|r| r.id).collect();
                let ranked = rank(&seed, &ids);
                let mut draw = json!({
                    "product_id": product,
                    "decided_at": decided_at,
                    "drawn_at": as_of,
                    "places": places,
                    "seed": seed,
                    "applicants": ids,
                    "service_provider_id": self.service_provider_id,
                    "key_id": provider.key_id,
                });
                crypto::sign_document(&provider.key, &mut draw)
                    .map_err(|e| Failure::permanent(DeadLetterReason::Unprocessable, format!("signing a draw: {e}")))?;
                for (place, id) in ranked.iter().enumerate() {
                    let receipt = applicants.iter().find(|r| r.id == *id).expect("ranked from the applicants");
                    let won = place < places;
                    let submit_by = won.then(|| (as_of + window).min(receipt.expires_at));
                    diesel::update(receipt_certificates::table.find(id))
                        .set((
                            receipt_certificates::status.eq(if won { "open" } else { "lost" }),
                            receipt_certificates::rank.eq(place as i32 + 1),
                            receipt_certificates::submit_by.eq(submit_by),
                            receipt_certificates::updated_at.eq(cx.now),
                        ))
                        .execute(cx.conn)?;
                    let (code, text) = match submit_by {
                        Some(by) => (
                            "lottery_won",
                            format!("you were drawn for {product}: submit your receipt certificate by {by}"),
                        ),
                        None => (
                            "lottery_lost",
                            format!(
                                "you were not drawn for {product}; you are number {} on the waiting list",
                                place + 1 - places
                            ),
                        ),
                    };
                    tell(cx.conn, &self.deliveries, receipt, DeliveryKind::Message, code, text, cx.now, &mut sending)?;
                }
                metrics::booking("lottery", "drawn");
                ("drawn", Some(crypto::canonical_json(&draw)))
            }
            Condition::Threshold => {
                let produced = applicants.len() >= places;
                for receipt in &applicants {
                    let submit_by = produced.then(|| (as_of + window).min(receipt.expires_at));
                    diesel::update(receipt_certificates::table.find(receipt.id))
                        .set((
                            receipt_certificates::status.eq(if produced { "open" } else { "lost" }),
                            receipt_certificates::submit_by.eq(submit_by),
                            receipt_certificates::status_reason.eq((!produced).then_some("threshold_not_met")),
                            receipt_certificates::updated_at.eq(cx.now),
                        ))
                        .execute(cx.conn)?;
                    let (code, text) = match submit_by {
                        Some(by) => (
                            "threshold_met",
                            format!("{product} will be produced: submit your receipt certificate by {by}"),
                        ),
                        None => (
                            "threshold_not_met",
                            format!(
                                "{product} will not be produced: {} of the {places} applicants needed booked; nothing is charged",
                                applicants.len()
                            ),
                        ),
                    };
                    tell(cx.conn, &self.deliveries, receipt, DeliveryKind::Message, code, text, cx.now, &mut sending)?;
                }
                metrics::booking("threshold", if produced { "produced" } else { "failed" });
                (if produced { "produced" } else { "failed" }, None)
            }
            Condition::Hold => unreachable!("checked above"),
        };
        diesel::insert_into(booking_decisions::table)
            .values((
                booking_decisions::product_id.eq(product),
                booking_decisions::condition.eq(&terms.condition),
                booking_decisions::decided_at.eq(as_of),
                booking_decisions::applicants.eq(applicants.len() as i32),
                booking_decisions::outcome.eq(outcome),
                booking_decisions::draw.eq(draw),
            ))
            .execute(cx.conn)?;
        cx.outgoing.extend(sending);
        tracing::info!(product, outcome, applicants = applicants.len(), places, "booking decided");
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
