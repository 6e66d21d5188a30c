//! The certificate scans: near-expiry reminders (seed 000 section 3.6), past-due processing
//! (FIG. 7) and the end of retained assets' terms.
//!
//! Each batch is a handful of set-based statements whatever its size: one query claims the due
//! rows (`FOR UPDATE SKIP LOCKED`, index-backed), and the deliveries, outbox rows, reminder ledger
//! entries and status changes are written with `unnest` arrays. Everything is computed from `as_of`.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::app::App;
use crate::delivery::{self, NewDelivery};
use crate::messages::{DeliveryKind, Notice};
use crate::settlement::Swept;
use crate::status_machine::{self, Cause, Status};

/// Open is a claimed certificate, with what the scans need to act on it.
#[derive(Debug, QueryableByName)]
struct Open {
    #[diesel(sql_type = SqlUuid)]
    certificate_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    asset_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    order_id: Uuid,
    #[diesel(sql_type = Text)]
    holder: String,
    #[diesel(sql_type = Text)]
    gateway_id: String,
    #[diesel(sql_type = Text)]
    asset_status: String,
    #[diesel(sql_type = Timestamptz)]
    certificate_expires_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    asset_expires_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    title: String,
    #[diesel(sql_type = Text)]
    stage2_policy: String,
    #[diesel(sql_type = BigInt)]
    stage2_secs: i64,
    #[diesel(sql_type = Nullable<SmallInt>)]
    reminder_stage: Option<i16>,
    #[diesel(sql_type = Text)]
    document: String,
}

