//! `certificate.exchange` (seed 000 section 3.3): the holder presents its exchange certificate and
//! receives the asset. Settlement is not repeated, and a certificate is exchanged at most once.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::crypto;
use crate::db::schema::{asset_documents, assets, certificate_documents, exchange_certificates, reminder_schedule};
use crate::dead_letter::Reason as DeadReason;
use crate::delivery::{self, NewDelivery};
use crate::messages::{DeliveryKind, ExchangeRequest, kinds};
use crate::pool::{Cx, Failure, Handler, Incoming};
use crate::refusal::{Reason, Refused};
use crate::requests::{self, Header, Terminal, Verified};
use crate::status_machine::Status;
use crate::telemetry;

/// ExchangeHandler takes `certificate.exchange`.
pub struct ExchangeHandler;

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

impl Handler for ExchangeHandler {
    fn message_type(&self) -> &'static str {
        kinds::CERTIFICATE_EXCHANGE
    }

    fn handle(&self, cx: &mut Cx<'_>, message: &Incoming) -> Result<(), Failure> {
        let request: ExchangeRequest = message.decode()?;
        let header = Header {
            message_type: kinds::CERTIFICATE_EXCHANGE,
            request_id: &request.request_id,
            terminal_id: &request.terminal_id,
            sent_at: request.sent_at,
        };
        let (terminal, sha) = match requests::verify(cx, &header, &message.json)? {
            Err((terminal, refused)) => {
                return requests::refuse(cx, message, &header, terminal.as_ref(), None, refused);
            }
            Ok(Verified::Duplicate { terminal, original, content_sha256 }) => {
                return requests::answer_duplicate(cx, message, &header, &terminal, &original, &content_sha256);
            }
            Ok(Verified::Fresh { terminal, content_sha256 }) => (terminal, content_sha256),
        };
        match exchange(cx, &request, &terminal)? {
            Ok(asset_id) => {
                requests::accept(cx, &header, &sha, asset_id)?;
                Ok(())
            }
            Err(refused) => requests::refuse(cx, message, &header, Some(&terminal), Some(&sha), refused),
        }
    }
}

fn exchange(cx: &mut Cx<'_>, request: &ExchangeRequest, terminal: &Terminal) -> Result<Result<Uuid, Refused>, Failure> {
    let presented = &request.certificate;
    // Genuine: signed by the service provider, and exactly the document assetflow issued.
    if let Err(e) = cx.app.keys.verify_provider(presented) {
        telemetry::signature_failure("certificate");
        return Ok(Err(Refused::new(
            Reason::CertificateForged,
            format!("the certificate's signature does not verify: {e}"),
        )));
    }
    let Some(id) = presented.get("certificate_id").and_then(Value::as_str).and_then(|s| Uuid::parse_str(s).ok()) else {
        return Ok(Err(Refused::new(Reason::CertificateForged, "the certificate has no valid certificate_id")));
    };
    let Some(certificate) = exchange_certificates::table
        .inner_join(certificate_documents::table)
        .filter(exchange_certificates::id.eq(id))
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
        .first::<Certificate>(cx.conn)
        .optional()?
    else {
        return Ok(Err(Refused::new(Reason::CertificateUnknown, format!("no certificate {id} was issued"))));
    };
    if crypto::canonical_json(presented) != certificate.document {
        telemetry::signature_failure("certificate");
        return Ok(Err(Refused::new(Reason::CertificateForged, "the certificate differs from the one issued")));
    }
    if certificate.holder_terminal_id != terminal.id {
        return Ok(Err(Refused::new(
            Reason::CertificateNotHeld,
            format!("certificate {id} is not held by terminal {}", terminal.id),
        )));
    }
    if certificate.exchanged_at.is_some() {
        return Ok(Err(Refused::new(
            Reason::CertificateAlreadyExchanged,
            format!("certificate {id} was already exchanged"),
        )));
    }
    if certificate.revoked_at.is_some() {
        return Ok(Err(Refused::new(Reason::CertificateRevoked, format!("certificate {id} was revoked"))));
    }
    if certificate.expires_at <= cx.now {
        return Ok(Err(Refused::new(
            Reason::CertificateExpired,
            format!("certificate {id} expired at {}", certificate.expires_at),
        )));
    }
    let (status, expires_at, document, order_id): (String, DateTime<Utc>, String, Uuid) = assets::table
        .inner_join(asset_documents::table)
        .filter(assets::id.eq(certificate.asset_id))
        .select((assets::status, assets::expires_at, asset_documents::document, assets::order_id))
        .for_update()
        .first(cx.conn)?;
    if Status::parse(&status) != Some(Status::AwaitingExchange) || expires_at <= cx.now {
        return Ok(Err(Refused::new(
            Reason::AssetNotDeliverable,
            format!("asset {} is {status} and cannot be delivered", certificate.asset_id),
        )));
    }
    diesel::update(exchange_certificates::table.find(id))
        .set((
            exchange_certificates::exchanged_at.eq(cx.now),
            exchange_certificates::exchange_request_id.eq(&request.request_id),
        ))
        .execute(cx.conn)?;
    // Exchanged: no more reminders.
    diesel::update(reminder_schedule::table.find(id))
        .set((reminder_schedule::next_stage.eq(None::<i16>), reminder_schedule::due_at.eq(None::<DateTime<Utc>>)))
        .execute(cx.conn)?;
    let asset: Value =
        serde_json::from_str(&document).map_err(|e| Failure::permanent(DeadReason::Unprocessable, e.to_string()))?;
    let mut d = NewDelivery::now(
        DeliveryKind::Asset,
        format!("asset:{}", certificate.asset_id),
        terminal,
        json!({"order_id": order_id, "forced": false, "asset": asset}),
    );
    d.asset_id = Some(certificate.asset_id);
    d.order_id = Some(order_id);
    delivery::enqueue(cx, d)?;
    tracing::info!(certificate_id = %certificate.id, asset_id = %certificate.asset_id, "certificate exchanged");
    Ok(Ok(certificate.asset_id))
}
