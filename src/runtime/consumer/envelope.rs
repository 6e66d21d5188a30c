//! The envelope: a consumed message as handlers see it, parsed once at the door.

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use serde_json::Value;

use super::Failure;
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{REPLAY_RECEIVED_AT, REPLAY_USER_ID};
use crate::runtime::broker;

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
    /// The broker user that published it: the AMQP `user_id` property, which RabbitMQ refuses
    /// unless it names the publishing connection's user. None when the publisher set none. For a
    /// replayed dead letter, the original's.
    pub user_id: Option<String>,
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
    pub(super) fn parse(
        queue: &str,
        internal_exchange: &str,
        delivery: &Delivery,
    ) -> (Incoming, Result<(), (DeadLetterReason, String)>) {
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
            user_id: props.user_id().as_ref().map(|u| u.to_string()),
            body,
            json: Value::Null,
            delivery_count: broker::header_u32(props, "x-delivery-count").unwrap_or(0),
            received_at: Utc::now(),
            first_received_at: Utc::now(),
        };
        // Only assetflow publishes on the internal exchange, so only there are the replay headers
        // trusted: a replayed message is judged as the original was (its age, its sender).
        if incoming.exchange == internal_exchange {
            if let Some(first) = broker::header_str(props, REPLAY_RECEIVED_AT)
                && let Ok(first) = DateTime::parse_from_rfc3339(&first)
            {
                incoming.first_received_at = first.with_timezone(&Utc);
            }
            if broker::header_str(props, REPLAY_RECEIVED_AT).is_some() {
                incoming.user_id = broker::header_str(props, REPLAY_USER_ID);
            }
        }
        // The same check the fuzz targets exercise (`fuzz/`).
        let verdict = match crate::contracts::messages::parse_body(&incoming.body) {
            Ok((message_type, json)) => {
                incoming.message_type = message_type;
                incoming.json = json;
                Ok(())
            }
            Err(detail) => Err((DeadLetterReason::Malformed, detail)),
        };
        (incoming, verdict)
    }
}

impl Incoming {
    /// Incoming::decode reads the message as `T`. The pool checked it against its type's schema
    /// before any handler saw it, so this fails only where the schema admits what `T` does not: a
    /// schema violation all the same.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, Failure> {
        T::deserialize(&self.json).map_err(|e| Failure::permanent(DeadLetterReason::SchemaViolation, e.to_string()))
    }
}
