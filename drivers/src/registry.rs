//! The driver contract as far as booking needs it, and the registry.

use std::{collections::BTreeMap, fmt, sync::Arc};

use crate::{
    driver::Driver,
    model::{Capabilities, Family},
};

/// What a driver needs to know about a device to describe it.
#[derive(Clone, Copy, Debug)]
pub struct DeviceSpec<'a> {
    /// The switchyard device id.
    pub device_id: &'a str,
    /// The device's family.
    pub family: Family,
    /// The OEM's identifier of the device.
    pub oem_device_id: &'a str,
    /// IANA time zone of the site.
    pub timezone: &'a str,
    /// Driver settings, as stored on the device.
    pub settings: &'a BTreeMap<String, String>,
}

/// Why a driver refuses a device's configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The driver cannot drive devices of this family.
    #[error("driver does not support the {0} family")]
    UnsupportedFamily(&'static str),
    /// A settings key the driver does not know.
    #[error("unknown setting {key:?}; known settings: {known}")]
    UnknownSetting {
        /// The key.
        key: String,
        /// The keys the driver knows, comma-separated.
        known: String,
    },
    /// A setting's value is invalid.
    #[error("setting {key:?}: {reason}")]
    InvalidSetting {
        /// The key.
        key: String,
        /// What is wrong with the value (never the value itself, which may
        /// be sensitive).
        reason: String,
    },
}

impl ConfigError {
    /// The settings key at fault, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnsupportedFamily(_) => None,
            ConfigError::UnknownSetting { key, .. } | ConfigError::InvalidSetting { key, .. } => {
                Some(key)
            }
        }
    }
}

/// Builds drivers of one kind and describes what they can do.
///
/// Contract:
/// - `kind` MUST be a stable lower-case name; it is stored on devices.
/// - `capabilities` MUST be a pure function of the [`DeviceSpec`]: the
///   service calls it on every create, update and push, and trusts it to
///   validate the settings (unknown keys MUST be rejected, so typos are not
///   silently ignored).
/// - Errors MUST NOT echo setting values: they may be sensitive.
pub trait DriverFactory: Send + Sync + fmt::Debug {
    /// The driver kind, e.g. "simulated".
    fn kind(&self) -> &'static str;

    /// Validates the device configuration and returns what the driver can
    /// do with the device.
    fn capabilities(&self, device: &DeviceSpec<'_>) -> Result<Capabilities, ConfigError>;

    /// A driver bound to the device. Called for every dispatch with the
    /// device as stored then, so settings changed at run time take effect.
    fn build(&self, device: &DeviceSpec<'_>) -> Result<Arc<dyn Driver>, ConfigError>;
}

/// Maps a driver kind to its factory. Built explicitly at start-up.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    factories: BTreeMap<&'static str, Arc<dyn DriverFactory>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry of every built-in driver.
    pub fn builtin() -> Self {
        let mut r = Self::new();
        r.register(Arc::new(crate::simulated::SimulatedFactory::default()));
        r.register(Arc::new(crate::foxess::FoxessFactory::default()));
        r
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
