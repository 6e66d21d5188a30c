//! Monitoring, end to end: what `/metrics` shows after a real workload (checked against the
//! metric catalogue), and what `/readyz` says when the broker goes away and comes back.
//!
//! The metrics recorder is process-global. nextest runs every test in its own process, so there a
//! test's workload is all a series counts; under `cargo test` other tests add to the same series.
//! So every check compares a scrape before the workload with one after it (see `assert_rose`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::terminals::purchase;
use assetflow::contracts::messages::kinds;
use assetflow::contracts::topology::Pool;
use assetflow::service::app::RunOptions;
use assetflow::service::metrics::catalogue;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Env, count, rabbitmqctl, text};
use crate::support::{DEADLINE, settle_all};

/// with_http is an Env whose app will serve /metrics, /healthz and /readyz on a free local port,
/// sampling queue depths every 200ms. The recorder is installed before anything records.
async fn with_http() -> (Env, String) {
    assetflow::service::health::metrics_handle();
    let listen = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("a bound address").to_string()
    };
    let env = Env::with(json!({"http": {"listen": listen, "sample_interval": "200ms"}})).await;
    (env, listen)
}

/// start_with_http runs the app with its HTTP listener (and without the scheduler, as Env::start),
/// and waits until it answers.
async fn start_with_http(env: &mut Env, listen: &str) {
    env.start_with(RunOptions { scheduler: false, http: true, ..RunOptions::default() }).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some((status, body)) = get(listen, "/healthz").await {
            assert_eq!(status, 200, "/healthz: {body}");
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {listen} answers /healthz");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// get sends `GET path` over plain HTTP/1.1 and returns the status code and the body, or None when
/// nothing listens (yet).
async fn get(listen: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(listen).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("the request is sent");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("the response is read");
    let response = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of headers: {response}"));
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "a chunked response: {head}");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    Some((status.unwrap_or_else(|| panic!("no status: {head}")), body.to_string()))
}

/// wait_for_http polls `GET path` until `check` accepts the answer, and returns it.
async fn wait_for_http(listen: &str, path: &str, what: &str, check: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        if let Some((status, body)) = get(listen, path).await {
            if check(status, &body) {
                return (status, body);
            }
            last = Some((status, body));
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}; last answer: {last:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scrape is one parse of the Prometheus text format.
#[derive(Debug, Default)]
struct Scrape {
    /// Every sample: the series name and its labels, sorted by name, to its value.
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    /// `# TYPE` lines: metric name to counter, gauge, histogram or summary.
    types: BTreeMap<String, String>,
}

impl Scrape {
    /// Scrape::parse reads lines `name{label="value",...} value [timestamp]` and `# TYPE` lines.
    fn parse(body: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(comment) = line.strip_prefix('#') {
                let words: Vec<&str> = comment.split_whitespace().collect();
                if let ["TYPE", name, kind] = words[..] {
                    scrape.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line}"));
            let name = line[..name_end].to_string();
            let mut rest = &line[name_end..];
            let mut labels = Vec::new();
            if let Some(after) = rest.strip_prefix('{') {
                let (parsed, after) = parse_labels(after).unwrap_or_else(|| panic!("bad labels: {line}"));
                labels = parsed;
                rest = after;
            }
            let value = rest.split_whitespace().next().unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value {value:?}: {line}"));
            labels.sort();
            scrape.samples.insert((name, labels), value);
        }
        scrape
    }

    /// Scrape::get is the sample of the series with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        labels.sort();
        self.samples.get(&(name.to_string(), labels)).copied()
    }

    /// Scrape::value is Scrape::get where a series not yet recorded counts as zero (counters).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

/// parse_labels reads `name="value",...}` and returns the labels and what follows the brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (name, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((name.trim().to_string(), value));
        s = &rest[end + 1..];
    }
}

/// scrape fetches and parses /metrics.
async fn scrape(listen: &str) -> Scrape {
    let (status, body) = get(listen, "/metrics").await.expect("the listener answers");
    assert_eq!(status, 200, "/metrics: {body}");
    Scrape::parse(&body)
}

/// wait_for_metrics scrapes until `check` accepts the scrape, and returns it.
async fn wait_for_metrics(listen: &str, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let scrape = scrape(listen).await;
        if check(&scrape) {
            return scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}; last scrape: {:#?}",
            scrape.samples
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// alone says whether this test has the process, and so the metrics recorder, to itself: nextest
/// runs each test in its own process, `cargo test` runs them side by side in one.
fn alone() -> bool {
    std::env::var("NEXTEST_EXECUTION_MODE").is_ok_and(|mode| mode == "process-per-test")
}

/// assert_rose asserts that a series rose by `by` from `before` to `after`: exactly when the test
/// is alone in its process, at least when other tests add to the same series.
fn assert_rose(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)], by: f64) {
    let rise = after.value(name, labels) - before.value(name, labels);
    if alone() {
        assert_eq!(rise, by, "{name}{labels:?} rose by {rise}, not {by}");
    } else {
        assert!(rise >= by, "{name}{labels:?} rose by {rise}, less than {by}");
    }
}

/// assert_catalogued checks every assetflow series of a scrape against the catalogue: its name
/// (a histogram's `_bucket`, `_sum` and `_count` stand for the histogram), its kind and its labels.
fn assert_catalogued(scrape: &Scrape) {
    let catalogue = catalogue();
    let mut seen = BTreeSet::new();
    for (name, labels) in scrape.samples.keys().filter(|(name, _)| name.starts_with("assetflow_")) {
        let (metric, suffix) = match catalogue.iter().find(|m| m.name == name) {
            Some(metric) => (metric, ""),
            None => {
                let (base, suffix) = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).map(|base| (base, *s)))
                    .unwrap_or_else(|| panic!("{name} is not in the catalogue"));
                let metric = catalogue.iter().find(|m| m.name == base).unwrap_or_else(|| {
                    panic!("{name} is not in the catalogue (nor is {base})");
                });
                assert_eq!(metric.kind, "histogram", "{name}: {base} is a {} in the catalogue", metric.kind);
                (metric, suffix)
            }
        };
        let mut names: Vec<&str> =
            labels.iter().map(|(k, _)| k.as_str()).filter(|k| !(suffix == "_bucket" && *k == "le")).collect();
        names.sort();
        let mut catalogued = metric.labels.to_vec();
        catalogued.sort();
        assert_eq!(names, catalogued, "the labels of {name}{labels:?}");
        seen.insert(metric.name);
    }
    for name in seen {
        let kind = catalogue.iter().find(|m| m.name == name).expect("seen in the catalogue").kind;
        assert_eq!(scrape.types.get(name).map(String::as_str), Some(kind), "# TYPE of {name}");
    }
}

