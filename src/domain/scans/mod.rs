//! The scans: the scheduler's work, each a [`Scan`] that claims due rows in batches and acts on
//! them as of the run's intended time.

pub mod bookings;
pub mod certificates;
pub mod confirmations;
pub mod deliveries;
pub mod modifications;
pub mod retention;

use chrono::{DateTime, Utc};
use diesel::{PgConnection, QueryResult};

use crate::runtime::scan::{Scan, Swept, Watermark};

/// SettlementTimeouts sends again the settlement instructions past their answer time, or
/// abandons them once their attempts are spent (`docs/product.md`, "Purchase").
pub struct SettlementTimeouts {
    pub settlements: std::sync::Arc<crate::domain::settlement::Settlements>,
}

impl Scan for SettlementTimeouts {
    fn batch(&self, conn: &mut PgConnection, as_of: DateTime<Utc>, limit: i64, _: &Watermark) -> QueryResult<Swept> {
        crate::domain::settlement::sweep_timeouts(conn, &self.settlements, as_of, limit)
    }
}
