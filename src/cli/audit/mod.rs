//! `assetflow audit`: the guarantees of `docs/product.md#guarantees`, checked from the database and the queues after a
//! run. Nothing lost (every accepted request reached a final state, every refund and receipt
//! certificate too), nothing done twice (no settlement, issue, asset delivery, acknowledgement,
//! exchange or reminder stage twice, no receipt certificate paid for or issued twice, no refund
//! beyond its payment, no asset refunded twice), every status history a legal path, and the dead
//! letters exactly what could not be processed, each with its reason. `ops/chaos` and the fault tests (`tests/it/chaos.rs`, `tests/it/processes.rs`)
//! run these same checks. Given a gateway ledger, it also checks what reached the gateways twice
//! ([`wire`]).

pub mod wire;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use diesel::prelude::*;
use serde::Serialize;

use crate::config::Config;
use crate::contracts::dead_letter::DeadLetterReason;
use crate::contracts::topology::{Names, Pool};
use crate::domain::status::{Status, is_legal_path};

/// DUPLICATE_CHECKS are the "done twice" queries: each counts the subjects that got an effect more
/// than once. Several are also unique constraints in the schema; the audit does not assume them.
const DUPLICATE_CHECKS: &[(&str, &str)] = &[
    (
        "settlement",
        "SELECT count(*) FROM (SELECT order_id FROM settlements WHERE kind = 'purchase' GROUP BY order_id HAVING count(*) > 1) x",
    ),
    (
        // An issuer's change replaces an asset with a new one of the same order: only the
        // originals count here, and each asset is replaced at most once (below).
        "issue",
        "SELECT count(*) FROM orders o WHERE (SELECT count(*) FROM assets a WHERE a.order_id = o.id AND a.replaces_asset_id IS NULL) > o.quantity * cardinality(o.recipient_terminal_ids)",
    ),
    (
        "replacement",
        "SELECT count(*) FROM (SELECT replaces_asset_id FROM assets WHERE replaces_asset_id IS NOT NULL GROUP BY replaces_asset_id HAVING count(*) > 1) x",
    ),
    (
        "issue_before_settlement",
        "SELECT count(*) FROM orders o WHERE EXISTS (SELECT 1 FROM assets a WHERE a.order_id = o.id) AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.order_id = o.id AND s.status = 'settled')",
    ),
    (
        "certificate",
        "SELECT count(*) FROM (SELECT asset_id FROM exchange_certificates GROUP BY asset_id HAVING count(*) > 1) x",
    ),
    (
        "asset_delivery",
        "SELECT count(*) FROM (SELECT asset_id FROM deliveries WHERE kind = 'asset' GROUP BY asset_id HAVING count(*) > 1) x",
    ),
    (
        "certificate_delivery",
        "SELECT count(*) FROM (SELECT asset_id FROM deliveries WHERE kind = 'certificate' GROUP BY asset_id HAVING count(*) > 1) x",
    ),
    (
        "acknowledgement",
        "SELECT count(*) FROM (SELECT delivery_id FROM delivery_attempts WHERE outcome = 'acknowledged' GROUP BY delivery_id HAVING count(*) > 1) x",
    ),
    (
        "asset_completion",
        "SELECT count(*) FROM (SELECT asset_id FROM asset_status_history WHERE to_status IN ('delivered', 'force_delivered') GROUP BY asset_id HAVING count(*) > 1) x",
    ),
    (
        "exchange",
        "SELECT count(*) FROM (SELECT c.id FROM exchange_certificates c JOIN terminal_requests r ON r.subject_id = c.asset_id AND r.message_type = 'certificate.exchange' AND r.outcome = 'accepted' GROUP BY c.id HAVING count(*) > 1) x",
    ),
    (
        // Reminders (stage 1 and 2), past-due messages and revocation requests: one per
        // certificate and notice, however often and on however many processes the scans run. A
        // booking is told of each change of its product (`booking_modified`), once: the delivery's
        // key names the change.
        "certificate_notice",
        "SELECT count(*) FROM (SELECT content->>'certificate_id', content->>'code' FROM deliveries WHERE kind IN ('message', 'download_request', 'revocation_request') AND content->>'certificate_id' IS NOT NULL AND content->>'code' <> 'booking_modified' GROUP BY 1, 2 HAVING count(*) > 1) x",
    ),
    (
        // A receipt certificate is paid for once: at most one settled purchase among the orders
        // that name it or its reserved asset.
        "receipt_certificate_settlement",
        "SELECT count(*) FROM receipt_certificates r WHERE (SELECT count(*) FROM settlements s JOIN orders o ON o.id = s.order_id WHERE (o.id = r.order_id OR o.reserved_asset_id = r.asset_id) AND s.kind = 'purchase' AND s.status = 'settled') > 1",
    ),
    (
        // ... and buys one asset: its reserved one. A replacement of it (an issuer's change
        // accepted) is not a second one, as in `issue`.
        "receipt_certificate_issue",
        "SELECT count(*) FROM receipt_certificates r WHERE (SELECT count(*) FROM assets a WHERE (a.id = r.asset_id OR a.order_id = r.order_id) AND a.replaces_asset_id IS NULL) > 1",
    ),
    (
        // A revoked receipt certificate buys nothing, even when its payment settled afterwards
        // (that payment is refunded: see `revoked_receipt_certificates_paid_not_refunded`).
        "revoked_receipt_certificate_issued",
        "SELECT count(*) FROM receipt_certificates r WHERE r.status = 'revoked' AND EXISTS (SELECT 1 FROM assets a WHERE a.id = r.asset_id OR a.order_id = r.order_id)",
    ),
    (
        // An order's refunds not failed, whatever their causes, add up to no more than it paid.
        "refunds_beyond_payment",
        "SELECT count(*) FROM (SELECT f.order_id FROM refunds f WHERE f.status <> 'failed' GROUP BY f.order_id HAVING sum(f.amount_minor) > coalesce((SELECT sum(s.amount_minor) FROM settlements s WHERE s.order_id = f.order_id AND s.kind = 'purchase' AND s.status = 'settled'), 0)) x",
    ),
    (
        "asset_refund",
        "SELECT count(*) FROM (SELECT asset_id FROM refunds WHERE status = 'refunded' AND asset_id IS NOT NULL GROUP BY asset_id HAVING count(*) > 1) x",
    ),
];

