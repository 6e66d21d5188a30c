//! The pool runtime: one handler trait, one registry, one consumer loop, and one function that
//! turns a handler's outcome into a broker action and a database state ([`settle`]).
//!
//! A message is acknowledged only after its effect committed. Its effect, the inbox row that marks
//! it processed and the messages it causes (outbox) commit in one transaction, so a redelivery
//! finds the inbox row and has no second effect.

pub mod definition;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use futures::{FutureExt, StreamExt};
use lapin::ChannelStatus;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::broker::{self, Broker, Pool};
use crate::db::{DbError, schema::inbox};
use crate::dead_letter::{self, NewDeadLetter, Reason};
use crate::outbox::{self, Outgoing};
use crate::telemetry;

/// The header that carries a replayed message's original receipt time.
pub const REPLAY_RECEIVED_AT: &str = "x-assetflow-received-at";

/// The largest message body a pool accepts; anything larger is dead-lettered as malformed.
pub const MAX_BODY: usize = 256 * 1024;

/// The longest pause between two health checks of a database that is down.
const DATABASE_CHECK_MAX: Duration = Duration::from_secs(5);

/// How many times in a row a handler may find the database unavailable right after a health check
/// found it up, before the failure is treated as an ordinary transient one (spending attempts).
/// It bounds the wait for a failure that only looks like an outage.
const UNAVAILABLE_WHILE_HEALTHY: u32 = 3;

/// Incoming is a consumed message, as the handlers see it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub queue: String,
    /// The AMQP message id, or the SHA-256 of the body when the publisher set none.
    pub message_id: String,
    pub message_type: String,
    pub exchange: String,
    pub routing_key: String,
    pub correlation_id: Option<String>,
    pub body: Vec<u8>,
    pub json: Value,
    /// Deliveries of this message before this one (the quorum queue's `x-delivery-count`).
    pub delivery_count: u32,
    pub received_at: DateTime<Utc>,
    /// When the message first reached assetflow: `received_at`, or for a replayed dead letter
    /// the time the original arrived. Freshness windows are judged against it.
    pub first_received_at: DateTime<Utc>,
}

impl Incoming {
    /// Incoming::parse decodes a message body into JSON, or says why it is malformed.
    fn parse(queue: &str, internal_exchange: &str, delivery: &Delivery) -> (Incoming, Result<(), (Reason, String)>) {
        let props = &delivery.properties;
        let body = delivery.data.clone();
        let message_id = props
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .filter(|id| !id.is_empty() && id.len() <= 128)
            .unwrap_or_else(|| crate::crypto::sha256_hex(&body));
        let mut incoming = Incoming {
            queue: queue.to_string(),
            message_id,
            message_type: props.kind().as_ref().map(|k| k.to_string()).unwrap_or_default(),
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            correlation_id: props.correlation_id().as_ref().map(|c| c.to_string()),
            body,
            json: Value::Null,
            delivery_count: broker::header_u32(props, "x-delivery-count").unwrap_or(0),
            received_at: Utc::now(),
            first_received_at: Utc::now(),
        };
        // Only assetflow publishes on the internal exchange, so only there is the header trusted.
        if incoming.exchange == internal_exchange
            && let Some(first) = broker::header_str(props, REPLAY_RECEIVED_AT)
            && let Ok(first) = DateTime::parse_from_rfc3339(&first)
        {
            incoming.first_received_at = first.with_timezone(&Utc);
        }
        // The same check the fuzz targets exercise (`fuzz/`).
        let verdict = match crate::messages::parse_body(&incoming.body) {
            Ok((message_type, json)) => {
                incoming.message_type = message_type;
                incoming.json = json;
                Ok(())
            }
            Err(detail) => Err((Reason::Malformed, detail)),
        };
        (incoming, verdict)
    }
}

impl Incoming {
    /// Incoming::decode reads the message as `T`. The pool checked it against its type's schema
    /// before any handler saw it, so this fails only where the schema admits what `T` does not: a
    /// schema violation all the same.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, Failure> {
        T::deserialize(&self.json).map_err(|e| Failure::permanent(Reason::SchemaViolation, e.to_string()))
    }
}

