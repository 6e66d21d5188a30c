//! The scheduled jobs. Each claims its due rows in batches with `FOR UPDATE SKIP LOCKED` and
//! acts through the same functions the pools use, so a scan and a message never disagree.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::Watermark;
use crate::app::App;
use crate::db::schema::deliveries;
use crate::delivery::{self, Row};
use crate::pool::Failure;
use crate::settlement::{self, Swept};
use crate::telemetry;

/// Job is a named scan.
#[derive(Debug)]
pub struct Job {
    pub name: &'static str,
    pub about: &'static str,
    /// Runs one batch of at most `batch` rows at `as_of`, in its own transaction. The certificate
    /// scans claim in turn after the run's [`Watermark`]; the other jobs ignore it.
    pub run: fn(&mut PgConnection, &App, DateTime<Utc>, i64, &Watermark) -> QueryResult<Swept>,
}

impl Job {
    /// Job::lock_key is the advisory lock key: a stable hash of the job's name.
    pub fn lock_key(&self) -> i64 {
        let digest = openssl::sha::sha256(format!("assetflow.job.{}", self.name).as_bytes());
        i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
    }

    /// Job::find looks a job up by name.
    pub fn find(name: &str) -> Option<&'static Job> {
        JOBS.iter().find(|j| j.name == name)
    }
}

/// JOBS is every scheduled job.
pub static JOBS: &[Job] = &[
    Job {
        name: "settlement_timeout",
        about: "settlement instructions past their answer time: sent again, or abandoned and dead-lettered",
        run: settlement::sweep_timeouts,
    },
    Job {
        name: "designated_delivery",
        about: "deliveries whose designated time has come (seed 000 FIG. 6 S107-S115)",
        run: designated_delivery,
    },
    Job {
        name: "near_expiry",
        about: "reminders before a certificate expires: stage 1 message, stage 2 download request or forced transmission (seed 000 3.6)",
        run: super::certificates::near_expiry,
    },
    Job {
        name: "past_due",
        about: "certificates that expired unexchanged: past-due message, forced transmission, revocation request; or the asset expires (FIG. 7)",
        run: super::certificates::past_due,
    },
    Job {
        name: "asset_expiry",
        about: "retained assets past their own term become expired, and their pending transmissions are cancelled",
        run: super::certificates::asset_expiry,
    },
    Job {
        name: "retention",
        about: "deletes bookkeeping rows past their retention: processed-message ids, old request ids, old job runs",
        run: retention,
    },
    Job {
        name: "retransmission",
        about: "unacknowledged transmissions fail; failed ones are sent again on the backoff schedule (FIG. 8)",
        run: retransmission,
    },
];

fn designated_delivery(
    conn: &mut PgConnection,
    app: &App,
    as_of: DateTime<Utc>,
    batch: i64,
    _: &Watermark,
) -> QueryResult<Swept> {
    send_due(conn, app, "designated_delivery", "pending", as_of, batch)
}

fn retransmission(
    conn: &mut PgConnection,
    app: &App,
    as_of: DateTime<Utc>,
    batch: i64,
    _: &Watermark,
) -> QueryResult<Swept> {
    let timed_out = crate::telemetry::held(|| {
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
                    app,
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
    let mut swept = send_due(conn, app, "retransmission", "failed", as_of, batch)?;
    swept.scanned += timed_out;
    Ok(swept)
}

/// send_due sends the next attempt of every delivery in `status` that is due at `as_of`.
fn send_due(
    conn: &mut PgConnection,
    app: &App,
    job: &str,
    status: &str,
    as_of: DateTime<Utc>,
    batch: i64,
) -> QueryResult<Swept> {
    crate::telemetry::held(|| {
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
                telemetry::due_pickup_lag(job, (Utc::now() - *due_at).to_std().unwrap_or_default());
            }
            let ids: Vec<Uuid> = due.iter().map(|(id, _)| *id).collect();
            let sent = delivery::send_attempts(conn, app, &ids, as_of, &mut sending).map_err(into_query_error)?;
            swept.enqueued = sent.iter().filter(|(_, sent)| matches!(sent, delivery::Sent::Attempt(_))).count() as u64;
            crate::outbox::enqueue_all(conn, &sending)?;
            Ok(swept)
        })
    })
}

/// A scan has no message to dead-letter: a handler-level failure aborts the batch, to be retried
/// by the next run.
fn into_query_error(f: Failure) -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError(f.to_string().into())
}

/// retention deletes, a batch at a time, bookkeeping rows older than their retention at `as_of`.
/// Orders, assets, histories, deliveries and dead letters are records, not bookkeeping: kept.
fn retention(
    conn: &mut PgConnection,
    app: &App,
    as_of: DateTime<Utc>,
    batch: i64,
    _: &Watermark,
) -> QueryResult<Swept> {
    use diesel::sql_types::{BigInt, Timestamptz};
    let r = &app.config.retention;
    let horizon = |d: std::time::Duration| as_of - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let mut deleted = 0;
    for (sql, before) in [
        (
            "DELETE FROM inbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM inbox WHERE processed_at < $1 LIMIT $2))",
            horizon(r.inbox),
        ),
        (
            "DELETE FROM terminal_requests t WHERE t.request_id = ANY(ARRAY(
               SELECT request_id FROM terminal_requests r WHERE r.received_at < $1
                 AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.request_id = r.request_id)
                 AND NOT EXISTS (SELECT 1 FROM exchange_certificates c WHERE c.exchange_request_id = r.request_id)
               LIMIT $2))",
            horizon(r.terminal_requests),
        ),
        (
            "DELETE FROM job_runs WHERE id = ANY(ARRAY(SELECT id FROM job_runs WHERE started_at < $1 LIMIT $2))",
            horizon(r.job_runs),
        ),
    ] {
        deleted += diesel::sql_query(sql).bind::<Timestamptz, _>(before).bind::<BigInt, _>(batch).execute(conn)? as u64;
    }
    // A batch is "short" when every table had fewer than `batch` rows left.
    Ok(Swept { scanned: if deleted >= batch as u64 { batch as u64 } else { deleted }, enqueued: 0 })
}
