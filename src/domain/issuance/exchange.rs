//! `certificate.exchange` (`docs/product.md#exchange`): the holder presents its exchange certificate and
//! receives the asset. Settlement is not repeated, and a certificate is exchanged at most once.
//! Exchanges handled together are checked one by one, as each would be alone, then read in four
//! statements (their holders, their request ids, their certificates and their assets) and
//! carried out in two.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeliveryKind, ExchangeRequest, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::crypto;
use crate::crypto::KeyRing;
use crate::domain::delivery::{self, Deliveries, NewDelivery};
use crate::domain::metrics;
use crate::domain::requests::{Admitted, Header, Requests};
use crate::domain::schema::{asset_documents, assets, certificate_documents, exchange_certificates, refunds};
use crate::domain::status::Status;
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received, together_unless_repeated};

/// ExchangeHandler takes `certificate.exchange`.
pub struct ExchangeHandler {
    pub requests: Arc<Requests>,
    /// The keys that verify the certificates assetflow signed.
    pub keys: Arc<KeyRing>,
}

#[derive(Debug, Queryable)]
struct Certificate {
    id: Uuid,
    asset_id: Uuid,
    holder_terminal_id: String,
    expires_at: DateTime<Utc>,
    document: String,
    exchanged_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Queryable)]
struct Asset {
    id: Uuid,
    status: String,
    expires_at: DateTime<Utc>,
    document: String,
    order_id: Uuid,
    /// A refund of the asset awaits its partner's answer.
    refund_requested: bool,
}

impl Handler for ExchangeHandler {
    type Message = ExchangeRequest;
    const MESSAGE_TYPE: &'static str = kinds::CERTIFICATE_EXCHANGE;

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, ExchangeRequest>]) -> Result<(), Failure> {
        // Two requests with one request id, or presenting one certificate, are taken one at a
        // time: the second finds the first's outcome, as it would alone.
        let keys = |r: &ExchangeRequest| {
            let certificate = r.certificate.get("certificate_id").and_then(Value::as_str).unwrap_or_default();
            [format!("request {}", r.request_id), format!("certificate {certificate}")]
        };
        together_unless_repeated(cx, batch, keys, |cx, batch| take(self, cx, batch))
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::CERTIFICATE_EXCHANGE, detail)
    }
}

fn header(request: &ExchangeRequest) -> Header<'_> {
    Header {
        message_type: kinds::CERTIFICATE_EXCHANGE,
        request_id: &request.request_id,
        terminal_id: &request.terminal_id,
        sent_at: request.sent_at,
    }
}

/// Presented is an authentic, fresh exchange request on its way through the checks.
type Presented<'m> = Admitted<'m, ExchangeRequest>;

/// take carries out exchanges with distinct request ids and certificates.
fn take(h: &ExchangeHandler, cx: &mut Cx<'_>, batch: &[Received<'_, ExchangeRequest>]) -> Result<(), Failure> {
    let req = &*h.requests;
    let mut presented = Vec::with_capacity(batch.len());
    for p in req.admit_batch(cx, batch, header)? {
        match genuine(h, &p.message.certificate) {
            Ok(certificate_id) => presented.push((p, certificate_id)),
            Err(refused) => refuse(h, cx, &p, refused)?,
        }
    }
    let mut certificates = certificates(cx.conn, presented.iter().map(|(_, id)| *id).collect())?;
    let mut held = Vec::with_capacity(presented.len());
    for (p, id) in presented {
        match certificates.remove(&id) {
            None => refuse(
                h,
                cx,
                &p,
                Refused::new(RefusalReason::CertificateUnknown, format!("no certificate {id} was issued")),
            )?,
            Some(certificate) => match exchangeable(cx, &p, &certificate) {
                Ok(()) => held.push((p, certificate)),
                Err(refused) => refuse(h, cx, &p, refused)?,
            },
        }
    }
    let mut assets = assets(cx.conn, held.iter().map(|(_, c)| c.asset_id).collect())?;
    let mut exchanged = Exchanged::default();
    for (p, certificate) in held {
        let asset = assets.remove(&certificate.asset_id).ok_or_else(|| {
            Failure::permanent(DeadLetterReason::Unprocessable, format!("certificate {} has no asset", certificate.id))
        })?;
        if Status::parse(&asset.status) != Some(Status::AwaitingExchange) || asset.expires_at <= cx.now {
            let detail = format!("asset {} is {} and cannot be delivered", asset.id, asset.status);
            refuse(h, cx, &p, Refused::new(RefusalReason::AssetNotDeliverable, detail))?;
            continue;
        }
        if asset.refund_requested {
            let detail = format!("a refund of asset {} awaits its partner's answer", asset.id);
            refuse(h, cx, &p, Refused::new(RefusalReason::RefundPending, detail))?;
            continue;
        }
        exchanged.push(&p, &certificate, asset)?;
    }
    exchanged.write(cx, &h.requests.deliveries)
}

