//! The human-readable form of `assetflow status`: a view as text, its times to the millisecond.

use chrono::{DateTime, Utc};

use super::{AssetView, View};

fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

/// render is the human-readable form.
pub fn render(view: &View) -> String {
    let mut out = String::new();
    match view {
        View::Asset(a) => render_asset(&mut out, a, ""),
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
            for n in &o.notices {
                out += &format!("  notice      {} to {}: {}\n", n.kind, n.terminal_id, n.status);
            }
            for a in &o.assets {
                out += "\n";
                render_asset(&mut out, a, "  ");
            }
        }
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

fn render_asset(out: &mut String, a: &AssetView, indent: &str) {
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
    if !a.deliveries.is_empty() {
        *out += &format!("{indent}  deliveries\n");
        for d in &a.deliveries {
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
}
