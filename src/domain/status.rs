//! The status machine: the only code that changes an asset's status
//! (`docs/product.md#only-the-status-machine-changes-a-status`, `#the-transition-table`).
//!
//! Every change is checked against [`allowed`] and appended to `asset_status_history` with its
//! cause; the database makes the move from the history entry, as a compare-and-set on the current
//! status, and checks it against its own copy of the table (`status_transitions`). It refuses any
//! other change of `assets.status`, and any update or delete of the history, so the record of what
//! happened cannot be rewritten and nothing but this module moves an asset.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::schema::assets;

/// Status is an asset's status (`docs/product.md#statuses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    AwaitingExchange,
    AwaitingDesignatedDelivery,
    Delivered,
    ExpiredCertificateProcessing,
    Retransmitting,
    ForcedRetransmitting,
    ForceDelivered,
    Expired,
    Refunded,
    /// Replaced by a new asset: its holder accepted an issuer's change.
    Replaced,
}

impl Status {
    pub const ALL: [Status; 10] = [
        Status::AwaitingExchange,
        Status::AwaitingDesignatedDelivery,
        Status::Delivered,
        Status::ExpiredCertificateProcessing,
        Status::Retransmitting,
        Status::ForcedRetransmitting,
        Status::ForceDelivered,
        Status::Expired,
        Status::Refunded,
        Status::Replaced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::AwaitingExchange => "awaiting_exchange",
            Status::AwaitingDesignatedDelivery => "awaiting_designated_delivery",
            Status::Delivered => "delivered",
            Status::ExpiredCertificateProcessing => "expired_certificate_processing",
            Status::Retransmitting => "retransmitting",
            Status::ForcedRetransmitting => "forced_retransmitting",
            Status::ForceDelivered => "force_delivered",
            Status::Expired => "expired",
            Status::Refunded => "refunded",
            Status::Replaced => "replaced",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Status::is_final says whether nothing more can happen to the asset.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Delivered | Status::ForceDelivered | Status::Expired | Status::Refunded | Status::Replaced
        )
    }

    /// Status::is_before_delivery: the asset has not reached its holder yet.
    pub fn is_before_delivery(self) -> bool {
        !self.is_final()
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cause is why a status changed, recorded in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Issued with an exchange certificate, or for a designated time.
    Issued,
    /// The gateway acknowledged the delivery with the right hash.
    DeliveryAcknowledged,
    /// A delivery attempt failed or went unacknowledged.
    DeliveryFailed,
    /// The exchange certificate expired unexchanged.
    CertificatePastDue,
    /// The asset's own term ended.
    AssetExpired,
    /// The refund settled.
    RefundSettled,
    /// The holder deferred the download to a designated time.
    Deferred,
    /// The holder accepted an issuer's change: a new asset replaces this one.
    IssuerChangeAccepted,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Issued => "issued",
            Cause::DeliveryAcknowledged => "delivery_acknowledged",
            Cause::DeliveryFailed => "delivery_failed",
            Cause::CertificatePastDue => "certificate_past_due",
            Cause::AssetExpired => "asset_expired",
            Cause::RefundSettled => "refund_settled",
            Cause::Deferred => "deferred",
            Cause::IssuerChangeAccepted => "issuer_change_accepted",
        }
    }
}

/// allowed is the transition table (`docs/product.md#the-transition-table`).
pub fn allowed(from: Status, to: Status) -> bool {
    use Status::*;
    match (from, to) {
        // Exchange or designated time, then delivery.
        (AwaitingExchange | AwaitingDesignatedDelivery, Delivered | Retransmitting | ExpiredCertificateProcessing) => {
            true
        }
        // A stage-2 forced transmission, acknowledged or failed.
        (AwaitingExchange, ForceDelivered | ForcedRetransmitting) => true,
        // The holder deferred the download to a designated time (`asset.defer`).
        (AwaitingExchange, AwaitingDesignatedDelivery) => true,
        // The certificate expired unexchanged (past-due processing).
        (ExpiredCertificateProcessing, Expired | ForceDelivered | ForcedRetransmitting) => true,
        // Retransmission, completed as a forced delivery.
        (Retransmitting | ForcedRetransmitting, Expired | ForceDelivered) => true,
        // Any status before delivery, once a refund settled, or once its holder accepted an
        // issuer's change and a new asset replaced it.
        (from, Refunded | Replaced) => from.is_before_delivery(),
        _ => false,
    }
}

/// TransitionError is a refused status change.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error("asset {asset}: {from} -> {to} is not a legal transition")]
    Illegal { asset: Uuid, from: Status, to: Status },
    #[error("asset {asset} is no longer {expected} (another change won)")]
    Stale { asset: Uuid, expected: Status },
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
}

