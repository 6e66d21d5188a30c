//! The `bookings` scan (`docs/product.md#receipt-certificates`): receipt certificates' stage-1
//! reminders, the lotteries and threshold sales whose decision time has come (handed to the
//! issuance pool as `bookings.decide`: it holds the key that signs a draw), lottery winners who did
//! not submit in time (their place passes to the next on the waiting list, without an operator),
//! and certificates that expired unsubmitted (revoked, with a revocation request; no refund is
//! due). Everything is computed from `as_of`.
//!
//! A certificate being submitted and one being revoked lock the same row: whichever comes second
//! sees what the first did, so a certificate ends in exactly one outcome. A certificate submitted
//! but not yet settled at its expiry is revoked too; if its payment settles afterwards, it is
//! refunded, never issued (`settlement::result`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::contracts::messages::{BookingsDecide, DeliveryKind, kinds};
use crate::contracts::topology::Names;
use crate::domain::bookings::{Receipt, tell};
use crate::domain::delivery::Deliveries;
use crate::domain::metrics;
use crate::domain::schema::{booking_decisions, booking_terms, receipt_certificates};
use crate::runtime::outbox::{self, Outgoing};
use crate::runtime::scan::{Scan, Swept, Watermark};

/// Bookings is the `bookings` job's scan.
pub struct Bookings {
    pub names: Names,
    pub deliveries: Arc<Deliveries>,
}

impl Scan for Bookings {
    fn batch(&self, conn: &mut PgConnection, as_of: DateTime<Utc>, limit: i64, _: &Watermark) -> QueryResult<Swept> {
        crate::runtime::metrics::held(|| conn.transaction(|conn| self.sweep(conn, as_of, limit)))
    }
}

impl Bookings {
    fn sweep(&self, conn: &mut PgConnection, as_of: DateTime<Utc>, limit: i64) -> QueryResult<Swept> {
        let mut sending = Vec::new();
        let mut swept = Swept::default();
        self.decisions_due(conn, as_of, &mut sending)?;
        self.closing(conn, as_of, limit, &mut sending, &mut swept)?;
        self.reminders(conn, as_of, limit, &mut sending, &mut swept)?;
        swept.enqueued += sending.len() as u64;
        outbox::enqueue_all(conn, &sending)?;
        Ok(swept)
    }

    /// decisions_due asks the issuance pool to decide the lotteries and threshold sales whose time
    /// has come and that are not decided yet. Asked twice, a product is decided once.
    fn decisions_due(
        &self,
        conn: &mut PgConnection,
        as_of: DateTime<Utc>,
        sending: &mut Vec<Outgoing>,
    ) -> QueryResult<()> {
        let due: Vec<String> = booking_terms::table
            .filter(booking_terms::condition.ne("hold"))
            .filter(booking_terms::decided_at.le(as_of))
            .filter(diesel::dsl::not(diesel::dsl::exists(
                booking_decisions::table.filter(booking_decisions::product_id.eq(booking_terms::product_id)),
            )))
            .order(booking_terms::product_id)
            .select(booking_terms::product_id)
            .load(conn)?;
        if due.is_empty() {
            return Ok(());
        }
        tracing::info!(products = ?due, "bookings to decide");
        let message = BookingsDecide { message_type: kinds::BOOKINGS_DECIDE.into(), as_of, product_ids: due };
        sending.push(Outgoing::json(self.names.internal(), kinds::BOOKINGS_DECIDE, kinds::BOOKINGS_DECIDE, &message));
        Ok(())
    }

