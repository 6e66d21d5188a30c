//! The runtime's metrics: messages, batches, dead letters, the outbox, queues, connections; and
//! [`held`], which holds a transaction's metric updates until it commits. The domain's and the
//! service's metrics live on their own floors, each with its catalogue.
//!
//! Names follow `assetflow_<name>_<unit>`; counters end in `_total`; labels are bounded (pool,
//! message type, outcome, reason, job, partner, kind), never an id or an error string.

use std::cell::RefCell;
use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// A metric update waiting for its transaction to commit.
type Update = Box<dyn FnOnce()>;

thread_local! {
    /// The updates held back by the transaction running on this thread, if one is (see [`held`]).
    static HELD: RefCell<Option<Vec<Update>>> = const { RefCell::new(None) };
}

/// held runs a database transaction and holds back the metric updates made inside it: they are
/// made if it returns Ok (it committed), and dropped if it fails (it rolled back). Work that is
/// undone and done again, a failed batch handled message by message or a retried handler, is then
/// counted once, and a dry run not at all. A `held` inside another joins it.
pub fn held<T, E>(transaction: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    if HELD.with(|held| held.borrow().is_some()) {
        return transaction();
    }
    /// Stops holding even when the transaction panics.
    struct Hold;
    impl Drop for Hold {
        fn drop(&mut self) {
            HELD.with(|held| held.borrow_mut().take());
        }
    }
    HELD.with(|held| *held.borrow_mut() = Some(Vec::new()));
    let hold = Hold;
    let result = transaction();
    let updates = HELD.with(|held| held.borrow_mut().take()).unwrap_or_default();
    drop(hold);
    if result.is_ok() {
        updates.into_iter().for_each(|update| update());
    }
    result
}

/// record makes a metric update now or, inside [`held`], once the transaction has committed.
pub fn record(update: impl FnOnce() + 'static) {
    let update: Update = Box::new(update);
    let now = HELD.with(|held| match held.borrow_mut().as_mut() {
        Some(updates) => {
            updates.push(update);
            None
        }
        None => Some(update),
    });
    if let Some(update) = now {
        update();
    }
}

/// message_received counts a message taken from a pool queue.
pub fn message_received(pool: &str, message_type: &str) {
    counter!("assetflow_messages_received_total", "pool" => pool.to_string(), "type" => bounded_type(message_type))
        .increment(1);
}

/// message_handled records how a message ended (acked, requeued, deferred, dead_lettered, duplicate)
/// and how long its handler took.
pub fn message_handled(pool: &str, message_type: &str, outcome: &'static str, elapsed: Duration) {
    let message_type = bounded_type(message_type);
    counter!("assetflow_messages_total", "pool" => pool.to_string(), "type" => message_type.clone(), "outcome" => outcome).increment(1);
    histogram!("assetflow_handler_duration_seconds", "pool" => pool.to_string(), "type" => message_type)
        .record(elapsed.as_secs_f64());
}

/// batch_committed records how many messages a pool's transaction carried out (1 for a message
/// handled alone).
pub fn batch_committed(pool: &str, messages: usize) {
    histogram!("assetflow_batch_messages", "pool" => pool.to_string()).record(messages as f64);
}

/// dead_lettered counts a dead letter by pool and reason.
pub fn dead_lettered(pool: &str, reason: &str) {
    let (pool, reason) = (pool.to_string(), reason.to_string());
    record(move || counter!("assetflow_dead_letters_total", "pool" => pool, "reason" => reason).increment(1));
}

/// outbox_published counts messages the relay published, and the ones the broker refused.
pub fn outbox_published(published: u64, failed: u64) {
    counter!("assetflow_outbox_published_total").increment(published);
    if failed > 0 {
        counter!("assetflow_outbox_publish_failures_total").increment(failed);
    }
}

/// outbox_backlog sets the unsent row count and the age of the oldest.
pub fn outbox_backlog(rows: i64, oldest_age: Duration) {
    gauge!("assetflow_outbox_backlog_messages").set(rows as f64);
    gauge!("assetflow_outbox_oldest_age_seconds").set(oldest_age.as_secs_f64());
}

