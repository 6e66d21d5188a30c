//! `bench lifecycle --seed-orders N`: a database that already holds N completed orders, each with
//! the whole history the real flow leaves behind, so that the run measures a service whose tables
//! have grown (`docs/performance.md#how-the-cost-grows`).
//!
//! A seeded order is what the benchmark's own orders become: a purchase request recorded, the
//! order issued, its settlement settled, one asset with its signed document, an exchange
//! certificate with its document and reminder schedule, the certificate's delivery acknowledged
//! by the terminal on its first attempt, the inbox rows of every message the pools consumed on the
//! way, and the asset's first status. A share of them (the run's `--exchange-rate`) were
//! exchanged: the exchange request recorded, the certificate closed and its reminders ended, the
//! asset's delivery acknowledged and the asset moved to `delivered` through its status history
//! (whose trigger makes the move, as for a real receipt). The outbox is empty, as the relay leaves
//! it.
//!
//! The orders are spread evenly over the day before the seeding, and their ids are UUIDv7 made of
//! the time of their event, as `Uuid::now_v7` makes them: ids in time order keep the indexes'
//! working set small in production, and the run's rows come after every seeded one. The signed
//! documents, delivery contents and acknowledgements are templates made by the domain's own code
//! (`asset_document`, `certificate_document`) with placeholder ids and times, which the SQL
//! replaces row by row: each row is the size and shape of a real one. Their signatures are the
//! template's, the same in every row; nothing reads a seeded signature during a run.
//!
//! The seed is written set-based, [`CHUNK`] orders a transaction: one statement for everything an
//! order's transactions wrote, one more for the exchanged assets' moves through the history.

use std::time::Instant;

use chrono::{DateTime, TimeZone, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use openssl::pkey::{PKey, Private};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::crypto::{self, KeyRing};
use crate::domain::catalogue::Product;
use crate::domain::delivery::receipt::content_sha256;
use crate::domain::issuance::{asset_document, certificate_document};

/// CHUNK is the number of orders seeded in one transaction: each statement's memory stays bounded,
/// and progress is reported as each chunk commits.
pub const CHUNK: i64 = 50_000;

/// EXCHANGE_STRIDE scatters the exchanged orders over each thousand: order i was exchanged when
/// `i × EXCHANGE_STRIDE mod 1000` falls under the exchange rate in thousandths. It is prime to
/// 1000, so each thousand holds exactly that many.
const EXCHANGE_STRIDE: i64 = 617;

/// Seeded is what the seeding wrote, and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Seeded {
    pub orders: i64,
    pub exchanged: i64,
    /// Seeding, then `VACUUM ANALYZE` and `CHECKPOINT`.
    pub seconds: f64,
}

/// The placeholders in the templates, which the seeding SQL replaces: the same literals appear in
/// [`SEED`] (a test checks both).
const ORDER: Uuid = Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0001);
const ASSET: Uuid = Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0002);
const CERTIFICATE: Uuid = Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0003);
const DELIVERY: Uuid = Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0004);
const MESSAGE: Uuid = Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0005);
const HOLDER: &str = "@holder@";

/// placeholder_time is the n-th placeholder time, with nanoseconds as the real times have.
fn placeholder_time(n: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2001, 1, 1, 0, 0, n).single().expect("a valid time")
        + chrono::Duration::nanoseconds(123_456_789)
}

/// Templates are one order's documents as the domain makes them, with placeholders.
pub struct Templates {
    asset_document: String,
    issuer_signature: String,
    provider_signature: String,
    certificate_document: String,
    certificate_signature: String,
    certificate_content: String,
    asset_content: String,
    acknowledgement: String,
}

