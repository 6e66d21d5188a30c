//! The consumers: a pool's queues read into batches, each batch handled in one transaction by the
//! handlers the registry names, and every outcome turned into a broker action and a database
//! state in one place ([`outcome`]).
//!
//! A message is acknowledged only after its effect committed. Its effect, the inbox row that marks
//! it processed and the messages it causes (outbox) commit in one transaction, so a redelivery
//! finds the inbox row and has no second effect.
//!
//! | file | what it does |
//! |------|--------------|
//! | `envelope.rs` | a consumed message, parsed once at the door |
//! | `handler.rs` | the handler trait, its context, the registry |
//! | `failure.rs` | how a handler fails, classified at the boundary |
//! | `subscription.rs` | the consumer: subscriptions, batches and the linger |
//! | `execute.rs` | checks at the door, retries, the database-outage hold |
//! | `transaction.rs` | inbox claims, handlers and outbox in one commit |
//! | `outcome.rs` | the one outcome switch: ack, requeue, defer, dead letter |

mod envelope;
mod execute;
mod failure;
mod handler;
mod outcome;
mod subscription;
mod transaction;

pub use envelope::Incoming;
pub use failure::Failure;
pub use handler::{Cx, Dispatch, Handler, Received, Registry, together_unless_repeated};
pub use subscription::Consumer;
pub use transaction::{Work, handle_together};