/// Failure is how a handler says it did not complete, classified at the boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    /// Trying again later can succeed (a dropped connection, a serialization failure).
    #[error("transient: {0}")]
    Transient(String),
    /// It will never succeed: dead-letter it with the reason.
    #[error("permanent ({}): {detail}", reason.as_str())]
    Permanent { reason: Reason, detail: String },
    /// Not yet: publish it again at `until`, without spending an attempt.
    #[error("deferred until {until}: {why}")]
    Defer { until: DateTime<Utc>, why: String },
    /// The database cannot be reached (refused, closed, restarting): the pool holds the message
    /// and waits for the database instead of spending a delivery attempt.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl Failure {
    pub fn permanent(reason: Reason, detail: impl Into<String>) -> Failure {
        Failure::Permanent { reason, detail: detail.into() }
    }
}

impl From<diesel::result::Error> for Failure {
    fn from(e: diesel::result::Error) -> Failure {
        // A unique violation means a concurrent copy of this work committed first: trying again
        // re-reads the state and finds it done. One that never heals ends at the delivery limit.
        let unique =
            matches!(e, diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _));
        if crate::db::is_connection_lost(&e) {
            Failure::Unavailable(e.to_string())
        } else if unique || crate::db::is_transient(&e) {
            Failure::Transient(e.to_string())
        } else {
            Failure::permanent(Reason::Unprocessable, format!("database: {e}"))
        }
    }
}

impl From<DbError> for Failure {
    fn from(e: DbError) -> Failure {
        match e {
            DbError::Unavailable(m) => Failure::Unavailable(m),
            DbError::Query(e) => e.into(),
        }
    }
}

/// Cx is what a handler works with: a connection inside the message's transaction, the
/// application, and the time the message was received.
pub struct Cx<'a> {
    pub conn: &'a mut PgConnection,
    pub app: &'a App,
    pub now: DateTime<Utc>,
    /// See [`Incoming::first_received_at`].
    pub first_received_at: DateTime<Utc>,
    /// What the transaction has read of the catalogue; see [`Cx::product`].
    pub lookups: &'a mut Lookups,
    /// The messages the transaction causes, written to the outbox together at its end.
    pub outgoing: &'a mut Vec<Outgoing>,
}

/// Lookups are the products and terminals a transaction has read, shared by the messages it
/// handles together. Handlers never change either (only operators do, through `assetflow admin`).
#[derive(Debug, Default)]
pub struct Lookups {
    products: HashMap<String, Option<crate::catalogue::Product>>,
    terminals: HashMap<String, Option<crate::requests::Terminal>>,
}

/// remembered is what `seen` holds for `id`, or what `load` reads, kept for the next time.
fn remembered<T: Clone>(
    seen: &mut HashMap<String, Option<T>>,
    id: &str,
    load: impl FnOnce() -> QueryResult<Option<T>>,
) -> QueryResult<Option<T>> {
    if let Some(known) = seen.get(id) {
        return Ok(known.clone());
    }
    let loaded = load()?;
    seen.insert(id.to_string(), loaded.clone());
    Ok(loaded)
}

impl Cx<'_> {
    /// Cx::product reads a product once per transaction: messages handled together see the row
    /// as the first of them read it, as if it had not changed between them.
    pub fn product(&mut self, id: &str) -> QueryResult<Option<crate::catalogue::Product>> {
        remembered(&mut self.lookups.products, id, || crate::catalogue::load_product(self.conn, id))
    }

    /// Cx::terminal reads a terminal once per transaction, as [`Cx::product`] does a product.
    pub fn terminal(&mut self, id: &str) -> QueryResult<Option<crate::requests::Terminal>> {
        remembered(&mut self.lookups.terminals, id, || crate::requests::load_terminal(self.conn, id))
    }

    /// Cx::read_terminals reads, in one statement, those of `ids` this transaction has not read
    /// yet, so that [`Cx::terminal`] finds each of them (or that it does not exist) without another.
    pub fn read_terminals<'i>(&mut self, ids: impl IntoIterator<Item = &'i str>) -> QueryResult<()> {
        let mut missing: Vec<&str> = ids.into_iter().filter(|id| !self.lookups.terminals.contains_key(*id)).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let mut found: HashMap<String, crate::requests::Terminal> =
            crate::requests::load_terminals(self.conn, &missing)?.into_iter().map(|t| (t.id.clone(), t)).collect();
        for id in missing {
            self.lookups.terminals.insert(id.to_string(), found.remove(id));
        }
        Ok(())
    }

    /// Cx::publish sends a message once this transaction commits. It is gathered with the
    /// transaction's other messages and written to the outbox with them, in one statement, before
    /// the commit.
    pub fn publish(&mut self, message: Outgoing) {
        self.outgoing.push(message);
    }
}