/// OPEN_CHECKS are the "lost" queries: accepted work that has not reached a final state.
const OPEN_CHECKS: &[(&str, &str)] = &[
    (
        // A change is never left half done: a step whose money leg was answered has moved on.
        "changes_half_done",
        "SELECT count(*) FROM changes c WHERE
           (c.step = 'purchasing' AND EXISTS (SELECT 1 FROM settlements s WHERE s.order_id = c.new_order_id AND s.kind = 'purchase' AND s.status IN ('settled', 'declined')))
           OR (c.step = 'refunding' AND EXISTS (SELECT 1 FROM refunds f WHERE f.id = c.refund_id AND f.status <> 'requested'))
           OR (c.step = 'compensating' AND EXISTS (SELECT 1 FROM refunds f WHERE f.id = c.compensation_id AND f.status <> 'requested'))",
    ),
    (
        // A change done refunded its old asset and handed its new order on; one compensated got
        // the new payment back.
        "changes_done_without_their_effects",
        "SELECT count(*) FROM changes c WHERE
           (c.step = 'done' AND (NOT EXISTS (SELECT 1 FROM refunds f WHERE f.id = c.refund_id AND f.status = 'refunded')
                                 OR NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = c.new_order_id AND o.status IN ('issuing', 'issued'))))
           OR (c.step = 'compensated' AND NOT EXISTS (SELECT 1 FROM refunds f WHERE f.id = c.compensation_id AND f.status = 'refunded'))",
    ),
    (
        // A change stuck (the partner would not return the new payment) is handed to an operator
        // as a dead letter with its evidence, like any work that could not be done.
        "stuck_changes_without_a_dead_letter",
        "SELECT count(*) FROM changes c WHERE c.step = 'stuck' AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.message_id = 'change:' || c.id || ':stuck')",
    ),
    (
        // An order placed before an issuer's change and issued after it, while the change was
        // open, has its notice: it was written with the asset.
        "assets_issued_after_a_change_untold",
        "SELECT count(*) FROM assets a JOIN orders o ON o.id = a.order_id JOIN issuer_changes c ON c.product_id = a.product_id
         WHERE a.generation = 0 AND c.created_at > o.created_at AND c.created_at < a.issued_at AND c.reply_by > a.issued_at
           AND NOT EXISTS (SELECT 1 FROM modification_notices n WHERE n.change_id = c.id AND n.asset_id = a.id)",
    ),
    ("open_orders", "SELECT count(*) FROM orders WHERE status IN ('settling', 'issuing')"),
    (
        // An order waits for its payer until its window ends, then the confirmation_timeout job
        // (every 5 s) ends it: one still waiting a minute later was not picked up.
        "overdue_confirmations",
        "SELECT count(*) FROM orders WHERE status = 'confirming' AND confirm_due_at < now() - interval '1 minute'",
    ),
    (
        "issued_orders_short_of_assets",
        "SELECT count(*) FROM orders o WHERE o.status = 'issued' AND (SELECT count(*) FROM assets a WHERE a.order_id = o.id) < o.quantity * cardinality(o.recipient_terminal_ids)",
    ),
    (
        "accepted_orders_without_order",
        "SELECT count(*) FROM terminal_requests r WHERE r.message_type = 'order.purchase' AND r.outcome = 'accepted' AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.request_id = r.request_id)",
    ),
    (
        "accepted_exchanges_not_carried_out",
        "SELECT count(*) FROM terminal_requests r WHERE r.message_type = 'certificate.exchange' AND r.outcome = 'accepted' AND NOT EXISTS (SELECT 1 FROM exchange_certificates c WHERE c.exchange_request_id = r.request_id)",
    ),
    (
        "accepted_bookings_without_a_receipt_certificate",
        "SELECT count(*) FROM terminal_requests r WHERE r.message_type = 'order.booking' AND r.outcome = 'accepted' AND NOT EXISTS (SELECT 1 FROM receipt_certificates c WHERE c.request_id = r.request_id)",
    ),
    (
        "accepted_submissions_without_order",
        "SELECT count(*) FROM terminal_requests r WHERE r.message_type = 'receipt.submit' AND r.outcome = 'accepted' AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.request_id = r.request_id)",
    ),
    (
        "issued_receipt_certificates_without_their_asset",
        "SELECT count(*) FROM receipt_certificates r WHERE r.status = 'issued' AND NOT EXISTS (SELECT 1 FROM assets a WHERE a.id = r.asset_id AND a.order_id = r.order_id)",
    ),
    (
        // A submitted certificate becomes `issued` in the transaction that settles its order. One
        // whose payment was declined or failed keeps its status until the `bookings` job revokes
        // it at its expiry (its due work): past that, with a minute for the job, it is lost.
        "submitted_receipt_certificates_of_final_orders",
        "SELECT count(*) FROM receipt_certificates r JOIN orders o ON o.id = r.order_id WHERE r.status = 'submitted' AND (o.status IN ('issuing', 'issued') OR (o.status IN ('declined', 'failed', 'unconfirmed') AND r.expires_at < now() - interval '2 minutes'))",
    ),
    (
        // A payment that settled after its receipt certificate was revoked bought nothing: it is
        // refunded (cause late_settlement), and the refund is under way or done.
        "revoked_receipt_certificates_paid_not_refunded",
        "SELECT count(*) FROM receipt_certificates r WHERE r.status = 'revoked' AND EXISTS (SELECT 1 FROM settlements s WHERE s.order_id = r.order_id AND s.kind = 'purchase' AND s.status = 'settled') AND NOT EXISTS (SELECT 1 FROM refunds f WHERE f.order_id = r.order_id AND f.cause = 'late_settlement' AND f.status IN ('requested', 'refunded'))",
    ),
    (
        // A refund waits for its partner while its settlement is instructed (or abandoned: a late
        // answer still counts); one whose settlement was answered took no effect.
        "refunds_answered_but_requested",
        "SELECT count(*) FROM refunds f JOIN settlements s ON s.id = f.settlement_id WHERE f.status = 'requested' AND s.status NOT IN ('instructed', 'abandoned')",
    ),
    (
        // An asset is `refunded` only with its money back ...
        "refunded_assets_without_a_refund",
        "SELECT count(*) FROM assets a WHERE a.status = 'refunded' AND NOT EXISTS (SELECT 1 FROM refunds f WHERE f.asset_id = a.id AND f.status = 'refunded')",
    ),
    (
        // ... and money paid back for an asset makes it `refunded`, unless its term ended while
        // the partner answered (`settlement::refund::refund_asset`).
        "refunds_of_assets_not_refunded",
        "SELECT count(*) FROM refunds f JOIN assets a ON a.id = f.asset_id WHERE f.status = 'refunded' AND a.status NOT IN ('refunded', 'expired')",
    ),
    ("open_deliveries", "SELECT count(*) FROM deliveries WHERE status IN ('pending', 'sent', 'failed')"),
    ("unpublished_outbox_rows", "SELECT count(*) FROM outbox"),
];

