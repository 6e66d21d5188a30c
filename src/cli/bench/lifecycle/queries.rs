//! What the lifecycle benchmark reads from its database: progress while it waits, the writing
//! commits, the receipts' times, and where an order's time goes, stage by stage.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamptz};
use serde::Serialize;

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

async fn query_count(url: &str, sql: &'static str) -> anyhow::Result<i64> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query(sql).get_result::<Count>(&mut conn)?.n)
    })
    .await?
}

/// progress is the orders whose certificate was acknowledged, and the deliveries not yet final.
pub(super) async fn progress(url: &str) -> anyhow::Result<(i64, i64)> {
    let done = query_count(
        url,
        "SELECT count(DISTINCT d.order_id) AS n FROM deliveries d WHERE d.kind = 'certificate' AND d.status = 'delivered'",
    )
    .await?;
    let pending =
        query_count(url, "SELECT count(*) AS n FROM deliveries WHERE status IN ('pending', 'sent', 'failed')").await?;
    Ok((done, pending))
}

pub(super) async fn exchanged_done(url: &str) -> anyhow::Result<i64> {
    query_count(url, "SELECT count(*) AS n FROM terminal_requests WHERE message_type = 'certificate.exchange'").await
}

/// commits counts the transactions that wrote, as the limit's transactions all do: the next
/// transaction id, which only a writing transaction takes. Read-only ones (the health checks, the
/// benchmark's own polling) are left out: counted as commits, they made the bound look lower
/// and the ratio higher than they are. The count is the whole cluster's, so nothing else should
/// write to this PostgreSQL during a run.
pub(super) async fn commits(url: &str) -> anyhow::Result<i64> {
    query_count(url, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS n").await
}

pub(super) async fn last_receipt(url: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    #[derive(QueryableByName)]
    struct Last {
        #[diesel(sql_type = diesel::sql_types::Nullable<Timestamptz>)]
        at: Option<DateTime<Utc>>,
    }
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Option<DateTime<Utc>>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query("SELECT max(finished_at) AS at FROM delivery_attempts WHERE outcome = 'acknowledged'")
            .get_result::<Last>(&mut conn)?
            .at)
    })
    .await?
}

/// acknowledged lists, per request id, when assetflow recorded the receipt of its certificate
/// (by order request) or of its asset (by exchange request).
pub(super) async fn acknowledged(url: &str, kind: &'static str) -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
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
             WHERE d.kind = 'certificate'"
        }
        _ => {
            "SELECT c.exchange_request_id AS request_id, a.finished_at AS at FROM exchange_certificates c
             JOIN deliveries d ON d.asset_id = c.asset_id AND d.kind = 'asset'
             JOIN delivery_attempts a ON a.delivery_id = d.id AND a.outcome = 'acknowledged'
             WHERE c.exchange_request_id IS NOT NULL"
        }
    };
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        Ok(diesel::sql_query(sql).load::<Row>(&mut conn)?.into_iter().map(|r| (r.request_id, r.at)).collect())
    })
    .await?
}

/// stages splits the order-to-certificate time at the moments the database recorded: the terminal's
/// `sent_at`, then the start of each transaction that handled the order (`now()` in it): the
/// purchase, the partner's answer, the issuance, the certificate's first transmission and its
/// receipt. Each stage therefore holds the previous transaction, the relay's publish and confirm
/// (none for the first stage and the answer's, which a terminal and a partner publish themselves),
/// the broker, and the wait in the next pool's queue.
pub(super) async fn stages(url: &str) -> anyhow::Result<Vec<Stage>> {
    const SQL: &str = "
        WITH o AS (
          SELECT r.sent_at AS t0, r.received_at AS t1, s.answered_at AS t2,
                 (SELECT min(h.at) FROM asset_status_history h JOIN assets a ON a.id = h.asset_id
                  WHERE a.order_id = o.id) AS t3,
                 first.sent_at AS t4, done.finished_at AS t5
          FROM orders o
          JOIN terminal_requests r ON r.request_id = o.request_id
          JOIN settlements s ON s.order_id = o.id AND s.kind = 'purchase'
          JOIN deliveries d ON d.order_id = o.id AND d.kind = 'certificate'
          JOIN delivery_attempts first ON first.delivery_id = d.id AND first.attempt = 1
          JOIN delivery_attempts done ON done.delivery_id = d.id AND done.outcome = 'acknowledged'
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
        Ok(diesel::sql_query(SQL).load::<Stage>(&mut conn)?)
    })
    .await?
}
