//! PostgreSQL: the connection pool, migrations, and the one place diesel errors are classified.
//!
//! diesel is synchronous, so every query runs on tokio's blocking pool through [`Db::run`]: the
//! async runtime that drives AMQP acknowledgements and heartbeats is never blocked by a query.

pub mod prepared;
pub mod schema;

pub use prepared::prepared;

use std::borrow::Cow;
use std::time::Duration;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

/// The migrations in `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// An arbitrary but fixed key for the advisory lock that serialises migrations across processes.
const MIGRATION_LOCK: i64 = 0x6173_7365_7466_6c6f; // "assetflo"

pub type ConnectionPool = Pool<ConnectionManager<PgConnection>>;
pub type Conn = PooledConnection<ConnectionManager<PgConnection>>;

/// DbError is a database failure as the rest of assetflow sees it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had: the database is down or the pool is exhausted.
    #[error("no database connection: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Query(#[from] DieselError),
}

impl DbError {
    /// DbError::is_connection_lost says whether the database could not be reached at all.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            DbError::Unavailable(_) => true,
            DbError::Query(e) => is_connection_lost(e),
        }
    }
}

/// is_transient classifies a diesel error: a lost connection, a serialization failure or a
/// deadlock heals by itself; anything else is a bug or bad data and will fail again.
pub fn is_transient(error: &DieselError) -> bool {
    is_connection_lost(error)
        || match error {
            DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
            // 40P01 deadlock_detected reaches diesel as Unknown with the server's message; so does
            // any other trouble with the connection, which is worth another try too.
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info) => {
                let message = info.message();
                message.contains("deadlock") || message.contains("connection")
            }
            DieselError::BrokenTransactionManager => true,
            _ => false,
        }
}

/// is_connection_lost says whether a diesel error means the database went away (the connection
/// was closed, refused or is being shut down), as opposed to a conflict or a bad query: the pools
/// then wait for the database instead of spending the message's attempts. 57P01 admin_shutdown,
/// 57P03 cannot_connect_now and the class 08 connection exceptions reach diesel as `Unknown` with
/// the server's message.
pub fn is_connection_lost(error: &DieselError) -> bool {
    match error {
        DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand, _) => {
            true
        }
        DieselError::DatabaseError(DatabaseErrorKind::Unknown, info) => {
            let message = info.message();
            [
                "terminating connection",
                "server closed the connection",
                "the database system is",
                "no connection to the server",
                "connection refused",
                "could not connect",
            ]
            .iter()
            .any(|m| message.contains(m))
        }
        _ => false,
    }
}

/// Db is the shared connection pool.
#[derive(Clone)]
pub struct Db {
    pool: ConnectionPool,
}

impl Db {
    /// Db::new builds the pool without connecting: a database that is down at start-up is
    /// waited for by the callers' retries, not a reason to exit.
    pub fn new(url: &str, size: u32, connection_timeout: Duration) -> Db {
        openssl::init();
        let pool = Pool::builder()
            .max_size(size)
            // Connections are opened when asked for, never ahead on r2d2's own threads: an idle
            // connection kept in reserve is opened in the background each time the last one is
            // taken, and a short command would exit while that connection was still being made
            // (see `conninfo` for what that cost). Connections stay open once made.
            .min_idle(Some(0))
            .connection_timeout(connection_timeout)
            // No `SELECT 1` at each check-out: it was a tenth of all round trips. A connection that
            // died with a database restart fails its next statement instead; libpq then reports
            // its transaction status as unknown, diesel marks it broken, and r2d2 drops it when it
            // is returned. The handler's failure is `Failure::Unavailable`, which holds the
            // message until the database answers and spends no attempt (see `pool`).
            .test_on_check_out(false)
            .connection_customizer(Box::new(SessionSettings))
            .idle_timeout(None)
            .max_lifetime(None)
            .event_handler(Box::new(PoolEvents { size, opened: Default::default() }))
            .build_unchecked(ConnectionManager::new(conninfo(url)));
        Db { pool }
    }

