//! What the certificate scans owe holders, made into deliveries
//! (`docs/product.md#near-expiry-reminders`, `#past-due-processing`).
//!
//! The `near_expiry` and `past_due` scans record their decision (`reminder_schedule`, or the
//! certificate's revocation) and publish `certificate.notices` in the same transaction; they write
//! nothing else per certificate, so a night's scan stays a handful of set-based statements. This
//! handler, on any delivery consumer of any process, re-reads the certificates, moves past-due
//! assets out of awaiting_exchange (guarded by their status), renders each notice and sends it.
//! Every delivery is keyed per (certificate, notice), so a message handled twice, or a notice a
//! holder already got another way, sends nothing twice.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, Text, Timestamptz, Uuid as SqlUuid};
use serde_json::{Value, json};
use uuid::Uuid;

use std::sync::Arc;

use super::{Deliveries, NewDelivery, insert_many, send_attempts};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{CertificateNotices, DeliveryKind, Notice, NoticeKind, kinds};
use crate::domain::status::{self, Cause, Status};
use crate::runtime::consumer::{Cx, Failure, Handler, Received};

/// NoticesHandler makes and sends the deliveries a `certificate.notices` message asks for.
pub struct NoticesHandler {
    pub deliveries: Arc<Deliveries>,
}

impl Handler for NoticesHandler {
    type Message = CertificateNotices;
    const MESSAGE_TYPE: &'static str = kinds::CERTIFICATE_NOTICES;

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, CertificateNotices>]) -> Result<(), Failure> {
        batch.iter().try_for_each(|r| self.notices(cx, &r.message))
    }
}

impl NoticesHandler {
    fn notices(&self, cx: &mut Cx<'_>, request: &CertificateNotices) -> Result<(), Failure> {
        let ids: Vec<Uuid> = request.notices.iter().map(|n| n.certificate_id).collect();
        let certificates = load(cx.conn, &ids)?;
        let past_due = past_due_processing(cx.conn, request, &certificates)?;
        let mut deliveries = Vec::with_capacity(request.notices.len());
        for notice in &request.notices {
            let Some(open) = certificates.iter().find(|c| c.certificate_id == notice.certificate_id) else {
                // One unknown id does not hold up the others; the rest of the message stands.
                tracing::warn!(certificate_id = %notice.certificate_id, "notice for an unknown certificate skipped");
                continue;
            };
            if notice.notice == NoticeKind::PastDue && !past_due.contains(&open.asset_id) {
                // The asset went another way, or is no longer valid: only the revocation request.
                deliveries.push(revocation_request(open));
                continue;
            }
            deliveries.extend(render(open, notice.notice)?);
        }
        let inserted: Vec<Uuid> = insert_many(cx.conn, &deliveries, cx.now)?.into_iter().map(|i| i.id).collect();
        send_attempts(cx.conn, &self.deliveries, &inserted, cx.now, cx.outgoing)?;
        Ok(())
    }
}

/// past_due_processing moves the assets of the message's past-due notices from awaiting_exchange
/// to past-due processing (`docs/product.md#past-due-processing`), as of the scan's time, and those no longer valid on to
/// expired. It returns the assets whose holders are owed the past-due transmissions. An asset that
/// has already moved (this notice handled before, or the asset delivered another way) is left
/// alone and owed nothing here.
fn past_due_processing(
    conn: &mut PgConnection,
    request: &CertificateNotices,
    certificates: &[Open],
) -> Result<HashSet<Uuid>, Failure> {
    let assets: Vec<Uuid> = request
        .notices
        .iter()
        .filter(|n| n.notice == NoticeKind::PastDue)
        .filter_map(|n| certificates.iter().find(|c| c.certificate_id == n.certificate_id))
        .map(|c| c.asset_id)
        .collect();
    let as_of = request.as_of;
    let moved = status::transition_many(
        conn,
        &assets,
        Status::AwaitingExchange,
        Status::ExpiredCertificateProcessing,
        Cause::CertificatePastDue,
        as_of,
    )?;
    let (valid, void): (Vec<Uuid>, Vec<Uuid>) = moved
        .into_iter()
        .partition(|asset| certificates.iter().any(|c| c.asset_id == *asset && c.asset_expires_at > as_of));
    status::transition_many(
        conn,
        &void,
        Status::ExpiredCertificateProcessing,
        Status::Expired,
        Cause::AssetExpired,
        as_of,
    )?;
    Ok(valid.into_iter().collect())
}

