//! The whole AMQP topology: every exchange, queue, binding and argument, each with its reason.
//!
//! It is declared idempotently on every (re)connection and printed by `assetflow topology`.
//! References: quorum queues <https://www.rabbitmq.com/docs/quorum-queues>, dead-lettering
//! <https://www.rabbitmq.com/docs/dlx>, alternate exchanges <https://www.rabbitmq.com/docs/ae>.

use lapin::ExchangeKind;

use crate::config::{Config, QueueType};
use crate::contracts::messages::kinds;

/// Pool is one of the three worker pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    Settlement,
    Issuance,
    Delivery,
}

impl Pool {
    pub const ALL: [Pool; 3] = [Pool::Settlement, Pool::Issuance, Pool::Delivery];

    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Settlement => "settlement",
            Pool::Issuance => "issuance",
            Pool::Delivery => "delivery",
        }
    }

    pub fn parse(s: &str) -> Option<Pool> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names derives every exchange and queue name from the configured prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    /// Gateways publish terminal requests here; partners publish results; gateways publish receipts.
    pub fn requests(&self) -> String {
        format!("{}.requests", self.prefix)
    }
    /// Where the broker sends a request whose routing key matches no binding.
    pub fn unrouted(&self) -> String {
        format!("{}.unrouted", self.prefix)
    }
    /// Messages between assetflow's own pools.
    pub fn internal(&self) -> String {
        format!("{}.internal", self.prefix)
    }
    pub fn partners(&self) -> String {
        format!("{}.partners", self.prefix)
    }
    pub fn gateways(&self) -> String {
        format!("{}.gateways", self.prefix)
    }
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    /// The internal routing key of a pool's replayed dead letters.
    pub fn replay_key(&self, pool: &str) -> String {
        format!("replay.{pool}")
    }
    pub fn pool_queue(&self, pool: &str) -> String {
        format!("{}.{}", self.prefix, pool)
    }
    pub fn dead_letter_queue(&self, pool: &str) -> String {
        format!("{}.{}.dlq", self.prefix, pool)
    }
    pub fn partner_queue(&self, partner: &str) -> String {
        format!("{}.partner.{partner}", self.prefix)
    }
    pub fn gateway_queue(&self, gateway: &str) -> String {
        format!("{}.gateway.{gateway}", self.prefix)
    }
}

/// Exchange is one declared exchange.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeKind,
    pub arguments: Vec<(&'static str, Arg)>,
    pub why: &'static str,
}

/// Queue is one declared queue.
#[derive(Debug, Clone)]
pub struct Queue {
    pub name: String,
    pub arguments: Vec<(&'static str, Arg)>,
    pub why: String,
}

/// Binding routes `routing_key` on `exchange` to `queue`.
#[derive(Debug, Clone)]
pub struct Binding {
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
}

/// Arg is a queue or exchange argument value.
#[derive(Debug, Clone)]
pub enum Arg {
    Str(String),
    Int(i64),
}

impl std::fmt::Display for Arg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arg::Str(s) => f.write_str(s),
            Arg::Int(i) => write!(f, "{i}"),
        }
    }
}

/// Topology is everything assetflow declares on the broker.
#[derive(Debug, Clone)]
pub struct Topology {
    pub names: Names,
    pub exchanges: Vec<Exchange>,
    pub queues: Vec<Queue>,
    pub bindings: Vec<Binding>,
}