/// CERTIFICATES_DELIVERED counts the certificates the gateways acknowledged.
const CERTIFICATES_DELIVERED: &str =
    "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'delivered'";

/// A series that must rise: its name, its labels, and by how much.
type Rise<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_workload_moves_the_key_series_by_the_expected_amounts() {
    let (mut env, listen) = with_http().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    start_with_http(&mut env, &listen).await;
    let before = scrape(&listen).await;

    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    const N: i64 = 5;
    for _ in 0..N {
        env.send(&purchase(&alice, "concert", 1, json!({}))).await;
    }
    let refused = purchase(&alice, "no-such-product", 1, json!({}));
    env.send(&refused).await;
    let malformed = br#"{"type": "order.purchase", "quantity": "#;
    env.publish(kinds::ORDER_PURCHASE, malformed).await;

    env.wait_until("all certificates are delivered", |c| (count(c, CERTIFICATES_DELIVERED, &[]) == N).then_some(()))
        .await;
    let rid = refused["request_id"].as_str().unwrap().to_string();
    let sql = "SELECT reason AS value FROM refusals WHERE request_id = $1";
    assert_eq!(
        env.wait_until("the unknown product is refused", move |c| text(c, sql, &[&rid])).await,
        "unknown_product"
    );
    let sql = "SELECT reason AS value FROM dead_letters";
    assert_eq!(env.wait_until("the malformed message is dead-lettered", move |c| text(c, sql, &[])).await, "malformed");

    let n = N as f64;
    let rises: [Rise; 7] = [
        (
            "assetflow_messages_total",
            &[("pool", "settlement"), ("type", "order.purchase"), ("outcome", "acked")],
            n + 1.0,
        ),
        ("assetflow_settlements_total", &[("partner", "card-co"), ("outcome", "settled")], n),
        ("assetflow_delivery_attempts_total", &[("kind", "certificate"), ("outcome", "acknowledged")], n),
        ("assetflow_refusals_total", &[("reason", "unknown_product")], 1.0),
        ("assetflow_dead_letters_total", &[("pool", "settlement"), ("reason", "malformed")], 1.0),
        ("assetflow_end_to_end_seconds_count", &[("stage", "order_to_certificate")], n),
        // One receipt for each certificate and one for the refusal. (Orders settled together share
        // their `issuance.requested`, so its count depends on how the pools batched them.)
        ("assetflow_handler_duration_seconds_count", &[("pool", "delivery"), ("type", "delivery.receipt")], n + 1.0),
    ];
    // A message's counters move after its transaction commits, so the scrape may lag the database.
    let after = wait_for_metrics(&listen, "the workload shows in /metrics", |after| {
        rises.iter().all(|(name, labels, by)| after.value(name, labels) - before.value(name, labels) >= *by)
    })
    .await;
    for (name, labels, by) in rises {
        assert_rose(&before, &after, name, labels, by);
    }
    let published = "assetflow_outbox_published_total";
    assert!(after.value(published, &[]) > before.value(published, &[]), "{published} rose");
    let stage = [("stage", "order_to_certificate")];
    let observed = after.get("assetflow_end_to_end_seconds_count", &stage).expect("the count");
    let every = after.get("assetflow_end_to_end_seconds_bucket", &[("stage", "order_to_certificate"), ("le", "+Inf")]);
    assert_eq!(every, Some(observed), "the +Inf bucket holds every observation");
    let buckets = after.samples.keys().filter(|(name, labels)| {
        name == "assetflow_end_to_end_seconds_bucket"
            && labels.contains(&("stage".into(), "order_to_certificate".into()))
    });
    assert!(buckets.count() > 1, "the histogram has buckets");

    // The sampled gauges: the broker's queue depths, the dead letters an operator owes, the
    // subscriptions held.
    let settlement_queue = env.app.plumbing.names.pool_queue(Pool::Settlement.as_str());
    let sampled = wait_for_metrics(&listen, "the sampled gauges are current", |s| {
        s.get("assetflow_queue_messages", &[("queue", &settlement_queue)]).is_some()
            && s.get("assetflow_queue_consumers", &[("queue", &settlement_queue)]).is_some_and(|n| n >= 1.0)
            && s.get("assetflow_dead_letters_pending", &[("pool", "settlement")]) == Some(1.0)
            && s.get("assetflow_pool_consumers", &[]).is_some_and(|n| n >= 3.0)
    })
    .await;

    assert_catalogued(&after);
    assert_catalogued(&sampled);
    let (status, body) = get(&listen, "/healthz").await.expect("the listener answers");
    assert_eq!(status, 200, "/healthz: {body}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_the_broker_is_gone_and_recovers_when_it_is_back() {
    let (mut env, listen) = with_http().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    start_with_http(&mut env, &listen).await;
    wait_for_http(&listen, "/readyz", "the app is ready", |status, _| status == 200).await;
    let before = scrape(&listen).await;

    // Take the broker away from this test alone: deleting its vhost closes every connection to it,
    // and every reconnection fails until the vhost is back.
    let vhost = vhost_of(&env.config.amqp.url);
    blocking_rabbitmqctl(&["delete_vhost", &vhost]).await;
    let (_, body) = wait_for_http(&listen, "/readyz", "/readyz reports the broker gone", |status, body| {
        status == 503 && body.contains("RabbitMQ")
    })
    .await;
    assert!(body.contains("not connected to RabbitMQ"), "{body}");
    let (status, _) = get(&listen, "/healthz").await.expect("the listener answers");
    assert_eq!(status, 200, "the process is alive all the same");

    blocking_rabbitmqctl(&["add_vhost", &vhost]).await;
    blocking_rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]).await;
    wait_for_http(&listen, "/readyz", "the app is ready again", |status, _| status == 200).await;

    // Processing resumed on the re-declared topology.
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let order = purchase(&alice, "concert", 1, json!({}));
    env.send(&order).await;
    let rid = order["request_id"].as_str().unwrap().to_string();
    let sql = "SELECT d.status AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
               WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'";
    env.wait_until("the certificate is delivered after the reconnection", move |c| text(c, sql, &[&rid])).await;

    let after = scrape(&listen).await;
    let reconnects = [("target", "amqp")];
    let rise = after.value("assetflow_reconnects_total", &reconnects)
        - before.value("assetflow_reconnects_total", &reconnects);
    assert!(rise >= 1.0, "assetflow_reconnects_total{{target=\"amqp\"}} rose by {rise}");
    env.stop().await;
}

