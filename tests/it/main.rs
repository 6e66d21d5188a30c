//! Integration tests against the real RabbitMQ and PostgreSQL. See harness.rs for the isolation.

mod harness;

mod batch;
mod chaos;
mod failures;
mod flows;
mod monitoring;
mod operator_input;
mod outbox;
mod owed;
mod processes;
mod refusals;
mod statements;
mod status_guard;
mod support;
mod tls;
mod together;
