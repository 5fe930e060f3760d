//! The registry: maps a driver kind to its [`DriverFactory`]. It knows no
//! driver; [`builtin()`](crate::builtin()) fills one with the built-in drivers.

use std::{collections::BTreeMap, sync::Arc};

use crate::factory::DriverFactory;

/// Maps a driver kind to its factory. Built explicitly at start-up.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    factories: BTreeMap<&'static str, Arc<dyn DriverFactory>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the factory for its kind.
    pub fn register(&mut self, factory: Arc<dyn DriverFactory>) -> &mut Self {
        self.factories.insert(factory.kind(), factory);
        self
    }

    /// The factory of `kind`.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn DriverFactory>> {
        self.factories.get(kind)
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.factories.keys().copied()
    }
}