impl From<TransitionError> for crate::runtime::consumer::Failure {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::Db(e) => e.into(),
            // A lost race is worth another try: the handler re-reads the state.
            TransitionError::Stale { .. } => crate::runtime::consumer::Failure::Transient(e.to_string()),
            TransitionError::Illegal { .. } => crate::runtime::consumer::Failure::permanent(
                crate::contracts::dead_letter::DeadLetterReason::Unprocessable,
                e.to_string(),
            ),
        }
    }
}

/// record_issued writes the first history entry of newly inserted assets, each in its first
/// status, in one statement whatever their number.
pub fn record_issued(
    conn: &mut PgConnection,
    assets: &[Uuid],
    statuses: &[Status],
    at: DateTime<Utc>,
) -> QueryResult<()> {
    use diesel::sql_types::{Array, Text, Timestamptz, Uuid as SqlUuid};
    debug_assert_eq!(assets.len(), statuses.len());
    debug_assert!(statuses.iter().all(|s| matches!(s, Status::AwaitingExchange | Status::AwaitingDesignatedDelivery)));
    crate::runtime::db::prepared(
        "INSERT INTO asset_status_history (asset_id, from_status, to_status, cause, at)
         SELECT id, NULL, status, $cause, $at FROM unnest($assets::uuid[], $statuses::text[]) AS a(id, status)",
    )
    .bind::<Array<SqlUuid>, _>("assets", assets)
    .bind::<Array<Text>, _>("statuses", statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    .bind::<Text, _>("cause", Cause::Issued.as_str())
    .bind::<Timestamptz, _>("at", at)
    .execute(conn)?;
    Ok(())
}

/// transition moves an asset from `from` to `to`, if the table allows it and the asset is still
/// in `from`.
pub fn transition(
    conn: &mut PgConnection,
    asset: Uuid,
    from: Status,
    to: Status,
    cause: Cause,
    detail: Option<&str>,
    at: DateTime<Utc>,
) -> Result<(), TransitionError> {
    if !allowed(from, to) {
        return Err(TransitionError::Illegal { asset, from, to });
    }
    use diesel::sql_types::{Nullable, Text, Timestamptz, Uuid as SqlUuid};
    // One statement: the history entry, whose trigger makes the move as a compare-and-set on the
    // current status (migration 000007); when another change won, no entry is written.
    let changed = crate::runtime::db::prepared(
        "INSERT INTO asset_status_history (asset_id, from_status, to_status, cause, detail, at)
         VALUES ($asset, $from, $to, $cause, $detail, $at)",
    )
    .bind::<SqlUuid, _>("asset", asset)
    .bind::<Text, _>("from", from.as_str())
    .bind::<Text, _>("to", to.as_str())
    .bind::<Text, _>("cause", cause.as_str())
    .bind::<Nullable<Text>, _>("detail", detail)
    .bind::<Timestamptz, _>("at", at)
    .execute(conn)?;
    if changed == 0 {
        return Err(TransitionError::Stale { asset, expected: from });
    }
    Ok(())
}

/// transition_many moves every asset in `assets` that is still in `from` to `to`, in two
/// statements whatever their number: the scans' set-based path through the same table. It returns
/// the assets that moved; one that had already left `from` is left alone.
pub fn transition_many(
    conn: &mut PgConnection,
    assets: &[Uuid],
    from: Status,
    to: Status,
    cause: Cause,
    at: DateTime<Utc>,
) -> Result<Vec<Uuid>, TransitionError> {
    use diesel::sql_types::{Array, Text, Timestamptz, Uuid as SqlUuid};
    if !allowed(from, to) {
        return Err(TransitionError::Illegal { asset: assets.first().copied().unwrap_or_default(), from, to });
    }
    if assets.is_empty() {
        return Ok(Vec::new());
    }
    #[derive(QueryableByName)]
    struct Moved {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
    }
    // One statement: a history entry for each asset, whose trigger moves the asset if it is still
    // in `from` (and writes no entry when it is not). In id order, so that two transactions
    // moving the same assets lock them in the same order.
    let moved: Vec<Uuid> = crate::runtime::db::prepared(
        "INSERT INTO asset_status_history (asset_id, from_status, to_status, cause, at)
         SELECT id, $from, $to, $cause, $at FROM unnest($assets::uuid[]) AS a(id) ORDER BY id
         RETURNING asset_id AS id",
    )
    .bind::<Text, _>("to", to.as_str())
    .bind::<Timestamptz, _>("at", at)
    .bind::<Array<SqlUuid>, _>("assets", assets)
    .bind::<Text, _>("from", from.as_str())
    .bind::<Text, _>("cause", cause.as_str())
    .load::<Moved>(conn)?
    .into_iter()
    .map(|m| m.id)
    .collect();
    Ok(moved)
}

/// current_many_for_update reads assets' statuses, locking their rows, in id order, for the rest
/// of the transaction: one round trip. An asset that does not exist is left out.
pub fn current_many_for_update(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<(Uuid, Status)>> {
    let rows: Vec<(Uuid, String)> = assets::table
        .filter(assets::id.eq_any(ids))
        .order(assets::id)
        .select((assets::id, assets::status))
        .for_update()
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|(id, s)| (id, Status::parse(&s).expect("the CHECK constraint admits only known statuses")))
        .collect())
}

