//! The transaction: a batch's messages claimed in the inbox, handled, and their outgoing messages
//! written to the outbox, all in one commit. A redelivered message finds its inbox row and has no
//! second effect.

use std::sync::Arc;

use diesel::prelude::*;

use super::handler::Dispatch;
use super::{Cx, Failure, Incoming};
use crate::contracts::dead_letter::DeadLetterReason;
use crate::runtime::db::schema::inbox;
use crate::runtime::metrics;
use crate::runtime::outbox::{self, Handoff};

/// Work is a message to carry out, with its handler and the span its log lines go to.
pub type Work = (Arc<dyn Dispatch>, Incoming, tracing::Span);

/// handle_together carries out several messages in one transaction, each unless its inbox row
/// says this pool already has: for each, true if it was new. It all commits or, if any handler
/// fails, none of it does, and the failure is returned.
pub fn handle_together(
    conn: &mut PgConnection,
    handoff: &Handoff,
    pool: &str,
    work: &[Work],
) -> Result<Vec<bool>, Failure> {
    let lease = handoff.lease();
    let (fresh, outgoing) = metrics::held(|| {
        conn.transaction(|conn| {
            let incoming: Vec<&Incoming> = work.iter().map(|(_, incoming, _)| incoming).collect();
            let fresh = claim_inbox_many(conn, pool, &incoming)?;
            let (mut extensions, mut outgoing) = (http::Extensions::new(), Vec::new());
            let new: Vec<&Work> = work.iter().zip(&fresh).filter(|(_, fresh)| **fresh).map(|(w, _)| w).collect();
            for run in by_handler(&new) {
                let (handler, first, span) = run[0];
                // One message's log lines carry its ids; several carry their count.
                let span =
                    if run.len() == 1 { span.clone() } else { tracing::info_span!("messages", %pool, n = run.len()) };
                let _entered = span.enter();
                let mut cx = Cx::new(conn, first, &mut extensions, &mut outgoing);
                let messages: Vec<&Incoming> = run.iter().map(|(_, incoming, _)| incoming).collect();
                handle_caught(handler.as_ref(), &mut cx, &messages)?;
            }
            match lease {
                Some(lease) => outbox::enqueue_leased(conn, &outgoing, lease)?,
                None => outbox::enqueue_all(conn, &outgoing)?,
            }
            Ok::<_, Failure>((fresh, outgoing))
        })
    })?;
    // Committed: this process publishes them now, rather than a relay in its next round.
    if lease.is_some() {
        handoff.give(outgoing.into_iter().filter(|m| m.available_at.is_none()).collect());
    }
    Ok(fresh)
}

/// by_handler groups a batch's messages for their handlers: a handler that takes several at once
/// gets its messages together (up to its [`max_batch`](super::Handler::max_batch)), where the first
/// appears, and every other message goes alone, in its place. Messages
/// handled together in one transaction were in the queues together, so none was caused by
/// another, and none needs another's effect first.
fn by_handler<'w>(work: &[&'w Work]) -> Vec<Vec<&'w Work>> {
    let mut groups: Vec<Vec<&Work>> = Vec::new();
    for w in work {
        let handler = &w.0;
        let limit = handler.max_batch();
        let joins = |g: &&mut Vec<&Work>| Arc::ptr_eq(&g[0].0, handler) && g.len() < limit;
        match (limit > 1).then(|| groups.iter_mut().find(joins)).flatten() {
            Some(group) => group.push(w),
            None => groups.push(vec![w]),
        }
    }
    groups
}

/// handle_caught runs a handler, turning a panic into a dead letter: a bug met by some input must
/// not take the worker, or the other messages of its batch, down with it. The transaction is rolled
/// back like that of any failure, and the message is kept in `dead_letters` for a replay once the
/// bug is fixed.
fn handle_caught(handler: &dyn Dispatch, cx: &mut Cx<'_>, messages: &[&Incoming]) -> Result<(), Failure> {
    let handled = || handler.dispatch(cx, messages);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(handled)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        tracing::error!(panic = %what, "the handler panicked");
        Err(Failure::permanent(DeadLetterReason::HandlerFailed, format!("the handler panicked: {what}")))
    })
}

/// claim_inbox_many is [`claim_inbox`] for several messages in one statement: for each, whether
/// it is new. A message id repeated in the batch is new only the first time.
fn claim_inbox_many(conn: &mut PgConnection, pool: &str, incoming: &[&Incoming]) -> QueryResult<Vec<bool>> {
    use diesel::sql_types::{Array, Text};
    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = Text)]
        message_id: String,
    }
    let ids: Vec<&str> = incoming.iter().map(|m| m.message_id.as_str()).collect();
    let types: Vec<&str> = incoming.iter().map(|m| m.message_type.as_str()).collect();
    let claimed: Vec<Claimed> = crate::runtime::db::prepared(
        "INSERT INTO inbox (pool, message_id, message_type)
         SELECT $pool, message_id, message_type FROM unnest($message_ids::text[], $message_types::text[]) AS m(message_id, message_type)
         ON CONFLICT DO NOTHING
         RETURNING message_id",
    )
    .bind::<Text, _>("pool", pool)
    .bind::<Array<Text>, _>("message_ids", &ids)
    .bind::<Array<Text>, _>("message_types", &types)
    .load(conn)?;
    let mut new: std::collections::HashSet<String> = claimed.into_iter().map(|c| c.message_id).collect();
    Ok(ids.iter().map(|id| new.remove(*id)).collect())
}

/// claim_inbox records that this pool processed the message; false if it already had.
pub(super) fn claim_inbox(conn: &mut PgConnection, pool: &str, incoming: &Incoming) -> QueryResult<bool> {
    let inserted = diesel::insert_into(inbox::table)
        .values((
            inbox::pool.eq(pool),
            inbox::message_id.eq(&incoming.message_id),
            inbox::message_type.eq(&incoming.message_type),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?;
    Ok(inserted == 1)
}
