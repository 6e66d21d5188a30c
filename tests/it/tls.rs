//! TLS through configuration, and no secret in the logs.
//!
//! The shared RabbitMQ listens in plain AMQP only and must not be reconfigured, so the amqps tests
//! put a TLS-terminating proxy in front of it: a throwaway CA, made here, signs the proxy's
//! certificate and the client's, and assetflow is told to trust that CA through `amqp.tls_ca_file`
//! (and to present its client certificate through `amqp.tls_cert_file`/`tls_key_file`). The
//! shared PostgreSQL has `ssl = on` with Debian's self-signed snakeoil certificate (issued to
//! `localhost`), which serves as its own CA for `sslmode=verify-full`.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::terminals::purchase;
use diesel::prelude::*;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslVerifyMode};
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509, X509NameBuilder};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{Env, count, rabbitmqctl, text};
use crate::operator_input::assetflow;
use crate::support::{delivered_certificate, settle_all};

/// The shared PostgreSQL's certificate: self-signed, for `localhost`.
const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// Pki is a throwaway certificate authority with the certificates a test needs, written to a
/// scratch directory.
struct Pki {
    dir: PathBuf,
    ca: X509,
    ca_key: PKey<Private>,
}

fn p256() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// certificate makes a certificate for `cn`, signed by `issuer` (self-signed when None).
fn certificate(
    cn: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    kind: &str, // "ca", "server" or "client"
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(128, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap()).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map(|(c, _)| c.subject_name()).unwrap_or(&name)).unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
    match kind {
        "ca" => {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
            b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().unwrap()).unwrap();
        }
        _ => {
            b.append_extension(BasicConstraints::new().critical().build().unwrap()).unwrap();
            b.append_extension(KeyUsage::new().critical().digital_signature().build().unwrap()).unwrap();
            let usage = if kind == "server" {
                ExtendedKeyUsage::new().server_auth().build().unwrap()
            } else {
                ExtendedKeyUsage::new().client_auth().build().unwrap()
            };
            b.append_extension(usage).unwrap();
            if kind == "server" {
                let san = SubjectAlternativeName::new()
                    .ip("127.0.0.1")
                    .dns("localhost")
                    .build(&b.x509v3_context(issuer.map(|(c, _)| &**c), None))
                    .unwrap();
                b.append_extension(san).unwrap();
            }
        }
    }
    b.sign(issuer.map(|(_, k)| k).unwrap_or(key), MessageDigest::sha256()).unwrap();
    b.build()
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("assetflow-tls-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = p256();
        let ca = certificate(&format!("assetflow test CA {name}"), &ca_key, None, "ca");
        std::fs::write(dir.join("ca.pem"), ca.to_pem().unwrap()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// Pki::issue makes a key and a certificate for `cn` and writes `<file>.pem` and `<file>.key`.
    fn issue(&self, cn: &str, kind: &str, file: &str) -> (X509, PKey<Private>) {
        let key = p256();
        let cert = certificate(cn, &key, Some((&self.ca, &self.ca_key)), kind);
        std::fs::write(self.dir.join(format!("{file}.pem")), cert.to_pem().unwrap()).unwrap();
        std::fs::write(self.dir.join(format!("{file}.key")), key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        (cert, key)
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Proxy terminates TLS on a local port and forwards the plain stream to the shared RabbitMQ.
struct Proxy {
    port: u16,
    /// Completed TLS handshakes.
    handshakes: Arc<AtomicUsize>,
    /// Failed TLS handshakes (no client certificate, an untrusted one, or a client that gave up).
    refused: Arc<AtomicUsize>,
    /// The common names of the client certificates presented, and the TLS versions negotiated.
    seen: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Proxy::start serves `server` (certificate and key); with `client_ca`, it demands a client
    /// certificate issued by that CA (mutual TLS).
    async fn start(server: &(X509, PKey<Private>), client_ca: Option<&X509>) -> Proxy {
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        acceptor.set_certificate(&server.0).unwrap();
        acceptor.set_private_key(&server.1).unwrap();
        acceptor.check_private_key().unwrap();
        if let Some(ca) = client_ca {
            acceptor.cert_store_mut().add_cert(ca.clone()).unwrap();
            acceptor.add_client_ca(ca).unwrap();
            acceptor.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
        let acceptor = Arc::new(acceptor.build());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (handshakes, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (h, r, s) = (handshakes.clone(), refused.clone(), Arc::clone(&seen));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, h, r, s) = (acceptor.clone(), h.clone(), r.clone(), Arc::clone(&s));
                tokio::spawn(async move {
                    let ssl = Ssl::new(acceptor.context()).unwrap();
                    let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                    if Pin::new(&mut tls).accept().await.is_err() {
                        r.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let client = tls
                        .ssl()
                        .peer_certificate()
                        .and_then(|c| {
                            c.subject_name()
                                .entries_by_nid(Nid::COMMONNAME)
                                .next()
                                .and_then(|e| e.data().to_string().ok())
                        })
                        .unwrap_or_default();
                    s.lock().unwrap().push((client, tls.ssl().version_str().to_string()));
                    let Ok(mut upstream) = TcpStream::connect("127.0.0.1:5672").await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        Proxy { port, handshakes, refused, seen, task }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Vhost is a RabbitMQ vhost of the test's own, for a URL the harness does not build.
struct Vhost(String);

impl Vhost {
    async fn new() -> Vhost {
        let name = format!("assetflow-test-tls{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let n = name.clone();
        tokio::task::spawn_blocking(move || {
            rabbitmqctl(&["add_vhost", &n]);
            rabbitmqctl(&["set_permissions", "-p", &n, "guest", ".*", ".*", ".*"]);
        })
        .await
        .unwrap();
        Vhost(name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

fn drop_database(name: &str) {
    let _ = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
        .arg(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// ssl_of reads `pg_stat_ssl` for the session: whether it is encrypted, and with which version.
fn ssl_of(conn: &mut PgConnection) -> (bool, Option<String>) {
    #[derive(QueryableByName)]
    struct Ssl {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        ssl: bool,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        version: Option<String>,
    }
    let row: Ssl = diesel::sql_query("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .get_result(conn)
        .unwrap();
    (row.ssl, row.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_are_encrypted_with_sslmode_require_and_verify_full() {
    tokio::task::spawn_blocking(|| {
        let base = "postgres://postgres@{host}:5432/postgres";
        let connect = |host: &str, query: &str| {
            assetflow::runtime::db::establish(&format!("{}?{query}", base.replace("{host}", host)))
        };
        // Encryption only.
        let (ssl, version) = ssl_of(&mut connect("127.0.0.1", "sslmode=require").unwrap());
        assert!(ssl, "sslmode=require gave an unencrypted session");
        assert!(version.unwrap_or_default().starts_with("TLS"));
        // Encryption, the server's certificate checked against a CA file, and its name.
        let verified = format!("sslmode=verify-full&sslrootcert={SNAKEOIL}");
        assert!(ssl_of(&mut connect("localhost", &verified).unwrap()).0);
        assert!(ssl_of(&mut connect("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={SNAKEOIL}")).unwrap()).0);
        // The checks are real: a name the certificate does not carry, and a CA that did not sign it.
        let err =
            connect("127.0.0.1", &verified).err().expect("verify-full refuses a host the certificate does not name");
        assert!(err.to_string().contains("does not match host name"), "{err}");
        let pki = Pki::new("pg");
        let err = connect("localhost", &format!("sslmode=verify-full&sslrootcert={}", pki.path("ca.pem")))
            .err()
            .expect("verify-full refuses a certificate from another CA");
        assert!(err.to_string().contains("certificate verify failed"), "{err}");
        // And without TLS the same query says so, so the checks above are not vacuous.
        assert!(!ssl_of(&mut connect("127.0.0.1", "sslmode=disable").unwrap()).0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_flows_through_amqps_with_a_private_ca_and_a_client_certificate_and_postgres_verify_full() {
    let pki = Pki::new("flow");
    let server = pki.issue("rabbitmq.test", "server", "server");
    pki.issue("assetflow-test-client", "client", "client");
    let proxy = Proxy::start(&server, Some(&pki.ca)).await;
    let vhost = Vhost::new().await;
    let database = format!("assetflow_test_tls{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);

    let mut env = Env::with(json!({
        "amqp": {
            "url": format!("amqps://guest:guest@127.0.0.1:{}/{}", proxy.port, vhost.0),
            "tls_ca_file": pki.path("ca.pem"),
            "tls_cert_file": pki.path("client.pem"),
            "tls_key_file": pki.path("client.key"),
        },
        "database": {
            "url": format!("postgres://postgres@localhost:5432/{database}?sslmode=verify-full&sslrootcert={SNAKEOIL}"),
        },
    }))
    .await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let order = purchase(&alice, "concert", 1, json!({}));
    let request_id = order["request_id"].as_str().unwrap().to_string();
    env.send(&order).await;
    let certificate = delivered_certificate(&env, &request_id).await;
    assetflow::crypto::verify_document(&env.app.keys.provider().unwrap().key, &certificate)
        .expect("a genuine certificate");
    let rid = request_id.clone();
    env.db(move |c| {
        assert_eq!(
            text(c, "SELECT status AS value FROM orders WHERE request_id = $1", &[&rid]).as_deref(),
            Some("issued")
        );
        // Every session of assetflow's database is encrypted, the test's own included.
        let unencrypted = "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                           WHERE a.datname = current_database() AND NOT s.ssl";
        assert_eq!(count(c, unencrypted, &[]), 0, "an unencrypted session");
        let encrypted = "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                         WHERE a.datname = current_database() AND s.ssl";
        assert!(count(c, encrypted, &[]) >= 2);
        assert!(ssl_of(c).0);
    })
    .await;

    // The proxy saw TLS, with assetflow's client certificate, and nothing else got through.
    let seen = proxy.seen.lock().unwrap().clone();
    assert!(proxy.handshakes.load(Ordering::SeqCst) >= 1, "no TLS handshake reached the proxy");
    assert!(seen.iter().all(|(client, _)| client == "assetflow-test-client"), "{seen:?}");
    assert!(seen.iter().all(|(_, version)| version.starts_with("TLSv1.")), "{seen:?}");
    assert_eq!(proxy.refused.load(Ordering::SeqCst), 0, "a handshake failed");
    env.stop().await;
    drop(env);
    tokio::task::spawn_blocking(move || drop_database(&database)).await.unwrap();
}

/// amqp is an amqps configuration for the proxy's port, with the TLS files given.
fn amqp(port: u16, vhost: &str, ca: Option<&str>, client: Option<(&str, &str)>) -> assetflow::config::AmqpConfig {
    let mut amqp = json!({"url": format!("amqps://guest:guest@127.0.0.1:{port}/{vhost}")});
    if let Some(ca) = ca {
        amqp["tls_ca_file"] = json!(ca);
    }
    if let Some((cert, key)) = client {
        amqp["tls_cert_file"] = json!(cert);
        amqp["tls_key_file"] = json!(key);
    }
    assetflow::config::Config::with_overrides(json!({"amqp": amqp})).unwrap().amqp
}

async fn connect(amqp: &assetflow::config::AmqpConfig) -> anyhow::Result<lapin::Connection> {
    tokio::time::timeout(Duration::from_secs(20), assetflow::runtime::broker::connect(amqp))
        .await
        .map_err(|_| anyhow::anyhow!("the connection attempt hung"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_refuses_an_untrusted_broker_and_a_broker_refuses_a_missing_client_certificate() {
    let pki = Pki::new("refuse");
    let server = pki.issue("rabbitmq.test", "server", "server");
    pki.issue("assetflow-test-client", "client", "client");
    let stranger = Pki::new("stranger");
    stranger.issue("someone-else", "client", "client");
    let proxy = Proxy::start(&server, Some(&pki.ca)).await;
    let vhost = Vhost::new().await;
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"));

    // The system's trust store does not know the test CA: the broker is not trusted.
    let Err(err) = connect(&amqp(proxy.port, &vhost.0, None, Some((&cert, &key)))).await else {
        panic!("a broker with a certificate from an unknown CA was trusted");
    };
    assert!(format!("{err:#}").contains("certificate verify failed"), "{err:#}");
    // Another CA's file is no better.
    let other_ca = stranger.path("ca.pem");
    assert!(connect(&amqp(proxy.port, &vhost.0, Some(&other_ca), Some((&cert, &key)))).await.is_err());
    // Trusted, but without a client certificate, or with one the broker's CA did not issue.
    assert!(connect(&amqp(proxy.port, &vhost.0, Some(&ca), None)).await.is_err());
    let (other_cert, other_key) = (stranger.path("client.pem"), stranger.path("client.key"));
    assert!(connect(&amqp(proxy.port, &vhost.0, Some(&ca), Some((&other_cert, &other_key)))).await.is_err());
    assert_eq!(proxy.handshakes.load(Ordering::SeqCst), 0, "a refused client got through");
    // With both, it connects: the refusals above are the TLS checks, not a broken proxy.
    let conn = connect(&amqp(proxy.port, &vhost.0, Some(&ca), Some((&cert, &key)))).await.expect("connects");
    assert!(conn.status().connected());
    let _ = conn.close(200, "done".into()).await;
    assert_eq!(proxy.handshakes.load(Ordering::SeqCst), 1);
}

/// secret makes a recognisable secret that appears nowhere else.
fn secret(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_output_redacts_passwords_in_urls_query_strings_and_key_value_strings() {
    tokio::task::spawn_blocking(|| {
        let (db, amqp_password, query, dsn) = (secret("db"), secret("amqp"), secret("query"), secret("dsn"));
        let cases = [
            (format!("postgres://u:{db}@h:5432/x?sslmode=require"), format!("amqps://u:{amqp_password}@mq:5671/%2f")),
            (format!("postgres://u@h/x?sslmode=verify-full&password={query}"), format!("amqp://u:{amqp_password}@h/")),
            (format!("host=h user=u password={dsn} dbname=x sslmode=require"), format!("amqp://u:{amqp_password}@h/")),
            (format!("host=h password='{dsn} with spaces' dbname=x"), format!("amqp://u:{amqp_password}@h/")),
        ];
        for (database_url, amqp_url) in &cases {
            let outcome = assetflow(
                &["config"],
                &[("DATABASE_URL", database_url), ("AMQP_URL", amqp_url)],
                Duration::from_secs(30),
            );
            outcome.assert_succeeded();
            for s in [&db, &amqp_password, &query, &dsn] {
                assert!(!outcome.stdout.contains(s.as_str()), "{s} is shown:\n{}", outcome.stdout);
            }
            assert!(outcome.stdout.contains("***"), "{}", outcome.stdout);
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_log_shows_no_password() {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let (user, vhost, database) =
        (format!("assetflow-test-user{id}"), format!("assetflow-test-log{id}"), format!("assetflow_test_log{id}"));
    let (amqp_password, db_password) = (secret("amqp"), secret("db"));
    let dir = std::env::temp_dir().join(format!("assetflow-log-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    {
        let (user, vhost, password) = (user.clone(), vhost.clone(), amqp_password.clone());
        tokio::task::spawn_blocking(move || {
            rabbitmqctl(&["add_vhost", &vhost]);
            rabbitmqctl(&["add_user", &user, &password]);
            rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);
        })
        .await
        .unwrap();
    }
    // PostgreSQL trusts the loopback interface, so it accepts any password: the URL carries one
    // all the same, as a production URL does.
    let config = dir.join("assetflow.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"postgres://postgres:{db_password}@127.0.0.1:5432/{database}\"\npool_size = 2\n\n\
             [amqp]\nurl = \"amqp://{user}:{amqp_password}@127.0.0.1:5672/{vhost}\"\n\n[keys]\ndir = \"{}\"\n\n\
             [http]\nlisten = \"\"\n",
            dir.join("keys").display()
        ),
    )
    .unwrap();
    let _cleanup = Cleanup { user: user.clone(), vhost: vhost.clone(), database, dir };
    let log = run_until_connected(&config).await;
    let expected = format!("url=amqp://{user}:***@127.0.0.1:5672/{vhost}");
    assert!(log.contains("connected to RabbitMQ") && log.contains(&expected), "{expected} not in:\n{log}");
    assert!(!log.contains(&amqp_password), "the AMQP password is logged:\n{log}");
    assert!(!log.contains(&db_password), "the database password is logged:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// Cleanup removes what the log test made, even when it fails: ops/test sweeps test vhosts and
/// databases, but not RabbitMQ users.
struct Cleanup {
    user: String,
    vhost: String,
    database: String,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for args in [["delete_user", &self.user], ["delete_vhost", &self.vhost]] {
            let _ = Command::new("rabbitmqctl").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        drop_database(&self.database);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// run_until_connected generates keys, starts `assetflow run` (the settlement pool alone), waits
/// for it to connect to RabbitMQ, stops it with SIGTERM, and returns its whole log.
async fn run_until_connected(config: &Path) -> String {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let config = config.to_str().unwrap();
        assetflow(&["--config", config, "keys", "generate", "--issuer", "issuer-1"], &[], Duration::from_secs(30))
            .assert_succeeded();
        let log_file = std::path::Path::new(config).with_file_name("run.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_assetflow"))
            .args(["--config", config, "run", "--pool", "settlement", "--no-scheduler"])
            .env_remove("DATABASE_URL")
            .env_remove("AMQP_URL")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_file).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if std::fs::read_to_string(&log_file).unwrap_or_default().contains("connected to RabbitMQ") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: a signal to our own child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let _ = child.wait();
        without_colours(&std::fs::read_to_string(&log_file).unwrap())
    })
    .await
    .unwrap()
}

/// without_colours removes the ANSI colour sequences of the text log format.
fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