/// Audit is what the checks found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Orders placed by terminals that reached assetflow, whatever became of them: accepted,
    /// refused or dead-lettered.
    pub requests: i64,
    /// `--sent`: the orders the caller published, when it says.
    pub sent: Option<i64>,
    /// Accepted orders: those placed by `order.purchase` (a receipt certificate's submission
    /// places an order too: those are counted in `submitted`).
    pub orders: i64,
    /// Orders issued: settled, with every asset issued.
    pub completed: i64,
    pub declined: i64,
    /// Orders failed (the partner never answered).
    pub failed: i64,
    /// Terminal requests refused, with a reason (orders and exchanges).
    pub refused: i64,
    pub exchanges: i64,
    /// Receipt certificates booked, submitted (orders placed by `receipt.submit`), issued and
    /// revoked; lottery and threshold decisions made.
    pub bookings: i64,
    pub submitted: i64,
    pub receipts_issued: i64,
    pub receipts_revoked: i64,
    pub booking_decisions: i64,
    /// Refunds asked (any cause), paid back, and refused by the partner.
    pub refunds: i64,
    pub refunded: i64,
    /// Changes of product asked for, done, and undone (failed before anything was done, or
    /// compensated).
    pub changes: i64,
    pub changes_done: i64,
    pub changes_undone: i64,
    pub refunds_failed: i64,
    pub deliveries: i64,
    pub delivered: i64,
    /// Dead letters, by reason.
    pub dead_lettered: BTreeMap<String, i64>,
    /// Lost: accepted work not final, by check; plus sent orders found nowhere.
    pub open: BTreeMap<String, i64>,
    pub lost: i64,
    /// Done twice, by check.
    pub duplicates: BTreeMap<String, i64>,
    pub duplicated: i64,
    /// Assets whose status history is not a legal path, or does not end at the asset's status.
    pub illegal_paths: Vec<String>,
    /// Where the dead letters and what could not be processed do not match one to one.
    pub dead_letter_mismatches: BTreeMap<String, i64>,
    /// Messages still in assetflow's queues, by queue (filled by [`queue_depths`]).
    pub queued: BTreeMap<String, u32>,
    /// What the gateways received, when a gateway ledger is given (filled by [`wire::audit_ledger`]).
    pub wire: Option<wire::Wire>,
}

