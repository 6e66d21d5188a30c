//! `assetflow bench`: measured throughput, never asserted in tests (`docs/performance.md`).

pub mod lifecycle;
pub mod limits;
pub mod machine;
pub mod scan;

use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Seed certificates with expiries spread over 30 days, then run near_expiry and past_due
    /// one day ahead, and report how fast due certificates were found and enqueued.
    Scan(scan::ScanOptions),
    /// Run the whole loop with the simulators against a real `assetflow run` process and report
    /// throughput, latency percentiles, CPU, memory, and messages and commits per order, with the
    /// ratio to what the broker and the database allow, measured before and after each run.
    Lifecycle(lifecycle::LifecycleOptions),
    /// Measure what RabbitMQ and PostgreSQL do on this machine, the way assetflow uses them.
    Limits(limits::LimitsOptions),
}

pub async fn run(config: Config, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Scan(options) => scan::run(config, options).await,
        BenchCommand::Lifecycle(options) => {
            let json = options.json;
            let report = lifecycle::run(config, options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                lifecycle::print(&report);
            }
            Ok(())
        }
        BenchCommand::Limits(options) => {
            let limits = limits::measure(&config, &options).await?;
            if options.json {
                println!("{}", serde_json::to_string_pretty(&limits)?);
            } else {
                limits::print(&limits);
            }
            Ok(())
        }
    }
}

/// bench_database_url is the configured database URL with `suffix` added to the database name:
/// benchmarks work in a database of their own, created fresh and dropped after.
pub fn bench_database_url(url: &str, suffix: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b.to_string(), format!("?{q}")),
        None => (url.to_string(), String::new()),
    };
    format!("{base}_{suffix}{query}")
}

/// Exclusive is a session lock on a benchmark's database names, held on a connection of its own
/// for as long as the value lives: two benchmarks with the same configuration would otherwise
/// drop and recreate each other's databases under each other's feet.
pub struct Exclusive {
    _session: diesel::PgConnection,
}

/// exclusive takes the lock for the databases named after `url`, or says that another benchmark
/// holds it.
pub fn exclusive(url: &str) -> anyhow::Result<Exclusive> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Taken {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        taken: bool,
    }
    let (mut admin, name) = admin_connection(url)?;
    let Taken { taken } = diesel::sql_query("SELECT pg_try_advisory_lock(hashtext('assetflow bench ' || $1)) AS taken")
        .bind::<diesel::sql_types::Text, _>(&name)
        .get_result(&mut admin)?;
    anyhow::ensure!(
        taken,
        "another benchmark is using the databases named after {name:?} on this server; wait for it to finish, or give this one a configuration with another database name"
    );
    Ok(Exclusive { _session: admin })
}

/// server_and_name splits a database URL into its server's URL and the database's name.
fn server_and_name(url: &str) -> anyhow::Result<(&str, &str)> {
    let (base, _) = url.split_once('?').unwrap_or((url, ""));
    base.rsplit_once('/').ok_or_else(|| anyhow::anyhow!("no database name in the URL"))
}

/// admin_connection connects to the `postgres` database of the server in `url`, and returns the
/// name of the database `url` names.
fn admin_connection(url: &str) -> anyhow::Result<(diesel::PgConnection, String)> {
    let (server, name) = server_and_name(url)?;
    Ok((crate::runtime::db::establish(&format!("{server}/postgres"))?, name.to_string()))
}

/// copy_database replaces the database `url` names with a copy of the one `template` names, on
/// the same server. The copy is made file by file (`STRATEGY FILE_COPY`, PostgreSQL 15), with a
/// checkpoint before and after: it is written out before anything measures, and its tables keep
/// the template's statistics and visibility map.
pub fn copy_database(template: &str, url: &str) -> anyhow::Result<()> {
    use diesel::RunQueryDsl;
    drop_database(url)?;
    let (_, template) = server_and_name(template)?;
    let (mut admin, name) = admin_connection(url)?;
    diesel::sql_query(format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\" STRATEGY FILE_COPY"))
        .execute(&mut admin)?;
    Ok(())
}

/// recreate_database drops the database `url` names, if it exists, and creates it empty.
pub fn recreate_database(url: &str) -> anyhow::Result<()> {
    use diesel::RunQueryDsl;
    drop_database(url)?;
    let (mut admin, name) = admin_connection(url)?;
    diesel::sql_query(format!("CREATE DATABASE \"{name}\"")).execute(&mut admin)?;
    Ok(())
}

/// drop_database drops the database `url` names, closing its connections.
pub fn drop_database(url: &str) -> anyhow::Result<()> {
    use diesel::RunQueryDsl;
    let (mut admin, name) = admin_connection(url)?;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin)?;
    Ok(())
}
