//! The terminal simulator: registers terminals with real key pairs, then signs and publishes
//! orders at a steady rate: some gifts, some billed to another terminal, some for a designated time,
//! and some bookings of the products sold by booking (`docs/product.md#receipt-certificates`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use diesel::prelude::*;
use openssl::pkey::{PKey, Private};
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Stats;
use super::publisher::ConfirmedSender;
use crate::cli::admin::register_terminal;
use crate::config::Config;
use crate::contracts::messages::kinds;
use crate::contracts::topology::Names;
use crate::crypto;
use crate::domain::bookings::{Terms, save_terms};
use crate::domain::catalogue::{Product, upsert_product};
use crate::domain::schema::{booking_decisions, booking_terms, products};
use crate::runtime::broker::Broker;

#[derive(Debug, Clone, clap::Args)]
pub struct TerminalOptions {
    /// Terminals to register and order from.
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    /// Orders a second, across all terminals.
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Stop after this many orders; 0 runs until interrupted.
    #[arg(long, default_value_t = 0)]
    pub orders: u64,
    /// Where the terminals' private keys are written (the gateway simulator reads them).
    #[arg(long, default_value_os_t = super::default_keys_dir())]
    pub keys: PathBuf,
    /// Share of orders that are gifts to another terminal.
    #[arg(long, default_value_t = 0.1)]
    pub gift_rate: f64,
    /// Share of orders for immediate delivery.
    #[arg(long, default_value_t = 0.1)]
    pub immediate_rate: f64,
    /// Share of orders for delivery at a designated time a few seconds ahead.
    #[arg(long, default_value_t = 0.1)]
    pub designated_rate: f64,
    /// Share of orders billed to another terminal, whose payer is asked to confirm them.
    #[arg(long, default_value_t = 0.1)]
    pub payer_rate: f64,
    /// Share of orders that book a product sold by booking instead (a receipt certificate), when
    /// one is open to bookings.
    #[arg(long, default_value_t = 0.15)]
    pub booking_rate: f64,
}

/// OnSale is a product on sale as the terminals see it: sold by booking when it has terms, open to
/// bookings until its decision time (a hold, never closed).
#[derive(Debug, Clone)]
struct OnSale {
    id: String,
    booking: bool,
    closes_at: Option<chrono::DateTime<Utc>>,
}

impl OnSale {
    /// OnSale::bookable is whether a booking sent now would still arrive before the sale closes.
    fn bookable(&self, now: chrono::DateTime<Utc>) -> bool {
        self.booking && self.closes_at.is_none_or(|at| at > now + chrono::Duration::seconds(5))
    }
}

/// SimTerminal is a registered terminal whose key the simulator holds.
pub struct SimTerminal {
    pub id: String,
    pub key: PKey<Private>,
}

/// register makes `count` terminals, spread over the configured gateways and partners, and writes
/// their private keys to `keys`.
pub async fn register(config: &Config, count: usize, keys: &std::path::Path) -> anyhow::Result<Vec<SimTerminal>> {
    let gateways: Vec<String> = config.gateways.keys().cloned().collect();
    let partners: Vec<String> = config.partners.keys().cloned().collect();
    anyhow::ensure!(!gateways.is_empty() && !partners.is_empty(), "configure at least one gateway and one partner");
    std::fs::create_dir_all(keys)?;
    let mut terminals = Vec::new();
    let mut rows = Vec::new();
    for i in 0..count {
        let kind = if i % 4 == 3 { "stationary" } else { "mobile" };
        let id = format!("sim-{kind}-{:04}", i + 1);
        let path = keys.join(format!("{id}.pem"));
        let key = match crypto::load_private_key(&path) {
            Ok(key) => key,
            Err(_) => {
                let key = crypto::generate_key_pair()?;
                crypto::write_private_key(&path, &key.private_key_to_pem_pkcs8()?)?;
                key
            }
        };
        rows.push((
            id.clone(),
            kind,
            gateways[i % gateways.len()].clone(),
            partners[i % partners.len()].clone(),
            crypto::public_key_pem(&key)?,
        ));
        terminals.push(SimTerminal { id, key });
    }
    let url = config.database.url.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut conn = crate::runtime::db::establish(&url)?;
        // The terminals reference their gateway and partner: on a fresh database the simulators
        // may get here before `assetflow run` has recorded the configured ones.
        crate::domain::catalogue::sync_parties(&mut conn, &partners, &gateways, &[])?;
        for (id, kind, gateway, partner, pem) in rows {
            register_terminal(&mut conn, &id, kind, &gateway, Some(&partner), &pem)?;
        }
        Ok(())
    })
    .await??;
    Ok(terminals)
}