/// queue_depth sets a sampled queue's ready messages and consumers.
pub fn queue_depth(queue: &str, messages: u32, consumers: u32) {
    gauge!("assetflow_queue_messages", "queue" => queue.to_string()).set(f64::from(messages));
    gauge!("assetflow_queue_consumers", "queue" => queue.to_string()).set(f64::from(consumers));
}

/// dead_letters_pending sets the dead letters not yet replayed, per pool: what an operator owes.
pub fn dead_letters_pending(pool: &str, count: i64) {
    gauge!("assetflow_dead_letters_pending", "pool" => pool.to_string()).set(count as f64);
}

/// pool_consumers sets the subscriptions this process holds.
pub fn pool_consumers(count: u32) {
    gauge!("assetflow_pool_consumers").set(f64::from(count));
}

/// db_connection_opened counts a new PostgreSQL connection; after start-up, a rise means the
/// pool replaced broken connections (a database restart).
pub fn db_connection_opened() {
    counter!("assetflow_db_connections_opened_total").increment(1);
}

/// db_checkout_timed_out counts a handler that waited too long for a connection.
pub fn db_checkout_timed_out() {
    counter!("assetflow_db_checkout_timeouts_total").increment(1);
}

/// reconnected counts a reconnection to RabbitMQ ("amqp") or a replaced PostgreSQL connection
/// ("postgres").
pub fn reconnected(target: &'static str) {
    counter!("assetflow_reconnects_total", "target" => target).increment(1);
}

/// Message types come from outside: anything assetflow does not know is folded into "unknown" so
/// that a hostile publisher cannot blow up the label set.
fn bounded_type(message_type: &str) -> String {
    if crate::contracts::schema::is_known(message_type) { message_type.to_string() } else { "unknown".to_string() }
}