/// Handler handles one message type. It runs inside a transaction on the blocking pool, and
/// everything it writes commits with the record that the message was processed.
pub trait Handler: Send + Sync + 'static {
    /// Handler::message_type is the `type` this handler takes.
    fn message_type(&self) -> &'static str;

    /// Handler::handle carries out the message. A refusal is an Ok: the request was answered.
    fn handle(&self, cx: &mut Cx<'_>, message: &Incoming) -> Result<(), Failure>;

    /// Handler::set_based says whether [`Handler::handle_many`] does better than `handle` in turn.
    /// Only then does the pool hand it the messages of a batch together; otherwise each is handled
    /// in its own span, with its own receipt times.
    fn set_based(&self) -> bool {
        false
    }

    /// Handler::handle_many carries out several messages of this type, new to this pool, in the
    /// caller's transaction, in turn by default. A set-based handler overrides it to read and
    /// write them all in a few statements, as of `cx.now` (the first message's receipt); it must
    /// have the effect of `handle` on each, and fail as a whole if it cannot (each message is then
    /// handled alone). [`together_unless_repeated`] does the part every such handler shares.
    fn handle_many(&self, cx: &mut Cx<'_>, messages: &[&Incoming]) -> Result<(), Failure> {
        messages.iter().try_for_each(|message| {
            (cx.now, cx.first_received_at) = (message.received_at, message.first_received_at);
            self.handle(cx, message)
        })
    }
}