impl Topology {
    /// Topology::new derives the topology from the configuration.
    pub fn new(config: &Config) -> Topology {
        let names = Names { prefix: config.amqp.prefix.clone() };
        let n = &names;
        let queue_args = |dead_letter_key: &str| -> Vec<(&'static str, Arg)> {
            let mut args = vec![
                // Every queue dead-letters to the pool's dead-letter queue instead of dropping.
                ("x-dead-letter-exchange", Arg::Str(n.dlx())),
                ("x-dead-letter-routing-key", Arg::Str(dead_letter_key.to_string())),
            ];
            if config.amqp.queue_type == QueueType::Quorum {
                // Replicated, and durable through a broker restart.
                args.push(("x-queue-type", Arg::Str("quorum".into())));
                // A poison message is dead-lettered after this many deliveries, never retried forever.
                args.push(("x-delivery-limit", Arg::Int(i64::from(config.amqp.delivery_limit))));
                // At-least-once dead-lettering: a dead letter is not lost if the DLQ is unavailable.
                args.push(("x-dead-letter-strategy", Arg::Str("at-least-once".into())));
                // Required by at-least-once dead-lettering: refuse publishes rather than drop the head.
                args.push(("x-overflow", Arg::Str("reject-publish".into())));
            }
            args
        };
        let plain_queue_args = || -> Vec<(&'static str, Arg)> {
            match config.amqp.queue_type {
                QueueType::Quorum => vec![("x-queue-type", Arg::Str("quorum".into()))],
                QueueType::Classic => vec![],
            }
        };

        let exchanges = vec![
            Exchange {
                name: n.requests(),
                kind: ExchangeKind::Topic,
                // Unroutable requests reach a queue (and a dead letter) instead of vanishing.
                arguments: vec![("alternate-exchange", Arg::Str(n.unrouted()))],
                why: "gateways, partners and issuers publish here; the routing key is the message type",
            },
            Exchange {
                name: n.unrouted(),
                kind: ExchangeKind::Fanout,
                arguments: vec![],
                why: "alternate exchange of the requests exchange: requests no binding matched",
            },
            Exchange {
                name: n.internal(),
                kind: ExchangeKind::Direct,
                arguments: vec![],
                why: "assetflow's own hand-offs between pools; gateways have no business here",
            },
            Exchange {
                name: n.partners(),
                kind: ExchangeKind::Direct,
                arguments: vec![],
                why: "settlement instructions, routed by partner id",
            },
            Exchange {
                name: n.gateways(),
                kind: ExchangeKind::Direct,
                arguments: vec![],
                why: "deliveries to terminals, routed by gateway id",
            },
            Exchange {
                name: n.dlx(),
                kind: ExchangeKind::Direct,
                arguments: vec![],
                why: "dead letters, routed by pool name",
            },
        ];

        let mut queues = Vec::new();
        let mut bindings = Vec::new();
        let mut bind = |exchange: String, routing_key: &str, queue: String| {
            bindings.push(Binding { exchange, routing_key: routing_key.to_string(), queue });
        };
        for pool in Pool::ALL {
            queues.push(Queue {
                name: n.pool_queue(pool.as_str()),
                arguments: queue_args(pool.as_str()),
                why: format!("the {pool} pool's work; competing consumers in every process"),
            });
            queues.push(Queue {
                name: n.dead_letter_queue(pool.as_str()),
                arguments: plain_queue_args(),
                why: format!("what the {pool} pool gave up on; also recorded in dead_letters"),
            });
            bind(n.dlx(), pool.as_str(), n.dead_letter_queue(pool.as_str()));
        }
        queues.push(Queue {
            name: n.unrouted(),
            arguments: queue_args(Pool::Settlement.as_str()),
            why: "requests with an unknown routing key; the settlement pool dead-letters them with the reason".into(),
        });
        bind(n.unrouted(), "", n.unrouted());

        bind(n.requests(), kinds::ORDER_PURCHASE, n.pool_queue(Pool::Settlement.as_str()));
        // A payer's confirmation decides whether its order is settled: the settlement pool's.
        bind(n.requests(), kinds::ORDER_CONFIRM, n.pool_queue(Pool::Settlement.as_str()));
        bind(n.requests(), kinds::SETTLEMENT_RESULT, n.pool_queue(Pool::Settlement.as_str()));
        bind(n.requests(), kinds::CERTIFICATE_EXCHANGE, n.pool_queue(Pool::Issuance.as_str()));
        bind(n.requests(), kinds::ASSET_REFUND, n.pool_queue(Pool::Settlement.as_str()));
        bind(n.requests(), kinds::ASSET_CHANGE, n.pool_queue(Pool::Settlement.as_str()));
        bind(n.requests(), kinds::ASSET_DEFER, n.pool_queue(Pool::Issuance.as_str()));
        bind(n.requests(), kinds::ORDER_BOOKING, n.pool_queue(Pool::Issuance.as_str()));
        bind(n.requests(), kinds::RECEIPT_SUBMIT, n.pool_queue(Pool::Issuance.as_str()));
        bind(n.internal(), kinds::BOOKINGS_DECIDE, n.pool_queue(Pool::Issuance.as_str()));
        bind(n.requests(), kinds::MODIFICATION_ANSWER, n.pool_queue(Pool::Issuance.as_str()));
        // An issuer's change sends notices and signs replacements: the issuance pool's.
        bind(n.requests(), kinds::ISSUER_CHANGE, n.pool_queue(Pool::Issuance.as_str()));
        bind(n.internal(), kinds::MODIFICATIONS_DUE, n.pool_queue(Pool::Issuance.as_str()));
        bind(n.internal(), kinds::ISSUANCE_REQUESTED, n.pool_queue(Pool::Issuance.as_str()));
        bind(n.requests(), kinds::DELIVERY_RECEIPT, n.pool_queue(Pool::Delivery.as_str()));
        bind(n.internal(), kinds::DELIVERY_REQUESTED, n.pool_queue(Pool::Delivery.as_str()));
        bind(n.internal(), kinds::CERTIFICATE_NOTICES, n.pool_queue(Pool::Delivery.as_str()));
        // Replayed dead letters re-enter their pool here, where no gateway may publish.
        for pool in Pool::ALL {
            bind(n.internal(), &n.replay_key(pool.as_str()), n.pool_queue(pool.as_str()));
        }

        for partner in config.partners.keys() {
            queues.push(Queue {
                name: n.partner_queue(partner),
                arguments: queue_args(Pool::Settlement.as_str()),
                why: format!("settlement instructions for partner {partner}; the partner consumes them"),
            });
            bind(n.partners(), partner, n.partner_queue(partner));
        }
        for gateway in config.gateways.keys() {
            queues.push(Queue {
                name: n.gateway_queue(gateway),
                arguments: queue_args(Pool::Delivery.as_str()),
                // A stationary terminal may be offline for days: deliveries wait here, durable.
                why: format!("deliveries for gateway {gateway}'s terminals; the gateway consumes them"),
            });
            bind(n.gateways(), gateway, n.gateway_queue(gateway));
        }

        Topology { names, exchanges, queues, bindings }
    }

