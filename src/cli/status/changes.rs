//! The changes `assetflow status` shows with an asset or an order: a holder's change of product
//! (`docs/product.md#changes`), with its step and its new order, and the modification notices of
//! issuers' changes (`docs/product.md#issuer-changes`), with how each was answered.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use crate::domain::schema::{assets, changes, issuer_changes, modification_notices, orders};

/// ChangeView is a change of product as `assetflow status` shows it.
#[derive(Debug, Serialize)]
pub struct ChangeView {
    pub change_id: Uuid,
    /// The `asset.change` request, which also placed the new order.
    pub request_id: String,
    /// The asset given back.
    pub asset_id: Uuid,
    /// `purchasing`, `refunding`, `done`, `failed`, `compensating`, `compensated` or `stuck`.
    pub step: String,
    /// Why it failed, was undone or is stuck.
    pub reason: Option<String>,
    pub new_product_id: String,
    pub new_order_id: Uuid,
    /// The new order's status, and why it ended so (`change_compensated`, `change_stuck`).
    pub new_order_status: String,
    pub new_order_reason: Option<String>,
    /// The refund of the old asset, once the new product was paid.
    pub refund_id: Option<Uuid>,
    /// The refund of the new payment, when the change is undone.
    pub compensation_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

type ChangeRow = (
    Uuid,
    String,
    Uuid,
    String,
    Option<String>,
    String,
    Uuid,
    Option<Uuid>,
    Option<Uuid>,
    DateTime<Utc>,
    DateTime<Utc>,
    String,
    Option<String>,
);

/// Which changes to read: an asset's (the asset given back), or the one whose new order an
/// order is.
pub enum Changes {
    OfAsset(Uuid),
    NewOrder(Uuid),
}

/// changes_of reads changes of product, oldest first.
pub fn changes_of(conn: &mut PgConnection, which: Changes) -> QueryResult<Vec<ChangeView>> {
    let mut query = changes::table.inner_join(orders::table.on(orders::id.eq(changes::new_order_id))).into_boxed();
    query = match which {
        Changes::OfAsset(id) => query.filter(changes::asset_id.eq(id)),
        Changes::NewOrder(id) => query.filter(changes::new_order_id.eq(id)),
    };
    let rows: Vec<ChangeRow> = query
        .order(changes::id)
        .select((
            changes::id,
            changes::request_id,
            changes::asset_id,
            changes::step,
            changes::reason,
            changes::new_product_id,
            changes::new_order_id,
            changes::refund_id,
            changes::compensation_id,
            changes::created_at,
            changes::updated_at,
            orders::status,
            orders::status_reason,
        ))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|r| ChangeView {
            change_id: r.0,
            request_id: r.1,
            asset_id: r.2,
            step: r.3,
            reason: r.4,
            new_product_id: r.5,
            new_order_id: r.6,
            refund_id: r.7,
            compensation_id: r.8,
            created_at: r.9,
            updated_at: r.10,
            new_order_status: r.11,
            new_order_reason: r.12,
        })
        .collect())
}

/// ModificationView is a modification notice of an issuer's change, as `assetflow status` shows
/// it with the asset it is about.
#[derive(Debug, Serialize)]
pub struct ModificationView {
    pub notice_id: Uuid,
    pub issuer_change_id: Uuid,
    /// What changed, as the holder was told.
    pub description: String,
    pub announced_at: DateTime<Utc>,
    /// `an operator`, or the issuer that sent the change itself, with its reference for it.
    pub announced_by: String,
    pub reply_by: DateTime<Utc>,
    /// What the notice gets if unanswered at `reply_by`: `accept` or `refund`.
    pub default_answer: String,
    /// `accept` or `refund`, once answered.
    pub answer: Option<String>,
    /// `holder` (its `modification.answer`) or `default` (at the deadline).
    pub answered_by: Option<String>,
    pub request_id: Option<String>,
    pub answered_at: Option<DateTime<Utc>>,
    /// What the answer did: the replacement issued, the refund asked for, or why neither could be.
    pub outcome: Option<String>,
    /// Given when the asset was issued, after the change, for an order placed before it: the
    /// asset carries the change, and accepting keeps it.
    pub issued_after_change: bool,
}

type NoticeRow = (
    Uuid,
    Uuid,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<String>,
    (Option<String>, Option<String>),
    bool,
);

/// notices_of reads the modification notices sent about an asset, oldest first.
pub fn notices_of(conn: &mut PgConnection, asset: Uuid) -> QueryResult<Vec<ModificationView>> {
    let rows: Vec<NoticeRow> = modification_notices::table
        .inner_join(issuer_changes::table)
        .filter(modification_notices::asset_id.eq(asset))
        .order(modification_notices::id)
        .select((
            modification_notices::id,
            issuer_changes::id,
            issuer_changes::description,
            issuer_changes::created_at,
            modification_notices::reply_by,
            issuer_changes::default_answer,
            modification_notices::answer,
            modification_notices::answered_by,
            modification_notices::request_id,
            modification_notices::answered_at,
            modification_notices::outcome,
            (issuer_changes::issuer_id, issuer_changes::reference),
            modification_notices::issued_after_change,
        ))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|r| ModificationView {
            notice_id: r.0,
            issuer_change_id: r.1,
            description: r.2,
            announced_at: r.3,
            announced_by: match r.11 {
                (Some(issuer), Some(reference)) => format!("issuer {issuer} (its reference {reference})"),
                _ => "an operator".into(),
            },
            reply_by: r.4,
            default_answer: r.5,
            answer: r.6,
            answered_by: r.7,
            request_id: r.8,
            answered_at: r.9,
            outcome: r.10,
            issued_after_change: r.12,
        })
        .collect())
}

/// asset_of_notice is the asset a modification notice is about.
pub fn asset_of_notice(conn: &mut PgConnection, notice: Uuid) -> QueryResult<Option<Uuid>> {
    modification_notices::table.find(notice).select(modification_notices::asset_id).first(conn).optional()
}

/// asset_of_change is the asset a change of product gives back.
pub fn asset_of_change(conn: &mut PgConnection, change: Uuid) -> QueryResult<Option<Uuid>> {
    changes::table.find(change).select(changes::asset_id).first(conn).optional()
}

/// Lineage is where an asset stands among the assets an issuer's change put in each other's
/// place: the one it replaces and the one that replaced it.
#[derive(Debug, Default, Serialize)]
pub struct Lineage {
    /// 0 for the asset first issued, one more for each replacement.
    pub generation: i32,
    pub replaces_asset_id: Option<Uuid>,
    pub replaced_by_asset_id: Option<Uuid>,
}

/// lineage reads an asset's place among its replacements.
pub fn lineage(conn: &mut PgConnection, id: Uuid) -> QueryResult<Lineage> {
    let (generation, replaces_asset_id): (i32, Option<Uuid>) =
        assets::table.find(id).select((assets::generation, assets::replaces_asset_id)).first(conn)?;
    let replaced_by_asset_id =
        assets::table.filter(assets::replaces_asset_id.eq(id)).select(assets::id).first(conn).optional()?;
    Ok(Lineage { generation, replaces_asset_id, replaced_by_asset_id })
}