/// purchase builds a signed `order.purchase`.
pub fn purchase(terminal: &SimTerminal, product: &str, quantity: u32, extra: serde_json::Value) -> serde_json::Value {
    let mut request = json!({
        "type": kinds::ORDER_PURCHASE,
        "request_id": format!("o-{}", Uuid::now_v7()),
        "terminal_id": terminal.id,
        "sent_at": Utc::now(),
        "product_id": product,
        "quantity": quantity,
    });
    if let (Some(object), Some(extra)) = (request.as_object_mut(), extra.as_object()) {
        object.extend(extra.clone());
    }
    crypto::sign_document(&terminal.key, &mut request).expect("signing works");
    request
}

pub async fn run(
    config: &Config,
    broker: Broker,
    options: TerminalOptions,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let terminals = register(config, options.count, &options.keys).await?;
    let url = config.database.url.clone();
    let catalogue: Vec<OnSale> = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<OnSale>> {
        let mut conn = crate::runtime::db::establish(&url)?;
        let rows: Vec<(String, Option<String>, Option<chrono::DateTime<Utc>>)> = products::table
            .left_join(booking_terms::table.on(booking_terms::product_id.eq(products::id)))
            .filter(products::on_sale.eq(true))
            .order(products::id)
            .select((products::id, booking_terms::condition.nullable(), booking_terms::decided_at.nullable()))
            .load(&mut conn)?;
        Ok(rows
            .into_iter()
            .map(|(id, condition, decided_at)| OnSale {
                id,
                booking: condition.is_some(),
                closes_at: decided_at.filter(|_| condition.as_deref() != Some("hold")),
            })
            .collect())
    })
    .await??;
    anyhow::ensure!(!catalogue.is_empty(), "no product is on sale: add one with `assetflow products add`");
    // Orders buy the products sold by purchase; those sold by booking are booked. A catalogue of
    // products sold by booking alone is bought from all the same.
    let purchased: Vec<&str> = {
        let by_purchase: Vec<&str> = catalogue.iter().filter(|p| !p.booking).map(|p| p.id.as_str()).collect();
        if by_purchase.is_empty() { catalogue.iter().map(|p| p.id.as_str()).collect() } else { by_purchase }
    };
    let names = Names { prefix: config.amqp.prefix.clone() };
    let publisher = ConfirmedSender::new(broker);
    let period = Duration::from_secs_f64(1.0 / options.rate.max(0.001));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    let booked: Vec<&str> = catalogue.iter().filter(|p| p.booking).map(|p| p.id.as_str()).collect();
    println!(
        "{} terminals registered; ordering {} a second from {}{}",
        terminals.len(),
        options.rate,
        purchased.join(", "),
        if booked.is_empty() || options.booking_rate <= 0.0 {
            String::new()
        } else {
            format!("; booking {:.0} % of them from {}", options.booking_rate * 100.0, booked.join(", "))
        }
    );
    while options.orders == 0 || sent < options.orders {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let request = {
            let mut rng = rand::rng();
            let terminal = terminals.choose(&mut rng).expect("at least one terminal");
            let bookable: Vec<&OnSale> = catalogue.iter().filter(|p| p.bookable(Utc::now())).collect();
            if !bookable.is_empty() && rng.random::<f64>() < options.booking_rate {
                let product = bookable.choose(&mut rng).expect("at least one product");
                super::gateway::booking_request(&terminal.id, &product.id, &terminal.key)
            } else {
                let product = purchased.choose(&mut rng).expect("at least one product");
                let mut extra = json!({});
                if rng.random::<f64>() < options.gift_rate && terminals.len() > 1 {
                    let other = terminals.iter().filter(|t| t.id != terminal.id).collect::<Vec<_>>();
                    extra["recipient_terminal_ids"] = json!([other.choose(&mut rng).expect("another").id]);
                }
                if rng.random::<f64>() < options.payer_rate && terminals.len() > 1 {
                    let other = terminals.iter().filter(|t| t.id != terminal.id).collect::<Vec<_>>();
                    extra["payer_terminal_id"] = json!(other.choose(&mut rng).expect("another").id);
                }
                let roll = rng.random::<f64>();
                if roll < options.immediate_rate {
                    extra["delivery"] = json!({"mode": "immediate"});
                } else if roll < options.immediate_rate + options.designated_rate {
                    extra["delivery"] = json!({"mode": "designated", "at": Utc::now() + chrono::Duration::seconds(rng.random_range(3..15))});
                }
                purchase(terminal, product, 1, extra)
            }
        };
        let kind = request["type"].as_str().unwrap_or(kinds::ORDER_PURCHASE).to_string();
        let body = serde_json::to_vec(&request)?;
        publisher.publish(&names.requests(), &kind, &kind, &body).await?;
        // `orders` counts purchases alone: it is what `assetflow audit --sent` sets against the
        // orders that reached assetflow.
        let counter = if kind == kinds::ORDER_BOOKING { &stats.bookings } else { &stats.orders };
        counter.fetch_add(1, Ordering::Relaxed);
        sent += 1;
    }
    Ok(())
}

