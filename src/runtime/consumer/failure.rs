//! Failure: how a handler says it did not complete, classified at the boundary as transient,
//! permanent, deferred or an unavailable database. Database errors are classified here, once.

use chrono::{DateTime, Utc};

use crate::contracts::dead_letter::DeadLetterReason;
use crate::runtime::db::DbError;

/// Failure is how a handler says it did not complete, classified at the boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    /// Trying again later can succeed (a dropped connection, a serialization failure).
    #[error("transient: {0}")]
    Transient(String),
    /// It will never succeed: dead-letter it with the reason.
    #[error("permanent ({}): {detail}", reason.as_str())]
    Permanent { reason: DeadLetterReason, detail: String },
    /// Not yet: publish it again at `until`, without spending an attempt.
    #[error("deferred until {until}: {why}")]
    Defer { until: DateTime<Utc>, why: String },
    /// The database cannot be reached (refused, closed, restarting): the pool holds the message
    /// and waits for the database instead of spending a delivery attempt.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl Failure {
    pub fn permanent(reason: DeadLetterReason, detail: impl Into<String>) -> Failure {
        Failure::Permanent { reason, detail: detail.into() }
    }
}

impl From<diesel::result::Error> for Failure {
    fn from(e: diesel::result::Error) -> Failure {
        // A unique violation means a concurrent copy of this work committed first: trying again
        // re-reads the state and finds it done. One that never heals ends at the delivery limit.
        let unique =
            matches!(e, diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _));
        if crate::runtime::db::is_connection_lost(&e) {
            Failure::Unavailable(e.to_string())
        } else if unique || crate::runtime::db::is_transient(&e) {
            Failure::Transient(e.to_string())
        } else {
            Failure::permanent(DeadLetterReason::Unprocessable, format!("database: {e}"))
        }
    }
}

impl From<DbError> for Failure {
    fn from(e: DbError) -> Failure {
        match e {
            DbError::Unavailable(m) => Failure::Unavailable(m),
            DbError::Query(e) => e.into(),
        }
    }
}
