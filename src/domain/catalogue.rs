//! The catalogue: products, terminals, and the partners and gateways assetflow is configured
//! with. Handlers only read it (operators change it, through `assetflow admin`), so a transaction
//! reads each row once, whatever the number of messages it handles ([`Catalogue`]).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use std::collections::HashMap;

use crate::domain::schema::{gateways, issuers, partners, products, terminals};
use crate::runtime::consumer::Cx;

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
    /// What completes the delivery of its certificates and assets: "terminal", the terminal's
    /// signed acknowledgement, or "gateway", the gateway's receipt alone (for terminals that
    /// cannot sign).
    pub proof_of_delivery: String,
    /// How long a payer other than the orderer has to confirm an order
    /// (`docs/product.md#payer-confirmation`).
    pub confirmation_window_secs: i64,
    /// Whether its orders need no payer confirmation at all.
    pub confirmation_waived: bool,
}

impl Product {
    /// Product::needs_confirmation says whether an order billed to `payer` by `orderer` waits for
    /// the payer's `order.confirm`: only where they differ and neither the product nor the payer
    /// waives it.
    pub fn needs_confirmation(&self, orderer: &Terminal, payer: &Terminal) -> bool {
        orderer.id != payer.id && !self.confirmation_waived && !payer.waives_confirmation
    }

    /// Product::confirm_by is when a payer asked at `asked_at` must have answered.
    pub fn confirm_by(&self, asked_at: DateTime<Utc>) -> DateTime<Utc> {
        asked_at + chrono::Duration::seconds(self.confirmation_window_secs)
    }

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

/// sync_parties makes the partners, gateways and issuers tables hold at least the configured
/// ones, so that terminals, settlements and issuers' changes can reference them.
pub fn sync_parties(
    conn: &mut PgConnection,
    partner_ids: &[String],
    gateway_ids: &[String],
    issuer_ids: &[String],
) -> QueryResult<()> {
    for id in partner_ids {
        diesel::insert_into(partners::table).values(partners::id.eq(id)).on_conflict_do_nothing().execute(conn)?;
    }
    for id in gateway_ids {
        diesel::insert_into(gateways::table).values(gateways::id.eq(id)).on_conflict_do_nothing().execute(conn)?;
    }
    for id in issuer_ids {
        diesel::insert_into(issuers::table).values(issuers::id.eq(id)).on_conflict_do_nothing().execute(conn)?;
    }
    Ok(())
}

/// register_party_key records the public key (PEM, one or more) a partner, a gateway or an issuer
/// signs with, replacing any earlier one; None removes it. The party must be configured.
pub fn register_party_key(
    conn: &mut PgConnection,
    party: PartyKind,
    id: &str,
    pem: Option<&str>,
) -> QueryResult<usize> {
    match party {
        PartyKind::Partner => {
            diesel::update(partners::table.find(id)).set(partners::public_key_pem.eq(pem)).execute(conn)
        }
        PartyKind::Gateway => {
            diesel::update(gateways::table.find(id)).set(gateways::public_key_pem.eq(pem)).execute(conn)
        }
        PartyKind::Issuer => diesel::update(issuers::table.find(id)).set(issuers::public_key_pem.eq(pem)).execute(conn),
    }
}

/// PartyKind is which kind of party sends assetflow what it must prove it sent: a payment
/// partner (its results), a gateway (its receipts) or an issuer (its changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartyKind {
    Partner,
    Gateway,
    Issuer,
}

impl PartyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PartyKind::Partner => "partner",
            PartyKind::Gateway => "gateway",
            PartyKind::Issuer => "issuer",
        }
    }
}

/// Terminal is a registered terminal.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = terminals)]
pub struct Terminal {
    pub id: String,
    pub kind: String,
    pub gateway_id: String,
    pub partner_id: Option<String>,
    pub public_key_pem: String,
    /// Whether, as a payer, it waives confirmation of the orders other terminals bill to it.
    pub waives_confirmation: bool,
}

/// load_terminal reads a terminal by id.
pub fn load_terminal(conn: &mut PgConnection, id: &str) -> QueryResult<Option<Terminal>> {
    terminals::table.find(id).select(Terminal::as_select()).first(conn).optional()
}