impl Templates {
    /// Templates::new signs the templates with the run's keys, for `product`, as the issuance
    /// pool and a terminal would.
    pub fn new(
        keys: &KeyRing,
        product: &Product,
        provider_id: &str,
        terminal_key: &PKey<Private>,
    ) -> anyhow::Result<Templates> {
        let provider = keys.provider().ok_or_else(|| anyhow::anyhow!("no provider key"))?;
        let issuer = keys
            .issuer(&product.issuer_id)
            .ok_or_else(|| anyhow::anyhow!("no key for issuer {}", product.issuer_id))?;
        let (issued, expires, certificate_expires) = (placeholder_time(1), placeholder_time(2), placeholder_time(3));
        let asset = asset_document(product, ASSET, HOLDER, issued, expires, provider_id, issuer, provider)?;
        let certificate = certificate_document(
            CERTIFICATE,
            ASSET,
            HOLDER,
            &product.id,
            issued,
            certificate_expires,
            provider_id,
            provider,
        )?;
        let certificate_content = json!({"order_id": ORDER, "certificate": certificate});
        let asset_content = json!({"order_id": ORDER, "forced": false, "asset": asset});
        // As the gateway simulator relays a terminal's acknowledgement.
        let mut acknowledgement = json!({
            "terminal_id": HOLDER,
            "delivery_id": DELIVERY,
            "message_id": MESSAGE,
            "content_sha256": content_sha256(&certificate_content),
            "verified_at": placeholder_time(4),
        });
        crypto::sign_document(terminal_key, &mut acknowledgement)?;
        let text = |v: &Value, field: &str| v[field].as_str().unwrap_or_default().to_string();
        Ok(Templates {
            asset_document: crypto::canonical_json(&asset),
            issuer_signature: text(&asset, "issuer_signature"),
            provider_signature: text(&asset, "signature"),
            certificate_document: crypto::canonical_json(&certificate),
            certificate_signature: text(&certificate, "signature"),
            certificate_content: certificate_content.to_string(),
            asset_content: asset_content.to_string(),
            acknowledgement: acknowledgement.to_string(),
        })
    }
}

/// FUNCTIONS are the seeding's helpers, for its session only. `seed_id` is a UUIDv7 of the
/// millisecond `ms` whose other bits come from the MD5 of `seed`; `seed_time` is a time as the
/// documents spell it (RFC 3339, UTC, nanoseconds). Both are inlined into the statements.
const FUNCTIONS: &str = r#"
CREATE FUNCTION pg_temp.seed_id(ms bigint, seed text) RETURNS uuid LANGUAGE sql IMMUTABLE AS
  $$ SELECT encode(set_byte(overlay(decode(md5(seed), 'hex') placing substring(int8send(ms) FROM 3) FROM 1 FOR 6), 6, 112), 'hex')::uuid $$;
CREATE FUNCTION pg_temp.seed_time(t timestamptz) RETURNS text LANGUAGE sql STABLE AS
  $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '789Z' $$;
SET jit = off;
"#;