/// refuse answers an authentic, fresh request with a refusal, and records its request id.
fn refuse(h: &ExchangeHandler, cx: &mut Cx<'_>, p: &Presented<'_>, refused: Refused) -> Result<(), Failure> {
    h.requests.refuse(cx, p.incoming, &header(p.message), Some(&p.terminal), Some(&p.content_sha256), refused)
}

/// genuine checks that a presented certificate is signed by the service provider, and returns its
/// id. That it is exactly the document assetflow issued is checked once the issued one is read.
fn genuine(h: &ExchangeHandler, presented: &Value) -> Result<Uuid, Refused> {
    if let Err(e) = h.keys.verify_provider(presented) {
        metrics::signature_failure("certificate");
        return Err(Refused::new(
            RefusalReason::CertificateForged,
            format!("the certificate's signature does not verify: {e}"),
        ));
    }
    presented
        .get("certificate_id")
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| Refused::new(RefusalReason::CertificateForged, "the certificate has no valid certificate_id"))
}

/// exchangeable checks a certificate as issued against the request that presents it.
fn exchangeable(cx: &Cx<'_>, p: &Presented<'_>, certificate: &Certificate) -> Result<(), Refused> {
    let id = certificate.id;
    if crypto::canonical_json(&p.message.certificate) != certificate.document {
        metrics::signature_failure("certificate");
        return Err(Refused::new(RefusalReason::CertificateForged, "the certificate differs from the one issued"));
    }
    if certificate.holder_terminal_id != p.terminal.id {
        let detail = format!("certificate {id} is not held by terminal {}", p.terminal.id);
        return Err(Refused::new(RefusalReason::CertificateNotHeld, detail));
    }
    if certificate.exchanged_at.is_some() {
        return Err(Refused::new(
            RefusalReason::CertificateAlreadyExchanged,
            format!("certificate {id} was already exchanged"),
        ));
    }
    if certificate.revoked_at.is_some() {
        return Err(Refused::new(RefusalReason::CertificateRevoked, format!("certificate {id} was revoked")));
    }
    if certificate.expires_at <= cx.now {
        let detail = format!("certificate {id} expired at {}", certificate.expires_at);
        return Err(Refused::new(RefusalReason::CertificateExpired, detail));
    }
    Ok(())
}

/// certificates reads and locks the certificates of these ids that were issued, with their
/// documents, in id order: two transactions naming the same ones cannot deadlock.
fn certificates(conn: &mut PgConnection, mut ids: Vec<Uuid>) -> QueryResult<HashMap<Uuid, Certificate>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    ids.sort_unstable();
    let rows: Vec<Certificate> = exchange_certificates::table
        .inner_join(certificate_documents::table)
        .filter(exchange_certificates::id.eq_any(&ids))
        .order(exchange_certificates::id)
        .select((
            exchange_certificates::id,
            exchange_certificates::asset_id,
            exchange_certificates::holder_terminal_id,
            exchange_certificates::expires_at,
            certificate_documents::document,
            exchange_certificates::exchanged_at,
            exchange_certificates::revoked_at,
        ))
        .for_update()
        .load(conn)?;
    Ok(rows.into_iter().map(|c| (c.id, c)).collect())
}

