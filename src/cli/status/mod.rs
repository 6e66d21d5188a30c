//! `assetflow status`: an asset, an order, a receipt certificate or a request, with its whole
//! history.
//!
//! This file finds what an id names and reads its views; `refunds.rs`, `receipts.rs` and
//! `changes.rs` read the refunds, receipt certificates, changes of product and modification
//! notices shown with them; `render.rs` turns a view into text.

mod changes;
mod receipts;
mod refunds;
mod render;

pub use changes::{ChangeView, Lineage, ModificationView};
pub use receipts::ReceiptView;
pub use refunds::RefundView;
pub use render::render;

use changes::{Changes, asset_of_change, asset_of_notice, changes_of, lineage, notices_of};
use receipts::{By, receipt_view};
use refunds::{Of, refund_settlement, refunds_of};

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use crate::config::Config;
use crate::domain::schema::{
    asset_status_history, assets, deliveries, exchange_certificates, orders, refusals, settlements, terminal_requests,
};

#[derive(Debug, Serialize, Queryable)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub from: Option<String>,
    pub to: String,
    pub cause: String,
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, Queryable)]
pub struct DeliveryView {
    pub id: Uuid,
    pub kind: String,
    pub terminal_id: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// What proves a delivered delivery: "terminal" (its signed acknowledgement, kept in
    /// `deliveries.acknowledgement`) or "gateway" (the gateway's receipt alone).
    pub proof: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AssetView {
    pub asset_id: Uuid,
    pub order_id: Uuid,
    pub kind: String,
    pub product_id: String,
    pub holder_terminal_id: String,
    pub status: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub has_exchange_certificate: bool,
    pub certificate_expires_at: Option<DateTime<Utc>>,
    pub certificate_exchanged_at: Option<DateTime<Utc>>,
    pub history: Vec<HistoryEntry>,
    pub deliveries: Vec<DeliveryView>,
    /// The refunds asked for the asset, oldest first.
    pub refunds: Vec<RefundView>,
    /// The receipt certificate it was bought through, if it was.
    pub receipt_certificate: Option<ReceiptView>,
    /// Its generation, the asset it replaces and the one that replaced it, after issuers' changes.
    pub lineage: Lineage,
    /// The changes of product its holder asked for, oldest first.
    pub changes: Vec<ChangeView>,
    /// The modification notices of issuers' changes sent about it, oldest first.
    pub modification_notices: Vec<ModificationView>,
}

#[derive(Debug, Serialize)]
pub struct OrderView {
    pub order_id: Uuid,
    pub request_id: String,
    pub orderer_terminal_id: String,
    pub payer_terminal_id: String,
    pub recipient_terminal_ids: Vec<String>,
    pub product_id: String,
    pub quantity: i32,
    pub amount_minor: i64,
    pub currency: String,
    pub delivery_mode: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub settlement: Option<SettlementView>,
    /// The refunds of the order's payment, oldest first: its assets' and, for a payment that
    /// settled after its receipt certificate was revoked, the whole payment's.
    pub refunds: Vec<RefundView>,
    /// The receipt certificate whose submission placed the order, if one did.
    pub receipt_certificate: Option<ReceiptView>,
    /// The change of product that placed the order, if one did: its new purchase.
    pub change: Option<Box<ChangeView>>,
    pub assets: Vec<AssetView>,
    pub notices: Vec<DeliveryView>,
}

#[derive(Debug, Serialize, Queryable)]
pub struct SettlementView {
    pub partner_id: String,
    pub status: String,
    pub attempts: i32,
    pub partner_reference: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "subject", rename_all = "snake_case")]
pub enum View {
    Asset(AssetView),
    Order(OrderView),
    ReceiptCertificate(ReceiptView),
    Request {
        request_id: String,
        terminal_id: String,
        message_type: String,
        outcome: String,
        reason: Option<String>,
        received_at: DateTime<Utc>,
    },
    /// A request refused before it was recorded (an unknown terminal, a bad signature, a stale
    /// request): only its refusals are known, each with its reason.
    Refused {
        request_id: String,
        refusals: Vec<RefusalView>,
    },
}

#[derive(Debug, Serialize, Queryable)]
pub struct RefusalView {
    pub terminal_id: Option<String>,
    pub message_type: String,
    pub reason: String,
    pub detail: String,
    pub refused_at: DateTime<Utc>,
}

