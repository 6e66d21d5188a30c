//! The wire-level audit: what the gateways received, read from a gateway ledger
//! (`cli::simulate::ledger`), set against what assetflow recorded of its attempts. The database's
//! checks (`super::DUPLICATE_CHECKS`) see what assetflow did twice, and its unique constraints
//! already forbid most of that; only the gateway side sees the same thing reach it twice. What
//! at-least-once delivery legitimately repeats (a redelivery, a retransmission before the receipt
//! was recorded) is counted apart and is no duplicate. The definitions and the reasons:
//! `docs/operations.md#duplicates-on-the-wire`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use crate::cli::simulate::ledger::{self, Reception};
use crate::contracts::messages::DeliveryKind;

/// ONE_SUBJECT_TWO_DELIVERIES counts the assets, certificates and certificate notices received
/// under more than one delivery id.
pub const ONE_SUBJECT_TWO_DELIVERIES: &str = "one_subject_two_deliveries";
/// SENT_AFTER_RECEIPT counts the attempts received that assetflow made after it had taken in a
/// receipt for their delivery.
pub const SENT_AFTER_RECEIPT: &str = "sent_after_receipt";
/// ONE_ATTEMPT_TWO_MESSAGE_IDS counts the attempts (delivery id and attempt number) received under
/// more than one message id: published again as a new message.
pub const ONE_ATTEMPT_TWO_MESSAGE_IDS: &str = "one_attempt_two_message_ids";

/// FINDINGS_SHOWN is how many findings are described; all are counted.
const FINDINGS_SHOWN: usize = 20;

/// Wire is what the wire-level audit found in a gateway ledger.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Wire {
    /// The ledger read.
    pub ledger: String,
    /// Every delivery message the gateways took from their queues, copies included.
    pub received: i64,
    /// The distinct messages (message ids) among them.
    pub messages: i64,
    /// Receptions of a message id already received: the broker delivering a message again, or
    /// the relay publishing again a message whose confirm it lost. A gateway drops them by
    /// message id; not a duplicate.
    pub redeliveries: i64,
    /// Attempts of a delivery received after another attempt of it, and made before assetflow
    /// had a receipt for it (the receipt was lost, late or wrong): at-least-once delivery doing
    /// its work; not a duplicate.
    pub retransmissions: i64,
    /// Duplicates on the wire, by check (the constants above).
    pub duplicates: BTreeMap<String, i64>,
    pub duplicated: i64,
    /// Attempts received of which assetflow has no record.
    pub unaccounted: i64,
    /// The numbers of the ledger's lines that are not a reception.
    pub unreadable: Vec<usize>,
    /// One sentence per duplicate or unaccounted attempt, the first `FINDINGS_SHOWN`.
    pub findings: Vec<String>,
}

impl Wire {
    /// Wire::problems lists what fails the audit: duplicates, unaccounted attempts, and a ledger
    /// that cannot be read whole.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (check, n) in self.duplicates.iter().filter(|(_, n)| **n > 0) {
            problems.push(format!("duplicate on the wire: {check} = {n}"));
        }
        if self.unaccounted > 0 {
            problems
                .push(format!("on the wire: {} attempt(s) received that assetflow has no record of", self.unaccounted));
        }
        if !self.unreadable.is_empty() {
            let lines: Vec<String> = self.unreadable.iter().take(10).map(usize::to_string).collect();
            problems.push(format!(
                "gateway ledger: {} unreadable line(s): {}",
                self.unreadable.len(),
                lines.join(", ")
            ));
        }
        problems
    }

    /// Wire::summary is the wire section of `assetflow audit`'s report.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "on the wire ({}): received {} · messages {} · redeliveries {} · retransmissions {} · duplicated {} · unaccounted {}\n",
            self.ledger,
            self.received,
            self.messages,
            self.redeliveries,
            self.retransmissions,
            self.duplicated,
            self.unaccounted
        );
        for finding in &self.findings {
            out.push_str(&format!("  {finding}\n"));
        }
        out
    }
}

/// audit_ledger reads the ledger at `path` and audits it.
pub fn audit_ledger(conn: &mut PgConnection, path: &Path) -> anyhow::Result<Wire> {
    let contents = ledger::read(path)?;
    let mut wire = audit(conn, &contents.receptions)?;
    wire.ledger = path.display().to_string();
    wire.unreadable = contents.unreadable;
    Ok(wire)
}

/// audit sets receptions, in the order a ledger recorded them, against assetflow's record of its
/// attempts and deliveries.
pub fn audit(conn: &mut PgConnection, receptions: &[Reception]) -> QueryResult<Wire> {
    let deliveries: BTreeSet<Uuid> = receptions.iter().map(|r| r.delivery_id).collect();
    Ok(judge(receptions, &recorded(conn, &deliveries.into_iter().collect::<Vec<_>>())?))
}