/// SEED writes orders `$from` to `$to` - 1 of `$orders`, each with its whole history. Order i is
/// placed at `$start_ms + i × $span_ms ÷ $orders` (milliseconds since the epoch); what followed
/// came some tens of milliseconds later, as in a run. Terminals are taken in turn.
const SEED: &str = "
WITH term AS (
  SELECT row_number() OVER (ORDER BY id) - 1 AS n, id, gateway_id, partner_id
  FROM terminals WHERE partner_id IS NOT NULL
), s AS (
  SELECT g.i, g.ms, to_timestamp(g.ms / 1000.0) AS placed,
         mod(g.i * $stride, 1000) < $exchange_permille AS exchanged,
         term.id AS terminal, term.gateway_id AS gateway, term.partner_id AS partner
  FROM (SELECT i, $start_ms + i * $span_ms / $orders AS ms FROM generate_series($from, $to - 1) AS i) AS g
  JOIN term ON term.n = g.i % (SELECT count(*) FROM term)
), o AS (
  SELECT s.*,
         placed + interval '60 ms' AS issued,
         placed + interval '60 ms' + $asset_validity_secs * interval '1 second' AS expires_at,
         placed + interval '60 ms' + least($certificate_validity_secs, $asset_validity_secs) * interval '1 second'
           AS certificate_expires_at,
         pg_temp.seed_id(ms, 'o' || i) AS order_id,
         'o-' || pg_temp.seed_id(ms - 20, 'r' || i) AS request_id,
         pg_temp.seed_id(ms, 's' || i) AS settlement_id,
         pg_temp.seed_id(ms + 60, 'a' || i) AS asset_id,
         pg_temp.seed_id(ms + 60, 'c' || i) AS certificate_id,
         pg_temp.seed_id(ms + 60, 'd' || i) AS delivery_id,
         pg_temp.seed_id(ms + 90, 'm' || i) AS message_id,
         CASE WHEN exchanged THEN 'x-' || pg_temp.seed_id(ms + 300, 'x' || i) END AS exchange_request_id,
         CASE WHEN exchanged THEN pg_temp.seed_id(ms + 320, 'e' || i) END AS asset_delivery_id,
         CASE WHEN exchanged THEN pg_temp.seed_id(ms + 350, 'n' || i) END AS asset_message_id
  FROM s
), d AS (
  SELECT o.*,
         replace(replace(replace(replace($asset_document,
           '5eed0000-0000-0000-0000-000000000002', asset_id::text), '@holder@', terminal),
           '2001-01-01T00:00:01.123456789Z', pg_temp.seed_time(issued)),
           '2001-01-01T00:00:02.123456789Z', pg_temp.seed_time(expires_at)) AS asset_document,
         replace(replace(replace(replace(replace($certificate_document,
           '5eed0000-0000-0000-0000-000000000003', certificate_id::text),
           '5eed0000-0000-0000-0000-000000000002', asset_id::text), '@holder@', terminal),
           '2001-01-01T00:00:01.123456789Z', pg_temp.seed_time(issued)),
           '2001-01-01T00:00:03.123456789Z', pg_temp.seed_time(certificate_expires_at)) AS certificate_document
  FROM o
), recorded AS (
  INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at, received_at,
                                 outcome, subject_id)
  SELECT request_id, terminal, 'order.purchase', md5(request_id) || md5(order_id::text),
         placed - interval '20 ms', placed, 'accepted', order_id
  FROM d
  UNION ALL
  SELECT exchange_request_id, terminal, 'certificate.exchange', md5(exchange_request_id) || md5(asset_id::text),
         placed + interval '300 ms', placed + interval '320 ms', 'accepted', asset_id
  FROM d WHERE exchanged
), placed_orders AS (
  INSERT INTO orders (id, request_id, orderer_terminal_id, payer_terminal_id, recipient_terminal_ids, product_id,
                      quantity, amount_minor, currency, delivery_mode, status, created_at, updated_at)
  SELECT order_id, request_id, terminal, terminal, ARRAY[terminal], $product_id, 1, $price_minor, $currency,
         'certificate', 'issued', placed, issued
  FROM d
), settled AS (
  INSERT INTO settlements (id, order_id, kind, partner_id, payer_terminal_id, amount_minor, currency, status,
                           attempts, partner_reference, instructed_at, answered_at)
  SELECT settlement_id, order_id, 'purchase', partner, terminal, $price_minor, $currency, 'settled', 1,
         'SIM-' || right(settlement_id::text, 12), placed, placed + interval '30 ms'
  FROM d
), new_assets AS (
  INSERT INTO assets (id, order_id, recipient_terminal_id, ordinal, product_id, kind, issuer_id, holder_terminal_id,
                      issued_at, expires_at, has_exchange_certificate, certificate_expires_at, status, transferable,
                      value_minor, remaining_minor, remaining_uses, currency, status_changed_at)
  SELECT asset_id, order_id, terminal, 0, $product_id, $kind, $issuer_id, terminal, issued, expires_at, true,
         certificate_expires_at, 'awaiting_exchange', $transferable, $value_minor, $value_minor, $uses, $currency,
         issued
  FROM d
), new_asset_documents AS (
  INSERT INTO asset_documents (asset_id, document, issuer_signature, provider_signature)
  SELECT asset_id, asset_document, $issuer_signature, $provider_signature FROM d
), new_certificates AS (
  INSERT INTO exchange_certificates (id, asset_id, holder_terminal_id, issued_at, expires_at, exchanged_at,
                                     exchange_request_id)
  SELECT certificate_id, asset_id, terminal, issued, certificate_expires_at,
         CASE WHEN exchanged THEN placed + interval '320 ms' END, exchange_request_id
  FROM d
), new_certificate_documents AS (
  INSERT INTO certificate_documents (certificate_id, document, signature)
  SELECT certificate_id, certificate_document, $certificate_signature FROM d
), new_schedules AS (
  INSERT INTO reminder_schedule (certificate_id, asset_id, expires_at, next_stage, due_at)
  SELECT certificate_id, asset_id, certificate_expires_at, CASE WHEN NOT exchanged THEN 1 END,
         CASE WHEN NOT exchanged THEN certificate_expires_at - $reminder_stage1_secs * interval '1 second' END
  FROM d
), first_status AS (
  INSERT INTO asset_status_history (asset_id, from_status, to_status, cause, at)
  SELECT asset_id, NULL, 'awaiting_exchange', 'issued', issued FROM d
), delivered AS (
  INSERT INTO deliveries (id, dedupe_key, kind, terminal_id, gateway_id, order_id, asset_id, forced, content, status,
                          attempts, due_at, created_at, delivered_at, request_id, proof, acknowledgement)
  SELECT delivery_id, 'certificate:' || certificate_id, 'certificate', terminal, gateway, order_id, asset_id, false,
         replace(replace($certificate_content, '5eed0000-0000-0000-0000-000000000001', order_id::text),
                 $certificate_document, certificate_document)::jsonb,
         'delivered', 1, placed + interval '90 ms' + $ack_timeout_ms * interval '1 ms', issued,
         placed + interval '110 ms', request_id, 'terminal',
         replace(replace(replace(replace($acknowledgement,
           '5eed0000-0000-0000-0000-000000000004', delivery_id::text),
           '5eed0000-0000-0000-0000-000000000005', message_id::text), '@holder@', terminal),
           '2001-01-01T00:00:04.123456789Z', pg_temp.seed_time(placed + interval '105 ms'))::jsonb
  FROM d
  UNION ALL
  SELECT asset_delivery_id, 'asset:' || asset_id, 'asset', terminal, gateway, order_id, asset_id, false,
         replace(replace($asset_content, '5eed0000-0000-0000-0000-000000000001', order_id::text),
                 $asset_document, asset_document)::jsonb,
         'delivered', 1, placed + interval '350 ms' + $ack_timeout_ms * interval '1 ms', placed + interval '320 ms',
         placed + interval '370 ms', exchange_request_id, 'terminal',
         replace(replace(replace(replace($acknowledgement,
           '5eed0000-0000-0000-0000-000000000004', asset_delivery_id::text),
           '5eed0000-0000-0000-0000-000000000005', asset_message_id::text), '@holder@', terminal),
           '2001-01-01T00:00:04.123456789Z', pg_temp.seed_time(placed + interval '365 ms'))::jsonb
  FROM d WHERE exchanged
), attempts AS (
  INSERT INTO delivery_attempts (delivery_id, attempt, message_id, payload_sha256, sent_at, outcome, finished_at)
  SELECT delivery_id, 1, message_id, md5(message_id::text) || md5(delivery_id::text), placed + interval '90 ms',
         'acknowledged', placed + interval '110 ms'
  FROM d
  UNION ALL
  SELECT asset_delivery_id, 1, asset_message_id, md5(asset_message_id::text) || md5(asset_delivery_id::text),
         placed + interval '350 ms', 'acknowledged', placed + interval '370 ms'
  FROM d WHERE exchanged
)
INSERT INTO inbox (pool, message_id, message_type, processed_at)
SELECT m.pool, m.id::text, m.message_type, m.at
FROM d, LATERAL (VALUES
  ('settlement', pg_temp.seed_id(ms - 15, 'p' || i), 'order.purchase', placed),
  ('settlement', pg_temp.seed_id(ms + 25, 'q' || i), 'settlement.result', placed + interval '30 ms'),
  ('issuance', pg_temp.seed_id(ms + 30, 'u' || i), 'issuance.requested', issued),
  ('delivery', pg_temp.seed_id(ms + 60, 'v' || i), 'delivery.requested', placed + interval '90 ms'),
  ('delivery', pg_temp.seed_id(ms + 100, 'w' || i), 'delivery.receipt', placed + interval '110 ms'),
  ('issuance', CASE WHEN exchanged THEN pg_temp.seed_id(ms + 300, 'y' || i) END, 'certificate.exchange',
   placed + interval '320 ms'),
  ('delivery', CASE WHEN exchanged THEN pg_temp.seed_id(ms + 320, 'z' || i) END, 'delivery.requested',
   placed + interval '350 ms'),
  ('delivery', CASE WHEN exchanged THEN pg_temp.seed_id(ms + 360, 'k' || i) END, 'delivery.receipt',
   placed + interval '370 ms')
) AS m(pool, id, message_type, at)
WHERE m.id IS NOT NULL";

