//! The test harness: every test gets its own PostgreSQL database and its own RabbitMQ vhost, so
//! that tests run in parallel against the real services without seeing each other.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use assetflow::cli::simulate::publisher::ConfirmedSender;
use assetflow::cli::simulate::terminals::SimTerminal;
use assetflow::cli::simulate::{self, Stats, gateway, issuer, partner};
use assetflow::config::Config;
use assetflow::config::workers::PoolDefinitions;
use assetflow::crypto::{self, KeyRing};
use assetflow::domain::catalogue::{PartyKind, Product, upsert_product};
use assetflow::runtime::broker::Broker;
use assetflow::service::app::{self, App, RunOptions};
use assetflow::service::scheduler::{self, Job, RunReport, Trigger};
use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::Text;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The issuer of the test products; the test key ring holds its key.
pub const ISSUER: &str = "issuer-1";
const DEADLINE: Duration = Duration::from_secs(60);

/// Env is one test's private assetflow: its database, its vhost and its running app.
pub struct Env {
    pub config: Config,
    pub app: Arc<App>,
    pub broker: Broker,
    pub publisher: ConfirmedSender,
    pub stats: Arc<Stats>,
    run_stop: CancellationToken,
    run: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    sims: CancellationToken,
    vhost: String,
    database: String,
    /// The test's private keys: its terminals' (`terminals/`), so that the gateway simulator can
    /// sign their acknowledgements, and its partners' and gateways' (`parties/`).
    pub keys: std::path::PathBuf,
}

