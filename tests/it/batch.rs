//! The batch side, end to end: near-expiry reminders and past-due processing on the patent's
//! worked example (`docs/product.md#near-expiry-reminders`), the end of retained assets' terms, scans
//! run twice and on two processes at once, the catch-up run at start-up, and the operator's dead
//! letters: replay, purge, and what the broker dead-letters by itself.
//!
//! The scheduler does not run in these tests (except where the catch-up run is the subject): each
//! test plays the clock by running the scans itself at the `as_of` it chooses.

use std::sync::Arc;
use std::time::Duration;

use assetflow::cli::simulate::gateway::{GatewayOptions, exchange_request};
use assetflow::cli::simulate::terminals::purchase;
use assetflow::config::workers::PoolDefinitions;
use assetflow::contracts::messages::{CertificateNotice, CertificateNotices, NoticeKind, kinds};
use assetflow::crypto::KeyRing;
use assetflow::domain::catalogue::Product;
use assetflow::runtime::dead_letter::{self, Filter};
use assetflow::runtime::outbox::{self, Outgoing};
use assetflow::service::app::{self, App, RunOptions};
use assetflow::service::scheduler::{self, Job, RunReport, Trigger};
use chrono::{DateTime, Datelike, SubsecRound, TimeDelta, TimeZone, Utc};
use diesel::prelude::*;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{Env, ISSUER, count, execute, text};
use crate::support::{
    DEADLINE, Retransmitting, asset_status, causes, channel, delivered_certificate, delivery_state, first_attempt,
    history, queued, request_id, retransmitting, settle_all, timestamp, wait_for_queue,
};

/// job_names are the scheduled jobs, for the configuration that gives each a schedule of its own.
fn job_names() -> Vec<&'static str> {
    assetflow::service::scheduler::JOBS.iter().map(|j| j.name).collect()
}

/// deliveries counts what was sent to a terminal, of one kind.
fn deliveries(conn: &mut PgConnection, terminal: &str, kind: &str) -> i64 {
    count(conn, "SELECT count(*) FROM deliveries WHERE terminal_id = $1 AND kind = $2", &[&terminal, &kind])
}

/// second_process is another assetflow process on the same database: its own application and
/// connection pool, and small scan batches, so that its runs take several transactions.
fn second_process(env: &Env) -> Arc<App> {
    let mut app = App::new(env.config.clone(), PoolDefinitions::built_in(), KeyRing::ephemeral(&[ISSUER]));
    Arc::get_mut(&mut app.scheduler).expect("not shared yet").batch = 7;
    Arc::new(app)
}

/// run_on runs a job on `app`, as that process's scheduler would.
async fn run_on(app: Arc<App>, name: &str, as_of: DateTime<Utc>) -> RunReport {
    let job: &'static Job = Job::find(name).unwrap_or_else(|| panic!("no job {name}"));
    scheduler::run_now(app.scheduler.clone(), job, as_of, Trigger::Manual, false).await.expect("the job ran")
}

/// held_in is the number of messages in `queue`, ready or delivered and not yet acknowledged, as
/// `rabbitmqctl list_queues` reports them (a passive declare counts only the ready ones).
async fn held_in(env: &Env, queue: &str) -> u64 {
    let vhost = env.config.amqp.url.rsplit('/').next().expect("the test URL names its vhost").to_string();
    let queue = queue.to_string();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "-p", &vhost, "--quiet", "--no-table-headers", "name", "messages"])
            .output()
            .expect("rabbitmqctl runs");
        assert!(out.status.success(), "rabbitmqctl list_queues: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .map(|(_, n)| n.trim().parse().expect("a message count"))
            .unwrap_or_else(|| panic!("rabbitmqctl lists no queue {queue}"))
    })
    .await
    .unwrap()
}

