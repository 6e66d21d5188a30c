//! The lifecycle benchmark's figures: what it reports, the bound the limits imply, and the table
//! `print` shows.

use serde::Serialize;

use super::Stage;
use crate::cli::bench::limits::Limits;
use crate::contracts::messages::kinds;

/// Percentiles of a latency, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub(super) fn of(mut ms: Vec<f64>) -> Percentiles {
        if ms.is_empty() {
            return Percentiles::default();
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        Percentiles {
            samples: ms.len(),
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: *ms.last().expect("not empty"),
        }
    }
}

/// Figures is the benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub orders: usize,
    pub completed: i64,
    pub exchanged: usize,
    pub seconds: f64,
    pub orders_per_second: f64,
    pub order_to_certificate: Percentiles,
    pub exchange_to_asset: Percentiles,
    /// Where an order's time goes, stage by stage (see [`stages`](super::queries::stages)).
    pub stages: Vec<Stage>,
    pub cpu_seconds: f64,
    pub peak_rss_mb: f64,
    /// Messages through the broker, each counted once, as the limit counts them: published (by
    /// assetflow or a simulator) and consumed (by assetflow or a simulator). See [`broker_messages`].
    pub messages_per_order: f64,
    /// Messages assetflow consumed plus messages it published: an internal message is both.
    pub handled_per_order: f64,
    /// Commits of transactions that wrote (see `commits`).
    pub commits_per_order: f64,
    pub limits: Option<Limits>,
    /// The throughput the limits allow for this many messages and commits per order, each
    /// engine's limit taken on its own: min(broker rate ÷ messages, commit rate ÷ commits).
    pub bound_orders_per_second: Option<f64>,
    pub ratio_to_bound: Option<f64>,
    /// The same bound when the two engines share the machine, as they do here: each limit was
    /// measured with the whole machine, so an order costs the sum of its two shares of it,
    /// 1 ÷ (messages ÷ broker rate + commits ÷ commit rate).
    pub shared_bound_orders_per_second: Option<f64>,
    pub ratio_to_shared_bound: Option<f64>,
}

/// broker_messages is how many messages went through the broker, from what assetflow counted: each
/// it published, and each it consumed that came from outside (an order, a partner's result, a
/// gateway's receipt). A message from one pool to another (`kinds::INTERNAL`) is both published
/// and consumed by assetflow, but is one message for the broker: one publish, one delivery, one
/// ack, the unit of the limit's messages a second.
pub(super) fn broker_messages(published: f64, received: f64, received_internal: f64) -> f64 {
    published + received - received_internal
}

/// is_internal says whether a `/metrics` series is labelled with an internal message type.
pub(super) fn is_internal(series: &str) -> bool {
    kinds::INTERNAL.iter().any(|t| series.contains(&format!("type=\"{t}\"")))
}

/// Bounds are the throughputs that the limits allow for an order's messages and commits.
pub(super) fn bounds(limits: &Limits, messages_per_order: f64, commits_per_order: f64) -> (f64, f64) {
    let broker = messages_per_order / limits.broker_messages_per_second;
    let database = commits_per_order / limits.db_commits_per_second;
    (1.0 / broker.max(database), 1.0 / (broker + database))
}

/// print shows the figures as a table.
pub fn print(f: &Figures) {
    println!(
        "{} orders placed, {} completed, {} certificates exchanged, in {:.2}s",
        f.orders, f.completed, f.exchanged, f.seconds
    );
    println!("{:<44} {:>12}", "FIGURE", "VALUE");
    println!("{:<44} {:>12.0}", "orders completed per second", f.orders_per_second);
    for (name, p) in [
        ("order published → certificate acknowledged", &f.order_to_certificate),
        ("exchange published → asset acknowledged", &f.exchange_to_asset),
    ] {
        println!("{name} ({} samples)", p.samples);
        println!("{:<44} {:>9.1} ms", "  p50", p.p50_ms);
        println!("{:<44} {:>9.1} ms", "  p95", p.p95_ms);
        println!("{:<44} {:>9.1} ms", "  p99", p.p99_ms);
        println!("{:<44} {:>9.1} ms", "  max", p.max_ms);
    }
    if !f.stages.is_empty() {
        println!("where an order's time goes (mean, p50, p99, ms)");
        for s in &f.stages {
            println!("  {:<44} {:>7.1} {:>7.1} {:>7.1}", s.stage, s.mean_ms, s.p50_ms, s.p99_ms);
        }
    }
    println!("{:<44} {:>12.2}", "assetflow CPU seconds", f.cpu_seconds);
    println!("{:<44} {:>9.1} MB", "assetflow peak RSS", f.peak_rss_mb);
    println!("{:<44} {:>12.2}", "broker messages per order (each once)", f.messages_per_order);
    println!("{:<44} {:>12.2}", "  assetflow's share (consumed + published)", f.handled_per_order);
    println!("{:<44} {:>12.2}", "writing database commits per order", f.commits_per_order);
    if let (Some(limits), Some(bound), Some(ratio)) = (&f.limits, f.bound_orders_per_second, f.ratio_to_bound) {
        println!();
        crate::cli::bench::limits::print(limits);
        println!("{:<44} {:>12.0}", "bound these imply, orders per second", bound);
        println!("{:<44} {:>11.0}%", "lifecycle throughput / bound", ratio * 100.0);
        if let (Some(shared), Some(ratio)) = (f.shared_bound_orders_per_second, f.ratio_to_shared_bound) {
            println!("{:<44} {:>12.0}", "the same, the engines sharing the machine", shared);
            println!("{:<44} {:>11.0}%", "lifecycle throughput / shared bound", ratio * 100.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(broker: f64, database: f64) -> Limits {
        Limits {
            broker_messages_per_second: broker,
            queue_type: "quorum".into(),
            message_size: 600,
            db_commits_per_second: database,
            db_connections: 8,
        }
    }

    #[test]
    fn a_message_between_pools_is_one_broker_message_and_one_from_outside_is_one_too() {
        // An order consumed (from a terminal), an instruction published (to a partner), and an
        // issuance request published and consumed (pool to pool): three broker messages.
        assert_eq!(broker_messages(2.0, 2.0, 1.0), 3.0);
        assert!(is_internal(r#"assetflow_messages_received_total{pool="issuance",type="issuance.requested"}"#));
        assert!(!is_internal(r#"assetflow_messages_received_total{pool="settlement",type="order.purchase"}"#));
    }

    #[test]
    fn the_bound_is_the_busier_engine_alone_and_the_sum_of_both_when_they_share_the_machine() {
        // 10 messages at 10,000/s is 1 ms of the broker; 2.5 commits at 5,000/s, 0.5 ms of the database.
        let (alone, shared) = bounds(&limits(10_000.0, 5_000.0), 10.0, 2.5);
        assert!((alone - 1_000.0).abs() < 1e-6, "{alone}");
        assert!((shared - 1_000.0 / 1.5).abs() < 1e-6, "{shared}");
    }

    #[test]
    fn fewer_than_one_commit_an_order_counts_as_what_it_is() {
        // Batched handlers can commit several orders at once: 0.5 commits at 1,000/s is 0.5 ms.
        let (alone, shared) = bounds(&limits(100_000.0, 1_000.0), 10.0, 0.5);
        assert!((alone - 2_000.0).abs() < 1e-6, "{alone}");
        assert!((shared - 1.0 / 0.0006).abs() < 1e-6, "{shared}");
    }
}
