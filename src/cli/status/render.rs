//! The human-readable form of `assetflow status`: a view as text, its times to the millisecond.

use chrono::{DateTime, Utc};

use super::{AssetView, DeliveryView, ReceiptView, RefundView, View};

fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

/// render is the human-readable form.
pub fn render(view: &View) -> String {
    let mut out = String::new();
    match view {
        View::Asset(a) => render_asset(&mut out, a, "", true),
        View::Order(o) => {
            out += &format!("order {}  ({})\n", o.order_id, o.status);
            if let Some(reason) = &o.status_reason {
                out += &format!("  reason      {reason}\n");
            }
            out += &format!("  request     {}\n", o.request_id);
            out += &format!(
                "  product     {} x {} for {}\n",
                o.product_id,
                o.quantity,
                o.recipient_terminal_ids.join(", ")
            );
            out += &format!("  ordered by  {}, paid by {}\n", o.orderer_terminal_id, o.payer_terminal_id);
            out += &format!("  amount      {} {} (minor units)\n", o.amount_minor, o.currency);
            out += &format!("  delivery    {}\n", o.delivery_mode);
            out += &format!("  placed      {}\n", time(&o.created_at));
            if let Some(s) = &o.settlement {
                out += &format!(
                    "  settlement  {} via {} after {} instruction(s){}{}\n",
                    s.status,
                    s.partner_id,
                    s.attempts,
                    s.partner_reference.as_ref().map(|r| format!(", ref {r}")).unwrap_or_default(),
                    s.reason.as_ref().map(|r| format!(", {r}")).unwrap_or_default()
                );
            }
            for r in &o.refunds {
                let of = r.asset_id.map(|a| format!(" of asset {a}")).unwrap_or_else(|| " of the whole payment".into());
                out += &format!("  refund      {}{of}\n", refund_line(r));
            }
            if let Some(r) = &o.receipt_certificate {
                out += &format!("  placed by   submitting receipt certificate {}\n", receipt_line(r));
            }
            for n in &o.notices {
                out += &format!("  notice      {} to {}: {}\n", n.kind, n.terminal_id, n.status);
            }
            // The order shows its refunds and receipt certificate once, above.
            for a in &o.assets {
                out += "\n";
                render_asset(&mut out, a, "  ", false);
            }
        }
        View::ReceiptCertificate(r) => render_receipt(&mut out, r),
        View::Request { request_id, terminal_id, message_type, outcome, reason, received_at } => {
            out += &format!("request {request_id}  {message_type} from {terminal_id}\n");
            out += &format!(
                "  received  {}\n  outcome   {outcome}{}\n",
                time(received_at),
                reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
            );
        }
        View::Refused { request_id, refusals } => {
            out += &format!("request {request_id}  refused before it was recorded\n");
            for r in refusals {
                let from = r.terminal_id.as_deref().unwrap_or("an unknown terminal");
                out += &format!(
                    "  {}  {} from {from}: {} ({})\n",
                    time(&r.refused_at),
                    r.message_type,
                    r.reason,
                    r.detail
                );
            }
        }
    }
    out
}

/// refund_line is a refund on one line: what, why, how it stands, and what its partner said.
fn refund_line(r: &RefundView) -> String {
    let mut line =
        format!("{} {} {} (minor units, cause {}) via {}", r.status, r.amount_minor, r.currency, r.cause, r.partner_id);
    if let Some(reference) = &r.partner_reference {
        line += &format!(", ref {reference}");
    }
    if let Some(reason) = &r.reason {
        line += &format!(", {reason}");
    }
    if r.status == "requested" {
        line += &format!(", {} instruction(s), settlement {} {}", r.instructions, r.settlement_id, r.settlement_status);
    }
    line += &format!(", asked {}", time(&r.requested_at));
    if let Some(at) = &r.answered_at {
        line += &format!(", answered {}", time(at));
    }
    line
}

/// receipt_line names a receipt certificate and how it stands.
fn receipt_line(r: &ReceiptView) -> String {
    format!(
        "{} ({}, {}{}{})",
        r.receipt_certificate_id,
        r.condition,
        r.status,
        r.status_reason.as_ref().map(|why| format!(": {why}")).unwrap_or_default(),
        r.rank.map(|rank| format!(", rank {rank}")).unwrap_or_default()
    )
}

fn render_receipt(out: &mut String, r: &ReceiptView) {
    *out += &format!(
        "receipt certificate {}  {} {} held by {}\n",
        r.receipt_certificate_id, r.condition, r.product_id, r.holder_terminal_id
    );
    *out += &format!(
        "  status       {}{}\n",
        r.status,
        r.status_reason.as_ref().map(|why| format!(" ({why})")).unwrap_or_default()
    );
    if let Some(rank) = r.rank {
        *out += &format!("  rank         {rank}\n");
    }
    *out += &format!("  booked       {}   expires {}\n", time(&r.issued_at), time(&r.expires_at));
    if let Some(by) = &r.submit_by {
        *out += &format!("  submit by    {}\n", time(by));
    }
    *out += &format!("  request      {}, paid by {}\n", r.request_id, r.payer_terminal_id);
    *out += &format!("  asset        {} (reserved)\n", r.asset_id);
    if let Some(order) = &r.order_id {
        *out += &format!(
            "  order        {order}{}\n",
            r.submit_request_id.as_ref().map(|id| format!(" (submitted by request {id})")).unwrap_or_default()
        );
    }
    render_deliveries(out, &r.deliveries, "");
}

