//! Every transmission is re-checked before each attempt (`docs/product.md#validity-is-checked-first`):
//! a certificate, a reminder or a download request is sent again only while its certificate is
//! open and its asset still awaits exchange.

use assetflow::cli::simulate::terminals::purchase;
use chrono::TimeDelta;
use serde_json::json;

use crate::harness::{Env, text};
use crate::support::{delivery_state, request_id, settle_all, timestamp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_certificate_delivery_is_not_sent_again_once_its_certificate_is_revoked() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    // No gateway: the certificate's first attempt goes unanswered.
    let order = purchase(&alice, "concert", 1, json!({}));
    let rid = request_id(&order);
    env.send(&order).await;
    let sql = "SELECT d.id::text AS value FROM deliveries d JOIN orders o ON o.id = d.order_id
               WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'sent' AND d.attempts = 1";
    let delivery = env.wait_until("the certificate's first attempt is sent", move |c| text(c, sql, &[&rid])).await;
    let id = delivery.clone();
    let (sent_at, expires_at) = env
        .db(move |c| {
            let sent = "SELECT sent_at AS value FROM delivery_attempts WHERE delivery_id = $1::uuid AND attempt = 1";
            let expiry = "SELECT c.expires_at AS value FROM exchange_certificates c
                          JOIN deliveries d ON d.asset_id = c.asset_id WHERE d.id = $1::uuid";
            (timestamp(c, sent, &[&id]).expect("attempt 1"), timestamp(c, expiry, &[&id]).expect("a certificate"))
        })
        .await;

    // Attempt 1 times out and waits for its retry.
    let timed_out = env.run_job("retransmission", sent_at + TimeDelta::seconds(61)).await;
    assert_eq!(timed_out.rows_scanned, 1, "{timed_out:?}");
    let id = delivery.clone();
    assert_eq!(env.db(move |c| delivery_state(c, &id).status).await, "failed");

    // The certificate goes past due before the retry: it is revoked.
    let past_due = env.run_job("past_due", expires_at + TimeDelta::minutes(1)).await;
    assert_eq!(past_due.rows_scanned, 1, "{past_due:?}");

    // The retry finds the certificate closed: the delivery is cancelled, not sent a second time.
    let retry = env.run_job("retransmission", expires_at + TimeDelta::hours(1)).await;
    assert_eq!(retry.enqueued, 0, "{retry:?}");
    let id = delivery.clone();
    env.db(move |c| {
        let state = delivery_state(c, &id);
        assert_eq!((state.status.as_str(), state.attempts), ("cancelled", 1), "{state:?}");
        assert!(state.last_error.as_deref().is_some_and(|e| e.contains("certificate is closed")), "{state:?}");
    })
    .await;
    env.stop().await;
}