/// together_unless_repeated is a set-based handler's [`Handler::handle_many`]: it decodes the
/// messages and hands them to `take` all at once, unless two of them name the same thing (`key`:
/// the same delivery, the same settlement). Then they are taken one at a time, each as of its own
/// receipt, so that the second finds what the first did, as it would alone.
pub fn together_unless_repeated<T: serde::de::DeserializeOwned, K: Eq + std::hash::Hash>(
    cx: &mut Cx<'_>,
    messages: &[&Incoming],
    key: impl Fn(&T) -> K,
    mut take: impl FnMut(&mut Cx<'_>, &[T]) -> Result<(), Failure>,
) -> Result<(), Failure> {
    together_unless_repeated_with(cx, messages, |d| [key(d)], |cx, _, decoded| take(cx, decoded))
}

/// together_unless_repeated_with is [`together_unless_repeated`] for a `take` that needs the
/// messages as received too (a terminal request's signature covers its JSON as sent): it gets
/// them beside their decoded bodies, in the same order. A message may name several things
/// (`keys`: its request id and the certificate it presents); two that share any are taken one at a
/// time.
pub fn together_unless_repeated_with<T, K, Ks>(
    cx: &mut Cx<'_>,
    messages: &[&Incoming],
    keys: impl Fn(&T) -> Ks,
    mut take: impl FnMut(&mut Cx<'_>, &[&Incoming], &[T]) -> Result<(), Failure>,
) -> Result<(), Failure>
where
    T: serde::de::DeserializeOwned,
    K: Eq + std::hash::Hash,
    Ks: IntoIterator<Item = K>,
{
    let decoded = messages.iter().map(|message| message.decode()).collect::<Result<Vec<T>, _>>()?;
    let mut seen = std::collections::HashSet::with_capacity(decoded.len());
    if decoded.iter().flat_map(&keys).all(|k| seen.insert(k)) {
        return take(cx, messages, &decoded);
    }
    decoded.iter().zip(messages).try_for_each(|(one, message)| {
        (cx.now, cx.first_received_at) = (message.received_at, message.first_received_at);
        take(cx, std::slice::from_ref(message), std::slice::from_ref(one))
    })
}

/// Registry maps each queue's message types to their handlers.
#[derive(Default)]
pub struct Registry {
    handlers: HashMap<String, HashMap<&'static str, Arc<dyn Handler>>>,
}

impl Registry {
    /// Registry::register adds a handler for a queue; a second handler for the same type is a
    /// programming error that stops the start-up.
    pub fn register(&mut self, queue: &str, handler: Arc<dyn Handler>) -> anyhow::Result<()> {
        let by_type = self.handlers.entry(queue.to_string()).or_default();
        let message_type = handler.message_type();
        anyhow::ensure!(by_type.insert(message_type, handler).is_none(), "two handlers for {message_type} on {queue}");
        Ok(())
    }

    /// Registry::queue declares a queue whose every message is dead-lettered (the unrouted queue).
    pub fn queue(&mut self, queue: &str) {
        self.handlers.entry(queue.to_string()).or_default();
    }

    fn lookup(&self, queue: &str, message_type: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(queue)?.get(message_type).cloned()
    }

    pub fn handles(&self, queue: &str) -> bool {
        self.handlers.contains_key(queue)
    }
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

/// Action is what happens to a message on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Ack(&'static str),
    Requeue,
}

/// PoolRunner consumes a pool's queues.
pub struct PoolRunner {
    pub pool: Pool,
    pub queues: Vec<String>,
    pub concurrency: usize,
    pub prefetch: u16,
    /// The most messages handled in one transaction.
    pub batch: usize,
    /// How long a batch waits for company when messages arrive closer together than this.
    pub linger: Duration,
    pub retries: Vec<Duration>,
    pub app: Arc<App>,
    pub registry: Arc<Registry>,
    pub broker: Broker,
}

impl PoolRunner {
    /// PoolRunner::run consumes until shutdown, then finishes the messages in hand.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let tracker = TaskTracker::new();
        // One limit for the whole pool, whatever the number of queues it reads.
        let permits = Arc::new(Semaphore::new(this.concurrency));
        for queue in this.queues.clone() {
            let (this, shutdown, permits) = (this.clone(), shutdown.clone(), permits.clone());
            tracker.spawn(async move { this.consume(queue, permits, shutdown).await });
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn consume(self: Arc<Self>, queue: String, permits: Arc<Semaphore>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let Some(conn) = self.broker.connection().await else {
                return;
            };
            let in_flight = TaskTracker::new();
            let mut subscribed = false;
            let result = self.consume_on(&conn, &queue, &permits, &in_flight, &shutdown, &mut subscribed).await;
            if subscribed {
                self.app.progress.consumer_stopped(self.pool);
            }
            if let Err(e) = result {
                tracing::warn!(pool = %self.pool, queue = %queue, error = %e, "consumer stopped; starting again");
            }
            // Finish what is in hand before a new channel takes over: its acks go to the old one.
            in_flight.close();
            in_flight.wait().await;
            if !shutdown.is_cancelled() {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }

    async fn consume_on(
        self: &Arc<Self>,
        conn: &lapin::Connection,
        queue: &str,
        permits: &Arc<Semaphore>,
        in_flight: &TaskTracker,
        shutdown: &CancellationToken,
        subscribed: &mut bool,
    ) -> anyhow::Result<()> {
        let channel = broker::bounded("channel.open", conn.create_channel()).await?;
        broker::bounded("basic.qos", channel.basic_qos(self.prefetch, BasicQosOptions::default())).await?;
        let tag = format!("assetflow-{}-{}", self.pool, uuid::Uuid::new_v4().simple());
        let options = BasicConsumeOptions::default();
        let mut consumer = broker::bounded(
            "basic.consume",
            channel.basic_consume(queue.into(), tag.as_str().into(), options, FieldTable::default()),
        )
        .await?;
        self.app.progress.consumer_started(self.pool);
        *subscribed = true;
        tracing::info!(pool = %self.pool, queue, "consuming");
        let mut arrivals = Arrivals::default();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Stop taking new messages; the ones already prefetched return to the queue
                    // when the channel closes.
                    let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
                    let _ = broker::bounded("basic.cancel", cancel).await;
                    return Ok(());
                }
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            };
            let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
            // What arrived while a handler was awaited goes with this message: under load the
            // batches grow by themselves. Under a steady load they do not: each message comes
            // alone, and pays for a transaction and a commit of its own. So when messages are
            // arriving fast enough that several more are due within `linger`, the batch waits up
            // to `linger` for them; at a light load nothing waits for company.
            // This message's gap counts first: one after a quiet spell does not wait.
            let arrived = tokio::time::Instant::now();
            arrivals.arrived(arrived);
            let busy = arrivals.expect_company(self.linger);
            let until = arrived + self.linger; // only waited for when busy
            let mut batch = vec![delivery];
            let mut stopped = None;
            while batch.len() < self.batch && stopped.is_none() {
                let next = if busy {
                    tokio::time::timeout_at(until, consumer.next()).await.ok()
                } else {
                    consumer.next().now_or_never()
                };
                match next {
                    Some(Some(Ok(delivery))) => {
                        arrivals.arrived(tokio::time::Instant::now());
                        batch.push(delivery)
                    }
                    Some(Some(Err(e))) => stopped = Some(Err(e.into())),
                    Some(None) => stopped = Some(Ok(())),
                    None => break,
                }
            }
            let this = self.clone();
            let queue = queue.to_string();
            let shutdown = shutdown.clone();
            let status = channel.status().clone();
            in_flight.spawn(async move {
                this.process_batch(&queue, &status, batch, &shutdown).await;
                drop(permit);
            });
            if let Some(stopped) = stopped {
                return stopped;
            }
        }
    }

    /// process_batch handles the messages one handler took together. Those that can be carried
    /// out (well formed, of a known type, valid) run in one transaction, each with its own inbox
    /// row, and are acknowledged once it commits. If any of them fails, the transaction is rolled
    /// back and each is handled again on its own, with its own retries and dead letter.
    async fn process_batch(
        &self,
        queue: &str,
        channel: &ChannelStatus,
        batch: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) {
        let started = Instant::now();
        let mut ready = Vec::with_capacity(batch.len());
        for delivery in batch {
            let (incoming, verdict) = Incoming::parse(queue, &self.app.names.internal(), &delivery);
            telemetry::message_received(self.pool.as_str(), &incoming.message_type);
            match (&verdict, self.registry.lookup(&incoming.queue, &incoming.message_type)) {
                (Ok(()), Some(handler))
                    if crate::messages::schema::validate(&incoming.message_type, &incoming.json).is_ok() =>
                {
                    ready.push((delivery, incoming, handler))
                }
                _ => self.process(channel, delivery, incoming, verdict, shutdown).await,
            }
        }
        if ready.len() == 1 {
            let (delivery, incoming, _) = ready.pop().expect("one");
            return self.process(channel, delivery, incoming, Ok(()), shutdown).await;
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
                    self.process(channel, delivery, incoming, Ok(()), shutdown).await;
                }
            }
        }
    }

    /// run_together runs several messages' handlers in one transaction; for each, whether it was
    /// new (false: its inbox row was there already).
    async fn run_together(&self, work: Vec<Work>) -> Result<Vec<bool>, Failure> {
        let app = self.app.clone();
        let pool = self.pool;
        let result = self.app.db.run(move |conn| handle_together(conn, &app, pool, &work)).await;
        if let Ok(fresh) = &result {
            telemetry::batch_committed(self.pool.as_str(), fresh.len());
            // Handed off, the rows are leased: a relay woken now would find none of them.
            if self.app.handoff.lease().is_none() {
                self.app.outbox_wake.notify_one();
            }
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
        verdict: Result<(), (Reason, String)>,
        shutdown: &CancellationToken,
    ) {
        let started = Instant::now();
        let span = self.span(&incoming);
        let action = tracing::Instrument::instrument(self.execute(incoming.clone(), verdict, shutdown), span).await;
        self.answer(channel, &delivery, &incoming, action, started).await;
    }

    /// answer acknowledges a message, or returns it to the queue, and counts the outcome. One whose
    /// channel is gone is not tried: its delivery tag went with the channel, and an attempt would
    /// only wait out its deadline.
    async fn answer(
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
        if let Err(e) = result {
            // The channel died: the broker redelivers the message, and the inbox makes that harmless.
            tracing::warn!(pool = %self.pool, error = %e, "could not settle the message with the broker");
        }
        let outcome = match action {
            Action::Ack(outcome) => outcome,
            Action::Requeue => "requeued",
        };
        telemetry::message_handled(self.pool.as_str(), &incoming.message_type, outcome, started.elapsed());
    }

    /// execute runs the handler with in-process retries and decides the message's fate.
    ///
    /// A database that cannot be reached is not the message's fault: the message is held (with
    /// the pool's permit, so consumption pauses once `concurrency` are held and `prefetch` bounds
    /// the rest) until a health check finds the database back, and then handled again without
    /// spending a retry or a delivery. Only shutdown returns a held message to the queue.
    async fn execute(
        &self,
        incoming: Incoming,
        verdict: Result<(), (Reason, String)>,
        shutdown: &CancellationToken,
    ) -> Action {
        if let Err((reason, detail)) = verdict {
            return self.settle(&incoming, Err(Failure::Permanent { reason, detail }), &[]).await;
        }
        let handler = match self.registry.lookup(&incoming.queue, &incoming.message_type) {
            Some(h) => h,
            None => {
                let (reason, detail) = if incoming.queue.ends_with(".unrouted") {
                    (
                        Reason::Unroutable,
                        format!(
                            "no queue takes routing key {:?} (type {:?})",
                            incoming.routing_key, incoming.message_type
                        ),
                    )
                } else {
                    (
                        Reason::UnknownMessageType,
                        format!("{} does not take messages of type {:?}", incoming.queue, incoming.message_type),
                    )
                };
                return self.settle(&incoming, Err(Failure::Permanent { reason, detail }), &[]).await;
            }
        };
        if let Err(detail) = crate::messages::schema::validate(&incoming.message_type, &incoming.json) {
            return self.settle(&incoming, Err(Failure::permanent(Reason::SchemaViolation, detail)), &[]).await;
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
                            return self.settle(&incoming, Err(Failure::Transient(e)), &errors).await;
                        }
                    }
                }
                other => return self.settle(&incoming, other, &errors).await,
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
                up = self.app.db.run(|conn| diesel::sql_query("SELECT 1").execute(conn).map_err(DbError::from)) => up.is_ok(),
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
    async fn run_handler(&self, handler: Arc<dyn Handler>, incoming: Incoming) -> Result<bool, Failure> {
        let fresh = self.run_together(vec![(handler, incoming, tracing::Span::current())]).await?;
        Ok(fresh[0])
    }

    /// settle is the one place an outcome becomes a broker action and a database state.
    async fn settle(&self, incoming: &Incoming, result: Result<bool, Failure>, errors: &[Value]) -> Action {
        match result {
            Ok(true) => Action::Ack("acked"),
            Ok(false) => Action::Ack("duplicate"),
            Err(Failure::Permanent { reason, detail }) => self.dead_letter(incoming, reason, detail, errors).await,
            Err(Failure::Transient(error) | Failure::Unavailable(error)) => {
                // One delivery before the broker's own limit, give up here, where the evidence is.
                if incoming.delivery_count + 2 >= self.app.config.amqp.delivery_limit {
                    let detail = format!("still failing after {} deliveries: {error}", incoming.delivery_count + 1);
                    self.dead_letter(incoming, Reason::HandlerFailed, detail, errors).await
                } else {
                    tracing::warn!(pool = %self.pool, message_id = %incoming.message_id, error = %error, "transient failure; returning the message to the queue");
                    Action::Requeue
                }
            }
            Err(Failure::Defer { until, why }) => {
                let (pool, incoming2) = (self.pool, incoming.clone());
                let deferred = self
                    .app
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

    async fn dead_letter(&self, incoming: &Incoming, reason: Reason, detail: String, errors: &[Value]) -> Action {
        let mut attempts = errors.to_vec();
        if attempts.is_empty() {
            attempts.push(json!({"at": Utc::now(), "error": detail}));
        }
        // A pooled connection that died with a database restart fails its first statement: one
        // more try, on another connection, before the message goes back to the queue.
        let mut recorded = self.record_dead_letter(incoming, reason, detail.clone(), attempts.clone()).await;
        if matches!(&recorded, Err(e) if e.is_connection_lost()) {
            recorded = self.record_dead_letter(incoming, reason, detail, attempts).await;
        }
        match recorded {
            Ok(()) => {
                self.app.outbox_wake.notify_one();
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
        reason: Reason,
        detail: String,
        attempts: Vec<Value>,
    ) -> Result<(), DbError> {
        let (pool, incoming2, app) = (self.pool, incoming.clone(), self.app.clone());
        self.app
            .db
            .run(move |conn| {
                telemetry::held(|| {
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
                                }),
                                reason,
                                detail,
                                attempts: Value::Array(attempts),
                                subject_id: None,
                            },
                        )?;
                        Ok(())
                    })
                })
            })
            .await
    }
}

