//! The certificate scans: near-expiry reminders (seed 000 section 3.6), past-due processing
//! (FIG. 7) and the end of retained assets' terms.
//!
//! A batch is a handful of set-based statements whatever its size. One statement claims the due
//! certificates (`FOR UPDATE SKIP LOCKED`, index-backed), decides for each what its holder is
//! owed, and records that decision in the certificate's `reminder_schedule` row (or revokes the
//! certificate), which is what makes each (certificate, stage) happen once however often and on
//! however many processes the scan runs.
//! The decisions go out as `certificate.notices` messages through the outbox, in the same
//! transaction; the delivery pool renders and sends them (`delivery::notices`), so the per-holder
//! work spreads over every delivery consumer instead of being serialised behind the job's lock.
//! Everything is computed from `as_of`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use super::Watermark;
use crate::app::App;
use crate::messages::{CertificateNotice, CertificateNotices, NoticeKind, kinds};
use crate::outbox::{self, Outgoing};
use crate::settlement::Swept;
use crate::status_machine::{self, Cause, Status};

/// Notices carried by one `certificate.notices` message: few outbox rows, and a night's notices
/// still spread over the delivery pool's consumers.
const NOTICES_PER_MESSAGE: usize = 100;

/// publish writes the notices to the outbox and returns how many deliveries they ask for.
fn publish(
    conn: &mut PgConnection,
    app: &App,
    notices: &[CertificateNotice],
    as_of: DateTime<Utc>,
) -> QueryResult<u64> {
    for chunk in notices.chunks(NOTICES_PER_MESSAGE) {
        let message =
            CertificateNotices { message_type: kinds::CERTIFICATE_NOTICES.into(), as_of, notices: chunk.to_vec() };
        let outgoing =
            Outgoing::json(app.names.internal(), kinds::CERTIFICATE_NOTICES, kinds::CERTIFICATE_NOTICES, &message)
                .correlated(chunk[0].certificate_id.to_string());
        outbox::enqueue(conn, &outgoing)?;
    }
    Ok(notices.iter().map(|n| n.notice.deliveries()).sum())
}

/// near_expiry sends each certificate's reminders, once per stage: stage 1 ("close at hand", a
/// message) and stage 2 ("very close at hand", a download request, or a forced transmission
/// where the product says so). A stage-1 reminder whose moment passed while stage 2 came due is
/// recorded as superseded rather than sent late. A certificate that expired, or whose asset left
/// awaiting_exchange another way, leaves the reminder index without a notice.
pub fn near_expiry(
    conn: &mut PgConnection,
    app: &App,
    as_of: DateTime<Utc>,
    batch: i64,
    watermark: &Watermark,
) -> QueryResult<Swept> {
    #[derive(QueryableByName)]
    struct Decided {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = Timestamptz)]
        claimed_due_at: DateTime<Utc>,
        #[diesel(sql_type = Nullable<Text>)]
        action: Option<String>,
    }
    conn.transaction(|conn| {
        // The claim is one range of one partial index, after the run's watermark: its cost is the
        // rows due, not the table. A reminder's next stage is due later than `as_of` when it is
        // scheduled (an overdue stage 2 is sent at once), so nothing behind the watermark falls due
        // during the run.
        let (after_due_at, after_id) = watermark.after();
        let decided: Vec<Decided> = diesel::sql_query(
            "WITH claimed AS (
               SELECT certificate_id, asset_id, expires_at, next_stage, due_at FROM reminder_schedule
               WHERE due_at <= $1 AND (due_at, certificate_id) > ($3, $4)
               ORDER BY due_at, certificate_id
               LIMIT $2
               FOR UPDATE SKIP LOCKED
             ), due AS (
               SELECT r.certificate_id, r.next_stage, r.due_at AS claimed_due_at,
                      r.expires_at - p.reminder_stage2_secs * interval '1 second' AS stage2_at,
                      CASE WHEN r.expires_at <= $1 OR a.status <> 'awaiting_exchange' THEN NULL
                           WHEN $1 >= r.expires_at - p.reminder_stage2_secs * interval '1 second' THEN p.stage2_policy
                           ELSE 'message' END AS action
               FROM claimed r
               JOIN assets a ON a.id = r.asset_id
               JOIN products p ON p.id = a.product_id
             )
             UPDATE reminder_schedule r
             SET next_stage = CASE WHEN due.action = 'message' THEN 2 END,
                 due_at = CASE WHEN due.action = 'message' THEN due.stage2_at END,
                 stage1 = CASE WHEN due.action = 'message' THEN 'message'
                               WHEN due.action IS NOT NULL AND due.next_stage = 1 THEN 'superseded'
                               ELSE r.stage1 END,
                 stage2 = CASE WHEN due.action IN ('download_request', 'forced_transmission') THEN due.action
                               ELSE r.stage2 END
             FROM due
             WHERE r.certificate_id = due.certificate_id
             RETURNING r.certificate_id AS id, due.claimed_due_at, due.action",
        )
        .bind::<Timestamptz, _>(as_of)
        .bind::<BigInt, _>(batch)
        .bind::<Timestamptz, _>(after_due_at)
        .bind::<SqlUuid, _>(after_id)
        .load(conn)?;
        watermark.advance(decided.iter().map(|d| (d.claimed_due_at, d.id)));
        let notices: Vec<CertificateNotice> = decided
            .iter()
            .filter_map(|d| {
                let notice = match d.action.as_deref()? {
                    "message" => NoticeKind::ExpiryMessage,
                    "forced_transmission" => NoticeKind::ForcedTransmission,
                    _ => NoticeKind::DownloadRequest,
                };
                Some(CertificateNotice { certificate_id: d.id, notice })
            })
            .collect();
        let enqueued = publish(conn, app, &notices, as_of)?;
        Ok(Swept { scanned: decided.len() as u64, enqueued })
    })
}