/// vhost_of is the vhost of an AMQP URL: its path, URL-decoded.
fn vhost_of(url: &str) -> String {
    let path = &url[url.rfind('/').expect("a vhost in the AMQP URL") + 1..];
    let mut bytes = Vec::new();
    let mut rest = path.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        match (b, tail) {
            (b'%', [hi, lo, tail @ ..]) => {
                let hex = std::str::from_utf8(&[*hi, *lo]).unwrap().to_string();
                bytes.push(u8::from_str_radix(&hex, 16).expect("a percent-encoded byte"));
                rest = tail;
            }
            _ => {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).expect("a UTF-8 vhost")
}

/// blocking_rabbitmqctl runs rabbitmqctl off the async workers.
async fn blocking_rabbitmqctl(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || rabbitmqctl(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .expect("rabbitmqctl ran");
}

#[test]
fn the_scrape_parser_reads_labels_values_and_types() {
    let scrape = Scrape::parse(
        "# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"uote\"} 3\nb 0.5\nh_bucket{le=\"+Inf\"} 2 1700000000\n",
    );
    assert_eq!(scrape.get("a_total", &[("y", "q\"uote"), ("x", "1")]), Some(3.0));
    assert_eq!(scrape.get("b", &[]), Some(0.5));
    assert_eq!(scrape.get("h_bucket", &[("le", "+Inf")]), Some(2.0));
    assert_eq!(scrape.types.get("a_total").map(String::as_str), Some("counter"));
    assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
    assert_eq!(vhost_of("amqp://g:g@h:5672/assetflow-test-t1"), "assetflow-test-t1");
}