/// Arrivals follows how fast a consumer's messages are coming: a moving average of the time
/// between two of them. A handler lingers for company only when it is due: when the recent rate
/// says at least [`Arrivals::COMPANY`] more messages will come within the linger. At a light
/// load a message is not delayed by the one that happened to come just before it.
#[derive(Debug)]
struct Arrivals {
    last: Option<tokio::time::Instant>,
    gap: Duration,
}

impl Default for Arrivals {
    fn default() -> Arrivals {
        Arrivals { last: None, gap: Self::QUIET }
    }
}

impl Arrivals {
    /// More messages expected within the linger, for a handler to wait for them.
    const COMPANY: u32 = 4;
    /// The gap assumed before the first message and after a quiet spell.
    const QUIET: Duration = Duration::from_secs(1);

    /// Arrivals::arrived counts a message that arrived at `at`; each gap weighs an eighth.
    fn arrived(&mut self, at: tokio::time::Instant) {
        if let Some(last) = self.last.replace(at) {
            let gap = at.saturating_duration_since(last).min(Self::QUIET);
            self.gap = (self.gap * 7 + gap) / 8;
        }
    }

    /// Arrivals::expect_company says whether, at the recent rate, [`Arrivals::COMPANY`] more
    /// messages will arrive within `linger`.
    fn expect_company(&self, linger: Duration) -> bool {
        !linger.is_zero() && self.gap * Self::COMPANY <= linger
    }
}