impl Audit {
    /// Audit::dead_letters is the number of dead letters, all reasons.
    pub fn dead_letters(&self) -> i64 {
        self.dead_lettered.values().sum()
    }

    /// Audit::problems lists every broken guarantee; empty when all hold.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (check, n) in self.open.iter().filter(|(_, n)| **n > 0) {
            problems.push(format!("lost: {check} = {n}"));
        }
        for (check, n) in self.duplicates.iter().filter(|(_, n)| **n > 0) {
            problems.push(format!("done twice: {check} = {n}"));
        }
        for path in &self.illegal_paths {
            problems.push(format!("illegal status path: {path}"));
        }
        for (check, n) in self.dead_letter_mismatches.iter().filter(|(_, n)| **n > 0) {
            problems.push(format!("dead letters: {check} = {n}"));
        }
        for (queue, n) in self.queued.iter().filter(|(_, n)| **n > 0) {
            problems.push(format!("{n} message(s) left in {queue}"));
        }
        problems.extend(self.wire.iter().flat_map(wire::Wire::problems));
        problems
    }

    /// Audit::summary is the report `assetflow audit` prints.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let sent = self.sent.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "requests sent {sent} · received {} · accepted {} · completed {} · declined {} · failed {} · refused {} · dead-lettered {}\n",
            self.requests,
            self.orders,
            self.completed,
            self.declined,
            self.failed,
            self.refused,
            self.dead_letters()
        ));
        out.push_str(&format!(
            "exchanges {} · deliveries {} (delivered {}) · lost {} · duplicated effects {} · illegal paths {}\n",
            self.exchanges,
            self.deliveries,
            self.delivered,
            self.lost,
            self.duplicated,
            self.illegal_paths.len()
        ));
        out.push_str(&format!(
            "bookings {} (submitted {}, issued {}, revoked {}; decisions {}) · refunds {} (refunded {}, failed {}) · changes {} (done {}, undone {})\n",
            self.bookings,
            self.submitted,
            self.receipts_issued,
            self.receipts_revoked,
            self.booking_decisions,
            self.refunds,
            self.refunded,
            self.refunds_failed,
            self.changes,
            self.changes_done,
            self.changes_undone
        ));
        if let Some(wire) = &self.wire {
            out.push_str(&wire.summary());
        }
        if !self.dead_lettered.is_empty() {
            let reasons: Vec<String> = self.dead_lettered.iter().map(|(r, n)| format!("{r} {n}")).collect();
            out.push_str(&format!("dead letters by reason: {}\n", reasons.join(", ")));
        }
        let problems = self.problems();
        if problems.is_empty() {
            out.push_str("every guarantee holds\n");
        }
        for problem in problems {
            out.push_str(&format!("PROBLEM {problem}\n"));
        }
        out
    }
}

