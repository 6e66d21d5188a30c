//! The domain: what assetflow does with the messages (`docs/product.md`). The pools' handlers
//! (settlement, issuance, delivery), bookings, the terminal requests they authenticate, the catalogue, the
//! status machine that alone changes an asset's status, and the scans the scheduler runs.

pub mod bookings;
pub mod catalogue;
pub mod delivery;
pub mod issuance;
pub mod metrics;
pub mod parties;
pub mod requests;
pub mod scans;
pub mod schema;
pub mod settlement;
pub mod status;
