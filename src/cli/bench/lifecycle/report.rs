//! The lifecycle benchmark's report: each run against the limits measured before and after it,
//! the bound those imply, the median and spread over the runs, and whether the machine was busy.
//!
//! A ratio to the bound moves with the limits, and the broker's limit moves between identical
//! measurements. The bound is therefore computed from the higher of each engine's two
//! measurements around the run (RabbitMQ's and PostgreSQL's separately): a limit that happened to
//! be measured low cannot flatter the ratio, only one measured high can lower it.

use serde::Serialize;

use super::figures::{self, Figures};
use super::seed::Seeded;
use crate::cli::bench::limits::Limits;
use crate::cli::bench::machine::{Busy, Party};

/// LimitsTaken is one measurement of the limits, with what else the machine did meanwhile.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsTaken {
    #[serde(flatten)]
    pub limits: Limits,
    pub busy: Option<Busy>,
}

/// Bound is what the limits allow a run, from the conservative limits.
#[derive(Debug, Clone, Serialize)]
pub struct Bound {
    /// The higher of the broker's two measurements, messages a second.
    pub broker_messages_per_second: f64,
    /// The higher of the database's two measurements, commits a second.
    pub db_commits_per_second: f64,
    /// The throughput these allow for the run's messages and commits per order, each engine's
    /// limit taken on its own: min(broker rate ÷ messages, commit rate ÷ commits).
    pub bound_orders_per_second: f64,
    pub ratio_to_bound: f64,
    /// The same bound when the two engines share the machine, as they do here: each limit was
    /// measured with the whole machine, so an order costs the sum of its two shares of it,
    /// 1 ÷ (messages ÷ broker rate + commits ÷ commit rate).
    pub shared_bound_orders_per_second: f64,
    pub ratio_to_shared_bound: f64,
}

/// conservative is the higher of each engine's two measurements: the broker's messages a second
/// and the database's commits a second. A higher limit gives a higher bound and a lower ratio.
pub(super) fn conservative(before: &Limits, after: &Limits) -> (f64, f64) {
    (
        before.broker_messages_per_second.max(after.broker_messages_per_second),
        before.db_commits_per_second.max(after.db_commits_per_second),
    )
}

/// bounds are the throughputs that these limits allow for an order's messages and commits: each
/// engine alone, and the two sharing the machine.
pub(super) fn bounds(broker: f64, database: f64, messages_per_order: f64, commits_per_order: f64) -> (f64, f64) {
    let broker = messages_per_order / broker;
    let database = commits_per_order / database;
    (1.0 / broker.max(database), 1.0 / (broker + database))
}

impl Bound {
    /// Bound::of is the bound of a run from the limits measured before and after it.
    pub fn of(before: &Limits, after: &Limits, figures: &Figures) -> Bound {
        let (broker, database) = conservative(before, after);
        let (bound, shared) = bounds(broker, database, figures.messages_per_order, figures.commits_per_order);
        Bound {
            broker_messages_per_second: broker,
            db_commits_per_second: database,
            bound_orders_per_second: bound,
            ratio_to_bound: figures.orders_per_second / bound,
            shared_bound_orders_per_second: shared,
            ratio_to_shared_bound: figures.orders_per_second / shared,
        }
    }
}

/// Run is one run with what surrounded it.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// From 1.
    pub run: usize,
    pub figures: Figures,
    /// What else the machine did from the first order placed to the last completed.
    pub busy: Option<Busy>,
    /// The limits measured before the run and after it (the after of one run is the before of the
    /// next); none with `--no-limits`.
    pub limits_before: Option<LimitsTaken>,
    pub limits_after: Option<LimitsTaken>,
    pub bound: Option<Bound>,
}

impl Run {
    /// Run::new is a run, with its bound when both limits were measured.
    pub fn new(
        run: usize,
        figures: Figures,
        busy: Option<Busy>,
        limits_before: Option<LimitsTaken>,
        limits_after: Option<LimitsTaken>,
    ) -> Run {
        let bound = match (&limits_before, &limits_after) {
            (Some(before), Some(after)) => Some(Bound::of(&before.limits, &after.limits, &figures)),
            _ => None,
        };
        Run { run, figures, busy, limits_before, limits_after, bound }
    }

    /// Run::was_busy says whether the machine was busy during the run or its limits.
    fn was_busy(&self) -> bool {
        let limits = |l: &Option<LimitsTaken>| l.as_ref().and_then(|l| l.busy.as_ref()).is_some_and(|b| b.busy);
        self.busy.as_ref().is_some_and(|b| b.busy) || limits(&self.limits_before) || limits(&self.limits_after)
    }
}

