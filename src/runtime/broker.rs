//! RabbitMQ: the connection supervisor and the publishing helpers.
//!
//! lapin does not recover connections by itself in a way we can trust (lapin #288 and #450;
//! Vector lost data that way, #19190), so the supervisor owns the loop: connect, declare the
//! topology, hand the connection out, and when it dies, back off and do it all again. Consumers and
//! the outbox relay wait on [`Broker::connection`] and start over with a fresh channel; delivery
//! tags from a dead channel are void, and the messages behind them are redelivered by the broker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{AsyncTcpStream, BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpConfig, Config};
use crate::contracts::topology::{Arg, Topology};
use crate::runtime::metrics;

/// How long a channel operation (opening, set-up, an acknowledgement) may take before the broker is
/// taken to be gone. lapin drops a command queued after its connection's I/O loop has stopped
/// without ever resolving its promise (`InternalRPCHandle::send`), so an unbounded await on a dead
/// connection can wait for ever: a consumer stuck so never starts again on the next connection.
pub const RPC_DEADLINE: Duration = Duration::from_secs(5);

/// bounded awaits a channel operation for at most [`RPC_DEADLINE`].
pub async fn bounded<T>(
    what: &'static str,
    operation: impl std::future::Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(RPC_DEADLINE, operation).await {
        Ok(done) => Ok(done?),
        Err(_) => anyhow::bail!("the broker did not answer {what} within {RPC_DEADLINE:?}"),
    }
}

/// Broker hands out the current connection, or waits for the next one.
#[derive(Clone)]
pub struct Broker {
    current: watch::Receiver<Option<Arc<Connection>>>,
}

impl Broker {
    /// Broker::start spawns the supervisor, which declares `topology` on every connection, and
    /// returns at once; nothing waits for the broker to be up at start-up.
    pub fn start(config: &Config, topology: Topology, shutdown: CancellationToken) -> Broker {
        let (tx, rx) = watch::channel(None);
        let amqp = &config.amqp;
        tokio::spawn(supervise(amqp.clone(), topology, tx, shutdown));
        Broker { current: rx }
    }

    /// Broker::declaring is [`Broker::start`] with assetflow's whole topology: what the service,
    /// the simulators and the tests connect with.
    pub fn declaring(config: &Config, shutdown: CancellationToken) -> Broker {
        Broker::start(config, Topology::new(config), shutdown)
    }

    /// Broker::undeclared starts a supervisor that only connects: for tools that must not declare
    /// assetflow's topology (the benchmarks' own queues, their clean-up).
    pub fn undeclared(config: &Config, shutdown: CancellationToken) -> Broker {
        let mut nothing = Topology::new(config);
        nothing.exchanges.clear();
        nothing.queues.clear();
        nothing.bindings.clear();
        Broker::start(config, nothing, shutdown)
    }

