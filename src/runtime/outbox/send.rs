//! Sending with confirms: what the publisher and the relay share. A message counts as published
//! only once the broker confirmed it; a negative confirm, a returned (unroutable) message or no
//! confirm within the deadline counts as refused.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Confirmation, PublisherConfirm};
use uuid::Uuid;

use super::Outgoing;
use crate::runtime::broker::{self, Broker};

/// How long a claim waits for its batch's confirms before it rolls back and leaves the rows to the
/// next round: a broker that stops confirming holds no row locks for longer.
pub(super) const CONFIRM_DEADLINE: Duration = Duration::from_secs(10);

/// Published is what the broker said of a batch, by message id.
#[derive(Debug, Default)]
pub(super) struct Published {
    pub(super) confirmed: Vec<Uuid>,
    pub(super) failed: Vec<Uuid>,
}

impl Published {
    pub(super) fn extend(&mut self, other: Published) {
        self.confirmed.extend(other.confirmed);
        self.failed.extend(other.failed);
    }
}

/// Sent is a message published and its confirm to come; None if the publish itself failed.
pub(super) type Sent = (Uuid, Option<PublisherConfirm>);

/// open_channel is the channel in hand if it is still open, or a new one in confirm mode.
pub(super) async fn open_channel(
    broker: &Broker,
    channel: &mut Option<lapin::Channel>,
) -> anyhow::Result<lapin::Channel> {
    if let Some(ch) = channel
        && ch.status().connected()
    {
        return Ok(ch.clone());
    }
    let conn = broker.connection().await.ok_or_else(|| anyhow::anyhow!("shutting down"))?;
    let ch = broker::bounded("channel.open", conn.create_channel()).await?;
    broker::bounded("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())).await?;
    *channel = Some(ch.clone());
    Ok(ch)
}

/// send publishes messages without waiting for their confirms.
pub(super) async fn send(ch: &lapin::Channel, messages: &[Outgoing]) -> Vec<Sent> {
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let props = broker::properties(
            &m.message_id.to_string(),
            &m.message_type,
            m.correlation_id.as_deref(),
            broker::headers_from_json(&m.headers),
        );
        // mandatory: a message no queue would take comes back instead of vanishing.
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let published = ch
            .basic_publish(m.exchange.as_str().into(), m.routing_key.as_str().into(), options, &m.payload, props)
            .await;
        match published {
            Ok(confirm) => pending.push((m.message_id, Some(confirm))),
            Err(e) => {
                tracing::warn!(error = %e, "publish failed");
                pending.push((m.message_id, None));
            }
        }
    }
    pending
}

/// confirmations waits for the broker's word on each message sent, for at most
/// [`CONFIRM_DEADLINE`] in all: one it has not confirmed by then counts as refused.
pub(super) async fn confirmations(pending: Vec<Sent>) -> Published {
    let deadline = tokio::time::Instant::now() + CONFIRM_DEADLINE;
    let mut published = Published::default();
    for (id, confirm) in pending {
        let ok = match confirm {
            Some(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => true,
                Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                    tracing::error!(reply = %returned.reply_text, "the broker returned an outbox message as unroutable");
                    false
                }
                Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => false,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "publisher confirm lost");
                    false
                }
                Err(_) => {
                    tracing::warn!("the broker did not confirm within {CONFIRM_DEADLINE:?}");
                    false
                }
            },
            None => false,
        };
        if ok { published.confirmed.push(id) } else { published.failed.push(id) }
    }
    published
}
