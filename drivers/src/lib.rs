//! The driver side of switchyard: the shared vocabulary of commands,
//! units and capabilities, the [`DriverFactory`] contract, the [`Registry`]
//! that maps a driver kind to its factory, and the built-in drivers.
//!
//! This crate depends on nothing else of switchyard's; the service builds
//! its domain on the vocabulary defined here.

pub mod driver;
pub mod foxess;
pub mod model;
pub mod operator;
pub mod registry;
pub mod simulated;

pub use driver::*;
pub use model::*;
pub use operator::OperatorPolicy;
pub use registry::{ConfigError, DeviceSpec, DriverFactory, Registry};
