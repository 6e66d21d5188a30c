//! The monitoring files in ops/ against the code: the Grafana dashboard and the alert rules query
//! only metrics in `assetflow::service::metrics::catalogue()`, the dashboard covers every concern operators
//! asked for, every alert has its annotations and a runbook entry that exists in ops/RUNBOOK.md,
//! and every scheduled job has a "has not succeeded" rule. PromQL syntax itself is checked by
//! promtool in ops/check-monitoring.

use std::collections::{BTreeMap, BTreeSet};

use assetflow::service::metrics::catalogue;
use serde_json::Value;

fn read(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

/// metric_names returns every `assetflow_[a-z_]+` word in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(found) = expr[from..].find("assetflow_") {
        let start = from + found;
        let mut end = start + "assetflow_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let word_start = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if word_start {
            names.push(expr[start..end].to_string());
        }
        from = end;
    }
    names
}

/// check_metric says why a name used in a query is not a series assetflow exports, if it is not.
fn check_metric(name: &str) -> Result<(), String> {
    if let Some(metric) = catalogue().iter().find(|m| m.name == name) {
        if metric.kind == "histogram" {
            return Err(format!("{name} is a histogram: query {name}_bucket, _sum or _count"));
        }
        return Ok(());
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && catalogue().iter().any(|m| m.name == base && m.kind == "histogram")
        {
            return Ok(());
        }
    }
    Err(format!("{name} is not in assetflow::service::metrics::catalogue()"))
}

fn check_exprs(file: &str, exprs: &[String]) {
    let mut problems = BTreeSet::new();
    for expr in exprs {
        for name in metric_names(expr) {
            if let Err(problem) = check_metric(&name) {
                problems.insert(format!("{problem}\n    in: {expr}"));
            }
        }
    }
    assert!(problems.is_empty(), "{file} queries metrics that do not exist:\n{}", Vec::from_iter(problems).join("\n"));
}

/// github_anchor is the anchor GitHub gives a Markdown heading: lowercase, punctuation removed,
/// spaces turned into hyphens.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// runbook_anchors lists the anchors of every heading in ops/RUNBOOK.md (outside code blocks),
/// numbering repeated ones as GitHub does.
fn runbook_anchors() -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    let mut in_code = false;
    for line in read("ops/RUNBOOK.md").lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let text = line.trim_start_matches('#');
        if !text.starts_with(' ') {
            continue;
        }
        let anchor = github_anchor(text);
        let n = seen.entry(anchor.clone()).or_insert(0);
        anchors.insert(if *n == 0 { anchor.clone() } else { format!("{anchor}-{n}") });
        *n += 1;
    }
    anchors
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// panels returns every panel, including those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("a panels array") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested.iter());
        }
    }
    out
}

#[test]
fn the_dashboard_queries_only_catalogued_metrics() {
    let dashboard: Value =
        serde_json::from_str(&read("ops/monitoring/grafana-dashboard.json")).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 30, "only {} queries in the dashboard", exprs.len());
    // Template variables query label values of metrics too.
    for variable in dashboard["templating"]["list"].as_array().expect("templating variables") {
        for query in [&variable["query"], &variable["query"]["query"], &variable["definition"]] {
            if let Some(q) = query.as_str() {
                exprs.push(q.to_string());
            }
        }
    }
    check_exprs("ops/monitoring/grafana-dashboard.json", &exprs);

    // Every catalogued metric is on the dashboard somewhere.
    let used: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|b| catalogue().iter().any(|m| m.name == *b)))
                .map(str::to_string)
                .unwrap_or(n)
        })
        .collect();
    let missing: Vec<&str> = catalogue().iter().map(|m| m.name).filter(|n| !used.contains(*n)).collect();
    assert!(missing.is_empty(), "metrics missing from the dashboard: {missing:?}");
}