/// Work is a message to carry out, with its handler and the span its log lines go to.
pub type Work = (Arc<dyn Handler>, Incoming, tracing::Span);

/// handle_together carries out several messages in one transaction, each unless its inbox row
/// says this pool already has: for each, true if it was new. It all commits or, if any handler
/// fails, none of it does, and the failure is returned.
pub fn handle_together(conn: &mut PgConnection, app: &App, pool: Pool, work: &[Work]) -> Result<Vec<bool>, Failure> {
    let lease = app.handoff.lease();
    let (fresh, outgoing) = telemetry::held(|| {
        conn.transaction(|conn| {
            let incoming: Vec<&Incoming> = work.iter().map(|(_, incoming, _)| incoming).collect();
            let fresh = claim_inbox_many(conn, pool, &incoming)?;
            let (mut lookups, mut outgoing) = (Lookups::default(), Vec::new());
            let new: Vec<&Work> = work.iter().zip(&fresh).filter(|(_, fresh)| **fresh).map(|(w, _)| w).collect();
            for run in by_handler(&new) {
                let (handler, first, span) = run[0];
                // One message's log lines carry its ids; several carry their count.
                let span =
                    if run.len() == 1 { span.clone() } else { tracing::info_span!("messages", %pool, n = run.len()) };
                let _entered = span.enter();
                let mut cx = Cx {
                    conn,
                    app,
                    now: first.received_at,
                    first_received_at: first.first_received_at,
                    lookups: &mut lookups,
                    outgoing: &mut outgoing,
                };
                let messages: Vec<&Incoming> = run.iter().map(|(_, incoming, _)| incoming).collect();
                handle_caught(handler.as_ref(), &mut cx, &messages)?;
            }
            match lease {
                Some(lease) => outbox::enqueue_leased(conn, &outgoing, lease)?,
                None => outbox::enqueue_all(conn, &outgoing)?,
            }
            Ok::<_, Failure>((fresh, outgoing))
        })
    })?;
    // Committed: this process publishes them now, rather than a relay in its next round.
    if lease.is_some() {
        app.handoff.give(outgoing.into_iter().filter(|m| m.available_at.is_none()).collect());
    }
    Ok(fresh)
}

