//! The drivers that ship with switchyard, assembled in one place.
//!
//! This is the only module that names the drivers: each driver module
//! depends on the contract ([`crate::factory`], [`crate::driver`]) alone,
//! and the [`Registry`] knows no driver. A new built-in driver is one line
//! here.

use std::sync::Arc;

use crate::{
    foxess::FoxessFactory, operator::OperatorPolicy, registry::Registry,
    simulated::SimulatedFactory,
};

/// The registry of every built-in driver under `policy`.
pub fn builtin(policy: &OperatorPolicy) -> Registry {
    let mut r = Registry::new();
    r.register(Arc::new(SimulatedFactory::default()));
    r.register(Arc::new(
        FoxessFactory::default().with_policy(policy.clone()),
    ));
    r
}

impl Registry {
    /// The registry of every built-in driver, with the default operator
    /// policy (no secrets directory, only the OEMs' own clouds).
    pub fn builtin() -> Self {
        builtin(&OperatorPolicy::default())
    }

    /// The registry of every built-in driver under `policy`: [`builtin()`].
    pub fn builtin_with(policy: &OperatorPolicy) -> Self {
        builtin(policy)
    }
}
