//! Execution: a batch's messages checked at the door, run together in one transaction when they
//! can be, and each alone, with in-process retries, when they cannot; a database outage holds the
//! message instead of spending its attempts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::prelude::*;
use lapin::ChannelStatus;
use lapin::message::Delivery;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::handler::Dispatch;
use super::outcome::Action;
use super::transaction::{Work, handle_together};
use super::{Consumer, Failure, Incoming};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::runtime::db::DbError;
use crate::runtime::metrics;

/// The longest pause between two health checks of a database that is down.
const DATABASE_CHECK_MAX: Duration = Duration::from_secs(5);

/// How many times in a row a handler may find the database unavailable right after a health check
/// found it up, before the failure is treated as an ordinary transient one (spending attempts).
/// It bounds the wait for a failure that only looks like an outage.
const UNAVAILABLE_WHILE_HEALTHY: u32 = 3;

/// Door is how far a message got through the checks at the door: each is made once.
enum Door {
    /// Not carried out, for this reason.
    Refused(DeadLetterReason, String),
    /// Well formed; its type and schema not checked yet.
    Parsed,
    /// Of a type this queue takes, and valid against its schema.
    Valid,
}

/// DatabaseWait is how a wait for the database ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DatabaseWait {
    /// The first health check passed: the failure was not an outage (or it was already over).
    WasUp,
    /// The database was down and is back.
    WasDown,
    /// Shutdown came first.
    ShuttingDown,
}

impl Consumer {
    /// process_batch handles the messages one handler took together. Those that can be carried
    /// out (well formed, of a known type, valid) run in one transaction, each with its own inbox
    /// row, and are acknowledged once it commits. If any of them fails, the transaction is rolled
    /// back and each is handled again on its own, with its own retries and dead letter.
    pub(super) async fn process_batch(
        &self,
        queue: &str,
        channel: &ChannelStatus,
        batch: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) {
        let started = Instant::now();
        let mut ready = Vec::with_capacity(batch.len());
        for delivery in batch {
            let (incoming, verdict) = Incoming::parse(queue, &self.plumbing.names.internal(), &delivery);
            metrics::message_received(self.pool, &incoming.message_type);
            match (verdict, self.registry.lookup(&incoming.queue, &incoming.message_type)) {
                (Ok(()), Some(handler))
                    if crate::contracts::schema::validate(&incoming.message_type, &incoming.json).is_ok() =>
                {
                    ready.push((delivery, incoming, handler))
                }
                (Ok(()), _) => self.process(channel, delivery, incoming, Door::Parsed, shutdown).await,
                (Err((reason, detail)), _) => {
                    self.process(channel, delivery, incoming, Door::Refused(reason, detail), shutdown).await
                }
            }
        }
        if ready.len() == 1 {
            let (delivery, incoming, _) = ready.pop().expect("one");
            return self.process(channel, delivery, incoming, Door::Valid, shutdown).await;
        }
        if ready.is_empty() {
            return;
        }
        let work: Vec<_> = ready
            .iter()
            .map(|(_, incoming, handler)| (handler.clone(), incoming.clone(), self.span(incoming)))
            .collect();
        match self.run_together(work).await {
            Ok(fresh) => {
                for ((delivery, incoming, _), fresh) in ready.iter().zip(fresh) {
                    let action = Action::Ack(if fresh { "acked" } else { "duplicate" });
                    self.answer(channel, delivery, incoming, action, started).await;
                }
            }
            Err(e) => {
                tracing::info!(pool = %self.pool, messages = ready.len(), error = %e, "a batch failed; handling its messages one by one");
                for (delivery, incoming, _) in ready {
                    self.process(channel, delivery, incoming, Door::Valid, shutdown).await;
                }
            }
        }
    }

    /// run_together runs several messages' handlers in one transaction; for each, whether it was
    /// new (false: its inbox row was there already).
    async fn run_together(&self, work: Vec<Work>) -> Result<Vec<bool>, Failure> {
        let (handoff, pool) = (self.plumbing.handoff.clone(), self.pool);
        let result = self.plumbing.db.run(move |conn| handle_together(conn, &handoff, pool, &work)).await;
        if let Ok(fresh) = &result {
            metrics::batch_committed(self.pool, fresh.len());
            self.plumbing.committed();
        }
        result
    }

    /// span is a message's tracing span: every log line of the message carries its ids. For
    /// internal messages the correlation id is the order's; for terminal requests the request id
    /// is in the body.
    fn span(&self, incoming: &Incoming) -> tracing::Span {
        tracing::info_span!(
            "message",
            pool = %self.pool,
            r#type = %incoming.message_type,
            message_id = %incoming.message_id,
            correlation_id = incoming.correlation_id.as_deref().unwrap_or(""),
            request_id = incoming.json.get("request_id").and_then(serde_json::Value::as_str).unwrap_or(""),
        )
    }

