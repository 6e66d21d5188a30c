//! `asset.defer` (`docs/product.md#deferrals`): the holder answers "download later" with a new
//! time before the asset expires. An asset awaiting exchange gives up its certificate for a
//! designated delivery; an asset already awaiting one has it moved. Either way the asset has one
//! delivery of itself (its key is the asset's), so it never has two designated deliveries pending.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeferRequest, DeliveryKind, Notice, kinds};
use crate::contracts::refusal::{RefusalReason, Refused};
use crate::domain::catalogue::Terminal;
use crate::domain::delivery::{self, NewDelivery};
use crate::domain::requests::{Authentic, Header, Requests};
use crate::domain::schema::{
    asset_documents, assets, changes, deliveries, exchange_certificates, refunds, reminder_schedule,
};
use crate::domain::status::{self, Cause, Status};
use crate::runtime::consumer::{Cx, Failure, Handler, Incoming, Received};

/// DeferHandler takes `asset.defer`: each request checked and carried out on its own, in turn.
pub struct DeferHandler {
    pub requests: Arc<Requests>,
}

impl Handler for DeferHandler {
    type Message = DeferRequest;
    const MESSAGE_TYPE: &'static str = kinds::ASSET_DEFER;

    /// Requests handled together are carried out one after another in the batch's transaction,
    /// each seeing what the ones before it did, as it would alone: one commit for all of them.
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, DeferRequest>]) -> Result<(), Failure> {
        for Received { message, incoming } in batch {
            self.take(cx, incoming, message)?;
        }
        Ok(())
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        self.requests.answer_invalid(cx, incoming, kinds::ASSET_DEFER, detail)
    }
}

/// Deferrable is an asset as a deferral checks it, locked.
#[derive(Debug, Queryable)]
struct Deferrable {
    id: Uuid,
    order_id: Uuid,
    holder_terminal_id: String,
    status: String,
    expires_at: DateTime<Utc>,
}

/// How a deferral is carried out.
enum Plan {
    /// The asset awaits exchange: its open certificate is given up for a designated delivery.
    FromCertificate { certificate: Uuid },
    /// The asset awaits its designated delivery, not yet attempted: the delivery is moved.
    Move { delivery: Uuid },
}

impl DeferHandler {
    fn take(&self, cx: &mut Cx<'_>, incoming: &Incoming, request: &DeferRequest) -> Result<(), Failure> {
        let header = Header {
            message_type: kinds::ASSET_DEFER,
            request_id: &request.request_id,
            terminal_id: &request.terminal_id,
            sent_at: request.sent_at,
        };
        let Some(Authentic { terminal, content_sha256 }) = self.requests.admit(cx, incoming, &header)? else {
            return Ok(());
        };
        let (asset, plan) = match self.deferrable(cx, request)? {
            Err(refused) => {
                return self.requests.refuse(cx, incoming, &header, Some(&terminal), Some(&content_sha256), refused);
            }
            Ok(planned) => planned,
        };
        self.requests.accept(cx, &header, &content_sha256, asset.id)?;
        let at = request.deliver_at.max(cx.now);
        match plan {
            Plan::Move { delivery } => {
                diesel::update(deliveries::table.find(delivery)).set(deliveries::due_at.eq(at)).execute(cx.conn)?;
            }
            Plan::FromCertificate { certificate } => {
                // The certificate is used up: exchanged, by this request, for a delivery later.
                diesel::update(exchange_certificates::table.find(certificate))
                    .set((
                        exchange_certificates::exchanged_at.eq(cx.now),
                        exchange_certificates::exchange_request_id.eq(&request.request_id),
                    ))
                    .execute(cx.conn)?;
                diesel::update(reminder_schedule::table.find(certificate))
                    .set((
                        reminder_schedule::next_stage.eq(None::<i16>),
                        reminder_schedule::due_at.eq(None::<DateTime<Utc>>),
                    ))
                    .execute(cx.conn)?;
                status::transition(
                    cx.conn,
                    asset.id,
                    Status::AwaitingExchange,
                    Status::AwaitingDesignatedDelivery,
                    Cause::Deferred,
                    Some(&format!("deferred to {at}")),
                    cx.now,
                )?;
                let document: String =
                    asset_documents::table.find(asset.id).select(asset_documents::document).first(cx.conn)?;
                let document: Value = serde_json::from_str(&document)
                    .map_err(|e| Failure::permanent(DeadLetterReason::Unprocessable, e.to_string()))?;
                let mut d = NewDelivery::now(
                    DeliveryKind::Asset,
                    format!("asset:{}", asset.id),
                    &terminal,
                    json!({"order_id": asset.order_id, "forced": false, "asset": document}),
                )
                .answering(request.request_id.clone());
                d.asset_id = Some(asset.id);
                d.order_id = Some(asset.order_id);
                d.due_at = Some(at);
                if delivery::enqueue(cx, &self.requests.deliveries, d)?.is_none() {
                    return Err(Failure::permanent(
                        DeadLetterReason::Unprocessable,
                        format!("asset {} awaited exchange but already has a delivery of itself", asset.id),
                    ));
                }
            }
        }
        diesel::update(assets::table.find(asset.id)).set(assets::designated_at.eq(at)).execute(cx.conn)?;
        tracing::info!(asset_id = %asset.id, %at, request_id = %request.request_id, "delivery deferred");
        self.tell(cx, &terminal, &asset, request, at)
    }

