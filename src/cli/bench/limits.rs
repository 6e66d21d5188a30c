//! `assetflow bench limits`: what RabbitMQ and PostgreSQL themselves do on this machine, measured
//! the way assetflow uses them, so that the lifecycle's throughput can be read as a share of it.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde::Serialize;

use crate::config::{Config, QueueType};
use crate::runtime::broker::Broker;

#[derive(Debug, Clone, clap::Args)]
pub struct LimitsOptions {
    /// Messages for the broker measurement.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Message size in bytes (assetflow's messages are about this size).
    #[arg(long, default_value_t = 600)]
    pub message_size: usize,
    /// How long the database measurement runs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub db_duration: Duration,
    /// Connections committing at once in the database measurement.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    #[arg(long)]
    pub json: bool,
}

impl Default for LimitsOptions {
    fn default() -> Self {
        LimitsOptions {
            messages: 20_000,
            message_size: 600,
            db_duration: Duration::from_secs(5),
            connections: 8,
            json: false,
        }
    }
}

/// Limits is what the two engines did.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Persistent messages published with confirms and consumed with acknowledgements, a second.
    pub broker_messages_per_second: f64,
    pub queue_type: String,
    pub message_size: usize,
    /// Transactions shaped like a handler's (inbox row, a state row, an outbox row) committed a second.
    pub db_commits_per_second: f64,
    pub db_connections: usize,
}

/// measure runs both measurements against the configured broker and database.
pub async fn measure(config: &Config, options: &LimitsOptions) -> anyhow::Result<Limits> {
    let broker_messages_per_second = broker_limit(config, options).await?;
    let url = super::bench_database_url(&config.database.url, "bench_limits");
    let (duration, connections, size) = (options.db_duration, options.connections, options.message_size);
    let db_commits_per_second =
        tokio::task::spawn_blocking(move || db_limit(&url, duration, connections, size)).await??;
    Ok(Limits {
        broker_messages_per_second,
        queue_type: format!("{:?}", config.amqp.queue_type).to_lowercase(),
        message_size: options.message_size,
        db_commits_per_second,
        db_connections: options.connections,
    })
}

async fn broker_limit(config: &Config, options: &LimitsOptions) -> anyhow::Result<f64> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    // A queue of its own: nothing of assetflow's is declared.
    let broker = Broker::undeclared(config, shutdown.clone());
    let queue = format!("{}.bench.limits.{}", config.amqp.prefix, uuid::Uuid::new_v4().simple());
    let conn = broker.connection().await.ok_or_else(|| anyhow::anyhow!("no broker"))?;
    let channel = conn.create_channel().await?;
    let mut args = FieldTable::default();
    if config.amqp.queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
    }
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await?;
    channel.basic_qos(500, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.as_str().into(), "bench".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let total = options.messages;
    let consuming = tokio::spawn(async move {
        let mut seen = 0;
        while seen < total {
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    delivery.ack(BasicAckOptions::default()).await?;
                    seen += 1;
                }
                Some(Err(e)) => return Err(anyhow::Error::from(e)),
                None => anyhow::bail!("the consumer stopped"),
            }
        }
        Ok(())
    });
    let started = Instant::now();
    let body = vec![b'x'; options.message_size];
    crate::cli::simulate::publisher::publish_burst(&broker, "", &queue, "bench", vec![body; total], 500).await?;
    consuming.await??;
    let elapsed = started.elapsed().as_secs_f64();
    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    shutdown.cancel();
    Ok(total as f64 / elapsed)
}

fn db_limit(url: &str, duration: Duration, connections: usize, size: usize) -> anyhow::Result<f64> {
    let _exclusive = super::exclusive(url)?;
    super::recreate_database(url)?;
    {
        let mut conn = crate::runtime::db::establish(url)?;
        conn.batch_execute(
            "CREATE TABLE inbox (id TEXT PRIMARY KEY, at TIMESTAMPTZ NOT NULL DEFAULT now());
             CREATE TABLE state (id BIGINT PRIMARY KEY, n BIGINT NOT NULL);
             CREATE TABLE outbox (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now());
             INSERT INTO state SELECT i, 0 FROM generate_series(0, 1023) AS i;",
        )?;
    }
    let payload = vec![b'x'; size];
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let commits: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..connections)
            .map(|w| {
                let payload = payload.clone();
                scope.spawn(move || -> anyhow::Result<usize> {
                    let mut conn = crate::runtime::db::establish(url)?;
                    let mut n = 0usize;
                    while Instant::now() < deadline {
                        conn.transaction::<_, diesel::result::Error, _>(|conn| {
                            diesel::sql_query("INSERT INTO inbox (id) VALUES ($1)")
                                .bind::<diesel::sql_types::Text, _>(format!("{w}-{n}"))
                                .execute(conn)?;
                            diesel::sql_query("UPDATE state SET n = n + 1 WHERE id = $1")
                                .bind::<diesel::sql_types::BigInt, _>(((w * 131 + n) % 1024) as i64)
                                .execute(conn)?;
                            diesel::sql_query("INSERT INTO outbox (payload) VALUES ($1)")
                                .bind::<diesel::sql_types::Bytea, _>(&payload)
                                .execute(conn)?;
                            Ok(())
                        })?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("no panic").unwrap_or(0)).sum()
    });
    let elapsed = started.elapsed().as_secs_f64();
    super::drop_database(url)?;
    Ok(commits as f64 / elapsed)
}

/// print shows the limits as a table.
pub fn print(limits: &Limits) {
    println!("{:<52} {:>12}", "LIMIT", "PER SECOND");
    println!(
        "{:<52} {:>12.0}",
        format!(
            "RabbitMQ: {} B persistent messages, {} queue, confirmed and acked",
            limits.message_size, limits.queue_type
        ),
        limits.broker_messages_per_second
    );
    println!(
        "{:<52} {:>12.0}",
        format!("PostgreSQL: handler-shaped commits on {} connections", limits.db_connections),
        limits.db_commits_per_second
    );
}
