//! The service: the composition root. It builds every handler and scan with what it needs, says
//! which queue takes which message, runs the pools, the outbox, the scheduler and the HTTP
//! listener, and stops them in order.

pub mod app;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod scheduler;