/// DELIVERED moves the exchanged assets of orders `$from` to `$to` - 1 to `delivered` as a receipt
/// does: through their status history, whose trigger makes the move (migration 000007), in id
/// order. It returns a row for each asset that moved.
const DELIVERED: &str = "
INSERT INTO asset_status_history (asset_id, from_status, to_status, cause, at)
SELECT pg_temp.seed_id(ms + 60, 'a' || i), 'awaiting_exchange', 'delivered', 'delivery_acknowledged',
       to_timestamp((ms + 370) / 1000.0)
FROM (SELECT i, $start_ms + i * $span_ms / $orders AS ms FROM generate_series($from, $to - 1) AS i) AS g
WHERE mod(i * $stride, 1000) < $exchange_permille
ORDER BY 1";

/// exchanged_among is how many of orders `from` to `to` - 1 were exchanged.
fn exchanged_among(from: i64, to: i64, permille: i32) -> i64 {
    (from..to).filter(|i| (i * EXCHANGE_STRIDE).rem_euclid(1000) < permille as i64).count() as i64
}

/// seed writes `orders` completed orders for `product` into the database `conn` is connected to,
/// whose terminals are registered, spread over the day before `now`; then `VACUUM ANALYZE` and a
/// `CHECKPOINT`, so that the run does not pay for writing out the seed. Progress goes to stderr.
pub fn seed(
    conn: &mut PgConnection,
    templates: &Templates,
    product: &Product,
    orders: i64,
    exchange_rate: f64,
    ack_timeout: std::time::Duration,
    now: DateTime<Utc>,
) -> anyhow::Result<Seeded> {
    use diesel::sql_types::{BigInt, Bool, Int4, Nullable, Text};
    let asset_validity_secs = product
        .asset_validity_secs
        .filter(|_| product.asset_expires_at.is_none())
        .ok_or_else(|| anyhow::anyhow!("the seed needs a product whose assets are valid for a time from issue"))?;
    let certificate_validity_secs =
        product.certificate_validity_secs.filter(|_| product.certificate_expires_at.is_none()).ok_or_else(|| {
            anyhow::anyhow!("the seed needs a product whose certificates are valid for a time from issue")
        })?;
    let permille = (exchange_rate.clamp(0.0, 1.0) * 1000.0).round() as i32;
    // The day before now, ending a second before it: every seeded event (the last at 370 ms after
    // its order) is over before the run begins.
    let span_ms: i64 = 86_400_000;
    let start_ms = now.timestamp_millis() - span_ms - 1_000;
    let started = Instant::now();
    conn.batch_execute(FUNCTIONS)?;
    let mut exchanged = 0;
    let mut from = 0;
    while from < orders {
        let to = (from + CHUNK).min(orders);
        let expected = exchanged_among(from, to, permille);
        let chunk = |query| in_chunk(query, (from, to), orders, (start_ms, span_ms), permille);
        conn.transaction::<_, anyhow::Error, _>(|conn| {
            chunk(crate::runtime::db::prepared(SEED))
                .bind::<BigInt, _>("asset_validity_secs", asset_validity_secs)
                .bind::<BigInt, _>("certificate_validity_secs", certificate_validity_secs)
                .bind::<BigInt, _>("reminder_stage1_secs", product.reminder_stage1_secs)
                .bind::<BigInt, _>("ack_timeout_ms", ack_timeout.as_millis() as i64)
                .bind::<Text, _>("product_id", &product.id)
                .bind::<Text, _>("kind", &product.kind)
                .bind::<Text, _>("issuer_id", &product.issuer_id)
                .bind::<BigInt, _>("price_minor", product.price_minor)
                .bind::<Text, _>("currency", &product.currency)
                .bind::<Nullable<BigInt>, _>("value_minor", product.value_minor)
                .bind::<Nullable<Int4>, _>("uses", product.uses)
                .bind::<Bool, _>("transferable", product.transferable)
                .bind::<Text, _>("asset_document", &templates.asset_document)
                .bind::<Text, _>("issuer_signature", &templates.issuer_signature)
                .bind::<Text, _>("provider_signature", &templates.provider_signature)
                .bind::<Text, _>("certificate_document", &templates.certificate_document)
                .bind::<Text, _>("certificate_signature", &templates.certificate_signature)
                .bind::<Text, _>("certificate_content", &templates.certificate_content)
                .bind::<Text, _>("asset_content", &templates.asset_content)
                .bind::<Text, _>("acknowledgement", &templates.acknowledgement)
                .execute(conn)?;
            let moved = chunk(crate::runtime::db::prepared(DELIVERED)).execute(conn)?;
            // The history's trigger refuses an illegal move and skips a stale one: every
            // exchanged asset must have moved.
            anyhow::ensure!(moved as i64 == expected, "{moved} of {expected} exchanged assets moved to delivered");
            Ok(())
        })?;
        exchanged += expected;
        from = to;
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "seeded {to} of {orders} orders in {seconds:.1}s{}",
            if to < orders {
                format!(", about {:.0}s to go", seconds / to as f64 * (orders - to) as f64)
            } else {
                String::new()
            }
        );
    }
    eprintln!("VACUUM ANALYZE and CHECKPOINT…");
    conn.batch_execute("VACUUM ANALYZE")?;
    conn.batch_execute("CHECKPOINT")?;
    Ok(Seeded { orders, exchanged, seconds: started.elapsed().as_secs_f64() })
}

