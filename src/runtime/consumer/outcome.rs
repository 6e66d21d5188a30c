//! The outcome switch: the one place where a handler's outcome becomes a broker action and a
//! database state. Acknowledged, returned to the queue, deferred, or dead-lettered with its
//! evidence; never dropped.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use diesel::prelude::*;
use lapin::ChannelStatus;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use serde_json::{Value, json};

use super::handler::Dispatch;
use super::transaction::claim_inbox;
use super::{Consumer, Cx, Failure, Incoming};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::runtime::broker;
use crate::runtime::db::DbError;
use crate::runtime::dead_letter::{self, NewDeadLetter};
use crate::runtime::metrics;
use crate::runtime::outbox::{self, Outgoing};

/// Action is what happens to a message on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Ack(&'static str),
    Requeue,
}

impl Consumer {
    /// report is the one place an outcome becomes a broker action and a database state: a new
    /// or duplicate message is acknowledged, a permanent failure dead-lettered with its evidence,
    /// a transient one returned to the queue (or dead-lettered one delivery before the broker's
    /// limit), a deferred one published again for later.
    pub(super) async fn report(&self, incoming: &Incoming, result: Result<bool, Failure>, errors: &[Value]) -> Action {
        match result {
            Ok(true) => Action::Ack("acked"),
            Ok(false) => Action::Ack("duplicate"),
            Err(Failure::Permanent { reason, detail }) => {
                self.dead_letter(incoming, reason, detail, errors, None).await
            }
            Err(Failure::Transient(error) | Failure::Unavailable(error)) => {
                // One delivery before the broker's own limit, give up here, where the evidence is.
                if incoming.delivery_count + 2 >= self.plumbing.delivery_limit {
                    let detail = format!("still failing after {} deliveries: {error}", incoming.delivery_count + 1);
                    self.dead_letter(incoming, DeadLetterReason::HandlerFailed, detail, errors, None).await
                } else {
                    tracing::warn!(pool = %self.pool, message_id = %incoming.message_id, error = %error, "transient failure; returning the message to the queue");
                    Action::Requeue
                }
            }
            Err(Failure::Defer { until, why }) => {
                let (pool, incoming2) = (self.pool, incoming.clone());
                let deferred = self
                    .plumbing
                    .db
                    .run(move |conn| {
                        conn.transaction::<_, DbError, _>(|conn| {
                            if !claim_inbox(conn, pool, &incoming2)? {
                                return Ok(());
                            }
                            let mut again = Outgoing {
                                message_id: uuid::Uuid::now_v7(),
                                exchange: incoming2.exchange.clone(),
                                routing_key: incoming2.routing_key.clone(),
                                message_type: incoming2.message_type.clone(),
                                correlation_id: incoming2.correlation_id.clone(),
                                headers: json!({}),
                                payload: incoming2.body.clone(),
                                available_at: Some(until),
                            };
                            again.correlation_id.get_or_insert_with(|| incoming2.message_id.clone());
                            outbox::enqueue(conn, &again)?;
                            Ok(())
                        })
                    })
                    .await;
                match deferred {
                    Ok(()) => {
                        tracing::info!(pool = %self.pool, message_id = %incoming.message_id, %until, why, "deferred");
                        Action::Ack("deferred")
                    }
                    Err(_) => Action::Requeue,
                }
            }
        }
    }

    /// dead_letter records a message's dead letter with its evidence; `answer`, the message's
    /// handler, may answer its sender in the same transaction ([`Dispatch::answer_invalid`]).
    pub(super) async fn dead_letter(
        &self,
        incoming: &Incoming,
        reason: DeadLetterReason,
        detail: String,
        errors: &[Value],
        answer: Option<Arc<dyn Dispatch>>,
    ) -> Action {
        let mut attempts = errors.to_vec();
        if attempts.is_empty() {
            attempts.push(json!({"at": Utc::now(), "error": detail}));
        }
        // A pooled connection that died with a database restart fails its first statement: one
        // more try, on another connection, before the message goes back to the queue.
        let mut recorded =
            self.record_dead_letter(incoming, reason, detail.clone(), attempts.clone(), answer.clone()).await;
        if matches!(&recorded, Err(e) if e.is_connection_lost()) {
            recorded = self.record_dead_letter(incoming, reason, detail, attempts, answer).await;
        }
        match recorded {
            Ok(()) => {
                self.plumbing.outbox_wake.notify_one();
                Action::Ack("dead_lettered")
            }
            // The database is down: the broker keeps the message, and its delivery limit is the
            // last resort (it dead-letters to the same dead-letter queue).
            Err(e) => {
                tracing::error!(pool = %self.pool, error = %e, "cannot record a dead letter; returning the message to the queue");
                Action::Requeue
            }
        }
    }