/// ensure_demo_catalogue adds the demo products if there are none on sale, and, where the demo
/// catalogue is in use, opens its sales by booking ([`ensure_demo_bookings`]).
pub async fn ensure_demo_catalogue(config: &Config) -> anyhow::Result<()> {
    let url = config.database.url.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut conn = crate::runtime::db::establish(&url)?;
        let on_sale: i64 = products::table.filter(products::on_sale.eq(true)).count().get_result(&mut conn)?;
        if on_sale == 0 {
            for product in demo_catalogue() {
                upsert_product(&mut conn, &product)?;
            }
        }
        let demo: i64 =
            products::table.filter(products::id.eq(&demo_catalogue()[0].id)).count().get_result(&mut conn)?;
        if demo > 0 {
            ensure_demo_bookings(&mut conn, Utc::now())?;
        }
        Ok(())
    })
    .await?
}

/// ensure_demo_bookings makes the demo's hold sale, and a lottery and a threshold sale decided a
/// minute or so from `now`, so that a demo sees them drawn and closed. A lottery or threshold
/// sale is decided once (`booking_decisions`): when the last of its series is decided or closes
/// too soon to show, the next one is opened (`cup-final-lottery-2`, `-3`, …) and the earlier ones
/// are taken off sale (their holders may still submit what they won).
pub fn ensure_demo_bookings(conn: &mut PgConnection, now: chrono::DateTime<Utc>) -> anyhow::Result<()> {
    for (product, terms) in demo_bookings(now) {
        if terms.condition == "hold" {
            upsert_product(conn, &product)?;
            save_terms(conn, &terms)?;
            continue;
        }
        let series = format!("{}-%", product.id);
        let sales: Vec<(String, Option<chrono::DateTime<Utc>>)> = products::table
            .left_join(booking_terms::table.on(booking_terms::product_id.eq(products::id)))
            .filter(products::id.like(&series))
            .filter(products::on_sale.eq(true))
            .select((products::id, booking_terms::decided_at.nullable()))
            .load(conn)?;
        let decided: Vec<String> = booking_decisions::table
            .filter(booking_decisions::product_id.like(&series))
            .select(booking_decisions::product_id)
            .load(conn)?;
        let soon = now + chrono::Duration::seconds(30);
        if sales.iter().any(|(id, at)| at.is_some_and(|at| at > soon) && !decided.contains(id)) {
            continue;
        }
        let earlier: i64 = products::table.filter(products::id.like(&series)).count().get_result(conn)?;
        diesel::update(products::table.filter(products::id.like(&series)))
            .set(products::on_sale.eq(false))
            .execute(conn)?;
        let id = format!("{}-{}", product.id, earlier + 1);
        upsert_product(conn, &Product { id: id.clone(), ..product })?;
        save_terms(conn, &Terms { product_id: id, ..terms })?;
    }
    Ok(())
}