/// lookup finds what `id` names: an asset, an order, a receipt certificate, a refund's settlement
/// (shown as its asset, or its order when it refunds a whole payment), a change of product or a
/// modification notice (shown as its asset), or a request id.
pub fn lookup(conn: &mut PgConnection, id: &str) -> QueryResult<Option<View>> {
    if let Ok(uuid) = Uuid::parse_str(id) {
        if let Some(asset) = asset_view(conn, uuid)? {
            return Ok(Some(View::Asset(asset)));
        }
        if let Some(order) = order_view(conn, uuid)? {
            return Ok(Some(View::Order(order)));
        }
        if let Some(receipt) = receipt_view(conn, By::Id(uuid))? {
            return Ok(Some(View::ReceiptCertificate(receipt)));
        }
        match refund_settlement(conn, uuid)? {
            Some((Some(asset), _)) => return Ok(asset_view(conn, asset)?.map(View::Asset)),
            Some((None, order)) => return Ok(order_view(conn, order)?.map(View::Order)),
            None => {}
        }
        if let Some(asset) = asset_of_change(conn, uuid)? {
            return Ok(asset_view(conn, asset)?.map(View::Asset));
        }
        if let Some(asset) = asset_of_notice(conn, uuid)? {
            return Ok(asset_view(conn, asset)?.map(View::Asset));
        }
    }
    if let Some(order_id) =
        orders::table.filter(orders::request_id.eq(id)).select(orders::id).first::<Uuid>(conn).optional()?
    {
        return Ok(order_view(conn, order_id)?.map(View::Order));
    }
    let request = terminal_requests::table
        .find(id)
        .select((
            terminal_requests::terminal_id,
            terminal_requests::message_type,
            terminal_requests::outcome,
            terminal_requests::reason,
            terminal_requests::received_at,
            terminal_requests::subject_id,
        ))
        .first::<(String, String, String, Option<String>, DateTime<Utc>, Option<Uuid>)>(conn)
        .optional()?;
    Ok(match request {
        Some((_, _, _, _, _, Some(subject))) if asset_view(conn, subject)?.is_some() => {
            asset_view(conn, subject)?.map(View::Asset)
        }
        // An answer to a modification notice names the notice.
        Some((_, _, _, _, _, Some(subject))) if asset_of_notice(conn, subject)?.is_some() => {
            let asset = asset_of_notice(conn, subject)?.expect("just found");
            asset_view(conn, asset)?.map(View::Asset)
        }
        // A booking names the receipt certificate it issued.
        Some((_, _, _, _, _, Some(subject))) if receipt_view(conn, By::Id(subject))?.is_some() => {
            receipt_view(conn, By::Id(subject))?.map(View::ReceiptCertificate)
        }
        Some((terminal_id, message_type, outcome, reason, received_at, _)) => {
            Some(View::Request { request_id: id.to_string(), terminal_id, message_type, outcome, reason, received_at })
        }
        None => {
            let refusals: Vec<RefusalView> = refusals::table
                .filter(refusals::request_id.eq(id))
                .order(refusals::created_at)
                .select((
                    refusals::terminal_id,
                    refusals::message_type,
                    refusals::reason,
                    refusals::detail,
                    refusals::created_at,
                ))
                .load(conn)?;
            (!refusals.is_empty()).then(|| View::Refused { request_id: id.to_string(), refusals })
        }
    })
}

fn deliveries_where(
    conn: &mut PgConnection,
    asset: Option<Uuid>,
    order: Option<Uuid>,
) -> QueryResult<Vec<DeliveryView>> {
    let mut query = deliveries::table.into_boxed();
    if let Some(a) = asset {
        query = query.filter(deliveries::asset_id.eq(a));
    }
    if let Some(o) = order {
        query = query.filter(deliveries::order_id.eq(o)).filter(deliveries::asset_id.is_null());
    }
    query
        .order(deliveries::created_at)
        .select((
            deliveries::id,
            deliveries::kind,
            deliveries::terminal_id,
            deliveries::status,
            deliveries::attempts,
            deliveries::last_error,
            deliveries::delivered_at,
            deliveries::proof,
        ))
        .load(conn)
}

