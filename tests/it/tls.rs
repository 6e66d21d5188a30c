//! TLS through configuration, and no secret in the logs.
//!
//! The shared RabbitMQ and PostgreSQL must not be reconfigured, and how their own certificates were
//! made depends on the machine's image, so the tests bring their own: a throwaway CA, made here,
//! signs the certificates of TLS-terminating proxies put in front of the plain services, and the
//! client certificates. For RabbitMQ the proxy speaks TLS from the first byte (amqps), and
//! assetflow is told to trust the CA through `amqp.tls_ca_file` (and to present its client
//! certificate through `amqp.tls_cert_file`/`tls_key_file`). For PostgreSQL the proxy answers the
//! client's SSLRequest, handshakes, and relays the session to the real server in plain TCP, which
//! the server's trust of the loopback accepts; libpq is told to trust the CA through
//! `sslmode=verify-full&sslrootcert=...`. The proxies count what they let through and what they
//! refused, and a PostgreSQL client that does not ask for TLS gets nothing through.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::terminals::purchase;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509, X509NameBuilder};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{Env, count, rabbitmqctl, text};
use crate::operator_input::assetflow;
use crate::support::{delivered_certificate, settle_all};

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

/// Kind is what a certificate is for.
#[derive(Clone, Copy)]
enum Kind<'a> {
    Ca,
    /// A server's, naming these hosts (DNS names or IP addresses).
    Server(&'a [&'a str]),
    Client,
}

/// This machine, by the names the tests connect to.
const LOCAL: &[&str] = &["localhost", "127.0.0.1"];

/// certificate makes a certificate for `cn`, signed by `issuer` (self-signed when None).
fn certificate(cn: &str, key: &PKey<Private>, issuer: Option<(&X509, &PKey<Private>)>, kind: Kind) -> X509 {
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
        Kind::Ca => {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
            b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().unwrap()).unwrap();
        }
        Kind::Server(hosts) => {
            b.append_extension(BasicConstraints::new().critical().build().unwrap()).unwrap();
            b.append_extension(KeyUsage::new().critical().digital_signature().build().unwrap()).unwrap();
            b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap()).unwrap();
            let mut san = SubjectAlternativeName::new();
            for host in hosts {
                if host.parse::<std::net::IpAddr>().is_ok() {
                    san.ip(host);
                } else {
                    san.dns(host);
                }
            }
            let san = san.build(&b.x509v3_context(issuer.map(|(c, _)| &**c), None)).unwrap();
            b.append_extension(san).unwrap();
        }
        Kind::Client => {
            b.append_extension(BasicConstraints::new().critical().build().unwrap()).unwrap();
            b.append_extension(KeyUsage::new().critical().digital_signature().build().unwrap()).unwrap();
            b.append_extension(ExtendedKeyUsage::new().client_auth().build().unwrap()).unwrap();
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
        let ca = certificate(&format!("assetflow test CA {name}"), &ca_key, None, Kind::Ca);
        std::fs::write(dir.join("ca.pem"), ca.to_pem().unwrap()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// Pki::issue makes a key and a certificate for `cn` and writes `<file>.pem` and `<file>.key`.
    fn issue(&self, cn: &str, kind: Kind, file: &str) -> (X509, PKey<Private>) {
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

/// Upstream is the shared service behind a proxy, and how its clients ask for TLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upstream {
    /// RabbitMQ: amqps is TLS from the first byte.
    RabbitMq,
    /// PostgreSQL: the client asks for TLS in the protocol first (an SSLRequest).
    Postgres,
}

impl Upstream {
    fn address(self) -> &'static str {
        match self {
            Upstream::RabbitMq => "127.0.0.1:5672",
            Upstream::Postgres => "127.0.0.1:5432",
        }
    }
}

/// Proxy terminates TLS on a local port and forwards the plain stream to a shared service.
struct Proxy {
    port: u16,
    traffic: Arc<Traffic>,
    task: tokio::task::JoinHandle<()>,
}

/// Traffic is what a proxy let through and what it refused.
#[derive(Default)]
struct Traffic {
    /// Completed TLS handshakes.
    handshakes: AtomicUsize,
    /// Failed TLS handshakes (no client certificate, an untrusted one, or a client that gave up).
    refused: AtomicUsize,
    /// PostgreSQL clients that did not ask for TLS: refused before anything reached the server.
    unencrypted: AtomicUsize,
    /// The common names of the client certificates presented, and the TLS versions negotiated.
    seen: Mutex<Vec<(String, String)>>,
    /// The local ports of the connections to the service, one per completed handshake: the
    /// service sees its clients come from these.
    upstream_ports: Mutex<Vec<u16>>,
    /// Told of every change above, for Traffic::settled.
    changes: tokio::sync::watch::Sender<()>,
}

impl Traffic {
    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    fn unencrypted(&self) -> usize {
        self.unencrypted.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }

    fn upstream_ports(&self) -> Vec<u16> {
        self.upstream_ports.lock().unwrap().clone()
    }

    /// Traffic::count adds one to a counter and tells the waiters.
    fn count(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.changes.send_replace(());
    }

    /// Traffic::settled waits until `done` holds, or fails the test naming `what`. A client learns
    /// that its handshake failed before the proxy does, so a test waits for the proxy's count.
    async fn settled(&self, what: &str, done: impl Fn(&Traffic) -> bool) {
        let mut changes = self.changes.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(20), changes.wait_for(|_| done(self))).await;
        assert!(waited.is_ok(), "timed out waiting until {what}");
    }
}

