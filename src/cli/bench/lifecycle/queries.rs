//! What the lifecycle benchmark reads from its database: progress while it waits, the writing
//! commits, the receipts' times, and where an order's time goes, stage by stage.
//!
//! Each reads only the run's own rows: those whose UUIDv7 id is at or after `since`, the first id
//! of the run's start ([`id_floor`]). A seeded database holds many completed orders from before
//! the run (`seed.rs`), which the progress must not count and the figures must not include; the
//! range on the primary key reads the run's rows alone, however large the tables.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamptz};
use serde::Serialize;
use uuid::Uuid;

/// id_floor is the smallest UUIDv7 of the millisecond `at` falls in: every id `Uuid::now_v7`
/// makes from then on is at least this, in PostgreSQL's order of `uuid` (byte by byte) as in
/// Rust's.
pub(super) fn id_floor(at: DateTime<Utc>) -> Uuid {
    let ms = at.timestamp_millis().max(0) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6] = 0x70; // version 7
    bytes[8] = 0x80; // the RFC 9562 variant
    Uuid::from_bytes(bytes)
}

/// Stage is one step of an order's way to its certificate, in milliseconds.
#[derive(Debug, Clone, Serialize, QueryableByName)]
pub struct Stage {
    #[diesel(sql_type = Text)]
    pub stage: String,
    #[diesel(sql_type = BigInt)]
    pub samples: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub mean_ms: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub p50_ms: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub p99_ms: f64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn query_count(url: &str, sql: &'static str, since: Option<Uuid>) -> anyhow::Result<i64> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(match since {
            Some(since) => {
                diesel::sql_query(sql).bind::<diesel::sql_types::Uuid, _>(since).get_result::<Count>(&mut conn)?.n
            }
            None => diesel::sql_query(sql).get_result::<Count>(&mut conn)?.n,
        })
    })
    .await?
}

/// progress is the orders of the run whose certificate was acknowledged, and the deliveries not
/// yet final (a seeded database has none).
pub(super) async fn progress(url: &str, since: Uuid) -> anyhow::Result<(i64, i64)> {
    let done = query_count(
        url,
        "SELECT count(DISTINCT d.order_id) AS n FROM deliveries d
         WHERE d.id >= $1 AND d.kind = 'certificate' AND d.status = 'delivered'",
        Some(since),
    )
    .await?;
    let pending =
        query_count(url, "SELECT count(*) AS n FROM deliveries WHERE status IN ('pending', 'sent', 'failed')", None)
            .await?;
    Ok((done, pending))
}

/// in_flight is whether anything a mixed run started has not finished: a delivery, settlement,
/// change or receipt certificate under way, or an order not yet issued. Each is looked for as the
/// first row of its partial index: the wait asks twenty times a second, while the run's last
/// refunds and changes are still being carried out, and counting the rows in flight (or a planner
/// without statistics walking a whole table for them) took CPU from what is measured.
pub(super) async fn in_flight(url: &str) -> anyhow::Result<bool> {
    let n = query_count(
        url,
        "SELECT CASE WHEN (SELECT 1 FROM deliveries WHERE status IN ('pending', 'sent', 'failed') ORDER BY due_at LIMIT 1) IS NOT NULL
                      OR (SELECT 1 FROM settlements WHERE status = 'instructed' ORDER BY answer_due_at LIMIT 1) IS NOT NULL
                      OR (SELECT 1 FROM changes WHERE step IN ('purchasing', 'refunding', 'compensating')
                          ORDER BY updated_at LIMIT 1) IS NOT NULL
                      OR (SELECT 1 FROM receipt_certificates WHERE status IN ('applied', 'open', 'submitted')
                            AND status IN ('open', 'submitted') ORDER BY expires_at LIMIT 1) IS NOT NULL
                      OR (SELECT 1 FROM orders WHERE status IN ('settling', 'issuing') ORDER BY status LIMIT 1) IS NOT NULL
                 THEN 1::int8 ELSE 0::int8 END AS n",
        None,
    )
    .await?;
    Ok(n > 0)
}

/// mixed_done is the orders a mixed run placed (purchases and submitted bookings, not the new
/// purchases of changes) whose certificate or asset was delivered.
pub(super) async fn mixed_done(url: &str, since: Uuid) -> anyhow::Result<i64> {
    query_count(
        url,
        "SELECT count(*) AS n FROM orders o
         WHERE o.id >= $1 AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.new_order_id = o.id)
           AND EXISTS (SELECT 1 FROM deliveries d WHERE d.order_id = o.id AND d.kind IN ('certificate', 'asset')
                         AND d.status = 'delivered')",
        Some(since),
    )
    .await
}

/// exchanged_done is the exchanges of the run that assetflow recorded: each made its asset's
/// delivery in the transaction that recorded it.
pub(super) async fn exchanged_done(url: &str, since: Uuid) -> anyhow::Result<i64> {
    query_count(url, "SELECT count(*) AS n FROM deliveries WHERE id >= $1 AND kind = 'asset'", Some(since)).await
}

