//! Retention: bookkeeping rows past their retention are deleted, a batch at a time.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::config::RetentionConfig;
use crate::runtime::db::prepared;
use crate::runtime::scan::{Scan, Swept, Watermark};

/// Retention deletes, a batch at a time, bookkeeping rows older than their retention at `as_of`.
/// Orders, assets, histories, deliveries and dead letters are records, not bookkeeping: kept.
pub struct Retention {
    pub retention: RetentionConfig,
}

impl Scan for Retention {
    fn batch(&self, conn: &mut PgConnection, as_of: DateTime<Utc>, batch: i64, _: &Watermark) -> QueryResult<Swept> {
        retention(conn, &self.retention, as_of, batch)
    }
}

fn retention(conn: &mut PgConnection, r: &RetentionConfig, as_of: DateTime<Utc>, batch: i64) -> QueryResult<Swept> {
    use diesel::sql_types::{BigInt, Timestamptz};
    let horizon = |d: std::time::Duration| as_of - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let mut deleted = 0;
    for (sql, before) in [
        (
            "DELETE FROM inbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM inbox WHERE processed_at < $before LIMIT $batch))",
            horizon(r.inbox),
        ),
        (
            "DELETE FROM terminal_requests t WHERE t.request_id = ANY(ARRAY(
               SELECT request_id FROM terminal_requests r WHERE r.received_at < $before
                 AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.request_id = r.request_id)
                 AND NOT EXISTS (SELECT 1 FROM exchange_certificates c WHERE c.exchange_request_id = r.request_id)
               LIMIT $batch))",
            horizon(r.terminal_requests),
        ),
        (
            "DELETE FROM job_runs WHERE id = ANY(ARRAY(SELECT id FROM job_runs WHERE started_at < $before LIMIT $batch))",
            horizon(r.job_runs),
        ),
    ] {
        deleted +=
            prepared(sql).bind::<Timestamptz, _>("before", before).bind::<BigInt, _>("batch", batch).execute(conn)?
                as u64;
    }
    // A batch is "short" when every table had fewer than `batch` rows left.
    Ok(Swept { scanned: if deleted >= batch as u64 { batch as u64 } else { deleted }, enqueued: 0 })
}
