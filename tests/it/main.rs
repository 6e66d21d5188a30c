//! Integration tests against the real RabbitMQ and PostgreSQL. See harness.rs for the isolation.

mod harness;

mod failures;
mod flows;
mod processes;
mod refusals;