fn asset_view(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<AssetView>> {
    type Row = (Uuid, Uuid, String, String, String, String, DateTime<Utc>, DateTime<Utc>, bool, Option<DateTime<Utc>>);
    let Some(row) = assets::table
        .find(id)
        .select((
            assets::id,
            assets::order_id,
            assets::kind,
            assets::product_id,
            assets::holder_terminal_id,
            assets::status,
            assets::issued_at,
            assets::expires_at,
            assets::has_exchange_certificate,
            assets::certificate_expires_at,
        ))
        .first::<Row>(conn)
        .optional()?
    else {
        return Ok(None);
    };
    let history = asset_status_history::table
        .filter(asset_status_history::asset_id.eq(id))
        .order(asset_status_history::id)
        .select((
            asset_status_history::at,
            asset_status_history::from_status,
            asset_status_history::to_status,
            asset_status_history::cause,
            asset_status_history::detail,
        ))
        .load(conn)?;
    let exchanged = exchange_certificates::table
        .filter(exchange_certificates::asset_id.eq(id))
        .select(exchange_certificates::exchanged_at)
        .first::<Option<DateTime<Utc>>>(conn)
        .optional()?
        .flatten();
    Ok(Some(AssetView {
        asset_id: row.0,
        order_id: row.1,
        kind: row.2,
        product_id: row.3,
        holder_terminal_id: row.4,
        status: row.5,
        issued_at: row.6,
        expires_at: row.7,
        has_exchange_certificate: row.8,
        certificate_expires_at: row.9,
        certificate_exchanged_at: exchanged,
        history,
        deliveries: deliveries_where(conn, Some(id), None)?,
        refunds: refunds_of(conn, Of::Asset(id))?,
        receipt_certificate: receipt_view(conn, By::Asset(id))?,
        lineage: lineage(conn, id)?,
        changes: changes_of(conn, Changes::OfAsset(id))?,
        modification_notices: notices_of(conn, id)?,
    }))
}

fn order_view(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<OrderView>> {
    type Row = (
        Uuid,
        String,
        String,
        String,
        Vec<String>,
        String,
        i32,
        i64,
        String,
        String,
        String,
        Option<String>,
        DateTime<Utc>,
    );
    let Some(o) = orders::table
        .find(id)
        .select((
            orders::id,
            orders::request_id,
            orders::orderer_terminal_id,
            orders::payer_terminal_id,
            orders::recipient_terminal_ids,
            orders::product_id,
            orders::quantity,
            orders::amount_minor,
            orders::currency,
            orders::delivery_mode,
            orders::status,
            orders::status_reason,
            orders::created_at,
        ))
        .first::<Row>(conn)
        .optional()?
    else {
        return Ok(None);
    };
    let settlement = settlements::table
        .filter(settlements::order_id.eq(id))
        .filter(settlements::kind.eq("purchase"))
        .select((
            settlements::partner_id,
            settlements::status,
            settlements::attempts,
            settlements::partner_reference,
            settlements::reason,
        ))
        .first::<SettlementView>(conn)
        .optional()?;
    let asset_ids: Vec<Uuid> =
        assets::table.filter(assets::order_id.eq(id)).order(assets::id).select(assets::id).load(conn)?;
    let mut assets = Vec::new();
    for asset_id in asset_ids {
        assets.extend(asset_view(conn, asset_id)?);
    }
    Ok(Some(OrderView {
        order_id: o.0,
        request_id: o.1,
        orderer_terminal_id: o.2,
        payer_terminal_id: o.3,
        recipient_terminal_ids: o.4,
        product_id: o.5,
        quantity: o.6,
        amount_minor: o.7,
        currency: o.8,
        delivery_mode: o.9,
        status: o.10,
        status_reason: o.11,
        created_at: o.12,
        settlement,
        refunds: refunds_of(conn, Of::Order(id))?,
        receipt_certificate: receipt_view(conn, By::Order(id))?,
        change: changes_of(conn, Changes::NewOrder(id))?.pop().map(Box::new),
        assets,
        notices: deliveries_where(conn, None, Some(id))?,
    }))
}

pub async fn run(config: &Config, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (url, id2) = (config.database.url.clone(), id.to_string());
    let view = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<View>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(lookup(&mut conn, &id2)?)
    })
    .await??;
    let Some(view) = view else {
        eprintln!("nothing is known by the id {id:?}");
        return Ok(ExitCode::from(2));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", render(&view));
    }
    Ok(ExitCode::SUCCESS)
}
