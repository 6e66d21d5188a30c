//! The service's metrics: the scheduled jobs' runs; and the catalogue of every metric assetflow
//! emits, which the dashboard, the alert rules and the docs are checked against.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::runtime::metrics::{Metric, m};

/// job_finished records a scheduled job's run.
pub fn job_finished(job: &str, outcome: &'static str, elapsed: Duration, scanned: u64, enqueued: u64) {
    let job = job.to_string();
    counter!("assetflow_job_runs_total", "job" => job.clone(), "outcome" => outcome).increment(1);
    histogram!("assetflow_job_duration_seconds", "job" => job.clone()).record(elapsed.as_secs_f64());
    counter!("assetflow_job_rows_scanned_total", "job" => job.clone()).increment(scanned);
    counter!("assetflow_job_enqueued_total", "job" => job.clone()).increment(enqueued);
    if outcome == "succeeded" {
        gauge!("assetflow_job_last_success_timestamp_seconds", "job" => job).set(chrono::Utc::now().timestamp() as f64);
    }
}

/// register_jobs creates each job's run counters at zero, as [`register`] does for the rest.
fn register_jobs<'j>(jobs: impl IntoIterator<Item = &'j str>) {
    for job in jobs {
        for outcome in ["succeeded", "failed"] {
            counter!("assetflow_job_runs_total", "job" => job.to_string(), "outcome" => outcome).absolute(0);
        }
    }
}

/// register describes every metric assetflow emits and creates the counters whose label sets are
/// known in advance at zero: a counter that first appears at its first increment hides that
/// increment from rate() and increase().
pub fn register() {
    let pools: Vec<&'static str> = crate::contracts::topology::Pool::ALL.iter().map(|p| p.as_str()).collect();
    crate::runtime::metrics::register(&pools);
    crate::domain::metrics::register();
    crate::runtime::metrics::describe(CATALOGUE);
    register_jobs(super::jobs::JOBS.iter().map(|job| job.name));
}

/// catalogue is every metric assetflow emits, floor by floor.
pub fn catalogue() -> Vec<Metric> {
    [crate::runtime::metrics::CATALOGUE, crate::domain::metrics::CATALOGUE, CATALOGUE].concat()
}

/// CATALOGUE is every metric the service emits.
pub const CATALOGUE: &[Metric] = &[
    m("assetflow_job_runs_total", "counter", &["job", "outcome"], "Scheduled job runs: succeeded or failed."),
    m("assetflow_job_duration_seconds", "histogram", &["job"], "Duration of a job run."),
    m("assetflow_job_rows_scanned_total", "counter", &["job"], "Due rows a job found."),
    m("assetflow_job_enqueued_total", "counter", &["job"], "Messages and transmissions a job enqueued."),
    m("assetflow_job_last_success_timestamp_seconds", "gauge", &["job"], "Unix time of the job's last successful run."),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric this file emits is in its catalogue, and every catalogued one is emitted.
    #[test]
    fn the_catalogue_lists_exactly_the_emitted_metrics() {
        crate::runtime::metrics::check_catalogue(include_str!("metrics.rs"), CATALOGUE);
    }
}
