//! A confirmed publisher for the simulators, that rides out broker restarts.

use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::runtime::broker::{self, Broker};

/// ShuttingDown is the error of a publish attempted once the broker connection is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("shutting down")]
pub struct ShuttingDown;

/// ConfirmedSender publishes with confirms on one channel, reopened after a failure.
pub struct ConfirmedSender {
    broker: Broker,
    channel: Mutex<Option<lapin::Channel>>,
}

impl ConfirmedSender {
    pub fn new(broker: Broker) -> ConfirmedSender {
        ConfirmedSender { broker, channel: Mutex::new(None) }
    }

    /// ConfirmedSender::publish publishes `body` and waits for the broker's confirm, retrying through
    /// reconnections for up to two minutes. Once the broker is shutting down it gives up at once,
    /// so that a simulator stops promptly on SIGTERM.
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
                Err(e) if e.is::<ShuttingDown>() => return Err(e),
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
                    let conn = self.broker.connection().await.ok_or(ShuttingDown)?;
                    let ch = broker::bounded("channel.open", conn.create_channel()).await?;
                    broker::bounded("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await?;
                    *guard = Some(ch.clone());
                    ch
                }
            }
        };
        let props = broker::properties(message_id, message_type, None, FieldTable::default());
        let publish =
            channel.basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, props);
        let confirm = broker::bounded("basic.publish", async { publish.await?.await }).await?;
        match confirm {
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
            Confirmation::Nack(_) => anyhow::bail!("the broker refused the message"),
        }
    }
}

pub use crate::runtime::broker::consume;

/// publish_burst publishes every body on one confirmed channel, keeping up to `window` confirms
/// in flight: a partner's burst of orders, as fast as the broker takes them. It returns when the
/// broker has confirmed them all.
pub async fn publish_burst(
    broker: &Broker,
    exchange: &str,
    routing_key: &str,
    message_type: &str,
    bodies: Vec<Vec<u8>>,
    window: usize,
) -> anyhow::Result<()> {
    let conn = broker.connection().await.ok_or_else(|| anyhow::anyhow!("shutting down"))?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut in_flight = std::collections::VecDeque::with_capacity(window);
    for body in bodies {
        if in_flight.len() >= window {
            let confirm: lapin::PublisherConfirm = in_flight.pop_front().expect("not empty");
            anyhow::ensure!(matches!(confirm.await?, Confirmation::Ack(_)), "the broker refused a message");
        }
        let props = broker::properties(&Uuid::now_v7().to_string(), message_type, None, FieldTable::default());
        in_flight.push_back(
            channel
                .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), &body, props)
                .await?,
        );
    }
    for confirm in in_flight {
        anyhow::ensure!(matches!(confirm.await?, Confirmation::Ack(_)), "the broker refused a message");
    }
    let _ = channel.close(200, "burst published".into()).await;
    Ok(())
}
