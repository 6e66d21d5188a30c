//! assetflow: the back office of an electronic asset service, as a message-queue-driven batch and
//! stream processor. See README.md for the architecture and SPEC.md for the product.

pub mod app;
pub mod bench;
pub mod broker;
pub mod catalogue;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod db;
pub mod dead_letter;
pub mod delivery;
pub mod health;
pub mod issuance;
pub mod messages;
pub mod outbox;
pub mod pool;
pub mod refusal;
pub mod requests;
pub mod scheduler;
pub mod settlement;
pub mod simulate;
pub mod status_machine;
pub mod telemetry;