#[test]
fn the_dashboard_has_a_panel_per_concern() {
    let dashboard: Value =
        serde_json::from_str(&read("ops/monitoring/grafana-dashboard.json")).expect("the dashboard is JSON");
    let all = panels(&dashboard);
    let rows: Vec<String> =
        all.iter().filter(|p| p["type"] == "row").map(|p| p["title"].as_str().unwrap_or("").to_string()).collect();
    for row in [
        "Throughput",
        "Latency",
        "Settlement per partner",
        "Deliveries",
        "Dead letters & refusals",
        "Outbox",
        "Queues",
        "Batch jobs",
        "Connections",
    ] {
        assert!(rows.iter().any(|r| r == row), "no row {row:?}; the rows are {rows:?}");
    }

    let titles: Vec<String> =
        all.iter().filter(|p| p["type"] != "row").map(|p| p["title"].as_str().unwrap_or("").to_lowercase()).collect();
    for (concern, words) in [
        ("throughput per pool", &["throughput", "pool"][..]),
        ("handler latency per pool", &["latency", "pool"]),
        ("end-to-end latency", &["end-to-end", "latency"]),
        ("retries", &["retries"]),
        ("dead letters per pool", &["dead letters", "pool"]),
        ("outbox lag", &["outbox lag"]),
        ("batch job results per job", &["batch job", "per job", "outcome"]),
        ("batch job time since last success", &["batch job", "last success"]),
        ("settlement answers per partner", &["settlement", "partner"]),
        ("decline ratio per partner", &["decline", "partner"]),
        ("settlement timeouts per partner", &["timeouts", "partner"]),
        ("queue depth", &["queue depth"]),
        ("consumers", &["consumers"]),
        ("reconnects", &["reconnects"]),
    ] {
        assert!(
            titles.iter().any(|t| words.iter().all(|w| t.contains(w))),
            "no panel for {concern} (a title with {words:?}); the titles are {titles:#?}"
        );
    }

    // Every panel queries through the datasource variable, and has a query.
    let variables = dashboard["templating"]["list"].as_array().expect("templating variables");
    assert!(
        variables.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus" && v["name"] == "datasource"),
        "the dashboard needs a Prometheus datasource variable named datasource"
    );
    for panel in all.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("?");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title:?} does not use $datasource");
        let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(
            !targets.is_empty() && targets.iter().all(|t| t["expr"].as_str().is_some_and(|e| !e.trim().is_empty())),
            "panel {title:?} has no query"
        );
    }
}

/// Alert is one rule of alerts.yml, read from the text (the project has no YAML parser).
#[derive(Debug, Default)]
struct Alert {
    name: String,
    expr: String,
    annotations: BTreeSet<String>,
    runbook_url: Option<String>,
    severity: Option<String>,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn unquote(value: &str) -> String {
    let v = value.trim();
    if v.len() >= 2 && (v.starts_with('"') && v.ends_with('"') || v.starts_with('\'') && v.ends_with('\'')) {
        v[1..v.len() - 1].replace("\\\\", "\\").replace("\\\"", "\"")
    } else {
        v.to_string()
    }
}

fn parse_alerts(text: &str) -> Vec<Alert> {
    let lines: Vec<&str> = text.lines().collect();
    let mut alerts: Vec<Alert> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        if line.trim_start().starts_with('#') {
            i += 1;
            continue;
        }
        if let Some(name) = trimmed.strip_prefix("alert:") {
            alerts.push(Alert { name: unquote(name), ..Alert::default() });
        } else if let Some(alert) = alerts.last_mut() {
            if let Some(value) = trimmed.strip_prefix("expr:") {
                let value = value.trim();
                if value.starts_with('|') || value.starts_with('>') {
                    // A block scalar: the lines indented deeper than `expr:`.
                    let base = indent(line);
                    let mut block = Vec::new();
                    while i + 1 < lines.len() && (lines[i + 1].trim().is_empty() || indent(lines[i + 1]) > base) {
                        i += 1;
                        block.push(lines[i].trim());
                    }
                    alert.expr = block.join("\n");
                } else {
                    alert.expr = unquote(value);
                }
            } else if let Some((key, value)) = trimmed.split_once(':') {
                match key.trim() {
                    "summary" | "description" if !value.trim().is_empty() => {
                        alert.annotations.insert(key.trim().to_string());
                    }
                    "runbook_url" => alert.runbook_url = Some(unquote(value)),
                    "severity" => alert.severity = Some(unquote(value)),
                    _ => {}
                }
            }
        }
        i += 1;
    }
    alerts
}

