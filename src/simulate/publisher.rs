//! A confirmed publisher for the simulators, that rides out broker restarts.

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::broker::{self, Broker};

/// Publisher publishes with confirms on one channel, reopened after a failure.
pub struct Publisher {
    broker: Broker,
    channel: Mutex<Option<lapin::Channel>>,
}

impl Publisher {
    pub fn new(broker: Broker) -> Publisher {
        Publisher { broker, channel: Mutex::new(None) }
    }

    /// Publisher::publish publishes `body` and waits for the broker's confirm, retrying through
    /// reconnections until `give_up` passes.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message_type: &str,
        body: &[u8],
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let message_id = Uuid::now_v7().to_string();
        loop {
            match self.try_publish(exchange, routing_key, message_type, &message_id, body).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "simulator publish failed; retrying");
                    *self.channel.lock().await = None;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message_type: &str,
        message_id: &str,
        body: &[u8],
    ) -> anyhow::Result<()> {
        let channel = {
            let mut guard = self.channel.lock().await;
            match guard.as_ref() {
                Some(ch) if ch.status().connected() => ch.clone(),
                _ => {
                    let conn = self.broker.connection().await.ok_or_else(|| anyhow::anyhow!("shutting down"))?;
                    let ch = conn.create_channel().await?;
                    ch.confirm_select(ConfirmSelectOptions::default()).await?;
                    *guard = Some(ch.clone());
                    ch
                }
            }
        };
        let props = broker::properties(message_id, message_type, None, FieldTable::default());
        let confirm = channel
            .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, props)
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
            Confirmation::Nack(_) => anyhow::bail!("the broker refused the message"),
        }
    }
}

/// consume runs `handle` for every message on `queue` until shutdown, re-subscribing after a
/// lost connection. Messages are acknowledged after `handle` returns.
pub async fn consume<F, Fut>(
    broker: Broker,
    queue: String,
    prefetch: u16,
    shutdown: tokio_util::sync::CancellationToken,
    handle: F,
) where
    F: Fn(lapin::message::Delivery) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use futures::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    while !shutdown.is_cancelled() {
        let Some(conn) = broker.connection().await else {
            return;
        };
        let result: anyhow::Result<()> = async {
            let channel = conn.create_channel().await?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let mut consumer = channel
                .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                .await?;
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    next = consumer.next() => next,
                };
                let Some(delivery) = next else { return Ok(()) };
                let delivery = delivery?;
                let acker = delivery.acker.clone();
                handle(delivery).await;
                let _ = acker.ack(BasicAckOptions::default()).await;
            }
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(queue = %queue, error = %e, "simulator consumer stopped; starting again");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}
