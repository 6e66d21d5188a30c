//! The recorder: what the broker dead-letters by itself, read from the pools' dead-letter queues
//! into the dead_letters table.

use chrono::Utc;
use diesel::prelude::*;
use serde_json::{Value, json};

use super::{NewDeadLetter, record};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::kinds;
use crate::contracts::topology::Names;
use crate::runtime::Plumbing;

/// record_from_broker records a message the broker dead-lettered by itself, as found in a
/// dead-letter queue. assetflow's own dead-letter notices are already recorded: it returns false.
pub fn record_from_broker(
    conn: &mut PgConnection,
    names: &Names,
    pool: &'static str,
    props: &lapin::BasicProperties,
    data: &[u8],
) -> QueryResult<bool> {
    let message_type = props.kind().as_ref().map(|k| k.to_string()).unwrap_or_default();
    if message_type == kinds::DEAD_LETTER {
        return Ok(false);
    }
    let message_id =
        props.message_id().as_ref().map(|id| id.to_string()).unwrap_or_else(|| crate::crypto::sha256_hex(data));
    let death = x_death(props);
    // The dead-lettered copy carries no delivery count: the x-death entry's reason (for example
    // delivery_limit) says why it left its queue.
    let detail = format!(
        "the broker dead-lettered it ({}) from {}, while assetflow could not record it",
        death.get("reason").and_then(Value::as_str).unwrap_or("unknown reason"),
        death.get("queue").and_then(Value::as_str).unwrap_or("its queue"),
    );
    let recorded = record(
        conn,
        names,
        NewDeadLetter {
            pool,
            source: "message",
            message_type: if message_type.is_empty() { "unknown".into() } else { message_type },
            message_id: Some(message_id),
            exchange: death.get("exchange").and_then(Value::as_str).map(str::to_string),
            routing_key: death.get("routing-keys").and_then(|k| k.get(0)).and_then(Value::as_str).map(str::to_string),
            payload: data.to_vec(),
            headers: json!({"x-death": death}),
            reason: DeadLetterReason::BrokerDeadLettered,
            detail: detail.clone(),
            attempts: json!([{"at": Utc::now(), "error": detail}]),
            subject_id: None,
        },
    )?;
    Ok(recorded.is_some())
}

/// x_death reads the first entry of the broker's `x-death` header as JSON.
fn x_death(props: &lapin::BasicProperties) -> Value {
    use lapin::types::AMQPValue;
    fn to_json(v: &AMQPValue) -> Value {
        match v {
            AMQPValue::LongString(s) => Value::String(s.to_string()),
            AMQPValue::ShortString(s) => Value::String(s.to_string()),
            AMQPValue::LongLongInt(i) => json!(i),
            AMQPValue::LongInt(i) => json!(i),
            AMQPValue::Timestamp(t) => json!(t),
            AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
            AMQPValue::FieldTable(t) => {
                Value::Object(t.inner().iter().map(|(k, v)| (k.to_string(), to_json(v))).collect())
            }
            other => Value::String(format!("{other:?}")),
        }
    }
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death"))
        .map(to_json)
        .and_then(|v| v.get(0).cloned())
        .unwrap_or(Value::Null)
}

/// run_recorder consumes a pool's dead-letter queue, so that what the broker dead-letters by
/// itself also lands in the dead_letters table.
pub async fn run_recorder(
    plumbing: Plumbing,
    broker: crate::runtime::broker::Broker,
    pool: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let queue = plumbing.names.dead_letter_queue(pool);
    let handler_plumbing = plumbing.clone();
    let stopping = shutdown.clone();
    crate::runtime::broker::consume(broker, queue, 16, shutdown, move |delivery| {
        let (plumbing, stopping) = (handler_plumbing.clone(), stopping.clone());
        async move {
            let names = plumbing.names.clone();
            let mut delay = std::time::Duration::from_millis(200);
            let (props, data) = (delivery.properties.clone(), delivery.data.clone());
            loop {
                let (names2, props2, data2) = (names.clone(), props.clone(), data.clone());
                let recorded = plumbing
                    .db
                    .run(move |conn| {
                        record_from_broker(conn, &names2, pool, &props2, &data2)
                            .map_err(crate::runtime::db::DbError::from)
                    })
                    .await;
                match recorded {
                    // Its notice was written for the relay (nothing is handed off here): wake it.
                    Ok(true) => {
                        plumbing.outbox_wake.notify_one();
                        return true;
                    }
                    Ok(false) => return true,
                    // The message stays in the queue until it is recorded: never dropped.
                    Err(_) if stopping.is_cancelled() => return false,
                    Err(e) => {
                        tracing::warn!(pool = %pool, error = %e, "cannot record a broker dead letter yet");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_secs(10));
                    }
                }
            }
        }
    })
    .await;
}
