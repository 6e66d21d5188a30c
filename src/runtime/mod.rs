//! The runtime: the generic machinery that carries messages in and out. Consumers that hand
//! batches to handlers and turn each outcome into an acknowledgement, a retry or a dead letter;
//! the outbox that publishes what a transaction caused; the dead-letter store; the database and
//! the broker. It knows no pool by name, no product and no terminal: the service floor tells it
//! which handler takes which queue.

pub mod broker;
pub mod consumer;
pub mod db;
pub mod dead_letter;
pub mod metrics;
pub mod outbox;
pub mod progress;
pub mod scan;

use std::sync::Arc;

use tokio::sync::Notify;

use crate::contracts::topology::Names;

/// Plumbing is what the runtime's parts of one process share: the database, the names on the
/// broker, the two ways out of the outbox, and the progress readiness reads. Consumers and the
/// dead-letter recorder are built with it; handlers never see it.
#[derive(Clone)]
pub struct Plumbing {
    pub db: db::Db,
    pub names: Names,
    /// Signalled after a commit that wrote to the outbox without handing its messages over.
    pub outbox_wake: Arc<Notify>,
    /// Where committed messages go to be published at once, while a publisher runs.
    pub handoff: Arc<outbox::Handoff>,
    pub progress: Arc<progress::Progress>,
    /// The quorum queues' delivery limit: one delivery before it, a consumer gives up itself,
    /// where the evidence is.
    pub delivery_limit: u32,
}

impl Plumbing {
    /// Plumbing::committed tells the relay that a handler's transaction wrote to the outbox, unless
    /// its messages were handed to this process's publisher (their rows are leased: a relay woken
    /// now would find none of them). What is written for the relay alone wakes it directly.
    pub fn committed(&self) {
        if self.handoff.lease().is_none() {
            self.outbox_wake.notify_one();
        }
    }
}