/// by_handler groups a batch's messages for their handlers: a set-based handler's messages go to it
/// together, where it first appears, and every other message goes alone, in its place. Messages
/// handled together in one transaction were in the queues together, so none was caused by
/// another, and none needs another's effect first.
fn by_handler<'w>(work: &[&'w Work]) -> Vec<Vec<&'w Work>> {
    let mut groups: Vec<Vec<&Work>> = Vec::new();
    for w in work {
        let handler = &w.0;
        match handler.set_based().then(|| groups.iter_mut().find(|g| Arc::ptr_eq(&g[0].0, handler))).flatten() {
            Some(group) => group.push(w),
            None => groups.push(vec![w]),
        }
    }
    groups
}

/// handle_caught runs a handler, turning a panic into a dead letter: a bug met by some input must
/// not take the worker, or the other messages of its batch, down with it. The transaction is rolled
/// back like that of any failure, and the message is kept in `dead_letters` for a replay once the
/// bug is fixed.
fn handle_caught(handler: &dyn Handler, cx: &mut Cx<'_>, messages: &[&Incoming]) -> Result<(), Failure> {
    let handled = || match messages {
        [one] => handler.handle(cx, one),
        many => handler.handle_many(cx, many),
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(handled)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        tracing::error!(panic = %what, "the handler panicked");
        Err(Failure::permanent(Reason::HandlerFailed, format!("the handler panicked: {what}")))
    })
}

