//! Receipt certificates (`docs/product.md#receipt-certificates`): booking, submission, the
//! conditions (hold, lottery, threshold), and expiry racing a submission.

use assetflow::cli::simulate::gateway::{GatewayOptions, booking_request, submit_request};
use assetflow::cli::simulate::terminals::SimTerminal;
use assetflow::contracts::messages::SettlementOutcome;
use assetflow::domain::bookings::{Terms, save_terms};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

use crate::harness::{Env, count, execute, text};
use crate::support::{answer_settlement, request_id, settle_all, timestamp};

/// sold_by_booking makes product `id` (a ticket) sold by booking under `condition`.
async fn sold_by_booking(env: &Env, id: &str, condition: &str, places: Option<i32>, decided_at: Option<DateTime<Utc>>) {
    env.product(id, |_| {}).await;
    let terms = Terms { product_id: id.into(), condition: condition.into(), places, decided_at, window_secs: 3_600 };
    env.db(move |c| save_terms(c, &terms).unwrap()).await;
}

/// booked books `product` for `holder` and waits for its receipt certificate to be delivered.
async fn booked(env: &Env, holder: &SimTerminal, product: &str) -> Value {
    let booking = booking_request(&holder.id, product, &holder.key);
    env.send(&booking).await;
    let id = request_id(&booking);
    let text = env
        .wait_until("the receipt certificate is delivered", move |c| {
            let sql = "SELECT content->>'receipt_certificate' AS value FROM deliveries
                       WHERE request_id = $1 AND kind = 'receipt_certificate' AND status = 'delivered'";
            text(c, sql, &[&id])
        })
        .await;
    serde_json::from_str(&text).expect("a JSON receipt certificate")
}

fn id_of(certificate: &Value) -> String {
    certificate["receipt_certificate_id"].as_str().expect("an id").to_string()
}

fn status_of(c: &mut diesel::PgConnection, certificate: &str) -> String {
    text(c, "SELECT status AS value FROM receipt_certificates WHERE id = $1::uuid", &[&certificate]).expect("stored")
}

