//! Terminal requests: who sent them, whether they are fresh, whether they were seen before, and
//! how they are refused (`docs/product.md`, "Authenticity").
//!
//! The order of the checks matters. An unknown terminal or a bad signature is refused before the
//! request id is looked at, so that a forger cannot burn someone else's request id. A stale request
//! is refused before it is matched as a duplicate, so that an old signed request replayed after
//! its idempotency record was pruned still has no effect.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use crate::config::AuthConfig;
use crate::contracts::messages::{DeliveryKind, Notice, Refusal};
use crate::crypto;
use crate::domain::catalogue::{Catalogue, Terminal};
use crate::domain::delivery::Deliveries;
use crate::domain::delivery::{self, NewDelivery};
use crate::domain::schema::{refusals, terminal_requests};
use crate::runtime::consumer::{Cx, Failure, Incoming, Received};

/// Requests is what answering terminal requests needs: the freshness rules, and the deliveries
/// that carry refusals and duplicate notices back to the terminal.
#[derive(Debug, Clone)]
pub struct Requests {
    pub auth: AuthConfig,
    pub deliveries: Arc<Deliveries>,
}
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::domain::metrics;

/// Original is the outcome of the first request with a request id.
#[derive(Debug, Clone, Queryable)]
pub struct Original {
    pub terminal_id: String,
    pub content_sha256: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub subject_id: Option<Uuid>,
}

/// Header is what every terminal request carries besides its body.
#[derive(Debug, Clone)]
pub struct Header<'a> {
    pub message_type: &'a str,
    pub request_id: &'a str,
    pub terminal_id: &'a str,
    pub sent_at: DateTime<Utc>,
}

/// Authentic is a request from a registered terminal, signed by it and fresh: carry it out unless
/// its request id was seen before (see [`originals`]).
#[derive(Debug)]
pub struct Authentic {
    pub terminal: Terminal,
    pub content_sha256: String,
}

/// Admitted is a request of a batch that passed the checks every request passes first and was not
/// seen before: carry it out, then record it, accepted or refused.
#[derive(Debug)]
pub struct Admitted<'b, M> {
    pub incoming: &'b Incoming,
    pub message: &'b M,
    pub terminal: Terminal,
    pub content_sha256: String,
}

/// originals are the first requests with these request ids, by request id, in one statement.
pub fn originals(conn: &mut PgConnection, request_ids: &[&str]) -> QueryResult<HashMap<String, Original>> {
    let rows: Vec<(String, Original)> = terminal_requests::table
        .filter(terminal_requests::request_id.eq_any(request_ids))
        .select((
            terminal_requests::request_id,
            (
                terminal_requests::terminal_id,
                terminal_requests::content_sha256,
                terminal_requests::outcome,
                terminal_requests::reason,
                terminal_requests::subject_id,
            ),
        ))
        .load(conn)?;
    Ok(rows.into_iter().collect())
}

/// check_signature checks a terminal request's `signature` against the terminal's registered PEM
/// public key: the cryptographic half of [`Requests::authenticate`]. Any request and any registered text may
/// reach it, so it returns an error, never panics (fuzzed by `fuzz/`, the `signature` target).
pub fn check_signature(public_key_pem: &str, request: &Value) -> Result<(), crypto::CryptoError> {
    crypto::verify_registered(public_key_pem, request)
}

fn record(
    cx: &mut Cx<'_>,
    header: &Header<'_>,
    sha: &str,
    outcome: &str,
    reason: Option<RefusalReason>,
    subject: Option<Uuid>,
) -> Result<(), Failure> {
    // A concurrent copy of the same request loses on the primary key and is retried, then seen as a
    // duplicate: see `Failure::from` for unique violations.
    diesel::insert_into(terminal_requests::table)
        .values((
            terminal_requests::request_id.eq(header.request_id),
            terminal_requests::terminal_id.eq(header.terminal_id),
            terminal_requests::message_type.eq(header.message_type),
            terminal_requests::content_sha256.eq(sha),
            terminal_requests::sent_at.eq(header.sent_at),
            terminal_requests::received_at.eq(cx.now),
            terminal_requests::outcome.eq(outcome),
            terminal_requests::reason.eq(reason.map(RefusalReason::as_str)),
            terminal_requests::subject_id.eq(subject),
        ))
        .execute(cx.conn)?;
    Ok(())
}