    /// deferrable checks that the holder may move the asset's delivery to the requested time, and
    /// returns the asset (locked) and how to do it.
    fn deferrable(
        &self,
        cx: &mut Cx<'_>,
        request: &DeferRequest,
    ) -> Result<Result<(Deferrable, Plan), Refused>, Failure> {
        macro_rules! refuse {
            ($reason:expr, $($detail:tt)*) => { return Ok(Err(Refused::new($reason, format!($($detail)*)))) };
        }
        let id = request.asset_id;
        let asset: Option<Deferrable> = assets::table
            .find(id)
            .select((assets::id, assets::order_id, assets::holder_terminal_id, assets::status, assets::expires_at))
            .for_update()
            .first(cx.conn)
            .optional()?;
        let Some(asset) = asset else { refuse!(RefusalReason::AssetUnknown, "no asset {id} was issued") };
        if asset.holder_terminal_id != request.terminal_id {
            refuse!(RefusalReason::AssetNotHeld, "asset {id} is not held by terminal {}", request.terminal_id)
        }
        let skew = chrono::Duration::from_std(self.requests.auth.max_clock_skew).expect("a sane skew");
        if request.deliver_at < cx.now - skew {
            refuse!(RefusalReason::InvalidDeliveryTime, "the new delivery time {} is in the past", request.deliver_at)
        }
        if request.deliver_at >= asset.expires_at {
            refuse!(
                RefusalReason::InvalidDeliveryTime,
                "asset {id} expires at {}: a deferred delivery must come before that, not at {}",
                asset.expires_at,
                request.deliver_at
            )
        }
        let refunding: i64 = refunds::table
            .filter(refunds::asset_id.eq(id))
            .filter(refunds::status.eq("requested"))
            .count()
            .get_result(cx.conn)?;
        if refunding > 0 {
            refuse!(RefusalReason::RefundPending, "a refund of asset {id} awaits its partner's answer")
        }
        let changing: i64 = changes::table
            .filter(changes::asset_id.eq(id))
            .filter(changes::step.eq_any(["purchasing", "refunding", "compensating"]))
            .count()
            .get_result(cx.conn)?;
        if changing > 0 {
            refuse!(RefusalReason::RefundPending, "a change of asset {id} is under way")
        }
        let status = Status::parse(&asset.status).expect("the CHECK constraint admits only known statuses");
        let plan = match status {
            Status::AwaitingExchange => {
                let open: Option<Uuid> = exchange_certificates::table
                    .filter(exchange_certificates::asset_id.eq(id))
                    .filter(exchange_certificates::exchanged_at.is_null())
                    .filter(exchange_certificates::revoked_at.is_null())
                    .filter(exchange_certificates::expires_at.gt(cx.now))
                    .select(exchange_certificates::id)
                    .for_update()
                    .first(cx.conn)
                    .optional()?;
                let Some(certificate) = open else {
                    refuse!(RefusalReason::DeferNotAllowed, "asset {id} has no open certificate to defer")
                };
                Plan::FromCertificate { certificate }
            }
            Status::AwaitingDesignatedDelivery => {
                let own: Option<(Uuid, String, i32)> = deliveries::table
                    .filter(deliveries::dedupe_key.eq(format!("asset:{id}")))
                    .select((deliveries::id, deliveries::status, deliveries::attempts))
                    .for_update()
                    .first(cx.conn)
                    .optional()?;
                match own {
                    Some((delivery, status, 0)) if status == "pending" => Plan::Move { delivery },
                    _ => refuse!(RefusalReason::DeferNotAllowed, "asset {id} is already being delivered"),
                }
            }
            other => refuse!(RefusalReason::DeferNotAllowed, "asset {id} is {other}: there is no delivery to defer"),
        };
        Ok(Ok((asset, plan)))
    }

    /// tell confirms the new time to the holder.
    fn tell(
        &self,
        cx: &mut Cx<'_>,
        terminal: &Terminal,
        asset: &Deferrable,
        request: &DeferRequest,
        at: DateTime<Utc>,
    ) -> Result<(), Failure> {
        let notice = Notice {
            code: "delivery_deferred".into(),
            text: format!("asset {} will be delivered at {at}", asset.id),
            order_id: Some(asset.order_id),
            asset_id: Some(asset.id),
            certificate_id: None,
            request_id: Some(request.request_id.clone()),
        };
        let d = NewDelivery::now(
            DeliveryKind::Message,
            format!("defer:{}", request.request_id),
            terminal,
            serde_json::to_value(notice).expect("serializes"),
        )
        .answering(request.request_id.clone());
        delivery::enqueue(cx, &self.requests.deliveries, d)?;
        Ok(())
    }
}
