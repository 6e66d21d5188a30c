//! The refunds `assetflow status` shows with an asset or an order
//! (`docs/product.md#refunds`): each with its amount, cause, status and what its partner said.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use crate::domain::schema::{refunds, settlements};

/// RefundView is a refund as `assetflow status` shows it, with its settlement's partner and
/// reference.
#[derive(Debug, Serialize)]
pub struct RefundView {
    pub refund_id: Uuid,
    pub asset_id: Option<Uuid>,
    pub amount_minor: i64,
    pub currency: String,
    /// `holder`, `change`, `issuer_change` or `late_settlement`.
    pub cause: String,
    /// `requested`, `refunded` or `failed`.
    pub status: String,
    /// Why the partner refused it.
    pub reason: Option<String>,
    pub requested_at: DateTime<Utc>,
    pub answered_at: Option<DateTime<Utc>>,
    pub settlement_id: Uuid,
    pub partner_id: String,
    /// The settlement's own status: `instructed`, `settled`, `declined` or `abandoned` (the partner
    /// never answered; the refund stays requested).
    pub settlement_status: String,
    pub instructions: i32,
    pub partner_reference: Option<String>,
}

type Row =
    (Uuid, Option<Uuid>, i64, String, String, String, Option<String>, DateTime<Utc>, Option<DateTime<Utc>>, Uuid);

/// Which refunds to read: an asset's, or all of an order's.
pub enum Of {
    Asset(Uuid),
    Order(Uuid),
}

/// refunds_of reads the refunds of an asset or an order, oldest first.
pub fn refunds_of(conn: &mut PgConnection, of: Of) -> QueryResult<Vec<RefundView>> {
    let mut query = refunds::table.into_boxed();
    query = match of {
        Of::Asset(id) => query.filter(refunds::asset_id.eq(id)),
        Of::Order(id) => query.filter(refunds::order_id.eq(id)),
    };
    let rows: Vec<Row> = query
        .order((refunds::requested_at, refunds::id))
        .select((
            refunds::id,
            refunds::asset_id,
            refunds::amount_minor,
            refunds::currency,
            refunds::cause,
            refunds::status,
            refunds::reason,
            refunds::requested_at,
            refunds::answered_at,
            refunds::settlement_id,
        ))
        .load(conn)?;
    let mut views = Vec::with_capacity(rows.len());
    for (refund_id, asset_id, amount_minor, currency, cause, status, reason, requested_at, answered_at, settlement) in
        rows
    {
        let (partner_id, settlement_status, instructions, partner_reference) = settlements::table
            .find(settlement)
            .select((
                settlements::partner_id,
                settlements::status,
                settlements::attempts,
                settlements::partner_reference,
            ))
            .first::<(String, String, i32, Option<String>)>(conn)?;
        views.push(RefundView {
            refund_id,
            asset_id,
            amount_minor,
            currency,
            cause,
            status,
            reason,
            requested_at,
            answered_at,
            settlement_id: settlement,
            partner_id,
            settlement_status,
            instructions,
            partner_reference,
        });
    }
    Ok(views)
}

/// refund_settlement finds the refund whose settlement is `id` (a refund's dead letter names its
/// settlement), as its asset and its order.
pub fn refund_settlement(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<(Option<Uuid>, Uuid)>> {
    refunds::table
        .filter(refunds::settlement_id.eq(id))
        .select((refunds::asset_id, refunds::order_id))
        .first(conn)
        .optional()
}