impl Requests {
    /// Requests::authenticate checks who sent a request, its signature and its freshness as of `received_at`
    /// (when it first reached this pool), without looking its request id up: a set-based handler
    /// looks a batch's ids up together, with [`originals`].
    pub fn authenticate(
        &self,
        cx: &mut Cx<'_>,
        header: &Header<'_>,
        json: &Value,
        received_at: DateTime<Utc>,
    ) -> Result<Result<Authentic, (Option<Terminal>, Refused)>, Failure> {
        let Some(terminal) = cx.terminal(header.terminal_id)? else {
            return Ok(Err((
                None,
                Refused::new(
                    RefusalReason::UnknownTerminal,
                    format!("terminal {:?} is not registered", header.terminal_id),
                ),
            )));
        };
        if let Err(e) = check_signature(&terminal.public_key_pem, json) {
            metrics::signature_failure("terminal_request");
            return Ok(Err((
                Some(terminal),
                Refused::new(
                    RefusalReason::BadSignature,
                    format!("the request's signature is not the terminal's: {e}"),
                ),
            )));
        }
        let auth = &self.auth;
        let age = received_at.signed_duration_since(header.sent_at);
        if age > chrono::Duration::from_std(auth.freshness_window).expect("a sane window") {
            return Ok(Err((
                Some(terminal),
                Refused::new(
                    RefusalReason::StaleRequest,
                    format!(
                        "sent_at {} is older than the {:?} freshness window",
                        header.sent_at, auth.freshness_window
                    ),
                ),
            )));
        }
        if -age > chrono::Duration::from_std(auth.max_clock_skew).expect("a sane skew") {
            return Ok(Err((
                Some(terminal),
                Refused::new(RefusalReason::StaleRequest, format!("sent_at {} is in the future", header.sent_at)),
            )));
        }
        let content_sha256 =
            crypto::sha256_hex(&crypto::signed_bytes(json).map_err(|e| Failure::Transient(e.to_string()))?);
        Ok(Ok(Authentic { terminal, content_sha256 }))
    }

    /// Requests::admit runs, for a handler that carries its requests out one by one, the checks every
    /// terminal request passes first, in their order: who sent it, its signature, its freshness,
    /// then its request id. A request that fails one is answered here (refused, or told its
    /// original outcome) and `None` is returned; a new request is returned to be carried out, and
    /// then recorded with [`Requests::accept`] or [`Requests::refuse`].
    pub fn admit(
        &self,
        cx: &mut Cx<'_>,
        incoming: &Incoming,
        header: &Header<'_>,
    ) -> Result<Option<Authentic>, Failure> {
        let authentic = match self.authenticate(cx, header, &incoming.json, incoming.first_received_at)? {
            Err((terminal, refused)) => {
                self.refuse(cx, incoming, header, terminal.as_ref(), None, refused)?;
                return Ok(None);
            }
            Ok(authentic) => authentic,
        };
        if let Some(original) = originals(cx.conn, &[header.request_id])?.remove(header.request_id) {
            self.answer_duplicate(cx, incoming, header, &authentic.terminal, &original, &authentic.content_sha256)?;
            return Ok(None);
        }
        Ok(Some(authentic))
    }