/// past_due handles certificates that expired unexchanged (FIG. 7): each is revoked and its
/// asset goes to past-due processing; if the asset is still valid the holder is owed a past-due
/// message, a forced transmission of the asset and a revocation request; if not, the asset
/// expires. A certificate whose asset already left awaiting_exchange another way (a forced
/// stage-2 transmission, a refund) is void and is closed quietly.
pub fn past_due(
    conn: &mut PgConnection,
    app: &App,
    as_of: DateTime<Utc>,
    batch: i64,
    watermark: &Watermark,
) -> QueryResult<Swept> {
    #[derive(QueryableByName)]
    struct Revoked {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = Timestamptz)]
        expires_at: DateTime<Utc>,
        #[diesel(sql_type = SqlUuid)]
        asset_id: Uuid,
        #[diesel(sql_type = Timestamptz)]
        asset_expires_at: DateTime<Utc>,
    }
    conn.transaction(|conn| {
        let (after_expires_at, after_id) = watermark.after();
        let revoked: Vec<Revoked> = diesel::sql_query(
            "WITH claimed AS (
               SELECT id FROM exchange_certificates
               WHERE exchanged_at IS NULL AND revoked_at IS NULL AND expires_at <= $1
                 AND (expires_at, id) > ($3, $4)
               ORDER BY expires_at, id
               LIMIT $2
               FOR UPDATE SKIP LOCKED
             )
             UPDATE exchange_certificates c
             SET revoked_at = $1
             FROM claimed, assets a
             WHERE c.id = claimed.id AND a.id = c.asset_id
             RETURNING c.id, c.expires_at, c.asset_id, a.expires_at AS asset_expires_at",
        )
        .bind::<Timestamptz, _>(as_of)
        .bind::<BigInt, _>(batch)
        .bind::<Timestamptz, _>(after_expires_at)
        .bind::<SqlUuid, _>(after_id)
        .load(conn)?;
        watermark.advance(revoked.iter().map(|r| (r.expires_at, r.id)));
        let assets: Vec<Uuid> = revoked.iter().map(|r| r.asset_id).collect();
        let moved = status_machine::transition_many(
            conn,
            &assets,
            Status::AwaitingExchange,
            Status::ExpiredCertificateProcessing,
            Cause::CertificatePastDue,
            as_of,
        )
        .map_err(into_query_error)?;
        let moved: std::collections::HashSet<Uuid> = moved.into_iter().collect();
        let (valid, void): (Vec<&Revoked>, Vec<&Revoked>) =
            revoked.iter().filter(|r| moved.contains(&r.asset_id)).partition(|r| r.asset_expires_at > as_of);
        let void: Vec<Uuid> = void.iter().map(|r| r.asset_id).collect();
        status_machine::transition_many(
            conn,
            &void,
            Status::ExpiredCertificateProcessing,
            Status::Expired,
            Cause::AssetExpired,
            as_of,
        )
        .map_err(into_query_error)?;
        let notices: Vec<CertificateNotice> =
            valid.iter().map(|r| CertificateNotice { certificate_id: r.id, notice: NoticeKind::PastDue }).collect();
        let enqueued = publish(conn, app, &notices, as_of)?;
        Ok(Swept { scanned: revoked.len() as u64, enqueued })
    })
}

/// asset_expiry ends the term of retained assets still waiting to reach their holders (FIG. 7
/// S203, FIG. 8 S303): they become `expired`, and what was still being sent to them is cancelled.
pub fn asset_expiry(
    conn: &mut PgConnection,
    _app: &App,
    as_of: DateTime<Utc>,
    batch: i64,
    _: &Watermark,
) -> QueryResult<Swept> {
    conn.transaction(|conn| {
        #[derive(QueryableByName)]
        struct Due {
            #[diesel(sql_type = SqlUuid)]
            id: Uuid,
            #[diesel(sql_type = Text)]
            status: String,
        }
        let due: Vec<Due> = diesel::sql_query(
            "SELECT id, status FROM assets
             WHERE expires_at <= $1 AND status IN ('expired_certificate_processing', 'retransmitting', 'forced_retransmitting')
             ORDER BY expires_at, id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind::<Timestamptz, _>(as_of)
        .bind::<BigInt, _>(batch)
        .load(conn)?;
        let mut expired = Vec::new();
        for from in [Status::ExpiredCertificateProcessing, Status::Retransmitting, Status::ForcedRetransmitting] {
            let ids: Vec<Uuid> = due.iter().filter(|d| d.status == from.as_str()).map(|d| d.id).collect();
            expired.extend(status_machine::transition_many(conn, &ids, from, Status::Expired, Cause::AssetExpired, as_of).map_err(into_query_error)?);
        }
        diesel::sql_query(
            "UPDATE deliveries SET status = 'cancelled', last_error = 'the asset expired'
             WHERE asset_id = ANY($1) AND kind = 'asset' AND status IN ('pending', 'sent', 'failed')",
        )
        .bind::<Array<SqlUuid>, _>(&expired)
        .execute(conn)?;
        Ok(Swept { scanned: due.len() as u64, enqueued: 0 })
    })
}

fn into_query_error(e: status_machine::TransitionError) -> diesel::result::Error {
    match e {
        status_machine::TransitionError::Db(e) => e,
        other => diesel::result::Error::QueryBuilderError(other.to_string().into()),
    }
}