    /// Topology::render is the human-readable table printed by `assetflow topology`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        writeln!(out, "EXCHANGES").ok();
        for e in &self.exchanges {
            writeln!(out, "  {:<32} {:<7} {}", e.name, format!("{:?}", e.kind).to_lowercase(), e.why).ok();
            for (k, v) in &e.arguments {
                writeln!(out, "  {:<32} {k}={v}", "").ok();
            }
        }
        writeln!(out, "\nQUEUES").ok();
        for q in &self.queues {
            writeln!(out, "  {:<32} {}", q.name, q.why).ok();
            let args: Vec<String> = q.arguments.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if !args.is_empty() {
                writeln!(out, "  {:<32} {}", "", args.join(" ")).ok();
            }
        }
        writeln!(out, "\nBINDINGS").ok();
        for b in &self.bindings {
            let key = if b.routing_key.is_empty() { "(any)" } else { &b.routing_key };
            writeln!(out, "  {:<24} --{key}--> {}", b.exchange, b.queue).ok();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_has_a_dead_letter_route_or_is_one() {
        let config = Config::with_overrides(serde_json::json!({
            "partners": {"card-co": {}}, "gateways": {"gw-1": {}}
        }))
        .unwrap();
        let topology = Topology::new(&config);
        for queue in &topology.queues {
            let is_dlq = queue.name.ends_with(".dlq");
            let has_route = queue.arguments.iter().any(|(k, _)| *k == "x-dead-letter-exchange");
            assert!(is_dlq || has_route, "{} has no dead-letter route", queue.name);
            if !is_dlq {
                assert!(
                    queue.arguments.iter().any(|(k, _)| *k == "x-delivery-limit"),
                    "{} has no delivery limit",
                    queue.name
                );
            }
        }
        assert!(topology.queues.iter().any(|q| q.name == "assetflow.partner.card-co"));
        assert!(topology.queues.iter().any(|q| q.name == "assetflow.gateway.gw-1"));
        assert!(topology.render().contains("assetflow.requests"));
    }
}
