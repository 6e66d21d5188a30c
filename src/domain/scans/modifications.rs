//! The `issuer_changes` scan (`docs/product.md#issuer-changes`): modification notices still
//! unanswered at their deadline are handed to the issuance pool (`modifications.due`), which gives
//! each its change's default answer once; a replacement is signed there, where the keys are.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::contracts::messages::{ModificationsDue, kinds};
use crate::contracts::topology::Names;
use crate::domain::schema::modification_notices;
use crate::runtime::outbox::{self, Outgoing};
use crate::runtime::scan::{Scan, Swept, Watermark};

/// ModificationDefaults is the `issuer_changes` job's scan.
pub struct ModificationDefaults {
    pub names: Names,
}

impl Scan for ModificationDefaults {
    fn batch(&self, conn: &mut PgConnection, as_of: DateTime<Utc>, limit: i64, _: &Watermark) -> QueryResult<Swept> {
        crate::runtime::metrics::held(|| {
            conn.transaction(|conn| {
                let due: Vec<Uuid> = modification_notices::table
                    .filter(modification_notices::answer.is_null())
                    .filter(modification_notices::reply_by.le(as_of))
                    .order(modification_notices::reply_by)
                    // Fewer than a batch: the notices stay unanswered until the pool applies their
                    // defaults, so a full batch would be claimed again at once. The rest wait for
                    // the next run.
                    .limit((limit - 1).clamp(1, 999))
                    .select(modification_notices::id)
                    .load(conn)?;
                if due.is_empty() {
                    return Ok(Swept::default());
                }
                let message =
                    ModificationsDue { message_type: kinds::MODIFICATIONS_DUE.into(), as_of, notice_ids: due.clone() };
                let sending = [Outgoing::json(
                    self.names.internal(),
                    kinds::MODIFICATIONS_DUE,
                    kinds::MODIFICATIONS_DUE,
                    &message,
                )];
                outbox::enqueue_all(conn, &sending)?;
                Ok(Swept { scanned: due.len() as u64, enqueued: 1 })
            })
        })
    }
}