fn render_deliveries(out: &mut String, deliveries: &[DeliveryView], indent: &str) {
    if deliveries.is_empty() {
        return;
    }
    *out += &format!("{indent}  deliveries\n");
    for d in deliveries {
        *out += &format!(
            "{indent}    {:<12} to {:<16} {:<10} {} attempt(s){}{}\n",
            d.kind,
            d.terminal_id,
            d.status,
            d.attempts,
            match d.proof.as_deref() {
                Some("terminal") => ", proof: the terminal's signed acknowledgement",
                Some(_) => ", proof: the gateway's receipt",
                None => "",
            },
            d.last_error.as_ref().map(|e| format!(", last error: {e}")).unwrap_or_default()
        );
    }
}

/// render_asset writes an asset; `alone` when it is not shown within its order, which then shows
/// its refunds and receipt certificate itself.
fn render_asset(out: &mut String, a: &AssetView, indent: &str, alone: bool) {
    *out += &format!("{indent}asset {}  {} {} held by {}\n", a.asset_id, a.kind, a.product_id, a.holder_terminal_id);
    *out += &format!("{indent}  status       {}\n", a.status);
    *out += &format!("{indent}  issued       {}   expires {}\n", time(&a.issued_at), time(&a.expires_at));
    if let Some(c) = &a.certificate_expires_at {
        *out += &format!(
            "{indent}  certificate  expires {}{}\n",
            time(c),
            a.certificate_exchanged_at
                .map(|t| format!(", exchanged {}", time(&t)))
                .unwrap_or_else(|| ", not exchanged".into())
        );
    }
    *out += &format!("{indent}  history\n");
    for h in &a.history {
        let from = h.from.clone().unwrap_or_else(|| "(new)".into());
        *out += &format!(
            "{indent}    {}  {from:>30} → {:<30} {}{}\n",
            time(&h.at),
            h.to,
            h.cause,
            h.detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
        );
    }
    if alone {
        if let Some(r) = &a.receipt_certificate {
            *out += &format!("{indent}  bought with  receipt certificate {}\n", receipt_line(r));
        }
        if !a.refunds.is_empty() {
            *out += &format!("{indent}  refunds\n");
            for r in &a.refunds {
                *out += &format!("{indent}    {}\n", refund_line(r));
            }
        }
    }
    render_deliveries(out, &a.deliveries, indent);
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use uuid::Uuid;

    use super::*;
    use crate::cli::status::AssetView;

    fn at(second: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 7, 9, 0, second).unwrap()
    }

    fn receipt() -> ReceiptView {
        ReceiptView {
            receipt_certificate_id: Uuid::from_u128(1),
            request_id: "book-1".into(),
            product_id: "raffle".into(),
            holder_terminal_id: "alice".into(),
            payer_terminal_id: "alice".into(),
            condition: "lottery".into(),
            status: "issued".into(),
            status_reason: None,
            rank: Some(2),
            issued_at: at(0),
            expires_at: at(59),
            submit_by: Some(at(30)),
            asset_id: Uuid::from_u128(2),
            order_id: Some(Uuid::from_u128(3)),
            submit_request_id: Some("submit-1".into()),
            deliveries: Vec::new(),
        }
    }

    fn refund(status: &str) -> RefundView {
        RefundView {
            refund_id: Uuid::from_u128(4),
            asset_id: Some(Uuid::from_u128(2)),
            amount_minor: 1_000,
            currency: "JPY".into(),
            cause: "holder".into(),
            status: status.into(),
            reason: None,
            requested_at: at(1),
            answered_at: (status != "requested").then(|| at(2)),
            settlement_id: Uuid::from_u128(5),
            partner_id: "card-co".into(),
            settlement_status: if status == "requested" { "abandoned" } else { "settled" }.into(),
            instructions: 3,
            partner_reference: (status != "requested").then(|| "CC-1".into()),
        }
    }

    #[test]
    fn an_asset_shows_its_refunds_and_the_receipt_certificate_it_was_bought_through() {
        let asset = AssetView {
            asset_id: Uuid::from_u128(2),
            order_id: Uuid::from_u128(3),
            kind: "ticket".into(),
            product_id: "raffle".into(),
            holder_terminal_id: "alice".into(),
            status: "refunded".into(),
            issued_at: at(0),
            expires_at: at(59),
            has_exchange_certificate: false,
            certificate_expires_at: None,
            certificate_exchanged_at: None,
            history: Vec::new(),
            deliveries: Vec::new(),
            refunds: vec![refund("refunded"), refund("requested")],
            receipt_certificate: Some(receipt()),
        };
        let shown = render(&View::Asset(asset));
        assert!(
            shown.contains(
                "bought with  receipt certificate 00000000-0000-0000-0000-000000000001 (lottery, issued, rank 2)"
            ),
            "{shown}"
        );
        assert!(
            shown.contains("refunded 1000 JPY (minor units, cause holder) via card-co, ref CC-1, asked 2026-12-07 09:00:01.000Z, answered 2026-12-07 09:00:02.000Z"),
            "{shown}"
        );
        // A refund still requested says how far its settlement got.
        assert!(
            shown.contains("requested 1000 JPY (minor units, cause holder) via card-co, 3 instruction(s), settlement 00000000-0000-0000-0000-000000000005 abandoned"),
            "{shown}"
        );
    }

    #[test]
    fn a_receipt_certificate_shows_its_condition_status_time_to_submit_and_order() {
        let shown = render(&View::ReceiptCertificate(receipt()));
        for line in [
            "receipt certificate 00000000-0000-0000-0000-000000000001  lottery raffle held by alice",
            "  status       issued",
            "  rank         2",
            "  submit by    2026-12-07 09:00:30.000Z",
            "  asset        00000000-0000-0000-0000-000000000002 (reserved)",
            "  order        00000000-0000-0000-0000-000000000003 (submitted by request submit-1)",
        ] {
            assert!(shown.contains(line), "{line:?} in:\n{shown}");
        }
    }
}