impl Proxy {
    /// Proxy::start serves `server` (certificate and key) in front of `upstream`; with `client_ca`,
    /// it demands a client certificate issued by that CA (mutual TLS), and with `newest`, it offers
    /// no TLS version newer than that (TLS 1.2 and 1.3 otherwise).
    async fn start(
        upstream: Upstream,
        server: &(X509, PKey<Private>),
        client_ca: Option<&X509>,
        newest: Option<SslVersion>,
    ) -> Proxy {
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        acceptor.set_max_proto_version(newest).unwrap();
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
        let traffic = Arc::new(Traffic::default());
        let t = traffic.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                tokio::spawn(relay(upstream, tcp, acceptor.clone(), t.clone()));
            }
        });
        Proxy { port, traffic, task }
    }
}

/// relay serves one client of a proxy: the TLS handshake (after PostgreSQL's SSLRequest), then the
/// bytes both ways between the client and the service.
async fn relay(upstream: Upstream, mut tcp: TcpStream, acceptor: Arc<SslAcceptor>, traffic: Arc<Traffic>) {
    if upstream == Upstream::Postgres {
        match postgres_asks_for_tls(&mut tcp).await {
            Ok(true) => {}
            Ok(false) => {
                traffic.count(&traffic.unencrypted);
                let _ = refuse_unencrypted(&mut tcp).await;
                return;
            }
            Err(_) => return,
        }
    }
    let ssl = Ssl::new(acceptor.context()).unwrap();
    let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    if Pin::new(&mut tls).accept().await.is_err() {
        traffic.count(&traffic.refused);
        return;
    }
    let client = tls
        .ssl()
        .peer_certificate()
        .and_then(|c| c.subject_name().entries_by_nid(Nid::COMMONNAME).next().and_then(|e| e.data().to_string().ok()))
        .unwrap_or_default();
    traffic.seen.lock().unwrap().push((client, tls.ssl().version_str().to_string()));
    traffic.count(&traffic.handshakes);
    let Ok(mut service) = TcpStream::connect(upstream.address()).await else { return };
    traffic.upstream_ports.lock().unwrap().push(service.local_addr().unwrap().port());
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut service).await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The request codes of PostgreSQL's opening packets (protocol.html, "SSL Session Encryption" and
/// "GSSAPI Session Encryption"): each is 8 bytes, its length then its code.
const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

/// postgres_asks_for_tls reads a PostgreSQL client's opening requests as the server would: GSSAPI
/// encryption is declined ('N', and the client may ask again), an SSLRequest is accepted ('S', and
/// the TLS handshake follows: true). Anything else, such as a plain startup packet, is read whole
/// and left unanswered: false.
async fn postgres_asks_for_tls(tcp: &mut TcpStream) -> std::io::Result<bool> {
    loop {
        let length = tcp.read_u32().await?;
        if length != 8 {
            // Read whole, so that closing does not reset the connection before the client has
            // read the answer.
            let mut rest = vec![0; (length as usize).saturating_sub(4).min(64 * 1024)];
            tcp.read_exact(&mut rest).await?;
            return Ok(false);
        }
        match tcp.read_u32().await? {
            SSL_REQUEST => {
                tcp.write_all(b"S").await?;
                return Ok(true);
            }
            GSSENC_REQUEST => tcp.write_all(b"N").await?,
            _ => return Ok(false),
        }
    }
}