/// selects_job says whether a `job="..."` or `job=~"a|b"` matcher in `expr` names `job` exactly.
fn selects_job(expr: &str, job: &str) -> bool {
    expr.match_indices("job=").any(|(i, _)| {
        let rest = expr[i + "job=".len()..].trim_start_matches('~');
        let Some(value) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else {
            return false;
        };
        value.split('|').any(|alternative| alternative == job)
    })
}

#[test]
fn the_alert_rules_query_only_catalogued_metrics_and_have_runbook_entries() {
    let text = read("ops/monitoring/alerts.yml");
    let alerts = parse_alerts(&text);
    assert!(alerts.len() >= 20, "only {} alert rules found in ops/monitoring/alerts.yml", alerts.len());
    // Every `expr:` in the file belongs to an alert (no rule was missed by the parser).
    let expr_lines = text.lines().filter(|l| l.trim_start().starts_with("expr:")).count();
    assert_eq!(expr_lines, alerts.len(), "every rule is an alert with one expr");

    let exprs: Vec<String> = alerts.iter().map(|a| a.expr.clone()).collect();
    check_exprs("ops/monitoring/alerts.yml", &exprs);

    let anchors = runbook_anchors();
    for alert in &alerts {
        let name = &alert.name;
        assert!(!alert.expr.is_empty(), "{name} has no expr");
        for annotation in ["summary", "description"] {
            assert!(alert.annotations.contains(annotation), "{name} has no {annotation} annotation");
        }
        assert!(
            matches!(alert.severity.as_deref(), Some("critical" | "warning" | "info")),
            "{name} has no severity label (critical, warning or info): {:?}",
            alert.severity
        );
        let url = alert.runbook_url.as_deref().unwrap_or_else(|| panic!("{name} has no runbook_url"));
        let anchor = url
            .strip_prefix("ops/RUNBOOK.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} is not ops/RUNBOOK.md#<anchor>"));
        assert!(anchors.contains(anchor), "{name}: ops/RUNBOOK.md has no heading with the anchor #{anchor}");
    }

    // The alerts the operators asked for.
    for required in [
        "AssetflowDeadLettersAppearing",
        "AssetflowOutboxLag",
        "AssetflowJobNotSucceeding",
        "AssetflowSettlementDeclineSpike",
        "AssetflowSettlementTimeoutSpike",
        "AssetflowPoolQueueUnconsumed",
        "AssetflowDown",
        "AssetflowMessageRetriesRising",
    ] {
        assert!(alerts.iter().any(|a| a.name == required), "no alert {required}");
    }

    // Every scheduled job has a "has not succeeded in its period" rule.
    let staleness: Vec<&Alert> =
        alerts.iter().filter(|a| a.expr.contains("assetflow_job_last_success_timestamp_seconds")).collect();
    for job in assetflow::service::scheduler::JOBS {
        assert!(
            staleness.iter().any(|a| selects_job(&a.expr, job.name)),
            "job {} has no rule on assetflow_job_last_success_timestamp_seconds in ops/monitoring/alerts.yml",
            job.name
        );
    }
}

#[test]
fn the_runbook_links_resolve() {
    let anchors = runbook_anchors();
    let runbook = read("ops/RUNBOOK.md");
    let mut sources = vec![("ops/RUNBOOK.md".to_string(), runbook, "](#")];
    for unit in ["assetflow-settlement", "assetflow-issuance", "assetflow-delivery", "assetflow-scheduler"] {
        let path = format!("ops/systemd/{unit}.service");
        let text = read(&path);
        sources.push((path, text, "ops/RUNBOOK.md#"));
    }
    sources.push(("ops/monitoring/alerts.yml".to_string(), read("ops/monitoring/alerts.yml"), "ops/RUNBOOK.md#"));
    for (file, text, marker) in sources {
        for (i, _) in text.match_indices(marker) {
            let rest = &text[i + marker.len()..];
            let anchor: String =
                rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
            assert!(anchors.contains(&anchor), "{file} links to #{anchor}, which is not a heading of ops/RUNBOOK.md");
        }
    }
}