/// INFRASTRUCTURE_REASONS are dead-letter reasons that well-formed traffic only gets when the
/// infrastructure failed it: the message could have been processed.
pub const INFRASTRUCTURE_REASONS: [DeadLetterReason; 2] =
    [DeadLetterReason::HandlerFailed, DeadLetterReason::BrokerDeadLettered];

/// audit runs every database check. `sent` is the number of orders the caller published, if known:
/// any it published that reached no table is lost.
pub fn audit(conn: &mut PgConnection, sent: Option<i64>) -> QueryResult<Audit> {
    let mut audit = Audit { sent, ..Audit::default() };
    // The orders placed by `order.purchase`: not those of receipt submissions or changes.
    audit.orders = count(
        conn,
        "SELECT count(*) FROM orders o WHERE o.reserved_asset_id IS NULL
           AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.new_order_id = o.id)",
    )?;
    audit.changes = count(conn, "SELECT count(*) FROM changes")?;
    audit.changes_done = count(conn, "SELECT count(*) FROM changes WHERE step = 'done'")?;
    audit.changes_undone = count(conn, "SELECT count(*) FROM changes WHERE step IN ('failed', 'compensated')")?;
    audit.completed = count(conn, "SELECT count(*) FROM orders WHERE status = 'issued'")?;
    audit.declined = count(conn, "SELECT count(*) FROM orders WHERE status = 'declined'")?;
    audit.failed = count(conn, "SELECT count(*) FROM orders WHERE status = 'failed'")?;
    audit.refused = count(conn, "SELECT count(*) FROM refusals")?;
    audit.exchanges = count(conn, "SELECT count(*) FROM exchange_certificates WHERE exchanged_at IS NOT NULL")?;
    audit.bookings = count(conn, "SELECT count(*) FROM receipt_certificates")?;
    audit.submitted = count(conn, "SELECT count(*) FROM receipt_certificates WHERE order_id IS NOT NULL")?;
    audit.receipts_issued = count(conn, "SELECT count(*) FROM receipt_certificates WHERE status = 'issued'")?;
    audit.receipts_revoked = count(conn, "SELECT count(*) FROM receipt_certificates WHERE status = 'revoked'")?;
    audit.booking_decisions = count(conn, "SELECT count(*) FROM booking_decisions")?;
    audit.refunds = count(conn, "SELECT count(*) FROM refunds")?;
    audit.refunded = count(conn, "SELECT count(*) FROM refunds WHERE status = 'refunded'")?;
    audit.refunds_failed = count(conn, "SELECT count(*) FROM refunds WHERE status = 'failed'")?;
    audit.deliveries = count(conn, "SELECT count(*) FROM deliveries")?;
    audit.delivered = count(conn, "SELECT count(*) FROM deliveries WHERE status = 'delivered'")?;
    // An order that reached assetflow is an order row, a refusal, or a dead letter of its message.
    audit.requests = audit.orders
        + count(
            conn,
            "SELECT count(DISTINCT coalesce(request_id, id::text)) FROM refusals r WHERE message_type = 'order.purchase'
             AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.request_id = r.request_id)",
        )?
        + count(conn, "SELECT count(*) FROM dead_letters WHERE source = 'message' AND message_type = 'order.purchase'")?;

    #[derive(QueryableByName)]
    struct ByReason {
        #[diesel(sql_type = diesel::sql_types::Text)]
        reason: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    let reasons: Vec<ByReason> =
        diesel::sql_query("SELECT reason, count(*) AS count FROM dead_letters GROUP BY reason").load(conn)?;
    audit.dead_lettered = reasons.into_iter().map(|r| (r.reason, r.count)).collect();

    for (check, sql) in OPEN_CHECKS {
        audit.open.insert(check.to_string(), count(conn, sql)?);
    }
    if let Some(sent) = sent {
        audit.open.insert("sent_but_never_received".into(), (sent - audit.requests).max(0));
    }
    audit.lost = audit.open.values().sum();
    for (check, sql) in DUPLICATE_CHECKS {
        audit.duplicates.insert(check.to_string(), count(conn, sql)?);
    }
    audit.duplicated = audit.duplicates.values().sum();
    audit.illegal_paths = illegal_paths(conn)?;
    audit.dead_letter_mismatches = dead_letter_mismatches(conn)?;
    Ok(audit)
}