/// Spread is the median of some figures, with their lowest and highest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Spread::of is the spread of `values`; the median of an even number of them is the mean
    /// of the middle two. None when there are none.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let (first, last) = (*v.first()?, *v.last()?);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
        Some(Spread { median, min: first, max: last })
    }
}

/// Summary is the runs taken together.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub runs: usize,
    pub orders_per_second: Spread,
    /// Over the runs with a bound; none with `--no-limits`.
    pub ratio_to_bound: Option<Spread>,
    pub ratio_to_shared_bound: Option<Spread>,
    /// The runs (from 1) during which, or during whose limits, the machine was busy.
    pub busy_runs: Vec<usize>,
}

/// Report is the benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The completed orders each run's database held before it began (`--seed-orders`).
    pub seeded: Seeded,
    pub runs: Vec<Run>,
    pub summary: Summary,
}

impl Report {
    /// Report::new summarises the runs (at least one).
    pub fn new(seeded: Seeded, runs: Vec<Run>) -> Report {
        let of = |f: fn(&Run) -> Option<f64>| Spread::of(&runs.iter().filter_map(f).collect::<Vec<_>>());
        let summary = Summary {
            runs: runs.len(),
            orders_per_second: of(|r| Some(r.figures.orders_per_second)).unwrap_or(Spread {
                median: 0.0,
                min: 0.0,
                max: 0.0,
            }),
            ratio_to_bound: of(|r| r.bound.as_ref().map(|b| b.ratio_to_bound)),
            ratio_to_shared_bound: of(|r| r.bound.as_ref().map(|b| b.ratio_to_shared_bound)),
            busy_runs: runs.iter().filter(|r| r.was_busy()).map(|r| r.run).collect(),
        };
        Report { seeded, runs, summary }
    }
}

fn percent(share: Option<f64>) -> String {
    share.map(|s| format!("{:.1}%", s * 100.0)).unwrap_or_else(|| "-".into())
}

/// print shows the report: a single run's figures in full, then every run's in a table, the
/// summary over several, and a warning for each time the machine was busy.
pub fn print(report: &Report) {
    if report.seeded.orders > 0 {
        println!(
            "each run's database held {} completed orders before it ({} exchanged), seeded in {:.1}s",
            report.seeded.orders, report.seeded.exchanged, report.seeded.seconds
        );
    }
    if let [run] = report.runs.as_slice() {
        figures::print(&run.figures);
        println!();
    }
    println!(
        "{:<4} {:>7} {:>9} {:>9} {:>7} {:>11} {:>14} {:>10} {:>6}",
        "RUN", "ORDERS", "ORDERS/S", "P99 MS", "CPU S", "MSGS/ORDER", "COMMITS/ORDER", "OTHER CPU", "STEAL"
    );
    for r in &report.runs {
        let f = &r.figures;
        println!(
            "{:<4} {:>7} {:>9.0} {:>9.1} {:>7.2} {:>11.2} {:>14.2} {:>10} {:>6}",
            r.run,
            f.completed,
            f.orders_per_second,
            f.order_to_certificate.p99_ms,
            f.cpu_seconds,
            f.messages_per_order,
            f.commits_per_order,
            percent(r.busy.as_ref().map(|b| b.other_cpu_share)),
            percent(r.busy.as_ref().map(|b| b.steal_share)),
        );
    }
    if report.runs.iter().any(|r| r.busy.is_some()) {
        println!();
        println!("CPU an order, ms, from the first order placed to the last completed (children included):");
        println!("{:<4} {:>10} {:>11} {:>9} {:>10}", "RUN", "ASSETFLOW", "POSTGRESQL", "RABBITMQ", "BENCHMARK");
        for r in &report.runs {
            let Some(busy) = &r.busy else { continue };
            let per_order = |party| {
                let seconds = busy.parties.iter().find(|p| p.party == party).map_or(0.0, |p| p.cpu_seconds);
                seconds * 1000.0 / r.figures.completed.max(1) as f64
            };
            println!(
                "{:<4} {:>10.3} {:>11.3} {:>9.3} {:>10.3}",
                r.run,
                per_order(Party::Assetflow),
                per_order(Party::Database),
                per_order(Party::Broker),
                per_order(Party::Benchmark),
            );
        }
    }
    if let Some(limits) = report.runs.iter().find_map(|r| r.limits_before.as_ref()) {
        let l = &limits.limits;
        println!();
        println!(
            "limits a second, before and after each run: RabbitMQ (MQ), {} B persistent messages, {} queue,",
            l.message_size, l.queue_type
        );
        println!(
            "confirmed and acked; PostgreSQL (PG), handler-shaped commits on {} connections. Each bound is",
            l.db_connections
        );
        println!("from the higher of each engine's two measurements.");
        println!(
            "{:<4} {:>10} {:>10} {:>10} {:>10} {:>8} {:>6} {:>8} {:>6}",
            "RUN", "MQ BEFORE", "MQ AFTER", "PG BEFORE", "PG AFTER", "BOUND", "RATIO", "SHARED", "RATIO"
        );
        for r in &report.runs {
            let (Some(before), Some(after), Some(b)) = (&r.limits_before, &r.limits_after, &r.bound) else {
                continue;
            };
            println!(
                "{:<4} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>8.0} {:>5.0}% {:>8.0} {:>5.0}%",
                r.run,
                before.limits.broker_messages_per_second,
                after.limits.broker_messages_per_second,
                before.limits.db_commits_per_second,
                after.limits.db_commits_per_second,
                b.bound_orders_per_second,
                b.ratio_to_bound * 100.0,
                b.shared_bound_orders_per_second,
                b.ratio_to_shared_bound * 100.0,
            );
        }
    }
    let s = &report.summary;
    if s.runs > 1 {
        println!();
        let o = s.orders_per_second;
        println!(
            "over {} runs: {:.0} orders completed per second (median), {:.0}–{:.0}",
            s.runs, o.median, o.min, o.max
        );
        for (name, spread) in [("bound", s.ratio_to_bound), ("shared bound", s.ratio_to_shared_bound)] {
            if let Some(r) = spread {
                println!(
                    "  throughput / {name}: {:.0}% (median), {:.0}–{:.0}%",
                    r.median * 100.0,
                    r.min * 100.0,
                    r.max * 100.0
                );
            }
        }
    }
    for warning in warnings(report) {
        println!("{warning}");
    }
}

