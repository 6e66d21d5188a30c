//! `assetflow bench scan`: the certificate scans over a large table.

use std::time::Instant;

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Timestamptz};
use serde::Serialize;

use crate::config::Config;
use crate::service::app::App;
use crate::service::scheduler::{Job, Run, RunReport, Trigger, run_job};

#[derive(Debug, Clone, clap::Args)]
pub struct ScanOptions {
    /// Certificates to seed, with expiries spread evenly over the next 30 days.
    #[arg(long, default_value_t = 100_000)]
    pub certificates: i64,
    /// Rows per scan transaction.
    #[arg(long, default_value_t = 5_000)]
    pub batch: i64,
    /// Connections each scan works on at once.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Keep the benchmark database afterwards (it is dropped by default).
    #[arg(long)]
    pub keep: bool,
    #[arg(long)]
    pub json: bool,
}

/// JobFigures is what one scan did and how fast.
#[derive(Debug, Serialize)]
pub struct JobFigures {
    pub job: String,
    pub due_found: u64,
    pub deliveries_enqueued: u64,
    pub seconds: f64,
    pub due_per_second: f64,
    pub enqueued_per_second: f64,
}

/// ScanFigures is the whole benchmark's result.
#[derive(Debug, Serialize)]
pub struct ScanFigures {
    pub certificates: i64,
    pub seed_seconds: f64,
    pub batch: i64,
    pub workers: usize,
    pub as_of: DateTime<Utc>,
    pub jobs: Vec<JobFigures>,
    pub total_due_per_second: f64,
    pub outbox_rows_written: i64,
}

pub async fn run(config: Config, options: ScanOptions) -> anyhow::Result<()> {
    anyhow::ensure!(options.certificates > 0, "--certificates must be positive");
    let url = super::bench_database_url(&config.database.url, "bench_scan");
    let mut config = config;
    config.database.url = url.clone();
    let (keep, n, batch, workers) = (options.keep, options.certificates, options.batch, options.workers);
    let figures = tokio::task::spawn_blocking(move || -> anyhow::Result<ScanFigures> {
        let _exclusive = super::exclusive(&url)?;
        super::recreate_database(&url)?;
        crate::runtime::db::prepare(&url)?;
        let mut app = App::for_operations(config)?;
        let scheduler = std::sync::Arc::get_mut(&mut app.scheduler).expect("not shared yet");
        scheduler.batch = batch;
        scheduler.workers = workers;
        let mut conn = crate::runtime::db::establish(&url)?;
        // As on the pooled connections (see db::SessionSettings).
        conn.batch_execute("SET jit = off")?;
        let now = Utc::now();
        eprintln!("seeding {n} certificates…");
        let started = Instant::now();
        seed(&mut conn, n, now)?;
        let seed_seconds = started.elapsed().as_secs_f64();
        diesel::sql_query("VACUUM ANALYZE").execute(&mut conn)?;
        // Start the measurement from a clean slate, as pgbench does: the seeding's dirty pages
        // written out, not left for the scans to pay for.
        diesel::sql_query("CHECKPOINT").execute(&mut conn)?;
        let as_of = now + chrono::Duration::days(1);
        let mut jobs = Vec::new();
        for name in ["near_expiry", "past_due"] {
            let job = Job::find(name).expect("a job");
            eprintln!("running {name} as of {as_of}…");
            let started = Instant::now();
            let report: RunReport = run_job(
                &mut conn,
                &app.scheduler,
                Run { job, as_of, trigger: Trigger::Manual, dry_run: false },
                &mut |_| {},
            )?;
            let seconds = started.elapsed().as_secs_f64();
            anyhow::ensure!(report.error.is_none(), "{name} failed: {:?}", report.error);
            jobs.push(JobFigures {
                job: name.into(),
                due_found: report.rows_scanned,
                deliveries_enqueued: report.enqueued,
                seconds,
                due_per_second: report.rows_scanned as f64 / seconds,
                enqueued_per_second: report.enqueued as f64 / seconds,
            });
        }
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let outbox: Count = diesel::sql_query("SELECT count(*) AS n FROM outbox").get_result(&mut conn)?;
        let total_due: u64 = jobs.iter().map(|j| j.due_found).sum();
        let total_seconds: f64 = jobs.iter().map(|j| j.seconds).sum();
        drop(conn);
        if !keep {
            super::drop_database(&url)?;
        }
        Ok(ScanFigures {
            certificates: n,
            seed_seconds,
            batch: app.scheduler.batch,
            workers: app.scheduler.workers,
            as_of,
            jobs,
            total_due_per_second: total_due as f64 / total_seconds,
            outbox_rows_written: outbox.n,
        })
    })
    .await??;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        println!(
            "{} certificates, expiries over 30 days, seeded in {:.1}s; scans as of now + 1 day, {} rows a batch on {} connections",
            figures.certificates, figures.seed_seconds, figures.batch, figures.workers
        );
        println!(
            "{:<12} {:>10} {:>10} {:>9} {:>12} {:>14}",
            "JOB", "DUE", "ENQUEUED", "SECONDS", "DUE/S", "ENQUEUED/S"
        );
        for j in &figures.jobs {
            println!(
                "{:<12} {:>10} {:>10} {:>9.2} {:>12.0} {:>14.0}",
                j.job, j.due_found, j.deliveries_enqueued, j.seconds, j.due_per_second, j.enqueued_per_second
            );
        }
        println!(
            "all due certificates: {:.0}/s, with {} outbox rows written",
            figures.total_due_per_second, figures.outbox_rows_written
        );
    }
    Ok(())
}

