//! The certificate scans: near-expiry reminders, past-due processing and the end
//! of retained assets' terms (`docs/product.md#near-expiry-reminders`, `#past-due-processing`,
//! `#asset-expiry`).
//!
//! A batch is a handful of set-based statements whatever its size. The first claims the due
//! certificates (`FOR UPDATE SKIP LOCKED`, one index range after the run's watermark, taken in turn
//! with the run's other batches); the next decides for each what its holder is owed and records
//! that decision in the certificate's `reminder_schedule` row (or revokes the certificate), which
//! is what makes each (certificate, stage) happen once however often and on however many
//! processes the scan runs.
//! The decisions go out as `certificate.notices` messages through the outbox, in the same
//! transaction; the delivery pool acts on them (`delivery::notices`): it makes and sends the
//! deliveries and changes the past-due assets' status, so the per-holder work spreads over every
//! delivery consumer instead of being serialised behind the job's lock.
//! Everything is computed from `as_of`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use crate::contracts::messages::{CertificateNotice, CertificateNotices, NoticeKind, kinds};
use crate::contracts::topology::Names;
use crate::domain::status::{self, Cause, Status};
use crate::runtime::db::prepared;
use crate::runtime::outbox::{self, Outgoing};
use crate::runtime::scan::{Scan, Swept, Watermark};

/// NearExpiry sends the two reminders before a certificate expires ([`near_expiry`]).
pub struct NearExpiry {
    pub names: Names,
}

impl Scan for NearExpiry {
    fn batch(
        &self,
        conn: &mut PgConnection,
        as_of: DateTime<Utc>,
        limit: i64,
        watermark: &Watermark,
    ) -> QueryResult<Swept> {
        near_expiry(conn, &self.names, as_of, limit, watermark)
    }
}

/// PastDue processes the certificates that expired unexchanged ([`past_due`]).
pub struct PastDue {
    pub names: Names,
}

impl Scan for PastDue {
    fn batch(
        &self,
        conn: &mut PgConnection,
        as_of: DateTime<Utc>,
        limit: i64,
        watermark: &Watermark,
    ) -> QueryResult<Swept> {
        past_due(conn, &self.names, as_of, limit, watermark)
    }
}

/// AssetExpiry ends the term of retained assets ([`asset_expiry`]).
pub struct AssetExpiry;

impl Scan for AssetExpiry {
    fn batch(&self, conn: &mut PgConnection, as_of: DateTime<Utc>, limit: i64, _: &Watermark) -> QueryResult<Swept> {
        asset_expiry(conn, as_of, limit)
    }
}

/// Notices carried by one `certificate.notices` message: few outbox rows, and a night's notices
/// still spread over the delivery pool's consumers.
const NOTICES_PER_MESSAGE: usize = 100;

/// publish writes the notices to the outbox, `NOTICES_PER_MESSAGE` a message.
fn publish(
    conn: &mut PgConnection,
    names: &Names,
    notices: &[CertificateNotice],
    as_of: DateTime<Utc>,
) -> QueryResult<()> {
    for chunk in notices.chunks(NOTICES_PER_MESSAGE) {
        let message =
            CertificateNotices { message_type: kinds::CERTIFICATE_NOTICES.into(), as_of, notices: chunk.to_vec() };
        let outgoing =
            Outgoing::json(names.internal(), kinds::CERTIFICATE_NOTICES, kinds::CERTIFICATE_NOTICES, &message)
                .correlated(chunk[0].certificate_id.to_string());
        outbox::enqueue(conn, &outgoing)?;
    }
    Ok(())
}

