//! Devices as stored.

use std::collections::BTreeMap;

use super::{DeviceId, Family, Ts};

#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    pub id: DeviceId,
    /// Human-readable name.
    pub display_name: String,
    pub family: Family,
    /// Driver kind.
    pub driver: String,
    /// The OEM's identifier.
    pub oem_device_id: String,
    /// IANA time zone.
    pub timezone: String,
    /// Driver settings (shared: devices read together and configured
    /// alike hold one copy, see `Store::claim_ahead`).
    pub settings: std::sync::Arc<BTreeMap<String, String>>,
    /// Incremented on every change; the etag.
    pub revision: i64,
    /// Registration time.
    pub created: Ts,
    /// Last change.
    pub updated: Ts,
    /// What the driver last observed on the device (output only).
    pub observed: Option<Observed>,
    /// Fresh at every registration (empty for devices registered before
    /// incarnations existed): a device deleted and registered again under
    /// the same id gets etags the old one never had.
    pub incarnation: String,
}

impl Device {
    /// The device's etag (see [`super::etag`]): its revision, tagged with
    /// its id and incarnation.
    pub fn etag(&self) -> String {
        if self.incarnation.is_empty() {
            super::etag(self.id.as_str(), self.revision)
        } else {
            super::etag(&format!("{}#{}", self.id, self.incarnation), self.revision)
        }
    }

    /// Whether `other` reaches the device the same way (driver, OEM id,
    /// time zone and settings), so that what was observed through one
    /// holds for the other.
    pub fn same_config(&self, other: &Device) -> bool {
        self.id == other.id
            && self.driver == other.driver
            && self.oem_device_id == other.oem_device_id
            && self.timezone == other.timezone
            && self.settings == other.settings
    }

    /// What a driver needs to know of the device.
    pub fn spec(&self) -> switchyard_drivers::DeviceSpec<'_> {
        switchyard_drivers::DeviceSpec {
            device_id: self.id.as_str(),
            family: self.family,
            oem_device_id: &self.oem_device_id,
            timezone: &self.timezone,
            settings: &self.settings,
        }
    }
}

/// Checks an IANA time zone name.
pub fn valid_timezone(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && jiff::tz::TimeZone::get(name).is_ok()
}

pub use switchyard_drivers::{NativeRow, RowOwner};

/// A device's state as its driver last observed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// An enabled native scheduler blocks direct writes.
    pub scheduler_active: bool,
    /// The native scheduler's rows.
    pub rows: Vec<NativeRow>,
    /// State of charge, percent.
    pub soc_percent: Option<f64>,
    /// Mode in force.
    pub mode: Option<String>,
    /// When it was observed.
    pub at: Ts,
}
