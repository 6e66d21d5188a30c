//! The scheduler: scans that find due work in PostgreSQL and act on it.
//!
//! Future work (a partner's answer due, a designated delivery, a retransmission) lives in rows
//! with a due time; the broker is not a scheduler. Each job takes a PostgreSQL advisory lock for
//! the length of its run, so that any number of assetflow processes can run the scheduler and a
//! job still runs once at a time. Each run computes its effects from its intended time (`as_of`)
//! and is recorded in `job_runs`. At start-up every job runs once, which catches up whatever
//! came due while nothing was running.

pub use super::jobs::{JOBS, Job, Scans};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::runtime::db::schema::job_runs;
use crate::runtime::db::{Db, DbError, prepared};
use crate::runtime::scan::{Swept, Watermark};
use crate::service::metrics;

/// Scheduler runs the scheduled jobs: their scans, their schedules, and how wide a run goes.
pub struct Scheduler {
    pub scans: Scans,
    pub db: Db,
    /// Wakes the outbox relay after a run: scans write their messages for it.
    pub outbox_wake: Arc<Notify>,
    /// Each job's effective schedule: the configuration's `[schedules]` entry, or the one in
    /// workers/scheduler.toml.
    pub schedules: BTreeMap<String, String>,
    /// Rows per scan transaction.
    pub batch: i64,
    /// Connections a run works on at once.
    pub workers: usize,
}

/// Trigger is why a job ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Schedule,
    CatchUp,
    Manual,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::CatchUp => "catch_up",
            Trigger::Manual => "manual",
        }
    }
}

/// RunReport is what one run of a job did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub job: String,
    pub as_of: DateTime<Utc>,
    pub dry_run: bool,
    /// False when another process held the job's lock, and this run did nothing.
    pub ran: bool,
    pub rows_scanned: u64,
    pub enqueued: u64,
    pub error: Option<String>,
}

/// Run is one run of a job to make.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub job: &'a Job,
    pub as_of: DateTime<Utc>,
    pub trigger: Trigger,
    pub dry_run: bool,
}

/// run_job runs one job now, for `as_of`, under its advisory lock. A dry run does the work in a
/// transaction that is rolled back, and reports what it would have done. `progress` sees the
/// report after every batch.
pub fn run_job(
    conn: &mut PgConnection,
    scheduler: &Scheduler,
    run: Run<'_>,
    progress: &mut (dyn FnMut(&RunReport) + Send),
) -> Result<RunReport, DbError> {
    let Run { job, as_of, dry_run, .. } = run;
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = Bool)]
        locked: bool,
    }
    let key = job.lock_key();
    let locked: Locked =
        prepared("SELECT pg_try_advisory_lock($key) AS locked").bind::<BigInt, _>("key", key).get_result(conn)?;
    let mut report =
        RunReport { job: job.name.to_string(), as_of, dry_run, ran: false, rows_scanned: 0, enqueued: 0, error: None };
    if !locked.locked {
        tracing::debug!(job = job.name, "another process is running this job");
        return Ok(report);
    }
    let result = run_locked(conn, scheduler, run, &mut report, progress);
    let unlocked = prepared("SELECT pg_advisory_unlock($key)").bind::<BigInt, _>("key", key).execute(conn);
    result?;
    unlocked?;
    Ok(report)
}