/// claim is one batch's claim, taken in turn with the run's other batches: at most `batch` rows
/// of one index range after the watermark, locked with SKIP LOCKED. Its cost is the rows due, not
/// the table. It returns the claimed ids.
///
/// The rest of the transaction then finds the claimed rows one by one by their keys: costing
/// random reads as if from disk, the planner would rather read whole tables and hash them, half a
/// second a batch on a million certificates, where a few thousand index probes take milliseconds.
fn claim(
    conn: &mut PgConnection,
    watermark: &Watermark,
    sql: &'static str,
    as_of: DateTime<Utc>,
    batch: i64,
) -> QueryResult<Vec<Uuid>> {
    use diesel::connection::SimpleConnection;
    let claimed = watermark.claim(
        |(after_at, after_id)| {
            prepared(sql)
                .bind::<Timestamptz, _>("as_of", as_of)
                .bind::<BigInt, _>("batch", batch)
                .bind::<Timestamptz, _>("after_at", after_at)
                .bind::<SqlUuid, _>("after_id", after_id)
                .load(conn)
        },
        |c: &Claimed| (c.at, c.id),
    )?;
    conn.batch_execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")?;
    Ok(claimed.into_iter().map(|c| c.id).collect())
}

#[derive(QueryableByName)]
struct Claimed {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Timestamptz)]
    at: DateTime<Utc>,
}

/// near_expiry sends each certificate's reminders, once per stage: stage 1 ("close at hand", a
/// message) and stage 2 ("very close at hand", a download request, or a forced transmission
/// where the product says so). A stage-1 reminder whose moment passed while stage 2 came due is
/// recorded as superseded rather than sent late. A certificate that expired, or whose asset left
/// awaiting_exchange another way, leaves the reminder index without a notice.
fn near_expiry(
    conn: &mut PgConnection,
    names: &Names,
    as_of: DateTime<Utc>,
    batch: i64,
    watermark: &Watermark,
) -> QueryResult<Swept> {
    #[derive(QueryableByName)]
    struct Decided {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = Nullable<Text>)]
        action: Option<String>,
    }
    conn.transaction(|conn| {
        // A reminder's next stage is due later than `as_of` when it is scheduled (an overdue stage
        // 2 is sent at once), so nothing falls due behind the watermark during the run.
        let ids = claim(
            conn,
            watermark,
            "SELECT certificate_id AS id, due_at AS at FROM reminder_schedule
             WHERE due_at <= $as_of AND (due_at, certificate_id) > ($after_at, $after_id)
             ORDER BY due_at, certificate_id
             LIMIT $batch
             FOR UPDATE SKIP LOCKED",
            as_of,
            batch,
        )?;
        let decided: Vec<Decided> = prepared(
            "WITH due AS (
               SELECT r.certificate_id, r.next_stage,
                      r.expires_at - p.reminder_stage2_secs * interval '1 second' AS stage2_at,
                      CASE WHEN r.expires_at <= $as_of OR a.status <> 'awaiting_exchange' THEN NULL
                           WHEN $as_of >= r.expires_at - p.reminder_stage2_secs * interval '1 second' THEN p.stage2_policy
                           ELSE 'message' END AS action
               FROM unnest($ids::uuid[]) AS claimed (id)
               JOIN reminder_schedule r ON r.certificate_id = claimed.id
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
             RETURNING r.certificate_id AS id, due.action",
        )
        .bind::<Timestamptz, _>("as_of", as_of)
        .bind::<Array<SqlUuid>, _>("ids", &ids)
        .load(conn)?;
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
        publish(conn, names, &notices, as_of)?;
        // One delivery a reminder.
        Ok(Swept { scanned: decided.len() as u64, enqueued: notices.len() as u64 })
    })
}