    /// Requests::admit_batch is [`Requests::admit`] for a handler that carries a batch out set-based:
    /// each request is authenticated on its own, in the order of the checks, then the batch's
    /// request ids are looked up in one statement. A request that fails a check, or repeats an
    /// earlier one, is answered here; the new ones are returned, in the batch's order. The batch's
    /// request ids must be distinct (`together_unless_repeated`).
    pub fn admit_batch<'b, M>(
        &self,
        cx: &mut Cx<'_>,
        batch: &'b [Received<'b, M>],
        header: for<'m> fn(&'m M) -> Header<'m>,
    ) -> Result<Vec<Admitted<'b, M>>, Failure> {
        cx.read_terminals(batch.iter().map(|r| header(&r.message).terminal_id))?;
        let mut authentic = Vec::with_capacity(batch.len());
        for Received { message, incoming } in batch {
            let header = header(message);
            match self.authenticate(cx, &header, &incoming.json, incoming.first_received_at)? {
                Err((terminal, refused)) => self.refuse(cx, incoming, &header, terminal.as_ref(), None, refused)?,
                Ok(Authentic { terminal, content_sha256 }) => {
                    authentic.push(Admitted { incoming, message, terminal, content_sha256 })
                }
            }
        }
        if authentic.is_empty() {
            return Ok(authentic);
        }
        let ids: Vec<&str> = authentic.iter().map(|a| header(a.message).request_id).collect();
        let mut originals = originals(cx.conn, &ids)?;
        let mut admitted = Vec::with_capacity(authentic.len());
        for a in authentic {
            let header = header(a.message);
            match originals.remove(header.request_id) {
                Some(original) => {
                    self.answer_duplicate(cx, a.incoming, &header, &a.terminal, &original, &a.content_sha256)?
                }
                None => admitted.push(a),
            }
        }
        Ok(admitted)
    }

    /// Requests::accept records an admitted request as carried out, naming what it acted on: its
    /// request id now answers a repeat with this outcome.
    pub fn accept(
        &self,
        cx: &mut Cx<'_>,
        header: &Header<'_>,
        content_sha256: &str,
        subject: Uuid,
    ) -> Result<(), Failure> {
        record(cx, header, content_sha256, "accepted", None, Some(subject))
    }

    /// Requests::refuse answers a request with a refusal: a `refusals` row, the request's idempotency record
    /// when the request was authentic and fresh, and a `refusal` delivery when the terminal is known.
    pub fn refuse(
        &self,
        cx: &mut Cx<'_>,
        message: &Incoming,
        header: &Header<'_>,
        terminal: Option<&Terminal>,
        fresh_sha256: Option<&str>,
        refused: Refused,
    ) -> Result<(), Failure> {
        tracing::info!(request_id = header.request_id, terminal_id = header.terminal_id, reason = %refused.reason, detail = %refused.detail, "refused");
        metrics::refused(refused.reason);
        diesel::insert_into(refusals::table)
            .values((
                refusals::id.eq(Uuid::now_v7()),
                refusals::request_id.eq(Some(header.request_id)),
                refusals::terminal_id.eq(Some(header.terminal_id)),
                refusals::message_type.eq(header.message_type),
                refusals::reason.eq(refused.reason.as_str()),
                refusals::detail.eq(&refused.detail),
                refusals::created_at.eq(cx.now),
            ))
            .execute(cx.conn)?;
        if let Some(sha) = fresh_sha256 {
            record(cx, header, sha, "refused", Some(refused.reason), None)?;
        }
        if let Some(terminal) = terminal {
            let content = Refusal {
                request_id: header.request_id.to_string(),
                request_type: header.message_type.to_string(),
                reason: refused.reason,
                detail: refused.detail,
            };
            delivery::enqueue(
                cx,
                &self.deliveries,
                NewDelivery::now(
                    DeliveryKind::Refusal,
                    format!("refusal:{}", message.message_id),
                    terminal,
                    serde_json::to_value(content).expect("serializes"),
                )
                .answering(header.request_id),
            )?;
        }
        Ok(())
    }

    /// Requests::answer_duplicate tells the terminal the original outcome of a repeated request id, or refuses
    /// it when the id was used for other content.
    pub fn answer_duplicate(
        &self,
        cx: &mut Cx<'_>,
        message: &Incoming,
        header: &Header<'_>,
        terminal: &Terminal,
        original: &Original,
        content_sha256: &str,
    ) -> Result<(), Failure> {
        if original.terminal_id != terminal.id || original.content_sha256 != content_sha256 {
            let refused = Refused::new(
                RefusalReason::RequestIdReused,
                format!("request id {:?} was already used for another request", header.request_id),
            );
            return self.refuse(cx, message, header, Some(terminal), None, refused);
        }
        let outcome = match (&original.reason, original.subject_id) {
            (Some(reason), _) => format!("refused ({reason})"),
            (None, Some(subject)) => format!("accepted ({subject})"),
            (None, None) => original.outcome.clone(),
        };
        let notice = Notice {
            code: "duplicate_request".into(),
            text: format!("request {} was already received: {outcome}; it has no second effect", header.request_id),
            order_id: None,
            asset_id: None,
            certificate_id: None,
            request_id: Some(header.request_id.to_string()),
        };
        delivery::enqueue(
            cx,
            &self.deliveries,
            NewDelivery::now(
                DeliveryKind::Message,
                format!("duplicate:{}", message.message_id),
                terminal,
                serde_json::to_value(notice).expect("serializes"),
            )
            .answering(header.request_id),
        )?;
        Ok(())
    }

    /// Requests::answer_invalid answers a request that failed its schema with a refusal naming
    /// the field at fault, when a registered terminal sent it and its signature over the request
    /// verifies; nobody else (an unknown terminal, a forger) is answered, and no request id is
    /// recorded. A quantity out of range is `invalid_amount`, anything else `invalid_request`.
    pub fn answer_invalid(
        &self,
        cx: &mut Cx<'_>,
        incoming: &Incoming,
        message_type: &'static str,
        detail: &str,
    ) -> Result<(), Failure> {
        let json = &incoming.json;
        let field = |name: &str| json.get(name).and_then(Value::as_str);
        let (Some(terminal_id), Some(request_id)) = (field("terminal_id"), field("request_id")) else {
            return Ok(());
        };
        if !is_id(request_id) || !is_id(terminal_id) {
            return Ok(()); // no answer can name the request
        }
        let Some(terminal) = cx.terminal(terminal_id)? else { return Ok(()) };
        if check_signature(&terminal.public_key_pem, json).is_err() {
            metrics::signature_failure("terminal_request");
            return Ok(());
        }
        let out_of_range = detail.contains("minimum") || detail.contains("maximum");
        let reason = if detail.starts_with("/quantity") && out_of_range {
            RefusalReason::InvalidAmount
        } else {
            RefusalReason::InvalidRequest
        };
        let sent_at = field("sent_at")
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map_or(cx.now, |t| t.with_timezone(&Utc));
        let header = Header { message_type, request_id, terminal_id, sent_at };
        let detail: String = detail.chars().take(500).collect();
        self.refuse(cx, incoming, &header, Some(&terminal), None, Refused::new(reason, detail))
    }
}

/// is_id accepts the request and terminal ids the schemas accept: 1 to 64 characters of letters,
/// digits, '.', '_', ':' and '-'.
fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}