/// judge is the audit of receptions given assetflow's record of their attempts.
fn judge(receptions: &[Reception], recorded: &HashMap<(Uuid, i32), Recorded>) -> Wire {
    let mut wire = Wire { received: receptions.len() as i64, ..Wire::default() };
    let mut findings = Vec::new();

    // The messages: the first reception of each message id. One without a message id cannot be
    // matched with another, so it counts as a message of its own.
    let mut seen = HashSet::new();
    let mut messages = Vec::new();
    for reception in receptions {
        match &reception.message_id {
            Some(id) if !seen.insert(id.as_str()) => wire.redeliveries += 1,
            _ => messages.push(reception),
        }
    }
    wire.messages = messages.len() as i64;

    // The attempts, in the order of their first reception, each with its messages.
    let mut attempts: Vec<((Uuid, u32), Vec<&Reception>)> = Vec::new();
    let mut index: HashMap<(Uuid, u32), usize> = HashMap::new();
    for m in &messages {
        let key = (m.delivery_id, m.attempt);
        let at = *index.entry(key).or_insert_with(|| {
            attempts.push((key, Vec::new()));
            attempts.len() - 1
        });
        attempts[at].1.push(m);
    }
    let mut republished = 0;
    for ((delivery, attempt), copies) in attempts.iter().filter(|(_, copies)| copies.len() > 1) {
        republished += 1;
        let ids: Vec<&str> = copies.iter().filter_map(|c| c.message_id.as_deref()).collect();
        findings.push(format!(
            "delivery {delivery} attempt {attempt} received as {} messages: {}",
            copies.len(),
            ids.join(", ")
        ));
    }

    // Each attempt against assetflow's record of it and of its delivery's receipt.
    let mut after_receipt = 0;
    let mut received_before: HashSet<Uuid> = HashSet::new();
    for ((delivery, attempt), copies) in &attempts {
        let record = i32::try_from(*attempt).ok().and_then(|a| recorded.get(&(*delivery, a)));
        match record {
            None => {
                wire.unaccounted += 1;
                let first = copies[0];
                findings.push(format!(
                    "delivery {delivery} attempt {attempt} ({} to {} via {}, message {}): assetflow has no record of it",
                    first.kind.as_str(),
                    first.terminal_id,
                    first.gateway_id,
                    first.message_id.as_deref().unwrap_or("without an id")
                ));
            }
            Some(&Recorded { sent_at, delivered_at: Some(delivered_at), .. }) if sent_at > delivered_at => {
                after_receipt += 1;
                findings.push(format!(
                    "delivery {delivery} attempt {attempt} was sent at {} after its receipt was taken in at {}",
                    at(sent_at),
                    at(delivered_at)
                ));
            }
            Some(_) => {
                if !received_before.insert(*delivery) {
                    wire.retransmissions += 1;
                }
            }
        }
    }

    // The same asset, certificate or certificate notice under two delivery ids.
    let mut subjects: BTreeMap<String, BTreeSet<Uuid>> = BTreeMap::new();
    for m in &messages {
        if let Some(subject) = subject(m) {
            subjects.entry(subject).or_default().insert(m.delivery_id);
        }
    }
    let mut twice = 0;
    for (subject, deliveries) in subjects.iter().filter(|(_, d)| d.len() > 1) {
        twice += 1;
        let ids: Vec<String> = deliveries.iter().map(Uuid::to_string).collect();
        findings.push(format!("{subject} received under {} deliveries: {}", deliveries.len(), ids.join(", ")));
    }

    wire.duplicates = [
        (ONE_SUBJECT_TWO_DELIVERIES, twice),
        (SENT_AFTER_RECEIPT, after_receipt),
        (ONE_ATTEMPT_TWO_MESSAGE_IDS, republished),
    ]
    .into_iter()
    .map(|(check, n)| (check.to_string(), n))
    .collect();
    wire.duplicated = wire.duplicates.values().sum();
    if findings.len() > FINDINGS_SHOWN {
        let more = findings.len() - FINDINGS_SHOWN;
        findings.truncate(FINDINGS_SHOWN);
        findings.push(format!("… and {more} more"));
    }
    wire.findings = findings;
    wire
}