/// past_due handles certificates that expired unexchanged (`docs/product.md#past-due-processing`):
/// each is revoked and gets a past-due notice. The delivery pool moves an asset that still awaits
/// exchange to past-due processing and, if it is still valid, sends its holder a past-due message
/// and a forced transmission of the asset; if not, the asset expires. Every holder gets a
/// revocation request, whatever happened to the asset (a forced stage-2 transmission, a refund,
/// its expiry). The revocation is what makes each certificate's past-due processing happen once.
fn past_due(
    conn: &mut PgConnection,
    names: &Names,
    as_of: DateTime<Utc>,
    batch: i64,
    watermark: &Watermark,
) -> QueryResult<Swept> {
    #[derive(QueryableByName)]
    struct Revoked {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = Bool)]
        awaiting: bool,
        #[diesel(sql_type = Bool)]
        valid: bool,
    }
    conn.transaction(|conn| {
        let ids = claim(
            conn,
            watermark,
            "SELECT id, expires_at AS at FROM exchange_certificates
             WHERE exchanged_at IS NULL AND revoked_at IS NULL AND expires_at <= $as_of
               AND (expires_at, id) > ($after_at, $after_id)
             ORDER BY expires_at, id
             LIMIT $batch
             FOR UPDATE SKIP LOCKED",
            as_of,
            batch,
        )?;
        let revoked: Vec<Revoked> = prepared(
            "WITH revoked AS (
               UPDATE exchange_certificates SET revoked_at = $as_of WHERE id = ANY($ids) RETURNING id, asset_id
             )
             SELECT r.id, a.status = 'awaiting_exchange' AS awaiting, a.expires_at > $as_of AS valid
             FROM revoked r JOIN assets a ON a.id = r.asset_id",
        )
        .bind::<Timestamptz, _>("as_of", as_of)
        .bind::<Array<SqlUuid>, _>("ids", &ids)
        .load(conn)?;
        // Every revoked certificate is followed by a revocation request to its holder, whatever
        // happened to its asset; one whose asset still awaits exchange, and is valid, is owed the
        // past-due message and the forced transmission too.
        let notices: Vec<CertificateNotice> =
            revoked.iter().map(|r| CertificateNotice { certificate_id: r.id, notice: NoticeKind::PastDue }).collect();
        publish(conn, names, &notices, as_of)?;
        let enqueued =
            revoked.iter().map(|r| if r.awaiting && r.valid { NoticeKind::PastDue.deliveries() } else { 1 }).sum();
        Ok(Swept { scanned: revoked.len() as u64, enqueued })
    })
}

/// asset_expiry ends the term of retained assets still waiting to reach their holders
/// (`docs/product.md#asset-expiry`): they become `expired`, and what was still being sent to them is cancelled.
fn asset_expiry(conn: &mut PgConnection, as_of: DateTime<Utc>, batch: i64) -> QueryResult<Swept> {
    conn.transaction(|conn| {
        #[derive(QueryableByName)]
        struct Due {
            #[diesel(sql_type = SqlUuid)]
            id: Uuid,
            #[diesel(sql_type = Text)]
            status: String,
        }
        let due: Vec<Due> = prepared(
            "SELECT id, status FROM assets
             WHERE expires_at <= $as_of AND status IN ('expired_certificate_processing', 'retransmitting', 'forced_retransmitting')
             ORDER BY expires_at, id LIMIT $batch FOR UPDATE SKIP LOCKED",
        )
        .bind::<Timestamptz, _>("as_of", as_of)
        .bind::<BigInt, _>("batch", batch)
        .load(conn)?;
        let mut expired = Vec::new();
        for from in [Status::ExpiredCertificateProcessing, Status::Retransmitting, Status::ForcedRetransmitting] {
            let ids: Vec<Uuid> = due.iter().filter(|d| d.status == from.as_str()).map(|d| d.id).collect();
            expired.extend(status::transition_many(conn, &ids, from, Status::Expired, Cause::AssetExpired, as_of).map_err(into_query_error)?);
        }
        prepared(
            "UPDATE deliveries SET status = 'cancelled', last_error = 'the asset expired'
             WHERE asset_id = ANY($expired) AND kind = 'asset' AND status IN ('pending', 'sent', 'failed')",
        )
        .bind::<Array<SqlUuid>, _>("expired", &expired)
        .execute(conn)?;
        Ok(Swept { scanned: due.len() as u64, enqueued: 0 })
    })
}

fn into_query_error(e: status::TransitionError) -> diesel::result::Error {
    match e {
        status::TransitionError::Db(e) => e,
        other => diesel::result::Error::QueryBuilderError(other.to_string().into()),
    }
}
