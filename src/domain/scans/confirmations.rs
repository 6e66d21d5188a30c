//! Confirmations nobody gave: orders whose payer did not answer by the end of the product's
//! confirmation window end `unconfirmed`, with nothing charged, and the orderer and the payer are
//! told (`docs/product.md#payer-confirmation`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::domain::catalogue::load_terminals;
use crate::domain::delivery::{self, NewDelivery};
use crate::domain::metrics;
use crate::domain::settlement::{Settlements, order_notice};
use crate::runtime::scan::{Scan, Swept, Watermark};

/// ConfirmationTimeouts ends the orders whose payer did not confirm them in time.
pub struct ConfirmationTimeouts {
    pub settlements: Arc<Settlements>,
}

impl Scan for ConfirmationTimeouts {
    fn batch(&self, conn: &mut PgConnection, as_of: DateTime<Utc>, batch: i64, _: &Watermark) -> QueryResult<Swept> {
        crate::runtime::metrics::held(|| conn.transaction(|conn| unconfirmed(conn, &self.settlements, as_of, batch)))
    }
}

/// Unconfirmed is an order that has just ended `unconfirmed`.
#[derive(Debug, QueryableByName)]
struct Unconfirmed {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Text)]
    request_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    orderer_terminal_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    payer_terminal_id: String,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    confirm_due_at: DateTime<Utc>,
}

/// unconfirmed is one batch: it claims up to `batch` orders still `confirming` past their window at
/// `as_of` and ends them in one statement, reads their parties' terminals in a second, and writes
/// the notices in a third.
fn unconfirmed(
    conn: &mut PgConnection,
    settlements: &Settlements,
    as_of: DateTime<Utc>,
    batch: i64,
) -> QueryResult<Swept> {
    use diesel::sql_types::{Int8, Timestamptz};
    let ended: Vec<Unconfirmed> = crate::runtime::db::prepared(
        "WITH due AS (
           SELECT id FROM orders
           WHERE status = 'confirming' AND confirm_due_at <= $as_of
           ORDER BY confirm_due_at, id
           LIMIT $batch
           FOR UPDATE SKIP LOCKED
         )
         UPDATE orders o SET status = 'unconfirmed', status_reason = 'payer_did_not_confirm', updated_at = $as_of
         FROM due WHERE o.id = due.id
         RETURNING o.id, o.request_id, o.orderer_terminal_id, o.payer_terminal_id, o.confirm_due_at",
    )
    .bind::<Timestamptz, _>("as_of", as_of)
    .bind::<Int8, _>("batch", batch)
    .load(conn)?;
    let mut swept = Swept { scanned: ended.len() as u64, enqueued: 0 };
    if ended.is_empty() {
        return Ok(swept);
    }
    let mut ids: Vec<&str> =
        ended.iter().flat_map(|o| [o.orderer_terminal_id.as_str(), o.payer_terminal_id.as_str()]).collect();
    ids.sort_unstable();
    ids.dedup();
    let terminals = load_terminals(conn, &ids)?;
    let terminal = |id: &str| terminals.iter().find(|t| t.id == id);
    let mut notices: Vec<NewDelivery> = Vec::with_capacity(ended.len() * 2);
    for order in &ended {
        metrics::confirmation("unconfirmed");
        tracing::info!(order_id = %order.id, payer = %order.payer_terminal_id, "order unconfirmed: its payer did not answer in time");
        let id = order.id;
        if let Some(orderer) = terminal(&order.orderer_terminal_id) {
            let text = format!(
                "{} did not confirm your order by {}: it has ended, and nothing was charged",
                order.payer_terminal_id, order.confirm_due_at
            );
            let key = format!("order:{id}:order_unconfirmed");
            notices.push(order_notice(orderer, id, Some(&order.request_id), key, "order_unconfirmed", text));
        }
        if let Some(payer) = terminal(&order.payer_terminal_id) {
            let text = format!(
                "the order {} placed for you to pay was not confirmed by {}: it has ended, and nothing was charged",
                order.orderer_terminal_id, order.confirm_due_at
            );
            let key = format!("order:{id}:order_unconfirmed:payer");
            notices.push(order_notice(payer, id, None, key, "order_unconfirmed", text));
        }
    }
    let due: Vec<Uuid> = delivery::insert_many(conn, &notices, as_of)?.into_iter().map(|d| d.id).collect();
    swept.enqueued = due.len() as u64;
    let sending: Vec<_> = delivery::request_sends(&settlements.deliveries, &due).collect();
    crate::runtime::outbox::enqueue_all(conn, &sending)?;
    Ok(swept)
}