#[test]
fn the_rabbitmq_definitions_hold_placeholders_and_least_privilege() {
    let defs: Value = serde_json::from_str(&read("ops/rabbitmq/definitions.json")).expect("the definitions are JSON");
    for user in defs["users"].as_array().expect("users") {
        let hash = user["password_hash"].as_str().unwrap_or("");
        assert!(
            hash.starts_with("REPLACE"),
            "user {} has a real-looking password hash in the repository",
            user["name"]
        );
    }
    for permission in defs["permissions"].as_array().expect("permissions") {
        let user = permission["user"].as_str().unwrap_or("");
        if user.starts_with("gateway-") || user.starts_with("partner-") {
            assert_eq!(permission["configure"], "^$", "{user} may configure nothing");
            assert_eq!(permission["write"], "^assetflow\\.requests$", "{user} may write only to assetflow.requests");
            let read = permission["read"].as_str().unwrap_or("");
            let own = if let Some(id) = user.strip_prefix("gateway-") {
                format!("^assetflow\\.gateway\\.{id}$")
            } else {
                format!("^assetflow\\.partner\\.{}$", &user["partner-".len()..])
            };
            assert_eq!(read, own, "{user} may read only its own queue");
        }
        if user.starts_with("issuer-") {
            assert_eq!(permission["configure"], "^$", "{user} may configure nothing");
            assert_eq!(permission["write"], "^assetflow\\.requests$", "{user} may write only to assetflow.requests");
            assert_eq!(permission["read"], "^$", "{user} may read nothing");
        }
    }
    let policies = defs["policies"].as_array().expect("policies");
    for pool in ["settlement", "issuance", "delivery"] {
        let policy = policies
            .iter()
            .find(|p| p["definition"]["dead-letter-routing-key"] == pool)
            .unwrap_or_else(|| panic!("no policy dead-letters the {pool} pool"));
        assert_eq!(policy["definition"]["dead-letter-strategy"], "at-least-once");
        assert_eq!(policy["definition"]["overflow"], "reject-publish", "at-least-once needs reject-publish");
        assert!(policy["definition"]["delivery-limit"].as_i64().is_some_and(|l| l > 0));
        let pattern = policy["pattern"].as_str().unwrap_or("");
        assert!(pattern.starts_with('^') && pattern.ends_with('$'), "{pattern} must be anchored (never match a .dlq)");
    }
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.95, sum by (le) (rate(assetflow_handler_duration_seconds_bucket{queue=~"assetflow\\.settlement"}[5m])))"#
        ),
        vec!["assetflow_handler_duration_seconds_bucket"]
    );
    assert_eq!(metric_names("up{job=\"assetflow\"} == 0"), Vec::<String>::new());
    assert!(check_metric("assetflow_handler_duration_seconds_bucket").is_ok());
    assert!(check_metric("assetflow_handler_duration_seconds").is_err());
    assert!(check_metric("assetflow_messages_total").is_ok());
    assert!(check_metric("assetflow_messages_total_bucket").is_err());
    assert!(check_metric("assetflow_no_such_metric_total").is_err());
    assert_eq!(
        github_anchor("Restarting RabbitMQ or PostgreSQL without loss"),
        "restarting-rabbitmq-or-postgresql-without-loss"
    );
    assert_eq!(github_anchor("AssetflowDown"), "assetflowdown");
    assert_eq!(github_anchor("Dead letters & refusals"), "dead-letters--refusals");
    assert!(selects_job(r#"x{job=~"near_expiry|asset_expiry"} > 600"#, "asset_expiry"));
    assert!(selects_job(r#"x{job="retention"}"#, "retention"));
    assert!(!selects_job(r#"x{job="retentionx"}"#, "retention"));
    assert!(!selects_job(r#"up{job="assetflow"}"#, "retention"));
}

/// The shipped broker configuration refuses messages much larger than assetflow's body limit, and
/// still takes one at the limit with its properties.
#[test]
fn the_shipped_broker_configuration_limits_messages_near_the_body_limit() {
    let conf = read("ops/rabbitmq/rabbitmq.conf");
    let limit: usize = conf
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| line.split_once('=').filter(|(key, _)| key.trim() == "max_message_size"))
        .map(|(_, value)| value.trim().parse().expect("a number of bytes"))
        .expect("ops/rabbitmq/rabbitmq.conf sets max_message_size");
    let body = assetflow::contracts::messages::MAX_BODY;
    assert!(limit > body, "{limit} refuses a body at the {body}-byte limit");
    assert!(limit <= body + body / 8, "{limit} is far above the {body}-byte body limit");
}