/// current_for_update reads an asset's status, locking the row for the rest of the transaction.
pub fn current_for_update(conn: &mut PgConnection, asset: Uuid) -> QueryResult<Status> {
    let s: String = assets::table.filter(assets::id.eq(asset)).select(assets::status).for_update().first(conn)?;
    Ok(Status::parse(&s).expect("the CHECK constraint admits only known statuses"))
}

/// is_legal_path checks a whole history: it starts with an issue and every step is allowed.
pub fn is_legal_path(path: &[(Option<Status>, Status)]) -> bool {
    let Some(((None, first), rest)) = path.split_first().map(|(f, r)| (*f, r)) else {
        return false;
    };
    if !matches!(first, Status::AwaitingExchange | Status::AwaitingDesignatedDelivery) {
        return false;
    }
    let mut current = first;
    for (from, to) in rest {
        if *from != Some(current) || !allowed(current, *to) {
            return false;
        }
        current = *to;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::Status::*;
    use super::*;

    /// The whole table, as `docs/product.md#the-transition-table` states it: every pair not listed is refused.
    #[test]
    fn the_transition_table_is_exactly_the_specs() {
        let legal: &[(Status, Status)] = &[
            (AwaitingExchange, Delivered),
            (AwaitingExchange, Retransmitting),
            (AwaitingExchange, ExpiredCertificateProcessing),
            (AwaitingExchange, ForceDelivered),
            (AwaitingExchange, ForcedRetransmitting),
            (AwaitingExchange, Refunded),
            (AwaitingExchange, AwaitingDesignatedDelivery),
            (AwaitingDesignatedDelivery, Delivered),
            (AwaitingDesignatedDelivery, Retransmitting),
            (AwaitingDesignatedDelivery, ExpiredCertificateProcessing),
            (AwaitingDesignatedDelivery, Refunded),
            (ExpiredCertificateProcessing, Expired),
            (ExpiredCertificateProcessing, ForceDelivered),
            (ExpiredCertificateProcessing, ForcedRetransmitting),
            (ExpiredCertificateProcessing, Refunded),
            (Retransmitting, Expired),
            (Retransmitting, ForceDelivered),
            (Retransmitting, Refunded),
            (ForcedRetransmitting, Expired),
            (ForcedRetransmitting, ForceDelivered),
            (ForcedRetransmitting, Refunded),
            (AwaitingExchange, Replaced),
            (AwaitingDesignatedDelivery, Replaced),
            (ExpiredCertificateProcessing, Replaced),
            (Retransmitting, Replaced),
            (ForcedRetransmitting, Replaced),
        ];
        for from in Status::ALL {
            for to in Status::ALL {
                assert_eq!(allowed(from, to), legal.contains(&(from, to)), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn final_statuses_go_nowhere() {
        for from in [Delivered, ForceDelivered, Expired, Refunded, Replaced] {
            assert!(Status::ALL.iter().all(|to| !allowed(from, *to)), "{from} has a way out");
        }
    }

    #[test]
    fn paths_are_checked_step_by_step() {
        assert!(is_legal_path(&[(None, AwaitingExchange), (Some(AwaitingExchange), Delivered)]));
        assert!(is_legal_path(&[
            (None, AwaitingDesignatedDelivery),
            (Some(AwaitingDesignatedDelivery), Retransmitting),
            (Some(Retransmitting), ForceDelivered),
        ]));
        assert!(!is_legal_path(&[(None, Delivered)]));
        assert!(!is_legal_path(&[(None, AwaitingExchange), (Some(AwaitingExchange), Expired)]));
        assert!(!is_legal_path(&[(None, AwaitingExchange), (Some(Retransmitting), ForceDelivered)]));
        assert!(!is_legal_path(&[]));
    }

    #[test]
    fn names_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
