//! Who may answer for a partner, a gateway or an issuer (`docs/security.md#who-may-answer`).
//!
//! A settlement result is taken only from the partner its settlement went to, a delivery receipt
//! only from the gateway its delivery went to, and an issuer's change only from the issuer of the
//! product it changes. A party proves who it is in either of two
//! ways, and every way it is set up with must hold:
//! - **its broker user**: the message's AMQP `user_id`, which RabbitMQ refuses unless it names the
//!   publishing connection's user, must be the party's `broker_user` (its configuration). It costs
//!   nothing, and the broker enforces it, but it is only as strong as the broker's users.
//! - **its key**: the message's `signature` must verify, over its canonical JSON, with a key
//!   registered for the party (`assetflow parties key`). It holds whoever shares the broker and
//!   whatever relays the message, at the cost of a verification.
//!
//! A party set up with neither can answer for nothing.

use crate::contracts::dead_letter::DeadLetterReason;
use crate::crypto;
use crate::domain::catalogue::{Catalogue, PartyKind};
use crate::runtime::consumer::{Cx, Failure, Incoming};

/// prove checks that `incoming` comes from the party `id` of `kind`, whose configured broker user
/// is `broker_user`. It refuses, as an `unauthenticated_party` dead letter naming what failed,
/// a message the party did not prove it sent.
pub fn prove(
    cx: &mut Cx<'_>,
    kind: PartyKind,
    id: &str,
    broker_user: Option<&str>,
    incoming: &Incoming,
) -> Result<(), Failure> {
    let key = cx.party_key(kind, id)?;
    check(kind, id, broker_user, key.as_deref(), incoming).map_err(|detail| {
        tracing::warn!(party = kind.as_str(), id, user_id = ?incoming.user_id, %detail, "refused: not proven to come from the party it answers for");
        Failure::permanent(DeadLetterReason::UnauthenticatedParty, detail)
    })
}

/// check is [`prove`] once the party's registered key is known: the reason for a refusal, if any.
pub fn check(
    kind: PartyKind,
    id: &str,
    broker_user: Option<&str>,
    key_pem: Option<&str>,
    incoming: &Incoming,
) -> Result<(), String> {
    let party = format!("{} {id}", kind.as_str());
    if broker_user.is_none() && key_pem.is_none() {
        return Err(format!("{party} has no broker user configured and no key registered: it can answer for nothing"));
    }
    if let Some(expected) = broker_user {
        match incoming.user_id.as_deref() {
            Some(user) if user == expected => {}
            Some(user) => return Err(format!("published by broker user {user:?}, not {party}'s {expected:?}")),
            None => return Err(format!("no user_id property: {party} must publish with user_id {expected:?}")),
        }
    }
    if let Some(pem) = key_pem {
        crypto::registered_keys(pem).map_err(|e| format!("{party}'s registered key is unusable: {e}"))?;
        if crypto::verify_registered(pem, &incoming.json).is_err() {
            let why = match incoming.json.get(crypto::SIGNATURE_FIELD) {
                None => "it is not signed",
                Some(_) => "its signature is not by a key registered for it",
            };
            return Err(format!("{why}: {party} signs what it sends"));
        }
    }
    Ok(())
}
