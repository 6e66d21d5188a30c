//! The wire: what assetflow and its parties say to each other. Message types and their JSON
//! Schemas (`schemas/`), the reasons a request is refused or a message dead-lettered, and the AMQP
//! topology as data. Nothing here talks to a broker or a database.

pub mod dead_letter;
pub mod messages;
pub mod refusal;
pub mod schema;
pub mod topology;
