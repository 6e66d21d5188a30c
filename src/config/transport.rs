//! Transport warnings: a connection that crosses a network without verified TLS.
//!
//! On one machine (the development setup, and a single-host deployment) the broker and the
//! database are on the loopback interface, where TLS protects nothing (`docs/security.md`). Across
//! a network, plain `amqp://` or a PostgreSQL `sslmode` that does not verify the server lets anyone
//! on the path read and change the traffic: the service says so at start-up, loudly.

use super::Config;

/// warnings lists what the configuration sends over a network without verified TLS, one sentence
/// each; empty when every connection is on the loopback interface or verified.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let amqp = &config.amqp.url;
    if !config.amqp.uses_tls() && !is_loopback(host(amqp)) {
        out.push(format!(
            "amqp.url is plain amqp:// to {}: messages, signatures and the broker password cross the network unencrypted; use amqps://",
            host(amqp)
        ));
    }
    let database = &config.database.url;
    let verifying = matches!(parameter(database, "sslmode"), Some("verify-ca" | "verify-full"));
    if !verifying && !is_loopback(host(database)) {
        out.push(format!(
            "database.url reaches {} with sslmode={}: the server is not verified; use sslmode=verify-full",
            host(database),
            parameter(database, "sslmode").unwrap_or("prefer (the default)")
        ));
    }
    out
}

/// host is a URL's host: what follows the scheme and any user information, up to a port, a path
/// or a query. An IPv6 address keeps its brackets.
fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.starts_with('[') {
        return host_port.split_inclusive(']').next().unwrap_or(host_port);
    }
    host_port.split(':').next().unwrap_or(host_port)
}

/// parameter is a query parameter's value.
fn parameter<'u>(url: &'u str, name: &str) -> Option<&'u str> {
    let query = url.split_once('?')?.1;
    query.split('&').filter_map(|pair| pair.split_once('=')).find(|(key, _)| *key == name).map(|(_, value)| value)
}

/// is_loopback says whether a host is this machine: `localhost`, 127.0.0.0/8 or `[::1]`. An empty
/// host (a Unix socket) is this machine too.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.is_empty()
        || host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(amqp: &str, database: &str) -> Config {
        Config::with_overrides(serde_json::json!({"amqp": {"url": amqp}, "database": {"url": database}})).unwrap()
    }

    #[test]
    fn the_loopback_needs_no_tls_and_a_network_needs_verified_tls() {
        let local = config("amqp://guest:guest@127.0.0.1:5672/%2f", "postgres://postgres@localhost:5432/assetflow");
        assert!(warnings(&local).is_empty(), "{:?}", warnings(&local));
        let ipv6 = config("amqp://u:p@[::1]:5672/v", "postgres://u@[::1]/assetflow");
        assert!(warnings(&ipv6).is_empty(), "{:?}", warnings(&ipv6));
        let verified = config("amqps://u:p@mq.example:5671/v", "postgres://u:p@db.example/a?sslmode=verify-full");
        assert!(warnings(&verified).is_empty(), "{:?}", warnings(&verified));

        let plain = config("amqp://u:secret@mq.example:5672/v", "postgres://u:p@10.0.0.5:5432/a?sslmode=require");
        let found = warnings(&plain);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("amqp.url is plain amqp:// to mq.example"), "{}", found[0]);
        assert!(found[1].starts_with("database.url reaches 10.0.0.5 with sslmode=require"), "{}", found[1]);
        assert!(found.iter().all(|w| !w.contains("secret")), "no password in a warning: {found:?}");
        let unset = config("amqps://u:p@mq.example/v", "postgres://db.example/a");
        assert_eq!(
            warnings(&unset),
            vec![
                "database.url reaches db.example with sslmode=prefer (the default): the server is not verified; use sslmode=verify-full"
            ]
        );
    }
}
