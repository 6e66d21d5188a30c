//! Integration tests against the real RabbitMQ and PostgreSQL. See harness.rs for the isolation.

mod harness;

mod batch;
mod bookings;
mod changes;
mod chaos;
mod confirmations;
mod dead_lettering;
mod failures;
mod flows;
mod issuer_changes;
mod monitoring;
mod operator_input;
mod outbox;
mod owed;
mod parties;
mod processes;
mod refunds;
mod refusals;
mod shutdown;
mod signatures;
mod statements;
mod status_guard;
mod support;
mod tls;
mod together;
mod transitions;
mod wire;
