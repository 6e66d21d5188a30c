//! One lifecycle run's own figures: what it measured of assetflow, and the table `print` shows.
//! The limits, the bound they imply and the summary over runs are `report.rs`.

use serde::Serialize;

use super::Stage;
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

/// Figures is what one run measured.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_between_pools_is_one_broker_message_and_one_from_outside_is_one_too() {
        // An order consumed (from a terminal), an instruction published (to a partner), and an
        // issuance request published and consumed (pool to pool): three broker messages.
        assert_eq!(broker_messages(2.0, 2.0, 1.0), 3.0);
        assert!(is_internal(r#"assetflow_messages_received_total{pool="issuance",type="issuance.requested"}"#));
        assert!(!is_internal(r#"assetflow_messages_received_total{pool="settlement",type="order.purchase"}"#));
    }
}
