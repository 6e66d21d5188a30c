//! The relay: publishes the outbox rows no publisher has in hand (written for it, or whose lease
//! ended), claiming them with `FOR UPDATE SKIP LOCKED` in a transaction held while they are
//! published, so that several processes share the work.

use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::send::{CONFIRM_DEADLINE, Published, confirmations, open_channel, send};
use super::{Outgoing, backlog, claim, resolve};
use crate::runtime::broker::Broker;
use crate::runtime::db::{Db, DbError};
use crate::runtime::metrics;
use crate::runtime::progress::Progress;

/// How long a stopping relay keeps trying to publish what is due.
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);

/// How often the backlog gauges are refreshed.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);

/// Relay publishes the outbox rows no publisher has in hand: those written for it, and those whose
/// lease has ended or that a publisher gave back.
pub struct Relay {
    db: Db,
    broker: Broker,
    wake: Arc<Notify>,
    batch_size: i64,
    poll_interval: Duration,
    progress: Arc<Progress>,
}

impl Relay {
    pub fn new(
        db: Db,
        broker: Broker,
        wake: Arc<Notify>,
        batch_size: u32,
        poll_interval: Duration,
        progress: Arc<Progress>,
    ) -> Relay {
        Relay { db, broker, wake, batch_size: i64::from(batch_size), poll_interval, progress }
    }

    /// Relay::run publishes until shutdown, then flushes what is already due and returns. The
    /// flush gives up after [`FLUSH_DEADLINE`] (a broker that is down): the rows stay in the
    /// outbox, and the next process to start publishes them.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut channel: Option<lapin::Channel> = None;
        let mut flush_deadline: Option<tokio::time::Instant> = None;
        let mut backlog_reported: Option<tokio::time::Instant> = None;
        loop {
            let stopping = shutdown.is_cancelled();
            if stopping && flush_deadline.is_none() {
                flush_deadline = Some(tokio::time::Instant::now() + FLUSH_DEADLINE);
            }
            if backlog_reported.is_none_or(|at| at.elapsed() >= BACKLOG_INTERVAL) {
                self.report_backlog().await;
                backlog_reported = Some(tokio::time::Instant::now());
            }
            let round = match flush_deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, self.round(&mut channel))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the flush deadline passed"))),
                None => self.round(&mut channel).await,
            };
            match round {
                Ok(n) if n as i64 >= self.batch_size => continue,
                Ok(0) if stopping => return,
                Ok(_) if stopping => continue,
                Ok(_) => {}
                Err(e) => {
                    channel = None;
                    if stopping {
                        tracing::warn!(error = %e, "could not flush the outbox before stopping; the next process publishes it");
                        return;
                    }
                    tracing::warn!(error = %e, "outbox relay round failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    /// One round: claim a batch, publish it with pipelined confirms, delete what was confirmed.
    ///
    /// The claim is a transaction held open while the batch is published: its row locks keep
    /// every other relay off these rows (`SKIP LOCKED`), and it deletes the confirmed ones before
    /// it commits. A round costs one writing commit, and the rows are never rewritten before their
    /// delete. If this process dies or loses the database meanwhile, the transaction rolls back and
    /// the rows are published again at once, by whichever relay is next.
    async fn round(&self, channel: &mut Option<lapin::Channel>) -> anyhow::Result<usize> {
        let batch = self.batch_size;
        let (claimed_tx, claimed) = tokio::sync::oneshot::channel::<Vec<Outgoing>>();
        let (outcome, outcome_rx) = std::sync::mpsc::sync_channel::<Published>(1);
        let claim = self.db.run(move |conn| {
            conn.transaction::<_, DbError, _>(|conn| {
                let rows = claim(conn, batch)?;
                let n = rows.len();
                if n == 0 || claimed_tx.send(rows).is_err() {
                    return Ok(n);
                }
                // The publishing side answers within its own deadlines; one that is dropped
                // (shutdown's flush deadline, a lost channel) rolls the claim back.
                match outcome_rx.recv_timeout(CONFIRM_DEADLINE) {
                    Ok(published) => resolve(conn, &published.confirmed, &published.failed)?,
                    Err(_) => return Err(DbError::Query(diesel::result::Error::RollbackTransaction)),
                }
                Ok(n)
            })
        });
        let publish = async {
            let Ok(rows) = claimed.await else {
                return Ok(None); // Nothing was due, or the claim failed (its error is returned).
            };
            // Bounded like the claim: a publish on a connection that died meanwhile may never end.
            let published = tokio::time::timeout(CONFIRM_DEADLINE, self.publish(channel, &rows))
                .await
                .map_err(|_| anyhow::anyhow!("the broker did not confirm within {CONFIRM_DEADLINE:?}"))??;
            let failed = published.failed.len();
            metrics::outbox_published(published.confirmed.len() as u64, failed as u64);
            // The claim is waiting for this answer; it can only be gone if it failed.
            let _ = outcome.send(published);
            Ok::<_, anyhow::Error>(Some(failed))
        };
        let (claimed, published) = tokio::join!(claim, publish);
        self.progress.relay_tick();
        // A batch the broker refused in part starts again on a fresh channel.
        if published?.is_some_and(|failed| failed > 0) {
            *channel = None;
        }
        Ok(claimed?)
    }

    /// publish sends a batch with pipelined confirms, then waits for them: one round trip, not
    /// one per message. It says which rows the broker confirmed and which it did not.
    async fn publish(&self, channel: &mut Option<lapin::Channel>, rows: &[Outgoing]) -> anyhow::Result<Published> {
        let ch = open_channel(&self.broker, channel).await?;
        Ok(confirmations(send(&ch, rows).await).await)
    }

    async fn report_backlog(&self) {
        if let Ok((rows, age)) = self.db.run(|conn| backlog(conn).map_err(DbError::from)).await {
            metrics::outbox_backlog(rows, age);
        }
    }
}