/// register describes the runtime's catalogued metrics (their HELP lines) and creates the counters whose
/// label sets are known in advance at zero: a counter that first appears at its first increment
/// hides that increment from rate() and increase().
pub fn register(pools: &[&'static str]) {
    describe(CATALOGUE);
    counter!("assetflow_reconnects_total", "target" => "amqp").absolute(0);
    counter!("assetflow_reconnects_total", "target" => "postgres").absolute(0);
    counter!("assetflow_outbox_published_total").absolute(0);
    counter!("assetflow_outbox_publish_failures_total").absolute(0);
    counter!("assetflow_db_checkout_timeouts_total").absolute(0);
    for &pool in pools {
        for reason in crate::contracts::dead_letter::DeadLetterReason::ALL {
            counter!("assetflow_dead_letters_total", "pool" => pool, "reason" => reason.as_str()).absolute(0);
        }
    }
}

/// describe gives each metric of a catalogue its HELP line.
pub fn describe(catalogue: &[Metric]) {
    for metric in catalogue {
        match metric.kind {
            "counter" => metrics::describe_counter!(metric.name, metric.help),
            "gauge" => metrics::describe_gauge!(metric.name, metric.help),
            _ => metrics::describe_histogram!(metric.name, metric.help),
        }
    }
}

/// Metric is one entry of a catalogue.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Metric {
    pub name: &'static str,
    /// counter, gauge or histogram.
    pub kind: &'static str,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

pub const fn m(name: &'static str, kind: &'static str, labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric { name, kind, labels, help }
}

/// CATALOGUE is every metric the runtime emits; `service::metrics::catalogue` is every metric
/// assetflow emits, the one the dashboard, the alert rules and the docs are checked against.
pub const CATALOGUE: &[Metric] = &[
    m("assetflow_messages_received_total", "counter", &["pool", "type"], "Messages taken from a pool's queues."),
    m(
        "assetflow_messages_total",
        "counter",
        &["pool", "type", "outcome"],
        "Messages handled, by outcome: acked, duplicate, requeued, dead_lettered (and deferred, once a handler defers).",
    ),
    m(
        "assetflow_handler_duration_seconds",
        "histogram",
        &["pool", "type"],
        "Time from taking a message to settling it with the broker.",
    ),
    m(
        "assetflow_batch_messages",
        "histogram",
        &["pool"],
        "Messages a pool's handler took in one transaction, duplicates included (1 for a message handled alone).",
    ),
    m("assetflow_dead_letters_total", "counter", &["pool", "reason"], "Dead letters recorded."),
    m("assetflow_dead_letters_pending", "gauge", &["pool"], "Dead letters not replayed yet (sampled)."),
    m("assetflow_outbox_published_total", "counter", &[], "Outbox messages the broker confirmed."),
    m(
        "assetflow_outbox_publish_failures_total",
        "counter",
        &[],
        "Outbox messages not confirmed (nacked, returned, or the channel lost); they are published again.",
    ),
    m("assetflow_outbox_backlog_messages", "gauge", &[], "Outbox rows waiting to be published."),
    m("assetflow_outbox_oldest_age_seconds", "gauge", &[], "Age of the oldest outbox row: the relay's lag."),
    m(
        "assetflow_queue_messages",
        "gauge",
        &["queue"],
        "Messages ready in each queue (sampled with a passive declare).",
    ),
    m("assetflow_queue_consumers", "gauge", &["queue"], "Consumers on each queue (sampled)."),
    m("assetflow_pool_consumers", "gauge", &[], "Queue subscriptions this process holds."),
    m(
        "assetflow_reconnects_total",
        "counter",
        &["target"],
        "Reconnections: to RabbitMQ (target amqp), and broken PostgreSQL connections replaced (target postgres).",
    ),
    m(
        "assetflow_db_connections_opened_total",
        "counter",
        &[],
        "PostgreSQL connections opened; a rise after start-up means broken ones were replaced.",
    ),
    m("assetflow_db_checkout_timeouts_total", "counter", &[], "Waits for a database connection that timed out."),
];

/// check_catalogue asserts that the metrics a source file emits (before its catalogue) are
/// exactly those its catalogue lists, each named as the conventions say.
#[cfg(test)]
pub(crate) fn check_catalogue(source: &str, catalogue: &[Metric]) {
    let code = &source[..source.find("CATALOGUE: &[Metric]").expect("the catalogue")];
    let mut emitted: Vec<&str> = code
        .match_indices("!(\"assetflow_")
        .map(|(i, _)| {
            let rest = &code[i + 3..];
            &rest[..rest.find('"').expect("a closing quote")]
        })
        .collect();
    emitted.sort();
    emitted.dedup();
    let mut catalogued: Vec<&str> = catalogue.iter().map(|m| m.name).collect();
    catalogued.sort();
    assert_eq!(emitted, catalogued);
    for metric in catalogue {
        assert!(metric.name.starts_with("assetflow_"));
        assert_eq!(metric.name.ends_with("_total"), metric.kind == "counter", "{}", metric.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_letters(render: &str) -> Vec<&str> {
        render.lines().filter(|l| l.starts_with("assetflow_dead_letters_total")).collect()
    }

    /// Metrics recorded inside a transaction count once it commits, and never if it rolls back.
    #[test]
    fn a_transaction_that_rolls_back_leaves_no_metric_and_one_that_commits_leaves_its_own() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let rolled_back: Result<(), ()> = held(|| {
                dead_lettered("settlement", "malformed");
                assert!(dead_letters(&handle.render()).is_empty(), "held back while the transaction runs");
                Err(())
            });
            assert!(rolled_back.is_err());
            assert!(dead_letters(&handle.render()).is_empty(), "dropped with the rollback");

            let committed: Result<(), ()> = held(|| {
                dead_lettered("settlement", "malformed");
                held(|| {
                    dead_lettered("settlement", "malformed");
                    Ok::<(), ()>(())
                })
            });
            assert!(committed.is_ok());
            assert_eq!(
                dead_letters(&handle.render()),
                vec!["assetflow_dead_letters_total{pool=\"settlement\",reason=\"malformed\"} 2"]
            );

            // A panic inside stops the holding: what comes after is recorded at once.
            let _ = std::panic::catch_unwind(|| held(|| -> Result<(), ()> { panic!("in the transaction") }));
            dead_lettered("settlement", "malformed");
            assert_eq!(
                dead_letters(&handle.render()),
                vec!["assetflow_dead_letters_total{pool=\"settlement\",reason=\"malformed\"} 3"]
            );
        });
    }

    /// Every metric this file emits is in its catalogue, and every catalogued one is emitted.
    #[test]
    fn the_catalogue_lists_exactly_the_emitted_metrics() {
        check_catalogue(include_str!("metrics.rs"), CATALOGUE);
    }
}