/// rabbitmqctl runs `rabbitmqctl` with `args` and fails the test if it fails. It blocks: call it
/// from `spawn_blocking` in async code.
pub fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl runs (is RabbitMQ installed?)");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Env {
    /// Env::new makes the database and the vhost, and migrates; nothing runs yet.
    pub async fn new() -> Env {
        Self::with(json!({})).await
    }

    /// Env::with applies configuration overrides on top of the test defaults.
    pub async fn with(overrides: Value) -> Env {
        Self::with_pools(overrides, PoolDefinitions::built_in()).await
    }

    /// Env::with_pools is Env::with with pool definitions of the test's own.
    pub async fn with_pools(overrides: Value, pools: PoolDefinitions) -> Env {
        let id = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]); // short: it names a database
        let vhost = format!("assetflow-test-{id}");
        let database = format!("assetflow_test_{id}");
        {
            let vhost = vhost.clone();
            tokio::task::spawn_blocking(move || {
                rabbitmqctl(&["add_vhost", &vhost]);
                rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
            })
            .await
            .unwrap();
        }
        let mut settings = json!({
            "database": {"url": format!("postgres://postgres@127.0.0.1:5432/{database}"), "pool_size": 8},
            "amqp": {"url": format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"), "reconnect_min": "50ms", "reconnect_max": "1s"},
            "outbox": {"poll_interval": "50ms"},
            "http": {"listen": ""},
            "partners": {"card-co": {}, "bank-a": {}},
            "gateways": {"gw-1": {}, "gw-2": {}},
        });
        merge(&mut settings, overrides);
        let config = Config::with_overrides(settings).expect("test configuration");
        config.validate().expect("valid test configuration");
        let app = Arc::new(App::new(config.clone(), pools, KeyRing::ephemeral(&[ISSUER])));
        app::prepare(&app, app::Patience::Service).await.expect("database prepared");
        let shutdown = CancellationToken::new();
        let broker = Broker::declaring(&config, shutdown.clone());
        let publisher = ConfirmedSender::new(broker.clone());
        Env {
            config,
            app,
            broker,
            publisher,
            stats: Arc::default(),
            run_stop: CancellationToken::new(),
            run: None,
            sims: shutdown,
            vhost,
            database,
            keys: std::env::temp_dir().join(format!("assetflow-test-{id}")),
        }
    }

    /// Env::start runs the pools and the outbox relay. The scheduled jobs are run by the tests
    /// themselves, at the `as_of` they choose.
    pub async fn start(&mut self) {
        self.start_with(RunOptions { scheduler: false, http: false, ..RunOptions::default() }).await;
    }

    /// Env::start_with runs the app with the given options, for tests that need more (or less)
    /// than Env::start runs: the HTTP listener, a subset of the pools. Env::stop stops it.
    pub async fn start_with(&mut self, options: RunOptions) {
        self.run_stop = CancellationToken::new();
        self.run = Some(tokio::spawn(app::run(self.app.clone(), options, self.run_stop.clone())));
    }

    /// Env::stop shuts the app down the way SIGTERM does, and waits for it.
    pub async fn stop(&mut self) {
        self.run_stop.cancel();
        if let Some(run) = self.run.take() {
            run.await.expect("the app did not panic").expect("the app stopped cleanly");
        }
    }

    /// Env::partner runs the partner simulator.
    pub fn partner(&self, options: partner::PartnerOptions) {
        let options = partner::PartnerOptions { party_keys: self.keys.join("parties"), ..options };
        tokio::spawn(partner::run_owned(
            self.config.clone(),
            self.broker.clone(),
            options,
            self.stats.clone(),
            self.sims.clone(),
        ));
    }

    /// Env::issuer runs the issuer simulator.
    pub fn issuer(&self, options: issuer::IssuerOptions) {
        let options = issuer::IssuerOptions { party_keys: self.keys.join("parties"), ..options };
        tokio::spawn(issuer::run_owned(
            self.config.clone(),
            self.broker.clone(),
            options,
            self.stats.clone(),
            self.sims.clone(),
        ));
    }

    /// Env::gateway runs the gateway simulator (it exchanges no certificates: tests do that).
    pub fn gateway(&self, options: gateway::GatewayOptions) {
        let options = gateway::GatewayOptions {
            exchange_rate: 0.0,
            keys: self.keys.join("terminals"),
            party_keys: self.keys.join("parties"),
            ..options
        };
        tokio::spawn(gateway::run_owned(
            self.config.clone(),
            self.broker.clone(),
            options,
            self.stats.clone(),
            self.sims.clone(),
        ));
    }

    /// Env::terminal registers a terminal with a fresh key pair, and keeps its private key where
    /// the gateway simulator finds it.
    pub async fn terminal(&self, id: &str, gateway: &str, partner: Option<&str>) -> SimTerminal {
        let key = crypto::generate_key_pair().unwrap();
        let pem = crypto::public_key_pem(&key).unwrap();
        let dir = self.keys.join("terminals");
        std::fs::create_dir_all(&dir).unwrap();
        crypto::write_private_key(&dir.join(format!("{id}.pem")), &key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let (id2, gateway, partner) = (id.to_string(), gateway.to_string(), partner.map(str::to_string));
        self.db(move |conn| {
            assetflow::cli::admin::register_terminal(conn, &id2, "mobile", &gateway, partner.as_deref(), &pem).unwrap()
        })
        .await;
        SimTerminal { id: id.to_string(), key }
    }

    /// Env::product saves a product: a ticket by `ISSUER` unless `change` says otherwise.
    pub async fn product(&self, id: &str, change: impl FnOnce(&mut Product)) -> Product {
        let mut product = Product {
            id: id.into(),
            kind: "ticket".into(),
            title: format!("Test {id}"),
            issuer_id: ISSUER.into(),
            price_minor: 1_000,
            currency: "JPY".into(),
            value_minor: None,
            uses: Some(1),
            asset_expires_at: None,
            asset_validity_secs: Some(30 * 86_400),
            certificate_expires_at: None,
            certificate_validity_secs: Some(7 * 86_400),
            reminder_stage1_secs: 2 * 86_400,
            reminder_stage2_secs: 86_400,
            stage2_policy: "download_request".into(),
            transferable: false,
            on_sale: true,
            tags: json!({"place": "Test Hall"}),
            proof_of_delivery: "terminal".into(),
            confirmation_window_secs: 900,
            confirmation_waived: false,
        };
        change(&mut product);
        let saved = product.clone();
        self.db(move |conn| upsert_product(conn, &saved).unwrap()).await;
        product
    }

    /// Env::terminal_key is the private key of a terminal registered by [`Env::terminal`].
    pub fn terminal_key(&self, id: &str) -> openssl::pkey::PKey<openssl::pkey::Private> {
        crypto::load_private_key(&self.keys.join("terminals").join(format!("{id}.pem"))).expect("the terminal's key")
    }

    /// Env::signed_by is `message` signed by a partner or a gateway, as its answers are: with the
    /// key the simulators use for it (made and registered when missing).
    pub async fn signed_by(&self, kind: PartyKind, id: &str, message: &impl serde::Serialize) -> Vec<u8> {
        let key = simulate::party_key(&self.config, kind, id, &self.keys.join("parties")).await.expect("party key");
        partner::signed(message, &key)
    }

    /// Env::publish publishes a message on the requests exchange, as a gateway or partner would.
    pub async fn publish(&self, routing_key: &str, body: &[u8]) {
        let message_type = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_string))
            .unwrap_or_default();
        self.publisher
            .publish(&self.app.plumbing.names.requests(), routing_key, &message_type, body)
            .await
            .expect("published");
    }

    /// Env::send publishes a JSON request on the requests exchange under its own type.
    pub async fn send(&self, request: &Value) {
        let routing_key = request["type"].as_str().unwrap_or("none").to_string();
        self.publish(&routing_key, &serde_json::to_vec(request).unwrap()).await;
    }

    /// Env::db runs a query on the test database.
    pub async fn db<T: Send + 'static>(&self, f: impl FnOnce(&mut PgConnection) -> T + Send + 'static) -> T {
        let url = self.config.database.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = assetflow::runtime::db::establish(&url).expect("test database");
            f(&mut conn)
        })
        .await
        .unwrap()
    }

    /// Env::wait_until polls `check` until it returns Some, or fails the test after the deadline
    /// naming what it was waiting for, and the dead letters recorded meanwhile (often the why).
    pub async fn wait_until<T: Send + 'static>(
        &self,
        what: &str,
        check: impl Fn(&mut PgConnection) -> Option<T> + Send + Sync + 'static,
    ) -> T {
        let url = self.config.database.url.clone();
        let check = Arc::new(check);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (url, check) = (url.clone(), check.clone());
            let found = tokio::task::spawn_blocking(move || {
                let mut conn = assetflow::runtime::db::establish(&url).expect("test database");
                check(&mut conn)
            })
            .await
            .unwrap();
            if let Some(found) = found {
                return found;
            }
            if tokio::time::Instant::now() >= deadline {
                let letters = self.db(dead_letters).await;
                panic!("timed out waiting until {what}; dead letters: {letters:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Env::sent_what_is_due waits until the delivery pool has taken every delivery due now (a
    /// refusal, a notice), so that a scan run next for a later time finds only what it is for:
    /// the delivery scans also send what is pending and due, as a net for what the pool missed.
    pub async fn sent_what_is_due(&self) {
        self.wait_until("the deliveries due now are sent", |c| {
            let pending = "SELECT count(*) FROM deliveries WHERE status = 'pending' AND due_at <= now()";
            (count(c, pending, &[]) == 0).then_some(())
        })
        .await
    }

    /// Env::run_job runs a scheduled job at `as_of`, as the scheduler or `assetflow batch run` would.
    pub async fn run_job(&self, name: &str, as_of: DateTime<Utc>) -> RunReport {
        let job: &'static Job = Job::find(name).unwrap_or_else(|| panic!("no job {name}"));
        scheduler::run_now(self.app.scheduler.clone(), job, as_of, Trigger::Manual, false).await.expect("the job ran")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.run_stop.cancel();
        self.sims.cancel();
        // Clean up without waiting: the next test does not depend on it, and ops/test sweeps
        // whatever a crashed run left behind.
        let _ = std::fs::remove_dir_all(&self.keys);
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.vhost])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

/// dead_letters are the first dead letters of a test's database, as "reason: detail".
fn dead_letters(conn: &mut PgConnection) -> Vec<String> {
    #[derive(QueryableByName)]
    struct Letter {
        #[diesel(sql_type = Text)]
        letter: String,
    }
    diesel::sql_query("SELECT reason || ': ' || detail AS letter FROM dead_letters ORDER BY created_at LIMIT 5")
        .load::<Letter>(conn)
        .map(|letters| letters.into_iter().map(|l| l.letter).collect())
        .unwrap_or_else(|e| vec![format!("(unreadable: {e})")])
}

fn merge(base: &mut Value, overrides: Value) {
    match (base, overrides) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

/// query is `sql` with `values` bound to its placeholders `$1`, `$2`, … in order. The SQL is a
/// literal, so a value is never spliced into its text. Each value is bound as text: where the
/// column is not text, the SQL casts (`$1::uuid`, `$2::int4`, `$1::timestamptz`).
pub fn query(sql: &'static str, values: &[&dyn ToString]) -> BoxedSqlQuery<'static, Pg, SqlQuery> {
    values.iter().fold(diesel::sql_query(sql).into_boxed(), |query, value| query.bind::<Text, _>(value.to_string()))
}

/// failed is the panic message of a test query that failed: the SQL, its values and the error.
pub fn failed(sql: &str, values: &[&dyn ToString], error: diesel::result::Error) -> String {
    let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    format!("{sql} with {values:?}: {error}")
}

/// count runs `SELECT count(*) ...` with `values` bound (see `query`) and returns the number.
pub fn count(conn: &mut PgConnection, sql: &'static str, values: &[&dyn ToString]) -> i64 {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    query(sql, values).get_result::<Count>(conn).unwrap_or_else(|e| panic!("{}", failed(sql, values, e))).count
}

/// text runs a query returning one text column `value`, with `values` bound (see `query`), or
/// None when there is no row.
pub fn text(conn: &mut PgConnection, sql: &'static str, values: &[&dyn ToString]) -> Option<String> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        value: Option<String>,
    }
    query(sql, values)
        .get_result::<Row>(conn)
        .optional()
        .unwrap_or_else(|e| panic!("{}", failed(sql, values, e)))
        .and_then(|t| t.value)
}

/// execute runs a statement with `values` bound (see `query`) and returns the number of rows it
/// changed.
pub fn execute(conn: &mut PgConnection, sql: &'static str, values: &[&dyn ToString]) -> usize {
    query(sql, values).execute(conn).unwrap_or_else(|e| panic!("{}", failed(sql, values, e)))
}
