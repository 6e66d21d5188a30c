//! The human-readable form of `assetflow status`: a view as text, its times to the millisecond.

use chrono::{DateTime, Utc};

use super::{AssetView, ChangeView, DeliveryView, ModificationView, ReceiptView, RefundView, View};

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
            if let Some(c) = &o.change {
                out += &format!("  placed by   change {} of asset {} ({})\n", c.change_id, c.asset_id, step_line(c));
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

/// step_line is where a change of product stands, and why, on one line.
fn step_line(c: &ChangeView) -> String {
    let mut line = c.step.clone();
    if let Some(reason) = &c.reason {
        line += &format!(": {reason}");
    }
    line += &format!(", since {}", time(&c.updated_at));
    line
}

/// render_change writes a change of product: its step, its new product and order, and the
/// refunds it asked for.
fn render_change(out: &mut String, c: &ChangeView, indent: &str) {
    *out += &format!("{indent}    {}  {} (request {})\n", c.change_id, step_line(c), c.request_id);
    *out += &format!(
        "{indent}      for {}: new order {} ({}{})\n",
        c.new_product_id,
        c.new_order_id,
        c.new_order_status,
        c.new_order_reason.as_ref().map(|why| format!(": {why}")).unwrap_or_default()
    );
    if let Some(refund) = &c.refund_id {
        *out += &format!("{indent}      refund of this asset      {refund}\n");
    }
    if let Some(refund) = &c.compensation_id {
        *out += &format!("{indent}      refund of the new payment {refund}\n");
    }
}

/// render_notice writes a modification notice: the change, its deadline and default, and how it
/// was answered.
fn render_notice(out: &mut String, n: &ModificationView, indent: &str) {
    *out += &format!("{indent}    {}  {}\n", n.notice_id, n.description);
    *out += &format!(
        "{indent}      announced {} by {}, answer by {}, default {}\n",
        time(&n.announced_at),
        n.announced_by,
        time(&n.reply_by),
        n.default_answer
    );
    if n.issued_after_change {
        *out +=
            &format!("{indent}      given at issue: the order was placed before the change, the asset carries it\n");
    }
    match (&n.answer, &n.answered_at) {
        (Some(answer), Some(at)) => {
            let by = match (n.answered_by.as_deref(), &n.request_id) {
                (Some("default"), _) => "by default at the deadline".to_string(),
                (_, Some(request)) => format!("by the holder (request {request})"),
                (by, None) => format!("by {}", by.unwrap_or("the holder")),
            };
            *out += &format!("{indent}      answered {answer} {by} at {}\n", time(at));
            if let Some(outcome) = &n.outcome {
                *out += &format!("{indent}      outcome  {outcome}\n");
            }
        }
        _ => *out += &format!("{indent}      unanswered\n"),
    }
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
    if let Some(old) = &a.lineage.replaces_asset_id {
        *out += &format!("{indent}  replaces     asset {old} (generation {})\n", a.lineage.generation);
    }
    if let Some(new) = &a.lineage.replaced_by_asset_id {
        *out += &format!("{indent}  replaced by  asset {new}\n");
    }
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
    if !a.changes.is_empty() {
        *out += &format!("{indent}  changes\n");
        for c in &a.changes {
            render_change(out, c, indent);
        }
    }
    if !a.modification_notices.is_empty() {
        *out += &format!("{indent}  modification notices\n");
        for n in &a.modification_notices {
            render_notice(out, n, indent);
        }
    }
    render_deliveries(out, &a.deliveries, indent);
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use uuid::Uuid;

    use super::*;
    use crate::cli::status::{AssetView, Lineage};

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
            lineage: Lineage::default(),
            changes: Vec::new(),
            modification_notices: Vec::new(),
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

    fn asset(status: &str) -> AssetView {
        AssetView {
            asset_id: Uuid::from_u128(2),
            order_id: Uuid::from_u128(3),
            kind: "ticket".into(),
            product_id: "concert".into(),
            holder_terminal_id: "alice".into(),
            status: status.into(),
            issued_at: at(0),
            expires_at: at(59),
            has_exchange_certificate: true,
            certificate_expires_at: Some(at(50)),
            certificate_exchanged_at: None,
            history: Vec::new(),
            deliveries: Vec::new(),
            refunds: Vec::new(),
            receipt_certificate: None,
            lineage: Lineage::default(),
            changes: Vec::new(),
            modification_notices: Vec::new(),
        }
    }

    #[test]
    fn an_asset_shows_its_change_with_its_step_new_product_and_new_order() {
        let mut a = asset("refunded");
        a.changes.push(ChangeView {
            change_id: Uuid::from_u128(6),
            request_id: "change-1".into(),
            asset_id: Uuid::from_u128(2),
            step: "stuck".into(),
            reason: Some("the partner refused to return the new payment".into()),
            new_product_id: "concert-b".into(),
            new_order_id: Uuid::from_u128(7),
            new_order_status: "failed".into(),
            new_order_reason: Some("change_stuck".into()),
            refund_id: Some(Uuid::from_u128(8)),
            compensation_id: Some(Uuid::from_u128(9)),
            created_at: at(3),
            updated_at: at(4),
        });
        let shown = render(&View::Asset(a));
        for line in [
            "  changes\n",
            "    00000000-0000-0000-0000-000000000006  stuck: the partner refused to return the new payment, since 2026-12-07 09:00:04.000Z (request change-1)",
            "      for concert-b: new order 00000000-0000-0000-0000-000000000007 (failed: change_stuck)",
            "      refund of this asset      00000000-0000-0000-0000-000000000008",
            "      refund of the new payment 00000000-0000-0000-0000-000000000009",
        ] {
            assert!(shown.contains(line), "{line:?} in:\n{shown}");
        }
    }

    #[test]
    fn a_replaced_asset_names_its_replacement_and_its_notices_say_how_they_were_answered() {
        let mut old = asset("replaced");
        old.lineage.replaced_by_asset_id = Some(Uuid::from_u128(10));
        let notice = |answer: Option<&str>, by: Option<&str>| ModificationView {
            notice_id: Uuid::from_u128(11),
            issuer_change_id: Uuid::from_u128(12),
            description: "The concert moves to December 27.".into(),
            announced_at: at(5),
            announced_by: "issuer issuer-1 (its reference chg-1)".into(),
            reply_by: at(40),
            default_answer: "refund".into(),
            answer: answer.map(str::to_string),
            answered_by: by.map(str::to_string),
            request_id: (by == Some("holder")).then(|| "m-1".into()),
            answered_at: answer.map(|_| at(6)),
            outcome: answer.map(|_| "replaced by asset 00000000-0000-0000-0000-00000000000a".into()),
            issued_after_change: false,
        };
        old.modification_notices.push(notice(Some("accept"), Some("holder")));
        let shown = render(&View::Asset(old));
        assert!(!shown.contains("given at issue"), "{shown}");
        for line in [
            "  replaced by  asset 00000000-0000-0000-0000-00000000000a",
            "  modification notices\n",
            "    00000000-0000-0000-0000-00000000000b  The concert moves to December 27.",
            "      announced 2026-12-07 09:00:05.000Z by issuer issuer-1 (its reference chg-1), answer by 2026-12-07 09:00:40.000Z, default refund",
            "      answered accept by the holder (request m-1) at 2026-12-07 09:00:06.000Z",
            "      outcome  replaced by asset 00000000-0000-0000-0000-00000000000a",
        ] {
            assert!(shown.contains(line), "{line:?} in:\n{shown}");
        }

        let mut new = asset("awaiting_exchange");
        new.asset_id = Uuid::from_u128(10);
        new.lineage =
            Lineage { generation: 1, replaces_asset_id: Some(Uuid::from_u128(2)), replaced_by_asset_id: None };
        let shown = render(&View::Asset(new));
        assert!(shown.contains("  replaces     asset 00000000-0000-0000-0000-000000000002 (generation 1)"), "{shown}");

        let mut silent = asset("refunded");
        silent.modification_notices.push(notice(Some("refund"), Some("default")));
        let shown = render(&View::Asset(silent));
        assert!(shown.contains("answered refund by default at the deadline at 2026-12-07 09:00:06.000Z"), "{shown}");
        let mut open = asset("awaiting_exchange");
        open.modification_notices.push(notice(None, None));
        assert!(render(&View::Asset(open)).contains("      unanswered\n"));
        let mut at_issue = asset("awaiting_exchange");
        at_issue.modification_notices.push(ModificationView { issued_after_change: true, ..notice(None, None) });
        let shown = render(&View::Asset(at_issue));
        assert!(
            shown.contains("      given at issue: the order was placed before the change, the asset carries it\n"),
            "{shown}"
        );
    }
}