    /// closing revokes the certificates that expired unsubmitted, or whose winner's window ended,
    /// and passes a lapsed lottery winner's place to the next on the waiting list.
    fn closing(
        &self,
        conn: &mut PgConnection,
        as_of: DateTime<Utc>,
        limit: i64,
        sending: &mut Vec<Outgoing>,
        swept: &mut Swept,
    ) -> QueryResult<()> {
        let due: Vec<Receipt> = receipt_certificates::table
            .filter(
                receipt_certificates::status
                    .eq_any(["applied", "submitted", "lost", "open"])
                    .and(receipt_certificates::expires_at.le(as_of))
                    .or(receipt_certificates::status.eq("open").and(receipt_certificates::submit_by.le(as_of))),
            )
            .order(receipt_certificates::id)
            .limit(limit)
            .for_update()
            .skip_locked()
            .select(Receipt::as_select())
            .load(conn)?;
        swept.scanned += due.len() as u64;
        for receipt in due {
            let lapsed = receipt.expires_at > as_of;
            let reason = if lapsed { "lapsed" } else { "expired" };
            diesel::update(receipt_certificates::table.find(receipt.id))
                .set((
                    receipt_certificates::status.eq("revoked"),
                    receipt_certificates::status_reason.eq(reason),
                    receipt_certificates::reminder_due_at.eq(None::<DateTime<Utc>>),
                    receipt_certificates::updated_at.eq(as_of),
                ))
                .execute(conn)?;
            let text = if lapsed {
                format!(
                    "Receipt certificate {} was not submitted in time and is revoked: please delete it.",
                    receipt.id
                )
            } else {
                format!("Receipt certificate {} has expired: please delete it. Nothing is charged.", receipt.id)
            };
            tell(
                conn,
                &self.deliveries,
                &receipt,
                DeliveryKind::RevocationRequest,
                "receipt_revoked",
                text,
                as_of,
                sending,
            )?;
            metrics::booking(&receipt.condition, reason);
            tracing::info!(receipt_certificate_id = %receipt.id, reason, "receipt certificate revoked");
            if receipt.condition == "lottery" && receipt.status == "open" {
                self.pass_on(conn, &receipt, as_of, sending)?;
            }
        }
        Ok(())
    }

    /// pass_on gives a lapsed winner's place to the first on the waiting list still valid.
    fn pass_on(
        &self,
        conn: &mut PgConnection,
        lapsed: &Receipt,
        as_of: DateTime<Utc>,
        sending: &mut Vec<Outgoing>,
    ) -> QueryResult<()> {
        let next: Option<Receipt> = receipt_certificates::table
            .filter(receipt_certificates::product_id.eq(&lapsed.product_id))
            .filter(receipt_certificates::status.eq("lost"))
            .filter(receipt_certificates::rank.is_not_null())
            .filter(receipt_certificates::expires_at.gt(as_of))
            .order(receipt_certificates::rank)
            .select(Receipt::as_select())
            .for_update()
            .first(conn)
            .optional()?;
        let Some(next) = next else { return Ok(()) };
        let window: i64 =
            booking_terms::table.find(&lapsed.product_id).select(booking_terms::window_secs).first(conn)?;
        let by = (as_of + chrono::Duration::seconds(window)).min(next.expires_at);
        diesel::update(receipt_certificates::table.find(next.id))
            .set((
                receipt_certificates::status.eq("open"),
                receipt_certificates::submit_by.eq(by),
                receipt_certificates::updated_at.eq(as_of),
            ))
            .execute(conn)?;
        let text = format!("a place for {} came free: submit your receipt certificate by {by}", next.product_id);
        tell(conn, &self.deliveries, &next, DeliveryKind::Message, "lottery_won", text, as_of, sending)?;
        metrics::booking("lottery", "passed_on");
        tracing::info!(from = %lapsed.id, to = %next.id, "a lottery place passed on");
        Ok(())
    }

    /// reminders sends the stage-1 reminder of receipt certificates still open or applied.
    fn reminders(
        &self,
        conn: &mut PgConnection,
        as_of: DateTime<Utc>,
        limit: i64,
        sending: &mut Vec<Outgoing>,
        swept: &mut Swept,
    ) -> QueryResult<()> {
        let due: Vec<Receipt> = receipt_certificates::table
            .filter(receipt_certificates::reminder_due_at.le(as_of))
            .filter(receipt_certificates::status.eq_any(["applied", "open"]))
            .order(receipt_certificates::id)
            .limit(limit)
            .for_update()
            .skip_locked()
            .select(Receipt::as_select())
            .load(conn)?;
        swept.scanned += due.len() as u64;
        let ids: Vec<Uuid> = due.iter().map(|r| r.id).collect();
        diesel::update(receipt_certificates::table.filter(receipt_certificates::id.eq_any(&ids)))
            .set(receipt_certificates::reminder_due_at.eq(None::<DateTime<Utc>>))
            .execute(conn)?;
        for receipt in &due {
            let text = format!("receipt certificate {} will expire soon, at {}", receipt.id, receipt.expires_at);
            tell(
                conn,
                &self.deliveries,
                receipt,
                DeliveryKind::Message,
                "receipt_certificate_expiring",
                text,
                as_of,
                sending,
            )?;
        }
        Ok(())
    }
}
