//! The publisher: each process publishes its handlers' messages as soon as their transaction
//! commits, pipelining the confirms, and deletes the rows the broker confirmed.

use std::time::{Duration, Instant};

use diesel::Connection;
use tokio::sync::mpsc;

use super::send::{Sent, confirmations, open_channel, send};
use super::{Outgoing, resolve};
use crate::runtime::broker::Broker;
use crate::runtime::db::{Db, DbError};
use crate::runtime::metrics;

/// Handoff carries a handler's committed messages to this process's [`Publisher`]. It is open
/// while a publisher runs; when it is closed, handlers write their messages for the relay.
#[derive(Default)]
pub struct Handoff {
    open: std::sync::Mutex<Option<(mpsc::Sender<Commit>, Duration)>>,
}

/// Commit is one transaction's messages, with the moment they were handed over.
type Commit = (Instant, Vec<Outgoing>);

/// Handed is the publisher's end of an open [`Handoff`]: each commit's messages with the moment
/// they were handed over, and the lease their rows were written with.
pub struct Handed {
    receiver: mpsc::Receiver<Commit>,
    lease: Duration,
}

/// How many handlers' commits may wait for the publisher; past that, messages wait for their lease.
const HANDOFF_CAPACITY: usize = 4096;

impl Handoff {
    /// Handoff::lease is how long to lease the rows being written, or None if no publisher
    /// would take them.
    pub fn lease(&self) -> Option<Duration> {
        self.open.lock().expect("never poisoned").as_ref().map(|(_, lease)| *lease)
    }

    /// Handoff::give hands over messages whose rows have committed, leased. If the publisher is
    /// gone or behind, they are not lost: a relay claims their rows when the lease ends.
    pub fn give(&self, messages: Vec<Outgoing>) {
        if messages.is_empty() {
            return;
        }
        let Some((sender, _)) = &*self.open.lock().expect("never poisoned") else { return };
        match sender.try_send((Instant::now(), messages)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("the publisher is behind; these messages wait for their lease, then a relay")
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!("the publisher has stopped; these messages wait for their lease, then a relay")
            }
        }
    }

    /// Handoff::open starts taking messages, for a publisher that reads the receiver.
    pub fn open(&self, lease: Duration) -> Handed {
        let (sender, receiver) = mpsc::channel(HANDOFF_CAPACITY);
        *self.open.lock().expect("never poisoned") = Some((sender, lease));
        Handed { receiver, lease }
    }

    /// Handoff::close stops taking messages; the publisher finishes what it was given and stops.
    pub fn close(&self) {
        self.open.lock().expect("never poisoned").take();
    }
}

/// Publisher publishes the messages handed over by this process's handlers as soon as they
/// commit, pipelining the confirms, and deletes their rows once the broker has confirmed them.
pub struct Publisher {
    db: Db,
    broker: Broker,
}

impl Publisher {
    pub fn new(db: Db, broker: Broker) -> Publisher {
        Publisher { db, broker }
    }

    /// Publisher::run publishes until the handoff is closed and what it was given is settled.
    /// Publishing and settling overlap: while one batch's rows are deleted, the next is sent.
    ///
    /// A message handed over more than half its lease ago (the broker was away, or the publisher
    /// far behind) is left to the relay, which may claim its row soon: publishing it here too
    /// would only send it twice.
    pub async fn run(self, mut handed: Handed) {
        let (sent, to_settle) = mpsc::channel::<Vec<Sent>>(64);
        let settler = tokio::spawn(settle_sent(self.db.clone(), to_settle));
        let mut channel: Option<lapin::Channel> = None;
        while let Some(first) = handed.receiver.recv().await {
            let mut commits = vec![first];
            let mut n = commits[0].1.len();
            while n < PUBLISH_BATCH
                && let Ok(more) = handed.receiver.try_recv()
            {
                n += more.1.len();
                commits.push(more);
            }
            let channel_open = open_channel(&self.broker, &mut channel).await;
            let fresh_since = Instant::now().checked_sub(handed.lease / 2);
            let (batch, stale): (Vec<_>, Vec<_>) =
                commits.into_iter().partition(|(at, _)| fresh_since.is_none_or(|since| *at > since));
            let stale: usize = stale.iter().map(|(_, messages)| messages.len()).sum();
            if stale > 0 {
                tracing::info!(messages = stale, "handed over too long ago; left to the relay");
            }
            let batch: Vec<Outgoing> = batch.into_iter().flat_map(|(_, messages)| messages).collect();
            if batch.is_empty() {
                continue;
            }
            let pending = match channel_open {
                Ok(ch) => send(&ch, &batch).await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish; the messages go back to the relay");
                    batch.iter().map(|m| (m.message_id, None)).collect()
                }
            };
            if pending.iter().any(|(_, confirm)| confirm.is_none()) {
                channel = None;
            }
            if sent.send(pending).await.is_err() {
                break; // The settler stopped; the rows wait for their lease.
            }
        }
        drop(sent);
        let _ = settler.await;
    }
}

/// Messages the publisher takes together at most.
const PUBLISH_BATCH: usize = 1024;

/// settle_sent waits for the confirms of what was sent, and settles the rows: a batch's confirmed
/// rows are deleted, the others given back to the relay. What was sent meanwhile is settled with
/// it, in the same transaction.
async fn settle_sent(db: Db, mut to_settle: mpsc::Receiver<Vec<Sent>>) {
    while let Some(first) = to_settle.recv().await {
        let mut published = confirmations(first).await;
        while let Ok(more) = to_settle.try_recv() {
            published.extend(confirmations(more).await);
        }
        metrics::outbox_published(published.confirmed.len() as u64, published.failed.len() as u64);
        let settled = db
            .run(move |conn| {
                conn.transaction::<_, DbError, _>(|conn| Ok(resolve(conn, &published.confirmed, &published.failed)?))
            })
            .await;
        if let Err(e) = settled {
            // The rows stay leased: a relay publishes them again when the lease ends, and the
            // consumers' inboxes take the second copy as a duplicate.
            tracing::warn!(error = %e, "could not settle published outbox rows");
        }
    }
}
