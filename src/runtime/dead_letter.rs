//! Dead letters: everything assetflow gives up on, recorded with its evidence and published to the
//! pool's dead-letter queue, until an operator replays or purges it.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use std::collections::HashMap;

use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::messages::{DeadLetterMessage, REPLAY_RECEIVED_AT, kinds};
use crate::contracts::topology::Names;
use crate::runtime::Plumbing;
use crate::runtime::db::schema::{dead_letter_audit, dead_letters};
use crate::runtime::metrics;
use crate::runtime::outbox::{self, Outgoing};

/// NewDeadLetter is what is recorded.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// The pool whose work it was.
    pub pool: &'static str,
    /// "message" (a message that could not be processed), "settlement" or "delivery".
    pub source: &'static str,
    pub message_type: String,
    pub message_id: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Value,
    pub reason: DeadLetterReason,
    pub detail: String,
    /// Each attempt's time and error.
    pub attempts: Value,
    pub subject_id: Option<Uuid>,
}

/// record writes the dead letter and, through the outbox, publishes it to the pool's dead-letter
/// queue, inside the caller's transaction. A message dead-lettered twice (a redelivery racing
/// the first) is recorded once. It returns the id, or None when it was already recorded.
pub fn record(conn: &mut PgConnection, names: &Names, letter: NewDeadLetter) -> QueryResult<Option<Uuid>> {
    let id = Uuid::now_v7();
    let now = Utc::now();
    let inserted = diesel::insert_into(dead_letters::table)
        .values((
            dead_letters::id.eq(id),
            dead_letters::pool.eq(letter.pool),
            dead_letters::source.eq(letter.source),
            dead_letters::message_type.eq(&letter.message_type),
            dead_letters::message_id.eq(&letter.message_id),
            dead_letters::exchange.eq(&letter.exchange),
            dead_letters::routing_key.eq(&letter.routing_key),
            dead_letters::payload.eq(&letter.payload),
            dead_letters::headers.eq(&letter.headers),
            dead_letters::reason.eq(letter.reason.as_str()),
            dead_letters::detail.eq(&letter.detail),
            dead_letters::attempts.eq(&letter.attempts),
            dead_letters::subject_id.eq(letter.subject_id),
            dead_letters::created_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?;
    if inserted == 0 {
        return Ok(None);
    }
    let message = DeadLetterMessage {
        message_type: kinds::DEAD_LETTER.into(),
        dead_letter_id: id,
        pool: letter.pool.into(),
        source: letter.source.into(),
        original_type: letter.message_type.clone(),
        reason: letter.reason.as_str().into(),
        detail: letter.detail.clone(),
        created_at: now,
        original: String::from_utf8(letter.payload).ok(),
    };
    outbox::enqueue(
        conn,
        &Outgoing::json(names.dlx(), letter.pool, kinds::DEAD_LETTER, &message).correlated(id.to_string()),
    )?;
    tracing::warn!(dead_letter_id = %id, pool = %letter.pool, reason = letter.reason.as_str(), detail = %letter.detail, "dead-lettered");
    metrics::dead_lettered(letter.pool, letter.reason.as_str());
    Ok(Some(id))
}

/// Filter selects dead letters for the operator commands.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ids: Vec<Uuid>,
    pub pool: Option<String>,
    pub reason: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Include dead letters that were already replayed.
    pub replayed: bool,
}

/// Summary is a dead letter as `dlq list` shows it.
#[derive(Debug, Clone, Serialize, Queryable, Selectable)]
#[diesel(table_name = dead_letters)]
pub struct Summary {
    pub id: Uuid,
    pub pool: String,
    pub source: String,
    pub message_type: String,
    pub reason: String,
    pub detail: String,
    pub created_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replay_count: i32,
    pub subject_id: Option<Uuid>,
}

/// Full is a dead letter with all its evidence, as `dlq show` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Full {
    #[serde(flatten)]
    pub summary: Summary,
    pub message_id: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub headers: Value,
    pub attempts: Value,
    /// The original body: as JSON when it is JSON, as text when it is UTF-8, else as hex.
    pub payload: Value,
    pub audit: Vec<Value>,
}

fn filtered(filter: &Filter) -> dead_letters::BoxedQuery<'static, diesel::pg::Pg> {
    let mut query = dead_letters::table.into_boxed();
    if !filter.ids.is_empty() {
        query = query.filter(dead_letters::id.eq_any(filter.ids.clone()));
    }
    if let Some(pool) = &filter.pool {
        query = query.filter(dead_letters::pool.eq(pool.clone()));
    }
    if let Some(reason) = &filter.reason {
        query = query.filter(dead_letters::reason.eq(reason.clone()));
    }
    if let Some(since) = filter.since {
        query = query.filter(dead_letters::created_at.ge(since));
    }
    if !filter.replayed && filter.ids.is_empty() {
        query = query.filter(dead_letters::replayed_at.is_null());
    }
    query
}

/// list returns the dead letters a filter selects, newest first.
pub fn list(conn: &mut PgConnection, filter: &Filter, limit: i64) -> QueryResult<Vec<Summary>> {
    filtered(filter).order(dead_letters::created_at.desc()).limit(limit).select(Summary::as_select()).load(conn)
}