async fn refusal(env: &Env, request: &Value) -> String {
    let id = request_id(request);
    env.wait_until("the request is refused", move |c| {
        text(c, "SELECT reason AS value FROM refusals WHERE request_id = $1", &[&id])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_booking_charges_nothing_until_it_is_submitted_then_issues_the_reserved_asset() {
    let mut env = Env::new().await;
    sold_by_booking(&env, "seat", "hold", None, None).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());

    let certificate = booked(&env, &alice, "seat").await;
    // Signed twice: the provider over the whole, the issuer over the asset part.
    assetflow::crypto::verify_document(&env.app.keys.provider().unwrap().key, &certificate).expect("genuine");
    assert_eq!(certificate["condition"]["kind"], "hold");
    assert!(certificate["asset"]["issuer_signature"].is_string());
    env.db(|c| assert_eq!(count(c, "SELECT count(*) FROM settlements", &[]), 0, "booking charges nothing")).await;

    let submit = submit_request("alice", certificate.clone(), &alice.key);
    env.send(&submit).await;
    let reserved = certificate["asset"]["asset_id"].as_str().unwrap().to_string();
    let r = reserved.clone();
    env.wait_until("the reserved asset is delivered", move |c| {
        let sql = "SELECT count(*) FROM assets WHERE id = $1::uuid AND status = 'delivered'";
        (count(c, sql, &[&r]) == 1).then_some(())
    })
    .await;
    let id = id_of(&certificate);
    env.db(move |c| {
        assert_eq!(status_of(c, &id), "issued");
        let paid =
            "SELECT count(*) FROM settlements WHERE kind = 'purchase' AND status = 'settled' AND amount_minor = 1000";
        assert_eq!(count(c, paid, &[]), 1, "settled once, at the product's price");
    })
    .await;
    // `assetflow status` finds the receipt certificate by its id and by its booking, and shows it
    // with the asset it bought.
    let (id, asset) = (id_of(&certificate), reserved.clone());
    let (by_id, by_booking, by_asset) = env
        .db(move |c| {
            let show = |c: &mut diesel::PgConnection, id: &str| {
                assetflow::cli::status::render(&assetflow::cli::status::lookup(c, id).unwrap().expect("known"))
            };
            let booking =
                text(c, "SELECT request_id AS value FROM receipt_certificates WHERE id = $1::uuid", &[&id]).unwrap();
            (show(c, &id), show(c, &booking), show(c, &asset))
        })
        .await;
    let id = id_of(&certificate);
    assert_eq!(by_booking, by_id, "a booking's request id shows the receipt certificate it issued");
    assert!(by_id.starts_with(&format!("receipt certificate {id}  hold seat held by alice")), "{by_id}");
    assert!(by_id.contains("  status       issued\n") && by_id.contains("  submit by    "), "{by_id}");
    assert!(by_id.contains(&format!("  asset        {reserved} (reserved)")), "{by_id}");
    assert!(by_id.contains("  order        ") && by_id.contains("receipt_certificate to alice"), "{by_id}");
    assert!(by_asset.contains(&format!("bought with  receipt certificate {id} (hold, issued)")), "{by_asset}");
    // Submitted before: no second purchase.
    let again = submit_request("alice", certificate, &alice.key);
    env.send(&again).await;
    assert_eq!(refusal(&env, &again).await, "certificate_already_exchanged");
}

/// instructed_for waits for the purchase settlement of the order placed by `request_id`, instructed
/// and not yet answered.
async fn instructed_for(env: &Env, request_id: String) -> String {
    env.wait_until("the submission's payment is instructed", move |c| {
        let sql = "SELECT s.id::text AS value FROM settlements s JOIN orders o ON o.id = s.order_id
                   WHERE o.request_id = $1 AND s.kind = 'purchase' AND s.status = 'instructed'";
        text(c, sql, &[&request_id])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_whose_payment_was_declined_is_submitted_again_and_bought_then() {
    let mut env = Env::new().await;
    sold_by_booking(&env, "seat", "hold", None, None).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    // No partner simulator: the test answers each payment itself.
    env.gateway(GatewayOptions::default());
    let certificate = booked(&env, &alice, "seat").await;
    let id = id_of(&certificate);

    let first = submit_request("alice", certificate.clone(), &alice.key);
    env.send(&first).await;
    let declined = instructed_for(&env, request_id(&first)).await;
    answer_settlement(&env, &declined, SettlementOutcome::Declined).await;
    let reopened = id.clone();
    env.wait_until("the certificate is open again", move |c| {
        let sql = "SELECT count(*) FROM receipt_certificates
                   WHERE id = $1::uuid AND status = 'open' AND status_reason = 'payment_declined'";
        (count(c, sql, &[&reopened]) == 1).then_some(())
    })
    .await;

    // The right to buy still stands: submitted again, it is bought with the reserved asset.
    let second = submit_request("alice", certificate.clone(), &alice.key);
    env.send(&second).await;
    let settled = instructed_for(&env, request_id(&second)).await;
    answer_settlement(&env, &settled, SettlementOutcome::Settled).await;
    let reserved = certificate["asset"]["asset_id"].as_str().unwrap().to_string();
    let r = reserved.clone();
    env.wait_until("the reserved asset is delivered", move |c| {
        (count(c, "SELECT count(*) FROM assets WHERE id = $1::uuid AND status = 'delivered'", &[&r]) == 1).then_some(())
    })
    .await;
    env.db(move |c| {
        assert_eq!(status_of(c, &id), "issued");
        let orders = "SELECT string_agg(status, ',' ORDER BY created_at) AS value FROM orders WHERE reserved_asset_id = $1::uuid";
        assert_eq!(text(c, orders, &[&reserved]).as_deref(), Some("declined,issued"), "two orders, one paid");
        assert_eq!(count(c, "SELECT count(*) FROM dead_letters", &[]), 0, "nothing dead-lettered");
        let audit = assetflow::cli::audit::audit(c, None).expect("the audit runs");
        assert!(audit.problems().is_empty(), "{}", audit.summary());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_settles_after_its_certificate_was_revoked_is_refunded_never_issued() {
    let mut env = Env::new().await;
    sold_by_booking(&env, "seat", "hold", None, None).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.gateway(GatewayOptions::default());
    // No partner yet: the submission's payment stays on its way.
    let certificate = booked(&env, &alice, "seat").await;
    env.send(&submit_request("alice", certificate.clone(), &alice.key)).await;
    let id = id_of(&certificate);
    let i = id.clone();
    env.wait_until("the certificate is submitted", move |c| (status_of(c, &i) == "submitted").then_some(())).await;

    let expires_at: DateTime<Utc> = certificate["expires_at"].as_str().unwrap().parse().unwrap();
    let run = env.run_job("bookings", expires_at + TimeDelta::seconds(1)).await;
    assert_eq!(run.rows_scanned, 1, "{run:?}");
    let i = id.clone();
    env.db(move |c| assert_eq!(status_of(c, &i), "revoked")).await;

    // Now the partner answers the instruction still queued: settled, after the revocation.
    env.partner(settle_all());
    env.wait_until("the late payment is refunded", |c| {
        let sql = "SELECT count(*) FROM refunds WHERE cause = 'late_settlement' AND status = 'refunded' AND amount_minor = 1000";
        (count(c, sql, &[]) == 1).then_some(())
    })
    .await;
    let reserved = certificate["asset"]["asset_id"].as_str().unwrap().to_string();
    env.db(move |c| {
        assert_eq!(count(c, "SELECT count(*) FROM assets", &[]), 0, "nothing is issued");
        let failed =
            "SELECT count(*) FROM orders WHERE status = 'failed' AND status_reason = 'receipt_certificate_revoked'";
        assert_eq!(count(c, failed, &[]), 1);
        let asked =
            "SELECT count(*) FROM deliveries WHERE kind = 'revocation_request' AND dedupe_key = 'revoke:' || $1";
        assert_eq!(count(c, asked, &[&id]), 1, "the holder is asked to delete the certificate");
        let told = "SELECT count(*) FROM deliveries WHERE content->>'code' = 'payment_refunded'";
        assert_eq!(count(c, told, &[]), 1);
        let _ = reserved;
        // `assetflow status` shows the order with the certificate that placed it and its refund.
        let order = text(c, "SELECT order_id::text AS value FROM receipt_certificates WHERE id = $1::uuid", &[&id]);
        let view = assetflow::cli::status::lookup(c, &order.unwrap()).unwrap().expect("the order is known");
        let shown = assetflow::cli::status::render(&view);
        assert!(
            shown.contains(&format!("placed by   submitting receipt certificate {id} (hold, revoked: expired)")),
            "{shown}"
        );
        assert!(shown.contains("refunded 1000 JPY (minor units, cause late_settlement) via card-co"), "{shown}");
        assert!(shown.contains("of the whole payment"), "{shown}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lottery_redrawn_from_its_published_seed_gives_the_same_winners_and_a_lapsed_place_passes_on() {
    let mut env = Env::new().await;
    let draw_at = Utc::now() + TimeDelta::hours(1);
    sold_by_booking(&env, "raffle", "lottery", Some(2), Some(draw_at)).await;
    let mut applicants = Vec::new();
    for i in 0..5 {
        applicants.push(env.terminal(&format!("t{i}"), "gw-1", Some("card-co")).await);
    }
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    for t in &applicants {
        let certificate = booked(&env, t, "raffle").await;
        assert_eq!(certificate["condition"]["places"], 2);
    }
    // Not drawn yet: a submission is refused.
    env.run_job("bookings", draw_at + TimeDelta::seconds(1)).await;
    let draw = env
        .wait_until("the lottery is drawn", |c| {
            text(
                c,
                "SELECT draw AS value FROM booking_decisions WHERE product_id = 'raffle' AND outcome = 'drawn'",
                &[],
            )
        })
        .await;
    let draw: Value = serde_json::from_str(&draw).unwrap();
    // Anyone can check the draw: signed by the provider, and ranked from the seed alone.
    assetflow::crypto::verify_document(&env.app.keys.provider().unwrap().key, &draw).expect("a signed draw");
    let seed = draw["seed"].as_str().unwrap();
    let mut ranked: Vec<(String, String)> = draw["applicants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| {
            let id = id.as_str().unwrap().to_string();
            let digest = openssl::sha::sha256(format!("{seed}:{id}").as_bytes());
            (digest.iter().map(|b| format!("{b:02x}")).collect(), id)
        })
        .collect();
    ranked.sort();
    assert_eq!(ranked.len(), 5);
    let expected: Vec<String> = ranked.iter().map(|(_, id)| id.clone()).collect();
    let winners = env
        .db(|c| {
            let sql = "SELECT string_agg(id::text, ',' ORDER BY rank) AS value FROM receipt_certificates WHERE status = 'open'";
            text(c, sql, &[]).unwrap()
        })
        .await;
    assert_eq!(winners, expected[..2].join(","), "the same winners, in the same order");
    env.db(|c| {
        let told = "SELECT count(*) FROM deliveries WHERE content->>'code' = 'lottery_lost'";
        assert_eq!(count(c, told, &[]), 3, "the others are told");
    })
    .await;

    // Neither winner submits in time: their places pass to the next two, without an operator.
    let submit_by = env
        .db(|c| {
            timestamp(c, "SELECT max(submit_by) AS value FROM receipt_certificates WHERE status = 'open'", &[]).unwrap()
        })
        .await;
    let run = env.run_job("bookings", submit_by + TimeDelta::seconds(1)).await;
    assert!(run.rows_scanned >= 2, "{run:?}");
    let next = expected[2..4].join(",");
    env.db(move |c| {
        let sql =
            "SELECT string_agg(id::text, ',' ORDER BY rank) AS value FROM receipt_certificates WHERE status = 'open'";
        assert_eq!(text(c, sql, &[]).unwrap(), next, "the waiting list, in the draw's order");
        let lapsed = "SELECT count(*) FROM receipt_certificates WHERE status = 'revoked' AND status_reason = 'lapsed'";
        assert_eq!(count(c, lapsed, &[]), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_sale_that_fails_tells_every_applicant_and_charges_nobody() {
    let mut env = Env::new().await;
    let close_at = Utc::now() + TimeDelta::hours(1);
    sold_by_booking(&env, "tour", "threshold", Some(3), Some(close_at)).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    let bob = env.terminal("bob", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let certificate = booked(&env, &alice, "tour").await;
    booked(&env, &bob, "tour").await;
    let early = submit_request("alice", certificate.clone(), &alice.key);
    env.send(&early).await;
    assert_eq!(refusal(&env, &early).await, "condition_not_met");

    env.run_job("bookings", close_at + TimeDelta::seconds(1)).await;
    env.wait_until("the sale is closed", |c| {
        text(c, "SELECT outcome AS value FROM booking_decisions WHERE product_id = 'tour'", &[])
    })
    .await;
    env.wait_until("every applicant is told", |c| {
        let told =
            "SELECT count(*) FROM deliveries WHERE content->>'code' = 'threshold_not_met' AND status = 'delivered'";
        (count(c, told, &[]) == 2).then_some(())
    })
    .await;
    let late = submit_request("alice", certificate, &alice.key);
    env.send(&late).await;
    assert_eq!(refusal(&env, &late).await, "condition_not_met");
    env.db(|c| {
        assert_eq!(text(c, "SELECT outcome AS value FROM booking_decisions", &[]).as_deref(), Some("failed"));
        assert_eq!(count(c, "SELECT count(*) FROM receipt_certificates WHERE status = 'lost'", &[]), 2);
        assert_eq!(count(c, "SELECT count(*) FROM settlements", &[]), 0, "nobody is charged");
        assert_eq!(count(c, "SELECT count(*) FROM orders", &[]), 0);
    })
    .await;
}

/// A submission and the expiry scan at the same instant, in two processes: the submissions are
/// handled by the test's assetflow, the scan is `assetflow batch run bookings` in a process of its
/// own. Each certificate ends in exactly one outcome, issued or revoked (and then refunded if its
/// payment settled), never both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_racing_the_expiry_ends_in_exactly_one_outcome() {
    let mut env = Env::new().await;
    sold_by_booking(&env, "seat", "hold", None, None).await;
    let mut holders = Vec::new();
    for i in 0..6 {
        holders.push(env.terminal(&format!("h{i}"), "gw-1", Some("card-co")).await);
    }
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let mut certificates = Vec::new();
    for h in &holders {
        certificates.push(booked(&env, h, "seat").await);
    }
    // Every certificate's stored expiry is moved to the same instant, a moment ahead; what a
    // submission checks is the stored row.
    let instant = Utc::now() + TimeDelta::milliseconds(400);
    let at = instant.to_rfc3339();
    env.db(move |c| {
        execute(c, "UPDATE receipt_certificates SET expires_at = $1::timestamptz, submit_by = $1::timestamptz", &[&at]);
    })
    .await;
    let submissions: Vec<Value> =
        holders.iter().zip(&certificates).map(|(h, c)| submit_request(&h.id, c.clone(), &h.key)).collect();
    // The other process, started now so that it is connected by the instant; and the submissions,
    // aimed at the instant: the race is the point, though which side wins is not.
    let config = crate::processes::cluster(&env).join("assetflow.toml");
    let scan = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_assetflow"))
            .args(["--config", config.to_str().unwrap(), "batch", "run", "bookings"])
            .args(["--as-of", &instant.to_rfc3339(), "--allow-future"])
            .output()
    });
    let send_all = async {
        tokio::time::sleep_until(tokio::time::Instant::now() + std::time::Duration::from_millis(350)).await;
        for s in &submissions {
            env.send(s).await;
        }
    };
    let (scan, ()) = tokio::join!(scan, send_all);
    let scan = scan.unwrap().expect("assetflow batch run starts");
    assert!(scan.status.success(), "the scan's process: {}", String::from_utf8_lossy(&scan.stderr));
    // Every submission is answered (accepted, or refused as too late or revoked) before a later
    // run revokes whatever the first one did not reach and no submission took.
    let ids: Vec<String> = submissions.iter().map(request_id).collect();
    env.wait_until("every submission is answered", move |c| {
        let answered = "SELECT count(*) FROM terminal_requests WHERE request_id = ANY(string_to_array($1, ','))";
        (count(c, answered, &[&ids.join(",")]) == 6).then_some(())
    })
    .await;
    env.run_job("bookings", instant + TimeDelta::seconds(1)).await;
    for (h, certificate) in holders.iter().zip(&certificates) {
        let (id, asset, holder) =
            (id_of(certificate), certificate["asset"]["asset_id"].as_str().unwrap().to_string(), h.id.clone());
        let settled_or_revoked = env
            .wait_until("the certificate ends in one outcome", move |c| {
                let status = status_of(c, &id);
                let issued = count(c, "SELECT count(*) FROM assets WHERE id = $1::uuid", &[&asset]);
                let revocation = count(c, "SELECT count(*) FROM deliveries WHERE dedupe_key = 'revoke:' || $1", &[&id]);
                let open_payment = count(
                    c,
                    "SELECT count(*) FROM settlements s JOIN receipt_certificates r ON r.order_id = s.order_id
                     WHERE r.id = $1::uuid AND s.kind = 'purchase' AND s.status = 'instructed'",
                    &[&id],
                );
                let refunded = count(
                    c,
                    "SELECT count(*) FROM refunds f JOIN receipt_certificates r ON r.order_id = f.order_id
                     WHERE r.id = $1::uuid AND f.status = 'refunded'",
                    &[&id],
                );
                let settled = count(
                    c,
                    "SELECT count(*) FROM settlements s JOIN receipt_certificates r ON r.order_id = s.order_id
                     WHERE r.id = $1::uuid AND s.kind = 'purchase' AND s.status = 'settled'",
                    &[&id],
                );
                match status.as_str() {
                    "issued" if issued == 1 => Some((status, issued, revocation, refunded)),
                    // Revoked: whatever was paid has come back.
                    "revoked" if open_payment == 0 && refunded == settled => {
                        Some((status, issued, revocation, refunded))
                    }
                    _ => None,
                }
            })
            .await;
        match settled_or_revoked {
            (s, 1, 0, 0) if s == "issued" => {}
            (s, 0, 1, _) if s == "revoked" => {}
            other => panic!("{holder}'s certificate ended in more or less than one outcome: {other:?}"),
        }
    }
    // A revoked certificate whose payment settled was refunded in full: the money adds up.
    env.db(|c| {
        let unbalanced = "SELECT count(*) FROM receipt_certificates r JOIN settlements s ON s.order_id = r.order_id
                          AND s.kind = 'purchase' AND s.status = 'settled'
                          WHERE r.status = 'revoked'
                            AND NOT EXISTS (SELECT 1 FROM refunds f WHERE f.order_id = r.order_id AND f.status = 'refunded')";
        assert_eq!(count(c, unbalanced, &[]), 0);
    })
    .await;
}

/// The audit checks receipt certificates: a certificate issued with its asset passes, and one left
/// `submitted` after its order was issued, or revoked with its asset issued, is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_reports_a_receipt_certificate_left_submitted_or_revoked_after_its_asset_was_issued() {
    let mut env = Env::new().await;
    sold_by_booking(&env, "seat", "hold", None, None).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let certificate = booked(&env, &alice, "seat").await;
    env.send(&submit_request("alice", certificate.clone(), &alice.key)).await;
    let id = id_of(&certificate);
    let reserved = certificate["asset"]["asset_id"].as_str().unwrap().to_string();
    env.wait_until("the reserved asset is delivered", move |c| {
        (count(c, "SELECT count(*) FROM assets WHERE id = $1::uuid AND status = 'delivered'", &[&reserved]) == 1)
            .then_some(())
    })
    .await;
    let audit = || env.db(|c| assetflow::cli::audit::audit(c, None).expect("the audit runs"));
    let stuck = "submitted_receipt_certificates_of_final_orders";
    let issued_twice = "revoked_receipt_certificate_issued";
    let a = audit().await;
    assert_eq!((a.bookings, a.submitted, a.receipts_issued, a.orders), (1, 1, 1, 0), "{}", a.summary());
    assert_eq!((a.open[stuck], a.duplicates[issued_twice], a.duplicated), (0, 0, 0), "{}", a.summary());

    let i = id.clone();
    env.db(move |c| execute(c, "UPDATE receipt_certificates SET status = 'submitted' WHERE id = $1::uuid", &[&i]))
        .await;
    assert_eq!(audit().await.open[stuck], 1, "issued, yet still submitted: lost work");
    env.db(move |c| execute(c, "UPDATE receipt_certificates SET status = 'revoked' WHERE id = $1::uuid", &[&id])).await;
    let a = audit().await;
    assert_eq!((a.open[stuck], a.duplicates[issued_twice]), (0, 1), "revoked, yet its asset issued: {}", a.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_billed_to_another_terminal_needs_a_payer_that_waives_confirmation() {
    let mut env = Env::new().await;
    sold_by_booking(&env, "seat", "hold", None, None).await;
    let alice = env.terminal("alice", "gw-1", Some("card-co")).await;
    env.terminal("bob", "gw-1", Some("card-co")).await;
    env.start().await;
    env.partner(settle_all());
    env.gateway(GatewayOptions::default());
    let billed_to_bob = || {
        let mut request = serde_json::json!({
            "type": assetflow::contracts::messages::kinds::ORDER_BOOKING,
            "request_id": format!("b-{}", uuid::Uuid::now_v7()),
            "terminal_id": "alice",
            "sent_at": Utc::now(),
            "product_id": "seat",
            "payer_terminal_id": "bob",
        });
        assetflow::crypto::sign_document(&alice.key, &mut request).unwrap();
        request
    };
    // Bob confirms what others bill to him, and a submission cannot wait for that.
    let asking = billed_to_bob();
    env.send(&asking).await;
    assert_eq!(refusal(&env, &asking).await, "confirmation_required");
    env.db(|c| assert_eq!(count(c, "SELECT count(*) FROM receipt_certificates", &[]), 0)).await;
    // Once he waives it, alice may book on his account.
    env.db(|c| execute(c, "UPDATE terminals SET waives_confirmation = true WHERE id = 'bob'", &[])).await;
    let waived = billed_to_bob();
    env.send(&waived).await;
    let id = request_id(&waived);
    env.wait_until("the receipt certificate is issued", move |c| {
        let sql = "SELECT count(*) FROM receipt_certificates WHERE request_id = $1 AND payer_terminal_id = 'bob'";
        (count(c, sql, &[&id]) == 1).then_some(())
    })
    .await;
}