/// in_chunk binds what both of a chunk's statements number its orders by and choose the exchanged
/// ones with: the chunk's range of orders, their number in all, the span of time they are spread
/// over, and the exchanged share.
fn in_chunk<'f>(
    query: crate::runtime::db::prepared::Prepared<'f>,
    (from, to): (i64, i64),
    orders: i64,
    (start_ms, span_ms): (i64, i64),
    permille: i32,
) -> crate::runtime::db::prepared::Prepared<'f> {
    use diesel::sql_types::{BigInt, Int4};
    query
        .bind::<BigInt, _>("from", from)
        .bind::<BigInt, _>("to", to)
        .bind::<BigInt, _>("orders", orders)
        .bind::<BigInt, _>("start_ms", start_ms)
        .bind::<BigInt, _>("span_ms", span_ms)
        .bind::<BigInt, _>("stride", EXCHANGE_STRIDE)
        .bind::<Int4, _>("exchange_permille", permille)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_templates_hold_the_placeholders_the_statements_replace() {
        let keys = KeyRing::ephemeral(&["bench-issuer"]);
        let product = Product {
            id: "bench-ticket".into(),
            issuer_id: "bench-issuer".into(),
            ..crate::cli::simulate::terminals::demo_catalogue().remove(0)
        };
        let terminal = crypto::generate_key_pair().expect("a key");
        let t = Templates::new(&keys, &product, "assetflow", &terminal).expect("templates");
        let time = |n| serde_json::to_value(placeholder_time(n)).expect("a time").as_str().expect("text").to_string();
        let present = |template: &str, placeholders: &[String]| {
            for p in placeholders {
                assert!(template.contains(p.as_str()), "{p} in {template}");
                assert!(SEED.contains(&format!("'{p}'")), "{p} in SEED");
            }
        };
        present(&t.asset_document, &[ASSET.to_string(), HOLDER.into(), time(1), time(2)]);
        present(
            &t.certificate_document,
            &[CERTIFICATE.to_string(), ASSET.to_string(), HOLDER.into(), time(1), time(3)],
        );
        present(&t.acknowledgement, &[DELIVERY.to_string(), MESSAGE.to_string(), HOLDER.into(), time(4)]);
        // The contents hold the documents whole, as the statements replace them.
        let certificate: Value = serde_json::from_str(&t.certificate_content).expect("JSON");
        assert_eq!(crypto::canonical_json(&certificate["certificate"]), t.certificate_document);
        assert!(t.certificate_content.contains(&t.certificate_document), "the content embeds the canonical document");
        assert!(t.asset_content.contains(&t.asset_document), "the content embeds the canonical document");
        assert!(t.certificate_content.contains(&ORDER.to_string()));
        assert_eq!(time(1), "2001-01-01T00:00:01.123456789Z");
    }

    #[test]
    fn the_exchanged_share_is_exact_in_every_thousand() {
        assert_eq!(exchanged_among(0, 1000, 300), 300);
        assert_eq!(exchanged_among(5000, 6000, 300), 300);
        assert_eq!(exchanged_among(0, 1000, 0), 0);
        assert_eq!(exchanged_among(0, 1000, 1000), 1000);
    }
}
