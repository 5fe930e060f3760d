//! switchyard: books control actions on home-energy devices and never lets
//! two writers silently fight over a device.
//!
//! Layers (dependencies point inward): `api` (gRPC) → `domain` ← `store`.

pub mod api;
pub mod auth;
pub mod cli;
pub mod delivery;
pub mod dispatch;
pub mod domain;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod webhooks;
