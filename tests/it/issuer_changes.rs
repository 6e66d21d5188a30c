//! Issuer changes (`docs/product.md#issuer-changes`): modification notices with a deadline,
//! answered accept (a new asset replaces the old one) or refund, and the issuer's default for
//! whoever does not answer; announced by an operator or sent by the issuer itself, taken then only
//! from the product's own issuer, once.

use assetflow::cli::admin::announce_change;
use assetflow::cli::simulate::gateway::{GatewayOptions, booking_request, modification_request, submit_request};
use assetflow::cli::simulate::terminals::{SimTerminal, purchase};
use assetflow::contracts::messages::{IssuerChangeMessage, ModificationChoice, kinds};
use assetflow::domain::bookings::{Terms, save_terms};
use assetflow::domain::catalogue::PartyKind;
use assetflow::domain::issuance::modification::{Announcer, IssuerChange};
use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};

use crate::harness::{Env, ISSUER, count, execute, text};
use crate::support::{asset_status, dead_letter_reason, first_attempt, request_id, settle_all};

/// answer is `holder`'s signed answer to the notice `notice`, as its gateway relays it.
fn answer(holder: &SimTerminal, notice: &str, choice: ModificationChoice) -> Value {
    modification_request(&holder.id, notice.parse().expect("a notice id"), choice, &holder.key)
}

/// bought has `holder` buy `quantity` of `product` and waits until their certificates are
/// delivered: the assets are then held, not yet delivered, and an issuer's change reaches them.
async fn bought(env: &Env, holder: &SimTerminal, product: &str, quantity: u32) {
    let order = purchase(holder, product, quantity, json!({}));
    env.send(&order).await;
    let rid = request_id(&order);
    env.wait_until("the certificates are delivered", move |c| {
        let sql = "SELECT count(*) FROM deliveries d JOIN orders o ON o.id = d.order_id
                   WHERE o.request_id = $1 AND d.kind = 'certificate' AND d.status = 'delivered'";
        (count(c, sql, &[&rid]) == i64::from(quantity)).then_some(())
    })
    .await;
}