/// assets reads and locks these assets with their documents, in id order, after their certificates.
fn assets(conn: &mut PgConnection, mut ids: Vec<Uuid>) -> QueryResult<HashMap<Uuid, Asset>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    ids.sort_unstable();
    let rows: Vec<Asset> = assets::table
        .inner_join(asset_documents::table)
        .filter(assets::id.eq_any(&ids))
        .order(assets::id)
        .select((
            assets::id,
            assets::status,
            assets::expires_at,
            asset_documents::document,
            assets::order_id,
            diesel::dsl::exists(
                refunds::table
                    .filter(refunds::asset_id.eq(assets::id.nullable()))
                    .filter(refunds::status.eq("requested")),
            ),
        ))
        .for_update()
        .load(conn)?;
    Ok(rows.into_iter().map(|a| (a.id, a)).collect())
}

/// Exchanged is what a batch exchanges, for [`Exchanged::write`]: the certificates with the
/// requests that exchanged them, and their assets' deliveries.
#[derive(Default)]
struct Exchanged {
    certificates: Vec<Uuid>,
    request_ids: Vec<String>,
    terminals: Vec<String>,
    content_sha256s: Vec<String>,
    sent_at: Vec<DateTime<Utc>>,
    assets: Vec<Uuid>,
    deliveries: Vec<NewDelivery>,
}

impl Exchanged {
    fn push(&mut self, p: &Presented<'_>, certificate: &Certificate, asset: Asset) -> Result<(), Failure> {
        let document: Value = serde_json::from_str(&asset.document)
            .map_err(|e| Failure::permanent(DeadLetterReason::Unprocessable, e.to_string()))?;
        let mut d = NewDelivery::now(
            DeliveryKind::Asset,
            format!("asset:{}", asset.id),
            &p.terminal,
            json!({"order_id": asset.order_id, "forced": false, "asset": document}),
        )
        .answering(p.message.request_id.clone());
        d.asset_id = Some(asset.id);
        d.order_id = Some(asset.order_id);
        self.deliveries.push(d);
        self.certificates.push(certificate.id);
        self.request_ids.push(p.message.request_id.clone());
        self.terminals.push(p.terminal.id.clone());
        self.content_sha256s.push(p.content_sha256.clone());
        self.sent_at.push(p.message.sent_at);
        self.assets.push(asset.id);
        tracing::info!(certificate_id = %certificate.id, asset_id = %asset.id, request_id = %p.message.request_id, "certificate exchanged");
        Ok(())
    }

    /// Exchanged::write marks the certificates exchanged by their requests, ends their reminders
    /// and records the requests as accepted (the asset is their subject), in one statement; then
    /// the assets' deliveries, in one more.
    fn write(&self, cx: &mut Cx<'_>, deliveries: &Deliveries) -> Result<(), Failure> {
        use diesel::sql_types::{Array, Text, Timestamptz, Uuid as SqlUuid};
        if self.certificates.is_empty() {
            return Ok(());
        }
        crate::runtime::db::prepared(
            "WITH recorded AS (
               INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at,
                                              received_at, outcome, subject_id)
               SELECT request_id, terminal_id, $message_type, sha, sent_at, $now, 'accepted', asset_id
               FROM unnest($request_ids::text[], $terminals::text[], $content_sha256s::text[], $sent_at::timestamptz[], $assets::uuid[])
                    AS r(request_id, terminal_id, sha, sent_at, asset_id)
             ), exchanged AS (
               UPDATE exchange_certificates c SET exchanged_at = $now, exchange_request_id = t.request_id
               FROM unnest($certificates::uuid[], $request_ids::text[]) AS t(id, request_id)
               WHERE c.id = t.id
             )
             -- Exchanged: no more reminders.
             UPDATE reminder_schedule SET next_stage = NULL, due_at = NULL WHERE certificate_id = ANY($certificates)",
        )
        .bind::<Timestamptz, _>("now", cx.now)
        .bind::<Text, _>("message_type", kinds::CERTIFICATE_EXCHANGE)
        .bind::<Array<SqlUuid>, _>("certificates", &self.certificates)
        .bind::<Array<Text>, _>("request_ids", &self.request_ids)
        .bind::<Array<Text>, _>("terminals", &self.terminals)
        .bind::<Array<Text>, _>("content_sha256s", &self.content_sha256s)
        .bind::<Array<Timestamptz>, _>("sent_at", &self.sent_at)
        .bind::<Array<SqlUuid>, _>("assets", &self.assets)
        .execute(cx.conn)?;
        delivery::enqueue_many(cx, deliveries, &self.deliveries)?;
        Ok(())
    }
}
