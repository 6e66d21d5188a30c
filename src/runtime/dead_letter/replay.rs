//! Replaying dead letters: the [`Replayer`] each source of dead letters implements, the
//! [`Replayers`] registry that picks one by source, and the [`MessageReplayer`] for messages.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use std::collections::HashMap;

use super::{Full, audit, show};
use crate::contracts::messages::{REPLAY_RECEIVED_AT, REPLAY_USER_ID};
use crate::contracts::topology::Names;
use crate::runtime::db::schema::dead_letters;
use crate::runtime::outbox::{self, Outgoing};

/// Replayed is what a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub id: Uuid,
    pub action: String,
}

/// Replayer replays the dead letters of one source through the normal path, inside the
/// transaction that marks the letter replayed; it returns what it did, for the audit.
pub trait Replayer: Send + Sync + 'static {
    /// Replayer::SOURCE is the `source` of the dead letters it takes.
    const SOURCE: &'static str;

    fn replay(&self, conn: &mut PgConnection, letter: &Full, now: DateTime<Utc>) -> anyhow::Result<String>;
}

/// Replay is a [`Replayer`] with its source erased, as [`Replayers`] keeps it.
trait Replay: Send + Sync {
    fn replay(&self, conn: &mut PgConnection, letter: &Full, now: DateTime<Utc>) -> anyhow::Result<String>;
}

impl<R: Replayer> Replay for R {
    fn replay(&self, conn: &mut PgConnection, letter: &Full, now: DateTime<Utc>) -> anyhow::Result<String> {
        Replayer::replay(self, conn, letter, now)
    }
}

/// Replayers says which replayer takes the dead letters of each source.
#[derive(Default)]
pub struct Replayers {
    by_source: HashMap<&'static str, Box<dyn Replay>>,
}

impl Replayers {
    /// Replayers::register adds a replayer; a second one for the same source is a programming
    /// error that stops the start-up.
    pub fn register<R: Replayer>(&mut self, replayer: R) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.by_source.insert(R::SOURCE, Box::new(replayer)).is_none(),
            "two replayers for dead letters from {}",
            R::SOURCE
        );
        Ok(())
    }

    /// Replayers::replay re-enqueues a dead letter through the normal path, keeping its history.
    /// The dead letter stays, marked replayed, with an audit row.
    pub fn replay(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
        operator: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Replayed> {
        conn.transaction(|conn| {
            let letter = show(conn, id)?.ok_or_else(|| anyhow::anyhow!("no dead letter {id}"))?;
            let source = letter.summary.source.as_str();
            let replayer = self
                .by_source
                .get(source)
                .ok_or_else(|| anyhow::anyhow!("no replayer takes dead letters from {source}"))?;
            let action = replayer.replay(conn, &letter, now)?;
            diesel::update(dead_letters::table.find(id))
                .set((dead_letters::replayed_at.eq(now), dead_letters::replay_count.eq(dead_letters::replay_count + 1)))
                .execute(conn)?;
            audit(conn, id, "replay", operator, Some(&action), &letter.summary)?;
            Ok(Replayed { id, action })
        })
    }
}

/// MessageReplayer replays a message that could not be processed: it goes back to its pool on
/// the internal exchange, with its original receipt time, or, for an outbound message the broker
/// dead-lettered (an instruction to a partner, a delivery to a gateway), back where it was going.
pub struct MessageReplayer {
    pub names: Names,
    /// The pools whose messages may be replayed; a letter naming another pool is refused.
    pub pools: Vec<&'static str>,
}

impl Replayer for MessageReplayer {
    const SOURCE: &'static str = "message";

    fn replay(&self, conn: &mut PgConnection, letter: &Full, _now: DateTime<Utc>) -> anyhow::Result<String> {
        let id = letter.summary.id;
        let payload: Vec<u8> = dead_letters::table.find(id).select(dead_letters::payload).first(conn)?;
        let received_at = letter
            .headers
            .get("received_at")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| letter.summary.created_at.to_rfc3339());
        let names = &self.names;
        let pool = letter.summary.pool.as_str();
        anyhow::ensure!(self.pools.contains(&pool), "dead letter {id} names pool {pool:?}, which does not exist");
        let outbound = letter.exchange.as_deref().filter(|e| *e == names.partners() || *e == names.gateways());
        let (exchange, routing_key) = match (outbound, &letter.routing_key) {
            (Some(exchange), Some(key)) => (exchange.to_string(), key.clone()),
            _ => (names.internal(), names.replay_key(pool)),
        };
        let message = Outgoing {
            message_id: Uuid::now_v7(),
            exchange,
            routing_key,
            message_type: letter.summary.message_type.clone(),
            correlation_id: Some(id.to_string()),
            headers: replay_headers(&received_at, letter.headers.get("user_id").and_then(Value::as_str), id),
            payload,
            available_at: None,
        };
        outbox::enqueue(conn, &message)?;
        Ok(format!("re-published to {} / {}", message.exchange, message.routing_key))
    }
}

/// replay_headers are the headers of a replayed message: when the original reached assetflow, the
/// broker user that published it (if it named one), and which dead letter it replays.
fn replay_headers(received_at: &str, user_id: Option<&str>, id: Uuid) -> Value {
    let mut headers = json!({REPLAY_RECEIVED_AT: received_at, "x-assetflow-replay-of": id.to_string()});
    if let Some(user) = user_id {
        headers[REPLAY_USER_ID] = json!(user);
    }
    headers
}
