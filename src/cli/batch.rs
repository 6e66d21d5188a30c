//! `assetflow batch`: the scheduled jobs, for the nightly batch operator.

use std::io::IsTerminal;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use diesel::prelude::*;
use serde::Serialize;

use super::time::parse_time;
use crate::config::Config;
use crate::runtime::db::schema::job_runs;
use crate::service::app::App;
use crate::service::scheduler::{JOBS, Job, Run, RunReport, Trigger, run_job, schedule_of};

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Every job: its schedule, its last run and what that run did.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Run a job now. Its effects are computed for --as-of (default: now).
    Run {
        /// A job from `assetflow batch list` (near_expiry, past_due, bookings, issuer_changes, ...).
        job: String,
        /// The run's intended time: RFC 3339, 2026-12-23T10:00 or 2026-12-23 (midnight UTC).
        #[arg(long, value_parser = parse_time)]
        as_of: Option<DateTime<Utc>>,
        /// Do everything in a transaction that is rolled back, and report what would happen.
        #[arg(long)]
        dry_run: bool,
        /// Allow an --as-of in the future (it acts early: reminders sent, assets expired, and
        /// bookkeeping pruned ahead of time). A dry run never needs it.
        #[arg(long)]
        allow_future: bool,
        #[arg(long)]
        json: bool,
    },
    /// Past runs, newest first.
    History {
        #[arg(long)]
        job: Option<String>,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

/// RunRow is one recorded run.
#[derive(Debug, Serialize, Queryable)]
pub struct RunRow {
    pub id: i64,
    pub job: String,
    pub as_of: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub dry_run: bool,
    pub trigger: String,
    pub rows_scanned: i64,
    pub enqueued: i64,
    pub errors: i64,
    pub outcome: String,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
struct JobView {
    job: &'static str,
    about: &'static str,
    schedule: String,
    last_run: Option<RunRow>,
    last_success: Option<DateTime<Utc>>,
}

fn find(job: &str) -> anyhow::Result<&'static Job> {
    Job::find(job).ok_or_else(|| {
        anyhow::anyhow!("no job {job:?}; the jobs are {}", JOBS.iter().map(|j| j.name).collect::<Vec<_>>().join(", "))
    })
}

fn runs(conn: &mut PgConnection, job: Option<&str>, limit: i64, include_dry: bool) -> QueryResult<Vec<RunRow>> {
    let mut query = job_runs::table.into_boxed();
    if !include_dry {
        query = query.filter(job_runs::dry_run.eq(false));
    }
    if let Some(job) = job {
        query = query.filter(job_runs::job.eq(job.to_string()));
    }
    query
        .order(job_runs::id.desc())
        .limit(limit)
        .select((
            job_runs::id,
            job_runs::job,
            job_runs::as_of,
            job_runs::started_at,
            job_runs::finished_at,
            job_runs::dry_run,
            job_runs::trigger,
            job_runs::rows_scanned,
            job_runs::enqueued,
            job_runs::errors,
            job_runs::outcome,
            job_runs::error,
        ))
        .load(conn)
}

fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn duration(run: &RunRow) -> String {
    run.finished_at
        .map(|f| format!("{:.1}s", (f - run.started_at).num_milliseconds() as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

pub async fn execute(config: Config, command: BatchCommand) -> anyhow::Result<()> {
    // Arguments are checked before the database is reached, so that a typo is reported at once
    // even when the database is down.
    match &command {
        BatchCommand::Run { job, .. } | BatchCommand::History { job: Some(job), .. } => {
            find(job)?;
        }
        _ => {}
    }
    let app = std::sync::Arc::new(App::for_operations(config)?);
    crate::service::app::prepare(&app, crate::service::app::Patience::Operator).await?;
    match command {
        BatchCommand::List { json } => {
            let app2 = app.clone();
            let views = app
                .plumbing
                .db
                .run(move |conn| -> anyhow::Result<Vec<JobView>> {
                    JOBS.iter()
                        .map(|job| {
                            let last_run = runs(conn, Some(job.name), 1, false)?.into_iter().next();
                            let last_success: Option<DateTime<Utc>> = job_runs::table
                                .filter(job_runs::job.eq(job.name))
                                .filter(job_runs::outcome.eq("succeeded"))
                                .filter(job_runs::dry_run.eq(false))
                                .select(diesel::dsl::max(job_runs::finished_at))
                                .first(conn)?;
                            Ok(JobView {
                                job: job.name,
                                about: job.about,
                                schedule: schedule_of(&app2.scheduler, job.name)?,
                                last_run,
                                last_success,
                            })
                        })
                        .collect()
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
                return Ok(());
            }
            println!(
                "{:<20} {:<16} {:<20} {:<10} {:>9} {:>9} {:>7}",
                "JOB", "SCHEDULE", "LAST RUN", "OUTCOME", "SCANNED", "ENQUEUED", "TOOK"
            );
            for v in &views {
                match &v.last_run {
                    Some(r) => println!(
                        "{:<20} {:<16} {:<20} {:<10} {:>9} {:>9} {:>7}",
                        v.job,
                        v.schedule,
                        time(&r.started_at),
                        r.outcome,
                        r.rows_scanned,
                        r.enqueued,
                        duration(r)
                    ),
                    None => println!("{:<20} {:<16} {:<20}", v.job, v.schedule, "never"),
                }
            }
            println!();
            for v in &views {
                println!("{:<20} {}", v.job, v.about);
            }
        }
        BatchCommand::Run { job, as_of, dry_run, allow_future, json } => {
            let job = find(&job)?;
            let as_of = as_of.unwrap_or_else(Utc::now);
            anyhow::ensure!(
                dry_run || allow_future || as_of <= Utc::now() + chrono::Duration::minutes(1),
                "--as-of {as_of} is in the future: a run would act ahead of time; use --dry-run to look, or --allow-future"
            );
            let interactive = std::io::stderr().is_terminal() && !json;
            let app2 = app.clone();
            let report = app
                .plumbing
                .db
                .run(move |conn| -> anyhow::Result<RunReport> {
                    let bar = interactive.then(|| {
                        let bar = indicatif::ProgressBar::new_spinner();
                        bar.set_style(
                            indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                                .expect("a valid template"),
                        );
                        bar.enable_steady_tick(std::time::Duration::from_millis(120));
                        bar
                    });
                    let mut progress = |r: &RunReport| {
                        let line = format!("{}: scanned {}, enqueued {}", r.job, r.rows_scanned, r.enqueued);
                        match &bar {
                            Some(bar) => bar.set_message(line),
                            None if !json => eprintln!("{line}"),
                            None => {}
                        }
                    };
                    let report = run_job(
                        conn,
                        &app2.scheduler,
                        Run { job, as_of, trigger: Trigger::Manual, dry_run },
                        &mut progress,
                    )?;
                    if let Some(bar) = bar {
                        bar.finish_and_clear();
                    }
                    Ok(report)
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if !report.ran {
                println!("{} is running in another process right now; nothing was done", report.job);
            } else {
                println!(
                    "{}{} as of {}: scanned {}, enqueued {}{}",
                    report.job,
                    if dry_run { " (dry run, rolled back)" } else { "" },
                    report.as_of.to_rfc3339(),
                    report.rows_scanned,
                    report.enqueued,
                    report.error.as_ref().map(|e| format!(", failed: {e}")).unwrap_or_default()
                );
            }
            anyhow::ensure!(report.error.is_none(), "the run failed");
        }
        BatchCommand::History { job, limit, json } => {
            if let Some(job) = &job {
                find(job)?;
            }
            let rows = app
                .plumbing
                .db
                .run(move |conn| runs(conn, job.as_deref(), limit, true).map_err(anyhow::Error::from))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!(
                "{:>6} {:<20} {:<20} {:<20} {:<9} {:<10} {:>9} {:>9} {:>7}",
                "RUN", "JOB", "AS OF", "STARTED", "TRIGGER", "OUTCOME", "SCANNED", "ENQUEUED", "TOOK"
            );
            for r in rows {
                println!(
                    "{:>6} {:<20} {:<20} {:<20} {:<9} {:<10} {:>9} {:>9} {:>7}{}",
                    r.id,
                    r.job,
                    time(&r.as_of),
                    time(&r.started_at),
                    r.trigger,
                    if r.dry_run { format!("{} dry", r.outcome) } else { r.outcome.clone() },
                    r.rows_scanned,
                    r.enqueued,
                    duration(&r),
                    r.error.map(|e| format!("  {e}")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
