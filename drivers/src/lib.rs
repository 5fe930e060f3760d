//! The driver side of switchyard: the shared vocabulary of commands,
//! units and capabilities ([`model`]), the contracts a driver implements
//! ([`driver`], [`factory`]), the [`Registry`] that maps a driver kind to
//! its factory, and the built-in drivers, assembled by [`builtin()`].
//!
//! This crate depends on nothing else of switchyard's; the service builds
//! its domain on the vocabulary defined here.

pub mod builtin;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod driver;
pub mod factory;
pub mod foxess;
pub mod model;
pub mod operator;
pub mod registry;
pub mod simulated;

pub use builtin::builtin;
pub use driver::*;
pub use factory::{ConfigError, ConfigErrors, DeviceSpec, DriverFactory};
pub use model::*;
pub use operator::OperatorPolicy;
pub use registry::Registry;
