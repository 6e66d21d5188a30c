//! The gateway's ledger: one JSON line for every delivery message the simulated gateway took from
//! its queue, appended and synced before the gateway acts on it (`--gateway-ledger PATH`). It is
//! the gateway side's record, in a file of the gateway's own, not a table of assetflow's:
//! `assetflow audit --gateway-ledger PATH` (`cli::audit::wire`) sets it against what assetflow
//! recorded, to see what reached a gateway twice (`docs/operations.md#duplicates-on-the-wire`).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::contracts::messages::{DeliveryKind, GatewayDelivery};

/// Reception is one delivery message as a gateway took it from its queue: one ledger line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reception {
    /// When the gateway took it.
    pub received_at: DateTime<Utc>,
    pub gateway_id: String,
    /// The AMQP `message_id` (assetflow sets one on every publish).
    pub message_id: Option<String>,
    /// Whether this is the same message again: the broker flagged it redelivered, or this ledger
    /// already holds its message id.
    pub redelivery: bool,
    pub delivery_id: Uuid,
    pub attempt: u32,
    pub kind: DeliveryKind,
    pub terminal_id: String,
    /// When assetflow says it made the attempt (the message's `sent_at`).
    pub sent_at: DateTime<Utc>,
    /// The asset the content is about: an asset's, a certificate's, a notice's.
    pub asset_id: Option<Uuid>,
    /// The certificate the content is, or is about.
    pub certificate_id: Option<Uuid>,
    /// A notice's code (`certificate_expiring`, `certificate_revoked`, …).
    pub code: Option<String>,
}

impl Reception {
    /// Reception::of is what a gateway records of `message`, taken now under `message_id`, with
    /// the broker's `redelivered` flag.
    pub fn of(message: &GatewayDelivery, message_id: Option<String>, redelivered: bool) -> Reception {
        let content = &message.content;
        let id = |pointers: &[&str]| {
            pointers.iter().find_map(|p| content.pointer(p).and_then(Value::as_str)).and_then(|s| s.parse().ok())
        };
        Reception {
            received_at: Utc::now(),
            gateway_id: message.gateway_id.clone(),
            message_id,
            redelivery: redelivered,
            delivery_id: message.delivery_id,
            attempt: message.attempt,
            kind: message.kind,
            terminal_id: message.terminal_id.clone(),
            sent_at: message.sent_at,
            asset_id: id(&["/asset/asset_id", "/certificate/asset_id", "/asset_id"]),
            certificate_id: id(&[
                "/certificate/certificate_id",
                "/receipt_certificate/receipt_certificate_id",
                "/certificate_id",
            ]),
            code: content.get("code").and_then(Value::as_str).map(str::to_string),
        }
    }
}

/// Ledger appends receptions to a file, one line each, synced before `record` returns. Several
/// gateways of one simulator share it; lines are whole because each is written under the lock
/// in one `write`, to a file opened for appending (so a simulator started again appends too).
#[derive(Clone)]
pub struct Ledger {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    file: File,
    /// Message ids already in the ledger: a message seen again is flagged as a redelivery.
    seen: HashSet<String>,
}

impl Ledger {
    /// Ledger::open opens (or creates) the ledger at `path` for appending, reading the message
    /// ids it already holds.
    pub fn open(path: &Path) -> anyhow::Result<Ledger> {
        let context = |e: std::io::Error| anyhow::anyhow!("gateway ledger {}: {e}", path.display());
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path).map_err(context)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(context)?;
        let seen = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Reception>(line).ok())
            .filter_map(|r| r.message_id)
            .collect();
        // A line cut short (a machine that lost power mid-write) must not swallow the next one.
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n").map_err(context)?;
        }
        Ok(Ledger { path: path.to_path_buf(), inner: Arc::new(Mutex::new(Inner { file, seen })) })
    }

    /// Ledger::record appends `reception`, flagged as a redelivery if its message id is already
    /// in the ledger, and syncs the file. It runs on the blocking pool.
    pub async fn record(&self, mut reception: Reception) -> anyhow::Result<Reception> {
        let (inner, path) = (self.inner.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut inner = inner.lock().expect("not poisoned");
            if let Some(id) = &reception.message_id {
                reception.redelivery |= !inner.seen.insert(id.clone());
            }
            let mut line = serde_json::to_vec(&reception).expect("serializes");
            line.push(b'\n');
            inner
                .file
                .write_all(&line)
                .and_then(|()| inner.file.sync_data())
                .map_err(|e| anyhow::anyhow!("gateway ledger {}: {e}", path.display()))?;
            Ok(reception)
        })
        .await?
    }
}