/// warnings are the lines that say when the machine was busy: during a run, or while a
/// measurement of the limits was taken (each measurement once).
pub fn warnings(report: &Report) -> Vec<String> {
    let mut lines = Vec::new();
    let last = report.runs.len();
    for r in &report.runs {
        let limits = |l: &Option<LimitsTaken>, when: String| {
            l.as_ref().and_then(|l| l.busy.as_ref()).and_then(|b| b.warning(&when))
        };
        lines.extend(limits(&r.limits_before, format!("while the limits before run {} were measured", r.run)));
        lines.extend(r.busy.as_ref().and_then(|b| b.warning(&format!("during run {}", r.run))));
        if r.run == last {
            lines.extend(limits(&r.limits_after, format!("while the limits after run {} were measured", r.run)));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::bench::lifecycle::Percentiles;

    fn limits(broker: f64, database: f64) -> Limits {
        Limits {
            broker_messages_per_second: broker,
            queue_type: "quorum".into(),
            message_size: 600,
            db_commits_per_second: database,
            db_connections: 8,
        }
    }

    fn figures(orders_per_second: f64, messages_per_order: f64, commits_per_order: f64) -> Figures {
        Figures {
            orders: 1000,
            completed: 1000,
            exchanged: 300,
            seconds: 1000.0 / orders_per_second,
            orders_per_second,
            order_to_certificate: Percentiles::default(),
            exchange_to_asset: Percentiles::default(),
            stages: Vec::new(),
            cpu_seconds: 1.0,
            peak_rss_mb: 80.0,
            messages_per_order,
            handled_per_order: messages_per_order + 2.0,
            commits_per_order,
        }
    }

    #[test]
    fn the_bound_is_the_busier_engine_alone_and_the_sum_of_both_when_they_share_the_machine() {
        // 10 messages at 10,000/s is 1 ms of the broker; 2.5 commits at 5,000/s, 0.5 ms of the database.
        let (alone, shared) = bounds(10_000.0, 5_000.0, 10.0, 2.5);
        assert!((alone - 1_000.0).abs() < 1e-6, "{alone}");
        assert!((shared - 1_000.0 / 1.5).abs() < 1e-6, "{shared}");
    }

    #[test]
    fn fewer_than_one_commit_an_order_counts_as_what_it_is() {
        // Batched handlers can commit several orders at once: 0.5 commits at 1,000/s is 0.5 ms.
        let (alone, shared) = bounds(100_000.0, 1_000.0, 10.0, 0.5);
        assert!((alone - 2_000.0).abs() < 1e-6, "{alone}");
        assert!((shared - 1.0 / 0.0006).abs() < 1e-6, "{shared}");
    }

    #[test]
    fn the_conservative_limits_are_the_higher_measurement_of_each_engine_on_its_own() {
        // The broker was faster before the run, the database after it.
        assert_eq!(conservative(&limits(15_000.0, 5_000.0), &limits(12_000.0, 6_000.0)), (15_000.0, 6_000.0));
        assert_eq!(conservative(&limits(12_000.0, 6_000.0), &limits(15_000.0, 5_000.0)), (15_000.0, 6_000.0));
    }

    #[test]
    fn the_ratio_is_taken_against_the_higher_limits_so_a_low_measurement_cannot_flatter_it() {
        let f = figures(900.0, 10.0, 0.5);
        let (before, after) = (limits(18_000.0, 5_000.0), limits(12_000.0, 6_000.0));
        let bound = Bound::of(&before, &after, &f);
        // 10 messages at 18,000/s: 1,800 orders a second; 0.5 commits at 6,000/s: 12,000.
        assert!((bound.bound_orders_per_second - 1_800.0).abs() < 1e-6, "{bound:?}");
        assert!((bound.ratio_to_bound - 0.5).abs() < 1e-9, "{bound:?}");
        let shared = 1.0 / (10.0 / 18_000.0 + 0.5 / 6_000.0);
        assert!((bound.shared_bound_orders_per_second - shared).abs() < 1e-6, "{bound:?}");
        assert!((bound.ratio_to_shared_bound - 900.0 / shared).abs() < 1e-9, "{bound:?}");
        // Against either measurement alone, the ratio would be at least as high.
        for one in [&before, &after] {
            let alone = Bound::of(one, one, &f);
            assert!(alone.ratio_to_bound >= bound.ratio_to_bound, "{alone:?}");
            assert!(alone.ratio_to_shared_bound >= bound.ratio_to_shared_bound, "{alone:?}");
        }
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two_and_the_spread_is_min_to_max() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]), Some(Spread { median: 2.0, min: 1.0, max: 3.0 }));
        assert_eq!(Spread::of(&[4.0, 1.0, 3.0, 2.0]), Some(Spread { median: 2.5, min: 1.0, max: 4.0 }));
        assert_eq!(Spread::of(&[7.0]), Some(Spread { median: 7.0, min: 7.0, max: 7.0 }));
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn the_summary_has_ratios_only_where_the_limits_were_measured_and_names_the_busy_runs() {
        let taken = |broker, busy: bool| LimitsTaken {
            limits: limits(broker, 6_000.0),
            busy: Some(Busy { busy, other_cpu_share: if busy { 0.2 } else { 0.0 }, ..Busy::default() }),
        };
        let (l0, l1, l2) = (taken(18_000.0, false), taken(12_000.0, true), taken(15_000.0, false));
        let runs = vec![
            Run::new(1, figures(900.0, 10.0, 0.5), None, Some(l0), Some(l1.clone())),
            Run::new(2, figures(750.0, 10.0, 0.5), None, Some(l1), Some(l2)),
        ];
        let report = Report::new(Seeded { orders: 0, exchanged: 0, seconds: 0.0 }, runs);
        let s = &report.summary;
        assert_eq!(s.orders_per_second, Spread { median: 825.0, min: 750.0, max: 900.0 });
        // Run 1 against 18,000 (1,800 a second): 50%; run 2 against 15,000 (1,500): 50%.
        let ratio = s.ratio_to_bound.expect("a ratio");
        assert!((ratio.median - 0.5).abs() < 1e-9 && (ratio.max - 0.5).abs() < 1e-9, "{ratio:?}");
        // The busy measurement between the runs is both runs' limits, and warned about once.
        assert_eq!(s.busy_runs, vec![1, 2]);
        let lines = warnings(&report);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("while the limits before run 2 were measured"), "{lines:?}");

        let unmeasured = Report::new(
            Seeded { orders: 0, exchanged: 0, seconds: 0.0 },
            vec![Run::new(1, figures(900.0, 10.0, 0.5), None, None, None)],
        );
        assert!(unmeasured.summary.ratio_to_bound.is_none() && unmeasured.runs[0].bound.is_none());
    }
}
