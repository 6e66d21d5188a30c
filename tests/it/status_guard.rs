//! The database keeps the status machine's word: an asset's status changes only through its
//! history, along the transition table, and the history is never rewritten
//! (`docs/product.md#only-the-status-machine-changes-a-status`).

use assetflow::cli::simulate::gateway::GatewayOptions;
use assetflow::cli::simulate::terminals::purchase;
use assetflow::domain::status::{self, Cause, Status, TransitionError, allowed};
use chrono::Utc;
use diesel::RunQueryDsl;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{Env, count, query};
use crate::support::{asset_status, delivered_certificate, request_id, settle_all};

const HISTORY: &str = "SELECT count(*) FROM asset_status_history WHERE asset_id = $1::uuid";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_a_status_change_that_does_not_come_from_the_status_module() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions { exchange_rate: 0.0, ..Default::default() });
    let order = purchase(&alice, "concert", 1, json!({}));
    env.send(&order).await;
    let certificate = delivered_certificate(&env, &request_id(&order)).await;
    let asset = certificate["asset_id"].as_str().expect("an asset id").to_string();
    // Nothing else moves the asset from here on.
    env.stop().await;

    env.db(move |c| {
        assert_eq!(asset_status(c, &asset), "awaiting_exchange");
        assert_eq!(count(c, HISTORY, &[&asset]), 1, "issued");

        // A direct update of the status is refused, even to a status the table allows.
        let direct = query("UPDATE assets SET status = 'delivered' WHERE id = $1::uuid", &[&asset]).execute(c);
        let error = direct.expect_err("a direct update is refused").to_string();
        assert!(error.contains("changes only through asset_status_history"), "{error}");

        // A history entry for an illegal move is refused, and moves nothing.
        let illegal = "INSERT INTO asset_status_history (asset_id, from_status, to_status, cause, at)
                       VALUES ($1::uuid, 'awaiting_exchange', 'expired', 'asset_expired', now())";
        let error = query(illegal, &[&asset]).execute(c).expect_err("an illegal move is refused").to_string();
        assert!(error.contains("awaiting_exchange -> expired is not a legal transition"), "{error}");

        // A move from a status the asset is not in writes nothing and moves nothing.
        let id = Uuid::parse_str(&asset).unwrap();
        let stale =
            status::transition(c, id, Status::Retransmitting, Status::Expired, Cause::AssetExpired, None, Utc::now());
        assert!(matches!(stale, Err(TransitionError::Stale { .. })), "{stale:?}");
        assert_eq!(asset_status(c, &asset), "awaiting_exchange");
        assert_eq!(count(c, HISTORY, &[&asset]), 1, "no entry for a move that did not happen");

        // The status module's move goes through, with its entry.
        status::transition(
            c,
            id,
            Status::AwaitingExchange,
            Status::Retransmitting,
            Cause::DeliveryFailed,
            None,
            Utc::now(),
        )
        .expect("a legal move from the current status");
        assert_eq!(asset_status(c, &asset), "retransmitting");
        assert_eq!(count(c, HISTORY, &[&asset]), 2);

        // The history is append-only.
        let rewrite = query("UPDATE asset_status_history SET cause = 'rewritten' WHERE asset_id = $1::uuid", &[&asset]);
        let error = rewrite.execute(c).expect_err("the history cannot be rewritten").to_string();
        assert!(error.contains("append-only"), "{error}");
        let erase = query("DELETE FROM asset_status_history WHERE asset_id = $1::uuid", &[&asset]).execute(c);
        assert!(erase.expect_err("the history cannot be erased").to_string().contains("append-only"));
        assert_eq!(count(c, HISTORY, &[&asset]), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_databases_transition_table_is_the_status_modules() {
    let env = Env::new().await;
    env.db(|c| {
        #[derive(diesel::QueryableByName)]
        struct Pair {
            #[diesel(sql_type = diesel::sql_types::Text)]
            from_status: String,
            #[diesel(sql_type = diesel::sql_types::Text)]
            to_status: String,
        }
        let mut database: Vec<(String, String)> = query("SELECT from_status, to_status FROM status_transitions", &[])
            .load::<Pair>(c)
            .unwrap()
            .into_iter()
            .map(|p| (p.from_status, p.to_status))
            .collect();
        database.sort();
        let mut module: Vec<(String, String)> = Status::ALL
            .iter()
            .flat_map(|from| Status::ALL.iter().map(move |to| (*from, *to)))
            .filter(|(from, to)| allowed(*from, *to))
            .map(|(from, to)| (from.as_str().to_string(), to.as_str().to_string()))
            .collect();
        module.sort();
        assert_eq!(database, module);
    })
    .await;
}