fn run_locked(
    conn: &mut PgConnection,
    scheduler: &Scheduler,
    run: Run<'_>,
    report: &mut RunReport,
    progress: &mut (dyn FnMut(&RunReport) + Send),
) -> Result<(), DbError> {
    let Run { job, as_of, trigger, dry_run } = run;
    let started = Instant::now();
    let run_id: i64 = diesel::insert_into(job_runs::table)
        .values((
            job_runs::job.eq(job.name),
            job_runs::as_of.eq(as_of),
            job_runs::started_at.eq(Utc::now()),
            job_runs::dry_run.eq(dry_run),
            job_runs::trigger.eq(trigger.as_str()),
            job_runs::outcome.eq("running"),
        ))
        .returning(job_runs::id)
        .get_result(conn)?;
    report.ran = true;
    let outcome = if dry_run {
        // Everything in one transaction that is rolled back: the counts say what would happen.
        let mut swept = Swept::default();
        // Its metrics are dropped with it (`metrics::held`).
        match crate::runtime::metrics::held(|| {
            conn.transaction::<(), diesel::result::Error, _>(|conn| {
                swept = (job.scan)(&scheduler.scans).batch(conn, as_of, i64::from(i32::MAX), &Watermark::default())?;
                Err(diesel::result::Error::RollbackTransaction)
            })
        }) {
            Err(diesel::result::Error::RollbackTransaction) | Ok(()) => {
                report.rows_scanned = swept.scanned;
                report.enqueued = swept.enqueued;
                Ok(())
            }
            Err(e) => Err(e),
        }
    } else {
        // Batches of their own transactions, until a batch comes back short, on several
        // connections at once: each claims its rows with SKIP LOCKED, so none waits on another.
        let shared = std::sync::Mutex::new((report.clone(), progress));
        let first_error: std::sync::Mutex<Option<diesel::result::Error>> = std::sync::Mutex::new(None);
        let watermark = Watermark::default();
        let work = |conn: &mut PgConnection| loop {
            if first_error.lock().expect("not poisoned").is_some() {
                return;
            }
            match (job.scan)(&scheduler.scans).batch(conn, as_of, scheduler.batch, &watermark) {
                Ok(swept) => {
                    let mut guard = shared.lock().expect("not poisoned");
                    let (report, progress) = &mut *guard;
                    report.rows_scanned += swept.scanned;
                    report.enqueued += swept.enqueued;
                    progress(report);
                    if (swept.scanned as i64) < scheduler.batch {
                        return;
                    }
                }
                Err(e) => {
                    first_error.lock().expect("not poisoned").get_or_insert(e);
                    return;
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..scheduler.workers.max(1) {
                // Only a connection idle now: a run that waited for one while holding its own
                // could, with the other jobs due at the same second doing the same, hold the
                // whole pool for the checkout timeout, and the handlers (a gateway's receipt
                // among them) would wait that long. Fewer helpers, not a failed run: the first
                // connection does the work.
                let Some(mut extra) = scheduler.db.try_get() else {
                    tracing::debug!("no idle connection for a scan worker");
                    break;
                };
                scope.spawn(move || work(&mut extra));
            }
            work(conn);
        });
        *report = shared.into_inner().expect("not poisoned").0;
        match first_error.into_inner().expect("not poisoned") {
            Some(e) => Err(e),
            None => Ok(()),
        }
    };
    if let Err(e) = &outcome {
        report.error = Some(e.to_string());
    }
    let outcome_label = if outcome.is_ok() { "succeeded" } else { "failed" };
    diesel::update(job_runs::table.find(run_id))
        .set((
            job_runs::finished_at.eq(Utc::now()),
            job_runs::rows_scanned.eq(report.rows_scanned as i64),
            job_runs::enqueued.eq(report.enqueued as i64),
            job_runs::errors.eq(i64::from(outcome.is_err())),
            job_runs::outcome.eq(outcome_label),
            job_runs::error.eq(&report.error),
        ))
        .execute(conn)?;
    metrics::job_finished(job.name, outcome_label, started.elapsed(), report.rows_scanned, report.enqueued);
    if report.enqueued > 0 {
        tracing::info!(job = job.name, %as_of, scanned = report.rows_scanned, enqueued = report.enqueued, dry_run, "job ran");
    }
    Ok(())
}

/// run_now runs a job on the blocking pool and wakes the outbox relay.
pub async fn run_now(
    scheduler: Arc<Scheduler>,
    job: &'static Job,
    as_of: DateTime<Utc>,
    trigger: Trigger,
    dry_run: bool,
) -> Result<RunReport, DbError> {
    let db: Db = scheduler.db.clone();
    let wake = scheduler.outbox_wake.clone();
    let report =
        db.run(move |conn| run_job(conn, &scheduler, Run { job, as_of, trigger, dry_run }, &mut |_| {})).await?;
    wake.notify_one();
    Ok(report)
}

/// schedule_of is a job's effective schedule.
pub fn schedule_of(scheduler: &Scheduler, job: &str) -> anyhow::Result<String> {
    scheduler
        .schedules
        .get(job)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("workers/scheduler.toml has no schedule for job {job}"))
}

/// validate checks every job's effective schedule, so that a bad cron expression stops the
/// start-up instead of silently leaving the jobs unscheduled.
pub fn validate(scheduler: &Scheduler) -> anyhow::Result<()> {
    for job in JOBS {
        let schedule = schedule_of(scheduler, job.name)?;
        tokio_cron_scheduler::Job::new_async(schedule.as_str(), |_, _| Box::pin(async {})).map_err(|e| {
            anyhow::anyhow!("the schedule of job {} ({schedule:?}) is not a cron expression: {e}", job.name)
        })?;
    }
    Ok(())
}

/// start runs every job once (catch-up), then on its schedule until shutdown.
pub async fn start(scheduler: Arc<Scheduler>, shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
    for job in JOBS {
        if let Err(e) = run_now(scheduler.clone(), job, Utc::now(), Trigger::CatchUp, false).await {
            tracing::warn!(job = job.name, error = %e, "catch-up run failed; the schedule will try again");
        }
    }
    let mut cron_jobs = JobScheduler::new().await?;
    for job in JOBS {
        let schedule = schedule_of(&scheduler, job.name)?;
        let app = scheduler.clone();
        let cron = CronJob::new_async(schedule.as_str(), move |_id, _lock| {
            let app = app.clone();
            Box::pin(async move {
                if let Err(e) = run_now(app, job, Utc::now(), Trigger::Schedule, false).await {
                    tracing::warn!(job = job.name, error = %e, "job run failed");
                }
            })
        })
        .map_err(|e| anyhow::anyhow!("job {}: bad schedule {schedule:?}: {e}", job.name))?;
        cron_jobs.add(cron).await?;
    }
    cron_jobs.start().await?;
    shutdown.cancelled().await;
    cron_jobs.shutdown().await?;
    Ok(())
}
