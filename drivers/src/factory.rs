//! The factory contract: what a driver needs to know about a device
//! ([`DeviceSpec`]), why it refuses one ([`ConfigError`]), and the
//! [`DriverFactory`] that validates a device and builds its driver.
//!
//! Every driver implements this; the [`Registry`](crate::Registry) only
//! maps kinds to factories, and [`builtin()`](crate::builtin()) assembles the
//! drivers that ship with switchyard.

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
        key: String,
        /// The keys the driver knows, comma-separated.
        known: String,
    },
    /// A setting's value is invalid.
    #[error("{key} {reason}")]
    InvalidSetting {
        key: String,
        /// What is wrong with the value (never the value itself, which may
        /// be sensitive).
        reason: String,
    },
    /// A field of the device itself (not a setting) that the driver
    /// cannot work with, e.g. `oem_device_id` or `timezone`.
    #[error("{field} {reason}")]
    InvalidDeviceField {
        /// The device field's name, as in the API.
        field: &'static str,
        reason: String,
    },
}

impl ConfigError {
    /// The first of `errors`, for callers that report one (a driver's
    /// `capabilities` and `build`).
    pub fn first(mut errors: Vec<ConfigError>) -> ConfigError {
        if errors.is_empty() {
            ConfigError::InvalidSetting {
                key: "settings".to_owned(),
                reason: "are invalid".to_owned(),
            }
        } else {
            errors.swap_remove(0)
        }
    }

    /// The settings key at fault, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnsupportedFamily(_) | ConfigError::InvalidDeviceField { .. } => None,
            ConfigError::UnknownSetting { key, .. } | ConfigError::InvalidSetting { key, .. } => {
                Some(key)
            }
        }
    }
}

/// Every error of a settings parse, so that a client fixes them all in one
/// round.
#[derive(Debug, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Starts a parse of `settings`: every key not in `known` is an error
    /// already (typos are never silently ignored).
    pub fn unknown_keys(
        settings: &std::collections::BTreeMap<String, String>,
        known: &[&str],
    ) -> Self {
        Self(
            settings
                .keys()
                .filter(|k| !known.contains(&k.as_str()))
                .map(|key| ConfigError::UnknownSetting {
                    key: key.clone(),
                    known: known.join(", "),
                })
                .collect(),
        )
    }

    /// The value of `r`, or `None` with its error kept.
    pub fn take<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
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
    /// do with the device. Cheap: no I/O (it runs on every push).
    fn capabilities(&self, device: &DeviceSpec<'_>) -> Result<Capabilities, ConfigError>;

    /// Everything wrong with the device configuration, for CreateDevice
    /// and UpdateDevice: every bad setting, and what only I/O can tell
    /// (e.g. that the referenced secret can be read). Empty when the
    /// device can be driven.
    fn validate(&self, device: &DeviceSpec<'_>) -> Vec<ConfigError> {
        self.capabilities(device).err().into_iter().collect()
    }

    /// A driver bound to the device. Called for every dispatch with the
    /// device as stored then, so settings changed at run time take effect.
    fn build(&self, device: &DeviceSpec<'_>) -> Result<Arc<dyn Driver>, ConfigError>;

    /// What the driver writes to: two configurations with the same target
    /// reach the same physical device, so a revert owed under one can be
    /// carried out under the other. The service refuses a change of
    /// target while an action's write may be in force (it would strand
    /// it). By default the OEM's device id.
    fn target(&self, device: &DeviceSpec<'_>) -> String {
        device.oem_device_id.trim().to_owned()
    }
}
