//! The handler: the one trait a pool's handler implements, what it works with ([`Cx`]), and the
//! registry that says which queue's messages of which type it takes.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel::PgConnection;
use serde::de::DeserializeOwned;

use super::{Failure, Incoming};
use crate::runtime::outbox::Outgoing;

/// Cx is what a handler works with: a connection inside the batch's transaction, the time the
/// batch was received, and the messages the transaction causes.
pub struct Cx<'a> {
    pub conn: &'a mut PgConnection,
    /// When the message was received (for a batch, its first message).
    pub now: DateTime<Utc>,
    /// See [`Incoming::first_received_at`].
    pub first_received_at: DateTime<Utc>,
    /// What the handlers of one transaction keep for each other, by type: the domain's reads of
    /// rows that handlers never change, so that messages handled together read each once.
    pub extensions: &'a mut http::Extensions,
    /// The messages the transaction causes, written to the outbox together at its end; see
    /// [`Cx::publish`].
    pub outgoing: &'a mut Vec<Outgoing>,
}

impl<'a> Cx<'a> {
    pub(super) fn new(
        conn: &'a mut PgConnection,
        first: &Incoming,
        extensions: &'a mut http::Extensions,
        outgoing: &'a mut Vec<Outgoing>,
    ) -> Cx<'a> {
        Cx { conn, now: first.received_at, first_received_at: first.first_received_at, extensions, outgoing }
    }

    /// Cx::publish sends a message once this transaction commits. It is gathered with the
    /// transaction's other messages and written to the outbox with them, in one statement, before
    /// the commit.
    pub fn publish(&mut self, message: Outgoing) {
        self.outgoing.push(message);
    }

    /// Cx::as_of makes what follows see `incoming`'s receipt as the time.
    fn as_of(&mut self, incoming: &Incoming) {
        (self.now, self.first_received_at) = (incoming.received_at, incoming.first_received_at);
    }
}

/// Received is a message handed to a handler: decoded, beside the message as it arrived (a
/// terminal request's signature covers its JSON as sent).
#[derive(Debug)]
pub struct Received<'m, M> {
    pub message: M,
    pub incoming: &'m Incoming,
}

/// Handler carries out the messages of one type. It runs inside a transaction on the blocking
/// pool, and everything it writes commits with the record that each message was processed.
pub trait Handler: Send + Sync + 'static {
    /// Handler::Message is the message, as its schema (checked before any handler sees it)
    /// describes it.
    type Message: DeserializeOwned + Send;

    /// Handler::MESSAGE_TYPE is the AMQP `type` this handler takes.
    const MESSAGE_TYPE: &'static str;

    /// Handler::handle carries out a batch of messages new to this pool, as of `cx.now`. A
    /// refusal is an Ok: the request was answered. A failure fails the batch as a whole: each of
    /// its messages is then handled again alone.
    fn handle(&self, cx: &mut Cx<'_>, batch: &[Received<'_, Self::Message>]) -> Result<(), Failure>;

    /// Handler::max_batch is the most messages handed over in one call. One (the default) hands
    /// each message alone, in its own span and as of its own receipt; a handler that reads and
    /// writes a batch in a few statements takes more, and must have on each the effect it would
    /// have alone ([`together_unless_repeated`] does the part they all share).
    fn max_batch(&self) -> usize {
        1
    }

    /// Handler::answer_invalid answers a message of this type that failed its schema, in the
    /// transaction that dead-letters it, where there is someone to answer: a terminal request
    /// signed by a registered terminal gets a refusal naming the field at fault. By default
    /// nobody is answered; the dead letter is the operator's record either way.
    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        let _ = (cx, incoming, detail);
        Ok(())
    }
}

/// Dispatch is a [`Handler`] with its message type erased, as the registry keeps it: every
/// handler is one.
pub trait Dispatch: Send + Sync {
    /// Dispatch::max_batch is [`Handler::max_batch`], at least one.
    fn max_batch(&self) -> usize;
    /// Dispatch::dispatch decodes the messages and hands them to the handler.
    fn dispatch(&self, cx: &mut Cx<'_>, messages: &[&Incoming]) -> Result<(), Failure>;
    /// Dispatch::answer_invalid is [`Handler::answer_invalid`].
    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure>;
}

impl<H: Handler> Dispatch for H {
    fn max_batch(&self) -> usize {
        Handler::max_batch(self).max(1)
    }

    fn dispatch(&self, cx: &mut Cx<'_>, messages: &[&Incoming]) -> Result<(), Failure> {
        let batch = messages
            .iter()
            .map(|incoming| Ok(Received { message: incoming.decode::<H::Message>()?, incoming }))
            .collect::<Result<Vec<_>, Failure>>()?;
        self.handle(cx, &batch)
    }

    fn answer_invalid(&self, cx: &mut Cx<'_>, incoming: &Incoming, detail: &str) -> Result<(), Failure> {
        Handler::answer_invalid(self, cx, incoming, detail)
    }
}

/// together_unless_repeated hands a batch to `take` all at once, unless two of its messages name
/// the same thing (`keys`: the same delivery, the same request id or certificate). Then they are
/// taken one at a time, each as of its own receipt, so that the second finds what the first did,
/// as it would alone.
pub fn together_unless_repeated<M, K, Ks>(
    cx: &mut Cx<'_>,
    batch: &[Received<'_, M>],
    keys: impl Fn(&M) -> Ks,
    mut take: impl FnMut(&mut Cx<'_>, &[Received<'_, M>]) -> Result<(), Failure>,
) -> Result<(), Failure>
where
    K: Eq + Hash,
    Ks: IntoIterator<Item = K>,
{
    let mut seen = HashSet::with_capacity(batch.len());
    if batch.iter().flat_map(|r| keys(&r.message)).all(|k| seen.insert(k)) {
        return take(cx, batch);
    }
    batch.chunks(1).try_for_each(|one| {
        cx.as_of(one[0].incoming);
        take(cx, one)
    })
}

/// Registry maps each queue's message types to their handlers.
#[derive(Default)]
pub struct Registry {
    handlers: HashMap<String, HashMap<&'static str, Arc<dyn Dispatch>>>,
    /// Queues that take what no binding routed: everything there is dead-lettered as unroutable.
    unrouted: HashSet<String>,
}

impl Registry {
    /// Registry::register adds a handler for a queue; a second handler for the same type is a
    /// programming error that stops the start-up.
    pub fn register<H: Handler>(&mut self, queue: &str, handler: H) -> anyhow::Result<()> {
        let by_type = self.handlers.entry(queue.to_string()).or_default();
        anyhow::ensure!(
            by_type.insert(H::MESSAGE_TYPE, Arc::new(handler)).is_none(),
            "two handlers for {} on {queue}",
            H::MESSAGE_TYPE
        );
        Ok(())
    }

    /// Registry::unrouted declares a queue of messages no binding routed (the requests exchange's
    /// alternate exchange): every one is dead-lettered as unroutable.
    pub fn unrouted(&mut self, queue: &str) {
        self.handlers.entry(queue.to_string()).or_default();
        self.unrouted.insert(queue.to_string());
    }

    pub(super) fn is_unrouted(&self, queue: &str) -> bool {
        self.unrouted.contains(queue)
    }

    pub(super) fn lookup(&self, queue: &str, message_type: &str) -> Option<Arc<dyn Dispatch>> {
        self.handlers.get(queue)?.get(message_type).cloned()
    }

    /// Registry::handles says whether a queue was registered.
    pub fn handles(&self, queue: &str) -> bool {
        self.handlers.contains_key(queue)
    }
}