/// Open is a certificate with what its notices are made of.
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
    asset_expires_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    certificate_expires_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    title: String,
    #[diesel(sql_type = Text)]
    document: String,
}

fn load(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<Open>> {
    crate::runtime::db::prepared(
        "SELECT c.id AS certificate_id, c.asset_id, a.order_id, c.holder_terminal_id AS holder, t.gateway_id,
                a.status AS asset_status, a.expires_at AS asset_expires_at, c.expires_at AS certificate_expires_at, p.title, d.document
         FROM exchange_certificates c
         JOIN assets a ON a.id = c.asset_id
         JOIN asset_documents d ON d.asset_id = c.asset_id
         JOIN products p ON p.id = a.product_id
         JOIN terminals t ON t.id = c.holder_terminal_id
         WHERE c.id = ANY($ids)",
    )
    .bind::<Array<SqlUuid>, _>("ids", ids)
    .load(conn)
}

/// render makes a notice's deliveries. A reminder is void once the asset has left
/// awaiting_exchange (exchanged, refunded, expired) between the scan and now.
fn render(open: &Open, notice: NoticeKind) -> Result<Vec<NewDelivery>, Failure> {
    let certificate = open.certificate_id;
    let awaiting = open.asset_status == Status::AwaitingExchange.as_str();
    Ok(match notice {
        NoticeKind::ExpiryMessage if awaiting => vec![message(
            open,
            DeliveryKind::Message,
            format!("reminder:{certificate}:1"),
            "certificate_expiring",
            format!(
                "The expiration date on which your exchange certificate can be exchanged for {} is close at hand: {}.",
                open.title,
                date(open.certificate_expires_at)
            ),
        )],
        NoticeKind::DownloadRequest if awaiting => vec![message(
            open,
            DeliveryKind::DownloadRequest,
            format!("reminder:{certificate}:2"),
            "download_requested",
            format!(
                "The expiration date on which your exchange certificate can be exchanged for {} is very close at hand ({}): please download it now.",
                open.title,
                date(open.certificate_expires_at)
            ),
        )],
        NoticeKind::ForcedTransmission if awaiting => vec![forced_asset(open)?],
        NoticeKind::ExpiryMessage | NoticeKind::DownloadRequest | NoticeKind::ForcedTransmission => Vec::new(),
        // Only for assets past_due_processing just moved; sending re-checks their validity.
        NoticeKind::PastDue => vec![
            message(
                open,
                DeliveryKind::Message,
                format!("past_due:{certificate}"),
                "certificate_past_due",
                format!(
                    "The expiration date of your exchange certificate for {} has passed ({}): the asset is being sent to you now.",
                    open.title,
                    date(open.certificate_expires_at)
                ),
            ),
            forced_asset(open)?,
            revocation_request(open),
        ],
    })
}

/// revocation_request asks the holder to delete its revoked certificate. Keyed per certificate,
/// it is sent once whatever path led to it.
fn revocation_request(open: &Open) -> NewDelivery {
    let certificate = open.certificate_id;
    message(
        open,
        DeliveryKind::RevocationRequest,
        super::revocation_key(certificate),
        "certificate_revoked",
        format!("Exchange certificate {certificate} has expired: please delete it."),
    )
}

fn message(open: &Open, kind: DeliveryKind, key: String, code: &str, text: String) -> NewDelivery {
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

fn forced_asset(open: &Open) -> Result<NewDelivery, Failure> {
    let asset: Value = serde_json::from_str(&open.document).map_err(|e| {
        Failure::permanent(
            DeadLetterReason::Unprocessable,
            format!("asset {} has no JSON document: {e}", open.asset_id),
        )
    })?;
    let content = json!({"order_id": open.order_id, "forced": true, "asset": asset});
    // Keyed like the asset's own delivery: a holder who exchanges later gets no second copy.
    Ok(to_holder(open, DeliveryKind::Asset, format!("asset:{}", open.asset_id), content, true))
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
        request_id: None,
    }
}

fn date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}