/// load reads the claimed certificates by primary key, in the claim's order.
fn load(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<Open>> {
    diesel::sql_query(
        "SELECT c.id AS certificate_id, c.asset_id, a.order_id, c.holder_terminal_id AS holder, t.gateway_id,
                a.status AS asset_status, c.expires_at AS certificate_expires_at, a.expires_at AS asset_expires_at,
                p.title, p.stage2_policy, p.reminder_stage2_secs AS stage2_secs, c.reminder_stage, a.document
         FROM unnest($1::uuid[]) WITH ORDINALITY AS claimed(id, n)
         JOIN exchange_certificates c ON c.id = claimed.id
         JOIN assets a ON a.id = c.asset_id
         JOIN products p ON p.id = a.product_id
         JOIN terminals t ON t.id = c.holder_terminal_id
         ORDER BY claimed.n",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .load(conn)
}

/// claim runs a claiming query (`$1` = as_of, `$2` = batch) and returns the ids it locked.
fn claim(conn: &mut PgConnection, sql: &'static str, as_of: DateTime<Utc>, batch: i64) -> QueryResult<Vec<Uuid>> {
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
    }
    let rows: Vec<Claimed> =
        diesel::sql_query(sql).bind::<Timestamptz, _>(as_of).bind::<BigInt, _>(batch).load(conn)?;
    Ok(rows.into_iter().map(|c| c.id).collect())
}

fn notice(open: &Open, kind: DeliveryKind, key: String, code: &str, text: String) -> NewDelivery {
    let content = Notice {
        code: code.into(),
        text,
        order_id: Some(open.order_id),
        asset_id: Some(open.asset_id),
        certificate_id: Some(open.certificate_id),
        request_id: None,
    };
    to_holder(open, kind, key, serde_json::to_value(content).expect("serializes"), false)
}

fn forced_asset(open: &Open) -> NewDelivery {
    let asset: Value = serde_json::from_str(&open.document).expect("assets store JSON documents");
    let content = json!({"order_id": open.order_id, "forced": true, "asset": asset});
    // Keyed like the asset's own delivery: a holder who exchanges later gets no second copy.
    to_holder(open, DeliveryKind::Asset, format!("asset:{}", open.asset_id), content, true)
}

fn to_holder(open: &Open, kind: DeliveryKind, dedupe_key: String, content: Value, forced: bool) -> NewDelivery {
    NewDelivery {
        kind,
        dedupe_key,
        terminal_id: open.holder.clone(),
        gateway_id: open.gateway_id.clone(),
        order_id: Some(open.order_id),
        asset_id: Some(open.asset_id),
        forced,
        content,
        due_at: None,
    }
}

fn date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn record_reminders(
    conn: &mut PgConnection,
    stage: i16,
    actions: &[(Uuid, &str)],
    as_of: DateTime<Utc>,
) -> QueryResult<usize> {
    if actions.is_empty() {
        return Ok(0);
    }
    diesel::sql_query(
        "INSERT INTO certificate_reminders (certificate_id, stage, action, as_of)
         SELECT certificate_id, $2, action, $4 FROM unnest($1::uuid[], $3::text[]) AS t(certificate_id, action)
         ON CONFLICT DO NOTHING",
    )
    .bind::<Array<SqlUuid>, _>(actions.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind::<SmallInt, _>(stage)
    .bind::<Array<Text>, _>(actions.iter().map(|(_, a)| a.to_string()).collect::<Vec<_>>())
    .bind::<Timestamptz, _>(as_of)
    .execute(conn)
}

/// near_expiry sends each certificate's reminders, once per stage: stage 1 ("close at hand", a
/// message) and stage 2 ("very close at hand", a download request, or a forced transmission
/// where the product says so). A stage-1 reminder whose moment passed while stage 2 came due is
/// recorded as superseded rather than sent late.
pub fn near_expiry(conn: &mut PgConnection, app: &App, as_of: DateTime<Utc>, batch: i64) -> QueryResult<Swept> {
    conn.transaction(|conn| {
        // The claim is one range of one partial index: its cost is the rows due, not the table.
        let claimed = claim(
            conn,
            "SELECT id FROM exchange_certificates
             WHERE reminder_due_at <= $1
             ORDER BY reminder_due_at, id
             LIMIT $2
             FOR UPDATE SKIP LOCKED",
            as_of,
            batch,
        )?;
        let due = load(conn, &claimed)?;

        let mut deliveries = Vec::with_capacity(due.len());
        let (mut stage1, mut stage2, mut next_stage2, mut done) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for open in &due {
            let stage2_at = open.certificate_expires_at - chrono::Duration::seconds(open.stage2_secs);
            if open.certificate_expires_at <= as_of || open.asset_status != Status::AwaitingExchange.as_str() {
                // Expired (past-due processing takes it from here) or delivered another way.
                done.push(open.certificate_id);
            } else if as_of >= stage2_at {
                if open.stage2_policy == "forced_transmission" {
                    deliveries.push(forced_asset(open));
                } else {
                    deliveries.push(notice(
                        open,
                        DeliveryKind::DownloadRequest,
                        format!("reminder:{}:2", open.certificate_id),
                        "download_requested",
                        format!(
                            "The expiration date on which your exchange certificate can be exchanged for {} is very close at hand ({}): please download it now.",
                            open.title,
                            date(open.certificate_expires_at)
                        ),
                    ));
                }
                stage2.push((open.certificate_id, open.stage2_policy.as_str()));
                if open.reminder_stage == Some(1) {
                    stage1.push((open.certificate_id, "superseded"));
                }
                done.push(open.certificate_id);
            } else {
                deliveries.push(notice(
                    open,
                    DeliveryKind::Message,
                    format!("reminder:{}:1", open.certificate_id),
                    "certificate_expiring",
                    format!(
                        "The expiration date on which your exchange certificate can be exchanged for {} is close at hand: {}.",
                        open.title,
                        date(open.certificate_expires_at)
                    ),
                ));
                stage1.push((open.certificate_id, "message"));
                next_stage2.push((open.certificate_id, stage2_at));
            }
        }
        let enqueued = delivery::enqueue_many(conn, app, &deliveries, as_of)?;
        record_reminders(conn, 1, &stage1, as_of)?;
        record_reminders(conn, 2, &stage2, as_of)?;
        diesel::sql_query(
            "UPDATE exchange_certificates c SET reminder_stage = 2, reminder_due_at = t.due
             FROM unnest($1::uuid[], $2::timestamptz[]) AS t(id, due) WHERE c.id = t.id",
        )
        .bind::<Array<SqlUuid>, _>(next_stage2.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind::<Array<Timestamptz>, _>(next_stage2.iter().map(|(_, at)| *at).collect::<Vec<_>>())
        .execute(conn)?;
        diesel::sql_query("UPDATE exchange_certificates SET reminder_stage = NULL, reminder_due_at = NULL WHERE id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(&done)
            .execute(conn)?;
        Ok(Swept { scanned: due.len() as u64, enqueued })
    })
}

/// past_due handles certificates that expired unexchanged (FIG. 7): the asset goes to past-due
/// processing; if it is still valid the holder gets a past-due message, a forced transmission of
/// the asset and a revocation request for the certificate; if not, the asset expires. A
/// certificate whose asset already left awaiting_exchange another way (a forced stage-2
/// transmission, a refund) is void and is closed quietly.
pub fn past_due(conn: &mut PgConnection, app: &App, as_of: DateTime<Utc>, batch: i64) -> QueryResult<Swept> {
    conn.transaction(|conn| {
        let claimed = claim(
            conn,
            "SELECT id FROM exchange_certificates
             WHERE exchanged_at IS NULL AND revoked_at IS NULL AND expires_at <= $1
             ORDER BY expires_at, id
             LIMIT $2
             FOR UPDATE SKIP LOCKED",
            as_of,
            batch,
        )?;
        let loaded = load(conn, &claimed)?;
        let due: Vec<&Open> = loaded.iter().filter(|o| o.asset_status == Status::AwaitingExchange.as_str()).collect();
        let all: Vec<Uuid> = due.iter().map(|o| o.asset_id).collect();
        status_machine::transition_many(conn, &all, Status::AwaitingExchange, Status::ExpiredCertificateProcessing, Cause::CertificatePastDue, as_of)
            .map_err(into_query_error)?;
        let (valid, void): (Vec<&Open>, Vec<&Open>) = due.iter().partition(|o| o.asset_expires_at > as_of);
        let void: Vec<Uuid> = void.iter().map(|o| o.asset_id).collect();
        status_machine::transition_many(conn, &void, Status::ExpiredCertificateProcessing, Status::Expired, Cause::AssetExpired, as_of)
            .map_err(into_query_error)?;

        let mut deliveries = Vec::with_capacity(valid.len() * 3);
        for open in &valid {
            deliveries.push(notice(
                open,
                DeliveryKind::Message,
                format!("past_due:{}", open.certificate_id),
                "certificate_past_due",
                format!(
                    "The expiration date of your exchange certificate for {} has passed ({}): the asset is being sent to you now.",
                    open.title,
                    date(open.certificate_expires_at)
                ),
            ));
            deliveries.push(forced_asset(open));
            deliveries.push(notice(
                open,
                DeliveryKind::RevocationRequest,
                format!("revoke:{}", open.certificate_id),
                "certificate_revoked",
                format!("Exchange certificate {} has expired: please delete it.", open.certificate_id),
            ));
        }
        let enqueued = delivery::enqueue_many(conn, app, &deliveries, as_of)?;
        diesel::sql_query(
            "UPDATE exchange_certificates SET revoked_at = $2, reminder_stage = NULL, reminder_due_at = NULL WHERE id = ANY($1)",
        )
        .bind::<Array<SqlUuid>, _>(&claimed)
        .bind::<Timestamptz, _>(as_of)
        .execute(conn)?;
        Ok(Swept { scanned: claimed.len() as u64, enqueued })
    })
}

/// asset_expiry ends the term of retained assets still waiting to reach their holders (FIG. 7
/// S203, FIG. 8 S303): they become `expired`, and what was still being sent to them is cancelled.
pub fn asset_expiry(conn: &mut PgConnection, _app: &App, as_of: DateTime<Utc>, batch: i64) -> QueryResult<Swept> {
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
