//! The scheduler core: identifiers, time, actions and their lifecycle, the
//! conflict rules and strategies, and the domain error. Pure: no gRPC, no
//! SQL. Everything here is testable with plain values and a manual clock.

pub mod action;
pub mod clock;
pub mod conflict;
pub mod device;
pub mod error;
pub mod ids;
pub mod validate;

pub use action::*;
pub use clock::{Clock, ManualClock, SystemClock, Ts};
pub use device::Device;
pub use error::{Conflict, ConflictKind, Error, FieldViolation, Reason};
pub use ids::{ActionId, DeviceId, TenantId};