/// seed writes `n` assets awaiting exchange and their open certificates, set-based, with expiries
/// spread evenly over the 30 days from `now`; one product in ten forces its stage-2 transmission.
fn seed(conn: &mut PgConnection, n: i64, now: DateTime<Utc>) -> anyhow::Result<()> {
    conn.batch_execute(
        "INSERT INTO partners (id) VALUES ('bench-partner');
         INSERT INTO gateways (id) VALUES ('bench-gw');
         INSERT INTO terminals (id, kind, gateway_id, partner_id, public_key_pem)
           VALUES ('bench-terminal', 'mobile', 'bench-gw', 'bench-partner', 'not used by the scans');
         INSERT INTO products (id, kind, title, issuer_id, price_minor, currency, asset_validity_secs, certificate_validity_secs, stage2_policy)
           VALUES ('bench-ticket', 'ticket', 'Benchmark ticket', 'bench-issuer', 1000, 'JPY', 7776000, 2592000, 'download_request'),
                  ('bench-forced', 'ppv_ticket', 'Benchmark pay-per-view', 'bench-issuer', 400, 'JPY', 7776000, 2592000, 'forced_transmission');
         ",
    )?;
    // Chunks keep each statement's memory bounded at a million rows.
    let chunk = 200_000;
    let mut from = 0;
    while from < n {
        let to = (from + chunk).min(n);
        diesel::sql_query(
            format!(
                "WITH t AS (
               SELECT i, $3 + (i * interval '30 days') / $4 AS cert_expiry,
                      $3 - interval '30 days' + (i * interval '30 days') / $4 AS issued,
                      $3 - interval '30 days' + ((i / 4 * 4) * interval '30 days') / $4 AS ordered
               FROM generate_series($1, $2 - 1) AS i
             ), s AS (
               SELECT i, cert_expiry, issued, ordered, {order_id} AS order_id, {asset_id} AS asset_id,
                      {certificate_id} AS certificate_id
               FROM t
             ), r AS (
               INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at, received_at, outcome)
               SELECT 'bench-' || i / 4, 'bench-terminal', 'order.purchase', md5(i::text), ordered, ordered, 'accepted'
               FROM s WHERE i % 4 = 0
             ), o AS (
               INSERT INTO orders (id, request_id, orderer_terminal_id, payer_terminal_id, recipient_terminal_ids, product_id,
                                   quantity, amount_minor, currency, delivery_mode, status, created_at, updated_at)
               SELECT order_id, 'bench-' || i / 4, 'bench-terminal', 'bench-terminal', ARRAY['bench-terminal'],
                      CASE WHEN i / 4 % 10 = 0 THEN 'bench-forced' ELSE 'bench-ticket' END, 4, 4000, 'JPY', 'certificate',
                      'issued', ordered, ordered
               FROM s WHERE i % 4 = 0
             ), a AS (
               INSERT INTO assets (id, order_id, recipient_terminal_id, ordinal, product_id, kind, issuer_id,
                                   holder_terminal_id, issued_at, expires_at, has_exchange_certificate,
                                   certificate_expires_at, status, transferable, currency, status_changed_at)
               SELECT asset_id, order_id, 'bench-terminal', (i % 4)::int,
                      CASE WHEN i / 4 % 10 = 0 THEN 'bench-forced' ELSE 'bench-ticket' END, 'ticket', 'bench-issuer',
                      'bench-terminal', issued, cert_expiry + interval '60 days', true, cert_expiry, 'awaiting_exchange',
                      false, 'JPY', issued
               FROM s
               RETURNING id
             ), ad AS (
               INSERT INTO asset_documents (asset_id, document, issuer_signature, provider_signature)
               SELECT asset_id,
                      -- Documents and signatures the size of real ones (ECDSA P-256, base64 DER).
                      json_build_object('asset_id', asset_id, 'order_id', order_id,
                                        'product_id', 'bench-ticket', 'kind', 'ticket', 'title', 'Benchmark ticket',
                                        'issuer_id', 'bench-issuer', 'holder_terminal_id', 'bench-terminal',
                                        'issued_at', issued, 'expires_at', cert_expiry + interval '60 days',
                                        'value_minor', 1000, 'currency', 'JPY', 'transferable', false)::text,
                      repeat(md5(i::text), 3), repeat(md5((i + 1)::text), 3)
               FROM s JOIN a ON a.id = s.asset_id
             ), c AS (
               INSERT INTO exchange_certificates (id, asset_id, holder_terminal_id, issued_at, expires_at)
               SELECT certificate_id, asset_id, 'bench-terminal', issued, cert_expiry
               FROM s JOIN a ON a.id = s.asset_id
               RETURNING id
             ), cd AS (
               INSERT INTO certificate_documents (certificate_id, document, signature)
               SELECT certificate_id,
                      json_build_object('certificate_id', certificate_id, 'asset_id', asset_id,
                                        'holder_terminal_id', 'bench-terminal', 'issuer_id', 'bench-issuer',
                                        'issued_at', issued, 'expires_at', cert_expiry)::text,
                      repeat(md5((i + 2)::text), 3)
               FROM s JOIN c ON c.id = s.certificate_id
             )
             INSERT INTO reminder_schedule (certificate_id, asset_id, expires_at, next_stage, due_at)
             SELECT certificate_id, asset_id, cert_expiry, 1, cert_expiry - interval '2 days'
             FROM s JOIN c ON c.id = s.certificate_id",
                order_id = v7("ordered", "'o' || i / 4"),
                asset_id = v7("issued", "'a' || i"),
                certificate_id = v7("issued", "'c' || i"),
            ),
        )
        .bind::<BigInt, _>(from)
        .bind::<BigInt, _>(to)
        .bind::<Timestamptz, _>(now)
        .bind::<BigInt, _>(n)
        .execute(conn)?;
        from = to;
    }
    Ok(())
}

/// v7 is SQL for a UUIDv7 with the millisecond timestamp of `time` and the rest from the MD5 of
/// `seed`, as Uuid::now_v7 makes them: ids in issue order, which is what keeps the indexes' working
/// set small in production.
fn v7(time: &str, seed: &str) -> String {
    format!(
        "encode(set_byte(overlay(decode(md5({seed}), 'hex')
         placing substring(int8send((extract(epoch FROM {time}) * 1000)::bigint) FROM 3) FROM 1 FOR 6), 6, 112), 'hex')::uuid"
    )
}