/// demo_bookings are the demo's products sold by booking, with their terms as of `now`: a concert
/// pre-sale held until its receipt certificate expires (in three minutes, so that unsubmitted ones
/// are revoked during a demo), a lottery of 5 seats drawn a minute from now (its winners have 45 s
/// to submit, then their places pass on), and a tour played if 5 book within 75 s (a threshold
/// that a demo at the default rates meets).
pub fn demo_bookings(now: chrono::DateTime<Utc>) -> Vec<(Product, Terms)> {
    let ticket = |id: &str, title: &str, price: i64| Product {
        id: id.into(),
        title: title.into(),
        price_minor: price,
        tags: json!({"title": title, "place": "Tokyo Hall"}),
        ..demo_catalogue().remove(0)
    };
    let terms = |id: &str, condition: &str, places: Option<i32>, decided_in: Option<i64>, window_secs: i64| Terms {
        product_id: id.into(),
        condition: condition.into(),
        places,
        decided_at: decided_in.map(|secs| now + chrono::Duration::seconds(secs)),
        window_secs,
    };
    vec![
        (
            Product {
                certificate_validity_secs: Some(180),
                reminder_stage1_secs: 60,
                reminder_stage2_secs: 30,
                ..ticket("concert-presale", "Spring concert pre-sale: booked now, paid when submitted", 9_000)
            },
            terms("concert-presale", "hold", None, None, 86_400),
        ),
        (
            ticket("cup-final-lottery", "Cup final: 5 seats drawn by lottery", 12_000),
            terms("cup-final-lottery", "lottery", Some(5), Some(60), 45),
        ),
        (
            ticket("reunion-tour", "Reunion tour: played if 5 book", 7_000),
            terms("reunion-tour", "threshold", Some(5), Some(75), 3_600),
        ),
    ]
}

/// DEMO_ISSUERS are the issuers of the demo catalogue; `ops/run` makes their keys.
pub const DEMO_ISSUERS: [&str; 3] = ["tokyo-hall", "assetflow-pay", "cinema-net"];

/// demo_catalogue is a ticket, a prepaid card, a pay-per-view ticket and a coupon.
pub fn demo_catalogue() -> Vec<Product> {
    let day = 86_400;
    let base = |id: &str, kind: &str, title: &str, issuer: &str, price: i64| Product {
        id: id.into(),
        kind: kind.into(),
        title: title.into(),
        issuer_id: issuer.into(),
        price_minor: price,
        currency: "JPY".into(),
        value_minor: None,
        uses: None,
        asset_expires_at: None,
        asset_validity_secs: Some(30 * day),
        certificate_expires_at: None,
        certificate_validity_secs: Some(7 * day),
        reminder_stage1_secs: 2 * day,
        reminder_stage2_secs: day,
        stage2_policy: "download_request".into(),
        transferable: false,
        on_sale: true,
        tags: json!({}),
        proof_of_delivery: "terminal".into(),
        confirmation_window_secs: 900,
        confirmation_waived: false,
    };
    vec![
        Product {
            transferable: true,
            uses: Some(1),
            tags: json!({"title": "Christmas concert", "date": "12-25", "place": "Tokyo Hall", "seat_class": "S"}),
            ..base("concert-ticket", "ticket", "Christmas concert, S seat", "tokyo-hall", 8_500)
        },
        Product {
            value_minor: Some(5_000),
            asset_validity_secs: Some(365 * day),
            certificate_validity_secs: Some(30 * day),
            ..base("prepaid-card-5000", "prepaid_card", "Prepaid card 5,000 yen", "assetflow-pay", 5_000)
        },
        Product {
            uses: Some(1),
            asset_validity_secs: Some(2 * day),
            certificate_validity_secs: Some(day + day / 2),
            reminder_stage1_secs: day,
            reminder_stage2_secs: day / 2,
            stage2_policy: "forced_transmission".into(),
            // The film starts soon: a payer asked to confirm has a minute to answer.
            confirmation_window_secs: 60,
            ..base("ppv-movie", "ppv_ticket", "Pay-per-view: the late show", "cinema-net", 400)
        },
        // Redeemed at shop tills that cannot sign: the gateway's receipt is its proof of delivery.
        // A coffee billed to another terminal needs no confirmation.
        Product {
            uses: Some(1),
            proof_of_delivery: "gateway".into(),
            confirmation_waived: true,
            ..base("coffee-coupon", "coupon", "One coffee", "assetflow-pay", 300)
        },
    ]
}
