//! The delivery scans: designated deliveries whose time has come, and retransmissions.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::domain::delivery::{self, Deliveries, Row};
use crate::domain::metrics;
use crate::domain::schema::deliveries;
use crate::runtime::scan::{Scan, Swept, Watermark, into_query_error};

/// DesignatedDeliveries sends the deliveries whose designated time has come
/// (`docs/product.md#designated-delivery`).
pub struct DesignatedDeliveries {
    pub deliveries: Arc<Deliveries>,
}

impl Scan for DesignatedDeliveries {
    fn batch(&self, conn: &mut PgConnection, as_of: DateTime<Utc>, batch: i64, _: &Watermark) -> QueryResult<Swept> {
        send_due(conn, &self.deliveries, "designated_delivery", "pending", as_of, batch)
    }
}

/// Retransmissions fails the transmissions whose receipt is overdue and sends the failed ones
/// again on the backoff schedule (`docs/product.md`, "Retransmission and dead letters").
pub struct Retransmissions {
    pub deliveries: Arc<Deliveries>,
}

impl Scan for Retransmissions {
    fn batch(&self, conn: &mut PgConnection, as_of: DateTime<Utc>, batch: i64, _: &Watermark) -> QueryResult<Swept> {
        retransmission(conn, &self.deliveries, as_of, batch)
    }
}

fn retransmission(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    as_of: DateTime<Utc>,
    batch: i64,
) -> QueryResult<Swept> {
    let timed_out = crate::runtime::metrics::held(|| {
        conn.transaction(|conn| {
            let rows: Vec<Row> = deliveries::table
                .filter(deliveries::status.eq("sent"))
                .filter(deliveries::due_at.le(as_of))
                .order(deliveries::due_at)
                .limit(batch)
                .for_update()
                .skip_locked()
                .select(Row::as_select())
                .load(conn)?;
            for row in &rows {
                delivery::fail_attempt(
                    conn,
                    deliveries,
                    row,
                    row.attempts,
                    "timed_out",
                    "no delivery receipt within the acknowledgement timeout",
                    as_of,
                )
                .map_err(into_query_error)?;
            }
            Ok::<_, diesel::result::Error>(rows.len() as u64)
        })
    })?;
    let mut swept = send_due(conn, deliveries, "retransmission", "failed", as_of, batch)?;
    swept.scanned += timed_out;
    Ok(swept)
}

/// send_due sends the next attempt of every delivery in `status` that is due at `as_of`.
fn send_due(
    conn: &mut PgConnection,
    deliveries: &Deliveries,
    job: &str,
    status: &str,
    as_of: DateTime<Utc>,
    batch: i64,
) -> QueryResult<Swept> {
    crate::runtime::metrics::held(|| {
        conn.transaction(|conn| {
            let due: Vec<(Uuid, DateTime<Utc>)> = deliveries::table
                .filter(deliveries::status.eq(status))
                .filter(deliveries::due_at.le(as_of))
                .order(deliveries::due_at)
                .limit(batch)
                .for_update()
                .skip_locked()
                .select((deliveries::id, deliveries::due_at))
                .load(conn)?;
            let mut swept = Swept { scanned: due.len() as u64, enqueued: 0 };
            let mut sending = Vec::new();
            for (_, due_at) in &due {
                metrics::due_pickup_lag(job, (Utc::now() - *due_at).to_std().unwrap_or_default());
            }
            let ids: Vec<Uuid> = due.iter().map(|(id, _)| *id).collect();
            let sent =
                delivery::send_attempts(conn, deliveries, &ids, as_of, &mut sending).map_err(into_query_error)?;
            swept.enqueued = sent.iter().filter(|(_, sent)| matches!(sent, delivery::Sent::Attempt(_))).count() as u64;
            crate::runtime::outbox::enqueue_all(conn, &sending)?;
            Ok(swept)
        })
    })
}
