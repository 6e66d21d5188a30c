//! Fixed SQL through `db::prepared` is prepared once per connection, where `diesel::sql_query`
//! is parsed and planned at every execution.

use assetflow::runtime::db::prepared;
use diesel::prelude::*;
use diesel::sql_types::BigInt;

use crate::harness::{Env, count};

#[derive(QueryableByName, Debug, PartialEq)]
struct Sums {
    #[diesel(sql_type = BigInt)]
    sum: i64,
    #[diesel(sql_type = BigInt)]
    first: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_statement_is_prepared_once_and_binds_each_placeholder_to_its_value() {
    let env = Env::new().await;
    env.db(|c| {
        // The same text run twice with other values; $a is written twice and bound twice, and the
        // values are bound by name, in any order.
        let sql = "SELECT $a::int8 + $b::int8 AS sum, $a::int8 AS first";
        for (a, b) in [(2, 3), (10, 20)] {
            let sums: Sums = prepared(sql).bind::<BigInt, _>("b", b).bind::<BigInt, _>("a", a).get_result(c).unwrap();
            assert_eq!(sums, Sums { sum: a + b, first: a });
        }
        assert_eq!(
            count(
                c,
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT $1::int8 + $2::int8 AS sum%'",
                &[]
            ),
            1,
            "prepared once on this connection, and used again"
        );

        // diesel's own sql_query is never prepared: the reason `prepared` exists.
        let plain: Sums = diesel::sql_query("SELECT $1::int8 - $2::int8 AS sum, $1::int8 AS first")
            .bind::<BigInt, _>(5)
            .bind::<BigInt, _>(1)
            .get_result(c)
            .unwrap();
        assert_eq!(plain, Sums { sum: 4, first: 5 });
        assert_eq!(
            count(c, "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT $1::int8 - %'", &[]),
            0
        );

        // A parameter with no value is an error, not a panic or a query with a hole.
        let missing =
            prepared("SELECT $b::int8 AS sum, $a::int8 AS first").bind::<BigInt, _>("a", 1).get_result::<Sums>(c);
        let error = missing.expect_err("$b has no value").to_string();
        assert!(error.contains("$b has no bound value"), "{error}");
    })
    .await;
}