/// show returns one dead letter with its evidence and its audit trail.
pub fn show(conn: &mut PgConnection, id: Uuid) -> QueryResult<Option<Full>> {
    let Some(summary) = dead_letters::table.find(id).select(Summary::as_select()).first::<Summary>(conn).optional()?
    else {
        return Ok(None);
    };
    let (message_id, exchange, routing_key, headers, attempts, payload): (
        Option<String>,
        Option<String>,
        Option<String>,
        Value,
        Value,
        Vec<u8>,
    ) = dead_letters::table
        .find(id)
        .select((
            dead_letters::message_id,
            dead_letters::exchange,
            dead_letters::routing_key,
            dead_letters::headers,
            dead_letters::attempts,
            dead_letters::payload,
        ))
        .first(conn)?;
    let audit = dead_letter_audit::table
        .filter(dead_letter_audit::dead_letter_id.eq(id))
        .order(dead_letter_audit::id)
        .select((
            dead_letter_audit::action,
            dead_letter_audit::operator,
            dead_letter_audit::note,
            dead_letter_audit::at,
        ))
        .load::<(String, String, Option<String>, DateTime<Utc>)>(conn)?
        .into_iter()
        .map(|(action, operator, note, at)| json!({"action": action, "operator": operator, "note": note, "at": at}))
        .collect();
    Ok(Some(Full { summary, message_id, exchange, routing_key, headers, attempts, payload: readable(&payload), audit }))
}

fn readable(payload: &[u8]) -> Value {
    match std::str::from_utf8(payload) {
        Ok(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())),
        Err(_) => json!({"hex": hex::encode(payload)}),
    }
}

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
        let outbound = letter.exchange.as_deref().filter(|e| *e == names.partners() || *e == names.gateways());
        let (exchange, routing_key) = match (outbound, &letter.routing_key) {
            (Some(exchange), Some(key)) => (exchange.to_string(), key.clone()),
            _ => (names.internal(), names.replay_key(&letter.summary.pool)),
        };
        let message = Outgoing {
            message_id: Uuid::now_v7(),
            exchange,
            routing_key,
            message_type: letter.summary.message_type.clone(),
            correlation_id: Some(id.to_string()),
            headers: json!({REPLAY_RECEIVED_AT: received_at, "x-assetflow-replay-of": id.to_string()}),
            payload,
            available_at: None,
        };
        outbox::enqueue(conn, &message)?;
        Ok(format!("re-published to {} / {}", message.exchange, message.routing_key))
    }
}

/// purge deletes the dead letters a filter selects, leaving an audit row with each one's summary.
pub fn purge(conn: &mut PgConnection, filter: &Filter, operator: &str) -> QueryResult<Vec<Uuid>> {
    conn.transaction(|conn| {
        let letters: Vec<Summary> = filtered(filter).select(Summary::as_select()).load(conn)?;
        for letter in &letters {
            audit(conn, letter.id, "purge", operator, None, letter)?;
        }
        let ids: Vec<Uuid> = letters.iter().map(|l| l.id).collect();
        diesel::delete(dead_letters::table.filter(dead_letters::id.eq_any(&ids))).execute(conn)?;
        Ok(ids)
    })
}

fn audit(
    conn: &mut PgConnection,
    id: Uuid,
    action: &str,
    operator: &str,
    note: Option<&str>,
    summary: &Summary,
) -> QueryResult<()> {
    diesel::insert_into(dead_letter_audit::table)
        .values((
            dead_letter_audit::dead_letter_id.eq(id),
            dead_letter_audit::action.eq(action),
            dead_letter_audit::operator.eq(operator),
            dead_letter_audit::note.eq(note),
            dead_letter_audit::summary.eq(serde_json::to_value(summary).expect("serializes")),
        ))
        .execute(conn)?;
    Ok(())
}

/// backlog counts the dead letters not yet replayed, per pool: the depth an operator must act on.
pub fn backlog(conn: &mut PgConnection) -> QueryResult<Vec<(String, i64)>> {
    dead_letters::table
        .filter(dead_letters::replayed_at.is_null())
        .group_by(dead_letters::pool)
        .select((dead_letters::pool, diesel::dsl::count_star()))
        .load(conn)
}

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
    let detail = format!(
        "the broker dead-lettered it ({}) from {} after {} deliveries, while assetflow could not record it",
        death.get("reason").and_then(Value::as_str).unwrap_or("unknown reason"),
        death.get("queue").and_then(Value::as_str).unwrap_or("its queue"),
        crate::runtime::broker::header_u32(props, "x-delivery-count").unwrap_or(0)
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

/// Recorder consumes the pools' dead-letter queues, so that what the broker dead-letters by
/// itself also lands in the dead_letters table.
pub async fn run_recorder(
    plumbing: Plumbing,
    broker: crate::runtime::broker::Broker,
    pool: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let queue = plumbing.names.dead_letter_queue(pool);
    let handler_app = plumbing.clone();
    let stopping = shutdown.clone();
    crate::runtime::broker::consume(broker, queue, 16, shutdown, move |delivery| {
        let (app, stopping) = (handler_app.clone(), stopping.clone());
        async move {
            let names = app.names.clone();
            let mut delay = std::time::Duration::from_millis(200);
            let (props, data) = (delivery.properties.clone(), delivery.data.clone());
            loop {
                let (names2, props2, data2) = (names.clone(), props.clone(), data.clone());
                let recorded = app
                    .db
                    .run(move |conn| {
                        record_from_broker(conn, &names2, pool, &props2, &data2)
                            .map_err(crate::runtime::db::DbError::from)
                    })
                    .await;
                match recorded {
                    Ok(true) => {
                        app.committed();
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
