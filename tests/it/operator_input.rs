//! Bad input on the operator commands: the real `assetflow` binary, run with bad arguments, bad
//! files, a bad configuration and an unreachable database. Each must end with a clear message on
//! standard error and a non-zero exit, within a bound, and never with a panic.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Operator is one test's operator: a configuration file naming the test's own database, a keys
/// directory, and a scratch directory for the files the commands are given.
struct Operator {
    dir: PathBuf,
    config: PathBuf,
    database: String,
}

impl Operator {
    fn new() -> Operator {
        Self::with_database_url(None)
    }

    /// Operator::with_database_url writes the configuration; None is the test's own database.
    fn with_database_url(url: Option<&str>) -> Operator {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
        let database = format!("assetflow_test_op{id}");
        let dir = std::env::temp_dir().join(format!("assetflow-operator-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let url = url.map(str::to_string).unwrap_or_else(|| format!("postgres://postgres@127.0.0.1:5432/{database}"));
        let config = dir.join("assetflow.toml");
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = \"{url}\"\npool_size = 2\n\n[keys]\ndir = \"{}\"\n\n[http]\nlisten = \"\"\n\n\
                 [partners.card-co]\n\n[gateways.gw-1]\n",
                dir.join("keys").display()
            ),
        )
        .unwrap();
        Operator { dir, config, database }
    }

    /// Operator::file writes a scratch file and returns its path.
    fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Operator::run runs `assetflow --config <the test's> args...`.
    fn run(&self, args: &[&str]) -> Outcome {
        self.run_within(args, Duration::from_secs(60))
    }

    /// Operator::run_within is [`Operator::run`] with a longer or shorter bound.
    fn run_within(&self, args: &[&str], bound: Duration) -> Outcome {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        assetflow(&all, &[], bound)
    }