/// load_terminals reads the terminals of these ids that exist, in one statement.
pub fn load_terminals(conn: &mut PgConnection, ids: &[&str]) -> QueryResult<Vec<Terminal>> {
    terminals::table.filter(terminals::id.eq_any(ids)).select(Terminal::as_select()).load(conn)
}

/// Lookups are the products and terminals a transaction has read, shared by the messages it
/// handles together: they see each row as the first of them read it.
#[derive(Debug, Default, Clone)]
struct Lookups {
    products: HashMap<String, Option<Product>>,
    terminals: HashMap<String, Option<Terminal>>,
    /// Registered public keys (PEM) of partners ("partner:<id>"), gateways ("gateway:<id>") and
    /// issuers ("issuer:<id>").
    party_keys: HashMap<String, Option<String>>,
}

/// remembered is what `seen` holds for `id`, or what `load` reads, kept for the next time.
fn remembered<T: Clone>(
    seen: &mut HashMap<String, Option<T>>,
    id: &str,
    load: impl FnOnce() -> QueryResult<Option<T>>,
) -> QueryResult<Option<T>> {
    if let Some(known) = seen.get(id) {
        return Ok(known.clone());
    }
    let loaded = load()?;
    seen.insert(id.to_string(), loaded.clone());
    Ok(loaded)
}

/// Catalogue reads the catalogue inside a handler's transaction, each row once per transaction.
pub trait Catalogue {
    /// Catalogue::product reads a product.
    fn product(&mut self, id: &str) -> QueryResult<Option<Product>>;
    /// Catalogue::terminal reads a terminal.
    fn terminal(&mut self, id: &str) -> QueryResult<Option<Terminal>>;
    /// Catalogue::party_key is the partner's, gateway's or issuer's registered public key (PEM),
    /// if it has one.
    fn party_key(&mut self, kind: PartyKind, id: &str) -> QueryResult<Option<String>>;
    /// Catalogue::read_terminals reads, in one statement, those of `ids` this transaction has not
    /// read yet, so that [`Catalogue::terminal`] finds each of them (or that it does not exist)
    /// without another.
    fn read_terminals<'i>(&mut self, ids: impl IntoIterator<Item = &'i str>) -> QueryResult<()>;
}

impl Catalogue for Cx<'_> {
    fn product(&mut self, id: &str) -> QueryResult<Option<Product>> {
        let lookups = self.extensions.get_or_insert_default::<Lookups>();
        remembered(&mut lookups.products, id, || load_product(self.conn, id))
    }

    fn terminal(&mut self, id: &str) -> QueryResult<Option<Terminal>> {
        let lookups = self.extensions.get_or_insert_default::<Lookups>();
        remembered(&mut lookups.terminals, id, || load_terminal(self.conn, id))
    }

    fn party_key(&mut self, kind: PartyKind, id: &str) -> QueryResult<Option<String>> {
        let lookups = self.extensions.get_or_insert_default::<Lookups>();
        remembered(&mut lookups.party_keys, &format!("{}:{id}", kind.as_str()), || {
            let key = match kind {
                PartyKind::Partner => partners::table.find(id).select(partners::public_key_pem).first(self.conn),
                PartyKind::Gateway => gateways::table.find(id).select(gateways::public_key_pem).first(self.conn),
                PartyKind::Issuer => issuers::table.find(id).select(issuers::public_key_pem).first(self.conn),
            };
            Ok(key.optional()?.flatten())
        })
    }

    fn read_terminals<'i>(&mut self, ids: impl IntoIterator<Item = &'i str>) -> QueryResult<()> {
        let lookups = self.extensions.get_or_insert_default::<Lookups>();
        let mut missing: Vec<&str> = ids.into_iter().filter(|id| !lookups.terminals.contains_key(*id)).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let mut found: HashMap<String, Terminal> =
            load_terminals(self.conn, &missing)?.into_iter().map(|t| (t.id.clone(), t)).collect();
        for id in missing {
            lookups.terminals.insert(id.to_string(), found.remove(id));
        }
        Ok(())
    }
}
