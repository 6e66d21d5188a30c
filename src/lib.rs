//! assetflow: the back office of an electronic asset service, as a message-queue-driven batch and
//! stream processor. What it must do is `docs/product.md`; how it is built is
//! `docs/architecture.md`.
//!
//! # The map
//!
//! The code stands on floors. A module imports only from the floors below its own, never from its
//! own floor's neighbours at the top level, and never upward; `tests/layers.rs` reads the table
//! below and fails on any import that breaks it.
//!
//! | floor | module      | what lives there |
//! |-------|-------------|------------------|
//! | 5     | `cli`       | the commands, the built-in simulators (`cli::simulate`) and the benchmarks (`cli::bench`) |
//! | 4     | `service`   | the composition root: wiring, the handler and replayer registries, the job list, the scheduler, health |
//! | 3     | `domain`    | the business: catalogue, terminal requests, the status machine, settlement, issuance, delivery, the scans, the replayers |
//! | 2     | `runtime`   | the generic machinery: consumers and the one outcome switch, the outbox, the dead-letter store, the database, the broker; it knows no pool, product or terminal |
//! | 1     | `contracts` | the wire: message types, their schemas, refusal and dead-letter reasons, the AMQP topology as data |
//! | 0     | `config`    | configuration: embedded defaults, a file, the environment; strict |
//! | 0     | `crypto`    | signatures, canonical JSON, keys |

pub mod cli;
pub mod config;
pub mod contracts;
pub mod crypto;
pub mod domain;
pub mod runtime;
pub mod service;