/// claim_inbox_many is [`claim_inbox`] for several messages in one statement: for each, whether
/// it is new. A message id repeated in the batch is new only the first time.
fn claim_inbox_many(conn: &mut PgConnection, pool: Pool, incoming: &[&Incoming]) -> QueryResult<Vec<bool>> {
    use diesel::sql_types::{Array, Text};
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = Text)]
        message_id: String,
    }
    let ids: Vec<&str> = incoming.iter().map(|m| m.message_id.as_str()).collect();
    let types: Vec<&str> = incoming.iter().map(|m| m.message_type.as_str()).collect();
    let claimed: Vec<Claimed> = crate::db::prepared(
        "INSERT INTO inbox (pool, message_id, message_type)
         SELECT $1, message_id, message_type FROM unnest($2::text[], $3::text[]) AS m(message_id, message_type)
         ON CONFLICT DO NOTHING
         RETURNING message_id",
    )
    .bind::<Text, _>(pool.as_str())
    .bind::<Array<Text>, _>(&ids)
    .bind::<Array<Text>, _>(&types)
    .load(conn)?;
    let mut new: std::collections::HashSet<String> = claimed.into_iter().map(|c| c.message_id).collect();
    Ok(ids.iter().map(|id| new.remove(*id)).collect())
}

/// claim_inbox records that this pool processed the message; false if it already had.
fn claim_inbox(conn: &mut PgConnection, pool: Pool, incoming: &Incoming) -> QueryResult<bool> {
    let inserted = diesel::insert_into(inbox::table)
        .values((
            inbox::pool.eq(pool.as_str()),
            inbox::message_id.eq(&incoming.message_id),
            inbox::message_type.eq(&incoming.message_type),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?;
    Ok(inserted == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// arrivals feeds `n` messages `gap` apart.
    fn arrivals(n: u32, gap: Duration) -> Arrivals {
        let start = tokio::time::Instant::now();
        let mut arrivals = Arrivals::default();
        for i in 0..n {
            arrivals.arrived(start + gap * i);
        }
        arrivals
    }

    #[test]
    fn a_handler_lingers_only_when_several_messages_are_due_within_the_linger() {
        let linger = Duration::from_millis(20);
        assert!(!Arrivals::default().expect_company(linger), "nothing has arrived yet");
        // 2 ms apart: ten are due within 20 ms.
        assert!(arrivals(64, Duration::from_millis(2)).expect_company(linger));
        // 25 ms apart (a light load): not even one is due; two that happen to come close together
        // do not change that.
        let mut light = arrivals(64, Duration::from_millis(25));
        assert!(!light.expect_company(linger));
        let now = tokio::time::Instant::now() + Duration::from_secs(2);
        light.arrived(now);
        light.arrived(now + Duration::from_millis(1));
        assert!(!light.expect_company(linger));
        // Four within 20 ms is the least that is worth the wait: 4 ms apart lingers, 6 ms does not.
        assert!(arrivals(64, Duration::from_millis(4)).expect_company(linger));
        assert!(!arrivals(64, Duration::from_millis(6)).expect_company(linger));
        // No linger, no wait.
        assert!(!arrivals(64, Duration::from_millis(2)).expect_company(Duration::ZERO));
    }

    #[test]
    fn a_quiet_spell_ends_the_lingering_soon() {
        let linger = Duration::from_millis(20);
        let mut busy = arrivals(64, Duration::from_millis(1));
        assert!(busy.expect_company(linger));
        let later = tokio::time::Instant::now() + Duration::from_secs(60);
        busy.arrived(later);
        assert!(!busy.expect_company(linger), "one gap of a second outweighs a busy spell");
    }
}