/// illegal_paths checks every asset's status history against the status machine, and that it
/// ends at the asset's current status.
fn illegal_paths(conn: &mut PgConnection) -> QueryResult<Vec<String>> {
    use crate::domain::schema::{asset_status_history as h, assets};
    let history: Vec<(uuid::Uuid, Option<String>, String)> =
        h::table.order((h::asset_id, h::id)).select((h::asset_id, h::from_status, h::to_status)).load(conn)?;
    let current: BTreeMap<uuid::Uuid, String> =
        assets::table.select((assets::id, assets::status)).load::<(uuid::Uuid, String)>(conn)?.into_iter().collect();
    let mut paths: BTreeMap<uuid::Uuid, Vec<(Option<String>, String)>> =
        current.keys().map(|id| (*id, Vec::new())).collect();
    for (asset, from, to) in history {
        paths.entry(asset).or_default().push((from, to));
    }
    let mut illegal = Vec::new();
    for (asset, path) in paths {
        let parsed: Option<Vec<(Option<Status>, Status)>> = path
            .iter()
            .map(|(from, to)| {
                let from = match from {
                    Some(f) => Some(Status::parse(f)?),
                    None => None,
                };
                Some((from, Status::parse(to)?))
            })
            .collect();
        let ends_at_status = path.last().map(|(_, to)| to) == current.get(&asset);
        if !parsed.is_some_and(|p| is_legal_path(&p)) || !ends_at_status {
            let steps: Vec<String> =
                path.iter().map(|(from, to)| format!("{}→{to}", from.as_deref().unwrap_or("(new)"))).collect();
            let now = current.get(&asset).map(String::as_str).unwrap_or("(no asset)");
            illegal.push(format!("asset {asset} [{}], now {now}", steps.join(", ")));
        }
    }
    Ok(illegal)
}