/// notice_of is the modification notice sent about `asset`, once it was delivered.
async fn notice_of(env: &Env, asset: &str) -> String {
    let asset = asset.to_string();
    env.wait_until("the modification notice is delivered", move |c| {
        let sql = "SELECT content->>'certificate_id' AS value FROM deliveries
                   WHERE content->>'code' = 'modification_notice' AND asset_id IS NULL
                     AND content->>'asset_id' = $1 AND status = 'delivered'";
        text(c, sql, &[&asset])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_accept_or_take_a_refund_and_the_silent_get_the_issuers_default() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    bought(&env, &alice, "concert", 3).await;
    let assets: Vec<String> = env
        .db(|c| {
            let all = text(c, "SELECT string_agg(id::text, ',' ORDER BY id) AS value FROM assets", &[]).unwrap();
            all.split(',').map(str::to_string).collect()
        })
        .await;

    let reply_by = Utc::now() + TimeDelta::hours(1);
    let change = IssuerChange {
        announcer: Announcer::Operator,
        product_id: "concert".into(),
        description: "The concert moves to December 27.".into(),
        title: None,
        tags: Some(json!({"place": "Test Hall", "date": "2026-12-27"})),
        asset_expires_at: None,
        reply_by,
        default_answer: ModificationChoice::Refund,
    };
    let deliveries = env.app.domain.deliveries.clone();
    let (_, notices) = env.db(move |c| announce_change(c, &deliveries, &change).unwrap()).await;
    assert_eq!(notices, 3, "every holder of an asset not yet delivered is told");

    // The first holder accepts: a new asset with the new date replaces the old one.
    let accepted = notice_of(&env, &assets[0]).await;
    env.send(&answer(&alice, &accepted, ModificationChoice::Accept)).await;
    // The second takes a refund.
    let refunded = notice_of(&env, &assets[1]).await;
    env.send(&answer(&alice, &refunded, ModificationChoice::Refund)).await;
    let (first, second) = (assets[0].clone(), assets[1].clone());
    env.wait_until("the answers are carried out", move |c| {
        (asset_status(c, &first) == "replaced" && asset_status(c, &second) == "refunded").then_some(())
    })
    .await;
    let first = assets[0].clone();
    env.wait_until("the replacement's certificate is delivered", move |c| {
        let sql = "SELECT count(*) FROM deliveries d JOIN assets a ON a.id = d.asset_id
                   WHERE a.replaces_asset_id = $1::uuid AND d.kind = 'certificate' AND d.status = 'delivered'";
        (count(c, sql, &[&first]) == 1).then_some(())
    })
    .await;
    let first = assets[0].clone();
    env.db(move |c| {
        let replacement = "SELECT count(*) FROM assets a JOIN asset_documents d ON d.asset_id = a.id
                           WHERE a.replaces_asset_id = $1::uuid AND a.status = 'awaiting_exchange' AND a.generation = 1
                             AND d.document::jsonb->'information'->'tags'->>'date' = '2026-12-27'";
        assert_eq!(count(c, replacement, &[&first]), 1, "one replacement, signed with the new date");
        let revoked = "SELECT count(*) FROM exchange_certificates WHERE asset_id = $1::uuid AND revoked_at IS NOT NULL";
        assert_eq!(count(c, revoked, &[&first]), 1, "the old certificate is revoked");
        let cause =
            "SELECT count(*) FROM asset_status_history WHERE asset_id = $1::uuid AND cause = 'issuer_change_accepted'";
        assert_eq!(count(c, cause, &[&first]), 1);
        // assetflow status names the replacement, and the notice with its answer.
        let shown = assetflow::cli::status::render(&assetflow::cli::status::lookup(c, &first).unwrap().expect("known"));
        assert!(shown.contains("  replaced by  asset "), "{shown}");
        assert!(shown.contains("The concert moves to December 27."), "{shown}");
        assert!(shown.contains(" by an operator, answer by "), "{shown}");
        assert!(shown.contains("answered accept by the holder (request m-"), "{shown}");
        assert!(shown.contains("outcome  replaced by asset "), "{shown}");
    })
    .await;

    // The third says nothing: at the deadline, the issuer's default (a refund) applies.
    let silent = notice_of(&env, &assets[2]).await;
    env.run_job("issuer_changes", reply_by + TimeDelta::seconds(1)).await;
    let third = assets[2].clone();
    env.wait_until("the default refund is made", move |c| (asset_status(c, &third) == "refunded").then_some(())).await;
    env.db(|c| {
        let by_default =
            "SELECT count(*) FROM modification_notices WHERE answered_by = 'default' AND answer = 'refund'";
        assert_eq!(count(c, by_default, &[]), 1);
        let refunds = "SELECT count(*) FROM refunds WHERE cause = 'issuer_change' AND status = 'refunded'";
        assert_eq!(count(c, refunds, &[]), 2);
        // A replacement is the same order's asset, not a second issue of it.
        let audit = assetflow::cli::audit::audit(c, None).expect("the audit runs");
        assert!(audit.duplicates.values().all(|n| *n == 0), "nothing done twice: {}", audit.summary());
        assert_eq!(audit.duplicates.get("issue"), Some(&0), "{}", audit.summary());
    })
    .await;
    // An answer after the deadline, or a second answer, is refused.
    let late = answer(&alice, &silent, ModificationChoice::Accept);
    env.send(&late).await;
    let again = answer(&alice, &accepted, ModificationChoice::Refund);
    env.send(&again).await;
    let ids = [request_id(&late), request_id(&again)];
    env.wait_until("both are refused", move |c| {
        let sql = "SELECT count(*) FROM refusals WHERE reason = 'modification_not_open' AND request_id IN ($1, $2)";
        (count(c, sql, &[&ids[0], &ids[1]]) == 2).then_some(())
    })
    .await;
}

/// issuer_change is an issuer's own change of `product`, as it sends it.
fn issuer_change(issuer: &str, reference: &str, product: &str) -> IssuerChangeMessage {
    IssuerChangeMessage {
        message_type: kinds::ISSUER_CHANGE.into(),
        reference: reference.into(),
        issuer_id: issuer.into(),
        sent_at: Utc::now(),
        product_id: product.into(),
        description: "The show moves to the big hall.".into(),
        title: None,
        tags: Some(json!({"place": "Big Hall"})),
        asset_expires_at: None,
        reply_by: Utc::now() + TimeDelta::hours(1),
        default_answer: ModificationChoice::Accept,
        signature: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_sends_its_own_change_once_and_nobody_else_may() {
    // Both issuers sign what they send (their keys are registered); issuer-9 is not configured.
    let mut env = Env::with(json!({"issuers": {ISSUER: {}, "issuer-2": {}}})).await;
    env.product("show", |_| {}).await;
    env.product("other", |p| p.issuer_id = "issuer-2".into()).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    bought(&env, &alice, "show", 1).await;

    let genuine = env.signed_by(PartyKind::Issuer, ISSUER, &issuer_change(ISSUER, "chg-1", "show")).await;
    let mut past = issuer_change(ISSUER, "chg-2", "show");
    past.reply_by = Utc::now() - TimeDelta::minutes(1);
    let mut expires_first = issuer_change(ISSUER, "chg-3", "show");
    expires_first.asset_expires_at = Some(expires_first.reply_by - TimeDelta::minutes(1));
    let refused = [
        (
            "a change signed by another issuer",
            env.signed_by(PartyKind::Issuer, "issuer-2", &issuer_change(ISSUER, "chg-4", "show")).await,
            "unauthenticated_party",
        ),
        (
            "an unsigned change",
            serde_json::to_vec(&issuer_change(ISSUER, "chg-5", "show")).unwrap(),
            "unauthenticated_party",
        ),
        (
            "a change from an issuer not configured",
            serde_json::to_vec(&issuer_change("issuer-9", "chg-6", "show")).unwrap(),
            "unauthenticated_party",
        ),
        (
            "another issuer changing a product not its own, in its own name",
            env.signed_by(PartyKind::Issuer, "issuer-2", &issuer_change("issuer-2", "chg-7", "show")).await,
            "unprocessable",
        ),
        ("a deadline already past", env.signed_by(PartyKind::Issuer, ISSUER, &past).await, "unprocessable"),
        (
            "assets expiring before the deadline",
            env.signed_by(PartyKind::Issuer, ISSUER, &expires_first).await,
            "unprocessable",
        ),
    ];
    for (what, body, reason) in &refused {
        env.publish(kinds::ISSUER_CHANGE, body).await;
        assert_eq!(dead_letter_reason(&env, what, body).await, *reason, "{what}");
    }
    env.db(|c| {
        assert_eq!(count(c, "SELECT count(*) FROM issuer_changes", &[]), 0, "no refused change did anything");
        assert_eq!(count(c, "SELECT count(*) FROM products WHERE tags->>'place' = 'Big Hall'", &[]), 0);
    })
    .await;

    // The issuer's own change, twice (as after a timeout), then once more after its deadline,
    // its reference unchanged: the holder is told once, and the late copy is the change already
    // taken, not an unprocessable one.
    env.publish(kinds::ISSUER_CHANGE, &genuine).await;
    env.publish(kinds::ISSUER_CHANGE, &genuine).await;
    let mut late = issuer_change(ISSUER, "chg-1", "show");
    late.reply_by = Utc::now() - TimeDelta::minutes(1);
    let late = env.signed_by(PartyKind::Issuer, ISSUER, &late).await;
    env.wait_until("the first copies are taken", |c| {
        let sql = "SELECT count(*) FROM issuer_changes WHERE reference = 'chg-1'";
        (count(c, sql, &[]) == 1).then_some(())
    })
    .await;
    env.publish(kinds::ISSUER_CHANGE, &late).await;
    let taken = refused.len() as i64 + 3;
    env.wait_until("every copy is taken", move |c| {
        let sql = "SELECT count(*) FROM inbox WHERE pool = 'issuance' AND message_type = 'issuer.change'";
        (count(c, sql, &[]) == taken).then_some(())
    })
    .await;
    let asset = env.db(|c| text(c, "SELECT id::text AS value FROM assets", &[]).expect("the asset")).await;
    let notice = notice_of(&env, &asset).await;
    env.db(move |c| {
        let taken = "SELECT count(*) FROM issuer_changes
                     WHERE announced_by = 'issuer' AND issuer_id = 'issuer-1' AND reference = 'chg-1'";
        assert_eq!(count(c, taken, &[]), 1, "the change is recorded once, with the issuer's reference");
        let dead = "SELECT count(*) FROM dead_letters";
        assert_eq!(count(c, dead, &[]), 6, "only the six refused changes are dead-lettered, not a copy");
        assert_eq!(count(c, "SELECT count(*) FROM modification_notices", &[]), 1, "one notice");
        let sent = "SELECT count(*) FROM deliveries WHERE content->>'code' = 'modification_notice'";
        assert_eq!(count(c, sent, &[]), 1, "sent once");
        let product = "SELECT count(*) FROM products WHERE id = 'show' AND tags->>'place' = 'Big Hall'";
        assert_eq!(count(c, product, &[]), 1, "the product carries the change");
        let shown =
            assetflow::cli::status::render(&assetflow::cli::status::lookup(c, &notice).unwrap().expect("known"));
        assert!(shown.contains("The show moves to the big hall."), "{shown}");
        assert!(shown.contains(" by issuer issuer-1 (its reference chg-1), answer by "), "{shown}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_issuer_changes_an_event_and_the_simulated_holders_answer() {
    // What `ops/run` shows: the issuer sends its change itself, the holders' gateway answers the
    // notices (here, every holder accepts) and each accepted asset is replaced.
    let mut env = Env::with(json!({"issuers": {ISSUER: {}}})).await;
    env.product("show", |p| p.tags = json!({"date": "12-25"})).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions { modification_silence_rate: 0.0, ..GatewayOptions::default() });
    bought(&env, &alice, "show", 2).await;
    // The first change comes at once, the next long after the test.
    env.issuer(assetflow::cli::simulate::issuer::IssuerOptions {
        every: std::time::Duration::from_secs(600),
        first_change_after: std::time::Duration::ZERO,
        ..Default::default()
    });
    env.wait_until("both holders accepted and their assets are replaced", |c| {
        let sql = "SELECT count(*) FROM modification_notices n JOIN issuer_changes i ON i.id = n.change_id
                   JOIN assets a ON a.id = n.asset_id
                   WHERE i.announced_by = 'issuer' AND n.answered_by = 'holder' AND n.answer = 'accept'
                     AND a.status = 'replaced'";
        (count(c, sql, &[]) == 2).then_some(())
    })
    .await;
    env.db(|c| {
        let moved = "SELECT count(*) FROM assets a JOIN asset_documents d ON d.asset_id = a.id
                     WHERE a.generation = 1 AND d.document::jsonb->'information'->'tags'->>'date' = 'moved 1 day(s) later'";
        assert_eq!(count(c, moved, &[]), 2, "the replacements carry the changed event");
    })
    .await;
}

/// change_of_concert is an operator's change of the product `concert`: a new date, a refund for
/// whoever does not answer within the hour.
fn change_of_concert() -> IssuerChange {
    IssuerChange {
        announcer: Announcer::Operator,
        product_id: "concert".into(),
        description: "The concert moves to December 27.".into(),
        title: None,
        tags: Some(json!({"date": "2026-12-27"})),
        asset_expires_at: None,
        reply_by: Utc::now() + TimeDelta::hours(1),
        default_answer: ModificationChoice::Refund,
    }
}

/// asset_of is the asset issued for the order `request_id`, once it is issued.
async fn asset_of(env: &Env, request_id: String) -> String {
    env.wait_until("the order's asset is issued", move |c| {
        let sql = "SELECT a.id::text AS value FROM assets a JOIN orders o ON o.id = a.order_id WHERE o.request_id = $1";
        text(c, sql, &[&request_id])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_placed_before_a_change_and_issued_after_it_is_told_and_may_be_kept_or_refunded() {
    let mut env = Env::new().await;
    env.product("concert", |p| p.tags = json!({"date": "2026-12-20"})).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.gateway(GatewayOptions::default());
    // No partner yet: the two orders wait for their payment while the event changes.
    let orders = [purchase(&alice, "concert", 1, json!({})), purchase(&alice, "concert", 1, json!({}))];
    for order in &orders {
        env.send(order).await;
    }
    let placed = [request_id(&orders[0]), request_id(&orders[1])];
    env.wait_until("both orders are placed", move |c| {
        let sql = "SELECT count(*) FROM orders WHERE request_id IN ($1, $2) AND status = 'settling'";
        (count(c, sql, &[&placed[0], &placed[1]]) == 2).then_some(())
    })
    .await;
    let deliveries = env.app.domain.deliveries.clone();
    let (_, notices) = env.db(move |c| announce_change(c, &deliveries, &change_of_concert()).unwrap()).await;
    assert_eq!(notices, 0, "no asset yet");

    // The payments settle: the assets are issued with the new date, and their holder is told.
    env.partner(settle_all());
    let kept = asset_of(&env, request_id(&orders[0])).await;
    let refunded = asset_of(&env, request_id(&orders[1])).await;
    let (to_keep, to_refund) = (notice_of(&env, &kept).await, notice_of(&env, &refunded).await);
    let (k, n) = (kept.clone(), to_keep.clone());
    env.db(move |c| {
        let dated = "SELECT count(*) FROM asset_documents
                     WHERE asset_id = $1::uuid AND document::jsonb->'information'->'tags'->>'date' = '2026-12-27'";
        assert_eq!(count(c, dated, &[&k]), 1, "issued after the change, with it");
        let after = "SELECT count(*) FROM modification_notices WHERE id = $1::uuid AND issued_after_change";
        assert_eq!(count(c, after, &[&n]), 1);
        let said = "SELECT content->>'text' AS value FROM deliveries WHERE content->>'certificate_id' = $1";
        let said = text(c, said, &[&n]).expect("the notice was sent");
        assert!(said.contains("placed before this change") && said.contains("accept (keep this asset)"), "{said}");
    })
    .await;

    // Accepting keeps the asset as it is; a refund refunds it.
    env.send(&answer(&alice, &to_keep, ModificationChoice::Accept)).await;
    env.send(&answer(&alice, &to_refund, ModificationChoice::Refund)).await;
    let (k, r) = (kept.clone(), refunded.clone());
    env.wait_until("the refund is made", move |c| (asset_status(c, &r) == "refunded").then_some(())).await;
    let n = to_keep.clone();
    env.wait_until("the acceptance is recorded", move |c| {
        let sql = "SELECT outcome AS value FROM modification_notices WHERE id = $1::uuid AND answer = 'accept'";
        text(c, sql, &[&n])
    })
    .await;
    let n = to_keep.clone();
    env.db(move |c| {
        let outcome = text(c, "SELECT outcome AS value FROM modification_notices WHERE id = $1::uuid", &[&n]);
        assert_eq!(outcome.as_deref(), Some("kept: the asset was issued after the change and carries it"));
        assert_ne!(asset_status(c, &k), "replaced", "nothing replaces it");
        let shown = assetflow::cli::status::render(&assetflow::cli::status::lookup(c, &k).unwrap().expect("known"));
        assert!(shown.contains("given at issue: the order was placed before the change"), "{shown}");
        assert!(shown.contains("outcome  kept: the asset was issued after the change and carries it"), "{shown}");
        assert_eq!(count(c, "SELECT count(*) FROM assets WHERE generation > 0", &[]), 0, "no replacement issued");
    })
    .await;

    // An order placed after the change is issued with it, and no notice.
    let later = purchase(&alice, "concert", 1, json!({}));
    env.send(&later).await;
    let asset = asset_of(&env, request_id(&later)).await;
    env.db(move |c| {
        let notices = "SELECT count(*) FROM modification_notices WHERE asset_id = $1::uuid";
        assert_eq!(count(c, notices, &[&asset]), 0, "the notice would have been written with the asset");
        assert_eq!(count(c, "SELECT count(*) FROM modification_notices", &[]), 2);
        let audit = assetflow::cli::audit::audit(c, None).expect("the audit runs");
        assert_eq!(audit.open.get(UNTOLD), Some(&0), "{}", audit.summary());
        assert_eq!(audit.duplicated, 0, "{}", audit.summary());
        // The audit finds an asset issued after the change without its notice.
        execute(c, "DELETE FROM modification_notices WHERE id = $1::uuid", &[&to_keep]);
        let audit = assetflow::cli::audit::audit(c, None).expect("the audit runs");
        assert_eq!(audit.open.get(UNTOLD), Some(&1), "{}", audit.summary());
    })
    .await;
}

/// UNTOLD is the audit's check that every asset issued after a change, for an order placed before
/// it, has its notice.
const UNTOLD: &str = "assets_issued_after_a_change_untold";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookings_not_yet_submitted_are_told_of_a_change_and_nothing_is_charged() {
    let mut env = Env::new().await;
    // A lottery of one place: its winner may submit, and the other applicant waits on its list.
    let draw_at = Utc::now() + TimeDelta::hours(1);
    env.product("concert", |_| {}).await;
    let terms = Terms {
        product_id: "concert".into(),
        condition: "lottery".into(),
        places: Some(1),
        decided_at: Some(draw_at),
        window_secs: 3_600,
    };
    env.db(move |c| save_terms(c, &terms).unwrap()).await;
    let holders =
        [env.terminal("alice", "gw-1", Some("card-co")).await, env.terminal("bob", "gw-1", Some("card-co")).await];
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    for holder in &holders {
        let booking = booking_request(&holder.id, "concert", &holder.key);
        env.send(&booking).await;
        let rid = request_id(&booking);
        env.wait_until("the receipt certificate is delivered", move |c| {
            let sql = "SELECT count(*) FROM deliveries
                       WHERE request_id = $1 AND kind = 'receipt_certificate' AND status = 'delivered'";
            (count(c, sql, &[&rid]) == 1).then_some(())
        })
        .await;
    }
    env.run_job("bookings", draw_at + TimeDelta::seconds(1)).await;
    env.wait_until("the lottery is drawn", |c| {
        let sql = "SELECT string_agg(status, ',' ORDER BY status) AS value FROM receipt_certificates";
        (text(c, sql, &[]).as_deref() == Some("lost,open")).then_some(())
    })
    .await;

    let deliveries = env.app.domain.deliveries.clone();
    let (_, notices) = env.db(move |c| announce_change(c, &deliveries, &change_of_concert()).unwrap()).await;
    assert_eq!(notices, 0, "a booking has no asset to answer for");
    env.wait_until("the winner and the waiting list are told", |c| {
        let sql =
            "SELECT count(*) FROM deliveries d JOIN receipt_certificates r ON r.id::text = d.content->>'certificate_id'
                   WHERE d.content->>'code' = 'booking_modified' AND d.terminal_id = r.holder_terminal_id
                     AND d.status = 'delivered'
                     AND d.content->>'text' LIKE 'The concert moves to December 27.%nothing has been charged%'";
        (count(c, sql, &[]) == 2).then_some(())
    })
    .await;
    env.db(|c| assert_eq!(count(c, "SELECT count(*) FROM settlements", &[]), 0, "nothing charged")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asset_bought_with_a_receipt_certificate_and_replaced_on_a_change_is_no_second_purchase() {
    let mut env = Env::new().await;
    env.product("concert", |_| {}).await;
    let terms = Terms {
        product_id: "concert".into(),
        condition: "hold".into(),
        places: None,
        decided_at: None,
        window_secs: 3_600,
    };
    env.db(move |c| save_terms(c, &terms).unwrap()).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    // No gateway: the test takes the receipt certificate from its delivery, and nothing is
    // acknowledged, so that the asset it buys is still held when the event changes.
    let booking = booking_request(&alice.id, "concert", &alice.key);
    env.send(&booking).await;
    let rid = request_id(&booking);
    let certificate = env
        .wait_until("the receipt certificate is sent", move |c| {
            let sql = "SELECT content->>'receipt_certificate' AS value FROM deliveries
                       WHERE request_id = $1 AND kind = 'receipt_certificate'";
            text(c, sql, &[&rid])
        })
        .await;
    let certificate: Value = serde_json::from_str(&certificate).unwrap();
    let submit = submit_request("alice", certificate.clone(), &alice.key);
    env.send(&submit).await;
    let first = first_attempt(&env, &request_id(&submit)).await;
    // Its transmission times out: the asset is no longer in transit, and may be replaced.
    env.run_job("retransmission", first.sent_at + TimeDelta::seconds(61)).await;

    let deliveries = env.app.domain.deliveries.clone();
    let (_, notices) = env.db(move |c| announce_change(c, &deliveries, &change_of_concert()).unwrap()).await;
    assert_eq!(notices, 1);
    let asset = first.asset.clone();
    let notice = env
        .db(move |c| text(c, "SELECT id::text AS value FROM modification_notices WHERE asset_id = $1::uuid", &[&asset]))
        .await
        .expect("the bought asset is told");
    env.send(&answer(&alice, &notice, ModificationChoice::Accept)).await;
    let asset = first.asset.clone();
    env.wait_until("the asset is replaced", move |c| (asset_status(c, &asset) == "replaced").then_some(())).await;
    env.db(|c| {
        let audit = assetflow::cli::audit::audit(c, None).expect("the audit runs");
        assert_eq!(audit.duplicates.get("receipt_certificate_issue"), Some(&0), "{}", audit.summary());
        assert_eq!(audit.duplicated, 0, "a replacement is the same purchase: {}", audit.summary());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_waits_for_the_issues_of_its_product_under_way_and_takes_effect_after_them() {
    use assetflow::domain::issuance::modification::hold_products;
    use diesel::Connection;
    let env = Env::new().await;
    env.product("concert", |_| {}).await;
    let db = env.app.scheduler.db.clone();
    // An issue of the product under way holds it, as the issuance pool does before it reads it.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let issue = std::thread::spawn(move || {
        let mut conn = db.get().expect("a connection");
        conn.transaction(|c| {
            hold_products(c, &["concert"])?;
            held_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            // Before the commit that lets the change go on.
            Ok::<_, diesel::result::Error>(Utc::now())
        })
        .unwrap()
    });
    held_rx.recv().unwrap();
    let (deliveries, change) = (env.app.domain.deliveries.clone(), change_of_concert());
    let db = env.app.scheduler.db.clone();
    let announcing = std::thread::spawn(move || {
        let mut conn = db.get().expect("a connection");
        announce_change(&mut conn, &deliveries, &change).unwrap()
    });
    env.wait_until("the change waits for the issue", |c| {
        let sql = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
        (count(c, sql, &[]) == 1).then_some(())
    })
    .await;
    release_tx.send(()).unwrap();
    let issued_by = issue.join().unwrap();
    let (id, _) = announcing.join().unwrap();
    env.db(move |c| {
        let id = id.to_string();
        let sql = "SELECT count(*) FROM issuer_changes WHERE id = $1::uuid AND created_at >= $2::timestamptz";
        assert_eq!(count(c, sql, &[&id, &issued_by.to_rfc3339()]), 1, "it takes effect once the issue is in");
    })
    .await;
}