    /// Broker::connection waits for a live connection; None once shutting down.
    pub async fn connection(&self) -> Option<Arc<Connection>> {
        let mut rx = self.current.clone();
        loop {
            if let Some(conn) = rx.borrow_and_update().as_ref()
                && conn.status().connected()
            {
                return Some(conn.clone());
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Broker::is_connected says whether a connection is up right now, for readiness.
    pub fn is_connected(&self) -> bool {
        self.current.borrow().as_ref().is_some_and(|c| c.status().connected())
    }
}

async fn supervise(
    amqp: AmqpConfig,
    topology: Topology,
    tx: watch::Sender<Option<Arc<Connection>>>,
    shutdown: CancellationToken,
) {
    let (min, max) = (amqp.reconnect_min, amqp.reconnect_max);
    let mut backoff = min;
    let mut first = true;
    while !shutdown.is_cancelled() {
        match connect_and_declare(&amqp, &topology).await {
            Ok(conn) => {
                if !first {
                    metrics::reconnected("amqp");
                }
                first = false;
                tracing::info!(url = %crate::config::redact_url(&amqp.url), tls = amqp.uses_tls(), "connected to RabbitMQ");
                backoff = min;
                let conn = Arc::new(conn);
                let mut events = conn.events_listener();
                tx.send_replace(Some(conn.clone()));
                // The connection is dead on an error event, or when its status says so (checked
                // every second in case an event is missed).
                let mut check = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            tx.send_replace(None);
                            let _ = conn.close(200, "shutting down".into()).await;
                            return;
                        }
                        event = events.next() => match event {
                            Some(lapin::Event::Error(e)) => {
                                tracing::warn!(error = %e, "lost the RabbitMQ connection; reconnecting");
                                break;
                            }
                            None => break,
                            Some(_) => {}
                        },
                        _ = check.tick() => if !conn.status().connected() {
                            tracing::warn!("the RabbitMQ connection is closed; reconnecting");
                            break;
                        },
                    }
                }
                tx.send_replace(None);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "cannot connect to RabbitMQ");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}

/// connect opens a connection to the broker in `amqp.url`. For `amqps://` it trusts the system's
/// CA certificates and `amqp.tls_ca_file`, presents `amqp.tls_cert_file` when set, offers no TLS
/// version older than `amqp.tls_min_version`, and checks that the broker's certificate names the
/// URL's host (OpenSSL's hostname verification).
///
/// lapin's own TLS set-up (tcp-stream's `openssl_connector`, fed by an `OwnedTLSConfig`) has no way
/// to set a minimum protocol version, so for `amqps://` assetflow builds the OpenSSL connector
/// itself ([`AmqpConfig::tls`]) and hands lapin the TLS stream through `Connection::connector`,
/// lapin's entry point for a transport of one's own.
pub async fn connect(amqp: &AmqpConfig) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name("assetflow".into());
    let runtime = lapin::runtime::default_runtime()?;
    if !amqp.uses_tls() {
        return Ok(Connection::connect_with_runtime(&amqp.url, props, runtime).await?);
    }
    let connector = amqp.tls()?;
    let uri: AMQPUri = amqp.url.parse().map_err(|e| anyhow::anyhow!("amqp.url: {e}"))?;
    let tls_stream = async move |uri: AMQPUri, runtime| {
        let host = uri.authority.host.as_str();
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, uri.authority.port)).await?.collect();
        let tcp = AsyncTcpStream::connect(&runtime, addresses).await?;
        Ok(tcp.into_openssl(&connector, host).await?)
    };
    Ok(Connection::connector(uri, runtime, tls_stream, props).await?)
}

async fn connect_and_declare(amqp: &AmqpConfig, topology: &Topology) -> anyhow::Result<Connection> {
    let conn = connect(amqp).await?;
    let channel = conn.create_channel().await?;
    declare(topology, &channel).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(conn)
}

/// properties builds the AMQP properties every assetflow publish carries: message id,
/// correlation id, type, content type, timestamp and persistence.
pub fn properties(
    message_id: &str,
    message_type: &str,
    correlation_id: Option<&str>,
    headers: FieldTable,
) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_message_id(message_id.into())
        .with_type(message_type.into())
        .with_content_type("application/json".into())
        .with_timestamp(chrono::Utc::now().timestamp() as u64)
        .with_app_id("assetflow".into())
        // 2 = persistent: the message survives a broker restart.
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(id) = correlation_id {
        props = props.with_correlation_id(id.into());
    }
    props
}

/// headers_from_json turns a JSON object of strings and integers into AMQP headers.
pub fn headers_from_json(value: &serde_json::Value) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(object) = value.as_object() {
        for (k, v) in object {
            let v = match v {
                serde_json::Value::String(s) => AMQPValue::LongString(s.as_str().into()),
                serde_json::Value::Number(n) if n.is_i64() => AMQPValue::LongLongInt(n.as_i64().unwrap_or_default()),
                other => AMQPValue::LongString(other.to_string().as_str().into()),
            };
            table.insert(ShortString::from(k.as_str()), v);
        }
    }
    table
}