/// dead_letter_mismatches pairs what could not be processed with its dead letter, both ways.
fn dead_letter_mismatches(conn: &mut PgConnection) -> QueryResult<BTreeMap<String, i64>> {
    let known: Vec<String> = DeadLetterReason::ALL.iter().map(|r| format!("'{}'", r.as_str())).collect();
    let infrastructure: Vec<String> = INFRASTRUCTURE_REASONS.iter().map(|r| format!("'{}'", r.as_str())).collect();
    let checks = [
        (
            "without_a_reason",
            format!("SELECT count(*) FROM dead_letters WHERE reason NOT IN ({}) OR detail = ''", known.join(", ")),
        ),
        (
            "failed_orders_without_a_settlement_dead_letter",
            // An order whose receipt certificate was revoked before its payment settled fails
            // with that payment refunded, not dead-lettered (`settlement::result`); so does the
            // new order of a change that was undone (`settlement::change`), or whose undoing is
            // with an operator (its dead letter names the refund's settlement).
            "SELECT count(*) FROM orders o WHERE o.status = 'failed' AND o.status_reason IS DISTINCT FROM 'receipt_certificate_revoked' AND o.status_reason IS DISTINCT FROM 'change_compensated' AND o.status_reason IS DISTINCT FROM 'change_stuck' AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.source = 'settlement' AND d.subject_id = o.id)".into(),
        ),
        (
            "settlement_dead_letters_without_an_abandoned_settlement",
            // A late answer after abandonment still counts (the payer may have paid), so an
            // abandoned settlement may since have settled; its dead letter stays as the record.
            // A purchase's dead letter names its order; a refund's (abandoned, or refused while
            // undoing a change) names the refund's own settlement.
            "SELECT count(*) FROM dead_letters d WHERE d.source = 'settlement' AND d.replayed_at IS NULL AND NOT EXISTS (SELECT 1 FROM settlements s WHERE ((s.order_id = d.subject_id AND s.kind = 'purchase') OR s.id = d.subject_id) AND s.status <> 'instructed')".into(),
        ),
        (
            "dead_deliveries_without_a_dead_letter",
            "SELECT count(*) FROM deliveries v WHERE v.status = 'dead' AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.source = 'delivery' AND d.subject_id = v.id)".into(),
        ),
        (
            "delivery_dead_letters_without_a_dead_delivery",
            "SELECT count(*) FROM dead_letters d WHERE d.source = 'delivery' AND d.replayed_at IS NULL AND NOT EXISTS (SELECT 1 FROM deliveries v WHERE v.id = d.subject_id AND v.status = 'dead')".into(),
        ),
        (
            "dead_lettered_by_an_outage",
            format!("SELECT count(*) FROM dead_letters WHERE reason IN ({})", infrastructure.join(", ")),
        ),
    ];
    let mut mismatches = BTreeMap::new();
    for (check, sql) in checks {
        mismatches.insert(check.to_string(), count(conn, &sql)?);
    }
    Ok(mismatches)
}