/// received is the gateway simulator's first step with a delivery message it took from its queue:
/// it records the message in `ledger`, if there is one, and says whether to go on and answer it.
/// Not when the ledger cannot be written (the message goes back to the queue, so that nothing the
/// gateway acted on is missing from its ledger), nor, for a share `requeue_rate` of the messages
/// arriving for the first time, to play a gateway that fails before its acknowledgement: the
/// broker then delivers the same message again, flagged redelivered.
pub async fn received(
    ledger: Option<&Ledger>,
    delivery: &lapin::message::Delivery,
    message: &GatewayDelivery,
    requeue_rate: f64,
) -> bool {
    if let Some(ledger) = ledger {
        let message_id = delivery.properties.message_id().as_ref().map(|id| id.to_string());
        if let Err(e) = ledger.record(Reception::of(message, message_id, delivery.redelivered)).await {
            tracing::error!(error = %e, delivery_id = %message.delivery_id, "gateway simulator: not recorded; returned to the queue");
            return false;
        }
    }
    delivery.redelivered || rand::random::<f64>() >= requeue_rate
}

/// Contents is a ledger's content: its receptions in the order they were recorded, and the numbers
/// of the lines that are not one.
#[derive(Debug, Default)]
pub struct Contents {
    pub receptions: Vec<Reception>,
    pub unreadable: Vec<usize>,
}

/// read reads the ledger at `path`; an empty line is skipped, any other that is not a reception
/// is listed by its number (from 1).
pub fn read(path: &Path) -> anyhow::Result<Contents> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("gateway ledger {}: {e}", path.display()))?;
    let mut read = Contents::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str(line) {
            Ok(reception) => read.receptions.push(reception),
            Err(_) => read.unreadable.push(i + 1),
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::messages::kinds;

    fn delivery(kind: DeliveryKind, content: Value) -> GatewayDelivery {
        GatewayDelivery {
            message_type: kinds::DELIVERY.into(),
            delivery_id: Uuid::now_v7(),
            attempt: 1,
            kind,
            terminal_id: "t-1".into(),
            gateway_id: "gw-1".into(),
            sent_at: Utc::now(),
            request_id: None,
            content,
        }
    }

    #[test]
    fn a_reception_names_what_its_content_is_about() {
        let (asset, certificate) = (Uuid::now_v7(), Uuid::now_v7());
        let of = |kind, content| Reception::of(&delivery(kind, content), None, false);
        let r = of(DeliveryKind::Asset, serde_json::json!({"asset": {"asset_id": asset.to_string()}}));
        assert_eq!((r.asset_id, r.certificate_id, r.code), (Some(asset), None, None));
        let content = serde_json::json!({"certificate": {"certificate_id": certificate.to_string(), "asset_id": asset.to_string()}});
        let r = of(DeliveryKind::Certificate, content);
        assert_eq!((r.asset_id, r.certificate_id), (Some(asset), Some(certificate)));
        let content =
            serde_json::json!({"code": "certificate_revoked", "text": "…", "certificate_id": certificate.to_string()});
        let r = of(DeliveryKind::RevocationRequest, content);
        assert_eq!(
            (r.asset_id, r.certificate_id, r.code.as_deref()),
            (None, Some(certificate), Some("certificate_revoked"))
        );
    }

    #[tokio::test]
    async fn a_message_id_already_in_the_ledger_is_flagged_a_redelivery_even_after_a_restart() {
        let path = std::env::temp_dir().join(format!("assetflow-ledger-{}.jsonl", Uuid::now_v7()));
        let message = delivery(DeliveryKind::Refusal, serde_json::json!({}));
        let ledger = Ledger::open(&path).unwrap();
        let first = ledger.record(Reception::of(&message, Some("m-1".into()), false)).await.unwrap();
        let other = ledger.record(Reception::of(&message, Some("m-2".into()), false)).await.unwrap();
        assert!(!first.redelivery && !other.redelivery);
        // A line cut short by a crash, then the simulator started again on the same file.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"received_at\":").unwrap();
        let ledger = Ledger::open(&path).unwrap();
        let again = ledger.record(Reception::of(&message, Some("m-1".into()), false)).await.unwrap();
        assert!(again.redelivery, "m-1 is in the ledger already");
        let flagged = ledger.record(Reception::of(&message, Some("m-3".into()), true)).await.unwrap();
        assert!(flagged.redelivery, "the broker's flag is kept");
        let read = read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read.receptions, vec![first, other, again, flagged]);
        assert_eq!(read.unreadable, vec![3], "the cut line is unreadable, and the next one whole");
    }
}
