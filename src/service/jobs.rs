//! The scheduled jobs: every job's name, what it does, and the scan it runs. The scans live in
//! `domain::scans`; each claims its due rows in batches with `FOR UPDATE SKIP LOCKED` and acts
//! through the same functions the pools use, so a scan and a message never disagree.

use crate::domain::scans::SettlementTimeouts;
use crate::domain::scans::bookings::Bookings;
use crate::domain::scans::certificates::{AssetExpiry, NearExpiry, PastDue};
use crate::domain::scans::confirmations::ConfirmationTimeouts;
use crate::domain::scans::deliveries::{DesignatedDeliveries, Retransmissions};
use crate::domain::scans::modifications::ModificationDefaults;
use crate::domain::scans::retention::Retention;
use crate::runtime::scan::Scan;

/// Job is a named scan.
#[derive(Debug)]
pub struct Job {
    pub name: &'static str,
    pub about: &'static str,
    /// The job's scan, among those the service built.
    pub scan: fn(&Scans) -> &dyn Scan,
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

/// Scans are the scheduled jobs' scans, each built with what it needs.
pub struct Scans {
    pub settlement_timeout: SettlementTimeouts,
    pub confirmation_timeout: ConfirmationTimeouts,
    pub designated_delivery: DesignatedDeliveries,
    pub near_expiry: NearExpiry,
    pub past_due: PastDue,
    pub asset_expiry: AssetExpiry,
    pub retention: Retention,
    pub retransmission: Retransmissions,
    pub bookings: Bookings,
    pub issuer_changes: ModificationDefaults,
}

/// JOBS is every scheduled job.
pub static JOBS: &[Job] = &[
    Job {
        name: "settlement_timeout",
        about: "settlement instructions past their answer time: sent again, or abandoned and dead-lettered",
        scan: |s| &s.settlement_timeout,
    },
    Job {
        name: "confirmation_timeout",
        about: "orders whose payer did not confirm them within the product's window end unconfirmed; orderer and payer are told",
        scan: |s| &s.confirmation_timeout,
    },
    Job {
        name: "designated_delivery",
        about: "deliveries whose designated time has come",
        scan: |s| &s.designated_delivery,
    },
    Job {
        name: "near_expiry",
        about: "reminders before a certificate expires: stage 1 message, stage 2 download request or forced transmission",
        scan: |s| &s.near_expiry,
    },
    Job {
        name: "past_due",
        about: "certificates that expired unexchanged: past-due message, forced transmission, revocation request; or the asset expires",
        scan: |s| &s.past_due,
    },
    Job {
        name: "asset_expiry",
        about: "retained assets past their own term become expired, and their pending transmissions are cancelled",
        scan: |s| &s.asset_expiry,
    },
    Job {
        name: "retention",
        about: "deletes bookkeeping rows past their retention: processed-message ids, old request ids, old job runs",
        scan: |s| &s.retention,
    },
    Job {
        name: "retransmission",
        about: "unacknowledged transmissions fail; failed ones are sent again on the backoff schedule",
        scan: |s| &s.retransmission,
    },
    Job {
        name: "bookings",
        about: "receipt certificates: stage-1 reminders, lotteries and threshold sales due for their decision, winners who did not submit in time (their place passes on), and certificates that expired unsubmitted (revoked)",
        scan: |s| &s.bookings,
    },
    Job {
        name: "issuer_changes",
        about: "modification notices of issuers' changes unanswered at their deadline get the change's default answer (a replacement or a refund)",
        scan: |s| &s.issuer_changes,
    },
];

/// check_schedules refuses a configuration whose `[schedules]` names a job that does not exist:
/// a misspelt job would otherwise keep its built-in schedule without a word.
pub fn check_schedules(config: &crate::config::Config) -> anyhow::Result<()> {
    for job in config.schedules.keys() {
        anyhow::ensure!(
            Job::find(job).is_some(),
            "configuration: schedules.{job} names no job (see `assetflow batch list`)"
        );
    }
    Ok(())
}