    /// record_dead_letter commits a message's dead letter with its inbox row.
    async fn record_dead_letter(
        &self,
        incoming: &Incoming,
        reason: DeadLetterReason,
        detail: String,
        attempts: Vec<Value>,
        answer: Option<Arc<dyn Dispatch>>,
    ) -> Result<(), DbError> {
        let (pool, incoming2, app) = (self.pool, incoming.clone(), self.plumbing.clone());
        self.plumbing
            .db
            .run(move |conn| {
                metrics::held(|| {
                    conn.transaction::<_, DbError, _>(|conn| {
                        if !claim_inbox(conn, pool, &incoming2)? {
                            return Ok(());
                        }
                        dead_letter::record(
                            conn,
                            &app.names,
                            NewDeadLetter {
                                pool,
                                source: "message",
                                message_type: incoming2.message_type.clone(),
                                message_id: Some(incoming2.message_id.clone()),
                                exchange: Some(incoming2.exchange.clone()),
                                routing_key: Some(incoming2.routing_key.clone()),
                                payload: incoming2.body.clone(),
                                headers: json!({
                                    "delivery_count": incoming2.delivery_count,
                                    "queue": incoming2.queue,
                                    "received_at": incoming2.first_received_at,
                                    "user_id": incoming2.user_id,
                                }),
                                reason,
                                detail: detail.clone(),
                                attempts: Value::Array(attempts),
                                subject_id: None,
                            },
                        )?;
                        if let Some(handler) = &answer {
                            answer_sender(conn, handler.as_ref(), &incoming2, &detail)?;
                        }
                        Ok(())
                    })
                })
            })
            .await
    }

    /// answer acknowledges a message, or returns it to the queue, and counts the outcome. One whose
    /// channel is gone is not tried: its delivery tag went with the channel, and an attempt would
    /// only wait out its deadline.
    pub(super) async fn answer(
        &self,
        channel: &ChannelStatus,
        delivery: &Delivery,
        incoming: &Incoming,
        action: Action,
        started: Instant,
    ) {
        // Bounded: an acknowledgement on a connection that died meanwhile may never be answered,
        // and the consumer starts again on the next connection only once its messages are settled.
        let result = match action {
            _ if !channel.connected() => Err(anyhow::anyhow!("its channel is gone")),
            Action::Ack(_) => broker::bounded("basic.ack", delivery.acker.ack(BasicAckOptions::default())).await,
            Action::Requeue => {
                let options = BasicNackOptions { requeue: true, ..Default::default() };
                broker::bounded("basic.nack", delivery.acker.nack(options)).await
            }
        };
        // lapin answers false for a delivery tag it had already settled or given up on.
        let result = result.and_then(|settled| {
            if settled { Ok(()) } else { Err(anyhow::anyhow!("its delivery tag was already settled")) }
        });
        if let Err(e) = result {
            // The channel died: the broker redelivers the message, and the inbox makes that harmless.
            tracing::warn!(pool = %self.pool, error = %e, "could not settle the message with the broker");
        }
        let outcome = match action {
            Action::Ack(outcome) => outcome,
            Action::Requeue => "requeued",
        };
        metrics::message_handled(self.pool, &incoming.message_type, outcome, started.elapsed());
    }
}

/// answer_sender lets a message's handler answer its sender, inside the dead letter's transaction
/// but in a savepoint of its own: an answer that fails is rolled back alone, and the dead letter,
/// the operator's record, stays.
fn answer_sender(
    conn: &mut PgConnection,
    handler: &dyn Dispatch,
    incoming: &Incoming,
    detail: &str,
) -> Result<(), DbError> {
    let answered = conn.transaction::<_, Failure, _>(|conn| {
        let (mut extensions, mut outgoing) = (http::Extensions::new(), Vec::new());
        handler.answer_invalid(&mut Cx::new(conn, incoming, &mut extensions, &mut outgoing), incoming, detail)?;
        outbox::enqueue_all(conn, &outgoing)?;
        Ok(())
    });
    if let Err(e) = answered {
        tracing::warn!(message_id = %incoming.message_id, error = %e, "could not answer the sender of a dead letter");
    }
    Ok(())
}
