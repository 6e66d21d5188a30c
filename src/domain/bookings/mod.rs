//! Receipt certificates (`docs/product.md#receipt-certificates`): the right to buy, booked before
//! anything is paid.
//!
//! `order.booking` issues a receipt certificate, signed (the issuer over its asset part, the
//! service provider over the whole) and delivered like any certificate; nothing is charged. Its
//! product's condition decides when it may be submitted: at once (`hold`), once drawn in its
//! lottery, or once its threshold sale produced. `receipt.submit` verifies it as an exchange is
//! verified, and places an order for its reserved asset, which is settled through the payer's
//! partner, then issued and delivered as a purchase. The decisions (a draw, a closing) are made by
//! the issuance pool, which holds the keys that sign a draw, when the `bookings` scan finds them
//! due (`bookings.decide`); the scan itself revokes what expired or lapsed and passes a lapsed
//! lottery winner's place on.

mod booking;
mod decide;
mod submit;

pub use booking::BookingHandler;
pub use decide::{DecideHandler, rank};
pub use submit::SubmitHandler;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::contracts::messages::{DeliveryKind, Notice};
use crate::domain::catalogue::{Terminal, load_terminal};
use crate::domain::delivery::{self, Deliveries, NewDelivery};
use crate::domain::schema::{booking_terms, receipt_certificates};
use crate::runtime::outbox::Outgoing;

/// Condition is what a receipt certificate's right to buy depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Held until the certificate expires.
    Hold,
    /// `places` winners are drawn among the applicants at the decision time.
    Lottery,
    /// Produced only if `places` applicants booked by the decision time.
    Threshold,
}

impl Condition {
    pub fn parse(s: &str) -> Option<Condition> {
        match s {
            "hold" => Some(Condition::Hold),
            "lottery" => Some(Condition::Lottery),
            "threshold" => Some(Condition::Threshold),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Hold => "hold",
            Condition::Lottery => "lottery",
            Condition::Threshold => "threshold",
        }
    }
}

/// Terms are how a product is sold by booking.
#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = booking_terms)]
pub struct Terms {
    pub product_id: String,
    pub condition: String,
    pub places: Option<i32>,
    pub decided_at: Option<DateTime<Utc>>,
    pub window_secs: i64,
}

impl Terms {
    pub fn condition(&self) -> Condition {
        Condition::parse(&self.condition).expect("the CHECK constraint admits only known conditions")
    }
}

/// save_terms makes a product sold by booking under `terms`, replacing any earlier terms.
pub fn save_terms(conn: &mut PgConnection, terms: &Terms) -> QueryResult<()> {
    diesel::insert_into(booking_terms::table)
        .values(terms)
        .on_conflict(booking_terms::product_id)
        .do_update()
        .set(terms)
        .execute(conn)?;
    Ok(())
}

/// Receipt is a receipt certificate as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = receipt_certificates)]
pub struct Receipt {
    pub id: Uuid,
    pub product_id: String,
    pub holder_terminal_id: String,
    pub payer_terminal_id: String,
    pub asset_id: Uuid,
    pub condition: String,
    pub status: String,
    pub expires_at: DateTime<Utc>,
    pub submit_by: Option<DateTime<Utc>>,
    pub document: String,
    pub rank: Option<i32>,
    pub order_id: Option<Uuid>,
}

/// tell sends the holder of a receipt certificate a message (or a revocation request), once per
/// `code`.
#[allow(clippy::too_many_arguments)]
pub fn tell(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    receipt: &Receipt,
    kind: DeliveryKind,
    code: &str,
    text: String,
    now: DateTime<Utc>,
    sending: &mut Vec<Outgoing>,
) -> QueryResult<()> {
    let Some(terminal) = load_terminal(conn, &receipt.holder_terminal_id)? else { return Ok(()) };
    let key = match kind {
        // One revocation request per certificate, whatever closed it.
        DeliveryKind::RevocationRequest => format!("revoke:{}", receipt.id),
        _ => format!("receipt:{}:{code}", receipt.id),
    };
    delivery::enqueue_with(conn, deliveries, receipt_notice(receipt, &terminal, kind, key, code, text), now, sending)?;
    Ok(())
}

/// receipt_notice is a delivery to `terminal`, the holder of a receipt certificate, about it: a
/// message of `code` (or a revocation request), keyed by `key`.
pub fn receipt_notice(
    receipt: &Receipt,
    terminal: &Terminal,
    kind: DeliveryKind,
    key: String,
    code: &str,
    text: String,
) -> NewDelivery {
    let notice = Notice {
        code: code.into(),
        text,
        order_id: receipt.order_id,
        asset_id: Some(receipt.asset_id),
        certificate_id: Some(receipt.id),
        request_id: None,
    };
    NewDelivery::now(kind, key, terminal, serde_json::to_value(notice).expect("serializes"))
}