/// subject is what a reception hands over that must reach its terminal once: an asset, a
/// certificate, or a notice about a certificate (one per certificate and code, as the database's
/// `certificate_notice` check has it). Refusals and other notices have none, nor a booking's notice
/// of a change of its product (`booking_modified`), which it gets once for each change.
fn subject(r: &Reception) -> Option<String> {
    match r.kind {
        DeliveryKind::Asset => r.asset_id.map(|id| format!("asset {id}")),
        DeliveryKind::Certificate => r.certificate_id.map(|id| format!("certificate {id}")),
        DeliveryKind::ReceiptCertificate => r.certificate_id.map(|id| format!("receipt certificate {id}")),
        DeliveryKind::Message | DeliveryKind::DownloadRequest | DeliveryKind::RevocationRequest => {
            let (code, certificate) = (r.code.as_deref()?, r.certificate_id?);
            if code == "booking_modified" {
                return None;
            }
            Some(format!("{} {code} about certificate {certificate}", r.kind.as_str()))
        }
        DeliveryKind::Refusal | DeliveryKind::ConfirmationRequest => None,
    }
}

/// Recorded is an attempt as assetflow recorded it: when it was sent, and when its delivery's
/// receipt was taken in (the receipt message's arrival), if one was.
#[derive(Queryable)]
struct Recorded {
    delivery_id: Uuid,
    attempt: i32,
    sent_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
}

/// recorded reads every attempt assetflow made of `deliveries`, by delivery id and attempt.
fn recorded(conn: &mut PgConnection, deliveries: &[Uuid]) -> QueryResult<HashMap<(Uuid, i32), Recorded>> {
    use crate::domain::schema::{deliveries as d, delivery_attempts as a};
    let mut recorded = HashMap::new();
    for chunk in deliveries.chunks(10_000) {
        let rows: Vec<Recorded> = a::table
            .inner_join(d::table.on(d::id.eq(a::delivery_id)))
            .filter(a::delivery_id.eq_any(chunk))
            .select((a::delivery_id, a::attempt, a::sent_at, d::delivered_at))
            .load(conn)?;
        recorded.extend(rows.into_iter().map(|r| ((r.delivery_id, r.attempt), r)));
    }
    Ok(recorded)
}

fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    /// Clock is a test's view of the wire: the receptions a gateway recorded and the attempts
    /// assetflow recorded, seconds after `t0`.
    struct Clock {
        t0: DateTime<Utc>,
        receptions: Vec<Reception>,
        recorded: HashMap<(Uuid, i32), Recorded>,
    }

    impl Clock {
        fn new() -> Clock {
            Clock { t0: Utc::now(), receptions: Vec::new(), recorded: HashMap::new() }
        }

        fn at(&self, seconds: i64) -> DateTime<Utc> {
            self.t0 + TimeDelta::seconds(seconds)
        }

        /// Clock::sent records that assetflow sent `attempt` of `delivery` at `sent`, its receipt
        /// taken in at `delivered` (if it was).
        fn sent(&mut self, delivery: Uuid, attempt: i32, sent: i64, delivered: Option<i64>) {
            let record = Recorded {
                delivery_id: delivery,
                attempt,
                sent_at: self.at(sent),
                delivered_at: delivered.map(|d| self.at(d)),
            };
            for r in self.recorded.values_mut().filter(|r| r.delivery_id == delivery) {
                r.delivered_at = record.delivered_at;
            }
            self.recorded.insert((delivery, attempt), record);
        }

        /// Clock::received records that the gateway took `attempt` of an asset delivery under
        /// `message_id`.
        fn received(&mut self, delivery: Uuid, attempt: u32, asset: Uuid, message_id: &str) {
            self.receptions.push(Reception {
                received_at: Utc::now(),
                gateway_id: "gw-1".into(),
                message_id: Some(message_id.into()),
                redelivery: false,
                delivery_id: delivery,
                attempt,
                kind: DeliveryKind::Asset,
                terminal_id: "t-1".into(),
                sent_at: Utc::now(),
                asset_id: Some(asset),
                certificate_id: None,
                code: None,
            });
        }

        fn judge(&self) -> Wire {
            judge(&self.receptions, &self.recorded)
        }
    }

    fn counts(wire: &Wire) -> (i64, i64, i64, i64, i64, i64) {
        let d = |check: &str| wire.duplicates[check];
        (
            wire.redeliveries,
            wire.retransmissions,
            d(ONE_SUBJECT_TWO_DELIVERIES),
            d(SENT_AFTER_RECEIPT),
            d(ONE_ATTEMPT_TWO_MESSAGE_IDS),
            wire.unaccounted,
        )
    }

    #[test]
    fn the_same_message_received_again_is_a_redelivery_and_no_duplicate() {
        let mut wire = Clock::new();
        let (delivery, asset) = (Uuid::now_v7(), Uuid::now_v7());
        wire.sent(delivery, 1, 0, Some(1));
        wire.received(delivery, 1, asset, "m-1");
        wire.received(delivery, 1, asset, "m-1");
        let judged = wire.judge();
        assert_eq!(counts(&judged), (1, 0, 0, 0, 0, 0));
        assert_eq!((judged.received, judged.messages, judged.duplicated), (2, 1, 0));
        assert!(judged.problems().is_empty(), "{judged:?}");
    }

    #[test]
    fn a_retransmission_made_before_the_receipt_was_taken_in_is_counted_and_no_duplicate() {
        let mut wire = Clock::new();
        let (delivery, asset) = (Uuid::now_v7(), Uuid::now_v7());
        // Attempt 1's receipt came late, at 5 s, after attempt 2 went out at 4 s.
        wire.sent(delivery, 1, 0, None);
        wire.sent(delivery, 2, 4, Some(5));
        wire.received(delivery, 1, asset, "m-1");
        wire.received(delivery, 2, asset, "m-2");
        let judged = wire.judge();
        assert_eq!(counts(&judged), (0, 1, 0, 0, 0, 0));
        assert!(judged.problems().is_empty(), "{judged:?}");
    }

    #[test]
    fn an_attempt_sent_after_the_receipt_was_taken_in_is_a_duplicate() {
        let mut wire = Clock::new();
        let (delivery, asset) = (Uuid::now_v7(), Uuid::now_v7());
        wire.sent(delivery, 1, 0, Some(1));
        wire.sent(delivery, 2, 3, Some(1));
        wire.received(delivery, 1, asset, "m-1");
        wire.received(delivery, 2, asset, "m-2");
        let judged = wire.judge();
        assert_eq!(counts(&judged), (0, 0, 0, 1, 0, 0));
        assert_eq!(judged.problems(), vec!["duplicate on the wire: sent_after_receipt = 1".to_string()]);
        assert!(judged.findings[0].contains(&format!("delivery {delivery} attempt 2 was sent at")), "{judged:?}");
    }

    #[test]
    fn one_attempt_under_two_message_ids_is_a_duplicate() {
        let mut wire = Clock::new();
        let (delivery, asset) = (Uuid::now_v7(), Uuid::now_v7());
        wire.sent(delivery, 1, 0, Some(1));
        wire.received(delivery, 1, asset, "m-1");
        wire.received(delivery, 1, asset, "m-9");
        wire.received(delivery, 1, asset, "m-9");
        let judged = wire.judge();
        assert_eq!(counts(&judged), (1, 0, 0, 0, 1, 0));
        assert_eq!(judged.findings, vec![format!("delivery {delivery} attempt 1 received as 2 messages: m-1, m-9")]);
    }

    #[test]
    fn one_asset_under_two_delivery_ids_is_a_duplicate_and_an_attempt_never_recorded_is_unaccounted() {
        let mut wire = Clock::new();
        let (delivery, again, asset) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        wire.sent(delivery, 1, 0, Some(1));
        wire.received(delivery, 1, asset, "m-1");
        wire.received(again, 1, asset, "m-2");
        let judged = wire.judge();
        assert_eq!(counts(&judged), (0, 0, 1, 0, 0, 1));
        assert_eq!(judged.duplicated, 1);
        assert_eq!(judged.problems().len(), 2, "{:?}", judged.problems());
    }

    #[test]
    fn a_certificate_notice_is_one_per_certificate_and_code_and_a_refusal_is_about_nothing() {
        let id = Uuid::now_v7();
        let reception = |kind, code: Option<&str>| Reception {
            received_at: Utc::now(),
            gateway_id: "gw-1".into(),
            message_id: None,
            redelivery: false,
            delivery_id: Uuid::now_v7(),
            attempt: 1,
            kind,
            terminal_id: "t-1".into(),
            sent_at: Utc::now(),
            asset_id: None,
            certificate_id: Some(id),
            code: code.map(str::to_string),
        };
        let expiring = subject(&reception(DeliveryKind::Message, Some("certificate_expiring")));
        let past_due = subject(&reception(DeliveryKind::Message, Some("certificate_past_due")));
        assert!(expiring.is_some() && expiring != past_due);
        assert_eq!(subject(&reception(DeliveryKind::Refusal, None)), None);
        assert_eq!(subject(&reception(DeliveryKind::Certificate, None)), Some(format!("certificate {id}")));
        assert_eq!(subject(&reception(DeliveryKind::Message, None)), None, "a notice without a code names nothing");
        let changed = subject(&reception(DeliveryKind::Message, Some("booking_modified")));
        assert_eq!(changed, None, "a booking is told of each change of its product");
    }
}