fn count(conn: &mut PgConnection, sql: &str) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    Ok(diesel::sql_query(sql).get_result::<Count>(conn)?.count)
}

/// work_queues are the queues that must be empty once everything is processed: the pools',
/// their dead-letter queues (drained into `dead_letters` by the recorders), and the partners'
/// and gateways' queues.
pub fn work_queues(config: &Config) -> Vec<String> {
    let names = Names { prefix: config.amqp.prefix.clone() };
    let mut queues = vec![names.unrouted()];
    for pool in Pool::ALL {
        queues.push(names.pool_queue(pool.as_str()));
        queues.push(names.dead_letter_queue(pool.as_str()));
    }
    queues.extend(config.partners.keys().map(|p| names.partner_queue(p)));
    queues.extend(config.gateways.keys().map(|g| names.gateway_queue(g)));
    queues
}

/// queue_depths reads the messages in each queue with a passive declare; a queue that does not
/// exist is left out.
pub async fn queue_depths(connection: &lapin::Connection, queues: &[String]) -> anyhow::Result<BTreeMap<String, u32>> {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    let mut depths = BTreeMap::new();
    for queue in queues {
        // A passive declare of a missing queue closes the channel: one channel per queue.
        let channel = connection.create_channel().await?;
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        if let Ok(declared) = channel.queue_declare(queue.as_str().into(), options, FieldTable::default()).await {
            depths.insert(queue.clone(), declared.message_count());
            let _ = channel.close(200, "counted".into()).await;
        }
    }
    Ok(depths)
}

/// run is `assetflow audit`: it prints the audit (or its JSON) and fails when a guarantee broke,
/// or, with `gateway_ledger`, when something reached a gateway twice.
pub async fn run(
    config: &Config,
    sent: Option<i64>,
    gateway_ledger: Option<PathBuf>,
    json: bool,
    no_queues: bool,
) -> anyhow::Result<ExitCode> {
    let url = config.database.url.clone();
    let mut report = tokio::task::spawn_blocking(move || -> anyhow::Result<Audit> {
        let mut conn = crate::runtime::db::establish(&url)
            .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", crate::config::redact_url(&url)))?;
        let mut audit = audit(&mut conn, sent)?;
        if let Some(ledger) = gateway_ledger {
            audit.wire = Some(wire::audit_ledger(&mut conn, &ledger)?);
        }
        Ok(audit)
    })
    .await??;
    if !no_queues {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let broker = crate::runtime::broker::Broker::undeclared(config, shutdown.clone());
        let connection = tokio::time::timeout(std::time::Duration::from_secs(30), broker.connection())
            .await
            .ok()
            .flatten()
            .ok_or_else(|| anyhow::anyhow!("cannot connect to RabbitMQ within 30 s"))?;
        report.queued = queue_depths(&connection, &work_queues(config)).await?;
        shutdown.cancel();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.summary());
    }
    Ok(if report.problems().is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_has_a_name_of_its_own() {
        let mut names: Vec<&str> = DUPLICATE_CHECKS.iter().chain(OPEN_CHECKS).map(|(name, _)| *name).collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "a check's count would hide another's");
    }

    #[test]
    fn a_refund_beyond_its_payment_or_a_receipt_certificate_left_submitted_fails_the_audit() {
        let mut audit = Audit::default();
        assert!(audit.problems().is_empty());
        audit.duplicates.insert("refunds_beyond_payment".into(), 1);
        audit.open.insert("submitted_receipt_certificates_of_final_orders".into(), 2);
        audit.open.insert("refunds_answered_but_requested".into(), 0);
        assert_eq!(
            audit.problems(),
            vec!["lost: submitted_receipt_certificates_of_final_orders = 2", "done twice: refunds_beyond_payment = 1"]
        );
        assert!(audit.summary().contains("PROBLEM done twice: refunds_beyond_payment = 1"));
    }
}