/// refuse_unencrypted answers a PostgreSQL client that did not ask for TLS with a FATAL error
/// ([`NOT_TLS`]) and closes the connection.
async fn refuse_unencrypted(tcp: &mut TcpStream) -> std::io::Result<()> {
    let mut fields = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', "28000"), (b'M', NOT_TLS)] {
        fields.push(field);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut error = vec![b'E'];
    error.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    error.extend_from_slice(&fields);
    tcp.write_all(&error).await?;
    tcp.shutdown().await
}

/// The proxy's answer to a PostgreSQL client that does not ask for TLS.
const NOT_TLS: &str = "the test proxy accepts TLS sessions only";

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

/// pg_url is a URL for the shared PostgreSQL's `postgres` database through a proxy on `port`. The
/// connect timeout makes a proxy that stopped answering fail the test instead of hanging it.
fn pg_url(port: u16, query: &str) -> String {
    format!("postgres://postgres@localhost:{port}/postgres?connect_timeout=20&{query}")
}

/// pg_session connects with `url` through assetflow's own connection code, and returns the port
/// the server sees the session come from (`inet_client_port()`), or libpq's error.
async fn pg_session(url: String) -> Result<u16, String> {
    tokio::task::spawn_blocking(move || {
        let mut conn = assetflow::runtime::db::establish(&url).map_err(|e| e.to_string())?;
        let port = text(&mut conn, "SELECT inet_client_port()::text AS value", &[]);
        Ok(port.expect("a TCP session").parse().unwrap())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_checks_the_ca_and_the_host_name_and_nothing_passes_unencrypted() {
    let pki = Pki::new("pg");
    let server = pki.issue("postgres.test", Kind::Server(LOCAL), "server");
    let misnamed = pki.issue("db.example", Kind::Server(&["db.example"]), "misnamed");
    let stranger = Pki::new("pg-stranger");
    let proxy = Proxy::start(Upstream::Postgres, &server, None, None).await;
    let elsewhere = Proxy::start(Upstream::Postgres, &misnamed, None, None).await;
    let verify = |mode: &str, ca: &str| format!("sslmode={mode}&sslrootcert={ca}");
    let (ca, other_ca) = (pki.path("ca.pem"), stranger.path("ca.pem"));

    // The test CA signed the certificate, for the host connected to: the session is the one the
    // proxy opened after the handshake.
    let first = pg_session(pg_url(proxy.port, &verify("verify-full", &ca))).await.expect("verify-full connects");
    assert_eq!((proxy.traffic.handshakes(), proxy.traffic.upstream_ports()), (1, vec![first]));
    assert!(proxy.traffic.seen()[0].1.starts_with("TLSv1."), "{:?}", proxy.traffic.seen());
    // A CA that did not sign the certificate: refused in the handshake.
    let err = pg_session(pg_url(proxy.port, &verify("verify-full", &other_ca)))
        .await
        .expect_err("verify-full refuses a certificate from another CA");
    assert!(err.contains("certificate verify failed"), "{err}");
    proxy.traffic.settled("the proxy saw the handshake fail", |t| t.refused() == 1).await;
    assert_eq!(proxy.traffic.handshakes(), 1);
    // A certificate for another host: verify-full refuses it, verify-ca (the CA only) takes it.
    let err = pg_session(pg_url(elsewhere.port, &verify("verify-full", &ca)))
        .await
        .expect_err("verify-full refuses a certificate for another host");
    assert!(err.contains(r#"server certificate for "db.example" does not match host name "localhost""#), "{err}");
    let port = pg_session(pg_url(elsewhere.port, &verify("verify-ca", &ca))).await.expect("verify-ca connects");
    assert!(elsewhere.traffic.upstream_ports().contains(&port));
    // sslmode=require encrypts and checks nothing: with no CA file (a path where there is none,
    // so that no ~/.postgresql/root.crt is read either), an unknown CA's certificate for another
    // host is taken. Hence the start-up warning for sslmode=require across a network.
    let port = pg_session(pg_url(elsewhere.port, &verify("require", &pki.path("none.pem")))).await;
    assert!(elsewhere.traffic.upstream_ports().contains(&port.expect("require connects")));
    // Without TLS the proxy lets nothing through, so every session above was encrypted.
    let err =
        pg_session(pg_url(proxy.port, "sslmode=disable")).await.expect_err("the proxy lets nothing plain through");
    assert!(err.contains(NOT_TLS), "{err}");
    assert_eq!((proxy.traffic.unencrypted(), proxy.traffic.upstream_ports()), (1, vec![first]));
    // A client with Kerberos credentials asks for GSSAPI encryption first: declined, as by a server
    // without it, and the SSLRequest that follows accepted.
    let mut client = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    for (code, answer) in [(GSSENC_REQUEST, b'N'), (SSL_REQUEST, b'S')] {
        client.write_all(&[8u32.to_be_bytes(), code.to_be_bytes()].concat()).await.unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(10), client.read_u8()).await;
        assert_eq!(answered.expect("the proxy answers").unwrap(), answer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_flows_through_amqps_with_a_private_ca_and_a_client_certificate_and_postgres_verify_full() {
    let pki = Pki::new("flow");
    let server = pki.issue("rabbitmq.test", Kind::Server(LOCAL), "server");
    pki.issue("assetflow-test-client", Kind::Client, "client");
    let proxy = Proxy::start(Upstream::RabbitMq, &server, Some(&pki.ca), None).await;
    let pg_server = pki.issue("postgres.test", Kind::Server(LOCAL), "postgres");
    let pg = Proxy::start(Upstream::Postgres, &pg_server, None, None).await;
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
            "url": format!(
                "postgres://postgres@localhost:{}/{database}?sslmode=verify-full&sslrootcert={}",
                pg.port,
                pki.path("ca.pem")
            ),
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
    let (rid, pg_traffic) = (request_id.clone(), pg.traffic.clone());
    env.db(move |c| {
        assert_eq!(
            text(c, "SELECT status AS value FROM orders WHERE request_id = $1", &[&rid]).as_deref(),
            Some("issued")
        );
        // Every session of assetflow's database, the test's own included, came from the proxy,
        // which lets nothing through before a TLS handshake.
        let ports = pg_traffic.upstream_ports().iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()";
        assert!(count(c, sessions, &[]) >= 2);
        let elsewhere = "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND NOT client_port = ANY($1::int4[])";
        assert_eq!(count(c, elsewhere, &[&format!("{{{ports}}}")]), 0, "a session that did not come through TLS");
    })
    .await;

    // The proxies saw TLS, with assetflow's client certificate for RabbitMQ, and nothing else got
    // through.
    let seen = proxy.traffic.seen();
    assert!(proxy.traffic.handshakes() >= 1, "no TLS handshake reached the proxy");
    assert!(seen.iter().all(|(client, _)| client == "assetflow-test-client"), "{seen:?}");
    assert!(seen.iter().all(|(_, version)| version.starts_with("TLSv1.")), "{seen:?}");
    assert_eq!(proxy.traffic.refused(), 0, "a handshake failed");
    assert!(pg.traffic.handshakes() >= 2, "no TLS handshake reached the PostgreSQL proxy");
    assert_eq!((pg.traffic.refused(), pg.traffic.unencrypted()), (0, 0), "a PostgreSQL session was refused");
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
    let server = pki.issue("rabbitmq.test", Kind::Server(LOCAL), "server");
    pki.issue("assetflow-test-client", Kind::Client, "client");
    let stranger = Pki::new("stranger");
    stranger.issue("someone-else", Kind::Client, "client");
    let proxy = Proxy::start(Upstream::RabbitMq, &server, Some(&pki.ca), None).await;
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
    // A key that is not the certificate's is refused before anything is sent.
    let err = connect(&amqp(proxy.port, &vhost.0, Some(&ca), Some((&cert, &other_key)))).await.unwrap_err();
    assert!(format!("{err:#}").contains("not the key of amqp.tls_cert_file"), "{err:#}");
    assert_eq!(proxy.traffic.handshakes(), 0, "a refused client got through");
    // With both, it connects: the refusals above are the TLS checks, not a broken proxy.
    let conn = connect(&amqp(proxy.port, &vhost.0, Some(&ca), Some((&cert, &key)))).await.expect("connects");
    assert!(conn.status().connected());
    let _ = conn.close(200, "done".into()).await;
    assert_eq!(proxy.traffic.handshakes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_tls_min_version_1_3_refuses_a_broker_that_offers_tls_1_2_at_most() {
    let pki = Pki::new("amqp-version");
    let server = pki.issue("rabbitmq.test", Kind::Server(LOCAL), "server");
    let tls12 = Proxy::start(Upstream::RabbitMq, &server, None, Some(SslVersion::TLS1_2)).await;
    let any = Proxy::start(Upstream::RabbitMq, &server, None, None).await;
    let vhost = Vhost::new().await;
    let ca = pki.path("ca.pem");
    let at_least = |port: u16, version: &str| {
        let mut amqp = amqp(port, &vhost.0, Some(&ca), None);
        amqp.tls_min_version = serde_json::from_value(json!(version)).unwrap();
        amqp
    };

    let Err(err) = connect(&at_least(tls12.port, "1.3")).await else {
        panic!("a broker that offers TLS 1.2 at most was taken with tls_min_version = \"1.3\"");
    };
    assert!(format!("{err:#}").contains(VERSION_REFUSED), "{err:#}");
    tls12.traffic.settled("the proxy saw the handshake fail", |t| t.refused() == 1).await;
    assert_eq!(tls12.traffic.handshakes(), 0);
    // The same broker is taken with "1.2", which is the default, so the refusal was the version's.
    for config in [at_least(tls12.port, "1.2"), amqp(tls12.port, &vhost.0, Some(&ca), None)] {
        let conn = connect(&config).await.expect("TLS 1.2 is taken");
        let _ = conn.close(200, "done".into()).await;
    }
    assert_eq!(tls12.traffic.seen(), [(String::new(), "TLSv1.2".to_string()), (String::new(), "TLSv1.2".to_string())]);
    // And "1.3" connects where TLS 1.3 is offered.
    let conn = connect(&at_least(any.port, "1.3")).await.expect("TLS 1.3 is taken");
    let _ = conn.close(200, "done".into()).await;
    assert_eq!(any.traffic.seen(), [(String::new(), "TLSv1.3".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_honours_ssl_min_protocol_version_in_the_database_url() {
    let pki = Pki::new("pg-version");
    let server = pki.issue("postgres.test", Kind::Server(LOCAL), "server");
    let tls12 = Proxy::start(Upstream::Postgres, &server, None, Some(SslVersion::TLS1_2)).await;
    let any = Proxy::start(Upstream::Postgres, &server, None, None).await;
    let at_least = |version: &str| {
        format!("sslmode=verify-full&sslrootcert={}&ssl_min_protocol_version={version}", pki.path("ca.pem"))
    };

    let err = pg_session(pg_url(tls12.port, &at_least("TLSv1.3")))
        .await
        .expect_err("a server that offers TLS 1.2 at most is refused with ssl_min_protocol_version=TLSv1.3");
    assert!(err.contains(VERSION_REFUSED), "{err}");
    tls12.traffic.settled("the proxy saw the handshake fail", |t| t.refused() == 1).await;
    assert_eq!(tls12.traffic.handshakes(), 0);
    // The same server is taken with TLSv1.2 (libpq's default), so the refusal was the version's.
    pg_session(pg_url(tls12.port, &at_least("TLSv1.2"))).await.expect("TLS 1.2 is taken");
    assert_eq!(tls12.traffic.seen(), [(String::new(), "TLSv1.2".to_string())]);
    // And TLSv1.3 connects where TLS 1.3 is offered.
    pg_session(pg_url(any.port, &at_least("TLSv1.3"))).await.expect("TLS 1.3 is taken");
    assert_eq!(any.traffic.seen(), [(String::new(), "TLSv1.3".to_string())]);
}

/// The alert a server sends a client with which it shares no TLS version (protocol_version, 70),
/// as OpenSSL reports it to the client.
const VERSION_REFUSED: &str = "alert protocol version";

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