    /// process carries out one message on its own and answers the broker.
    async fn process(
        &self,
        channel: &ChannelStatus,
        delivery: Delivery,
        incoming: Incoming,
        door: Door,
        shutdown: &CancellationToken,
    ) {
        let started = Instant::now();
        let span = self.span(&incoming);
        let action = tracing::Instrument::instrument(self.execute(incoming.clone(), door, shutdown), span).await;
        self.answer(channel, &delivery, &incoming, action, started).await;
    }

    /// execute runs the handler with in-process retries and decides the message's fate.
    ///
    /// A database that cannot be reached is not the message's fault: the message is held (with
    /// the pool's permit, so consumption pauses once `concurrency` are held and `prefetch` bounds
    /// the rest) until a health check finds the database back, and then handled again without
    /// spending a retry or a delivery. Only shutdown returns a held message to the queue.
    async fn execute(&self, incoming: Incoming, door: Door, shutdown: &CancellationToken) -> Action {
        if let Door::Refused(reason, detail) = door {
            return self.report(&incoming, Err(Failure::Permanent { reason, detail }), &[]).await;
        }
        let handler = match self.registry.lookup(&incoming.queue, &incoming.message_type) {
            Some(h) => h,
            None => {
                let (reason, detail) = if self.registry.is_unrouted(&incoming.queue) {
                    (
                        DeadLetterReason::Unroutable,
                        format!(
                            "no queue takes routing key {:?} (type {:?})",
                            incoming.routing_key, incoming.message_type
                        ),
                    )
                } else {
                    (
                        DeadLetterReason::UnknownMessageType,
                        format!("{} does not take messages of type {:?}", incoming.queue, incoming.message_type),
                    )
                };
                return self.report(&incoming, Err(Failure::Permanent { reason, detail }), &[]).await;
            }
        };
        if let Door::Parsed = door
            && let Err(detail) = crate::contracts::schema::validate(&incoming.message_type, &incoming.json)
        {
            // Dead-lettered for the operator, and answered where the handler knows whom to tell.
            return self.dead_letter(&incoming, DeadLetterReason::SchemaViolation, detail, &[], Some(handler)).await;
        }

        let mut errors = Vec::new();
        let mut delays = self.retries.iter();
        let mut unavailable_while_healthy = 0;
        loop {
            let result = match self.run_handler(handler.clone(), incoming.clone()).await {
                Err(Failure::Unavailable(e)) => match self.wait_for_database(&e, shutdown).await {
                    DatabaseWait::ShuttingDown => return Action::Requeue,
                    DatabaseWait::WasDown => continue,
                    DatabaseWait::WasUp if unavailable_while_healthy < UNAVAILABLE_WHILE_HEALTHY => {
                        unavailable_while_healthy += 1;
                        continue;
                    }
                    DatabaseWait::WasUp => Err(Failure::Transient(e)),
                },
                other => other,
            };
            match result {
                Err(Failure::Transient(e)) => {
                    errors.push(json!({"at": Utc::now(), "error": e}));
                    match delays.next() {
                        // Stopping: the message goes back to the queue rather than keep the
                        // shutdown waiting for its retries.
                        Some(delay) => tokio::select! {
                            _ = shutdown.cancelled() => return Action::Requeue,
                            _ = tokio::time::sleep(*delay) => {}
                        },
                        None => {
                            return self.report(&incoming, Err(Failure::Transient(e)), &errors).await;
                        }
                    }
                }
                other => return self.report(&incoming, other, &errors).await,
            }
        }
    }

    /// wait_for_database holds the calling message until the database answers a health check,
    /// checking with a backoff from 100 ms doubling to [`DATABASE_CHECK_MAX`].
    async fn wait_for_database(&self, error: &str, shutdown: &CancellationToken) -> DatabaseWait {
        let mut backoff = Duration::from_millis(100);
        let mut checks = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return DatabaseWait::ShuttingDown,
                _ = tokio::time::sleep(backoff) => {}
            }
            let healthy = tokio::select! {
                _ = shutdown.cancelled() => return DatabaseWait::ShuttingDown,
                up = self.plumbing.db.run(|conn| crate::runtime::db::prepared("SELECT 1").execute(conn).map_err(DbError::from)) => up.is_ok(),
            };
            checks += 1;
            if healthy {
                if checks > 1 {
                    tracing::info!(pool = %self.pool, "the database is back; handling the held message");
                    return DatabaseWait::WasDown;
                }
                return DatabaseWait::WasUp;
            }
            if checks == 1 {
                tracing::warn!(pool = %self.pool, error, "the database is unavailable; holding the message until it is back");
            }
            backoff = (backoff * 2).min(DATABASE_CHECK_MAX);
        }
    }

    /// run_handler carries out one message: a batch of one, in the message's span.
    async fn run_handler(&self, handler: Arc<dyn Dispatch>, incoming: Incoming) -> Result<bool, Failure> {
        let fresh = self.run_together(vec![(handler, incoming, tracing::Span::current())]).await?;
        Ok(fresh[0])
    }
}
