//! Scans: the shape of a scheduled job's work. A scan claims due rows in batches, each in its own
//! transaction, and the scheduler runs batches until one comes back short. What a scan does is
//! the domain's; how batches of one run share the claim index is here ([`Watermark`]).

use chrono::{DateTime, Utc};
use diesel::{PgConnection, QueryResult};

/// Swept counts what one batch of a scan did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Swept {
    pub scanned: u64,
    pub enqueued: u64,
}

/// A key along a job's claim index: a time (due, expiry) and the row's id.
pub type ClaimKey = (DateTime<Utc>, uuid::Uuid);

/// Watermark is how far a run has got along its job's claim index: the greatest key any of the
/// run's batches has claimed. The batches of a run take their claims one at a time, each after the
/// watermark, and then do their work side by side. So no batch walks over the rows another holds,
/// nor over the index entries earlier batches left dead behind them (the old versions of the rows
/// they changed, which only a vacuum removes), and two batches never share pages: claiming side
/// by side, SKIP LOCKED dealt the rows out alternately and the two fought over every page. A row
/// skipped because someone outside the run held it is left for the next run.
#[derive(Debug, Default)]
pub struct Watermark(std::sync::Mutex<Option<ClaimKey>>);

impl Watermark {
    /// Watermark::claim runs `claim` with the key to claim after (the watermark, or 1970, before
    /// any certificate) while no other batch of the run claims, and moves the watermark to the
    /// greatest key claimed.
    pub fn claim<T>(
        &self,
        claim: impl FnOnce(ClaimKey) -> QueryResult<Vec<T>>,
        key: impl Fn(&T) -> ClaimKey,
    ) -> QueryResult<Vec<T>> {
        let mut current = self.0.lock().expect("not poisoned");
        let rows = claim(current.unwrap_or((DateTime::<Utc>::UNIX_EPOCH, uuid::Uuid::nil())))?;
        if let Some(greatest) = rows.iter().map(key).max() {
            *current = Some(greatest);
        }
        Ok(rows)
    }
}

/// Scan is one scheduled job's work: one batch of at most `limit` due rows at `as_of`, in its own
/// transaction. The scheduler runs batches until one comes back short; the certificate scans claim
/// in turn after the run's [`Watermark`], the others ignore it.
pub trait Scan: Send + Sync {
    fn batch(
        &self,
        conn: &mut PgConnection,
        as_of: DateTime<Utc>,
        limit: i64,
        watermark: &Watermark,
    ) -> QueryResult<Swept>;
}

/// into_query_error ends a scan's batch on a handler-level failure: a scan has no message to
/// dead-letter, so the batch is rolled back, to be retried by the next run.
pub(crate) fn into_query_error(f: impl std::fmt::Display) -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError(f.to_string().into())
}