    /// Operator::fails runs a command that must fail, and checks its message names what was wrong.
    fn fails(&self, args: &[&str], expected: &str) -> Outcome {
        let outcome = self.run(args);
        outcome.assert_failed_with(expected);
        outcome
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
            .arg(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Outcome is what a run of the binary left behind.
#[derive(Debug)]
pub struct Outcome {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Outcome {
    /// Outcome::assert_failed_with checks a clean failure: a non-zero exit code (not a signal),
    /// no panic, and `expected` in the message on standard error.
    pub fn assert_failed_with(&self, expected: &str) {
        assert!(!self.stderr.contains("panicked"), "{:?} panicked:\n{}", self.args, self.stderr);
        assert!(
            matches!(self.code, Some(code) if code != 0),
            "{:?} should fail with an exit code, got {:?}\nstdout: {}\nstderr: {}",
            self.args,
            self.code,
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.contains(expected),
            "{:?}: expected {expected:?} on standard error, got:\n{}",
            self.args,
            self.stderr
        );
    }

    /// Outcome::assert_succeeded checks a successful run.
    pub fn assert_succeeded(&self) {
        assert_eq!(self.code, Some(0), "{:?} failed:\nstdout: {}\nstderr: {}", self.args, self.stdout, self.stderr);
        assert!(!self.stderr.contains("panicked"), "{:?} panicked:\n{}", self.args, self.stderr);
    }
}

/// assetflow runs the real binary with `args` and `env`, without the caller's assetflow
/// environment, and kills it (failing the test) if it runs longer than `bound`.
pub fn assetflow(args: &[&str], env: &[(&str, &str)], bound: Duration) -> Outcome {
    let mut command = Command::new(env!("CARGO_BIN_EXE_assetflow"));
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("ASSETFLOW_") || key == "DATABASE_URL" || key == "AMQP_URL" || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let started = Instant::now();
    let mut child = command.spawn().expect("the assetflow binary starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("assetflow {args:?} still ran after {bound:?}: {}", err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        took: started.elapsed(),
    }
}

/// Blocking work (processes, psql) runs on the blocking pool: the tests share a runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test]
async fn batch_commands_refuse_unknown_jobs_and_bad_times() {
    blocking(|| {
        let op = Operator::new();
        op.fails(&["batch", "run", "no_such_job"], "no job \"no_such_job\"; the jobs are settlement_timeout");
        op.fails(&["batch", "run", "near_expiry", "--as-of", "garbage"], "\"garbage\" is not a time");
        op.fails(&["batch", "run", "near_expiry", "--as-of", "2026-13-45"], "is not a time");
        op.fails(&["batch", "run", "near_expiry", "--as-of", "2999-01-01"], "is in the future");
        op.fails(&["batch", "history", "--job", "nope"], "no job \"nope\"");
        op.fails(&["batch", "history", "--limit", "0"], "invalid value '0' for '--limit <LIMIT>'");
        op.fails(&["batch", "history", "--limit", "99999999999999999999"], "invalid value");
        op.fails(&["batch", "frobnicate"], "unrecognized subcommand 'frobnicate'");
        // A positive control: the same configuration runs a real job.
        op.run(&["batch", "run", "near_expiry", "--as-of", "2026-01-01", "--dry-run"]).assert_succeeded();
    })
    .await;
}

#[tokio::test]
async fn a_mistyped_job_is_refused_at_once_even_when_the_database_is_down() {
    blocking(|| {
        let op = Operator::with_database_url(Some("postgres://postgres@127.0.0.1:1/assetflow"));
        let outcome = op.fails(&["batch", "run", "no_such_job"], "no job \"no_such_job\"");
        assert!(outcome.took < Duration::from_secs(10), "took {:?}", outcome.took);
        let outcome = op.fails(&["dlq", "purge", "--reason", "malformed"], "add --yes");
        assert!(outcome.took < Duration::from_secs(10), "took {:?}", outcome.took);
    })
    .await;
}

#[tokio::test]
async fn dead_letter_commands_refuse_bad_ids_unknown_ids_and_unconfirmed_purges() {
    blocking(|| {
        let op = Operator::new();
        let unknown = uuid::Uuid::now_v7().to_string();
        op.fails(&["dlq", "show", "not-a-uuid"], "invalid value 'not-a-uuid' for '<ID>'");
        op.fails(&["dlq", "show", &unknown], &format!("no dead letter {unknown}"));
        op.fails(&["dlq", "replay", &unknown], &format!("no dead letter {unknown}; nothing was replayed"));
        op.fails(&["dlq", "replay"], "name dead letters by id, or select them");
        op.fails(&["dlq", "replay", "--reason", "malformed"], "replaying a selection needs --yes");
        op.fails(&["dlq", "purge", &unknown], "purging deletes dead letters for good: add --yes");
        op.fails(&["dlq", "purge", "--yes"], "name dead letters by id, or select them");
        op.fails(&["dlq", "purge", &unknown, "--yes"], &format!("no dead letter {unknown}; nothing was purged"));
        op.fails(&["dlq", "list", "--pool", "nope"], "unknown pool \"nope\"");
        op.fails(&["dlq", "list", "--since", "yesterday-ish"], "is not a time");
        // A duration so long ago that it is before any date: this panicked before.
        op.fails(&["dlq", "list", "--since", "300000y"], "\"300000y\" is too long ago");
        op.fails(&["dlq", "list", "--limit=-1"], "invalid value '-1' for '--limit <LIMIT>'");
        let list = op.run(&["dlq", "list"]);
        list.assert_succeeded();
        assert!(list.stdout.contains("no dead letters"), "{}", list.stdout);
    })
    .await;
}

#[tokio::test]
async fn terminal_registration_refuses_bad_keys_and_unknown_parties() {
    blocking(|| {
        let op = Operator::new();
        let key = assetflow::crypto::generate_key_pair().unwrap();
        let good = op.file("good.pem", assetflow::crypto::public_key_pem(&key).unwrap());
        let private = op.file("private.pem", key.private_key_to_pem_pkcs8().unwrap());
        let garbled = op.file("garbled.pem", "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n");
        let empty = op.file("empty.pem", "");
        let binary = op.file("binary.pem", [0xff, 0xfe, 0x00, 0x80, 0xc3]);
        let huge = op.file("huge.pem", vec![b'A'; 200 * 1024]);
        let register = |id: &str, gateway: &str, key: &Path| {
            vec![
                "terminals".to_string(),
                "register".into(),
                "--id".into(),
                id.into(),
                "--kind".into(),
                "mobile".into(),
                "--gateway".into(),
                gateway.into(),
                "--public-key".into(),
                key.display().to_string(),
            ]
        };
        let fails = |args: Vec<String>, expected: &str| {
            op.fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), expected);
        };
        fails(register("t-1", "gw-1", &op.dir.join("absent.pem")), "absent.pem: No such file");
        fails(register("t-1", "gw-1", &garbled), "garbled.pem: the public key is not a PEM public key");
        fails(register("t-1", "gw-1", &private), "private.pem: the public key is not a PEM public key");
        fails(register("t-1", "gw-1", &empty), "empty.pem: the public key is not a PEM public key");
        fails(register("t-1", "gw-1", &binary), "binary.pem: not a PEM text file");
        fails(register("t-1", "gw-1", &huge), "huge.pem: larger than 64 KiB");
        // A device that never ends is refused by its size, not read until the memory is full.
        fails(register("t-1", "gw-1", Path::new("/dev/zero")), "/dev/zero: larger than 64 KiB");
        fails(register("t-1", "gw-9", &good), "gateway \"gw-9\" is not configured");
        fails(register("a terminal", "gw-1", &good), "--id must be 1-64 characters");
        let mut unknown_partner = register("t-1", "gw-1", &good);
        unknown_partner.extend(["--partner".into(), "bank-z".into()]);
        fails(unknown_partner, "partner \"bank-z\" is not configured");
        let mut bad_kind = register("t-1", "gw-1", &good);
        bad_kind[5] = "toaster".into();
        fails(bad_kind, "--kind must be mobile, stationary, pos or gate");
        op.fails(
            &["terminals", "register", "--id", "t-1", "--kind", "mobile", "--gateway", "gw-1"],
            "give --public-key FILE or --generate-key FILE",
        );
        // Nothing was registered by any of that; a good key then registers.
        let list = op.run(&["terminals", "list"]);
        list.assert_succeeded();
        assert!(!list.stdout.contains("t-1"), "{}", list.stdout);
        let args = register("t-1", "gw-1", &good);
        op.run(&args.iter().map(String::as_str).collect::<Vec<_>>()).assert_succeeded();
        assert!(op.run(&["terminals", "list"]).stdout.contains("t-1"));
    })
    .await;
}

#[tokio::test]
async fn product_commands_refuse_bad_prices_and_terms() {
    blocking(|| {
        let op = Operator::new();
        let add = |extra: &[&str]| {
            let mut args = vec![
                "products",
                "add",
                "--id",
                "p-1",
                "--kind",
                "ticket",
                "--title",
                "A concert",
                "--issuer",
                "issuer-1",
                "--currency",
                "JPY",
                "--asset-validity",
                "30d",
                "--certificate-validity",
                "7d",
            ];
            // A flag given in `extra` replaces the same flag of the good product.
            for flag in extra.iter().filter(|a| a.starts_with("--")) {
                let name = flag.split('=').next().unwrap();
                if let Some(i) = args.iter().position(|a| *a == name) {
                    args.drain(i..i + 2);
                }
            }
            args.extend_from_slice(extra);
            args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        let fails = |extra: &[&str], expected: &str| {
            let args = add(extra);
            op.fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), expected);
        };
        fails(&["--price-minor=-1"], "--price-minor must not be negative");
        fails(&["--price-minor", "99999999999999999999"], "invalid value '99999999999999999999' for '--price-minor");
        fails(&["--price-minor", "12.50"], "invalid value '12.50'");
        fails(&["--price-minor", "100", "--value-minor=-5"], "--value-minor must not be negative");
        fails(&["--price-minor", "100", "--uses", "0"], "--uses must be at least 1");
        fails(&["--price-minor", "100", "--uses", "9999999999"], "invalid value '9999999999' for '--uses");
        fails(&["--price-minor", "100", "--currency", "yen"], "--currency must be an ISO 4217 code");
        fails(&["--price-minor", "100", "--asset-validity", "0s"], "--asset-validity must be at least 1s");
        // Added to the time of issue later, a term of 300,000 years would overflow there.
        fails(&["--price-minor", "100", "--asset-validity", "300000y"], "--asset-validity must be at most 100 years");
        fails(&["--price-minor", "100", "--certificate-validity", "forever"], "invalid value 'forever'");
        fails(
            &["--price-minor", "100", "--reminder-stage1", "1h", "--reminder-stage2", "2h"],
            "--reminder-stage1 must be longer than --reminder-stage2",
        );
        fails(&["--price-minor", "100", "--stage2-policy", "shout"], "--stage2-policy must be");
        fails(&["--price-minor", "100", "--tags", "not json"], "--tags is not JSON");
        fails(&["--price-minor", "100", "--tags", "[1, 2]"], "--tags must be a JSON object");
        fails(&["--price-minor", "100", "--kind", "voucher"], "--kind must be prepaid_card, ticket");
        // None of that was saved; a good product then is.
        let list = op.run(&["products", "list", "--json"]);
        list.assert_succeeded();
        assert_eq!(list.stdout.trim(), "[]");
        let args = add(&["--price-minor", "1500"]);
        op.run(&args.iter().map(String::as_str).collect::<Vec<_>>()).assert_succeeded();
        assert!(op.run(&["products", "list"]).stdout.contains("p-1"));
    })
    .await;
}

#[tokio::test]
async fn status_of_an_unknown_id_says_nothing_is_known() {
    blocking(|| {
        let op = Operator::new();
        op.run(&["migrate"]).assert_succeeded();
        for id in ["no-such-request", &uuid::Uuid::now_v7().to_string(), "' OR 1=1 --", ""] {
            let outcome = op.run(&["status", id]);
            outcome.assert_failed_with("nothing is known by the id");
            assert_eq!(outcome.code, Some(2), "{outcome:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn bad_configuration_files_are_refused_naming_the_key() {
    blocking(|| {
        let op = Operator::new();
        let config = |name: &str, text: &str| op.file(name, text).display().to_string();
        let cases = [
            (config("unknown.toml", "[amqp]\nprefx = \"x\"\n"), "unknown field: found `prefx`"),
            (config("section.toml", "[amqpp]\nurl = \"x\"\n"), "unknown field: found `amqpp`"),
            (config("type.toml", "[database]\npool_size = \"many\"\n"), "database.pool_size"),
            (config("negative.toml", "[database]\npool_size = -4\n"), "database.pool_size"),
            (config("duration.toml", "[auth]\nfreshness_window = \"a while\"\n"), "auth.freshness_window"),
            (config("syntax.toml", "[database\nurl = \n"), "configuration"),
            (config("small.toml", "[amqp]\ndelivery_limit = 1\n"), "amqp.delivery_limit must be at least 2"),
            (config("prefix.toml", "[amqp]\nprefix = \"a b\"\n"), "amqp.prefix \"a b\" is not a valid name"),
            (config("partner.toml", "[partners.\"bad id!\"]\n"), "partner, gateway or issuer id \"bad id!\""),
            (config("schedule.toml", "[schedules]\nnightly = \"0 0 1 * * *\"\n"), "schedules.nightly names no job"),
            (
                config("tls.toml", "[amqp]\ntls_ca_file = \"/etc/hostname\"\n"),
                "amqp.tls_* is set but amqp.url is not amqps://",
            ),
            (
                config("ca.toml", "[amqp]\nurl = \"amqps://u:p@h/\"\ntls_ca_file = \"/no/such/ca.pem\"\n"),
                "amqp.tls_ca_file /no/such/ca.pem: No such file",
            ),
            (
                config("ca-text.toml", "[amqp]\nurl = \"amqps://u:p@h/\"\ntls_ca_file = \"/etc/hostname\"\n"),
                "amqp.tls_ca_file /etc/hostname: no PEM certificate in it",
            ),
            (op.dir.join("absent.toml").display().to_string(), "absent.toml"),
        ];
        for (file, expected) in &cases {
            assetflow(&["--config", file, "config"], &[], Duration::from_secs(30)).assert_failed_with(expected);
        }
        // The environment is checked the same way.
        assetflow(&["config"], &[("ASSETFLOW_AMQP__PREFX", "x")], Duration::from_secs(30)).assert_failed_with("prefx");
        assetflow(&["config"], &[("ASSETFLOW_DATABASE__POOL_SIZE", "lots")], Duration::from_secs(30))
            .assert_failed_with("for key \"DATABASE.POOL_SIZE\"");
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error_not_a_hang() {
    blocking(|| {
        // Port 1 on the loopback interface refuses at once; the password must not be shown.
        let op = Operator::with_database_url(Some("postgres://postgres:hunter2-db@127.0.0.1:1/assetflow"));
        for args in [vec!["migrate"], vec!["status", "anything"], vec!["terminals", "list"], vec!["products", "list"]] {
            let outcome = op.fails(&args, "127.0.0.1");
            assert!(outcome.stderr.contains("Connection refused"), "{outcome:?}");
            assert!(!outcome.stderr.contains("hunter2"), "the password is shown: {}", outcome.stderr);
            assert!(outcome.took < Duration::from_secs(30), "{args:?} took {:?}", outcome.took);
        }
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_database_ends_the_batch_and_dlq_commands_within_seconds() {
    blocking(|| {
        // An operator command retries briefly (app::prepare with operator patience: 200 ms, 400 ms,
        // 800 ms), saying so on every retry, then gives up: the service's 50 s are for a database
        // that is starting with it, not for a person waiting at a prompt.
        let op = Operator::with_database_url(Some("postgres://postgres:hunter2-db@127.0.0.1:1/assetflow"));
        for args in [vec!["dlq", "list"], vec!["batch", "list"]] {
            let outcome = op.run_within(&args, Duration::from_secs(120));
            outcome.assert_failed_with("Connection refused");
            assert!(outcome.stderr.contains("database not ready"), "{}", outcome.stderr);
            assert!(!outcome.stderr.contains("hunter2"), "the password is shown: {}", outcome.stderr);
            assert!(outcome.took < Duration::from_secs(15), "{args:?} took {:?}", outcome.took);
        }
    })
    .await;
}