/// header_str reads a string header.
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// header_u32 reads an integer header such as the quorum queue's `x-delivery-count`.
pub fn header_u32(props: &BasicProperties, key: &str) -> Option<u32> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongLongInt(v) => u32::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u32::try_from(*v).ok(),
        AMQPValue::ShortInt(v) => u32::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(*v),
        AMQPValue::ShortUInt(v) => Some(u32::from(*v)),
        AMQPValue::ShortShortInt(v) => u32::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u32::from(*v)),
        _ => None,
    }
}

/// consume runs `handle` for every message on `queue` until shutdown, re-subscribing after a
/// lost connection. A message is acknowledged when `handle` returns true, and returned to the
/// queue when it returns false.
pub async fn consume<F, Fut>(
    broker: Broker,
    queue: String,
    prefetch: u16,
    shutdown: tokio_util::sync::CancellationToken,
    handle: F,
) where
    F: Fn(lapin::message::Delivery) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    use futures::stream::FuturesUnordered;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    while !shutdown.is_cancelled() {
        let Some(conn) = broker.connection().await else {
            return;
        };
        let result: anyhow::Result<()> = async {
            let channel = bounded("channel.open", conn.create_channel()).await?;
            bounded("basic.qos", channel.basic_qos(prefetch, BasicQosOptions::default())).await?;
            let consume_options = BasicConsumeOptions::default();
            let mut consumer = bounded(
                "basic.consume",
                channel.basic_consume(queue.as_str().into(), "".into(), consume_options, FieldTable::default()),
            )
            .await?;
            // Up to `prefetch` messages are handled at once, as a real partner or gateway answers
            // many requests at a time: one that waited for each answer's confirm before taking
            // the next would be the slowest part of any benchmark it takes part in.
            let mut in_hand = FuturesUnordered::new();
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => {
                        // What is in hand is finished and acknowledged; nothing new is taken.
                        while let Some((acker, done)) = in_hand.next().await {
                            settle_simulated(acker, done).await;
                        }
                        return Ok(());
                    }
                    Some((acker, done)) = in_hand.next(), if !in_hand.is_empty() => {
                        settle_simulated(acker, done).await;
                        continue;
                    }
                    next = consumer.next(), if in_hand.len() < usize::from(prefetch.max(1)) => next,
                };
                let Some(delivery) = next else { return Ok(()) };
                let delivery = delivery?;
                let acker = delivery.acker.clone();
                let handled = handle(delivery);
                in_hand.push(async move { (acker, handled.await) });
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

/// settle_simulated acknowledges a message a simulator handled, or returns it to its queue.
async fn settle_simulated(acker: lapin::Acker, done: bool) {
    let _ = if done {
        bounded("basic.ack", acker.ack(lapin::options::BasicAckOptions::default())).await
    } else {
        bounded("basic.nack", acker.nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() }))
            .await
    };
}

/// declare declares a whole topology. Declaring what exists with the same arguments is a
/// no-op, so this runs on every connection.
pub async fn declare(topology: &Topology, channel: &Channel) -> lapin::Result<()> {
    for exchange in &topology.exchanges {
        channel
            .exchange_declare(
                exchange.name.as_str().into(),
                exchange.kind.clone(),
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                field_table(&exchange.arguments),
            )
            .await?;
    }
    for queue in &topology.queues {
        channel
            .queue_declare(
                queue.name.as_str().into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                field_table(&queue.arguments),
            )
            .await?;
    }
    for binding in &topology.bindings {
        channel
            .queue_bind(
                binding.queue.as_str().into(),
                binding.exchange.as_str().into(),
                binding.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

fn field_table(arguments: &[(&'static str, Arg)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        let value = match value {
            Arg::Str(s) => AMQPValue::LongString(s.as_str().into()),
            Arg::Int(i) => AMQPValue::LongLongInt(*i),
        };
        table.insert(ShortString::from(*key), value);
    }
    table
}