    /// Db::get takes a connection on the current (blocking) thread.
    pub fn get(&self) -> Result<Conn, DbError> {
        self.pool.get().map_err(|e| DbError::Unavailable(e.to_string()))
    }

    /// Db::try_get takes a connection only if one is idle now: for work that may as well be done
    /// without it, which must never wait for a connection while holding another.
    pub fn try_get(&self) -> Option<Conn> {
        self.pool.try_get()
    }

    /// Db::run runs `f` with a connection on the blocking pool.
    pub async fn run<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&mut PgConnection) -> Result<T, E> + Send + 'static,
    {
        let pool = self.pool.clone();
        // The caller's span (a message's ids) follows the work onto the blocking thread.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let mut conn = pool.get().map_err(|e| E::from(DbError::Unavailable(e.to_string())))?;
            f(&mut conn)
        })
        .await
        .expect("a database task panicked")
    }
}

/// SessionSettings configures every pooled connection.
///
/// - **No JIT.** Compiling costs more than it saves on assetflow's short, index-driven queries
///   (over 100 ms of planning for a 5,000-row claim).
/// - **A plan for each execution** (`plan_cache_mode = force_custom_plan`). The hot statements
///   are prepared once per connection, and by default PostgreSQL then keeps a generic plan once
///   it looks no dearer than the custom ones. A plan made while a table was nearly empty reads
///   the whole table (`id = ANY($1)` as a filter, an `unnest` hash-joined to a sequential scan),
///   and it is kept as the table grows until an `ANALYZE` happens to invalidate it: on a fresh
///   database at 380 orders a second, that was millions of rows read per minute, growing with
///   the tables, and twice the p99 latency. Planned with its parameters, each statement uses
///   the primary key and sees how many rows its arrays hold; parsing is still saved.
#[derive(Debug)]
struct SessionSettings;

impl diesel::r2d2::CustomizeConnection<PgConnection, diesel::r2d2::Error> for SessionSettings {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        diesel::connection::SimpleConnection::batch_execute(
            conn,
            "SET jit = off; SET plan_cache_mode = force_custom_plan",
        )
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// PoolEvents turns the pool's events into metrics. Connections live as long as they work (no
/// idle timeout, no maximum lifetime), so a connection opened once the pool has been full
/// replaces a broken one: a reconnection.
#[derive(Debug)]
struct PoolEvents {
    size: u32,
    opened: std::sync::atomic::AtomicU32,
}

impl diesel::r2d2::HandleEvent for PoolEvents {
    fn handle_acquire(&self, _: diesel::r2d2::event::AcquireEvent) {
        crate::runtime::metrics::db_connection_opened();
        if self.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= self.size {
            crate::runtime::metrics::reconnected("postgres");
        }
    }

    fn handle_timeout(&self, _: diesel::r2d2::event::TimeoutEvent) {
        crate::runtime::metrics::db_checkout_timed_out();
    }
}

/// establish opens one connection outside the pool, as the pool opens its own.
pub fn establish(url: &str) -> ConnectionResult<PgConnection> {
    openssl::init();
    PgConnection::establish(&conninfo(url))
}

/// conninfo is `url` as assetflow hands it to libpq: GSSAPI encryption is not negotiated
/// (`gssencmode=disable`) unless the URL or `PGGSSENCMODE` asks for it. libpq's default, `prefer`,
/// looks for a Kerberos credential cache before every connection, even to a server that never
/// asks for Kerberos. A process that exits while a connection is being made (on a pool thread, or
/// a command that gave up waiting) then races Kerberos's own clean-up at exit, which destroys the
/// mutex the look-up holds: the process aborts (`k5_mutex_lock: Received error 22`) after it has
/// done its work. `openssl::init`, called before the first connection, likewise keeps OpenSSL's
/// clean-up out of exit.
fn conninfo(url: &str) -> Cow<'_, str> {
    gssapi_off_unless_asked(url, std::env::var_os("PGGSSENCMODE").is_some())
}

