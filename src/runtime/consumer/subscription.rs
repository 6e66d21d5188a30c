//! The consumer: a pool's subscriptions, and how it gathers messages into batches (lingering for
//! company only when the arrival rate says it is worth it).

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Registry;
use crate::runtime::Plumbing;
use crate::runtime::broker::{self, Broker};

/// Consumer consumes a pool's queues.
pub struct Consumer {
    /// The pool's name: a label in logs, metrics, inbox rows and dead letters.
    pub pool: &'static str,
    pub queues: Vec<String>,
    pub concurrency: usize,
    pub prefetch: u16,
    /// The most messages handled in one transaction.
    pub batch: usize,
    /// How long a batch waits for company when messages arrive closer together than this.
    pub linger: Duration,
    pub retries: Vec<Duration>,
    pub plumbing: Plumbing,
    pub registry: Arc<Registry>,
    pub broker: Broker,
}

impl Consumer {
    /// Consumer::run consumes until shutdown, then finishes the messages in hand.
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
                self.plumbing.progress.consumer_stopped();
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
        self.plumbing.progress.consumer_started();
        *subscribed = true;
        tracing::info!(pool = %self.pool, queue, "consuming");
        let mut arrivals = Arrivals::default();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Finish what is in hand first, on this channel: its acknowledgements must
                    // reach the broker before the channel closes, or the messages return to the
                    // queue as if never handled. Then stop taking new ones; those already
                    // prefetched return to the queue when the channel closes.
                    in_flight.close();
                    in_flight.wait().await;
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
