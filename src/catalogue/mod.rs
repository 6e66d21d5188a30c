//! The catalogue: products, and the partners and gateways assetflow is configured with.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use crate::db::schema::{gateways, partners, products};

/// Product is a thing for sale.
#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset, Serialize, Deserialize)]
#[diesel(table_name = products, treat_none_as_null = true)]
pub struct Product {
    pub id: String,
    pub kind: String,
    pub title: String,
    pub issuer_id: String,
    pub price_minor: i64,
    pub currency: String,
    pub value_minor: Option<i64>,
    pub uses: Option<i32>,
    pub asset_expires_at: Option<DateTime<Utc>>,
    pub asset_validity_secs: Option<i64>,
    pub certificate_expires_at: Option<DateTime<Utc>>,
    pub certificate_validity_secs: Option<i64>,
    pub reminder_stage1_secs: i64,
    pub reminder_stage2_secs: i64,
    pub stage2_policy: String,
    pub transferable: bool,
    pub on_sale: bool,
    pub tags: serde_json::Value,
}

impl Product {
    /// Product::asset_expiry is when an asset issued at `issued_at` expires.
    pub fn asset_expiry(&self, issued_at: DateTime<Utc>) -> DateTime<Utc> {
        match (self.asset_expires_at, self.asset_validity_secs) {
            (Some(fixed), _) => fixed,
            (None, Some(secs)) => issued_at + chrono::Duration::seconds(secs),
            (None, None) => unreachable!("the products CHECK constraint requires one"),
        }
    }

    /// Product::certificate_expiry is when its exchange certificate expires: never after the asset.
    pub fn certificate_expiry(&self, issued_at: DateTime<Utc>) -> DateTime<Utc> {
        let expiry = match (self.certificate_expires_at, self.certificate_validity_secs) {
            (Some(fixed), _) => fixed,
            (None, Some(secs)) => issued_at + chrono::Duration::seconds(secs),
            (None, None) => unreachable!("the products CHECK constraint requires one"),
        };
        expiry.min(self.asset_expiry(issued_at))
    }
}

/// load_product reads a product by id.
pub fn load_product(conn: &mut PgConnection, id: &str) -> QueryResult<Option<Product>> {
    products::table.find(id).select(Product::as_select()).first(conn).optional()
}

/// upsert_product adds or replaces a product.
pub fn upsert_product(conn: &mut PgConnection, product: &Product) -> QueryResult<()> {
    diesel::insert_into(products::table)
        .values(product)
        .on_conflict(products::id)
        .do_update()
        .set(product)
        .execute(conn)?;
    Ok(())
}

/// sync_parties makes the partners and gateways tables hold at least the configured ones, so that
/// terminals and settlements can reference them.
pub fn sync_parties(conn: &mut PgConnection, partner_ids: &[String], gateway_ids: &[String]) -> QueryResult<()> {
    for id in partner_ids {
        diesel::insert_into(partners::table).values(partners::id.eq(id)).on_conflict_do_nothing().execute(conn)?;
    }
    for id in gateway_ids {
        diesel::insert_into(gateways::table).values(gateways::id.eq(id)).on_conflict_do_nothing().execute(conn)?;
    }
    Ok(())
}