fn gssapi_off_unless_asked(url: &str, asked_in_env: bool) -> Cow<'_, str> {
    if asked_in_env || url.contains("gssencmode") {
        return Cow::Borrowed(url);
    }
    let uri = url.starts_with("postgres://") || url.starts_with("postgresql://");
    Cow::Owned(match (uri, url.contains('?')) {
        (true, true) => format!("{url}&gssencmode=disable"),
        (true, false) => format!("{url}?gssencmode=disable"),
        (false, _) => format!("{url} gssencmode=disable").trim_start().to_string(),
    })
}

/// ensure_database creates the database named in `url` if it does not exist yet.
pub fn ensure_database(url: &str) -> anyhow::Result<()> {
    let (server_url, name) = split_database_url(url)?;
    if establish(url).is_ok() {
        return Ok(());
    }
    let mut admin = establish(&server_url).map_err(|e| {
        anyhow::anyhow!("cannot connect to PostgreSQL at {}: {e}", crate::config::redact_url(&server_url))
    })?;
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match diesel::sql_query(sql).execute(&mut admin) {
        Ok(_) => {
            tracing::info!(database = %name, "created the database");
            Ok(())
        }
        // Another process created it at the same moment.
        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => Ok(()),
        Err(e) if e.to_string().contains("already exists") => Ok(()),
        Err(e) => Err(anyhow::anyhow!("cannot create database {name}: {e}")),
    }
}

/// split_database_url returns the URL of the server's `postgres` database and the database name.
fn split_database_url(url: &str) -> anyhow::Result<(String, String)> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (server, name) = base
        .rsplit_once('/')
        .filter(|(server, name)| server.contains("://") && !server.ends_with('/') && !name.is_empty())
        .ok_or_else(|| anyhow::anyhow!("database.url must name a database: {}", crate::config::redact_url(url)))?;
    let admin = match query {
        Some(q) => format!("{server}/postgres?{q}"),
        None => format!("{server}/postgres"),
    };
    Ok((admin, name.to_string()))
}

/// migrate brings the schema up to date. Concurrent start-ups wait for each other on an advisory
/// lock instead of racing on the same DDL.
pub fn migrate(conn: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK})")).execute(conn)?;
    let applied = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|versions| versions.iter().map(|v| v.to_string()).collect())
        .map_err(|e| anyhow::anyhow!("migration failed: {e}"));
    diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})")).execute(conn)?;
    applied
}

/// prepare creates the database if needed and migrates it: what `assetflow migrate` does.
pub fn prepare(url: &str) -> anyhow::Result<Vec<String>> {
    ensure_database(url)?;
    let mut conn =
        establish(url).map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", crate::config::redact_url(url)))?;
    migrate(&mut conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_split_into_server_and_name() {
        assert_eq!(
            split_database_url("postgres://postgres@127.0.0.1:5432/assetflow").unwrap(),
            ("postgres://postgres@127.0.0.1:5432/postgres".into(), "assetflow".into())
        );
        assert_eq!(
            split_database_url("postgres://u:p@h/db?sslmode=require").unwrap(),
            ("postgres://u:p@h/postgres?sslmode=require".into(), "db".into())
        );
        assert!(split_database_url("postgres://h:5432").is_err());
    }

    #[test]
    fn connections_do_not_negotiate_gssapi_unless_asked() {
        let conninfo = |url| gssapi_off_unless_asked(url, false);
        assert_eq!(conninfo("postgres://h/db"), "postgres://h/db?gssencmode=disable");
        assert_eq!(
            conninfo("postgresql://h/db?sslmode=require"),
            "postgresql://h/db?sslmode=require&gssencmode=disable"
        );
        assert_eq!(conninfo("host=h dbname=db"), "host=h dbname=db gssencmode=disable");
        assert_eq!(conninfo(""), "gssencmode=disable");
        // Asked for, in the URL or in PGGSSENCMODE: left to libpq.
        assert_eq!(conninfo("postgres://h/db?gssencmode=require"), "postgres://h/db?gssencmode=require");
        assert_eq!(gssapi_off_unless_asked("postgres://h/db", true), "postgres://h/db");
    }
}