/// next_christmas is the next Dec 25, 00:00 UTC at least ten days after `now`.
fn next_christmas(now: DateTime<Utc>) -> DateTime<Utc> {
    (now.year()..)
        .map(|year| Utc.with_ymd_and_hms(year, 12, 25, 0, 0, 0).unwrap())
        .find(|christmas| *christmas - now >= TimeDelta::days(10))
        .expect("there is always a next Christmas")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_patents_worked_example_reminds_on_dec_23_asks_for_a_download_on_dec_24_and_forces_delivery_after_dec_25() {
    let christmas = next_christmas(Utc::now());
    let dec = |day: u32, hour: u32| Utc.with_ymd_and_hms(christmas.year(), 12, day, hour, 0, 0).unwrap();
    let concert = move |p: &mut Product| {
        p.title = "Christmas concert".into();
        p.certificate_expires_at = Some(christmas);
        p.certificate_validity_secs = None;
        p.asset_expires_at = Some(christmas + TimeDelta::days(6));
        p.asset_validity_secs = None;
    };
    let mut env = Env::new().await;
    // The default offsets: stage 1 two days before, stage 2 one day before.
    env.product("christmas-concert", concert).await;
    env.product("christmas-concert-forced", |p| {
        concert(p);
        p.stage2_policy = "forced_transmission".into();
    })
    .await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let alice_order = purchase(&alice, "christmas-concert", 1, json!({}));
    env.send(&alice_order).await;
    let bob_order = purchase(&bob, "christmas-concert-forced", 1, json!({}));
    env.send(&bob_order).await;
    let alice_certificate = delivered_certificate(&env, &request_id(&alice_order)).await;
    let bob_certificate = delivered_certificate(&env, &request_id(&bob_order)).await;
    let alice_asset = alice_certificate["asset_id"].as_str().expect("an asset id").to_string();
    let alice_cert = alice_certificate["certificate_id"].as_str().expect("a certificate id").to_string();
    let bob_asset = bob_certificate["asset_id"].as_str().expect("an asset id").to_string();
    let bob_cert = bob_certificate["certificate_id"].as_str().expect("a certificate id").to_string();
    let cert = alice_cert.clone();
    env.db(move |c| {
        let expires =
            timestamp(c, "SELECT expires_at AS value FROM exchange_certificates WHERE id = $1::uuid", &[&cert]);
        assert_eq!(expires, Some(christmas), "the certificate expires on Christmas day");
    })
    .await;

    // Dec 22: three days before, nothing is due yet.
    let dec22 = env.run_job("near_expiry", dec(22, 12)).await;
    assert_eq!((dec22.rows_scanned, dec22.enqueued), (0, 0), "{dec22:?}");
    env.db(|c| {
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE kind <> 'certificate'", &[]), 0);
        let reminded = "SELECT count(*) FROM reminder_schedule WHERE stage1 IS NOT NULL OR stage2 IS NOT NULL";
        assert_eq!(count(c, reminded, &[]), 0);
    })
    .await;

    // Dec 23: "close at hand", a message to each holder, delivered through the gateway.
    let dec23 = env.run_job("near_expiry", dec(23, 12)).await;
    assert_eq!((dec23.rows_scanned, dec23.enqueued), (2, 2), "{dec23:?}");
    let cert = alice_cert.clone();
    env.wait_until("alice's reminder is delivered", move |c| {
        (count(
            c,
            "SELECT count(*) FROM deliveries WHERE terminal_id = 'alice' AND kind = 'message'
               AND content->>'code' = 'certificate_expiring' AND content->>'certificate_id' = $1 AND status = 'delivered'",
            &[&cert],
        ) == 1)
            .then_some(())
    })
    .await;
    let again = env.run_job("near_expiry", dec(23, 13)).await;
    assert_eq!((again.rows_scanned, again.enqueued), (0, 0), "an hour later nothing more: {again:?}");
    env.db(|c| {
        assert_eq!(deliveries(c, "alice", "message"), 1);
        let expiring = "SELECT count(*) FROM deliveries
                        WHERE terminal_id = 'bob' AND kind = 'message' AND content->>'code' = 'certificate_expiring'";
        assert_eq!(count(c, expiring, &[]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE kind IN ('download_request', 'asset')", &[]), 0);
    })
    .await;

    // Dec 24: "very close at hand", a download request; or, by the product's policy, the asset.
    let dec24 = env.run_job("near_expiry", dec(24, 12)).await;
    assert_eq!((dec24.rows_scanned, dec24.enqueued), (2, 2), "{dec24:?}");
    let cert = alice_cert.clone();
    env.wait_until("alice's download request is delivered", move |c| {
        (count(
            c,
            "SELECT count(*) FROM deliveries WHERE terminal_id = 'alice' AND kind = 'download_request'
               AND content->>'code' = 'download_requested' AND content->>'certificate_id' = $1 AND status = 'delivered'",
            &[&cert],
        ) == 1)
            .then_some(())
    })
    .await;
    let asset = bob_asset.clone();
    env.wait_until("bob's forced asset is delivered", move |c| {
        (count(
            c,
            "SELECT count(*) FROM deliveries WHERE terminal_id = 'bob' AND kind = 'asset'
               AND (content->'forced')::boolean AND forced AND status = 'delivered'",
            &[],
        ) == 1
            && asset_status(c, &asset) == "force_delivered")
            .then_some(())
    })
    .await;
    let again = env.run_job("near_expiry", dec(24, 12)).await;
    assert_eq!((again.rows_scanned, again.enqueued), (0, 0), "the same day again, nothing more: {again:?}");
    let (a_cert, b_cert) = (alice_cert.clone(), bob_cert.clone());
    env.db(move |c| {
        assert_eq!(deliveries(c, "alice", "download_request"), 1);
        assert_eq!(deliveries(c, "alice", "asset"), 0, "alice's product asks, it does not force");
        assert_eq!(deliveries(c, "bob", "download_request"), 0, "bob gets the asset instead");
        assert_eq!(deliveries(c, "bob", "asset"), 1);
        let ledger =
            "SELECT '1:' || stage1 || ', 2:' || stage2 AS value FROM reminder_schedule WHERE certificate_id = $1::uuid";
        assert_eq!(text(c, ledger, &[&a_cert]).as_deref(), Some("1:message, 2:download_request"));
        assert_eq!(text(c, ledger, &[&b_cert]).as_deref(), Some("1:message, 2:forced_transmission"));
    })
    .await;
    let bob_sent = env.db(|c| count(c, "SELECT count(*) FROM deliveries WHERE terminal_id = 'bob'", &[])).await;

    // Dec 26: the certificate expired unexchanged (`docs/product.md#past-due-processing`). The asset is still valid: a past-due
    // message, a forced transmission and a revocation request; the certificate is revoked.
    let dec26 = dec(26, 12);
    let past_due = env.run_job("past_due", dec26).await;
    assert_eq!(past_due.enqueued, 4, "three transmissions for alice, a revocation request for bob: {past_due:?}");
    let (asset, cert) = (alice_asset.clone(), alice_cert.clone());
    env.wait_until("alice's past-due transmissions are acknowledged", move |c| {
        (asset_status(c, &asset) == "force_delivered"
            && count(
                c,
                "SELECT count(*) FROM deliveries WHERE terminal_id = 'alice' AND kind = 'message'
                   AND content->>'code' = 'certificate_past_due' AND status = 'delivered'",
                &[],
            ) == 1
            && count(
                c,
                "SELECT count(*) FROM deliveries WHERE terminal_id = 'alice' AND kind = 'revocation_request'
                   AND content->>'certificate_id' = $1 AND status = 'delivered'",
                &[&cert],
            ) == 1)
            .then_some(())
    })
    .await;
    let (asset, cert, b_asset, b_cert) = (alice_asset.clone(), alice_cert.clone(), bob_asset.clone(), bob_cert.clone());
    env.db(move |c| {
        let forced = "SELECT count(*) FROM deliveries WHERE terminal_id = 'alice' AND kind = 'asset'
                        AND asset_id = $1::uuid AND forced AND (content->'forced')::boolean AND status = 'delivered'";
        assert_eq!(count(c, forced, &[&asset]), 1);
        let past_due = "SELECT count(*) FROM deliveries
                        WHERE terminal_id = 'alice' AND kind = 'message' AND content->>'code' = 'certificate_past_due'";
        assert_eq!(count(c, past_due, &[]), 1);
        assert_eq!(deliveries(c, "alice", "revocation_request"), 1);
        assert_eq!(
            history(c, &asset),
            "(new)→awaiting_exchange, awaiting_exchange→expired_certificate_processing, expired_certificate_processing→force_delivered"
        );
        assert_eq!(causes(c, &asset), "issued, certificate_past_due, delivery_acknowledged");
        let revoked = "SELECT revoked_at AS value FROM exchange_certificates WHERE id = $1::uuid";
        assert_eq!(timestamp(c, revoked, &[&cert]), Some(dec26), "revoked as of the run's intended time");
        // Bob's asset was force-delivered on Dec 24: past-due revokes his certificate and sends
        // him the revocation request, and nothing else.
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE terminal_id = 'bob'", &[]), bob_sent + 1);
        let bob_revocation = "SELECT count(*) FROM deliveries WHERE terminal_id = 'bob' AND kind = 'revocation_request'
                                AND content->>'certificate_id' = $1";
        assert_eq!(count(c, bob_revocation, &[&b_cert]), 1);
        assert_eq!(asset_status(c, &b_asset), "force_delivered");
        assert_eq!(history(c, &b_asset), "(new)→awaiting_exchange, awaiting_exchange→force_delivered");
        assert!(timestamp(c, revoked, &[&b_cert]).is_some(), "bob's certificate is closed");
    })
    .await;
    let again = env.run_job("past_due", dec26 + TimeDelta::days(1)).await;
    assert_eq!((again.rows_scanned, again.enqueued), (0, 0), "{again:?}");

    // Alice tries to exchange her certificate after all: refused, and no second asset.
    let exchange = exchange_request("alice", alice_certificate, &alice.key);
    let xid = request_id(&exchange);
    env.send(&exchange).await;
    let sql = "SELECT reason AS value FROM refusals WHERE request_id = $1";
    let reason = env.wait_until("the late exchange is refused", move |c| text(c, sql, &[&xid])).await;
    assert_eq!(reason, "certificate_revoked", "the certificate was revoked before it expired");
    let asset = alice_asset.clone();
    env.db(move |c| {
        assert_eq!(
            count(c, "SELECT count(*) FROM deliveries WHERE asset_id = $1::uuid AND kind = 'asset'", &[&asset]),
            1
        );
        assert_eq!(asset_status(c, &asset), "force_delivered");
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_due_processing_of_an_asset_that_is_no_longer_valid_expires_it_and_sends_only_the_revocation_request() {
    // Whole seconds: the database keeps microseconds, and the test compares times it wrote.
    let now = Utc::now().trunc_subsecs(0);
    let mut env = Env::new().await;
    env.product("short-run", |p| {
        p.certificate_expires_at = Some(now + TimeDelta::days(3));
        p.certificate_validity_secs = None;
        p.asset_expires_at = Some(now + TimeDelta::days(4));
        p.asset_validity_secs = None;
    })
    .await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let order = purchase(&alice, "short-run", 1, json!({}));
    env.send(&order).await;
    let certificate = delivered_certificate(&env, &request_id(&order)).await;
    let asset = certificate["asset_id"].as_str().expect("an asset id").to_string();
    let cert = certificate["certificate_id"].as_str().expect("a certificate id").to_string();

    // By the run's time both the certificate and the asset are past their terms (`docs/product.md#validity-is-checked-first`).
    let as_of = now + TimeDelta::days(5);
    let report = env.run_job("past_due", as_of).await;
    assert_eq!((report.rows_scanned, report.enqueued), (1, 1), "{report:?}");
    // The job revokes and publishes; the delivery pool moves the asset.
    let a = asset.clone();
    env.wait_until("the asset expires", move |c| (asset_status(c, &a) == "expired").then_some(())).await;
    let (a, c2) = (asset.clone(), cert.clone());
    env.db(move |c| {
        assert_eq!(
            history(c, &a),
            "(new)→awaiting_exchange, awaiting_exchange→expired_certificate_processing, expired_certificate_processing→expired"
        );
        assert_eq!(causes(c, &a), "issued, certificate_past_due, asset_expired");
        let sent = "SELECT string_agg(kind, ', ' ORDER BY kind) AS value FROM deliveries
                    WHERE (asset_id = $1::uuid OR content->>'asset_id' = $1) AND kind <> 'certificate'";
        assert_eq!(
            text(c, sent, &[&a]).as_deref(),
            Some("revocation_request"),
            "no past-due message and no forced transmission for a void asset, but the revocation request"
        );
        let revocation = "SELECT count(*) FROM deliveries WHERE terminal_id = 'alice' AND kind = 'revocation_request'
                            AND content->>'certificate_id' = $1";
        assert_eq!(count(c, revocation, &[&c2]), 1);
        let revoked = "SELECT revoked_at AS value FROM exchange_certificates WHERE id = $1::uuid";
        assert_eq!(timestamp(c, revoked, &[&c2]), Some(as_of), "the certificate is closed");
    })
    .await;
    let again = env.run_job("past_due", as_of + TimeDelta::days(1)).await;
    assert_eq!((again.rows_scanned, again.enqueued), (0, 0), "{again:?}");
    env.stop().await;
}

/// expiry_range is the earliest and latest expiry of a product's exchange certificates.
async fn expiry_range(env: &Env, product: &str) -> (DateTime<Utc>, DateTime<Utc>) {
    let product = product.to_string();
    env.db(move |c| {
        let earliest =
            "SELECT min(c.expires_at) AS value FROM exchange_certificates c JOIN assets a ON a.id = c.asset_id
                        WHERE a.product_id = $1";
        let latest = "SELECT max(c.expires_at) AS value FROM exchange_certificates c JOIN assets a ON a.id = c.asset_id
                      WHERE a.product_id = $1";
        (
            timestamp(c, earliest, &[&product]).expect("certificates"),
            timestamp(c, latest, &[&product]).expect("certificates"),
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_run_twice_and_on_two_processes_at_once_enqueues_nothing_twice() {
    let mut env = Env::new().await;
    env.product("seven-day", |p| p.certificate_validity_secs = Some(7 * 86_400)).await;
    env.product("ten-day", |p| p.certificate_validity_secs = Some(10 * 86_400)).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let bob = env.terminal("bob", "gw-2", Some("bank-a")).await;
    env.start().await;
    env.partner(settle_all());
    // No gateway simulator: what the scans enqueue stays on record, sent and unacknowledged.

    for product in ["seven-day", "ten-day"] {
        for (terminal, quantity) in [(&alice, 10), (&bob, 10), (&alice, 15), (&bob, 5), (&alice, 10)] {
            env.send(&purchase(terminal, product, quantity, json!({}))).await;
        }
    }
    env.wait_until("100 certificates are issued", |c| {
        (count(c, "SELECT count(*) FROM exchange_certificates", &[]) == 100).then_some(())
    })
    .await;

    // Twice in a row at the same time: the second run finds everything done.
    let (first, last) = expiry_range(&env, "seven-day").await;
    let as_of = last - TimeDelta::hours(36);
    assert!(first > as_of + TimeDelta::days(1), "every seven-day certificate is in stage 1 at {as_of}");
    let once = env.run_job("near_expiry", as_of).await;
    assert_eq!((once.rows_scanned, once.enqueued), (50, 50), "{once:?}");
    let twice = env.run_job("near_expiry", as_of).await;
    assert_eq!((twice.ran, twice.rows_scanned, twice.enqueued), (true, 0, 0), "{twice:?}");

    // Two processes at once, stage 1 and then stage 2 of the ten-day certificates. A process that
    // finds the job's lock held does nothing; either way, everything is sent exactly once.
    let other = second_process(&env);
    let (first, last) = expiry_range(&env, "ten-day").await;
    for (stage, as_of) in [(1, last - TimeDelta::hours(36)), (2, last - TimeDelta::hours(12))] {
        assert!(first > as_of + TimeDelta::hours(if stage == 1 { 24 } else { 0 }), "stage {stage} at {as_of}");
        let (one, two) = tokio::join!(env.run_job("near_expiry", as_of), run_on(other.clone(), "near_expiry", as_of));
        assert!(one.ran || two.ran, "{one:?} {two:?}");
        assert_eq!(one.enqueued + two.enqueued, 50, "stage {stage}: {one:?} {two:?}");
        let again = run_on(other.clone(), "near_expiry", as_of).await;
        assert_eq!((again.rows_scanned, again.enqueued), (0, 0), "{again:?}");
    }
    // The delivery pool makes the deliveries from the scans' notices.
    env.wait_until("150 reminders are sent", |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE dedupe_key LIKE 'reminder:%' AND status = 'sent'", &[]) >= 150)
            .then_some(())
    })
    .await;
    env.db(|c| {
        assert_eq!(count(c, "SELECT count(*) FROM reminder_schedule WHERE stage1 = 'message'", &[]), 100, "50 + 50 stage-1");
        assert_eq!(count(c, "SELECT count(*) FROM reminder_schedule WHERE stage2 = 'download_request'", &[]), 50);
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE dedupe_key LIKE 'reminder:%'", &[]), 150);
        assert_eq!(
            count(c, "SELECT count(*) FROM (SELECT 1 FROM deliveries WHERE dedupe_key LIKE 'reminder:%' GROUP BY content->>'certificate_id', kind HAVING count(*) > 1) d", &[]),
            0,
            "no certificate got the same reminder twice"
        );
        assert_eq!(count(c, "SELECT count(DISTINCT content->>'certificate_id') FROM deliveries WHERE kind = 'download_request'", &[]), 50);
    })
    .await;

    // Past due, on two processes at once: one message, one forced asset and one revocation
    // request per certificate.
    let as_of = last + TimeDelta::days(1);
    let (one, two) = tokio::join!(env.run_job("past_due", as_of), run_on(other.clone(), "past_due", as_of));
    assert_eq!(one.enqueued + two.enqueued, 300, "{one:?} {two:?}");
    assert_eq!(one.rows_scanned + two.rows_scanned, 100, "{one:?} {two:?}");
    let again = env.run_job("past_due", as_of).await;
    assert_eq!((again.rows_scanned, again.enqueued), (0, 0), "{again:?}");
    env.wait_until("300 past-due transmissions are sent", |c| {
        (count(
            c,
            "SELECT count(*) FROM deliveries WHERE dedupe_key ~ '^(past_due|revoke|asset):' AND status = 'sent'",
            &[],
        ) >= 300)
            .then_some(())
    })
    .await;
    env.db(move |c| {
        for (kind, code) in [("message", "certificate_past_due"), ("revocation_request", "certificate_revoked")] {
            let sql = "SELECT count(*) FROM deliveries WHERE kind = $1 AND content->>'code' = $2";
            assert_eq!(count(c, sql, &[&kind, &code]), 100, "{kind}");
            let sql = "SELECT count(DISTINCT content->>'certificate_id') FROM deliveries
                       WHERE kind = $1 AND content->>'code' = $2";
            assert_eq!(count(c, sql, &[&kind, &code]), 100, "{kind}: one per certificate");
        }
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE kind = 'asset' AND forced", &[]), 100);
        assert_eq!(count(c, "SELECT count(DISTINCT asset_id) FROM deliveries WHERE kind = 'asset'", &[]), 100);
        let revoked = "SELECT count(*) FROM exchange_certificates WHERE revoked_at = $1::timestamptz";
        assert_eq!(count(c, revoked, &[&as_of]), 100);
        assert_eq!(count(c, "SELECT count(*) FROM asset_status_history WHERE to_status = 'expired_certificate_processing'", &[]), 100);
        assert_eq!(count(c, "SELECT count(DISTINCT asset_id) FROM asset_status_history WHERE to_status = 'expired_certificate_processing'", &[]), 100);
        assert_eq!(count(c, "SELECT count(*) FROM job_runs WHERE outcome <> 'succeeded'", &[]), 0);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dead_lettered_by_a_failing_gateway_is_replayed_by_an_operator_and_force_delivered() {
    let mut env = Env::new().await;
    env.product("ppv", |p| p.kind = "ppv_ticket".into()).await;
    let carol = env.terminal("carol", "gw-1", Some("card-co")).await;
    let limit = env.app.pools.delivery.transmission.max_attempts_for("asset", Some("mobile")) as i32;
    env.start().await;
    env.partner(settle_all());
    // No gateway simulator yet: no attempt is ever acknowledged.

    let order = purchase(&carol, "ppv", 1, json!({"delivery": {"mode": "immediate"}}));
    env.send(&order).await;
    let first = first_attempt(&env, &request_id(&order)).await;

    // Play the clock: every run at the delivery's due time times out the attempt in flight or
    // sends the next one, until the attempts run out.
    let mut waits: Vec<(i32, TimeDelta)> = Vec::new();
    for runs in 0.. {
        let id = first.delivery.clone();
        let before = env.db(move |c| delivery_state(c, &id)).await;
        if before.status == "dead" {
            break;
        }
        assert!(runs < 2 * limit, "still not dead after {runs} runs: {before:?}");
        let report = env.run_job("retransmission", before.due_at).await;
        assert_eq!(report.rows_scanned, 1, "{before:?}: {report:?}");
        if before.status == "sent" {
            let (id, attempt) = (first.delivery.clone(), before.attempts);
            let (after, failed_at) = env
                .db(move |c| {
                    let sql = "SELECT finished_at AS value FROM delivery_attempts
                               WHERE delivery_id = $1::uuid AND attempt = $2::int4";
                    let failed_at = timestamp(c, sql, &[&id, &attempt]).expect("a timed-out attempt has finished");
                    (delivery_state(c, &id), failed_at)
                })
                .await;
            if after.status == "failed" {
                waits.push((attempt, after.due_at - failed_at));
            }
        }
    }
    // The first two waits follow the schedule (1 min, then 5 min), within the 10% jitter.
    assert!(waits.len() >= 2, "{waits:?}");
    for ((attempt, wait), nominal) in waits.iter().zip([60_000i64, 300_000]) {
        let slack = nominal / 10 + 1;
        let wait = wait.num_milliseconds();
        assert!(
            (nominal - slack..=nominal + slack).contains(&wait),
            "after attempt {attempt}: waited {wait} ms, not {nominal} ms ± 10%"
        );
    }
    let (delivery, asset) = (first.delivery.clone(), first.asset.clone());
    let letter = env
        .db(move |c| {
            let state = delivery_state(c, &delivery);
            assert_eq!((state.status.as_str(), state.attempts), ("dead", limit));
            assert_eq!(asset_status(c, &asset), "retransmitting");
            let sql = "SELECT id::text AS value FROM dead_letters
                       WHERE source = 'delivery' AND reason = 'retries_exhausted' AND subject_id = $1::uuid";
            text(c, sql, &[&delivery]).expect("a dead letter for the delivery")
        })
        .await;
    let letter: uuid::Uuid = letter.parse().expect("a dead letter id");

    // The gateway comes back. What it missed was lost with it: it sees only what is sent now.
    let gateway_queue = env.app.plumbing.names.gateway_queue("gw-1");
    wait_for_queue(&env, &gateway_queue, "every attempt reaches the gateway's queue", |n| n >= limit as u32).await;
    channel(&env).await.queue_purge(gateway_queue.as_str().into(), QueuePurgeOptions::default()).await.expect("purged");
    env.gateway(GatewayOptions::default());

    let app = env.app.clone();
    let replayed = env
        .db(move |c| {
            app.replayers()
                .expect("replayers")
                .replay(c, letter, "test-operator", Utc::now())
                .map_err(|e| e.to_string())
        })
        .await
        .expect("the dead letter is replayed");
    assert_eq!(replayed.id, letter);
    env.app.plumbing.outbox_wake.notify_one();
    let asset = first.asset.clone();
    env.wait_until("the replayed delivery is force-delivered", move |c| {
        (asset_status(c, &asset) == "force_delivered").then_some(())
    })
    .await;
    let (delivery, asset) = (first.delivery.clone(), first.asset.clone());
    env.db(move |c| {
        let state = delivery_state(c, &delivery);
        assert_eq!((state.status.as_str(), state.attempts), ("delivered", limit + 1));
        let outcome = "SELECT outcome AS value FROM delivery_attempts WHERE delivery_id = $1::uuid AND attempt = $2::int4";
        assert_eq!(text(c, outcome, &[&delivery, &(limit + 1)]).as_deref(), Some("acknowledged"));
        assert_eq!(
            history(c, &asset),
            "(new)→awaiting_designated_delivery, awaiting_designated_delivery→retransmitting, retransmitting→force_delivered"
        );
        let replayed =
            "SELECT count(*) FROM dead_letters WHERE id = $1::uuid AND replayed_at IS NOT NULL AND replay_count = 1";
        assert_eq!(count(c, replayed, &[&letter]), 1);
        let audit = "SELECT count(*) FROM dead_letter_audit
                     WHERE dead_letter_id = $1::uuid AND action = 'replay' AND operator = 'test-operator'";
        assert_eq!(count(c, audit, &[&letter]), 1);
        let listed = dead_letter::list(c, &Filter::default(), 100).expect("listed");
        assert!(listed.iter().all(|l| l.id != letter), "a replayed dead letter leaves the default list: {listed:?}");
    })
    .await;

    // A second replay has nothing to do: the delivery is not dead any more.
    let app = env.app.clone();
    let error = env
        .db(move |c| {
            app.replayers()
                .expect("replayers")
                .replay(c, letter, "test-operator", Utc::now())
                .map_err(|e| e.to_string())
        })
        .await
        .expect_err("a delivered delivery cannot be replayed");
    assert!(error.contains("not dead"), "{error}");
    env.db(move |c| {
        let replayed = "SELECT count(*) FROM dead_letters WHERE id = $1::uuid AND replay_count = 1";
        assert_eq!(count(c, replayed, &[&letter]), 1, "the failed replay changed nothing");
        assert_eq!(count(c, "SELECT count(*) FROM dead_letter_audit WHERE dead_letter_id = $1::uuid", &[&letter]), 1);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_malformed_message_is_dead_lettered_again_as_a_new_dead_letter() {
    let mut env = Env::new().await;
    env.start().await;

    env.publish("order.purchase", br#"{"type": "order.purchase", "request_id": "#).await;
    let sql = "SELECT id::text AS value FROM dead_letters WHERE reason = 'malformed'";
    let first: uuid::Uuid =
        env.wait_until("the message is dead-lettered", move |c| text(c, sql, &[])).await.parse().unwrap();

    let app = env.app.clone();
    env.db(move |c| {
        app.replayers().expect("replayers").replay(c, first, "test-operator", Utc::now()).map_err(|e| e.to_string())
    })
    .await
    .expect("replayed");
    env.app.plumbing.outbox_wake.notify_one();
    let sql = "SELECT id::text AS value FROM dead_letters WHERE reason = 'malformed' AND id <> $1::uuid";
    let second: uuid::Uuid =
        env.wait_until("the replay is dead-lettered again", move |c| text(c, sql, &[&first])).await.parse().unwrap();
    env.db(move |c| {
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 2);
        let replayed =
            "SELECT count(*) FROM dead_letters WHERE id = $1::uuid AND replayed_at IS NOT NULL AND replay_count = 1";
        assert_eq!(count(c, replayed, &[&first]), 1, "the first is marked replayed");
        // The second went through the normal path: back into the settlement pool by its replay
        // key, with the same body and the time the original arrived.
        let same = "SELECT count(*) FROM dead_letters a, dead_letters b
                    WHERE a.id = $1::uuid AND b.id = $2::uuid AND b.replayed_at IS NULL AND b.pool = 'settlement'
                      AND b.routing_key = 'replay.settlement' AND b.payload = a.payload AND b.message_id <> a.message_id
                      AND (b.headers->>'received_at')::timestamptz = (a.headers->>'received_at')::timestamptz";
        assert_eq!(count(c, same, &[&first, &second]), 1);
        let audit = "SELECT count(*) FROM dead_letter_audit
                     WHERE dead_letter_id = $1::uuid AND action = 'replay' AND operator = 'test-operator'";
        assert_eq!(count(c, audit, &[&first]), 1);
        let listed = dead_letter::list(c, &Filter::default(), 100).expect("listed");
        let ids: Vec<uuid::Uuid> = listed.iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![second], "only the new dead letter waits for an operator");
        // `dlq list --json` carries the original's AMQP message id and type, so that a publisher
        // can match the dead letter to what it published.
        let shown = serde_json::to_value(&listed[0]).unwrap();
        let stored = "SELECT message_id AS value FROM dead_letters WHERE id = $1::uuid";
        assert!(shown["message_id"].is_string(), "{shown}");
        assert_eq!(shown["message_id"].as_str(), text(c, stored, &[&second]).as_deref());
        assert!(shown["message_type"].is_string(), "{shown}");
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_request_dead_lettered_as_unroutable_is_processed_when_replayed_as_of_its_original_receipt() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    // A valid signed order, sent ten minutes ago under the wrong routing key: no queue takes it,
    // and the settlement pool dead-letters it from the unrouted queue.
    let sent_at = Utc::now() - TimeDelta::minutes(10);
    let order = purchase(&alice, "concert", 1, json!({"sent_at": sent_at}));
    let rid = request_id(&order);
    env.publish("order.cancel", &serde_json::to_vec(&order).unwrap()).await;
    let sql = "SELECT id::text AS value FROM dead_letters WHERE reason = 'unroutable' AND pool = 'settlement' AND message_type = 'order.purchase'";
    let letter: uuid::Uuid =
        env.wait_until("the order is dead-lettered", move |c| text(c, sql, &[])).await.parse().unwrap();

    // The same kind of request arriving now is refused: it is older than the freshness window.
    let stale = purchase(&alice, "concert", 1, json!({"sent_at": sent_at}));
    let stale_id = request_id(&stale);
    env.send(&stale).await;
    env.wait_until("a ten-minute-old request is refused as stale", move |c| {
        (count(c, "SELECT count(*) FROM refusals WHERE request_id = $1 AND reason = 'stale_request'", &[&stale_id])
            == 1)
            .then_some(())
    })
    .await;

    // The dead-lettered one had reached assetflow 30 s after it was sent: a replay is judged as
    // of that receipt, not as of the replay.
    let received_at = (sent_at + TimeDelta::seconds(30)).to_rfc3339();
    env.db(move |c| {
        execute(
            c,
            "UPDATE dead_letters SET headers = jsonb_set(headers, '{received_at}', to_jsonb($1::text)) WHERE id = $2::uuid",
            &[&received_at, &letter],
        );
    })
    .await;
    let app = env.app.clone();
    env.db(move |c| {
        app.replayers().expect("replayers").replay(c, letter, "test-operator", Utc::now()).map_err(|e| e.to_string())
    })
    .await
    .expect("replayed");
    env.app.plumbing.outbox_wake.notify_one();
    let r = rid.clone();
    env.wait_until("the replayed order is settled, issued and its certificate delivered", move |c| {
        (count(
            c,
            "SELECT count(*) FROM deliveries d JOIN orders o ON o.id = d.order_id
             WHERE o.request_id = $1 AND o.status = 'issued' AND d.kind = 'certificate' AND d.status = 'delivered'",
            &[&r],
        ) == 1)
            .then_some(())
    })
    .await;
    env.db(move |c| {
        assert_eq!(count(c, "SELECT count(*) FROM refusals WHERE request_id = $1", &[&rid]), 0);
        let settled = "SELECT count(*) FROM settlements s JOIN orders o ON o.id = s.order_id
                       WHERE o.request_id = $1 AND s.status = 'settled'";
        assert_eq!(count(c, settled, &[&rid]), 1);
        let replayed =
            "SELECT count(*) FROM dead_letters WHERE id = $1::uuid AND replayed_at IS NOT NULL AND replay_count = 1";
        assert_eq!(count(c, replayed, &[&letter]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 1, "the replay was not dead-lettered again");
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_only_the_dead_letters_its_filter_selects_and_audits_each_one() {
    let mut env = Env::new().await;
    env.start().await;

    env.publish("order.purchase", b"not JSON at all").await;
    env.publish("order.purchase", b"[1, 2, 3]").await;
    env.publish("order.cancel", br#"{"type": "order.cancel"}"#).await;
    env.wait_until("three dead letters are recorded", |c| {
        (count(c, "SELECT count(*) FROM dead_letters WHERE reason = 'malformed'", &[]) == 2
            && count(c, "SELECT count(*) FROM dead_letters WHERE reason = 'unroutable'", &[]) == 1)
            .then_some(())
    })
    .await;

    let filter = Filter { reason: Some("malformed".into()), ..Filter::default() };
    let purged = env.db(move |c| dead_letter::purge(c, &filter, "test-operator").expect("purged")).await;
    assert_eq!(purged.len(), 2, "{purged:?}");
    env.db(move |c| {
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters WHERE reason = 'unroutable'", &[]), 1, "the other reason stays");
        assert_eq!(count(c, "SELECT count(*) FROM dead_letter_audit", &[]), 2);
        for id in &purged {
            let audit = "SELECT count(*) FROM dead_letter_audit
                         WHERE dead_letter_id = $1::uuid AND action = 'purge' AND operator = 'test-operator'
                           AND summary->>'id' = $1 AND summary->>'reason' = 'malformed' AND summary->>'pool' = 'settlement'
                           AND summary->>'detail' <> ''";
            assert_eq!(count(c, audit, &[id]), 1, "the purge of {id} is audited with its summary");
        }
        let listed = dead_letter::list(c, &Filter::default(), 100).expect("listed");
        assert_eq!(listed.iter().map(|l| l.reason.as_str()).collect::<Vec<_>>(), vec!["unroutable"]);
        let again = dead_letter::purge(c, &Filter { reason: Some("malformed".into()), ..Filter::default() }, "test-operator")
            .expect("purged");
        assert!(again.is_empty(), "nothing is left to purge: {again:?}");
        assert_eq!(count(c, "SELECT count(*) FROM dead_letter_audit", &[]), 2);
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asset_expiry_ends_a_retransmitting_asset_past_its_term_and_cancels_its_delivery() {
    let mut env = Env::new().await;
    let Retransmitting { first, expires_at } = retransmitting(&mut env).await;

    // Within its term nothing happens.
    let early = env.run_job("asset_expiry", expires_at - TimeDelta::minutes(1)).await;
    assert_eq!((early.rows_scanned, early.enqueued), (0, 0), "{early:?}");
    let asset = first.asset.clone();
    env.db(move |c| assert_eq!(asset_status(c, &asset), "retransmitting")).await;

    // Past it, the asset is expired and its pending retransmission cancelled.
    let as_of = expires_at + TimeDelta::minutes(1);
    let due = env.run_job("asset_expiry", as_of).await;
    assert_eq!((due.rows_scanned, due.enqueued), (1, 0), "{due:?}");
    let (delivery, asset) = (first.delivery.clone(), first.asset.clone());
    let check = move |c: &mut PgConnection| {
        let state = delivery_state(c, &delivery);
        assert_eq!((state.status.as_str(), state.attempts), ("cancelled", 1));
        assert_eq!(asset_status(c, &asset), "expired");
        assert_eq!(
            history(c, &asset),
            "(new)→awaiting_designated_delivery, awaiting_designated_delivery→retransmitting, retransmitting→expired"
        );
        assert_eq!(causes(c, &asset), "issued, delivery_failed, asset_expired");
        let at = "SELECT at AS value FROM asset_status_history WHERE asset_id = $1::uuid AND to_status = 'expired'";
        assert_eq!(timestamp(c, at, &[&asset]), Some(as_of), "expired as of the run's intended time");
        let attempts = "SELECT count(*) FROM delivery_attempts WHERE delivery_id = $1::uuid";
        assert_eq!(count(c, attempts, &[&delivery]), 1);
    };
    env.db(check.clone()).await;

    // A second run, and a retransmission run, change nothing.
    let again = env.run_job("asset_expiry", as_of + TimeDelta::days(1)).await;
    assert_eq!((again.rows_scanned, again.enqueued), (0, 0), "{again:?}");
    let retry = env.run_job("retransmission", as_of + TimeDelta::days(1)).await;
    assert_eq!((retry.rows_scanned, retry.enqueued), (0, 0), "{retry:?}");
    env.db(check).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_designated_delivery_that_came_due_while_nothing_ran_is_sent_by_the_catch_up_run_at_start_up() {
    // Schedules that never fire during the test: only the catch-up run can send anything.
    let schedules: serde_json::Map<String, Value> =
        job_names().into_iter().map(|j| (j.to_string(), json!("0 0 0 1 1 *"))).collect();
    let mut env = Env::with(json!({"schedules": schedules})).await;
    env.product("ppv", |p| p.kind = "ppv_ticket".into()).await;
    let erin = env.terminal("erin", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let at = Utc::now() + TimeDelta::seconds(2);
    let order = purchase(&erin, "ppv", 1, json!({"delivery": {"mode": "designated", "at": at}}));
    let rid = request_id(&order);
    env.send(&order).await;
    let sql = "SELECT a.id::text AS value FROM assets a JOIN orders o ON o.id = a.order_id
               WHERE o.request_id = $1 AND a.status = 'awaiting_designated_delivery'";
    let asset = env.wait_until("the designated asset is issued", move |c| text(c, sql, &[&rid])).await;
    env.wait_until("the outbox is empty", |c| (count(c, "SELECT count(*) FROM outbox", &[]) == 0).then_some(())).await;
    env.stop().await;

    // Its time passes while nothing runs.
    env.wait_until("the designated time has passed", move |_| (Utc::now() > at).then_some(())).await;
    let a = asset.clone();
    env.db(move |c| {
        assert_eq!(asset_status(c, &a), "awaiting_designated_delivery");
        assert_eq!(
            count(c, "SELECT count(*) FROM deliveries WHERE asset_id = $1::uuid AND status = 'pending'", &[&a]),
            1
        );
        assert_eq!(count(c, "SELECT count(*) FROM job_runs", &[]), 0);
    })
    .await;

    // Started with its scheduler, assetflow runs every job once at once, and the asset goes out.
    let stop = CancellationToken::new();
    let options = RunOptions { scheduler: true, http: false, ..RunOptions::default() };
    let run = tokio::spawn(app::run(env.app.clone(), options, stop.clone()));
    let a = asset.clone();
    env.wait_until("the catch-up run delivers the asset, and every job has had its catch-up run", move |c| {
        (asset_status(c, &a) == "delivered"
            && count(
                c,
                "SELECT count(DISTINCT job) FROM job_runs WHERE trigger = 'catch_up' AND outcome = 'succeeded'",
                &[],
            ) == job_names().len() as i64)
            .then_some(())
    })
    .await;
    env.db(move |c| {
        let caught_up = "SELECT count(*) FROM job_runs
                         WHERE job = 'designated_delivery' AND trigger = 'catch_up' AND outcome = 'succeeded'
                           AND enqueued = 1 AND as_of > $1::timestamptz";
        assert_eq!(count(c, caught_up, &[&at]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM job_runs WHERE trigger <> 'catch_up'", &[]), 0, "no schedule fired");
        assert_eq!(
            count(c, "SELECT count(*) FROM job_runs WHERE trigger = 'catch_up'", &[]),
            job_names().len() as i64,
            "once each"
        );
        assert_eq!(history(c, &asset), "(new)→awaiting_designated_delivery, awaiting_designated_delivery→delivered");
    })
    .await;
    stop.cancel();
    run.await.expect("the app did not panic").expect("the app stopped cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_dead_letters_by_itself_is_recorded_from_the_dead_letter_queue() {
    let mut env = Env::new().await;
    let frank = env.terminal("frank", "gw-1", Some("card-co")).await;
    env.start().await;

    // What the broker does when a quorum queue's delivery limit is reached: the message goes to
    // the dead-letter exchange under the queue's dead-letter key, with an x-death header.
    let queue = env.app.plumbing.names.pool_queue(assetflow::contracts::topology::Pool::Settlement.as_str());
    let mut death = FieldTable::default();
    death.insert("reason".into(), AMQPValue::LongString("delivery_limit".into()));
    death.insert("queue".into(), AMQPValue::LongString(queue.as_str().into()));
    death.insert("exchange".into(), AMQPValue::LongString(env.app.plumbing.names.requests().as_str().into()));
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString("order.purchase".into())])),
    );
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    let mut headers = FieldTable::default();
    headers.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(20));
    let body = serde_json::to_vec(&purchase(&frank, "concert", 1, json!({}))).unwrap();
    let message_id = uuid::Uuid::now_v7().to_string();
    let props = assetflow::runtime::broker::properties(&message_id, "order.purchase", None, headers);
    let publishing = channel(&env).await;
    publishing.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let confirm = publishing
        .basic_publish(
            env.app.plumbing.names.dlx().as_str().into(),
            "settlement".into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    assert!(confirm.is_ack(), "{confirm:?}");

    let mid = message_id.clone();
    let detail = env
        .wait_until("the recorder records the broker's dead letter", move |c| {
            text(
                c,
                "SELECT detail AS value FROM dead_letters WHERE reason = 'broker_dead_lettered' AND message_id = $1",
                &[&mid],
            )
        })
        .await;
    assert!(detail.contains("delivery_limit"), "{detail}");
    assert!(detail.contains(&queue), "{detail}");
    let q = queue.clone();
    env.db(move |c| {
        let letter = "SELECT count(*) FROM dead_letters
                      WHERE message_id = $1 AND pool = 'settlement' AND source = 'message' AND message_type = 'order.purchase'
                        AND routing_key = 'order.purchase' AND headers->'x-death'->>'queue' = $2";
        assert_eq!(count(c, letter, &[&message_id, &q]), 1);
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 1, "its own notice is not recorded a second time");
    })
    .await;
    // The recorder took both the broker's message and assetflow's own notice of it off the
    // queue: nothing is left there, ready or unacknowledged.
    env.wait_until("the notice is published", |c| (count(c, "SELECT count(*) FROM outbox", &[]) == 0).then_some(()))
        .await;
    let dlq = env.app.plumbing.names.dead_letter_queue(assetflow::contracts::topology::Pool::Settlement.as_str());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    loop {
        poll.tick().await;
        let held = held_in(&env, &dlq).await;
        if held == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {dlq} drains (it holds {held})");
    }
    env.stop().await;
    assert_eq!(queued(&env, &dlq).await, 0, "the dead-letter queue is empty");
    let letters = env.db(|c| count(c, "SELECT count(*) FROM dead_letters", &[])).await;
    assert_eq!(letters, 1);
}

/// The retention job deletes bookkeeping rows past their horizon and keeps the recent ones and
/// every request id an order or an exchange still refers to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_old_bookkeeping() {
    let mut env = Env::new().await;
    env.product("ticket", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    env.send(&purchase(&alice, "ticket", 1, json!({}))).await;
    // Quiet before counting: the certificate's receipt, too, is in the inbox.
    env.wait_until("the order is issued and its certificate acknowledged", |c| {
        (count(c, "SELECT count(*) FROM orders WHERE status = 'issued'", &[]) == 1
            && count(c, "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'delivered'", &[])
                == 1
            && count(c, "SELECT count(*) FROM outbox", &[]) == 0)
            .then_some(())
    })
    .await;
    env.db(|c| {
        for sql in [
            "INSERT INTO inbox (pool, message_id, message_type, processed_at) VALUES ('settlement', 'old-1', 'order.purchase', now() - interval '30 days')",
            "INSERT INTO inbox (pool, message_id, message_type, processed_at) VALUES ('settlement', 'old-2', 'order.purchase', now() - interval '15 days')",
            "INSERT INTO terminal_requests (request_id, terminal_id, message_type, content_sha256, sent_at, received_at, outcome, reason)
               VALUES ('old-refused', 'alice', 'order.purchase', '', now() - interval '100 days', now() - interval '100 days', 'refused', 'unknown_product')",
            "INSERT INTO job_runs (job, as_of, started_at, trigger, outcome) VALUES ('near_expiry', now(), now() - interval '91 days', 'schedule', 'succeeded')",
            "UPDATE terminal_requests SET received_at = now() - interval '100 days' WHERE request_id <> 'old-refused'",
        ] {
            diesel::sql_query(sql).execute(c).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    })
    .await;
    let inbox_before = env.db(|c| count(c, "SELECT count(*) FROM inbox", &[])).await;
    let report = env.run_job("retention", Utc::now()).await;
    assert!(report.ran && report.error.is_none(), "{report:?}");
    env.db(move |c| {
        assert_eq!(
            count(c, "SELECT count(*) FROM inbox", &[]),
            inbox_before - 2,
            "the 30- and 15-day-old ids went, the recent stayed"
        );
        assert_eq!(count(c, "SELECT count(*) FROM terminal_requests WHERE request_id = 'old-refused'", &[]), 0);
        assert_eq!(
            count(c, "SELECT count(*) FROM terminal_requests", &[]),
            1,
            "the order's request id is kept: the order refers to it"
        );
        assert_eq!(count(c, "SELECT count(*) FROM job_runs WHERE started_at < now() - interval '90 days'", &[]), 0);
        assert_eq!(count(c, "SELECT count(*) FROM orders", &[]), 1);
    })
    .await;
    env.stop().await;
}

/// The delivery pool makes a notice's deliveries once, however often it is asked: a
/// `certificate.notices` message sent again (a replay, a second scan that lost a race) finds the
/// keyed deliveries already made. A notice for a certificate that does not exist is skipped and
/// the rest of the message stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_notice_handled_twice_sends_nothing_twice() {
    let mut env = Env::new().await;
    env.product("ticket", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions { exchange_rate: 0.0, ..GatewayOptions::default() });
    env.send(&purchase(&alice, "ticket", 1, json!({}))).await;
    let (cert, expires) = env
        .wait_until("the certificate is acknowledged", |c| {
            let delivered =
                count(c, "SELECT count(*) FROM deliveries WHERE kind = 'certificate' AND status = 'delivered'", &[]);
            (delivered == 1).then(|| {
                let id = text(c, "SELECT id::text AS value FROM exchange_certificates", &[]).expect("a certificate");
                let expires =
                    timestamp(c, "SELECT expires_at AS value FROM exchange_certificates", &[]).expect("an expiry");
                (id, expires)
            })
        })
        .await;

    // Stage 1, through the scan.
    let report = env.run_job("near_expiry", expires - TimeDelta::hours(36)).await;
    assert_eq!((report.rows_scanned, report.enqueued), (1, 1), "{report:?}");
    let key = format!("reminder:{cert}:1");
    let sent = key.clone();
    env.wait_until("the stage-1 reminder is acknowledged", move |c| {
        (count(c, "SELECT count(*) FROM deliveries WHERE dedupe_key = $1 AND status = 'delivered'", &[&sent]) == 1)
            .then_some(())
    })
    .await;

    // The same notice again, beside one for a certificate nobody issued.
    handle_notices(
        &env,
        expires - TimeDelta::hours(36),
        vec![
            CertificateNotice { certificate_id: uuid::Uuid::now_v7(), notice: NoticeKind::ExpiryMessage },
            CertificateNotice { certificate_id: cert.parse().expect("a uuid"), notice: NoticeKind::ExpiryMessage },
        ],
    )
    .await;
    env.db(move |c| {
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE dedupe_key = $1", &[&key]), 1);
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id WHERE d.dedupe_key = $1",
                &[&key]
            ),
            1,
            "sent once"
        );
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0, "the unknown certificate is skipped, not dead-lettered");
    })
    .await;

    // Past due: the delivery pool moves the asset and sends the three transmissions once.
    let past = expires + TimeDelta::hours(1);
    let report = env.run_job("past_due", past).await;
    assert_eq!((report.rows_scanned, report.enqueued), (1, 3), "{report:?}");
    let past_due_sent = |c: &mut PgConnection| {
        count(
            c,
            "SELECT count(*) FROM deliveries WHERE dedupe_key ~ '^(past_due|revoke|asset):' AND status = 'delivered'",
            &[],
        )
    };
    env.wait_until("the past-due transmissions are acknowledged", move |c| (past_due_sent(c) == 3).then_some(())).await;
    let asset =
        env.db(|c| text(c, "SELECT asset_id::text AS value FROM exchange_certificates", &[]).expect("an asset")).await;
    handle_notices(
        &env,
        past,
        vec![CertificateNotice { certificate_id: cert.parse().expect("a uuid"), notice: NoticeKind::PastDue }],
    )
    .await;
    env.db(move |c| {
        assert_eq!(
            history(c, &asset),
            "(new)→awaiting_exchange, awaiting_exchange→expired_certificate_processing, expired_certificate_processing→force_delivered",
            "moved once"
        );
        assert_eq!(count(c, "SELECT count(*) FROM deliveries WHERE dedupe_key ~ '^(past_due|revoke|asset):'", &[]), 3);
        assert_eq!(
            count(c, "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id WHERE d.dedupe_key ~ '^(past_due|revoke|asset):'", &[]),
            3,
            "each sent once"
        );
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0);
    })
    .await;
    env.stop().await;
}

/// handle_notices publishes a `certificate.notices` message the way the scans do (through the
/// outbox) and waits until the delivery pool has handled it.
async fn handle_notices(env: &Env, as_of: DateTime<Utc>, notices: Vec<CertificateNotice>) {
    let message = CertificateNotices { message_type: kinds::CERTIFICATE_NOTICES.into(), as_of, notices };
    let outgoing = Outgoing::json(
        env.app.plumbing.names.internal(),
        kinds::CERTIFICATE_NOTICES,
        kinds::CERTIFICATE_NOTICES,
        &message,
    );
    let message_id = outgoing.message_id;
    env.db(move |c| outbox::enqueue(c, &outgoing).expect("written to the outbox")).await;
    env.app.plumbing.outbox_wake.notify_one();
    env.wait_until("the delivery pool has handled the notices", move |c| {
        (count(c, "SELECT count(*) FROM inbox WHERE pool = 'delivery' AND message_id = $1", &[&message_id]) == 1)
            .then_some(())
    })
    .await;
}

/// A scan takes a second connection only if one is idle now. On a pool with none to spare it runs
/// on the one it has, at once. Waiting for another while holding its own, every job due at the
/// same second did the same, the whole pool was held for the checkout timeout, and the handlers,
/// a gateway's receipts among them, waited as long: long enough for deliveries to be sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_never_waits_for_a_second_connection_while_it_holds_one() {
    let env = Env::with(json!({"database": {"pool_size": 2, "connection_timeout": "60s"}})).await;
    assert_eq!(env.app.scheduler.workers, 2, "scans work on two connections when they can");
    // The test holds one of the two connections: the job gets the other, and none is idle.
    let scheduler = env.app.scheduler.clone();
    let held = tokio::task::spawn_blocking(move || scheduler.db.get().expect("a connection")).await.unwrap();
    let started = std::time::Instant::now();
    let report = env.run_job("retransmission", Utc::now()).await;
    let took = started.elapsed();
    assert!(report.ran && report.error.is_none(), "{report:?}");
    // Without the fix it waits the whole checkout timeout (60 s) for a helper connection.
    assert!(took < Duration::from_secs(30), "the scan waited {took:?} for a second connection");
    drop(held);
}