/// commits counts the transactions that wrote, as the limit's transactions all do: the next
/// transaction id, which only a writing transaction takes. Read-only ones (the health checks, the
/// benchmark's own polling) are left out: counted as commits, they made the bound look lower
/// and the ratio higher than they are. The count is the whole cluster's, so nothing else should
/// write to this PostgreSQL during a run.
pub(super) async fn commits(url: &str) -> anyhow::Result<i64> {
    query_count(url, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS n", None).await
}

/// last_receipt is when assetflow recorded the run's last receipt.
pub(super) async fn last_receipt(url: &str, since: Uuid) -> anyhow::Result<Option<DateTime<Utc>>> {
    #[derive(QueryableByName)]
    struct Last {
        #[diesel(sql_type = diesel::sql_types::Nullable<Timestamptz>)]
        at: Option<DateTime<Utc>>,
    }
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Option<DateTime<Utc>>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query(
            "SELECT max(finished_at) AS at FROM delivery_attempts WHERE delivery_id >= $1 AND outcome = 'acknowledged'",
        )
        .bind::<diesel::sql_types::Uuid, _>(since)
        .get_result::<Last>(&mut conn)?
        .at)
    })
    .await?
}

/// acknowledged lists, per request id, when assetflow recorded the receipt of its certificate
/// (by order request) or of its asset (by exchange request), for the run's deliveries.
pub(super) async fn acknowledged(
    url: &str,
    kind: &'static str,
    since: Uuid,
) -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        request_id: String,
        #[diesel(sql_type = Timestamptz)]
        at: DateTime<Utc>,
    }
    let sql = match kind {
        "certificate" => {
            "SELECT o.request_id, a.finished_at AS at FROM deliveries d
             JOIN orders o ON o.id = d.order_id
             JOIN delivery_attempts a ON a.delivery_id = d.id AND a.outcome = 'acknowledged'
             WHERE d.id >= $1 AND d.kind = 'certificate'"
        }
        _ => {
            "SELECT c.exchange_request_id AS request_id, a.finished_at AS at FROM deliveries d
             JOIN exchange_certificates c ON c.asset_id = d.asset_id
             JOIN delivery_attempts a ON a.delivery_id = d.id AND a.outcome = 'acknowledged'
             WHERE d.id >= $1 AND d.kind = 'asset' AND c.exchange_request_id IS NOT NULL"
        }
    };
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query(sql)
            .bind::<diesel::sql_types::Uuid, _>(since)
            .load::<Row>(&mut conn)?
            .into_iter()
            .map(|r| (r.request_id, r.at))
            .collect())
    })
    .await?
}

/// stages splits the order-to-certificate time at the moments the database recorded: the terminal's
/// `sent_at`, then the start of each transaction that handled the order (`now()` in it): the
/// purchase, the partner's answer, the issuance, the certificate's first transmission and its
/// receipt. Each stage therefore holds the previous transaction, the relay's publish and confirm
/// (none for the first stage and the answer's, which a terminal and a partner publish themselves),
/// the broker, and the wait in the next pool's queue. Only the run's orders are counted.
pub(super) async fn stages(url: &str, since: Uuid) -> anyhow::Result<Vec<Stage>> {
    const SQL: &str = "
        WITH issued AS (
          -- Each order's first asset entry in the history, in one pass over the run's assets.
          SELECT a.order_id, min(h.at) AS at
          FROM asset_status_history h JOIN assets a ON a.id = h.asset_id
          WHERE h.asset_id >= $1 AND a.id >= $1
          GROUP BY a.order_id
        ), o AS (
          SELECT r.sent_at AS t0, r.received_at AS t1, s.answered_at AS t2, i.at AS t3,
                 first.sent_at AS t4, done.finished_at AS t5
          FROM orders o
          JOIN terminal_requests r ON r.request_id = o.request_id
          JOIN settlements s ON s.order_id = o.id AND s.kind = 'purchase'
          JOIN deliveries d ON d.order_id = o.id AND d.kind = 'certificate'
          JOIN delivery_attempts first ON first.delivery_id = d.id AND first.attempt = 1
          JOIN delivery_attempts done ON done.delivery_id = d.id AND done.outcome = 'acknowledged'
          LEFT JOIN issued i ON i.order_id = o.id
          WHERE o.id >= $1
        ), stage AS (
          SELECT n, stage, 1000 * extract(epoch FROM until - since)::float8 AS ms
          FROM o, LATERAL (VALUES
            (1, 'order sent → purchase handled', t0, t1),
            (2, 'purchase → partner''s answer handled', t1, t2),
            (3, 'answer → certificate issued', t2, t3),
            (4, 'issued → certificate sent to the gateway', t3, t4),
            (5, 'sent → gateway''s receipt handled', t4, t5)
          ) AS v(n, stage, since, until)
        )
        SELECT stage, count(*) AS samples, avg(ms) AS mean_ms,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50_ms,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99_ms
        FROM stage GROUP BY n, stage ORDER BY n";
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Stage>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query(SQL).bind::<diesel::sql_types::Uuid, _>(since).load::<Stage>(&mut conn)?)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_made_from_a_moment_on_is_at_least_its_floor_and_earlier_ones_are_below() {
        let at = Utc::now();
        let floor = id_floor(at);
        let ms = at.timestamp_millis() as u64;
        let made = |ms: u64| {
            let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
            Uuid::new_v7(ts)
        };
        for _ in 0..100 {
            assert!(made(ms) >= floor);
            assert!(made(ms + 1) > floor);
            assert!(made(ms - 1) < floor);
        }
        assert_eq!(floor.get_version_num(), 7);
    }
}
