//! `assetflow dlq`: dead letters, for the operator who handles them.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use uuid::Uuid;

use super::time::parse_since;
use crate::config::Config;
use crate::contracts::topology::Pool;
use crate::runtime::dead_letter::{self, Filter};
use crate::service::app::App;

#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// settlement, issuance or delivery.
    #[arg(long, value_parser = super::parse_pool)]
    pub pool: Option<Pool>,
    /// A dead-letter reason, such as retries_exhausted or schema_violation.
    #[arg(long)]
    pub reason: Option<String>,
    /// Only those recorded since: a time (2026-12-23T10:00) or a duration ago (24h, 7d).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, newest first (those not replayed yet, unless --all).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Include dead letters that were already replayed.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its evidence: the original, every attempt, and its audit trail.
    Show {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Re-enqueue dead letters through the normal path. Their history is kept.
    Replay {
        /// Dead letters to replay; or select them with the filters and --yes.
        ids: Vec<Uuid>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Confirm a replay selected by filters.
        #[arg(long)]
        yes: bool,
        /// Who is doing this, for the audit trail.
        #[arg(long, env = "USER", default_value = "unknown")]
        operator: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters for good, leaving an audit record of each.
    Purge {
        ids: Vec<Uuid>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Confirm the purge.
        #[arg(long)]
        yes: bool,
        #[arg(long, env = "USER", default_value = "unknown")]
        operator: String,
    },
}

fn filter(ids: Vec<Uuid>, args: FilterArgs, replayed: bool) -> Filter {
    Filter { ids, pool: args.pool.map(|p| p.as_str().to_string()), reason: args.reason, since: args.since, replayed }
}

fn selects_something(ids: &[Uuid], args: &FilterArgs) -> bool {
    !ids.is_empty() || args.pool.is_some() || args.reason.is_some() || args.since.is_some()
}

pub async fn execute(config: Config, command: DlqCommand) -> anyhow::Result<()> {
    // Refusals that need no database come first, so that they are immediate even when it is down.
    match &command {
        DlqCommand::Replay { ids, filter: args, yes, .. } => {
            anyhow::ensure!(
                selects_something(ids, args),
                "name dead letters by id, or select them with --pool, --reason or --since"
            );
            anyhow::ensure!(
                !ids.is_empty() || *yes,
                "replaying a selection needs --yes (see what it selects with `assetflow dlq list`)"
            );
        }
        DlqCommand::Purge { ids, filter: args, yes, .. } => {
            anyhow::ensure!(
                selects_something(ids, args),
                "name dead letters by id, or select them with --pool, --reason or --since"
            );
            anyhow::ensure!(
                *yes,
                "purging deletes dead letters for good: add --yes (see what it selects with `assetflow dlq list --all`)"
            );
        }
        _ => {}
    }
    let app = Arc::new(App::for_operations(config)?);
    crate::service::app::prepare(&app, crate::service::app::Patience::Operator).await?;
    match command {
        DlqCommand::List { filter: args, all, limit, json } => {
            let f = filter(Vec::new(), args, all);
            let letters = app
                .plumbing
                .db
                .run(move |conn| dead_letter::list(conn, &f, limit).map_err(anyhow::Error::from))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
                return Ok(());
            }
            if letters.is_empty() {
                println!("no dead letters");
                return Ok(());
            }
            println!(
                "{:<36} {:<10} {:<10} {:<22} {:<20} {:<19} DETAIL",
                "ID", "POOL", "SOURCE", "TYPE", "REASON", "RECORDED"
            );
            for l in letters {
                let mut detail = l.detail.replace('\n', " ");
                if detail.chars().count() > 80 {
                    detail = detail.chars().take(79).collect::<String>() + "…";
                }
                println!(
                    "{:<36} {:<10} {:<10} {:<22} {:<20} {:<19} {}{}",
                    l.id,
                    l.pool,
                    l.source,
                    l.message_type,
                    l.reason,
                    l.created_at.format("%Y-%m-%d %H:%M:%S"),
                    detail,
                    if l.replay_count > 0 { format!(" (replayed {}x)", l.replay_count) } else { String::new() }
                );
            }
        }
        DlqCommand::Show { id, json } => {
            let letter =
                app.plumbing.db.run(move |conn| dead_letter::show(conn, id).map_err(anyhow::Error::from)).await?;
            let letter = letter.ok_or_else(|| anyhow::anyhow!("no dead letter {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letter)?);
                return Ok(());
            }
            let s = &letter.summary;
            println!("dead letter {}", s.id);
            println!("  pool         {}", s.pool);
            println!("  source       {}", s.source);
            println!("  type         {}", s.message_type);
            println!("  reason       {}", s.reason);
            println!("  detail       {}", s.detail);
            println!("  recorded     {}", s.created_at.to_rfc3339());
            if let Some(subject) = s.subject_id {
                match s.source.as_str() {
                    // A purchase's dead letter names its order, a refund's its own settlement.
                    "settlement" if letter.payload["kind"] == "refund" => {
                        println!("  refund       settlement {subject}   (assetflow status {subject})")
                    }
                    "settlement" => println!("  order        {subject}   (assetflow status {subject})"),
                    "delivery" => println!("  delivery     {subject}"),
                    _ => println!("  subject      {subject}"),
                }
            }
            if let Some(id) = &letter.summary.message_id {
                println!("  message id   {id}");
            }
            if let (Some(exchange), Some(key)) = (&letter.exchange, &letter.routing_key) {
                println!("  came from    {exchange} / {key}");
            }
            if let Some(at) = s.replayed_at {
                println!("  replayed     {} time(s), last {}", s.replay_count, at.to_rfc3339());
            }
            println!("  attempts");
            for attempt in letter.attempts.as_array().into_iter().flatten() {
                println!("    {attempt}");
            }
            println!("  original\n{}", indent(&serde_json::to_string_pretty(&letter.payload)?));
            if !letter.audit.is_empty() {
                println!("  audit");
                for a in &letter.audit {
                    println!("    {a}");
                }
            }
        }
        DlqCommand::Replay { ids, filter: args, yes: _, operator, json } => {
            refuse_unknown(&app, &ids, "replayed").await?;
            let f = filter(ids, args, false);
            let replayers = app.replayers()?;
            let results = app
                .plumbing
                .db
                .run(move |conn| -> anyhow::Result<Vec<Result<dead_letter::Replayed, String>>> {
                    let letters = dead_letter::list(conn, &f, 10_000)?;
                    Ok(letters
                        .iter()
                        .map(|l| {
                            replayers.replay(conn, l.id, &operator, Utc::now()).map_err(|e| format!("{}: {e}", l.id))
                        })
                        .collect())
                })
                .await?;
            let failed = results.iter().filter(|r| r.is_err()).count();
            if json {
                let view: Vec<serde_json::Value> = results
                    .iter()
                    .map(|r| match r {
                        Ok(done) => serde_json::json!({"id": done.id, "action": done.action}),
                        Err(e) => serde_json::json!({"error": e}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                for r in &results {
                    match r {
                        Ok(done) => println!("replayed {}: {}", done.id, done.action),
                        Err(e) => println!("not replayed {e}"),
                    }
                }
                println!("{} replayed, {failed} not", results.len() - failed);
            }
            anyhow::ensure!(failed == 0, "{failed} dead letter(s) could not be replayed");
        }
        DlqCommand::Purge { ids, filter: args, yes: _, operator } => {
            refuse_unknown(&app, &ids, "purged").await?;
            let f = filter(ids, args, true);
            let purged = app
                .plumbing
                .db
                .run(move |conn| dead_letter::purge(conn, &f, &operator).map_err(anyhow::Error::from))
                .await?;
            println!("purged {} dead letter(s); each left an audit record", purged.len());
        }
    }
    Ok(())
}

/// refuse_unknown fails, before anything is done, when an id named on the command line is not a
/// dead letter: a mistyped id must not pass for a successful replay or purge of nothing.
async fn refuse_unknown(app: &App, ids: &[Uuid], action: &str) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let f = filter(ids.to_vec(), FilterArgs { pool: None, reason: None, since: None }, true);
    let limit = ids.len() as i64;
    let found =
        app.plumbing.db.run(move |conn| dead_letter::list(conn, &f, limit).map_err(anyhow::Error::from)).await?;
    let missing: Vec<String> =
        ids.iter().filter(|id| !found.iter().any(|l| l.id == **id)).map(Uuid::to_string).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "no dead letter {}; nothing was {action} (see `assetflow dlq list --all`)",
        missing.join(", ")
    );
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}
