//! Health: `/healthz` (the process is alive), `/readyz` (connected, consuming, and the outbox
//! relay making progress) and `/metrics`, on one listener.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::contracts::topology::Pool;
use crate::runtime::Plumbing;
use crate::runtime::broker::Broker;
use crate::runtime::progress::Progress;

#[derive(Clone)]
struct Http {
    progress: Arc<Progress>,
    broker: Broker,
    metrics: PrometheusHandle,
    relay_stall: Duration,
    /// False for a scheduler-only process, which consumes nothing.
    expect_consumers: bool,
}

/// metrics_handle installs the Prometheus recorder once per process.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                // Up to an hour: end-to-end times include retransmissions and partner re-sends.
                .set_buckets(&[
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    3600.0,
                ])
                .expect("static buckets")
                .install_recorder()
                .expect("the metrics recorder is installed once")
        })
        .clone()
}

/// serve runs the listener until shutdown.
pub async fn serve(
    listen: &str,
    progress: Arc<Progress>,
    broker: Broker,
    relay_stall: Duration,
    expect_consumers: bool,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let state = Http { progress, broker, metrics: metrics_handle(), relay_stall, expect_consumers };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(|State(s): State<Http>| async move { s.metrics.render() }))
        .with_state(state);
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}

async fn ready(State(s): State<Http>) -> (StatusCode, String) {
    let mut problems = Vec::new();
    if !s.broker.is_connected() {
        problems.push("not connected to RabbitMQ".to_string());
    }
    if s.expect_consumers && s.progress.consumers.load(Ordering::Relaxed) == 0 {
        problems.push("no pool is consuming".to_string());
    }
    let age = s.progress.relay_age();
    if age > s.relay_stall {
        problems.push(format!("the outbox relay has made no progress for {}s", age.as_secs()));
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

/// sample keeps the sampled gauges current: every queue's depth and consumers (a passive declare
/// each: the broker counts, nothing scans a table), the dead letters awaiting an operator, and the
/// subscriptions this process holds.
pub async fn sample(
    plumbing: Plumbing,
    broker: Broker,
    queues: Vec<String>,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut channel: Option<lapin::Channel> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        crate::runtime::metrics::pool_consumers(plumbing.progress.consumers.load(Ordering::Relaxed));
        if broker.is_connected() {
            if channel.as_ref().is_none_or(|c| !c.status().connected())
                && let Some(conn) = broker.connection().await
            {
                channel = crate::runtime::broker::bounded("channel.open", conn.create_channel()).await.ok();
            }
            if let Some(ch) = &channel {
                for queue in &queues {
                    let options = QueueDeclareOptions { passive: true, ..Default::default() };
                    let declare = ch.queue_declare(queue.as_str().into(), options, FieldTable::default());
                    match crate::runtime::broker::bounded("queue.declare", declare).await {
                        Ok(q) => crate::runtime::metrics::queue_depth(queue, q.message_count(), q.consumer_count()),
                        Err(e) => {
                            tracing::debug!(queue, error = %e, "cannot sample the queue");
                            channel = None;
                            break;
                        }
                    }
                }
            }
        }
        match plumbing
            .db
            .run(|conn| crate::runtime::dead_letter::backlog(conn).map_err(crate::runtime::db::DbError::from))
            .await
        {
            Ok(rows) => {
                for pool in Pool::ALL {
                    let count = rows.iter().find(|(p, _)| p == pool.as_str()).map(|(_, n)| *n).unwrap_or(0);
                    crate::runtime::metrics::dead_letters_pending(pool.as_str(), count);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot count dead letters"),
        }
    }
}
